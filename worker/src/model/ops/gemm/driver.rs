//! The blocked, packed driver shared by every kernel: `C[M, N] = A[M, K] · Bᵀ` where both `A` and
//! `Bt` (`[N, K]`) are strided bf16 views, `C` is row-major and written exactly once (never
//! zeroed first).
//!
//! Blocking (BLIS-style, without a K split so that every output is one f32 sum rounded once):
//! `A` is packed once into `MR`-row panels (shared by all threads); a job takes a contiguous
//! range of `NR`-row panels of `Bt`, packs each into a thread-local buffer and runs the
//! micro-kernel over every `A` panel of its M range. Per reduction step a micro-kernel reads `MR` values of `A` (L3/L2) and `NR` of `B`
//! (L1/L2) for `MR·NR` multiply-adds, so neither stream is near a bandwidth limit.

use std::mem::MaybeUninit;

use half::bf16;
use rayon::prelude::*;

/// A read-only bf16 matrix view: element `(i, r)` is `data[i * rs + r * cs]`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct MatRef<'a> {
    data: &'a [bf16],
    rows: usize,
    cols: usize,
    rs: usize,
    cs: usize,
}

impl<'a> MatRef<'a> {
    /// A view of `rows × cols` over `data` with row stride `rs` and column stride `cs`, or `None`
    /// when an element would fall outside `data`.
    pub(crate) fn new(
        data: &'a [bf16],
        rows: usize,
        cols: usize,
        rs: usize,
        cs: usize,
    ) -> Option<MatRef<'a>> {
        if rows > 0 && cols > 0 {
            let last = (rows - 1)
                .checked_mul(rs)?
                .checked_add((cols - 1).checked_mul(cs)?)?;
            if last >= data.len() {
                return None;
            }
        }
        Some(MatRef {
            data,
            rows,
            cols,
            rs,
            cs,
        })
    }

    pub(crate) fn rows(&self) -> usize {
        self.rows
    }

    pub(crate) fn cols(&self) -> usize {
        self.cols
    }

    /// Rows `row0 .. row0 + n` as slices of `cols` elements, when each row is contiguous
    /// (`None` for a transposed view, or rows outside the matrix).
    pub(crate) fn contiguous_rows(
        &self,
        row0: usize,
        n: usize,
    ) -> Option<impl Iterator<Item = &'a [bf16]> + '_> {
        if self.cs != 1 || row0 + n > self.rows {
            return None;
        }
        Some((row0..row0 + n).map(move |i| &self.data[i * self.rs..i * self.rs + self.cols]))
    }

    /// Element `(i, r)` as raw bits; the caller keeps `i < rows`, `r < cols`.
    #[inline(always)]
    pub(crate) unsafe fn bits(&self, i: usize, r: usize) -> u16 {
        debug_assert!(i < self.rows && r < self.cols);
        // SAFETY: `new` checked that every in-range element lies inside `data`.
        unsafe { self.data.get_unchecked(i * self.rs + r * self.cs).to_bits() }
    }
}

/// A micro-kernel and the packed layout it reads.
pub(crate) trait Kernel: Sync {
    /// Rows of `A` per micro-tile.
    const MR: usize;
    /// Rows of `Bt` (output columns) per micro-tile.
    const NR: usize;
    /// One packed element: a pair of bf16 along K (`u32`) or one widened `f32`.
    type P: Copy + Default + Send + Sync;

    /// Reduction steps for a reduction length `k` (pairs for bf16 pairs, `k` for f32).
    fn steps(k: usize) -> usize;

    /// Packs rows `row0 .. row0 + r` of `src` into `dst[s * r + i]` for every step `s`; rows past
    /// the end of `src` and the odd tail of K are zero.
    fn pack(src: &MatRef, row0: usize, r: usize, dst: &mut [Self::P]);

    /// Packs rows of `A` (the left operand); the same layout as [`Kernel::pack`] unless the
    /// kernel reads its two operands differently (AMX tiles).
    fn pack_a(src: &MatRef, row0: usize, r: usize, dst: &mut [Self::P]) {
        Self::pack(src, row0, r, dst)
    }

    /// Prepares this thread for [`Kernel::tile`] (AMX: loads the tile configuration); called
    /// at the start of every job, paired with [`Kernel::end`].
    ///
    /// # Safety
    /// The CPU has the kernel's features.
    unsafe fn begin() {}

    /// Ends what [`Kernel::begin`] started on this thread.
    ///
    /// # Safety
    /// As [`Kernel::begin`], after it on the same thread.
    unsafe fn end() {}

    /// `out[i * NR + j] = Σ_s a[s * MR + i] · b[s * NR + j]`, accumulated in f32.
    ///
    /// # Safety
    /// `a` holds `steps * MR` and `b` `steps * NR` packed elements; the CPU has the kernel's
    /// features (checked by [`super::Isa::available`]).
    unsafe fn tile(steps: usize, a: *const Self::P, b: *const Self::P, out: &mut [f32]);

    /// Rounds `src` to bf16 (nearest even) into `dst[..src.len()]`.
    ///
    /// # Safety
    /// `dst` is valid for `src.len()` writes; the CPU has the kernel's features.
    unsafe fn store_bf16(src: &[f32], dst: *mut bf16);
}

/// An output element type.
pub(crate) trait Out: Copy + Send + Sync {
    /// Writes `src` to `dst[..src.len()]`.
    ///
    /// # Safety
    /// As [`Kernel::store_bf16`].
    unsafe fn store<K: Kernel>(src: &[f32], dst: *mut Self);
}

impl Out for f32 {
    #[inline(always)]
    unsafe fn store<K: Kernel>(src: &[f32], dst: *mut f32) {
        // SAFETY: the caller guarantees `dst` is valid for `src.len()` writes.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), dst, src.len()) }
    }
}

impl Out for bf16 {
    #[inline(always)]
    unsafe fn store<K: Kernel>(src: &[f32], dst: *mut bf16) {
        // SAFETY: forwarded contract.
        unsafe { K::store_bf16(src, dst) }
    }
}

/// Packs pairs along K: step `s` of row `i` is `bits(i, 2s) | bits(i, 2s + 1) << 16` (the low
/// half is the even element, as `vdpbf16ps` pairs them).
pub(crate) fn pack_pairs(src: &MatRef, row0: usize, r: usize, dst: &mut [u32]) {
    let k = src.cols;
    let steps = k.div_ceil(2);
    let full = k / 2;
    assert!(dst.len() >= steps * r, "packed panel too small");
    let live = src.rows.saturating_sub(row0).min(r);
    // SAFETY (all `bits` calls below): `i < live` keeps the row in range, `2s + 1 < k` or
    // `2s < k` keeps the column in range; `dst` indices are `< steps * r` (asserted above).
    if src.cs == 1 {
        // K contiguous (x, W in Hugging Face layout): one row at a time, reading pairs as u32.
        for i in 0..live {
            let base = (row0 + i) * src.rs;
            let row = &src.data[base..base + k];
            if k % 2 == 1 {
                unsafe { *dst.get_unchecked_mut(full * r + i) = row[k - 1].to_bits() as u32 };
            }
        }
        // Blocks of 16 steps: 64 bytes read from each row, a 16 × r block written, both cached.
        for s0 in (0..full).step_by(16) {
            let s1 = (s0 + 16).min(full);
            for i in 0..live {
                let base = (row0 + i) * src.rs;
                let row = &src.data[base + 2 * s0..base + 2 * s1];
                for (t, p) in row.chunks_exact(2).enumerate() {
                    let (lo, hi) = (p[0].to_bits() as u32, p[1].to_bits() as u32);
                    unsafe { *dst.get_unchecked_mut((s0 + t) * r + i) = lo | (hi << 16) };
                }
            }
        }
    } else {
        // Rows contiguous (transposed views in the backward): interleave two K-rows per step.
        for s in 0..full {
            let d = &mut dst[s * r..s * r + live];
            for (i, d) in d.iter_mut().enumerate() {
                let (lo, hi) = unsafe {
                    (
                        src.bits(row0 + i, 2 * s) as u32,
                        src.bits(row0 + i, 2 * s + 1) as u32,
                    )
                };
                *d = lo | (hi << 16);
            }
        }
        if k % 2 == 1 {
            for i in 0..live {
                dst[full * r + i] = unsafe { src.bits(row0 + i, k - 1) } as u32;
            }
        }
    }
    if live < r {
        for s in 0..steps {
            dst[s * r + live..(s + 1) * r].fill(0);
        }
    }
}

/// Packs widened f32: step `s` of row `i` is `src(i, s)` exactly (bf16 → f32 is a shift).
pub(crate) fn pack_f32(src: &MatRef, row0: usize, r: usize, dst: &mut [f32]) {
    let k = src.cols;
    assert!(dst.len() >= k * r, "packed panel too small");
    let live = src.rows.saturating_sub(row0).min(r);
    let widen = |b: u16| f32::from_bits((b as u32) << 16);
    // SAFETY (all `bits` / unchecked calls): `i < live`, `s < k`, indices `< k * r`.
    if src.cs == 1 {
        for s0 in (0..k).step_by(16) {
            let s1 = (s0 + 16).min(k);
            for i in 0..live {
                let base = (row0 + i) * src.rs;
                for (t, v) in src.data[base + s0..base + s1].iter().enumerate() {
                    unsafe { *dst.get_unchecked_mut((s0 + t) * r + i) = widen(v.to_bits()) };
                }
            }
        }
    } else {
        for s in 0..k {
            let d = &mut dst[s * r..s * r + live];
            for (i, d) in d.iter_mut().enumerate() {
                *d = widen(unsafe { src.bits(row0 + i, s) });
            }
        }
    }
    if live < r {
        for s in 0..k {
            dst[s * r + live..(s + 1) * r].fill(0.0);
        }
    }
}

/// A raw output pointer shared by the jobs; each job writes a disjoint set of elements.
#[derive(Clone, Copy)]
struct SharedOut<O>(*mut O);
// SAFETY: jobs write disjoint tiles (distinct (m panel, n panel) pairs) and the driver joins
// every job before the buffer is read.
unsafe impl<O: Send> Send for SharedOut<O> {}
unsafe impl<O: Send> Sync for SharedOut<O> {}

impl<O> SharedOut<O> {
    /// The pointer (a method, so closures capture the `Sync` wrapper, not the raw field).
    fn ptr(&self) -> *mut O {
        self.0
    }
}

/// Below this many multiply-adds one thread does it all (spawning costs more than it saves).
const SERIAL_MACS: usize = 1 << 21;

/// `c[M, N] = a[M, K] · btᵀ` with `bt` `[N, K]`, on `threads` rayon workers. Every element of `c`
/// is written.
///
/// # Safety
/// The CPU has `K`'s features.
pub(crate) unsafe fn gemm<K: Kernel, O: Out>(
    a: &MatRef,
    bt: &MatRef,
    c: &mut [MaybeUninit<O>],
    threads: usize,
) {
    let (m, n, k) = (a.rows, bt.rows, a.cols);
    assert_eq!(bt.cols, k, "gemm: A and Bt disagree on K");
    assert_eq!(c.len(), m * n, "gemm: output is not M × N");
    if m == 0 || n == 0 {
        return;
    }
    let steps = K::steps(k);
    let (mr, nr) = (K::MR, K::NR);
    let m_panels = m.div_ceil(mr);
    let n_panels = n.div_ceil(nr);
    let serial = threads <= 1 || m * n * k < SERIAL_MACS;

    // A, packed once, shared read-only.
    let panel_a = steps * mr;
    let mut packed_a = vec![K::P::default(); m_panels * panel_a];
    let pack_a = |(p, dst): (usize, &mut [K::P])| K::pack_a(a, p * mr, mr, dst);
    if serial {
        packed_a.chunks_mut(panel_a).enumerate().for_each(pack_a);
    } else {
        packed_a
            .par_chunks_mut(panel_a)
            .enumerate()
            .for_each(pack_a);
    }

    // Jobs: a contiguous range of B panels × a range of A panels. Contiguous, so that two
    // threads rarely write the same cache line of `c` (a panel is NR columns, not a whole line);
    // M is split only when N alone gives too few jobs.
    let want = if serial { 1 } else { 8 * threads };
    let per_n = n_panels.div_ceil(want.min(n_panels));
    let n_chunks = n_panels.div_ceil(per_n);
    let per_m = m_panels.div_ceil(want.div_ceil(n_chunks).clamp(1, m_panels));
    let m_splits = m_panels.div_ceil(per_m);
    let jobs = n_chunks * m_splits;
    let out = SharedOut(c.as_mut_ptr() as *mut O);
    let packed_a = &packed_a;
    let job = move |buf: &mut Vec<K::P>, j: usize| {
        let (nc, ms) = (j / m_splits, j % m_splits);
        let (m_lo, m_hi) = (ms * per_m, ((ms + 1) * per_m).min(m_panels));
        let mut tile = vec![0f32; mr * nr];
        buf.resize(steps * nr, K::P::default());
        // SAFETY: the CPU check is the caller's; `end` below runs on this thread.
        unsafe { K::begin() };
        for np in nc * per_n..((nc + 1) * per_n).min(n_panels) {
            let n0 = np * nr;
            let cols = (n - n0).min(nr);
            K::pack(bt, n0, nr, buf);
            for mp in m_lo..m_hi {
                let m0 = mp * mr;
                let rows = (m - m0).min(mr);
                // SAFETY: panels hold `steps * MR` / `steps * NR` elements; the CPU check is
                // the caller's.
                unsafe {
                    K::tile(
                        steps,
                        packed_a.as_ptr().add(mp * panel_a),
                        buf.as_ptr(),
                        &mut tile,
                    );
                }
                for i in 0..rows {
                    // SAFETY: row `m0 + i < m`, columns `n0 .. n0 + cols <= n`: inside `c`, and
                    // this (m panel, n panel) tile belongs to this job alone.
                    unsafe {
                        O::store::<K>(
                            &tile[i * nr..i * nr + cols],
                            out.ptr().add((m0 + i) * n + n0),
                        );
                    }
                }
            }
        }
        // SAFETY: paired with `begin` above, on the same thread.
        unsafe { K::end() };
    };
    if serial {
        let mut buf = Vec::new();
        (0..jobs).for_each(|j| job(&mut buf, j));
    } else {
        (0..jobs)
            .into_par_iter()
            .for_each_init(Vec::new, |buf, j| job(buf, j));
    }
}
