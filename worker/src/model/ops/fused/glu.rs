//! The gated MLP activation `act(gate) · up`: SwiGLU (`silu`) or GeGLU (the tanh-approximated
//! gelu, as candle's `gelu` and transformers' `gelu_pytorch_tanh`), forward and backward in one
//! pass each.

use candle_core::{CpuStorage, CustomOp2, Error, Layout, Result, Shape, Tensor};

use super::simd::vectorized;
use super::{
    by_dtype, cpu_slice, dt, dtype_of, par_rows, par_rows2, read, rows_of, storage, tensor, Elem,
    Real,
};

/// The activation of the gate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    /// `x · σ(x)`.
    Silu,
    /// `0.5 x (1 + tanh(√(2/π) (x + 0.044715 x³)))`.
    GeluTanh,
}

/// Fused `act(gate) · up` over tensors of one shape, differentiable in both.
pub fn glu(gate: &Tensor, up: &Tensor, act: Activation) -> Result<Tensor> {
    gate.contiguous()?.apply_op2(&up.contiguous()?, Glu(act))
}

struct Glu(Activation);

const SQRT_2_OVER_PI: f64 = 0.797_884_560_802_865_4;
const GELU_C: f64 = 0.044_715;

/// (act(x), act'(x)).
#[inline(always)]
fn act<R: Real>(a: Activation, x: R) -> (R, R) {
    match a {
        Activation::Silu => {
            let s = R::ONE / (R::ONE + (-x).exp());
            (x * s, s * (R::ONE + x * (R::ONE - s)))
        }
        Activation::GeluTanh => {
            let (k, c) = (R::from_f64(SQRT_2_OVER_PI), R::from_f64(GELU_C));
            let half = R::from_f64(0.5);
            let x2 = x * x;
            let th = (k * (x + c * x2 * x)).tanh();
            let y = half * x * (R::ONE + th);
            let dy = half * (R::ONE + th)
                + half * x * (R::ONE - th * th) * k * (R::ONE + R::from_f64(3.0) * c * x2);
            (y, dy)
        }
    }
}

impl Glu {
    fn forward<E: Elem, R: Real>(&self, g: &[E], u: &[E], d: usize) -> Vec<E> {
        let a = self.0;
        par_rows::<E>(g.len() / d, d, |r0, out| {
            vectorized(|| {
                let span = r0 * d..r0 * d + out.len();
                for ((o, g), u) in out.iter_mut().zip(&g[span.clone()]).zip(&u[span]) {
                    let (y, _) = act::<R>(a, g.to_r());
                    o.write(E::from_r(y * u.to_r()));
                }
            })
        })
    }

    /// (d gate, d up).
    fn backward<E: Elem, R: Real>(&self, g: &[E], u: &[E], dy: &[E], d: usize) -> (Vec<E>, Vec<E>) {
        let a = self.0;
        par_rows2::<E>(g.len() / d, d, |r0, og, ou| {
            vectorized(|| {
                let span = r0 * d..r0 * d + og.len();
                for ((((og, ou), g), u), dy) in og
                    .iter_mut()
                    .zip(ou.iter_mut())
                    .zip(&g[span.clone()])
                    .zip(&u[span.clone()])
                    .zip(&dy[span])
                {
                    let (y, dydg) = act::<R>(a, g.to_r());
                    let dy: R = dy.to_r();
                    og.write(E::from_r(dy * u.to_r() * dydg));
                    ou.write(E::from_r(dy * y));
                }
            })
        })
    }
}

impl CustomOp2 for Glu {
    fn name(&self) -> &'static str {
        "fused-glu"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        if l1.dims() != l2.dims() || dt(s1) != dt(s2) {
            return Err(Error::Msg(format!(
                "glu: gate {:?} {:?} and up {:?} {:?} must match",
                l1.dims(),
                dt(s1),
                l2.dims(),
                dt(s2)
            )));
        }
        let (_, d) = rows_of(l1.dims(), "glu")?;
        by_dtype!(dt(s1), "glu", |E, R| {
            let g = cpu_slice::<E>(s1, l1, "glu")?;
            let u = cpu_slice::<E>(s2, l2, "glu")?;
            let y = self.forward::<E, R>(g, u, d);
            Ok((storage(y), l1.shape().clone()))
        })
    }

    fn bwd(
        &self,
        gate: &Tensor,
        up: &Tensor,
        _res: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let dims = gate.dims().to_vec();
        let (_, d) = rows_of(&dims, "glu")?;
        let (dg, du) = by_dtype!(gate.dtype(), "glu backward", |E, R| {
            read::<E, _>(gate, "glu", |g| {
                read::<E, _>(up, "glu", |u| {
                    read::<E, _>(&dy.to_dtype(dtype_of::<E>())?, "glu", |dy| {
                        let (dg, du) = self.backward::<E, R>(g, u, dy, d);
                        Ok((tensor(dg, &dims)?, tensor(du, &dims)?))
                    })
                })
            })
        })?;
        Ok((Some(dg), Some(du)))
    }
}
