//! Applies a [`KeepPlan`]: slices every weight (embeddings, every hidden-size norm, q/k/v/o,
//! gate/up/down, biases, lm_head tied or not; per-head q/k norms stay) and builds the smaller
//! model with its config (kept layers keep their attention kind).

use std::collections::HashMap;
use std::path::Path;

use candle_core::Tensor;

use super::plan::KeepPlan;
use crate::model::io::{from_tensors, ModelIoError};
use crate::model::Llama;

fn index(ix: &[usize], dev: &candle_core::Device) -> candle_core::Result<Tensor> {
    let v: Vec<u32> = ix.iter().map(|i| *i as u32).collect();
    Tensor::new(v.as_slice(), dev)
}

/// The pruned model (same dtype and device as `model`).
pub fn apply(model: &Llama, plan: &KeepPlan) -> Result<Llama, ModelIoError> {
    let c = &model.config;
    let dev = model.device();
    let hd = c.head_dim();
    let vars: HashMap<String, Tensor> = model
        .named_vars()
        .into_iter()
        .map(|(n, v)| (n, v.as_tensor().clone()))
        .collect();
    let get = |name: &str| -> Result<&Tensor, ModelIoError> {
        vars.get(name).ok_or_else(|| ModelIoError::Invalid {
            path: "<pruning>".into(),
            message: format!("the model has no {name}"),
        })
    };
    let ch = index(&plan.channels, dev)?;
    // Rows or columns by index; `dim` 0 = rows (output features), 1 = columns (input features).
    let pick = |t: &Tensor, dim: usize, ix: &Tensor| -> candle_core::Result<Tensor> {
        t.index_select(ix, dim)?.contiguous()
    };
    let mut out: HashMap<String, Tensor> = HashMap::new();
    out.insert(
        "model.embed_tokens.weight".into(),
        pick(get("model.embed_tokens.weight")?, 1, &ch)?,
    );
    out.insert(
        "model.norm.weight".into(),
        pick(get("model.norm.weight")?, 0, &ch)?,
    );
    if !c.tie_word_embeddings {
        out.insert(
            "lm_head.weight".into(),
            pick(get("lm_head.weight")?, 1, &ch)?,
        );
    }
    for (j, &li) in plan.layers.iter().enumerate() {
        let dst = |n: &str| format!("model.layers.{j}.{n}");
        let head_rows: Vec<usize> = plan.heads[j]
            .iter()
            .flat_map(|h| h * hd..(h + 1) * hd)
            .collect();
        let hr = index(&head_rows, dev)?;
        let nr = index(&plan.neurons[j], dev)?;
        // Every tensor of the source layer, by role; one the plan does not know is an error,
        // so nothing is silently dropped or left unsliced.
        let prefix = format!("model.layers.{li}.");
        let mut names: Vec<&String> = vars.keys().filter(|n| n.starts_with(&prefix)).collect();
        names.sort();
        for name in names {
            let part = &name[prefix.len()..];
            let w = get(name)?;
            let sliced = match part {
                // Every hidden-size norm (Gemma has four per layer).
                "input_layernorm.weight"
                | "post_attention_layernorm.weight"
                | "pre_feedforward_layernorm.weight"
                | "post_feedforward_layernorm.weight" => pick(w, 0, &ch)?,
                // Per-head_dim norms: head_dim is kept, so they stay as they are.
                "self_attn.q_norm.weight" | "self_attn.k_norm.weight" => w.clone(),
                "self_attn.q_proj.weight" => pick(&pick(w, 0, &hr)?, 1, &ch)?,
                "self_attn.q_proj.bias" => pick(w, 0, &hr)?,
                "self_attn.k_proj.weight" | "self_attn.v_proj.weight" => pick(w, 1, &ch)?,
                "self_attn.k_proj.bias" | "self_attn.v_proj.bias" => w.clone(),
                "self_attn.o_proj.weight" => pick(&pick(w, 0, &ch)?, 1, &hr)?,
                "mlp.gate_proj.weight" | "mlp.up_proj.weight" => pick(&pick(w, 0, &nr)?, 1, &ch)?,
                "mlp.gate_proj.bias" | "mlp.up_proj.bias" => pick(w, 0, &nr)?,
                "mlp.down_proj.weight" => pick(&pick(w, 0, &ch)?, 1, &nr)?,
                "mlp.down_proj.bias" => pick(w, 0, &ch)?,
                other => {
                    return Err(ModelIoError::Invalid {
                        path: "<pruning>".into(),
                        message: format!("no pruning rule for layer tensor {other:?}"),
                    })
                }
            };
            out.insert(dst(part), sliced);
        }
    }
    let mut config = c.clone();
    config.hidden_size = plan.channels.len();
    config.intermediate_size = plan.neurons.first().map_or(0, Vec::len);
    config.num_attention_heads = plan.heads.first().map_or(0, Vec::len);
    config.num_key_value_heads = Some(c.num_kv_heads());
    config.head_dim = Some(hd);
    config.num_hidden_layers = plan.layers.len();
    // Kept layers keep their kind (a sliding-window layer keeps its window and its RoPE).
    config.layer_types = plan
        .layers
        .iter()
        .map(|&l| c.layer_types.get(l).copied())
        .collect::<Option<Vec<_>>>()
        .ok_or_else(|| ModelIoError::Invalid {
            path: "<pruning>".into(),
            message: "the keep plan names a layer the model does not have".into(),
        })?;
    // Every layer keeps the same counts; anything else is a bug in the plan.
    let uniform = plan
        .neurons
        .iter()
        .all(|n| n.len() == config.intermediate_size)
        && plan
            .heads
            .iter()
            .all(|h| h.len() == config.num_attention_heads);
    if !uniform || plan.heads.len() != plan.layers.len() {
        return Err(ModelIoError::Invalid {
            path: "<pruning>".into(),
            message: "the keep plan is not uniform across layers".into(),
        });
    }
    from_tensors(config, out, model.dtype(), dev, Path::new("<pruned model>"))
}
