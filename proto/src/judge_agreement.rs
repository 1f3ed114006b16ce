//! How much a judge agrees with itself and with a second judge, from summable tables so shards
//! merge: Krippendorff's α over repeated samples of one judge (a coincidence matrix; nominal for
//! verdicts, interval for scores), and Cohen's κ between two judges (a confusion matrix).

use std::collections::BTreeMap;

/// Coincidence counts `o[c][k]` (Krippendorff): each unit with m ≥ 2 values adds 1/(m − 1) for
/// every ordered pair of its values taken from different samples.
pub type Coincidence = BTreeMap<(String, String), f64>;

/// Adds one unit (the values its samples gave; unparsed samples left out) to `o`.
pub fn add_unit(o: &mut Coincidence, values: &[String]) {
    let m = values.len();
    if m < 2 {
        return;
    }
    let w = 1.0 / (m - 1) as f64;
    for (i, a) in values.iter().enumerate() {
        for (j, b) in values.iter().enumerate() {
            if i != j {
                *o.entry((a.clone(), b.clone())).or_insert(0.0) += w;
            }
        }
    }
}

/// The share of pairable value pairs that agree (observed agreement).
pub fn agreement(o: &Coincidence) -> Option<f64> {
    let n: f64 = o.values().sum();
    if n <= 0.0 {
        return None;
    }
    let same: f64 = o.iter().filter(|((a, b), _)| a == b).map(|(_, v)| v).sum();
    Some(same / n)
}

/// The distance between two values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Metric {
    /// Equal or not (verdicts).
    Nominal,
    /// Squared difference of the values read as numbers (scores).
    Interval,
}

/// Krippendorff's α = 1 − D_o / D_e. `None` without pairable values or without any variation
/// (every value the same: α is undefined).
pub fn krippendorff_alpha(o: &Coincidence, metric: Metric) -> Option<f64> {
    let n: f64 = o.values().sum();
    if n <= 1.0 {
        return None;
    }
    let mut marg: BTreeMap<&str, f64> = BTreeMap::new();
    for ((a, _), v) in o {
        *marg.entry(a.as_str()).or_insert(0.0) += v;
    }
    let delta = |a: &str, b: &str| -> Option<f64> {
        match metric {
            Metric::Nominal => Some(if a == b { 0.0 } else { 1.0 }),
            Metric::Interval => {
                let (x, y) = (a.parse::<f64>().ok()?, b.parse::<f64>().ok()?);
                Some((x - y).powi(2))
            }
        }
    };
    let mut d_o = 0.0;
    for ((a, b), v) in o {
        d_o += v * delta(a, b)?;
    }
    let mut d_e = 0.0;
    for (a, na) in &marg {
        for (b, nb) in &marg {
            d_e += na * nb * delta(a, b)?;
        }
    }
    if d_e <= 0.0 {
        return None;
    }
    Some(1.0 - (n - 1.0) * d_o / d_e)
}

/// Confusion counts between judge 1's verdict (first) and judge 2's (second) on the same prompts.
pub type Confusion = BTreeMap<(String, String), f64>;

/// Cohen's κ = (p_o − p_e) / (1 − p_e). `None` on an empty table or when chance agreement is 1.
pub fn cohen_kappa(m: &Confusion) -> Option<f64> {
    let n: f64 = m.values().sum();
    if n <= 0.0 {
        return None;
    }
    let mut rows: BTreeMap<&str, f64> = BTreeMap::new();
    let mut cols: BTreeMap<&str, f64> = BTreeMap::new();
    let mut same = 0.0;
    for ((a, b), v) in m {
        *rows.entry(a).or_insert(0.0) += v;
        *cols.entry(b).or_insert(0.0) += v;
        if a == b {
            same += v;
        }
    }
    let p_o = same / n;
    let p_e: f64 = rows
        .iter()
        .map(|(k, r)| r / n * cols.get(k).copied().unwrap_or(0.0) / n)
        .sum();
    if (1.0 - p_e).abs() < 1e-12 {
        return None;
    }
    Some((p_o - p_e) / (1.0 - p_e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    /// Krippendorff's (2011) "Computing Krippendorff's alpha-reliability", the nominal example
    /// with missing values: 4 coders, 12 units, α = 0.743.
    #[test]
    fn alpha_matches_krippendorffs_worked_example() {
        let units: [&[&str]; 12] = [
            &["1", "1", "1"],
            &["2", "2", "3", "2"],
            &["3", "3", "3", "3"],
            &["3", "3", "3", "3"],
            &["2", "2", "2", "2"],
            &["1", "2", "3", "4"],
            &["4", "4", "4", "4"],
            &["1", "1", "2", "1"],
            &["2", "2", "2", "2"],
            &["5", "5", "5"],
            &["1", "1"],
            &["3"],
        ];
        let mut o = Coincidence::new();
        for u in units {
            add_unit(&mut o, &s(u));
        }
        let a = krippendorff_alpha(&o, Metric::Nominal).unwrap();
        assert!((a - 0.743).abs() < 0.0005, "{a}");
        // The interval version of the same data: 0.849 in the paper.
        let a = krippendorff_alpha(&o, Metric::Interval).unwrap();
        assert!((a - 0.849).abs() < 0.0005, "{a}");
    }

    #[test]
    fn perfect_and_chance_agreement() {
        let mut o = Coincidence::new();
        for v in ["A", "B", "A", "C"] {
            add_unit(&mut o, &s(&[v, v, v]));
        }
        assert_eq!(agreement(&o), Some(1.0));
        assert_eq!(krippendorff_alpha(&o, Metric::Nominal), Some(1.0));
        // Every value the same everywhere: α undefined.
        let mut same = Coincidence::new();
        add_unit(&mut same, &s(&["A", "A"]));
        assert_eq!(krippendorff_alpha(&same, Metric::Nominal), None);
    }

    #[test]
    fn kappa_of_a_textbook_table() {
        // 50 items: both yes 20, judge 1 yes / 2 no 5, 1 no / 2 yes 10, both no 15.
        // p_o = 0.7, p_e = 0.5 * 0.6 + 0.5 * 0.4 = 0.5, κ = 0.4.
        let mut m = Confusion::new();
        m.insert(("y".into(), "y".into()), 20.0);
        m.insert(("y".into(), "n".into()), 5.0);
        m.insert(("n".into(), "y".into()), 10.0);
        m.insert(("n".into(), "n".into()), 15.0);
        let k = cohen_kappa(&m).unwrap();
        assert!((k - 0.4).abs() < 1e-12, "{k}");
    }
}
