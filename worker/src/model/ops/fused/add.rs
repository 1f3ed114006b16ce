//! The residual add `a + b` (same shape and dtype), element-wise in the compute type and
//! rounded once to the element type, as candle's add does. candle 0.11's bf16 add converts with
//! intrinsics it cannot inline (its crate is not built for AVX-512-BF16), which made the two
//! residual adds of every layer cost as much as a quarter of the bf16 forward's matrix
//! multiplies; here the conversion is the inlined bit operation every fused kernel uses.
//! Backward: `dy` to both inputs.

use candle_core::{CpuStorage, CustomOp2, Error, Layout, Result, Shape, Tensor};

use super::simd::vectorized;
use super::{by_dtype, cpu_slice, dt, par_rows, storage, Elem, Real};

/// `a + b` for tensors of the same shape and dtype on the CPU.
pub fn add(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    a.contiguous()?.apply_op2(&b.contiguous()?, Add)
}

struct Add;

/// Elements per parallel row (the add has no rows of its own).
const CHUNK: usize = 4096;

fn forward<E: Elem, R: Real>(a: &[E], b: &[E]) -> Vec<E> {
    let n = a.len();
    // par_rows writes whole rows: run it over the full chunks, then the tail.
    let full = n / CHUNK;
    let mut out = par_rows::<E>(full, CHUNK, |r0, o| {
        vectorized(|| {
            let span = r0 * CHUNK..r0 * CHUNK + o.len();
            for ((o, a), b) in o.iter_mut().zip(&a[span.clone()]).zip(&b[span]) {
                o.write(E::from_r(a.to_r::<R>() + b.to_r::<R>()));
            }
        })
    });
    if n > full * CHUNK {
        out.extend(
            a[full * CHUNK..]
                .iter()
                .zip(&b[full * CHUNK..])
                .map(|(a, b)| E::from_r(a.to_r::<R>() + b.to_r::<R>())),
        );
    }
    out
}

impl CustomOp2 for Add {
    fn name(&self) -> &'static str {
        "fused-add"
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
                "add: {:?} {:?} and {:?} {:?} must match",
                l1.dims(),
                dt(s1),
                l2.dims(),
                dt(s2)
            )));
        }
        by_dtype!(dt(s1), "add", |E, R| {
            let a = cpu_slice::<E>(s1, l1, "add")?;
            let b = cpu_slice::<E>(s2, l2, "add")?;
            Ok((storage(forward::<E, R>(a, b)), l1.shape().clone()))
        })
    }

    fn bwd(
        &self,
        _a: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some(dy.clone()), Some(dy.clone())))
    }
}
