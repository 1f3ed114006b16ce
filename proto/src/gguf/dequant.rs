//! Dequantization of ggml tensor data to f32, for the types llama.cpp's quantization presets
//! produce: F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K..Q6_K, IQ4_NL and IQ4_XS.
//!
//! Block layouts follow ggml's `block_*` structs (little-endian, f16 scales). Each value is
//! computed with the same operations in the same order as gguf-py's `gguf.quants` (e.g.
//! `(d * sc) * q - (dmin * m)` for Q4_K, never fused), so the results are bit-identical to the
//! reference; `tests/tests/gguf_dequant.rs` checks that for every type.

use half::f16;

use super::ggml_type::GgmlType;

/// The types [`dequantize`] implements.
pub const SUPPORTED: &[GgmlType] = &[
    GgmlType::F32,
    GgmlType::F16,
    GgmlType::BF16,
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q5_0,
    GgmlType::Q5_1,
    GgmlType::Q8_0,
    GgmlType::Q2_K,
    GgmlType::Q3_K,
    GgmlType::Q4_K,
    GgmlType::Q5_K,
    GgmlType::Q6_K,
    GgmlType::IQ4_NL,
    GgmlType::IQ4_XS,
];

/// Whether [`dequantize`] implements `t`.
pub fn is_supported(t: GgmlType) -> bool {
    SUPPORTED.contains(&t)
}

/// Why data could not be dequantized.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum DequantError {
    #[error(
        "{0} cannot be dequantized here (supported: F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, \
         Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, IQ4_NL, IQ4_XS); requantize the model to one of these \
         with llama-quantize"
    )]
    Unsupported(GgmlType),
    #[error("{ty} data of {got} bytes does not hold {elements} elements ({want} bytes)")]
    Size {
        ty: GgmlType,
        elements: u64,
        want: u64,
        got: usize,
    },
}

/// The non-linear 4-bit codebook of IQ4_NL and IQ4_XS (ggml's `kvalues_iq4nl`).
const IQ4_VALUES: [i8; 16] = [
    -127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113,
];

fn half_at(b: &[u8], at: usize) -> f32 {
    f16::from_bits(u16::from_le_bytes([b[at], b[at + 1]])).to_f32()
}

/// Element `i` (0..32) of a 32-element block whose 4-bit values are packed as ggml does:
/// byte `i % 16`, low nibble for the first 16 elements, high nibble for the last 16.
fn nibble32(qs: &[u8], i: usize) -> u8 {
    (qs[i % 16] >> (4 * (i / 16))) & 0x0F
}

/// Dequantizes `elements` values of type `ty` from `data`.
pub fn dequantize(ty: GgmlType, data: &[u8], elements: u64) -> Result<Vec<f32>, DequantError> {
    if !is_supported(ty) {
        return Err(DequantError::Unsupported(ty));
    }
    let layout = ty.layout().ok_or(DequantError::Unsupported(ty))?;
    let want = (elements / layout.elements).saturating_mul(layout.bytes);
    if !elements.is_multiple_of(layout.elements) || want != data.len() as u64 {
        return Err(DequantError::Size {
            ty,
            elements,
            want,
            got: data.len(),
        });
    }
    let mut out = Vec::with_capacity(elements as usize);
    let blocks = data.chunks_exact(layout.bytes as usize);
    match ty {
        GgmlType::F32 => out.extend(blocks.map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))),
        GgmlType::F16 => out.extend(blocks.map(|b| half_at(b, 0))),
        GgmlType::BF16 => out.extend(
            blocks.map(|b| f32::from_bits(u32::from(u16::from_le_bytes([b[0], b[1]])) << 16)),
        ),
        GgmlType::Q4_0 => blocks.for_each(|b| q4_0(b, &mut out)),
        GgmlType::Q4_1 => blocks.for_each(|b| q4_1(b, &mut out)),
        GgmlType::Q5_0 => blocks.for_each(|b| q5_0(b, &mut out)),
        GgmlType::Q5_1 => blocks.for_each(|b| q5_1(b, &mut out)),
        GgmlType::Q8_0 => blocks.for_each(|b| q8_0(b, &mut out)),
        GgmlType::Q2_K => blocks.for_each(|b| q2_k(b, &mut out)),
        GgmlType::Q3_K => blocks.for_each(|b| q3_k(b, &mut out)),
        GgmlType::Q4_K => blocks.for_each(|b| q4_k(b, &mut out)),
        GgmlType::Q5_K => blocks.for_each(|b| q5_k(b, &mut out)),
        GgmlType::Q6_K => blocks.for_each(|b| q6_k(b, &mut out)),
        GgmlType::IQ4_NL => blocks.for_each(|b| iq4_nl(b, &mut out)),
        GgmlType::IQ4_XS => blocks.for_each(|b| iq4_xs(b, &mut out)),
        _ => return Err(DequantError::Unsupported(ty)),
    }
    Ok(out)
}

// Legacy 32-element blocks: one f16 scale `d` (and for *_1 an f16 offset `m`), then the
// quants. Q5 keeps each element's fifth bit in a little-endian u32 `qh`, bit i for element i.

/// `{ d: f16, qs: [u8; 16] }`, x = d · (q - 8).
fn q4_0(b: &[u8], out: &mut Vec<f32>) {
    let d = half_at(b, 0);
    let qs = &b[2..18];
    out.extend((0..32).map(|i| d * (i32::from(nibble32(qs, i)) - 8) as f32));
}

/// `{ d: f16, m: f16, qs: [u8; 16] }`, x = d · q + m.
fn q4_1(b: &[u8], out: &mut Vec<f32>) {
    let (d, m) = (half_at(b, 0), half_at(b, 2));
    let qs = &b[4..20];
    out.extend((0..32).map(|i| d * f32::from(nibble32(qs, i)) + m));
}

fn fifth_bits(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// `{ d: f16, qh: u32, qs: [u8; 16] }`, x = d · (q - 16).
fn q5_0(b: &[u8], out: &mut Vec<f32>) {
    let d = half_at(b, 0);
    let qh = fifth_bits(b, 2);
    let qs = &b[6..22];
    out.extend((0..32).map(|i| {
        let q = u32::from(nibble32(qs, i)) | (((qh >> i) & 1) << 4);
        d * (q as i32 - 16) as f32
    }));
}

/// `{ d: f16, m: f16, qh: u32, qs: [u8; 16] }`, x = d · q + m.
fn q5_1(b: &[u8], out: &mut Vec<f32>) {
    let (d, m) = (half_at(b, 0), half_at(b, 2));
    let qh = fifth_bits(b, 4);
    let qs = &b[8..24];
    out.extend((0..32).map(|i| {
        let q = u32::from(nibble32(qs, i)) | (((qh >> i) & 1) << 4);
        d * q as f32 + m
    }));
}

/// `{ d: f16, qs: [i8; 32] }`, x = q · d.
fn q8_0(b: &[u8], out: &mut Vec<f32>) {
    let d = half_at(b, 0);
    out.extend(b[2..34].iter().map(|&q| f32::from(q as i8) * d));
}

// K-quants: 256-element super-blocks of 16 or 32-element sub-blocks, each sub-block with its
// own small integer scale (and min) multiplied by the super-block's f16 `d` (and `dmin`).

/// 2-bit quants of element `e` (0..256) packed as Q2_K and Q3_K do: each 128-element half
/// uses 32 bytes, element `32·s + l` of the half in bits `2s..2s+2` of byte `l`.
fn crumb(qs: &[u8], e: usize) -> u8 {
    let (half, rest) = (e / 128, e % 128);
    (qs[half * 32 + rest % 32] >> (2 * (rest / 32))) & 3
}

/// `{ scales: [u8; 16], qs: [u8; 64], d: f16, dmin: f16 }`; sub-block j of 16 has scale
/// `scales[j] & 15` and min `scales[j] >> 4`: x = (d · sc) · q - (dmin · m).
fn q2_k(b: &[u8], out: &mut Vec<f32>) {
    let scales = &b[0..16];
    let qs = &b[16..80];
    let (d, dmin) = (half_at(b, 80), half_at(b, 82));
    out.extend((0..256).map(|e| {
        let sc = scales[e / 16];
        let dl = d * f32::from(sc & 0x0F);
        let ml = dmin * f32::from(sc >> 4);
        dl * f32::from(crumb(qs, e)) - ml
    }));
}

/// `{ hmask: [u8; 32], qs: [u8; 64], scales: [u8; 12], d: f16 }`; 16 sub-blocks of 16 with
/// 6-bit scales (low nibbles in bytes 0..8, high pairs in bytes 8..12) offset by 32. The third
/// bit of element e is bit `e / 32` of `hmask[e % 32]`, and a *clear* bit subtracts 4.
fn q3_k(b: &[u8], out: &mut Vec<f32>) {
    let hmask = &b[0..32];
    let qs = &b[32..96];
    let sc = &b[96..108];
    let d = half_at(b, 108);
    let scale = |j: usize| -> i32 {
        let low = if j < 8 { sc[j] & 0x0F } else { sc[j - 8] >> 4 };
        let high = (sc[8 + j % 4] >> (2 * (j / 4))) & 3;
        i32::from(low | (high << 4)) - 32
    };
    let dl: [f32; 16] = std::array::from_fn(|j| d * scale(j) as f32);
    out.extend((0..256).map(|e| {
        let high_set = (hmask[e % 32] >> (e / 32)) & 1 == 1;
        let q = i32::from(crumb(qs, e)) - if high_set { 0 } else { 4 };
        dl[e / 16] * q as f32
    }));
}

/// The 6-bit scales and mins of Q4_K / Q5_K's eight 32-element sub-blocks, packed in 12
/// bytes: for j < 4 the low 6 bits of bytes j (scale) and j + 4 (min); for j ≥ 4 the nibbles
/// of byte j + 4 with the top two bits of bytes j - 4 (scale) and j (min) above them.
fn scale_min_k4(sc: &[u8], j: usize) -> (u8, u8) {
    if j < 4 {
        (sc[j] & 0x3F, sc[j + 4] & 0x3F)
    } else {
        (
            (sc[j + 4] & 0x0F) | ((sc[j - 4] >> 2) & 0x30),
            (sc[j + 4] >> 4) | ((sc[j] >> 2) & 0x30),
        )
    }
}

/// 4-bit quants of element `e` (0..256) packed as Q4_K and Q5_K do: each 64-element chunk
/// uses 32 bytes, its first 32 elements in the low nibbles and the next 32 in the high ones.
fn nibble_k(qs: &[u8], e: usize) -> u8 {
    (qs[(e / 64) * 32 + e % 32] >> (4 * ((e % 64) / 32))) & 0x0F
}

/// `{ d: f16, dmin: f16, scales: [u8; 12], qs: [u8; 128] }`, x = (d · sc) · q - (dmin · m).
fn q4_k(b: &[u8], out: &mut Vec<f32>) {
    let (d, dmin) = (half_at(b, 0), half_at(b, 2));
    let sc = &b[4..16];
    let qs = &b[16..144];
    let (dl, ml) = k4_scales(d, dmin, sc);
    out.extend((0..256).map(|e| dl[e / 32] * f32::from(nibble_k(qs, e)) - ml[e / 32]));
}

fn k4_scales(d: f32, dmin: f32, sc: &[u8]) -> ([f32; 8], [f32; 8]) {
    let dl = std::array::from_fn(|j| d * f32::from(scale_min_k4(sc, j).0));
    let ml = std::array::from_fn(|j| dmin * f32::from(scale_min_k4(sc, j).1));
    (dl, ml)
}

/// `{ d: f16, dmin: f16, scales: [u8; 12], qh: [u8; 32], qs: [u8; 128] }`: Q4_K plus a fifth
/// bit, bit `e / 32` of `qh[e % 32]`.
fn q5_k(b: &[u8], out: &mut Vec<f32>) {
    let (d, dmin) = (half_at(b, 0), half_at(b, 2));
    let sc = &b[4..16];
    let qh = &b[16..48];
    let qs = &b[48..176];
    let (dl, ml) = k4_scales(d, dmin, sc);
    out.extend((0..256).map(|e| {
        let q = nibble_k(qs, e) | (((qh[e % 32] >> (e / 32)) & 1) << 4);
        dl[e / 32] * f32::from(q) - ml[e / 32]
    }));
}

/// `{ ql: [u8; 128], qh: [u8; 64], scales: [i8; 16], d: f16 }`; per 128-element half, low
/// nibbles in 64 bytes (elements r < 64 low, r ≥ 64 high nibble of byte r % 64) and the top
/// two bits in 32 bytes (bits `2s..2s+2` of byte `r % 32` for s = r / 32); x = (d · sc) · (q - 32).
fn q6_k(b: &[u8], out: &mut Vec<f32>) {
    let ql = &b[0..128];
    let qh = &b[128..192];
    let scales = &b[192..208];
    let d = half_at(b, 208);
    out.extend((0..256).map(|e| {
        let (half, r) = (e / 128, e % 128);
        let low = (ql[half * 64 + r % 64] >> (4 * (r / 64))) & 0x0F;
        let high = (qh[half * 32 + r % 32] >> (2 * (r / 32))) & 3;
        let q = i32::from(low | (high << 4)) - 32;
        (d * f32::from(scales[e / 16] as i8)) * q as f32
    }));
}

// Non-linear 4-bit: the nibble picks a value of IQ4_VALUES.

/// `{ d: f16, qs: [u8; 16] }`, x = d · v[q].
fn iq4_nl(b: &[u8], out: &mut Vec<f32>) {
    let d = half_at(b, 0);
    let qs = &b[2..18];
    out.extend((0..32).map(|i| d * f32::from(IQ4_VALUES[usize::from(nibble32(qs, i))])));
}

/// `{ d: f16, scales_h: u16, scales_l: [u8; 4], qs: [u8; 128] }`: eight 32-element sub-blocks,
/// each a 6-bit scale (low nibble from `scales_l`, two high bits from `scales_h`) offset by 32
/// and 16 bytes packed like IQ4_NL; x = (d · (ls - 32)) · v[q].
fn iq4_xs(b: &[u8], out: &mut Vec<f32>) {
    let d = half_at(b, 0);
    let scales_h = u16::from_le_bytes([b[2], b[3]]);
    let scales_l = &b[4..8];
    let qs = &b[8..136];
    for j in 0..8 {
        let low = (scales_l[j / 2] >> (4 * (j % 2))) & 0x0F;
        let high = ((scales_h >> (2 * j)) & 3) as u8;
        let dl = d * (i32::from(low | (high << 4)) - 32) as f32;
        let sub = &qs[j * 16..j * 16 + 16];
        out.extend((0..32).map(|i| dl * f32::from(IQ4_VALUES[usize::from(nibble32(sub, i))])));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f16_bytes(v: f32) -> [u8; 2] {
        f16::from_f32(v).to_bits().to_le_bytes()
    }

    #[test]
    fn q4_0_follows_the_block_layout() {
        // d = 0.5; element i has nibble i % 16 (low nibbles for 0..16, high for 16..32).
        let mut b = f16_bytes(0.5).to_vec();
        b.extend((0..16u8).map(|i| i | (((15 - i) & 0x0F) << 4)));
        let x = dequantize(GgmlType::Q4_0, &b, 32).unwrap();
        for i in 0..16 {
            assert_eq!(x[i], 0.5 * (i as f32 - 8.0));
            assert_eq!(x[16 + i], 0.5 * ((15 - i) as f32 - 8.0));
        }
    }

    #[test]
    fn q8_0_and_bf16_and_f16_are_exact() {
        let mut b = f16_bytes(2.0).to_vec();
        b.extend((0..32).map(|i| (i as i8 - 16) as u8));
        let x = dequantize(GgmlType::Q8_0, &b, 32).unwrap();
        assert_eq!(x[0], -32.0);
        assert_eq!(x[31], 30.0);
        let bf: Vec<u8> = [1.5f32, -3.0]
            .iter()
            .flat_map(|v| ((v.to_bits() >> 16) as u16).to_le_bytes())
            .collect();
        assert_eq!(dequantize(GgmlType::BF16, &bf, 2).unwrap(), vec![1.5, -3.0]);
        let h: Vec<u8> = [0.25f32, 65504.0]
            .iter()
            .flat_map(|&v| f16_bytes(v))
            .collect();
        assert_eq!(
            dequantize(GgmlType::F16, &h, 2).unwrap(),
            vec![0.25, 65504.0]
        );
    }

    #[test]
    fn iq4_xs_scales_pick_the_right_sub_block() {
        // Every quant is 8 (value 1); sub-block j has 6-bit scale 32 + j, so x = d · j.
        let mut b = f16_bytes(1.0).to_vec();
        let ls: Vec<u8> = (0..8).map(|j| 32 + j).collect();
        let high: u16 = ls
            .iter()
            .enumerate()
            .map(|(j, &l)| u16::from(l >> 4) << (2 * j))
            .sum();
        b.extend(high.to_le_bytes());
        b.extend((0..4).map(|k| (ls[2 * k] & 0x0F) | ((ls[2 * k + 1] & 0x0F) << 4)));
        b.extend(std::iter::repeat_n(0x88u8, 128));
        let x = dequantize(GgmlType::IQ4_XS, &b, 256).unwrap();
        for (e, v) in x.iter().enumerate() {
            assert_eq!(*v, (e / 32) as f32, "element {e}");
        }
    }

    #[test]
    fn other_types_and_wrong_sizes_are_errors_not_panics() {
        let e = dequantize(GgmlType::from_name("IQ2_XXS").unwrap(), &[0; 66], 256).unwrap_err();
        assert!(
            e.to_string().starts_with("IQ2_XXS cannot be dequantized"),
            "{e}"
        );
        assert!(matches!(
            dequantize(GgmlType::Q4_K, &[0; 143], 256),
            Err(DequantError::Size { .. })
        ));
        assert!(matches!(
            dequantize(GgmlType::Q4_0, &[0; 18], 31),
            Err(DequantError::Size { .. })
        ));
        for t in SUPPORTED {
            assert!(dequantize(*t, &[], 0).unwrap().is_empty());
        }
    }
}
