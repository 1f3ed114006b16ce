//! `coordinator demo`: the whole system on one machine with nothing but the repository. It writes
//! a corpus (a deterministic generator of simple English), trains a small teacher on it, starts an
//! embedded coordinator and in-process workers, runs the two-round example campaign (score,
//! prune, distill, evaluate with perplexity and a local pairwise judge, gate), and prints a report.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use distillery_proto::client::Target;
use distillery_proto::v1 as pb;
use distillery_worker::agent::{Agent, AgentConfig};
use distillery_worker::collective::Solo;
use distillery_worker::distill::data::Domain;
use distillery_worker::distill::train::{TrainConfig, Trainer};
use distillery_worker::model::io::{load_dir, save_dir};
use distillery_worker::model::test_model::{write_test_model, TestModelSpec};
use distillery_worker::model::tokenizer;

use crate::cli::{campaign_json, watch, CliError, ClientOpts};
use crate::server::{self, ServeOptions};
use crate::spec;

/// What the demo is given.
#[derive(Debug, Clone)]
pub struct DemoArgs {
    pub workers: usize,
    pub dir: PathBuf,
    /// Teacher training budget.
    pub teacher_seconds: u64,
    pub teacher_steps: u64,
}

const QUESTIONS: &str = include_str!("../../worker/data/questions.jsonl");

/// A deterministic corpus of simple English: enough structure for a small model to learn.
pub fn corpus(docs: usize, seed: u64) -> Vec<String> {
    let subjects = [
        "the cat",
        "a dog",
        "the old man",
        "my sister",
        "the farmer",
        "a small bird",
        "the teacher",
        "our neighbour",
    ];
    let verbs = [
        "sees", "likes", "finds", "carries", "paints", "follows", "calls", "watches",
    ];
    let objects = [
        "the red ball",
        "a green apple",
        "the long river",
        "a wooden box",
        "the bright moon",
        "an old book",
        "the quiet garden",
        "a warm coat",
    ];
    let places = [
        "in the morning",
        "near the hill",
        "after dinner",
        "by the sea",
        "under the tree",
        "at the market",
        "in the rain",
        "before dawn",
    ];
    let mut state = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut pick = |n: usize| {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state % n as u64) as usize
    };
    (0..docs)
        .map(|_| {
            let sentences = 3 + pick(4);
            let mut d = String::new();
            for _ in 0..sentences {
                let s = subjects[pick(subjects.len())];
                let mut first = s.chars();
                let cap: String = first
                    .next()
                    .map(|c| c.to_uppercase().collect::<String>())
                    .unwrap_or_default()
                    + first.as_str();
                let _ = write!(
                    d,
                    "{cap} {} {} {}. ",
                    verbs[pick(verbs.len())],
                    objects[pick(objects.len())],
                    places[pick(places.len())]
                );
            }
            d.trim_end().to_string()
        })
        .collect()
}

fn write_jsonl(path: &Path, docs: &[String]) -> Result<(), CliError> {
    let mut s = String::new();
    for d in docs {
        s.push_str(&serde_json::json!({ "text": d }).to_string());
        s.push('\n');
    }
    std::fs::write(path, s).map_err(|e| CliError::other(format!("{}: {e}", path.display())))
}

/// Trains the demo's teacher (cross-entropy only) and saves it as a Hugging Face directory.
fn train_teacher(
    dir: &Path,
    train: &[String],
    seconds: u64,
    steps: u64,
) -> Result<(f64, u64), CliError> {
    let err = |e: &dyn std::fmt::Display| CliError::other(format!("teacher: {e}"));
    let spec = TestModelSpec {
        hidden_size: 128,
        intermediate_size: 384,
        num_layers: 4,
        num_heads: 4,
        num_kv_heads: 2,
        tie_word_embeddings: true,
        seed: 1,
        ..Default::default()
    };
    write_test_model(dir, &spec).map_err(|e| err(&e))?;
    let model =
        load_dir(dir, candle_core::DType::F32, &candle_core::Device::Cpu).map_err(|e| err(&e))?;
    let tok = tokenizer::byte_level().map_err(|e| err(&e))?;
    let seq_len = 64;
    let sequences = distillery_worker::data::pack(&tok, train, Some(257), seq_len + 1, 1 << 20)
        .map_err(|e| err(&e))?;
    let cfg = TrainConfig {
        seq_len,
        micro_batch: 8,
        global_batch: 8,
        total_steps: steps,
        lr: 3e-3,
        warmup_steps: 10,
        temperature: 1.0,
        ce_weight: 1.0,
        seed: 7,
        max_grad_norm: 1.0,
        weight_decay: 0.01,
        dynamic: None,
        precision: Default::default(),
        shard_optimizer: false,
        recompute: false,
    };
    let mut solo = Solo;
    let domains = vec![Domain {
        name: "stories".into(),
        sequences,
    }];
    let mut t =
        Trainer::new(model, None, cfg, &mut solo, domains, &[1.0], vec![]).map_err(|e| err(&e))?;
    let start = Instant::now();
    let mut loss = f64::NAN;
    while t.step < steps && start.elapsed() < Duration::from_secs(seconds) {
        let s = t.train_step().map_err(|e| err(&e))?;
        loss = s.loss;
        if s.step % 20 == 0 {
            println!(
                "  teacher step {:>4}  loss {:.3}  ({:.0} s)",
                s.step,
                s.loss,
                start.elapsed().as_secs_f64()
            );
        }
    }
    let steps_done = t.step;
    save_dir(&t.student, dir, Some(dir)).map_err(|e| err(&e))?;
    Ok((loss, steps_done))
}

/// The example campaign over the demo's files.
pub fn campaign_toml(dir: &Path, world_size: usize) -> String {
    let p = |f: &str| dir.join(f).display().to_string();
    format!(
        r#"name = "demo"
seed = 42
[teacher]
model = "{teacher}"
[data]
calibration = {{ path = "{calib}", samples = 32, seq_len = 64 }}
train = [ {{ name = "stories", path = "{train}", weight = 1.0 }} ]
validation = [ {{ name = "stories", path = "{val}" }} ]
[[rounds]]
target = {{ hidden_size = 96, intermediate_size = 256 }}
depth_importance = "block_importance"
distill = {{ tokens = 40_000, seq_len = 64, micro_batch = 4, world_size = {ws}, lr = 2e-3, warmup_steps = 5, temperature = 2.0, checkpoint_every = 25 }}
[[rounds]]
target = {{ hidden_size = 80, intermediate_size = 192, num_layers = 3 }}
depth_importance = "perplexity"
distill = {{ tokens = 40_000, seq_len = 64, micro_batch = 4, world_size = {ws}, lr = 2e-3, warmup_steps = 5, temperature = 2.0, checkpoint_every = 25 }}
[evaluation]
perplexity = true
judge = {{ backend = "local", model = "{teacher}", mode = "pairwise", questions = "{questions}", baseline = "teacher", max_tokens = 24 }}
[gate]
max_perplexity_ratio = 3.0
on_fail = "extend_distill"
"#,
        teacher = p("teacher"),
        calib = p("data/calib.jsonl"),
        train = p("data/train.jsonl"),
        val = p("data/val.jsonl"),
        questions = p("data/questions.jsonl"),
        ws = world_size,
    )
}

/// The report: a row per round.
pub fn report(c: &pb::Campaign, student_dir: &Path) -> String {
    let v = campaign_json(c);
    let mut s = String::new();
    let _ = writeln!(
        s,
        "\ncampaign {} ({}): {}",
        c.id,
        c.name,
        v["state"].as_str().unwrap_or("?")
    );
    let _ = writeln!(
        s,
        "{:<6} {:>10} {:>12} {:>12} {:>8} {:>22} {:>10} {:>9}",
        "round",
        "params",
        "perplexity",
        "teacher ppl",
        "ratio",
        "judge W/T/L (win rate)",
        "tokens",
        "tok/s"
    );
    for r in v["rounds"].as_array().into_iter().flatten() {
        let m = &r["metrics"];
        let f = |x: &serde_json::Value| x.as_f64();
        let ppl = f(&m["perplexity"]);
        let tppl = f(&m["teacher_perplexity"]);
        let j = &m["judge"];
        let judge = match (f(&j["wins"]), f(&j["ties"]), f(&j["losses"])) {
            (Some(w), Some(t), Some(l)) => format!(
                "{w:.0}/{t:.0}/{l:.0} ({})",
                f(&j["win_rate"]).map_or("-".into(), |x| format!("{x:.2}"))
            ),
            _ => "-".into(),
        };
        let opt = |x: Option<f64>, p: usize| x.map_or("-".to_string(), |x| format!("{x:.p$}"));
        let _ = writeln!(
            s,
            "{:<6} {:>10} {:>12} {:>12} {:>8} {:>22} {:>10} {:>9}",
            r["index"].as_u64().unwrap_or(0),
            r["params"].as_u64().map_or("-".into(), |p| p.to_string()),
            opt(ppl, 2),
            opt(tppl, 2),
            opt(ppl.zip(tppl).map(|(a, b)| a / b), 2),
            judge,
            opt(f(&m["distill"]["tokens"]), 0),
            opt(f(&m["distill"]["tokens_per_s"]), 0),
        );
    }
    for r in &c.rounds {
        for x in &r.candidates {
            let _ = writeln!(s, "round {} {}", r.index, crate::cli::candidate_line(x));
        }
    }
    let mode = c
        .spec
        .as_ref()
        .and_then(|s| s.evaluation.as_ref())
        .and_then(|e| e.judge.as_ref())
        .map(|j| j.mode.as_str());
    for r in &c.rounds {
        let m: std::collections::BTreeMap<String, f64> = r.metrics.clone().into_iter().collect();
        if m.keys().any(|k| k.starts_with("judge.")) {
            for line in crate::cli::judge_lines(r.index, mode, &m) {
                let _ = writeln!(s, "round {}: {line}", r.index);
            }
        }
    }
    let _ = writeln!(s, "student: {}", student_dir.display());
    s
}

/// Runs the demo; returns the exit code.
pub async fn run(a: DemoArgs) -> Result<i32, CliError> {
    let dir = if a.dir.is_absolute() {
        a.dir.clone()
    } else {
        std::env::current_dir()
            .map_err(|e| CliError::other(e.to_string()))?
            .join(&a.dir)
    };
    let io = |p: &Path, e: std::io::Error| CliError::input(format!("--dir {}: {e}", p.display()));
    std::fs::create_dir_all(dir.join("data")).map_err(|e| io(&dir, e))?;
    println!(
        "distillery demo in {} with {} in-process workers",
        dir.display(),
        a.workers.max(1)
    );

    // 1. Data and the teacher.
    let docs = corpus(2400, 1);
    write_jsonl(&dir.join("data/train.jsonl"), &docs[..2000])?;
    write_jsonl(&dir.join("data/calib.jsonl"), &docs[2000..2200])?;
    write_jsonl(&dir.join("data/val.jsonl"), &docs[2200..])?;
    std::fs::write(dir.join("data/questions.jsonl"), QUESTIONS).map_err(|e| io(&dir, e))?;
    let teacher = dir.join("teacher");
    if teacher.join("model.safetensors").is_file() && teacher.join(".trained").is_file() {
        println!("teacher: reusing {}", teacher.display());
    } else {
        println!(
            "teacher: training a 4-layer model on the demo corpus (up to {} s)",
            a.teacher_seconds
        );
        let train = docs[..2000].to_vec();
        let t = teacher.clone();
        let (secs, steps) = (a.teacher_seconds, a.teacher_steps);
        let (loss, done) =
            tokio::task::spawn_blocking(move || train_teacher(&t, &train, secs, steps))
                .await
                .map_err(|e| CliError::other(e.to_string()))??;
        std::fs::write(
            teacher.join(".trained"),
            format!("{done} steps, loss {loss:.3}\n"),
        )
        .map_err(|e| io(&teacher, e))?;
        println!("teacher: {done} steps, final loss {loss:.3}");
    }

    // 2. The embedded coordinator and the workers.
    let mut opts = ServeOptions::new(
        "127.0.0.1:0"
            .parse()
            .map_err(|_| CliError::other("address"))?,
        dir.join("coordinator"),
    );
    opts.timing.heartbeat_interval = Duration::from_secs(1);
    opts.timing.poll_timeout = Duration::from_secs(5);
    let srv = server::start(opts)
        .await
        .map_err(|e| CliError::other(format!("coordinator: {e:#}")))?;
    let url = format!("http://{}", srv.addr);
    for i in 0..a.workers.max(1) {
        let cfg = AgentConfig {
            target: Target {
                url: url.clone(),
                token: None,
                ca_cert: None,
            },
            devices: vec!["cpu".into()],
            work_dir: dir.join(format!("workers/w{i}")),
            host: format!("demo-{i}"),
            labels: Default::default(),
        };
        let agent = Agent::new(cfg, Arc::new(distillery_worker::tasks::builtin()))
            .map_err(|e| CliError::other(format!("worker {i}: {e:#}")))?;
        tokio::spawn(agent.run());
    }

    // 3. The campaign.
    let spec_path = dir.join("campaign.toml");
    std::fs::write(&spec_path, campaign_toml(&dir, a.workers.clamp(1, 2)))
        .map_err(|e| io(&dir, e))?;
    let spec = spec::load_file(&spec_path)
        .map_err(|e| CliError::input(format!("{}: {e}", spec_path.display())))?;
    let client = ClientOpts {
        addr: url.clone(),
        token: None,
        ca_cert: None,
    };
    let target = Target {
        url: url.clone(),
        token: None,
        ca_cert: None,
    };
    let ch = target
        .channel()
        .await
        .map_err(|e| CliError::other(e.to_string()))?;
    let mut c = target
        .campaigns(ch)
        .map_err(|e| CliError::other(e.to_string()))?;
    let id = c
        .submit(pb::SubmitRequest {
            spec: Some(spec),
            ..Default::default()
        })
        .await
        .map_err(|s| CliError::other(format!("submit: {}", s.message())))?
        .into_inner()
        .campaign_id;
    println!("campaign {id}: {}", spec_path.display());
    let code = watch(&mut c, &client, &id, &mut std::io::stdout()).await?;
    let camp = c
        .get(pb::GetCampaignRequest {
            campaign_id: id.clone(),
        })
        .await
        .map_err(|s| CliError::other(s.message().to_string()))?
        .into_inner();
    // 4. The student, fetched like a user would, and the report.
    let student_dir = dir.join("student");
    if let Some(d) = camp
        .rounds
        .iter()
        .rev()
        .find_map(|r| r.artifacts.get("student").cloned())
    {
        crate::cli::fetch_artifact(&mut c, &d, &student_dir).await?;
    }
    print!("{}", report(&camp, &student_dir));
    Ok(code)
}
