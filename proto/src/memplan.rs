//! The memory plan of one distillation rank: how many bytes each thing a rank holds takes at its
//! peak, whether that fits a device, and the cheapest change that makes it fit. Pure arithmetic
//! over model shapes and the round's `distill` settings, used by `coordinator plan`, submit-time
//! checks, `worker gpu-check` and `worker/benches/memory.rs` (one source of truth).
//!
//! The table (per rank; `P_t`, `P_s` teacher / student parameters, `b` bytes of a dtype, `S` the
//! world size when the optimizer is sharded, else 1):
//!
//! | line | bytes |
//! |---|---|
//! | teacher weights | `P_t · b(teacher_precision)` |
//! | student weights | `P_s · b(precision)` (the compute copy the forward reads; f32 on the CPU, where bf16 is autocast: f32 weights and activations, bf16 matrix multiplies) |
//! | gradients | `P_s · 4` (f32 accumulators; under sharding they also receive the all-gathered weights) |
//! | master + AdamW moments | `12 · ⌈P_s / S⌉` (f32 master, m, v; the master exists even in f32) |
//! | activations | every layer's saved tensors ([`LAYER`]), or with `recompute` the layers' outputs plus one layer's; in `b(precision)` (f32 on the CPU) |
//! | loss | the student's logits and the f32 vocabulary tensors of the KD loss ([`LOSS`]) |
//! | transient | the larger of the teacher's no-grad forward and the backward's gradient store ([`grad_store_params`], [`BACKWARD_KEPT_LAYER`]) + working set (never alive together) |
//! | runtime | a constant per device kind ([`CPU_RUNTIME_BYTES`], [`CUDA_RUNTIME_BYTES`]) |
//! | hidden | intermediate-state distillation: the projection `d_t × d_s` when the widths differ (weights, f32 gradients, master + moments), the teacher's hidden states of every pair and the hidden loss's tensors ([`HIDDEN_LOSS_F32`]) |
//!
//! Cross-entropy only (`loss = "ce"`) without hidden states loads no teacher: its weights and
//! forward count 0. A divergence other than plain forward KL, or `top_k`, adds
//! [`GENERAL_LOSS_F32`] vocabulary tensors to the composed loss (the fused CPU kernel adds none).
//!
//! The tensor counts are named constants below, one comment per line, so they can be
//! recalibrated against `worker/benches/memory.rs` when the model's kernels change (a fused
//! attention without a `T × T` tensor, a chunked loss).

use std::fmt;

use crate::shape::head_dim;
use crate::v1::{DistillSpec, ModelShape, TeacherCorrectionSpec};

/// A dtype's width as the plan counts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Precision {
    #[default]
    F32,
    Bf16,
}

impl Precision {
    /// `"f32"` (also `""`, the proto default) or `"bf16"`.
    pub fn parse(s: &str) -> Result<Precision, String> {
        match s {
            "f32" | "" => Ok(Precision::F32),
            "bf16" => Ok(Precision::Bf16),
            other => Err(format!(
                "{other:?} is not a precision: use \"f32\" or \"bf16\""
            )),
        }
    }

    pub fn bytes(self) -> u64 {
        match self {
            Precision::F32 => 4,
            Precision::Bf16 => 2,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::Bf16 => "bf16",
        }
    }
}

/// What kind of device a rank runs on (its fixed runtime overhead differs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceKind {
    Cpu,
    Cuda,
}

impl DeviceKind {
    /// The kind of a device slot name: `cpu`, `cpu:N` or `cuda:N`.
    pub fn of_slot(slot: &str) -> Option<DeviceKind> {
        if slot == "cpu" || slot.starts_with("cpu:") {
            Some(DeviceKind::Cpu)
        } else if slot.starts_with("cuda:") {
            Some(DeviceKind::Cuda)
        } else {
            None
        }
    }

    /// `"cpu"` or `"cuda"`; anything else is an error naming it.
    pub fn parse(s: &str) -> Result<DeviceKind, String> {
        match s {
            "cpu" => Ok(DeviceKind::Cpu),
            "cuda" => Ok(DeviceKind::Cuda),
            other => Err(format!("{other:?} is not a device kind: use cpu or cuda")),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            DeviceKind::Cpu => "cpu",
            DeviceKind::Cuda => "cuda",
        }
    }

    /// The fixed overhead of a rank's process on this kind of device.
    pub fn runtime_bytes(self) -> u64 {
        match self {
            DeviceKind::Cpu => CPU_RUNTIME_BYTES,
            DeviceKind::Cuda => CUDA_RUNTIME_BYTES,
        }
    }
}

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

/// A CPU rank's process before it loads a model: the binary, the allocator's arenas, thread
/// stacks (`worker/benches/memory.rs` measures VmHWM 7 MiB in a rank process just before it
/// builds its models; rounded up for the compute pool's threads and the data's token ids).
pub const CPU_RUNTIME_BYTES: u64 = 16 * MIB;

/// Assumption, not measured: a CUDA rank's context, cuBLAS workspaces and NCCL's buffers,
/// about 1 GiB on current drivers.
pub const CUDA_RUNTIME_BYTES: u64 = GIB;

/// The share of a device's memory the plan leaves free (allocator fragmentation, the caching
/// allocator's slack): a rank fits when its total is at most `1 - SAFETY_MARGIN` of the device.
pub const SAFETY_MARGIN: f64 = 0.05;

/// Tensors of one layer, in units of one `[B, T, n]` tensor for each width `n` (and
/// `[B, heads, T, T]` for the attention scores).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LayerTensors {
    /// `[B, T, hidden]`.
    pub hidden: f64,
    /// `[B, T, heads · head_dim]` (queries, keys and values once repeated to every head).
    pub q: f64,
    /// `[B, T, kv_heads · head_dim]`.
    pub kv: f64,
    /// `[B, T, intermediate]`.
    pub inter: f64,
    /// `[B, heads, T, T]`.
    pub scores: f64,
}

/// What a differentiated layer of `worker/src/model/llama.rs` (`layer_forward`, `attention`,
/// composed `rms_norm`, `rope`, `candle_nn::ops::softmax`) keeps alive for the backward pass:
/// every op's output that a later op reads is held by candle's graph until the loss is dropped.
/// Llama / Mistral / Qwen2 without biases; [`layer_tensors`] adds what other shapes add.
pub const LAYER: LayerTensors = LayerTensors {
    // input_layernorm and post_attention_layernorm, 3 each (x², x·rsqrt(mean x² + eps), ·w),
    // + o_proj's output + the residual after attention + down_proj's output + the residual
    // after the MLP (the layer's output, the next layer's input).
    hidden: 2.0 * NORM_HIDDEN + 4.0,
    // q_proj's output (1), RoPE on q (4.5: −x₂ half, cat, ·cos, ·sin, sum), keys transposed
    // contiguous for q·kᵀ (1), values made contiguous (1), probs·v (1), heads merged back by
    // transpose + reshape (a copy, 1). GQA adds the repeated keys and values ([`GQA_Q`]).
    q: 1.0 + ROPE + 1.0 + 1.0 + 1.0 + 1.0,
    // k_proj's and v_proj's outputs (2), RoPE on k (4.5).
    kv: 2.0 + ROPE,
    // gate_proj's output, act(gate), up_proj's output, act(gate)·up (down_proj's input).
    inter: 4.0,
    // q·kᵀ, ·scale, +mask, −max, exp, ÷sum (the composed softmax keeps all three of its own).
    scores: 6.0,
};

/// The composed RMSNorm: `x²`, `x · rsqrt(mean(x²) + eps)`, `· w`.
pub const NORM_HIDDEN: f64 = 3.0;
/// The composed RoPE over `[B, H, T, hd]`: `−x₂` (half width), `cat`, `·cos`, `·sin`, the sum.
pub const ROPE: f64 = 4.5;
/// GQA (`heads > kv_heads`): `repeat_kv` copies keys and values to every head; the values then
/// need no separate contiguous copy, so the net is one more q-sized tensor.
pub const GQA_Q: f64 = 1.0;
/// Biases on q/k/v (Qwen2): one more output per projection.
pub const BIAS_Q: f64 = 1.0;
pub const BIAS_KV: f64 = 2.0;
/// Qwen3 / Gemma 3 q/k norms: a composed RMSNorm over q and over k.
pub const QK_NORM: f64 = NORM_HIDDEN;
/// Gemma 3's norms after attention and after the MLP.
pub const GEMMA_POST_NORMS_HIDDEN: f64 = 2.0 * NORM_HIDDEN;

/// Once per pass, outside the layers: the embedding's output (the first layer's input) and the
/// final norm before the head.
pub const EMBED_AND_FINAL_NORM_HIDDEN: f64 = 1.0 + NORM_HIDDEN;

/// The vocabulary-sized tensors of `worker/src/distill/loss.rs` (`kd_loss`) that the graph
/// holds at the backward, in units of one `[B, T, vocab]` tensor.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LossTensors {
    /// The student's logits, in the compute dtype.
    pub logits: f64,
    /// f32, always.
    pub f32_always: f64,
    /// f32, more when the student computes in bf16 (the logits cast to f32).
    pub f32_if_bf16: f64,
    /// f32, more when the temperature is not 1 (the cross-entropy's own log-softmax).
    pub f32_if_temperature: f64,
}

pub const LOSS: LossTensors = LossTensors {
    // lm_head's output.
    logits: 1.0,
    // s/T (1), log_softmax of it (3: −max, exp, the result), the teacher's log_softmax and its
    // exp (2, held by the graph as operands), log_pt − log_ps (1), pt·(log_pt − log_ps) (1).
    f32_always: 1.0 + 3.0 + 2.0 + 1.0 + 1.0,
    // student.to_dtype(F32).
    f32_if_bf16: 1.0,
    // log_softmax(s) at T = 1 for the cross-entropy (−max, exp, the result).
    f32_if_temperature: 3.0,
};

/// More f32 `[B, T, vocab]` tensors the composed loss holds for reverse / skew KL, JSD or a
/// top-k teacher: both probability tensors, the mask and its complement, the masked
/// probabilities and the terms (the fused CPU kernel holds none of them).
pub const GENERAL_LOSS_F32: f64 = 6.0;

/// f32 `[B, T, d_teacher]` tensors of the hidden loss per pair while the graph holds it: the
/// projected student state, the product (cosine) or difference (mse), its square, the teacher
/// state cast to f32.
pub const HIDDEN_LOSS_F32: f64 = 4.0;

/// The teacher's no-grad forward (fused kernels, each activation freed when consumed) on top of
/// the student's saved activations: its logits plus the larger of one inference layer and the
/// teacher side of the loss.
pub const TEACHER_LAYER: LayerTensors = LayerTensors {
    // The residual stream and a norm's output, and the layer's output being formed.
    hidden: 3.0,
    // q, keys and values repeated to every head, the attention output.
    q: 4.0,
    // k and v before repeating.
    kv: 2.0,
    // gate, up, act(gate)·up.
    inter: 3.0,
    // Two score tensors at a time (q·kᵀ and its scaled / masked / softmaxed successor).
    scores: 2.0,
};
/// f32 `[B, T, vocab]` tensors of the teacher side of the loss while it is computed: t/T, −max,
/// exp (then log_pt and pt, which the graph holds, are counted in [`LOSS`]).
pub const TEACHER_LOSS_F32: f64 = 3.0;
/// More when the teacher is held in bf16: its logits cast to f32.
pub const TEACHER_LOSS_F32_IF_BF16: f64 = 1.0;

/// The backward pass's working set on top of the saved activations, besides candle's gradient
/// store (every parameter's gradient in the compute dtype, `P_s · b(precision)`, until it is
/// added into the f32 accumulators): f32 vocabulary-sized gradients at the loss (the incoming
/// gradient, its product with an operand, the sum it is added into) or one layer's activations
/// worth of gradients inside the layers, whichever is larger.
pub const BACKWARD_VOCAB_F32: f64 = 3.0;

/// Gradients candle's backward also leaves in its gradient store, per differentiated layer
/// (measured with `BENCH_PHASES=1` of `worker/benches/memory.rs`): an untracked operand that is
/// broadcast into a tracked op gets a gradient of the broadcast shape that is never consumed.
pub const BACKWARD_KEPT_LAYER: LayerTensors = LayerTensors {
    hidden: 0.0,
    // RoPE's cos and sin tables broadcast over the queries.
    q: 2.0,
    // ... and over the keys.
    kv: 2.0,
    inter: 0.0,
    // The causal mask broadcast over batch and heads.
    scores: 1.0,
};
/// ... and at the loss, in f32: the gradients of the teacher's log-probabilities and
/// probabilities (operands of the KL, detached).
pub const BACKWARD_KEPT_VOCAB_F32: f64 = 2.0;

/// Parameters whose gradients candle's gradient store holds at once: all of them after one
/// `backward()`; with recompute, where each layer's backward runs on its own, the largest of one
/// layer's parameters and the embedding + head's.
pub fn grad_store_params(s: &ModelShape, recompute: bool) -> u64 {
    let all = crate::shape::param_count(s);
    if !recompute {
        return all;
    }
    let ends = u64::from(s.vocab_size)
        * u64::from(s.hidden_size)
        * if s.tie_word_embeddings { 1 } else { 2 }
        + u64::from(s.hidden_size);
    let layer = (all - ends.min(all)) / u64::from(s.num_layers.max(1));
    layer.max(ends)
}

/// Everything the plan depends on for one round.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Setup {
    pub teacher: ModelShape,
    pub student: ModelShape,
    pub world_size: u32,
    pub micro_batch: u32,
    pub seq_len: u32,
    pub precision: Precision,
    pub teacher_precision: Precision,
    pub shard_optimizer: bool,
    pub recompute: bool,
    /// The KD temperature is 1 (the cross-entropy then reuses the KD log-softmax).
    pub temperature_is_one: bool,
    pub device: DeviceKind,
    /// The loss family's settings.
    pub kd: KdSetup,
}

/// What the distillation loss adds to the plan (the default: forward KL over the whole
/// vocabulary, logits only).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct KdSetup {
    /// Reverse / skew KL, JSD or a top-k teacher (more vocabulary tensors off the CPU).
    pub general_divergence: bool,
    /// Cross-entropy only and no hidden states: no teacher is loaded.
    pub no_teacher: bool,
    /// Hidden-state pairs (0: none).
    pub hidden_pairs: u32,
}

impl KdSetup {
    /// From a round's `distill` settings; `student_layers` resolves `pairs = "auto"`.
    pub fn from_distill(d: &DistillSpec, student_layers: u32) -> KdSetup {
        let hidden_pairs = match &d.hidden {
            None => 0,
            Some(h) if h.auto_pairs => student_layers,
            Some(h) => h.pairs.len() as u32,
        };
        KdSetup {
            general_divergence: !matches!(d.loss.as_str(), "" | "forward_kl" | "ce") || d.top_k > 0,
            no_teacher: d.loss == "ce" && hidden_pairs == 0,
            hidden_pairs,
        }
    }
}

/// The distillation a `[teacher_correction]` is run as: the teacher trained on the data alone
/// (cross-entropy, no KD teacher), f32, with the correction's own batch and schedule. The
/// worker runs exactly this, and the memory plan plans it.
pub fn correction_distill(tc: &TeacherCorrectionSpec) -> DistillSpec {
    DistillSpec {
        tokens: tc.tokens,
        seq_len: tc.seq_len,
        micro_batch: tc.micro_batch,
        world_size: tc.world_size,
        lr: tc.lr,
        warmup_steps: tc.warmup_steps,
        checkpoint_every: tc.checkpoint_every,
        precision: "f32".into(),
        teacher_precision: "f32".into(),
        loss: "ce".into(),
        ..Default::default()
    }
}

impl Setup {
    /// A round's setup from its `distill` settings.
    pub fn from_distill(
        teacher: ModelShape,
        student: ModelShape,
        d: &DistillSpec,
        device: DeviceKind,
    ) -> Result<Setup, String> {
        Ok(Setup {
            teacher,
            student,
            world_size: d.world_size.max(1),
            micro_batch: d.micro_batch.max(1),
            seq_len: d.seq_len.max(1),
            precision: Precision::parse(&d.precision).map_err(|e| format!("precision: {e}"))?,
            teacher_precision: Precision::parse(&d.teacher_precision)
                .map_err(|e| format!("teacher_precision: {e}"))?,
            shard_optimizer: d.shard_optimizer,
            recompute: d.recompute,
            temperature_is_one: d.temperature == 1.0 || d.temperature == 0.0,
            device,
            kd: KdSetup::from_distill(d, student.num_layers),
        })
    }
}

/// Bytes per rank, line by line (see the module's table).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryPlan {
    pub teacher_weights: u64,
    pub student_weights: u64,
    pub gradients: u64,
    /// f32 master weights + AdamW m and v (this rank's shard under `shard_optimizer`).
    pub optimizer: u64,
    /// The activations counted in the total (with or without recompute, as set up).
    pub activations: u64,
    /// The activations without recompute (every layer's saved tensors).
    pub activations_full: u64,
    /// The activations with recompute (layer outputs + one layer's saved tensors).
    pub activations_recompute: u64,
    /// The student's logits and the loss's vocabulary tensors.
    pub loss: u64,
    /// The teacher's no-grad forward on top of the student's activations.
    pub teacher_forward: u64,
    /// The backward's gradient store and working set.
    pub backward: u64,
    pub runtime: u64,
    /// Intermediate-state distillation: the projection's weights, gradients and optimizer
    /// state, the teacher's hidden states and the hidden loss's tensors (0 without it).
    pub hidden: u64,
    /// The peak: every line, with the larger of `teacher_forward` and `backward`.
    pub total: u64,
}

fn width(s: &ModelShape) -> (f64, f64, f64, f64, f64, f64) {
    let hd = f64::from(head_dim(s));
    (
        f64::from(s.hidden_size),
        f64::from(s.num_attention_heads) * hd,
        f64::from(s.num_key_value_heads.max(1)) * hd,
        f64::from(s.intermediate_size),
        f64::from(s.num_attention_heads),
        f64::from(s.vocab_size),
    )
}

/// What a differentiated layer keeps with the CPU's fused kernels (`worker/src/model/ops/fused`,
/// the default on the CPU; measured with `BENCH_PHASES=1` of `worker/benches/memory.rs`: 8,388
/// floats per token per layer for the 70% SmolLM2 student against 8,304 counted here). Each
/// fused op keeps only its output (and a row statistic), attention keeps no `T × T` tensor and
/// reads keys and values unrepeated.
pub const FUSED_LAYER: LayerTensors = LayerTensors {
    // the two norms' outputs, o_proj's output, the residual after attention, down_proj's
    // output, the layer's output (6), and the norms' per-row statistics and the GLU's
    // bookkeeping (0.5, measured).
    hidden: 6.5,
    // q_proj's output, RoPE on q, the attention output.
    q: 3.0,
    // k_proj's and v_proj's outputs, RoPE on k.
    kv: 3.0,
    // gate, up, the GLU's output.
    inter: 3.0,
    // flash-style attention: none.
    scores: 0.0,
};
/// The fused q/k norms: their outputs.
pub const FUSED_QK_NORM: f64 = 1.0;
/// Once per pass with the fused kernels: the embedding's output and the final norm's.
pub const FUSED_EMBED_AND_FINAL_NORM_HIDDEN: f64 = 2.0;

/// The saved tensors of one differentiated layer of `s` on `device` ([`FUSED_LAYER`] on the CPU,
/// [`LAYER`] elsewhere, plus what GQA, biases, q/k norms and Gemma's extra norms add).
pub fn layer_tensors_on(s: &ModelShape, device: DeviceKind) -> LayerTensors {
    if device != DeviceKind::Cpu {
        return layer_tensors(s);
    }
    let mut t = FUSED_LAYER;
    if s.attention_bias {
        t.q += BIAS_Q;
        t.kv += BIAS_KV;
    }
    if s.qk_norm {
        t.q += FUSED_QK_NORM;
        t.kv += FUSED_QK_NORM;
    }
    if s.norms_per_layer >= 4 {
        t.hidden += 2.0;
    }
    t
}

/// The saved tensors of one differentiated layer of `s` with the composed ops (GPUs) ([`LAYER`]
/// plus what GQA, biases, q/k norms and Gemma's extra norms add).
pub fn layer_tensors(s: &ModelShape) -> LayerTensors {
    let mut t = LAYER;
    if s.num_attention_heads > s.num_key_value_heads.max(1) {
        t.q += GQA_Q;
    }
    if s.attention_bias {
        t.q += BIAS_Q;
        t.kv += BIAS_KV;
    }
    if s.qk_norm {
        t.q += QK_NORM;
        t.kv += QK_NORM;
    }
    if s.norms_per_layer >= 4 {
        t.hidden += GEMMA_POST_NORMS_HIDDEN;
    }
    t
}

/// Bytes of `t` for a `[B, T]` micro-batch of model `s` in `bytes`-wide elements.
fn layer_bytes(t: &LayerTensors, s: &ModelShape, b: f64, seq: f64, bytes: f64) -> f64 {
    let (h, q, kv, inter, heads, _) = width(s);
    let tokens = b * seq;
    bytes
        * (tokens * (t.hidden * h + t.q * q + t.kv * kv + t.inter * inter)
            + t.scores * b * heads * seq * seq)
}

fn ceil(x: f64) -> u64 {
    x.ceil() as u64
}

/// The plan of one rank.
pub fn plan(s: &Setup) -> MemoryPlan {
    let p_t = crate::shape::param_count(&s.teacher);
    let p_s = crate::shape::param_count(&s.student);
    let b = s.precision.bytes();
    let bt = s.teacher_precision.bytes();
    let shards = if s.shard_optimizer {
        u64::from(s.world_size.max(1))
    } else {
        1
    };
    let (batch, seq) = (f64::from(s.micro_batch), f64::from(s.seq_len));
    let tokens = batch * seq;
    let bf = b as f64;
    let (h, _, _, _, _, vocab) = width(&s.student);
    let layers = f64::from(s.student.num_layers);

    // The CPU runs the fused kernels (no T × T tensor, a chunked loss, f32 logits from the bf16
    // GEMM); other devices the composed ops.
    let fused = s.device == DeviceKind::Cpu;
    // The student's element width (weights, activations, candle's gradients): the compute
    // dtype's, except on the CPU, where bf16 is autocast (f32 weights, activations and
    // gradients, bf16 matrix multiplies: candle accumulates gradients tensor by tensor, and its
    // bf16 additions are scalar conversions slower than the whole f32 step).
    let sb = if fused { 4 } else { b };
    let act = sb as f64;
    let one_layer = layer_bytes(
        &layer_tensors_on(&s.student, s.device),
        &s.student,
        batch,
        seq,
        act,
    );
    let outside = if fused {
        FUSED_EMBED_AND_FINAL_NORM_HIDDEN
    } else {
        EMBED_AND_FINAL_NORM_HIDDEN
    } * tokens
        * h
        * act;
    let activations_full = ceil(layers * one_layer + outside);
    let activations_recompute = ceil(layers * tokens * h * act + one_layer + outside);
    let activations = if s.recompute {
        activations_recompute
    } else {
        activations_full
    };

    let vocab_tensor = tokens * vocab;
    let mut loss_f32 = LOSS.f32_always;
    if s.precision == Precision::Bf16 {
        loss_f32 += LOSS.f32_if_bf16;
    }
    if !s.temperature_is_one {
        loss_f32 += LOSS.f32_if_temperature;
    }
    // Fused: the loss keeps only the student's logits, f32 (its gradient is formed in the
    // backward).
    if s.kd.general_divergence {
        loss_f32 += GENERAL_LOSS_F32;
    }
    let loss = if fused {
        ceil(vocab_tensor * 4.0)
    } else {
        ceil(vocab_tensor * (LOSS.logits * bf + loss_f32 * 4.0))
    };

    let teacher_layer = layer_bytes(&TEACHER_LAYER, &s.teacher, batch, seq, bt as f64);
    let mut teacher_loss_f32 = TEACHER_LOSS_F32;
    if s.teacher_precision == Precision::Bf16 {
        teacher_loss_f32 += TEACHER_LOSS_F32_IF_BF16;
    }
    let teacher_vocab = tokens * f64::from(s.teacher.vocab_size);
    let teacher_forward = if fused {
        // f32 logits (the bf16 GEMM writes f32), one inference layer; the loss reads them.
        ceil(teacher_vocab * 4.0 + teacher_layer)
    } else {
        ceil(teacher_vocab * bt as f64 + teacher_layer.max(teacher_vocab * teacher_loss_f32 * 4.0))
    };

    let kept_layers = if s.recompute { 1.0 } else { layers };
    // The fused ops take their tables and masks as plain inputs: no stray gradients.
    let kept = if fused {
        0.0
    } else {
        kept_layers * layer_bytes(&BACKWARD_KEPT_LAYER, &s.student, batch, seq, bf)
            + vocab_tensor * BACKWARD_KEPT_VOCAB_F32 * 4.0
    };
    let backward = grad_store_params(&s.student, s.recompute) * sb
        + ceil(kept + one_layer.max(vocab_tensor * BACKWARD_VOCAB_F32 * 4.0));

    let (teacher_weights, teacher_forward) = if s.kd.no_teacher {
        (0, 0)
    } else {
        (p_t * bt, teacher_forward)
    };
    let hidden = if s.kd.hidden_pairs == 0 {
        0
    } else {
        let (dt, ds) = (
            u64::from(s.teacher.hidden_size),
            u64::from(s.student.hidden_size),
        );
        let proj = if dt == ds { 0 } else { dt * ds };
        let states = f64::from(s.kd.hidden_pairs) * tokens * dt as f64;
        proj * sb
            + proj * 4
            + 12 * proj.div_ceil(shards)
            + ceil(states * (bt as f64 + HIDDEN_LOSS_F32 * 4.0))
    };
    let student_weights = p_s * sb;
    let gradients = p_s * 4;
    let optimizer = 12 * p_s.div_ceil(shards);
    let runtime = s.device.runtime_bytes();
    let total = teacher_weights
        + student_weights
        + gradients
        + optimizer
        + activations
        + loss
        + teacher_forward.max(backward)
        + runtime
        + hidden;
    MemoryPlan {
        teacher_weights,
        student_weights,
        gradients,
        optimizer,
        activations,
        activations_full,
        activations_recompute,
        loss,
        teacher_forward,
        backward,
        runtime,
        hidden,
        total,
    }
}

/// The bytes of a device a rank may use: all but [`SAFETY_MARGIN`].
pub fn usable(device_memory: u64) -> u64 {
    (device_memory as f64 * (1.0 - SAFETY_MARGIN)) as u64
}

/// Whether a rank with this plan fits a device of `device_memory` bytes.
pub fn fits(p: &MemoryPlan, device_memory: u64) -> bool {
    p.total <= usable(device_memory)
}

/// One change to a round's `distill` settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    TeacherBf16,
    StudentBf16,
    ShardOptimizer,
    Recompute,
    MicroBatch(u32),
    WorldSize(u32),
}

impl Change {
    fn apply(self, s: &mut Setup) {
        match self {
            Change::TeacherBf16 => s.teacher_precision = Precision::Bf16,
            Change::StudentBf16 => s.precision = Precision::Bf16,
            Change::ShardOptimizer => s.shard_optimizer = true,
            Change::Recompute => s.recompute = true,
            Change::MicroBatch(m) => s.micro_batch = m,
            Change::WorldSize(w) => s.world_size = w,
        }
    }
}

impl fmt::Display for Change {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Change::TeacherBf16 => write!(f, "teacher_precision = \"bf16\""),
            Change::StudentBf16 => write!(f, "precision = \"bf16\""),
            Change::ShardOptimizer => write!(f, "shard_optimizer = true"),
            Change::Recompute => write!(f, "recompute = true"),
            Change::MicroBatch(m) => write!(f, "micro_batch = {m}"),
            Change::WorldSize(w) => write!(f, "world_size = {w}"),
        }
    }
}

/// The changes that make a round fit, and the rank's total with them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Suggestion {
    pub changes: Vec<Change>,
    pub total: u64,
}

impl fmt::Display for Suggestion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self.changes.iter().map(ToString::to_string).collect();
        write!(
            f,
            "set {} (then {} per rank)",
            parts.join(", "),
            gib(self.total)
        )
    }
}

/// The largest world size the search for "more ranks" tries.
pub const MAX_WORLD_SIZE: u32 = 4096;

fn total_with(s: &Setup, changes: &[Change]) -> u64 {
    let mut s = *s;
    for c in changes {
        c.apply(&mut s);
    }
    plan(&s).total
}

/// The candidate single changes, cheapest first, each in its best form: teacher bf16, student
/// bf16, shard_optimizer, recompute, micro_batch halved (as often as needed), more ranks (the
/// smallest world size that fits; more ranks only shrink a rank's share with a sharded
/// optimizer, so they count as a change only when sharding is on).
fn candidates(s: &Setup, budget: u64) -> Vec<Change> {
    let mut out = Vec::new();
    if s.teacher_precision == Precision::F32 {
        out.push(Change::TeacherBf16);
    }
    // On the CPU the student's bf16 is autocast: it saves no memory there.
    if s.precision == Precision::F32 && s.device != DeviceKind::Cpu {
        out.push(Change::StudentBf16);
    }
    if !s.shard_optimizer && s.world_size > 1 {
        out.push(Change::ShardOptimizer);
    }
    if !s.recompute {
        out.push(Change::Recompute);
    }
    if s.micro_batch > 1 {
        let mut m = s.micro_batch / 2;
        while m > 1 && total_with(s, &[Change::MicroBatch(m)]) > budget {
            m /= 2;
        }
        out.push(Change::MicroBatch(m.max(1)));
    }
    if s.shard_optimizer {
        if let Some(w) = smallest_world_size(s, &[], budget) {
            out.push(Change::WorldSize(w));
        }
    }
    out
}

/// The smallest world size above the setup's that fits `budget` with `changes` applied.
fn smallest_world_size(s: &Setup, changes: &[Change], budget: u64) -> Option<u32> {
    let mut base = *s;
    for c in changes {
        c.apply(&mut base);
    }
    if !base.shard_optimizer {
        return None;
    }
    (base.world_size + 1..=MAX_WORLD_SIZE)
        .find(|w| total_with(&base, &[Change::WorldSize(*w)]) <= budget)
}

/// The cheapest change that makes `s` fit a device of `device_memory` bytes: the first single
/// change that fits, in the order teacher bf16, bf16, shard_optimizer, recompute, smaller
/// micro_batch, more ranks; else the changes taken together in that order until it fits (with
/// any that are then unnecessary dropped). `None` when it already fits or nothing makes it fit.
pub fn suggest(s: &Setup, device_memory: u64) -> Option<Suggestion> {
    let budget = usable(device_memory);
    if plan(s).total <= budget {
        return None;
    }
    let single = candidates(s, budget);
    for c in &single {
        let total = total_with(s, &[*c]);
        if total <= budget {
            return Some(Suggestion {
                changes: vec![*c],
                total,
            });
        }
    }
    // Together, in order; sharding makes more ranks useful, so they are tried last of all.
    let mut chosen: Vec<Change> = Vec::new();
    let mut fitting = None;
    for c in single.iter().filter(|c| !matches!(c, Change::WorldSize(_))) {
        chosen.push(*c);
        if total_with(s, &chosen) <= budget {
            fitting = Some(chosen.clone());
            break;
        }
    }
    if fitting.is_none() {
        if let Some(w) = smallest_world_size(s, &chosen, budget) {
            chosen.push(Change::WorldSize(w));
            fitting = Some(chosen.clone());
        }
    }
    let mut changes = fitting?;
    // Drop what is not needed (keeping order), from the cheapest end: the most expensive change
    // that made it fit stays.
    let mut i = 0;
    while i < changes.len() {
        let mut without = changes.clone();
        without.remove(i);
        if !without.is_empty() && total_with(s, &without) <= budget {
            changes = without;
        } else {
            i += 1;
        }
    }
    let total = total_with(s, &changes);
    Some(Suggestion { changes, total })
}

/// The least a rank can need by the changes [`suggest`] tries: all of them at once, the
/// optimizer sharded over [`MAX_WORLD_SIZE`] ranks. What is left is the teacher, the student's
/// compute weights, the full-size gradients, one micro-batch's activations and the runtime.
pub fn floor(s: &Setup) -> u64 {
    total_with(
        s,
        &[
            Change::TeacherBf16,
            Change::StudentBf16,
            Change::ShardOptimizer,
            Change::Recompute,
            Change::MicroBatch(1),
            Change::WorldSize(MAX_WORLD_SIZE),
        ],
    )
}

/// `12.34 GiB`.
pub fn gib(bytes: u64) -> String {
    format!("{:.2} GiB", bytes as f64 / GIB as f64)
}

/// Parses a memory size: a number with an optional unit `B`, `KiB`, `MiB`, `GiB`, `TiB` (powers
/// of 1024; also `K`, `M`, `G`, `T`) or `KB`, `MB`, `GB`, `TB` (powers of 1000), e.g. `80GiB`.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let value: f64 = num.parse().map_err(|_| {
        format!("{text:?} is not a memory size: give a number and a unit, e.g. 80GiB")
    })?;
    let scale: f64 = match unit.trim() {
        "" | "B" => 1.0,
        "K" | "KiB" => 1024.0,
        "M" | "MiB" => 1024f64.powi(2),
        "G" | "GiB" => 1024f64.powi(3),
        "T" | "TiB" => 1024f64.powi(4),
        "KB" | "kB" => 1e3,
        "MB" => 1e6,
        "GB" => 1e9,
        "TB" => 1e12,
        other => {
            return Err(format!(
                "{text:?}: {other:?} is not a unit: use B, KiB, MiB, GiB, TiB, KB, MB, GB or TB"
            ))
        }
    };
    let bytes = value * scale;
    if !(bytes.is_finite() && bytes >= 1.0) {
        return Err(format!("{text:?} must be a positive memory size"));
    }
    Ok(bytes as u64)
}

#[cfg(test)]
mod tests;
