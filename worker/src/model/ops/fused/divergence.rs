//! The distillation divergences other than plain forward KL, and the top-k teacher, fused like
//! [`super::kd_loss`]: value and gradient one row (position) at a time, no `[N, V]` temporary.
//!
//! With `p = softmax(t/T)` (teacher) and `q = softmax(s/T)` (student), per row:
//! - forward KL: `KL(p ‖ q) = Σ p (log p − log q)`;
//! - reverse KL: `KL(q ‖ p) = Σ q (log q − log p)`;
//! - skew KL (DistiLLM, Ko et al. 2024, their α-skew KL): `KL(p ‖ α p + (1 − α) q)`, α in (0, 1)
//!   (α = 0 is forward KL; at α = 1 the divergence is identically 0);
//! - generalized JSD (GKD, Agarwal et al. 2024; TRL's `generalized_jsd_loss`):
//!   `β KL(p ‖ m) + (1 − β) KL(q ‖ m)` with `m = β p + (1 − β) q`, β in (0, 1).
//!
//! With `top_k = k` the teacher's k largest logits (ties: lower index first) keep their own
//! probabilities and every other token is merged into one bucket, in both distributions: the
//! divergence is taken between the (k + 1)-point distributions `(p_K, P_B)` and `(q_K, Q_B)`,
//! `P_B = Σ_{i∉K} p_i`. With k = V the bucket is empty and contributes exactly 0.
//!
//! The gradient, for any divergence `D(P, Q)` of grouped masses (a kept token is its own group,
//! the bucket one group): `∂D/∂z_j = q_j (G_{g(j)} − c)` with `z = s/T`, `G_g = ∂D/∂Q_g` and
//! `c = Σ_g G_g Q_g`; the kernel keeps `c` per row from the forward pass and forms `q_j G_g` in a
//! form that stays finite when probabilities underflow (`−p_j` for forward KL, …). The total is
//! `T²·Σ D + ce_weight·Σ CE`, as for [`super::kd_loss`].

use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp3, DType, Error, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::loss::{check_temperature, targets, vocab, LossValue};
use super::{by_dtype, cpu_slice, dt, par_rows, read, tensor, Elem, Real};

/// A divergence between the teacher's and the student's next-token distributions (see the
/// module doc for the definitions).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Divergence {
    /// `KL(p ‖ q)`: mode-covering, Minitron's choice.
    ForwardKl,
    /// `KL(q ‖ p)`: mode-seeking.
    ReverseKl,
    /// DistiLLM's α-skew KL `KL(p ‖ α p + (1 − α) q)`, α in (0, 1).
    SkewKl { alpha: f64 },
    /// GKD's generalized Jensen–Shannon divergence with weight β in (0, 1).
    Jsd { beta: f64 },
}

impl Divergence {
    /// The name used in the campaign spec (`distill.loss`).
    pub fn name(self) -> &'static str {
        match self {
            Divergence::ForwardKl => "forward_kl",
            Divergence::ReverseKl => "reverse_kl",
            Divergence::SkewKl { .. } => "skew_kl",
            Divergence::Jsd { .. } => "jsd",
        }
    }

    /// Refuses a mixing weight outside (0, 1).
    pub fn check(self) -> Result<()> {
        let (what, w) = match self {
            Divergence::SkewKl { alpha } => ("skew_alpha", alpha),
            Divergence::Jsd { beta } => ("jsd_beta", beta),
            _ => return Ok(()),
        };
        if w.is_finite() && w > 0.0 && w < 1.0 {
            Ok(())
        } else {
            Err(Error::Msg(format!(
                "{}: {what} = {w} must be in (0, 1)",
                self.name()
            )))
        }
    }
}

/// The fused loss with divergence `div` and, with `top_k`, the teacher's top-k logits plus one
/// bucket: student logits `[N, V]`, teacher logits `[N, V]` (no gradient; any supported dtype),
/// targets `[N]` (u32). `LossValue::kl` holds Σ D (without T²).
pub fn divergence_loss(
    student: &Tensor,
    teacher: &Tensor,
    targets: &Tensor,
    div: Divergence,
    temperature: f64,
    ce_weight: f64,
    top_k: Option<usize>,
) -> Result<LossValue> {
    check_temperature(temperature)?;
    div.check()?;
    if top_k == Some(0) {
        return Err(Error::Msg(
            "divergence_loss: top_k must be at least 1".into(),
        ));
    }
    let stats = Arc::new(Mutex::new(None));
    let op = DivLoss {
        div,
        temperature,
        kl_weight: temperature * temperature,
        ce_weight,
        top_k,
        stats: stats.clone(),
    };
    let total = student.contiguous()?.apply_op3(
        &teacher.detach().contiguous()?,
        &targets.contiguous()?,
        op,
    )?;
    let g = stats.lock().unwrap_or_else(|p| p.into_inner());
    let s: &DivStats = g
        .as_ref()
        .ok_or_else(|| Error::Msg("divergence_loss: the forward recorded no statistics".into()))?;
    Ok(LossValue {
        kl: s.d,
        ce: s.ce,
        total,
    })
}

/// What the forward keeps of one row for the backward.
#[derive(Debug, Clone, Copy)]
struct Row {
    /// logsumexp of s/T, of t/T, of s.
    ls: f64,
    lt: f64,
    l1: f64,
    /// `c = Σ_g G_g Q_g`.
    c: f64,
    /// log of the student's bucket mass, and `Q_B · G_B` (0 without a bucket).
    lqb: f64,
    qgb: f64,
    /// Top-k membership: teacher logits above `tau` are in; of those equal to it, the first
    /// `need_eq`; `all`: every token (no top-k, or k ≥ V).
    tau: f64,
    need_eq: usize,
    all: bool,
}

struct DivStats {
    rows: Vec<Row>,
    d: f64,
    ce: f64,
}

struct DivLoss {
    div: Divergence,
    temperature: f64,
    kl_weight: f64,
    ce_weight: f64,
    top_k: Option<usize>,
    stats: Arc<Mutex<Option<DivStats>>>,
}

/// Membership of the top-k set, walked in index order.
struct Members {
    tau: f64,
    need_eq: usize,
    seen: usize,
    all: bool,
}

impl Members {
    fn of(r: &Row) -> Members {
        Members {
            tau: r.tau,
            need_eq: r.need_eq,
            seen: 0,
            all: r.all,
        }
    }

    #[inline(always)]
    fn next(&mut self, t: f64) -> bool {
        if self.all || t > self.tau {
            true
        } else if t == self.tau && self.seen < self.need_eq {
            self.seen += 1;
            true
        } else {
            false
        }
    }
}

/// The threshold of the `k` largest values of `t` (ties: lower index first): (tau, how many
/// values equal to tau are in, every value in).
fn select<ET: Elem>(t: &[ET], k: Option<usize>) -> (f64, usize, bool) {
    let k = match k {
        Some(k) if k < t.len() => k.max(1),
        _ => return (f64::NEG_INFINITY, 0, true),
    };
    let mut v: Vec<f64> = t.iter().map(|x| x.to_r::<f64>()).collect();
    let (_, kth, _) = v.select_nth_unstable_by(k - 1, |a, b| b.total_cmp(a));
    let tau = *kth;
    let above = t.iter().filter(|x| x.to_r::<f64>() > tau).count();
    (tau, k.saturating_sub(above), false)
}

/// The divergence's per-group pieces in the compute type.
#[derive(Clone, Copy)]
struct Pieces<R> {
    div: Divergence,
    /// α or β, ln of it, ln of 1 − it.
    w: R,
    ln_w: R,
    ln_1w: R,
}

#[inline(always)]
fn log_add_exp<R: Real>(x: R, y: R) -> R {
    let m = x.max(y);
    if m == R::NEG_INFINITY {
        return m;
    }
    m + ((x - m).exp() + (y - m).exp()).ln()
}

impl<R: Real> Pieces<R> {
    fn new(div: Divergence) -> Pieces<R> {
        let w = match div {
            Divergence::SkewKl { alpha } => alpha,
            Divergence::Jsd { beta } => beta,
            _ => 0.5,
        };
        Pieces {
            div,
            w: R::from_f64(w),
            ln_w: R::from_f64(w.ln()),
            ln_1w: R::from_f64((1.0 - w).ln()),
        }
    }

    /// log of the mixture `w p + (1 − w) q`.
    #[inline(always)]
    fn lm(&self, lp: R, lq: R) -> R {
        log_add_exp(self.ln_w + lp, self.ln_1w + lq)
    }

    /// The group's term of D (masses p, q with logs lp, lq; 0·log 0 = 0).
    #[inline(always)]
    fn term(&self, p: R, q: R, lp: R, lq: R) -> R {
        let z = R::ZERO;
        match self.div {
            Divergence::ForwardKl => {
                if p == z {
                    z
                } else {
                    p * (lp - lq)
                }
            }
            Divergence::ReverseKl => {
                if q == z {
                    z
                } else {
                    q * (lq - lp)
                }
            }
            Divergence::SkewKl { .. } => {
                if p == z {
                    z
                } else {
                    p * (lp - self.lm(lp, lq))
                }
            }
            Divergence::Jsd { .. } => {
                let lm = self.lm(lp, lq);
                let a = if p == z { z } else { self.w * p * (lp - lm) };
                let b = if q == z {
                    z
                } else {
                    (R::ONE - self.w) * q * (lq - lm)
                };
                a + b
            }
        }
    }

    /// `Q_g · ∂D/∂Q_g` of the group.
    #[inline(always)]
    fn qg(&self, p: R, q: R, lp: R, lq: R) -> R {
        let z = R::ZERO;
        match self.div {
            Divergence::ForwardKl => -p,
            Divergence::ReverseKl => {
                if q == z {
                    z
                } else {
                    q * (lq - lp + R::ONE)
                }
            }
            Divergence::SkewKl { .. } => {
                if q == z || p == z {
                    z
                } else {
                    -((R::ONE - self.w) * q * (lp - self.lm(lp, lq)).exp())
                }
            }
            Divergence::Jsd { .. } => {
                if q == z {
                    z
                } else {
                    (R::ONE - self.w) * q * (lq - self.lm(lp, lq))
                }
            }
        }
    }
}

impl DivLoss {
    /// One row: its state, Σ D and CE.
    fn row_forward<ES: Elem, ET: Elem, R: Real>(
        &self,
        s: &[ES],
        t: &[ET],
        y: u32,
    ) -> (Row, f64, f64) {
        let temp = R::from_f64(self.temperature);
        let inv_t = R::ONE / temp;
        let pc = Pieces::<R>::new(self.div);
        let ms = s.iter().fold(R::NEG_INFINITY, |m, v| m.max(v.to_r()));
        let mt = t.iter().fold(R::NEG_INFINITY, |m, v| m.max(v.to_r()));
        let (mut zs, mut zt, mut z1) = (0f64, 0f64, 0f64);
        for (a, b) in s.iter().zip(t) {
            let (a, b): (R, R) = (a.to_r(), b.to_r());
            zs += ((a - ms) * inv_t).exp().to_f64();
            zt += ((b - mt) * inv_t).exp().to_f64();
            z1 += (a - ms).exp().to_f64();
        }
        let ls = ms * inv_t + R::from_f64(zs.ln());
        let lt = mt * inv_t + R::from_f64(zt.ln());
        let l1 = ms + R::from_f64(z1.ln());
        let ce = (l1 - s[y as usize].to_r::<R>()).to_f64();
        let (tau, need_eq, all) = select(t, self.top_k);
        let mut members = Members {
            tau,
            need_eq,
            seen: 0,
            all,
        };
        let (mut d, mut c, mut pb, mut qb) = (0f64, 0f64, 0f64, 0f64);
        for (a, b0) in s.iter().zip(t) {
            let (a, b): (R, R) = (a.to_r(), b0.to_r());
            let lq = a * inv_t - ls;
            let lp = b * inv_t - lt;
            let (p, q) = (lp.exp(), lq.exp());
            if members.next(b0.to_r::<f64>()) {
                d += pc.term(p, q, lp, lq).to_f64();
                c += pc.qg(p, q, lp, lq).to_f64();
            } else {
                pb += p.to_f64();
                qb += q.to_f64();
            }
        }
        let (mut lqb, mut qgb) = (f64::NEG_INFINITY, 0.0);
        if self.top_k.is_some() {
            let (p, q) = (R::from_f64(pb), R::from_f64(qb));
            let (lp, lq) = (R::from_f64(pb.ln()), R::from_f64(qb.ln()));
            d += pc.term(p, q, lp, lq).to_f64();
            qgb = pc.qg(p, q, lp, lq).to_f64();
            c += qgb;
            lqb = qb.ln();
        }
        let row = Row {
            ls: ls.to_f64(),
            lt: lt.to_f64(),
            l1: l1.to_f64(),
            c,
            lqb,
            qgb,
            tau,
            need_eq,
            all,
        };
        (row, d, ce)
    }

    fn forward<ES: Elem, ET: Elem, R: Real>(
        &self,
        s: &[ES],
        t: &[ET],
        y: &[u32],
        v: usize,
    ) -> Result<(f64, DivStats)> {
        let n = y.len();
        if s.len() != n * v || t.len() != n * v {
            return Err(Error::Msg(format!(
                "divergence_loss: logits of {} (student) and {} (teacher) elements for {n} targets of a {v}-token vocabulary",
                s.len(),
                t.len()
            )));
        }
        if let Some((i, bad)) = y.iter().enumerate().find(|(_, &y)| y as usize >= v) {
            return Err(Error::Msg(format!(
                "divergence_loss: target {bad} at position {i} is outside the vocabulary of {v}"
            )));
        }
        let rows: Vec<(Row, f64, f64)> = (0..n)
            .into_par_iter()
            .map(|r| {
                self.row_forward::<ES, ET, R>(&s[r * v..(r + 1) * v], &t[r * v..(r + 1) * v], y[r])
            })
            .collect();
        let (d, ce) = rows
            .iter()
            .fold((0.0, 0.0), |(a, b), (_, x, z)| (a + x, b + z));
        let total = self.kl_weight * d + self.ce_weight * ce;
        Ok((
            total,
            DivStats {
                rows: rows.into_iter().map(|(r, _, _)| r).collect(),
                d,
                ce,
            },
        ))
    }

    fn backward<ES: Elem, ET: Elem, R: Real>(
        &self,
        s: &[ES],
        t: &[ET],
        y: &[u32],
        v: usize,
        grad: f64,
    ) -> Result<Vec<ES>> {
        let g = self.stats.lock().unwrap_or_else(|p| p.into_inner());
        let st = g
            .as_ref()
            .ok_or_else(|| Error::Msg("divergence_loss: backward before forward".into()))?;
        let inv_t = R::ONE / R::from_f64(self.temperature);
        // ∂(T²·D)/∂s = T·∂D/∂z.
        let wk = R::from_f64(grad * self.kl_weight / self.temperature);
        let wc = R::from_f64(grad * self.ce_weight);
        let has_ce = self.ce_weight != 0.0;
        let pc = Pieces::<R>::new(self.div);
        Ok(par_rows::<ES>(y.len(), v, |r0, out| {
            for (i, o) in out.chunks_exact_mut(v).enumerate() {
                let r = r0 + i;
                let row = &st.rows[r];
                let (sr, tr) = (&s[r * v..(r + 1) * v], &t[r * v..(r + 1) * v]);
                let (ls, lt, l1) = (
                    R::from_f64(row.ls),
                    R::from_f64(row.lt),
                    R::from_f64(row.l1),
                );
                let (c, qgb) = (R::from_f64(row.c), R::from_f64(row.qgb));
                let lqb = R::from_f64(row.lqb);
                let bucket_alive = row.lqb > f64::NEG_INFINITY;
                let mut members = Members::of(row);
                for (j, ((o, a), b0)) in o.iter_mut().zip(sr).zip(tr).enumerate() {
                    let (a, b): (R, R) = (a.to_r(), b0.to_r());
                    let lq = a * inv_t - ls;
                    let q = lq.exp();
                    let gz = if members.next(b0.to_r::<f64>()) {
                        let lp = b * inv_t - lt;
                        pc.qg(lp.exp(), q, lp, lq) - q * c
                    } else if bucket_alive {
                        (lq - lqb).exp() * qgb - q * c
                    } else {
                        -(q * c)
                    };
                    let mut d = wk * gz;
                    if has_ce {
                        d += wc * (a - l1).exp();
                        if j == y[r] as usize {
                            d += -wc;
                        }
                    }
                    o.write(ES::from_r(d));
                }
            }
        }))
    }
}

impl CustomOp3 for DivLoss {
    fn name(&self) -> &'static str {
        "fused-divergence-loss"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let v = vocab(l1.dims(), l3.dims())?;
        if l2.dims() != l1.dims() {
            return Err(Error::Msg(format!(
                "divergence_loss: student logits {:?} but teacher logits {:?}",
                l1.dims(),
                l2.dims()
            )));
        }
        let y = targets(s3, l3)?;
        let (total, stats) = by_dtype!(dt(s1), "divergence_loss", |ES, R| {
            let s = cpu_slice::<ES>(s1, l1, "divergence_loss")?;
            by_dtype!(dt(s2), "divergence_loss teacher", |ET, _RT| {
                let t = cpu_slice::<ET>(s2, l2, "divergence_loss")?;
                let (total, stats) = self.forward::<ES, ET, R>(s, t, y, v)?;
                Ok((super::loss::loss_storage(total, dt(s1)), stats))
            })
        })?;
        *self.stats.lock().unwrap_or_else(|p| p.into_inner()) = Some(stats);
        Ok((total, Shape::from(())))
    }

    fn bwd(
        &self,
        student: &Tensor,
        teacher: &Tensor,
        targets: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let v = vocab(student.dims(), targets.dims())?;
        let g = grad.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        let ds = by_dtype!(student.dtype(), "divergence_loss backward", |ES, R| {
            read::<ES, _>(student, "divergence_loss", |s| {
                read::<u32, _>(targets, "divergence_loss", |y| {
                    by_dtype!(teacher.dtype(), "divergence_loss teacher", |ET, _RT| {
                        let ds = read::<ET, _>(teacher, "divergence_loss", |t| {
                            self.backward::<ES, ET, R>(s, t, y, v, g)
                        })?;
                        tensor(ds, student.dims())
                    })
                })
            })
        })?;
        Ok((Some(ds), None, None))
    }
}
