//! Task kinds this worker build can run, each a thin driver over the ML modules. The
//! [`KindRegistry`] dispatches an assignment to the runner registered for its kind; a worker only
//! advertises (and so only receives) the kinds registered here.

pub mod common;
pub mod distill;
pub mod eval;
pub mod prune;

use std::collections::BTreeMap;
use std::sync::Arc;

use distillery_proto::v1 as pb;

use crate::runner::{TaskContext, TaskError, TaskOutput, TaskRunner};

/// Runners by task kind.
#[derive(Default, Clone)]
pub struct KindRegistry {
    runners: BTreeMap<String, Arc<dyn TaskRunner>>,
}

impl KindRegistry {
    /// Registers `runner` for every kind it names.
    pub fn with(mut self, runner: Arc<dyn TaskRunner>) -> KindRegistry {
        for k in runner.kinds() {
            self.runners.insert(k, runner.clone());
        }
        self
    }
}

impl TaskRunner for KindRegistry {
    fn kinds(&self) -> Vec<String> {
        self.runners.keys().cloned().collect()
    }

    fn run(&self, task: &pb::TaskAssignment, ctx: &TaskContext) -> Result<TaskOutput, TaskError> {
        match self.runners.get(&task.kind) {
            Some(r) => r.run(task, ctx),
            None => Err(TaskError::fatal(format!(
                "this worker build cannot run {:?} tasks",
                task.kind
            ))),
        }
    }
}

/// The runners built into this worker: every task kind a campaign needs.
pub fn builtin() -> KindRegistry {
    KindRegistry::default()
        .with(Arc::new(prune::PruneTasks))
        .with(Arc::new(distill::DistillTask))
        .with(Arc::new(eval::EvalTasks))
}
