//! Fused CPU kernels with a backward, as candle custom ops: RMSNorm (plain and Gemma's `1 + w`),
//! RoPE (HF `rotate_half` layout), SwiGLU / GeGLU, causal attention with GQA and sliding windows
//! (flash-attention style: online softmax per query block, only the per-row logsumexp kept for
//! the backward, probabilities recomputed there), the KD loss over the vocabulary in row
//! chunks (value and gradient without any `[N, V]` temporary), and the residual add.
//!
//! Each op reads f32, bf16 or f64 and computes in f32 (f64 for f64 inputs, so the backward can be
//! checked against finite differences); its output has the input's dtype. CPU only: callers keep
//! the composed candle path on other devices ([`active`]).
//!
//! Switch: `DISTILLERY_FUSED` (read once) — unset, `1`, `on` or `all`: every kernel on; `0`,
//! `off` or `none`: every kernel off (the composed path); a comma list of kernel names
//! (`norm,rope,glu,attention,loss,add`): only those on. [`set_fused`] / [`set_kernels`] change it
//! for the process, [`with_kernels`] for the calling thread only (tests).

mod add;
mod attention;
mod divergence;
mod glu;
mod loss;
mod norm;
mod rope;
mod simd;

#[cfg(test)]
mod tests;

use std::cell::Cell;
use std::mem::MaybeUninit;
use std::sync::atomic::{AtomicU8, Ordering};

use candle_core::{CpuStorage, DType, Device, Error, Layout, Result, Storage, Tensor};
use half::bf16;
use rayon::prelude::*;

pub use add::add;
pub use attention::attention;
pub use divergence::{divergence_loss, Divergence};
pub use glu::{glu, Activation};
pub use loss::{ce_loss, kd_loss, LossValue};
pub use norm::rms_norm;
pub use rope::rope;

/// One fused kernel, for the switch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kernel {
    Norm,
    Rope,
    Glu,
    Attention,
    Loss,
    /// The residual add (bf16 above all: candle's converts through calls it cannot inline).
    Add,
}

impl Kernel {
    pub const ALL: [Kernel; 6] = [
        Kernel::Norm,
        Kernel::Rope,
        Kernel::Glu,
        Kernel::Attention,
        Kernel::Loss,
        Kernel::Add,
    ];

    /// The name used in `DISTILLERY_FUSED`.
    pub fn name(self) -> &'static str {
        match self {
            Kernel::Norm => "norm",
            Kernel::Rope => "rope",
            Kernel::Glu => "glu",
            Kernel::Attention => "attention",
            Kernel::Loss => "loss",
            Kernel::Add => "add",
        }
    }

    fn bit(self) -> u8 {
        1 << (self as u8)
    }
}

/// A set of kernels switched on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Kernels(u8);

impl Kernels {
    pub fn all() -> Kernels {
        Kernels(Kernel::ALL.iter().fold(0, |a, k| a | k.bit()))
    }

    pub fn none() -> Kernels {
        Kernels(0)
    }

    pub fn only(ks: &[Kernel]) -> Kernels {
        Kernels(ks.iter().fold(0, |a, k| a | k.bit()))
    }

    pub fn contains(self, k: Kernel) -> bool {
        self.0 & k.bit() != 0
    }

    /// Parses `DISTILLERY_FUSED`'s value (see the module doc).
    pub fn parse(s: &str) -> std::result::Result<Kernels, String> {
        match s.trim() {
            "" | "1" | "on" | "all" => return Ok(Kernels::all()),
            "0" | "off" | "none" => return Ok(Kernels::none()),
            _ => {}
        }
        let mut set = Kernels::none();
        for name in s.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            let k = Kernel::ALL
                .iter()
                .find(|k| k.name() == name)
                .ok_or_else(|| {
                    format!(
                        "DISTILLERY_FUSED: unknown kernel {name:?} (known: norm, rope, glu, attention, loss, add; or 0 / 1)"
                    )
                })?;
            set.0 |= k.bit();
        }
        Ok(set)
    }
}

const UNSET: u8 = 0x80;
static GLOBAL: AtomicU8 = AtomicU8::new(UNSET);

thread_local! {
    static OVERRIDE: Cell<Option<Kernels>> = const { Cell::new(None) };
}

fn global() -> Kernels {
    let v = GLOBAL.load(Ordering::Relaxed);
    if v != UNSET {
        return Kernels(v);
    }
    let k = match std::env::var("DISTILLERY_FUSED") {
        Err(_) => Kernels::all(),
        Ok(s) => Kernels::parse(&s).unwrap_or_else(|e| {
            tracing::warn!("{e}; using every fused kernel");
            Kernels::all()
        }),
    };
    // A concurrent set_kernels wins over the environment.
    let _ = GLOBAL.compare_exchange(UNSET, k.0, Ordering::Relaxed, Ordering::Relaxed);
    Kernels(GLOBAL.load(Ordering::Relaxed))
}

/// Every fused kernel on (`true`) or off (`false`) for the whole process.
pub fn set_fused(on: bool) {
    set_kernels(if on { Kernels::all() } else { Kernels::none() });
}

/// Exactly `k` on for the whole process.
pub fn set_kernels(k: Kernels) {
    GLOBAL.store(k.0, Ordering::Relaxed);
}

/// The kernels on for the calling thread.
pub fn kernels() -> Kernels {
    OVERRIDE.with(Cell::get).unwrap_or_else(global)
}

/// Runs `f` with exactly `k` on for the calling thread (other threads keep the process-wide
/// setting), restoring the previous state afterwards, even on panic.
pub fn with_kernels<R>(k: Kernels, f: impl FnOnce() -> R) -> R {
    struct Restore(Option<Kernels>);
    impl Drop for Restore {
        fn drop(&mut self) {
            OVERRIDE.with(|o| o.set(self.0));
        }
    }
    let _restore = Restore(OVERRIDE.with(|o| o.replace(Some(k))));
    f()
}

/// Whether the fused kernel `k` is to be used for tensors on `device`.
pub fn active(k: Kernel, device: &Device) -> bool {
    device.is_cpu() && kernels().contains(k)
}

// ---------------------------------------------------------------------------------------------
// Numbers: the compute type (f32, or f64 for f64 inputs) and the element types read and written.

/// The type computed in.
pub(crate) trait Real:
    Copy
    + Send
    + Sync
    + 'static
    + PartialOrd
    + std::ops::Add<Output = Self>
    + std::ops::Sub<Output = Self>
    + std::ops::Mul<Output = Self>
    + std::ops::Div<Output = Self>
    + std::ops::Neg<Output = Self>
    + std::ops::AddAssign
    + std::ops::MulAssign
{
    const ZERO: Self;
    const ONE: Self;
    const NEG_INFINITY: Self;
    fn from_f64(v: f64) -> Self;
    fn from_f32(v: f32) -> Self;
    fn to_f64(self) -> f64;
    fn to_f32(self) -> f32;
    /// `e^x` (f32: a vectorizable polynomial, within 2 ulp; f64: the library's).
    fn exp(self) -> Self;
    fn ln(self) -> Self;
    fn sqrt(self) -> Self;
    fn tanh(self) -> Self;
    fn max(self, o: Self) -> Self;
}

impl Real for f32 {
    const ZERO: f32 = 0.0;
    const ONE: f32 = 1.0;
    const NEG_INFINITY: f32 = f32::NEG_INFINITY;
    #[inline(always)]
    fn from_f64(v: f64) -> f32 {
        v as f32
    }
    #[inline(always)]
    fn from_f32(v: f32) -> f32 {
        v
    }
    #[inline(always)]
    fn to_f64(self) -> f64 {
        self as f64
    }
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    #[inline(always)]
    fn exp(self) -> f32 {
        simd::exp_f32(self)
    }
    #[inline(always)]
    fn ln(self) -> f32 {
        f32::ln(self)
    }
    #[inline(always)]
    fn sqrt(self) -> f32 {
        f32::sqrt(self)
    }
    #[inline(always)]
    fn tanh(self) -> f32 {
        simd::tanh_f32(self)
    }
    #[inline(always)]
    fn max(self, o: f32) -> f32 {
        if self > o {
            self
        } else {
            o
        }
    }
}

impl Real for f64 {
    const ZERO: f64 = 0.0;
    const ONE: f64 = 1.0;
    const NEG_INFINITY: f64 = f64::NEG_INFINITY;
    #[inline(always)]
    fn from_f64(v: f64) -> f64 {
        v
    }
    #[inline(always)]
    fn from_f32(v: f32) -> f64 {
        v as f64
    }
    #[inline(always)]
    fn to_f64(self) -> f64 {
        self
    }
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self as f32
    }
    #[inline(always)]
    fn exp(self) -> f64 {
        f64::exp(self)
    }
    #[inline(always)]
    fn ln(self) -> f64 {
        f64::ln(self)
    }
    #[inline(always)]
    fn sqrt(self) -> f64 {
        f64::sqrt(self)
    }
    #[inline(always)]
    fn tanh(self) -> f64 {
        f64::tanh(self)
    }
    #[inline(always)]
    fn max(self, o: f64) -> f64 {
        if self > o {
            self
        } else {
            o
        }
    }
}

/// An element type read from and written to tensors.
pub(crate) trait Elem: candle_core::WithDType + Copy + Send + Sync {
    fn to_r<R: Real>(self) -> R;
    fn from_r<R: Real>(r: R) -> Self;
}

impl Elem for f32 {
    #[inline(always)]
    fn to_r<R: Real>(self) -> R {
        R::from_f32(self)
    }
    #[inline(always)]
    fn from_r<R: Real>(r: R) -> f32 {
        r.to_f32()
    }
}

impl Elem for f64 {
    #[inline(always)]
    fn to_r<R: Real>(self) -> R {
        R::from_f64(self)
    }
    #[inline(always)]
    fn from_r<R: Real>(r: R) -> f64 {
        r.to_f64()
    }
}

// bf16 ⇄ f32 by bit operations (as `half` does, but inlined so the loops vectorize): bf16 is
// the top half of an f32; to bf16 rounds to nearest even, NaN stays NaN.
impl Elem for bf16 {
    #[inline(always)]
    fn to_r<R: Real>(self) -> R {
        R::from_f32(f32::from_bits((self.to_bits() as u32) << 16))
    }
    #[inline(always)]
    fn from_r<R: Real>(r: R) -> bf16 {
        let x = r.to_f32();
        let b = x.to_bits();
        let rounded = (b.wrapping_add(0x7FFF + ((b >> 16) & 1)) >> 16) as u16;
        bf16::from_bits(if x.is_nan() { 0x7FC0 } else { rounded })
    }
}

/// Runs `$body` with `$E` the element type of `$dtype` and `$R` its compute type.
macro_rules! by_dtype {
    ($dtype:expr, $what:expr, |$E:ident, $R:ident| $body:expr) => {
        match $dtype {
            candle_core::DType::F32 => {
                type $E = f32;
                type $R = f32;
                $body
            }
            candle_core::DType::BF16 => {
                type $E = half::bf16;
                type $R = f32;
                $body
            }
            candle_core::DType::F64 => {
                type $E = f64;
                type $R = f64;
                $body
            }
            d => Err(candle_core::Error::Msg(format!(
                "{}: dtype {d:?} is not supported (f32, bf16, f64)",
                $what
            ))),
        }
    };
}
pub(crate) use by_dtype;

// ---------------------------------------------------------------------------------------------
// Storage access.

/// The elements of a contiguous input of a custom op.
pub(crate) fn cpu_slice<'a, E: candle_core::WithDType>(
    s: &'a CpuStorage,
    l: &Layout,
    what: &str,
) -> Result<&'a [E]> {
    let (a, b) = l
        .contiguous_offsets()
        .ok_or_else(|| Error::Msg(format!("{what}: the input must be contiguous")))?;
    Ok(&s.as_slice::<E>()?[a..b])
}

/// Calls `f` with the elements of `t` (made contiguous first) on the CPU.
pub(crate) fn read<E: candle_core::WithDType, T>(
    t: &Tensor,
    what: &str,
    f: impl FnOnce(&[E]) -> Result<T>,
) -> Result<T> {
    let t = t.contiguous()?;
    let (st, l) = t.storage_and_layout();
    match &*st {
        Storage::Cpu(c) => f(cpu_slice::<E>(c, l, what)?),
        _ => Err(Error::Msg(format!(
            "{what}: the fused kernels run on the CPU only"
        ))),
    }
}

/// A tensor on the CPU from `v`.
pub(crate) fn tensor<E: candle_core::WithDType>(v: Vec<E>, shape: &[usize]) -> Result<Tensor> {
    Tensor::from_vec(v, shape, &Device::Cpu)
}

/// How many rows one parallel task takes: a few tasks per thread, so uneven rows even out.
pub(crate) fn rows_per_task(rows: usize) -> usize {
    let tasks = rayon::current_num_threads().max(1) * 4;
    rows.div_ceil(tasks).max(1)
}

/// A vector of `rows * row_len` elements written in parallel, never zeroed first: `f(first_row,
/// chunk)` must write every element of `chunk` (whole rows starting at `first_row`).
pub(crate) fn par_rows<E: Copy + Send + Sync>(
    rows: usize,
    row_len: usize,
    f: impl Fn(usize, &mut [MaybeUninit<E>]) + Sync + Send,
) -> Vec<E> {
    let n = rows * row_len;
    let mut v: Vec<E> = Vec::with_capacity(n);
    if n > 0 {
        let per = rows_per_task(rows);
        v.spare_capacity_mut()[..n]
            .par_chunks_mut(per * row_len)
            .enumerate()
            .for_each(|(c, chunk)| f(c * per, chunk));
    }
    // SAFETY: every caller's `f` writes every element of its chunk, and the chunks cover 0..n.
    unsafe { v.set_len(n) };
    v
}

/// The tensor's dims as a slice of 2 or more, with the last (the row) split off.
pub(crate) fn rows_of(dims: &[usize], what: &str) -> Result<(usize, usize)> {
    match dims.split_last() {
        Some((&d, rest)) if d > 0 => Ok((rest.iter().product(), d)),
        _ => Err(Error::Msg(format!(
            "{what}: needs a non-empty last dim, got {dims:?}"
        ))),
    }
}

/// Whether `dtype` is one the kernels take.
pub(crate) fn supported(dtype: DType) -> bool {
    matches!(dtype, DType::F32 | DType::BF16 | DType::F64)
}

/// [`par_rows`] for two outputs of the same size written together: `f(first_row, a, b)` must
/// write every element of both chunks.
pub(crate) fn par_rows2<E: Copy + Send + Sync>(
    rows: usize,
    row_len: usize,
    f: impl Fn(usize, &mut [MaybeUninit<E>], &mut [MaybeUninit<E>]) + Sync + Send,
) -> (Vec<E>, Vec<E>) {
    let n = rows * row_len;
    let mut a: Vec<E> = Vec::with_capacity(n);
    let mut b: Vec<E> = Vec::with_capacity(n);
    if n > 0 {
        let per = rows_per_task(rows);
        a.spare_capacity_mut()[..n]
            .par_chunks_mut(per * row_len)
            .zip(b.spare_capacity_mut()[..n].par_chunks_mut(per * row_len))
            .enumerate()
            .for_each(|(c, (ca, cb))| f(c * per, ca, cb));
    }
    // SAFETY: every caller's `f` writes every element of both chunks, which cover 0..n.
    unsafe {
        a.set_len(n);
        b.set_len(n);
    }
    (a, b)
}

/// The dtype of elements `E`.
pub(crate) fn dtype_of<E: candle_core::WithDType>() -> DType {
    E::DTYPE
}

/// CPU storage owning `v`.
pub(crate) fn storage<E: candle_core::WithDType>(v: Vec<E>) -> CpuStorage {
    E::to_cpu_storage_owned(v)
}

/// The dtype of an op's input.
pub(crate) fn dt(s: &CpuStorage) -> DType {
    candle_core::backend::BackendStorage::dtype(s)
}
