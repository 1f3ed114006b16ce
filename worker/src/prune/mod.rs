//! Minitron structured pruning: importance from forward passes ([`importance`]), what stays
//! ([`plan`], pure), and slicing the weights ([`apply`]).

pub mod apply;
pub mod baseline;
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

/// Taylor+ (Shortened LLaMA, Kim et al. 2024) never removes the first four and the last two
/// blocks.
pub const TAYLOR_KEEP_FIRST: usize = 4;
pub const TAYLOR_KEEP_LAST: usize = 2;

/// How many of `layers` blocks Taylor+ may remove.
pub fn taylor_droppable(layers: usize) -> usize {
    layers.saturating_sub(TAYLOR_KEEP_FIRST + TAYLOR_KEEP_LAST)
}

/// Taylor+ depth scores: the Taylor block scores with the first four and last two blocks
/// raised to +inf, so no plan drops them.
pub fn taylor_plus(block: &[f64]) -> Vec<f64> {
    let n = block.len();
    block
        .iter()
        .enumerate()
        .map(|(l, s)| {
            if l < TAYLOR_KEEP_FIRST || l + TAYLOR_KEEP_LAST >= n {
                f64::INFINITY
            } else {
                *s
            }
        })
        .collect()
}

/// [`scores`] with Taylor+ depth: the merged Taylor sums of `imp` against the weights of
/// `model` (the model that was scored).
pub fn scores_by_taylor(imp: &Importance, model: &crate::model::Llama) -> Result<Scores, String> {
    let mut s = scores(imp, &[])?;
    s.depth = taylor_plus(&imp.taylor_block_scores(model)?);
    Ok(s)
}

#[cfg(test)]
mod tests;
