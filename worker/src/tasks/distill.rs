//! The `distill` gang task: every rank loads the teacher and the pruned student, meets the others
//! at the coordinator's rendezvous to build the ring (or NCCL on GPUs), resumes from the last
//! checkpoint when there is one, and trains. Rank 0 streams progress (step, tokens, loss, tokens/s,
//! learning rate, domain weights), uploads a checkpoint every `checkpoint_every` steps, and
//! uploads the student at the end. If any rank dies the coordinator re-leases the whole gang,
//! which resumes from the last checkpoint.
//!
//! The same gang runs two more kinds: `search`, a candidate's short distillation in a round's
//! architecture search (the round's schedule, stopped after `stop_tokens`, then scored on
//! validation data; its last checkpoint is where the round's distillation continues if it
//! wins), and `correct`, teacher correction (the teacher itself trained by cross-entropy on the
//! training mix, uploaded as the corrected teacher).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use distillery_proto::v1 as pb;

use super::common::{self, fatal, input, report};
use crate::collective::{ring, Collective, CollectiveError, Solo};
use crate::distill::data::Domain;
use crate::distill::hidden::{HiddenDistill, HiddenLoss};
use crate::distill::loss::Divergence;
use crate::distill::train::{
    DynamicBatchLoading, Objective, Precision, PrecisionDType, TrainConfig, TrainError, Trainer,
};
use crate::model::Llama;
use crate::runner::{TaskContext, TaskError, TaskOutput, TaskRunner};
use crate::tasks::prune::{read_prune_record, PRUNE_RECORD};

/// Validation sequences per domain used for dynamic batch loading.
const DBL_VALIDATION_SEQUENCES: usize = 16;
/// Training sequences read per domain (the sampler cycles through them).
const MAX_SEQUENCES_PER_DOMAIN: usize = 1 << 20;
/// Validation sequences per domain a search candidate is scored on (the same for every
/// candidate: the first ones of each validation file).
pub const SEARCH_VALIDATION_SEQUENCES: usize = 32;
/// Mixed into the campaign seed for teacher correction's data order.
const CORRECTION_SEED: u64 = 0x7eac_4e12_c0ee_c7ed;

/// Runs `distill`, `search` and `correct`.
pub struct DistillTask;

/// What a gang trains.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// The round's distillation.
    Distill,
    /// A search candidate's short distillation: stops early and scores itself.
    Search,
    /// Teacher correction: the teacher trained by cross-entropy, no KD teacher.
    Correct,
}

impl TaskRunner for DistillTask {
    fn kinds(&self) -> Vec<String> {
        vec!["distill".into(), "search".into(), "correct".into()]
    }

    fn run(&self, task: &pb::TaskAssignment, ctx: &TaskContext) -> Result<TaskOutput, TaskError> {
        distill(task, ctx)
    }
}

fn train_err(e: TrainError, ctx: &TaskContext) -> TaskError {
    if ctx.cancelled() {
        return TaskError::cancelled();
    }
    match e {
        // A peer died or the network broke: the attempt is lost (not failed) and the gang
        // restarts from its last checkpoint.
        TrainError::Collective(c) => TaskError::from(c),
        other => fatal(other),
    }
}

/// A checkpoint that could not be written (a full or failing disk, most often): the attempt
/// fails but may be retried, from the last checkpoint that was written (uploaded whole, so never
/// a torn one). A broken gang is lost, as in [`train_err`].
fn checkpoint_err(e: TrainError) -> TaskError {
    match e {
        TrainError::Collective(c) => TaskError::from(c),
        other => TaskError::retryable(other.to_string()),
    }
}

/// The gang's collective: NCCL on GPUs (rank 0's unique id shared at the rendezvous), else a TCP
/// ring (each rank publishes its listener's address at the rendezvous).
fn connect_collective(
    ctx: &TaskContext,
    device: &candle_core::Device,
    rank: usize,
    world: usize,
) -> Result<Box<dyn Collective>, TaskError> {
    if world == 1 {
        return Ok(Box::new(Solo));
    }
    #[cfg(feature = "cuda")]
    if device.is_cuda() {
        use crate::collective::nccl;
        let mine = if rank == 0 {
            nccl::new_id().map_err(|e| fatal(e))?
        } else {
            Vec::new()
        };
        let ids = ctx.rendezvous("nccl", &mine)?;
        let id = ids
            .first()
            .ok_or_else(|| fatal("rendezvous returned no NCCL id"))?;
        let c = nccl::Nccl::connect(device, rank, world, id)
            .map_err(|e| TaskError::lost(e.to_string()))?;
        return Ok(Box::new(c));
    }
    let _ = device;
    let listener = ring::bind(ctx.advertise_ip())
        .map_err(|e| TaskError::retryable(format!("ring listener: {e}")))?;
    let me = listener
        .local_addr()
        .map_err(|e| TaskError::retryable(format!("ring listener: {e}")))?;
    let payloads = ctx.rendezvous("ring", me.to_string().as_bytes())?;
    let addrs: Vec<SocketAddr> = payloads
        .iter()
        .map(|p| {
            String::from_utf8_lossy(p).parse().map_err(|_| {
                fatal(format!(
                    "rendezvous: {:?} is not an address",
                    String::from_utf8_lossy(p)
                ))
            })
        })
        .collect::<Result<_, _>>()?;
    if addrs.len() != world {
        return Err(fatal(format!(
            "rendezvous returned {} addresses for {world} ranks",
            addrs.len()
        )));
    }
    let r = ring::Ring::connect(
        rank,
        listener,
        &addrs,
        Duration::from_secs(60),
        Duration::from_secs(120),
    )
    .and_then(|r| r.abort_when(ctx.cancel.clone()))
    .map_err(|e: CollectiveError| TaskError::from(e))?;
    Ok(Box::new(r))
}

fn distill(task: &pb::TaskAssignment, ctx: &TaskContext) -> Result<TaskOutput, TaskError> {
    let gang = task.gang.clone().unwrap_or(pb::GangInfo {
        gang_id: String::new(),
        rank: 0,
        world_size: 1,
    });
    let (rank, world) = (gang.rank as usize, gang.world_size.max(1) as usize);
    let spec = task
        .spec
        .as_ref()
        .ok_or_else(|| fatal("the assignment carries no campaign spec"))?;
    let mode = match task.kind.as_str() {
        "search" => Mode::Search,
        "correct" => Mode::Correct,
        _ => Mode::Distill,
    };
    let round = spec
        .rounds
        .get(task.round as usize)
        .ok_or_else(|| fatal(format!("the campaign spec has no round {}", task.round)))?;
    let d = match mode {
        Mode::Correct => {
            let tc = spec
                .teacher_correction
                .as_ref()
                .ok_or_else(|| fatal("a correct task needs the campaign's [teacher_correction]"))?;
            distillery_proto::memplan::correction_distill(tc)
        }
        _ => round.distill.clone().unwrap_or_default(),
    };
    let data = spec
        .data
        .as_ref()
        .ok_or_else(|| fatal("the campaign spec has no [data]"))?;
    let tokens: u64 = task
        .params
        .get("tokens")
        .and_then(|t| t.parse().ok())
        .unwrap_or(d.tokens);
    let device = common::device(task)?;
    // Teacher correction trains the teacher itself against the data alone (loss = "ce"): it has
    // no KD teacher.
    let trained = if mode == Mode::Correct {
        "teacher"
    } else {
        "pruned"
    };
    let student_dir = common::model_dir(ctx, input(task, trained)?)?;
    let teacher_dir = if mode == Mode::Correct {
        None
    } else {
        Some(common::model_dir(ctx, input(task, "teacher")?)?)
    };
    let teacher_precision = Precision::parse(&d.teacher_precision)
        .map_err(|e| fatal(format!("distill.teacher_precision: {e}")))?;
    let student = common::load_model(&student_dir, &device)?;
    let field = format!("rounds[{}].distill", task.round);
    let divergence = divergence_of(&d).map_err(|e| fatal(format!("{field}.loss: {e}")))?;
    // Cross-entropy only, without hidden states, needs no teacher at all.
    let teacher = if let Some(teacher_dir) = teacher_dir
        .as_ref()
        .filter(|_| divergence.is_some() || d.hidden.is_some())
    {
        let teacher = common::load_model(teacher_dir, &device)?;
        Some(if teacher.dtype() == teacher_precision.dtype() {
            teacher
        } else {
            teacher
                .converted(teacher_precision.dtype())
                .map_err(fatal)?
        })
    } else {
        None
    };
    let hidden = match (&d.hidden, &teacher) {
        (Some(h), Some(t)) => Some(hidden_of(h, &field, &student_dir, &student, t)?),
        _ => None,
    };
    let objective = Objective {
        divergence,
        top_k: (d.top_k > 0).then_some(d.top_k as usize),
        hidden,
    };
    let tok = common::load_tokenizer(&student_dir)?;
    let eos = common::eos_id(&student);
    let seq_len = d.seq_len.max(2) as usize;
    // A data file lives on storage Distillery does not own: it may be mid-copy or fixed by its
    // owner, so an unreadable or invalid one fails the attempt retryably. It still counts toward
    // `max_attempts`, and `coordinator retry` continues once it is fixed.
    let read = |path: &str, field: &str, max: usize| -> Result<Vec<Vec<u32>>, TaskError> {
        crate::data::load_sequences(Path::new(path), &tok, eos, seq_len + 1, max).map_err(|e| {
            TaskError::retryable(format!(
                "{field}: {e} (fix the file, then `coordinator retry` the campaign)"
            ))
        })
    };
    let mut domains = Vec::new();
    let mut weights = Vec::new();
    for (i, t) in data.train.iter().enumerate() {
        domains.push(Domain {
            name: t.name.clone(),
            sequences: read(
                &t.path,
                &format!("data.train[{i}]"),
                MAX_SEQUENCES_PER_DOMAIN,
            )?,
        });
        weights.push(if t.weight > 0.0 { t.weight } else { 1.0 });
    }
    if domains.is_empty() {
        return Err(fatal("data.train is empty"));
    }
    let dbl = data
        .dynamic_batch_loading
        .as_ref()
        .filter(|_| mode != Mode::Correct);
    let (dynamic, validation) = match dbl {
        None => (None, Vec::new()),
        Some(dbl) => {
            let mut refs = Vec::new();
            let mut val = Vec::new();
            for t in &data.train {
                refs.push(*dbl.reference_loss.get(&t.name).ok_or_else(|| {
                    fatal(format!(
                        "data.dynamic_batch_loading has no reference loss for {:?}",
                        t.name
                    ))
                })?);
                let v = data
                    .validation
                    .iter()
                    .find(|v| v.name == t.name)
                    .ok_or_else(|| fatal(format!("no validation set for domain {:?}", t.name)))?;
                val.push(read(&v.path, "data.validation", DBL_VALIDATION_SEQUENCES)?);
            }
            (
                Some(DynamicBatchLoading {
                    reference: refs,
                    update_every: u64::from(dbl.update_every.max(1)),
                }),
                val,
            )
        }
    };
    let micro = d.micro_batch.max(1) as usize;
    let global_batch = micro * world;
    let total_steps = tokens.div_ceil((global_batch * seq_len) as u64).max(1);
    let cfg = TrainConfig {
        seq_len,
        micro_batch: micro,
        global_batch,
        total_steps,
        lr: d.lr,
        warmup_steps: u64::from(d.warmup_steps),
        temperature: if d.temperature > 0.0 {
            d.temperature
        } else {
            1.0
        },
        ce_weight: d.ce_weight,
        seed: if mode == Mode::Correct {
            spec.seed ^ CORRECTION_SEED
        } else {
            spec.seed ^ u64::from(task.round).wrapping_mul(0x9E37_79B9)
        },
        max_grad_norm: 1.0,
        weight_decay: 0.01,
        dynamic,
        precision: Precision::parse(&d.precision)
            .map_err(|e| fatal(format!("distill.precision: {e}")))?,
        shard_optimizer: d.shard_optimizer,
        recompute: d.recompute,
        objective,
    };
    let mut coll = connect_collective(ctx, &device, rank, world)?;
    let names: Vec<String> = domains.iter().map(|x| x.name.clone()).collect();
    let mut trainer = Trainer::new(
        student,
        teacher.as_ref(),
        cfg.clone(),
        coll.as_mut(),
        domains,
        &weights,
        validation,
    )
    .map_err(|e| train_err(e, ctx))?;
    let start_from = if task.resume_checkpoint.is_empty() {
        task.inputs.get("init_checkpoint").cloned()
    } else {
        Some(task.resume_checkpoint.clone())
    };
    if let Some(ck) = &start_from {
        let dir = ctx.fetch(ck)?;
        // Other ranks' optimizer shards of a sharded checkpoint are artifacts of their own.
        let mut extra = Vec::new();
        let listed = dir.join(SHARDS_FILE);
        if listed.is_file() {
            let bytes = std::fs::read(&listed).map_err(|e| fatal(format!("{ck}: {e}")))?;
            let digests: Vec<String> = serde_json::from_slice(&bytes)
                .map_err(|e| fatal(format!("{ck}: {SHARDS_FILE}: {e}")))?;
            for digest in digests.iter().filter(|d| !d.is_empty()) {
                extra.push(ctx.fetch(digest)?);
            }
        }
        trainer
            .load_checkpoint_from(&dir, &extra)
            .map_err(|e| train_err(e, ctx))?;
        tracing::info!(
            rank,
            step = trainer.step,
            "distill: resumed from checkpoint"
        );
    }
    let resumed_from = trainer.step;
    let every = u64::from(d.checkpoint_every.max(1));
    let started = Instant::now();
    let first_step = trainer.step;
    // A search candidate follows the round's schedule (`total_steps`) but stops after its
    // share, checkpointing there: the winner's continuation is the run it would have had.
    let stop_steps = match mode {
        Mode::Search => {
            let stop_tokens: u64 = task
                .params
                .get("stop_tokens")
                .and_then(|t| t.parse().ok())
                .ok_or_else(|| fatal("a search task needs the stop_tokens parameter"))?;
            stop_tokens
                .div_ceil((global_batch * seq_len) as u64)
                .clamp(1, total_steps)
        }
        _ => total_steps,
    };
    // The checkpoint at `trainer.step` (rank 0): the one resumed from, then each one uploaded.
    let mut last_checkpoint = if task.resume_checkpoint.is_empty() {
        None
    } else {
        Some(task.resume_checkpoint.clone())
    };
    while trainer.step < stop_steps {
        if ctx.cancelled() {
            return Err(TaskError::cancelled());
        }
        let t0 = Instant::now();
        let s = trainer.train_step().map_err(|e| train_err(e, ctx))?;
        tracing::info!(rank, step = s.step, loss = s.loss, "distill step");
        // Every rank takes part in a checkpoint (a sharded optimizer's state is spread over
        // them); the last step checkpoints too, so a gate extension continues from the end.
        let checkpoint =
            if s.step.is_multiple_of(every) || s.step == total_steps || s.step == stop_steps {
                Some(checkpoint(ctx, &mut trainer, s.step, &student_dir, rank)?)
            } else {
                None
            };
        if let Some(Some(digest)) = &checkpoint {
            last_checkpoint = Some(digest.clone());
        }
        if rank != 0 {
            continue;
        }
        let tps = (global_batch * seq_len) as f64 / t0.elapsed().as_secs_f64().max(1e-9);
        let mut metrics = vec![
            ("distill.hidden_loss", s.hidden),
            ("distill.step", s.step as f64),
            ("distill.total_steps", stop_steps as f64),
            ("distill.tokens", s.tokens as f64),
            ("distill.loss", s.loss),
            ("distill.kl", s.kl),
            ("distill.lr", s.lr),
            ("distill.grad_norm", s.grad_norm),
            ("distill.tokens_per_s", tps),
        ];
        let weight_keys: Vec<String> = names
            .iter()
            .map(|n| format!("distill.weight.{n}"))
            .collect();
        for (k, w) in weight_keys.iter().zip(&trainer.data.weights) {
            metrics.push((k.as_str(), *w));
        }
        let what = match mode {
            Mode::Distill => "distill",
            Mode::Search => "search distill",
            Mode::Correct => "teacher correction",
        };
        let msg = format!(
            "{what} step {}/{stop_steps} loss {:.4} lr {:.2e} {tps:.0} tok/s",
            s.step, s.loss, s.lr
        );
        let m = common::progress_metrics(&metrics);
        if let Some(digest) = checkpoint.flatten() {
            ctx.progress(m, Some(&digest), &msg)?;
        } else if !report(ctx, &metrics, &msg) {
            return Err(TaskError::cancelled());
        }
    }
    let mut out = TaskOutput::default();
    let dir = ctx.work_dir().join("student");
    let _ = std::fs::remove_dir_all(&dir);
    trainer
        .save_student(&dir, Some(&student_dir))
        .map_err(|e| train_err(e, ctx))?;
    if rank == 0 && mode == Mode::Correct {
        out.outputs.insert("teacher".into(), ctx.upload_dir(&dir)?);
        out.metrics = run_metrics("correct", &trainer, world as f64, resumed_from as f64);
        return Ok(out);
    }
    if rank == 0 && mode == Mode::Search {
        let by = task
            .params
            .get("by")
            .map(String::as_str)
            .unwrap_or("kd_loss");
        let score = search_score(&trainer, data, by, |path, field| {
            read(path, field, SEARCH_VALIDATION_SEQUENCES)
        })
        .map_err(|e| match e {
            ScoreError::Task(t) => t,
            ScoreError::Train(e) => train_err(e, ctx),
        })?;
        let checkpoint = last_checkpoint
            .ok_or_else(|| fatal("the search distillation ended without a checkpoint"))?;
        out.outputs.insert("student".into(), ctx.upload_dir(&dir)?);
        out.outputs.insert("checkpoint".into(), checkpoint);
        out.metrics = run_metrics("distill", &trainer, world as f64, resumed_from as f64);
        out.metrics.insert("search.score".into(), score);
        return Ok(out);
    }
    if rank == 0 {
        // The student carries its prune record, so a later round's record can map its layers
        // and channels back to the teacher's.
        let record = student_dir.join(PRUNE_RECORD);
        if record.is_file() {
            std::fs::copy(&record, dir.join(PRUNE_RECORD))
                .map_err(|e| TaskError::retryable(format!("{}: {e}", record.display())))?;
        }
        out.outputs.insert("student".into(), ctx.upload_dir(&dir)?);
        let secs = started.elapsed().as_secs_f64();
        out.metrics = run_metrics("distill", &trainer, world as f64, resumed_from as f64);
        out.metrics.insert(
            "distill.tokens_per_s".into(),
            ((trainer.step - first_step) as f64 * (global_batch * seq_len) as f64) / secs.max(1e-9),
        );
    }
    Ok(out)
}

/// What every training run reports under `prefix` (`distill` or `correct`): steps, tokens, the
/// gang's size, the step this attempt resumed from and, when known, the last loss (from the
/// checkpoint when this attempt resumed at the last step; a checkpoint from before the loss was
/// recorded leaves it out rather than report a NaN).
fn run_metrics(
    prefix: &str,
    trainer: &Trainer<'_>,
    world: f64,
    resumed_from: f64,
) -> BTreeMap<String, f64> {
    let mut m = BTreeMap::from([
        (format!("{prefix}.steps"), trainer.step as f64),
        (format!("{prefix}.tokens"), trainer.tokens as f64),
        (format!("{prefix}.world_size"), world),
        (format!("{prefix}.resumed_from_step"), resumed_from),
    ]);
    if trainer.last_loss.is_finite() {
        m.insert(format!("{prefix}.final_loss"), trainer.last_loss);
    }
    m
}

enum ScoreError {
    Task(TaskError),
    Train(TrainError),
}

/// A search candidate's validation score, lower is better: the mean per-token KL to the
/// teacher (`kd_loss`) or the perplexity (`perplexity`) of the student over the first
/// [`SEARCH_VALIDATION_SEQUENCES`] sequences of every validation domain.
fn search_score(
    trainer: &Trainer<'_>,
    data: &pb::DataSpec,
    by: &str,
    read: impl Fn(&str, &str) -> Result<Vec<Vec<u32>>, TaskError>,
) -> Result<f64, ScoreError> {
    let mut seqs = Vec::new();
    for (i, v) in data.validation.iter().enumerate() {
        seqs.extend(read(&v.path, &format!("data.validation[{i}]")).map_err(ScoreError::Task)?);
    }
    if seqs.is_empty() {
        return Err(ScoreError::Task(fatal(
            "search: the validation data holds no full sequence to score the candidate on \
             (add text to data.validation or lower distill.seq_len)",
        )));
    }
    match by {
        "kd_loss" => trainer.eval_kl(&seqs).map_err(ScoreError::Train),
        "perplexity" => {
            let t = trainer.cfg.seq_len;
            let rows: Vec<Vec<u32>> = seqs.iter().map(|s| s[..t].to_vec()).collect();
            let nll = crate::model::perplexity::mean_nll(
                &trainer.student,
                &rows,
                trainer.cfg.micro_batch,
                &[],
            )
            .map_err(|e| ScoreError::Train(TrainError::from(e)))?;
            Ok(nll.exp())
        }
        other => Err(ScoreError::Task(fatal(format!(
            "search.by = {other:?}: use \"kd_loss\" or \"perplexity\""
        )))),
    }
}

/// The KD divergence `distill.loss` names (None: cross-entropy only).
fn divergence_of(d: &pb::DistillSpec) -> Result<Option<Divergence>, String> {
    let div = match d.loss.as_str() {
        "" | "forward_kl" => Divergence::ForwardKl,
        "reverse_kl" => Divergence::ReverseKl,
        "skew_kl" => Divergence::SkewKl {
            alpha: if d.skew_alpha > 0.0 {
                d.skew_alpha
            } else {
                0.1
            },
        },
        "jsd" => Divergence::Jsd {
            beta: if d.jsd_beta > 0.0 { d.jsd_beta } else { 0.5 },
        },
        "ce" => return Ok(None),
        other => {
            return Err(format!(
                "{other:?} is not a loss: use forward_kl, reverse_kl, skew_kl, jsd or ce"
            ))
        }
    };
    div.check().map_err(|e| e.to_string())?;
    Ok(Some(div))
}

/// The intermediate-state distillation of `h`: explicit pairs as given, `auto` pairs and the
/// projection's channel map from the student's prune record.
fn hidden_of(
    h: &pb::HiddenDistillSpec,
    field: &str,
    student_dir: &Path,
    student: &Llama,
    teacher: &Llama,
) -> Result<HiddenDistill, TaskError> {
    let loss =
        HiddenLoss::parse(&h.loss).map_err(|e| fatal(format!("{field}.hidden.loss: {e}")))?;
    let record = read_prune_record(student_dir);
    let list = |key: &str| -> Option<Vec<usize>> {
        record
            .as_ref()?
            .get(key)?
            .as_array()?
            .iter()
            .map(|v| v.as_u64().map(|x| x as usize))
            .collect()
    };
    let no_record = |what: &str| {
        fatal(format!(
            "{field}.hidden: {what} needs the student's prune record ({PRUNE_RECORD} with teacher_layers and teacher_channels, written by the prune phase), and the pruned student at {} has none (a student from before the record, or a chain of rounds with a link missing); give explicit pairs with equal widths, or rerun the campaign from round 0",
            student_dir.display()
        ))
    };
    let pairs: Vec<(usize, usize)> = if h.auto_pairs {
        let layers = list("teacher_layers").ok_or_else(|| no_record("pairs = \"auto\""))?;
        layers.into_iter().enumerate().collect()
    } else {
        h.pairs
            .iter()
            .map(|p| (p.student as usize, p.teacher as usize))
            .collect()
    };
    let (sl, tl) = (
        student.config.num_hidden_layers,
        teacher.config.num_hidden_layers,
    );
    if let Some((s, t)) = pairs.iter().find(|(s, t)| *s >= sl || *t >= tl) {
        return Err(fatal(format!(
            "{field}.hidden.pairs: [{s}, {t}] names a layer that does not exist (the student has {sl} layers, the teacher {tl}); fix the pairs"
        )));
    }
    let channels = list("teacher_channels");
    if student.config.hidden_size != teacher.config.hidden_size && channels.is_none() {
        return Err(no_record("a projection between different widths"));
    }
    Ok(HiddenDistill {
        pairs,
        loss,
        channels,
    })
}

/// In a sharded checkpoint: the digests of ranks 1.. 's optimizer shard folders (rank 0's
/// shard is in the checkpoint folder itself), a JSON list in rank order ("" for rank 0).
const SHARDS_FILE: &str = "optimizer_shards.json";

/// Writes and uploads a checkpoint; every rank calls it. Without sharding rank 0 writes and
/// uploads everything; with it each other rank uploads its shard, the ranks exchange those
/// digests at the rendezvous, and rank 0 lists them in the checkpoint it uploads. Returns the
/// checkpoint's digest on rank 0.
fn checkpoint(
    ctx: &TaskContext,
    trainer: &mut Trainer<'_>,
    step: u64,
    student_dir: &Path,
    rank: usize,
) -> Result<Option<String>, TaskError> {
    let dir = ctx.work_dir().join(format!("checkpoint-{step}"));
    let _ = std::fs::remove_dir_all(&dir);
    trainer
        .save_checkpoint(&dir, Some(student_dir))
        .map_err(|e| {
            if ctx.cancelled() {
                TaskError::cancelled()
            } else {
                checkpoint_err(e)
            }
        })?;
    if trainer.cfg.shard_optimizer {
        let mine = if rank == 0 {
            String::new()
        } else {
            ctx.upload_dir(&dir)?
        };
        let all = ctx.rendezvous(&format!("checkpoint-{step}"), mine.as_bytes())?;
        if rank == 0 {
            let digests: Vec<String> = all
                .iter()
                .map(|b| String::from_utf8_lossy(b).into_owned())
                .collect();
            let p = dir.join(SHARDS_FILE);
            std::fs::write(&p, serde_json::to_vec(&digests).unwrap_or_default())
                .map_err(|e| TaskError::retryable(format!("{}: {e}", p.display())))?;
        }
    }
    let digest = if rank == 0 {
        let d = ctx.upload_dir(&dir)?;
        tracing::info!(step, digest = %d, "distill: checkpoint uploaded");
        Some(d)
    } else {
        None
    };
    let _ = std::fs::remove_dir_all(&dir);
    Ok(digest)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::collective::CollectiveError;
    use crate::model::io::ModelIoError;

    #[test]
    fn a_checkpoint_that_cannot_be_written_fails_the_attempt_retryably_and_a_broken_gang_is_lost() {
        // A real I/O error: a folder cannot be made under a regular file.
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("f");
        std::fs::write(&file, b"x").unwrap();
        let source = std::fs::create_dir(file.join("checkpoint-48")).unwrap_err();
        let io = TrainError::Io(ModelIoError::Io {
            path: file.join("checkpoint-48").display().to_string(),
            source,
        });
        let full = TrainError::Checkpoint {
            path: "checkpoint-48/optimizer-00000-of-00001.safetensors".into(),
            message: "No space left on device (os error 28)".into(),
        };
        for e in [io, full] {
            let what = e.to_string();
            let t = checkpoint_err(e);
            assert!(t.retryable && !t.lost, "{what}");
            assert_eq!(t.message, what);
        }
        let t = checkpoint_err(TrainError::Collective(CollectiveError(
            "peer 1 closed".into(),
        )));
        assert!(t.retryable && t.lost);
    }
}
