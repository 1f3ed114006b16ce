use std::path::Path;

use super::*;

/// A folder with a teacher (HF config and a chat template: 4 layers, 8 heads / 2 KV heads) and
/// data files.
pub(crate) fn fixture() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let m = dir.path().join("teacher");
    std::fs::create_dir_all(&m).unwrap();
    std::fs::write(
        m.join("config.json"),
        r#"{"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 8, "num_key_value_heads": 2,
            "num_hidden_layers": 4, "vocab_size": 256, "tie_word_embeddings": true}"#,
    )
    .unwrap();
    std::fs::write(
        m.join("chat_template.jinja"),
        "{% for m in messages %}{{ m.content }}{% endfor %}",
    )
    .unwrap();
    for f in [
        "calib.jsonl",
        "web.jsonl",
        "web-val.jsonl",
        "questions.jsonl",
    ] {
        std::fs::write(dir.path().join(f), "{\"text\": \"hello\"}\n").unwrap();
    }
    dir
}

const GOOD: &str = r#"
name = "tiny"
seed = 7
[teacher]
model = "teacher"
[data]
calibration = { path = "calib.jsonl", samples = 8, seq_len = 32 }
train = [ { name = "web", path = "web.jsonl", weight = 1.0 } ]
validation = [ { name = "web", path = "web-val.jsonl" } ]
[[rounds]]
target = { hidden_size = 48, num_attention_heads = 6, num_layers = 3 }
distill = { tokens = 1000, seq_len = 32, micro_batch = 2, world_size = 2 }
[[rounds]]
target = { num_layers = 2 }
depth_importance = "perplexity"
distill = { tokens = 1000 }
[evaluation]
perplexity = true
judge = { backend = "openai", base_url = "http://127.0.0.1:8000/v1", model = "judge", questions = "questions.jsonl" }
[gate]
max_perplexity_ratio = 1.5
min_win_rate = 0.25
on_fail = "extend_distill"
"#;

fn parse_in(dir: &Path, text: &str) -> Result<pb::CampaignSpec, SpecError> {
    parse(text, dir, FileChecks::Local)
}

#[test]
fn a_good_spec_resolves_paths_and_reads_the_teacher_shape() {
    let d = fixture();
    let s = parse_in(d.path(), GOOD).unwrap();
    let t = s.teacher.unwrap();
    assert!(Path::new(&t.model).is_absolute());
    let shape = t.shape.unwrap();
    assert_eq!(
        (
            shape.hidden_size,
            shape.num_layers,
            shape.num_key_value_heads
        ),
        (64, 4, 2)
    );
    assert_eq!(shape.params, distillery_proto::shape::param_count(&shape));
    assert_eq!(s.rounds.len(), 2);
    assert_eq!(s.rounds[0].distill.as_ref().unwrap().world_size, 2);
    assert_eq!(
        s.rounds[1].distill.as_ref().unwrap().seq_len,
        512,
        "defaults fill in"
    );
    assert_eq!(s.scheduling.unwrap().max_attempts, 3);
}

/// Each bad spec: (what to replace in GOOD, replacement, expected field, text in the message).
const BAD: &[(&str, &str, &str, &str)] = &[
    (
        "name = \"tiny\"",
        "name = \"tiny\"\nnmae = 1",
        "nmae",
        "unknown field",
    ),
    ("seed = 7", "seed = \"seven\"", "seed", "invalid type"),
    (
        "model = \"teacher\"",
        "model = \"nowhere\"",
        "teacher.model",
        "does not exist",
    ),
    (
        "model = \"teacher\"",
        "model = \"calib.jsonl\"",
        "teacher.model",
        "neither a Hugging Face",
    ),
    (
        "num_attention_heads = 6",
        "num_attention_heads = 5",
        "rounds[0].target.num_attention_heads",
        "must divide evenly into 2 KV groups (try 4 or 6)",
    ),
    (
        "hidden_size = 48",
        "hidden_size = 96",
        "rounds[0].target.hidden_size",
        "larger than the teacher's 64",
    ),
    (
        "target = { num_layers = 2 }",
        "target = { num_layers = 4 }",
        "rounds[1].target.num_layers",
        "larger than round 0's 3",
    ),
    (
        "world_size = 2",
        "world_size = 0",
        "rounds[0].distill.world_size",
        "at least 1",
    ),
    (
        "depth_importance = \"perplexity\"",
        "depth_importance = \"magic\"",
        "rounds[1].depth_importance",
        "not a method",
    ),
    (
        "depth_importance = \"perplexity\"",
        "depth_importance = \"perplexity\"\nwidth_importance = \"wanda\"",
        "rounds[1].width_importance",
        "not a width importance",
    ),
    (
        "web-val.jsonl",
        "missing-val.jsonl",
        "data.validation[0].path",
        "does not exist",
    ),
    (
        "calibration = { path = \"calib.jsonl\", samples = 8, seq_len = 32 }",
        "calibration = { path = \"calib.jsonl\", samples = 0 }",
        "data.calibration.samples",
        "at least 1",
    ),
    (
        "weight = 1.0",
        "weight = -1.0",
        "data.train[0].weight",
        "positive",
    ),
    (
        "on_fail = \"extend_distill\"",
        "on_fail = \"retry\"",
        "gate.on_fail",
        "not an action",
    ),
    (
        "min_win_rate = 0.25",
        "min_win_rate = 1.25",
        "gate.min_win_rate",
        "between 0 and 1",
    ),
    (
        "backend = \"openai\"",
        "backend = \"bard\"",
        "evaluation.judge.backend",
        "not a backend",
    ),
    (
        "target = { num_layers = 2 }",
        "target = { }",
        "rounds[1].target",
        "is empty",
    ),
    (
        "target = { num_layers = 2 }",
        "target = { params = 1.5 }",
        "rounds[1].target.params",
        "fraction",
    ),
    (
        "target = { num_layers = 2 }",
        "target = { params = 0.5, prefer = \"breadth\" }",
        "rounds[1].target.prefer",
        "\"width\" or \"depth\"",
    ),
    (
        "target = { num_layers = 2 }",
        "target = { num_layers = 2, prefer = \"depth\" }",
        "rounds[1].target.prefer",
        "parameter budget",
    ),
    (
        "distill = { tokens = 1000 }",
        "distill = { tokens = 1000, lr = 0.0 }",
        "rounds[1].distill.lr",
        "positive",
    ),
    (
        "[[rounds]]\ntarget = { num_layers = 2 }",
        "[[rounds]]\ntarget = { num_layers = 2, nlayers = 1 }",
        "rounds[1].target.nlayers",
        "unknown field",
    ),
];

#[test]
fn max_lost_is_optional_and_reaches_the_wire_spec() {
    let d = fixture();
    let s = parse_in(d.path(), GOOD).unwrap();
    assert_eq!(s.scheduling.unwrap().max_lost, None, "unlimited by default");
    let text = format!("{GOOD}\n[scheduling]\nmax_lost = 5\n");
    let s = parse_in(d.path(), &text).unwrap();
    let sched = s.scheduling.unwrap();
    assert_eq!((sched.max_lost, sched.max_attempts), (Some(5), 3));
    super::validate_wire(&s).unwrap();
    // It survives the protobuf encoding the coordinator stores.
    use prost::Message;
    let back = pb::CampaignSpec::decode(s.encode_to_vec().as_slice()).unwrap();
    assert_eq!(back.scheduling.unwrap().max_lost, Some(5));
    for (bad, needle) in [
        ("max_lost = -1", "invalid value"),
        ("max_lost = \"x\"", "invalid type"),
    ] {
        let text = format!("{GOOD}\n[scheduling]\n{bad}\n");
        let err = parse_in(d.path(), &text).expect_err(bad);
        assert!(err.field.starts_with("scheduling"), "{err}");
        assert!(err.message.contains(needle), "{bad}: {err}");
    }
}

#[test]
fn every_bad_spec_names_its_field_in_one_line() {
    let d = fixture();
    assert!(BAD.len() >= 12);
    for (from, to, field, needle) in BAD {
        assert!(GOOD.contains(from), "fixture lacks {from:?}");
        let text = GOOD.replacen(from, to, 1);
        let err = parse_in(d.path(), &text).expect_err(&format!("{to:?} must be refused"));
        assert_eq!(err.field, *field, "for {to:?}: {err}");
        assert!(err.message.contains(needle), "for {to:?}: {err}");
        assert!(!err.to_string().contains('\n'), "one line: {err}");
    }
}

#[test]
fn gate_rules_need_the_metrics_they_read() {
    let d = fixture();
    let text = GOOD.replace("perplexity = true", "perplexity = false");
    let err = parse_in(d.path(), &text).unwrap_err();
    assert_eq!(err.field, "gate.max_perplexity_ratio");
}

#[test]
fn dynamic_batch_loading_needs_a_reference_for_every_domain() {
    let d = fixture();
    let text = GOOD.replace(
        "validation = [ { name = \"web\", path = \"web-val.jsonl\" } ]",
        "validation = [ { name = \"web\", path = \"web-val.jsonl\" } ]\ndynamic_batch_loading = { reference_loss = { code = 1.0 } }",
    );
    let err = parse_in(d.path(), &text).unwrap_err();
    assert_eq!(err.field, "data.dynamic_batch_loading.reference_loss");
    let ok = GOOD.replace(
        "validation = [ { name = \"web\", path = \"web-val.jsonl\" } ]",
        "validation = [ { name = \"web\", path = \"web-val.jsonl\" } ]\ndynamic_batch_loading = { reference_loss = { web = 2.5 }, update_every = 10 }",
    );
    assert!(parse_in(d.path(), &ok)
        .unwrap()
        .data
        .unwrap()
        .dynamic_batch_loading
        .is_some());
}

#[test]
fn a_gguf_teacher_shape_is_read_from_its_metadata() {
    // A minimal GGUF v3 file: metadata and one F32 tensor (no output.weight: tied).
    fn s(out: &mut Vec<u8>, v: &str) {
        out.extend((v.len() as u64).to_le_bytes());
        out.extend(v.as_bytes());
    }
    fn kv_u32(out: &mut Vec<u8>, k: &str, v: u32) {
        s(out, k);
        out.extend(4u32.to_le_bytes());
        out.extend(v.to_le_bytes());
    }
    let mut b = b"GGUF".to_vec();
    b.extend(3u32.to_le_bytes());
    b.extend(1u64.to_le_bytes()); // tensors
    b.extend(9u64.to_le_bytes()); // kv pairs
    s(&mut b, "general.architecture");
    b.extend(8u32.to_le_bytes());
    s(&mut b, "llama");
    kv_u32(&mut b, "llama.embedding_length", 64);
    kv_u32(&mut b, "llama.feed_forward_length", 128);
    kv_u32(&mut b, "llama.attention.head_count", 8);
    kv_u32(&mut b, "llama.attention.head_count_kv", 2);
    kv_u32(&mut b, "llama.block_count", 4);
    s(&mut b, "llama.attention.layer_norm_rms_epsilon");
    b.extend(6u32.to_le_bytes());
    b.extend(1e-5f32.to_le_bytes());
    s(&mut b, "tokenizer.ggml.tokens");
    b.extend(9u32.to_le_bytes());
    b.extend(8u32.to_le_bytes());
    b.extend(3u64.to_le_bytes());
    for t in ["a", "b", "c"] {
        s(&mut b, t);
    }
    s(&mut b, "general.name");
    b.extend(8u32.to_le_bytes());
    s(&mut b, "tiny");
    s(&mut b, "token_embd.weight");
    b.extend(2u32.to_le_bytes());
    b.extend(64u64.to_le_bytes());
    b.extend(3u64.to_le_bytes());
    b.extend(0u32.to_le_bytes());
    b.extend(0u64.to_le_bytes());
    b.resize(b.len().div_ceil(32) * 32 + 64 * 3 * 4, 0);
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("m.gguf");
    std::fs::write(&p, &b).unwrap();
    let shape = source_model::read_shape(&p).unwrap();
    assert_eq!(
        (
            shape.hidden_size,
            shape.intermediate_size,
            shape.num_attention_heads,
            shape.num_key_value_heads,
            shape.num_layers,
            shape.vocab_size
        ),
        (64, 128, 8, 2, 4, 3)
    );
    assert!(shape.tie_word_embeddings);
    // The worker's import refuses a truncated file, so submit does too, with its words.
    std::fs::write(&p, &b[..b.len() - 1]).unwrap();
    let e = source_model::read_shape(&p).unwrap_err().to_string();
    assert!(
        e.contains("token_embd.weight") && e.contains("truncated"),
        "{e}"
    );
    std::fs::write(&p, b"GGUX").unwrap();
    assert!(source_model::read_shape(&p)
        .unwrap_err()
        .to_string()
        .contains("GGUF magic"));
}

#[test]
fn answers_need_a_chat_template_at_submit_time() {
    let d = fixture();
    let teacher = d.path().join("teacher");
    std::fs::remove_file(teacher.join("chat_template.jinja")).unwrap();
    let e = parse_in(d.path(), GOOD).unwrap_err();
    assert_eq!(e.field, "teacher.model");
    assert!(
        e.message.contains("has no chat template")
            && e.message.contains("chat_template = \"FILE\""),
        "{e}"
    );
    // Without a judge no answers are generated, so no template is needed.
    let no_judge = GOOD.replace(
        "judge = { backend = \"openai\", base_url = \"http://127.0.0.1:8000/v1\", model = \"judge\", questions = \"questions.jsonl\" }",
        "",
    );
    let no_judge = no_judge.replace("min_win_rate = 0.25\n", "");
    parse_in(d.path(), &no_judge).unwrap();
    // teacher.chat_template gives one; relative to the spec, checked and made absolute.
    std::fs::write(d.path().join("chatml.jinja"), "{{ messages[0].content }}").unwrap();
    let with = GOOD.replace(
        "model = \"teacher\"",
        "model = \"teacher\"\nchat_template = \"chatml.jinja\"",
    );
    let s = parse_in(d.path(), &with).unwrap();
    let t = s.teacher.unwrap().chat_template;
    assert!(
        Path::new(&t).is_absolute() && t.ends_with("chatml.jinja"),
        "{t}"
    );
    // A template that does not compile is refused by its field.
    std::fs::write(d.path().join("chatml.jinja"), "{% if %}").unwrap();
    let e = parse_in(d.path(), &with).unwrap_err();
    assert_eq!(e.field, "teacher.chat_template");
    assert!(e.message.contains("does not compile"), "{e}");
    let missing = GOOD.replace(
        "model = \"teacher\"",
        "model = \"teacher\"\nchat_template = \"nope.jinja\"",
    );
    assert_eq!(
        parse_in(d.path(), &missing).unwrap_err().field,
        "teacher.chat_template"
    );
}

#[test]
fn a_judge_template_is_for_a_local_judge_only() {
    let d = fixture();
    let openai = GOOD.replace(
        "questions = \"questions.jsonl\" }",
        "questions = \"questions.jsonl\", chat_template = \"t.jinja\" }",
    );
    std::fs::write(d.path().join("t.jinja"), "{{ messages[0].content }}").unwrap();
    let e = parse_in(d.path(), &openai).unwrap_err();
    assert_eq!(e.field, "evaluation.judge.chat_template");
    assert!(e.message.contains("backend = \"local\""), "{e}");
    // A local judge without a template of its own needs one.
    let judge = d.path().join("judge");
    std::fs::create_dir_all(&judge).unwrap();
    let local = GOOD.replace(
        "judge = { backend = \"openai\", base_url = \"http://127.0.0.1:8000/v1\", model = \"judge\", questions = \"questions.jsonl\" }",
        "judge = { backend = \"local\", model = \"judge\", questions = \"questions.jsonl\" }",
    );
    let e = parse_in(d.path(), &local).unwrap_err();
    assert_eq!(e.field, "evaluation.judge.model");
    assert!(
        e.message.contains("local judge needs a chat template"),
        "{e}"
    );
    let given = local.replace(
        "questions = \"questions.jsonl\" }",
        "questions = \"questions.jsonl\", chat_template = \"t.jinja\" }",
    );
    let s = parse_in(d.path(), &given).unwrap();
    let j = s.evaluation.unwrap().judge.unwrap();
    assert!(j.chat_template.ends_with("t.jinja"), "{}", j.chat_template);
}

/// `GOOD` with round 0 searching `k` candidates at 70% of the teacher's parameters.
fn searching(k: &str, extra: &str) -> String {
    GOOD.replacen(
        "target = { hidden_size = 48, num_attention_heads = 6, num_layers = 3 }",
        &format!(
            "target = {{ params = 0.7 }}\nsearch = {{ candidates = {k}, tokens = 200 {extra}}}"
        ),
        1,
    )
}

#[test]
fn a_search_and_a_teacher_correction_reach_the_wire_spec() {
    let d = fixture();
    let text = format!(
        "{}\n[teacher_correction]\ntokens = 5000\nlr = 0.0002\nseq_len = 16\nworld_size = 2\n",
        searching("3", ", by = \"perplexity\" ")
    );
    let s = parse_in(d.path(), &text).unwrap();
    let search = s.rounds[0].search.clone().unwrap();
    assert_eq!(
        (search.candidates, search.tokens, search.by.as_str()),
        (3, 200, "perplexity")
    );
    assert!(s.rounds[1].search.is_none());
    let tc = s.teacher_correction.unwrap();
    assert_eq!(
        (tc.tokens, tc.seq_len, tc.world_size, tc.lr),
        (5000, 16, 2, 0.0002)
    );
    assert_eq!((tc.micro_batch, tc.checkpoint_every), (4, 100), "defaults");
    // The default score is the KD loss.
    let s = parse_in(d.path(), &searching("2", "")).unwrap();
    assert_eq!(s.rounds[0].search.as_ref().unwrap().by, "kd_loss");
    validate_wire(&s).unwrap();
}

#[test]
fn a_bad_search_or_correction_is_refused_naming_the_field() {
    let d = fixture();
    let cases: Vec<(String, &str, &str)> =
        vec![
        (searching("0", ""), "rounds[0].search.candidates", "at least 1"),
        (searching("500", ""), "rounds[0].search.candidates", "ask for at most"),
        (searching("2", ", by = \"bleu\" "), "rounds[0].search.by", "kd_loss"),
        (
            searching("2", "").replace("tokens = 200", "tokens = 1000"),
            "rounds[0].search.tokens",
            "less than rounds[0].distill.tokens = 1000",
        ),
        (
            GOOD.replacen(
                "distill = { tokens = 1000, seq_len = 32",
                "search = { candidates = 2, tokens = 10 }\ndistill = { tokens = 1000, seq_len = 32",
                1,
            ),
            "rounds[0].search",
            "set rounds[0].target.params",
        ),
        (
            searching("2", "").replace("params = 0.7", "params = 0.7, prefer = \"depth\""),
            "rounds[0].target.prefer",
            "cannot be combined with search",
        ),
        (
            searching("2", "")
                .replace("validation = [ { name = \"web\", path = \"web-val.jsonl\" } ]\n", "")
                .replace("perplexity = true", "perplexity = false")
                .replace("max_perplexity_ratio = 1.5\n", "")
                .replace("depth_importance = \"perplexity\"\n", ""),
            "rounds[0].search.by",
            "needs validation data",
        ),
        (
            format!("{GOOD}\n[teacher_correction]\nlr = 0.001\n"),
            "teacher_correction",
            "missing field `tokens`",
        ),
        (
            format!("{GOOD}\n[teacher_correction]\ntokens = 0\n"),
            "teacher_correction.tokens",
            "at least one token",
        ),
        (
            format!("{GOOD}\n[teacher_correction]\ntokens = 10\nworld_size = 0\n"),
            "teacher_correction.world_size",
            "at least 1",
        ),
        (
            format!("{GOOD}\n[teacher_correction]\ntokens = 10\nlr = -1.0\n"),
            "teacher_correction.lr",
            "positive",
        ),
        (
            format!("{GOOD}\n[teacher_correction]\ntokens = 10\nepochs = 2\n"),
            "teacher_correction.epochs",
            "unknown field",
        ),
    ];
    for (text, field, needle) in cases {
        let err = parse_in(d.path(), &text).expect_err(&format!("{field} must be refused"));
        assert_eq!(err.field, field, "{err}");
        assert!(err.message.contains(needle), "{field}: {err}");
        assert!(!err.to_string().contains('\n'), "one line: {err}");
    }
    // The coordinator refuses the same over the wire, for a spec made by hand.
    let mut s = parse_in(d.path(), &searching("2", "")).unwrap();
    s.rounds[0].search.as_mut().unwrap().candidates = 500;
    let err = validate_wire(&s).unwrap_err();
    assert_eq!(err.field, "rounds[0].search.candidates", "{err}");
}

/// `distill = { tokens = 1000 }` of round 1 (2 layers, from a 4-layer teacher) replaced by `d`.
fn with_round1_distill(d: &str) -> String {
    GOOD.replacen("distill = { tokens = 1000 }", d, 1)
}

#[test]
fn the_loss_family_reaches_the_wire_spec_with_its_defaults() {
    let d = fixture();
    let s = parse_in(d.path(), GOOD).unwrap();
    let plain = s.rounds[1].distill.clone().unwrap();
    assert_eq!(
        (plain.loss.as_str(), plain.top_k, plain.hidden.is_none()),
        ("forward_kl", 0, true)
    );
    let dist = |text: &str| {
        parse_in(d.path(), &with_round1_distill(text))
            .unwrap_or_else(|e| panic!("{text}: {e}"))
            .rounds[1]
            .distill
            .clone()
            .unwrap()
    };
    let skew = dist("distill = { tokens = 1000, loss = \"skew_kl\" }");
    assert_eq!((skew.loss.as_str(), skew.skew_alpha), ("skew_kl", 0.1));
    let jsd = dist("distill = { tokens = 1000, loss = \"jsd\", jsd_beta = 0.9, top_k = 16 }");
    assert_eq!((jsd.jsd_beta, jsd.top_k, jsd.skew_alpha), (0.9, 16, 0.0));
    let ce = dist("distill = { tokens = 1000, loss = \"ce\" }");
    assert_eq!(ce.loss, "ce");
    let auto = dist("distill = { tokens = 1000, hidden = { pairs = \"auto\" } }");
    let h = auto.hidden.unwrap();
    assert!(h.auto_pairs && h.pairs.is_empty());
    assert_eq!(h.loss, "cosine");
    let listed = dist(
        "distill = { tokens = 1000, loss = \"reverse_kl\", hidden = { pairs = [[0, 1], [1, 3]], loss = \"mse\" } }",
    );
    let h = listed.hidden.unwrap();
    assert_eq!(
        h.pairs
            .iter()
            .map(|p| (p.student, p.teacher))
            .collect::<Vec<_>>(),
        vec![(0, 1), (1, 3)]
    );
    assert_eq!((h.loss.as_str(), h.auto_pairs), ("mse", false));
    // The parsed spec passes the server's wire check too.
    validate_wire(
        &parse_in(
            d.path(),
            &with_round1_distill(
                "distill = { tokens = 1000, loss = \"jsd\", hidden = { pairs = \"auto\" } }",
            ),
        )
        .unwrap(),
    )
    .unwrap();
    let mut bad = parse_in(d.path(), GOOD).unwrap();
    bad.rounds[0].distill.as_mut().unwrap().skew_alpha = 1.0;
    let e = validate_wire(&bad).unwrap_err();
    assert_eq!(e.field, "rounds[0].distill.skew_alpha", "{e}");
    let mut bad = parse_in(d.path(), GOOD).unwrap();
    bad.rounds[0].distill.as_mut().unwrap().loss = "kl".into();
    assert_eq!(
        validate_wire(&bad).unwrap_err().field,
        "rounds[0].distill.loss"
    );
}

#[test]
fn a_bad_loss_setting_is_refused_with_its_field() {
    let d = fixture();
    for (distill, field, needle) in [
        ("loss = \"kl\"", "rounds[1].distill.loss", "not a loss"),
        (
            "loss = \"skew_kl\", skew_alpha = 1.0",
            "rounds[1].distill.skew_alpha",
            "(0, 1)",
        ),
        (
            "loss = \"skew_kl\", skew_alpha = 0.0",
            "rounds[1].distill.skew_alpha",
            "(0, 1)",
        ),
        (
            "loss = \"skew_kl\", skew_alpha = -0.5",
            "rounds[1].distill.skew_alpha",
            "(0, 1)",
        ),
        (
            "skew_alpha = 0.2",
            "rounds[1].distill.skew_alpha",
            "only applies to loss = \"skew_kl\"",
        ),
        (
            "loss = \"jsd\", jsd_beta = 1.0",
            "rounds[1].distill.jsd_beta",
            "(0, 1)",
        ),
        (
            "loss = \"reverse_kl\", jsd_beta = 0.5",
            "rounds[1].distill.jsd_beta",
            "only applies",
        ),
        ("top_k = 0", "rounds[1].distill.top_k", "at least 1"),
        (
            "top_k = 257",
            "rounds[1].distill.top_k",
            "vocabulary of 256",
        ),
        (
            "loss = \"ce\", top_k = 8",
            "rounds[1].distill.top_k",
            "loss = \"ce\"",
        ),
        (
            "loss = \"ce\", ce_weight = 0.5",
            "rounds[1].distill.ce_weight",
            "remove ce_weight",
        ),
        (
            "hidden = { pairs = \"all\" }",
            "rounds[1].distill.hidden.pairs",
            "not a mapping",
        ),
        (
            "hidden = { pairs = [] }",
            "rounds[1].distill.hidden.pairs",
            "is empty",
        ),
        (
            "hidden = { pairs = [[0, 1, 2]] }",
            "rounds[1].distill.hidden.pairs[0]",
            "not a pair",
        ),
        (
            "hidden = { pairs = [[0, 4]] }",
            "rounds[1].distill.hidden.pairs[0]",
            "teacher layer 4 does not exist",
        ),
        (
            "hidden = { pairs = [[0, 1], [2, 3]] }",
            "rounds[1].distill.hidden.pairs[1]",
            "student layer 2 does not exist",
        ),
        (
            "hidden = { pairs = [[0, 1], [0, 3]] }",
            "rounds[1].distill.hidden.pairs[1]",
            "paired twice",
        ),
        (
            "hidden = { pairs = \"auto\", loss = \"l1\" }",
            "rounds[1].distill.hidden.loss",
            "not a hidden-state loss",
        ),
        (
            "hidden = { pairs = \"auto\", layers = 3 }",
            "rounds[1].distill.hidden.layers",
            "unknown field",
        ),
    ] {
        let text = with_round1_distill(&format!("distill = {{ tokens = 1000, {distill} }}"));
        let err = parse_in(d.path(), &text).expect_err(distill);
        assert_eq!(err.field, field, "{distill}: {err}");
        assert!(err.message.contains(needle), "{distill}: {err}");
        assert!(!err.to_string().contains('\n'), "one line: {err}");
    }
}

#[test]
fn taylor_depth_is_a_third_criterion_that_keeps_six_blocks() {
    let d = fixture();
    let text = GOOD.replace(
        "depth_importance = \"perplexity\"",
        "depth_importance = \"taylor\"",
    );
    // Round 1 goes from 3 layers to 2: Taylor+ keeps the first four and last two of 3 layers,
    // so none may go.
    let err = parse_in(d.path(), &text).unwrap_err();
    assert_eq!(err.field, "rounds[1].target.num_layers", "{err}");
    assert!(err.message.contains("first four and the last two"), "{err}");
    // Without dropping layers it is fine.
    let ok = text.replace(
        "target = { num_layers = 2 }",
        "target = { hidden_size = 42 }",
    );
    let s = parse_in(d.path(), &ok).unwrap();
    assert_eq!(s.rounds[1].depth_importance, "taylor");
}

/// The spec's folder with FastChat-format files copied from `tests/fixtures/fastchat`.
fn mtbench_fixture() -> tempfile::TempDir {
    let d = fixture();
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/fastchat");
    for f in [
        "judge_prompts.jsonl",
        "question.jsonl",
        "reference_answer/reference.jsonl",
    ] {
        let to = d.path().join(Path::new(f).file_name().unwrap());
        std::fs::copy(src.join(f), to).unwrap();
    }
    d
}

fn mtbench_spec(judge_extra: &str, gate: &str) -> String {
    GOOD.replace(
        "judge = { backend = \"openai\", base_url = \"http://127.0.0.1:8000/v1\", model = \"judge\", questions = \"questions.jsonl\" }",
        &format!("judge = {{ backend = \"openai\", base_url = \"http://127.0.0.1:8000/v1\", model = \"judge\", questions = \"question.jsonl\", mode = \"mtbench\"{judge_extra} }}"),
    )
    .replace("min_win_rate = 0.25\n", gate)
}

#[test]
fn mtbench_needs_fastchat_prompts_and_every_reference_checked_at_submit() {
    let d = mtbench_fixture();
    let ok = mtbench_spec(
        ", prompts = \"judge_prompts.jsonl\", reference_answers = \"reference.jsonl\", ranking = true",
        "min_mtbench = 6.5\nmax_elo_drop = 40\n",
    );
    let s = parse_in(d.path(), &ok).unwrap();
    let j = s.evaluation.unwrap().judge.unwrap();
    assert!(Path::new(&j.prompts).is_absolute() && j.ranking && j.samples == 1);
    assert_eq!(s.gate.unwrap().min_mtbench, Some(6.5));
    // No prompts file.
    let e = parse_in(d.path(), &mtbench_spec("", "")).unwrap_err();
    assert_eq!(e.field, "evaluation.judge.prompts");
    assert!(e.message.contains("judge_prompts.jsonl"), "{e}");
    // No references: the math question (111) has no `reference` of its own.
    let e = parse_in(
        d.path(),
        &mtbench_spec(", prompts = \"judge_prompts.jsonl\"", ""),
    )
    .unwrap_err();
    assert_eq!(e.field, "evaluation.judge.questions");
    assert!(
        e.message.contains("question 111") && e.message.contains("reference_answers"),
        "{e}"
    );
    // A prompt file missing a prompt the mode needs.
    let text = std::fs::read_to_string(d.path().join("judge_prompts.jsonl")).unwrap();
    let short: String = text
        .lines()
        .filter(|l| !l.contains("\"single-v1-multi-turn\""))
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(d.path().join("short.jsonl"), short).unwrap();
    let e = parse_in(
        d.path(),
        &mtbench_spec(
            ", prompts = \"short.jsonl\", reference_answers = \"reference.jsonl\"",
            "",
        ),
    )
    .unwrap_err();
    assert_eq!(e.field, "evaluation.judge.prompts");
    assert!(e.message.contains("\"single-v1-multi-turn\""), "{e}");
    // Gate rules need their figures; samples need a temperature.
    let e = parse_in(
        d.path(),
        &GOOD.replace("min_win_rate = 0.25\n", "min_mtbench = 6.0\n"),
    )
    .unwrap_err();
    assert_eq!(e.field, "gate.min_mtbench");
    let e = parse_in(
        d.path(),
        &GOOD.replace("min_win_rate = 0.25\n", "max_elo_drop = 10\n"),
    )
    .unwrap_err();
    assert_eq!(e.field, "gate.max_elo_drop");
    let e = parse_in(
        d.path(),
        &GOOD.replace(
            "questions = \"questions.jsonl\" }",
            "questions = \"questions.jsonl\", samples = 3, temperature = 0.0 }",
        ),
    )
    .unwrap_err();
    assert_eq!(e.field, "evaluation.judge.temperature");
    let s = parse_in(
        d.path(),
        &GOOD.replace(
            "questions = \"questions.jsonl\" }",
            "questions = \"questions.jsonl\", samples = 3 }",
        ),
    )
    .unwrap();
    assert_eq!(s.evaluation.unwrap().judge.unwrap().temperature, 0.7);
    let e = parse_in(
        d.path(),
        &GOOD.replace(
            "questions = \"questions.jsonl\" }",
            "questions = \"questions.jsonl\", prompts = \"judge_prompts.jsonl\" }",
        ),
    )
    .unwrap_err();
    assert_eq!(e.field, "evaluation.judge.prompts");
    let e = parse_in(
        d.path(),
        &GOOD.replace(
            "questions = \"questions.jsonl\" }",
            "questions = \"questions.jsonl\", verdicts = \"seven\" }",
        ),
    )
    .unwrap_err();
    assert_eq!(e.field, "evaluation.judge.verdicts");
    let e = parse_in(
        d.path(),
        &GOOD.replace("questions = \"questions.jsonl\" }", "questions = \"questions.jsonl\", second = { backend = \"openai\", base_url = \"ftp://x\", model = \"j2\" } }"),
    )
    .unwrap_err();
    assert_eq!(e.field, "evaluation.judge.second.base_url");
}
