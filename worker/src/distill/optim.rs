//! AdamW with fp32 moments over flat per-parameter buffers, linear warmup then cosine decay, and
//! global-norm gradient clipping. The state is plain vectors so a checkpoint stores it exactly.

/// Learning rate at `step` (0-based): linear warmup to `peak` over `warmup` steps, then cosine
/// decay to `peak / 10` at `total`.
pub fn lr_at(step: u64, peak: f64, warmup: u64, total: u64) -> f64 {
    if warmup > 0 && step < warmup {
        return peak * (step + 1) as f64 / warmup as f64;
    }
    let min = peak / 10.0;
    let span = total.saturating_sub(warmup).max(1) as f64;
    let p = ((step.saturating_sub(warmup)) as f64 / span).min(1.0);
    min + 0.5 * (peak - min) * (1.0 + (std::f64::consts::PI * p).cos())
}

/// Scales `grads` so their global L2 norm is at most `max_norm`; returns the norm before.
pub fn clip_global_norm(grads: &mut [Vec<f32>], max_norm: f64) -> f64 {
    let sq: f64 = grads
        .iter()
        .flatten()
        .map(|g| f64::from(*g) * f64::from(*g))
        .sum();
    let norm = sq.sqrt();
    if max_norm > 0.0 && norm > max_norm {
        let s = (max_norm / (norm + 1e-6)) as f32;
        grads.iter_mut().flatten().for_each(|g| *g *= s);
    }
    norm
}

/// AdamW state: first and second moments per parameter, and the step count.
#[derive(Debug, Clone, PartialEq)]
pub struct AdamW {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    pub step: u64,
    pub m: Vec<Vec<f32>>,
    pub v: Vec<Vec<f32>>,
}

impl AdamW {
    /// Zero moments for parameters of these sizes.
    pub fn new(sizes: &[usize], weight_decay: f64) -> AdamW {
        AdamW {
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay,
            step: 0,
            m: sizes.iter().map(|n| vec![0.0; *n]).collect(),
            v: sizes.iter().map(|n| vec![0.0; *n]).collect(),
        }
    }

    /// One update of `params` with `grads` at learning rate `lr`. `decay[i]` says whether
    /// parameter i gets weight decay (matrices do, norms do not).
    pub fn update(&mut self, params: &mut [Vec<f32>], grads: &[Vec<f32>], decay: &[bool], lr: f64) {
        self.step += 1;
        let (b1, b2) = (self.beta1 as f32, self.beta2 as f32);
        let c1 = 1.0 - self.beta1.powi(self.step as i32);
        let c2 = 1.0 - self.beta2.powi(self.step as i32);
        let step_size = (lr / c1) as f32;
        let c2s = c2.sqrt() as f32;
        let eps = self.eps as f32;
        for (i, p) in params.iter_mut().enumerate() {
            let wd = if decay[i] {
                (lr * self.weight_decay) as f32
            } else {
                0.0
            };
            let (m, v, g) = (&mut self.m[i], &mut self.v[i], &grads[i]);
            for j in 0..p.len() {
                m[j] = b1 * m[j] + (1.0 - b1) * g[j];
                v[j] = b2 * v[j] + (1.0 - b2) * g[j] * g[j];
                p[j] -= wd * p[j];
                p[j] -= step_size * m[j] / (v[j].sqrt() / c2s + eps);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_schedule_warms_up_linearly_then_decays_by_cosine_to_a_tenth() {
        assert!((lr_at(0, 1.0, 10, 110) - 0.1).abs() < 1e-12);
        assert!((lr_at(9, 1.0, 10, 110) - 1.0).abs() < 1e-12);
        assert!((lr_at(10, 1.0, 10, 110) - 1.0).abs() < 1e-12);
        assert!((lr_at(60, 1.0, 10, 110) - 0.55).abs() < 1e-12);
        assert!((lr_at(110, 1.0, 10, 110) - 0.1).abs() < 1e-12);
        assert!((lr_at(500, 1.0, 10, 110) - 0.1).abs() < 1e-12);
        assert!(lr_at(30, 1.0, 10, 110) > lr_at(31, 1.0, 10, 110));
    }

    #[test]
    fn clipping_bounds_the_global_norm() {
        let mut g = vec![vec![3.0f32], vec![4.0f32, 0.0]];
        assert!((clip_global_norm(&mut g, 1.0) - 5.0).abs() < 1e-9);
        let n: f32 = g.iter().flatten().map(|x| x * x).sum::<f32>().sqrt();
        assert!((n - 1.0).abs() < 1e-5);
        let mut small = vec![vec![0.3f32]];
        clip_global_norm(&mut small, 1.0);
        assert_eq!(small, vec![vec![0.3f32]]);
    }

    #[test]
    fn adamw_minimizes_a_quadratic_and_its_first_step_is_lr_sized() {
        let mut p = vec![vec![5.0f32, -3.0]];
        let mut opt = AdamW::new(&[2], 0.0);
        let g0 = vec![vec![2.0 * p[0][0], 2.0 * p[0][1]]];
        opt.update(&mut p, &g0, &[true], 0.1);
        // Bias-corrected Adam's first step is lr * sign(g).
        assert!(
            (p[0][0] - 4.9).abs() < 1e-5 && (p[0][1] + 2.9).abs() < 1e-5,
            "{p:?}"
        );
        for _ in 0..2000 {
            let g = vec![vec![2.0 * p[0][0], 2.0 * p[0][1]]];
            opt.update(&mut p, &g, &[true], 0.05);
        }
        assert!(p[0][0].abs() < 0.05 && p[0][1].abs() < 0.05, "{p:?}");
    }
}
