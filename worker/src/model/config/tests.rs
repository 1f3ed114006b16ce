use super::*;

/// `config.json` files as transformers 5.24 saves them (tests/python/write_configs.py) and as
/// published models ship them (written by transformers 4.4x–4.5x, legacy keys).
fn fixtures() -> Vec<(String, String)> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src/model/config");
    let mut out = Vec::new();
    for sub in ["transformers", "hub"] {
        let mut files: Vec<_> = std::fs::read_dir(root.join(sub))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        files.sort();
        for f in files {
            out.push((
                format!("{sub}/{}", f.file_name().unwrap().to_string_lossy()),
                std::fs::read_to_string(&f).unwrap(),
            ));
        }
    }
    assert!(out.len() >= 16, "fixtures missing");
    out
}

fn fixture(name: &str) -> LlamaConfig {
    let (_, text) = fixtures().into_iter().find(|(n, _)| n == name).unwrap();
    LlamaConfig::from_json(&text).unwrap()
}

#[test]
fn every_key_transformers_writes_is_read_or_known_inert() {
    for (name, text) in fixtures() {
        let v: Value = serde_json::from_str(&text).unwrap();
        for k in v.as_object().unwrap().keys() {
            assert!(
                READ_KEYS.contains(&k.as_str()) || INERT_KEYS.contains(&k.as_str()),
                "{name}: key {k:?} is in neither list"
            );
        }
        let c = LlamaConfig::from_json(&text).unwrap_or_else(|e| panic!("{name}: {e}"));
        // What we write reads back to the same configuration, and is a fixed point.
        let written = c.to_json();
        let back = LlamaConfig::from_json(&written).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(back.to_json(), written, "{name}");
        let mut expect = c.clone();
        expect.extra = back.extra.clone();
        expect.head_dim = Some(c.head_dim());
        expect.num_key_value_heads = Some(c.num_kv_heads());
        assert_eq!(back, expect, "{name}");
    }
}

#[test]
fn an_unknown_key_is_refused_by_name() {
    let (_, text) = fixtures()
        .into_iter()
        .find(|(n, _)| n == "transformers/llama.json")
        .unwrap();
    for (k, v) in [
        ("quantization_config", r#"{"quant_method": "awq"}"#),
        ("num_experts", "8"),
        ("something_new", "1"),
    ] {
        let t = text.replacen('{', &format!("{{\"{k}\": {v},"), 1);
        let e = LlamaConfig::from_json(&t).unwrap_err().to_string();
        assert!(e.contains(k), "{e}");
    }
}

#[test]
fn math_we_do_not_implement_is_refused() {
    let base = r#""hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "vocab_size": 10, "num_attention_heads": 4"#;
    for (extra, needle) in [
        (r#""num_key_value_heads": 3"#, "multiple"),
        (r#""model_type": "gpt2""#, "gpt2"),
        (r#""model_type": "gemma3""#, "gemma3_text"),
        (r#""hidden_act": "gelu""#, "hidden_act"),
        (r#""rope_scaling": {"type": "yarn", "factor": 2.0}"#, "yarn"),
        (
            r#""rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}"#,
            "dynamic",
        ),
        (
            r#""rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4, "attention_factor": 2}"#,
            "attention_factor",
        ),
        (r#""rope_interleaved": true"#, "rope_interleaved"),
        (r#""partial_rotary_factor": 0.5"#, "partial_rotary_factor"),
        (r#""attention_dropout": 0.1"#, "attention_dropout"),
        (
            r#""model_type": "gemma3_text", "final_logit_softcapping": 30.0"#,
            "softcapping",
        ),
        (
            r#""model_type": "gemma3_text", "attn_logit_softcapping": 50.0"#,
            "softcapping",
        ),
        (
            r#""model_type": "gemma3_text", "use_bidirectional_attention": true"#,
            "bidirectional",
        ),
        (r#""sliding_window": 16"#, "sliding_window"),
        (
            r#""model_type": "qwen3", "layer_types": ["full_attention"]"#,
            "layer_types",
        ),
        (
            r#""model_type": "qwen3", "layer_types": ["chunked_attention", "full_attention"]"#,
            "chunked_attention",
        ),
    ] {
        let e = LlamaConfig::from_json(&format!("{{{base}, {extra}}}"))
            .err()
            .unwrap_or_else(|| panic!("{extra} was accepted"))
            .to_string();
        assert!(e.contains(needle), "{extra}: {e}");
    }
}

#[test]
fn smollm_config_reads_like_transformers() {
    let c = fixture("hub/smollm2-135m-instruct.json");
    assert_eq!((c.head_dim(), c.num_kv_heads()), (64, 3));
    assert!(c.tie_word_embeddings);
    assert_eq!(c.rope_theta, 100_000.0);
    assert_eq!(c.arch(), Arch::Llama);
    assert!((0..30).all(|i| c.layer_window(i).is_none()));
    assert_eq!(
        c.extra.get("architectures"),
        Some(&json!(["LlamaForCausalLM"]))
    );
}

#[test]
fn rope_parameters_and_the_legacy_keys_mean_the_same() {
    // Llama 3.2 as published (legacy rope_scaling + rope_theta) and as transformers 5 writes it.
    let legacy = fixture("hub/llama-3.2-1b-instruct.json");
    let current = LlamaConfig::from_json(&legacy.to_json()).unwrap();
    assert_eq!(current.rope(), legacy.rope());
    assert_eq!(
        legacy.rope_scaling,
        RopeScaling::Llama3 {
            factor: 32.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 8192.0
        }
    );
    assert_eq!(legacy.rope_theta, 500_000.0);
    // transformers 5's own file: rope_theta only inside rope_parameters.
    let t5 = fixture("transformers/llama-llama3-rope.json");
    assert_eq!(t5.rope_theta, 500_000.0);
    assert!(matches!(
        t5.rope_scaling,
        RopeScaling::Llama3 { factor, .. } if factor == 8.0
    ));
    let mistral = fixture("transformers/mistral.json");
    assert_eq!(mistral.rope_theta, 10_000.0);
    assert_eq!(fixture("hub/qwen3-0.6b.json").rope_theta, 1_000_000.0);
}

#[test]
fn llama3_rope_scaling_keeps_high_frequencies_and_scales_low_ones() {
    let c = fixture("transformers/llama-llama3-rope.json");
    let plain = Rope {
        theta: c.rope_theta,
        scaling: RopeScaling::Default,
    }
    .inv_freq(c.head_dim());
    let scaled = c.inv_freq();
    assert_eq!(scaled[0], plain[0]);
    let last = plain.len() - 1;
    assert!((scaled[last] - plain[last] / 8.0).abs() < 1e-15);
}

#[test]
fn gemma3_layers_windows_and_ropes() {
    for c in [
        fixture("hub/gemma-3-1b-it.json"),
        LlamaConfig::from_json(&fixture("hub/gemma-3-1b-it.json").to_json()).unwrap(),
    ] {
        assert_eq!(c.arch(), Arch::Gemma3);
        assert!(c.tie_word_embeddings);
        assert_eq!(c.layer_types.len(), 26);
        for i in 0..26 {
            let global = (i + 1) % 6 == 0;
            assert_eq!(c.layer_window(i), (!global).then_some(512), "layer {i}");
            assert_eq!(
                c.layer_rope(i).theta,
                if global { 1_000_000.0 } else { 10_000.0 }
            );
        }
        assert_eq!(c.attention_scale(), 1.0 / 16.0);
        assert_eq!(c.hidden_act, "gelu_pytorch_tanh");
    }
    let scaled = fixture("transformers/gemma3-linear-rope.json");
    assert_eq!(scaled.rope_scaling, RopeScaling::Linear { factor: 8.0 });
    let local = scaled.layer_rope(0);
    assert_eq!(
        (local.theta, local.scaling),
        (10_000.0, RopeScaling::Default)
    );
}

#[test]
fn qwen_and_mistral_windows_follow_transformers() {
    let q = fixture("hub/qwen2.5-0.5b-instruct.json");
    assert!(q.attention_bias, "Qwen2 has q/k/v biases");
    assert!(
        (0..24).all(|i| q.layer_window(i).is_none()),
        "use_sliding_window is false"
    );
    let s = fixture("transformers/qwen2-sliding.json");
    for i in 0..7 {
        assert_eq!(s.layer_window(i), (i >= 3).then_some(16), "layer {i}");
    }
    let m = fixture("transformers/mistral.json");
    assert!((0..7).all(|i| m.layer_window(i) == Some(4096)));
    assert!(
        (0..7).all(|i| fixture("transformers/mistral-no-window.json")
            .layer_window(i)
            .is_none())
    );
    assert!(!fixture("transformers/qwen3.json").attention_bias);
}

/// Found by fuzzing (`fuzz/regressions/config_json/`): a layer count or a width no model has
/// made parsing allocate gigabytes (per-layer lists, RoPE tables) or abort; each is refused by
/// name before anything is allocated from it.
#[test]
fn sizes_no_model_has_are_refused_by_name() {
    let dir =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/regressions/config_json");
    for (file, want) in [
        (
            "num-hidden-layers-4e9.json",
            "num_hidden_layers = 4000000000: more than 4096 layers",
        ),
        (
            "num-hidden-layers-u64-max.json",
            "num_hidden_layers = 18446744073709551615: more than 4096 layers",
        ),
        (
            "head-dim-2-pow-60.json",
            "head_dim = 1152921504606846976: larger than 16777216",
        ),
    ] {
        let text = std::fs::read_to_string(dir.join(file)).unwrap();
        let e = LlamaConfig::from_json(&text).unwrap_err().to_string();
        assert!(e.contains(want), "{file}: {e}");
    }
    let base = std::fs::read_to_string(dir.join("head-dim-2-pow-60.json")).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&base).unwrap();
    v["head_dim"] = serde_json::json!(16);
    for key in ["hidden_size", "intermediate_size", "vocab_size"] {
        let mut w = v.clone();
        w[key] = serde_json::json!(1u64 << 25);
        let e = LlamaConfig::from_json(&w.to_string())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(&format!("{key} = 33554432: larger than 16777216")),
            "{key}: {e}"
        );
    }
    // The largest allowed values still parse.
    let mut w = v.clone();
    w["num_hidden_layers"] = serde_json::json!(4096);
    assert_eq!(
        LlamaConfig::from_json(&w.to_string())
            .unwrap()
            .num_hidden_layers,
        4096
    );
}
