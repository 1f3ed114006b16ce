use std::path::{Path, PathBuf};

use super::*;
use crate::gguf::GgmlType;

/// A valid GGUF file from metadata and (name, ggml dims, type) tensors with zero data, or
/// `data` for tensors that need some.
struct TestFile {
    kv: Vec<(String, Value)>,
    tensors: Vec<(String, Vec<u64>, GgmlType, Vec<u8>)>,
}

fn encode(v: &Value, out: &mut Vec<u8>) -> u32 {
    fn string(out: &mut Vec<u8>, s: &str) {
        out.extend((s.len() as u64).to_le_bytes());
        out.extend(s.as_bytes());
    }
    match v {
        Value::U8(x) => {
            out.push(*x);
            0
        }
        Value::U32(x) => {
            out.extend(x.to_le_bytes());
            4
        }
        Value::I32(x) => {
            out.extend(x.to_le_bytes());
            5
        }
        Value::F32(x) => {
            out.extend(x.to_le_bytes());
            6
        }
        Value::Bool(b) => {
            out.push(u8::from(*b));
            7
        }
        Value::String(s) => {
            string(out, s);
            8
        }
        Value::U64(x) => {
            out.extend(x.to_le_bytes());
            10
        }
        Value::Array(Array::String(items)) => {
            out.extend(8u32.to_le_bytes());
            out.extend((items.len() as u64).to_le_bytes());
            for s in items {
                string(out, s);
            }
            9
        }
        Value::Array(Array::Bool(items)) => {
            out.extend(7u32.to_le_bytes());
            out.extend((items.len() as u64).to_le_bytes());
            out.extend(items.iter().map(|&b| u8::from(b)));
            9
        }
        Value::Array(Array::I32(items)) => {
            out.extend(5u32.to_le_bytes());
            out.extend((items.len() as u64).to_le_bytes());
            for x in items {
                out.extend(x.to_le_bytes());
            }
            9
        }
        other => panic!("the test writer does not encode {other:?}"),
    }
}

impl TestFile {
    fn new(arch: &str) -> TestFile {
        TestFile {
            kv: vec![("general.architecture".into(), Value::String(arch.into()))],
            tensors: Vec::new(),
        }
    }

    fn set(mut self, key: &str, v: Value) -> Self {
        self.kv.retain(|(k, _)| k != key);
        self.kv.push((key.into(), v));
        self
    }

    fn u32(self, key: &str, v: u32) -> Self {
        self.set(key, Value::U32(v))
    }

    fn f32(self, key: &str, v: f32) -> Self {
        self.set(key, Value::F32(v))
    }

    fn tensor(mut self, name: &str, dims: &[u64], ty: GgmlType) -> Self {
        let l = ty.layout().unwrap();
        let n: u64 = dims.iter().product();
        let data = vec![0u8; (n / l.elements * l.bytes) as usize];
        self.tensors.push((name.into(), dims.to_vec(), ty, data));
        self
    }

    fn tensor_data(mut self, name: &str, dims: &[u64], ty: GgmlType, data: Vec<u8>) -> Self {
        self.tensors.push((name.into(), dims.to_vec(), ty, data));
        self
    }

    /// A tiny model of `arch`: 2 layers, hidden 64, 4 heads, 2 KV heads, vocab 32, untied.
    fn model(arch: &str) -> TestFile {
        let k = |s: &str| format!("{arch}.{s}");
        let mut t = TestFile::new(arch)
            .u32(&k("embedding_length"), 64)
            .u32(&k("block_count"), 2)
            .u32(&k("feed_forward_length"), 128)
            .u32(&k("attention.head_count"), 4)
            .u32(&k("attention.head_count_kv"), 2)
            .u32(&k("context_length"), 4096)
            .f32(&k("attention.layer_norm_rms_epsilon"), 1e-5)
            .f32(&k("rope.freq_base"), 500000.0)
            .tensor("token_embd.weight", &[64, 32], GgmlType::Q8_0)
            .tensor("output_norm.weight", &[64], GgmlType::F32)
            .tensor("output.weight", &[64, 32], GgmlType::Q5_0);
        for l in 0..2 {
            for (n, dims) in [
                ("attn_q", [64u64, 64]),
                ("attn_k", [64, 32]),
                ("attn_v", [64, 32]),
                ("attn_output", [64, 64]),
                ("ffn_gate", [64, 128]),
                ("ffn_up", [64, 128]),
                ("ffn_down", [128, 64]),
            ] {
                t = t.tensor(&format!("blk.{l}.{n}.weight"), &dims, GgmlType::F16);
            }
            t = t
                .tensor(&format!("blk.{l}.attn_norm.weight"), &[64], GgmlType::F32)
                .tensor(&format!("blk.{l}.ffn_norm.weight"), &[64], GgmlType::F32);
        }
        t
    }

    fn write(&self, dir: &Path) -> PathBuf {
        let mut b = b"GGUF".to_vec();
        b.extend(3u32.to_le_bytes());
        b.extend((self.tensors.len() as u64).to_le_bytes());
        b.extend((self.kv.len() as u64).to_le_bytes());
        for (k, v) in &self.kv {
            b.extend((k.len() as u64).to_le_bytes());
            b.extend(k.as_bytes());
            let mut value = Vec::new();
            let ty = encode(v, &mut value);
            b.extend(ty.to_le_bytes());
            b.extend(value);
        }
        let mut offset = 0u64;
        let mut data = Vec::new();
        for (name, dims, ty, bytes) in &self.tensors {
            b.extend((name.len() as u64).to_le_bytes());
            b.extend(name.as_bytes());
            b.extend((dims.len() as u32).to_le_bytes());
            for d in dims {
                b.extend(d.to_le_bytes());
            }
            b.extend(ty.0.to_le_bytes());
            b.extend(offset.to_le_bytes());
            data.extend(bytes);
            while !data.len().is_multiple_of(32) {
                data.push(0);
            }
            offset = data.len() as u64;
        }
        while !b.len().is_multiple_of(32) {
            b.push(0);
        }
        b.extend(data);
        let p = dir.join("m.gguf");
        std::fs::write(&p, b).unwrap();
        p
    }

    fn import(&self) -> Result<HfImport, GgufError> {
        let d = tempfile::tempdir().unwrap();
        let f = GgufFile::open(&self.write(d.path()))?;
        import(&f)
    }
}

fn config(i: &HfImport) -> serde_json::Value {
    serde_json::from_str(&i.config_json).unwrap()
}

#[test]
fn a_llama_file_gives_its_config_and_un_permutes_q_and_k() {
    let i = TestFile::model("llama")
        .u32("tokenizer.ggml.bos_token_id", 7)
        .import()
        .unwrap();
    let c = config(&i);
    assert_eq!(c["model_type"], "llama");
    assert_eq!(c["hidden_size"], 64);
    assert_eq!(c["head_dim"], 16);
    assert_eq!(c["num_key_value_heads"], 2);
    assert_eq!(c["vocab_size"], 32);
    assert_eq!(c["max_position_embeddings"], 4096);
    assert_eq!(c["tie_word_embeddings"], false);
    assert_eq!(c["bos_token_id"], 7);
    assert_eq!(
        c["eos_token_id"], 2,
        "transformers' default when the file has none"
    );
    assert_eq!(
        c["rope_parameters"],
        serde_json::json!({"rope_theta": 500000.0, "rope_type": "default"})
    );
    // The float32 1e-5 becomes the decimal it was written from, printed as Python does.
    assert!(
        i.config_json.contains("\"rms_norm_eps\": 1e-05,\n"),
        "{}",
        i.config_json
    );
    assert!(i.config_json.ends_with("}\n"));
    let fix = |g: &str| i.tensors.iter().find(|t| t.gguf_name == g).unwrap().clone();
    assert_eq!(
        fix("blk.1.attn_q.weight").fixup,
        Fixup::UnpermuteRotary { heads: 4 }
    );
    assert_eq!(
        fix("blk.1.attn_k.weight").fixup,
        Fixup::UnpermuteRotary { heads: 2 }
    );
    assert_eq!(fix("blk.1.attn_v.weight").fixup, Fixup::None);
    assert_eq!(
        fix("blk.0.ffn_norm.weight").hf_name,
        "model.layers.0.post_attention_layernorm.weight"
    );
    assert_eq!(i.tensors.len(), 21);
    // Without output.weight the embeddings are tied; qwen2 is not permuted.
    let mut t = TestFile::model("qwen2");
    t.tensors.retain(|x| x.0 != "output.weight");
    let i = t.import().unwrap();
    assert_eq!(config(&i)["tie_word_embeddings"], true);
    assert!(i.tensors.iter().all(|t| t.fixup == Fixup::None));
}

#[test]
fn metadata_that_changes_the_math_is_refused_with_its_key() {
    for (key, v, want) in [
        ("llama.expert_count", Value::U32(8), "a mixture of experts"),
        (
            "llama.final_logit_softcapping",
            Value::F32(30.0),
            "logit soft-capping",
        ),
        (
            "llama.attn_logit_softcapping",
            Value::F32(50.0),
            "logit soft-capping",
        ),
        ("llama.attention.max_alibi_bias", Value::F32(8.0), "ALiBi"),
        ("llama.attention.causal", Value::Bool(false), "non-causal"),
        (
            "llama.attention.sliding_window",
            Value::U32(4096),
            "sliding-window",
        ),
        (
            "llama.rope.scaling.attn_factor",
            Value::F32(0.5),
            "RoPE attention factor",
        ),
        (
            "llama.rope.scaling.type",
            Value::String("yarn".into()),
            "only linear",
        ),
        ("llama.rope.dimension_count", Value::U32(8), "RoPE on part"),
        (
            "llama.attention.value_length",
            Value::U32(32),
            "equal key and value head sizes",
        ),
        (
            "llama.feed_forward_length",
            Value::Array(Array::I32(vec![128, 256])),
            "differs between layers",
        ),
        (
            "llama.some_future_knob",
            Value::F32(2.0),
            "does not know for architecture llama",
        ),
        ("adapter.type", Value::String("lora".into()), "LoRA adapter"),
        ("split.count", Value::U32(3), "split GGUF"),
    ] {
        let e = TestFile::model("llama")
            .set(key, v)
            .import()
            .unwrap_err()
            .to_string();
        assert!(e.contains(want), "{key}: {e}");
        assert!(e.contains(key) || key.starts_with("split"), "{key}: {e}");
        assert!(e.contains("m.gguf"), "{e}");
    }
    // Neutral values and keys that do not touch the math are accepted.
    let i = TestFile::model("llama")
        .u32("llama.expert_count", 0)
        .set("llama.attention.causal", Value::Bool(true))
        .set("llama.rope.scaling.type", Value::String("none".into()))
        .set(
            "llama.feed_forward_length",
            Value::Array(Array::I32(vec![128, 128])),
        )
        .u32("llama.rope.dimension_count", 16)
        .u32("general.quantization_version", 2)
        .u32("general.file_type", 15)
        .set("quantize.imatrix.file", Value::String("x.dat".into()))
        .set(
            "some_other_tool.note",
            Value::String("ignored by llama.cpp too".into()),
        )
        .import()
        .unwrap();
    assert_eq!(config(&i)["intermediate_size"], 128);
}

#[test]
fn linear_rope_scaling_is_mapped_and_a_factor_of_one_is_none() {
    let i = TestFile::model("llama")
        .set("llama.rope.scaling.type", Value::String("linear".into()))
        .f32("llama.rope.scaling.factor", 4.0)
        .import()
        .unwrap();
    assert_eq!(
        config(&i)["rope_parameters"],
        serde_json::json!({"factor": 4.0, "rope_theta": 500000.0, "rope_type": "linear"})
    );
    let i = TestFile::model("llama")
        .f32("llama.rope.scaling.factor", 1.0)
        .import()
        .unwrap();
    assert_eq!(config(&i)["rope_parameters"]["rope_type"], "default");
}

/// llama.cpp's converter's `rope_freqs` for Llama 3 scaling, computed in float32 as it does.
fn llama3_factors(theta: f32, hd: usize, factor: f32, low: f32, high: f32, orig: f32) -> Vec<f32> {
    (0..hd / 2)
        .map(|i| {
            let freq = 1.0 / theta.powf(2.0 * i as f32 / hd as f32);
            let wavelen = 2.0 * std::f32::consts::PI / freq;
            if wavelen < orig / high {
                1.0
            } else if wavelen > orig / low {
                factor
            } else {
                let smooth = (orig / wavelen - low) / (high - low);
                1.0 / ((1.0 - smooth) / factor + smooth)
            }
        })
        .collect()
}

#[test]
fn llama3_rope_scaling_is_recovered_from_rope_freqs() {
    for (hd, theta, factor, low, high, orig) in [
        (16, 500000.0, 8.0, 1.0, 4.0, 8192.0),
        (64, 500000.0, 32.0, 1.0, 4.0, 8192.0),
        (128, 500000.0, 8.0, 2.0, 5.0, 4096.0),
    ] {
        let f = llama3_factors(theta, hd, factor, low, high, orig);
        let data: Vec<u8> = f.iter().flat_map(|x| x.to_le_bytes()).collect();
        let heads = (64 / hd as u64).max(1);
        let mut t = TestFile::model("llama")
            .f32("llama.rope.freq_base", theta)
            .u32("llama.attention.head_count", heads as u32)
            .u32("llama.attention.head_count_kv", 1)
            .u32("llama.attention.key_length", hd as u32)
            .u32("llama.attention.value_length", hd as u32)
            .tensor_data("rope_freqs.weight", &[hd as u64 / 2], GgmlType::F32, data);
        if orig != 8192.0 {
            t = t.u32("llama.rope.scaling.original_context_length", orig as u32);
        }
        let i = t.import().unwrap();
        assert_eq!(
            config(&i)["rope_parameters"],
            serde_json::json!({"factor": factor, "high_freq_factor": high, "low_freq_factor": low,
                "original_max_position_embeddings": orig as u64, "rope_theta": theta, "rope_type": "llama3"}),
            "head_dim {hd}"
        );
        assert!(i.tensors.iter().all(|t| t.gguf_name != "rope_freqs.weight"));
    }
    // Factors no Llama 3 parameters produce are refused.
    let data: Vec<u8> = (0..8)
        .flat_map(|i| (1.0 + i as f32).to_le_bytes())
        .collect();
    let e = TestFile::model("llama")
        .tensor_data("rope_freqs.weight", &[8], GgmlType::F32, data)
        .import()
        .unwrap_err();
    assert!(e.to_string().contains("not Llama 3 scaling"), "{e}");
}

fn gemma(layers: u32) -> TestFile {
    let mut t = TestFile::model("gemma3")
        .u32("gemma3.block_count", layers)
        .u32("gemma3.attention.key_length", 32)
        .u32("gemma3.attention.value_length", 32)
        .f32("gemma3.rope.freq_base", 1e6)
        .u32("gemma3.attention.sliding_window", 512);
    t.tensors
        .retain(|x| !x.0.starts_with("blk.") && x.0 != "output.weight");
    for l in 0..layers {
        for (n, dims) in [
            ("attn_q", [64u64, 128]),
            ("attn_k", [64, 64]),
            ("attn_v", [64, 64]),
            ("attn_output", [128, 64]),
            ("ffn_gate", [64, 128]),
            ("ffn_up", [64, 128]),
            ("ffn_down", [128, 64]),
        ] {
            t = t.tensor(&format!("blk.{l}.{n}.weight"), &dims, GgmlType::BF16);
        }
        for n in [
            "attn_norm",
            "post_attention_norm",
            "ffn_norm",
            "post_ffw_norm",
        ] {
            t = t.tensor(&format!("blk.{l}.{n}.weight"), &[64], GgmlType::F32);
        }
        for n in ["attn_q_norm", "attn_k_norm"] {
            t = t.tensor(&format!("blk.{l}.{n}.weight"), &[32], GgmlType::F32);
        }
    }
    t
}

#[test]
fn gemma3_gets_its_hard_coded_layer_pattern_and_norm_fix_ups() {
    let i = gemma(7).import().unwrap();
    let c = config(&i);
    assert_eq!(c["model_type"], "gemma3_text");
    assert_eq!(c["sliding_window"], 512);
    assert_eq!(c["query_pre_attn_scalar"], 32);
    assert_eq!(c["head_dim"], 32);
    assert_eq!(c["tie_word_embeddings"], true);
    assert_eq!(c["hidden_activation"], "gelu_pytorch_tanh");
    assert!(c.get("hidden_act").is_none());
    let kinds: Vec<&str> = c["layer_types"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(kinds[5], "full_attention");
    assert_eq!(
        kinds.iter().filter(|k| **k == "sliding_attention").count(),
        6
    );
    assert_eq!(
        c["rope_parameters"]["sliding_attention"],
        serde_json::json!({"rope_theta": 10000.0, "rope_type": "default"})
    );
    let by = |g: &str| i.tensors.iter().find(|t| t.gguf_name == g).unwrap().clone();
    for (g, hf) in [
        (
            "blk.3.attn_norm.weight",
            "model.layers.3.input_layernorm.weight",
        ),
        (
            "blk.3.post_attention_norm.weight",
            "model.layers.3.post_attention_layernorm.weight",
        ),
        (
            "blk.3.ffn_norm.weight",
            "model.layers.3.pre_feedforward_layernorm.weight",
        ),
        (
            "blk.3.post_ffw_norm.weight",
            "model.layers.3.post_feedforward_layernorm.weight",
        ),
        (
            "blk.3.attn_q_norm.weight",
            "model.layers.3.self_attn.q_norm.weight",
        ),
        (
            "blk.3.attn_k_norm.weight",
            "model.layers.3.self_attn.k_norm.weight",
        ),
        ("output_norm.weight", "model.norm.weight"),
    ] {
        assert_eq!(by(g).hf_name, hf);
        assert_eq!(by(g).fixup, Fixup::SubtractOne, "{g}");
    }
    assert_eq!(by("blk.0.attn_q.weight").fixup, Fixup::None);
    // The 27B model (62 layers) scales queries by hidden / heads, as llama.cpp hard-codes.
    assert_eq!(
        config(&gemma(62).import().unwrap())["query_pre_attn_scalar"],
        16
    );
    // No window: every layer is global.
    let mut t = gemma(7);
    t.kv.retain(|(k, _)| k != "gemma3.attention.sliding_window");
    let c = config(&t.import().unwrap());
    assert_eq!(c["sliding_window"], serde_json::Value::Null);
    assert!(c["layer_types"]
        .as_array()
        .unwrap()
        .iter()
        .all(|v| v == "full_attention"));
    // Keys that disagree with what llama.cpp hard-codes are refused.
    for (key, v) in [
        ("gemma3.attention.sliding_window_pattern", Value::U32(4)),
        ("gemma3.rope.freq_base_swa", Value::F32(20000.0)),
        ("gemma3.final_logit_softcapping", Value::F32(30.0)),
    ] {
        let e = gemma(7).set(key, v).import().unwrap_err().to_string();
        assert!(e.contains(key), "{e}");
    }
    let ok = vec![true, true, true, true, true, false, true];
    assert!(gemma(7)
        .set(
            "gemma3.attention.sliding_window_pattern",
            Value::Array(Array::Bool(ok))
        )
        .f32("gemma3.rope.freq_base_swa", 10000.0)
        .import()
        .is_ok());
}

#[test]
fn tensors_are_checked_for_names_types_and_layers() {
    let e = TestFile::model("llama")
        .tensor("blk.0.ffn_gate_exps.weight", &[64, 128, 4], GgmlType::F16)
        .import()
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("blk.0.ffn_gate_exps.weight") && e.contains("does not have"),
        "{e}"
    );
    let e = TestFile::model("llama")
        .tensor("blk.0.attn_q_norm.weight", &[16], GgmlType::F32)
        .import()
        .unwrap_err()
        .to_string();
    assert!(e.contains("attn_q_norm"), "llama has no q_norm: {e}");
    let e = TestFile::model("llama")
        .tensor("blk.2.attn_norm.weight", &[64], GgmlType::F32)
        .import()
        .unwrap_err()
        .to_string();
    assert!(e.contains("only 2 layers"), "{e}");
    let mut t = TestFile::model("llama");
    t.tensors[0].2 = GgmlType::from_name("IQ2_XXS").unwrap();
    t.tensors[0].1 = vec![256, 32];
    t.tensors[0].3 = vec![0; 66 * 32];
    let e = t.import().unwrap_err().to_string();
    assert!(
        e.contains("tensor \"token_embd.weight\": IQ2_XXS cannot be dequantized"),
        "{e}"
    );
    let e = TestFile::model("gpt2").import().unwrap_err().to_string();
    assert!(e.contains("architecture \"gpt2\""), "{e}");
}

#[test]
fn names_map_for_every_architecture() {
    assert_eq!(
        hf_tensor_name(Arch::Qwen3, "blk.11.attn_k_norm.weight").as_deref(),
        Some("model.layers.11.self_attn.k_norm.weight")
    );
    assert_eq!(
        hf_tensor_name(Arch::Qwen2, "blk.0.attn_q.bias").as_deref(),
        Some("model.layers.0.self_attn.q_proj.bias")
    );
    assert_eq!(hf_tensor_name(Arch::Llama, "blk.x.attn_q.weight"), None);
    assert_eq!(hf_tensor_name(Arch::Llama, "blk.0.attn_q.scale"), None);
    assert_eq!(
        hf_tensor_name(Arch::Qwen3, "blk.0.post_ffw_norm.weight"),
        None
    );
}

/// Found by fuzzing (`fuzz/regressions/gguf_model/block-count-2332033025.gguf`): a 1 KB file
/// claiming 2,332,033,025 layers made the import allocate gigabytes of per-layer lists.
#[test]
fn a_lying_block_count_is_refused_before_anything_is_allocated_per_layer() {
    for arch in ["llama", "qwen3", "gemma3"] {
        let e = TestFile::model(arch)
            .u32(&format!("{arch}.block_count"), 2_332_033_025)
            .import()
            .unwrap_err();
        assert!(
            e.to_string().contains(&format!(
                "has {arch}.block_count = 2332033025, more than the 4096 layers"
            )),
            "{arch}: {e}"
        );
    }
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/regressions/gguf_model/block-count-2332033025.gguf");
    let f = crate::gguf::GgufFile::open(&path).unwrap();
    let e = crate::gguf::import(&f).unwrap_err();
    assert!(e.to_string().contains("block_count = 2332033025"), "{e}");
}
