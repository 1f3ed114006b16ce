//! Each side of a comparison runs in its own long-lived child process (ours: this bench binary
//! re-executed with a spec in `DISTILLERY_BENCH_CHILD` and the kernel switches in its
//! environment; PyTorch: a script under `tests/python/`). A child sets up, runs its warm-up,
//! prints `{"ready": true, "info": …}`, then answers every stdin line `run N` with
//! `{"seconds": mean of N iterations}`; it exits at end of input.
//!
//! A [`Set`] is an anchor (a row the others are compared with) and other rows; the parent keeps
//! the anchor and up to `max_alive - 1` others alive and asks them in turn, round after round
//! (the order reversed every other round), so every row sees the same machine state within a
//! round. A row's figure is the median over rounds; its ratio to the anchor is the median of the
//! per-round ratios, which cancels most of the drift of a shared machine.

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};

use serde_json::Value;

/// The environment variable that turns this bench binary into one of our children.
pub const CHILD_ENV: &str = "DISTILLERY_BENCH_CHILD";

/// Runtime switches of our kernels; every row of ours sets or clears each of them, so a switch
/// left in the caller's shell cannot leak into a row.
pub const SWITCHES: [&str; 3] = [
    "DISTILLERY_FUSED",
    "DISTILLERY_BF16_GEMM",
    "DISTILLERY_CPU_AUTOCAST",
];

/// Which peak a row's GFLOP/s is a fraction of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precision {
    F32,
    Bf16,
}

/// What a row's ratio to its set's anchor means.
#[derive(Debug, Clone, PartialEq)]
pub enum Compare {
    /// Shown in the table only.
    None,
    /// The anchor is ours, this row PyTorch: a final `ratio distillery / PyTorch <what>` line.
    PyTorch(String),
    /// The anchor is ours before a change, this row after it: a `gain <what>` line.
    Gain(String),
}

/// One row: a command that speaks the child protocol, and what its iterations are worth.
#[derive(Debug, Clone)]
pub struct Variant {
    pub label: String,
    pub program: PathBuf,
    pub args: Vec<String>,
    /// `(name, Some(value))` sets, `(name, None)` removes.
    pub env: Vec<(String, Option<String>)>,
    /// Tokens per iteration.
    pub tokens: f64,
    /// Matrix-multiply FLOPs per iteration.
    pub flops: f64,
    pub precision: Precision,
    pub compare: Compare,
}

impl Variant {
    /// A row of ours: this binary as a child running `spec`, on `threads` threads (candle's
    /// matmul and our kernels size their rayon pools from `RAYON_NUM_THREADS`; candle's own
    /// pool from `CANDLE_NUM_THREADS`), with these kernel switches set and the others unset.
    pub fn ours(label: &str, spec: Value, threads: usize, switches: &[(&str, &str)]) -> Variant {
        let program = std::env::current_exe().unwrap_or_else(|e| {
            eprintln!("cannot find this bench's own executable to run its children: {e}");
            std::process::exit(2)
        });
        let mut env = vec![
            (CHILD_ENV.to_string(), Some(spec.to_string())),
            ("RAYON_NUM_THREADS".into(), Some(threads.to_string())),
            ("CANDLE_NUM_THREADS".into(), Some(threads.to_string())),
        ];
        for s in SWITCHES {
            let v = switches
                .iter()
                .find(|(k, _)| *k == s)
                .map(|(_, v)| v.to_string());
            env.push((s.to_string(), v));
        }
        Variant {
            label: label.into(),
            program,
            args: vec![],
            env,
            tokens: 0.0,
            flops: 0.0,
            precision: Precision::F32,
            compare: Compare::None,
        }
    }

    /// A PyTorch row: `python script args…` on `threads` threads (OpenMP and MKL pools through
    /// their variables; the script also calls `torch.set_num_threads`).
    pub fn pytorch(
        label: &str,
        python: &Path,
        script: &Path,
        args: Vec<String>,
        threads: usize,
    ) -> Variant {
        let mut all = vec![script.display().to_string()];
        all.extend(args);
        Variant {
            label: label.into(),
            program: python.to_path_buf(),
            args: all,
            env: vec![
                ("OMP_NUM_THREADS".into(), Some(threads.to_string())),
                ("MKL_NUM_THREADS".into(), Some(threads.to_string())),
                ("PYTHONUNBUFFERED".into(), Some("1".into())),
            ],
            tokens: 0.0,
            flops: 0.0,
            precision: Precision::F32,
            compare: Compare::None,
        }
    }

    pub fn work(mut self, tokens: f64, flops: f64, precision: Precision) -> Variant {
        self.tokens = tokens;
        self.flops = flops;
        self.precision = precision;
        self
    }

    pub fn compare(mut self, c: Compare) -> Variant {
        self.compare = c;
        self
    }
}

/// The sets to run: those whose title contains one of the comma-separated parts of
/// `BENCH_FILTER` (all when unset), so a run can take only some rows.
pub fn selected(sets: Vec<Set>) -> Vec<Set> {
    let parts = super::env_list("BENCH_FILTER", &[]);
    if parts.is_empty() {
        return sets;
    }
    let keep: Vec<Set> = sets
        .into_iter()
        .filter(|s| parts.iter().any(|p| s.title.contains(p.as_str())))
        .collect();
    if keep.is_empty() {
        eprintln!("BENCH_FILTER={parts:?} matches no set's title");
        std::process::exit(2)
    }
    keep
}

/// An anchor and the rows compared with it.
pub struct Set {
    pub title: String,
    pub anchor: Variant,
    pub others: Vec<Variant>,
}

/// What one row measured.
#[derive(Debug, Clone)]
pub struct Measured {
    pub variant: Variant,
    /// The child's `info` (versions, attention implementation, threads).
    pub info: Option<Value>,
    /// The child's peak resident memory (Linux `VmHWM`), read before it exits.
    pub peak_rss_bytes: Option<u64>,
    /// Seconds per iteration, one per round.
    pub seconds: Vec<f64>,
    /// `(anchor seconds, this row's seconds)` of the same round.
    pub pairs: Vec<(f64, f64)>,
    pub error: Option<String>,
}

impl Measured {
    fn new(variant: Variant) -> Measured {
        Measured {
            variant,
            info: None,
            peak_rss_bytes: None,
            seconds: vec![],
            pairs: vec![],
            error: None,
        }
    }

    pub fn tokens_per_s(&self) -> Option<f64> {
        median(&self.seconds).map(|s| self.variant.tokens / s)
    }

    /// This row's speed over the anchor's: the median of the per-round ratios.
    pub fn speed_vs_anchor(&self) -> Option<f64> {
        let r: Vec<f64> = self.pairs.iter().map(|(a, o)| a / o).collect();
        median(&r)
    }

    /// The anchor's speed over this row's: the median of the per-round ratios.
    pub fn anchor_vs_this(&self) -> Option<f64> {
        let r: Vec<f64> = self.pairs.iter().map(|(a, o)| o / a).collect();
        median(&r)
    }
}

pub fn median(v: &[f64]) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    Some(if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    })
}

/// A running child.
struct Worker {
    child: Child,
    stdin: Option<ChildStdin>,
    out: BufReader<ChildStdout>,
    stderr: File,
}

impl Worker {
    fn spawn(v: &Variant) -> Result<(Worker, Option<Value>), String> {
        let stderr = tempfile::tempfile().map_err(|e| format!("temporary file for stderr: {e}"))?;
        let err_clone = stderr
            .try_clone()
            .map_err(|e| format!("temporary file for stderr: {e}"))?;
        let mut cmd = Command::new(&v.program);
        cmd.args(&v.args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(err_clone));
        for (k, val) in &v.env {
            match val {
                Some(val) => cmd.env(k, val),
                None => cmd.env_remove(k),
            };
        }
        let mut child = cmd
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", v.program.display()))?;
        let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
            return Err("child has no stdin/stdout pipe".into());
        };
        let mut w = Worker {
            child,
            stdin: Some(stdin),
            out: BufReader::new(stdout),
            stderr,
        };
        let ready = w.read_json()?;
        if ready["ready"] != Value::Bool(true) {
            return Err(format!("expected a ready line, got {ready}"));
        }
        Ok((w, ready.get("info").cloned()))
    }

    fn run(&mut self, reps: usize) -> Result<f64, String> {
        let stdin = self.stdin.as_mut().ok_or("stdin closed")?;
        writeln!(stdin, "run {reps}")
            .and_then(|_| stdin.flush())
            .map_err(|e| format!("child stopped listening: {e}{}", self.stderr_tail()))?;
        let v = self.read_json()?;
        v["seconds"]
            .as_f64()
            .filter(|s| s.is_finite() && *s > 0.0)
            .ok_or_else(|| format!("expected {{\"seconds\": …}}, got {v}"))
    }

    /// The next JSON line on stdout (other lines are skipped); an `error` key is an error.
    fn read_json(&mut self) -> Result<Value, String> {
        loop {
            let mut line = String::new();
            let n = self
                .out
                .read_line(&mut line)
                .map_err(|e| format!("reading the child: {e}"))?;
            if n == 0 {
                let status = self.child.wait().map(|s| s.to_string()).unwrap_or_default();
                return Err(format!("child exited ({status}){}", self.stderr_tail()));
            }
            let t = line.trim();
            if !t.starts_with('{') {
                continue;
            }
            if let Ok(v) = serde_json::from_str::<Value>(t) {
                if let Some(e) = v.get("error") {
                    return Err(format!("child: {e}{}", self.stderr_tail()));
                }
                return Ok(v);
            }
        }
    }

    /// Peak resident set size so far (Linux; `None` elsewhere).
    fn peak_rss(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).ok()?;
        let kb: u64 = status
            .lines()
            .find(|l| l.starts_with("VmHWM:"))?
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()?;
        Some(kb * 1024)
    }

    fn stderr_tail(&mut self) -> String {
        let mut s = String::new();
        if self.stderr.seek(SeekFrom::Start(0)).is_ok() {
            let _ = self.stderr.read_to_string(&mut s);
        }
        let lines: Vec<&str> = s.lines().rev().take(15).collect();
        if lines.is_empty() {
            return String::new();
        }
        let tail: Vec<&str> = lines.into_iter().rev().collect();
        format!("; stderr:\n    {}", tail.join("\n    "))
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        drop(self.stdin.take()); // end of input: the child exits
        let _ = self.child.wait();
    }
}

/// Runs a set: the anchor stays alive throughout, the others `max_alive - 1` at a time, each
/// group for `rounds` rounds of `reps` iterations. Progress goes to stderr.
pub fn run_set(
    set: &Set,
    rounds: usize,
    reps: usize,
    max_alive: usize,
) -> (Measured, Vec<Measured>) {
    let mut anchor = Measured::new(set.anchor.clone());
    let mut others: Vec<Measured> = set.others.iter().cloned().map(Measured::new).collect();
    eprintln!("[{}] starting {}", set.title, set.anchor.label);
    let mut a = match Worker::spawn(&set.anchor) {
        Ok((w, info)) => {
            anchor.info = info;
            w
        }
        Err(e) => {
            anchor.error = Some(e);
            return (anchor, others);
        }
    };
    let per_group = max_alive.max(2) - 1;
    let mut start = 0;
    loop {
        let end = (start + per_group).min(others.len());
        let mut live: Vec<(usize, Worker)> = Vec::new();
        for (i, m) in others.iter_mut().enumerate().take(end).skip(start) {
            eprintln!("[{}] starting {}", set.title, m.variant.label);
            match Worker::spawn(&m.variant) {
                Ok((w, info)) => {
                    m.info = info;
                    live.push((i, w));
                }
                Err(e) => m.error = Some(e),
            }
        }
        for r in 0..rounds {
            eprintln!("[{}] round {}/{rounds}", set.title, r + 1);
            // Anchor first on even rounds, last on odd ones.
            let mut secs_anchor = None;
            let mut secs_other = vec![None; live.len()];
            let order: Vec<Option<usize>> = std::iter::once(None)
                .chain((0..live.len()).map(Some))
                .collect();
            let order: Vec<Option<usize>> = if r % 2 == 0 {
                order
            } else {
                order.into_iter().rev().collect()
            };
            for slot in order {
                match slot {
                    None => match a.run(reps) {
                        Ok(s) => secs_anchor = Some(s),
                        Err(e) => {
                            anchor.error = Some(e);
                            return (anchor, others);
                        }
                    },
                    Some(j) => {
                        let (i, w) = &mut live[j];
                        if others[*i].error.is_none() {
                            match w.run(reps) {
                                Ok(s) => secs_other[j] = Some(s),
                                Err(e) => others[*i].error = Some(e),
                            }
                        }
                    }
                }
            }
            let Some(sa) = secs_anchor else { continue };
            anchor.seconds.push(sa);
            for (j, s) in secs_other.into_iter().enumerate() {
                if let Some(s) = s {
                    let i = live[j].0;
                    others[i].seconds.push(s);
                    others[i].pairs.push((sa, s));
                }
            }
        }
        for (i, w) in &live {
            others[*i].peak_rss_bytes = w.peak_rss();
        }
        drop(live);
        start = end;
        if start >= others.len() {
            break;
        }
    }
    anchor.peak_rss_bytes = a.peak_rss();
    (anchor, others)
}

/// Prints a set's table: tokens/s, GFLOP/s and % of peak from the median round, the spread
/// over rounds, and the speed relative to the anchor (median of the per-round ratios).
pub fn print_set(
    set: &Set,
    anchor: &Measured,
    others: &[Measured],
    rounds: usize,
    reps: usize,
    peak: &super::machine::Peak,
) {
    println!();
    println!(
        "{} (median of {rounds} rounds x {reps}; GFLOP/s = matmul FLOPs / time; % of the register-loop peak of its precision: f32 FMA; bf16 vdpbf16ps, or AMX where present)",
        set.title
    );
    println!(
        "  {:<44} {:>9} {:>8} {:>6} {:>9} {:>17} {:>9} {:>9}",
        "", "tokens/s", "GFLOP/s", "%peak", "s/iter", "tokens/s min-max", "vs first", "peak RSS"
    );
    let row = |m: &Measured, rel: Option<f64>| {
        if let Some(e) = &m.error {
            println!("  {:<44} failed: {e}", m.variant.label);
            if m.seconds.is_empty() {
                return;
            }
        }
        let Some(s) = median(&m.seconds) else {
            println!("  {:<44} no rounds measured", m.variant.label);
            return;
        };
        let v = &m.variant;
        let tps = v.tokens / s;
        let gf = v.flops / s / 1e9;
        let pk = match v.precision {
            Precision::F32 => peak.f32,
            // The fastest bf16 unit the machine has (AMX where present).
            Precision::Bf16 => match (peak.bf16, peak.amx) {
                (Some(a), Some(b)) => Some(a.max(b)),
                (a, b) => a.or(b),
            },
        };
        let pct = pk.map_or("n/a".into(), |p| format!("{:.0}%", 100.0 * gf / p));
        let lo = m.seconds.iter().cloned().fold(f64::INFINITY, f64::min);
        let hi = m.seconds.iter().cloned().fold(0.0, f64::max);
        let spread = format!("{:.0}-{:.0}", v.tokens / hi, v.tokens / lo);
        let rel = rel.map_or("1.00x".to_string(), |r| format!("{r:.2}x"));
        let rss = m
            .peak_rss_bytes
            .map_or("n/a".into(), |b| format!("{:.2} GB", b as f64 / 1e9));
        println!(
            "  {:<44} {tps:>9.1} {gf:>8.1} {pct:>6} {s:>9.3} {spread:>17} {rel:>9} {rss:>9}",
            v.label
        );
    };
    row(anchor, None);
    for m in others {
        match m.speed_vs_anchor() {
            Some(r) => row(m, Some(r)),
            None => row(m, None),
        }
    }
    let infos: Vec<String> = std::iter::once(anchor)
        .chain(others)
        .filter_map(|m| m.info.as_ref().map(|i| format!("{}: {i}", m.variant.label)))
        .collect();
    for i in infos {
        println!("    {i}");
    }
}

/// The closing lines of a bench: every `Gain`, then every `ratio distillery / PyTorch` line.
pub fn print_ratios(results: &[(Measured, Vec<Measured>)]) {
    println!();
    for (_, others) in results {
        for m in others {
            if let Compare::Gain(what) = &m.variant.compare {
                match m.speed_vs_anchor() {
                    Some(r) => println!("gain {what}: {r:.2}x"),
                    None => println!("gain {what}: not measured"),
                }
            }
        }
    }
    for (anchor, others) in results {
        for m in others {
            if let Compare::PyTorch(what) = &m.variant.compare {
                match m.anchor_vs_this() {
                    Some(r) => println!("ratio distillery / PyTorch {what}: {r:.2}x"),
                    None => println!(
                        "ratio distillery / PyTorch {what}: not measured ({})",
                        m.error
                            .as_deref()
                            .or(anchor.error.as_deref())
                            .unwrap_or("no rounds")
                    ),
                }
            }
        }
    }
}

/// The child's side of the protocol: prints the ready line, then answers `run N` lines with the
/// mean seconds of N calls of `step`, and returns at end of input.
pub fn serve(info: Value, mut step: impl FnMut() -> Result<(), String>) -> Result<(), String> {
    let mut out = std::io::stdout().lock();
    let say = |out: &mut std::io::StdoutLock, v: Value| -> Result<(), String> {
        writeln!(out, "{v}")
            .and_then(|_| out.flush())
            .map_err(|e| format!("stdout: {e}"))
    };
    say(&mut out, serde_json::json!({"ready": true, "info": info}))?;
    for line in std::io::stdin().lock().lines() {
        let line = line.map_err(|e| format!("stdin: {e}"))?;
        let n = match line
            .trim()
            .strip_prefix("run ")
            .map(|n| n.trim().parse::<usize>())
        {
            Some(Ok(n)) if n > 0 => n,
            _ => {
                say(
                    &mut out,
                    serde_json::json!({"error": format!("unknown command {line:?}")}),
                )?;
                continue;
            }
        };
        let start = std::time::Instant::now();
        for _ in 0..n {
            step()?;
        }
        let s = start.elapsed().as_secs_f64() / n as f64;
        say(&mut out, serde_json::json!({"seconds": s}))?;
    }
    Ok(())
}

/// Runs `body` as a child if this process is one (the spec in [`CHILD_ENV`]); returns `false`
/// when it is the parent. A child that fails prints `{"error": …}` and exits 1.
pub fn child_main(body: impl FnOnce(Value) -> Result<(), String>) -> bool {
    let Ok(spec) = std::env::var(CHILD_ENV) else {
        return false;
    };
    let result = serde_json::from_str::<Value>(&spec)
        .map_err(|e| format!("{CHILD_ENV}: {e}"))
        .and_then(body);
    if let Err(e) = result {
        println!("{}", serde_json::json!({ "error": e }));
        std::process::exit(1);
    }
    true
}
