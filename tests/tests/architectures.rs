//! Qwen3 and Gemma 3 teachers through a whole round on real binaries: scoring (sharded, depth by
//! skip-layer perplexity), pruning in width and depth, distillation, perplexity and answers with
//! the chat template, to a succeeded campaign whose student keeps the architecture (q/k norms;
//! Gemma's four norms, sliding layers and their RoPE) and has the size the round promised.

use std::time::Duration;

use candle_core::{DType, Device, Tensor};
use distillery_tests::*;
use distillery_worker::model::config::Arch;
use distillery_worker::model::io::load_dir;
use distillery_worker::model::test_model::{write_test_model, TestModelSpec};

#[test]
fn qwen3_and_gemma3_teachers_go_through_a_whole_round() {
    let fx = tempfile::tempdir().unwrap();
    let d = fx.path();
    write_corpus(
        d,
        &["calib.jsonl", "web.jsonl", "web-val.jsonl"],
        (0..60).map(|i| {
            format!(
                "Note {i}: small models learn from larger ones, {} steps.",
                i * 3
            )
        }),
    );
    std::fs::write(
        d.join("questions.jsonl"),
        "{\"question_id\": 1, \"category\": \"writing\", \"turns\": [\"Say hi.\"]}\n",
    )
    .unwrap();
    let coord = CoordinatorProc::start(&d.join("data"), ML_TIMING);
    let _w1 = WorkerProc::real(&coord.url(), &d.join("w1"), "cpu");
    let _w2 = WorkerProc::real(&coord.url(), &d.join("w2"), "cpu");
    let mut ids = Vec::new();
    for arch in [Arch::Qwen3, Arch::Gemma3] {
        let teacher = d.join(arch.model_type());
        let t = write_test_model(
            &teacher,
            &TestModelSpec {
                num_layers: 4,
                seed: 3,
                arch,
                ..Default::default()
            },
        )
        .unwrap();
        let toml = format!(
            "name = \"{}\"\nseed = 4\n[teacher]\nmodel = \"{}\"\n[data]\n\
             calibration = {{ path = \"calib.jsonl\", samples = 8, seq_len = 32 }}\n\
             train = [ {{ name = \"web\", path = \"web.jsonl\" }} ]\n\
             validation = [ {{ name = \"web\", path = \"web-val.jsonl\" }} ]\n\
             [scheduling]\nscore_shards = 2\ndepth_groups = 2\n\
             [[rounds]]\ntarget = {{ hidden_size = 48, intermediate_size = 192, num_attention_heads = 2, num_layers = 3 }}\n\
             depth_importance = \"perplexity\"\n\
             distill = {{ tokens = 1024, seq_len = 32, micro_batch = 2, world_size = 1, lr = 0.003, checkpoint_every = 8 }}\n\
             [evaluation]\nperplexity = true\n\
             judge = {{ backend = \"local\", model = \"{}\", mode = \"pairwise\", questions = \"questions.jsonl\", baseline = \"teacher\", max_tokens = 6 }}\n",
            arch.model_type(),
            teacher.display(),
            teacher.display(),
        );
        let spec = write_spec(d, &format!("{}.toml", arch.model_type()), &toml);
        ids.push((arch, t, submit(&coord, &spec)));
    }
    for (arch, teacher, id) in ids {
        let v = wait_terminal(&coord, &id, Duration::from_secs(400));
        assert_eq!(v["state"], "succeeded", "{arch:?}: {v}");
        let r = &v["rounds"][0];
        let ppl = r["metrics"]["perplexity"].as_f64().unwrap();
        assert!(ppl.is_finite() && ppl > 1.0, "{arch:?}: {r}");
        let out = d.join(format!("{}-student", arch.model_type()));
        coord.artifact_get(r["artifacts"]["student"].as_str().unwrap(), &out);
        let s = load_dir(&out, DType::F32, &Device::Cpu).unwrap();
        assert_eq!(s.config.arch(), arch);
        assert_eq!(
            (
                s.config.hidden_size,
                s.config.intermediate_size,
                s.config.num_attention_heads
            ),
            (48, 192, 2)
        );
        assert_eq!(s.config.num_hidden_layers, 3);
        assert_eq!(
            r["params"],
            serde_json::json!(s.num_params() as u64),
            "{arch:?}"
        );
        // Kept layers keep their kind, window and RoPE.
        let pruned = d.join(format!("{}-pruned", arch.model_type()));
        coord.artifact_get(r["artifacts"]["pruned"].as_str().unwrap(), &pruned);
        let record: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(pruned.join("distillery_prune.json")).unwrap(),
        )
        .unwrap();
        let kept: Vec<usize> = serde_json::from_value(record["kept"]["layers"].clone()).unwrap();
        for (j, l) in kept.iter().enumerate() {
            assert_eq!(
                s.config.layer_types[j], teacher.config.layer_types[*l],
                "{arch:?}"
            );
            assert_eq!(
                s.config.layer_window(j),
                teacher.config.layer_window(*l),
                "{arch:?}"
            );
            assert_eq!(
                s.config.layer_rope(j),
                teacher.config.layer_rope(*l),
                "{arch:?}"
            );
        }
        let names: Vec<String> = s.named_vars().into_iter().map(|(n, _)| n).collect();
        assert!(names.iter().any(|n| n.ends_with("self_attn.q_norm.weight")));
        if arch == Arch::Gemma3 {
            assert!(names
                .iter()
                .any(|n| n.ends_with("post_feedforward_layernorm.weight")));
        }
        let x = Tensor::new(&[[72u32, 101, 108, 108, 111]], &Device::Cpu).unwrap();
        assert_eq!(s.forward(&x).unwrap().dims(), &[1, 5, 260]);
    }
}
