//! RMSNorm over the last dimension with its weight: `y = x · r · w` (Gemma: `· (1 + w)`),
//! `r = 1 / sqrt(mean(x²) + eps)`, the statistics always in f32 (f64 for f64). Backward:
//! `dx = r · (g - x̂ · mean(g · x̂))` with `g = dy · w`, `x̂ = x · r`; `dw = Σ_rows dy · x̂`.

use candle_core::{CpuStorage, CustomOp2, Error, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::simd::{dot, vectorized};
use super::{
    by_dtype, cpu_slice, dt, dtype_of, par_rows, read, rows_of, rows_per_task, storage, tensor,
    Elem, Real,
};

/// Fused RMSNorm of `x` `[.., D]` with weight `w` `[D]` (same dtype), differentiable in both.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64, plus_one: bool) -> Result<Tensor> {
    let x = x.contiguous()?;
    let w = w.contiguous()?;
    x.apply_op2(&w, RmsNorm { eps, plus_one })
}

struct RmsNorm {
    eps: f64,
    plus_one: bool,
}

impl RmsNorm {
    fn check(&self, x: &[usize], w: &[usize]) -> Result<(usize, usize)> {
        let (rows, d) = rows_of(x, "rms_norm")?;
        if w != [d] {
            return Err(Error::Msg(format!(
                "rms_norm: weight of shape {w:?} for rows of {d}"
            )));
        }
        Ok((rows, d))
    }

    fn weight<E: Elem, R: Real>(&self, w: &[E]) -> Vec<R> {
        let one = if self.plus_one { R::ONE } else { R::ZERO };
        w.iter().map(|v| v.to_r::<R>() + one).collect()
    }
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "fused-rms-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (rows, d) = self.check(l1.dims(), l2.dims())?;
        if dt(s1) != dt(s2) {
            return Err(Error::Msg(format!(
                "rms_norm: x is {:?} but the weight {:?}",
                dt(s1),
                dt(s2)
            )));
        }
        by_dtype!(dt(s1), "rms_norm", |E, R| {
            let x = cpu_slice::<E>(s1, l1, "rms_norm")?;
            let w: Vec<R> = self.weight::<E, R>(cpu_slice::<E>(s2, l2, "rms_norm")?);
            let eps = R::from_f64(self.eps);
            let inv_d = R::ONE / R::from_f64(d as f64);
            let y = par_rows::<E>(rows, d, |r0, out| {
                vectorized(|| {
                    let mut xr = vec![R::ZERO; d];
                    for (i, o) in out.chunks_exact_mut(d).enumerate() {
                        let row = &x[(r0 + i) * d..(r0 + i + 1) * d];
                        for (a, b) in xr.iter_mut().zip(row) {
                            *a = b.to_r();
                        }
                        let r = R::ONE / (dot(&xr, &xr) * inv_d + eps).sqrt();
                        for ((o, a), w) in o.iter_mut().zip(&xr).zip(&w) {
                            o.write(E::from_r(*a * r * *w));
                        }
                    }
                })
            });
            Ok((storage(y), l1.shape().clone()))
        })
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (rows, d) = self.check(x.dims(), w.dims())?;
        let (dx, dw) = by_dtype!(x.dtype(), "rms_norm backward", |E, R| {
            read::<E, _>(x, "rms_norm", |x| {
                read::<E, _>(w, "rms_norm", |w| {
                    read::<E, _>(&dy.to_dtype(dtype_of::<E>())?, "rms_norm", |dy| {
                        let w: Vec<R> = self.weight::<E, R>(w);
                        Ok(self.backward::<E, R>(x, &w, dy, rows, d))
                    })
                })
            })
            .and_then(|(dx, dw)| Ok((tensor(dx, x.dims())?, tensor(dw, &[d])?)))
        })?;
        Ok((Some(dx), Some(dw)))
    }
}

impl RmsNorm {
    fn backward<E: Elem, R: Real>(
        &self,
        x: &[E],
        w: &[R],
        dy: &[E],
        rows: usize,
        d: usize,
    ) -> (Vec<E>, Vec<E>) {
        let eps = R::from_f64(self.eps);
        let inv_d = R::ONE / R::from_f64(d as f64);
        let per = rows_per_task(rows);
        let mut dx: Vec<E> = Vec::with_capacity(rows * d);
        let partial: Vec<Vec<R>> = dx.spare_capacity_mut()[..rows * d]
            .par_chunks_mut(per * d)
            .enumerate()
            .map(|(c, out)| {
                vectorized(|| {
                    let r0 = c * per;
                    let mut dw = vec![R::ZERO; d];
                    let (mut xh, mut g) = (vec![R::ZERO; d], vec![R::ZERO; d]);
                    for (i, o) in out.chunks_exact_mut(d).enumerate() {
                        let span = (r0 + i) * d..(r0 + i + 1) * d;
                        for (a, b) in xh.iter_mut().zip(&x[span.clone()]) {
                            *a = b.to_r();
                        }
                        let r = R::ONE / (dot(&xh, &xh) * inv_d + eps).sqrt();
                        for a in xh.iter_mut() {
                            *a *= r;
                        }
                        for (((g, acc), dy), (w, xh)) in g
                            .iter_mut()
                            .zip(dw.iter_mut())
                            .zip(&dy[span])
                            .zip(w.iter().zip(&xh))
                        {
                            let dy: R = dy.to_r();
                            *g = dy * *w;
                            *acc += dy * *xh;
                        }
                        let c = dot(&g, &xh) * inv_d;
                        for ((o, g), xh) in o.iter_mut().zip(&g).zip(&xh) {
                            o.write(E::from_r(r * (*g - *xh * c)));
                        }
                    }
                    dw
                })
            })
            .collect();
        // SAFETY: the chunks cover every element and each row of each chunk was written.
        unsafe { dx.set_len(rows * d) };
        let mut dw = vec![R::ZERO; d];
        for p in &partial {
            for (a, b) in dw.iter_mut().zip(p) {
                *a += *b;
            }
        }
        (dx, dw.into_iter().map(E::from_r).collect())
    }
}
