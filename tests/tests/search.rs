//! Candidate search and teacher correction end to end, with the real binaries:
//! - a round with `search.candidates = 3` prunes three shapes and distills them briefly in
//!   parallel (three gangs on two workers), the lowest validation score wins, and the round's
//!   distillation continues the winner's checkpoint: its tokens add up to the round's, and its
//!   student is bit-identical to a plain run of the winner's shape for the round's full tokens;
//!   a worker SIGKILLed during the search loses only its candidate's work since that
//!   candidate's last checkpoint (every candidate, and the final student, as without the kill);
//! - `[teacher_correction]` fine-tunes the teacher before round 0, and from then on the corrected
//!   teacher is the one pruned, distilled from and evaluated against: the campaign's student and
//!   teacher perplexity equal those of a campaign whose teacher is the corrected model itself;
//!   the correction gang survives a SIGKILLed rank, resuming to the same corrected teacher as an
//!   uninterrupted correction.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use distillery_tests::*;
use distillery_worker::model::test_model::{write_test_model, TestModelSpec};

/// Tokens per step: seq_len 32 x micro_batch 2 x world_size 1.
const TOKENS_PER_STEP: u64 = 64;
/// The search's share (96 steps) and the round's (192 steps): long enough to kill a candidate mid-way.
const SEARCH_TOKENS: u64 = 6144;
const ROUND_TOKENS: u64 = 12288;

fn setup(dir: &Path) -> PathBuf {
    let teacher = dir.join("teacher");
    if !teacher.exists() {
        write_test_model(
            &teacher,
            &TestModelSpec {
                num_layers: 3,
                seed: 8,
                ..Default::default()
            },
        )
        .unwrap();
        write_corpus(
            dir,
            &["calib.jsonl", "web.jsonl", "web-val.jsonl"],
            (0..200).map(|i| {
                format!(
                    "Line {i}: a small model learns from a larger one, step by step, token by token."
                )
            }),
        );
    }
    teacher
}

/// A one-round campaign; `round` is the round's TOML without `distill`, `top` more top-level
/// TOML.
fn spec(dir: &Path, name: &str, teacher: &Path, round: &str, top: &str) -> PathBuf {
    let toml = format!(
        "name = \"{name}\"\nseed = 5\n[teacher]\nmodel = \"{}\"\n[data]\n\
         calibration = {{ path = \"calib.jsonl\", samples = 8, seq_len = 32 }}\n\
         train = [ {{ name = \"web\", path = \"web.jsonl\" }} ]\n\
         validation = [ {{ name = \"web\", path = \"web-val.jsonl\" }} ]\n\
         {top}\
         [scheduling]\nscore_shards = 1\n\
         [[rounds]]\n{round}\n\
         distill = {{ tokens = {ROUND_TOKENS}, seq_len = 32, micro_batch = 2, world_size = 1, lr = 0.003, warmup_steps = 2, checkpoint_every = 4 }}\n",
        teacher.display()
    );
    write_spec(dir, &format!("{name}.toml"), &toml)
}

fn search_round() -> String {
    format!(
        "target = {{ params = 0.7 }}\nsearch = {{ candidates = 3, tokens = {SEARCH_TOKENS}, by = \"kd_loss\" }}"
    )
}

fn num(v: &serde_json::Value) -> f64 {
    v.as_f64().unwrap_or_else(|| panic!("not a number: {v}"))
}

fn tasks_of(v: &serde_json::Value, kind: &str) -> Vec<serde_json::Value> {
    v["rounds"][0]["tasks"]
        .as_array()
        .unwrap_or_else(|| panic!("no tasks: {v}"))
        .iter()
        .filter(|t| t["kind"] == kind)
        .cloned()
        .collect()
}

/// Checks what a finished searching round must show and returns its candidates.
fn check_search(v: &serde_json::Value) -> Vec<serde_json::Value> {
    assert_eq!(v["state"], "succeeded", "{v}");
    let r = &v["rounds"][0];
    let cands = r["candidates"]
        .as_array()
        .unwrap_or_else(|| panic!("{r}"))
        .clone();
    assert_eq!(cands.len(), 3, "{r}");
    let winners: Vec<&serde_json::Value> = cands.iter().filter(|c| c["winner"] == true).collect();
    assert_eq!(winners.len(), 1, "exactly one winner: {cands:?}");
    let w = winners[0];
    let scores: Vec<f64> = cands.iter().map(|c| num(&c["score"])).collect();
    let min = scores.iter().cloned().fold(f64::INFINITY, f64::min);
    assert_eq!(
        num(&w["score"]),
        min,
        "the winner is the lowest score: {cands:?}"
    );
    let shapes: Vec<&serde_json::Value> = cands.iter().map(|c| &c["shape"]).collect();
    for (i, c) in cands.iter().enumerate() {
        assert_eq!(c["index"], i as u64);
        assert_eq!(num(&c["tokens"]) as u64, SEARCH_TOKENS, "{c}");
        assert!(
            c["checkpoint"].is_string() && c["pruned"].is_string(),
            "{c}"
        );
        for j in 0..i {
            assert_ne!(shapes[i], shapes[j], "distinct shapes: {cands:?}");
        }
    }
    // The three candidates' short distillations ran in parallel: all were leased before the
    // first one finished.
    let search = tasks_of(v, "search");
    assert_eq!(search.len(), 3, "{search:?}");
    // The round continued the winner: its shape, its pruned model, its checkpoint, and the
    // tokens add up to the round's.
    for axis in [
        "hidden_size",
        "intermediate_size",
        "num_attention_heads",
        "num_layers",
    ] {
        assert_eq!(
            num(&r["metrics"]["shape"][axis]),
            num(&w["shape"][axis]),
            "the round's {axis} is the winner's: {r}"
        );
    }
    assert_eq!(r["params"], w["params"]);
    assert_eq!(r["artifacts"]["pruned"], w["pruned"]);
    assert_eq!(r["artifacts"]["search_checkpoint"], w["checkpoint"]);
    let d = &r["metrics"]["distill"];
    assert_eq!(
        num(&d["resumed_from_step"]) as u64,
        SEARCH_TOKENS / TOKENS_PER_STEP,
        "{d}"
    );
    assert_eq!(num(&d["tokens"]) as u64, ROUND_TOKENS, "{d}");
    let continued = (num(&d["steps"]) - num(&d["resumed_from_step"])) as u64 * TOKENS_PER_STEP;
    assert_eq!(
        num(&w["tokens"]) as u64 + continued,
        num(&d["tokens"]) as u64,
        "search tokens + continued tokens = the round's: {d}"
    );
    cands
}

fn event_order(events: &[distillery_proto::v1::Event], search_tasks: &[String]) {
    let leased: Vec<usize> = search_tasks
        .iter()
        .map(|t| {
            events
                .iter()
                .position(|e| e.kind == "task_leased" && &e.task_id == t)
                .unwrap_or_else(|| panic!("{t} never leased"))
        })
        .collect();
    let first_done = events
        .iter()
        .position(|e| e.kind == "task_succeeded" && search_tasks.contains(&e.task_id))
        .expect("a search task succeeded");
    assert!(
        leased.iter().all(|l| *l < first_done),
        "the three candidates ran in parallel (leased at {leased:?}, first done at {first_done})"
    );
    assert!(events.iter().any(|e| e.kind == "search_decided"));
}

fn worker_id(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("worker-id"))
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .trim()
        .to_string()
}

#[test]
fn a_search_distills_three_candidates_in_parallel_and_continues_the_winner_even_across_a_sigkill() {
    let fx = tempfile::tempdir().unwrap();
    let teacher = setup(fx.path());
    let coord = CoordinatorProc::start(&fx.path().join("data"), ML_TIMING);
    // Two workers, three CPU slots: one gang per candidate, all at once.
    let (d1, d2) = (fx.path().join("w1"), fx.path().join("w2"));
    let _w1 = WorkerProc::real(&coord.url(), &d1, "cpu:2");
    let mut w2 = WorkerProc::real(&coord.url(), &d2, "cpu");
    let rt = tokio::runtime::Runtime::new().unwrap();

    // 1. Uninterrupted.
    let id = submit(
        &coord,
        &spec(fx.path(), "search", &teacher, &search_round(), ""),
    );
    let v = wait_terminal(&coord, &id, Duration::from_secs(600));
    let cands = check_search(&v);
    let search_ids: Vec<String> = tasks_of(&v, "search")
        .iter()
        .map(|t| t["id"].as_str().unwrap().to_string())
        .collect();
    event_order(&rt.block_on(all_events(&coord, &id)), &search_ids);
    for t in tasks_of(&v, "search") {
        assert_eq!(
            (t["attempts"].as_u64(), t["lost"].as_u64()),
            (Some(1), Some(0)),
            "{t}"
        );
    }
    let student = v["rounds"][0]["artifacts"]["student"]
        .as_str()
        .unwrap()
        .to_string();
    // `status` (text) and `watch` show the same candidates.
    let text = String::from_utf8_lossy(&coord.cli(&["status", &id]).stdout).to_string();
    let watch = coord.cli(&["watch", &id]);
    let watched = String::from_utf8_lossy(&watch.stdout).to_string();
    assert!(watch.status.success(), "{watched}");
    for c in &cands {
        let line = format!(
            "candidate #{} {}/{}/{}/{}",
            c["index"],
            c["shape"]["hidden_size"],
            c["shape"]["intermediate_size"],
            c["shape"]["num_attention_heads"],
            c["shape"]["num_layers"]
        );
        assert!(text.contains(&line), "status lacks {line:?}:\n{text}");
        assert!(watched.contains(&line), "watch lacks {line:?}:\n{watched}");
    }
    assert_eq!(text.matches("<- winner").count(), 1, "{text}");
    assert_eq!(watched.matches("<- winner").count(), 1, "{watched}");

    // 2. The winner's shape distilled for the round's tokens without a search: the same
    //    student, bit for bit (the search ran the winner on the round's own schedule).
    let w = cands.iter().find(|c| c["winner"] == true).unwrap();
    let s = &w["shape"];
    let plain = spec(
        fx.path(),
        "plain",
        &teacher,
        &format!(
            "target = {{ hidden_size = {}, intermediate_size = {}, num_attention_heads = {}, num_layers = {} }}",
            s["hidden_size"], s["intermediate_size"], s["num_attention_heads"], s["num_layers"]
        ),
        "",
    );
    let id_plain = submit(&coord, &plain);
    let vp = wait_terminal(&coord, &id_plain, Duration::from_secs(600));
    assert_eq!(vp["state"], "succeeded", "{vp}");
    assert_eq!(
        num(&vp["rounds"][0]["metrics"]["distill"]["tokens"]) as u64,
        ROUND_TOKENS
    );
    assert_eq!(
        vp["rounds"][0]["artifacts"]["student"], student,
        "continuing the winner's checkpoint must equal distilling its shape from the start"
    );

    // 3. The search again; w2's candidate is SIGKILLed after its first checkpoint and the
    //    worker restarted in its work dir (its attempt is lost at once).
    let id3 = submit(
        &coord,
        &spec(fx.path(), "killed", &teacher, &search_round(), ""),
    );
    let victim_worker = worker_id(&d2);
    // The search task w2 got (the lease event names its worker), once it has a checkpoint.
    let leased = rt.block_on(wait_event(&coord, &id3, Duration::from_secs(600), |e| {
        e.kind == "task_leased" && e.phase == "search" && e.message.contains(&victim_worker)
    }));
    let victim = leased.task_id.clone();
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let v = coord.status_json(Some(&id3));
        let t = tasks_of(&v, "search")
            .into_iter()
            .find(|t| t["id"] == victim.as_str())
            .unwrap_or_else(|| panic!("no task {victim}: {v}"));
        assert_eq!(t["state"], "leased", "{victim} ended before a kill: {t}");
        if t["checkpoint"].is_string() {
            eprintln!("victim at kill: {t}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{victim} never checkpointed: {v}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    w2.kill();
    eprintln!("killed {victim_worker} while it ran candidate task {victim}");
    let _w2b = WorkerProc::real(&coord.url(), &d2, "cpu");
    let v3 = wait_terminal(&coord, &id3, Duration::from_secs(600));
    let cands3 = check_search(&v3);
    for t in tasks_of(&v3, "search") {
        if t["id"] == victim.as_str() {
            assert!(t["lost"].as_u64().unwrap() >= 1, "{t}");
            assert_eq!(t["failed"], 0, "{t}");
        } else {
            // Only the killed worker's candidate lost work.
            assert_eq!(
                (t["attempts"].as_u64(), t["lost"].as_u64()),
                (Some(1), Some(0)),
                "{t}"
            );
        }
    }
    // It resumed from its checkpoint, not from scratch.
    let events = rt.block_on(all_events(&coord, &id3));
    let done = events
        .iter()
        .find(|e| e.kind == "task_succeeded" && e.task_id == victim)
        .expect("the victim finished");
    let resumed = done
        .metrics
        .get("distill.resumed_from_step")
        .copied()
        .unwrap_or(0.0);
    assert!(
        resumed >= 4.0,
        "resumed from step {resumed}: {:?}",
        done.metrics
    );
    // Every candidate, the winner and the student are exactly the uninterrupted run's.
    let strip = |c: &[serde_json::Value]| -> Vec<BTreeMap<String, String>> {
        c.iter()
            .map(|x| {
                [
                    "index",
                    "shape",
                    "params",
                    "tokens",
                    "score",
                    "winner",
                    "pruned",
                    "checkpoint",
                ]
                .iter()
                .map(|k| (k.to_string(), x[*k].to_string()))
                .collect()
            })
            .collect()
    };
    assert_eq!(
        strip(&cands3),
        strip(&cands),
        "the kill changed a candidate"
    );
    assert_eq!(v3["rounds"][0]["artifacts"]["student"], student);
}

#[test]
fn teacher_correction_runs_before_round_0_and_everything_after_uses_the_corrected_teacher() {
    let fx = tempfile::tempdir().unwrap();
    let teacher = setup(fx.path());
    let coord = CoordinatorProc::start(&fx.path().join("data"), ML_TIMING);
    let d1 = fx.path().join("w1");
    let mut w1 = WorkerProc::real(&coord.url(), &d1, "cpu");
    let _w2 = WorkerProc::real(&coord.url(), &fx.path().join("w2"), "cpu");
    let round = "target = { hidden_size = 48, intermediate_size = 192, num_layers = 2 }";
    let eval = "[evaluation]\nperplexity = true\n";
    // A data-parallel correction gang of two ranks, 64 steps.
    let correction = "[teacher_correction]\ntokens = 8192\nlr = 0.003\nseq_len = 32\nmicro_batch = 2\nworld_size = 2\ncheckpoint_every = 4\n";
    let top = format!("{correction}{eval}");
    let id = submit(&coord, &spec(fx.path(), "corrected", &teacher, round, &top));
    // SIGKILL one rank after the gang's first checkpoint; the worker comes back in its work
    // dir and the gang resumes from that checkpoint.
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let v = coord.status_json(Some(&id));
        let t = tasks_of(&v, "correct");
        assert_eq!(t.len(), 1, "one correction task from the start: {v}");
        assert_eq!(t[0]["state"], "leased", "killed before it ended: {v}");
        if t[0]["checkpoint"].is_string() {
            break;
        }
        assert!(Instant::now() < deadline, "no checkpoint: {v}");
        std::thread::sleep(Duration::from_millis(20));
    }
    w1.kill();
    let _w1b = WorkerProc::real(&coord.url(), &d1, "cpu");
    let v = wait_terminal(&coord, &id, Duration::from_secs(600));
    assert_eq!(v["state"], "succeeded", "{v}");
    let r = &v["rounds"][0];
    let correct = tasks_of(&v, "correct");
    assert_eq!(correct.len(), 1, "{v}");
    assert_eq!(correct[0]["world_size"], 2);
    assert_eq!(correct[0]["phase"], "correct");
    // Before round 0's scoring: the correction finished before any score task was leased.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let events = rt.block_on(all_events(&coord, &id));
    let pos = |f: &dyn Fn(&distillery_proto::v1::Event) -> bool| {
        events.iter().position(f).expect("event")
    };
    let corrected_at = pos(&|e| e.kind == "task_succeeded" && e.phase == "correct");
    let scoring_at = pos(&|e| e.kind == "task_leased" && e.phase == "score");
    assert!(corrected_at < scoring_at, "correction before scoring");
    let m = &r["metrics"];
    assert_eq!(num(&m["teacher_correction"]["tokens"]) as u64, 8192, "{m}");
    assert!(
        num(&m["teacher_correction"]["resumed_from_step"]) >= 4.0,
        "{m}"
    );
    assert!(
        correct[0]["lost"].as_u64().unwrap() >= 1,
        "{:?}",
        correct[0]
    );
    assert_eq!(correct[0]["failed"], 0);
    let (corrected_ppl, original_ppl) = (
        num(&m["teacher_perplexity"]),
        num(&m["original_teacher_perplexity"]),
    );
    assert!(
        corrected_ppl < original_ppl,
        "fine-tuning on the training mix lowers the validation perplexity: {corrected_ppl} vs {original_ppl}"
    );
    let text = String::from_utf8_lossy(&coord.cli(&["status", &id]).stdout).to_string();
    assert!(text.contains("original teacher"), "{text}");

    // The corrected teacher as a plain campaign's teacher gives the same student and the same
    // teacher perplexity: it was what round 0 pruned, distilled from and was judged against.
    let digest = r["artifacts"]["corrected_teacher"]
        .as_str()
        .unwrap_or_else(|| panic!("no corrected teacher: {r}"))
        .to_string();
    let dir = fx.path().join("corrected-teacher");
    coord.artifact_get(&digest, &dir);
    let id2 = submit(&coord, &spec(fx.path(), "given", &dir, round, eval));
    let v2 = wait_terminal(&coord, &id2, Duration::from_secs(600));
    assert_eq!(v2["state"], "succeeded", "{v2}");
    assert_eq!(
        v2["rounds"][0]["artifacts"]["student"], r["artifacts"]["student"],
        "the student was distilled from the corrected teacher"
    );
    assert_eq!(
        num(&v2["rounds"][0]["metrics"]["teacher_perplexity"]),
        corrected_ppl
    );
    assert!(v2["rounds"][0]["metrics"]["original_teacher_perplexity"].is_null());

    // The correction resumed exactly: an uninterrupted one gives the same corrected teacher.
    let id3 = submit(&coord, &spec(fx.path(), "straight", &teacher, round, &top));
    let v3 = wait_terminal(&coord, &id3, Duration::from_secs(600));
    assert_eq!(v3["state"], "succeeded", "{v3}");
    assert_eq!(
        num(&v3["rounds"][0]["metrics"]["teacher_correction"]["resumed_from_step"]),
        0.0
    );
    assert_eq!(
        v3["rounds"][0]["artifacts"]["corrected_teacher"],
        digest.as_str()
    );
    assert_eq!(
        v3["rounds"][0]["artifacts"]["student"],
        r["artifacts"]["student"]
    );
}

#[test]
fn a_search_by_perplexity_keeps_the_candidate_with_the_lowest_validation_perplexity() {
    let fx = tempfile::tempdir().unwrap();
    let teacher = setup(fx.path());
    let coord = CoordinatorProc::start(&fx.path().join("data"), ML_TIMING);
    let _w = WorkerProc::real(&coord.url(), &fx.path().join("w"), "cpu:2");
    let round =
        "target = { params = 0.6 }\nsearch = { candidates = 2, tokens = 640, by = \"perplexity\" }";
    let id = submit(&coord, &spec(fx.path(), "by-ppl", &teacher, round, ""));
    let v = wait_terminal(&coord, &id, Duration::from_secs(600));
    assert_eq!(v["state"], "succeeded", "{v}");
    let cands = v["rounds"][0]["candidates"].as_array().unwrap().clone();
    assert_eq!(cands.len(), 2, "{cands:?}");
    let scores: Vec<f64> = cands.iter().map(|c| num(&c["score"])).collect();
    // Perplexities (finite, above 1); the lowest one wins.
    assert!(
        scores.iter().all(|s| s.is_finite() && *s > 1.0),
        "{scores:?}"
    );
    let best = if scores[1] < scores[0] { 1 } else { 0 };
    assert_eq!(cands[best]["winner"], true, "{cands:?}");
    assert_eq!(cands[1 - best]["winner"], false, "{cands:?}");
    assert_eq!(
        num(&v["rounds"][0]["metrics"]["search"]["score"]),
        scores[best]
    );
    let d = &v["rounds"][0]["metrics"]["distill"];
    assert_eq!(num(&d["resumed_from_step"]), 10.0, "{d}");
    assert_eq!(num(&d["tokens"]) as u64, ROUND_TOKENS, "{d}");
}
