//! The micro-kernels, one per instruction set, each with its packed layout and its f32 → bf16
//! rounding. All accumulate in f32; the bf16 ones multiply pairs exactly (a bf16 × bf16 product
//! fits an f32 mantissa), so every path computes the same sum up to the order of additions.

use half::bf16;

use super::driver::{pack_f32, Kernel, MatRef};

/// Portable fallback: widened f32, 4 × 4 tiles.
pub(crate) struct Scalar;

impl Kernel for Scalar {
    const MR: usize = 4;
    const NR: usize = 4;
    type P = f32;

    fn steps(k: usize) -> usize {
        k
    }

    fn pack(src: &MatRef, row0: usize, r: usize, dst: &mut [f32]) {
        pack_f32(src, row0, r, dst)
    }

    unsafe fn tile(steps: usize, a: *const f32, b: *const f32, out: &mut [f32]) {
        // SAFETY: the caller guarantees `steps * 4` elements behind each pointer.
        let (a, b) = unsafe {
            (
                std::slice::from_raw_parts(a, steps * 4),
                std::slice::from_raw_parts(b, steps * 4),
            )
        };
        let mut acc = [[0f32; 4]; 4];
        for (a, b) in a.chunks_exact(4).zip(b.chunks_exact(4)) {
            for i in 0..4 {
                for j in 0..4 {
                    acc[i][j] = a[i].mul_add(b[j], acc[i][j]);
                }
            }
        }
        for i in 0..4 {
            out[i * 4..i * 4 + 4].copy_from_slice(&acc[i]);
        }
    }

    unsafe fn store_bf16(src: &[f32], dst: *mut bf16) {
        for (i, v) in src.iter().enumerate() {
            // SAFETY: the caller guarantees `src.len()` writable elements.
            unsafe { dst.add(i).write(bf16::from_f32(*v)) };
        }
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) use x86::{store_bf16_cvtne, Avx2Fma, Avx512Bf16, Avx512F};

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;
    use std::mem::transmute;

    use half::bf16;

    use super::super::driver::{pack_f32, pack_pairs, Kernel, MatRef};

    /// AVX-512-BF16: `vdpbf16ps` over bf16 pairs, 8 × 48 tiles (24 zmm accumulators).
    pub(crate) struct Avx512Bf16;

    /// AVX-512F: widened f32 FMA, 8 × 48 tiles.
    pub(crate) struct Avx512F;

    /// AVX2 + FMA: widened f32 FMA, 6 × 16 tiles (12 ymm accumulators).
    pub(crate) struct Avx2Fma;

    impl Kernel for Avx512Bf16 {
        const MR: usize = 8;
        const NR: usize = 48;
        type P = u32;

        fn steps(k: usize) -> usize {
            k.div_ceil(2)
        }

        fn pack(src: &MatRef, row0: usize, r: usize, dst: &mut [u32]) {
            pack_pairs(src, row0, r, dst)
        }

        unsafe fn tile(steps: usize, a: *const u32, b: *const u32, out: &mut [f32]) {
            debug_assert!(out.len() >= 8 * 48);
            // SAFETY: forwarded contract (sizes and CPU features).
            unsafe { tile_bf16_8x48(steps, a, b, out.as_mut_ptr()) }
        }

        unsafe fn store_bf16(src: &[f32], dst: *mut bf16) {
            // SAFETY: forwarded contract.
            unsafe { store_bf16_cvtne(src, dst) }
        }
    }

    impl Kernel for Avx512F {
        const MR: usize = 8;
        const NR: usize = 48;
        type P = f32;

        fn steps(k: usize) -> usize {
            k
        }

        fn pack(src: &MatRef, row0: usize, r: usize, dst: &mut [f32]) {
            pack_f32(src, row0, r, dst)
        }

        unsafe fn tile(steps: usize, a: *const f32, b: *const f32, out: &mut [f32]) {
            debug_assert!(out.len() >= 8 * 48);
            // SAFETY: forwarded contract.
            unsafe { tile_f32_8x48(steps, a, b, out.as_mut_ptr()) }
        }

        unsafe fn store_bf16(src: &[f32], dst: *mut bf16) {
            // SAFETY: forwarded contract.
            unsafe { store_bf16_avx512(src, dst) }
        }
    }

    impl Kernel for Avx2Fma {
        const MR: usize = 6;
        const NR: usize = 16;
        type P = f32;

        fn steps(k: usize) -> usize {
            k
        }

        fn pack(src: &MatRef, row0: usize, r: usize, dst: &mut [f32]) {
            pack_f32(src, row0, r, dst)
        }

        unsafe fn tile(steps: usize, a: *const f32, b: *const f32, out: &mut [f32]) {
            debug_assert!(out.len() >= 6 * 16);
            // SAFETY: forwarded contract.
            unsafe { tile_f32_6x16(steps, a, b, out.as_mut_ptr()) }
        }

        unsafe fn store_bf16(src: &[f32], dst: *mut bf16) {
            // SAFETY: forwarded contract.
            unsafe { store_bf16_avx2(src, dst) }
        }
    }

    #[target_feature(enable = "avx512f,avx512bf16")]
    unsafe fn tile_bf16_8x48(steps: usize, mut a: *const u32, mut b: *const u32, out: *mut f32) {
        let mut c = [[_mm512_setzero_ps(); 3]; 8];
        for _ in 0..steps {
            // SAFETY (loads): `b` holds 48 and `a` 8 elements per step (caller's contract).
            let (b0, b1, b2): (__m512bh, __m512bh, __m512bh) = unsafe {
                (
                    transmute::<__m512i, __m512bh>(_mm512_loadu_si512(b as *const __m512i)),
                    transmute::<__m512i, __m512bh>(_mm512_loadu_si512(b.add(16) as *const __m512i)),
                    transmute::<__m512i, __m512bh>(_mm512_loadu_si512(b.add(32) as *const __m512i)),
                )
            };
            for (i, c) in c.iter_mut().enumerate() {
                // SAFETY: see above; a bf16 pair broadcast to every lane.
                let ai =
                    unsafe { transmute::<__m512i, __m512bh>(_mm512_set1_epi32(*a.add(i) as i32)) };
                c[0] = _mm512_dpbf16_ps(c[0], ai, b0);
                c[1] = _mm512_dpbf16_ps(c[1], ai, b1);
                c[2] = _mm512_dpbf16_ps(c[2], ai, b2);
            }
            // SAFETY: stays within (or one past) the panels.
            unsafe {
                a = a.add(8);
                b = b.add(48);
            }
        }
        for (i, c) in c.iter().enumerate() {
            for (v, c) in c.iter().enumerate() {
                // SAFETY: `out` holds 8 × 48 f32.
                unsafe { _mm512_storeu_ps(out.add(i * 48 + v * 16), *c) };
            }
        }
    }

    #[target_feature(enable = "avx512f")]
    unsafe fn tile_f32_8x48(steps: usize, mut a: *const f32, mut b: *const f32, out: *mut f32) {
        let mut c = [[_mm512_setzero_ps(); 3]; 8];
        for _ in 0..steps {
            // SAFETY (loads): `b` holds 48 and `a` 8 elements per step.
            let (b0, b1, b2) = unsafe {
                (
                    _mm512_loadu_ps(b),
                    _mm512_loadu_ps(b.add(16)),
                    _mm512_loadu_ps(b.add(32)),
                )
            };
            for (i, c) in c.iter_mut().enumerate() {
                let ai = _mm512_set1_ps(unsafe { *a.add(i) });
                c[0] = _mm512_fmadd_ps(ai, b0, c[0]);
                c[1] = _mm512_fmadd_ps(ai, b1, c[1]);
                c[2] = _mm512_fmadd_ps(ai, b2, c[2]);
            }
            // SAFETY: stays within (or one past) the panels.
            unsafe {
                a = a.add(8);
                b = b.add(48);
            }
        }
        for (i, c) in c.iter().enumerate() {
            for (v, c) in c.iter().enumerate() {
                // SAFETY: `out` holds 8 × 48 f32.
                unsafe { _mm512_storeu_ps(out.add(i * 48 + v * 16), *c) };
            }
        }
    }

    #[target_feature(enable = "avx2,fma")]
    unsafe fn tile_f32_6x16(steps: usize, mut a: *const f32, mut b: *const f32, out: *mut f32) {
        let mut c = [[_mm256_setzero_ps(); 2]; 6];
        for _ in 0..steps {
            // SAFETY (loads): `b` holds 16 and `a` 6 elements per step.
            let (b0, b1) = unsafe { (_mm256_loadu_ps(b), _mm256_loadu_ps(b.add(8))) };
            for (i, c) in c.iter_mut().enumerate() {
                let ai = _mm256_set1_ps(unsafe { *a.add(i) });
                c[0] = _mm256_fmadd_ps(ai, b0, c[0]);
                c[1] = _mm256_fmadd_ps(ai, b1, c[1]);
            }
            // SAFETY: stays within (or one past) the panels.
            unsafe {
                a = a.add(6);
                b = b.add(16);
            }
        }
        for (i, c) in c.iter().enumerate() {
            for (v, c) in c.iter().enumerate() {
                // SAFETY: `out` holds 6 × 16 f32.
                unsafe { _mm256_storeu_ps(out.add(i * 16 + v * 8), *c) };
            }
        }
    }

    /// f32 → bf16 with `vcvtneps2bf16` (nearest even; NaN stays NaN; like every AVX-512-BF16
    /// instruction it treats f32 denormal inputs as zero).
    #[target_feature(enable = "avx512f,avx512bf16,avx512bw,avx512vl")]
    pub(crate) unsafe fn store_bf16_cvtne(src: &[f32], dst: *mut bf16) {
        let mut chunks = src.chunks_exact(16);
        let mut d = dst as *mut __m256i;
        for c in &mut chunks {
            // SAFETY: 16 readable f32, 16 writable bf16 (caller's contract).
            unsafe {
                let h = _mm512_cvtneps_pbh(_mm512_loadu_ps(c.as_ptr()));
                _mm256_storeu_si256(d, transmute::<__m256bh, __m256i>(h));
                d = d.add(1);
            }
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mask = (1u16 << rest.len()) - 1;
            // SAFETY: masked lanes are neither read nor written.
            unsafe {
                let v = _mm512_maskz_loadu_ps(mask, rest.as_ptr());
                let h = _mm512_cvtneps_pbh(v);
                _mm256_mask_storeu_epi16(d as *mut i16, mask, transmute::<__m256bh, __m256i>(h));
            }
        }
    }

    /// f32 → bf16 round-to-nearest-even in integer arithmetic; NaN is kept quiet.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    unsafe fn store_bf16_avx512(src: &[f32], dst: *mut bf16) {
        #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
        fn round(v: __m512) -> __m256i {
            let bits = _mm512_castps_si512(v);
            let lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
            let rounded = _mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff)));
            let nan = _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(v, v);
            let quiet = _mm512_or_si512(bits, _mm512_set1_epi32(0x0040_0000));
            let r = _mm512_mask_blend_epi32(nan, rounded, quiet);
            _mm512_cvtepi32_epi16(_mm512_srli_epi32(r, 16))
        }
        let mut chunks = src.chunks_exact(16);
        let mut d = dst as *mut __m256i;
        for c in &mut chunks {
            // SAFETY: 16 readable f32, 16 writable bf16.
            unsafe {
                _mm256_storeu_si256(d, round(_mm512_loadu_ps(c.as_ptr())));
                d = d.add(1);
            }
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mask = (1u16 << rest.len()) - 1;
            // SAFETY: masked lanes are neither read nor written.
            unsafe {
                let v = _mm512_maskz_loadu_ps(mask, rest.as_ptr());
                _mm256_mask_storeu_epi16(d as *mut i16, mask, round(v));
            }
        }
    }

    /// As [`store_bf16_avx512`] with 8 lanes.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn store_bf16_avx2(src: &[f32], dst: *mut bf16) {
        let mut chunks = src.chunks_exact(8);
        let mut d = dst;
        for c in &mut chunks {
            // SAFETY: 8 readable f32, 8 writable bf16.
            unsafe {
                let v = _mm256_loadu_ps(c.as_ptr());
                let bits = _mm256_castps_si256(v);
                let lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
                let rounded =
                    _mm256_add_epi32(bits, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff)));
                let nan = _mm256_castps_si256(_mm256_cmp_ps::<_CMP_UNORD_Q>(v, v));
                let quiet = _mm256_or_si256(bits, _mm256_set1_epi32(0x0040_0000));
                let r = _mm256_srli_epi32(_mm256_blendv_epi8(rounded, quiet, nan), 16);
                // Pack the 8 high halves: within each 128-bit lane, then join the lanes.
                let p = _mm256_packus_epi32(r, r);
                let p = _mm256_permute4x64_epi64::<0b1000>(p);
                _mm_storeu_si128(d as *mut __m128i, _mm256_castsi256_si128(p));
                d = d.add(8);
            }
        }
        for (i, v) in chunks.remainder().iter().enumerate() {
            // SAFETY: within the caller's `src.len()` writable elements.
            unsafe { d.add(i).write(bf16::from_f32(*v)) };
        }
    }
}
