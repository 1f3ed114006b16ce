//! The distillation loop of one rank: every step draws the global batch (the same on every rank),
//! takes its share, runs teacher (no gradient) and student (`forward_train`) on micro-batches,
//! sums the gradients of `loss / global tokens`, all-reduces them, clips, and steps AdamW. A
//! checkpoint holds everything the next step depends on, so a resumed run is bit-identical on CPU.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};

use super::data::{global_batch, update_weights, DataState, Domain};
use super::loss::{ce_only, kd_loss};
use super::optim::{clip_global_norm, lr_at, AdamW};
use crate::collective::{Collective, CollectiveError};
use crate::model::io::{save_dir, ModelIoError};
use crate::model::Llama;

/// Why training stopped.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error("{0}")]
    Candle(#[from] candle_core::Error),
    #[error("{0}")]
    Collective(#[from] CollectiveError),
    #[error("{0}")]
    Io(#[from] ModelIoError),
    #[error("checkpoint {path}: {message}")]
    Checkpoint { path: String, message: String },
}

/// Sheared-LLaMA dynamic batch loading.
#[derive(Debug, Clone, PartialEq)]
pub struct DynamicBatchLoading {
    /// Reference loss per domain (in domain order).
    pub reference: Vec<f64>,
    pub update_every: u64,
}

/// What a run is.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainConfig {
    pub seq_len: usize,
    /// Sequences per forward pass on one rank.
    pub micro_batch: usize,
    /// Sequences per optimizer step over all ranks.
    pub global_batch: usize,
    pub total_steps: u64,
    pub lr: f64,
    pub warmup_steps: u64,
    pub temperature: f64,
    pub ce_weight: f64,
    pub seed: u64,
    pub max_grad_norm: f64,
    pub weight_decay: f64,
    pub dynamic: Option<DynamicBatchLoading>,
    /// Compute precision of the student's forward and backward (master weights and moments are
    /// f32 either way).
    pub precision: Precision,
    /// ZeRO-1: each rank keeps and updates only its shard of the master weights and moments.
    pub shard_optimizer: bool,
    /// Keep only each layer's input and recompute the layer in the backward pass.
    pub recompute: bool,
}

/// The dtype a tensor is computed in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Precision {
    #[default]
    F32,
    Bf16,
}

impl Precision {
    /// `"f32"` or `"bf16"` (the spec's values); anything else is an error naming it.
    pub fn parse(s: &str) -> Result<Precision, String> {
        match s {
            "f32" | "" => Ok(Precision::F32),
            "bf16" => Ok(Precision::Bf16),
            other => Err(format!("{other:?} is not a precision: use \"f32\" or \"bf16\"")),
        }
    }

    pub fn dtype(self) -> DType {
        match self {
            Precision::F32 => DType::F32,
            Precision::Bf16 => DType::BF16,
        }
    }
}

/// What one step did (the same on every rank).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepStats {
    pub step: u64,
    /// Mean over the global batch's tokens of T²·KL + ce_weight·CE.
    pub loss: f64,
    /// Mean KL(teacher ‖ student) per token at temperature T.
    pub kl: f64,
    pub lr: f64,
    pub grad_norm: f64,
    pub tokens: u64,
}

/// One rank's training state.
pub struct Trainer<'a> {
    pub student: Llama,
    /// None: plain language-model training (cross-entropy only), e.g. to make a teacher.
    teacher: Option<&'a Llama>,
    pub cfg: TrainConfig,
    coll: &'a mut dyn Collective,
    domains: Vec<Domain>,
    /// Validation sequences per domain (same order as `domains`), for dynamic batch loading.
    validation: Vec<Vec<Vec<u32>>>,
    names: Vec<String>,
    decay: Vec<bool>,
    pub opt: AdamW,
    /// f32 copies of the parameters (the values the vars hold), updated in place each step.
    params: Vec<Vec<f32>>,
    /// Gradient accumulators, and the flat all-reduce buffer: kept across steps, so a step does
    /// not map (and the kernel zero) hundreds of MB of fresh pages.
    grads: Vec<Vec<f32>>,
    flat: Vec<f32>,
    pub data: DataState,
    pub step: u64,
    pub tokens: u64,
    /// The loss of the last step taken (NaN before the first); checkpointed, so a run resumed
    /// from its final checkpoint still knows its final loss.
    pub last_loss: f64,
}

fn ck_err(path: &Path, m: impl std::fmt::Display) -> TrainError {
    TrainError::Checkpoint {
        path: path.display().to_string(),
        message: m.to_string(),
    }
}

impl<'a> Trainer<'a> {
    /// A fresh run from the student's current weights with the domains' initial weights.
    pub fn new(
        student: Llama,
        teacher: Option<&'a Llama>,
        cfg: TrainConfig,
        coll: &'a mut dyn Collective,
        domains: Vec<Domain>,
        weights: &[f64],
        validation: Vec<Vec<Vec<u32>>>,
    ) -> Trainer<'a> {
        let vars = student.named_vars();
        let names: Vec<String> = vars.iter().map(|(n, _)| n.clone()).collect();
        let sizes: Vec<usize> = vars.iter().map(|(_, v)| v.elem_count()).collect();
        let decay = vars.iter().map(|(_, v)| v.rank() >= 2).collect();
        let grads: Vec<Vec<f32>> = sizes.iter().map(|n| vec![0.0; *n]).collect();
        Trainer {
            params: Vec::new(),
            grads,
            flat: Vec::new(),
            opt: AdamW::new(&sizes, cfg.weight_decay),
            data: DataState::new(weights),
            student,
            teacher,
            cfg,
            coll,
            domains,
            validation,
            names,
            decay,
            step: 0,
            tokens: 0,
            last_loss: f64::NAN,
        }
    }

    /// Re-reads the f32 parameter copies from the student's vars.
    fn sync_params(&mut self) -> Result<(), TrainError> {
        self.params = self
            .student
            .named_vars()
            .iter()
            .map(|(_, v)| v.as_tensor().to_dtype(DType::F32)?.flatten_all()?.to_vec1())
            .collect::<candle_core::Result<_>>()?;
        Ok(())
    }

    /// Sequences this rank processes per step.
    fn my_share(&self, batch: Vec<(usize, Vec<u32>)>) -> Vec<Vec<u32>> {
        let (r, n) = (self.coll.rank(), self.coll.world_size());
        batch
            .into_iter()
            .enumerate()
            .filter(|(j, _)| j % n == r)
            .map(|(_, (_, s))| s)
            .collect()
    }

    /// One optimizer step.
    pub fn train_step(&mut self) -> Result<StepStats, TrainError> {
        let cfg = self.cfg.clone();
        if let Some(dbl) = &cfg.dynamic {
            if self.step > 0 && self.step.is_multiple_of(dbl.update_every.max(1)) {
                self.update_domain_weights(&dbl.reference)?;
            }
        }
        let batch = global_batch(
            &self.domains,
            &mut self.data,
            cfg.seed,
            self.step,
            cfg.global_batch,
        );
        let mine = self.my_share(batch);
        let t = cfg.seq_len;
        let norm = (cfg.global_batch * t) as f64;
        let vars = self.student.named_vars();
        if self.params.len() != vars.len() {
            self.sync_params()?;
        }
        let mut grads = std::mem::take(&mut self.grads);
        if grads.len() != vars.len() {
            // A previous step failed half-way: start the buffers again.
            grads = vars
                .iter()
                .map(|(_, v)| vec![0.0; v.elem_count()])
                .collect();
        }
        grads.iter_mut().for_each(|g| g.fill(0.0));
        let (mut loss_sum, mut kl_sum) = (0.0, 0.0);
        let dev = self.student.device().clone();
        for micro in mine.chunks(cfg.micro_batch.max(1)) {
            let rows: Vec<Vec<u32>> = micro.iter().map(|s| s[..t].to_vec()).collect();
            let tgts: Vec<Vec<u32>> = micro.iter().map(|s| s[1..=t].to_vec()).collect();
            let ids = Tensor::new(rows, &dev)?;
            let targets = Tensor::new(tgts, &dev)?;
            let student_logits = self.student.forward_train(&ids)?;
            let l = match self.teacher {
                Some(teacher) => kd_loss(
                    &student_logits,
                    &teacher.forward(&ids)?,
                    &targets,
                    cfg.temperature,
                    cfg.ce_weight,
                )?,
                None => ce_only(&student_logits, &targets)?,
            };
            let scaled = (&l.total / norm)?;
            loss_sum += scaled.to_dtype(DType::F64)?.to_scalar::<f64>()?;
            kl_sum += l.kl / norm;
            let g = scaled.backward()?;
            for (i, (_, v)) in vars.iter().enumerate() {
                if let Some(gi) = g.get(v.as_tensor()) {
                    let gv: Vec<f32> = gi.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
                    for (a, b) in grads[i].iter_mut().zip(&gv) {
                        *a += b;
                    }
                }
            }
        }
        // One all-reduce for every gradient and the two loss sums.
        let mut flat = std::mem::take(&mut self.flat);
        flat.clear();
        for g in &grads {
            flat.extend_from_slice(g);
        }
        flat.push(loss_sum as f32);
        flat.push(kl_sum as f32);
        self.coll.all_reduce_sum(&mut flat)?;
        let kl = f64::from(flat.pop().unwrap_or(0.0));
        let loss = f64::from(flat.pop().unwrap_or(0.0));
        let mut off = 0;
        for g in grads.iter_mut() {
            let n = g.len();
            g.copy_from_slice(&flat[off..off + n]);
            off += n;
        }
        self.flat = flat;
        let grad_norm = clip_global_norm(&mut grads, cfg.max_grad_norm);
        let lr = lr_at(self.step, cfg.lr, cfg.warmup_steps, cfg.total_steps);
        self.opt.update(&mut self.params, &grads, &self.decay, lr);
        self.grads = grads;
        for ((_, v), p) in vars.iter().zip(&self.params) {
            let t = Tensor::from_slice(p, v.shape().clone(), &Device::Cpu)?
                .to_dtype(v.dtype())?
                .to_device(&dev)?;
            v.set(&t)?;
        }
        self.step += 1;
        self.tokens += (cfg.global_batch * t) as u64;
        self.last_loss = loss;
        Ok(StepStats {
            step: self.step,
            loss,
            kl,
            lr,
            grad_norm,
            tokens: self.tokens,
        })
    }

    /// Mean next-token loss of the student on each domain's validation sequences.
    pub fn validation_losses(&self) -> Result<Vec<f64>, TrainError> {
        let t = self.cfg.seq_len;
        let mut out = Vec::new();
        for seqs in &self.validation {
            let rows: Vec<Vec<u32>> = seqs.iter().map(|s| s[..t].to_vec()).collect();
            let n = crate::model::perplexity::mean_nll(
                &self.student,
                &rows,
                self.cfg.micro_batch,
                &[],
            )?;
            out.push(n);
        }
        Ok(out)
    }

    /// Rank 0 measures the validation losses and moves the weights; every rank gets them.
    fn update_domain_weights(&mut self, reference: &[f64]) -> Result<(), TrainError> {
        let mut bytes = Vec::new();
        if self.coll.rank() == 0 {
            let losses = self.validation_losses()?;
            let w = update_weights(&self.data.weights, &losses, reference, 1e-4);
            for x in w {
                bytes.extend_from_slice(&x.to_le_bytes());
            }
        }
        self.coll.broadcast(&mut bytes, 0)?;
        let w: Vec<f64> = bytes
            .chunks_exact(8)
            .map(|b| f64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]))
            .collect();
        if w.len() == self.data.weights.len() {
            self.data.weights = w;
        }
        Ok(())
    }

    /// Writes a checkpoint: the student as a Hugging Face directory (tokenizer files from
    /// `tokenizer_src`), the optimizer moments and the run state.
    pub fn save_checkpoint(
        &self,
        dir: &Path,
        tokenizer_src: Option<&Path>,
    ) -> Result<(), TrainError> {
        save_dir(&self.student, dir, tokenizer_src)?;
        let mut t = HashMap::new();
        for (i, name) in self.names.iter().enumerate() {
            let n = self.opt.m[i].len();
            t.insert(
                format!("m.{name}"),
                Tensor::from_slice(&self.opt.m[i], n, &Device::Cpu)?,
            );
            t.insert(
                format!("v.{name}"),
                Tensor::from_slice(&self.opt.v[i], n, &Device::Cpu)?,
            );
        }
        candle_core::safetensors::save(&t, dir.join("optimizer.safetensors"))?;
        let state = serde_json::json!({
            "step": self.step,
            "tokens": self.tokens,
            "adam_step": self.opt.step,
            // JSON has no NaN: absent before the first step.
            "last_loss": self.last_loss.is_finite().then_some(self.last_loss),
            "data": self.data,
            "seed": self.cfg.seed,
        });
        let p = dir.join("trainer_state.json");
        std::fs::write(&p, serde_json::to_vec_pretty(&state).unwrap_or_default())
            .map_err(|e| ck_err(&p, e))?;
        Ok(())
    }

    /// Restores what [`Trainer::save_checkpoint`] wrote (weights, moments, step, data position).
    pub fn load_checkpoint(&mut self, dir: &Path) -> Result<(), TrainError> {
        let weights = candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu)
            .map_err(|e| ck_err(dir, e))?;
        let moments =
            candle_core::safetensors::load(dir.join("optimizer.safetensors"), &Device::Cpu)
                .map_err(|e| ck_err(dir, e))?;
        let p = dir.join("trainer_state.json");
        let state: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&p).map_err(|e| ck_err(&p, e))?)
                .map_err(|e| ck_err(&p, e))?;
        let vars = self.student.named_vars();
        for (i, (name, v)) in vars.iter().enumerate() {
            let w = weights
                .get(name)
                .ok_or_else(|| ck_err(dir, format!("no weight {name}")))?;
            if w.shape() != v.shape() {
                return Err(ck_err(
                    dir,
                    format!(
                        "{name} has shape {:?}, the student {:?}",
                        w.shape(),
                        v.shape()
                    ),
                ));
            }
            v.set(&w.to_dtype(v.dtype())?.to_device(v.device())?)?;
            for (k, slot) in [("m", &mut self.opt.m[i]), ("v", &mut self.opt.v[i])] {
                let t = moments
                    .get(&format!("{k}.{name}"))
                    .ok_or_else(|| ck_err(dir, format!("no moment {k}.{name}")))?;
                *slot = t.to_dtype(DType::F32)?.to_vec1()?;
            }
        }
        let num = |k: &str| {
            state[k]
                .as_u64()
                .ok_or_else(|| ck_err(&p, format!("no {k}")))
        };
        self.step = num("step")?;
        self.tokens = num("tokens")?;
        self.opt.step = num("adam_step")?;
        // Checkpoints written before it was recorded have none.
        self.last_loss = state["last_loss"].as_f64().unwrap_or(f64::NAN);
        self.data = serde_json::from_value(state["data"].clone()).map_err(|e| ck_err(&p, e))?;
        self.sync_params()?;
        if self.data.cursors.len() != self.domains.len() {
            return Err(ck_err(&p, "the checkpoint has another number of domains"));
        }
        Ok(())
    }

    /// Mean per-token KL of the student to the teacher on `sequences` (for reports and tests).
    pub fn eval_kl(&self, sequences: &[Vec<u32>]) -> Result<f64, TrainError> {
        let t = self.cfg.seq_len;
        let (mut kl, mut n) = (0.0, 0usize);
        for micro in sequences.chunks(self.cfg.micro_batch.max(1)) {
            let rows: Vec<Vec<u32>> = micro.iter().map(|s| s[..t].to_vec()).collect();
            let tgts: Vec<Vec<u32>> = micro.iter().map(|s| s[1..=t].to_vec()).collect();
            let ids = Tensor::new(rows, self.student.device())?;
            let targets = Tensor::new(tgts, self.student.device())?;
            let Some(teacher) = self.teacher else {
                return Ok(0.0);
            };
            let l = kd_loss(
                &self.student.forward(&ids)?,
                &teacher.forward(&ids)?,
                &targets,
                self.cfg.temperature,
                0.0,
            )?;
            kl += l.kl;
            n += l.positions;
        }
        Ok(kl / n.max(1) as f64)
    }
}
