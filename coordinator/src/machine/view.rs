//! The client-facing view of a campaign (`Get`, `List`, `status --json`).

use distillery_proto::v1 as pb;

use super::*;

/// The client-facing view of a campaign.
pub fn campaign_view(state: &State, id: &str) -> Option<pb::Campaign> {
    let c = state.campaigns.get(id)?;
    let mut counts = pb::TaskCounts::default();
    let mut records = Vec::with_capacity(c.tasks.len());
    for t in c.tasks.iter().filter_map(|t| state.tasks.get(t)) {
        records.push(pb::TaskRecord {
            id: t.id.clone(),
            kind: t.kind.clone(),
            state: t.state.as_str().into(),
            round: t.round,
            phase: t.phase.as_str().into(),
            attempts: t.attempts,
            lost: t.lost,
            failed: t.failed,
            revoked: t.revoked,
            error: t.error.clone().unwrap_or_default(),
            world_size: t.world_size,
            checkpoint: t.checkpoint.clone().unwrap_or_default(),
        });
        match t.state {
            TaskState::Pending => counts.pending += 1,
            TaskState::Leased => counts.leased += 1,
            TaskState::Succeeded => counts.succeeded += 1,
            TaskState::Failed => counts.failed += 1,
            TaskState::Cancelled => counts.cancelled += 1,
        }
    }
    let rounds = c
        .rounds
        .iter()
        .map(|r| pb::Round {
            index: r.index,
            state: r.state.as_str().into(),
            phase: r.phase.as_str().into(),
            target: c
                .spec
                .rounds
                .get(r.index as usize)
                .and_then(|s| s.target.clone()),
            artifacts: {
                let mut a = r.artifacts.clone();
                // The teacher the round used, when teacher correction replaced the spec's.
                if let Some(t) = c.teacher_artifacts.get(super::search::CORRECTED_TEACHER) {
                    a.insert(super::search::CORRECTED_TEACHER.to_string(), t.clone());
                }
                a.into_iter().collect()
            },
            metrics: r.metrics.clone().into_iter().collect(),
            extensions: r.extensions,
            candidates: r
                .candidates
                .iter()
                .map(|x| super::search::candidate_view(state, x))
                .collect(),
        })
        .collect();
    Some(pb::Campaign {
        id: c.id.clone(),
        name: c.spec.name.clone(),
        state: c.state.to_pb() as i32,
        error: c.error.clone().unwrap_or_default(),
        rounds,
        spec: Some(c.spec.clone()),
        created_ms: c.created_ms,
        updated_ms: c.updated_ms,
        tasks: Some(counts),
        task_records: records,
        retries: c.retries,
    })
}
