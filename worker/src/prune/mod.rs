//! Minitron structured pruning: importance from forward passes ([`importance`]), what stays
//! ([`plan`], pure), and slicing the weights ([`apply`]).

pub mod apply;
pub mod importance;
pub mod plan;

use importance::{DepthScores, Importance};
use plan::Scores;

/// Per-axis scores from merged accumulators. Depth comes from the perplexity increase when a
/// layer is skipped if `depth` covers every layer, else from Block Importance.
pub fn scores(imp: &Importance, depth: &[DepthScores]) -> Result<Scores, String> {
    let layers = imp.bi_sum.len();
    let by_ppl = if depth.is_empty() {
        None
    } else {
        let mut d = vec![None; layers];
        for s in depth {
            for (l, p) in s.layers.iter().zip(&s.ppl_skip) {
                let slot = d.get_mut(*l).ok_or_else(|| {
                    format!("depth scores name layer {l} of a {layers}-layer model")
                })?;
                *slot = Some(p - s.ppl_full);
            }
        }
        let missing: Vec<usize> = (0..layers).filter(|l| d[*l].is_none()).collect();
        if !missing.is_empty() {
            return Err(format!("no perplexity depth score for layers {missing:?}"));
        }
        Some(d.into_iter().flatten().collect())
    };
    Ok(Scores {
        neuron: imp.neuron_scores(),
        head: imp.head_scores(),
        channel: imp.channel_scores(),
        depth: by_ppl.unwrap_or_else(|| imp.block_importance()),
    })
}

#[cfg(test)]
mod tests;
