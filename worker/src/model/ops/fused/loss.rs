//! The distillation loss over the vocabulary, one row (position) at a time, in f32 (f64 for f64
//! students) whatever the logits' dtype:
//! `total = T²·Σ KL(softmax(t/T) ‖ softmax(s/T)) + ce_weight·Σ CE(softmax(s), next token)`.
//!
//! Forward, per row: one pass for the maxima, one for the sums —
//! `Zs = Σ e^{(s-ms)/T}`, `Zt = Σ e^{(t-mt)/T}`, `A = Σ e^{(t-mt)/T}·(t-s)/T` (and
//! `Z1 = Σ e^{s-ms}` when T ≠ 1) — giving `KL = A/Zt - lse_t + lse_s` and `CE = lse_1 - s_y`;
//! only the three logsumexps per row are kept. Backward, one pass per row writing the gradient
//! directly: `∂/∂s_i = T·(p_s,i - p_t,i) + ce_weight·(p_1,i - [i = y])`. No `[N, V]` temporary.

use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Error, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use std::mem::MaybeUninit;

use super::simd::multiversion;
use super::{by_dtype, cpu_slice, dt, par_rows, read, tensor, Elem, Real};

/// The loss as a differentiable scalar and its parts as numbers.
pub struct LossValue {
    /// `T²·KL + ce_weight·CE` summed over rows: f32 (f64 for an f64 student), differentiable
    /// with respect to the student's logits.
    pub total: Tensor,
    /// Σ KL at temperature T (without T²).
    pub kl: f64,
    /// Σ CE of the student (at temperature 1) on the targets.
    pub ce: f64,
}

/// Fused KD loss of student logits `[N, V]` against teacher logits `[N, V]` (no gradient to
/// the teacher; its dtype may differ) and targets `[N]` (u32).
pub fn kd_loss(
    student: &Tensor,
    teacher: &Tensor,
    targets: &Tensor,
    temperature: f64,
    ce_weight: f64,
) -> Result<LossValue> {
    check_temperature(temperature)?;
    let (op, stats) = Loss::new(temperature, temperature * temperature, ce_weight);
    let total = student.contiguous()?.apply_op3(
        &teacher.detach().contiguous()?,
        &targets.contiguous()?,
        op,
    )?;
    finish(total, &stats)
}

/// Fused cross-entropy of student logits `[N, V]` on targets `[N]` (u32), summed.
pub fn ce_loss(student: &Tensor, targets: &Tensor) -> Result<LossValue> {
    let (op, stats) = Loss::new(1.0, 0.0, 1.0);
    let total = student
        .contiguous()?
        .apply_op2(&targets.contiguous()?, op)?;
    finish(total, &stats)
}

pub(super) fn check_temperature(t: f64) -> Result<()> {
    if t.is_finite() && t > 0.0 {
        Ok(())
    } else {
        Err(Error::Msg(format!(
            "kd_loss: temperature {t} must be positive and finite"
        )))
    }
}

fn finish(total: Tensor, stats: &Mutex<Option<Stats>>) -> Result<LossValue> {
    let g = stats.lock().unwrap_or_else(|p| p.into_inner());
    let s = g
        .as_ref()
        .ok_or_else(|| Error::Msg("kd_loss: the forward recorded no statistics".into()))?;
    Ok(LossValue {
        kl: s.kl,
        ce: s.ce,
        total,
    })
}

/// What the forward leaves for the backward: per row (lse of s/T, lse of t/T, lse of s).
struct Stats {
    lse: Vec<[f64; 3]>,
    kl: f64,
    ce: f64,
}

struct Loss {
    temperature: f64,
    /// T² for the KD loss, 0 without a teacher.
    kl_weight: f64,
    ce_weight: f64,
    stats: Arc<Mutex<Option<Stats>>>,
}

impl Loss {
    fn new(temperature: f64, kl_weight: f64, ce_weight: f64) -> (Loss, Arc<Mutex<Option<Stats>>>) {
        let stats = Arc::new(Mutex::new(None));
        (
            Loss {
                temperature,
                kl_weight,
                ce_weight,
                stats: stats.clone(),
            },
            stats,
        )
    }

    fn forward<ES: Elem, ET: Elem, R: Real>(
        &self,
        s: &[ES],
        t: Option<&[ET]>,
        y: &[u32],
        v: usize,
    ) -> Result<(f64, Stats)> {
        let n = y.len();
        if s.len() != n * v || t.is_some_and(|t| t.len() != n * v) {
            return Err(Error::Msg(format!(
                "kd_loss: logits of {} (student) and {:?} (teacher) elements for {n} targets of a {v}-token vocabulary",
                s.len(),
                t.map(<[ET]>::len)
            )));
        }
        if let Some((i, bad)) = y.iter().enumerate().find(|(_, &y)| y as usize >= v) {
            return Err(Error::Msg(format!(
                "kd_loss: target {bad} at position {i} is outside the vocabulary of {v}"
            )));
        }
        let temp = R::from_f64(self.temperature);
        let unit = self.temperature == 1.0;
        let rows: Vec<([f64; 3], f64, f64)> = (0..n)
            .into_par_iter()
            .map(|r| {
                let sr = &s[r * v..(r + 1) * v];
                row_forward::<ES, ET, R>(sr, t.map(|t| &t[r * v..(r + 1) * v]), y[r], temp, unit)
            })
            .collect();
        let (kl, ce) = rows
            .iter()
            .fold((0.0, 0.0), |(a, b), (_, k, c)| (a + k, b + c));
        let total = self.kl_weight * kl + self.ce_weight * ce;
        Ok((
            total,
            Stats {
                lse: rows.into_iter().map(|(l, _, _)| l).collect(),
                kl,
                ce,
            },
        ))
    }

    fn backward<ES: Elem, ET: Elem, R: Real>(
        &self,
        s: &[ES],
        t: Option<&[ET]>,
        y: &[u32],
        v: usize,
        grad: f64,
    ) -> Result<Vec<ES>> {
        let g = self.stats.lock().unwrap_or_else(|p| p.into_inner());
        let st = g
            .as_ref()
            .ok_or_else(|| Error::Msg("kd_loss: backward before forward".into()))?;
        let inv_t = R::ONE / R::from_f64(self.temperature);
        // ∂(T²·KL)/∂s = T·(p_s - p_t); scaled by the incoming gradient.
        let wk = R::from_f64(grad * self.kl_weight / self.temperature);
        let wc = R::from_f64(grad * self.ce_weight);
        let has_ce = self.ce_weight != 0.0;
        let k = GradRow {
            inv_t,
            wk,
            wc,
            has_ce,
            has_kl: self.kl_weight != 0.0,
        };
        Ok(par_rows::<ES>(y.len(), v, |r0, out| {
            for (i, o) in out.chunks_exact_mut(v).enumerate() {
                let r = r0 + i;
                let lse = st.lse[r].map(R::from_f64);
                let tr = t.map(|t| &t[r * v..(r + 1) * v]);
                grad_row::<ES, ET, R>(k, &s[r * v..(r + 1) * v], tr, y[r] as usize, lse, o);
            }
        }))
    }
}

multiversion! {
    /// One row: ([lse_s, lse_t, lse_1], KL, CE).
    fn row_forward[ES: Elem, ET: Elem, R: Real](
        s: &[ES], t: Option<&[ET]>, y: u32, temp: R, unit: bool,
    ) -> ([f64; 3], f64, f64) => row_forward_impl[ES, ET, R]
}

#[inline(always)]
fn row_forward_impl<ES: Elem, ET: Elem, R: Real>(
    s: &[ES],
    t: Option<&[ET]>,
    y: u32,
    temp: R,
    unit: bool,
) -> ([f64; 3], f64, f64) {
    let inv_t = R::ONE / temp;
    let ms = lanes_max::<ES, R>(s);
    let lse_s = ms * inv_t + lanes_sum(s, |x: R| ((x - ms) * inv_t).exp()).ln();
    let lse_1 = if unit {
        lse_s
    } else {
        ms + lanes_sum(s, |x: R| (x - ms).exp()).ln()
    };
    let ce = lse_1 - s[y as usize].to_r::<R>();
    let (lse_t, kl) = match t {
        None => (R::ZERO, R::ZERO),
        Some(t) => {
            let mt = lanes_max::<ET, R>(t);
            let (zt, a) = lanes_sum2(s, t, |x: R, b: R| {
                let e = ((b - mt) * inv_t).exp();
                (e, e * ((b - x) * inv_t))
            });
            let lse_t = mt * inv_t + zt.ln();
            (lse_t, a / zt - lse_t + lse_s)
        }
    };
    (
        [lse_s.to_f64(), lse_t.to_f64(), lse_1.to_f64()],
        kl.to_f64(),
        ce.to_f64(),
    )
}

const L: usize = 16;

#[inline(always)]
fn lanes_max<E: Elem, R: Real>(x: &[E]) -> R {
    let mut m = [R::NEG_INFINITY; L];
    let c = x.chunks_exact(L);
    let rest = c.remainder();
    for ch in c {
        for i in 0..L {
            m[i] = m[i].max(ch[i].to_r());
        }
    }
    let m0 = rest.iter().fold(R::NEG_INFINITY, |a, v| a.max(v.to_r()));
    m.iter().fold(m0, |a, b| a.max(*b))
}

/// Σ f(x) with 16 partial sums.
#[inline(always)]
fn lanes_sum<E: Elem, R: Real>(x: &[E], f: impl Fn(R) -> R) -> R {
    let mut acc = [R::ZERO; L];
    let c = x.chunks_exact(L);
    let rest = c.remainder();
    for ch in c {
        for i in 0..L {
            acc[i] += f(ch[i].to_r());
        }
    }
    let s0 = rest.iter().fold(R::ZERO, |a, v| a + f(v.to_r()));
    acc.iter().fold(s0, |a, b| a + *b)
}

/// (Σ f(x, y).0, Σ f(x, y).1) with 16 partial sums each.
#[inline(always)]
fn lanes_sum2<E1: Elem, E2: Elem, R: Real>(
    x: &[E1],
    y: &[E2],
    f: impl Fn(R, R) -> (R, R),
) -> (R, R) {
    let (mut a, mut b) = ([R::ZERO; L], [R::ZERO; L]);
    let (cx, cy) = (x.chunks_exact(L), y.chunks_exact(L));
    let (rx, ry) = (cx.remainder(), cy.remainder());
    for (chx, chy) in cx.zip(cy) {
        for i in 0..L {
            let (u, v) = f(chx[i].to_r(), chy[i].to_r());
            a[i] += u;
            b[i] += v;
        }
    }
    let (mut sa, mut sb) = (R::ZERO, R::ZERO);
    for (p, q) in rx.iter().zip(ry) {
        let (u, v) = f(p.to_r(), q.to_r());
        sa += u;
        sb += v;
    }
    (
        a.iter().fold(sa, |s, v| s + *v),
        b.iter().fold(sb, |s, v| s + *v),
    )
}

/// The constants of one row's gradient.
#[derive(Clone, Copy)]
struct GradRow<R> {
    inv_t: R,
    /// grad · T²/T.
    wk: R,
    /// grad · ce_weight.
    wc: R,
    has_ce: bool,
    has_kl: bool,
}

multiversion! {
    /// Writes the gradient of one row (see the module doc).
    fn grad_row[ES: Elem, ET: Elem, R: Real](
        k: GradRow<R>, sr: &[ES], tr: Option<&[ET]>, y: usize, lse: [R; 3],
        o: &mut [MaybeUninit<ES>],
    ) -> () => grad_row_impl[ES, ET, R]
}

#[inline(always)]
fn grad_row_impl<ES: Elem, ET: Elem, R: Real>(
    k: GradRow<R>,
    sr: &[ES],
    tr: Option<&[ET]>,
    y: usize,
    lse: [R; 3],
    o: &mut [MaybeUninit<ES>],
) {
    let [ls, lt, l1] = lse;
    let GradRow {
        inv_t,
        wk,
        wc,
        has_ce,
        has_kl,
    } = k;
    match tr {
        Some(tr) if has_kl => {
            for ((o, a), b) in o.iter_mut().zip(sr).zip(tr) {
                let a: R = a.to_r();
                let b: R = b.to_r();
                let mut d = wk * ((a * inv_t - ls).exp() - (b * inv_t - lt).exp());
                if has_ce {
                    d += wc * (a - l1).exp();
                }
                o.write(ES::from_r(d));
            }
        }
        _ => {
            for (o, a) in o.iter_mut().zip(sr) {
                let a: R = a.to_r();
                o.write(ES::from_r(wc * (a - l1).exp()));
            }
        }
    }
    if has_ce {
        // The target's own element, with the -1 of the one-hot.
        let a: R = sr[y].to_r();
        let mut d = wc * ((a - l1).exp() - R::ONE);
        if let (Some(tr), true) = (tr, has_kl) {
            let b: R = tr[y].to_r();
            d += wk * ((a * inv_t - ls).exp() - (b * inv_t - lt).exp());
        }
        o[y].write(ES::from_r(d));
    }
}

/// The u32 targets of an op's input.
pub(super) fn targets<'a>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [u32]> {
    match s {
        CpuStorage::U32(_) => cpu_slice::<u32>(s, l, "kd_loss targets"),
        _ => Err(Error::Msg(format!(
            "kd_loss: targets must be u32, got {:?}",
            dt(s)
        ))),
    }
}

pub(super) fn vocab(dims: &[usize], targets: &[usize]) -> Result<usize> {
    match dims.split_last() {
        Some((&v, rest))
            if v > 0 && rest.iter().product::<usize>() == targets.iter().product::<usize>() =>
        {
            Ok(v)
        }
        _ => Err(Error::Msg(format!(
            "kd_loss: logits {dims:?} do not fit targets {targets:?}"
        ))),
    }
}

impl Loss {
    fn fwd_storage(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        teacher: Option<(&CpuStorage, &Layout)>,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let v = vocab(l1.dims(), l3.dims())?;
        if let Some((_, lt)) = teacher {
            if lt.dims() != l1.dims() {
                return Err(Error::Msg(format!(
                    "kd_loss: student logits {:?} but teacher logits {:?}",
                    l1.dims(),
                    lt.dims()
                )));
            }
        }
        let y = targets(s3, l3)?;
        let t_dtype = teacher.map_or(DType::F32, |(s, _)| dt(s));
        let (total, stats) = by_dtype!(dt(s1), "kd_loss", |ES, R| {
            let s = cpu_slice::<ES>(s1, l1, "kd_loss")?;
            by_dtype!(t_dtype, "kd_loss teacher", |ET, _RT| {
                let t = match teacher {
                    Some((st, lt)) => Some(cpu_slice::<ET>(st, lt, "kd_loss")?),
                    None => None,
                };
                let (total, stats) = self.forward::<ES, ET, R>(s, t, y, v)?;
                Ok((loss_storage(total, dt(s1)), stats))
            })
        })?;
        *self.stats.lock().unwrap_or_else(|p| p.into_inner()) = Some(stats);
        Ok((total, Shape::from(())))
    }

    fn bwd_tensor(
        &self,
        student: &Tensor,
        teacher: Option<&Tensor>,
        targets: &Tensor,
        grad: &Tensor,
    ) -> Result<Tensor> {
        let v = vocab(student.dims(), targets.dims())?;
        let g = grad.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        let t_dtype = teacher.map_or(DType::F32, Tensor::dtype);
        by_dtype!(student.dtype(), "kd_loss backward", |ES, R| {
            read::<ES, _>(student, "kd_loss", |s| {
                read::<u32, _>(targets, "kd_loss", |y| {
                    by_dtype!(t_dtype, "kd_loss teacher", |ET, _RT| {
                        let ds = match teacher {
                            Some(t) => read::<ET, _>(t, "kd_loss", |t| {
                                self.backward::<ES, ET, R>(s, Some(t), y, v, g)
                            })?,
                            None => self.backward::<ES, ET, R>(s, None, y, v, g)?,
                        };
                        tensor(ds, student.dims())
                    })
                })
            })
        })
    }
}

/// A summed loss as the op's output: f32 (as the composed loss), f64 for an f64 student.
pub(super) fn loss_storage(total: f64, student: DType) -> CpuStorage {
    if student == DType::F64 {
        CpuStorage::F64(vec![total])
    } else {
        CpuStorage::F32(vec![total as f32])
    }
}

impl CustomOp3 for Loss {
    fn name(&self) -> &'static str {
        "fused-kd-loss"
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
        self.fwd_storage(s1, l1, Some((s2, l2)), s3, l3)
    }

    fn bwd(
        &self,
        student: &Tensor,
        teacher: &Tensor,
        targets: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let ds = self.bwd_tensor(student, Some(teacher), targets, grad)?;
        Ok((Some(ds), None, None))
    }
}

impl CustomOp2 for Loss {
    fn name(&self) -> &'static str {
        "fused-ce-loss"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.fwd_storage(s1, l1, None, s2, l2)
    }

    fn bwd(
        &self,
        student: &Tensor,
        targets: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let ds = self.bwd_tensor(student, None, targets, grad)?;
        Ok((Some(ds), None))
    }
}
