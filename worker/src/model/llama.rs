//! A trainable decoder in candle for the Llama family (Llama 2/3, Mistral, Qwen2), Qwen3 and
//! Gemma 3 (text): logits for every position, causal attention with GQA, RoPE (per layer type),
//! sliding windows, optional q/k norms, SwiGLU or GeGLU MLP, RMSNorm (Gemma's (1 + w) form, and
//! its norms after attention and MLP), tied or untied embeddings. Every op in the
//! differentiable pass has a backward: on the CPU our fused kernels (`ops::fused`: RMSNorm, RoPE,
//! SwiGLU/GeGLU, flash-style attention, each a custom op with its own backward, switchable by
//! `DISTILLERY_FUSED`), elsewhere ops candle differentiates (DESIGN.md §6: candle's own fused
//! `rms_norm`, `softmax_last_dim`, `rope` record no backward op, so they are never used there).
//! The parameters are `Var`s named exactly as in Hugging Face checkpoints.

use candle_core::{DType, Device, Result, Tensor, Var, D};
use candle_nn::{Init, VarBuilder, VarMap};

use super::config::{LayerType, LlamaConfig};
use super::ops::fused;

/// A linear layer over `[.., in]` with weight `[out, in]` (Hugging Face layout). In bf16 on the
/// CPU its product runs on our kernels ([`super::ops::gemm::linear`]), and so it does under
/// autocast ([`super::ops::gemm::linear_bf16`]).
#[derive(Clone, Debug)]
pub(crate) struct Linear {
    w: Tensor,
    b: Option<Tensor>,
    /// Autocast: the product in bf16 over operands of another dtype (see [`Llama::set_autocast`]).
    bf16: bool,
}

impl Linear {
    fn new(vb: &VarBuilder, in_dim: usize, out_dim: usize, bias: bool, std: f64) -> Result<Linear> {
        let w = vb.get_with_hints(
            (out_dim, in_dim),
            "weight",
            Init::Randn {
                mean: 0.0,
                stdev: std,
            },
        )?;
        let b = if bias {
            Some(vb.get_with_hints(out_dim, "bias", Init::Const(0.0))?)
        } else {
            None
        };
        Ok(Linear { w, b, bf16: false })
    }

    /// A layer over given tensors (weight `[out, in]`, bias `[out]`).
    #[cfg(test)]
    pub(crate) fn from_weight(w: Tensor, b: Option<Tensor>) -> Linear {
        Linear { w, b, bf16: false }
    }

    /// `x · Wᵀ (+ b)`; with `grad`, differentiable with respect to the weights.
    pub(crate) fn forward(&self, x: &Tensor, grad: bool) -> Result<Tensor> {
        let w = param(&self.w, grad);
        let y = if self.bf16 {
            super::ops::gemm::linear_bf16(x, &w)?
        } else {
            super::ops::gemm::linear(x, &w)?
        };
        match &self.b {
            Some(b) => y.broadcast_add(&param(b, grad)),
            None => Ok(y),
        }
    }
}

#[derive(Clone, Debug)]
struct Layer {
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    gate: Linear,
    up: Linear,
    down: Linear,
    /// The norm before attention (`input_layernorm`).
    attn_norm: Tensor,
    /// The norm before the MLP (`post_attention_layernorm`; Gemma: `pre_feedforward_layernorm`).
    mlp_norm: Tensor,
    /// Gemma: the norms of the attention output and the MLP output, before each residual add
    /// (`post_attention_layernorm`, `post_feedforward_layernorm`).
    post_norms: Option<(Tensor, Tensor)>,
    /// Qwen3 / Gemma 3: RMSNorms over `head_dim` of queries and keys (`self_attn.q_norm`, `k_norm`).
    qk_norms: Option<(Tensor, Tensor)>,
    /// Attention window (`None`: every previous position).
    window: Option<usize>,
    /// Which RoPE table the layer uses (0: full attention; 1: the sliding layers' own).
    rope: usize,
}

/// Activations of one layer, recorded when a [`Probe`] is passed (tensors share storage with
/// the forward pass: recording copies nothing).
#[derive(Clone, Debug)]
pub struct LayerActivations {
    pub layer: usize,
    /// Hidden state entering the layer `[B, T, hidden]`.
    pub input: Tensor,
    /// Output of the norm before attention (`input_layernorm`) `[B, T, hidden]`.
    pub attn_norm: Tensor,
    /// Input of `o_proj` `[B, T, heads * head_dim]`.
    pub o_proj_input: Tensor,
    /// Output of the norm before the MLP `[B, T, hidden]`.
    pub mlp_norm: Tensor,
    /// Gemma: outputs of the norms after attention and after the MLP `[B, T, hidden]` each
    /// (empty for other architectures).
    pub post_norms: Vec<Tensor>,
    /// Input of `down_proj`, `act(gate) * up` `[B, T, intermediate]`.
    pub down_proj_input: Tensor,
    /// Hidden state leaving the layer `[B, T, hidden]`.
    pub output: Tensor,
}

/// Collects [`LayerActivations`] during a forward pass.
#[derive(Default, Debug)]
pub struct Probe {
    pub layers: Vec<LayerActivations>,
}

/// Options of a forward pass.
#[derive(Default)]
pub struct ForwardOptions<'a> {
    /// Record the graph so the logits can be differentiated with respect to the parameters.
    /// Off (the default), the pass reads detached weights and uses candle's fused kernels
    /// (which record no backward op), and frees each activation as soon as it is consumed.
    pub grad: bool,
    /// Layers to skip (their input passes through unchanged).
    pub skip_layers: &'a [usize],
    /// Where to record activations, if anywhere.
    pub probe: Option<&'a mut Probe>,
    /// Stop after the last layer and return its hidden state `[B, T, hidden]` instead of the
    /// logits (scoring needs only the layers' activations).
    pub hidden_only: bool,
}

/// Keys and values of the positions seen so far, per layer (`[B, KV, len, head_dim]`).
#[derive(Default, Debug, Clone)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
    len: usize,
}

impl KvCache {
    /// Positions held.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// The model. Its parameters live in `varmap` under Hugging Face names.
pub struct Llama {
    pub config: LlamaConfig,
    pub varmap: VarMap,
    embed: Tensor,
    layers: Vec<Layer>,
    norm: Tensor,
    lm_head: Tensor,
    /// Gemma: embeddings are multiplied by √hidden (rounded to the compute dtype, as
    /// transformers does).
    embed_scale: Option<f64>,
    dtype: DType,
    /// Autocast: every matrix multiply in bf16 (see [`Llama::set_autocast`]).
    autocast: bool,
    device: Device,
}

/// Masked attention scores: finite where differentiated (so no `inf - inf` can reach a
/// gradient), -inf in inference (exp(-inf) takes the fast path; exp(-1e9) the slow underflow one).
const MASKED_TRAIN: f64 = -1e9;

impl Llama {
    /// A model with freshly initialized parameters (normal(0, initializer_range), norms at 1).
    pub fn new(config: LlamaConfig, dtype: DType, device: &Device) -> Result<Llama> {
        Self::from_varmap(config, VarMap::new(), dtype, device)
    }

    /// Builds the model over `varmap`: parameters already in it are used (shapes checked),
    /// missing ones are created and initialized.
    pub fn from_varmap(
        config: LlamaConfig,
        varmap: VarMap,
        dtype: DType,
        device: &Device,
    ) -> Result<Llama> {
        config
            .validate()
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        let vb = VarBuilder::from_varmap(&varmap, dtype, device);
        let c = &config;
        let std = c.initializer_range;
        let (h, hd) = (c.hidden_size, c.head_dim());
        let (nh, nkv) = (c.num_attention_heads, c.num_kv_heads());
        let m = vb.pp("model");
        let embed = m.get_with_hints(
            (c.vocab_size, h),
            "embed_tokens.weight",
            Init::Randn {
                mean: 0.0,
                stdev: std,
            },
        )?;
        let arch = c.arch();
        // Gemma's norms scale by (1 + w), so they start at 0.
        let norm_init = Init::Const(if arch.gemma() { 0.0 } else { 1.0 });
        let has_local_rope = c.rope_local.is_some();
        let mut layers = Vec::with_capacity(c.num_hidden_layers);
        for i in 0..c.num_hidden_layers {
            let l = m.pp(format!("layers.{i}"));
            let a = l.pp("self_attn");
            let mlp = l.pp("mlp");
            let qk_norms = if arch.qk_norm() {
                Some((
                    a.get_with_hints(hd, "q_norm.weight", norm_init)?,
                    a.get_with_hints(hd, "k_norm.weight", norm_init)?,
                ))
            } else {
                None
            };
            let (mlp_norm_name, post_norms) = if arch.gemma() {
                (
                    "pre_feedforward_layernorm.weight",
                    Some((
                        l.get_with_hints(h, "post_attention_layernorm.weight", norm_init)?,
                        l.get_with_hints(h, "post_feedforward_layernorm.weight", norm_init)?,
                    )),
                )
            } else {
                ("post_attention_layernorm.weight", None)
            };
            let sliding = c.layer_types.get(i) == Some(&LayerType::Sliding);
            layers.push(Layer {
                q: Linear::new(&a.pp("q_proj"), h, nh * hd, c.attention_bias, std)?,
                k: Linear::new(&a.pp("k_proj"), h, nkv * hd, c.attention_bias, std)?,
                v: Linear::new(&a.pp("v_proj"), h, nkv * hd, c.attention_bias, std)?,
                o: Linear::new(&a.pp("o_proj"), nh * hd, h, false, std)?,
                gate: Linear::new(
                    &mlp.pp("gate_proj"),
                    h,
                    c.intermediate_size,
                    c.mlp_bias,
                    std,
                )?,
                up: Linear::new(&mlp.pp("up_proj"), h, c.intermediate_size, c.mlp_bias, std)?,
                down: Linear::new(
                    &mlp.pp("down_proj"),
                    c.intermediate_size,
                    h,
                    c.mlp_bias,
                    std,
                )?,
                attn_norm: l.get_with_hints(h, "input_layernorm.weight", norm_init)?,
                mlp_norm: l.get_with_hints(h, mlp_norm_name, norm_init)?,
                post_norms,
                qk_norms,
                window: c.layer_window(i),
                rope: usize::from(sliding && has_local_rope),
            });
        }
        let norm = m.get_with_hints(h, "norm.weight", norm_init)?;
        let lm_head = if c.tie_word_embeddings {
            embed.clone()
        } else {
            vb.get_with_hints(
                (c.vocab_size, h),
                "lm_head.weight",
                Init::Randn {
                    mean: 0.0,
                    stdev: std,
                },
            )?
        };
        let embed_scale = if arch.gemma() {
            let s = Tensor::new(&[(h as f64).sqrt()], device)?
                .to_dtype(dtype)?
                .to_dtype(DType::F64)?
                .to_vec1::<f64>()?;
            s.first().copied()
        } else {
            None
        };
        Ok(Llama {
            config,
            varmap,
            embed,
            layers,
            norm,
            lm_head,
            embed_scale,
            dtype,
            autocast: false,
            device: device.clone(),
        })
    }

    /// The dtype of the parameters and the activations.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Autocast, as PyTorch's `torch.autocast(bfloat16)`: an f32 model keeps its f32 parameters,
    /// activations (residual stream, norms, RoPE, attention, GLU, loss) and gradients, and runs
    /// every matrix multiply — the projections, the MLP and the language-model head — in bf16 with
    /// f32 accumulation (each operand rounded to bf16 as it is read). Only for f32 models: a bf16
    /// model multiplies in bf16 already.
    pub fn set_autocast(&mut self, on: bool) -> Result<()> {
        if on && self.dtype != DType::F32 {
            return Err(candle_core::Error::Msg(format!(
                "autocast needs an f32 model; this one is {:?} (it multiplies in that dtype already)",
                self.dtype
            )));
        }
        self.autocast = on;
        for l in &mut self.layers {
            for lin in [
                &mut l.q,
                &mut l.k,
                &mut l.v,
                &mut l.o,
                &mut l.gate,
                &mut l.up,
                &mut l.down,
            ] {
                lin.bf16 = on;
            }
        }
        Ok(())
    }

    /// Whether the matrix multiplies run in bf16 over f32 operands ([`Llama::set_autocast`]).
    pub fn autocast(&self) -> bool {
        self.autocast
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Every trainable parameter with its Hugging Face name, sorted by name.
    pub fn named_vars(&self) -> Vec<(String, Var)> {
        let data = self.varmap.data().lock().unwrap_or_else(|p| p.into_inner());
        let mut v: Vec<(String, Var)> = data.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    /// A copy of the model with its parameters in `dtype` (the same device).
    pub fn converted(&self, dtype: DType) -> Result<Llama> {
        let varmap = VarMap::new();
        {
            let mut data = varmap.data().lock().unwrap_or_else(|p| p.into_inner());
            for (name, v) in self.named_vars() {
                data.insert(name, Var::from_tensor(&v.as_tensor().to_dtype(dtype)?)?);
            }
        }
        Llama::from_varmap(self.config.clone(), varmap, dtype, &self.device)
    }

    /// Number of parameters (a tied head counted once).
    pub fn num_params(&self) -> usize {
        self.named_vars()
            .iter()
            .map(|(_, v)| v.as_tensor().elem_count())
            .sum()
    }

    /// Logits `[B, T, vocab]` for token ids `[B, T]` (u32), for inference: no gradient flows
    /// back from them (see [`Llama::forward_train`]).
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        self.forward_with(ids, ForwardOptions::default())
    }

    /// [`Llama::forward`] recording the graph: `logits.backward()` reaches every parameter.
    pub fn forward_train(&self, ids: &Tensor) -> Result<Tensor> {
        self.forward_with(
            ids,
            ForwardOptions {
                grad: true,
                ..Default::default()
            },
        )
    }

    /// [`Llama::forward`] with layers skipped and/or activations recorded.
    pub fn forward_with(&self, ids: &Tensor, opts: ForwardOptions<'_>) -> Result<Tensor> {
        self.run(ids, opts, None)
    }

    /// Logits and the outputs of decoder layers `layers` (in the order given; a layer may
    /// appear twice), for intermediate-state distillation: with `grad` the same differentiable
    /// ops as [`Llama::forward_train`], else the inference pass of [`Llama::forward`].
    pub fn forward_hidden(
        &self,
        ids: &Tensor,
        grad: bool,
        layers: &[usize],
    ) -> Result<(Tensor, Vec<Tensor>)> {
        if let Some(bad) = layers.iter().find(|l| **l >= self.layers.len()) {
            return Err(candle_core::Error::Msg(format!(
                "layer {bad} does not exist: the model has {} layers",
                self.layers.len()
            )));
        }
        let t = ids.dim(1)?;
        let mut h = self.embed(ids, grad)?;
        let pass = self.pass(0, t, grad)?;
        let mut kept: Vec<Option<Tensor>> = vec![None; self.layers.len()];
        for (i, slot) in kept.iter_mut().enumerate() {
            h = self.layer_forward(i, &h, &pass, None, None)?;
            if layers.contains(&i) {
                *slot = Some(h.clone());
            }
        }
        let logits = self.head(&h, grad)?;
        let out = layers
            .iter()
            .map(|&l| {
                kept[l]
                    .clone()
                    .ok_or_else(|| candle_core::Error::Msg(format!("layer {l} was not kept")))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok((logits, out))
    }

    /// Logits for `ids` `[B, T]` continuing the sequence held in `cache` (empty: from the
    /// start); the cache is extended with the new keys and values.
    pub fn forward_cached(&self, ids: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        self.run(ids, ForwardOptions::default(), Some(cache))
    }

    fn run(
        &self,
        ids: &Tensor,
        mut opts: ForwardOptions<'_>,
        mut cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        let t = ids.dim(1)?;
        let g = opts.grad;
        let start = cache.as_ref().map_or(0, |k| k.len);
        if let Some(k) = cache.as_deref_mut() {
            k.layers.resize(self.layers.len(), None);
        }
        let mut h = self.embed(ids, g)?;
        let pass = self.pass(start, t, g)?;
        for i in 0..self.layers.len() {
            if opts.skip_layers.contains(&i) {
                continue;
            }
            let past = cache.as_deref_mut().map(|k| &mut k.layers[i]);
            h = self.layer_forward(i, &h, &pass, past, opts.probe.as_deref_mut())?;
        }
        if let Some(k) = cache {
            k.len += t;
        }
        if opts.hidden_only {
            return Ok(h);
        }
        self.head(&h, g)
    }

    /// The hidden states `[B, T, hidden]` entering the first layer for token ids `[B, T]`.
    pub(crate) fn embed(&self, ids: &Tensor, grad: bool) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let h = param(&self.embed, grad)
            .index_select(&ids.flatten_all()?, 0)?
            .reshape((b, t, self.config.hidden_size))?;
        match self.embed_scale {
            Some(s) => h * s,
            None => Ok(h),
        }
    }

    /// What every layer of a pass over positions `start..start + t` shares.
    pub(crate) fn pass(&self, start: usize, t: usize, grad: bool) -> Result<Pass> {
        let c = &self.config;
        let masked = if grad {
            MASKED_TRAIN
        } else {
            f64::NEG_INFINITY
        };
        let mut ropes = vec![self.rope_tables(&c.rope(), start, t)?];
        if let Some(local) = &c.rope_local {
            ropes.push(self.rope_tables(local, start, t)?);
        }
        let mut masks = vec![(None, self.causal_mask(start, t, None, masked)?)];
        for w in self.layers.iter().filter_map(|l| l.window) {
            if !masks.iter().any(|(x, _)| *x == Some(w)) {
                masks.push((Some(w), self.causal_mask(start, t, Some(w), masked)?));
            }
        }
        Ok(Pass { ropes, masks, grad })
    }

    /// Number of decoder layers.
    pub(crate) fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// Layer `i` on the hidden states `h` `[B, T, hidden]`: its output `[B, T, hidden]`.
    pub(crate) fn layer_forward(
        &self,
        i: usize,
        h: &Tensor,
        pass: &Pass,
        past: Option<&mut Option<(Tensor, Tensor)>>,
        probe: Option<&mut Probe>,
    ) -> Result<Tensor> {
        let layer = &self.layers[i];
        let c = &self.config;
        let g = pass.grad;
        let eps = c.rms_norm_eps;
        let gemma = c.arch().gemma();
        let input = h.clone();
        let attn_norm = norm(h, &layer.attn_norm, eps, gemma, g)?;
        let (mut attn, o_proj_input) = self.attention(layer, &attn_norm, pass, past)?;
        let mut post_norms = Vec::new();
        if let Some((post_attn, _)) = &layer.post_norms {
            attn = norm(&attn, post_attn, eps, gemma, g)?;
            post_norms.push(attn.clone());
        }
        let h = residual(h, &attn)?;
        let mlp_norm = norm(&h, &layer.mlp_norm, eps, gemma, g)?;
        let gate = layer.gate.forward(&mlp_norm, g)?;
        let up = layer.up.forward(&mlp_norm, g)?;
        let down_proj_input = if fused_ok(fused::Kernel::Glu, &gate) {
            let act = if gemma {
                fused::Activation::GeluTanh
            } else {
                fused::Activation::Silu
            };
            fused::glu(&gate, &up, act)?
        } else {
            let act = if gemma { gate.gelu()? } else { gate.silu()? };
            (act * up)?
        };
        let mut mlp = layer.down.forward(&down_proj_input, g)?;
        if let Some((_, post_mlp)) = &layer.post_norms {
            mlp = norm(&mlp, post_mlp, eps, gemma, g)?;
            post_norms.push(mlp.clone());
        }
        let h = residual(&h, &mlp)?;
        if let Some(p) = probe {
            p.layers.push(LayerActivations {
                layer: i,
                input,
                attn_norm,
                o_proj_input,
                mlp_norm,
                post_norms,
                down_proj_input,
                output: h.clone(),
            });
        }
        Ok(h)
    }

    /// Logits `[B, T, vocab]` from the last layer's hidden states.
    pub(crate) fn head(&self, h: &Tensor, grad: bool) -> Result<Tensor> {
        let c = &self.config;
        let h = norm(h, &self.norm, c.rms_norm_eps, c.arch().gemma(), grad)?;
        let w = param(&self.lm_head, grad);
        if self.autocast {
            super::ops::gemm::logits_bf16(&h, &w)
        } else {
            super::ops::gemm::logits(&h, &w)
        }
    }

    fn attention(
        &self,
        l: &Layer,
        x: &Tensor,
        pass: &Pass,
        past: Option<&mut Option<(Tensor, Tensor)>>,
    ) -> Result<(Tensor, Tensor)> {
        let g = pass.grad;
        let (cos, sin) = &pass.ropes[l.rope.min(pass.ropes.len() - 1)];
        let c = &self.config;
        let gemma = c.arch().gemma();
        let (b, t, _) = x.dims3()?;
        let (nh, nkv, hd) = (c.num_attention_heads, c.num_kv_heads(), c.head_dim());
        // Projections as they come out, `[B, T, heads, hd]`; the q/k norms are per row, so
        // they apply in that layout as in the transposed one.
        let (mut q, mut k) = (
            l.q.forward(x, g)?.reshape((b, t, nh, hd))?,
            l.k.forward(x, g)?.reshape((b, t, nkv, hd))?,
        );
        if let Some((qn, kn)) = &l.qk_norms {
            q = norm(&q, qn, c.rms_norm_eps, gemma, g)?;
            k = norm(&k, kn, c.rms_norm_eps, gemma, g)?;
        }
        let rot = |y: Tensor| -> Result<Tensor> {
            if fused_ok(fused::Kernel::Rope, &y) {
                return fused::rope(&y, cos, sin);
            }
            let y = y.transpose(1, 2)?;
            let r = if g || y.dtype() == DType::F64 {
                rope(&y, cos, sin)?
            } else {
                let half = hd / 2;
                candle_nn::rotary_emb::rope(
                    &y.contiguous()?,
                    &cos.narrow(1, 0, half)?.contiguous()?,
                    &sin.narrow(1, 0, half)?.contiguous()?,
                )?
            };
            r.transpose(1, 2)
        };
        let q = rot(q)?;
        let k = rot(k)?;
        let v = l.v.forward(x, g)?.reshape((b, t, nkv, hd))?;
        let scale = c.attention_scale();
        if past.is_none() && l.window != Some(0) && fused_ok(fused::Kernel::Attention, &q) {
            let y = fused::attention(&q, &k, &v, scale, l.window)?.reshape((b, t, nh * hd))?;
            return Ok((l.o.forward(&y, g)?, y));
        }
        let mask = pass
            .masks
            .iter()
            .find(|(w, _)| *w == l.window)
            .map(|(_, m)| m)
            .unwrap_or(&pass.masks[0].1);
        let (q, k, v) = (q.transpose(1, 2)?, k.transpose(1, 2)?, v.transpose(1, 2)?);
        // With a cache, attend over the stored keys/values followed by the new ones.
        let (k, v) = match past {
            None => (k, v),
            Some(slot) => {
                let kv = match slot.take() {
                    Some((pk, pv)) => (Tensor::cat(&[&pk, &k], 2)?, Tensor::cat(&[&pv, &v], 2)?),
                    None => (k, v),
                };
                *slot = Some(kv.clone());
                kv
            }
        };
        let k = repeat_kv(k, nh / nkv)?;
        let v = repeat_kv(v, nh / nkv)?;
        let scores =
            (q.contiguous()?.matmul(&k.t()?.contiguous()?)? * scale)?.broadcast_add(mask)?;
        let probs = if g || scores.dtype() == DType::F64 {
            candle_nn::ops::softmax(&scores, D::Minus1)?
        } else {
            candle_nn::ops::softmax_last_dim(&scores)?
        };
        let y = probs
            .matmul(&v.contiguous()?)?
            .transpose(1, 2)?
            .reshape((b, t, nh * hd))?;
        Ok((l.o.forward(&y, g)?, y))
    }

    /// cos and sin tables `[T, head_dim]` of `rope` for positions `start..start + t`
    /// (frequencies repeated for both halves, as HF does).
    fn rope_tables(
        &self,
        rope: &super::config::Rope,
        start: usize,
        t: usize,
    ) -> Result<(Tensor, Tensor)> {
        let inv = rope.inv_freq(self.config.head_dim());
        let hd = self.config.head_dim();
        let mut cos = Vec::with_capacity(t * hd);
        let mut sin = Vec::with_capacity(t * hd);
        for p in start..start + t {
            for _half in 0..2 {
                for f in &inv {
                    // HF computes the angles in f32.
                    let a = (p as f32 * *f as f32) as f64;
                    cos.push(a.cos());
                    sin.push(a.sin());
                }
            }
        }
        let cos = Tensor::from_vec(cos, (t, hd), &self.device)?.to_dtype(self.dtype)?;
        let sin = Tensor::from_vec(sin, (t, hd), &self.device)?.to_dtype(self.dtype)?;
        Ok((cos, sin))
    }

    /// `[T, start + T]`: query `i` (at position `p = start + i`) sees keys up to its own
    /// position, and with a `window` only the last `window` of them (`p - j < window`, as
    /// transformers' sliding-window mask).
    fn causal_mask(
        &self,
        start: usize,
        t: usize,
        window: Option<usize>,
        masked: f64,
    ) -> Result<Tensor> {
        let total = start + t;
        let w = window.unwrap_or(usize::MAX);
        let m: Vec<f64> = (0..t)
            .flat_map(|i| {
                let p = start + i;
                (0..total).map(move |j| if j > p || p - j >= w { masked } else { 0.0 })
            })
            .collect();
        Tensor::from_vec(m, (t, total), &self.device)?.to_dtype(self.dtype)
    }
}

/// What every layer of one pass shares.
pub(crate) struct Pass {
    /// RoPE tables (cos, sin) `[T, head_dim]`, indexed by `Layer::rope`.
    ropes: Vec<(Tensor, Tensor)>,
    /// Causal masks `[T, start + T]` per attention window (`None` first).
    masks: Vec<(Option<usize>, Tensor)>,
    /// Differentiable pass (see [`ForwardOptions::grad`]).
    grad: bool,
}

/// The parameter as the pass reads it: itself when differentiating, else a detached view of
/// the same storage (so the pass builds no graph and keeps no activation alive).
fn param(w: &Tensor, grad: bool) -> Tensor {
    if grad {
        w.clone()
    } else {
        w.detach()
    }
}

/// Whether the fused CPU kernel `k` (see [`fused`]) takes tensors like `x`: switched on, on
/// the CPU, in a dtype it reads.
fn fused_ok(k: fused::Kernel, x: &Tensor) -> bool {
    fused::active(k, x.device()) && fused::supported(x.dtype())
}

/// `h + x` for the residual stream: the fused add where it is on, candle's add otherwise (both
/// differentiable).
fn residual(h: &Tensor, x: &Tensor) -> Result<Tensor> {
    if fused_ok(fused::Kernel::Add, h) && h.dtype() == x.dtype() && h.dims() == x.dims() {
        fused::add(h, x)
    } else {
        h + x
    }
}

/// RMSNorm over the last dimension, scaled by `w` (Gemma: by `1 + w`): the fused kernel with a
/// backward where it is on (see [`fused`]); else the composed, differentiable form when
/// differentiating (or in f64), candle's fused kernel (no backward) otherwise.
fn norm(x: &Tensor, w: &Tensor, eps: f64, plus_one: bool, grad: bool) -> Result<Tensor> {
    let w = param(w, grad);
    if fused_ok(fused::Kernel::Norm, x) {
        return fused::rms_norm(x, &w, eps, plus_one);
    }
    let w = if plus_one { (w + 1.0)? } else { w };
    if grad || x.dtype() == DType::F64 {
        rms_norm(x, &w, eps)
    } else {
        candle_nn::ops::rms_norm(&x.contiguous()?, &w, eps as f32)
    }
}

/// RMSNorm from differentiable ops: `x / sqrt(mean(x²) + eps) * w`.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
    let inv = (ms + eps)?.sqrt()?.recip()?;
    x.broadcast_mul(&inv)?.broadcast_mul(w)
}

/// Rotary embedding, HF layout (`rotate_half`), over `[B, H, T, hd]`.
fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let hd = x.dim(D::Minus1)?;
    let x1 = x.narrow(D::Minus1, 0, hd / 2)?;
    let x2 = x.narrow(D::Minus1, hd / 2, hd / 2)?;
    let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    x.broadcast_mul(cos)? + rotated.broadcast_mul(sin)?
}

/// `[B, KV, T, hd]` -> `[B, KV * n, T, hd]`, each KV head repeated for its group.
fn repeat_kv(x: Tensor, n: usize) -> Result<Tensor> {
    if n == 1 {
        return Ok(x);
    }
    let (b, kv, t, hd) = x.dims4()?;
    x.unsqueeze(2)?
        .broadcast_as((b, kv, n, t, hd))?
        .contiguous()?
        .reshape((b, kv * n, t, hd))
}

#[cfg(test)]
pub(crate) mod tests;
