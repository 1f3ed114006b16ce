//! Judge benchmark (not a test): judgments per second against `worker serve` (a tiny model on
//! loopback, answering with up to 16 tokens) at concurrency 1 and 4, and the cost of a cache hit
//! per judgment, all in one run.
//!
//! `cargo bench -p distillery-worker --bench judge` (env BENCH_QUESTIONS = 16).

use std::sync::Arc;
use std::time::{Duration, Instant};

use distillery_worker::judge::backend::OpenAi;
use distillery_worker::judge::{self, Answers, Cache, JudgeOptions, Mode, Question};
use distillery_worker::model::test_model::{write_test_model, TestModelSpec};

#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    distillery_worker::tune_allocator();
    let n: usize = std::env::var("BENCH_QUESTIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(16);
    let dir = tempfile::tempdir().expect("tempdir");
    let model_dir = dir.path().join("judge");
    write_test_model(&model_dir, &TestModelSpec::default()).expect("model");
    let served = distillery_worker::serve::load_served(
        &model_dir,
        distillery_worker::serve::ServeOptions {
            name: Some("judge".into()),
            ..Default::default()
        },
    )
    .expect("load");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async move {
            let l = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind");
            tx.send(l.local_addr().expect("addr")).expect("send");
            axum::serve(l, distillery_worker::serve::router(Arc::new(served)))
                .await
                .expect("serve");
        });
    });
    let addr = rx.recv().expect("address");
    let questions: Vec<Question> = (0..n)
        .map(|i| Question {
            question_id: serde_json::json!(i),
            category: "bench".into(),
            turns: vec![format!("Question {i}: name a colour.")],
            reference: None,
        })
        .collect();
    let answers = |tag: &str| Answers {
        model: tag.into(),
        answers: questions
            .iter()
            .map(|q| (q.id(), vec![format!("{tag} says blue ({})", q.id())]))
            .collect(),
    };
    let jobs = judge::jobs(
        Mode::Pairwise,
        &questions,
        &answers("student"),
        &answers("teacher"),
    )
    .expect("jobs");
    let backend = OpenAi::new(
        &format!("http://{addr}/v1"),
        "judge",
        16,
        Duration::from_secs(60),
    )
    .expect("backend");
    println!("machine: {} threads; {} judgments (pairwise, both orders) against worker serve, 16 tokens each",
        std::thread::available_parallelism().map(|x| x.get()).unwrap_or(1), jobs.len());
    let mut per = Vec::new();
    for concurrency in [1usize, 4] {
        let cache_dir = dir.path().join(format!("cache-{concurrency}"));
        let cache = Cache::open(&cache_dir).expect("cache");
        let opts = JudgeOptions {
            concurrency,
            retries: 0,
            samples: 1,
        };
        let t = Instant::now();
        judge::judge_all(&jobs, &backend, &cache, &opts, &|_, _, _| {}).expect("judge");
        let secs = t.elapsed().as_secs_f64();
        per.push(secs / jobs.len() as f64);
        println!(
            "  concurrency {concurrency}: {:>7.1} judgments/s",
            jobs.len() as f64 / secs
        );
        // Everything again: all cache hits, the server is not asked.
        let t = Instant::now();
        let reps = 20;
        for _ in 0..reps {
            judge::judge_all(&jobs, &backend, &cache, &opts, &|_, _, _| {}).expect("judge");
        }
        let hit = t.elapsed().as_secs_f64() / (reps * jobs.len()) as f64;
        println!(
            "    cache hit: {:.1} us per judgment = {:.4}x a judgment asked at concurrency 1",
            hit * 1e6,
            hit / per[0]
        );
    }
    println!("  concurrency 4 / 1: {:.2}x judgments/s", per[0] / per[1]);
}
