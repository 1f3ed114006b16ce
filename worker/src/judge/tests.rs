use std::sync::atomic::{AtomicUsize, Ordering};

use super::backend::{Backend, BackendError};
use super::stats::{bootstrap_ci, derive, metrics};
use super::*;

fn questions() -> Vec<Question> {
    vec![
        Question {
            question_id: serde_json::json!(81),
            category: "writing".into(),
            turns: vec![
                "Write a haiku about rain.".into(),
                "Now make it about snow.".into(),
            ],
            reference: None,
        },
        Question {
            question_id: serde_json::json!(111),
            category: "math".into(),
            turns: vec!["What is 12 * 12?".into()],
            reference: Some(vec!["144".into()]),
        },
        Question {
            question_id: serde_json::json!("q3"),
            category: "reasoning".into(),
            turns: vec!["Is a whale a fish?".into()],
            reference: Some(vec!["No, a mammal.".into()]),
        },
    ]
}

fn answers(model: &str, tag: &str) -> Answers {
    let mut a = Answers {
        model: model.into(),
        ..Default::default()
    };
    for q in questions() {
        a.answers.insert(
            q.id(),
            q.turns
                .iter()
                .enumerate()
                .map(|(i, _)| format!("{tag} answer {i} to {}", q.id()))
                .collect(),
        );
    }
    a
}

/// A judge that answers by a rule over the prompt, counting what it is asked.
struct Fake<F: Fn(&str) -> String + Sync> {
    rule: F,
    asked: AtomicUsize,
}

impl<F: Fn(&str) -> String + Sync> Backend for Fake<F> {
    fn id(&self) -> String {
        "fake".into()
    }
    fn chat(&self, _system: &str, user: &str) -> Result<String, BackendError> {
        self.asked.fetch_add(1, Ordering::SeqCst);
        Ok((self.rule)(user))
    }
}

fn fake<F: Fn(&str) -> String + Sync>(rule: F) -> Fake<F> {
    Fake {
        rule,
        asked: AtomicUsize::new(0),
    }
}

fn run(mode: Mode, b: &dyn Backend, cache: &Cache) -> Vec<Judgment> {
    let jobs = jobs(
        mode,
        &questions(),
        &answers("student", "S"),
        &answers("teacher", "T"),
    )
    .unwrap();
    let opts = JudgeOptions {
        concurrency: 3,
        retries: 2,
        samples: 1,
    };
    judge_all(&jobs, b, cache, &opts, &|_, _, _| {}).unwrap()
}

#[test]
fn prompts_come_from_the_template_files_with_references_where_questions_carry_them() {
    for mode in [Mode::Pairwise, Mode::Single, Mode::Rubric] {
        let t = template(mode).unwrap();
        let q = &questions();
        let (sys, user) = render(
            &t,
            &q[0],
            &["a1".into(), "a2".into()],
            Some(&["b1".into(), "b2".into()]),
        )
        .unwrap();
        assert_eq!(sys, t.system.trim());
        assert!(user.contains("Write a haiku") && user.contains("Now make it about snow."));
        assert!(!user.contains("Reference"), "{user}");
        let (_, with_ref) = render(&t, &q[1], &["x".into()], None).unwrap();
        assert!(
            with_ref.contains("144") && with_ref.to_lowercase().contains("reference"),
            "{with_ref}"
        );
    }
    let j = jobs(
        Mode::Pairwise,
        &questions(),
        &answers("s", "S"),
        &answers("t", "T"),
    )
    .unwrap();
    assert_eq!(j.len(), 6);
    // The two orders put the student first, then second.
    assert!(j[0].user.find("S answer").unwrap() < j[0].user.find("T answer").unwrap());
    assert!(j[1].user.find("T answer").unwrap() < j[1].user.find("S answer").unwrap());
}

#[test]
fn a_judge_that_always_prefers_the_first_position_yields_all_ties_and_zero_consistency() {
    let dir = tempfile::tempdir().unwrap();
    let cache = Cache::open(dir.path()).unwrap();
    let b = fake(|_| "Assistant A's answer reads better.\n[[A]]".into());
    let js = run(Mode::Pairwise, &b, &cache);
    let mut m = metrics(Mode::Pairwise, &js, &answers("s", "S"), &answers("t", "T"));
    let mut summed: BTreeMap<String, f64> = m
        .iter()
        .filter_map(|(k, v)| k.strip_prefix("sum.").map(|k| (k.to_string(), *v)))
        .collect();
    derive(&mut summed);
    assert_eq!(summed["judge.ties"], 3.0);
    assert_eq!(summed["judge.wins"] + summed["judge.losses"], 0.0);
    assert_eq!(summed["judge.position_consistency"], 0.0);
    assert_eq!(summed["judge.win_rate"], 0.5);
    m.clear();
}

#[test]
fn a_consistent_judge_decides_and_the_statistics_follow() {
    let dir = tempfile::tempdir().unwrap();
    let cache = Cache::open(dir.path()).unwrap();
    // Prefers the student's answers wherever they are, except on math where it prefers the teacher.
    let b = fake(|user: &str| {
        let s = user.find("S answer").unwrap_or(usize::MAX);
        let t = user.find("T answer").unwrap_or(usize::MAX);
        let student_is_a = s < t;
        let student_wins = !user.contains("12 * 12");
        if student_is_a == student_wins {
            "[[A]]".into()
        } else {
            "Verdict: [[B]]".into()
        }
    });
    let js = run(Mode::Pairwise, &b, &cache);
    let m = metrics(Mode::Pairwise, &js, &answers("s", "S"), &answers("t", "T"));
    assert_eq!(m["sum.judge.wins"], 2.0);
    assert_eq!(m["sum.judge.losses"], 1.0);
    assert_eq!(m["sum.judge.consistent"], 3.0);
    assert_eq!(m["sum.judge.category.math.losses"], 1.0);
    let mut s: BTreeMap<String, f64> = m
        .iter()
        .filter_map(|(k, v)| k.strip_prefix("sum.").map(|k| (k.to_string(), *v)))
        .collect();
    derive(&mut s);
    assert!((s["judge.win_rate"] - 2.0 / 3.0).abs() < 1e-12);
    assert_eq!(s["judge.position_consistency"], 1.0);
    assert!(s["judge.ci_low"] <= s["judge.win_rate"] && s["judge.win_rate"] <= s["judge.ci_high"]);
    assert!(s["judge.winner_mean_chars"] > 0.0);
}

#[test]
fn unparseable_verdicts_are_retried_then_counted_unparsed_never_scored() {
    let dir = tempfile::tempdir().unwrap();
    let cache = Cache::open(dir.path()).unwrap();
    let b = fake(|_| "Both answers have merit; I cannot choose.".into());
    let js = run(Mode::Rubric, &b, &cache);
    assert!(js
        .iter()
        .all(|j| j.verdict == Verdict::Unparsed && j.attempts == 3));
    assert_eq!(b.asked.load(Ordering::SeqCst), 6 * 3);
    let m = metrics(Mode::Rubric, &js, &answers("s", "S"), &answers("t", "T"));
    assert_eq!(m["sum.judge.unparsed"], 3.0);
    assert_eq!(
        m["sum.judge.wins"] + m["sum.judge.ties"] + m["sum.judge.losses"],
        0.0
    );
}

#[test]
fn a_repeated_evaluation_asks_the_judge_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let cache = Cache::open(dir.path()).unwrap();
    let b = fake(|_| "Good. [RESULT] 4".into());
    let first = run(Mode::Rubric, &b, &cache);
    assert_eq!(b.asked.load(Ordering::SeqCst), 6);
    let again = run(Mode::Rubric, &b, &Cache::open(dir.path()).unwrap());
    assert_eq!(b.asked.load(Ordering::SeqCst), 6, "the cache was not used");
    assert_eq!(first, again);
    // Another judge model is another key.
    assert_ne!(
        Cache::key("a", "t", "s", "u"),
        Cache::key("b", "t", "s", "u")
    );
}

#[test]
fn bootstrap_intervals_bracket_the_rate_and_shrink_with_more_questions() {
    let (lo, hi) = bootstrap_ci(6, 2, 2, 2000, 1);
    assert!(lo < 0.7 && 0.7 < hi, "{lo} {hi}");
    let (lo2, hi2) = bootstrap_ci(600, 200, 200, 500, 1);
    assert!(hi2 - lo2 < (hi - lo) / 3.0);
    assert_eq!(bootstrap_ci(5, 0, 0, 100, 1), (1.0, 1.0));
}

#[test]
fn questions_load_from_mt_bench_jsonl_and_bad_lines_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("question.jsonl");
    std::fs::write(
        &p,
        "{\"question_id\": 81, \"category\": \"writing\", \"turns\": [\"a\", \"b\"]}\n{\"question_id\": 82, \"category\": \"math\", \"turns\": [\"c\"], \"reference\": [\"d\"]}\n",
    )
    .unwrap();
    let q = load_questions(&p).unwrap();
    assert_eq!(q.len(), 2);
    assert_eq!(q[0].id(), "81");
    assert_eq!(q[1].reference.as_deref(), Some(&["d".to_string()][..]));
    std::fs::write(&p, "{\"question_id\": 1, \"turns\": []}\n").unwrap();
    assert!(load_questions(&p).unwrap_err().contains("question.jsonl:1"));
}

#[test]
fn the_bundled_question_set_loads() {
    let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("data/questions.jsonl");
    let q = load_questions(&p).unwrap();
    assert_eq!(q.len(), 8);
    assert!(q.iter().any(|q| q.turns.len() == 2));
    assert!(q.iter().filter(|q| q.reference.is_some()).count() >= 3);
}

/// An OpenAI-compatible server that always prefers the first position, and answers the very first
/// request with 429 (the backend must retry).
fn position_biased_server() -> (String, std::sync::Arc<AtomicUsize>) {
    use axum::routing::post;
    let count = std::sync::Arc::new(AtomicUsize::new(0));
    let c = count.clone();
    let app = axum::Router::new().route(
        "/v1/chat/completions",
        post(move |body: axum::Json<serde_json::Value>| {
            let c = c.clone();
            async move {
                let n = c.fetch_add(1, Ordering::SeqCst);
                assert_eq!(body["messages"][0]["role"], "system");
                if n == 0 {
                    return (axum::http::StatusCode::TOO_MANY_REQUESTS, "slow down")
                        .into_response();
                }
                axum::Json(
                    serde_json::json!({"choices": [{"message": {"role": "assistant",
                    "content": "The first answer is better.\n[[A]]"}}]}),
                )
                .into_response()
            }
        }),
    );
    use axum::response::IntoResponse;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            tx.send(l.local_addr().unwrap()).unwrap();
            axum::serve(l, app).await.unwrap();
        });
    });
    let addr = rx.recv().unwrap();
    (format!("http://{addr}/v1"), count)
}

#[test]
fn over_http_a_position_biased_judge_gives_all_ties_and_zero_consistency() {
    let (url, count) = position_biased_server();
    let mut b =
        super::backend::OpenAi::new(&url, "judge", 64, std::time::Duration::from_secs(10)).unwrap();
    b.backoff = std::time::Duration::from_millis(10);
    let dir = tempfile::tempdir().unwrap();
    let cache = Cache::open(dir.path()).unwrap();
    let js = run(Mode::Pairwise, &b, &cache);
    assert_eq!(
        count.load(Ordering::SeqCst),
        6 + 1,
        "6 prompts plus the refused first try"
    );
    let m = metrics(Mode::Pairwise, &js, &answers("s", "S"), &answers("t", "T"));
    let mut s: BTreeMap<String, f64> = m
        .iter()
        .filter_map(|(k, v)| k.strip_prefix("sum.").map(|k| (k.to_string(), *v)))
        .collect();
    derive(&mut s);
    assert_eq!(
        (s["judge.wins"], s["judge.ties"], s["judge.losses"]),
        (0.0, 3.0, 0.0)
    );
    assert_eq!(s["judge.position_consistency"], 0.0);
    // A server that refuses outright is an error, not a verdict.
    let bad = super::backend::OpenAi::new(
        "http://127.0.0.1:9/v1",
        "judge",
        8,
        std::time::Duration::from_secs(2),
    )
    .unwrap();
    let mut bad = bad;
    bad.max_retries = 1;
    bad.backoff = std::time::Duration::from_millis(1);
    assert!(bad.chat("s", "u").is_err());
}
