//! Minitron importance from forward passes only (DESIGN.md §6). Every accumulator is a sum over
//! calibration sequences (of squared sequence-means of |activation|, or of per-token `1 - cos`),
//! so scores from shards of the data merge exactly by addition, whatever the batching.
//!
//! With `depth_importance = "taylor"` the shards also accumulate Shortened LLaMA's Taylor
//! ingredients ([`TaylorSums`]): the gradient of the calibration loss with respect to every
//! decoder-layer parameter, signed, so that the shards' sums add up to the whole set's gradient;
//! the block score `Σ |W ⊙ ∂L/∂W|` is formed only after merging ([`Importance::taylor_block_scores`]).

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::{DType, Device, Tensor, D};

use crate::model::llama::{ForwardOptions, Probe};
use crate::model::perplexity::mean_nll;
use crate::model::{Llama, LlamaConfig};

/// Sums of squares per layer and channel, plus Block Importance sums.
#[derive(Debug, Clone, PartialEq)]
pub struct Importance {
    /// Calibration sequences accumulated.
    pub sequences: u64,
    /// `[layer][intermediate]`: input of `down_proj`.
    pub neuron: Vec<Vec<f64>>,
    /// `[layer][heads * head_dim]`: input of `o_proj`.
    pub attn: Vec<Vec<f64>>,
    /// `[layer][hidden]`: output of `input_layernorm`.
    pub attn_norm: Vec<Vec<f64>>,
    /// `[layer][hidden]`: output of the norm before the MLP.
    pub mlp_norm: Vec<Vec<f64>>,
    /// `[layer][hidden]`: Gemma's norms after attention and after the MLP, added (empty rows
    /// for other architectures).
    pub post_norm: Vec<Vec<f64>>,
    /// `[layer]`: sum over tokens of `1 - cos(h_in, h_out)`.
    pub bi_sum: Vec<f64>,
    /// `[layer]`: tokens in `bi_sum`.
    pub bi_tokens: Vec<f64>,
    /// Head dimension (to group `attn` channels into heads).
    pub head_dim: usize,
    /// Taylor depth ingredients, when asked for.
    pub taylor: Option<TaylorSums>,
}

/// The gradient of the summed next-token NLL of the calibration tokens with respect to each
/// decoder-layer parameter (`model.layers.*`), f32, and the tokens summed. Signed sums, so shards
/// merge by addition into exactly the gradient over all of them.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct TaylorSums {
    pub grads: BTreeMap<String, Vec<f32>>,
    pub tokens: f64,
}

impl TaylorSums {
    fn merge(&mut self, other: &TaylorSums) -> Result<(), String> {
        if self.grads.len() != other.grads.len() {
            return Err("the Taylor sums are of models with different parameters".into());
        }
        for (name, g) in &mut self.grads {
            let o = other
                .grads
                .get(name)
                .filter(|o| o.len() == g.len())
                .ok_or_else(|| format!("the Taylor sums disagree on {name}"))?;
            for (a, b) in g.iter_mut().zip(o) {
                *a += b;
            }
        }
        self.tokens += other.tokens;
        Ok(())
    }
}

fn zeros(layers: usize, width: usize) -> Vec<Vec<f64>> {
    vec![vec![0.0; width]; layers]
}

/// Sum over the batch of (mean over the sequence of |x|)², per channel: `[B, T, C]` -> `[C]`.
fn seq_mean_sq(x: &Tensor) -> candle_core::Result<Vec<f64>> {
    x.to_dtype(DType::F32)?
        .abs()?
        .mean(1)?
        .sqr()?
        .sum(0)?
        .to_dtype(DType::F64)?
        .to_vec1()
}

fn add(acc: &mut [f64], v: &[f64]) {
    for (a, b) in acc.iter_mut().zip(v) {
        *a += b;
    }
}

impl Importance {
    /// Empty accumulators for a model of this config.
    pub fn new(c: &LlamaConfig) -> Importance {
        let l = c.num_hidden_layers;
        Importance {
            sequences: 0,
            neuron: zeros(l, c.intermediate_size),
            attn: zeros(l, c.num_attention_heads * c.head_dim()),
            attn_norm: zeros(l, c.hidden_size),
            mlp_norm: zeros(l, c.hidden_size),
            post_norm: zeros(l, if c.arch().gemma() { c.hidden_size } else { 0 }),
            bi_sum: vec![0.0; l],
            bi_tokens: vec![0.0; l],
            head_dim: c.head_dim(),
            taylor: None,
        }
    }

    /// Adds the gradient of the summed next-token NLL of `batch` (`[B, T]` token ids; the
    /// first T - 1 positions predict the next) to `acc` (device tensors by parameter name),
    /// returning the tokens predicted.
    fn accumulate_taylor(
        model: &Llama,
        batch: &Tensor,
        acc: &mut BTreeMap<String, Tensor>,
    ) -> candle_core::Result<usize> {
        let t = batch.dim(1)?;
        if t < 2 {
            return Ok(0);
        }
        let ids = batch.narrow(1, 0, t - 1)?.contiguous()?;
        let targets = batch.narrow(1, 1, t - 1)?.contiguous()?;
        let logits = model.forward_train(&ids)?;
        let l = crate::distill::loss::ce_only(&logits, &targets)?;
        drop(logits);
        let g = l.total.backward()?;
        for (name, v) in model.named_vars() {
            if !name.starts_with("model.layers.") {
                continue;
            }
            let gi = match g.get(v.as_tensor()) {
                Some(gi) => gi.to_dtype(DType::F32)?,
                None => v.as_tensor().zeros_like()?.to_dtype(DType::F32)?,
            };
            let sum = match acc.remove(&name) {
                Some(a) => (a + gi)?,
                None => gi,
            };
            acc.insert(name, sum);
        }
        Ok(targets.elem_count())
    }

    /// Taylor block importance per layer: `Σ |W ⊙ G|` over the layer's parameters, G the
    /// merged gradient of the mean calibration NLL, W the weights of `model` (the model scored).
    pub fn taylor_block_scores(&self, model: &Llama) -> Result<Vec<f64>, String> {
        let t = self.taylor.as_ref().ok_or_else(|| {
            "the scores hold no Taylor sums (were they computed with depth_importance = \"taylor\"?)"
                .to_string()
        })?;
        let layers = model.config.num_hidden_layers;
        let mut out = vec![0.0; layers];
        let tokens = t.tokens.max(1.0);
        let vars: HashMap<String, candle_core::Var> = model.named_vars().into_iter().collect();
        for (name, g) in &t.grads {
            let l: usize = name
                .strip_prefix("model.layers.")
                .and_then(|r| r.split('.').next())
                .and_then(|i| i.parse().ok())
                .filter(|l| *l < layers)
                .ok_or_else(|| format!("Taylor sums of {name}, not a layer of this model"))?;
            let w: Vec<f32> = vars
                .get(name)
                .ok_or_else(|| format!("the model has no {name} (Taylor sums of another model?)"))?
                .as_tensor()
                .to_dtype(DType::F32)
                .and_then(|x| x.flatten_all()?.to_vec1())
                .map_err(|e| format!("{name}: {e}"))?;
            if w.len() != g.len() {
                return Err(format!(
                    "{name}: {} weights but {} Taylor sums",
                    w.len(),
                    g.len()
                ));
            }
            out[l] += w
                .iter()
                .zip(g)
                .map(|(w, g)| (f64::from(*w) * f64::from(*g) / tokens).abs())
                .sum::<f64>();
        }
        Ok(out)
    }

    /// Runs `batch` (`[B, T]` token ids) through `model` and accumulates its activations (f32).
    pub fn accumulate(&mut self, model: &Llama, batch: &Tensor) -> candle_core::Result<()> {
        let mut probe = Probe::default();
        model.forward_with(
            batch,
            ForwardOptions {
                probe: Some(&mut probe),
                hidden_only: true,
                ..Default::default()
            },
        )?;
        for a in &probe.layers {
            let l = a.layer;
            add(&mut self.neuron[l], &seq_mean_sq(&a.down_proj_input)?);
            add(&mut self.attn[l], &seq_mean_sq(&a.o_proj_input)?);
            add(&mut self.attn_norm[l], &seq_mean_sq(&a.attn_norm)?);
            add(&mut self.mlp_norm[l], &seq_mean_sq(&a.mlp_norm)?);
            for post in &a.post_norms {
                let v = seq_mean_sq(post)?;
                if self.post_norm[l].len() != v.len() {
                    self.post_norm[l] = vec![0.0; v.len()];
                }
                add(&mut self.post_norm[l], &v);
            }
            let x = a.input.to_dtype(DType::F32)?;
            let y = a.output.to_dtype(DType::F32)?;
            let dot = (&x * &y)?.sum(D::Minus1)?;
            let nx = x.sqr()?.sum(D::Minus1)?.sqrt()?;
            let ny = y.sqr()?.sum(D::Minus1)?.sqrt()?;
            let cos = (dot / (nx * ny)?.clamp(1e-12f32, f32::MAX)?)?;
            let one_minus = cos.affine(-1.0, 1.0)?;
            self.bi_sum[l] += one_minus
                .to_dtype(DType::F64)?
                .sum_all()?
                .to_scalar::<f64>()?;
            self.bi_tokens[l] += one_minus.elem_count() as f64;
        }
        self.sequences += batch.dim(0)? as u64;
        Ok(())
    }

    /// Adds another shard's accumulators (same model shape).
    pub fn merge(&mut self, other: &Importance) -> Result<(), String> {
        let shape = |i: &Importance| {
            (
                i.neuron.iter().map(Vec::len).collect::<Vec<_>>(),
                i.attn.iter().map(Vec::len).collect::<Vec<_>>(),
                i.attn_norm.iter().map(Vec::len).collect::<Vec<_>>(),
                i.post_norm.iter().map(Vec::len).collect::<Vec<_>>(),
                i.head_dim,
            )
        };
        if shape(self) != shape(other) {
            return Err("the scores are of models with different shapes".into());
        }
        match (&mut self.taylor, &other.taylor) {
            (Some(a), Some(b)) => a.merge(b)?,
            (None, None) => {}
            // A fresh accumulator takes the first shard's sums.
            (None, Some(b)) if self.sequences == 0 => self.taylor = Some(b.clone()),
            _ => return Err("some score shards hold Taylor sums and others do not".into()),
        }
        self.sequences += other.sequences;
        for (a, b) in [
            (&mut self.neuron, &other.neuron),
            (&mut self.attn, &other.attn),
            (&mut self.attn_norm, &other.attn_norm),
            (&mut self.mlp_norm, &other.mlp_norm),
            (&mut self.post_norm, &other.post_norm),
        ] {
            for (x, y) in a.iter_mut().zip(b) {
                add(x, y);
            }
        }
        add(&mut self.bi_sum, &other.bi_sum);
        add(&mut self.bi_tokens, &other.bi_tokens);
        Ok(())
    }

    /// MLP neuron scores `[layer][intermediate]`: L2 over sequences of the sequence-mean.
    pub fn neuron_scores(&self) -> Vec<Vec<f64>> {
        self.neuron
            .iter()
            .map(|l| l.iter().map(|v| v.sqrt()).collect())
            .collect()
    }

    /// Attention head scores `[layer][heads]`: L2 over the head's channels of the channel scores.
    pub fn head_scores(&self) -> Vec<Vec<f64>> {
        self.attn
            .iter()
            .map(|l| {
                l.chunks(self.head_dim.max(1))
                    .map(|h| h.iter().sum::<f64>().sqrt())
                    .collect()
            })
            .collect()
    }

    /// Embedding channel scores `[hidden]`: every norm of every layer (two, or Gemma's four),
    /// summed.
    pub fn channel_scores(&self) -> Vec<f64> {
        let h = self.attn_norm.first().map_or(0, Vec::len);
        let mut s = vec![0.0; h];
        for l in self
            .attn_norm
            .iter()
            .chain(&self.mlp_norm)
            .chain(self.post_norm.iter().filter(|l| l.len() == h))
        {
            for (a, v) in s.iter_mut().zip(l) {
                *a += v.sqrt();
            }
        }
        s
    }

    /// Block Importance per layer: mean over tokens of `1 - cos(h_in, h_out)`.
    pub fn block_importance(&self) -> Vec<f64> {
        self.bi_sum
            .iter()
            .zip(&self.bi_tokens)
            .map(|(s, n)| s / n.max(1.0))
            .collect()
    }

    /// Writes the accumulators as safetensors (f64).
    pub fn save(&self, path: &Path) -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let mat = |m: &[Vec<f64>]| -> candle_core::Result<Tensor> {
            let w = m.first().map_or(0, Vec::len);
            Tensor::from_vec(m.concat(), (m.len(), w), &dev)
        };
        let mut t = HashMap::new();
        t.insert("neuron".to_string(), mat(&self.neuron)?);
        t.insert("attn".to_string(), mat(&self.attn)?);
        t.insert("attn_norm".to_string(), mat(&self.attn_norm)?);
        t.insert("mlp_norm".to_string(), mat(&self.mlp_norm)?);
        if self.post_norm.iter().any(|l| !l.is_empty()) {
            t.insert("post_norm".to_string(), mat(&self.post_norm)?);
        }
        t.insert(
            "bi_sum".to_string(),
            Tensor::new(self.bi_sum.as_slice(), &dev)?,
        );
        t.insert(
            "bi_tokens".to_string(),
            Tensor::new(self.bi_tokens.as_slice(), &dev)?,
        );
        t.insert(
            "meta".to_string(),
            Tensor::new(&[self.sequences as f64, self.head_dim as f64], &dev)?,
        );
        if let Some(ts) = &self.taylor {
            t.insert(
                "taylor_tokens".to_string(),
                Tensor::new(&[ts.tokens], &dev)?,
            );
            for (name, g) in &ts.grads {
                t.insert(
                    format!("{TAYLOR_PREFIX}{name}"),
                    Tensor::new(g.as_slice(), &dev)?,
                );
            }
        }
        candle_core::safetensors::save(&t, path)
    }

    /// Reads what [`Importance::save`] wrote.
    pub fn load(path: &Path) -> Result<Importance, String> {
        let t = candle_core::safetensors::load(path, &Device::Cpu)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        let get = |k: &str| {
            t.get(k)
                .ok_or_else(|| format!("{}: not a scores file (no {k:?})", path.display()))
        };
        let mat = |k: &str| -> Result<Vec<Vec<f64>>, String> {
            get(k)?
                .to_dtype(DType::F64)
                .and_then(|x| x.to_vec2())
                .map_err(|e| format!("{}: {k}: {e}", path.display()))
        };
        let vec = |k: &str| -> Result<Vec<f64>, String> {
            get(k)?
                .to_dtype(DType::F64)
                .and_then(|x| x.to_vec1())
                .map_err(|e| format!("{}: {k}: {e}", path.display()))
        };
        let meta = vec("meta")?;
        if meta.len() != 2 {
            return Err(format!("{}: malformed meta", path.display()));
        }
        let taylor = if t.contains_key("taylor_tokens") {
            let mut grads = BTreeMap::new();
            for (k, v) in &t {
                if let Some(name) = k.strip_prefix(TAYLOR_PREFIX) {
                    let g: Vec<f32> = v
                        .to_dtype(DType::F32)
                        .and_then(|x| x.to_vec1())
                        .map_err(|e| format!("{}: {k}: {e}", path.display()))?;
                    grads.insert(name.to_string(), g);
                }
            }
            let tokens = vec("taylor_tokens")?
                .first()
                .copied()
                .ok_or_else(|| format!("{}: empty taylor_tokens", path.display()))?;
            Some(TaylorSums { grads, tokens })
        } else {
            None
        };
        Ok(Importance {
            taylor,
            sequences: meta[0] as u64,
            head_dim: meta[1] as usize,
            neuron: mat("neuron")?,
            attn: mat("attn")?,
            attn_norm: mat("attn_norm")?,
            post_norm: if t.contains_key("post_norm") {
                mat("post_norm")?
            } else {
                vec![Vec::new(); mat("mlp_norm")?.len()]
            },
            mlp_norm: mat("mlp_norm")?,
            bi_sum: vec("bi_sum")?,
            bi_tokens: vec("bi_tokens")?,
        })
    }
}

/// Scores `sequences` in batches of `batch`, calling `progress(done, total)` after each batch;
/// `progress` returning false stops early (cancellation).
pub fn score(
    model: &Llama,
    sequences: &[Vec<u32>],
    batch: usize,
    progress: impl FnMut(usize, usize) -> bool,
) -> candle_core::Result<Importance> {
    score_with(model, sequences, batch, false, progress)
}

/// Names in a scores file holding Taylor sums: `taylor.grad.<parameter>`.
const TAYLOR_PREFIX: &str = "taylor.grad.";

/// [`score`], with the Taylor sums too when `taylor` (a forward and backward pass per batch).
pub fn score_with(
    model: &Llama,
    sequences: &[Vec<u32>],
    batch: usize,
    taylor: bool,
    mut progress: impl FnMut(usize, usize) -> bool,
) -> candle_core::Result<Importance> {
    let mut imp = Importance::new(&model.config);
    let mut acc = BTreeMap::new();
    let mut tokens = 0usize;
    let mut done = 0;
    for chunk in sequences.chunks(batch.max(1)) {
        let ids = Tensor::new(chunk.to_vec(), model.device())?;
        imp.accumulate(model, &ids)?;
        if taylor {
            tokens += Importance::accumulate_taylor(model, &ids, &mut acc)?;
        }
        done += chunk.len();
        if !progress(done, sequences.len()) {
            return Err(candle_core::Error::Msg("cancelled".into()));
        }
    }
    if taylor {
        let mut grads = BTreeMap::new();
        for (name, g) in acc {
            grads.insert(name, g.flatten_all()?.to_vec1::<f32>()?);
        }
        // A shard without sequences still names every parameter (zeros), so it merges.
        for (name, v) in model.named_vars() {
            if name.starts_with("model.layers.") && !grads.contains_key(&name) {
                grads.insert(name, vec![0.0; v.elem_count()]);
            }
        }
        imp.taylor = Some(TaylorSums {
            grads,
            tokens: tokens as f64,
        });
    }
    Ok(imp)
}

/// Depth importance by perplexity for some layers: the calibration perplexity with each layer
/// skipped, and the full model's.
#[derive(Debug, Clone, PartialEq)]
pub struct DepthScores {
    pub layers: Vec<usize>,
    pub ppl_skip: Vec<f64>,
    pub ppl_full: f64,
}

impl DepthScores {
    /// Computes the scores of `layers`, calling `progress(done, total)` after each pass.
    pub fn compute(
        model: &Llama,
        sequences: &[Vec<u32>],
        batch: usize,
        layers: &[usize],
        mut progress: impl FnMut(usize, usize) -> bool,
    ) -> candle_core::Result<DepthScores> {
        let total = layers.len() + 1;
        let ppl_full = mean_nll(model, sequences, batch, &[])?.exp();
        let mut ppl_skip = Vec::with_capacity(layers.len());
        for (i, l) in layers.iter().enumerate() {
            if !progress(i + 1, total) {
                return Err(candle_core::Error::Msg("cancelled".into()));
            }
            ppl_skip.push(mean_nll(model, sequences, batch, &[*l])?.exp());
        }
        progress(total, total);
        Ok(DepthScores {
            layers: layers.to_vec(),
            ppl_skip,
            ppl_full,
        })
    }

    pub fn save(&self, path: &Path) -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let layers: Vec<f64> = self.layers.iter().map(|l| *l as f64).collect();
        let mut t = HashMap::new();
        t.insert("layers".to_string(), Tensor::new(layers.as_slice(), &dev)?);
        t.insert(
            "ppl_skip".to_string(),
            Tensor::new(self.ppl_skip.as_slice(), &dev)?,
        );
        t.insert("ppl_full".to_string(), Tensor::new(&[self.ppl_full], &dev)?);
        candle_core::safetensors::save(&t, path)
    }

    pub fn load(path: &Path) -> Result<DepthScores, String> {
        let t = candle_core::safetensors::load(path, &Device::Cpu)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        let vec = |k: &str| -> Result<Vec<f64>, String> {
            t.get(k)
                .ok_or_else(|| format!("{}: not a depth-scores file (no {k:?})", path.display()))?
                .to_vec1()
                .map_err(|e| format!("{}: {k}: {e}", path.display()))
        };
        let layers = vec("layers")?.into_iter().map(|l| l as usize).collect();
        let ppl_full = vec("ppl_full")?
            .first()
            .copied()
            .ok_or_else(|| format!("{}: empty ppl_full", path.display()))?;
        Ok(DepthScores {
            layers,
            ppl_skip: vec("ppl_skip")?,
            ppl_full,
        })
    }
}
