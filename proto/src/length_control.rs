//! A length-controlled win rate (AlpacaEval 2's GLM without its difficulty term): the student's
//! chance of winning a question is modelled as `logit p = θ·tanh(Δlen/σ) + β`, where Δlen is the
//! student's answer length minus the baseline's (characters, all turns) and σ the standard
//! deviation of Δlen over the questions; the length-controlled win rate is the model's win rate at
//! Δlen = 0, `sigmoid(β)`. A judge that simply prefers longer answers moves θ, not β.

/// Outcomes at one length difference (ties count half).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Point {
    /// Student length minus baseline length.
    pub delta: f64,
    pub wins: f64,
    pub ties: f64,
    pub losses: f64,
}

/// The fitted model.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LengthControlled {
    /// `sigmoid(β)`: the win rate with equal lengths.
    pub win_rate: f64,
    /// θ: how much a length advantage sways the judge.
    pub length_coef: f64,
    /// σ of the length differences (characters).
    pub sigma: f64,
}

/// A weakly informative Gaussian prior on θ and β (standard deviation 1/√0.3 ≈ 1.8 in log-odds):
/// a judge that decides by length alone separates the data perfectly, where maximum likelihood
/// has no finite solution and β would be set by the few questions closest to equal length; with
/// the prior the fit stays finite and symmetric. On a few hundred questions that are not
/// separated it moves the win rate by well under a percentage point.
const RIDGE: f64 = 0.3;

/// Fits the model by Newton's method (fractional-response logistic regression). `None` when
/// there is nothing to fit.
pub fn fit(points: &[Point]) -> Option<LengthControlled> {
    let n: f64 = points.iter().map(|p| p.wins + p.ties + p.losses).sum();
    if n <= 0.0 {
        return None;
    }
    let mean = points
        .iter()
        .map(|p| p.delta * (p.wins + p.ties + p.losses))
        .sum::<f64>()
        / n;
    let var = points
        .iter()
        .map(|p| (p.delta - mean).powi(2) * (p.wins + p.ties + p.losses))
        .sum::<f64>()
        / n;
    let sigma = var.sqrt();
    // (x, weight, y) per point.
    let data: Vec<(f64, f64, f64)> = points
        .iter()
        .filter(|p| p.wins + p.ties + p.losses > 0.0)
        .map(|p| {
            let w = p.wins + p.ties + p.losses;
            let x = if sigma > 0.0 {
                (p.delta / sigma).tanh()
            } else {
                0.0
            };
            (x, w, (p.wins + p.ties / 2.0) / w)
        })
        .collect();
    let (mut theta, mut beta) = (0.0f64, 0.0f64);
    for _ in 0..200 {
        let (mut g_t, mut g_b) = (-RIDGE * theta, -RIDGE * beta);
        let (mut h_tt, mut h_tb, mut h_bb) = (RIDGE, 0.0, RIDGE);
        for &(x, w, y) in &data {
            let p = 1.0 / (1.0 + (-(theta * x + beta)).exp());
            let r = w * (y - p);
            g_t += r * x;
            g_b += r;
            let v = w * p * (1.0 - p);
            h_tt += v * x * x;
            h_tb += v * x;
            h_bb += v;
        }
        let det = h_tt * h_bb - h_tb * h_tb;
        if det.abs() < 1e-300 {
            break;
        }
        let dt = ((h_bb * g_t - h_tb * g_b) / det).clamp(-5.0, 5.0);
        let db = ((h_tt * g_b - h_tb * g_t) / det).clamp(-5.0, 5.0);
        theta += dt;
        beta += db;
        if dt.abs().max(db.abs()) < 1e-10 {
            break;
        }
    }
    Some(LengthControlled {
        win_rate: 1.0 / (1.0 + (-beta).exp()),
        length_coef: theta,
        sigma,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_a_length_effect_it_is_the_raw_win_rate() {
        // Same outcomes at every length difference (200 questions): θ ≈ 0 and sigmoid(β) ≈ 0.7
        // (the prior pulls it by under 0.005).
        let pts: Vec<Point> = [-50.0, -10.0, 0.0, 20.0, 60.0]
            .iter()
            .map(|&d| Point {
                delta: d,
                wins: 24.0,
                ties: 8.0,
                losses: 8.0,
            })
            .collect();
        let f = fit(&pts).unwrap();
        assert!((f.win_rate - 0.7).abs() < 0.005, "{f:?}");
        assert!(f.length_coef.abs() < 0.05, "{f:?}");
        assert!(fit(&[]).is_none());
    }

    #[test]
    fn a_length_effect_is_taken_out() {
        // The student wins 80% when longer, 40% when shorter: halfway in log-odds is
        // sigmoid((logit 0.8 + logit 0.4) / 2) = 0.62. It is longer on 3 questions in 4, so
        // its raw win rate is 0.7.
        let mut pts = Vec::new();
        for k in 0..40 {
            let d = 30.0 + k as f64;
            pts.push(Point {
                delta: d,
                wins: 0.8 * 3.0,
                ties: 0.0,
                losses: 0.2 * 3.0,
            });
            pts.push(Point {
                delta: -d,
                wins: 0.4,
                ties: 0.0,
                losses: 0.6,
            });
        }
        let f = fit(&pts).unwrap();
        assert!(f.length_coef > 0.5, "{f:?}");
        assert!((f.win_rate - 0.62).abs() < 0.03, "{f:?}");
    }
}
