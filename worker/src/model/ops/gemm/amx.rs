//! The AMX path: `tdpbf16ps` on tile registers (Intel Sapphire Rapids and later).
//!
//! One micro-tile is 32 × 32 outputs held in four accumulator tiles (`tmm0..3`, 16 rows × 16 f32
//! each); per block of 32 K values it loads two `A` tiles (16 rows × 32 bf16, `tmm4..5`) and two
//! `B` tiles (16 K-pairs × 16 columns, `tmm6..7`) and issues four `tdpbf16ps`, each 16·16·32
//! multiply-adds. Products of bf16 pairs are exact in f32 and accumulate in f32, as on the other
//! paths, so the result is the same sum up to the order of additions (and, like every AVX-512-BF16
//! and AMX-BF16 instruction, f32 denormals are flushed).
//!
//! Packed layouts (K padded with zeros to a multiple of 32, rows past the matrix zero):
//! - `A` (`pack_a`): for each block `b` of 16 K-pairs, 32 rows of 16 pairs each, row-major:
//!   `dst[b·16·32 + i·16 + t]` = pair `16b + t` of row `i` — each `A` tile is 16 rows of 64 bytes.
//! - `B` (`pack`): the pair layout of the other bf16 kernels, `dst[s·32 + j]` = pair `s` of
//!   row `j` — a `B` tile is 16 consecutive steps, 64 bytes each at a stride of 128.
//!
//! Linux hands a process the AMX register state only after `arch_prctl(ARCH_REQ_XCOMP_PERM,
//! XFEATURE_XTILEDATA)`; [`available`] asks once and the path is used only when it was granted.
//! The tile configuration is per thread: the driver calls [`Kernel::begin`] (load it) and
//! [`Kernel::end`] (`tilerelease`) around every job.

use std::arch::asm;
use std::sync::OnceLock;

use half::bf16;

use super::driver::{pack_pairs, Kernel, MatRef};

/// Output rows (of `A`) per micro-tile.
const MR: usize = 32;
/// Output columns (rows of `Bt`) per micro-tile.
const NR: usize = 32;
/// K-pairs per tile block (64 bytes of bf16 per tile row).
const BLOCK: usize = 16;

/// AMX-BF16 tiles, 32 × 32 micro-tiles.
pub(crate) struct Amx;

/// Whether the CPU has AMX-TILE and AMX-BF16 (plus AVX-512-BF16, used for rounding the output)
/// and the kernel granted this process the tile state. Asked once.
pub(crate) fn available() -> bool {
    static OK: OnceLock<bool> = OnceLock::new();
    *OK.get_or_init(|| {
        let avx512bf16 = std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512vl")
            && std::arch::is_x86_feature_detected!("avx512bf16");
        // CPUID leaf 7, sub-leaf 0: EDX bit 22 = AMX-BF16, bit 24 = AMX-TILE.
        // CPUID leaf 7 exists on every x86_64 CPU that reports AVX-512.
        let edx = if avx512bf16 {
            std::arch::x86_64::__cpuid_count(7, 0).edx
        } else {
            0
        };
        let amx = edx & (1 << 22) != 0 && edx & (1 << 24) != 0;
        amx && request_tile_state()
    })
}

/// `arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`: true when granted (Linux ≥ 5.16).
#[cfg(target_os = "linux")]
fn request_tile_state() -> bool {
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_long = 18;
    // SAFETY: a plain system call with integer arguments; it only changes this process's
    // permitted register state.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_arch_prctl,
            ARCH_REQ_XCOMP_PERM,
            XFEATURE_XTILEDATA,
        )
    };
    rc == 0
}

#[cfg(not(target_os = "linux"))]
fn request_tile_state() -> bool {
    false
}

/// The tile configuration (palette 1): tiles 0–7 all 16 rows × 64 bytes.
#[repr(C, align(64))]
struct TileConfig([u8; 64]);

fn config() -> &'static TileConfig {
    static CFG: OnceLock<TileConfig> = OnceLock::new();
    CFG.get_or_init(|| {
        let mut c = [0u8; 64];
        c[0] = 1; // palette
        for t in 0..8 {
            // colsb[t] (u16 at 16 + 2t): bytes per row.
            c[16 + 2 * t] = 64;
            // rows[t] (u8 at 48 + t).
            c[48 + t] = 16;
        }
        TileConfig(c)
    })
}

/// Packs rows `row0 .. row0 + r` of `src` as `A` tiles (module docs); `r` is [`MR`].
fn pack_a_tiles(src: &MatRef, row0: usize, r: usize, dst: &mut [u32]) {
    let steps = steps_of(src.cols());
    assert!(dst.len() >= steps * r, "packed panel too small");
    let dst = &mut dst[..steps * r];
    dst.fill(0);
    let k = src.cols();
    let live = src.rows().saturating_sub(row0).min(r);
    let pair = |i: usize, s: usize| {
        // SAFETY: `i < live` keeps the row in range and `2s (+1) < k` the column.
        let lo = unsafe { src.bits(row0 + i, 2 * s) } as u32;
        let hi = if 2 * s + 1 < k {
            (unsafe { src.bits(row0 + i, 2 * s + 1) } as u32) << 16
        } else {
            0
        };
        lo | hi
    };
    let at = |i: usize, s: usize| (s / BLOCK) * BLOCK * r + i * BLOCK + s % BLOCK;
    if let Some(rows) = src.contiguous_rows(row0, live) {
        // K contiguous: a bf16 pair in memory is already the packed u32 (low half = even
        // element), so every whole block of 16 pairs is one 64-byte copy.
        let whole = k / (2 * BLOCK);
        for (i, row) in rows.enumerate() {
            for b in 0..whole {
                let src = &row[b * 2 * BLOCK..(b + 1) * 2 * BLOCK];
                let d = &mut dst[b * BLOCK * r + i * BLOCK..b * BLOCK * r + (i + 1) * BLOCK];
                for (d, p) in d.iter_mut().zip(src.chunks_exact(2)) {
                    *d = p[0].to_bits() as u32 | (p[1].to_bits() as u32) << 16;
                }
            }
            for s in whole * BLOCK..k.div_ceil(2) {
                dst[at(i, s)] = pair(i, s);
            }
        }
    } else {
        // Rows contiguous (a transposed view in the backward): walk across rows.
        for s in 0..k.div_ceil(2) {
            for i in 0..live {
                dst[at(i, s)] = pair(i, s);
            }
        }
    }
}

/// Reduction steps (K-pairs) padded to whole tile blocks.
fn steps_of(k: usize) -> usize {
    k.div_ceil(2 * BLOCK) * BLOCK
}

impl Kernel for Amx {
    const MR: usize = MR;
    const NR: usize = NR;
    type P = u32;

    fn steps(k: usize) -> usize {
        steps_of(k)
    }

    fn pack(src: &MatRef, row0: usize, r: usize, dst: &mut [u32]) {
        let used = src.cols().div_ceil(2) * r;
        pack_pairs(src, row0, r, dst);
        dst[used..steps_of(src.cols()) * r].fill(0);
    }

    fn pack_a(src: &MatRef, row0: usize, r: usize, dst: &mut [u32]) {
        pack_a_tiles(src, row0, r, dst)
    }

    unsafe fn begin() {
        // SAFETY: the caller checked `available()` (the process holds the tile state); the
        // configuration is a valid palette-1 layout.
        unsafe { asm!("ldtilecfg [{}]", in(reg) config() as *const TileConfig, options(nostack)) }
    }

    unsafe fn end() {
        // SAFETY: as `begin`.
        unsafe { asm!("tilerelease", options(nostack, nomem)) }
    }

    unsafe fn tile(steps: usize, a: *const u32, b: *const u32, out: &mut [f32]) {
        debug_assert!(out.len() >= MR * NR && steps.is_multiple_of(BLOCK));
        let blocks = steps / BLOCK;
        // SAFETY: `begin` configured the tiles on this thread; `a` holds `steps · MR` and `b`
        // `steps · NR` packed pairs (caller's contract), read in whole blocks; `out` holds
        // MR × NR f32 written as four 16 × 16 tiles at a row stride of NR · 4 bytes. Byte
        // offsets: A rows 16..32 sit 16·16·4 = 1024 bytes after rows 0..16; B columns 16..32
        // 16·4 = 64 bytes after columns 0..16; one block is 16·32·4 = 2048 bytes of A and of B.
        unsafe {
            asm!(
                "tilezero tmm0",
                "tilezero tmm1",
                "tilezero tmm2",
                "tilezero tmm3",
                "test {blocks}, {blocks}",
                "jz 3f",
                "2:",
                "tileloadd tmm4, [{a} + {sa}*1]",
                "tileloadd tmm6, [{b} + {bs}*1]",
                "tileloadd tmm5, [{a} + {sa}*1 + {a_half}]",
                "tileloadd tmm7, [{b} + {bs}*1 + {b_half}]",
                "tdpbf16ps tmm0, tmm4, tmm6",
                "tdpbf16ps tmm1, tmm4, tmm7",
                "tdpbf16ps tmm2, tmm5, tmm6",
                "tdpbf16ps tmm3, tmm5, tmm7",
                "add {a}, {a_step}",
                "add {b}, {b_step}",
                "dec {blocks}",
                "jnz 2b",
                "3:",
                "tilestored [{o} + {bs}*1], tmm0",
                "tilestored [{o} + {bs}*1 + {b_half}], tmm1",
                "tilestored [{o} + {bs}*1 + {o_half}], tmm2",
                "tilestored [{o} + {bs}*1 + {o_half} + {b_half}], tmm3",
                blocks = inout(reg) blocks => _,
                a = inout(reg) a => _,
                b = inout(reg) b => _,
                sa = in(reg) BLOCK * 4,
                bs = in(reg) NR * 4,
                o = in(reg) out.as_mut_ptr(),
                a_half = const BLOCK * BLOCK * 4,
                b_half = const BLOCK * 4,
                o_half = const BLOCK * NR * 4,
                a_step = const BLOCK * MR * 4,
                b_step = const BLOCK * NR * 4,
                options(nostack),
            );
        }
    }

    unsafe fn store_bf16(src: &[f32], dst: *mut bf16) {
        // SAFETY: `available()` requires AVX-512-BF16; forwarded contract.
        unsafe { super::kernels::store_bf16_cvtne(src, dst) }
    }
}

/// Runs `iters` rounds of four independent `tdpbf16ps` on zeroed tiles (no memory traffic) and
/// returns the multiply-adds' FLOPs: the machine's AMX peak for the benches. The caller checked
/// [`available`].
pub(crate) fn peak_loop(iters: u64) -> f64 {
    // SAFETY: `available()` was checked by the caller; only tile registers are touched.
    unsafe {
        Amx::begin();
        asm!(
            "tilezero tmm0",
            "tilezero tmm1",
            "tilezero tmm2",
            "tilezero tmm3",
            "tilezero tmm4",
            "tilezero tmm5",
            "tilezero tmm6",
            "tilezero tmm7",
            "test {n}, {n}",
            "jz 3f",
            "2:",
            "tdpbf16ps tmm0, tmm4, tmm6",
            "tdpbf16ps tmm1, tmm4, tmm7",
            "tdpbf16ps tmm2, tmm5, tmm6",
            "tdpbf16ps tmm3, tmm5, tmm7",
            "dec {n}",
            "jnz 2b",
            "3:",
            n = inout(reg) iters => _,
            options(nostack, nomem),
        );
        Amx::end();
    }
    // Each tdpbf16ps: 16 × 16 outputs × 32 products × (mul + add).
    iters as f64 * 4.0 * (16 * 16 * 32 * 2) as f64
}
