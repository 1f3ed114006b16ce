//! The Evaluate and Judge phases: `perplexity` (per validation domain, student or teacher),
//! `generate` (answers to the campaign's questions with the model's chat template, greedy,
//! bounded tokens, multi-turn) and `judge` (a shard of the questions put to the judge).

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use distillery_proto::v1 as pb;

use super::common::{self, fatal, input, param_usize, report};
use crate::judge::backend::{Backend, Local, OpenAi};
use crate::judge::{self, Answers, Cache, Mode};
use crate::model::chat::{Message, TemplateChoice};
use crate::model::generate::SamplingParams;
use crate::model::perplexity::perplexity;
use crate::runner::{TaskContext, TaskError, TaskOutput, TaskRunner};
use crate::serve::ServeOptions;

/// Tokens scored per validation domain.
const MAX_EVAL_TOKENS: usize = 1 << 15;
/// Judge requests in flight at once (per judge task).
const JUDGE_CONCURRENCY: usize = 4;
/// Extra asks for a verdict that did not parse.
const JUDGE_RETRIES: u32 = 2;

/// Runs `perplexity`, `generate` and `judge`.
pub struct EvalTasks;

impl TaskRunner for EvalTasks {
    fn kinds(&self) -> Vec<String> {
        vec!["perplexity".into(), "generate".into(), "judge".into()]
    }

    fn run(&self, task: &pb::TaskAssignment, ctx: &TaskContext) -> Result<TaskOutput, TaskError> {
        match task.kind.as_str() {
            "perplexity" => perplexity_task(task, ctx),
            "generate" => generate_task(task, ctx),
            "judge" => judge_task(task, ctx),
            k => Err(fatal(format!("EvalTasks cannot run {k:?}"))),
        }
    }
}

/// The model a role names: the teacher (the corrected one after teacher correction), the
/// original teacher (beside a corrected one), or the round's distilled student.
fn role_model(task: &pb::TaskAssignment) -> Result<(&str, &str), TaskError> {
    let role = task
        .params
        .get("role")
        .map(String::as_str)
        .unwrap_or("student");
    let name = match role {
        "teacher" => "teacher",
        "original_teacher" => "original_teacher",
        _ => "student",
    };
    Ok((role, input(task, name)?))
}

fn perplexity_task(task: &pb::TaskAssignment, ctx: &TaskContext) -> Result<TaskOutput, TaskError> {
    let (role, model_ref) = role_model(task)?;
    let device = common::device(task)?;
    let dir = common::model_dir(ctx, model_ref)?;
    let model = common::load_model(&dir, &device)?;
    let tok = common::load_tokenizer(&dir)?;
    let eos = common::eos_id(&model);
    let data = task
        .spec
        .as_ref()
        .and_then(|s| s.data.as_ref())
        .ok_or_else(|| fatal("the campaign spec has no [data]"))?;
    // Score at the context length the campaign trains at (the round's distillation, else the
    // calibration sequences): a model is not judged on positions it never saw.
    let spec = task.spec.as_ref();
    let seq_len = spec
        .and_then(|s| s.rounds.get(task.round as usize))
        .and_then(|r| r.distill.clone())
        .map(|d| d.seq_len as usize)
        .filter(|n| *n >= 2)
        .or_else(|| data.calibration.as_ref().map(|c| c.seq_len as usize))
        .unwrap_or(512);
    let window = seq_len.min(model.config.max_position_embeddings).max(2);
    let mut metrics = BTreeMap::new();
    let (mut nll, mut tokens, mut bytes) = (0.0, 0usize, 0usize);
    for (i, v) in data.validation.iter().enumerate() {
        let docs = crate::data::read_documents(Path::new(&v.path))
            .map_err(|e| fatal(format!("data.validation[{i}]: {e}")))?;
        let (ids, b) =
            crate::data::encode_for_eval(&tok, &docs, eos, MAX_EVAL_TOKENS).map_err(fatal)?;
        if ids.len() < 2 {
            return Err(fatal(format!(
                "data.validation[{i}] ({}) has no text to score",
                v.path
            )));
        }
        let p = perplexity(&model, &ids, b, window, window / 2).map_err(fatal)?;
        metrics.insert(format!("domain_perplexity.{}", v.name), p.perplexity());
        metrics.insert(
            format!("domain_bits_per_byte.{}", v.name),
            p.bits_per_byte(),
        );
        nll += p.nll_sum;
        tokens += p.tokens;
        bytes += p.bytes;
        if !report(
            ctx,
            &[("perplexity.domains_done", (i + 1) as f64)],
            &format!(
                "{role} perplexity: {}/{} domains",
                i + 1,
                data.validation.len()
            ),
        ) {
            return Err(TaskError::cancelled());
        }
    }
    metrics.insert("perplexity".into(), (nll / tokens.max(1) as f64).exp());
    metrics.insert(
        "bits_per_byte".into(),
        nll / std::f64::consts::LN_2 / bytes.max(1) as f64,
    );
    Ok(TaskOutput {
        outputs: BTreeMap::new(),
        metrics,
    })
}

fn judge_spec(task: &pb::TaskAssignment) -> Result<pb::JudgeSpec, TaskError> {
    task.spec
        .as_ref()
        .and_then(|s| s.evaluation.as_ref())
        .and_then(|e| e.judge.clone())
        .ok_or_else(|| fatal("the campaign spec has no [evaluation.judge]"))
}

fn generate_task(task: &pb::TaskAssignment, ctx: &TaskContext) -> Result<TaskOutput, TaskError> {
    let (role, model_ref) = role_model(task)?;
    let j = judge_spec(task)?;
    let questions = judge::load_questions(Path::new(&j.questions)).map_err(fatal)?;
    let dir = common::model_dir(ctx, model_ref)?;
    // The teacher's chat template (a spec's teacher.chat_template, else the model's own) for the
    // teacher and every student, which inherit the teacher's tokenizer files. Greedy decoding:
    // the model's sampling defaults are not used, only its stop tokens.
    let template = task
        .spec
        .as_ref()
        .and_then(|s| s.teacher.as_ref())
        .map(|t| t.chat_template.clone())
        .unwrap_or_default();
    let opts = ServeOptions {
        name: Some(role.to_string()),
        chat_template: template_choice(&template),
        ..Default::default()
    };
    let served = crate::serve::load_served(&dir, opts).map_err(fatal)?;
    // MT-Bench answers as FastChat generates them: its temperature per category, up to 1024 new
    // tokens, a seed per question so a re-run draws the same answers. Otherwise greedy with the
    // spec's budget.
    let mtbench = Mode::parse(&j.mode).map_err(fatal)?.is_mtbench();
    let seed = task.spec.as_ref().map_or(0, |s| s.seed);
    let mut answers = Answers {
        model: role.to_string(),
        ..Default::default()
    };
    for (qi, q) in questions.iter().enumerate() {
        let params = if mtbench {
            SamplingParams {
                max_tokens: judge::fastchat::ANSWER_MAX_TOKENS,
                temperature: judge::fastchat::answer_temperature(&q.category),
                seed: seed.wrapping_add(qi as u64),
                ..Default::default()
            }
        } else {
            SamplingParams {
                max_tokens: j.max_tokens.max(1) as usize,
                ..Default::default()
            }
        };
        let mut msgs: Vec<Message> = Vec::new();
        let mut outs = Vec::new();
        for turn in &q.turns {
            msgs.push(Message::new("user", turn.clone()));
            let mut params = params.clone();
            if mtbench {
                // "Up to 1024 new tokens": fewer when the conversation so far leaves less room in
                // the model's context (turn 2 follows a long turn-1 answer).
                let used = served
                    .chat_prompt(&msgs)
                    .map_err(|e| fatal(format!("question {}: {e}", q.id())))?
                    .len();
                let room = served.context_length().saturating_sub(used);
                if room == 0 {
                    return Err(fatal(format!(
                        "question {}: the conversation ({used} tokens) fills the model's context of {} tokens",
                        q.id(),
                        served.context_length()
                    )));
                }
                params.max_tokens = params.max_tokens.min(room);
            }
            let (text, ..) = served
                .complete(&msgs, params, &[])
                .map_err(|e| fatal(format!("question {}: {e}", q.id())))?;
            msgs.push(Message::new("assistant", text.clone()));
            outs.push(text);
        }
        answers.answers.insert(q.id(), outs);
        if !report(
            ctx,
            &[
                ("generate.questions", (qi + 1) as f64),
                ("generate.total", questions.len() as f64),
            ],
            &format!("{role} answers: {}/{}", qi + 1, questions.len()),
        ) {
            return Err(TaskError::cancelled());
        }
    }
    let path = ctx.work_dir().join("answers.json");
    answers.save(&path).map_err(fatal)?;
    Ok(TaskOutput {
        outputs: BTreeMap::from([("answers".into(), ctx.upload_file(&path)?)]),
        metrics: BTreeMap::new(),
    })
}

/// A spec's template file (empty: the model's own).
fn template_choice(file: &str) -> TemplateChoice {
    TemplateChoice {
        file: (!file.is_empty()).then(|| file.into()),
        name: None,
    }
}

/// The judge a spec names (`temperature` for `judge.samples`).
pub fn backend_for(j: &pb::JudgeSpec, ctx: &TaskContext) -> Result<Box<dyn Backend>, TaskError> {
    judge_backend(
        &j.backend,
        &j.base_url,
        &j.model,
        j.max_tokens,
        &j.chat_template,
        j.temperature,
        ctx,
    )
}

/// A judge backend from its settings.
fn judge_backend(
    backend: &str,
    base_url: &str,
    model: &str,
    max_tokens: u32,
    chat_template: &str,
    temperature: f64,
    ctx: &TaskContext,
) -> Result<Box<dyn Backend>, TaskError> {
    match backend {
        "openai" => {
            let mut b = OpenAi::new(base_url, model, max_tokens.max(1), Duration::from_secs(300))
                .map_err(fatal)?;
            b.temperature = temperature;
            Ok(Box::new(b))
        }
        "local" => {
            let dir = common::model_dir(ctx, &format!("path:{model}"))?;
            let opts = ServeOptions {
                chat_template: template_choice(chat_template),
                ..Default::default()
            };
            let served = crate::serve::load_served(&dir, opts).map_err(fatal)?;
            Ok(Box::new(Local {
                served,
                max_tokens: max_tokens.max(1),
                temperature,
            }))
        }
        other => Err(fatal(format!(
            "judge backend {other:?} is not openai or local"
        ))),
    }
}

/// Judgments a task input names (a judgments artifact or a checkpoint: JSON lines) into the
/// cache, so the judge is not asked for them again.
fn preload(ctx: &TaskContext, cache: &Cache, digest: &str, what: &str) -> Result<usize, TaskError> {
    let p = ctx.fetch(digest)?;
    let text = std::fs::read_to_string(&p)
        .map_err(|e| TaskError::retryable(format!("{}: {e}", p.display())))?;
    let mut n = 0;
    for (i, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let jd: judge::Judgment = serde_json::from_str(line).map_err(|e| {
            fatal(format!(
                "{what} {digest} line {}: not a judgment: {e}",
                i + 1
            ))
        })?;
        // A majority over samples is not what the judge said to sample 0: only single
        // verdicts go into the cache.
        if jd.samples.is_empty() {
            cache.put(&jd).map_err(fatal)?;
            n += 1;
        }
    }
    Ok(n)
}

fn judge_task(task: &pb::TaskAssignment, ctx: &TaskContext) -> Result<TaskOutput, TaskError> {
    let j = judge_spec(task)?;
    let mode = Mode::parse(
        task.params
            .get("mode")
            .map(String::as_str)
            .unwrap_or(&j.mode),
    )
    .map_err(fatal)?;
    let (shard, shards) = (
        param_usize(task, "shard")?,
        param_usize(task, "shards")?.max(1),
    );
    let questions: Vec<judge::Question> = judge::load_questions(Path::new(&j.questions))
        .map_err(fatal)?
        .into_iter()
        .enumerate()
        .filter(|(i, _)| i % shards == shard)
        .map(|(_, q)| q)
        .collect();
    let student = Answers::load(&ctx.fetch(input(task, "answers")?)?).map_err(fatal)?;
    let baseline = Answers::load(&ctx.fetch(input(task, "baseline_answers")?)?).map_err(fatal)?;
    let baseline_is_teacher =
        task.inputs.get("baseline_answers") == task.inputs.get("teacher_answers");
    let teacher = match task.inputs.get("teacher_answers") {
        Some(d) if !baseline_is_teacher => Some(Answers::load(&ctx.fetch(d)?).map_err(fatal)?),
        _ => None,
    };
    // FastChat's prompts and references (MT-Bench modes, and a ranking in them).
    let prompt_set = if mode.is_mtbench() {
        Some(judge::fastchat::load_prompts(Path::new(&j.prompts)).map_err(fatal)?)
    } else {
        None
    };
    let references = if j.reference_answers.is_empty() {
        None
    } else {
        Some(judge::fastchat::load_references(Path::new(&j.reference_answers)).map_err(fatal)?)
    };
    let five_level = j.verdicts == "arena-hard";
    let single_prompts = match &prompt_set {
        Some(p) if mode == Mode::MtBench => Some(judge::MtBenchPrompts {
            prompts: p.for_mode(false).map_err(fatal)?,
            references: references.as_ref(),
        }),
        _ => None,
    };
    let pair_prompts = match &prompt_set {
        Some(p) if mode == Mode::MtBenchPairwise || (mode == Mode::MtBench && j.ranking) => {
            Some(judge::MtBenchPrompts {
                prompts: p.for_mode(true).map_err(fatal)?,
                references: references.as_ref(),
            })
        }
        _ => None,
    };
    let pairwise = match &pair_prompts {
        Some(p) => judge::PairPrompts::FastChat(p),
        None if five_level => judge::PairPrompts::Builtin {
            template: judge::five_level_template().map_err(fatal)?,
            format: judge::Format::FiveLevel,
        },
        None => judge::PairPrompts::Builtin {
            template: judge::template(Mode::Pairwise).map_err(fatal)?,
            format: judge::Format::Pairwise,
        },
    };
    // The student against the baseline.
    let mut jobs = match mode {
        Mode::Pairwise | Mode::Single | Mode::Rubric => {
            judge::builtin_jobs(mode, five_level, &questions, &student, &baseline)
        }
        Mode::MtBench => {
            let mut sides: Vec<(&str, &Answers)> =
                vec![("student", &student), ("baseline", &baseline)];
            if let Some(t) = &teacher {
                sides.push(("teacher", t));
            }
            single_prompts
                .as_ref()
                .ok_or_else(|| fatal("mtbench mode without prompts"))?
                .single_jobs(&questions, &sides)
        }
        Mode::MtBenchPairwise => judge::pair_jobs(
            &pairwise,
            &questions,
            ("student", &student),
            ("baseline", &baseline),
            "",
        ),
    }
    .map_err(fatal)?;
    let main_jobs = jobs.len();
    // Every pair among the teacher and the students of this and earlier rounds.
    if j.ranking {
        let mut models: Vec<(String, Answers)> = Vec::new();
        let mut named: Vec<(&String, &String)> = task
            .inputs
            .iter()
            .filter_map(|(k, v)| k.strip_prefix("ranking_answers.").map(|_| (k, v)))
            .collect();
        named.sort_by_key(|(k, _)| {
            distillery_proto::judge_stats::model_order(&k["ranking_answers.".len()..])
        });
        for (k, digest) in named {
            let a = Answers::load(&ctx.fetch(digest)?).map_err(fatal)?;
            models.push((k["ranking_answers.".len()..].to_string(), a));
        }
        models.push((format!("round{}", task.round), student.clone()));
        jobs.extend(judge::ranking::ranking_jobs(&pairwise, &questions, &models).map_err(fatal)?);
    }
    let backend = backend_for(&j, ctx)?;
    // The cache lives beside the task folders, so every task of this worker shares it.
    let cache_dir = ctx
        .work_dir()
        .parent()
        .unwrap_or(ctx.work_dir())
        .join("judge-cache");
    let cache = Cache::open(&cache_dir).map_err(fatal)?;
    let samples = j.samples.max(1);
    let judge_id = backend.id();
    let keys: Vec<String> = jobs
        .iter()
        .flat_map(|jb| (0..samples).map(|s| judge::job_key(&judge_id, jb, s)))
        .collect();
    // Earlier rounds' judgments (a ranking's old pairs) and a re-leased attempt's checkpoint
    // (maybe made on another worker) go into this worker's cache: the judge is not asked again.
    for (name, digest) in task
        .inputs
        .iter()
        .filter(|(k, _)| k.starts_with("prior_judgments."))
    {
        let n = preload(ctx, &cache, digest, name)?;
        tracing::info!("judge: {n} judgments from {name}");
    }
    if !task.resume_checkpoint.is_empty() {
        preload(ctx, &cache, &task.resume_checkpoint, "judge checkpoint")?;
        tracing::info!("judge: resumed from checkpoint {}", task.resume_checkpoint);
    }
    let checkpointing = std::sync::Mutex::new(());
    let progress = |done: usize, total: usize, asked: usize| {
        let metrics = [
            ("judge.done", done as f64),
            ("judge.total", total as f64),
            ("judge.asked", asked as f64),
        ];
        let msg = format!(
            "judging shard {}/{shards}: {done}/{total} ({asked} asked)",
            shard + 1
        );
        // Every 8 judgments, what is judged so far becomes the task's checkpoint.
        if done.is_multiple_of(8) && done < total {
            if let Ok(_guard) = checkpointing.try_lock() {
                let path = ctx.work_dir().join(format!("judged-{done}.jsonl"));
                let text: String = keys
                    .iter()
                    .filter_map(|k| cache.get(k))
                    .filter_map(|jd| serde_json::to_string(&jd).ok())
                    .map(|l| l + "\n")
                    .collect();
                let uploaded = std::fs::write(&path, text)
                    .map_err(|e| e.to_string())
                    .and_then(|_| ctx.upload_file(&path).map_err(|e| e.to_string()))
                    .and_then(|d| {
                        ctx.progress(common::progress_metrics(&metrics), Some(&d), &msg)
                            .map(|_| d)
                            .map_err(|e| e.to_string())
                    });
                let _ = std::fs::remove_file(&path);
                match uploaded {
                    Ok(d) => {
                        tracing::info!(done, %d, "judge: checkpoint uploaded");
                        return;
                    }
                    Err(e) => tracing::warn!(done, "judge: checkpoint failed: {e}"),
                }
            }
        }
        let _ = report(ctx, &metrics, &msg);
    };
    let opts = judge::JudgeOptions {
        concurrency: JUDGE_CONCURRENCY,
        retries: JUDGE_RETRIES,
        samples,
    };
    let failed = |e: String| {
        if ctx.cancelled() {
            TaskError::cancelled()
        } else {
            TaskError::retryable(e)
        }
    };
    let judgments =
        judge::judge_all(&jobs, backend.as_ref(), &cache, &opts, &progress).map_err(failed)?;
    // The second judge: the same student-versus-baseline prompts, one verdict each.
    let second = match &j.second {
        Some(s) => {
            let b = judge_backend(
                &s.backend,
                &s.base_url,
                &s.model,
                s.max_tokens,
                &s.chat_template,
                0.0,
                ctx,
            )?;
            let one = judge::JudgeOptions { samples: 1, ..opts };
            let mut js =
                judge::judge_all(&jobs[..main_jobs], b.as_ref(), &cache, &one, &|_, _, _| {})
                    .map_err(failed)?;
            // In the judgments artifact beside the first judge's: told apart by the slot.
            for jd in &mut js {
                jd.slot = format!("{}{}", judge::stats::SECOND_PREFIX, jd.slot);
            }
            Some(js)
        }
        None => None,
    };
    let path = ctx.work_dir().join("judgments.jsonl");
    let mut text = String::new();
    for jd in judgments.iter().chain(second.iter().flatten()) {
        text.push_str(&serde_json::to_string(jd).map_err(fatal)?);
        text.push('\n');
    }
    std::fs::write(&path, text)
        .map_err(|e| TaskError::retryable(format!("{}: {e}", path.display())))?;
    let mut metrics =
        judge::stats::metrics_for(mode, &judgments, &student, &baseline, baseline_is_teacher);
    if samples > 1 {
        metrics.extend(judge::stats::sample_metrics(&judgments, samples));
    }
    if let Some(second) = &second {
        metrics.extend(judge::stats::second_metrics(
            &judgments[..main_jobs],
            second,
        ));
    }
    Ok(TaskOutput {
        outputs: BTreeMap::from([("judgments".into(), ctx.upload_file(&path)?)]),
        metrics,
    })
}
