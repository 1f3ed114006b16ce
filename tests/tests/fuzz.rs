//! The test suite's fuzzing: for every parser target, its seed corpus (`fuzz/seeds/<target>/`,
//! the one `scripts/fuzz.sh` starts libFuzzer from), every input that ever crashed it
//! (`fuzz/regressions/<target>/`), then thousands of seeded mutations, through the same
//! `fuzz_targets` functions libFuzzer calls; nothing may panic. `DISTILLERY_FUZZ_SEED` and
//! `DISTILLERY_FUZZ_INPUTS` change the seed and the number of mutated inputs per target.

use std::path::PathBuf;
use std::time::Duration;

use distillery_tests::mutate;

fn fuzz_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz")
}

fn env_u64(key: &str) -> Option<u64> {
    std::env::var(key).ok().and_then(|v| v.parse().ok())
}

/// Runs one target: seeds and regressions must exist and pass, then `inputs` mutations.
fn check(name: &str, target: fn(&[u8]), inputs: usize, max_len: usize) {
    let seeds: Vec<Vec<u8>> = mutate::read_dir_files(&fuzz_dir().join("seeds").join(name))
        .into_iter()
        .map(|(_, b)| b)
        .collect();
    assert!(
        !seeds.is_empty(),
        "fuzz/seeds/{name}/ holds no seed (regenerate the generated ones with `cargo test -p distillery-tests --test fuzz -- --ignored write_seeds`)"
    );
    let regressions = mutate::read_dir_files(&fuzz_dir().join("regressions").join(name));
    for (path, input) in &regressions {
        let r = std::panic::catch_unwind(|| target(input));
        assert!(
            r.is_ok(),
            "{name}: regression input {} panics again",
            path.display()
        );
    }
    let seed = env_u64("DISTILLERY_FUZZ_SEED").unwrap_or(0x5eed_0016);
    let inputs = env_u64("DISTILLERY_FUZZ_INPUTS").map_or(inputs, |n| n as usize);
    let report = mutate::run(name, target, &seeds, inputs, seed, max_len);
    println!(
        "{name}: {} inputs ({} seeds, {} regressions), {} crashes, slowest input {:?}",
        report.inputs,
        seeds.len(),
        regressions.len(),
        report.failures.len(),
        report.slowest
    );
    let failures: Vec<String> = report.failures.iter().map(|f| f.to_string()).collect();
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    // A hang shows as one input taking seconds (debug build, a shared CI machine: generous).
    assert!(
        report.slowest < Duration::from_secs(10),
        "{name}: one input took {:?}",
        report.slowest
    );
}

macro_rules! fuzz_tests {
    ($($name:ident => $f:path, $inputs:expr, $max:expr;)*) => {
        $(
            #[test]
            fn $name() {
                check(stringify!($name), $f, $inputs, $max);
            }
        )*
    };
}

use distillery_coordinator::fuzz_targets as coordinator;
use distillery_proto::fuzz_targets as proto;
use distillery_worker::fuzz_targets as worker;

fuzz_tests! {
    spec_toml => coordinator::spec_toml, 6000, 1 << 14;
    machine_events => coordinator::machine_events, 2500, 600;
    teacher_shape => coordinator::teacher_shape, 4000, 1 << 16;
    gguf_file => proto::gguf_file, 6000, 1 << 16;
    artifact_manifest => proto::artifact_manifest, 8000, 1 << 14;
    config_json => worker::config_json, 8000, 1 << 14;
    gguf_model => worker::gguf_model, 3000, 1 << 16;
    tokenizer_json => worker::tokenizer_json, 3000, 1 << 16;
    tokenizer_config => worker::tokenizer_config, 5000, 1 << 14;
    generation_config => worker::generation_config, 8000, 1 << 14;
    safetensors => worker::safetensors, 6000, 1 << 16;
    safetensors_index => worker::safetensors_index, 5000, 1 << 14;
    judge_verdict => worker::judge_verdict, 8000, 1 << 13;
    judge_files => worker::judge_files, 6000, 1 << 14;
    corpus => worker::corpus, 5000, 1 << 14;
    openai_request => worker::openai_request, 8000, 1 << 14;
    prune_record => worker::prune_record, 5000, 1 << 14;
}

/// Writes the generated seeds (run by hand when a format changes; the files are committed):
/// a GGUF model as `write_gguf` writes it, tokenizer.json files, safetensors scores files.
#[test]
#[ignore = "writes fuzz/seeds/; run by hand when a format changes"]
fn write_seeds() {
    use candle_core::{DType, Device, Tensor};
    use distillery_worker::model::gguf::write_gguf;
    use distillery_worker::model::test_model::{test_config, test_model, TestModelSpec};
    use distillery_worker::model::tokenizer::{self, GgufVocab};
    use distillery_worker::prune::importance::{DepthScores, Importance};

    let seeds = fuzz_dir().join("seeds");
    let spec = TestModelSpec {
        hidden_size: 8,
        intermediate_size: 16,
        num_layers: 1,
        num_heads: 2,
        num_kv_heads: 1,
        tie_word_embeddings: true,
        ..TestModelSpec::default()
    };
    let m = test_model(&spec, DType::F32, &Device::Cpu).unwrap();
    let tok = tokenizer::byte_level().unwrap();
    for dir in ["gguf_file", "gguf_model"] {
        write_gguf(
            &m,
            &seeds.join(dir).join("write-gguf-f16.gguf"),
            &|_, _| candle_core::quantized::GgmlDType::F16,
            Some(&tok),
            Some("{% for m in messages %}{{ m.content }}{% endfor %}"),
        )
        .unwrap();
    }
    std::fs::write(
        seeds.join("tokenizer_json/byte-level.json"),
        tok.to_string(true).unwrap(),
    )
    .unwrap();
    let spm = GgufVocab {
        model: "llama".into(),
        tokens: [
            "<unk>",
            "<s>",
            "</s>",
            "<0x0A>",
            "\u{2581}",
            "t",
            "h",
            "th",
            "\u{2581}th",
        ]
        .map(String::from)
        .to_vec(),
        types: vec![2, 3, 3, 6, 1, 1, 1, 1, 1],
        scores: vec![0.0, 0.0, 0.0, 0.0, -1.0, -2.0, -3.0, -4.0, -5.0],
        merges: Vec::new(),
        add_bos: Some(1),
    };
    let t = tokenizer::sentencepiece_bpe(&spm).unwrap();
    std::fs::write(
        seeds.join("tokenizer_json/sentencepiece-bpe.json"),
        t.to_string(true).unwrap(),
    )
    .unwrap();
    let bpe = GgufVocab {
        model: "gpt2".into(),
        tokens: ["h", "e", "l", "o", "he", "ll", "hell", "<|endoftext|>"]
            .map(String::from)
            .to_vec(),
        types: vec![1, 1, 1, 1, 1, 1, 1, 3],
        scores: Vec::new(),
        merges: ["h e", "l l", "he ll"].map(String::from).to_vec(),
        add_bos: None,
    };
    let t = tokenizer::byte_level_bpe(&bpe).unwrap();
    std::fs::write(
        seeds.join("tokenizer_json/byte-level-bpe.json"),
        t.to_string(true).unwrap(),
    )
    .unwrap();
    let cfg = test_config(&TestModelSpec {
        hidden_size: 4,
        intermediate_size: 8,
        num_layers: 2,
        num_heads: 2,
        num_kv_heads: 1,
        ..TestModelSpec::default()
    })
    .unwrap();
    Importance::new(&cfg)
        .save(&seeds.join("safetensors/scores.safetensors"))
        .unwrap();
    DepthScores {
        layers: vec![0, 1],
        ppl_skip: vec![3.5, 4.0],
        ppl_full: 3.0,
    }
    .save(&seeds.join("safetensors/depth-scores.safetensors"))
    .unwrap();
    let x = Tensor::new(&[[1f32, 2.0], [3.0, 4.0]], &Device::Cpu).unwrap();
    candle_core::safetensors::save(
        &std::collections::HashMap::from([
            ("a".to_string(), x.clone()),
            ("b".to_string(), x.to_dtype(DType::BF16).unwrap()),
        ]),
        seeds.join("safetensors/plain.safetensors"),
    )
    .unwrap();
}

/// The harness itself: a target that panics on some inputs is caught, and the failure names
/// the seed and the exact input (hex), the same on every run with that seed.
#[test]
fn the_mutation_run_reports_each_panicking_input_with_its_seed() {
    fn picky(data: &[u8]) {
        if data.len() > 3 && data[3] == 0 {
            panic!("byte 3 is zero");
        }
    }
    let seeds = [b"abcdef".to_vec()];
    let a = mutate::run("picky", picky, &seeds, 3000, 11, 64);
    let b = mutate::run("picky", picky, &seeds, 3000, 11, 64);
    assert!(
        !a.failures.is_empty(),
        "no mutation zeroed byte 3 in 3000 inputs"
    );
    assert!(a.failures.len() <= 5, "the run stops after 5 failures");
    for f in &a.failures {
        assert_eq!(f.seed, 11);
        assert_eq!(f.message, "byte 3 is zero");
        let input = mutate::unhex(&f.input_hex).expect("hex");
        assert_eq!(input[3], 0);
        assert!(f.to_string().contains("DISTILLERY_FUZZ_SEED=11"));
    }
    let inputs = |r: &mutate::Report| -> Vec<String> {
        r.failures.iter().map(|f| f.input_hex.clone()).collect()
    };
    assert_eq!(inputs(&a), inputs(&b));
    assert_eq!(a.inputs, b.inputs);
    assert!(a.inputs < 3001, "stopped early: {}", a.inputs);
}
