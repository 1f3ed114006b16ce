//! The distillation loss over the vocabulary: T²·D(teacher, student) at temperature T per
//! position, plus an optional `ce_weight`·cross-entropy of the student on the next token — or
//! the cross-entropy alone ([`LogitLoss::divergence`] = None, `distill.loss = "ce"`).
//!
//! D is forward KL (the default, Minitron's), reverse KL, DistiLLM's skew KL or GKD's
//! generalized JSD ([`Divergence`]; definitions in `model::ops::fused::divergence`), optionally
//! over the teacher's top-k tokens with the remaining mass in one bucket. On the CPU the fused
//! kernels (`fused::kd_loss` for plain forward KL, `fused::divergence_loss` for the rest: value
//! and gradient in row chunks, no `[N, V]` temporary); elsewhere, or with `DISTILLERY_FUSED`
//! turning them off, composed from ops candle differentiates (`log_softmax` is
//! max/sub/exp/sum/log; `gather`, `maximum` and the element-wise ops have a backward).

use candle_core::{DType, Result, Tensor, D};
use candle_nn::ops::log_softmax;

use crate::model::ops::fused;

pub use crate::model::ops::fused::Divergence;

/// What the logit loss of a step is.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LogitLoss {
    /// The KD divergence; None: cross-entropy only (no teacher term).
    pub divergence: Option<Divergence>,
    pub temperature: f64,
    /// Weight of the cross-entropy added to the KD term (ignored without a divergence, where
    /// the cross-entropy is the whole loss).
    pub ce_weight: f64,
    /// Teacher's top-k tokens, the rest in one bucket; None: the whole vocabulary.
    pub top_k: Option<usize>,
}

impl LogitLoss {
    /// Minitron's default: forward KL over the whole vocabulary.
    pub fn forward_kl(temperature: f64, ce_weight: f64) -> LogitLoss {
        LogitLoss {
            divergence: Some(Divergence::ForwardKl),
            temperature,
            ce_weight,
            top_k: None,
        }
    }

    /// Whether the teacher's logits are needed.
    pub fn needs_teacher(&self) -> bool {
        self.divergence.is_some()
    }
}

/// The logit loss `spec` of student logits `[B, T, V]` against teacher logits (needed unless
/// the loss is cross-entropy only) and next tokens `[B, T]` (u32).
pub fn logit_loss(
    student: &Tensor,
    teacher: Option<&Tensor>,
    targets: &Tensor,
    spec: &LogitLoss,
) -> Result<LossSums> {
    let Some(div) = spec.divergence else {
        return ce_only(student, targets);
    };
    let teacher = teacher.ok_or_else(|| {
        candle_core::Error::Msg(format!(
            "the {} loss needs the teacher's logits",
            div.name()
        ))
    })?;
    if div == Divergence::ForwardKl && spec.top_k.is_none() {
        return kd_loss(student, teacher, targets, spec.temperature, spec.ce_weight);
    }
    div.check()?;
    if fused_ok(student) && fused::supported(teacher.dtype()) {
        let (s, te, y) = flat(student, Some(teacher), targets)?;
        let te = te.ok_or_else(|| candle_core::Error::Msg("logit_loss: no teacher".into()))?;
        let l = fused::divergence_loss(
            &s,
            &te,
            &y,
            div,
            spec.temperature,
            spec.ce_weight,
            spec.top_k,
        )?;
        return Ok(LossSums {
            total: l.total,
            kl: l.kl,
            ce: l.ce,
            positions: targets.elem_count(),
        });
    }
    composed_divergence(student, teacher, targets, div, spec)
}

/// `ln(max(x, tiny))`: the log of a probability mass that may be exactly 0 (an empty top-k
/// bucket), finite so that `0 · log` stays 0.
fn safe_log(x: &Tensor) -> Result<Tensor> {
    let tiny = if x.dtype() == DType::F64 {
        f64::MIN_POSITIVE
    } else {
        f64::from(f32::MIN_POSITIVE)
    };
    x.maximum(tiny)?.log()
}

/// The divergence's terms summed over the last dimension, from masses `p`, `q` and their logs.
fn terms(div: Divergence, p: &Tensor, q: &Tensor, lp: &Tensor, lq: &Tensor) -> Result<Tensor> {
    let mix_log = |w: f64| -> Result<Tensor> { safe_log(&((p * w)? + (q * (1.0 - w))?)?) };
    let t = match div {
        Divergence::ForwardKl => (p * (lp - lq)?)?,
        Divergence::ReverseKl => (q * (lq - lp)?)?,
        Divergence::SkewKl { alpha } => (p * (lp - mix_log(alpha)?)?)?,
        Divergence::Jsd { beta } => {
            let lm = mix_log(beta)?;
            ((p * (lp - &lm)?)? * beta)?.add(&((q * (lq - &lm)?)? * (1.0 - beta))?)?
        }
    };
    t.sum(D::Minus1)
}

/// [`logit_loss`] from composed ops (non-CPU devices, or the fused kernels off).
fn composed_divergence(
    student: &Tensor,
    teacher: &Tensor,
    targets: &Tensor,
    div: Divergence,
    spec: &LogitLoss,
) -> Result<LossSums> {
    let t = spec.temperature;
    let s = if student.dtype() == DType::F64 {
        student.clone()
    } else {
        student.to_dtype(DType::F32)?
    };
    let te = teacher.detach().to_dtype(s.dtype())?;
    let log_q = log_softmax(&(&s / t)?, D::Minus1)?;
    let log_p = log_softmax(&(&te / t)?, D::Minus1)?;
    let (p, q) = (log_p.exp()?, log_q.exp()?);
    let per_row = match spec.top_k {
        None => terms(div, &p, &q, &log_p, &log_q)?,
        Some(k) => {
            let v = te.dim(D::Minus1)?;
            let k = k.min(v);
            // 1 on the teacher's k largest logits, 0 elsewhere.
            let idx = te.arg_sort_last_dim(false)?.narrow(D::Minus1, 0, k)?;
            let mask = te.zeros_like()?.scatter(
                &idx.contiguous()?,
                &Tensor::ones(idx.shape(), s.dtype(), s.device())?,
                D::Minus1,
            )?;
            let rest = mask.affine(-1.0, 1.0)?;
            let kept = terms(div, &(&p * &mask)?, &(&q * &mask)?, &log_p, &log_q)?;
            let pb = (&p * &rest)?.sum_keepdim(D::Minus1)?;
            let qb = (&q * &rest)?.sum_keepdim(D::Minus1)?;
            let bucket = terms(div, &pb, &qb, &safe_log(&pb)?, &safe_log(&qb)?)?;
            (kept + bucket)?
        }
    };
    let kl = per_row.sum_all()?;
    let log_p1 = if t == 1.0 {
        log_q.clone()
    } else {
        log_softmax(&s, D::Minus1)?
    };
    let ce = log_p1
        .gather(&targets.unsqueeze(D::Minus1)?.contiguous()?, D::Minus1)?
        .sum_all()?
        .neg()?;
    let mut total = (&kl * (t * t))?;
    if spec.ce_weight != 0.0 {
        total = (total + (&ce * spec.ce_weight)?)?;
    }
    Ok(LossSums {
        kl: kl.to_dtype(DType::F64)?.to_scalar()?,
        ce: ce.to_dtype(DType::F64)?.to_scalar()?,
        positions: targets.elem_count(),
        total,
    })
}

/// Summed (not averaged) losses of one micro-batch, as tensors so they can be differentiated.
pub struct LossSums {
    /// `T²·KL + ce_weight·CE`, summed over positions.
    pub total: Tensor,
    /// The divergence (KL(teacher ‖ student) by default) at temperature T, summed over
    /// positions (without T²); 0 for cross-entropy only.
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
    // f32 (f64 for an f64 student, as the fused kernel).
    let s = if student.dtype() == DType::F64 {
        student.clone()
    } else {
        student.to_dtype(DType::F32)?
    };
    let te = teacher.detach().to_dtype(s.dtype())?;
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
    let s = if student.dtype() == DType::F64 {
        student.clone()
    } else {
        student.to_dtype(DType::F32)?
    };
    let log_p = log_softmax(&s, D::Minus1)?;
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

    use crate::model::ops::fused::{with_kernels, Kernels};

    /// Rows of logits, deterministic and without ties.
    fn logits(rows: usize, v: usize, seed: u64) -> Vec<Vec<f64>> {
        (0..rows)
            .map(|r| {
                (0..v)
                    .map(|i| {
                        let h = (r as u64 * 1_000_003 + i as u64 * 7_919 + seed * 104_729)
                            .wrapping_mul(0x9E37_79B9_7F4A_7C15)
                            >> 40;
                        ((h % 10_007) as f64 / 10_007.0 - 0.5) * 6.0
                    })
                    .collect()
            })
            .collect()
    }

    fn log_softmax_f64(x: &[f64], t: f64) -> Vec<f64> {
        let m = x.iter().fold(f64::NEG_INFINITY, |a, b| a.max(*b));
        let z: f64 = x.iter().map(|v| ((v - m) / t).exp()).sum();
        x.iter().map(|v| (v - m) / t - z.ln()).collect()
    }

    /// The divergence of one row straight from its definition, in f64: the teacher's `k`
    /// largest logits (by an explicit sort) kept, the rest merged into one bucket.
    fn reference_row(s: &[f64], t: &[f64], div: Divergence, temp: f64, k: Option<usize>) -> f64 {
        let (lq, lp) = (log_softmax_f64(s, temp), log_softmax_f64(t, temp));
        let (q, p): (Vec<f64>, Vec<f64>) = (
            lq.iter().map(|x| x.exp()).collect(),
            lp.iter().map(|x| x.exp()).collect(),
        );
        let mut order: Vec<usize> = (0..t.len()).collect();
        order.sort_by(|a, b| t[*b].total_cmp(&t[*a]).then(a.cmp(b)));
        let k = k.unwrap_or(t.len()).min(t.len());
        let mut groups: Vec<(f64, f64)> = order[..k].iter().map(|&i| (p[i], q[i])).collect();
        if k < t.len() {
            groups.push((
                order[k..].iter().map(|&i| p[i]).sum(),
                order[k..].iter().map(|&i| q[i]).sum(),
            ));
        }
        let kl = |a: f64, b: f64| if a == 0.0 { 0.0 } else { a * (a / b).ln() };
        groups
            .iter()
            .map(|&(p, q)| match div {
                Divergence::ForwardKl => kl(p, q),
                Divergence::ReverseKl => kl(q, p),
                Divergence::SkewKl { alpha } => kl(p, alpha * p + (1.0 - alpha) * q),
                Divergence::Jsd { beta } => {
                    let m = beta * p + (1.0 - beta) * q;
                    beta * kl(p, m) + (1.0 - beta) * kl(q, m)
                }
            })
            .sum()
    }

    const DIVERGENCES: [Divergence; 4] = [
        Divergence::ForwardKl,
        Divergence::ReverseKl,
        Divergence::SkewKl { alpha: 0.1 },
        Divergence::Jsd { beta: 0.3 },
    ];

    fn spec(div: Divergence, temperature: f64, ce_weight: f64, top_k: Option<usize>) -> LogitLoss {
        LogitLoss {
            divergence: Some(div),
            temperature,
            ce_weight,
            top_k,
        }
    }

    /// Both code paths: the fused CPU kernels and the composed ops.
    fn both<T>(f: impl Fn() -> T) -> [(&'static str, T); 2] {
        [
            ("fused", with_kernels(Kernels::all(), &f)),
            ("composed", with_kernels(Kernels::none(), &f)),
        ]
    }

    #[test]
    fn every_divergence_matches_its_definition_with_and_without_top_k() {
        let dev = Device::Cpu;
        let (v, rows) = (7, 4);
        let (sv, tv) = (logits(rows, v, 1), logits(rows, v, 2));
        let s = Tensor::new(sv.clone(), &dev)
            .unwrap()
            .reshape((2, 2, v))
            .unwrap();
        let t = Tensor::new(tv.clone(), &dev)
            .unwrap()
            .reshape((2, 2, v))
            .unwrap();
        let y = Tensor::new(&[[1u32, 6], [0, 3]], &dev).unwrap();
        for div in DIVERGENCES {
            for k in [None, Some(1), Some(3), Some(v)] {
                for temp in [1.0, 2.0] {
                    let want: f64 = (0..rows)
                        .map(|r| reference_row(&sv[r], &tv[r], div, temp, k))
                        .sum();
                    for dtype in [DType::F64, DType::F32] {
                        let (s, t) = (s.to_dtype(dtype).unwrap(), t.to_dtype(dtype).unwrap());
                        for (path, l) in
                            both(|| logit_loss(&s, Some(&t), &y, &spec(div, temp, 0.0, k)).unwrap())
                        {
                            let tol = if dtype == DType::F64 { 1e-12 } else { 2e-5 };
                            assert!(
                                (l.kl - want).abs() <= tol * want.abs().max(1.0),
                                "{div:?} k={k:?} T={temp} {dtype:?} {path}: {} vs {want}",
                                l.kl
                            );
                            let total: f64 =
                                l.total.to_dtype(DType::F64).unwrap().to_scalar().unwrap();
                            assert!(
                                (total - temp * temp * l.kl).abs() <= tol * total.abs().max(1.0)
                            );
                        }
                    }
                }
            }
        }
        // The divergences differ from each other on these logits (the test would catch a
        // swapped definition).
        let vals: Vec<f64> = DIVERGENCES
            .iter()
            .map(|d| reference_row(&sv[0], &tv[0], *d, 1.0, None))
            .collect();
        for i in 0..vals.len() {
            for j in 0..i {
                assert!((vals[i] - vals[j]).abs() > 1e-3, "{vals:?}");
            }
        }
    }

    #[test]
    fn top_k_equal_to_the_vocabulary_is_exactly_the_full_loss() {
        let dev = Device::Cpu;
        let v = 11;
        let s = Tensor::new(logits(6, v, 3), &dev)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap();
        let t = Tensor::new(logits(6, v, 4), &dev)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap();
        let y = Tensor::new(&[1u32, 2, 3, 4, 5, 6], &dev).unwrap();
        for div in DIVERGENCES {
            for (path, (full, topk)) in both(|| {
                let a = logit_loss(&s, Some(&t), &y, &spec(div, 2.0, 0.5, None)).unwrap();
                let b = logit_loss(&s, Some(&t), &y, &spec(div, 2.0, 0.5, Some(v))).unwrap();
                (a, b)
            }) {
                if div == Divergence::ForwardKl {
                    // Plain forward KL without top-k runs `kd_loss` (another summation order);
                    // the general kernel itself is exact (below).
                    assert!((full.kl - topk.kl).abs() < 1e-5 * full.kl.abs(), "{path}");
                    continue;
                }
                assert_eq!(full.kl, topk.kl, "{div:?} {path}");
                assert_eq!(full.ce, topk.ce, "{div:?} {path}");
                let (a, b) = (
                    full.total.to_vec0::<f32>().unwrap(),
                    topk.total.to_vec0::<f32>().unwrap(),
                );
                assert_eq!(a, b, "{div:?} {path}");
            }
            // The fused general kernel, whatever the divergence: an empty bucket adds exactly 0.
            let (s2, t2, y2) = (s.reshape((6, v)).unwrap(), t.reshape((6, v)).unwrap(), &y);
            let a = fused::divergence_loss(&s2, &t2, y2, div, 2.0, 0.5, None).unwrap();
            let b = fused::divergence_loss(&s2, &t2, y2, div, 2.0, 0.5, Some(v)).unwrap();
            assert_eq!((a.kl, a.ce), (b.kl, b.ce), "{div:?}");
            assert_eq!(
                a.total.to_vec0::<f32>().unwrap(),
                b.total.to_vec0::<f32>().unwrap()
            );
        }
    }

    #[test]
    fn top_k_forward_kl_by_hand() {
        // Teacher logits ln(0.5), ln(0.3), ln(0.2): p = (0.5, 0.3, 0.2). Student q = (0.2, 0.2,
        // 0.6). With k = 1 the groups are {0} and the bucket {1, 2}: P = (0.5, 0.5),
        // Q = (0.2, 0.8), KL = 0.5 ln(0.5/0.2) + 0.5 ln(0.5/0.8).
        let dev = Device::Cpu;
        let t = Tensor::new(&[[0.5f64.ln(), 0.3f64.ln(), 0.2f64.ln()]], &dev).unwrap();
        let s = Tensor::new(&[[0.2f64.ln(), 0.2f64.ln(), 0.6f64.ln()]], &dev).unwrap();
        let y = Tensor::new(&[0u32], &dev).unwrap();
        let want = 0.5 * (0.5f64 / 0.2).ln() + 0.5 * (0.5f64 / 0.8).ln();
        // Reverse KL of the same groups: 0.2 ln(0.2/0.5) + 0.8 ln(0.8/0.5).
        let want_rev = 0.2 * (0.2f64 / 0.5).ln() + 0.8 * (0.8f64 / 0.5).ln();
        for (path, (f, r)) in both(|| {
            (
                logit_loss(
                    &s,
                    Some(&t),
                    &y,
                    &spec(Divergence::ForwardKl, 1.0, 0.0, Some(1)),
                )
                .unwrap(),
                logit_loss(
                    &s,
                    Some(&t),
                    &y,
                    &spec(Divergence::ReverseKl, 1.0, 0.0, Some(1)),
                )
                .unwrap(),
            )
        }) {
            assert!((f.kl - want).abs() < 1e-12, "{path}: {} vs {want}", f.kl);
            assert!(
                (r.kl - want_rev).abs() < 1e-12,
                "{path}: {} vs {want_rev}",
                r.kl
            );
        }
    }

    /// Central differences of the loss value in f64 against the backward pass.
    fn check_gradient(spec: &LogitLoss, path: &str) {
        let dev = Device::Cpu;
        let v = 6;
        let sv = logits(3, v, 5);
        let t = Tensor::new(logits(3, v, 6), &dev).unwrap();
        let y = Tensor::new(&[2u32, 0, 5], &dev).unwrap();
        let kernels = if path == "fused" {
            Kernels::all()
        } else {
            Kernels::none()
        };
        let value = |x: &[Vec<f64>]| -> f64 {
            let s = Tensor::new(x.to_vec(), &dev).unwrap();
            with_kernels(kernels, || logit_loss(&s, Some(&t), &y, spec).unwrap())
                .total
                .to_scalar::<f64>()
                .unwrap()
        };
        let var = Var::new(sv.clone(), &dev).unwrap();
        let l = with_kernels(kernels, || {
            logit_loss(var.as_tensor(), Some(&t), &y, spec).unwrap()
        });
        let g: Vec<Vec<f64>> = l
            .total
            .backward()
            .unwrap()
            .get(var.as_tensor())
            .unwrap()
            .to_vec2()
            .unwrap();
        let h = 1e-6;
        let mut worst = 0f64;
        for r in 0..sv.len() {
            for i in 0..v {
                let (mut a, mut b) = (sv.clone(), sv.clone());
                a[r][i] += h;
                b[r][i] -= h;
                let fd = (value(&a) - value(&b)) / (2.0 * h);
                worst = worst.max((fd - g[r][i]).abs());
                assert!(
                    (fd - g[r][i]).abs() < 1e-7,
                    "{spec:?} {path}: d/ds[{r}][{i}] = {} by backward, {fd} by differences",
                    g[r][i]
                );
            }
        }
        assert!(
            g.iter().flatten().any(|x| x.abs() > 1e-3),
            "{spec:?}: no gradient"
        );
        eprintln!("{spec:?} {path}: max |backward - finite differences| = {worst:e}");
    }

    #[test]
    fn every_divergence_has_the_gradient_of_its_value_in_f64() {
        for div in DIVERGENCES {
            for top_k in [None, Some(2)] {
                for (temp, cw) in [(1.0, 0.0), (2.0, 0.7)] {
                    for path in ["fused", "composed"] {
                        check_gradient(&spec(div, temp, cw, top_k), path);
                    }
                }
            }
        }
        // Cross-entropy only: no teacher term.
        let ce = LogitLoss {
            divergence: None,
            temperature: 1.0,
            ce_weight: 0.0,
            top_k: None,
        };
        for path in ["fused", "composed"] {
            check_gradient(&ce, path);
        }
    }

    #[test]
    fn cross_entropy_only_ignores_the_teacher_and_weights_outside_0_1_are_refused() {
        let dev = Device::Cpu;
        let s = Tensor::new(logits(2, 5, 7), &dev).unwrap();
        let y = Tensor::new(&[1u32, 3], &dev).unwrap();
        let ce = LogitLoss {
            divergence: None,
            temperature: 2.0,
            ce_weight: 0.0,
            top_k: None,
        };
        let l = logit_loss(&s, None, &y, &ce).unwrap();
        let want: f64 = logits(2, 5, 7)
            .iter()
            .zip([1usize, 3])
            .map(|(row, t)| -log_softmax_f64(row, 1.0)[t])
            .sum();
        assert!((l.ce - want).abs() < 1e-12 && l.kl == 0.0);
        assert!((l.total.to_scalar::<f64>().unwrap() - want).abs() < 1e-12);
        for bad in [
            Divergence::SkewKl { alpha: 0.0 },
            Divergence::SkewKl { alpha: 1.0 },
            Divergence::Jsd { beta: 1.5 },
        ] {
            let e = logit_loss(&s, Some(&s), &y, &spec(bad, 1.0, 0.0, None))
                .err()
                .unwrap()
                .to_string();
            assert!(e.contains("(0, 1)"), "{e}");
        }
        assert!(logit_loss(&s, None, &y, &spec(Divergence::ReverseKl, 1.0, 0.0, None)).is_err());
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
