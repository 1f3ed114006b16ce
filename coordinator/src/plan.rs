//! The memory plan of a campaign: each round's student shape (from the teacher's shape and the
//! round's target, by the worker's own rule), each rank's bytes (`distillery_proto::memplan`,
//! the one accounting), and what is built on them: `coordinator plan`, the submit-time refusal
//! of a round that fits no registered device, and the plan in `status --json`.

use distillery_proto::memplan::{self, gib, DeviceKind, MemoryPlan, Setup, Suggestion};
use distillery_proto::v1 as pb;
use serde_json::{json, Value};

/// One round's plan, and its fit when a device size is known.
#[derive(Debug, Clone, PartialEq)]
pub struct RoundPlan {
    pub round: usize,
    /// The plan of the `[teacher_correction]` (before round 0), not of a round.
    pub correction: bool,
    pub setup: Setup,
    pub plan: MemoryPlan,
    /// The device the fit was judged against, in bytes.
    pub device_memory: Option<u64>,
    pub fits: Option<bool>,
    /// The cheapest change that makes a round that does not fit fit (None: it fits, or nothing
    /// does).
    pub suggestion: Option<Suggestion>,
}

/// The student shape of every round: the teacher's shape pruned by round 0's target, then each
/// round's from the one before, as the prune phase will choose them
/// (`distillery_worker::prune::plan::choose_shape`, also for a parameter budget; with a
/// candidate search, the largest candidate).
pub fn student_shapes(spec: &pb::CampaignSpec) -> Result<Vec<pb::ModelShape>, String> {
    let teacher = teacher_shape(spec)?;
    let mut src = teacher;
    let mut out = Vec::with_capacity(spec.rounds.len());
    for (i, r) in spec.rounds.iter().enumerate() {
        let t = r
            .target
            .as_ref()
            .ok_or_else(|| format!("rounds[{i}].target is missing"))?;
        let target = distillery_worker::prune::plan::Target {
            hidden_size: t.hidden_size,
            intermediate_size: t.intermediate_size,
            num_attention_heads: t.num_attention_heads,
            num_layers: t.num_layers,
            params: t.params,
            prefer_depth: t.prefer == "depth",
        };
        let s = match (&r.search, t.params) {
            // A search distills every candidate: plan for the largest (the winner, unknown
            // before the run, is at most that; later rounds are planned from it too).
            (Some(search), Some(frac)) => distillery_worker::prune::plan::search_candidates(
                &src,
                frac,
                search.candidates as usize,
            )
            .map_err(|e| format!("rounds[{i}].search.candidates: {e}"))?
            .into_iter()
            .max_by_key(|s| s.params)
            .ok_or_else(|| format!("rounds[{i}].search.candidates: no candidate"))?,
            _ => distillery_worker::prune::plan::choose_shape(&src, &target)
                .map_err(|e| format!("rounds[{i}].target: {e}"))?,
        };
        out.push(s);
        src = s;
    }
    Ok(out)
}

/// The teacher's shape as the spec carries it (read from its config at submit).
fn teacher_shape(spec: &pb::CampaignSpec) -> Result<pb::ModelShape, String> {
    spec.teacher
        .as_ref()
        .and_then(|t| t.shape)
        .filter(|s| s.hidden_size > 0 && s.num_layers > 0)
        .ok_or_else(|| {
            "the spec carries no teacher shape (it is read from the teacher's config.json or GGUF when the spec is parsed with its files)".to_string()
        })
}

/// Every round's per-rank plan on `device`, judged against `device_memory` when given.
pub fn campaign_plan(
    spec: &pb::CampaignSpec,
    device: DeviceKind,
    device_memory: Option<u64>,
) -> Result<Vec<RoundPlan>, String> {
    let teacher = teacher_shape(spec)?;
    let students = student_shapes(spec)?;
    spec.rounds
        .iter()
        .zip(students)
        .enumerate()
        .map(|(i, (r, student))| {
            let d = r
                .distill
                .as_ref()
                .ok_or_else(|| format!("rounds[{i}].distill is missing"))?;
            let setup = Setup::from_distill(teacher, student, d, device)
                .map_err(|e| format!("rounds[{i}].distill.{e}"))?;
            let plan = memplan::plan(&setup);
            let fits = device_memory.map(|m| memplan::fits(&plan, m));
            let suggestion = match (fits, device_memory) {
                (Some(false), Some(m)) => memplan::suggest(&setup, m),
                _ => None,
            };
            Ok(RoundPlan {
                round: i,
                correction: false,
                setup,
                plan,
                device_memory,
                fits,
                suggestion,
            })
        })
        .collect()
}

/// The `[teacher_correction]`'s per-rank plan (the teacher trained with cross-entropy in f32,
/// as [`memplan::correction_distill`] says), when the spec has one. No suggestion: its only
/// knobs are `micro_batch`, `seq_len` and `world_size`.
pub fn correction_plan(
    spec: &pb::CampaignSpec,
    device: DeviceKind,
    device_memory: Option<u64>,
) -> Result<Option<RoundPlan>, String> {
    let Some(tc) = spec.teacher_correction.as_ref() else {
        return Ok(None);
    };
    let teacher = teacher_shape(spec)?;
    let d = memplan::correction_distill(tc);
    let setup = Setup::from_distill(teacher, teacher, &d, device)
        .map_err(|e| format!("teacher_correction.{e}"))?;
    let plan = memplan::plan(&setup);
    Ok(Some(RoundPlan {
        round: 0,
        correction: true,
        setup,
        plan,
        device_memory,
        fits: device_memory.map(|m| memplan::fits(&plan, m)),
        suggestion: None,
    }))
}

/// The lines of the table, in order: (name, bytes, note).
fn lines(p: &RoundPlan) -> Vec<(&'static str, u64, String)> {
    let s = &p.setup;
    let q = &p.plan;
    let shards = if s.shard_optimizer { s.world_size } else { 1 };
    let transient = if q.teacher_forward >= q.backward {
        "teacher forward"
    } else {
        "backward"
    };
    vec![
        (
            "teacher weights",
            q.teacher_weights,
            format!(
                "{} params x {} B ({})",
                distillery_proto::shape::param_count(&s.teacher),
                s.teacher_precision.bytes(),
                s.teacher_precision.name()
            ),
        ),
        (
            "student weights",
            q.student_weights,
            format!(
                "{} params x {} B ({})",
                distillery_proto::shape::param_count(&s.student),
                s.precision.bytes(),
                s.precision.name()
            ),
        ),
        (
            "gradients",
            q.gradients,
            "f32 accumulators, 4 B/param".into(),
        ),
        (
            "master + moments",
            q.optimizer,
            format!("12 B x params / {shards} (f32 master, m, v)"),
        ),
        (
            "activations",
            q.activations,
            format!(
                "{} x {} tokens, {} (without recompute {}, with {})",
                s.micro_batch,
                s.seq_len,
                if s.recompute {
                    "recompute"
                } else {
                    "all layers saved"
                },
                gib(q.activations_full),
                gib(q.activations_recompute)
            ),
        ),
        (
            "loss",
            q.loss,
            "student logits + f32 vocabulary tensors of the KD loss".into(),
        ),
        (
            "transient",
            q.teacher_forward.max(q.backward),
            format!(
                "the larger of teacher forward {} and backward {} ({transient})",
                gib(q.teacher_forward),
                gib(q.backward)
            ),
        ),
        (
            "runtime",
            q.runtime,
            format!("{} process / context overhead", s.device.name()),
        ),
        (
            "hidden states",
            q.hidden,
            format!(
                "{} layer pairs of teacher states + hidden loss, the projection if the widths differ",
                s.kd.hidden_pairs
            ),
        ),
    ]
}

/// `coordinator plan`'s text: per round and rank the table, the total, the fit, the suggestion.
pub fn render_text(plans: &[RoundPlan]) -> String {
    let mut out = String::new();
    for p in plans {
        let s = &p.setup;
        if p.correction {
            out.push_str("teacher correction (the teacher trained with cross-entropy, f32; \"student\" below is the teacher):\n");
        }
        out.push_str(&format!(
            "{}: student {} params (hidden {}, MLP {}, {} heads, {} layers); per rank of {} on {}; precision {}, teacher {}, shard_optimizer {}, recompute {}\n",
            if p.correction { "  before round 0".to_string() } else { format!("round {}", p.round) },
            distillery_proto::shape::param_count(&s.student),
            s.student.hidden_size,
            s.student.intermediate_size,
            s.student.num_attention_heads,
            s.student.num_layers,
            s.world_size,
            s.device.name(),
            s.precision.name(),
            s.teacher_precision.name(),
            s.shard_optimizer,
            s.recompute,
        ));
        for (name, bytes, note) in lines(p) {
            out.push_str(&format!("  {name:<17} {:>11}   {note}\n", gib(bytes)));
        }
        out.push_str(&format!("  {:<17} {:>11}\n", "total", gib(p.plan.total)));
        if let (Some(m), Some(fits)) = (p.device_memory, p.fits) {
            out.push_str(&format!(
                "  fits {}: {} of a {} device usable ({}% margin)\n",
                if fits { "yes" } else { "no" },
                gib(memplan::usable(m)),
                gib(m),
                (memplan::SAFETY_MARGIN * 100.0).round()
            ));
            if !fits {
                match &p.suggestion {
                    Some(sug) => out.push_str(&format!("  suggestion: {sug}\n")),
                    None => out.push_str(&format!(
                        "  suggestion: none: with every change together (bf16, teacher bf16, shard_optimizer over up to {} ranks, recompute, micro_batch 1) a rank still needs {}; use a larger device\n",
                        memplan::MAX_WORLD_SIZE,
                        gib(memplan::floor(&p.setup))
                    )),
                }
            }
        }
    }
    out
}

/// The plans as JSON (`coordinator plan --json`, `status --json`): bytes per line.
pub fn to_json(plans: &[RoundPlan]) -> Value {
    Value::Array(
        plans
            .iter()
            .map(|p| {
                let s = &p.setup;
                let q = &p.plan;
                json!({
                    "round": p.round,
                    "phase": if p.correction { "correct" } else { "distill" },
                    "device": s.device.name(),
                    "world_size": s.world_size,
                    "micro_batch": s.micro_batch,
                    "seq_len": s.seq_len,
                    "precision": s.precision.name(),
                    "teacher_precision": s.teacher_precision.name(),
                    "shard_optimizer": s.shard_optimizer,
                    "recompute": s.recompute,
                    "teacher_params": distillery_proto::shape::param_count(&s.teacher),
                    "student_params": distillery_proto::shape::param_count(&s.student),
                    "bytes": {
                        "teacher_weights": q.teacher_weights,
                        "student_weights": q.student_weights,
                        "gradients": q.gradients,
                        "master_and_moments": q.optimizer,
                        "activations": q.activations,
                        "activations_without_recompute": q.activations_full,
                        "activations_with_recompute": q.activations_recompute,
                        "loss": q.loss,
                        "teacher_forward": q.teacher_forward,
                        "backward": q.backward,
                        "runtime": q.runtime,
                        "hidden": q.hidden,
                        "total": q.total,
                    },
                    "device_memory": p.device_memory,
                    "fits": p.fits,
                    "suggestion": p.suggestion.as_ref().map(|s| json!({
                        "changes": s.changes.iter().map(ToString::to_string).collect::<Vec<_>>(),
                        "total": s.total,
                    })),
                    // The least any change can reach (all of them together).
                    "floor": memplan::floor(s),
                })
            })
            .collect(),
    )
}

/// Submit-time check against the registered devices (`(slot, bytes)`, 0 = unknown): a round
/// whose rank fits none of them is refused, naming the round, its need, the largest device and
/// the suggestion for that device. Accepted when no device with a known size is registered, or
/// any registered device's size is unknown (it may be large enough), or the plan cannot be
/// computed (no teacher shape in the spec).
pub fn check_registered(spec: &pb::CampaignSpec, devices: &[(String, u64)]) -> Result<(), String> {
    if devices.is_empty() || devices.iter().any(|(_, m)| *m == 0) {
        return Ok(());
    }
    // The largest device of each kind present.
    let mut largest: Vec<(DeviceKind, u64)> = Vec::new();
    for (slot, m) in devices {
        let Some(kind) = DeviceKind::of_slot(slot) else {
            return Ok(());
        };
        match largest.iter_mut().find(|(k, _)| *k == kind) {
            Some((_, best)) => *best = (*best).max(*m),
            None => largest.push((kind, *m)),
        }
    }
    let mut per_kind = Vec::new();
    for (kind, m) in &largest {
        match campaign_plan(spec, *kind, Some(*m)) {
            Ok(p) => per_kind.push(p),
            Err(_) => return Ok(()),
        }
    }
    // The teacher correction first: it runs before round 0.
    let mut corrections = Vec::new();
    for (kind, m) in &largest {
        match correction_plan(spec, *kind, Some(*m)) {
            Ok(Some(p)) => corrections.push(p),
            Ok(None) => break,
            Err(_) => return Ok(()),
        }
    }
    if !corrections.is_empty() && !corrections.iter().any(|p| p.fits == Some(true)) {
        if let Some(p) = corrections.iter().max_by_key(|p| p.device_memory) {
            let m = p.device_memory.unwrap_or(0);
            return Err(format!(
                "teacher_correction: a rank trains the whole teacher and needs {} (see `coordinator plan`) but the largest registered device ({}) has {} ({} usable); lower teacher_correction.micro_batch or seq_len, or register a larger device",
                gib(p.plan.total),
                p.setup.device.name(),
                gib(m),
                gib(memplan::usable(m)),
            ));
        }
    }
    for round in 0..spec.rounds.len() {
        let options: Vec<&RoundPlan> = per_kind.iter().filter_map(|p| p.get(round)).collect();
        if options.iter().any(|p| p.fits == Some(true)) {
            continue;
        }
        let Some(p) = options.iter().max_by_key(|p| p.device_memory) else {
            continue;
        };
        let m = p.device_memory.unwrap_or(0);
        let hint = match &p.suggestion {
            Some(s) => format!("; {s}"),
            None => format!(
                "; no change makes it fit (every change together still needs {}): register a larger device",
                gib(memplan::floor(&p.setup))
            ),
        };
        return Err(format!(
            "rounds[{round}]: a rank needs {} (see `coordinator plan`) but the largest registered device ({}) has {} ({} usable){hint}",
            gib(p.plan.total),
            p.setup.device.name(),
            gib(m),
            gib(memplan::usable(m)),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests;
