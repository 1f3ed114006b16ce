//! Width-importance baselines (`rounds[i].width_importance`): the same plan, with MLP neurons,
//! attention heads and embedding channels ranked by the magnitude of the weights that read or
//! write them, or at random, instead of by their activations on the calibration data. They exist
//! so that a study can measure what Minitron's activation importance buys; depth scores are not
//! touched.

use std::collections::HashMap;

use candle_core::DType;
use rand::{Rng, SeedableRng};

use super::plan::Scores;
use crate::model::Llama;

/// How the width axes are ranked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WidthImportance {
    /// Minitron: activations on the calibration data (the default).
    Activation,
    /// Sum of squares of every weight that reads or writes the unit, square-rooted.
    Magnitude,
    /// Uniform random scores from the campaign's seed and the round.
    Random,
}

impl WidthImportance {
    /// The spec's name (`""` is the default, for campaigns stored before the field existed).
    pub fn parse(s: &str) -> Result<Self, String> {
        match s {
            "" | "activation" => Ok(Self::Activation),
            "magnitude" => Ok(Self::Magnitude),
            "random" => Ok(Self::Random),
            other => Err(format!(
                "{other:?} is not a width importance: use \"activation\", \"magnitude\" or \"random\""
            )),
        }
    }
}

/// Replaces the width scores of `s` (neurons, heads, channels) by the baseline's; `model` is the
/// model being pruned, `seed` feeds `Random`.
pub fn apply_width_importance(
    how: WidthImportance,
    model: &Llama,
    seed: u64,
    s: &mut Scores,
) -> Result<(), String> {
    match how {
        WidthImportance::Activation => Ok(()),
        WidthImportance::Random => {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            for row in s.neuron.iter_mut().chain(s.head.iter_mut()) {
                row.iter_mut().for_each(|v| *v = rng.gen::<f64>());
            }
            s.channel.iter_mut().for_each(|v| *v = rng.gen::<f64>());
            Ok(())
        }
        WidthImportance::Magnitude => magnitude(model, s),
    }
}

/// Squared weights of a named matrix (`[out, in]`, row-major) as f64, with its shape.
fn squares(
    vars: &HashMap<String, candle_core::Var>,
    name: &str,
) -> Result<(Vec<f64>, usize, usize), String> {
    let t = vars
        .get(name)
        .ok_or_else(|| format!("the model has no {name}"))?
        .as_tensor();
    let (rows, cols) = t.dims2().map_err(|e| format!("{name}: {e}"))?;
    let v: Vec<f32> = t
        .to_dtype(DType::F32)
        .and_then(|x| x.flatten_all()?.to_vec1())
        .map_err(|e| format!("{name}: {e}"))?;
    Ok((
        v.iter().map(|x| f64::from(*x).powi(2)).collect(),
        rows,
        cols,
    ))
}

/// Row sums (`by_row`) or column sums of a squared `[rows, cols]` matrix, added into `acc`.
fn add_sums(
    acc: &mut [f64],
    sq: &[f64],
    rows: usize,
    cols: usize,
    by_row: bool,
    name: &str,
) -> Result<(), String> {
    let want = if by_row { rows } else { cols };
    if acc.len() != want {
        return Err(format!(
            "{name}: {want} units where {} were expected",
            acc.len()
        ));
    }
    for (r, row) in sq.chunks(cols.max(1)).enumerate().take(rows) {
        if by_row {
            acc[r] += row.iter().sum::<f64>();
        } else {
            acc.iter_mut().zip(row).for_each(|(a, v)| *a += v);
        }
    }
    Ok(())
}

fn magnitude(model: &Llama, s: &mut Scores) -> Result<(), String> {
    let vars: HashMap<String, candle_core::Var> = model.named_vars().into_iter().collect();
    let hd = model.config.head_dim();
    let mut channel = vec![0.0; s.channel.len()];
    let (emb, r, c) = squares(&vars, "model.embed_tokens.weight")?;
    add_sums(&mut channel, &emb, r, c, false, "model.embed_tokens.weight")?;
    if vars.contains_key("lm_head.weight") {
        let (sq, r, c) = squares(&vars, "lm_head.weight")?;
        add_sums(&mut channel, &sq, r, c, false, "lm_head.weight")?;
    }
    for l in 0..s.neuron.len() {
        let p = format!("model.layers.{l}");
        let mut neuron = vec![0.0; s.neuron[l].len()];
        for m in ["gate_proj", "up_proj"] {
            let name = format!("{p}.mlp.{m}.weight");
            let (sq, r, c) = squares(&vars, &name)?;
            add_sums(&mut neuron, &sq, r, c, true, &name)?;
            add_sums(&mut channel, &sq, r, c, false, &name)?;
        }
        let name = format!("{p}.mlp.down_proj.weight");
        let (sq, r, c) = squares(&vars, &name)?;
        add_sums(&mut neuron, &sq, r, c, false, &name)?;
        add_sums(&mut channel, &sq, r, c, true, &name)?;
        // Per query-head channel (heads × head_dim), then grouped by head.
        let mut attn = vec![0.0; s.head[l].len() * hd];
        let name = format!("{p}.self_attn.q_proj.weight");
        let (sq, r, c) = squares(&vars, &name)?;
        add_sums(&mut attn, &sq, r, c, true, &name)?;
        add_sums(&mut channel, &sq, r, c, false, &name)?;
        let name = format!("{p}.self_attn.o_proj.weight");
        let (sq, r, c) = squares(&vars, &name)?;
        add_sums(&mut attn, &sq, r, c, false, &name)?;
        add_sums(&mut channel, &sq, r, c, true, &name)?;
        for m in ["k_proj", "v_proj"] {
            let name = format!("{p}.self_attn.{m}.weight");
            let (sq, r, c) = squares(&vars, &name)?;
            add_sums(&mut channel, &sq, r, c, false, &name)?;
        }
        s.neuron[l] = neuron.iter().map(|v| v.sqrt()).collect();
        s.head[l] = attn
            .chunks(hd.max(1))
            .map(|h| h.iter().sum::<f64>().sqrt())
            .collect();
    }
    s.channel = channel.iter().map(|v| v.sqrt()).collect();
    Ok(())
}
