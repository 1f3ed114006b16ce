//! The distillation loop of one rank: every step draws the global batch (the same on every rank),
//! takes its share, runs teacher (no gradient) and student on micro-batches, sums the gradients
//! of `loss / global tokens`, all-reduces them, clips, and steps AdamW. A checkpoint holds
//! everything the next step depends on, so a resumed run is bit-identical on CPU.
//!
//! Everything stays on the training device: the gradients accumulate into one flat f32 device
//! buffer (parameters concatenated in name order, padded to a multiple of the world size); the
//! collective reduces that buffer in place; the f32 master weights and AdamW moments live in one
//! device tensor per rank and are updated there ([`FlatAdamW`]); the student's parameters (f32,
//! or bf16 under `precision = Bf16`) are written from the master weights. The host sees the loss,
//! the KL and the gradient norm. With `shard_optimizer` (ZeRO-1) the buffer is reduce-scattered,
//! each rank updates only its shard of master weights and moments, and the updated master
//! weights are all-gathered into the same buffer, from which the parameters are set. With
//! `recompute` only each layer's input is kept from the forward pass; the backward recomputes
//! one layer at a time.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};

use super::data::{global_batch, update_weights, DataState, Domain};
use super::hidden::{balance_weight, hidden_loss, initial_projection, HiddenDistill, PROJECTION};
use super::loss::{ce_only, logit_loss, Divergence, LogitLoss, LossSums};
use super::optim::{accumulate, lr_at, sum_squares, FlatAdamW, Segment};
use crate::collective::{padded_len, shard_range, Collective, CollectiveError};
use crate::model::io::{save_dir_with, ModelIoError};
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
    /// The divergence, top-k and intermediate-state distillation.
    pub objective: Objective,
}

/// What the step minimizes besides `temperature` and `ce_weight`.
#[derive(Debug, Clone, PartialEq)]
pub struct Objective {
    /// The KD divergence; None: cross-entropy only (the teacher's logits are not used).
    pub divergence: Option<Divergence>,
    /// The teacher's top-k tokens, the rest in one bucket; None: the whole vocabulary.
    pub top_k: Option<usize>,
    /// Intermediate-state distillation.
    pub hidden: Option<HiddenDistill>,
}

impl Default for Objective {
    /// Minitron's: forward KL over the whole vocabulary, logits only.
    fn default() -> Objective {
        Objective {
            divergence: Some(Divergence::ForwardKl),
            top_k: None,
            hidden: None,
        }
    }
}

/// The checkpoint file holding the auxiliary trained tensors (the hidden-state projection) as
/// f32: part of the training state, never of the exported student.
pub const AUX_FILE: &str = "distill_aux.safetensors";

/// The dtype a tensor is computed in: the memory plan's own type (one parser, one set of values).
pub use distillery_proto::memplan::Precision;

/// Whether bf16 on the CPU is autocast (the default). `DISTILLERY_CPU_AUTOCAST=0` (read once)
/// trains an all-bf16 student there instead, as on GPUs — for the benches, which measure what
/// autocast buys; the memory plan counts autocast.
fn cpu_autocast() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("DISTILLERY_CPU_AUTOCAST").map_or(true, |v| v.trim() != "0"))
}

/// The candle dtype of a [`Precision`].
pub trait PrecisionDType {
    fn dtype(self) -> DType;
}

impl PrecisionDType for Precision {
    fn dtype(self) -> DType {
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
    /// Mean divergence (KL(teacher ‖ student) by default) per token at temperature T.
    pub kl: f64,
    /// Mean hidden-state loss per token (before its rescaling), 0 without one.
    pub hidden: f64,
    pub lr: f64,
    pub grad_norm: f64,
    pub tokens: u64,
}

/// Where each parameter sits in the flat vector.
#[derive(Debug, Clone, PartialEq)]
struct FlatLayout {
    names: Vec<String>,
    shapes: Vec<Vec<usize>>,
    offsets: Vec<usize>,
    /// Parameters in all.
    len: usize,
    /// `len` rounded up to a multiple of the world size.
    padded: usize,
}

impl FlatLayout {
    fn of(vars: &[(String, Var)], world: usize) -> FlatLayout {
        let mut offsets = Vec::with_capacity(vars.len());
        let mut len = 0;
        for (_, v) in vars {
            offsets.push(len);
            len += v.elem_count();
        }
        FlatLayout {
            names: vars.iter().map(|(n, _)| n.clone()).collect(),
            shapes: vars.iter().map(|(_, v)| v.dims().to_vec()).collect(),
            offsets,
            len,
            padded: padded_len(len, world),
        }
    }

    fn size(&self, i: usize) -> usize {
        self.shapes[i].iter().product()
    }

    /// Matrices get weight decay, vectors (norms, biases) do not.
    fn segments(&self) -> Vec<Segment> {
        (0..self.names.len())
            .map(|i| Segment {
                start: self.offsets[i],
                len: self.size(i),
                decay: self.shapes[i].len() >= 2,
            })
            .collect()
    }

    /// A digest of names and shapes, so a checkpoint of another model is refused.
    fn digest(&self) -> String {
        use sha2::Digest;
        let mut h = sha2::Sha256::new();
        for (n, s) in self.names.iter().zip(&self.shapes) {
            h.update(n.as_bytes());
            h.update(format!("{s:?};").as_bytes());
        }
        hex::encode(&h.finalize()[..8])
    }
}

/// The auxiliary trained tensors `objective` asks for: the hidden-state projection
/// `[d_teacher, d_student]` when the widths differ (in the compute dtype `dtype`).
fn aux_params(
    student: &Llama,
    teacher: Option<&Llama>,
    objective: &Objective,
    dtype: DType,
) -> Result<Vec<(String, Var)>, TrainError> {
    let (Some(h), Some(t)) = (&objective.hidden, teacher) else {
        return Ok(Vec::new());
    };
    let (ds, dt) = (student.config.hidden_size, t.config.hidden_size);
    let (sl, tl) = (student.num_layers(), t.num_layers());
    if let Some((s, te)) = h.pairs.iter().find(|(s, te)| *s >= sl || *te >= tl) {
        return Err(TrainError::Candle(candle_core::Error::Msg(format!(
            "hidden pair [{s}, {te}]: the student has {sl} layers and the teacher {tl}"
        ))));
    }
    if ds == dt {
        return Ok(Vec::new());
    }
    let channels = h.channels.as_deref().ok_or_else(|| {
        TrainError::Candle(candle_core::Error::Msg(format!(
            "the student is {ds} wide and the teacher {dt}: the hidden-state projection needs the channel map of the prune record"
        )))
    })?;
    if channels.len() != ds {
        return Err(TrainError::Candle(candle_core::Error::Msg(format!(
            "the channel map names {} channels, the student has {ds}",
            channels.len()
        ))));
    }
    let w = initial_projection(dt, channels, dtype, student.device())?;
    Ok(vec![(PROJECTION.to_string(), Var::from_tensor(&w)?)])
}

/// One rank's training state.
pub struct Trainer<'a> {
    /// The model trained, in the compute precision; its parameters are set from the master
    /// weights after every step.
    pub student: Llama,
    /// None: plain language-model training (cross-entropy only), e.g. to make a teacher.
    teacher: Option<&'a Llama>,
    pub cfg: TrainConfig,
    coll: &'a mut dyn Collective,
    domains: Vec<Domain>,
    /// Validation sequences per domain (same order as `domains`), for dynamic batch loading.
    validation: Vec<Vec<Vec<u32>>>,
    layout: FlatLayout,
    /// The flat f32 gradient buffer `[padded]` on the device, kept across steps; under
    /// sharding it also receives the all-gathered master weights.
    grad: Tensor,
    /// Master weights and moments of this rank's shard (all of them without sharding).
    pub opt: FlatAdamW,
    pub data: DataState,
    pub step: u64,
    pub tokens: u64,
    /// The loss of the last step taken (NaN before the first); checkpointed, so a run resumed
    /// from its final checkpoint still knows its final loss.
    pub last_loss: f64,
    /// Trained tensors that are not the student's (the hidden-state projection), after the
    /// student's parameters in the flat vector.
    aux: Vec<(String, Var)>,
}

fn ck_err(path: &Path, m: impl std::fmt::Display) -> TrainError {
    TrainError::Checkpoint {
        path: path.display().to_string(),
        message: m.to_string(),
    }
}

/// The file rank `rank` of `world` writes its optimizer shard to.
pub fn shard_file(rank: usize, world: usize) -> String {
    format!("optimizer-{rank:05}-of-{world:05}.safetensors")
}

/// The `(rank, world)` of an optimizer shard's file name.
fn parse_shard_file(name: &str) -> Option<(usize, usize)> {
    let rest = name
        .strip_prefix("optimizer-")?
        .strip_suffix(".safetensors")?;
    let (r, w) = rest.split_once("-of-")?;
    Some((r.parse().ok()?, w.parse().ok()?))
}

impl<'a> Trainer<'a> {
    /// A fresh run from the student's current weights (its dtype is the master weights'
    /// starting point; the trained copy is in `cfg.precision`) with the domains' initial weights.
    pub fn new(
        student: Llama,
        teacher: Option<&'a Llama>,
        cfg: TrainConfig,
        coll: &'a mut dyn Collective,
        domains: Vec<Domain>,
        weights: &[f64],
        validation: Vec<Vec<Vec<u32>>>,
    ) -> Result<Trainer<'a>, TrainError> {
        let world = coll.world_size();
        let dev = student.device().clone();
        // bf16 on the CPU is autocast (as PyTorch's): the student stays f32 — weights,
        // activations and every gradient candle accumulates — and its matrix multiplies run in
        // bf16 on our kernels. (candle adds gradients tensor by tensor, and its bf16 addition
        // converts element by element out of line: an all-bf16 step was slower than the f32 one.)
        let autocast = cfg.precision == Precision::Bf16 && dev.is_cpu() && cpu_autocast();
        let dtype = if autocast {
            DType::F32
        } else {
            cfg.precision.dtype()
        };
        let aux = aux_params(&student, teacher, &cfg.objective, dtype)?;
        let mut params = student.named_vars();
        params.extend(aux.iter().cloned());
        let layout = FlatLayout::of(&params, world);
        let (lo, len) = if cfg.shard_optimizer {
            let r = shard_range(layout.padded, world, coll.rank());
            (r.start, r.len())
        } else {
            (0, layout.padded)
        };
        // The master shard, copied var by var (no full-size temporary).
        let master = Tensor::zeros(len, DType::F32, &dev)?;
        for (i, (_, v)) in params.iter().enumerate() {
            let (a, n) = (layout.offsets[i], layout.size(i));
            let (s, e) = (a.max(lo), (a + n).min(lo + len));
            if s < e {
                let part = v
                    .as_tensor()
                    .flatten_all()?
                    .narrow(0, s - a, e - s)?
                    .to_dtype(DType::F32)?
                    .contiguous()?;
                master.slice_set(&part, 0, s - lo)?;
            }
        }
        let opt = FlatAdamW::new(&master, lo, layout.segments(), cfg.weight_decay)?;
        drop(master);
        drop(params);
        let mut student = if student.dtype() == dtype {
            student
        } else {
            student.converted(dtype)?
        };
        student.set_autocast(autocast)?;
        let grad = Tensor::zeros(layout.padded, DType::F32, &dev)?;
        let mut t = Trainer {
            grad,
            opt,
            layout,
            data: DataState::new(weights),
            student,
            teacher,
            cfg,
            coll,
            domains,
            validation,
            step: 0,
            tokens: 0,
            last_loss: f64::NAN,
            aux,
        };
        if t.student.dtype() != DType::F32 {
            // The compute copy is the master weights rounded once (not twice via another dtype).
            t.set_params_from_master()?;
        }
        Ok(t)
    }

    /// Every trained tensor in flat-vector order: the student's parameters (by name), then the
    /// auxiliary ones.
    fn params(&self) -> Vec<(String, Var)> {
        let mut v = self.student.named_vars();
        v.extend(self.aux.iter().cloned());
        v
    }

    /// The hidden-state projection, when the run has one.
    fn projection(&self) -> Option<&Tensor> {
        self.aux
            .iter()
            .find(|(n, _)| n == PROJECTION)
            .map(|(_, v)| v.as_tensor())
    }

    /// `logit_total + w·hidden` with Minitron's balance weight `w` when the run distils hidden
    /// states (student states `student`, teacher states `teacher`, pair by pair), and the hidden
    /// loss's value; else the logit loss alone.
    fn add_hidden(
        &self,
        logit_total: &Tensor,
        student: &[Tensor],
        teacher: &[Tensor],
    ) -> candle_core::Result<(Tensor, f64)> {
        let Some(h) = &self.cfg.objective.hidden else {
            return Ok((logit_total.clone(), 0.0));
        };
        let hl = hidden_loss(student, teacher, self.projection(), h.loss)?;
        let w = balance_weight(logit_total, &hl)?;
        let value = hl.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        let total = (logit_total + (w * hl)?.to_dtype(logit_total.dtype())?)?;
        Ok((total, value))
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

    /// Adds the gradients in `g` of the student's parameters `vars` into the flat buffer
    /// (writing where nothing was written this step yet).
    fn add_grads(
        &self,
        vars: &[(String, Var)],
        g: &GradStore,
        written: &mut [bool],
    ) -> Result<(), TrainError> {
        for (i, (_, v)) in vars.iter().enumerate() {
            if let Some(gi) = g.get(v.as_tensor()) {
                accumulate(&self.grad, self.layout.offsets[i], gi, !written[i])?;
                written[i] = true;
            }
        }
        Ok(())
    }

    /// The loss of one micro-batch (and the value of `loss / norm`); the student's gradients of
    /// `loss / norm` are added into the flat buffer.
    fn micro_step(
        &self,
        ids: &Tensor,
        targets: &Tensor,
        norm: f64,
        vars: &[(String, Var)],
        written: &mut [bool],
    ) -> Result<(LossSums, f64, f64), TrainError> {
        let cfg = &self.cfg;
        let obj = &cfg.objective;
        let spec = LogitLoss {
            divergence: obj.divergence,
            temperature: cfg.temperature,
            ce_weight: cfg.ce_weight,
            top_k: obj.top_k,
        };
        let hidden = obj.hidden.as_ref().filter(|_| self.teacher.is_some());
        let (s_layers, t_layers): (Vec<usize>, Vec<usize>) = hidden
            .map(|h| h.pairs.iter().copied().unzip())
            .unwrap_or_default();
        let (teacher_logits, teacher_hidden) = match self.teacher {
            Some(t) if hidden.is_some() => {
                let (l, hs) = t.forward_hidden(ids, false, &t_layers)?;
                (spec.needs_teacher().then_some(l), hs)
            }
            Some(t) if spec.needs_teacher() => (Some(t.forward(ids)?), Vec::new()),
            _ => (None, Vec::new()),
        };
        let loss_of = |logits: &Tensor| -> candle_core::Result<LossSums> {
            match self.teacher {
                Some(_) => logit_loss(logits, teacher_logits.as_ref(), targets, &spec),
                None => ce_only(logits, targets),
            }
        };
        if !cfg.recompute {
            let (logits, student_hidden) = if hidden.is_some() {
                self.student.forward_hidden(ids, true, &s_layers)?
            } else {
                (self.student.forward_train(ids)?, Vec::new())
            };
            let l = loss_of(&logits)?;
            drop(logits);
            let (total, hidden_value) =
                self.add_hidden(&l.total, &student_hidden, &teacher_hidden)?;
            let scaled = (total / norm)?;
            let value = scaled.to_dtype(DType::F64)?.to_scalar::<f64>()?;
            let g = scaled.backward()?;
            self.add_grads(vars, &g, written)?;
            return Ok((l, value, hidden_value));
        }
        // Activation recomputation: a forward that keeps only each layer's input (each layer's
        // graph is dropped as soon as its output is detached), then the head's backward, then
        // each layer recomputed and differentiated from its input, last to first; each piece's
        // gradients go into the flat buffer at once.
        let m = &self.student;
        let t = ids.dim(1)?;
        let pass = m.pass(0, t, true)?;
        let mut inputs = Vec::with_capacity(m.num_layers());
        let mut h = m.embed(ids, true)?.detach();
        for i in 0..m.num_layers() {
            let next = m.layer_forward(i, &h, &pass, None, None)?.detach();
            inputs.push(h);
            h = next;
        }
        let top = Var::from_tensor(&h)?;
        drop(h);
        let l = loss_of(&m.head(top.as_tensor(), true)?)?;
        let scaled = (&l.total / norm)?;
        let mut value = scaled.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        let mut g = scaled.backward()?;
        let missing = |what: String| candle_core::Error::Msg(format!("no gradient reached {what}"));
        let mut upstream = g
            .remove(top.as_tensor())
            .ok_or_else(|| missing("the last layer".into()))?;
        self.add_grads(vars, &g, written)?;
        drop(g);
        // The hidden loss on the kept layer outputs: its gradients with respect to those
        // outputs join the upstream gradient when the backward reaches each layer.
        let layers = m.num_layers();
        let mut hidden_grads: Vec<Option<Tensor>> = vec![None; layers];
        let mut hidden_value = 0.0;
        if hidden.is_some() {
            let outs: Vec<Var> = s_layers
                .iter()
                .map(|&j| {
                    let out = if j + 1 < layers {
                        &inputs[j + 1]
                    } else {
                        top.as_tensor()
                    };
                    Var::from_tensor(out)
                })
                .collect::<candle_core::Result<_>>()?;
            let states: Vec<Tensor> = outs.iter().map(|v| v.as_tensor().clone()).collect();
            let hl = hidden_loss(&states, &teacher_hidden, self.projection(), {
                hidden.map_or(super::hidden::HiddenLoss::Cosine, |h| h.loss)
            })?;
            let w = balance_weight(&l.total, &hl)?;
            hidden_value = hl.to_dtype(DType::F64)?.to_scalar::<f64>()?;
            let term = ((w * hl)? / norm)?;
            value += term.to_dtype(DType::F64)?.to_scalar::<f64>()?;
            let mut g = term.backward()?;
            for (k, &j) in s_layers.iter().enumerate() {
                if let Some(gj) = g.remove(outs[k].as_tensor()) {
                    hidden_grads[j] = Some(match hidden_grads[j].take() {
                        Some(a) => (a + gj)?,
                        None => gj,
                    });
                }
            }
            self.add_grads(vars, &g, written)?;
        }
        while let Some(x) = inputs.pop() {
            let i = inputs.len();
            if let Some(hg) = hidden_grads[i].take() {
                let hg = hg.to_dtype(upstream.dtype())?;
                upstream = (upstream + hg)?;
            }
            let x = Var::from_tensor(&x)?;
            let y = m.layer_forward(i, x.as_tensor(), &pass, None, None)?;
            let mut g = (y * upstream.detach())?.sum_all()?.backward()?;
            upstream = g
                .remove(x.as_tensor())
                .ok_or_else(|| missing(format!("layer {i}")))?;
            self.add_grads(vars, &g, written)?;
        }
        let e = m.embed(ids, true)?;
        let g = (e * upstream.detach())?.sum_all()?.backward()?;
        self.add_grads(vars, &g, written)?;
        Ok((l, value, hidden_value))
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
        let vars = self.params();
        let mut written = vec![false; vars.len()];
        let (mut loss_sum, mut kl_sum, mut hidden_sum) = (0.0, 0.0, 0.0);
        let dev = self.student.device().clone();
        for micro in mine.chunks(cfg.micro_batch.max(1)) {
            let rows: Vec<Vec<u32>> = micro.iter().map(|s| s[..t].to_vec()).collect();
            let tgts: Vec<Vec<u32>> = micro.iter().map(|s| s[1..=t].to_vec()).collect();
            let ids = Tensor::new(rows, &dev)?;
            let targets = Tensor::new(tgts, &dev)?;
            let (l, value, hidden) = self.micro_step(&ids, &targets, norm, &vars, &mut written)?;
            loss_sum += value;
            kl_sum += l.kl / norm;
            hidden_sum += hidden / norm;
        }
        // Parameters no gradient reached (or none: this rank had no sequence) add nothing.
        for (i, (_, v)) in vars.iter().enumerate() {
            if !written[i] {
                let z = Tensor::zeros(v.elem_count(), DType::F32, &dev)?;
                accumulate(&self.grad, self.layout.offsets[i], &z, true)?;
            }
        }
        drop(vars);
        let sharded = cfg.shard_optimizer;
        if sharded {
            self.coll.reduce_scatter_sum(&self.grad)?;
        } else {
            self.coll.all_reduce_sum(&self.grad)?;
        }
        let mine = self.opt.lo..self.opt.lo + self.opt.len;
        let local_sq = sum_squares(&self.grad, mine)?;
        let mut host = [
            loss_sum as f32,
            kl_sum as f32,
            local_sq as f32,
            hidden_sum as f32,
        ];
        if !sharded {
            host[2] = 0.0;
        }
        self.coll.all_reduce_host(&mut host)?;
        let (loss, kl, hidden) = (f64::from(host[0]), f64::from(host[1]), f64::from(host[3]));
        let grad_norm = if sharded {
            f64::from(host[2])
        } else {
            local_sq
        }
        .sqrt();
        let scale = if cfg.max_grad_norm > 0.0 && grad_norm > cfg.max_grad_norm {
            (cfg.max_grad_norm / (grad_norm + 1e-6)) as f32
        } else {
            1.0
        };
        let lr = lr_at(self.step, cfg.lr, cfg.warmup_steps, cfg.total_steps);
        self.opt.update(&self.grad, scale, lr)?;
        self.set_params_from_master()?;
        self.step += 1;
        self.tokens += (cfg.global_batch * t) as u64;
        self.last_loss = loss;
        Ok(StepStats {
            step: self.step,
            loss,
            kl,
            hidden,
            lr,
            grad_norm,
            tokens: self.tokens,
        })
    }

    /// The full f32 master weights `[padded]`: this rank's state without sharding, else the
    /// shards all-gathered into the gradient buffer (every rank must call it).
    fn full_master(&mut self) -> Result<Tensor, TrainError> {
        if !self.cfg.shard_optimizer {
            return Ok(self.opt.master()?);
        }
        self.grad.slice_set(&self.opt.master()?, 0, self.opt.lo)?;
        self.coll.all_gather(&self.grad)?;
        Ok(self.grad.clone())
    }

    /// Writes the student's parameters from the master weights.
    fn set_params_from_master(&mut self) -> Result<(), TrainError> {
        let full = self.full_master()?;
        for (i, (_, v)) in self.params().iter().enumerate() {
            let w = full
                .narrow(0, self.layout.offsets[i], self.layout.size(i))?
                .reshape(v.shape())?
                .to_dtype(v.dtype())?;
            v.set(&w)?;
        }
        Ok(())
    }

    /// The master weights by parameter name (views of one f32 device buffer); every rank must
    /// call it.
    pub fn master_weights(&mut self) -> Result<HashMap<String, Tensor>, TrainError> {
        let full = self.full_master()?;
        let mut out = HashMap::new();
        for (i, name) in self.layout.names.iter().enumerate() {
            let w = full
                .narrow(0, self.layout.offsets[i], self.layout.size(i))?
                .reshape(self.layout.shapes[i].as_slice())?;
            out.insert(name.clone(), w);
        }
        Ok(out)
    }

    /// Writes the student (its f32 master weights) as a Hugging Face directory, as the output
    /// of training; every rank must call it, rank 0 writes.
    pub fn save_student(
        &mut self,
        dir: &Path,
        tokenizer_src: Option<&Path>,
    ) -> Result<(), TrainError> {
        let mut w = self.master_weights()?;
        // The exported student is the student's tensors only: never the projection.
        w.retain(|name, _| !self.aux.iter().any(|(a, _)| a == name));
        if self.coll.rank() == 0 {
            save_dir_with(&self.student.config, &w, dir, tokenizer_src)?;
        }
        Ok(())
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

    /// Writes a checkpoint into `dir`; every rank calls it. Rank 0 writes the student (the f32
    /// master weights, as a Hugging Face directory with tokenizer files from `tokenizer_src`)
    /// and the run state; each rank that holds a distinct optimizer shard writes it
    /// ([`shard_file`]: master weights, m and v of its range). Ranks may write into one shared
    /// folder or each into its own (the task then gathers the files).
    pub fn save_checkpoint(
        &mut self,
        dir: &Path,
        tokenizer_src: Option<&Path>,
    ) -> Result<(), TrainError> {
        let (rank, world) = (self.coll.rank(), self.coll.world_size());
        self.save_student(dir, tokenizer_src)?;
        if !self.aux.is_empty() {
            let mut w = self.master_weights()?;
            w.retain(|name, _| self.aux.iter().any(|(a, _)| a == name));
            if rank == 0 {
                let path = dir.join(AUX_FILE);
                let w: HashMap<String, Tensor> = w
                    .into_iter()
                    .map(|(n, t)| Ok((n, t.to_device(&Device::Cpu)?)))
                    .collect::<candle_core::Result<_>>()?;
                candle_core::safetensors::save(&w, &path).map_err(|e| ck_err(&path, e))?;
            }
        }
        let (r, w) = if self.cfg.shard_optimizer {
            (rank, world)
        } else {
            (0, 1)
        };
        if self.cfg.shard_optimizer || rank == 0 {
            std::fs::create_dir_all(dir).map_err(|e| ck_err(dir, e))?;
            let (lo, n) = (self.opt.lo, self.layout.len);
            // The real parameters of the shard (not the padding).
            let hi = (lo + self.opt.len).min(n).max(lo.min(n));
            let k = hi - lo.min(hi);
            let st = &self.opt.state;
            let len = self.opt.len;
            let part = |base: usize| -> candle_core::Result<Tensor> {
                st.narrow(0, base, k)?.to_device(&Device::Cpu)
            };
            let mut t = HashMap::new();
            t.insert("master".to_string(), part(0)?);
            t.insert("m".to_string(), part(len)?);
            t.insert("v".to_string(), part(2 * len)?);
            t.insert(
                "range".to_string(),
                Tensor::new(&[lo.min(n) as i64, n as i64], &Device::Cpu)?,
            );
            let path = dir.join(shard_file(r, w));
            candle_core::safetensors::save(&t, &path).map_err(|e| ck_err(&path, e))?;
        }
        if rank == 0 {
            let state = serde_json::json!({
                "step": self.step,
                "tokens": self.tokens,
                "adam_step": self.opt.step,
                // JSON has no NaN: absent before the first step.
                "last_loss": self.last_loss.is_finite().then_some(self.last_loss),
                "data": self.data,
                "seed": self.cfg.seed,
                "optimizer_shards": w,
                "layout": self.layout.digest(),
            });
            let p = dir.join("trainer_state.json");
            std::fs::write(&p, serde_json::to_vec_pretty(&state).unwrap_or_default())
                .map_err(|e| ck_err(&p, e))?;
        }
        Ok(())
    }

    /// Restores what [`Trainer::save_checkpoint`] wrote: the parameters, this rank's shard of
    /// master weights and moments (from whichever shard files cover it, so the world size may
    /// differ from the one that wrote them), step and data position. `extra` names further
    /// folders holding shard files (other ranks' uploads). Checkpoints of the format before
    /// shards (`optimizer.safetensors` with `m.NAME` / `v.NAME`) load too.
    pub fn load_checkpoint(&mut self, dir: &Path) -> Result<(), TrainError> {
        self.load_checkpoint_from(dir, &[])
    }

    /// [`Trainer::load_checkpoint`] with shard files also looked for in `extra` folders.
    pub fn load_checkpoint_from(
        &mut self,
        dir: &Path,
        extra: &[PathBuf],
    ) -> Result<(), TrainError> {
        let mut weights =
            candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu)
                .map_err(|e| ck_err(dir, e))?;
        if !self.aux.is_empty() {
            let path = dir.join(AUX_FILE);
            let aux = candle_core::safetensors::load(&path, &Device::Cpu).map_err(|e| {
                ck_err(
                    &path,
                    format!("{e} (the run trains a hidden-state projection; its checkpoint must hold it)"),
                )
            })?;
            weights.extend(aux);
        }
        let p = dir.join("trainer_state.json");
        let state: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&p).map_err(|e| ck_err(&p, e))?)
                .map_err(|e| ck_err(&p, e))?;
        if let Some(d) = state["layout"].as_str() {
            if d != self.layout.digest() {
                return Err(ck_err(
                    &p,
                    "it was written for a model with other parameters than this student",
                ));
            }
        }
        let vars = self.params();
        let mut full_master: Vec<Tensor> = Vec::with_capacity(vars.len());
        for (name, v) in vars.iter() {
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
            full_master.push(w.to_dtype(DType::F32)?.flatten_all()?);
        }
        let (lo, len, n) = (self.opt.lo, self.opt.len, self.layout.len);
        let mut host = vec![0f32; 3 * len];
        let mut folders = vec![dir.to_path_buf()];
        folders.extend(extra.iter().cloned());
        let mut shards: Vec<(usize, usize, PathBuf)> = Vec::new();
        for f in &folders {
            let rd = std::fs::read_dir(f).map_err(|e| ck_err(f, e))?;
            for e in rd.flatten() {
                if let Some((r, w)) = e.file_name().to_str().and_then(parse_shard_file) {
                    if !shards.iter().any(|(r2, w2, _)| (*r2, *w2) == (r, w)) {
                        shards.push((r, w, e.path()));
                    }
                }
            }
        }
        if shards.is_empty() {
            self.load_legacy_moments(dir, &mut host)?;
        } else {
            let w = shards[0].1;
            if shards.iter().any(|(_, w2, _)| *w2 != w) || shards.len() != w {
                let mut have: Vec<String> = shards
                    .iter()
                    .map(|(r, w, _)| format!("{r} of {w}"))
                    .collect();
                have.sort();
                return Err(ck_err(
                    dir,
                    format!(
                        "optimizer shards are incomplete or mixed: found {}",
                        have.join(", ")
                    ),
                ));
            }
            for (_, _, path) in &shards {
                let t = candle_core::safetensors::load(path, &Device::Cpu)
                    .map_err(|e| ck_err(path, e))?;
                let get = |k: &str| {
                    t.get(k)
                        .ok_or_else(|| ck_err(path, format!("no tensor {k:?}")))
                };
                let range: Vec<i64> = get("range")?.to_vec1()?;
                let (s_lo, s_n) = match range.as_slice() {
                    [a, b] if *a >= 0 && *b >= 0 => (*a as usize, *b as usize),
                    _ => return Err(ck_err(path, "a bad range")),
                };
                if s_n != n {
                    return Err(ck_err(
                        path,
                        format!("the shard is of {s_n} parameters, the student has {n}"),
                    ));
                }
                for (j, key) in ["master", "m", "v"].iter().enumerate() {
                    let x: Vec<f32> = get(key)?.to_dtype(DType::F32)?.to_vec1()?;
                    let (a, b) = (s_lo.max(lo), (s_lo + x.len()).min(lo + len));
                    if a < b {
                        host[j * len + (a - lo)..j * len + (b - lo)]
                            .copy_from_slice(&x[a - s_lo..b - s_lo]);
                    }
                }
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
        self.opt.state = Tensor::from_vec(host, 3 * len, self.student.device())?;
        // Checkpoints written before it was recorded have none.
        self.last_loss = state["last_loss"].as_f64().unwrap_or(f64::NAN);
        self.data = serde_json::from_value(state["data"].clone()).map_err(|e| ck_err(&p, e))?;
        if self.data.cursors.len() != self.domains.len() {
            return Err(ck_err(&p, "the checkpoint has another number of domains"));
        }
        drop(full_master);
        Ok(())
    }

    /// Master weights (the saved parameters) and moments from a checkpoint of the format before
    /// shards, into `host` (master, m, v of this rank's range).
    fn load_legacy_moments(&self, dir: &Path, host: &mut [f32]) -> Result<(), TrainError> {
        let path = dir.join("optimizer.safetensors");
        let weights = candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu)
            .map_err(|e| ck_err(dir, e))?;
        let moments =
            candle_core::safetensors::load(&path, &Device::Cpu).map_err(|e| ck_err(&path, e))?;
        let (lo, len) = (self.opt.lo, self.opt.len);
        for (i, name) in self.layout.names.iter().enumerate() {
            let (a, n) = (self.layout.offsets[i], self.layout.size(i));
            let (s, e) = (a.max(lo), (a + n).min(lo + len));
            if s >= e {
                continue;
            }
            let parts = [
                weights.get(name),
                moments.get(&format!("m.{name}")),
                moments.get(&format!("v.{name}")),
            ];
            for (j, t) in parts.into_iter().enumerate() {
                let t = t.ok_or_else(|| ck_err(&path, format!("no state for {name}")))?;
                let x: Vec<f32> = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
                if x.len() != n {
                    return Err(ck_err(&path, format!("{name} has another size")));
                }
                host[j * len + (s - lo)..j * len + (e - lo)].copy_from_slice(&x[s - a..e - a]);
            }
        }
        Ok(())
    }

    /// The summed gradients of the last step on the host (unsharded runs: under sharding the
    /// buffer holds the gathered weights after a step), for tests.
    pub fn last_gradients(&self) -> Result<Vec<f32>, TrainError> {
        Ok(self.grad.narrow(0, 0, self.layout.len)?.to_vec1()?)
    }

    /// Length of the flat parameter vector, padded to a multiple of the world size (the
    /// vector the shards split).
    pub fn num_params_padded(&self) -> usize {
        self.layout.padded
    }

    /// This rank's optimizer state on the host: (updates taken, master weights, m, v of its
    /// shard), for tests and tools.
    pub fn optimizer_state(&self) -> Result<(u64, Vec<f32>), TrainError> {
        Ok((self.opt.step, self.opt.state.to_vec1()?))
    }

    /// Mean per-token KL of the student to the teacher on `sequences` (for reports and tests).
    pub fn eval_kl(&self, sequences: &[Vec<u32>]) -> Result<f64, TrainError> {
        let Some(teacher) = self.teacher else {
            return Ok(0.0);
        };
        let t = self.cfg.seq_len;
        let rows: Vec<&[u32]> = sequences.iter().map(|s| &s[..=t]).collect();
        Ok(crate::model::perplexity::mean_kl_rows(
            &self.student,
            teacher,
            &rows,
            self.cfg.micro_batch,
            self.cfg.temperature,
        )?)
    }
}
