//! Rotary embedding in the HF `rotate_half` layout over `x` `[B, T, H, hd]` (the layout the
//! projections produce, so no transpose is needed) with tables `cos`, `sin` `[T, hd]`:
//! `y = x·cos + rotate_half(x)·sin`, `rotate_half(x) = [-x₂, x₁]`. Its backward is the
//! transposed rotation: `dx = dy·cos + [ (dy·sin)₂, -(dy·sin)₁ ]`.

use candle_core::{CpuStorage, CustomOp3, Error, Layout, Result, Shape, Tensor};

use super::simd::vectorized;
use super::{by_dtype, cpu_slice, dt, dtype_of, par_rows, read, storage, tensor, Elem, Real};

/// Fused RoPE of `x` `[B, T, H, hd]` with `cos`, `sin` `[T, hd]` (no gradient to the tables).
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let x = x.contiguous()?;
    x.apply_op3(&cos.contiguous()?, &sin.contiguous()?, Rope)
}

struct Rope;

/// (rows B·T·H, T, H, hd).
fn dims(x: &[usize], table: &[usize]) -> Result<(usize, usize, usize, usize)> {
    match (x, table) {
        (&[b, t, h, hd], &[tt, thd]) if tt == t && thd == hd && hd % 2 == 0 => {
            Ok((b * t * h, t, h, hd))
        }
        _ => Err(Error::Msg(format!(
            "rope: x must be [B, T, H, hd] (hd even) with tables [T, hd], got {x:?} and {table:?}"
        ))),
    }
}

/// `out = x·cos + sign·swap(x)·sin` per row, where `forward` picks rotate_half (and `!forward`
/// its transpose, for the backward).
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn rotate<E: Elem, R: Real>(
    x: &[E],
    cos: &[R],
    sin: &[R],
    t: usize,
    h: usize,
    hd: usize,
    forward: bool,
) -> Vec<E> {
    let rows = x.len() / hd;
    let half = hd / 2;
    par_rows::<E>(rows, hd, |r0, out| {
        vectorized(|| {
            let mut xr = vec![R::ZERO; hd];
            for (i, o) in out.chunks_exact_mut(hd).enumerate() {
                let row = r0 + i;
                let pos = (row / h) % t;
                let (c, s) = (
                    &cos[pos * hd..(pos + 1) * hd],
                    &sin[pos * hd..(pos + 1) * hd],
                );
                for (a, b) in xr.iter_mut().zip(&x[row * hd..(row + 1) * hd]) {
                    *a = b.to_r();
                }
                let (x1, x2) = xr.split_at(half);
                let (o1, o2) = o.split_at_mut(half);
                if forward {
                    for j in 0..half {
                        o1[j].write(E::from_r(x1[j] * c[j] - x2[j] * s[j]));
                        o2[j].write(E::from_r(x2[j] * c[half + j] + x1[j] * s[half + j]));
                    }
                } else {
                    for j in 0..half {
                        o1[j].write(E::from_r(x1[j] * c[j] + x2[j] * s[half + j]));
                        o2[j].write(E::from_r(x2[j] * c[half + j] - x1[j] * s[j]));
                    }
                }
            }
        })
    })
}

fn table<E: Elem, R: Real>(v: &[E]) -> Vec<R> {
    v.iter().map(|x| x.to_r()).collect()
}

impl CustomOp3 for Rope {
    fn name(&self) -> &'static str {
        "fused-rope"
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
        let (_, t, h, hd) = dims(l1.dims(), l2.dims())?;
        dims(l1.dims(), l3.dims())?;
        if dt(s2) != dt(s1) || dt(s3) != dt(s1) {
            return Err(Error::Msg(
                "rope: x and the tables must share a dtype".into(),
            ));
        }
        by_dtype!(dt(s1), "rope", |E, R| {
            let x = cpu_slice::<E>(s1, l1, "rope")?;
            let cos = table::<E, R>(cpu_slice::<E>(s2, l2, "rope")?);
            let sin = table::<E, R>(cpu_slice::<E>(s3, l3, "rope")?);
            let y = rotate::<E, R>(x, &cos, &sin, t, h, hd, true);
            Ok((storage(y), l1.shape().clone()))
        })
    }

    fn bwd(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        _res: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (_, t, h, hd) = dims(x.dims(), cos.dims())?;
        let dx = by_dtype!(x.dtype(), "rope backward", |E, R| {
            read::<E, _>(cos, "rope", |c| {
                read::<E, _>(sin, "rope", |s| {
                    read::<E, _>(&dy.to_dtype(dtype_of::<E>())?, "rope", |dy| {
                        let (c, s) = (table::<E, R>(c), table::<E, R>(s));
                        tensor(rotate::<E, R>(dy, &c, &s, t, h, hd, false), x.dims())
                    })
                })
            })
        })?;
        Ok((Some(dx), None, None))
    }
}
