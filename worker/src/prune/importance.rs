//! Minitron importance from forward passes only (DESIGN.md §6). Every accumulator is a sum over
//! calibration sequences (of squared sequence-means of |activation|, or of per-token `1 - cos`),
//! so scores from shards of the data merge exactly by addition, whatever the batching.

use std::collections::HashMap;
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
        }
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
        Ok(Importance {
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
    mut progress: impl FnMut(usize, usize) -> bool,
) -> candle_core::Result<Importance> {
    let mut imp = Importance::new(&model.config);
    let mut done = 0;
    for chunk in sequences.chunks(batch.max(1)) {
        let ids = Tensor::new(chunk.to_vec(), model.device())?;
        imp.accumulate(model, &ids)?;
        done += chunk.len();
        if !progress(done, sequences.len()) {
            return Err(candle_core::Error::Msg("cancelled".into()));
        }
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
