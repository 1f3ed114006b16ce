//! Every kernel against an independent composed candle computation (forward, in f32 and bf16,
//! and the backward through candle's autograd of the composed form), and its backward against
//! central finite differences in f64; then the whole model with the kernels on and off.

use candle_core::{DType, Device, Tensor, Var, D};

use super::simd::{exp_f32, tanh_f32};
use super::*;
use crate::model::max_abs_diff;

fn cpu() -> Device {
    Device::Cpu
}

/// Deterministic values in [-scale, scale).
fn values(n: usize, seed: u64, scale: f64) -> Vec<f64> {
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0) * scale
        })
        .collect()
}

fn rand(shape: &[usize], seed: u64, scale: f64, dtype: DType) -> Tensor {
    let n = shape.iter().product();
    Tensor::from_vec(values(n, seed, scale), shape, &cpu())
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
}

/// Max |a - b| / max(1, max |b|).
fn rel_diff(a: &Tensor, b: &Tensor) -> f64 {
    let scale = b
        .to_dtype(DType::F64)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
        .max(1.0);
    max_abs_diff(
        &a.to_dtype(DType::F64).unwrap(),
        &b.to_dtype(DType::F64).unwrap(),
    )
    .unwrap()
        / scale
}

/// `Σ f(inputs) · w` for a fixed pseudo-random weighting `w`, so every output element matters.
fn weighted(y: &Tensor, seed: u64) -> Tensor {
    let w = rand(y.dims(), seed, 1.0, y.dtype());
    (y * w).unwrap().sum_all().unwrap()
}

/// Checks the gradients of the scalar `f(inputs)` (f64) with respect to `inputs[i]` for `i` in
/// `check` against central finite differences at up to `per_input` elements of each.
fn assert_fd(
    label: &str,
    inputs: &[Tensor],
    check: &[usize],
    per_input: usize,
    f: &dyn Fn(&[Tensor]) -> Tensor,
) {
    let vars: Vec<Var> = inputs
        .iter()
        .map(|t| Var::from_tensor(t).unwrap())
        .collect();
    let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let grads = f(&ts).backward().unwrap();
    let eps = 1e-6;
    for &i in check {
        let g = grads
            .get(&ts[i])
            .unwrap_or_else(|| panic!("{label}: input {i} has no gradient"))
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        assert!(
            g.iter().any(|v| *v != 0.0),
            "{label}: input {i}: zero gradient"
        );
        let orig = inputs[i].flatten_all().unwrap().to_vec1::<f64>().unwrap();
        let step = (orig.len() / per_input).max(1);
        for idx in (0..orig.len()).step_by(step).chain([orig.len() - 1]) {
            let eval = |delta: f64| {
                let mut p = orig.clone();
                p[idx] += delta;
                let mut xs = inputs.to_vec();
                xs[i] = Tensor::from_vec(p, inputs[i].dims(), &cpu()).unwrap();
                f(&xs).to_scalar::<f64>().unwrap()
            };
            let numeric = (eval(eps) - eval(-eps)) / (2.0 * eps);
            let err = (numeric - g[idx]).abs() / numeric.abs().max(g[idx].abs()).max(1e-3);
            // Central differences at eps 1e-6 in f64: truncation ~1e-12, rounding ~1e-10·|loss|.
            assert!(
                err < 1e-5,
                "{label}: input {i}[{idx}]: backward {} vs finite difference {numeric}",
                g[idx]
            );
        }
    }
}

/// Gradients of `weighted(f(inputs))` with respect to every input.
fn grads_of(inputs: &[Tensor], f: &dyn Fn(&[Tensor]) -> Tensor) -> Vec<Tensor> {
    let vars: Vec<Var> = inputs
        .iter()
        .map(|t| Var::from_tensor(t).unwrap())
        .collect();
    let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let g = weighted(&f(&ts), 99).backward().unwrap();
    ts.iter().map(|t| g.get(t).unwrap().clone()).collect()
}

// ------------------------------------------------------------------------ the building blocks

#[test]
fn the_polynomial_exp_and_tanh_are_within_2_ulp() {
    let mut worst = 0.0f64;
    for i in 0..=200_000 {
        let x = -87.0 + 175.0 * i as f64 / 200_000.0;
        let exact = (x as f32 as f64).exp();
        let got = exp_f32(x as f32) as f64;
        worst = worst.max((got - exact).abs() / exact);
    }
    assert!(worst < 2.5e-7, "exp: worst relative error {worst}");
    assert_eq!(exp_f32(f32::NEG_INFINITY), 0.0);
    assert_eq!(exp_f32(-100.0), 0.0);
    assert_eq!(exp_f32(0.0), 1.0);
    for i in 0..=20_000 {
        let x = -10.0 + 20.0 * i as f64 / 20_000.0;
        let err = (tanh_f32(x as f32) as f64 - (x as f32 as f64).tanh()).abs();
        assert!(err < 3e-7, "tanh({x}): error {err}");
    }
}

#[test]
fn bf16_conversions_match_half() {
    for v in values(10_000, 70, 1e3)
        .into_iter()
        .chain([0.0, -0.0, 1e-40, 3.0e38, f64::INFINITY])
    {
        let x = v as f32;
        assert_eq!(
            <bf16 as Elem>::from_r::<f32>(x).to_bits(),
            bf16::from_f32(x).to_bits(),
            "{x}"
        );
        let b = bf16::from_f32(x);
        assert_eq!(<bf16 as Elem>::to_r::<f32>(b), b.to_f32());
    }
    assert!(<bf16 as Elem>::from_r::<f32>(f32::NAN).is_nan());
}

#[test]
fn the_switch_parses_names_and_scopes_to_the_thread() {
    assert_eq!(Kernels::parse("0").unwrap(), Kernels::none());
    assert_eq!(Kernels::parse("all").unwrap(), Kernels::all());
    let k = Kernels::parse("norm, rope").unwrap();
    assert!(k.contains(Kernel::Norm) && k.contains(Kernel::Rope));
    assert!(!k.contains(Kernel::Attention) && !k.contains(Kernel::Loss));
    let e = Kernels::parse("norm,flash").unwrap_err();
    assert!(e.contains("\"flash\""), "{e}");
    let before = kernels();
    with_kernels(Kernels::only(&[Kernel::Glu]), || {
        assert!(active(Kernel::Glu, &cpu()));
        assert!(!active(Kernel::Norm, &cpu()));
    });
    assert_eq!(kernels(), before);
}

// ------------------------------------------------------------------------------------ RMSNorm

fn norm_ref(x: &Tensor, w: &Tensor, eps: f64, plus_one: bool) -> Tensor {
    let w = if plus_one {
        (w + 1.0).unwrap()
    } else {
        w.clone()
    };
    crate::model::llama::rms_norm(x, &w, eps).unwrap()
}

#[test]
fn rms_norm_matches_the_composed_form_forward_and_backward() {
    for plus_one in [false, true] {
        let x = rand(&[3, 5, 40], 1, 2.0, DType::F32);
        let w = rand(&[40], 2, 1.0, DType::F32);
        let d = rel_diff(
            &rms_norm(&x, &w, 1e-5, plus_one).unwrap(),
            &norm_ref(&x, &w, 1e-5, plus_one),
        );
        assert!(d < 1e-6, "f32 plus_one={plus_one}: {d}");
        // bf16 in, f32 statistics: within bf16's rounding of the output (2^-8).
        let yb = rms_norm(
            &x.to_dtype(DType::BF16).unwrap(),
            &w.to_dtype(DType::BF16).unwrap(),
            1e-5,
            plus_one,
        )
        .unwrap();
        assert_eq!(yb.dtype(), DType::BF16);
        let xr = x
            .to_dtype(DType::BF16)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap();
        let wr = w
            .to_dtype(DType::BF16)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap();
        let d = rel_diff(&yb, &norm_ref(&xr, &wr, 1e-5, plus_one));
        assert!(d < 8e-3, "bf16: {d}");
        // f32 gradients equal autograd's of the composed form.
        let inputs = [x.clone(), w.clone()];
        let fused = grads_of(&inputs, &|t| {
            rms_norm(&t[0], &t[1], 1e-5, plus_one).unwrap()
        });
        let composed = grads_of(&inputs, &|t| norm_ref(&t[0], &t[1], 1e-5, plus_one));
        for (a, b) in fused.iter().zip(&composed) {
            let d = rel_diff(a, b);
            assert!(d < 1e-5, "backward plus_one={plus_one}: {d}");
        }
        let inputs = [
            rand(&[2, 3, 12], 3, 2.0, DType::F64),
            rand(&[12], 4, 1.0, DType::F64),
        ];
        assert_fd("rms_norm", &inputs, &[0, 1], 72, &|t| {
            weighted(&rms_norm(&t[0], &t[1], 1e-5, plus_one).unwrap(), 5)
        });
    }
}

// --------------------------------------------------------------------------------------- RoPE

/// Tables as `Llama::rope_tables` makes them (frequencies repeated for both halves).
fn tables(t: usize, hd: usize, dtype: DType) -> (Tensor, Tensor) {
    let (mut c, mut s) = (Vec::new(), Vec::new());
    for p in 0..t {
        for _ in 0..2 {
            for f in 0..hd / 2 {
                let a = p as f64 / 10_000f64.powf(2.0 * f as f64 / hd as f64);
                c.push(a.cos());
                s.push(a.sin());
            }
        }
    }
    let mk = |v| {
        Tensor::from_vec(v, (t, hd), &cpu())
            .unwrap()
            .to_dtype(dtype)
            .unwrap()
    };
    (mk(c), mk(s))
}

/// HF's `x·cos + rotate_half(x)·sin` over `[B, H, T, hd]`, composed.
fn rope_ref(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Tensor {
    let hd = x.dim(D::Minus1).unwrap();
    let x1 = x.narrow(D::Minus1, 0, hd / 2).unwrap();
    let x2 = x.narrow(D::Minus1, hd / 2, hd / 2).unwrap();
    let rot = Tensor::cat(&[&x2.neg().unwrap(), &x1], D::Minus1).unwrap();
    (x.broadcast_mul(cos).unwrap() + rot.broadcast_mul(sin).unwrap()).unwrap()
}

#[test]
fn rope_matches_the_composed_form_forward_and_backward() {
    let (b, t, h, hd) = (2, 9, 3, 16);
    let x = rand(&[b, t, h, hd], 6, 1.0, DType::F32);
    let (c, s) = tables(t, hd, DType::F32);
    let composed = |x: &Tensor| {
        rope_ref(&x.transpose(1, 2).unwrap(), &c, &s)
            .transpose(1, 2)
            .unwrap()
    };
    let d = rel_diff(&rope(&x, &c, &s).unwrap(), &composed(&x));
    assert!(d < 1e-6, "f32: {d}");
    let (cb, sb) = (
        c.to_dtype(DType::BF16).unwrap(),
        s.to_dtype(DType::BF16).unwrap(),
    );
    let yb = rope(&x.to_dtype(DType::BF16).unwrap(), &cb, &sb).unwrap();
    let d = rel_diff(&yb, &composed(&x));
    assert!(d < 2e-2, "bf16: {d}");
    let fused = grads_of(std::slice::from_ref(&x), &|t| rope(&t[0], &c, &s).unwrap());
    let reference = grads_of(std::slice::from_ref(&x), &|t| composed(&t[0]));
    let d = rel_diff(&fused[0], &reference[0]);
    assert!(d < 1e-6, "backward: {d}");
    let (c64, s64) = tables(5, 8, DType::F64);
    let x64 = rand(&[1, 5, 2, 8], 7, 1.0, DType::F64);
    assert_fd("rope", &[x64], &[0], 80, &|t| {
        weighted(&rope(&t[0], &c64, &s64).unwrap(), 8)
    });
}

// ---------------------------------------------------------------------------------------- GLU

fn glu_ref(g: &Tensor, u: &Tensor, a: Activation) -> Tensor {
    let act = match a {
        Activation::Silu => g.silu().unwrap(),
        Activation::GeluTanh => g.gelu().unwrap(),
    };
    (act * u).unwrap()
}

#[test]
fn glu_matches_the_composed_form_forward_and_backward() {
    for a in [Activation::Silu, Activation::GeluTanh] {
        let g = rand(&[4, 6, 33], 9, 4.0, DType::F32);
        let u = rand(&[4, 6, 33], 10, 2.0, DType::F32);
        let d = rel_diff(&glu(&g, &u, a).unwrap(), &glu_ref(&g, &u, a));
        assert!(d < 1e-6, "{a:?} f32: {d}");
        let yb = glu(
            &g.to_dtype(DType::BF16).unwrap(),
            &u.to_dtype(DType::BF16).unwrap(),
            a,
        )
        .unwrap();
        let d = rel_diff(&yb, &glu_ref(&g, &u, a));
        assert!(d < 2e-2, "{a:?} bf16: {d}");
        let inputs = [g.clone(), u.clone()];
        let fused = grads_of(&inputs, &|t| glu(&t[0], &t[1], a).unwrap());
        let composed = grads_of(&inputs, &|t| glu_ref(&t[0], &t[1], a));
        for (x, y) in fused.iter().zip(&composed) {
            let d = rel_diff(x, y);
            assert!(d < 1e-5, "{a:?} backward: {d}");
        }
        let inputs = [
            rand(&[2, 3, 10], 11, 4.0, DType::F64),
            rand(&[2, 3, 10], 12, 2.0, DType::F64),
        ];
        assert_fd("glu", &inputs, &[0, 1], 60, &|t| {
            weighted(&glu(&t[0], &t[1], a).unwrap(), 13)
        });
    }
}

#[test]
fn add_equals_candles_add_bit_for_bit_and_passes_the_gradient_to_both() {
    // 3 · 4096 + 5 elements: whole parallel chunks and a tail.
    for dtype in [DType::F32, DType::BF16, DType::F64] {
        let a = rand(&[3, 4101], 21, 3.0, dtype);
        let b = rand(&[3, 4101], 22, 3.0, dtype);
        let d = max_abs_diff(
            &add(&a, &b).unwrap().to_dtype(DType::F64).unwrap(),
            &(&a + &b).unwrap().to_dtype(DType::F64).unwrap(),
        )
        .unwrap();
        assert_eq!(d, 0.0, "{dtype:?}: fused add differs from candle's");
    }
    let inputs = [
        rand(&[2, 3, 10], 23, 2.0, DType::F64),
        rand(&[2, 3, 10], 24, 2.0, DType::F64),
    ];
    assert_fd("add", &inputs, &[0, 1], 60, &|t| {
        weighted(&add(&t[0], &t[1]).unwrap(), 25)
    });
    let e = add(
        &rand(&[2, 3], 1, 1.0, DType::F32),
        &rand(&[3, 2], 2, 1.0, DType::F32),
    );
    assert!(e.is_err(), "shapes that differ must be refused");
}

// ---------------------------------------------------------------------------------- attention

/// Causal attention composed as the model's reference path does: q `[B, T, H, hd]`, k, v
/// `[B, T, KV, hd]` → `[B, T, H, hd]`, with an explicit mask and softmax.
fn attention_ref(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64, window: Option<usize>) -> Tensor {
    let (b, t, h, hd) = q.dims4().unwrap();
    let kv = k.dim(2).unwrap();
    let n = h / kv;
    let rep = |x: &Tensor| {
        x.transpose(1, 2)
            .unwrap()
            .unsqueeze(2)
            .unwrap()
            .broadcast_as((b, kv, n, t, hd))
            .unwrap()
            .contiguous()
            .unwrap()
            .reshape((b, h, t, hd))
            .unwrap()
    };
    let w = window.unwrap_or(usize::MAX);
    let mask: Vec<f64> = (0..t)
        .flat_map(|p| (0..t).map(move |j| if j > p || p - j >= w { -1e9 } else { 0.0 }))
        .collect();
    let mask = Tensor::from_vec(mask, (t, t), &cpu())
        .unwrap()
        .to_dtype(q.dtype())
        .unwrap();
    let qt = q.transpose(1, 2).unwrap().contiguous().unwrap();
    let scores = (qt.matmul(&rep(k).t().unwrap()).unwrap() * scale)
        .unwrap()
        .broadcast_add(&mask)
        .unwrap();
    let p = candle_nn::ops::softmax(&scores, D::Minus1).unwrap();
    p.matmul(&rep(v)).unwrap().transpose(1, 2).unwrap()
}

#[test]
fn attention_matches_the_composed_form_across_blocks_windows_and_groups() {
    // T = 70 crosses query blocks (32) and key blocks (64); windows cut blocks in the middle.
    for (h, kv, window) in [
        (4, 2, None),
        (4, 4, Some(5)),
        (6, 2, Some(40)),
        (2, 1, Some(1)),
    ] {
        let (b, t, hd) = (2, 70, 16);
        let q = rand(&[b, t, h, hd], 20, 1.5, DType::F32);
        let k = rand(&[b, t, kv, hd], 21, 1.5, DType::F32);
        let v = rand(&[b, t, kv, hd], 22, 1.0, DType::F32);
        let sc = 0.3;
        let label = format!("h {h} kv {kv} window {window:?}");
        let y = attention(&q, &k, &v, sc, window).unwrap();
        let d = rel_diff(&y, &attention_ref(&q, &k, &v, sc, window));
        assert!(d < 1e-5, "{label} f32: {d}");
        let bf = |x: &Tensor| x.to_dtype(DType::BF16).unwrap();
        let yb = attention(&bf(&q), &bf(&k), &bf(&v), sc, window).unwrap();
        assert_eq!(yb.dtype(), DType::BF16);
        let d = rel_diff(&yb, &attention_ref(&q, &k, &v, sc, window));
        assert!(d < 3e-2, "{label} bf16: {d}");
        let inputs = [q.clone(), k.clone(), v.clone()];
        let fused = grads_of(&inputs, &|t| {
            attention(&t[0], &t[1], &t[2], sc, window).unwrap()
        });
        let composed = grads_of(&inputs, &|t| attention_ref(&t[0], &t[1], &t[2], sc, window));
        for (i, (x, r)) in fused.iter().zip(&composed).enumerate() {
            let d = rel_diff(x, r);
            assert!(d < 1e-5, "{label} backward of input {i}: {d}");
        }
    }
}

#[test]
fn attention_backward_matches_finite_differences_in_f64() {
    for window in [None, Some(3)] {
        let (b, t, h, kv, hd) = (1, 6, 4, 2, 8);
        let inputs = [
            rand(&[b, t, h, hd], 30, 1.0, DType::F64),
            rand(&[b, t, kv, hd], 31, 1.0, DType::F64),
            rand(&[b, t, kv, hd], 32, 1.0, DType::F64),
        ];
        assert_fd("attention", &inputs, &[0, 1, 2], 48, &|x| {
            weighted(&attention(&x[0], &x[1], &x[2], 0.4, window).unwrap(), 33)
        });
    }
}

// ----------------------------------------------------------------------------------- KD loss

/// The composed KD loss (as `distill::loss` computes it without the kernel).
fn kd_ref(s: &Tensor, t: &Tensor, y: &Tensor, temp: f64, cw: f64) -> (Tensor, f64, f64) {
    use candle_nn::ops::log_softmax;
    let log_ps = log_softmax(&(s / temp).unwrap(), D::Minus1).unwrap();
    let log_pt = log_softmax(&(t / temp).unwrap(), D::Minus1).unwrap();
    let kl = (log_pt.exp().unwrap() * (&log_pt - &log_ps).unwrap())
        .unwrap()
        .sum_all()
        .unwrap();
    let ce = log_softmax(s, D::Minus1)
        .unwrap()
        .gather(&y.unsqueeze(D::Minus1).unwrap(), D::Minus1)
        .unwrap()
        .sum_all()
        .unwrap()
        .neg()
        .unwrap();
    let total = ((&kl * (temp * temp)).unwrap() + (&ce * cw).unwrap()).unwrap();
    let f = |x: &Tensor| x.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap();
    let (k, c) = (f(&kl), f(&ce));
    (total, k, c)
}

fn targets(n: usize, v: usize, seed: u32) -> Tensor {
    let y: Vec<u32> = (0..n as u32)
        .map(|i| (i * 7919 + seed * 31) % v as u32)
        .collect();
    Tensor::from_vec(y, n, &cpu()).unwrap()
}

#[test]
fn kd_loss_matches_the_composed_form_forward_and_backward() {
    // V = 1000 is not a multiple of the 16 lanes; T = 1 takes the shared-logsumexp path.
    let (n, v) = (12, 1000);
    let y = targets(n, v, 1);
    for (temp, cw) in [(2.0, 0.5), (1.0, 1.0), (1.5, 0.0)] {
        let s = rand(&[n, v], 40, 6.0, DType::F32);
        let t = rand(&[n, v], 41, 6.0, DType::F32);
        let l = kd_loss(&s, &t, &y, temp, cw).unwrap();
        let (total, kl, ce) = kd_ref(&s, &t, &y, temp, cw);
        let f = |x: &Tensor| x.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap();
        assert!(
            (l.kl - kl).abs() < 1e-4 * kl.abs().max(1.0),
            "kl {} vs {kl}",
            l.kl
        );
        assert!(
            (l.ce - ce).abs() < 1e-4 * ce.abs().max(1.0),
            "ce {} vs {ce}",
            l.ce
        );
        assert!((f(&l.total) - f(&total)).abs() < 1e-4 * f(&total).abs().max(1.0));
        // Gradients with respect to the student equal the composed form's autograd.
        let sv = Var::from_tensor(&s).unwrap();
        let g = kd_loss(sv.as_tensor(), &t, &y, temp, cw)
            .unwrap()
            .total
            .backward()
            .unwrap();
        let gf = g.get(sv.as_tensor()).unwrap().clone();
        let gr = kd_ref(sv.as_tensor(), &t, &y, temp, cw)
            .0
            .backward()
            .unwrap();
        let d = rel_diff(&gf, gr.get(sv.as_tensor()).unwrap());
        assert!(d < 1e-5, "T {temp} ce {cw}: backward {d}");
        // bf16 logits (student and teacher), f32 arithmetic: equal to the loss of the rounded
        // logits; the gradient comes back in bf16.
        let bf = |x: &Tensor| x.to_dtype(DType::BF16).unwrap();
        let lb = kd_loss(&bf(&s), &bf(&t), &y, temp, cw).unwrap();
        let up = |x: &Tensor| bf(x).to_dtype(DType::F32).unwrap();
        let (_, klr, cer) = kd_ref(&up(&s), &up(&t), &y, temp, cw);
        assert!(
            (lb.kl - klr).abs() < 1e-4 * klr.abs().max(1.0),
            "bf16 kl {} vs {klr}",
            lb.kl
        );
        assert!(
            (lb.ce - cer).abs() < 1e-4 * cer.abs().max(1.0),
            "bf16 ce {} vs {cer}",
            lb.ce
        );
    }
    let (n, v) = (3, 20);
    let y = targets(n, v, 2);
    let t = rand(&[n, v], 43, 3.0, DType::F64);
    let s = rand(&[n, v], 42, 3.0, DType::F64);
    for (temp, cw) in [(2.0, 0.5), (1.0, 1.0)] {
        assert_fd("kd_loss", std::slice::from_ref(&s), &[0], 60, &|x| {
            kd_loss(&x[0], &t, &y, temp, cw).unwrap().total
        });
    }
    assert_fd("ce_loss", std::slice::from_ref(&s), &[0], 60, &|x| {
        ce_loss(&x[0], &y).unwrap().total
    });
}

#[test]
fn ce_loss_matches_the_composed_form_and_the_teacher_gets_no_gradient() {
    let (n, v) = (5, 77);
    let y = targets(n, v, 3);
    let s = Var::from_tensor(&rand(&[n, v], 50, 4.0, DType::F32)).unwrap();
    let l = ce_loss(s.as_tensor(), &y).unwrap();
    let (_, _, ce) = kd_ref(s.as_tensor(), s.as_tensor(), &y, 1.0, 1.0);
    assert!((l.ce - ce).abs() < 1e-4, "{} vs {ce}", l.ce);
    assert_eq!(l.kl, 0.0);
    let t = Var::from_tensor(&rand(&[n, v], 51, 4.0, DType::F32)).unwrap();
    let g = kd_loss(s.as_tensor(), t.as_tensor(), &y, 1.0, 1.0)
        .unwrap()
        .total
        .backward()
        .unwrap();
    assert!(g.get(t.as_tensor()).is_none());
    // Each row's gradient sums to zero (softmax minus one-hot, and p_s - p_t).
    let gs = g
        .get(s.as_tensor())
        .unwrap()
        .sum(1)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert!(gs.iter().all(|x| x.abs() < 1e-5), "{gs:?}");
}

#[test]
fn a_target_outside_the_vocabulary_is_an_error() {
    let s = rand(&[2, 10], 60, 1.0, DType::F32);
    let y = Tensor::new(&[3u32, 10], &cpu()).unwrap();
    let e = ce_loss(&s, &y).err().expect("an error").to_string();
    assert!(e.contains("target 10 at position 1"), "{e}");
    assert!(kd_loss(&s, &s, &y, 1.0, 0.0).is_err());
    assert!(kd_loss(&s, &s, &Tensor::new(&[1u32, 2], &cpu()).unwrap(), 0.0, 0.0).is_err());
}

// -------------------------------------------------------------------------------- whole model

/// Overwrites every parameter with deterministic values (norm weights near 1, or near 0 for
/// Gemma's `1 + w` form where the test model starts at 0 too).
fn reseed(m: &crate::model::Llama, seed: u64) {
    for (i, (name, var)) in m.named_vars().into_iter().enumerate() {
        let n = var.as_tensor().elem_count();
        let v: Vec<f64> = values(n, seed + i as u64, 1.0)
            .into_iter()
            .map(|u| {
                if name.ends_with("norm.weight") {
                    1.0 + 0.1 * u
                } else {
                    0.2 * u
                }
            })
            .collect();
        let t = Tensor::from_vec(v, var.as_tensor().shape().clone(), &cpu())
            .unwrap()
            .to_dtype(var.as_tensor().dtype())
            .unwrap();
        var.set(&t).unwrap();
    }
}

#[test]
fn every_architecture_trains_alike_with_the_kernels_on_and_off() {
    use crate::model::llama::tests::arch_configs;
    let ids: Vec<u32> = (0..2 * 9).map(|i| (i * 7 + 3) % 40).collect();
    let ids = Tensor::from_vec(ids, (2, 9), &cpu()).unwrap();
    for c in arch_configs() {
        let arch = c.model_type.clone();
        let m = crate::model::Llama::new(c, DType::F32, &cpu()).unwrap();
        reseed(&m, 5);
        let run = |k: Kernels| {
            with_kernels(k, || {
                let logits = m.forward_train(&ids).unwrap();
                let g = weighted(&logits, 77).backward().unwrap();
                let grads: Vec<Tensor> = m
                    .named_vars()
                    .iter()
                    .map(|(n, v)| {
                        g.get(v.as_tensor())
                            .unwrap_or_else(|| panic!("{arch}: {n} has no gradient"))
                            .clone()
                    })
                    .collect();
                (logits, grads)
            })
        };
        let (lf, gf) = run(Kernels::all());
        let (lc, gc) = run(Kernels::none());
        // f32: the kernels sum in another order than candle's ops (and exp differs by 2 ulp),
        // so equal to ~1e-6 relative per op, a few e-6 through three layers.
        let d = rel_diff(&lf, &lc);
        assert!(d < 2e-5, "{arch}: logits differ by {d}");
        // Not bit for bit: the other path did run.
        assert!(d > 0.0, "{arch}: the kernels changed nothing");
        for ((name, _), (a, b)) in m.named_vars().iter().zip(gf.iter().zip(&gc)) {
            let d = rel_diff(a, b);
            assert!(d < 1e-4, "{arch}: gradient of {name} differs by {d}");
        }
        // Each kernel alone against none, so a difference is pinned to one kernel.
        for k in Kernel::ALL {
            let (l1, g1) = run(Kernels::only(&[k]));
            assert!(rel_diff(&l1, &lc) < 2e-5, "{arch}: {k:?} alone");
            let worst = g1
                .iter()
                .zip(&gc)
                .map(|(a, b)| rel_diff(a, b))
                .fold(0.0, f64::max);
            assert!(
                worst < 1e-4,
                "{arch}: {k:?} alone: gradients differ by {worst}"
            );
        }
    }
}
