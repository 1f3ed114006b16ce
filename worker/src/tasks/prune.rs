//! The Score and Prune phases: `score` (one calibration shard's importance accumulators),
//! `score_depth` (perplexity with each layer of a group skipped) and `prune` (merge the shards,
//! choose the shape and what stays, slice, write a Hugging Face directory).

use std::collections::BTreeMap;

use distillery_proto::v1 as pb;

use super::common::{self, fatal, input, param_usize, report};
use crate::model::io;
use crate::prune::baseline::{apply_width_importance, WidthImportance};
use crate::prune::importance::{self, DepthScores, Importance};
use crate::prune::plan::{self, Target};
use crate::runner::{TaskContext, TaskError, TaskOutput, TaskRunner};

/// Sequences per forward pass while scoring.
const SCORE_BATCH: usize = 4;

/// Runs `score`, `score_depth` and `prune`.
pub struct PruneTasks;

impl TaskRunner for PruneTasks {
    fn kinds(&self) -> Vec<String> {
        vec!["score".into(), "score_depth".into(), "prune".into()]
    }

    fn run(&self, task: &pb::TaskAssignment, ctx: &TaskContext) -> Result<TaskOutput, TaskError> {
        match task.kind.as_str() {
            "score" => score(task, ctx),
            "score_depth" => score_depth(task, ctx),
            "prune" => prune(task, ctx),
            k => Err(fatal(format!("PruneTasks cannot run {k:?}"))),
        }
    }
}

fn cancelled_or(e: candle_core::Error, ctx: &TaskContext) -> TaskError {
    if ctx.cancelled() {
        TaskError::cancelled()
    } else {
        fatal(e)
    }
}

fn score(task: &pb::TaskAssignment, ctx: &TaskContext) -> Result<TaskOutput, TaskError> {
    let (shard, shards) = (
        param_usize(task, "shard")?,
        param_usize(task, "shards")?.max(1),
    );
    let device = common::device(task)?;
    let dir = common::model_dir(ctx, input(task, "source")?)?;
    let model = common::load_model(&dir, &device)?;
    let tok = common::load_tokenizer(&dir)?;
    let all = common::calibration(task, &model, &tok)?;
    // Sequence i belongs to shard i mod shards: the merged sums equal one pass over all of them.
    let mine: Vec<Vec<u32>> = all.iter().skip(shard).step_by(shards).cloned().collect();
    let taylor = task
        .spec
        .as_ref()
        .and_then(|s| s.rounds.get(task.round as usize))
        .is_some_and(|r| r.depth_importance == "taylor");
    let imp = importance::score_with(&model, &mine, SCORE_BATCH, taylor, |done, total| {
        report(
            ctx,
            &[
                ("score.sequences", done as f64),
                ("score.total", total as f64),
            ],
            &format!(
                "scoring shard {}/{shards}: {done}/{total} sequences",
                shard + 1
            ),
        )
    })
    .map_err(|e| cancelled_or(e, ctx))?;
    let path = ctx.work_dir().join("scores.safetensors");
    imp.save(&path).map_err(fatal)?;
    Ok(TaskOutput {
        outputs: BTreeMap::from([("scores".into(), ctx.upload_file(&path)?)]),
        metrics: BTreeMap::new(),
    })
}

/// The layers of group `g` of `groups`: contiguous, as even as possible.
pub fn group_layers(layers: usize, g: usize, groups: usize) -> Vec<usize> {
    let groups = groups.max(1);
    (0..layers)
        .filter(|l| l * groups / layers.max(1) == g)
        .collect()
}

fn score_depth(task: &pb::TaskAssignment, ctx: &TaskContext) -> Result<TaskOutput, TaskError> {
    let (g, groups) = (param_usize(task, "group")?, param_usize(task, "groups")?);
    let device = common::device(task)?;
    let dir = common::model_dir(ctx, input(task, "source")?)?;
    let model = common::load_model(&dir, &device)?;
    let tok = common::load_tokenizer(&dir)?;
    let seqs = common::calibration(task, &model, &tok)?;
    let layers = group_layers(model.config.num_hidden_layers, g, groups);
    let d = DepthScores::compute(&model, &seqs, SCORE_BATCH, &layers, |done, total| {
        report(
            ctx,
            &[
                ("score_depth.passes", done as f64),
                ("score_depth.total", total as f64),
            ],
            &format!(
                "depth group {}/{groups} (layers {layers:?}): pass {done}/{total}",
                g + 1
            ),
        )
    })
    .map_err(|e| cancelled_or(e, ctx))?;
    let path = ctx.work_dir().join("depth_scores.safetensors");
    d.save(&path).map_err(fatal)?;
    Ok(TaskOutput {
        outputs: BTreeMap::from([("depth_scores".into(), ctx.upload_file(&path)?)]),
        metrics: BTreeMap::new(),
    })
}

/// The name of the prune record a pruned model (and the student distilled from it) carries.
pub const PRUNE_RECORD: &str = "distillery_prune.json";

/// The prune record in a model folder, if it has one that parses.
pub fn read_prune_record(dir: &std::path::Path) -> Option<serde_json::Value> {
    let text = std::fs::read_to_string(dir.join(PRUNE_RECORD)).ok()?;
    serde_json::from_str(&text).ok()
}

/// Shard artifacts `name.N` when there are any, else the single `name`.
fn shard_refs<'a>(task: &'a pb::TaskAssignment, name: &str) -> Vec<&'a str> {
    let all = common::numbered_inputs(task, name);
    let numbered: Vec<&str> = all
        .iter()
        .filter(|(k, _)| *k != name)
        .map(|(_, r)| *r)
        .collect();
    if numbered.is_empty() {
        all.into_iter().map(|(_, r)| r).collect()
    } else {
        numbered
    }
}

/// `(candidate, candidates)` of a candidate search's prune task, `None` for a plain one.
fn candidate(task: &pb::TaskAssignment) -> Result<Option<(usize, usize)>, TaskError> {
    let num = |k: &str| -> Result<Option<usize>, TaskError> {
        task.params
            .get(k)
            .map(|v| {
                v.parse()
                    .map_err(|_| fatal(format!("task parameter {k} = {v:?} is not a number")))
            })
            .transpose()
    };
    match (num("candidate")?, num("candidates")?) {
        (Some(i), Some(k)) => Ok(Some((i, k))),
        (None, None) => Ok(None),
        _ => Err(fatal(
            "a candidate prune task needs both `candidate` and `candidates`",
        )),
    }
}

fn prune(task: &pb::TaskAssignment, ctx: &TaskContext) -> Result<TaskOutput, TaskError> {
    let round = task
        .spec
        .as_ref()
        .and_then(|s| s.rounds.get(task.round as usize))
        .ok_or_else(|| fatal(format!("the campaign spec has no round {}", task.round)))?;
    let device = common::device(task)?;
    let dir = common::model_dir(ctx, input(task, "source")?)?;
    let model = common::load_model(&dir, &device)?;

    let score_refs = shard_refs(task, "scores");
    if score_refs.is_empty() {
        return Err(fatal(
            "the prune task has no scores input (did the Score phase run?)",
        ));
    }
    let mut imp = Importance::new(&model.config);
    for r in &score_refs {
        let part = Importance::load(&ctx.fetch(r)?).map_err(fatal)?;
        imp.merge(&part).map_err(fatal)?;
    }
    let mut depth = Vec::new();
    if round.depth_importance == "perplexity" {
        for r in shard_refs(task, "depth_scores") {
            depth.push(DepthScores::load(&ctx.fetch(r)?).map_err(fatal)?);
        }
        if depth.is_empty() {
            return Err(fatal(
                "depth_importance = \"perplexity\" but the Score phase produced no depth_scores",
            ));
        }
    }
    let merged = ctx.work_dir().join("scores.safetensors");
    imp.save(&merged).map_err(fatal)?;
    let scores_digest = ctx.upload_file(&merged)?;

    let t = round.target.clone().unwrap_or_default();
    let target = Target {
        hidden_size: t.hidden_size,
        intermediate_size: t.intermediate_size,
        num_attention_heads: t.num_attention_heads,
        num_layers: t.num_layers,
        params: t.params,
        prefer_depth: t.prefer == "depth",
    };
    let src = plan::shape_of(&model.config);
    let shape = match candidate(task)? {
        // A candidate search: the budget search's `i`-th best-fitting shape of `k`.
        Some((i, k)) => {
            let frac = target.params.ok_or_else(|| {
                fatal(format!(
                    "rounds[{}].search needs target.params (a parameter budget)",
                    task.round
                ))
            })?;
            let shapes = plan::search_candidates(&src, frac, k).map_err(|e| {
                fatal(format!(
                    "rounds[{}].search.candidates = {k} is too many for this round's source: {e}",
                    task.round
                ))
            })?;
            shapes
                .get(i)
                .copied()
                .ok_or_else(|| fatal(format!("candidate {i} is not one of the {k} candidates")))?
        }
        None => plan::choose_shape(&src, &target)
            .map_err(|e| fatal(format!("round {}: {e}", task.round)))?,
    };
    let scores = if round.depth_importance == "taylor" {
        let have = src.num_layers as usize;
        let droppable = crate::prune::taylor_droppable(have);
        if have - shape.num_layers as usize > droppable {
            return Err(fatal(format!(
                "rounds[{}]: the target keeps {} of {have} layers, but depth_importance = \"taylor\" (Taylor+) keeps the first four and the last two, so at most {droppable} can go; keep at least {} layers or use \"block_importance\"",
                task.round,
                shape.num_layers,
                have - droppable
            )));
        }
        crate::prune::scores_by_taylor(&imp, &model).map_err(fatal)?
    } else {
        crate::prune::scores(&imp, &depth).map_err(fatal)?
    };
    let width = WidthImportance::parse(&round.width_importance)
        .map_err(|e| fatal(format!("rounds[{}].width_importance: {e}", task.round)))?;
    let seed = task.spec.as_ref().map_or(0, |s| s.seed) ^ (u64::from(task.round) << 32);
    let mut scores = scores;
    apply_width_importance(width, &model, seed, &mut scores).map_err(fatal)?;
    let keep = plan::plan(&src, &scores, &shape).map_err(fatal)?;
    let pruned = crate::prune::apply::apply(&model, &keep).map_err(fatal)?;
    let out = ctx.work_dir().join("pruned");
    let _ = std::fs::remove_dir_all(&out);
    io::save_dir(&pruned, &out, Some(&dir)).map_err(fatal)?;
    // Which teacher layer and channel each kept one was pruned from: the teacher itself is
    // round 0's source; later rounds compose with their source's own record.
    let (teacher_layers, teacher_channels) = if task.round == 0 {
        (Some(keep.layers.clone()), Some(keep.channels.clone()))
    } else {
        let prev = read_prune_record(&dir);
        let map = |key: &str, kept: &[usize]| -> Option<Vec<usize>> {
            let from = prev.as_ref()?.get(key)?.as_array()?;
            kept.iter()
                .map(|&i| from.get(i)?.as_u64().map(|x| x as usize))
                .collect()
        };
        (
            map("teacher_layers", &keep.layers),
            map("teacher_channels", &keep.channels),
        )
    };
    if let Some(h) = round.distill.as_ref().and_then(|d| d.hidden.as_ref()) {
        // Explicit pairs name the student's layers: now that the shape is known, check them
        // before any distillation is spent.
        if let Some(p) = h.pairs.iter().find(|p| p.student >= shape.num_layers) {
            return Err(fatal(format!(
                "rounds[{}].distill.hidden.pairs: student layer {} does not exist, the pruned student has {} layers (0..={}); fix the pairs",
                task.round,
                p.student,
                shape.num_layers,
                shape.num_layers.saturating_sub(1)
            )));
        }
    }
    // The record travels with the model into the distilled student (intermediate-state
    // distillation reads it), so it holds only what the model is, never how the campaign got
    // there: a search winner's student equals, byte for byte, a plain run of its shape (which
    // candidate it was is in `status`, `rounds[i].candidates`).
    let record = serde_json::json!({
        "teacher_layers": teacher_layers,
        "teacher_channels": teacher_channels,
        "source_shape": {"hidden_size": src.hidden_size, "intermediate_size": src.intermediate_size,
            "num_attention_heads": src.num_attention_heads, "num_layers": src.num_layers, "params": src.params},
        "shape": {"hidden_size": shape.hidden_size, "intermediate_size": shape.intermediate_size,
            "num_attention_heads": shape.num_attention_heads, "num_layers": shape.num_layers, "params": shape.params},
        "depth_importance": round.depth_importance,
        "width_importance": if round.width_importance.is_empty() { "activation" } else { round.width_importance.as_str() },
        "calibration_sequences": imp.sequences,
        "kept": {"layers": keep.layers, "channels": keep.channels, "heads": keep.heads, "neurons": keep.neurons},
    });
    let rec = out.join(PRUNE_RECORD);
    std::fs::write(
        &rec,
        serde_json::to_string_pretty(&record).unwrap_or_default(),
    )
    .map_err(|e| TaskError::retryable(format!("{}: {e}", rec.display())))?;
    let digest = ctx.upload_dir(&out)?;
    let params = pruned.num_params() as f64;
    Ok(TaskOutput {
        outputs: BTreeMap::from([("pruned".into(), digest), ("scores".into(), scores_digest)]),
        metrics: BTreeMap::from([
            ("params".into(), params),
            ("shape.hidden_size".into(), f64::from(shape.hidden_size)),
            (
                "shape.intermediate_size".into(),
                f64::from(shape.intermediate_size),
            ),
            (
                "shape.num_attention_heads".into(),
                f64::from(shape.num_attention_heads),
            ),
            ("shape.num_layers".into(), f64::from(shape.num_layers)),
            // What it was pruned from (round 0: the teacher), for the report's "what was kept".
            ("source.params".into(), src.params as f64),
            ("source.hidden_size".into(), f64::from(src.hidden_size)),
            (
                "source.intermediate_size".into(),
                f64::from(src.intermediate_size),
            ),
            (
                "source.num_attention_heads".into(),
                f64::from(src.num_attention_heads),
            ),
            ("source.num_layers".into(), f64::from(src.num_layers)),
        ]),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn depth_groups_cover_every_layer_once_contiguously() {
        for (layers, groups) in [(30, 4), (2, 4), (7, 3), (5, 1)] {
            let all: Vec<usize> = (0..groups)
                .flat_map(|g| group_layers(layers, g, groups))
                .collect();
            assert_eq!(all, (0..layers).collect::<Vec<_>>(), "{layers}/{groups}");
        }
        assert_eq!(group_layers(30, 0, 4), (0..8).collect::<Vec<_>>());
    }
}
