//! Intermediate-state distillation (Minitron, Muralidharan et al. 2024, §4; Model-Optimizer's
//! `HiddenStateCosineLoss` and `LogitsAndIntermediatesLossBalancer`): the outputs of mapped
//! student layers are pulled towards the outputs of teacher layers. When the widths differ the
//! student's hidden states go through one learned linear projection `W` `[d_teacher, d_student]`
//! shared by every pair, initialised to put each student channel where it was pruned from
//! (`W[c_j, j] = 1`). The projection is trained with the student (it is in the optimizer's flat
//! vector and in checkpoints) and is not part of the exported student.
//!
//! Per position, averaged over the pairs: `1 − cos(W h_s, h_t)` (cosine) or
//! `mean((W h_s − h_t)²)` over the teacher's width (mse), summed over positions. Each micro-batch
//! the hidden loss is rescaled to the logit loss (the weight `L_logit / L_hidden`, not
//! differentiated), so both pull with the same magnitude, as Minitron does.

use candle_core::{DType, Device, Result, Tensor, D};

/// The per-position hidden-state loss.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HiddenLoss {
    Cosine,
    Mse,
}

impl HiddenLoss {
    /// `"cosine"` (also `""`) or `"mse"`.
    pub fn parse(s: &str) -> std::result::Result<HiddenLoss, String> {
        match s {
            "" | "cosine" => Ok(HiddenLoss::Cosine),
            "mse" => Ok(HiddenLoss::Mse),
            other => Err(format!(
                "{other:?} is not a hidden-state loss: use \"cosine\" or \"mse\""
            )),
        }
    }
}

/// What intermediate-state distillation a run does.
#[derive(Debug, Clone, PartialEq)]
pub struct HiddenDistill {
    /// (student layer, teacher layer): the outputs of those decoder layers (0-based).
    pub pairs: Vec<(usize, usize)>,
    pub loss: HiddenLoss,
    /// For each student channel, the teacher channel it was pruned from; needed (for the
    /// projection's initial value) when the widths differ.
    pub channels: Option<Vec<usize>>,
}

/// The projection's name in the flat parameter vector and in checkpoints; no Hugging Face
/// tensor has it, so it can never be mistaken for part of the student.
pub const PROJECTION: &str = "distillery.hidden_projection.weight";

/// The initial projection `[d_teacher, d_student]`: 1 at `(channels[j], j)`, else 0.
pub fn initial_projection(
    d_teacher: usize,
    channels: &[usize],
    dtype: DType,
    device: &Device,
) -> Result<Tensor> {
    let d_student = channels.len();
    let mut w = vec![0f32; d_teacher * d_student];
    for (j, &c) in channels.iter().enumerate() {
        if c >= d_teacher {
            return Err(candle_core::Error::Msg(format!(
                "hidden projection: student channel {j} maps to teacher channel {c}, but the teacher has {d_teacher}"
            )));
        }
        w[c * d_student + j] = 1.0;
    }
    Tensor::from_vec(w, (d_teacher, d_student), device)?.to_dtype(dtype)
}

/// The hidden loss summed over positions (mean over the pairs), f32 (f64 for f64 inputs):
/// `student[i]` `[B, T, d_s]` (differentiable), `teacher[i]` `[B, T, d_t]` (not differentiated),
/// `projection` `[d_t, d_s]` when the widths differ.
pub fn hidden_loss(
    student: &[Tensor],
    teacher: &[Tensor],
    projection: Option<&Tensor>,
    loss: HiddenLoss,
) -> Result<Tensor> {
    if student.len() != teacher.len() || student.is_empty() {
        return Err(candle_core::Error::Msg(format!(
            "hidden loss: {} student and {} teacher hidden states",
            student.len(),
            teacher.len()
        )));
    }
    let f = if student[0].dtype() == DType::F64 {
        DType::F64
    } else {
        DType::F32
    };
    let mut total: Option<Tensor> = None;
    for (s, t) in student.iter().zip(teacher) {
        let s = match projection {
            Some(w) => crate::model::ops::gemm::linear(s, w)?,
            None => s.clone(),
        }
        .to_dtype(f)?;
        let t = t.detach().to_dtype(f)?;
        if s.dims() != t.dims() {
            return Err(candle_core::Error::Msg(format!(
                "hidden loss: student hidden states {:?} (after the projection) but teacher {:?}",
                s.dims(),
                t.dims()
            )));
        }
        let per_position = match loss {
            HiddenLoss::Cosine => {
                let dot = (&s * &t)?.sum(D::Minus1)?;
                let ns = s.sqr()?.sum(D::Minus1)?;
                let nt = t.sqr()?.sum(D::Minus1)?;
                // 1 - a·b / sqrt(|a|²|b|² + ε): differentiable everywhere, also at 0.
                let cos = (dot / ((ns * nt)? + 1e-12)?.sqrt()?)?;
                cos.affine(-1.0, 1.0)?
            }
            HiddenLoss::Mse => (&s - &t)?.sqr()?.mean(D::Minus1)?,
        };
        let sum = per_position.sum_all()?;
        total = Some(match total {
            Some(x) => (x + sum)?,
            None => sum,
        });
    }
    let n = student.len() as f64;
    match total {
        Some(t) => t / n,
        None => Err(candle_core::Error::Msg("hidden loss: no pairs".into())),
    }
}

/// Minitron's balance: the weight that makes the hidden loss as large as the logit loss this
/// micro-batch, a 0-d tensor on the device (no host round trip), not differentiated.
pub fn balance_weight(logit_total: &Tensor, hidden_total: &Tensor) -> Result<Tensor> {
    let h = hidden_total.detach();
    let tiny = if h.dtype() == DType::F64 {
        1e-300
    } else {
        1e-30
    };
    logit_total.detach().to_dtype(h.dtype())? / h.maximum(tiny)?
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Var;

    fn vals(n: usize, seed: u64) -> Vec<f64> {
        (0..n)
            .map(|i| (((i as u64 * 37 + seed * 101) % 113) as f64 / 113.0 - 0.5) * 2.0)
            .collect()
    }

    #[test]
    fn the_losses_match_their_definitions() {
        let dev = Device::Cpu;
        // One position, widths 2 (student) and 3 (teacher); projection puts student channel 0
        // at teacher channel 2 and channel 1 at 0.
        let s = Tensor::new(&[[[1.0f64, 2.0]]], &dev).unwrap();
        let t = Tensor::new(&[[[3.0f64, -1.0, 0.5]]], &dev).unwrap();
        let w = initial_projection(3, &[2, 0], DType::F64, &dev).unwrap();
        assert_eq!(
            w.to_vec2::<f64>().unwrap(),
            vec![vec![0.0, 1.0], vec![0.0, 0.0], vec![1.0, 0.0]]
        );
        // W s = (2, 0, 1).
        let cos = (2.0 * 3.0 + 1.0 * 0.5) / ((5.0f64).sqrt() * (9.0f64 + 1.0 + 0.25).sqrt());
        let l = hidden_loss(
            std::slice::from_ref(&s),
            std::slice::from_ref(&t),
            Some(&w),
            HiddenLoss::Cosine,
        )
        .unwrap();
        assert!((l.to_scalar::<f64>().unwrap() - (1.0 - cos)).abs() < 1e-12);
        let mse = ((2.0f64 - 3.0).powi(2) + 1.0 + 0.25) / 3.0;
        let l = hidden_loss(&[s], &[t], Some(&w), HiddenLoss::Mse).unwrap();
        assert!((l.to_scalar::<f64>().unwrap() - mse).abs() < 1e-12);
    }

    #[test]
    fn the_gradient_reaches_the_projection_and_the_student_states_as_finite_differences_say() {
        let dev = Device::Cpu;
        let (b, t, ds, dt) = (2, 3, 4, 5);
        let s0 = vals(b * t * ds, 1);
        let w0 = vals(dt * ds, 2);
        let teacher = Tensor::from_vec(vals(b * t * dt, 3), (b, t, dt), &dev).unwrap();
        let teacher2 = Tensor::from_vec(vals(b * t * dt, 4), (b, t, dt), &dev).unwrap();
        for loss in [HiddenLoss::Cosine, HiddenLoss::Mse] {
            let value = |s: &[f64], w: &[f64]| -> f64 {
                let st = Tensor::from_vec(s.to_vec(), (b, t, ds), &dev).unwrap();
                let wt = Tensor::from_vec(w.to_vec(), (dt, ds), &dev).unwrap();
                // Two pairs reading the same student state (the projection is shared).
                hidden_loss(
                    &[st.clone(), (&st * 0.5).unwrap()],
                    &[teacher.clone(), teacher2.clone()],
                    Some(&wt),
                    loss,
                )
                .unwrap()
                .to_scalar::<f64>()
                .unwrap()
            };
            let sv = Var::from_vec(s0.clone(), (b, t, ds), &dev).unwrap();
            let wv = Var::from_vec(w0.clone(), (dt, ds), &dev).unwrap();
            let l = hidden_loss(
                &[sv.as_tensor().clone(), (sv.as_tensor() * 0.5).unwrap()],
                &[teacher.clone(), teacher2.clone()],
                Some(wv.as_tensor()),
                loss,
            )
            .unwrap();
            let g = l.backward().unwrap();
            let gs: Vec<f64> = g
                .get(sv.as_tensor())
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let gw: Vec<f64> = g
                .get(wv.as_tensor())
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let h = 1e-6;
            for i in 0..s0.len() {
                let (mut a, mut c) = (s0.clone(), s0.clone());
                a[i] += h;
                c[i] -= h;
                let fd = (value(&a, &w0) - value(&c, &w0)) / (2.0 * h);
                assert!(
                    (fd - gs[i]).abs() < 1e-7,
                    "{loss:?} d/ds[{i}]: {} vs {fd}",
                    gs[i]
                );
            }
            for i in 0..w0.len() {
                let (mut a, mut c) = (w0.clone(), w0.clone());
                a[i] += h;
                c[i] -= h;
                let fd = (value(&s0, &a) - value(&s0, &c)) / (2.0 * h);
                assert!(
                    (fd - gw[i]).abs() < 1e-7,
                    "{loss:?} d/dW[{i}]: {} vs {fd}",
                    gw[i]
                );
            }
            assert!(gw.iter().any(|x| x.abs() > 1e-4) && gs.iter().any(|x| x.abs() > 1e-4));
        }
    }

    #[test]
    fn the_balance_weight_makes_the_hidden_term_equal_to_the_logit_loss() {
        let dev = Device::Cpu;
        let logit = Tensor::new(6.0f32, &dev).unwrap();
        let hidden = Tensor::new(0.25f32, &dev).unwrap();
        let w = balance_weight(&logit, &hidden).unwrap();
        assert_eq!((w * &hidden).unwrap().to_scalar::<f32>().unwrap(), 6.0);
        // A zero hidden loss gets a finite weight (its gradient is zero anyway).
        let w0 = balance_weight(&logit, &Tensor::new(0.0f32, &dev).unwrap()).unwrap();
        assert!(w0.to_scalar::<f32>().unwrap().is_finite());
    }
}
