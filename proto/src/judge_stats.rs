//! Judge figures derived from summable counts, shared by the worker (one shard) and the
//! coordinator (the sum over a phase's shards): win rate, a bootstrap 95% interval, position
//! consistency, mean lengths of winners and losers, MT-Bench turn scores, the length-controlled
//! win rate, the Bradley–Terry ranking, and the judge's agreement with itself and a second judge.
//!
//! The names (after `judge.`) are the stable field names of `status --json`'s `metrics.judge`;
//! README.md documents them.

use std::collections::BTreeMap;

use crate::bradley_terry::{self, PairCounts};
use crate::judge_agreement::{self, Coincidence, Confusion, Metric};
use crate::length_control;

/// The model every ranking is anchored at (rating 1000).
pub const ANCHOR: &str = "teacher";
/// Bootstrap refits behind the ranking's intervals.
const RANKING_SAMPLES: usize = 1000;

/// Percentile bootstrap 95% interval of the win rate (ties count half) from the counts, seeded:
/// resampling n per-question scores in {1, 1/2, 0} only depends on how many of each there are.
pub fn bootstrap_ci(wins: u64, ties: u64, losses: u64, samples: usize, seed: u64) -> (f64, f64) {
    let n = wins + ties + losses;
    if n == 0 {
        return (f64::NAN, f64::NAN);
    }
    let mut state = seed ^ 0x5DEE_CE66;
    let mut next = || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (state >> 11) as f64 / (1u64 << 53) as f64
    };
    let (pw, pt) = (wins as f64 / n as f64, ties as f64 / n as f64);
    let mut rates: Vec<f64> = (0..samples)
        .map(|_| {
            let mut score = 0.0;
            for _ in 0..n {
                let u = next();
                if u < pw {
                    score += 1.0;
                } else if u < pw + pt {
                    score += 0.5;
                }
            }
            score / n as f64
        })
        .collect();
    rates.sort_by(f64::total_cmp);
    let at = |q: f64| rates[((q * (samples - 1) as f64).round() as usize).min(samples - 1)];
    (at(0.025), at(0.975))
}

/// Derived figures from (summed) counts: win rate, bootstrap interval, position consistency,
/// mean lengths. `m` uses the names without `sum.`.
pub fn derive(m: &mut BTreeMap<String, f64>) {
    let g =
        |m: &BTreeMap<String, f64>, k: &str| m.get(&format!("judge.{k}")).copied().unwrap_or(0.0);
    let (w, t, l) = (g(m, "wins"), g(m, "ties"), g(m, "losses"));
    let n = w + t + l;
    if n > 0.0 {
        m.insert("judge.win_rate".into(), (w + t / 2.0) / n);
        let (lo, hi) = bootstrap_ci(w as u64, t as u64, l as u64, 1000, 17);
        m.insert("judge.ci_low".into(), lo);
        m.insert("judge.ci_high".into(), hi);
    }
    let pairs = g(m, "pairs");
    if pairs > 0.0 {
        m.insert(
            "judge.position_consistency".into(),
            g(m, "consistent") / pairs,
        );
    }
    let decided = g(m, "decided");
    if decided > 0.0 {
        m.insert(
            "judge.winner_mean_chars".into(),
            g(m, "winner_chars") / decided,
        );
        m.insert(
            "judge.loser_mean_chars".into(),
            g(m, "loser_chars") / decided,
        );
    }
    for who in ["mtbench", "teacher_mtbench", "baseline_mtbench"] {
        derive_mtbench(m, who);
    }
    derive_length_control(m);
    derive_ranking(m);
    derive_agreement(m);
}

/// `judge.<who>.{turn1, turn2, overall}` from the sums of valid turn scores and their counts
/// (FastChat's show_result: the mean over valid grades; invalid ones are only counted).
fn derive_mtbench(m: &mut BTreeMap<String, f64>, who: &str) {
    let g = |k: &str| m.get(&format!("judge.{who}.{k}")).copied();
    let (s1, n1, s2, n2) = (g("turn1_sum"), g("turn1_n"), g("turn2_sum"), g("turn2_n"));
    if s1.is_none() && s2.is_none() && g("invalid").is_none() {
        return;
    }
    let (s1, n1, s2, n2) = (
        s1.unwrap_or(0.0),
        n1.unwrap_or(0.0),
        s2.unwrap_or(0.0),
        n2.unwrap_or(0.0),
    );
    m.entry(format!("judge.{who}.invalid")).or_insert(0.0);
    if n1 > 0.0 {
        m.insert(format!("judge.{who}.turn1"), s1 / n1);
    }
    if n2 > 0.0 {
        m.insert(format!("judge.{who}.turn2"), s2 / n2);
    }
    if n1 + n2 > 0.0 {
        m.insert(format!("judge.{who}.overall"), (s1 + s2) / (n1 + n2));
    }
}

/// `judge.lc_win_rate` (and `lc_length_coef`, `lc_sigma`) from the outcome counts per length
/// difference `judge.lc.<delta>.{wins,ties,losses}`, which are then dropped (the judgments
/// artifact keeps every question's lengths).
fn derive_length_control(m: &mut BTreeMap<String, f64>) {
    let mut points: BTreeMap<i64, length_control::Point> = BTreeMap::new();
    let keys: Vec<String> = m
        .keys()
        .filter(|k| k.starts_with("judge.lc."))
        .cloned()
        .collect();
    for k in &keys {
        let rest = &k["judge.lc.".len()..];
        let Some((delta, what)) = rest.split_once('.') else {
            continue;
        };
        let Ok(d) = delta.parse::<i64>() else {
            continue;
        };
        let v = m.get(k).copied().unwrap_or(0.0);
        let p = points.entry(d).or_insert(length_control::Point {
            delta: d as f64,
            ..Default::default()
        });
        match what {
            "wins" => p.wins += v,
            "ties" => p.ties += v,
            "losses" => p.losses += v,
            _ => {}
        }
    }
    for k in keys {
        m.remove(&k);
    }
    let pts: Vec<length_control::Point> = points.into_values().collect();
    if let Some(f) = length_control::fit(&pts) {
        m.insert("judge.lc_win_rate".into(), f.win_rate);
        m.insert("judge.lc_length_coef".into(), f.length_coef);
        m.insert("judge.lc_sigma".into(), f.sigma);
    }
}

/// Orders ranking models: the teacher, then `round<N>` by N, then anything else by name.
pub fn model_order(name: &str) -> (u8, u64, String) {
    if name == ANCHOR {
        (0, 0, String::new())
    } else if let Some(n) = name.strip_prefix("round").and_then(|n| n.parse().ok()) {
        (1, n, String::new())
    } else {
        (2, 0, name.to_string())
    }
}

/// `judge.ranking.<model>.{elo, ci_low, ci_high, battles}` from the battle counts
/// `judge.battles.<a>.<b>.{a_wins, ties, b_wins}`.
fn derive_ranking(m: &mut BTreeMap<String, f64>) {
    let mut battles: BTreeMap<(String, String), PairCounts> = BTreeMap::new();
    for (k, v) in m.iter() {
        let Some(rest) = k.strip_prefix("judge.battles.") else {
            continue;
        };
        let parts: Vec<&str> = rest.split('.').collect();
        let [a, b, what] = parts[..] else { continue };
        let c = battles.entry((a.to_string(), b.to_string())).or_default();
        match what {
            "a_wins" => c.a_wins += v,
            "ties" => c.ties += v,
            "b_wins" => c.b_wins += v,
            _ => {}
        }
    }
    if battles.is_empty() {
        return;
    }
    let mut models: Vec<String> = battles
        .keys()
        .flat_map(|(a, b)| [a.clone(), b.clone()])
        .collect();
    models.sort_by_key(|x| model_order(x));
    models.dedup();
    let Ok(ratings) = bradley_terry::rank(&models, ANCHOR, &battles, RANKING_SAMPLES, 17) else {
        return;
    };
    for r in ratings {
        let p = format!("judge.ranking.{}", r.model);
        m.insert(format!("{p}.elo"), r.rating);
        m.insert(format!("{p}.ci_low"), r.ci_low);
        m.insert(format!("{p}.ci_high"), r.ci_high);
        m.insert(format!("{p}.battles"), r.battles);
    }
}

/// Two-level tables `judge.<prefix>.<a>.<b>` as (a, b) → count; labels use `_` for `.`.
fn table(m: &BTreeMap<String, f64>, prefix: &str) -> BTreeMap<(String, String), f64> {
    let mut t = BTreeMap::new();
    for (k, v) in m {
        let Some(rest) = k.strip_prefix(prefix) else {
            continue;
        };
        if let Some((a, b)) = rest.split_once('.') {
            let label = |x: &str| x.replace('_', ".");
            t.insert((label(a), label(b)), *v);
        }
    }
    t
}

/// Self-agreement over `judge.samples` (agreement, Krippendorff's α: interval for scores,
/// nominal for verdicts) and agreement with the second judge (agreement, Cohen's κ).
fn derive_agreement(m: &mut BTreeMap<String, f64>) {
    let o: Coincidence = table(m, "judge.samples.coincidence.");
    if !o.is_empty() {
        let scores = o
            .keys()
            .all(|(a, b)| a.parse::<f64>().is_ok() && b.parse::<f64>().is_ok());
        let metric = if scores {
            Metric::Interval
        } else {
            Metric::Nominal
        };
        if let Some(a) = judge_agreement::agreement(&o) {
            m.insert("judge.samples.agreement".into(), a);
        }
        if let Some(a) = judge_agreement::krippendorff_alpha(&o, metric) {
            m.insert("judge.samples.alpha".into(), a);
        }
    }
    let c: Confusion = table(m, "judge.second.confusion.");
    if !c.is_empty() {
        let n: f64 = c.values().sum();
        let same: f64 = c.iter().filter(|((a, b), _)| a == b).map(|(_, v)| v).sum();
        m.insert("judge.second.n".into(), n);
        if n > 0.0 {
            m.insert("judge.second.agreement".into(), same / n);
        }
        if let Some(k) = judge_agreement::cohen_kappa(&c) {
            m.insert("judge.second.kappa".into(), k);
        }
    }
}

/// `judge.elo_drop`: the teacher's rating minus the round's student's (`round<N>`), when the
/// round has a ranking.
pub fn elo_drop(m: &mut BTreeMap<String, f64>, round: u32) {
    let t = m.get(&format!("judge.ranking.{ANCHOR}.elo")).copied();
    let s = m.get(&format!("judge.ranking.round{round}.elo")).copied();
    if let (Some(t), Some(s)) = (t, s) {
        m.insert("judge.elo_drop".into(), t - s);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mtbench_turn_scores_and_overall_from_sums() {
        // Two questions: turn 1 graded 7 and 7, turn 2 graded 5 and (invalid).
        let mut m: BTreeMap<String, f64> = [
            ("judge.mtbench.turn1_sum", 14.0),
            ("judge.mtbench.turn1_n", 2.0),
            ("judge.mtbench.turn2_sum", 5.0),
            ("judge.mtbench.turn2_n", 1.0),
            ("judge.mtbench.invalid", 1.0),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        derive(&mut m);
        assert_eq!(m["judge.mtbench.turn1"], 7.0);
        assert_eq!(m["judge.mtbench.turn2"], 5.0);
        assert_eq!(m["judge.mtbench.overall"], 19.0 / 3.0);
        assert!(!m.contains_key("judge.teacher_mtbench.overall"));
    }

    #[test]
    fn ranking_and_elo_drop_from_battle_counts() {
        let mut m: BTreeMap<String, f64> = [
            ("judge.battles.teacher.round0.a_wins", 40.0),
            ("judge.battles.teacher.round0.ties", 20.0),
            ("judge.battles.teacher.round0.b_wins", 20.0),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        derive(&mut m);
        elo_drop(&mut m, 0);
        assert_eq!(m["judge.ranking.teacher.elo"], 1000.0);
        // The student's share is (20 + 10) / 80 = 3/8: odds 3/5.
        let want = 1000.0 + 400.0 * (3.0f64 / 5.0).log10();
        assert!((m["judge.ranking.round0.elo"] - want).abs() < 0.1, "{m:?}");
        assert!((m["judge.elo_drop"] - (1000.0 - want)).abs() < 0.1);
        assert_eq!(m["judge.ranking.round0.battles"], 80.0);
    }
}
