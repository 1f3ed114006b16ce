//! Campaign spec: TOML text -> validated [`CampaignSpec`] (the proto), with errors that name the
//! field path, the value and the fix, in one line.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use distillery_proto::shape::param_count;
use distillery_proto::v1 as pb;
use serde::Deserialize;

use crate::source_model;

/// Why a spec was rejected. `Display` is the one line shown to the user.
#[derive(Debug, thiserror::Error, PartialEq)]
#[error("{field}: {message}")]
pub struct SpecError {
    /// Dotted path of the offending field, `spec` for the whole document.
    pub field: String,
    /// What is wrong and how to fix it.
    pub message: String,
}

impl SpecError {
    fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        SpecError {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// Where the spec's files are checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileChecks {
    /// Relative paths are resolved against the spec's folder; files must exist and the teacher's
    /// shape is read from disk (the submitting client).
    Local,
    /// Files are not looked at; the shape must already be in the spec (the server, which may not
    /// see the client's disk).
    None,
    /// Only the teacher is looked at (resolved and its shape read as with `Local`); the data and
    /// other files are not (`coordinator plan`, which needs shapes, not data).
    TeacherOnly,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSpec {
    name: String,
    #[serde(default)]
    seed: u64,
    teacher: RawTeacher,
    data: RawData,
    rounds: Vec<RawRound>,
    #[serde(default)]
    evaluation: Option<RawEvaluation>,
    #[serde(default)]
    gate: Option<RawGate>,
    #[serde(default)]
    scheduling: Option<RawScheduling>,
    #[serde(default)]
    teacher_correction: Option<RawTeacherCorrection>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTeacherCorrection {
    tokens: u64,
    #[serde(default = "default_seq_len")]
    seq_len: u32,
    #[serde(default = "default_micro_batch")]
    micro_batch: u32,
    #[serde(default = "one_u32")]
    world_size: u32,
    #[serde(default = "default_lr")]
    lr: f64,
    #[serde(default)]
    warmup_steps: u32,
    #[serde(default = "default_checkpoint_every")]
    checkpoint_every: u32,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSearch {
    candidates: u32,
    tokens: u64,
    #[serde(default = "default_search_by")]
    by: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTeacher {
    model: String,
    #[serde(default)]
    chat_template: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawData {
    calibration: RawCalibration,
    train: Vec<RawTrain>,
    #[serde(default)]
    validation: Vec<RawValidation>,
    #[serde(default)]
    dynamic_batch_loading: Option<RawDynamicBatchLoading>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCalibration {
    path: String,
    #[serde(default = "default_samples")]
    samples: u32,
    #[serde(default = "default_seq_len")]
    seq_len: u32,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTrain {
    name: String,
    path: String,
    #[serde(default = "one")]
    weight: f64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawValidation {
    name: String,
    path: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDynamicBatchLoading {
    reference_loss: BTreeMap<String, f64>,
    #[serde(default = "default_update_every")]
    update_every: u32,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRound {
    target: RawTarget,
    #[serde(default = "default_depth_importance")]
    depth_importance: String,
    #[serde(default = "default_width_importance")]
    width_importance: String,
    distill: RawDistill,
    #[serde(default)]
    search: Option<RawSearch>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawTarget {
    hidden_size: Option<u32>,
    intermediate_size: Option<u32>,
    num_attention_heads: Option<u32>,
    num_layers: Option<u32>,
    params: Option<f64>,
    prefer: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDistill {
    tokens: u64,
    #[serde(default = "default_seq_len")]
    seq_len: u32,
    #[serde(default = "default_micro_batch")]
    micro_batch: u32,
    #[serde(default = "one_u32")]
    world_size: u32,
    #[serde(default = "default_lr")]
    lr: f64,
    #[serde(default)]
    warmup_steps: u32,
    #[serde(default = "one")]
    temperature: f64,
    #[serde(default)]
    ce_weight: f64,
    #[serde(default = "default_checkpoint_every")]
    checkpoint_every: u32,
    #[serde(default = "default_precision")]
    precision: String,
    #[serde(default = "default_precision")]
    teacher_precision: String,
    #[serde(default)]
    shard_optimizer: bool,
    #[serde(default)]
    recompute: bool,
    /// "forward_kl" (default), "reverse_kl", "skew_kl", "jsd" or "ce".
    loss: Option<String>,
    skew_alpha: Option<f64>,
    jsd_beta: Option<f64>,
    top_k: Option<u32>,
    hidden: Option<RawHidden>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHidden {
    /// `"auto"` or a list of `[student, teacher]` layer pairs (checked by hand for clear errors).
    pairs: toml::Value,
    loss: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEvaluation {
    #[serde(default = "yes")]
    perplexity: bool,
    #[serde(default)]
    judge: Option<RawJudge>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawJudge {
    backend: String,
    #[serde(default)]
    base_url: String,
    #[serde(default)]
    model: String,
    #[serde(default = "default_mode")]
    mode: String,
    questions: String,
    #[serde(default = "default_baseline")]
    baseline: String,
    #[serde(default = "default_max_tokens")]
    max_tokens: u32,
    #[serde(default)]
    chat_template: Option<String>,
    #[serde(default)]
    prompts: Option<String>,
    #[serde(default)]
    reference_answers: Option<String>,
    #[serde(default)]
    ranking: bool,
    #[serde(default)]
    verdicts: Option<String>,
    #[serde(default = "one_u32")]
    samples: u32,
    #[serde(default)]
    temperature: Option<f64>,
    #[serde(default)]
    second: Option<RawSecondJudge>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSecondJudge {
    backend: String,
    #[serde(default)]
    base_url: String,
    #[serde(default)]
    model: String,
    #[serde(default = "default_max_tokens")]
    max_tokens: u32,
    #[serde(default)]
    chat_template: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGate {
    max_perplexity_ratio: Option<f64>,
    min_win_rate: Option<f64>,
    min_mtbench: Option<f64>,
    max_elo_drop: Option<f64>,
    #[serde(default = "default_on_fail")]
    on_fail: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawScheduling {
    #[serde(default = "default_max_attempts")]
    max_attempts: u32,
    #[serde(default = "default_score_shards")]
    score_shards: u32,
    #[serde(default)]
    depth_groups: u32,
    #[serde(default = "one_u32")]
    judge_shards: u32,
    /// Lost attempts retried at most this many times per task; absent: without limit.
    max_lost: Option<u32>,
}

fn default_samples() -> u32 {
    1024
}
fn default_seq_len() -> u32 {
    512
}
fn one() -> f64 {
    1.0
}
fn one_u32() -> u32 {
    1
}
fn yes() -> bool {
    true
}
fn default_update_every() -> u32 {
    50
}
fn default_width_importance() -> String {
    "activation".into()
}

fn default_depth_importance() -> String {
    "block_importance".into()
}
fn default_search_by() -> String {
    "kd_loss".into()
}
fn default_micro_batch() -> u32 {
    4
}
fn default_lr() -> f64 {
    1e-4
}
fn default_precision() -> String {
    "f32".into()
}
fn default_checkpoint_every() -> u32 {
    100
}
fn default_mode() -> String {
    "pairwise".into()
}
fn default_baseline() -> String {
    "teacher".into()
}
fn default_max_tokens() -> u32 {
    256
}
fn default_on_fail() -> String {
    "stop".into()
}
fn default_max_attempts() -> u32 {
    3
}
fn default_score_shards() -> u32 {
    2
}

/// Default scheduling when the spec has no `[scheduling]` table.
pub fn default_scheduling() -> pb::SchedulingSpec {
    pb::SchedulingSpec {
        max_attempts: default_max_attempts(),
        score_shards: default_score_shards(),
        depth_groups: 0,
        judge_shards: 1,
        max_lost: None,
    }
}

/// Reads and validates a spec file; relative paths resolve against its folder.
pub fn load_file(path: &Path) -> Result<pb::CampaignSpec, SpecError> {
    load_file_with(path, FileChecks::Local)
}

/// [`load_file`] with the given file checks.
pub fn load_file_with(path: &Path, checks: FileChecks) -> Result<pb::CampaignSpec, SpecError> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        SpecError::new(
            "spec",
            format!("cannot read {}: {e} (check the path)", path.display()),
        )
    })?;
    let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
    let base = if base.as_os_str().is_empty() {
        PathBuf::from(".")
    } else {
        base
    };
    parse(&text, &base, checks)
}

/// Parses TOML text and validates it. With [`FileChecks::Local`], paths resolve against `base`.
pub fn parse(text: &str, base: &Path, checks: FileChecks) -> Result<pb::CampaignSpec, SpecError> {
    let de = toml::Deserializer::new(text);
    let raw: RawSpec = serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let field = if path.is_empty() || path == "." {
            "spec".to_string()
        } else {
            path
        };
        let mut msg = inner.message().replace('\n', " ");
        if let Some(span) = inner.span() {
            let line = text[..span.start.min(text.len())].matches('\n').count() + 1;
            msg = format!("{msg} (line {line})");
        }
        if msg.contains("unknown field") {
            msg.push_str("; remove or rename the key");
        } else if msg.contains("invalid type") || msg.contains("invalid value") {
            msg.push_str("; give a value of the expected type");
        } else if msg.contains("missing field") {
            msg.push_str("; add it");
        }
        SpecError::new(field, msg)
    })?;
    let spec = Validator { base, checks }.validate(raw)?;
    Ok(spec)
}

struct Validator<'a> {
    base: &'a Path,
    checks: FileChecks,
}

impl Validator<'_> {
    fn path(&self, field: &str, value: &str) -> Result<String, SpecError> {
        if value.trim().is_empty() {
            return Err(SpecError::new(field, "is empty: give a file path"));
        }
        match self.checks {
            FileChecks::None | FileChecks::TeacherOnly => Ok(value.to_string()),
            FileChecks::Local => self.local_path(field, value),
        }
    }

    /// `value` resolved against the spec's folder; it must exist.
    fn local_path(&self, field: &str, value: &str) -> Result<String, SpecError> {
        if value.trim().is_empty() {
            return Err(SpecError::new(field, "is empty: give a file path"));
        }
        let p = Path::new(value);
        let full = if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.base.join(p)
        };
        if !full.exists() {
            return Err(SpecError::new(
                field,
                format!(
                    "{value:?} does not exist (looked at {}); fix the path, relative paths start at the spec's folder",
                    full.display()
                ),
            ));
        }
        let abs = std::fs::canonicalize(&full).unwrap_or(full);
        Ok(abs.to_string_lossy().into_owned())
    }

    fn validate(&self, raw: RawSpec) -> Result<pb::CampaignSpec, SpecError> {
        if raw.name.is_empty()
            || !raw
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        {
            return Err(SpecError::new(
                "name",
                format!(
                    "{:?} is not a valid name: use letters, digits, '-', '_' and '.'",
                    raw.name
                ),
            ));
        }

        let model = match self.checks {
            FileChecks::TeacherOnly => self.local_path("teacher.model", &raw.teacher.model)?,
            _ => self.path("teacher.model", &raw.teacher.model)?,
        };
        let shape = match self.checks {
            FileChecks::Local | FileChecks::TeacherOnly => {
                source_model::read_shape(Path::new(&model))
                    .map_err(|e| SpecError::new("teacher.model", e.to_string()))?
            }
            FileChecks::None => pb::ModelShape::default(),
        };

        let teacher_template = match &raw.teacher.chat_template {
            Some(t) => self.path("teacher.chat_template", t)?,
            None => String::new(),
        };
        let data = self.data(raw.data)?;
        let evaluation = self.evaluation(raw.evaluation, &data)?;
        let scheduling = match raw.scheduling {
            None => default_scheduling(),
            Some(s) => {
                positive("scheduling.max_attempts", s.max_attempts)?;
                positive("scheduling.score_shards", s.score_shards)?;
                positive("scheduling.judge_shards", s.judge_shards)?;
                pb::SchedulingSpec {
                    max_attempts: s.max_attempts,
                    score_shards: s.score_shards,
                    depth_groups: s.depth_groups,
                    judge_shards: s.judge_shards,
                    max_lost: s.max_lost,
                }
            }
        };
        if raw.rounds.is_empty() {
            return Err(SpecError::new(
                "rounds",
                "no [[rounds]]: add at least one round with a target",
            ));
        }
        let mut rounds = Vec::with_capacity(raw.rounds.len());
        let mut prev = Some(shape);
        for (i, r) in raw.rounds.into_iter().enumerate() {
            let (round, next) = self.round(i, r, prev.as_ref(), &shape, &data)?;
            rounds.push(round);
            prev = next;
        }
        let gate = self.gate(raw.gate, &evaluation)?;
        let teacher_correction = raw.teacher_correction.map(teacher_correction).transpose()?;
        if let (FileChecks::Local, Some(j)) = (self.checks, &evaluation.judge) {
            // Answers are generated with chat templates: refuse now, not after the first
            // round's distillation, when one is missing or broken.
            let file = |t: &str| (!t.is_empty()).then(|| PathBuf::from(t));
            source_model::check_chat_template(
                Path::new(&model),
                file(&teacher_template).as_deref(),
            )
            .map_err(|e| {
                let field = if teacher_template.is_empty() {
                    "teacher.model"
                } else {
                    "teacher.chat_template"
                };
                SpecError::new(
                    field,
                    format!("the teacher's answers need a chat template: {e}"),
                )
            })?;
            if j.mode.starts_with("mtbench") {
                check_mtbench_files(j)?;
            }
            if j.backend == "local" {
                source_model::check_chat_template(
                    Path::new(&j.model),
                    file(&j.chat_template).as_deref(),
                )
                .map_err(|e| {
                    let field = if j.chat_template.is_empty() {
                        "evaluation.judge.model"
                    } else {
                        "evaluation.judge.chat_template"
                    };
                    SpecError::new(field, format!("the local judge needs a chat template: {e}"))
                })?;
            }
        }
        Ok(pb::CampaignSpec {
            name: raw.name,
            seed: raw.seed,
            teacher: Some(pb::TeacherSpec {
                model,
                shape: Some(shape),
                chat_template: teacher_template,
            }),
            data: Some(data),
            rounds,
            evaluation: Some(evaluation),
            gate: Some(gate),
            scheduling: Some(scheduling),
            teacher_correction,
        })
    }

    fn data(&self, raw: RawData) -> Result<pb::DataSpec, SpecError> {
        let c = raw.calibration;
        let calibration = pb::CalibrationSpec {
            path: self.path("data.calibration.path", &c.path)?,
            samples: positive("data.calibration.samples", c.samples)?,
            seq_len: positive("data.calibration.seq_len", c.seq_len)?,
        };
        if raw.train.is_empty() {
            return Err(SpecError::new(
                "data.train",
                "is empty: add at least one training domain",
            ));
        }
        let mut names = BTreeSet::new();
        let mut train = Vec::new();
        for (i, t) in raw.train.into_iter().enumerate() {
            let f = format!("data.train[{i}]");
            domain_name(&format!("{f}.name"), &t.name)?;
            if !names.insert(t.name.clone()) {
                return Err(SpecError::new(
                    format!("{f}.name"),
                    format!("{:?} appears twice: give each domain its own name", t.name),
                ));
            }
            if !(t.weight.is_finite() && t.weight > 0.0) {
                return Err(SpecError::new(
                    format!("{f}.weight"),
                    format!("{} must be a positive number", t.weight),
                ));
            }
            train.push(pb::TrainDomain {
                path: self.path(&format!("{f}.path"), &t.path)?,
                name: t.name,
                weight: t.weight,
            });
        }
        let mut val_names = BTreeSet::new();
        let mut validation = Vec::new();
        for (i, v) in raw.validation.into_iter().enumerate() {
            let f = format!("data.validation[{i}]");
            domain_name(&format!("{f}.name"), &v.name)?;
            if !val_names.insert(v.name.clone()) {
                return Err(SpecError::new(
                    format!("{f}.name"),
                    format!("{:?} appears twice: give each domain its own name", v.name),
                ));
            }
            validation.push(pb::ValidationDomain {
                path: self.path(&format!("{f}.path"), &v.path)?,
                name: v.name,
            });
        }
        let dynamic_batch_loading = match raw.dynamic_batch_loading {
            None => None,
            Some(d) => {
                let f = "data.dynamic_batch_loading";
                for name in &names {
                    if !d.reference_loss.contains_key(name) {
                        return Err(SpecError::new(
                            format!("{f}.reference_loss"),
                            format!(
                                "has no entry for training domain {name:?}: add `{name} = <loss>`"
                            ),
                        ));
                    }
                    if !val_names.contains(name) {
                        return Err(SpecError::new(
                            f.to_string(),
                            format!("needs a validation set for domain {name:?}: add it to data.validation"),
                        ));
                    }
                }
                for (name, loss) in &d.reference_loss {
                    if !names.contains(name) {
                        return Err(SpecError::new(
                            format!("{f}.reference_loss.{name}"),
                            "is not a training domain: use one of the names in data.train",
                        ));
                    }
                    if !(loss.is_finite() && *loss > 0.0) {
                        return Err(SpecError::new(
                            format!("{f}.reference_loss.{name}"),
                            format!("{loss} must be a positive loss"),
                        ));
                    }
                }
                positive(&format!("{f}.update_every"), d.update_every)?;
                Some(pb::DynamicBatchLoading {
                    reference_loss: d.reference_loss.into_iter().collect(),
                    update_every: d.update_every,
                })
            }
        };
        Ok(pb::DataSpec {
            calibration: Some(calibration),
            train,
            validation,
            dynamic_batch_loading,
        })
    }

    fn round(
        &self,
        i: usize,
        r: RawRound,
        source: Option<&pb::ModelShape>,
        teacher: &pb::ModelShape,
        data: &pb::DataSpec,
    ) -> Result<(pb::RoundSpec, Option<pb::ModelShape>), SpecError> {
        let f = format!("rounds[{i}]");
        let t = r.target;
        let axes = [
            t.hidden_size,
            t.intermediate_size,
            t.num_attention_heads,
            t.num_layers,
        ];
        if axes.iter().all(Option::is_none) && t.params.is_none() {
            return Err(SpecError::new(
                format!("{f}.target"),
                "is empty: give hidden_size, intermediate_size, num_attention_heads, num_layers or params",
            ));
        }
        if t.params.is_some() && axes.iter().any(Option::is_some) {
            return Err(SpecError::new(
                format!("{f}.target.params"),
                "cannot be combined with explicit axes: give either a parameter budget or a shape",
            ));
        }
        if let Some(p) = &t.prefer {
            if t.params.is_none() {
                return Err(SpecError::new(
                    format!("{f}.target.prefer"),
                    "only applies to a parameter budget (target.params)",
                ));
            }
            if p != "width" && p != "depth" {
                return Err(SpecError::new(
                    format!("{f}.target.prefer"),
                    format!("{p:?} must be \"width\" or \"depth\""),
                ));
            }
        }
        if let Some(p) = t.params {
            if !(p.is_finite() && p > 0.0 && p <= 1.0) {
                return Err(SpecError::new(
                    format!("{f}.target.params"),
                    format!(
                        "{p} must be a fraction of the source's parameters in (0, 1], e.g. 0.7"
                    ),
                ));
            }
        }
        for (name, v) in [
            ("hidden_size", t.hidden_size),
            ("intermediate_size", t.intermediate_size),
            ("num_attention_heads", t.num_attention_heads),
            ("num_layers", t.num_layers),
        ] {
            if v == Some(0) {
                return Err(SpecError::new(
                    format!("{f}.target.{name}"),
                    "0 must be at least 1",
                ));
            }
        }
        // Shape checks need the source's shape: the teacher's, or the previous round's when
        // that one was given by axes (a parameter budget's shape is chosen at prune time).
        let mut next = None;
        // The student's layer count when it is known now (not for a parameter budget).
        let mut student_layers = None;
        let mut source_layers = None;
        if let Some(src) = source.filter(|s| s.hidden_size > 0) {
            let what = if i == 0 {
                "the teacher's".to_string()
            } else {
                format!("round {}'s", i - 1)
            };
            let check = |name: &str, v: Option<u32>, have: u32| -> Result<u32, SpecError> {
                match v {
                    Some(v) if v > have => Err(SpecError::new(
                        format!("{f}.target.{name}"),
                        format!("{v} is larger than {what} {have}: pruning only shrinks (give at most {have})"),
                    )),
                    Some(v) => Ok(v),
                    None => Ok(have),
                }
            };
            let hidden = check("hidden_size", t.hidden_size, src.hidden_size)?;
            let inter = check(
                "intermediate_size",
                t.intermediate_size,
                src.intermediate_size,
            )?;
            let heads = check(
                "num_attention_heads",
                t.num_attention_heads,
                src.num_attention_heads,
            )?;
            let layers = check("num_layers", t.num_layers, src.num_layers)?;
            source_layers = Some(src.num_layers);
            if t.params.is_none() {
                student_layers = Some(layers);
            }
            let kv = src.num_key_value_heads.max(1);
            if heads % kv != 0 || heads < kv {
                let lo = (heads / kv).max(1) * kv;
                let hi = (heads / kv + 1) * kv;
                let hint = if lo < heads && lo != hi {
                    format!("try {lo} or {hi}")
                } else {
                    format!("try {}", hi.min(src.num_attention_heads))
                };
                return Err(SpecError::new(
                    format!("{f}.target.num_attention_heads"),
                    format!("{heads} must divide evenly into {kv} KV groups ({hint})"),
                ));
            }
            if t.params.is_none() {
                let mut s = *src;
                s.hidden_size = hidden;
                s.intermediate_size = inter;
                s.num_attention_heads = heads;
                s.num_layers = layers;
                s.head_dim = distillery_proto::shape::head_dim(src);
                s.params = param_count(&s);
                // The worker's own rule for what a pruned model may be (one source of truth).
                let target = distillery_worker::prune::plan::Target {
                    hidden_size: Some(hidden),
                    intermediate_size: Some(inter),
                    num_attention_heads: Some(heads),
                    num_layers: Some(layers),
                    ..Default::default()
                };
                if let Err(e) = distillery_worker::prune::plan::choose_shape(src, &target) {
                    return Err(SpecError::new(format!("{f}.target"), e.to_string()));
                }
                next = Some(s);
            }
        }
        if !matches!(
            r.depth_importance.as_str(),
            "block_importance" | "perplexity" | "taylor"
        ) {
            return Err(SpecError::new(
                format!("{f}.depth_importance"),
                format!(
                    "{:?} is not a method: use \"block_importance\", \"perplexity\" or \"taylor\"",
                    r.depth_importance
                ),
            ));
        }
        if let Err(e) =
            distillery_worker::prune::baseline::WidthImportance::parse(&r.width_importance)
        {
            return Err(SpecError::new(format!("{f}.width_importance"), e));
        }
        if r.depth_importance == "taylor" {
            if let (Some(have), Some(want)) = (source_layers, student_layers) {
                let droppable = distillery_worker::prune::taylor_droppable(have as usize) as u32;
                if have - want > droppable {
                    return Err(SpecError::new(
                        format!("{f}.target.num_layers"),
                        format!(
                            "{want}: depth_importance = \"taylor\" (Taylor+) keeps the first four and the last two of the {have} layers, so at most {droppable} can go; give at least {} layers or use \"block_importance\"",
                            have - droppable
                        ),
                    ));
                }
            }
        }
        if r.depth_importance == "perplexity" && data.validation.is_empty() {
            return Err(SpecError::new(
                format!("{f}.depth_importance"),
                "\"perplexity\" needs validation data: add [[data.validation]] or use \"block_importance\"",
            ));
        }
        let d = r.distill;
        let df = format!("{f}.distill");
        if d.tokens == 0 {
            return Err(SpecError::new(
                format!("{df}.tokens"),
                "0 must be at least one token",
            ));
        }
        positive(&format!("{df}.seq_len"), d.seq_len)?;
        positive(&format!("{df}.micro_batch"), d.micro_batch)?;
        if d.world_size < 1 {
            return Err(SpecError::new(
                format!("{df}.world_size"),
                "0 must be at least 1 (one rank per device)",
            ));
        }
        finite_positive(&format!("{df}.lr"), d.lr)?;
        finite_positive(&format!("{df}.temperature"), d.temperature)?;
        if !(d.ce_weight.is_finite() && d.ce_weight >= 0.0) {
            return Err(SpecError::new(
                format!("{df}.ce_weight"),
                format!("{} must be 0 or more", d.ce_weight),
            ));
        }
        positive(&format!("{df}.checkpoint_every"), d.checkpoint_every)?;
        for (key, value) in [
            ("precision", &d.precision),
            ("teacher_precision", &d.teacher_precision),
        ] {
            if !matches!(value.as_str(), "f32" | "bf16") {
                return Err(SpecError::new(
                    format!("{df}.{key}"),
                    format!("{value:?} is not a precision: use \"f32\" or \"bf16\""),
                ));
            }
        }
        let search = match r.search {
            None => None,
            Some(x) => {
                let search = pb::SearchSpec {
                    candidates: x.candidates,
                    tokens: x.tokens,
                    by: x.by,
                };
                check_search(
                    &f,
                    &search,
                    t.params,
                    t.prefer.as_deref(),
                    d.tokens,
                    data,
                    source.filter(|s| s.hidden_size > 0),
                )?;
                Some(search)
            }
        };
        let loss = self.distill_loss(&df, &d, teacher, student_layers)?;
        let round = pb::RoundSpec {
            search,
            target: Some(pb::TargetShape {
                hidden_size: t.hidden_size,
                intermediate_size: t.intermediate_size,
                num_attention_heads: t.num_attention_heads,
                num_layers: t.num_layers,
                params: t.params,
                prefer: t.prefer.clone().unwrap_or_default(),
            }),
            depth_importance: r.depth_importance,
            width_importance: r.width_importance,
            distill: Some(pb::DistillSpec {
                tokens: d.tokens,
                seq_len: d.seq_len,
                micro_batch: d.micro_batch,
                world_size: d.world_size,
                lr: d.lr,
                warmup_steps: d.warmup_steps,
                temperature: d.temperature,
                ce_weight: d.ce_weight,
                checkpoint_every: d.checkpoint_every,
                precision: d.precision,
                teacher_precision: d.teacher_precision,
                shard_optimizer: d.shard_optimizer,
                recompute: d.recompute,
                loss: loss.loss,
                skew_alpha: loss.skew_alpha,
                jsd_beta: loss.jsd_beta,
                top_k: loss.top_k,
                hidden: loss.hidden,
            }),
        };
        Ok((round, next))
    }

    /// `distill.loss`, `skew_alpha`, `jsd_beta`, `top_k` and `hidden`, resolved to the proto's
    /// fields (defaults filled in). `student_layers` is the round's student depth when the
    /// target gives it.
    fn distill_loss(
        &self,
        df: &str,
        d: &RawDistill,
        teacher: &pb::ModelShape,
        student_layers: Option<u32>,
    ) -> Result<pb::DistillSpec, SpecError> {
        let loss = d.loss.clone().unwrap_or_else(|| "forward_kl".into());
        if !LOSSES.contains(&loss.as_str()) {
            return Err(SpecError::new(
                format!("{df}.loss"),
                format!(
                    "{loss:?} is not a loss: use \"forward_kl\" (default), \"reverse_kl\", \"skew_kl\", \"jsd\" or \"ce\" (cross-entropy only)"
                ),
            ));
        }
        let weight = |key: &str, v: Option<f64>, for_loss: &str, default: f64| {
            match v {
            Some(_) if loss != for_loss => Err(SpecError::new(
                format!("{df}.{key}"),
                format!("only applies to loss = \"{for_loss}\" (the loss is {loss:?}): remove it or set the loss"),
            )),
            Some(w) if !(w.is_finite() && w > 0.0 && w < 1.0) => Err(SpecError::new(
                format!("{df}.{key}"),
                format!("{w} must be in (0, 1): at 0 the loss is forward KL, at 1 it is identically 0"),
            )),
            Some(w) => Ok(w),
            None if loss == for_loss => Ok(default),
            None => Ok(0.0),
        }
        };
        let skew_alpha = weight("skew_alpha", d.skew_alpha, "skew_kl", DEFAULT_SKEW_ALPHA)?;
        let jsd_beta = weight("jsd_beta", d.jsd_beta, "jsd", DEFAULT_JSD_BETA)?;
        if loss == "ce" && d.ce_weight != 0.0 {
            return Err(SpecError::new(
                format!("{df}.ce_weight"),
                format!(
                    "{} weighs the cross-entropy added to a KD loss; with loss = \"ce\" the cross-entropy is the whole loss: remove ce_weight",
                    d.ce_weight
                ),
            ));
        }
        let top_k = match d.top_k {
            None => 0,
            Some(_) if loss == "ce" => {
                return Err(SpecError::new(
                    format!("{df}.top_k"),
                    "selects the teacher's logits, and loss = \"ce\" uses none: remove top_k or use a KD loss",
                ))
            }
            Some(0) => {
                return Err(SpecError::new(
                    format!("{df}.top_k"),
                    "0 must be at least 1 (leave top_k out for the whole vocabulary)",
                ))
            }
            Some(k) if teacher.vocab_size > 0 && k > teacher.vocab_size => {
                return Err(SpecError::new(
                    format!("{df}.top_k"),
                    format!(
                        "{k} is more than the teacher's vocabulary of {} tokens (give at most {}, or leave top_k out)",
                        teacher.vocab_size, teacher.vocab_size
                    ),
                ))
            }
            Some(k) => k,
        };
        let hidden = match &d.hidden {
            None => None,
            Some(h) => Some(self.hidden(&format!("{df}.hidden"), h, teacher, student_layers)?),
        };
        Ok(pb::DistillSpec {
            loss,
            skew_alpha,
            jsd_beta,
            top_k,
            hidden,
            ..Default::default()
        })
    }

    fn hidden(
        &self,
        hf: &str,
        h: &RawHidden,
        teacher: &pb::ModelShape,
        student_layers: Option<u32>,
    ) -> Result<pb::HiddenDistillSpec, SpecError> {
        let loss = h.loss.clone().unwrap_or_else(|| "cosine".into());
        if !matches!(loss.as_str(), "cosine" | "mse") {
            return Err(SpecError::new(
                format!("{hf}.loss"),
                format!("{loss:?} is not a hidden-state loss: use \"cosine\" (default) or \"mse\""),
            ));
        }
        let shape_hint = "give \"auto\" or a list of [student_layer, teacher_layer] pairs such as [[0, 0], [5, 9]]";
        let pairs = match &h.pairs {
            toml::Value::String(a) if a == "auto" => None,
            toml::Value::String(a) => {
                return Err(SpecError::new(
                    format!("{hf}.pairs"),
                    format!("{a:?} is not a mapping: {shape_hint}"),
                ))
            }
            toml::Value::Array(list) if list.is_empty() => {
                return Err(SpecError::new(
                    format!("{hf}.pairs"),
                    format!("is empty: {shape_hint}"),
                ))
            }
            toml::Value::Array(list) => {
                let mut out = Vec::with_capacity(list.len());
                for (j, item) in list.iter().enumerate() {
                    let pf = format!("{hf}.pairs[{j}]");
                    let nums: Option<Vec<u32>> = item.as_array().and_then(|a| {
                        a.iter()
                            .map(|x| x.as_integer().and_then(|n| u32::try_from(n).ok()))
                            .collect()
                    });
                    match nums.as_deref() {
                        Some(&[s, t]) => out.push(pb::LayerPair {
                            student: s,
                            teacher: t,
                        }),
                        _ => {
                            return Err(SpecError::new(
                                pf,
                                format!("{item} is not a pair of layer indices: {shape_hint}"),
                            ))
                        }
                    }
                }
                Some(out)
            }
            other => {
                return Err(SpecError::new(
                    format!("{hf}.pairs"),
                    format!("{other} is not a mapping: {shape_hint}"),
                ))
            }
        };
        let spec = pb::HiddenDistillSpec {
            auto_pairs: pairs.is_none(),
            pairs: pairs.unwrap_or_default(),
            loss,
        };
        check_hidden_pairs(hf, &spec, teacher.num_layers, student_layers)?;
        Ok(spec)
    }

    fn evaluation(
        &self,
        raw: Option<RawEvaluation>,
        data: &pb::DataSpec,
    ) -> Result<pb::EvaluationSpec, SpecError> {
        let raw = raw.unwrap_or(RawEvaluation {
            perplexity: true,
            judge: None,
        });
        if raw.perplexity && data.validation.is_empty() {
            return Err(SpecError::new(
                "evaluation.perplexity",
                "is true but data.validation is empty: add [[data.validation]] or set perplexity = false",
            ));
        }
        let judge = match raw.judge {
            None => None,
            Some(j) => {
                let f = "evaluation.judge";
                check_backend(f, &j.backend, &j.base_url, &j.model)?;
                let model = if j.backend == "local" {
                    self.path(&format!("{f}.model"), &j.model)?
                } else {
                    j.model
                };
                if !MODES.contains(&j.mode.as_str()) {
                    return Err(SpecError::new(
                        format!("{f}.mode"),
                        format!(
                            "{:?} is not a mode: use \"pairwise\", \"single\", \"rubric\", \"mtbench\" or \"mtbench-pairwise\"",
                            j.mode
                        ),
                    ));
                }
                let mtbench = j.mode.starts_with("mtbench");
                let prompts = match (&j.prompts, mtbench) {
                    (Some(p), true) => self.path(&format!("{f}.prompts"), p)?,
                    (None, true) => {
                        return Err(SpecError::new(
                            format!("{f}.prompts"),
                            format!("is missing: mode {:?} takes its judge prompts from FastChat's judge_prompts.jsonl; give its path", j.mode),
                        ))
                    }
                    (Some(_), false) => {
                        return Err(SpecError::new(
                            format!("{f}.prompts"),
                            format!("is only read in the mtbench modes (mode is {:?}): remove it or set mode = \"mtbench\"", j.mode),
                        ))
                    }
                    (None, false) => String::new(),
                };
                let reference_answers = match &j.reference_answers {
                    Some(r) => self.path(&format!("{f}.reference_answers"), r)?,
                    None => String::new(),
                };
                let verdicts = j.verdicts.clone().unwrap_or_default();
                match verdicts.as_str() {
                    "" => {}
                    "arena-hard" if !mtbench => {}
                    "arena-hard" => {
                        return Err(SpecError::new(
                            format!("{f}.verdicts"),
                            "\"arena-hard\" needs the built-in pairwise prompt: FastChat's MT-Bench prompts ask for [[A]]/[[B]]/[[C]]; use mode = \"pairwise\"",
                        ))
                    }
                    other => {
                        return Err(SpecError::new(
                            format!("{f}.verdicts"),
                            format!("{other:?} is not a verdict scale: use \"arena-hard\" (five levels) or leave it out (A, B, tie)"),
                        ))
                    }
                }
                positive(&format!("{f}.samples"), j.samples)?;
                let temperature = j
                    .temperature
                    .unwrap_or(if j.samples > 1 { 0.7 } else { 0.0 });
                if !(temperature.is_finite() && temperature >= 0.0) {
                    return Err(SpecError::new(
                        format!("{f}.temperature"),
                        format!("{temperature} must be 0 or more"),
                    ));
                }
                if j.samples > 1 && temperature == 0.0 {
                    return Err(SpecError::new(
                        format!("{f}.temperature"),
                        format!("is 0 with samples = {}: a greedy judge gives the same verdict every time; set a temperature above 0 (e.g. 0.7)", j.samples),
                    ));
                }
                let second = match j.second {
                    None => None,
                    Some(s2) => {
                        let f2 = format!("{f}.second");
                        check_backend(&f2, &s2.backend, &s2.base_url, &s2.model)?;
                        positive(&format!("{f2}.max_tokens"), s2.max_tokens)?;
                        let chat_template = match (&s2.chat_template, s2.backend.as_str()) {
                            (None, _) => String::new(),
                            (Some(t), "local") => self.path(&format!("{f2}.chat_template"), t)?,
                            (Some(_), _) => {
                                return Err(SpecError::new(
                                    format!("{f2}.chat_template"),
                                    "is only for backend = \"local\"",
                                ))
                            }
                        };
                        let model = if s2.backend == "local" {
                            self.path(&format!("{f2}.model"), &s2.model)?
                        } else {
                            s2.model
                        };
                        Some(pb::SecondJudgeSpec {
                            backend: s2.backend,
                            base_url: s2.base_url,
                            model,
                            max_tokens: s2.max_tokens,
                            chat_template,
                        })
                    }
                };
                if !matches!(j.baseline.as_str(), "teacher" | "previous") {
                    return Err(SpecError::new(
                        format!("{f}.baseline"),
                        format!(
                            "{:?} is not a baseline: use \"teacher\" or \"previous\"",
                            j.baseline
                        ),
                    ));
                }
                positive(&format!("{f}.max_tokens"), j.max_tokens)?;
                let chat_template = match (&j.chat_template, j.backend.as_str()) {
                    (None, _) => String::new(),
                    (Some(t), "local") => self.path(&format!("{f}.chat_template"), t)?,
                    (Some(_), _) => {
                        return Err(SpecError::new(
                            format!("{f}.chat_template"),
                            "is only for backend = \"local\": an OpenAI-compatible server applies its own template (give it there, e.g. `worker serve --chat-template FILE`)",
                        ))
                    }
                };
                Some(pb::JudgeSpec {
                    chat_template,
                    questions: self.path(&format!("{f}.questions"), &j.questions)?,
                    backend: j.backend,
                    base_url: j.base_url,
                    model,
                    mode: j.mode,
                    baseline: j.baseline,
                    max_tokens: j.max_tokens,
                    prompts,
                    reference_answers,
                    ranking: j.ranking,
                    verdicts,
                    samples: j.samples,
                    temperature,
                    second,
                })
            }
        };
        Ok(pb::EvaluationSpec {
            perplexity: raw.perplexity,
            judge,
        })
    }

    fn gate(
        &self,
        raw: Option<RawGate>,
        eval: &pb::EvaluationSpec,
    ) -> Result<pb::GateSpec, SpecError> {
        let Some(g) = raw else {
            return Ok(pb::GateSpec {
                max_perplexity_ratio: None,
                min_win_rate: None,
                on_fail: default_on_fail(),
                min_mtbench: None,
                max_elo_drop: None,
            });
        };
        if let Some(r) = g.max_perplexity_ratio {
            if !(r.is_finite() && r > 0.0) {
                return Err(SpecError::new(
                    "gate.max_perplexity_ratio",
                    format!("{r} must be a positive ratio, e.g. 1.5"),
                ));
            }
            if !eval.perplexity {
                return Err(SpecError::new(
                    "gate.max_perplexity_ratio",
                    "needs perplexity: set evaluation.perplexity = true or remove this rule",
                ));
            }
        }
        if let Some(w) = g.min_win_rate {
            if !(0.0..=1.0).contains(&w) {
                return Err(SpecError::new(
                    "gate.min_win_rate",
                    format!("{w} must be between 0 and 1"),
                ));
            }
            if eval.judge.is_none() {
                return Err(SpecError::new(
                    "gate.min_win_rate",
                    "needs a judge: add [evaluation.judge] (mode = \"pairwise\") or remove this rule",
                ));
            }
        }
        if let Some(min) = g.min_mtbench {
            if !(1.0..=10.0).contains(&min) {
                return Err(SpecError::new(
                    "gate.min_mtbench",
                    format!("{min} must be an MT-Bench score between 1 and 10"),
                ));
            }
            match &eval.judge {
                Some(j) if j.mode == "mtbench" => {}
                _ => {
                    return Err(SpecError::new(
                        "gate.min_mtbench",
                        "needs MT-Bench scores: set evaluation.judge.mode = \"mtbench\" or remove this rule",
                    ))
                }
            }
        }
        if let Some(d) = g.max_elo_drop {
            if !(d.is_finite() && d >= 0.0) {
                return Err(SpecError::new(
                    "gate.max_elo_drop",
                    format!("{d} must be 0 or more rating points, e.g. 50"),
                ));
            }
            match &eval.judge {
                Some(j) if j.ranking => {}
                _ => {
                    return Err(SpecError::new(
                        "gate.max_elo_drop",
                        "needs a ranking: set evaluation.judge.ranking = true or remove this rule",
                    ))
                }
            }
        }
        if !matches!(g.on_fail.as_str(), "stop" | "extend_distill") {
            return Err(SpecError::new(
                "gate.on_fail",
                format!(
                    "{:?} is not an action: use \"stop\" or \"extend_distill\"",
                    g.on_fail
                ),
            ));
        }
        Ok(pb::GateSpec {
            max_perplexity_ratio: g.max_perplexity_ratio,
            min_win_rate: g.min_win_rate,
            on_fail: g.on_fail,
            min_mtbench: g.min_mtbench,
            max_elo_drop: g.max_elo_drop,
        })
    }
}

/// `[teacher_correction]`: the teacher fine-tuned on the training mix before round 0.
fn teacher_correction(t: RawTeacherCorrection) -> Result<pb::TeacherCorrectionSpec, SpecError> {
    let f = "teacher_correction";
    if t.tokens == 0 {
        return Err(SpecError::new(
            format!("{f}.tokens"),
            "0 must be at least one token: the teacher is fine-tuned on this many tokens of \
             data.train (remove [teacher_correction] to skip it)",
        ));
    }
    positive(&format!("{f}.seq_len"), t.seq_len)?;
    positive(&format!("{f}.micro_batch"), t.micro_batch)?;
    if t.world_size < 1 {
        return Err(SpecError::new(
            format!("{f}.world_size"),
            "0 must be at least 1 (one rank per device)",
        ));
    }
    finite_positive(&format!("{f}.lr"), t.lr)?;
    positive(&format!("{f}.checkpoint_every"), t.checkpoint_every)?;
    Ok(pb::TeacherCorrectionSpec {
        tokens: t.tokens,
        seq_len: t.seq_len,
        micro_batch: t.micro_batch,
        world_size: t.world_size,
        lr: t.lr,
        warmup_steps: t.warmup_steps,
        checkpoint_every: t.checkpoint_every,
    })
}

/// `rounds[i].search`: what a candidate search needs (shared by the TOML and wire checks).
/// `source` is the shape the round prunes, when known before the run (the teacher's for round 0,
/// or a previous round's given by axes): then asking for more candidates than fit is refused.
fn check_search(
    f: &str,
    s: &pb::SearchSpec,
    params: Option<f64>,
    prefer: Option<&str>,
    distill_tokens: u64,
    data: &pb::DataSpec,
    source: Option<&pb::ModelShape>,
) -> Result<(), SpecError> {
    let sf = format!("{f}.search");
    let Some(frac) = params else {
        return Err(SpecError::new(
            sf,
            format!(
                "needs a parameter budget: set {f}.target.params (e.g. 0.7) instead of explicit \
                 axes, which name a single shape and leave nothing to search"
            ),
        ));
    };
    if prefer.is_some_and(|p| !p.is_empty()) {
        return Err(SpecError::new(
            format!("{f}.target.prefer"),
            "cannot be combined with search: the search proposes shapes across both width and \
             depth (remove prefer)",
        ));
    }
    if s.candidates == 0 {
        return Err(SpecError::new(
            format!("{sf}.candidates"),
            "0 must be at least 1 (e.g. 3 shapes distilled briefly, the best one kept)",
        ));
    }
    if s.tokens == 0 || s.tokens >= distill_tokens {
        return Err(SpecError::new(
            format!("{sf}.tokens"),
            format!(
                "{} must be at least 1 and less than {f}.distill.tokens = {distill_tokens}: each \
                 candidate is distilled this long, then the winner continues to the round's tokens",
                s.tokens
            ),
        ));
    }
    if !matches!(s.by.as_str(), "kd_loss" | "perplexity") {
        return Err(SpecError::new(
            format!("{sf}.by"),
            format!(
                "{:?} is not a score: use \"kd_loss\" or \"perplexity\" (lower wins)",
                s.by
            ),
        ));
    }
    if data.validation.is_empty() {
        return Err(SpecError::new(
            format!("{sf}.by"),
            "scoring candidates needs validation data: add [[data.validation]]",
        ));
    }
    if let Some(src) = source {
        let mut src = *src;
        src.params = src.params.max(param_count(&src));
        if let Err(e) =
            distillery_worker::prune::plan::search_candidates(&src, frac, s.candidates as usize)
        {
            return Err(SpecError::new(
                format!("{sf}.candidates"),
                format!("{} is too many: {e}", s.candidates),
            ));
        }
    }
    Ok(())
}

/// The logit losses `distill.loss` takes.
pub const LOSSES: &[&str] = &["forward_kl", "reverse_kl", "skew_kl", "jsd", "ce"];
/// DistiLLM's default α.
pub const DEFAULT_SKEW_ALPHA: f64 = 0.1;
/// The symmetric JSD.
pub const DEFAULT_JSD_BETA: f64 = 0.5;

/// Explicit hidden-state pairs against the layer counts known now (0 / None: unknown): each
/// index inside its model, no student layer twice.
pub fn check_hidden_pairs(
    field: &str,
    h: &pb::HiddenDistillSpec,
    teacher_layers: u32,
    student_layers: Option<u32>,
) -> Result<(), SpecError> {
    if h.auto_pairs && !h.pairs.is_empty() {
        return Err(SpecError::new(
            format!("{field}.pairs"),
            "is both \"auto\" and a list: give one",
        ));
    }
    if !h.auto_pairs && h.pairs.is_empty() {
        return Err(SpecError::new(
            format!("{field}.pairs"),
            "is empty: give \"auto\" or [student_layer, teacher_layer] pairs",
        ));
    }
    if !matches!(h.loss.as_str(), "" | "cosine" | "mse") {
        return Err(SpecError::new(
            format!("{field}.loss"),
            format!(
                "{:?} is not a hidden-state loss: use \"cosine\" or \"mse\"",
                h.loss
            ),
        ));
    }
    let mut seen = BTreeSet::new();
    for (j, p) in h.pairs.iter().enumerate() {
        let pf = format!("{field}.pairs[{j}]");
        if teacher_layers > 0 && p.teacher >= teacher_layers {
            return Err(SpecError::new(
                pf,
                format!(
                    "teacher layer {} does not exist: the teacher has layers 0..={}",
                    p.teacher,
                    teacher_layers - 1
                ),
            ));
        }
        if let Some(n) = student_layers {
            if p.student >= n {
                return Err(SpecError::new(
                    pf,
                    format!(
                        "student layer {} does not exist: this round's student has layers 0..={}",
                        p.student,
                        n.saturating_sub(1)
                    ),
                ));
            }
        }
        if !seen.insert(p.student) {
            return Err(SpecError::new(
                pf,
                format!(
                    "student layer {} is paired twice: map each student layer to one teacher layer",
                    p.student
                ),
            ));
        }
    }
    Ok(())
}

/// The judge modes.
pub const MODES: &[&str] = &[
    "pairwise",
    "single",
    "rubric",
    "mtbench",
    "mtbench-pairwise",
];

/// Whether a mode's scores can be set beside published MT-Bench figures (FastChat's prompts,
/// per-turn grading, its averaging).
pub fn mtbench_comparable(mode: &str) -> bool {
    mode == "mtbench"
}

/// At submit, what a judge task would refuse in the mtbench modes: a prompt file without the
/// prompts the mode uses, a malformed line, a question that is graded against a reference and has
/// none (turn 2 needs a second reference turn).
fn check_mtbench_files(j: &pb::JudgeSpec) -> Result<(), SpecError> {
    use distillery_worker::judge::{self, fastchat};
    let f = "evaluation.judge";
    let set = fastchat::load_prompts(Path::new(&j.prompts))
        .map_err(|e| SpecError::new(format!("{f}.prompts"), e))?;
    let pairwise = j.mode == "mtbench-pairwise";
    set.for_mode(pairwise)
        .map_err(|e| SpecError::new(format!("{f}.prompts"), e))?;
    if j.ranking && !pairwise {
        set.for_mode(true).map_err(|e| {
            SpecError::new(
                format!("{f}.prompts"),
                format!("{e} (ranking compares pairs)"),
            )
        })?;
    }
    let refs = if j.reference_answers.is_empty() {
        None
    } else {
        Some(
            fastchat::load_references(Path::new(&j.reference_answers))
                .map_err(|e| SpecError::new(format!("{f}.reference_answers"), e))?,
        )
    };
    let questions = judge::load_questions(Path::new(&j.questions))
        .map_err(|e| SpecError::new(format!("{f}.questions"), e))?;
    let field = if refs.is_some() {
        format!("{f}.reference_answers")
    } else {
        format!("{f}.questions")
    };
    for q in questions
        .iter()
        .filter(|q| fastchat::needs_reference(&q.category))
    {
        let r = fastchat::reference_for(q, refs.as_ref()).map_err(|e| SpecError::new(&field, e))?;
        if q.turns.len() == 2 && r.len() < 2 {
            return Err(SpecError::new(
                &field,
                format!(
                    "question {} ({}) has two turns but its reference only one: turn 2 is graded against the second",
                    q.id(),
                    q.category
                ),
            ));
        }
    }
    Ok(())
}

/// A judge's backend, endpoint and model.
fn check_backend(f: &str, backend: &str, base_url: &str, model: &str) -> Result<(), SpecError> {
    match backend {
        "openai" => {
            if !(base_url.starts_with("http://") || base_url.starts_with("https://")) {
                return Err(SpecError::new(
                    format!("{f}.base_url"),
                    format!(
                        "{base_url:?} must be an http(s) URL such as \"http://127.0.0.1:8000/v1\""
                    ),
                ));
            }
            if model.is_empty() {
                return Err(SpecError::new(
                    format!("{f}.model"),
                    "is empty: name the judge model the server serves",
                ));
            }
        }
        "local" => {
            if model.is_empty() {
                return Err(SpecError::new(
                    format!("{f}.model"),
                    "is empty: give the judge model's path",
                ));
            }
        }
        other => {
            return Err(SpecError::new(
                format!("{f}.backend"),
                format!("{other:?} is not a backend: use \"openai\" or \"local\""),
            ))
        }
    }
    Ok(())
}

/// The loss fields of a `distill` table that need no files (also applied to specs that arrive
/// parsed over the wire).
pub fn check_distill_loss(df: &str, d: &pb::DistillSpec) -> Result<(), SpecError> {
    if !(d.loss.is_empty() || LOSSES.contains(&d.loss.as_str())) {
        return Err(SpecError::new(
            format!("{df}.loss"),
            format!(
                "{:?} is not a loss: use \"forward_kl\", \"reverse_kl\", \"skew_kl\", \"jsd\" or \"ce\"",
                d.loss
            ),
        ));
    }
    for (key, w) in [("skew_alpha", d.skew_alpha), ("jsd_beta", d.jsd_beta)] {
        if !(w == 0.0 || (w.is_finite() && w > 0.0 && w < 1.0)) {
            return Err(SpecError::new(
                format!("{df}.{key}"),
                format!("{w} must be in (0, 1)"),
            ));
        }
    }
    if d.loss == "ce" && (d.top_k > 0 || d.ce_weight != 0.0) {
        return Err(SpecError::new(
            format!("{df}.loss"),
            "\"ce\" is the cross-entropy alone: it takes neither top_k nor ce_weight",
        ));
    }
    if let Some(h) = &d.hidden {
        check_hidden_pairs(&format!("{df}.hidden"), h, 0, None)?;
    }
    Ok(())
}

fn positive(field: &str, v: u32) -> Result<u32, SpecError> {
    if v == 0 {
        Err(SpecError::new(field, "0 must be at least 1"))
    } else {
        Ok(v)
    }
}

fn finite_positive(field: &str, v: f64) -> Result<f64, SpecError> {
    if v.is_finite() && v > 0.0 {
        Ok(v)
    } else {
        Err(SpecError::new(
            field,
            format!("{v} must be a positive number"),
        ))
    }
}

fn domain_name(field: &str, name: &str) -> Result<(), SpecError> {
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_'))
    {
        return Err(SpecError::new(
            field,
            format!("{name:?} is not a valid domain name: use letters, digits, '-' and '_'"),
        ));
    }
    Ok(())
}

/// Server-side check of a spec received over the wire: the same rules that need no files.
pub fn validate_wire(spec: &pb::CampaignSpec) -> Result<(), SpecError> {
    let teacher = spec
        .teacher
        .as_ref()
        .ok_or_else(|| SpecError::new("teacher", "is missing"))?;
    if teacher.model.is_empty() {
        return Err(SpecError::new(
            "teacher.model",
            "is empty: give the teacher's path",
        ));
    }
    if spec.data.is_none() {
        return Err(SpecError::new("data", "is missing"));
    }
    if spec.rounds.is_empty() {
        return Err(SpecError::new("rounds", "no rounds: add at least one"));
    }
    for (i, r) in spec.rounds.iter().enumerate() {
        let d = r
            .distill
            .as_ref()
            .ok_or_else(|| SpecError::new(format!("rounds[{i}].distill"), "is missing"))?;
        if d.world_size < 1 {
            return Err(SpecError::new(
                format!("rounds[{i}].distill.world_size"),
                "0 must be at least 1",
            ));
        }
        check_distill_loss(&format!("rounds[{i}].distill"), d)?;
        let Some(target) = &r.target else {
            return Err(SpecError::new(format!("rounds[{i}].target"), "is missing"));
        };
        if let Some(s) = &r.search {
            // Round 0 prunes the teacher, whose shape the client read; later rounds' sources are
            // only known at run time (the prune task refuses a count that does not fit then).
            let source = if i == 0 {
                teacher.shape.as_ref().filter(|s| s.hidden_size > 0)
            } else {
                None
            };
            check_search(
                &format!("rounds[{i}]"),
                s,
                target.params,
                Some(target.prefer.as_str()),
                d.tokens,
                spec.data.as_ref().unwrap_or(&pb::DataSpec::default()),
                source,
            )?;
        }
    }
    if let Some(t) = &spec.teacher_correction {
        if t.tokens == 0 || t.world_size == 0 || t.seq_len == 0 || t.micro_batch == 0 {
            return Err(SpecError::new(
                "teacher_correction",
                "tokens, seq_len, micro_batch and world_size must be at least 1",
            ));
        }
        if !(t.lr.is_finite() && t.lr > 0.0) {
            return Err(SpecError::new(
                "teacher_correction.lr",
                format!("{} must be a positive number", t.lr),
            ));
        }
    }
    if let Some(s) = &spec.scheduling {
        if s.max_attempts == 0 || s.score_shards == 0 || s.judge_shards == 0 {
            return Err(SpecError::new(
                "scheduling",
                "max_attempts, score_shards and judge_shards must be at least 1",
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
