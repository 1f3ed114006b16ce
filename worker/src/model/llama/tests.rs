use crate::model::max_abs_diff;
use candle_core::{DType, Device, IndexOp, Tensor};

use super::*;

pub(crate) fn tiny(tied: bool, kv: usize, bias: bool) -> LlamaConfig {
    LlamaConfig::from_json(&format!(
        r#"{{"hidden_size": 32, "intermediate_size": 48, "num_attention_heads": 4, "num_key_value_heads": {kv},
            "num_hidden_layers": 2, "vocab_size": 40, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
            "tie_word_embeddings": {tied}, "attention_bias": {bias}, "initializer_range": 0.2}}"#
    ))
    .expect("tiny config")
}

fn ids(b: usize, t: usize, seed: u32) -> Tensor {
    let v: Vec<u32> = (0..b * t)
        .map(|i| (i as u32 * 7 + seed * 13 + 3) % 40)
        .collect();
    Tensor::from_vec(v, (b, t), &Device::Cpu).unwrap()
}

/// A fixed random weighting of the logits, so the loss is a plain linear functional.
fn weights(shape: &[usize], dtype: DType) -> Tensor {
    let n: usize = shape.iter().product();
    let v: Vec<f64> = (0..n)
        .map(|i| ((i as f64 * 0.618_033_988_7).fract() - 0.5) * 2.0)
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
}

/// Overwrites every parameter with deterministic pseudo-random values (candle's own init is not
/// seeded), so a test sees the same model on every run.
fn reseed(m: &Llama, seed: u64) {
    let mut state = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    for (name, var) in m.named_vars() {
        let n = var.as_tensor().elem_count();
        let v: Vec<f64> = (0..n)
            .map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let u = (state >> 11) as f64 / (1u64 << 53) as f64 - 0.5;
                if name.ends_with("norm.weight") {
                    1.0 + 0.2 * u
                } else {
                    0.4 * u
                }
            })
            .collect();
        let t = Tensor::from_vec(v, var.as_tensor().shape().clone(), &Device::Cpu).unwrap();
        var.set(&t.to_dtype(var.as_tensor().dtype()).unwrap())
            .unwrap();
    }
}

fn loss(m: &Llama, x: &Tensor, w: &Tensor) -> Tensor {
    (m.forward_train(x).unwrap() * w)
        .unwrap()
        .sum_all()
        .unwrap()
}

#[test]
fn every_parameter_gets_a_nonzero_gradient() {
    for (tied, kv, bias) in [(false, 2, false), (true, 4, true), (true, 1, false)] {
        let m = Llama::new(tiny(tied, kv, bias), DType::F32, &Device::Cpu).unwrap();
        let x = ids(2, 7, 1);
        let logits = m.forward_train(&x).unwrap();
        assert_eq!(logits.dims(), &[2, 7, 40]);
        let l = (logits * weights(&[2, 7, 40], DType::F32))
            .unwrap()
            .sum_all()
            .unwrap();
        let grads = l.backward().unwrap();
        let vars = m.named_vars();
        let expect = 1 + 2 * 9 + 1 + usize::from(!tied) + if bias { 2 * 3 } else { 0 };
        assert_eq!(
            vars.len(),
            expect,
            "{:?}",
            vars.iter().map(|v| &v.0).collect::<Vec<_>>()
        );
        for (name, var) in vars {
            let g = grads
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("{name} has no gradient"));
            let norm = g
                .abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(norm > 0.0, "{name} has a zero gradient");
        }
    }
}

/// Checks autograd's gradient of [`loss`] against central finite differences for a few elements
/// of every parameter (first, last, one in between), in f64; `label` names the model.
fn assert_gradients_match_finite_differences(m: &Llama, x: &Tensor, w: &Tensor, label: &str) {
    let grads = loss(m, x, w).backward().unwrap();
    let eps = 1e-6;
    for (name, var) in m.named_vars() {
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("{label}: {name} has no gradient"))
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        assert!(
            g.iter().any(|v| *v != 0.0),
            "{label}: {name} has a zero gradient"
        );
        let orig = var
            .as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        let shape = var.as_tensor().shape().clone();
        for idx in [0, orig.len() / 2 + 1, orig.len() - 1] {
            let eval = |delta: f64| {
                let mut p = orig.clone();
                p[idx] += delta;
                var.set(&Tensor::from_vec(p, shape.clone(), &Device::Cpu).unwrap())
                    .unwrap();
                loss(m, x, w).to_scalar::<f64>().unwrap()
            };
            let numeric = (eval(eps) - eval(-eps)) / (2.0 * eps);
            eval(0.0);
            let err = (numeric - g[idx]).abs() / numeric.abs().max(g[idx].abs()).max(1e-3);
            assert!(
                err < 1e-5,
                "{label}: {name}[{idx}]: autograd {} vs finite difference {numeric}",
                g[idx]
            );
        }
    }
}

#[test]
fn gradients_match_finite_differences_in_f64() {
    let m = Llama::new(tiny(false, 2, true), DType::F64, &Device::Cpu).unwrap();
    reseed(&m, 42);
    let x = ids(1, 5, 2);
    let w = weights(&[1, 5, 40], DType::F64);
    assert_gradients_match_finite_differences(&m, &x, &w, "llama");
}

#[test]
fn attention_is_causal() {
    let m = Llama::new(tiny(true, 2, false), DType::F32, &Device::Cpu).unwrap();
    let a = ids(1, 6, 3);
    let mut v = a.to_vec2::<u32>().unwrap();
    v[0][5] = (v[0][5] + 1) % 40;
    let b = Tensor::new(v, &Device::Cpu).unwrap();
    let la = m.forward(&a).unwrap();
    let lb = m.forward(&b).unwrap();
    let diff = |t: usize| max_abs_diff(&la.i((0, t)).unwrap(), &lb.i((0, t)).unwrap()).unwrap();
    for t in 0..5 {
        assert_eq!(diff(t), 0.0, "position {t} saw a later token");
    }
    assert!(diff(5) > 0.0);
}

#[test]
fn grouped_query_attention_equals_full_attention_with_repeated_kv_heads() {
    let gqa = Llama::new(tiny(false, 2, false), DType::F64, &Device::Cpu).unwrap();
    let mha = Llama::new(tiny(false, 4, false), DType::F64, &Device::Cpu).unwrap();
    let hd = gqa.config.head_dim();
    for (name, var) in mha.named_vars() {
        let src = gqa.varmap.data().lock().unwrap()[&name].as_tensor().clone();
        let value = if name.contains("k_proj") || name.contains("v_proj") {
            // [kv * hd, in] -> each KV head's rows twice, in group order.
            let heads: Vec<Tensor> = (0..2)
                .flat_map(|h| {
                    let rows = src.narrow(0, h * hd, hd).unwrap();
                    [rows.clone(), rows]
                })
                .collect();
            Tensor::cat(&heads, 0).unwrap()
        } else {
            src
        };
        var.set(&value).unwrap();
    }
    let x = ids(2, 6, 4);
    let d = max_abs_diff(&gqa.forward(&x).unwrap(), &mha.forward(&x).unwrap()).unwrap();
    assert!(d < 1e-12, "max diff {d}");
}

#[test]
fn a_skipped_layer_equals_a_layer_whose_outputs_are_zero() {
    let m = Llama::new(tiny(false, 2, false), DType::F64, &Device::Cpu).unwrap();
    let x = ids(1, 5, 5);
    let skipped = m
        .forward_with(
            &x,
            ForwardOptions {
                skip_layers: &[1],
                ..Default::default()
            },
        )
        .unwrap();
    for (name, var) in m.named_vars() {
        if name.starts_with("model.layers.1.")
            && (name.contains("o_proj") || name.contains("down_proj"))
        {
            var.set(&var.as_tensor().zeros_like().unwrap()).unwrap();
        }
    }
    let zeroed = m.forward(&x).unwrap();
    let d = max_abs_diff(&skipped, &zeroed).unwrap();
    assert!(d < 1e-12, "max diff {d}");
}

#[test]
fn the_probe_records_what_the_forward_pass_computed() {
    let m = Llama::new(tiny(false, 2, false), DType::F64, &Device::Cpu).unwrap();
    let x = ids(2, 4, 6);
    let mut probe = Probe::default();
    let logits = m
        .forward_with(
            &x,
            ForwardOptions {
                probe: Some(&mut probe),
                ..Default::default()
            },
        )
        .unwrap();
    assert_eq!(probe.layers.len(), 2);
    let l0 = &probe.layers[0];
    assert_eq!(l0.o_proj_input.dims(), &[2, 4, 16 * 2]);
    assert_eq!(l0.down_proj_input.dims(), &[2, 4, 48]);
    // Layer 1's input is layer 0's output, and the final norm of the last output gives the logits.
    let d = max_abs_diff(&probe.layers[1].input, &l0.output).unwrap();
    assert_eq!(d, 0.0);
    let norm = m.varmap.data().lock().unwrap()["model.norm.weight"]
        .as_tensor()
        .clone();
    let head = m.varmap.data().lock().unwrap()["lm_head.weight"]
        .as_tensor()
        .clone();
    let again = rms_norm(&probe.layers[1].output, &norm, 1e-5)
        .unwrap()
        .broadcast_matmul(&head.t().unwrap())
        .unwrap();
    let d = max_abs_diff(&again, &logits).unwrap();
    assert!(d < 1e-12);
    // A naive RMSNorm over one row.
    let row: Vec<f64> = l0.input.i((0, 0)).unwrap().to_vec1().unwrap();
    let rms = (row.iter().map(|v| v * v).sum::<f64>() / row.len() as f64 + 1e-5).sqrt();
    let w: Vec<f64> = m.varmap.data().lock().unwrap()["model.layers.0.input_layernorm.weight"]
        .as_tensor()
        .to_vec1()
        .unwrap();
    let got: Vec<f64> = l0.attn_norm.i((0, 0)).unwrap().to_vec1().unwrap();
    for k in 0..row.len() {
        assert!((got[k] - row[k] / rms * w[k]).abs() < 1e-12);
    }
}

#[test]
fn the_inference_pass_equals_the_differentiable_one_and_builds_no_graph() {
    for dtype in [DType::F32, DType::F64] {
        // (F64 runs the composed ops either way; F32 compares the fused kernels with them.)
        let m = Llama::new(tiny(false, 2, true), dtype, &Device::Cpu).unwrap();
        let x = ids(2, 9, 8);
        let fused = m.forward(&x).unwrap();
        let composed = m.forward_train(&x).unwrap();
        let d = max_abs_diff(&fused, &composed).unwrap();
        let tol = if dtype == DType::F32 { 1e-5 } else { 1e-12 };
        assert!(d < tol, "{dtype:?}: max diff {d}");
        // With a KV cache too, token by token.
        let mut cache = KvCache::default();
        let mut steps = Vec::new();
        for t in 0..9 {
            steps.push(
                m.forward_cached(&x.narrow(1, t, 1).unwrap(), &mut cache)
                    .unwrap(),
            );
        }
        let d = max_abs_diff(&Tensor::cat(&steps, 1).unwrap(), &composed).unwrap();
        assert!(d < tol * 10.0, "{dtype:?} cached: max diff {d}");
        // No parameter is reachable from the inference logits.
        let grads = fused.sum_all().unwrap().backward().unwrap();
        for (name, var) in m.named_vars() {
            assert!(
                grads.get(var.as_tensor()).is_none(),
                "{name} got a gradient"
            );
        }
    }
}

/// Tiny configs of every architecture, with the features that distinguish them switched on:
/// Mistral's window shorter than the test sequences, Qwen2's biases and sliding upper layers,
/// Qwen3's q/k norms, Gemma 3's GeGLU, (1 + w) norms, pre/post norms, mixed layer kinds with
/// a local RoPE base and a query scale that is not head_dim.
pub(crate) fn arch_configs() -> Vec<LlamaConfig> {
    let shape = r#""hidden_size": 32, "intermediate_size": 48, "num_attention_heads": 4,
        "num_key_value_heads": 2, "num_hidden_layers": 3, "vocab_size": 40, "rms_norm_eps": 1e-5,
        "initializer_range": 0.2"#;
    [
        r#""model_type": "llama", "rope_parameters": {"rope_type": "llama3", "factor": 4.0,
            "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 4,
            "rope_theta": 10000.0}"#,
        r#""model_type": "mistral", "sliding_window": 3"#,
        r#""model_type": "qwen2", "use_sliding_window": true, "sliding_window": 3,
            "max_window_layers": 1, "tie_word_embeddings": true"#,
        r#""model_type": "qwen3", "head_dim": 16"#,
        r#""model_type": "gemma3_text", "head_dim": 8, "query_pre_attn_scalar": 12,
            "sliding_window": 3, "layer_types": ["sliding_attention", "full_attention", "sliding_attention"],
            "rope_parameters": {"full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6},
                                "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}"#,
    ]
    .iter()
    .map(|a| LlamaConfig::from_json(&format!("{{{shape}, {a}}}")).expect("arch config"))
    .collect()
}

#[test]
fn every_architecture_trains_every_parameter_with_exact_gradients() {
    for c in arch_configs() {
        let arch = c.model_type.clone();
        let m = Llama::new(c, DType::F64, &Device::Cpu).unwrap();
        reseed(&m, 7);
        let x = ids(1, 6, 2);
        let w = weights(&[1, 6, 40], DType::F64);
        let names: Vec<String> = m.named_vars().into_iter().map(|(n, _)| n).collect();
        if m.config.arch().qk_norm() {
            assert!(names.iter().any(|n| n.ends_with("q_norm.weight")), "{arch}");
        }
        if m.config.arch().gemma() {
            assert!(
                names
                    .iter()
                    .any(|n| n.ends_with("post_feedforward_layernorm.weight")),
                "{arch}"
            );
        }
        assert_gradients_match_finite_differences(&m, &x, &w, &arch);
    }
}

#[test]
fn every_architecture_infers_like_it_trains_with_and_without_the_cache() {
    for c in arch_configs() {
        let arch = c.model_type.clone();
        let m = Llama::new(c, DType::F32, &Device::Cpu).unwrap();
        reseed(&m, 9);
        let x = ids(2, 8, 8);
        let composed = m.forward_train(&x).unwrap();
        let fused = m.forward(&x).unwrap();
        let d = max_abs_diff(&fused, &composed).unwrap();
        assert!(d < 1e-4, "{arch}: max diff {d}");
        let mut cache = KvCache::default();
        let mut steps = Vec::new();
        for t in 0..8 {
            steps.push(
                m.forward_cached(&x.narrow(1, t, 1).unwrap(), &mut cache)
                    .unwrap(),
            );
        }
        let d = max_abs_diff(&Tensor::cat(&steps, 1).unwrap(), &composed).unwrap();
        assert!(d < 1e-4, "{arch} cached: max diff {d}");
    }
}

#[test]
fn a_sliding_window_forgets_what_lies_outside_it() {
    // Mistral with window 3 over 3 layers: position 7 is reached by position 0 through at most
    // 3 * 2 = 6 steps back, so changing token 0 leaves it unchanged; with no window it changes.
    let windowed = arch_configs().remove(1);
    assert_eq!(windowed.sliding_window, Some(3));
    let mut full = windowed.clone();
    full.sliding_window = None;
    full.layer_types = vec![crate::model::config::LayerType::Full; 3];
    for (c, sees) in [(windowed, false), (full, true)] {
        let m = Llama::new(c, DType::F32, &Device::Cpu).unwrap();
        reseed(&m, 3);
        let a = ids(1, 8, 1);
        let mut v = a.to_vec2::<u32>().unwrap();
        v[0][0] = (v[0][0] + 1) % 40;
        let b = Tensor::new(v, &Device::Cpu).unwrap();
        let d = max_abs_diff(
            &m.forward(&a).unwrap().i((0, 7)).unwrap(),
            &m.forward(&b).unwrap().i((0, 7)).unwrap(),
        )
        .unwrap();
        assert_eq!(d > 0.0, sees, "max diff {d}");
    }
}
