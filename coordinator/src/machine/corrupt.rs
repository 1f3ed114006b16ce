//! An artifact the coordinator found corrupt on its own disk (its bytes no longer hash to its
//! name). It is never served again; what depended on it is dealt with here: a checkpoint is
//! dropped, so the task's next attempt recomputes from the start; a campaign that still needs a
//! finished task's output fails with an error that names the artifact and its producer.

use std::collections::BTreeSet;

use super::*;

impl Tx<'_> {
    /// `refs`: the corrupt blob and every directory manifest that lists it (as `sha256:HEX`).
    pub(super) fn artifact_corrupt(&mut self, refs: &[String], now: Millis) {
        // The shell names the corrupt blob first, then the directories that list it.
        let blob = refs
            .first()
            .map(|r| super::leases::normalize_ref(r))
            .unwrap_or_default();
        let refs: BTreeSet<String> = refs
            .iter()
            .map(|r| super::leases::normalize_ref(r))
            .collect();
        let hit = |r: &str| refs.contains(&super::leases::normalize_ref(r));
        let open: Vec<String> = self
            .s
            .campaigns
            .values()
            .filter(|c| !c.state.is_terminal())
            .map(|c| c.id.clone())
            .collect();
        for id in open {
            let Some(c) = self.s.campaigns.get(&id) else {
                continue;
            };
            // What a round or the campaign holds (merged outputs, the source of a round).
            let mut needed: Option<(String, String)> = c
                .rounds
                .iter()
                .flat_map(|r| {
                    r.artifacts
                        .iter()
                        .map(move |(k, v)| (format!("rounds[{}].artifacts.{k}", r.index), v))
                        .chain(std::iter::once((
                            format!("rounds[{}].source", r.index),
                            &r.source,
                        )))
                })
                .chain(
                    c.teacher_artifacts
                        .iter()
                        .map(|(k, v)| (format!("teacher artifact {k}"), v)),
                )
                .find(|(_, v)| hit(v))
                .map(|(what, v)| (what, v.clone()));
            let task_ids = c.tasks.clone();
            for tid in task_ids {
                let Some(task) = self.s.tasks.get_mut(&tid) else {
                    continue;
                };
                if let Some((k, v)) = task.outputs.iter().find(|(_, v)| hit(v)) {
                    needed.get_or_insert((format!("output {k:?} of task {tid}"), v.clone()));
                }
                if let Some((k, v)) = task.inputs.iter().find(|(_, v)| hit(v)) {
                    if !task.state.is_terminal() {
                        needed.get_or_insert((format!("input {k:?} of task {tid}"), v.clone()));
                    }
                }
                // A checkpoint is only a shortcut: recompute from the start instead.
                if !task.state.is_terminal() && task.checkpoint.as_deref().is_some_and(hit) {
                    let cp = task.checkpoint.take().unwrap_or_default();
                    task.error = Some(format!(
                        "checkpoint {cp} is corrupt on the coordinator (its bytes no longer match its digest); the next attempt starts from the beginning"
                    ));
                    self.t.dirty.tasks.insert(tid.clone());
                }
            }
            if let Some((what, artifact)) = needed {
                let how = if super::leases::normalize_ref(&artifact) == blob {
                    "its bytes no longer match its digest".to_string()
                } else {
                    format!("its file {blob} no longer matches its digest")
                };
                self.finish_campaign(
                    &id,
                    CampaignState::Failed,
                    Some(format!(
                        "artifact {artifact} ({what}) is corrupt on the coordinator: {how}, so it is never served (moved to DATA_DIR/artifacts/corrupt/); a finished phase's output is not recomputed: check the coordinator's disk and submit the campaign again"
                    )),
                    now,
                );
            }
        }
    }
}
