//! The bf16 matrix multiply with f32 accumulation for the CPU, dispatched at run time:
//! `y = x · Wᵀ` for `x` `[.., K]` and `W` `[N, K]` (Hugging Face layout), as a candle custom op
//! with a backward (`dx = dy · W`, `dW = dyᵀ · x` summed over the batch, same kernels).
//!
//! candle 0.11 multiplies bf16 on the CPU by converting both operands to f32 and back; here the
//! kernels read bf16 directly: AVX-512-BF16 (`vdpbf16ps` on K pairs) where the CPU has it, else
//! AVX-512F or AVX2+FMA on f32 widened while packing, else a scalar loop (see [`Isa`]). Each
//! output is one f32 sum over K, rounded once (to bf16, or kept in f32 for the logits).
//!
//! [`linear`] and [`logits`] are what the model calls: ours when the tensors are bf16 on the
//! CPU and the switch is on (`DISTILLERY_BF16_GEMM=0` turns it off, [`set_enabled`] at run
//! time; `DISTILLERY_BF16_GEMM=<path>` picks a path, see [`Isa::chosen`]), candle's matmul
//! otherwise (every other device and dtype).
//!
//! On CPUs with AMX (Intel Sapphire Rapids and later) the best path is [`Isa::Amx`]: tile
//! registers and `tdpbf16ps`, 16 × 16 × 32 multiply-adds per instruction (see `amx.rs`).

#[cfg(target_arch = "x86_64")]
mod amx;
mod driver;
mod kernels;
#[cfg(test)]
mod tests;

use std::borrow::Cow;
use std::mem::MaybeUninit;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor};
use half::bf16;

use driver::{Kernel, MatRef, Out};

/// The instruction set a bf16 multiply runs on, best first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    /// AMX tiles (`tdpbf16ps`): bf16 pairs, f32 accumulators, 16 × 16 × 32 per instruction.
    Amx,
    /// `vdpbf16ps` (AVX-512-BF16): bf16 pairs, f32 accumulators.
    Avx512Bf16,
    /// AVX-512F FMA on f32 widened from bf16.
    Avx512F,
    /// AVX2 + FMA on f32 widened from bf16.
    Avx2Fma,
    /// Plain Rust.
    Scalar,
}

impl Isa {
    /// Every path, best first.
    pub const ALL: [Isa; 5] = [
        Isa::Amx,
        Isa::Avx512Bf16,
        Isa::Avx512F,
        Isa::Avx2Fma,
        Isa::Scalar,
    ];

    /// Whether this CPU can run the path.
    pub fn available(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            match self {
                Isa::Amx => amx::available(),
                Isa::Avx512Bf16 => {
                    std::arch::is_x86_feature_detected!("avx512f")
                        && std::arch::is_x86_feature_detected!("avx512bw")
                        && std::arch::is_x86_feature_detected!("avx512vl")
                        && std::arch::is_x86_feature_detected!("avx512bf16")
                }
                Isa::Avx512F => {
                    std::arch::is_x86_feature_detected!("avx512f")
                        && std::arch::is_x86_feature_detected!("avx512bw")
                        && std::arch::is_x86_feature_detected!("avx512vl")
                }
                Isa::Avx2Fma => {
                    std::arch::is_x86_feature_detected!("avx2")
                        && std::arch::is_x86_feature_detected!("fma")
                }
                Isa::Scalar => true,
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            self == Isa::Scalar
        }
    }

    /// The name `DISTILLERY_BF16_GEMM` takes for this path.
    pub fn name(self) -> &'static str {
        match self {
            Isa::Amx => "amx",
            Isa::Avx512Bf16 => "avx512bf16",
            Isa::Avx512F => "avx512f",
            Isa::Avx2Fma => "avx2",
            Isa::Scalar => "scalar",
        }
    }

    /// The path [`linear`] and [`logits`] use: the one `DISTILLERY_BF16_GEMM` names when this CPU
    /// runs it (the benches measure what each path buys), else [`Isa::best`]. Read once; a name
    /// that is not a path, or a path this CPU lacks, is said on stderr once.
    pub fn chosen() -> Isa {
        static CHOSEN: OnceLock<Isa> = OnceLock::new();
        *CHOSEN.get_or_init(|| {
            let Ok(v) = std::env::var("DISTILLERY_BF16_GEMM") else {
                return Isa::best();
            };
            let v = v.trim().to_ascii_lowercase();
            if matches!(v.as_str(), "" | "0" | "1") {
                return Isa::best();
            }
            match Isa::ALL.into_iter().find(|i| i.name() == v) {
                Some(i) if i.available() => i,
                Some(i) => {
                    eprintln!(
                        "DISTILLERY_BF16_GEMM={v}: this CPU cannot run the {i:?} path; using {:?}",
                        Isa::best()
                    );
                    Isa::best()
                }
                None => {
                    eprintln!(
                        "DISTILLERY_BF16_GEMM={v}: not a path (0, 1, amx, avx512bf16, avx512f, \
                         avx2, scalar); using {:?}",
                        Isa::best()
                    );
                    Isa::best()
                }
            }
        })
    }

    /// The best path this CPU runs (detected once).
    pub fn best() -> Isa {
        static BEST: OnceLock<Isa> = OnceLock::new();
        *BEST.get_or_init(|| {
            Isa::ALL
                .into_iter()
                .find(|i| i.available())
                .unwrap_or(Isa::Scalar)
        })
    }
}

/// FLOPs of `iters` rounds of a register-only AMX loop (four `tdpbf16ps` a round), for the
/// benches' peak figure; `None` where [`Isa::Amx`] is not available.
pub fn amx_peak_loop(iters: u64) -> Option<f64> {
    #[cfg(target_arch = "x86_64")]
    if Isa::Amx.available() {
        return Some(amx::peak_loop(iters));
    }
    let _ = iters;
    None
}

fn switch() -> &'static AtomicBool {
    static ON: OnceLock<AtomicBool> = OnceLock::new();
    ON.get_or_init(|| {
        let off = std::env::var("DISTILLERY_BF16_GEMM").is_ok_and(|v| v.trim() == "0");
        AtomicBool::new(!off)
    })
}

/// Whether [`linear`] and [`logits`] use these kernels for bf16 on the CPU (default on;
/// `DISTILLERY_BF16_GEMM=0`, read once, turns it off).
pub fn enabled() -> bool {
    switch().load(Ordering::Relaxed)
}

/// Turns the bf16 kernels on or off for the whole process (benchmarks compare both).
pub fn set_enabled(on: bool) {
    switch().store(on, Ordering::Relaxed)
}

/// Whether `x · wᵀ` goes to our kernels: both bf16 on the CPU and [`enabled`].
fn ours(x: &Tensor, w: &Tensor) -> bool {
    enabled()
        && x.device().is_cpu()
        && w.device().is_cpu()
        && x.dtype() == DType::BF16
        && w.dtype() == DType::BF16
        && w.rank() == 2
        && x.rank() >= 1
}

/// Whether a bf16 multiply of `x` and `w` under autocast goes to our kernels: on the CPU, each
/// operand bf16 or f32 (rounded to bf16 as it is read), and [`enabled`].
fn ours_autocast(x: &Tensor, w: &Tensor) -> bool {
    let bf16_or_f32 = |t: &Tensor| matches!(t.dtype(), DType::BF16 | DType::F32);
    enabled()
        && x.device().is_cpu()
        && w.device().is_cpu()
        && bf16_or_f32(x)
        && bf16_or_f32(w)
        && w.rank() == 2
        && x.rank() >= 1
}

/// `x · wᵀ` for a linear layer (`x` `[.., K]`, `w` `[N, K]`): our bf16 kernel when both are
/// bf16 on the CPU and [`enabled`], else candle's `broadcast_matmul`. The result has `x`'s dtype.
pub fn linear(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    if ours(x, w) {
        matmul_wt(x, w, DType::BF16, Isa::chosen())
    } else {
        x.broadcast_matmul(&w.t()?)
    }
}

/// `h · wᵀ` for the language-model head: as [`linear`], but bf16 inputs give f32 logits (our
/// kernel writes its f32 sums directly; candle's path converts its bf16 result), so the loss
/// sees the same dtype with the switch on or off. Other dtypes: candle's matmul, unchanged.
pub fn logits(h: &Tensor, w: &Tensor) -> Result<Tensor> {
    if ours(h, w) {
        matmul_wt(h, w, DType::F32, Isa::chosen())
    } else if h.dtype() == DType::BF16 {
        h.broadcast_matmul(&w.t()?)?.to_dtype(DType::F32)
    } else {
        h.broadcast_matmul(&w.t()?)
    }
}

/// `x · wᵀ` under autocast (PyTorch's `torch.autocast(bfloat16)` for a linear layer): both
/// operands rounded to bf16, the products summed in f32, the result (and each operand's
/// gradient) in the operand's own dtype — so an f32 model keeps f32 weights, activations and
/// gradients while its matrix multiplies run in bf16. Our kernels on the CPU (they round as they
/// read, no bf16 copy of an activation is kept); elsewhere, or with the kernels off, candle's
/// matmul on bf16 copies.
pub fn linear_bf16(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    if ours_autocast(x, w) {
        matmul_wt(x, w, x.dtype(), Isa::chosen())
    } else {
        x.to_dtype(DType::BF16)?
            .broadcast_matmul(&w.to_dtype(DType::BF16)?.t()?)?
            .to_dtype(x.dtype())
    }
}

/// [`logits`] under autocast: as [`linear_bf16`], f32 logits.
pub fn logits_bf16(h: &Tensor, w: &Tensor) -> Result<Tensor> {
    if ours_autocast(h, w) {
        matmul_wt(h, w, DType::F32, Isa::chosen())
    } else {
        h.to_dtype(DType::BF16)?
            .broadcast_matmul(&w.to_dtype(DType::BF16)?.t()?)?
            .to_dtype(DType::F32)
    }
}

/// `x · wᵀ` on a chosen path (`out`: `BF16` or `F32`), differentiable with respect to both
/// (the gradients come in each operand's dtype). `x` `[.., K]` and `w` `[N, K]` on the CPU, each
/// bf16 or f32 (rounded to bf16 as it is read); the tests force each path here.
pub fn matmul_wt(x: &Tensor, w: &Tensor, out: DType, isa: Isa) -> Result<Tensor> {
    x.contiguous()?.apply_op2(
        w,
        Bf16Matmul {
            form: Form::XWt,
            out,
            isa,
        },
    )
}

/// Which product an op computes from its two operands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Form {
    /// `x [.., K] · w[N, K]ᵀ → [.., N]` (the forward).
    XWt,
    /// `dy [.., N] · w[N, K] → [.., K]` (the input gradient).
    XW,
    /// `dy [.., N]ᵀ · x [.., K] → [N, K]`, summed over every leading index (the weight gradient).
    DyTX,
}

/// The bf16 multiply as a candle op.
#[derive(Clone, Copy, Debug)]
struct Bf16Matmul {
    form: Form,
    out: DType,
    isa: Isa,
}

fn err(msg: String) -> candle_core::Error {
    candle_core::Error::Msg(msg)
}

/// The elements of a contiguous tensor `[.., last]` as a `rows × last` bf16 matrix: bf16 as it
/// is, f32 rounded to bf16 (to nearest even, as PyTorch's autocast casts an f32 activation).
fn rows_of<'a>(
    s: &'a CpuStorage,
    l: &Layout,
    what: &str,
) -> Result<(Cow<'a, [bf16]>, usize, usize)> {
    let Some((start, end)) = l.contiguous_offsets() else {
        return Err(err(format!(
            "bf16 matmul: {what} must be contiguous (call .contiguous() first)"
        )));
    };
    let data = match s {
        CpuStorage::BF16(v) => Cow::Borrowed(&v[start..end]),
        CpuStorage::F32(v) => Cow::Owned(to_bf16(&v[start..end])),
        other => {
            return Err(err(format!(
                "bf16 matmul: {what} is {:?}, expected bf16 or f32",
                other.dtype()
            )))
        }
    };
    let dims = l.dims();
    let last = dims.last().copied().unwrap_or(1);
    let rows = (end - start).checked_div(last).unwrap_or(0);
    Ok((data, rows, last))
}

/// `src` rounded to bf16 (to nearest even, as `half`; NaN stays NaN) with the chosen path's
/// vector rounding ([`Isa::chosen`]), in parallel chunks for large inputs.
pub(crate) fn to_bf16(src: &[f32]) -> Vec<bf16> {
    use rayon::prelude::*;
    const CHUNK: usize = 1 << 16;
    let isa = Isa::chosen();
    let mut out: Vec<bf16> = Vec::with_capacity(src.len());
    let spare = &mut out.spare_capacity_mut()[..src.len()];
    let round = |(d, s): (&mut [MaybeUninit<bf16>], &[f32])| {
        // SAFETY: `chosen()` only returns a path this CPU runs; `d` has `s.len()` elements.
        unsafe { round_into(isa, s, d.as_mut_ptr() as *mut bf16) }
    };
    if src.len() <= CHUNK {
        round((spare, src));
    } else {
        spare
            .par_chunks_mut(CHUNK)
            .zip(src.par_chunks(CHUNK))
            .for_each(round);
    }
    // SAFETY: every one of the `src.len()` elements was written above.
    unsafe { out.set_len(src.len()) };
    out
}

/// Rounds `src` into `dst[..src.len()]` on `isa`'s store routine.
///
/// # Safety
/// The CPU runs `isa`; `dst` is valid for `src.len()` writes.
unsafe fn round_into(isa: Isa, src: &[f32], dst: *mut bf16) {
    // SAFETY: forwarded.
    unsafe {
        match isa {
            #[cfg(target_arch = "x86_64")]
            Isa::Amx => <amx::Amx as Kernel>::store_bf16(src, dst),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512Bf16 => <kernels::Avx512Bf16 as Kernel>::store_bf16(src, dst),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512F => <kernels::Avx512F as Kernel>::store_bf16(src, dst),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2Fma => <kernels::Avx2Fma as Kernel>::store_bf16(src, dst),
            #[cfg(not(target_arch = "x86_64"))]
            Isa::Amx | Isa::Avx512Bf16 | Isa::Avx512F | Isa::Avx2Fma => {
                unreachable!("not available")
            }
            Isa::Scalar => <kernels::Scalar as Kernel>::store_bf16(src, dst),
        }
    }
}

/// A strided bf16 matrix: (elements from its offset, rows, cols, row stride, column stride).
type Strided<'a> = (Cow<'a, [bf16]>, usize, usize, usize, usize);

/// A 2-D tensor with any strides as bf16 (f32 rounded, over the span the view covers): (elements
/// from its offset, rows, cols, rs, cs).
fn strided_2d<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<Strided<'a>> {
    let (&[r, c], &[rs, cs]) = (l.dims(), l.stride()) else {
        return Err(err(format!(
            "bf16 matmul: {what} has shape {:?}, expected 2 dimensions",
            l.dims()
        )));
    };
    let start = l.start_offset();
    let data = match s {
        CpuStorage::BF16(v) => Cow::Borrowed(v.get(start..).unwrap_or(&[])),
        CpuStorage::F32(v) => {
            // The elements the view reaches: up to (r - 1, c - 1).
            let span = if r == 0 || c == 0 {
                0
            } else {
                (r - 1) * rs + (c - 1) * cs + 1
            };
            let Some(src) = v.get(start..start + span) else {
                return Err(err(format!(
                    "bf16 matmul: a {r}x{c} view of {what} overruns its storage"
                )));
            };
            Cow::Owned(to_bf16(src))
        }
        other => {
            return Err(err(format!(
                "bf16 matmul: {what} is {:?}, expected bf16 or f32",
                other.dtype()
            )))
        }
    };
    Ok((data, r, c, rs, cs))
}

fn view<'a>(
    data: &'a [bf16],
    rows: usize,
    cols: usize,
    rs: usize,
    cs: usize,
) -> Result<MatRef<'a>> {
    MatRef::new(data, rows, cols, rs, cs).ok_or_else(|| {
        err(format!(
            "bf16 matmul: a {rows}x{cols} view overruns its storage"
        ))
    })
}

impl Bf16Matmul {
    /// Runs the product and returns the storage and the output shape.
    fn run(&self, a: &MatRef, bt: &MatRef, shape: Shape) -> Result<(CpuStorage, Shape)> {
        let n = a.rows() * bt.rows();
        Ok(match self.out {
            DType::BF16 => (
                CpuStorage::BF16(product::<bf16>(self.isa, a, bt, n)?),
                shape,
            ),
            DType::F32 => (CpuStorage::F32(product::<f32>(self.isa, a, bt, n)?), shape),
            d => {
                return Err(err(format!(
                    "bf16 matmul: output {d:?}, expected bf16 or f32"
                )))
            }
        })
    }
}

impl CustomOp2 for Bf16Matmul {
    fn name(&self) -> &'static str {
        match self.form {
            Form::XWt => "bf16-matmul-xwt",
            Form::XW => "bf16-matmul-xw",
            Form::DyTX => "bf16-matmul-dyt-x",
        }
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        match self.form {
            Form::XWt => {
                let (x, m, k) = rows_of(s1, l1, "x")?;
                let (w, n, kw, rs, cs) = strided_2d(s2, l2, "w")?;
                if kw != k {
                    return Err(err(format!(
                        "bf16 matmul: x is [.., {k}] but w is [{n}, {kw}]: K must agree"
                    )));
                }
                let mut dims = l1.dims().to_vec();
                if let Some(d) = dims.last_mut() {
                    *d = n;
                }
                self.run(
                    &view(&x, m, k, k, 1)?,
                    &view(&w, n, k, rs, cs)?,
                    dims.into(),
                )
            }
            Form::XW => {
                let (dy, m, n) = rows_of(s1, l1, "dy")?;
                let (w, nw, k, rs, cs) = strided_2d(s2, l2, "w")?;
                if nw != n {
                    return Err(err(format!(
                        "bf16 matmul: dy is [.., {n}] but w is [{nw}, {k}]: N must agree"
                    )));
                }
                let mut dims = l1.dims().to_vec();
                if let Some(d) = dims.last_mut() {
                    *d = k;
                }
                // Bt = wᵀ: element (k, n) is w[n, k].
                self.run(
                    &view(&dy, m, n, n, 1)?,
                    &view(&w, k, n, cs, rs)?,
                    dims.into(),
                )
            }
            Form::DyTX => {
                let (dy, m, n) = rows_of(s1, l1, "dy")?;
                let (x, mx, k) = rows_of(s2, l2, "x")?;
                if mx != m {
                    return Err(err(format!(
                        "bf16 matmul: dy has {m} rows but x has {mx}: the batch must agree"
                    )));
                }
                // A = dyᵀ [N, M], Bt = xᵀ [K, M]: the reduction runs over the M tokens.
                self.run(
                    &view(&dy, n, m, 1, n)?,
                    &view(&x, k, m, 1, k)?,
                    (n, k).into(),
                )
            }
        }
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        if self.form != Form::XWt {
            return Err(candle_core::Error::BackwardNotSupported { op: self.name() });
        }
        // An f32 gradient (the logits, or f32 activations under autocast) enters the
        // bf16 kernels rounded, as under PyTorch's autocast: once here, for both products. Each
        // gradient comes in its operand's dtype (f32 activations get f32 sums, unrounded).
        let dy = if dy.dtype() == DType::BF16 {
            dy.contiguous()?
        } else {
            dy.contiguous()?.apply_op1_no_bwd(&ToBf16)?
        };
        let op = |form, out| Bf16Matmul {
            form,
            out,
            isa: self.isa,
        };
        let dx = dy.apply_op2_no_bwd(w, &op(Form::XW, x.dtype()))?;
        let dw = dy.apply_op2_no_bwd(&x.contiguous()?, &op(Form::DyTX, w.dtype()))?;
        Ok((Some(dx), Some(dw)))
    }
}

/// A contiguous f32 tensor rounded to bf16 by [`to_bf16`] (in parallel; candle's `to_dtype` is
/// one scalar pass).
struct ToBf16;

impl candle_core::CustomOp1 for ToBf16 {
    fn name(&self) -> &'static str {
        "to-bf16"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (v, _, _) = rows_of(s, l, "the gradient")?;
        Ok((CpuStorage::BF16(v.into_owned()), l.shape().clone()))
    }
}

/// `a · btᵀ` into a fresh `Vec` of `n` elements, every one written by the kernel.
fn product<O: Out>(isa: Isa, a: &MatRef, bt: &MatRef, n: usize) -> Result<Vec<O>> {
    if !isa.available() {
        return Err(err(format!(
            "bf16 matmul: this CPU cannot run the {isa:?} path"
        )));
    }
    let mut out: Vec<MaybeUninit<O>> = Vec::with_capacity(n);
    // SAFETY: `MaybeUninit` needs no initialisation.
    unsafe { out.set_len(n) };
    let threads = candle_core::utils::get_num_threads();
    // SAFETY: `available()` checked the CPU features of the chosen kernel.
    unsafe {
        match isa {
            #[cfg(target_arch = "x86_64")]
            Isa::Amx => run::<amx::Amx, O>(a, bt, &mut out, threads),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512Bf16 => run::<kernels::Avx512Bf16, O>(a, bt, &mut out, threads),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512F => run::<kernels::Avx512F, O>(a, bt, &mut out, threads),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2Fma => run::<kernels::Avx2Fma, O>(a, bt, &mut out, threads),
            #[cfg(not(target_arch = "x86_64"))]
            Isa::Amx | Isa::Avx512Bf16 | Isa::Avx512F | Isa::Avx2Fma => {
                unreachable!("not available")
            }
            Isa::Scalar => run::<kernels::Scalar, O>(a, bt, &mut out, threads),
        }
    }
    let mut out = std::mem::ManuallyDrop::new(out);
    let (ptr, len, cap) = (out.as_mut_ptr(), out.len(), out.capacity());
    // SAFETY: `driver::gemm` wrote every one of the `n = M·N` elements, and `MaybeUninit<O>` has
    // `O`'s layout.
    Ok(unsafe { Vec::from_raw_parts(ptr as *mut O, len, cap) })
}

/// # Safety
/// The CPU has `K`'s features.
unsafe fn run<K: Kernel, O: Out>(
    a: &MatRef,
    bt: &MatRef,
    out: &mut [MaybeUninit<O>],
    threads: usize,
) {
    // SAFETY: forwarded.
    unsafe { driver::gemm::<K, O>(a, bt, out, threads) }
}
