//! What stays (pure): from importance scores and a target shape, the kept layers, embedding
//! channels, MLP neurons and attention heads. Top-k per axis, the same count in every layer,
//! `head_dim` and the KV groups kept, every group keeping the same number of heads. A parameter
//! budget is turned into a shape first ([`choose_shape`]).

use distillery_proto::shape::param_count;
use distillery_proto::v1::ModelShape;

use crate::model::LlamaConfig;

/// Why no plan could be made.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{0}")]
pub struct PlanError(pub String);

fn err<T>(m: impl Into<String>) -> Result<T, PlanError> {
    Err(PlanError(m.into()))
}

/// What a round asks for: any subset of the axes, or a parameter budget.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Target {
    pub hidden_size: Option<u32>,
    pub intermediate_size: Option<u32>,
    pub num_attention_heads: Option<u32>,
    pub num_layers: Option<u32>,
    /// Fraction of the source's parameters.
    pub params: Option<f64>,
    /// With a budget: drop layers rather than narrow the model.
    pub prefer_depth: bool,
}

/// Per-axis importance, higher = more important.
#[derive(Debug, Clone, PartialEq)]
pub struct Scores {
    /// `[layer][intermediate]`
    pub neuron: Vec<Vec<f64>>,
    /// `[layer][heads]`
    pub head: Vec<Vec<f64>>,
    /// `[hidden]`
    pub channel: Vec<f64>,
    /// `[layer]`
    pub depth: Vec<f64>,
}

/// What stays. Indices refer to the source model and are ascending.
#[derive(Debug, Clone, PartialEq)]
pub struct KeepPlan {
    pub layers: Vec<usize>,
    pub channels: Vec<usize>,
    /// Per kept layer, in `layers` order.
    pub neurons: Vec<Vec<usize>>,
    /// Per kept layer, in `layers` order.
    pub heads: Vec<Vec<usize>>,
    pub shape: ModelShape,
}

/// The shape of a model config, with its parameter count.
pub fn shape_of(c: &LlamaConfig) -> ModelShape {
    let mut s = ModelShape {
        hidden_size: c.hidden_size as u32,
        intermediate_size: c.intermediate_size as u32,
        num_attention_heads: c.num_attention_heads as u32,
        num_key_value_heads: c.num_kv_heads() as u32,
        num_layers: c.num_hidden_layers as u32,
        vocab_size: c.vocab_size as u32,
        tie_word_embeddings: c.tie_word_embeddings,
        params: 0,
        head_dim: c.head_dim() as u32,
        attention_bias: c.attention_bias,
        qk_norm: c.arch().qk_norm(),
        norms_per_layer: if c.arch().gemma() { 4 } else { 2 },
    };
    s.params = param_count(&s);
    s
}

fn with(src: &ModelShape, h: u32, i: u32, heads: u32, layers: u32) -> ModelShape {
    let mut s = *src;
    // The head dimension stays what it was, whatever hidden / heads becomes.
    s.head_dim = distillery_proto::shape::head_dim(src);
    s.hidden_size = h;
    s.intermediate_size = i;
    s.num_attention_heads = heads;
    s.num_layers = layers;
    s.params = param_count(&s);
    s
}

/// Width steps the budget search takes on an axis of size `dim` (Model-Optimizer searches
/// multiples of 64 on real models; tiny models get finer steps).
fn step(dim: u32) -> u32 {
    match dim {
        d if d >= 1024 => 64,
        d if d >= 256 => 32,
        _ => 8,
    }
}

/// Candidate sizes of a width axis: the source size and multiples of its step down to half.
fn candidates(dim: u32) -> Vec<u32> {
    let s = step(dim);
    let mut v = vec![dim];
    let mut x = dim / s * s;
    while x >= dim.div_ceil(2) && x > 0 {
        if x != dim {
            v.push(x);
        }
        x -= s;
    }
    v
}

/// The shape a round prunes to. Explicit axes are taken as given (missing ones keep the
/// source's size). A parameter budget searches, like Model-Optimizer's Minitron mode, the
/// allowed steps of hidden size, MLP width and heads (whole heads per KV group, each axis down to
/// half) for the largest model within budget, and among those within 1% of it the one whose
/// axes shrink most evenly; with `prefer_depth` it drops layers instead.
pub fn choose_shape(src: &ModelShape, t: &Target) -> Result<ModelShape, PlanError> {
    let kv = src.num_key_value_heads.max(1);
    let Some(frac) = t.params else {
        let s = with(
            src,
            t.hidden_size.unwrap_or(src.hidden_size),
            t.intermediate_size.unwrap_or(src.intermediate_size),
            t.num_attention_heads.unwrap_or(src.num_attention_heads),
            t.num_layers.unwrap_or(src.num_layers),
        );
        for (name, want, have) in [
            ("hidden_size", s.hidden_size, src.hidden_size),
            (
                "intermediate_size",
                s.intermediate_size,
                src.intermediate_size,
            ),
            (
                "num_attention_heads",
                s.num_attention_heads,
                src.num_attention_heads,
            ),
            ("num_layers", s.num_layers, src.num_layers),
        ] {
            if want == 0 || want > have {
                return err(format!(
                    "target {name} {want} must be between 1 and the source's {have}"
                ));
            }
        }
        if !s.num_attention_heads.is_multiple_of(kv) {
            return err(format!(
                "target num_attention_heads {} must divide evenly into {kv} KV groups",
                s.num_attention_heads
            ));
        }
        if !heads_divide_hidden(src, &s) {
            let n = s.num_attention_heads;
            let lower = s.hidden_size / n * n;
            return err(format!(
                "target hidden_size {} must be a multiple of num_attention_heads {n}, as in the \
                 source: transformers refuses a Llama or Gemma 3 config otherwise (try {lower} or {})",
                s.hidden_size,
                lower + n
            ));
        }
        return Ok(s);
    };
    if !(frac.is_finite() && frac > 0.0 && frac <= 1.0) {
        return err(format!("parameter budget {frac} must be in (0, 1]"));
    }
    let budget = (frac * src.params.max(param_count(src)) as f64).floor() as u64;
    if t.prefer_depth {
        let layers = (1..=src.num_layers).rev().find(|l| {
            param_count(&with(
                src,
                src.hidden_size,
                src.intermediate_size,
                src.num_attention_heads,
                *l,
            )) <= budget
        });
        return match layers {
            Some(l) => Ok(with(
                src,
                src.hidden_size,
                src.intermediate_size,
                src.num_attention_heads,
                l,
            )),
            None => err(format!(
                "even one layer exceeds the budget of {budget} parameters ({frac} of {})",
                src.params
            )),
        };
    }
    let per_group = src.num_attention_heads / kv;
    let head_choices: Vec<u32> = (per_group.div_ceil(2)..=per_group)
        .rev()
        .map(|g| g * kv)
        .collect();
    let mut feasible = Vec::new();
    for h in candidates(src.hidden_size) {
        for i in candidates(src.intermediate_size) {
            for heads in &head_choices {
                let s = with(src, h, i, *heads, src.num_layers);
                if s.params <= budget && heads_divide_hidden(src, &s) {
                    feasible.push(s);
                }
            }
        }
    }
    let Some(best) = feasible.iter().map(|s| s.params).max() else {
        return err(format!(
            "no width-pruned shape (each axis down to half) fits {frac} of the source's {} parameters; use a larger budget, explicit axes, or prefer = \"depth\"",
            src.params
        ));
    };
    let shrink = |s: &ModelShape| {
        let r = [
            f64::from(s.hidden_size) / f64::from(src.hidden_size),
            f64::from(s.intermediate_size) / f64::from(src.intermediate_size),
            f64::from(s.num_attention_heads) / f64::from(src.num_attention_heads),
        ];
        r.iter().cloned().fold(f64::MIN, f64::max) - r.iter().cloned().fold(f64::MAX, f64::min)
    };
    feasible
        .into_iter()
        .filter(|s| s.params as f64 >= 0.99 * best as f64)
        .min_by(|a, b| {
            shrink(a)
                .total_cmp(&shrink(b))
                .then(b.params.cmp(&a.params))
        })
        .ok_or_else(|| PlanError("no feasible shape".into()))
}

/// How far from the budget, either way, a candidate of the architecture search may be.
pub const SEARCH_TOLERANCE: f64 = 0.05;

/// Every shape the candidate search may propose for a budget of `frac` of the source's
/// parameters, best-fitting first: the width steps of [`choose_shape`] (hidden size, MLP width,
/// whole heads per KV group, each axis down to half) crossed with the layer count (down to half),
/// within [`SEARCH_TOLERANCE`] of the budget. Ordered by distance to the budget, then by how
/// evenly the width axes shrink, then more layers first (deterministic: equal keys keep the
/// enumeration order).
pub fn fitting_shapes(src: &ModelShape, frac: f64) -> Result<Vec<ModelShape>, PlanError> {
    if !(frac.is_finite() && frac > 0.0 && frac <= 1.0) {
        return err(format!("parameter budget {frac} must be in (0, 1]"));
    }
    let kv = src.num_key_value_heads.max(1);
    let budget = frac * src.params.max(param_count(src)) as f64;
    let per_group = src.num_attention_heads / kv;
    let head_choices: Vec<u32> = (per_group.div_ceil(2)..=per_group)
        .rev()
        .map(|g| g * kv)
        .collect();
    let layer_choices: Vec<u32> = (src.num_layers.div_ceil(2).max(1)..=src.num_layers)
        .rev()
        .collect();
    let mut fit = Vec::new();
    for layers in &layer_choices {
        for h in candidates(src.hidden_size) {
            for i in candidates(src.intermediate_size) {
                for heads in &head_choices {
                    let s = with(src, h, i, *heads, *layers);
                    let off = (s.params as f64 - budget).abs() / budget;
                    if off <= SEARCH_TOLERANCE && heads_divide_hidden(src, &s) {
                        fit.push((off, s));
                    }
                }
            }
        }
    }
    let uneven = |s: &ModelShape| {
        let r = [
            f64::from(s.hidden_size) / f64::from(src.hidden_size),
            f64::from(s.intermediate_size) / f64::from(src.intermediate_size),
            f64::from(s.num_attention_heads) / f64::from(src.num_attention_heads),
        ];
        r.iter().cloned().fold(f64::MIN, f64::max) - r.iter().cloned().fold(f64::MAX, f64::min)
    };
    fit.sort_by(|(oa, a), (ob, b)| {
        oa.total_cmp(ob)
            .then(uneven(a).total_cmp(&uneven(b)))
            .then(b.num_layers.cmp(&a.num_layers))
    });
    Ok(fit.into_iter().map(|(_, s)| s).collect())
}

/// The `k` shapes a round's candidate search distills: from [`fitting_shapes`], the best-fitting
/// shape of each layer count first (so depth and width are both tried, best fit first), then the
/// next best-fitting ones. Fewer than `k` fitting shapes is an error that says how many fit.
pub fn search_candidates(
    src: &ModelShape,
    frac: f64,
    k: usize,
) -> Result<Vec<ModelShape>, PlanError> {
    let all = fitting_shapes(src, frac)?;
    if all.len() < k {
        return err(format!(
            "only {} shape(s) of the source ({}/{}/{}/{} hidden/intermediate/heads/layers, {} \
             parameters) are within {:.0}% of the budget of {frac}: ask for at most {} candidates \
             or change target.params",
            all.len(),
            src.hidden_size,
            src.intermediate_size,
            src.num_attention_heads,
            src.num_layers,
            src.params.max(param_count(src)),
            SEARCH_TOLERANCE * 100.0,
            all.len()
        ));
    }
    let mut picked: Vec<usize> = Vec::with_capacity(k);
    let mut depths = std::collections::BTreeSet::new();
    for (i, s) in all.iter().enumerate() {
        if picked.len() < k && depths.insert(s.num_layers) {
            picked.push(i);
        }
    }
    for i in 0..all.len() {
        if picked.len() >= k {
            break;
        }
        if !picked.contains(&i) {
            picked.push(i);
        }
    }
    // Best fit first, whatever pass picked it.
    picked.sort_unstable();
    Ok(picked.into_iter().map(|i| all[i]).collect())
}

/// transformers 5 refuses Llama and Gemma 3 configs whose hidden size is not a multiple of the
/// head count (strict config validation), even with an explicit `head_dim`. A source that
/// satisfies it keeps it; one that does not is of an architecture without the rule.
fn heads_divide_hidden(src: &ModelShape, s: &ModelShape) -> bool {
    let holds = |x: &ModelShape| {
        x.num_attention_heads > 0 && x.hidden_size.is_multiple_of(x.num_attention_heads)
    };
    !holds(src) || holds(s)
}

/// The `k` highest-scoring indices (ties: lower index first), ascending.
pub fn top_k(scores: &[f64], k: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..scores.len()).collect();
    idx.sort_by(|a, b| scores[*b].total_cmp(&scores[*a]).then(a.cmp(b)));
    idx.truncate(k);
    idx.sort_unstable();
    idx
}

/// Chooses what stays to reach `target` from `src` given `scores`.
pub fn plan(src: &ModelShape, scores: &Scores, target: &ModelShape) -> Result<KeepPlan, PlanError> {
    let (l, h) = (src.num_layers as usize, src.hidden_size as usize);
    let (nh, kv) = (
        src.num_attention_heads as usize,
        src.num_key_value_heads.max(1) as usize,
    );
    let ok = scores.neuron.len() == l
        && scores.head.len() == l
        && scores.depth.len() == l
        && scores.channel.len() == h
        && scores
            .neuron
            .iter()
            .all(|n| n.len() == src.intermediate_size as usize)
        && scores.head.iter().all(|x| x.len() == nh);
    if !ok {
        return err("the scores do not match the source model's shape (were they computed on another model?)");
    }
    let (th, ti, tnh, tl) = (
        target.hidden_size as usize,
        target.intermediate_size as usize,
        target.num_attention_heads as usize,
        target.num_layers as usize,
    );
    if th > h
        || ti > src.intermediate_size as usize
        || tnh > nh
        || tl > l
        || !tnh.is_multiple_of(kv)
    {
        return err(format!(
            "target shape {th}/{ti}/{tnh}/{tl} (hidden/intermediate/heads/layers) is not a pruning of {h}/{}/{nh}/{l} with {kv} KV groups",
            src.intermediate_size
        ));
    }
    let layers = top_k(&scores.depth, tl);
    let per_group = nh / kv;
    let keep_per_group = tnh / kv;
    let heads = layers
        .iter()
        .map(|&li| {
            (0..kv)
                .flat_map(|g| {
                    let group = &scores.head[li][g * per_group..(g + 1) * per_group];
                    top_k(group, keep_per_group)
                        .into_iter()
                        .map(move |j| g * per_group + j)
                })
                .collect()
        })
        .collect();
    Ok(KeepPlan {
        neurons: layers
            .iter()
            .map(|&li| top_k(&scores.neuron[li], ti))
            .collect(),
        heads,
        channels: top_k(&scores.channel, th),
        layers,
        shape: *target,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn smollm() -> ModelShape {
        let mut s = ModelShape {
            hidden_size: 576,
            intermediate_size: 1536,
            num_attention_heads: 9,
            num_key_value_heads: 3,
            num_layers: 30,
            vocab_size: 49152,
            tie_word_embeddings: true,
            ..Default::default()
        };
        s.params = param_count(&s);
        s
    }

    /// An independent enumeration of the search space: every combination of the axes' allowed
    /// sizes, filtered by the budget window, for comparison with `fitting_shapes`.
    fn brute_force_fits(src: &ModelShape, frac: f64) -> Vec<(u32, u32, u32, u32)> {
        let budget = frac * src.params as f64;
        let mut v = Vec::new();
        for l in 1..=src.num_layers {
            for h in 1..=src.hidden_size {
                for i in 1..=src.intermediate_size {
                    for heads in 1..=src.num_attention_heads {
                        let ok_axes = l * 2 >= src.num_layers
                            && candidates(src.hidden_size).contains(&h)
                            && candidates(src.intermediate_size).contains(&i)
                            && heads % src.num_key_value_heads == 0
                            && heads * 2 >= src.num_attention_heads
                            && h % heads == 0;
                        if !ok_axes {
                            continue;
                        }
                        let s = with(src, h, i, heads, l);
                        if (s.params as f64 - budget).abs() <= 0.05 * budget {
                            v.push((h, i, heads, l));
                        }
                    }
                }
            }
        }
        v.sort_unstable();
        v
    }

    fn tiny() -> ModelShape {
        let mut s = ModelShape {
            hidden_size: 64,
            intermediate_size: 128,
            num_attention_heads: 8,
            num_key_value_heads: 2,
            num_layers: 4,
            vocab_size: 256,
            tie_word_embeddings: true,
            ..Default::default()
        };
        s.params = param_count(&s);
        s
    }

    #[test]
    fn the_search_proposes_every_fitting_shape_within_five_percent_best_fit_first() {
        for (src, frac) in [(tiny(), 0.7), (tiny(), 0.5), (smollm(), 0.7)] {
            let all = fitting_shapes(&src, frac).unwrap();
            let mut got: Vec<_> = all
                .iter()
                .map(|s| {
                    (
                        s.hidden_size,
                        s.intermediate_size,
                        s.num_attention_heads,
                        s.num_layers,
                    )
                })
                .collect();
            got.sort_unstable();
            if src.num_layers <= 4 {
                assert_eq!(got, brute_force_fits(&src, frac), "{frac}");
            }
            let budget = frac * src.params as f64;
            let off: Vec<f64> = all
                .iter()
                .map(|s| (s.params as f64 - budget).abs() / budget)
                .collect();
            assert!(off.iter().all(|o| *o <= SEARCH_TOLERANCE), "{off:?}");
            assert!(off.windows(2).all(|w| w[0] <= w[1]), "best fit first");
            for s in &all {
                assert_eq!(s.params, param_count(s));
                assert_eq!(s.num_attention_heads % src.num_key_value_heads, 0);
            }
        }
    }

    #[test]
    fn search_candidates_span_depth_and_width_and_refuse_more_than_fit() {
        let src = tiny();
        let all = fitting_shapes(&src, 0.7).unwrap();
        let k3 = search_candidates(&src, 0.7, 3).unwrap();
        assert_eq!(k3.len(), 3);
        assert_eq!(k3[0], all[0], "the best fit is always a candidate");
        let depths: std::collections::BTreeSet<u32> = k3.iter().map(|s| s.num_layers).collect();
        let available: std::collections::BTreeSet<u32> = all.iter().map(|s| s.num_layers).collect();
        assert_eq!(depths.len(), available.len().min(3), "{k3:?}");
        // Distinct shapes, deterministic.
        assert!(k3.windows(2).all(|w| w[0] != w[1]));
        assert_eq!(k3, search_candidates(&src, 0.7, 3).unwrap());
        let too_many = search_candidates(&src, 0.7, all.len() + 1).unwrap_err();
        assert!(
            too_many
                .to_string()
                .contains(&format!("ask for at most {} candidates", all.len())),
            "{too_many}"
        );
        assert_eq!(
            search_candidates(&src, 0.7, all.len()).unwrap().len(),
            all.len()
        );
    }

    #[test]
    fn top_k_keeps_the_highest_in_source_order_and_breaks_ties_by_index() {
        assert_eq!(top_k(&[0.1, 5.0, 3.0, 5.0, 0.0], 3), vec![1, 2, 3]);
        assert_eq!(top_k(&[1.0, 1.0, 1.0], 2), vec![0, 1]);
        assert_eq!(top_k(&[f64::NAN, 1.0, 2.0], 2), vec![0, 2]);
    }

    #[test]
    fn heads_are_ranked_within_their_kv_group_and_every_group_keeps_the_same_count() {
        let src = ModelShape {
            hidden_size: 8,
            intermediate_size: 4,
            num_attention_heads: 6,
            num_key_value_heads: 2,
            num_layers: 2,
            vocab_size: 10,
            ..Default::default()
        };
        // Group 0 = heads 0..3, group 1 = heads 3..6. Globally the three best heads are all in
        // group 0, but each group must keep two.
        let scores = Scores {
            neuron: vec![vec![1.0, 0.0, 3.0, 2.0], vec![0.0, 1.0, 2.0, 3.0]],
            head: vec![vec![9.0, 8.0, 7.0, 1.0, 3.0, 2.0]; 2],
            channel: (0..8).map(f64::from).collect(),
            depth: vec![0.5, 0.1],
        };
        let target = with(&src, 5, 2, 4, 1);
        let p = plan(&src, &scores, &target).unwrap();
        assert_eq!(p.layers, vec![0]);
        assert_eq!(p.heads, vec![vec![0, 1, 4, 5]]);
        assert_eq!(p.neurons, vec![vec![2, 3]]);
        assert_eq!(p.channels, vec![3, 4, 5, 6, 7]);
        // Heads that do not divide into the groups are refused.
        assert!(plan(&src, &scores, &with(&src, 8, 4, 3, 2)).is_err());
    }

    #[test]
    fn explicit_targets_fill_missing_axes_from_the_source() {
        let src = smollm();
        let s = choose_shape(
            &src,
            &Target {
                hidden_size: Some(504),
                num_layers: Some(26),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(
            (
                s.hidden_size,
                s.intermediate_size,
                s.num_attention_heads,
                s.num_layers
            ),
            (504, 1536, 9, 26)
        );
        // transformers refuses a Llama whose hidden size is not a multiple of its heads.
        let e = choose_shape(
            &src,
            &Target {
                hidden_size: Some(512),
                ..Default::default()
            },
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("multiple of num_attention_heads 9") && e.contains("504"),
            "{e}"
        );
        assert_eq!(s.head_dim, 64);
        let e = choose_shape(
            &src,
            &Target {
                num_attention_heads: Some(8),
                ..Default::default()
            },
        )
        .unwrap_err();
        assert!(e.0.contains("3 KV groups"), "{e}");
    }

    #[test]
    fn a_parameter_budget_picks_the_largest_balanced_width_shape_within_it() {
        let src = smollm();
        let s = choose_shape(
            &src,
            &Target {
                params: Some(0.7),
                ..Default::default()
            },
        )
        .unwrap();
        let budget = (0.7 * src.params as f64) as u64;
        assert!(s.params <= budget, "{} > {budget}", s.params);
        assert!(s.params as f64 > 0.68 * src.params as f64, "{}", s.params);
        assert_eq!(s.num_layers, 30, "width is preferred");
        assert_eq!(s.hidden_size % 32, 0);
        assert_eq!(s.intermediate_size % 64, 0);
        assert_eq!(s.num_attention_heads % 3, 0);
        // Depth when asked: the most layers that fit, width untouched.
        let d = choose_shape(
            &src,
            &Target {
                params: Some(0.7),
                prefer_depth: true,
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!((d.hidden_size, d.intermediate_size), (576, 1536));
        assert!(d.params <= budget);
        let one_more = with(&src, 576, 1536, 9, d.num_layers + 1);
        assert!(one_more.params > budget);
        // A budget no half-width model meets is refused with the way out.
        let e = choose_shape(
            &src,
            &Target {
                params: Some(0.1),
                ..Default::default()
            },
        )
        .unwrap_err();
        assert!(e.0.contains("prefer = \"depth\""), "{e}");
    }
}
