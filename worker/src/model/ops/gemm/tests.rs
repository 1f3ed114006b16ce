//! Every path against an f64 reference within the bf16 error bound.
//!
//! Inputs are bf16 values, so the reference sees exactly what the kernels see. The bound for one
//! output `y = Σ_k a_k b_k` over a reduction of length `K`: the products are exact in f32 (8-bit
//! × 8-bit significands), the f32 sum in any order is within `γ_K · Σ|a_k b_k|`, `γ_K = K·u/(1 −
//! K·u)`, `u = 2⁻²⁴`; rounding to bf16 adds at most `2⁻⁸ · |y_f32|`.

use candle_core::{DType, Device, Tensor, Var};
use rand::{Rng, SeedableRng};

use super::*;

/// Random bf16 values in [-1, 1) as a tensor and as the f64s they are exactly.
fn rand_bf16(rng: &mut rand::rngs::StdRng, dims: &[usize]) -> (Tensor, Vec<f64>) {
    let n: usize = dims.iter().product();
    let v: Vec<bf16> = (0..n)
        .map(|_| bf16::from_f32(rng.gen_range(-1.0f32..1.0)))
        .collect();
    let f: Vec<f64> = v.iter().map(|x| x.to_f64()).collect();
    (Tensor::from_vec(v, dims, &Device::Cpu).expect("tensor"), f)
}

/// `out[i, j] = Σ_r a(i, r) b(j, r)` and `Σ_r |a(i, r) b(j, r)|`, in f64.
fn reference(
    rows: usize,
    cols: usize,
    red: usize,
    a: impl Fn(usize, usize) -> f64,
    b: impl Fn(usize, usize) -> f64,
) -> (Vec<f64>, Vec<f64>) {
    let mut y = vec![0.0; rows * cols];
    let mut mag = vec![0.0; rows * cols];
    for i in 0..rows {
        for j in 0..cols {
            for r in 0..red {
                let p = a(i, r) * b(j, r);
                y[i * cols + j] += p;
                mag[i * cols + j] += p.abs();
            }
        }
    }
    (y, mag)
}

/// Asserts `got` is within the bound of `want` for a reduction of length `red`.
fn check(what: &str, got: &Tensor, want: &[f64], mag: &[f64], red: usize, bf16_out: bool) {
    let got: Vec<f64> = got
        .flatten_all()
        .and_then(|t| t.to_dtype(DType::F64))
        .and_then(|t| t.to_vec1())
        .expect("read result");
    assert_eq!(got.len(), want.len(), "{what}: element count");
    let u = 2f64.powi(-24);
    let gamma = red as f64 * u / (1.0 - red as f64 * u);
    for (i, ((g, w), m)) in got.iter().zip(want).zip(mag).enumerate() {
        let acc = gamma * m;
        let bound = if bf16_out {
            acc + 2f64.powi(-8) * (w.abs() + acc)
        } else {
            acc
        } + 1e-30;
        assert!(
            (g - w).abs() <= bound,
            "{what}: element {i}: got {g}, want {w}, |err| {} > bound {bound}",
            (g - w).abs()
        );
    }
}

fn paths() -> Vec<Isa> {
    let mut v = Vec::new();
    for isa in Isa::ALL {
        if isa.available() {
            v.push(isa);
        } else {
            println!("skipping the {isa:?} path: this CPU lacks its features");
        }
    }
    v
}

/// (leading dims of x, N, K): odd sizes that are multiples of no block size, one batched, and
/// some large enough for the parallel driver.
const SHAPES: &[(&[usize], usize, usize)] = &[
    (&[1], 1, 1),
    (&[7], 53, 37),
    (&[19], 100, 131),
    (&[3, 5], 49, 64),
    (&[2, 37], 131, 257),
    (&[133], 97, 301),
];

#[test]
fn forward_every_path_matches_f64_within_bound() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(17);
    for isa in paths() {
        for &(lead, n, k) in SHAPES {
            let m: usize = lead.iter().product();
            let mut xd = lead.to_vec();
            xd.push(k);
            let (x, xv) = rand_bf16(&mut rng, &xd);
            let (w, wv) = rand_bf16(&mut rng, &[n, k]);
            let (want, mag) = reference(m, n, k, |i, r| xv[i * k + r], |j, r| wv[j * k + r]);
            let mut yd = lead.to_vec();
            yd.push(n);
            for out in [DType::BF16, DType::F32] {
                let y = matmul_wt(&x, &w, out, isa).expect("matmul");
                assert_eq!(y.dims(), &yd[..], "{isa:?} shape");
                assert_eq!(y.dtype(), out);
                let what = format!("{isa:?} {out:?} x{lead:?}x{k} w[{n},{k}]");
                check(&what, &y, &want, &mag, k, out == DType::BF16);
            }
        }
    }
}

#[test]
fn forward_reads_strided_weights() {
    // w as a transposed view ([N, K] with strides (1, N)) goes through the other packing loop.
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    let (m, n, k) = (29, 67, 45);
    let (x, xv) = rand_bf16(&mut rng, &[m, k]);
    let (wt, wtv) = rand_bf16(&mut rng, &[k, n]);
    let w = wt.t().expect("transpose");
    let (want, mag) = reference(m, n, k, |i, r| xv[i * k + r], |j, r| wtv[r * n + j]);
    for isa in paths() {
        let y = matmul_wt(&x, &w, DType::BF16, isa).expect("matmul");
        check(&format!("{isa:?} strided w"), &y, &want, &mag, k, true);
    }
}

#[test]
fn backward_every_path_matches_f64_within_bound() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(23);
    for isa in paths() {
        for &(lead, n, k) in &[(&[2usize, 13][..], 37usize, 29usize), (&[3, 41], 75, 130)] {
            let m: usize = lead.iter().product();
            let mut xd = lead.to_vec();
            xd.push(k);
            let mut yd = lead.to_vec();
            yd.push(n);
            let (x, xv) = rand_bf16(&mut rng, &xd);
            let (w, wv) = rand_bf16(&mut rng, &[n, k]);
            let (g, gv) = rand_bf16(&mut rng, &yd);
            let (xvar, wvar) = (
                Var::from_tensor(&x).expect("var"),
                Var::from_tensor(&w).expect("var"),
            );
            for out in [DType::BF16, DType::F32] {
                // loss = Σ y ⊙ g, so dy = g exactly (g is bf16; the f32 variant rounds it back).
                let y = matmul_wt(xvar.as_tensor(), wvar.as_tensor(), out, isa).expect("fwd");
                let loss = (y * g.to_dtype(out).expect("g"))
                    .and_then(|t| t.sum_all())
                    .expect("loss");
                let grads = loss.backward().expect("backward");
                let dx = grads.get(xvar.as_tensor()).expect("dx");
                let dw = grads.get(wvar.as_tensor()).expect("dw");
                assert_eq!(dx.dims(), &xd[..]);
                assert_eq!(dw.dims(), &[n, k]);
                // dx[i, r] = Σ_j g[i, j] w[j, r]: rows m, cols k, reduction n.
                let (want, mag) = reference(m, k, n, |i, j| gv[i * n + j], |r, j| wv[j * k + r]);
                check(&format!("{isa:?} {out:?} dx"), dx, &want, &mag, n, true);
                // dw[j, r] = Σ_i g[i, j] x[i, r]: reduction over all m tokens of the batch.
                let (want, mag) = reference(n, k, m, |j, i| gv[i * n + j], |r, i| xv[i * k + r]);
                check(&format!("{isa:?} {out:?} dw"), dw, &want, &mag, m, true);
            }
        }
    }
}

#[test]
fn rounding_to_bf16_matches_half_on_every_path() {
    // The store routines (vcvtneps2bf16, the integer rounding) against `half`'s nearest-even:
    // with K = 2 each output is one f32 addition of two exact products, the same f32 on every
    // path, so its bf16 rounding must match bit for bit.
    let mut rng = rand::rngs::StdRng::seed_from_u64(3);
    let (m, n, k) = (3, 71, 2);
    let (x, xv) = rand_bf16(&mut rng, &[m, k]);
    let (w, wv) = rand_bf16(&mut rng, &[n, k]);
    for isa in paths() {
        let y: Vec<bf16> = matmul_wt(&x, &w, DType::BF16, isa)
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1())
            .expect("matmul");
        for i in 0..m {
            for j in 0..n {
                // Two exact f32 products, one f32 addition: the same f32 on every path.
                let a0 = (xv[i * k] * wv[j * k]) as f32;
                let a1 = (xv[i * k + 1] * wv[j * k + 1]) as f32;
                let want = bf16::from_f32(a0 + a1);
                assert_eq!(y[i * n + j], want, "{isa:?} ({i}, {j})");
            }
        }
    }
}

#[test]
fn odd_and_empty_shapes() {
    let x = Tensor::zeros((0, 5), DType::BF16, &Device::Cpu).expect("x");
    let w = Tensor::ones((3, 5), DType::BF16, &Device::Cpu).expect("w");
    let y = matmul_wt(&x, &w, DType::BF16, Isa::best()).expect("empty M");
    assert_eq!(y.dims(), &[0, 3]);
    let bad = Tensor::ones((3, 4), DType::BF16, &Device::Cpu).expect("w");
    let e = matmul_wt(
        &Tensor::ones((2, 5), DType::BF16, &Device::Cpu).expect("x"),
        &bad,
        DType::BF16,
        Isa::best(),
    )
    .expect_err("K mismatch");
    assert!(e.to_string().contains("K must agree"), "{e}");
    let f = Tensor::ones((2, 5), DType::F64, &Device::Cpu).expect("x");
    let e = matmul_wt(&f, &w, DType::BF16, Isa::best()).expect_err("f64 input");
    assert!(e.to_string().contains("expected bf16 or f32"), "{e}");
}

/// f32 values in [-1, 1) that bf16 does not hold exactly, as a tensor and as the f64s their
/// bf16 roundings are.
fn rand_f32_rounded(rng: &mut rand::rngs::StdRng, dims: &[usize]) -> (Tensor, Vec<f64>) {
    let n: usize = dims.iter().product();
    let v: Vec<f32> = (0..n).map(|_| rng.gen_range(-1.0f32..1.0)).collect();
    let r: Vec<f64> = v.iter().map(|x| bf16::from_f32(*x).to_f64()).collect();
    (Tensor::from_vec(v, dims, &Device::Cpu).expect("tensor"), r)
}

#[test]
fn autocast_rounds_f32_operands_once_and_keeps_each_gradient_in_its_operand_dtype() {
    // Autocast: x, the upstream gradient and (in one case) w are f32 values bf16 cannot hold;
    // the product must be exactly the bf16 product of their roundings with f32 sums (f32 out, not
    // rounded again), and each gradient comes in its operand's dtype (f32 sums for f32).
    let mut rng = rand::rngs::StdRng::seed_from_u64(29);
    let (lead, n, k) = ([3usize, 17], 45usize, 66usize);
    let m: usize = lead.iter().product();
    for isa in paths() {
        for w_dtype in [DType::BF16, DType::F32] {
            let (x, xr) = rand_f32_rounded(&mut rng, &[lead[0], lead[1], k]);
            let (w, wv) = if w_dtype == DType::BF16 {
                rand_bf16(&mut rng, &[n, k])
            } else {
                rand_f32_rounded(&mut rng, &[n, k])
            };
            let (g, gr) = rand_f32_rounded(&mut rng, &[lead[0], lead[1], n]);
            let (xvar, wvar) = (
                Var::from_tensor(&x).expect("var"),
                Var::from_tensor(&w).expect("var"),
            );
            let what = format!("{isa:?} w {w_dtype:?}");
            let y = matmul_wt(xvar.as_tensor(), wvar.as_tensor(), DType::F32, isa).expect("fwd");
            assert_eq!(y.dtype(), DType::F32);
            let (want, mag) = reference(m, n, k, |i, r| xr[i * k + r], |j, r| wv[j * k + r]);
            check(&format!("{what} y"), &y, &want, &mag, k, false);
            let grads = (y * &g)
                .and_then(|t| t.sum_all())
                .and_then(|t| t.backward())
                .expect("backward");
            let dx = grads.get(xvar.as_tensor()).expect("dx");
            let dw = grads.get(wvar.as_tensor()).expect("dw");
            assert_eq!((dx.dtype(), dw.dtype()), (DType::F32, w_dtype));
            let (want, mag) = reference(m, k, n, |i, j| gr[i * n + j], |r, j| wv[j * k + r]);
            check(&format!("{what} dx"), dx, &want, &mag, n, false);
            let (want, mag) = reference(n, k, m, |j, i| gr[i * n + j], |r, i| xr[i * k + r]);
            check(
                &format!("{what} dw"),
                dw,
                &want,
                &mag,
                m,
                w_dtype == DType::BF16,
            );
        }
    }
    // `linear_bf16` of f32 tensors takes that path; without the kernels it runs candle's bf16
    // matmul on bf16 copies (its result rounded to bf16 once more).
    let (x, xr) = rand_f32_rounded(&mut rng, &[2, 5, k]);
    let (w, wr) = rand_f32_rounded(&mut rng, &[n, k]);
    let was = enabled();
    set_enabled(true);
    let on = linear_bf16(&x, &w);
    set_enabled(false);
    let off = linear_bf16(&x, &w);
    set_enabled(was);
    let (on, off) = (on.expect("on"), off.expect("off"));
    assert_eq!((on.dtype(), off.dtype()), (DType::F32, DType::F32));
    let (want, mag) = reference(10, n, k, |i, r| xr[i * k + r], |j, r| wr[j * k + r]);
    check("linear_bf16, op on", &on, &want, &mag, k, false);
    check("linear_bf16, op off (candle)", &off, &want, &mag, k, true);
}

#[test]
fn linear_with_the_op_on_and_off_agree_within_bound() {
    use crate::model::llama::Linear;
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    let (b, t, k, n) = (2, 9, 70, 33);
    let (x, xv) = rand_bf16(&mut rng, &[b, t, k]);
    let (w, wv) = rand_bf16(&mut rng, &[n, k]);
    let lin = Linear::from_weight(w, None);
    let was = enabled();
    set_enabled(true);
    let on = lin.forward(&x, false);
    set_enabled(false);
    let off = lin.forward(&x, false);
    set_enabled(was);
    let (on, off) = (on.expect("on"), off.expect("off"));
    let (want, mag) = reference(b * t, n, k, |i, r| xv[i * k + r], |j, r| wv[j * k + r]);
    check("Linear, op on", &on, &want, &mag, k, true);
    check("Linear, op off (candle)", &off, &want, &mag, k, true);
    // Both are the f32 sum rounded once; they may differ by the summation order only.
    let d: f32 = (on.to_dtype(DType::F32).expect("f32") - off.to_dtype(DType::F32).expect("f32"))
        .and_then(|t| t.abs())
        .and_then(|t| t.max_all())
        .and_then(|t| t.to_scalar())
        .expect("diff");
    let scale = want.iter().fold(0f64, |a, v| a.max(v.abs()));
    assert!(
        (d as f64) <= 2f64.powi(-7) * scale,
        "on vs off differ by {d}"
    );
}

#[test]
fn rounding_f32_operands_matches_half_on_every_path() {
    // Ties to even both ways, the largest finite values, infinities, subnormals, zeros, NaN, and
    // random values; lengths that leave a vector tail.
    let mut v: Vec<f32> = vec![
        0.0,
        -0.0,
        1.0,
        f32::from_bits(0x3f80_8000), // a tie, rounds down to even
        f32::from_bits(0x3f81_8000), // a tie, rounds up to even
        f32::from_bits(0x3f80_8001),
        f32::MAX,
        f32::MIN,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::from_bits(1),
        f32::from_bits(0x0080_0000),
        f32::NAN,
    ];
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    v.extend((0..1000).map(|_| f32::from_bits(rng.gen::<u32>())));
    for isa in paths() {
        for len in [v.len(), 37, 16, 7] {
            let src = &v[..len];
            let mut out = vec![bf16::ZERO; len];
            // SAFETY: `paths()` are available; `out` has `len` elements.
            unsafe { round_into(isa, src, out.as_mut_ptr()) };
            for (i, (got, x)) in out.iter().zip(src).enumerate() {
                let want = bf16::from_f32(*x);
                if x.is_nan() {
                    assert!(got.is_nan(), "{isa:?} [{i}] NaN became {got}");
                } else if x.is_subnormal() && got.to_f32() == 0.0 && *got != want {
                    // `vcvtneps2bf16` (AVX-512-BF16, AMX) treats subnormal inputs as zero, as
                    // oneDNN's conversion does; below 1.2e-38 that changes no product we form.
                    assert!(
                        matches!(isa, Isa::Amx | Isa::Avx512Bf16),
                        "{isa:?} [{i}] {x:e}"
                    );
                } else {
                    assert_eq!(got.to_bits(), want.to_bits(), "{isa:?} [{i}] {x:e}");
                }
            }
        }
    }
    let big: Vec<f32> = (0..200_000).map(|i| i as f32 * 1.001).collect();
    let got = to_bf16(&big);
    assert!(got.iter().zip(&big).all(|(g, x)| *g == bf16::from_f32(*x)));
}
