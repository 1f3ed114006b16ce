//! Causal attention with GQA and an optional sliding window, flash-attention style, on the
//! layout the projections produce: q `[B, T, H, hd]`, k and v `[B, T, KV, hd]`, output
//! `[B, T, H, hd]` (so `o_proj` reads it without a transpose). Query `p` sees key `j` iff
//! `j <= p` and `p - j < window` (as `Llama::causal_mask`).
//!
//! Forward: per (batch, head) and per block of queries, the keys in blocks with an online
//! softmax (running max and sum); only the logsumexp of each row is kept (in the op) for the
//! backward. Backward (flash-attention 2): the probabilities are recomputed block by block from
//! q, k and the logsumexp, `dV += Pᵀ dO`, `dS = P ∘ (dO Vᵀ - rowsum(dO ∘ O))`, `dQ += dS K`,
//! `dK += dSᵀ Q` (times the scale); no `[T, T]` tensor exists at any point.

use std::sync::Mutex;

use candle_core::{CpuStorage, CustomOp3, Error, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::simd::{axpy, dot, multiversion, scale};
use super::{by_dtype, cpu_slice, dt, dtype_of, par_rows, read, storage, tensor, Elem, Real};

const BLOCK_Q: usize = 32;
const BLOCK_K: usize = 64;

/// Fused causal attention (see the module doc); `window` `None`: every earlier position.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    window: Option<usize>,
) -> Result<Tensor> {
    if window == Some(0) {
        return Err(Error::Msg("attention: a window of 0 sees nothing".into()));
    }
    let op = Attention {
        scale,
        window: window.unwrap_or(usize::MAX),
        lse: Mutex::new(None),
    };
    q.contiguous()?
        .apply_op3(&k.contiguous()?, &v.contiguous()?, op)
}

struct Attention {
    scale: f64,
    window: usize,
    /// Logsumexp of every query row, `[B, H, T]`, written by the forward.
    lse: Mutex<Option<Vec<f64>>>,
}

#[derive(Clone, Copy)]
struct Dims {
    b: usize,
    t: usize,
    h: usize,
    kv: usize,
    hd: usize,
}

impl Dims {
    fn of(q: &[usize], k: &[usize], v: &[usize]) -> Result<Dims> {
        match (q, k) {
            (&[b, t, h, hd], &[kb, kt, kv, khd])
                if kb == b && kt == t && khd == hd && kv > 0 && h % kv == 0 && v == k =>
            {
                Ok(Dims { b, t, h, kv, hd })
            }
            _ => Err(Error::Msg(format!(
                "attention: q must be [B, T, H, hd] and k, v [B, T, KV, hd] with KV dividing H, \
                 got {q:?}, {k:?}, {v:?}"
            ))),
        }
    }

    /// Keys `[lo, hi)` that query `p` sees.
    #[inline(always)]
    fn keys(&self, p: usize, window: usize) -> (usize, usize) {
        ((p + 1).saturating_sub(window), p + 1)
    }
}

/// `dst[t] = x[b, t, head]` for a tensor `[B, T, heads, hd]`, in the compute type.
#[inline(always)]
fn gather<E: Elem, R: Real>(x: &[E], d: Dims, heads: usize, b: usize, head: usize, dst: &mut [R]) {
    let hd = d.hd;
    for t in 0..d.t {
        let src = &x[((b * d.t + t) * heads + head) * hd..][..hd];
        for (a, s) in dst[t * hd..(t + 1) * hd].iter_mut().zip(src) {
            *a = s.to_r();
        }
    }
}

/// `dst[c * stride + t] = x[b, t, head, c]` (one head transposed to `[hd, T]`, rows `stride >= T`
/// apart), in the compute type.
#[inline(always)]
fn gather_t<E: Elem, R: Real>(
    x: &[E],
    d: Dims,
    heads: usize,
    b: usize,
    head: usize,
    stride: usize,
    dst: &mut [R],
) {
    let hd = d.hd;
    for t in 0..d.t {
        let src = &x[((b * d.t + t) * heads + head) * hd..][..hd];
        for (c, s) in src.iter().enumerate() {
            dst[c * stride + t] = s.to_r();
        }
    }
}

multiversion! {
    /// One (batch, head) of the forward.
    fn forward_head[E: Elem, R: Real](
        sc: f64, window: usize, q: &[E], k: &[E], v: &[E], d: Dims, task: usize,
    ) -> (Vec<R>, Vec<R>) => forward_head_impl[E, R]
}

multiversion! {
    /// One (batch, head) of the backward.
    fn backward_head[E: Elem, R: Real](
        sc: f64, window: usize, q: &[E], k: &[E], v: &[E], o: &[E], dout: &[E], lse: &[f64],
        d: Dims, task: usize,
    ) -> [Vec<R>; 3] => backward_head_impl[E, R]
}

/// One (batch, head): the output rows `[T, hd]` and the logsumexp of each row. The common head
/// sizes take the register-blocked form; any other size the row-by-row form.
#[inline(always)]
fn forward_head_impl<E: Elem, R: Real>(
    sc: f64,
    window: usize,
    q: &[E],
    k: &[E],
    v: &[E],
    d: Dims,
    task: usize,
) -> (Vec<R>, Vec<R>) {
    match d.hd {
        64 => forward_head_blocked::<E, R, 64>(sc, window, q, k, v, d, task),
        128 => forward_head_blocked::<E, R, 128>(sc, window, q, k, v, d, task),
        _ => forward_head_rows::<E, R>(sc, window, q, k, v, d, task),
    }
}

/// Query rows handled together by [`forward_head_blocked`].
const RB: usize = 4;

/// The forward for a head size known at compile time: [`RB`] query rows at a time, their scores
/// for a block of [`BLOCK_K`] keys and their output rows held in fixed-size arrays (registers),
/// so each key and value row loaded serves four queries. Keys outside a row's causal window get
/// probability zero; the online softmax is per row as in [`forward_head_rows`].
#[inline(always)]
fn forward_head_blocked<E: Elem, R: Real, const HD: usize>(
    sc: f64,
    window: usize,
    q: &[E],
    k: &[E],
    v: &[E],
    d: Dims,
    task: usize,
) -> (Vec<R>, Vec<R>) {
    let (b, h) = (task / d.h, task % d.h);
    let kvh = h / (d.h / d.kv);
    let t = d.t;
    // q with its rows padded to a multiple of RB (zeros), K transposed with every row padded by
    // a block of zeros (so a full block can always be read), v as it is.
    let mut qh = vec![R::ZERO; t.div_ceil(RB) * RB * HD];
    gather(q, d, d.h, b, h, &mut qh[..t * HD]);
    let kstride = t + BLOCK_K;
    let mut kt = vec![R::ZERO; HD * kstride];
    gather_t(k, d, d.kv, b, kvh, kstride, &mut kt);
    let mut vh = vec![R::ZERO; t * HD];
    gather(v, d, d.kv, b, kvh, &mut vh);
    let sc = R::from_f64(sc);
    let mut out = vec![R::ZERO; t * HD];
    let mut lse = vec![R::ZERO; t];
    for r0 in (0..t).step_by(RB) {
        let rows = RB.min(t - r0);
        let mut m = [R::NEG_INFINITY; RB];
        let mut l = [R::ZERO; RB];
        let mut acc = [[R::ZERO; HD]; RB];
        let klo = d.keys(r0, window).0;
        let khi = r0 + rows;
        for j0 in (klo..khi).step_by(BLOCK_K) {
            let mut s = [[R::ZERO; BLOCK_K]; RB];
            for c in 0..HD {
                let kr = &kt[c * kstride + j0..][..BLOCK_K];
                for (sr, qr) in s.iter_mut().zip(qh[r0 * HD..].chunks_exact(HD)) {
                    let qv = qr[c] * sc;
                    for (x, kx) in sr.iter_mut().zip(kr) {
                        *x += qv * *kx;
                    }
                }
            }
            for (rr, sr) in s.iter_mut().enumerate() {
                if rr >= rows {
                    sr.fill(R::ZERO);
                    continue;
                }
                let (lo, hi) = d.keys(r0 + rr, window);
                let a = lo.saturating_sub(j0).min(BLOCK_K);
                let e = hi.saturating_sub(j0).min(BLOCK_K);
                if a >= e {
                    sr.fill(R::ZERO);
                    continue;
                }
                let mut mx = m[rr];
                for x in &sr[a..e] {
                    mx = mx.max(*x);
                }
                let corr = (m[rr] - mx).exp();
                let mut sum = R::ZERO;
                for (x, p) in sr.iter_mut().enumerate() {
                    let e_ = (*p - mx).exp();
                    *p = if x >= a && x < e { e_ } else { R::ZERO };
                }
                for p in sr.iter() {
                    sum += *p;
                }
                l[rr] = l[rr] * corr + sum;
                for o in acc[rr].iter_mut() {
                    *o *= corr;
                }
                m[rr] = mx;
            }
            let nk = BLOCK_K.min(t - j0);
            for x in 0..nk {
                let vr = &vh[(j0 + x) * HD..][..HD];
                for (ar, sr) in acc.iter_mut().zip(&s) {
                    let p = sr[x];
                    for (o, vx) in ar.iter_mut().zip(vr) {
                        *o += p * *vx;
                    }
                }
            }
        }
        for rr in 0..rows {
            let r = r0 + rr;
            let inv = R::ONE / l[rr];
            for (o, a) in out[r * HD..(r + 1) * HD].iter_mut().zip(&acc[rr]) {
                *o = *a * inv;
            }
            lse[r] = m[rr] + l[rr].ln();
        }
    }
    (out, lse)
}

/// [`forward_head_impl`] for any head size, one query row at a time.
#[inline(always)]
fn forward_head_rows<E: Elem, R: Real>(
    sc: f64,
    window: usize,
    q: &[E],
    k: &[E],
    v: &[E],
    d: Dims,
    task: usize,
) -> (Vec<R>, Vec<R>) {
    {
        let (b, h) = (task / d.h, task % d.h);
        let kvh = h / (d.h / d.kv);
        let (t, hd) = (d.t, d.hd);
        let mut qh = vec![R::ZERO; t * hd];
        let mut kt = vec![R::ZERO; t * hd];
        let mut vh = vec![R::ZERO; t * hd];
        gather(q, d, d.h, b, h, &mut qh);
        gather_t(k, d, d.kv, b, kvh, t, &mut kt);
        gather(v, d, d.kv, b, kvh, &mut vh);
        let sc = R::from_f64(sc);
        let mut out = vec![R::ZERO; t * hd];
        let mut lse = vec![R::ZERO; t];
        let mut s = [R::ZERO; BLOCK_K];
        let (mut m, mut l) = ([R::NEG_INFINITY; BLOCK_Q], [R::ZERO; BLOCK_Q]);
        for i0 in (0..t).step_by(BLOCK_Q) {
            let i1 = (i0 + BLOCK_Q).min(t);
            m.fill(R::NEG_INFINITY);
            l.fill(R::ZERO);
            let lo = d.keys(i0, window).0;
            for j0 in (lo..i1).step_by(BLOCK_K) {
                let j1 = (j0 + BLOCK_K).min(i1);
                for r in i0..i1 {
                    let (klo, khi) = d.keys(r, window);
                    let (jlo, jhi) = (klo.max(j0), khi.min(j1));
                    if jlo >= jhi {
                        continue;
                    }
                    let n = jhi - jlo;
                    let qr = &qh[r * hd..(r + 1) * hd];
                    let ri = r - i0;
                    // Scores of the block's keys at once: K is held transposed ([hd, T]), so
                    // each query component scales one contiguous run of keys (SIMD over keys).
                    let sr = &mut s[..n];
                    sr.fill(R::ZERO);
                    for (c, qc) in qr.iter().enumerate() {
                        axpy(*qc * sc, &kt[c * t + jlo..c * t + jhi], sr);
                    }
                    let mut mx = m[ri];
                    for sv in sr.iter() {
                        mx = mx.max(*sv);
                    }
                    let acc = &mut out[r * hd..(r + 1) * hd];
                    let corr = (m[ri] - mx).exp();
                    l[ri] *= corr;
                    scale(corr, acc);
                    // The exponentials in their own loop, so they vectorize.
                    for sv in sr.iter_mut() {
                        *sv = (*sv - mx).exp();
                    }
                    for (j, p) in (jlo..jhi).zip(sr.iter()) {
                        l[ri] += *p;
                        axpy(*p, &vh[j * hd..(j + 1) * hd], acc);
                    }
                    m[ri] = mx;
                }
            }
            for r in i0..i1 {
                let ri = r - i0;
                scale(R::ONE / l[ri], &mut out[r * hd..(r + 1) * hd]);
                lse[r] = m[ri] + l[ri].ln();
            }
        }
        (out, lse)
    }
}

/// One (batch, head): dq `[T, hd]` and this head's share of dk, dv `[T, hd]`.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn backward_head_impl<E: Elem, R: Real>(
    sc: f64,
    window: usize,
    q: &[E],
    k: &[E],
    v: &[E],
    o: &[E],
    dout: &[E],
    lse: &[f64],
    d: Dims,
    task: usize,
) -> [Vec<R>; 3] {
    {
        let (b, h) = (task / d.h, task % d.h);
        let kvh = h / (d.h / d.kv);
        let (t, hd) = (d.t, d.hd);
        let buf = || vec![R::ZERO; t * hd];
        let (mut qh, mut kh, mut vh, mut oh, mut doh) = (buf(), buf(), buf(), buf(), buf());
        gather(q, d, d.h, b, h, &mut qh);
        gather(k, d, d.kv, b, kvh, &mut kh);
        gather(v, d, d.kv, b, kvh, &mut vh);
        gather(o, d, d.h, b, h, &mut oh);
        gather(dout, d, d.h, b, h, &mut doh);
        let lse = &lse[task * t..(task + 1) * t];
        let delta: Vec<R> = (0..t)
            .map(|r| dot(&doh[r * hd..(r + 1) * hd], &oh[r * hd..(r + 1) * hd]))
            .collect();
        let sc = R::from_f64(sc);
        let (mut dq, mut dk, mut dv) = (buf(), buf(), buf());
        for i0 in (0..t).step_by(BLOCK_Q) {
            let i1 = (i0 + BLOCK_Q).min(t);
            let lo = d.keys(i0, window).0;
            for j0 in (lo..i1).step_by(BLOCK_K) {
                let j1 = (j0 + BLOCK_K).min(i1);
                for r in i0..i1 {
                    let (klo, khi) = d.keys(r, window);
                    let (jlo, jhi) = (klo.max(j0), khi.min(j1));
                    let qr = &qh[r * hd..(r + 1) * hd];
                    let dor = &doh[r * hd..(r + 1) * hd];
                    let lr = R::from_f64(lse[r]);
                    let dqr = &mut dq[r * hd..(r + 1) * hd];
                    for j in jlo..jhi {
                        let kj = &kh[j * hd..(j + 1) * hd];
                        let vj = &vh[j * hd..(j + 1) * hd];
                        let p = (dot(qr, kj) * sc - lr).exp();
                        axpy(p, dor, &mut dv[j * hd..(j + 1) * hd]);
                        let ds = p * (dot(dor, vj) - delta[r]) * sc;
                        axpy(ds, kj, dqr);
                        axpy(ds, qr, &mut dk[j * hd..(j + 1) * hd]);
                    }
                }
            }
        }
        [dq, dk, dv]
    }
}

impl CustomOp3 for Attention {
    fn name(&self) -> &'static str {
        "fused-attention"
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
        let d = Dims::of(l1.dims(), l2.dims(), l3.dims())?;
        if dt(s2) != dt(s1) || dt(s3) != dt(s1) {
            return Err(Error::Msg("attention: q, k, v must share a dtype".into()));
        }
        by_dtype!(dt(s1), "attention", |E, R| {
            let q = cpu_slice::<E>(s1, l1, "attention")?;
            let k = cpu_slice::<E>(s2, l2, "attention")?;
            let v = cpu_slice::<E>(s3, l3, "attention")?;
            let heads: Vec<(Vec<R>, Vec<R>)> = (0..d.b * d.h)
                .into_par_iter()
                .map(|task| forward_head::<E, R>(self.scale, self.window, q, k, v, d, task))
                .collect();
            let y = par_rows::<E>(d.b * d.t * d.h, d.hd, |r0, out| {
                for (i, o) in out.chunks_exact_mut(d.hd).enumerate() {
                    let row = r0 + i;
                    let (h, bt) = (row % d.h, row / d.h);
                    let (b, t) = (bt / d.t, bt % d.t);
                    let src = &heads[b * d.h + h].0[t * d.hd..(t + 1) * d.hd];
                    for (o, s) in o.iter_mut().zip(src) {
                        o.write(E::from_r(*s));
                    }
                }
            });
            let lse: Vec<f64> = heads
                .iter()
                .flat_map(|(_, l)| l.iter().map(|x| x.to_f64()))
                .collect();
            *self.lse.lock().unwrap_or_else(|p| p.into_inner()) = Some(lse);
            Ok((storage(y), l1.shape().clone()))
        })
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        res: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let d = Dims::of(q.dims(), k.dims(), v.dims())?;
        let guard = self.lse.lock().unwrap_or_else(|p| p.into_inner());
        let lse = guard
            .as_deref()
            .ok_or_else(|| Error::Msg("attention: backward before forward".into()))?;
        let (dq, dk, dv) = by_dtype!(q.dtype(), "attention backward", |E, R| {
            read::<E, _>(q, "attention", |qs| {
                read::<E, _>(k, "attention", |ks| {
                    read::<E, _>(v, "attention", |vs| {
                        read::<E, _>(res, "attention", |os| {
                            read::<E, _>(&dy.to_dtype(dtype_of::<E>())?, "attention", |dys| {
                                let heads: Vec<[Vec<R>; 3]> = (0..d.b * d.h)
                                    .into_par_iter()
                                    .map(|task| {
                                        backward_head::<E, R>(
                                            self.scale,
                                            self.window,
                                            qs,
                                            ks,
                                            vs,
                                            os,
                                            dys,
                                            lse,
                                            d,
                                            task,
                                        )
                                    })
                                    .collect();
                                Ok(assemble::<E, R>(&heads, d))
                            })
                        })
                    })
                })
            })
            .and_then(|(dq, dk, dv)| {
                Ok((
                    tensor(dq, q.dims())?,
                    tensor(dk, k.dims())?,
                    tensor(dv, v.dims())?,
                ))
            })
        })?;
        Ok((Some(dq), Some(dk), Some(dv)))
    }
}

/// dq `[B, T, H, hd]` from the heads' rows; dk, dv `[B, T, KV, hd]` summed over each group.
fn assemble<E: Elem, R: Real>(heads: &[[Vec<R>; 3]], d: Dims) -> (Vec<E>, Vec<E>, Vec<E>) {
    let hd = d.hd;
    let dq = par_rows::<E>(d.b * d.t * d.h, hd, |r0, out| {
        for (i, o) in out.chunks_exact_mut(hd).enumerate() {
            let row = r0 + i;
            let (h, bt) = (row % d.h, row / d.h);
            let (b, t) = (bt / d.t, bt % d.t);
            let src = &heads[b * d.h + h][0][t * hd..(t + 1) * hd];
            for (o, s) in o.iter_mut().zip(src) {
                o.write(E::from_r(*s));
            }
        }
    });
    let group = d.h / d.kv;
    let kv_grad = |which: usize| {
        par_rows::<E>(d.b * d.t * d.kv, hd, |r0, out| {
            let mut acc = vec![R::ZERO; hd];
            for (i, o) in out.chunks_exact_mut(hd).enumerate() {
                let row = r0 + i;
                let (kvh, bt) = (row % d.kv, row / d.kv);
                let (b, t) = (bt / d.t, bt % d.t);
                acc.fill(R::ZERO);
                for g in 0..group {
                    let src = &heads[b * d.h + kvh * group + g][which][t * hd..(t + 1) * hd];
                    for (a, s) in acc.iter_mut().zip(src) {
                        *a += *s;
                    }
                }
                for (o, a) in o.iter_mut().zip(&acc) {
                    o.write(E::from_r(*a));
                }
            }
        })
    };
    (dq, kv_grad(1), kv_grad(2))
}
