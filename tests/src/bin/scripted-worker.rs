//! A worker for end-to-end tests of the orchestration: the real agent (`distillery_worker::agent`)
//! with a runner that does no ML but behaves like the real ones at the protocol level: it
//! uploads real artifacts, reports progress and checkpoints, meets its gang at a rendezvous,
//! resumes from the checkpoint it is given, and stops when its lease is revoked.
//!
//! Knobs (environment): SCRIPT_TASK_MS (time per task, default 100), SCRIPT_DISTILL_STEPS
//! (default 8), SCRIPT_RANK_DELAY_MS (ranks > 0 wait this long before the rendezvous),
//! SCRIPT_PPL / SCRIPT_TEACHER_PPL / SCRIPT_PPL_EXTENDED (perplexities reported),
//! SCRIPT_JUDGE ("wins,ties,losses"), SCRIPT_FAIL_ONCE (a kind whose first attempt fails).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use distillery_proto::client::Target;
use distillery_proto::v1 as pb;
use distillery_worker::agent::{Agent, AgentConfig};
use distillery_worker::devices::parse_devices;
use distillery_worker::runner::{TaskContext, TaskError, TaskOutput, TaskRunner};

#[derive(Parser)]
struct Args {
    #[arg(long)]
    coordinator: String,
    #[arg(long, default_value = "cpu")]
    devices: String,
    #[arg(long)]
    work_dir: std::path::PathBuf,
    #[arg(long, env = "DISTILLERY_TOKEN")]
    token: Option<String>,
}

fn env_u64(k: &str, d: u64) -> u64 {
    std::env::var(k)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(d)
}

fn env_f64(k: &str, d: f64) -> f64 {
    std::env::var(k)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(d)
}

struct Scripted;

impl Scripted {
    fn blob(
        &self,
        ctx: &TaskContext,
        name: &str,
        body: &serde_json::Value,
    ) -> Result<String, TaskError> {
        let p = ctx.work_dir().join(name);
        std::fs::write(&p, body.to_string()).map_err(|e| TaskError::retryable(e.to_string()))?;
        ctx.upload_file(&p)
    }

    fn sleep_checking(&self, ctx: &TaskContext, ms: u64) -> Result<(), TaskError> {
        let mut left = ms;
        while left > 0 {
            if ctx.cancelled() {
                return Err(TaskError::cancelled());
            }
            let d = left.min(20);
            std::thread::sleep(Duration::from_millis(d));
            left -= d;
        }
        Ok(())
    }

    fn distill(
        &self,
        task: &pb::TaskAssignment,
        ctx: &TaskContext,
    ) -> Result<TaskOutput, TaskError> {
        let gang = task.gang.clone().unwrap_or_default();
        let rank = gang.rank;
        if rank > 0 {
            self.sleep_checking(ctx, env_u64("SCRIPT_RANK_DELAY_MS", 0))?;
        }
        tracing::info!(task = %ctx.lease().task_id, rank, "rendezvous: waiting for the gang");
        let payloads = ctx.rendezvous("init", format!("rank{rank}").as_bytes())?;
        let expect: Vec<Vec<u8>> = (0..gang.world_size)
            .map(|r| format!("rank{r}").into_bytes())
            .collect();
        if payloads != expect {
            return Err(TaskError::fatal(format!(
                "rendezvous returned {payloads:?}"
            )));
        }
        tracing::info!(task = %ctx.lease().task_id, rank, "rendezvous: gang complete");
        // Every rank starts from the pruned model directory.
        let pruned = task
            .inputs
            .get("pruned")
            .ok_or_else(|| TaskError::fatal("no pruned input"))?;
        let dir = ctx.fetch(pruned)?;
        if !dir.join("config.json").is_file()
            || std::fs::metadata(dir.join("sub/weights.bin"))
                .map(|m| m.len())
                .unwrap_or(0)
                != 3 << 20
        {
            return Err(TaskError::fatal(format!(
                "pruned model directory {} is incomplete",
                dir.display()
            )));
        }
        let extension: u64 = task
            .params
            .get("extension")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        // An extension trains twice as long, continuing the previous distillation.
        let steps = env_u64("SCRIPT_DISTILL_STEPS", 8) << extension;
        let mut step = 0u64;
        let start_from = if task.resume_checkpoint.is_empty() {
            task.inputs.get("init_checkpoint").cloned()
        } else {
            Some(task.resume_checkpoint.clone())
        };
        if let Some(ck) = start_from {
            let p = ctx.fetch(&ck)?;
            let v: serde_json::Value = serde_json::from_slice(
                &std::fs::read(&p).map_err(|e| TaskError::retryable(e.to_string()))?,
            )
            .map_err(|e| TaskError::fatal(e.to_string()))?;
            step = v["step"].as_u64().unwrap_or(0);
            tracing::info!(task = %ctx.lease().task_id, rank, step, "resuming from checkpoint");
        }
        let resumed_from = step;
        let per_step = env_u64("SCRIPT_TASK_MS", 100) / steps.max(1);
        while step < steps {
            self.sleep_checking(ctx, per_step)?;
            step += 1;
            if rank == 0 {
                let loss = 3.0 / (step as f64 + 1.0);
                let ck = if step.is_multiple_of(2) {
                    Some(self.blob(
                        ctx,
                        &format!("ck-{step}.json"),
                        &serde_json::json!({"task": ctx.lease().task_id, "step": step}),
                    )?)
                } else {
                    None
                };
                let m: BTreeMap<String, f64> = [
                    ("step".to_string(), step as f64),
                    ("total_steps".to_string(), steps as f64),
                    ("loss".to_string(), loss),
                ]
                .into();
                ctx.progress(m, ck.as_deref(), &format!("distill step {step}/{steps}"))?;
            }
        }
        let mut out = TaskOutput::default();
        if rank == 0 {
            let student = self.blob(
                ctx,
                "student.json",
                &serde_json::json!({"task": ctx.lease().task_id, "extension": extension}),
            )?;
            out.outputs.insert("student".into(), student);
            out.metrics = [
                ("distill.steps".to_string(), steps as f64),
                (
                    "distill.tokens".to_string(),
                    task.params
                        .get("tokens")
                        .and_then(|t| t.parse().ok())
                        .unwrap_or(0.0),
                ),
                ("distill.final_loss".to_string(), 3.0 / (steps as f64 + 1.0)),
                ("distill.world_size".to_string(), f64::from(gang.world_size)),
                ("distill.resumed_from_step".to_string(), resumed_from as f64),
            ]
            .into();
        }
        Ok(out)
    }
}

impl TaskRunner for Scripted {
    fn kinds(&self) -> Vec<String> {
        distillery_coordinator::phases::kind::ALL
            .iter()
            .map(|k| k.to_string())
            .collect()
    }

    fn run(&self, task: &pb::TaskAssignment, ctx: &TaskContext) -> Result<TaskOutput, TaskError> {
        if std::env::var("SCRIPT_FAIL_ONCE").is_ok_and(|k| k == task.kind) && task.attempt == 1 {
            return Err(TaskError::retryable(format!(
                "scripted failure of {} attempt 1",
                task.kind
            )));
        }
        if task.kind == "distill" {
            return self.distill(task, ctx);
        }
        let ms = env_u64("SCRIPT_TASK_MS", 100);
        for i in 1..=4u64 {
            self.sleep_checking(ctx, ms / 4)?;
            let m: BTreeMap<String, f64> = [
                ("step".to_string(), i as f64),
                ("total_steps".to_string(), 4.0),
            ]
            .into();
            ctx.progress(m, None, &format!("{} {}/4", task.kind, i))?;
        }
        let body =
            serde_json::json!({"kind": task.kind, "params": task.params, "round": task.round});
        let mut out = TaskOutput::default();
        let role = task
            .params
            .get("role")
            .map(String::as_str)
            .unwrap_or("student");
        match task.kind.as_str() {
            "score" => {
                out.outputs
                    .insert("scores".into(), self.blob(ctx, "scores.json", &body)?);
            }
            "score_depth" => {
                out.outputs
                    .insert("depth_scores".into(), self.blob(ctx, "depth.json", &body)?);
            }
            "prune" => {
                // A model directory, as the real pruner writes one.
                let dir = ctx.work_dir().join("pruned");
                let io = |e: std::io::Error| TaskError::retryable(e.to_string());
                std::fs::create_dir_all(dir.join("sub")).map_err(io)?;
                std::fs::write(dir.join("config.json"), body.to_string()).map_err(io)?;
                std::fs::write(
                    dir.join("sub").join("weights.bin"),
                    vec![task.round as u8; 3 << 20],
                )
                .map_err(io)?;
                out.outputs.insert("pruned".into(), ctx.upload_dir(&dir)?);
                out.metrics
                    .insert("params".into(), 1000.0 - 100.0 * f64::from(task.round));
            }
            "perplexity" => {
                let ppl = if role == "teacher" {
                    env_f64("SCRIPT_TEACHER_PPL", 10.0)
                } else {
                    // The student's quality follows its distillation: read what produced it.
                    let student = task
                        .inputs
                        .get("student")
                        .ok_or_else(|| TaskError::fatal("no student input"))?;
                    let p = ctx.fetch(student)?;
                    let v: serde_json::Value = serde_json::from_slice(
                        &std::fs::read(&p).map_err(|e| TaskError::retryable(e.to_string()))?,
                    )
                    .map_err(|e| TaskError::fatal(e.to_string()))?;
                    if v["extension"].as_u64().unwrap_or(0) > 0 {
                        env_f64("SCRIPT_PPL_EXTENDED", 11.0)
                    } else {
                        env_f64("SCRIPT_PPL", 12.0)
                    }
                };
                out.metrics.insert("perplexity".into(), ppl);
            }
            "generate" => {
                out.outputs
                    .insert("answers".into(), self.blob(ctx, "answers.json", &body)?);
            }
            "judge" => {
                out.outputs
                    .insert("judgments".into(), self.blob(ctx, "judgments.json", &body)?);
                let wtl = std::env::var("SCRIPT_JUDGE").unwrap_or_else(|_| "5,2,3".into());
                let v: Vec<f64> = wtl.split(',').filter_map(|x| x.parse().ok()).collect();
                for (k, x) in ["wins", "ties", "losses"].iter().zip(v) {
                    out.metrics.insert(format!("sum.judge.{k}"), x);
                }
            }
            other => return Err(TaskError::fatal(format!("unknown kind {other}"))),
        }
        Ok(out)
    }
}

fn main() {
    let args = Args::parse();
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .try_init();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let cfg = AgentConfig {
        target: Target {
            url: args.coordinator,
            token: args.token,
            ca_cert: None,
            client_identity: None,
        },
        devices: parse_devices(&args.devices).expect("devices"),
        work_dir: args.work_dir,
        host: "scripted".into(),
        labels: BTreeMap::new(),
    };
    rt.block_on(async move {
        let agent = Agent::new(cfg, Arc::new(Scripted)).expect("agent");
        if let Err(e) = agent.run().await {
            eprintln!("scripted-worker: {e:#}");
            std::process::exit(1);
        }
    });
}
