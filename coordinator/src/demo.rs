//! `coordinator demo`: the whole system on one machine with nothing but the repository. It writes
//! a corpus (a deterministic generator of simple English), trains a small teacher on it, starts an
//! embedded coordinator and in-process workers, runs the two-round example campaign (score,
//! prune, distill, evaluate with perplexity and a local pairwise judge, gate), and prints a report.

use std::fmt::Write as _;
use std::io::IsTerminal;
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
    /// Log lines instead of progress bars even on a terminal.
    pub plain: bool,
    /// State store engine of the embedded coordinator.
    pub store: Option<crate::store::StoreKind>,
}

const QUESTIONS: &str = include_str!("../../worker/data/questions.jsonl");

/// A deterministic corpus with real entropy: short sentences of a made-up language, a small
/// grammar of English words (verbs, adjectives, nouns, prepositions) around invented names and
/// places spelled from random syllables, and random counts. The grammar is learnable; the
/// invented words are not (a consonant of 14 and a vowel of 5 per syllable: about 3 bits per
/// letter), so a teacher's perplexity per byte stays well above 1 (a small one trained for a
/// minute on 2 cores: 5 to 12).
/// Pruning takes away what the teacher learned of the grammar and distillation gives it back,
/// which is the trade-off the demo shows.
pub fn corpus(docs: usize, seed: u64) -> Vec<String> {
    const VERBS: [&str; 16] = [
        "sees", "likes", "finds", "carries", "paints", "follows", "calls", "watches", "sells",
        "builds", "keeps", "hides", "brings", "counts", "mends", "fears",
    ];
    const ADJS: [&str; 16] = [
        "red", "green", "old", "small", "bright", "quiet", "warm", "wooden", "heavy", "broken",
        "silver", "tiny", "dark", "long", "soft", "round",
    ];
    const NOUNS: [&str; 16] = [
        "ball", "apple", "river", "box", "moon", "book", "garden", "coat", "lamp", "stone", "boat",
        "bell", "basket", "door", "horse", "cup",
    ];
    const PREPS: [&str; 8] = [
        "in", "near", "under", "behind", "above", "beside", "past", "through",
    ];
    const CONS: &[u8] = b"bdfgklmnprstvz";
    const VOWELS: &[u8] = b"aeiou";
    let mut state = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut pick = |n: usize| {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state % n as u64) as usize
    };
    let word = |pick: &mut dyn FnMut(usize) -> usize, capital: bool| {
        let mut w = String::new();
        for _ in 0..2 + pick(2) {
            w.push(CONS[pick(CONS.len())] as char);
            w.push(VOWELS[pick(VOWELS.len())] as char);
        }
        if pick(2) == 0 {
            w.push(CONS[pick(CONS.len())] as char);
        }
        if capital {
            w[..1].to_uppercase() + &w[1..]
        } else {
            w
        }
    };
    (0..docs)
        .map(|_| {
            let mut d = String::new();
            for _ in 0..3 + pick(4) {
                let name = word(&mut pick, true);
                let verb = VERBS[pick(VERBS.len())];
                let adj = ADJS[pick(ADJS.len())];
                let noun = NOUNS[pick(NOUNS.len())];
                let prep = PREPS[pick(PREPS.len())];
                let place = word(&mut pick, true);
                match pick(3) {
                    0 => {
                        let _ = write!(d, "{name} {verb} the {adj} {noun} {prep} {place}. ");
                    }
                    1 => {
                        let n = 2 + pick(98);
                        let _ = write!(d, "{name} {verb} {n} {adj} {noun}s {prep} {place}. ");
                    }
                    _ => {
                        let other = word(&mut pick, true);
                        let _ = write!(d, "In {place}, {name} {verb} {other} and the {noun}. ");
                    }
                }
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
    bars: bool,
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
        objective: Default::default(),
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
    let bar = bars.then(|| {
        let b = indicatif::ProgressBar::with_draw_target(
            Some(steps),
            indicatif::ProgressDrawTarget::stdout(),
        );
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "  teacher [{bar:28.cyan/blue}] step {pos}/{len} {msg} ({elapsed}, budget {prefix})",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        b.set_prefix(format!("{seconds} s"));
        b
    });
    while t.step < steps && start.elapsed() < Duration::from_secs(seconds) {
        let s = t.train_step().map_err(|e| err(&e))?;
        loss = s.loss;
        if let Some(b) = &bar {
            b.set_position(s.step);
            b.set_message(format!("loss {:.3}", s.loss));
        } else if s.step % 20 == 0 {
            println!(
                "  teacher step {:>4}  loss {:.3}  ({:.0} s)",
                s.step,
                s.loss,
                start.elapsed().as_secs_f64()
            );
        }
    }
    if let Some(b) = bar {
        b.finish_and_clear();
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

/// What the judge could say about a round: its counts, or why they are no result.
fn judge_cell(j: &serde_json::Value) -> String {
    let f = |k: &str| j[k].as_f64();
    match (f("wins"), f("ties"), f("losses")) {
        (Some(w), Some(t), Some(l)) if w + l == 0.0 => {
            format!("no verdict ({t:.0} ties)*")
        }
        (Some(w), Some(t), Some(l)) => format!(
            "{w:.0}/{t:.0}/{l:.0} win {}",
            f("win_rate").map_or("-".into(), |x| format!("{x:.2}"))
        ),
        _ => "-".into(),
    }
}

/// The demo's table: the teacher, then each round (smaller and smaller) with its perplexity
/// after pruning and after distillation, the judge, and the distillation's tokens and speed.
/// `campaign` is the `status --json` object (with `metrics.pruned_perplexity` where measured).
pub fn table(campaign: &serde_json::Value, student_dir: &Path, report: Option<&Path>) -> String {
    let v = campaign;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "\ncampaign {} ({}): {}",
        v["id"].as_str().unwrap_or("?"),
        v["name"].as_str().unwrap_or("?"),
        v["state"].as_str().unwrap_or("?")
    );
    let _ = writeln!(
        s,
        "{:<9} {:>10} {:>11} {:>14} {:>10} {:>22} {:>9} {:>7}",
        "model",
        "params",
        "ppl pruned",
        "ppl distilled",
        "x teacher",
        "judge W/T/L vs teacher",
        "tokens",
        "tok/s"
    );
    let rounds: Vec<&serde_json::Value> = v["rounds"].as_array().into_iter().flatten().collect();
    let opt = |x: Option<f64>, p: usize| x.map_or("-".to_string(), |x| format!("{x:.p$}"));
    let tppl = rounds
        .iter()
        .find_map(|r| r["metrics"]["teacher_perplexity"].as_f64());
    let tparams = rounds
        .first()
        .and_then(|r| r["metrics"]["source"]["params"].as_f64());
    let _ = writeln!(
        s,
        "{:<9} {:>10} {:>11} {:>14} {:>10} {:>22} {:>9} {:>7}",
        "teacher",
        opt(tparams, 0),
        "-",
        opt(tppl, 2),
        "1.00",
        "-",
        "-",
        "-"
    );
    let mut no_verdict = false;
    for r in &rounds {
        let m = &r["metrics"];
        let ppl = m["perplexity"].as_f64();
        let judge = judge_cell(&m["judge"]);
        no_verdict |= judge.ends_with('*');
        let _ = writeln!(
            s,
            "{:<9} {:>10} {:>11} {:>14} {:>10} {:>22} {:>9} {:>7}",
            format!("round {}", r["index"].as_u64().unwrap_or(0)),
            r["params"].as_u64().map_or("-".into(), |p| p.to_string()),
            opt(m["pruned_perplexity"].as_f64(), 2),
            opt(ppl, 2),
            opt(ppl.zip(tppl).map(|(a, b)| a / b), 2),
            judge,
            opt(m["distill"]["tokens"].as_f64(), 0),
            opt(m["distill"]["tokens_per_s"].as_f64(), 0),
        );
    }
    let _ = writeln!(
        s,
        "ppl: validation perplexity per byte; pruned = the pruned model before distillation."
    );
    if no_verdict {
        let _ = writeln!(
            s,
            "* the local judge (the demo's own small teacher) preferred neither answer in any pair \
             once both orders were asked: at this size it cannot judge, so there is no win rate. \
             Point evaluation.judge at a real model (backend = \"openai\") for one."
        );
    }
    // A searching round's candidates (`rounds[i].candidates` of `status --json`).
    for r in &rounds {
        for x in r["candidates"].as_array().into_iter().flatten() {
            let n = |v: &serde_json::Value| v.as_u64().unwrap_or(0);
            let shape = &x["shape"];
            let candidate = pb::Candidate {
                index: n(&x["index"]) as u32,
                hidden_size: n(&shape["hidden_size"]) as u32,
                intermediate_size: n(&shape["intermediate_size"]) as u32,
                num_attention_heads: n(&shape["num_attention_heads"]) as u32,
                num_layers: n(&shape["num_layers"]) as u32,
                params: n(&x["params"]),
                tokens: n(&x["tokens"]),
                score: x["score"].as_f64(),
                winner: x["winner"].as_bool().unwrap_or(false),
                ..Default::default()
            };
            let _ = writeln!(
                s,
                "round {} {}",
                n(&r["index"]),
                crate::cli::candidate_line(&candidate)
            );
        }
    }
    // The judge's figures per round, as `status` prints them (from the nested metrics of
    // `status --json`, flattened back to their dotted names).
    for r in &rounds {
        let mut flat = std::collections::BTreeMap::new();
        flatten_metrics("", &r["metrics"], &mut flat);
        let mode = r["metrics"]["judge"]["mode"].as_str();
        let index = r["index"].as_u64().unwrap_or(0) as u32;
        if flat.keys().any(|k| k.starts_with("judge.")) {
            for line in crate::cli::judge_lines(index, mode, &flat) {
                let _ = writeln!(s, "round {index}: {line}");
            }
        }
    }
    let _ = writeln!(s, "student: {}", student_dir.display());
    if let Some(p) = report {
        let _ = writeln!(s, "report:  {}", p.display());
    }
    s
}

/// `{"a": {"b": 1.0}}` → `a.b = 1.0`: the numbers of a nested metrics object under their dotted
/// names (strings, booleans and nulls are not metrics).
fn flatten_metrics(
    prefix: &str,
    v: &serde_json::Value,
    out: &mut std::collections::BTreeMap<String, f64>,
) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, x) in m {
                let key = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                flatten_metrics(&key, x, out);
            }
        }
        serde_json::Value::Number(n) => {
            if let Some(f) = n.as_f64() {
                out.insert(prefix.to_string(), f);
            }
        }
        _ => {}
    }
}

/// Validation perplexity of a model directory, measured as the campaign's `perplexity` task
/// does (windows of `seq_len` advancing by half, an end-of-sequence token after each document).
fn model_perplexity(model_dir: &Path, val: &[String], seq_len: usize) -> Result<f64, String> {
    use distillery_worker::model::perplexity::perplexity;
    let model = load_dir(
        model_dir,
        candle_core::DType::F32,
        &candle_core::Device::Cpu,
    )
    .map_err(|e| e.to_string())?;
    let tok = tokenizer::load(&model_dir.join("tokenizer.json")).map_err(|e| e.to_string())?;
    let eos = distillery_worker::tasks::common::eos_id(&model);
    let (mut ids, mut bytes) = (Vec::new(), 0);
    for d in val {
        if ids.len() >= 1 << 15 {
            break;
        }
        ids.extend(tokenizer::encode(&tok, d, false).map_err(|e| e.to_string())?);
        ids.extend(eos);
        bytes += d.len() + 1;
    }
    let window = seq_len.min(model.config.max_position_embeddings).max(2);
    let p = perplexity(&model, &ids, bytes, window, window / 2).map_err(|e| e.to_string())?;
    Ok(p.perplexity())
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
        let bars = !a.plain && std::io::stdout().is_terminal();
        let (loss, done) =
            tokio::task::spawn_blocking(move || train_teacher(&t, &train, secs, steps, bars))
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
    opts.store = a.store;
    let srv = server::start(opts).await.map_err(|e| {
        let e = crate::cli::serve_error(e);
        CliError {
            code: e.code,
            message: format!("coordinator: {}", e.message.trim_start_matches("serve: ")),
        }
    })?;
    let url = format!("http://{}", srv.addr);
    for i in 0..a.workers.max(1) {
        let cfg = AgentConfig {
            target: Target {
                url: url.clone(),
                token: None,
                ca_cert: None,
                client_identity: None,
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
        client_identity: None,
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
    let mut view = crate::progress_view::for_stdout(a.plain);
    let code = watch(&mut c, &client, &id, view.as_mut()).await?;
    drop(view);
    let camp = c
        .get(pb::GetCampaignRequest {
            campaign_id: id.clone(),
        })
        .await
        .map_err(|s| CliError::other(s.message().to_string()))?
        .into_inner();
    // 4. The student, fetched like a user would; each round's pruned model (before its
    // distillation) measured like the campaign measures its students; the report.
    let student_dir = dir.join("student");
    if let Some(d) = camp
        .rounds
        .iter()
        .rev()
        .find_map(|r| r.artifacts.get("student").cloned())
    {
        crate::cli::fetch_artifact(&mut c, &d, &student_dir).await?;
    }
    let mut status = campaign_json(&camp);
    let val = docs[2200..].to_vec();
    for r in &camp.rounds {
        let Some(d) = r.artifacts.get("pruned") else {
            continue;
        };
        let pruned_dir = dir.join(format!("rounds/{}/pruned", r.index));
        let _ = std::fs::remove_dir_all(&pruned_dir);
        crate::cli::fetch_artifact(&mut c, d, &pruned_dir).await?;
        let (pd, v) = (pruned_dir.clone(), val.clone());
        match tokio::task::spawn_blocking(move || model_perplexity(&pd, &v, 64)).await {
            Ok(Ok(ppl)) => {
                if let Some(m) = status["rounds"][r.index as usize]["metrics"].as_object_mut() {
                    m.insert("pruned_perplexity".into(), serde_json::json!(ppl));
                }
            }
            Ok(Err(e)) => println!(
                "round {}: could not measure the pruned model ({}): {e}",
                r.index,
                pruned_dir.display()
            ),
            Err(e) => return Err(CliError::other(e.to_string())),
        }
    }
    let report_path = dir.join("report.html");
    crate::cli::write_report(&report_path, &crate::report::render(&status))?;
    print!("{}", table(&status, &student_dir, Some(&report_path)));
    Ok(code)
}
