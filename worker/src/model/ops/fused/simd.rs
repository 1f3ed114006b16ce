//! What the kernels' inner loops are made of, written so the compiler vectorizes them, and
//! [`vectorized`], which runs a kernel body compiled for the widest instruction set the CPU has
//! (AVX-512, AVX2 + FMA, or the baseline), chosen at run time.

use super::Real;

/// Defines `$name`, which calls the `#[inline(always)]` function `$imp` compiled for AVX-512
/// (F/BW/VL + FMA) where the CPU has it, else AVX2 + FMA, else the baseline: three copies of
/// `$imp`'s body, one per instruction set, chosen at run time.
macro_rules! multiversion {
    (
        $(#[$m:meta])*
        fn $name:ident [$($gen:tt)*] ($($arg:ident : $ty:ty),* $(,)?) -> $ret:ty
        => $imp:ident [$($garg:ty),*]
    ) => {
        $(#[$m])*
        #[allow(clippy::too_many_arguments)]
        fn $name<$($gen)*>($($arg: $ty),*) -> $ret {
            #[cfg(target_arch = "x86_64")]
            {
                #[allow(clippy::too_many_arguments)]
                #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
                unsafe fn v4<$($gen)*>($($arg: $ty),*) -> $ret {
                    $imp::<$($garg),*>($($arg),*)
                }
                #[allow(clippy::too_many_arguments)]
                #[target_feature(enable = "avx2,fma")]
                unsafe fn v3<$($gen)*>($($arg: $ty),*) -> $ret {
                    $imp::<$($garg),*>($($arg),*)
                }
                if std::arch::is_x86_feature_detected!("avx512f")
                    && std::arch::is_x86_feature_detected!("avx512bw")
                    && std::arch::is_x86_feature_detected!("avx512vl")
                    && std::arch::is_x86_feature_detected!("fma")
                {
                    // SAFETY: the features were detected above.
                    return unsafe { v4::<$($garg),*>($($arg),*) };
                }
                if std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
                {
                    // SAFETY: the features were detected above.
                    return unsafe { v3::<$($garg),*>($($arg),*) };
                }
            }
            $imp::<$($garg),*>($($arg),*)
        }
    };
}
pub(crate) use multiversion;

/// Runs `f` from a copy compiled with AVX-512 (F/BW/VL) where the CPU has it, else AVX2 + FMA,
/// else as is. Whether `f`'s body is inlined into that copy (and so gets the wider
/// instructions) is the compiler's choice; the hot kernels (the loss rows, attention heads) use
/// [`multiversion!`], which guarantees it.
#[inline(always)]
pub(crate) fn vectorized<T>(f: impl FnOnce() -> T) -> T {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512vl")
            && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: the features were detected above.
            return unsafe { avx512(f) };
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: the features were detected above.
            return unsafe { avx2(f) };
        }
    }
    f()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
unsafe fn avx512<T>(f: impl FnOnce() -> T) -> T {
    f()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn avx2<T>(f: impl FnOnce() -> T) -> T {
    f()
}

/// `e^x` in f32 without a branch or a library call (Cephes' `expf`: x = n·ln2 + r, a degree-6
/// polynomial in r, times 2^n built from the exponent bits); within 2 ulp of the exact value over
/// the normal range; 0 below -87.3 (where e^x is subnormal), `exp(88)` above 88.
#[inline(always)]
pub(crate) fn exp_f32(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // 1.5 · 2^23: adding it rounds to an integer held in the low mantissa bits.
    const ROUND: f32 = 12_582_912.0;
    let xc = x.clamp(-87.336_54, 88.0);
    let t = xc * LOG2E + ROUND;
    let n = t - ROUND;
    let r = xc - n * 0.693_359_4 + n * 2.121_944_4e-4;
    let p = (((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2)
        * r
        + 0.166_666_65)
        * r
        + 0.5)
        * r
        * r
        + r
        + 1.0;
    // Wrapping: no overflow check (it would stop the loop from vectorizing); n is in
    // [-126, 127] after the clamp, so nothing wraps.
    let bits = ((t.to_bits() as i32).wrapping_sub(0x4B40_0000 - 127) << 23) as u32;
    let y = p * f32::from_bits(bits);
    if x < -87.336_54 {
        0.0
    } else {
        y
    }
}

/// tanh in f32 from [`exp_f32`]: `1 - 2 / (e^{2x} + 1)` (absolute error ~1e-7).
#[inline(always)]
pub(crate) fn tanh_f32(x: f32) -> f32 {
    1.0 - 2.0 / (exp_f32(2.0 * x) + 1.0)
}

const LANES: usize = 16;

/// Σ a·b with 16 independent partial sums (so it vectorizes without reassociation).
#[inline(always)]
pub(crate) fn dot<R: Real>(a: &[R], b: &[R]) -> R {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [R::ZERO; LANES];
    let ca = a.chunks_exact(LANES);
    let cb = b.chunks_exact(LANES);
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..LANES {
            acc[i] += x[i] * y[i];
        }
    }
    let mut s = R::ZERO;
    for (x, y) in ra.iter().zip(rb) {
        s += *x * *y;
    }
    sum_lanes(acc) + s
}

#[inline(always)]
fn sum_lanes<R: Real>(acc: [R; LANES]) -> R {
    let mut w = acc;
    let mut half = LANES / 2;
    while half > 0 {
        for i in 0..half {
            w[i] += w[i + half];
        }
        half /= 2;
    }
    w[0]
}

/// y += a·x.
#[inline(always)]
pub(crate) fn axpy<R: Real>(a: R, x: &[R], y: &mut [R]) {
    for (y, x) in y.iter_mut().zip(x) {
        *y += a * *x;
    }
}

/// y *= a.
#[inline(always)]
pub(crate) fn scale<R: Real>(a: R, y: &mut [R]) {
    for y in y.iter_mut() {
        *y *= a;
    }
}
