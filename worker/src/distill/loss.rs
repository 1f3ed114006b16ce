//! The distillation loss: T²·KL(softmax(t/T) ‖ softmax(s/T)) per position, plus an optional
//! `ce_weight`·cross-entropy of the student on the next token. On the CPU the fused kernel
//! (`model::ops::fused::kd_loss`: value and gradient in row chunks, no `[N, V]` temporary);
//! elsewhere, or with `DISTILLERY_FUSED` turning it off, composed from ops candle
//! differentiates (`log_softmax` is max/sub/exp/sum/log; `gather` has a backward).

use candle_core::{DType, Result, Tensor, D};
use candle_nn::ops::log_softmax;

use crate::model::ops::fused;

/// Summed (not averaged) losses of one micro-batch, as tensors so they can be differentiated.
pub struct LossSums {
    /// `T²·KL + ce_weight·CE`, summed over positions.
    pub total: Tensor,
    /// KL(teacher ‖ student) at temperature T, summed over positions (without T²).
    pub kl: f64,
    /// Cross-entropy of the student on the next token, summed over positions.
    pub ce: f64,
    /// Positions summed.
    pub positions: usize,
}

/// Losses of student logits `[B, T, V]` against teacher logits `[B, T, V]` (no gradient flows
/// to the teacher) and next tokens `targets` `[B, T]` (u32).
pub fn kd_loss(
    student: &Tensor,
    teacher: &Tensor,
    targets: &Tensor,
    temperature: f64,
    ce_weight: f64,
) -> Result<LossSums> {
    if fused_ok(student) && fused::supported(teacher.dtype()) {
        let (s, te, y) = flat(student, Some(teacher), targets)?;
        let te = te.ok_or_else(|| candle_core::Error::Msg("kd_loss: no teacher".into()))?;
        let l = fused::kd_loss(&s, &te, &y, temperature, ce_weight)?;
        return Ok(LossSums {
            total: l.total,
            kl: l.kl,
            ce: l.ce,
            positions: targets.elem_count(),
        });
    }
    let t = temperature;
    let s = student.to_dtype(DType::F32)?;
    let te = teacher.detach().to_dtype(DType::F32)?;
    let log_ps = log_softmax(&(&s / t)?, D::Minus1)?;
    let log_pt = log_softmax(&(&te / t)?, D::Minus1)?;
    let pt = log_pt.exp()?;
    let kl = (&pt * (&log_pt - &log_ps)?)?.sum_all()?;
    let log_p1 = if t == 1.0 {
        log_ps.clone()
    } else {
        log_softmax(&s, D::Minus1)?
    };
    let ce = log_p1
        .gather(&targets.unsqueeze(D::Minus1)?.contiguous()?, D::Minus1)?
        .sum_all()?
        .neg()?;
    let mut total = (&kl * (t * t))?;
    if ce_weight != 0.0 {
        total = (total + (&ce * ce_weight)?)?;
    }
    Ok(LossSums {
        kl: kl.to_dtype(DType::F64)?.to_scalar()?,
        ce: ce.to_dtype(DType::F64)?.to_scalar()?,
        positions: targets.elem_count(),
        total,
    })
}

/// Cross-entropy only (training without a teacher), in the same form.
pub fn ce_only(student: &Tensor, targets: &Tensor) -> Result<LossSums> {
    if fused_ok(student) {
        let (s, _, y) = flat(student, None, targets)?;
        let l = fused::ce_loss(&s, &y)?;
        return Ok(LossSums {
            total: l.total,
            kl: 0.0,
            ce: l.ce,
            positions: targets.elem_count(),
        });
    }
    let log_p = log_softmax(&student.to_dtype(DType::F32)?, D::Minus1)?;
    let ce = log_p
        .gather(&targets.unsqueeze(D::Minus1)?.contiguous()?, D::Minus1)?
        .sum_all()?
        .neg()?;
    Ok(LossSums {
        kl: 0.0,
        ce: ce.to_dtype(DType::F64)?.to_scalar()?,
        positions: targets.elem_count(),
        total: ce,
    })
}

fn fused_ok(student: &Tensor) -> bool {
    fused::active(fused::Kernel::Loss, student.device()) && fused::supported(student.dtype())
}

/// Logits `[.., V]` as `[N, V]` and targets as `[N]`.
fn flat(
    student: &Tensor,
    teacher: Option<&Tensor>,
    targets: &Tensor,
) -> Result<(Tensor, Option<Tensor>, Tensor)> {
    let v = student.dim(D::Minus1)?;
    let n = targets.elem_count();
    let s = student.reshape((n, v))?;
    let t = teacher.map(|t| t.reshape((n, v))).transpose()?;
    Ok((s, t, targets.flatten_all()?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn kl_is_zero_for_equal_logits_and_matches_a_direct_computation() {
        let dev = Device::Cpu;
        let s = Tensor::new(&[[[1.0f32, 2.0, 0.5], [0.1, -1.0, 3.0]]], &dev).unwrap();
        let tg = Tensor::new(&[[2u32, 0]], &dev).unwrap();
        let same = kd_loss(&s, &s, &tg, 2.0, 0.0).unwrap();
        assert!(same.kl.abs() < 1e-6);
        let t = Tensor::new(&[[[0.0f32, 1.0, 2.0], [2.0, 0.0, 1.0]]], &dev).unwrap();
        let l = kd_loss(&s, &t, &tg, 2.0, 0.5).unwrap();
        let sm = |x: &[f64], temp: f64| -> Vec<f64> {
            let e: Vec<f64> = x.iter().map(|v| (v / temp).exp()).collect();
            let z: f64 = e.iter().sum();
            e.iter().map(|v| v / z).collect()
        };
        let sv: Vec<Vec<f64>> = vec![vec![1.0, 2.0, 0.5], vec![0.1, -1.0, 3.0]];
        let tv: Vec<Vec<f64>> = vec![vec![0.0, 1.0, 2.0], vec![2.0, 0.0, 1.0]];
        let mut kl = 0.0;
        let mut ce = 0.0;
        for p in 0..2 {
            let (ps, pt) = (sm(&sv[p], 2.0), sm(&tv[p], 2.0));
            kl += (0..3)
                .map(|i| pt[i] * (pt[i].ln() - ps[i].ln()))
                .sum::<f64>();
            ce -= sm(&sv[p], 1.0)[[2, 0][p]].ln();
        }
        assert!((l.kl - kl).abs() < 1e-5, "{} vs {kl}", l.kl);
        assert!((l.ce - ce).abs() < 1e-5, "{} vs {ce}", l.ce);
        let total: f64 = l.total.to_dtype(DType::F64).unwrap().to_scalar().unwrap();
        assert!((total - (4.0 * kl + 0.5 * ce)).abs() < 1e-4);
        assert_eq!(l.positions, 2);
    }

    #[test]
    fn the_gradient_flows_to_the_student_only() {
        let dev = Device::Cpu;
        let s = Var::new(&[[[1.0f32, 2.0, 0.5]]], &dev).unwrap();
        let t = Var::new(&[[[0.0f32, 1.0, 2.0]]], &dev).unwrap();
        let tg = Tensor::new(&[[1u32]], &dev).unwrap();
        let l = kd_loss(s.as_tensor(), t.as_tensor(), &tg, 1.0, 1.0).unwrap();
        let g = l.total.backward().unwrap();
        let gs: Vec<f32> = g
            .get(s.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert!(gs.iter().any(|x| x.abs() > 1e-3));
        // d/ds of KL + CE sums to zero over the vocabulary (softmax gradients).
        assert!(gs.iter().sum::<f32>().abs() < 1e-5);
        assert!(g.get(t.as_tensor()).is_none());
    }
}
