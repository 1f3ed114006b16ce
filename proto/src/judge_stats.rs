//! Judge figures derived from summable counts, shared by the worker (one shard) and the
//! coordinator (the sum over a phase's shards): win rate, a bootstrap 95% interval, position
//! consistency, mean lengths of winners and losers.

use std::collections::BTreeMap;

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
}
