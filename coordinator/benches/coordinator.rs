//! Coordinator benchmark (not a test): durable task completions per second and poll-to-assignment
//! latency with N concurrent workers over real gRPC on loopback, against the raw rate of
//! flushed sled writes on the same disk; and restart-to-serving time of the real binary with
//! 100k tasks in history.
//!
//! `cargo bench -p distillery-coordinator --bench coordinator` (env: BENCH_WORKERS = "8,32",
//! BENCH_TASKS = 5000, BENCH_HISTORY = 100000).

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use distillery_coordinator::machine::{self, Event, Reply};
use distillery_coordinator::server::{self, ServeOptions};
use distillery_coordinator::spec::{self, FileChecks};
use distillery_coordinator::store::{SledStore, StateStore};
use distillery_proto::client::Target;
use distillery_proto::v1 as pb;

fn env_usize(k: &str, d: usize) -> usize {
    std::env::var(k)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(d)
}

fn campaign_spec(shards: usize) -> pb::CampaignSpec {
    let text = format!(
        "name = \"bench\"\n[teacher]\nmodel = \"/m\"\n[data]\ncalibration = {{ path = \"/c\" }}\n\
         train = [{{ name = \"web\", path = \"/w\" }}]\n[evaluation]\nperplexity = false\n\
         [scheduling]\nscore_shards = {shards}\n[[rounds]]\ntarget = {{ num_layers = 2 }}\ndistill = {{ tokens = 1 }}\n"
    );
    spec::parse(&text, Path::new("/"), FileChecks::None).expect("bench spec")
}

fn outputs_for(kind: &str, digest: &str) -> std::collections::HashMap<String, String> {
    distillery_coordinator::phases::kind::required_outputs(kind)
        .iter()
        .map(|o| (o.to_string(), digest.to_string()))
        .collect()
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// Single-writer baseline: one sled insert + flush at a time.
async fn sled_flush_rate(dir: &Path, n: usize) -> f64 {
    let db = sled::Config::new()
        .path(dir)
        .flush_every_ms(None)
        .open()
        .expect("sled");
    let t = db.open_tree("x").expect("tree");
    let start = Instant::now();
    for i in 0..n as u64 {
        t.insert(i.to_be_bytes(), vec![0u8; 200]).expect("insert");
        let d = db.clone();
        tokio::task::spawn_blocking(move || d.flush())
            .await
            .expect("join")
            .expect("flush");
    }
    n as f64 / start.elapsed().as_secs_f64()
}

async fn throughput(workers: usize, tasks: usize) {
    let dir = tempfile::tempdir().expect("tempdir");
    let baseline = sled_flush_rate(&dir.path().join("baseline"), 500).await;

    let mut opts = ServeOptions::new(
        "127.0.0.1:0".parse::<SocketAddr>().expect("addr"),
        dir.path().join("data"),
    );
    opts.timing.poll_timeout = Duration::from_secs(2);
    // DISTILLERY_STORE=sled|redb picks the engine (default: the coordinator's default).
    opts.store = match std::env::var("DISTILLERY_STORE").as_deref() {
        Ok("sled") => Some(distillery_coordinator::store::StoreKind::Sled),
        Ok("redb") => Some(distillery_coordinator::store::StoreKind::Redb),
        _ => None,
    };
    // One phase of `tasks` tasks: above the default limit of tasks per phase.
    opts.machine.max_tasks_per_phase = opts.machine.max_tasks_per_phase.max(tasks as u32 + 16);
    let running = server::start(opts).await.expect("server");
    let target = Target {
        url: format!("http://{}", running.addr),
        token: None,
        ca_cert: None,
        client_identity: None,
    };
    let ch = target.channel().await.expect("connect");
    let mut wc = target.workers(ch.clone()).expect("client");
    let blob = dir.path().join("blob");
    std::fs::write(&blob, b"bench output").expect("blob");
    let (digest, _) = distillery_proto::artifact::digest_file(&blob)
        .await
        .expect("digest");
    wc.put_artifact(distillery_proto::artifact::file_chunks(
        blob,
        digest.clone(),
    ))
    .await
    .expect("upload");

    // One campaign fans out to `tasks` score shards (+ prune + distill).
    let mut cc = target.campaigns(ch.clone()).expect("client");
    let id = cc
        .submit(pb::SubmitRequest {
            spec: Some(campaign_spec(tasks)),
            ..Default::default()
        })
        .await
        .expect("submit")
        .into_inner()
        .campaign_id;

    let start = Instant::now();
    let mut handles = Vec::new();
    for _ in 0..workers {
        let mut wc = target.workers(ch.clone()).expect("client");
        let digest = format!("sha256:{digest}");
        handles.push(tokio::spawn(async move {
            let wid = wc
                .register(pb::RegisterRequest {
                    host: "bench".into(),
                    devices: vec!["cpu".into()],
                    device_memory: Vec::new(),
                    task_kinds: distillery_coordinator::phases::kind::ALL
                        .iter()
                        .map(|k| k.to_string())
                        .collect(),
                    ..Default::default()
                })
                .await
                .expect("register")
                .into_inner()
                .worker_id;
            let mut lat = Vec::new();
            let mut done = 0usize;
            let mut idle = 0;
            while idle < 2 {
                let t0 = Instant::now();
                let r = wc
                    .poll_task(pb::PollTaskRequest {
                        worker_id: wid.clone(),
                        free_devices: vec!["cpu".into()],
                    })
                    .await;
                let Ok(r) = r else { break };
                let a = r.into_inner().assignments;
                if a.is_empty() {
                    idle += 1;
                    continue;
                }
                idle = 0;
                lat.push(t0.elapsed());
                for x in a {
                    let req = pb::CompleteTaskRequest {
                        lease: x.lease.clone(),
                        outputs: outputs_for(&x.kind, &digest),
                        metrics: Default::default(),
                    };
                    if wc.complete_task(req).await.is_ok() {
                        done += 1;
                    }
                }
            }
            (lat, done)
        }));
    }
    let mut lat = Vec::new();
    let mut done = 0;
    let mut last_done = start.elapsed();
    for h in handles {
        let (l, d) = h.await.expect("worker");
        lat.extend(l);
        done += d;
    }
    // Workers stop after two empty 2 s polls; measure up to the campaign's last event instead.
    let camp = cc
        .get(pb::GetCampaignRequest { campaign_id: id })
        .await
        .expect("get")
        .into_inner();
    if camp.updated_ms > 0 {
        let created = camp.created_ms;
        last_done = Duration::from_millis(camp.updated_ms.saturating_sub(created))
            .max(Duration::from_millis(1));
    }
    lat.sort();
    let rate = done as f64 / last_done.as_secs_f64();
    println!(
        "workers: {workers}, tasks completed: {done} in {:.2} s (campaign {})",
        last_done.as_secs_f64(),
        super_state(camp.state)
    );
    println!("  durable completions/s:           {rate:>10.0}   (each = 2 durable transitions: lease + complete)");
    println!("  durable transitions/s:           {:>10.0}", 2.0 * rate);
    println!("  baseline sled insert+flush/s:    {baseline:>10.0}   (one writer, same disk)");
    println!(
        "  transitions / baseline:          {:>10.2}x",
        2.0 * rate / baseline
    );
    println!(
        "  poll-to-assignment p50 / p99:    {:>7.2} ms / {:.2} ms  ({} polls)",
        percentile(&lat, 0.5).as_secs_f64() * 1e3,
        percentile(&lat, 0.99).as_secs_f64() * 1e3,
        lat.len()
    );
    running.handle.abort();
}

fn super_state(s: i32) -> &'static str {
    distillery_coordinator::cli::state_name(s)
}

/// Builds a data dir whose history holds at least `n` finished tasks, straight through the
/// machine and the store (one flush at the end: this is set-up, not the thing measured).
async fn build_history(dir: &Path, n: usize) -> usize {
    let store = SledStore::open(&dir.join("state")).expect("store");
    std::fs::create_dir_all(dir.join("artifacts")).expect("artifacts");
    let mut st = store.load().expect("load");
    let cfg = machine::Config::default();
    let step = |st: &mut machine::State, e: Event| {
        let t = machine::apply(st, &cfg, e).expect("transition");
        store.commit(st, &t).expect("commit");
        t
    };
    let t = step(
        &mut st,
        Event::Register {
            host: "h".into(),
            devices: vec!["cpu".into()],
            device_memory: Vec::new(),
            labels: Default::default(),
            version: "0".into(),
            task_kinds: distillery_coordinator::phases::kind::ALL
                .iter()
                .map(|k| k.to_string())
                .collect(),
            nonce: 0,
            previous: None,
            now: 1,
        },
    );
    let Reply::WorkerId(w) = t.reply else {
        panic!("register")
    };
    let digest = "sha256:".to_string() + &"ab".repeat(32);
    let mut made = 0;
    while made < n {
        step(
            &mut st,
            Event::Submit {
                spec: Box::new(campaign_spec(1000)),
                now: 2,
            },
        );
        loop {
            let t = step(
                &mut st,
                Event::Poll {
                    worker: w.clone(),
                    free_devices: vec!["cpu".into()],
                    now: 3,
                },
            );
            let assigned: Vec<machine::Assignment> = t
                .effects
                .into_iter()
                .flat_map(|e| match e {
                    machine::Effect::Assign { assignments, .. } => assignments,
                    _ => Vec::new(),
                })
                .collect();
            if assigned.is_empty() {
                step(&mut st, Event::PollWithdrawn { worker: w.clone() });
                break;
            }
            for a in assigned {
                let kind = st.tasks[&a.task_id].kind.clone();
                let outputs = outputs_for(&kind, &digest).into_iter().collect();
                let lease = machine::LeaseRef {
                    task_id: a.task_id,
                    lease_id: a.lease_id,
                    rank: a.rank,
                };
                step(
                    &mut st,
                    Event::Complete {
                        lease,
                        outputs,
                        metrics: Default::default(),
                        now: 4,
                    },
                );
                made += 1;
            }
        }
    }
    store.flush().await.expect("flush");
    made
}

async fn restart(history: usize) {
    let dir = tempfile::tempdir().expect("tempdir");
    let t = Instant::now();
    let made = build_history(dir.path(), history).await;
    println!(
        "history: {made} finished tasks written in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    let bin = env!("CARGO_BIN_EXE_coordinator");
    let mut times = Vec::new();
    for _ in 0..3 {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("port")
            .port();
        let start = Instant::now();
        let mut child = std::process::Command::new(bin)
            .args([
                "serve",
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--data-dir",
            ])
            .arg(dir.path())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("spawn coordinator");
        let target = Target {
            url: format!("http://127.0.0.1:{port}"),
            token: None,
            ca_cert: None,
            client_identity: None,
        };
        loop {
            if let Ok(ch) = target.channel().await {
                let mut h = tonic_health::pb::health_client::HealthClient::new(ch);
                if h.check(tonic_health::pb::HealthCheckRequest {
                    service: String::new(),
                })
                .await
                .is_ok()
                {
                    break;
                }
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        times.push(start.elapsed());
        let _ = child.kill();
        let _ = child.wait();
    }
    times.sort();
    println!(
        "restart-to-serving with {made} tasks in history: median {:.0} ms (runs: {:?})",
        times[1].as_secs_f64() * 1e3,
        times
    );
}

fn main() {
    // `cargo bench` passes `--bench`; nothing to filter here.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let workers: Vec<usize> = std::env::var("BENCH_WORKERS")
        .unwrap_or_else(|_| "8,32".into())
        .split(',')
        .filter_map(|w| w.trim().parse().ok())
        .collect();
    let tasks = env_usize("BENCH_TASKS", 5000);
    let history = env_usize("BENCH_HISTORY", 100_000);
    println!(
        "machine: {} cores",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    );
    rt.block_on(async {
        for w in workers {
            throughput(w, tasks).await;
        }
        restart(history).await;
    });
}
