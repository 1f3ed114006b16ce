//! Harness for end-to-end tests: starts the real `coordinator` binary and worker processes on
//! loopback, kills them with SIGKILL, and talks to them through the CLI and the gRPC clients.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use distillery_proto::client::{CampaignClient, Target, WorkerClient};
use distillery_proto::v1 as pb;

pub mod browser;
pub mod chaos;
pub mod mutate;
pub mod proxy;
pub mod python;

/// A binary of this crate, built by cargo before its integration tests run. `coordinator` and
/// `worker` are the production entry points (`*-under-test` call the same `cli::main`).
pub fn bin(name: &str) -> PathBuf {
    let file = match name {
        "coordinator" => "coordinator-under-test",
        "worker" => "worker-under-test",
        other => other,
    };
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>/deps");
    let p = dir.join(file);
    assert!(
        p.exists(),
        "{} is missing: run the tests with `cargo test`",
        p.display()
    );
    p
}

/// A free loopback port, never the same one twice in a process (a coordinator restarted on its
/// port must not find it taken by another test's server).
pub fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    loop {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("a free port");
        let mut given = GIVEN.lock().unwrap_or_else(|p| p.into_inner());
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
}

/// A running `worker serve` on a loopback port, killed when dropped.
pub struct ServeProc {
    child: Child,
    pub port: u16,
}

impl ServeProc {
    /// Starts `worker serve --model MODEL --listen 127.0.0.1:PORT ARGS...` and waits until it
    /// accepts connections (or exits, with its stderr in the panic).
    pub fn start(model: &Path, args: &[&str]) -> ServeProc {
        let port = free_port();
        let child = Command::new(bin("worker"))
            .arg("serve")
            .arg("--model")
            .arg(model)
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("worker serve starts");
        let mut p = ServeProc { child, port };
        let deadline = Instant::now() + Duration::from_secs(60);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Ok(Some(status)) = p.child.try_wait() {
                let mut err = String::new();
                if let Some(mut e) = p.child.stderr.take() {
                    let _ = std::io::Read::read_to_string(&mut e, &mut err);
                }
                panic!("worker serve exited with {status}: {err}");
            }
            assert!(Instant::now() < deadline, "worker serve did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        // Its log is not needed once it serves; a full pipe must not block it.
        if let Some(mut e) = p.child.stderr.take() {
            std::thread::spawn(move || std::io::copy(&mut e, &mut std::io::sink()));
        }
        p
    }

    /// `http://127.0.0.1:PORT/v1`
    pub fn base(&self) -> String {
        format!("http://127.0.0.1:{}/v1", self.port)
    }
}

impl Drop for ServeProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A running `coordinator serve`.
pub struct CoordinatorProc {
    child: Option<Child>,
    pub port: u16,
    pub data_dir: PathBuf,
    pub args: Vec<String>,
    pub log: PathBuf,
    pub token: Option<String>,
}

impl CoordinatorProc {
    /// Starts `coordinator serve` on a free port with `args`, and waits until it serves.
    pub fn start(data_dir: &Path, args: &[&str]) -> CoordinatorProc {
        let mut c = CoordinatorProc {
            child: None,
            port: free_port(),
            data_dir: data_dir.to_path_buf(),
            args: args.iter().map(|s| s.to_string()).collect(),
            log: data_dir.with_extension("coordinator.log"),
            token: None,
        };
        c.spawn();
        c
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("log file");
        let child = Command::new(bin("coordinator"))
            .arg("serve")
            .arg("--listen")
            .arg(format!("127.0.0.1:{}", self.port))
            .arg("--data-dir")
            .arg(&self.data_dir)
            .args(&self.args)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start coordinator");
        self.child = Some(child);
        self.wait_serving();
    }

    /// Waits until the gRPC health check answers SERVING.
    pub fn wait_serving(&self) {
        let url = self.url();
        let deadline = Instant::now() + Duration::from_secs(30);
        // On a thread of its own, so callers may be sync or inside a runtime.
        let ready = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            loop {
                let ok = rt.block_on(async {
                    let Ok(ch) = (Target {
                        url: url.clone(),
                        ..Default::default()
                    })
                    .channel()
                    .await
                    else {
                        return false;
                    };
                    let mut h = tonic_health::pb::health_client::HealthClient::new(ch);
                    h.check(tonic_health::pb::HealthCheckRequest {
                        service: String::new(),
                    })
                    .await
                    .map(|r| {
                        r.into_inner().status
                            == tonic_health::pb::health_check_response::ServingStatus::Serving
                                as i32
                    })
                    .unwrap_or(false)
                });
                if ok {
                    return true;
                }
                if Instant::now() > deadline {
                    return false;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        })
        .join()
        .unwrap_or(false);
        assert!(
            ready,
            "coordinator did not start; log:\n{}",
            self.log_text()
        );
    }

    /// SIGKILL, no shutdown of any kind.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Kills and starts again on the same data dir and port.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Runs a client subcommand of the `coordinator` binary against this server.
    pub fn cli(&self, args: &[&str]) -> Output {
        let mut cmd = Command::new(bin("coordinator"));
        cmd.args(args)
            .env("DISTILLERY_ADDR", self.url())
            .env_remove("DISTILLERY_TOKEN");
        if let Some(t) = &self.token {
            cmd.env("DISTILLERY_TOKEN", t);
        }
        cmd.output().expect("run coordinator cli")
    }

    /// `artifact get WHAT --out OUT`, which must succeed.
    pub fn artifact_get(&self, what: &str, out: &Path) {
        let got = self.cli(&[
            "artifact",
            "get",
            what,
            "--out",
            out.to_str().expect("utf-8 path"),
        ]);
        assert!(
            got.status.success(),
            "artifact get {what}: {}",
            String::from_utf8_lossy(&got.stderr)
        );
    }

    /// `status ID --json`, parsed.
    pub fn status_json(&self, id: Option<&str>) -> serde_json::Value {
        let mut args = vec!["status", "--json"];
        if let Some(id) = id {
            args.insert(1, id);
        }
        let out = self.cli(&args);
        assert!(
            out.status.success(),
            "status failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("status --json prints JSON")
    }

    /// `status --json` (all campaigns) with an explicit token.
    pub fn status_json_with(&self, token: &str) -> serde_json::Value {
        let out = Command::new(bin("coordinator"))
            .args(["status", "--json", "--token", token, "--addr", &self.url()])
            .output()
            .expect("run coordinator cli");
        assert!(
            out.status.success(),
            "status failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("status --json prints JSON")
    }

    pub fn target(&self, token: Option<&str>) -> Target {
        Target {
            url: self.url(),
            token: token.map(str::to_string),
            ca_cert: None,
            client_identity: None,
        }
    }

    pub async fn campaigns(&self, token: Option<&str>) -> CampaignClient {
        let t = self.target(token);
        let ch = t.channel().await.expect("connect");
        t.campaigns(ch).expect("client")
    }

    pub async fn workers(&self, token: Option<&str>) -> WorkerClient {
        let t = self.target(token);
        let ch = t.channel().await.expect("connect");
        t.workers(ch).expect("client")
    }
}

/// Uploads `bytes` (written to `path` first) as an artifact through a worker client and returns
/// its digest: a real artifact for tests whose reports must be wrong only in their lease.
pub async fn upload_artifact(w: &mut WorkerClient, path: &Path, bytes: &[u8]) -> String {
    std::fs::write(path, bytes).unwrap();
    let (digest, _) = distillery_proto::artifact::digest_file(path).await.unwrap();
    w.put_artifact(distillery_proto::artifact::file_chunks(
        path.to_path_buf(),
        digest.clone(),
    ))
    .await
    .expect("upload");
    digest
}

impl Drop for CoordinatorProc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A worker process (the scripted test worker, or the real `worker`).
pub struct WorkerProc {
    child: Option<Child>,
    pub log: PathBuf,
}

impl WorkerProc {
    /// Starts the scripted worker against `url` with `env` knobs (see `scripted-worker`).
    pub fn scripted(url: &str, work_dir: &Path, env: &[(&str, String)]) -> WorkerProc {
        let mut cmd = Command::new(bin("scripted-worker"));
        cmd.args(["--coordinator", url, "--devices", "cpu"]);
        for (k, v) in env {
            cmd.env(k, v);
        }
        Self::spawn(cmd, work_dir)
    }

    /// Starts the production `worker join` binary.
    pub fn real(url: &str, work_dir: &Path, devices: &str) -> WorkerProc {
        let mut cmd = Command::new(bin("worker"));
        cmd.args(["join", "--coordinator", url, "--devices", devices]);
        Self::spawn(cmd, work_dir)
    }

    /// Starts `worker join` with a bearer token (role `worker`).
    pub fn real_with_token(url: &str, work_dir: &Path, devices: &str, token: &str) -> WorkerProc {
        let mut cmd = Command::new(bin("worker"));
        cmd.args([
            "join",
            "--coordinator",
            url,
            "--devices",
            devices,
            "--token",
            token,
        ]);
        Self::spawn(cmd, work_dir)
    }

    /// Runs `cmd --work-dir DIR` with its log in `DIR/worker.log`.
    fn spawn(mut cmd: Command, work_dir: &Path) -> WorkerProc {
        std::fs::create_dir_all(work_dir).expect("work dir");
        let log = work_dir.join("worker.log");
        let logf = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .expect("log");
        let child = cmd
            .arg("--work-dir")
            .arg(work_dir)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(logf)
            .spawn()
            .expect("start worker");
        WorkerProc {
            child: Some(child),
            log,
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().map(|c| c.id() as i32).unwrap_or(0)
    }

    /// Freezes the process (it stops heart-beating but keeps its sockets).
    pub fn stop(&self) {
        unsafe { libc::kill(self.pid(), libc::SIGSTOP) };
    }

    pub fn cont(&self) {
        unsafe { libc::kill(self.pid(), libc::SIGCONT) };
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the log contains `needle`.
    pub fn wait_log(&self, needle: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.log_text().contains(needle) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        false
    }
}

impl Drop for WorkerProc {
    fn drop(&mut self) {
        self.cont();
        self.kill();
    }
}

/// A folder with a teacher (HF config and a chat template), data files and questions, for specs.
pub fn fixture() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    let m = dir.path().join("teacher");
    std::fs::create_dir_all(&m).expect("mkdir");
    std::fs::write(
        m.join("config.json"),
        r#"{"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 8, "num_key_value_heads": 2,
            "num_hidden_layers": 4, "vocab_size": 256, "tie_word_embeddings": true}"#,
    )
    .expect("config");
    // Submitting a spec with a judge checks that the teacher's answers have a chat template.
    std::fs::write(
        m.join("chat_template.jinja"),
        distillery_worker::model::chat::CHATML_TEMPLATE,
    )
    .expect("chat template");
    for f in ["calib.jsonl", "web.jsonl", "web-val.jsonl"] {
        std::fs::write(dir.path().join(f), "{\"text\": \"hello world\"}\n").expect("data");
    }
    std::fs::write(
        dir.path().join("questions.jsonl"),
        "{\"question_id\": 1, \"category\": \"writing\", \"turns\": [\"Hi?\"]}\n",
    )
    .expect("questions");
    dir
}

/// Writes `docs` as a JSONL corpus (`{"text": ...}` per line) into each of `files` under `dir`.
pub fn write_corpus(dir: &Path, files: &[&str], docs: impl IntoIterator<Item = String>) {
    let text: String = docs
        .into_iter()
        .map(|d| serde_json::json!({ "text": d }).to_string() + "\n")
        .collect();
    for f in files {
        std::fs::write(dir.join(f), &text).expect("write corpus");
    }
}

/// A spec with `rounds` rounds of the given distillation world size, plus `extra` TOML.
pub fn spec_toml(rounds: usize, world_size: u32, extra: &str) -> String {
    let mut s = String::from(
        "name = \"e2e\"\nseed = 1\n[teacher]\nmodel = \"teacher\"\n[data]\n\
         calibration = { path = \"calib.jsonl\", samples = 4, seq_len = 16 }\n\
         train = [ { name = \"web\", path = \"web.jsonl\" } ]\n\
         validation = [ { name = \"web\", path = \"web-val.jsonl\" } ]\n",
    );
    let layers = [3, 2, 1];
    for r in 0..rounds {
        s.push_str(&format!(
            "[[rounds]]\ntarget = {{ num_layers = {} }}\ndistill = {{ tokens = 1000, world_size = {world_size}, checkpoint_every = 2 }}\n",
            layers[r.min(2)]
        ));
    }
    s.push_str(extra);
    s
}

/// Writes a spec into the fixture folder and returns its path.
pub fn write_spec(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).expect("write spec");
    p
}

/// Submits a spec through the CLI and returns the campaign id.
pub fn submit(c: &CoordinatorProc, spec: &Path) -> String {
    let out = c.cli(&["submit", spec.to_str().expect("utf-8 path")]);
    assert!(
        out.status.success(),
        "submit failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// A campaign's event stream from sequence number `from`.
pub async fn watch_from(c: &CoordinatorProc, id: &str, from: u64) -> tonic::Streaming<pb::Event> {
    let mut client = c.campaigns(c.token.as_deref()).await;
    client
        .watch(pb::WatchRequest {
            campaign_id: id.to_string(),
            from_seq: from,
        })
        .await
        .expect("watch")
        .into_inner()
}

/// All events of a campaign from the durable log, in order (reads until the terminal event).
pub async fn all_events(c: &CoordinatorProc, id: &str) -> Vec<pb::Event> {
    use futures::StreamExt;
    let mut s = watch_from(c, id, 1).await;
    let mut out = Vec::new();
    while let Some(e) = s.next().await {
        out.push(e.expect("event"));
    }
    out
}

/// Waits until a campaign's event satisfies `pred` (following the live log), returning it.
pub async fn wait_event(
    c: &CoordinatorProc,
    id: &str,
    timeout: Duration,
    pred: impl Fn(&pb::Event) -> bool,
) -> pb::Event {
    use futures::StreamExt;
    let fut = async {
        let mut s = watch_from(c, id, 1).await;
        while let Some(e) = s.next().await {
            let e = e.expect("event");
            if pred(&e) {
                return Some(e);
            }
        }
        None
    };
    match tokio::time::timeout(timeout, fut).await {
        Ok(Some(e)) => e,
        Ok(None) => panic!(
            "campaign {id} ended without the awaited event; log:\n{}",
            c.log_text()
        ),
        Err(_) => panic!(
            "timed out waiting for an event of {id}; log:\n{}",
            c.log_text()
        ),
    }
}

/// Polls `status ID --json` until the campaign is terminal; returns the JSON.
pub fn wait_terminal(c: &CoordinatorProc, id: &str, timeout: Duration) -> serde_json::Value {
    let deadline = Instant::now() + timeout;
    loop {
        let v = c.status_json(Some(id));
        let st = v["state"].as_str().unwrap_or_default().to_string();
        if matches!(st.as_str(), "succeeded" | "failed" | "cancelled") {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "campaign {id} still {st}; status {v}\nlog:\n{}",
            c.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `GET path` from `addr`: the whole response, or `None` when nothing answers there.
pub fn http_get(addr: &str, path: &str) -> Option<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").as_bytes())
        .ok()?;
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    Some(out)
}

/// `GET /metrics` from a coordinator's `--metrics-listen` address (or any server with one).
pub fn scrape(addr: &str) -> String {
    http_get(addr, "/metrics").expect("metrics endpoint")
}

/// Coordinator timings for end-to-end tests that run real ML tasks: a lost worker's lease
/// expires in 5 s, heartbeats every 300 ms.
pub const ML_TIMING: &[&str] = &[
    "--lease-timeout-ms",
    "5000",
    "--heartbeat-interval-ms",
    "300",
    "--poll-timeout-ms",
    "2000",
    "--backoff-base-ms",
    "100",
];

/// Waits until `f` holds, polling every 50 ms.
pub fn eventually(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

/// The repository's root (the tests crate's parent).
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// The Python with the tests' packages: `DISTILLERY_PYTHON`, or `.venv-parity` (which `.ci/run`
/// creates from `tests/python/requirements.txt`).
pub fn python() -> Option<PathBuf> {
    if let Ok(p) = std::env::var("DISTILLERY_PYTHON") {
        return Some(PathBuf::from(p));
    }
    let venv = repo_root().join(".venv-parity/bin/python");
    venv.exists().then_some(venv)
}

/// The Python to run, or `None` after saying why `test` skips (never on CI, which must have it).
pub fn python_or_skip(test: &str) -> Option<PathBuf> {
    let py = python();
    if py.is_none() {
        assert!(
            std::env::var("CI").is_err(),
            "CI must provide the tests' Python environment (.ci/run creates .venv-parity)"
        );
        eprintln!(
            "SKIPPED {test}: no Python with the tests' packages (set DISTILLERY_PYTHON or run .ci/run)"
        );
    }
    py
}

/// A Python with `distillery_client` installed from this checkout's sources, or `None` after
/// saying why `test` skips (never on CI). An install built from other sources fails the test:
/// it would test code that is not in the tree.
pub fn python_client_or_skip(test: &str) -> Option<PathBuf> {
    let py = python_or_skip(test)?;
    let installed = Command::new(&py)
        .args(["-c", "import distillery_client"])
        .output()
        .expect("run python");
    if !installed.status.success() {
        assert!(
            std::env::var("CI").is_err(),
            "CI must install the Python client (.ci/run: pip install ./clients/python): {}",
            String::from_utf8_lossy(&installed.stderr)
        );
        eprintln!(
            "SKIPPED {test}: distillery_client is not installed in {} (pip install ./clients/python, or run .ci/run)",
            py.display()
        );
        return None;
    }
    let check = Command::new(&py)
        .args(["-m", "distillery_client._source", "--check"])
        .arg(repo_root())
        .output()
        .expect("run python");
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );
    Some(py)
}

/// Runs `tests/python/SCRIPT` with `args` (no inherited `DISTILLERY_*` settings); returns its
/// stdout parsed as JSON, failing the test with its stderr when it fails.
pub fn run_python(py: &Path, script: &str, args: &[&str]) -> serde_json::Value {
    let out = Command::new(py)
        .arg(repo_root().join("tests/python").join(script))
        .args(args)
        .env_remove("DISTILLERY_ADDR")
        .env_remove("DISTILLERY_TOKEN")
        .env_remove("DISTILLERY_CA_CERT")
        .env("PYTHONDONTWRITEBYTECODE", "1")
        // grpcio logs every failed handshake of the calls that are meant to fail.
        .env("GRPC_VERBOSITY", "ERROR")
        .output()
        .expect("run python");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{script} failed:\n{stderr}");
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "{script} printed no JSON ({e}): {}\n{stderr}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

/// Writes a fresh CA (`ca.pem`) and a certificate for `localhost` signed by it (`tls.crt`,
/// `tls.key`) into `dir`.
pub fn write_tls_files(dir: &Path) {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate().expect("CA key");
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    // Distinct names: with rcgen's default name on both, OpenSSL/BoringSSL clients (grpcio)
    // take the leaf for self-signed, since its issuer equals its subject.
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "Distillery test CA");
    let ca_cert = ca_params.self_signed(&ca_key).expect("CA certificate");
    let issuer = Issuer::from_params(&ca_params, &ca_key);
    let key = KeyPair::generate().expect("key");
    let mut params = CertificateParams::new(vec!["localhost".to_string()]).expect("params");
    params
        .distinguished_name
        .push(DnType::CommonName, "localhost");
    let cert = params.signed_by(&key, &issuer).expect("certificate");
    std::fs::write(dir.join("ca.pem"), ca_cert.pem()).expect("write ca.pem");
    std::fs::write(dir.join("tls.crt"), cert.pem()).expect("write tls.crt");
    std::fs::write(dir.join("tls.key"), key.serialize_pem()).expect("write tls.key");
}
