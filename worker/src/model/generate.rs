//! Text generation: greedy or sampled (temperature, top-k, top-p, min-p, repetition penalty,
//! applied in transformers' order) with a seed, stop tokens, a token budget, log-probabilities,
//! and a KV cache so each new token costs one position of compute. A caller sees every token as
//! it is chosen and can end generation early (a stop string, a client that went away).

use candle_core::{DType, IndexOp, Result, Tensor};
use rand::{Rng, SeedableRng};

use super::llama::{KvCache, Llama};

/// How to pick tokens.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    pub max_tokens: usize,
    /// 0 = greedy.
    pub temperature: f64,
    /// Nucleus: sample from the smallest set of tokens whose probability reaches this.
    pub top_p: f64,
    /// Sample from the `top_k` most likely tokens only; 0 = all.
    pub top_k: usize,
    /// Drop tokens less likely than `min_p` times the most likely one; 0 = off.
    pub min_p: f64,
    /// CTRL's penalty on every token already in the prompt or the output (transformers'
    /// `repetition_penalty`); 1 = off. Also applies to greedy decoding.
    pub repetition_penalty: f64,
    pub seed: u64,
    /// Generation ends after any of these (it is included in the output).
    pub stop: Vec<u32>,
    /// `Some(n)`: report each chosen token's log-probability and the `n` most likely
    /// alternatives (the model's own distribution: raw logits, before temperature or penalties).
    pub logprobs: Option<usize>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            max_tokens: 64,
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            seed: 0,
            stop: Vec::new(),
            logprobs: None,
        }
    }
}

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// A stop token.
    Stop,
    /// The token budget.
    Length,
    /// The caller said so (a stop string, a cancelled request).
    Halted,
}

/// A token and its log-probability.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TokenLogprob {
    pub token: u32,
    pub logprob: f32,
}

/// One chosen token, as the caller of [`generate_with`] sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct Step {
    pub token: u32,
    /// Its log-probability, when [`SamplingParams::logprobs`] asks.
    pub logprob: Option<f32>,
    /// The most likely tokens at this position, best first (as many as asked).
    pub top: Vec<TokenLogprob>,
}

/// Generated tokens (the prompt excluded).
#[derive(Debug, Clone, PartialEq)]
pub struct Generation {
    pub tokens: Vec<u32>,
    pub finish: FinishReason,
}

/// Generates with a KV cache.
pub fn generate(model: &Llama, prompt: &[u32], p: &SamplingParams) -> Result<Generation> {
    generate_with(model, prompt, p, |_| true)
}

/// Generates with a KV cache, calling `on_step` with every token that is not a stop token;
/// generation ends ([`FinishReason::Halted`]) when it returns false.
pub fn generate_with(
    model: &Llama,
    prompt: &[u32],
    p: &SamplingParams,
    on_step: impl FnMut(&Step) -> bool,
) -> Result<Generation> {
    let mut cache = KvCache::default();
    run(
        prompt,
        p,
        |seq| {
            // Only the positions the cache has not seen: the whole prompt first, then one token.
            let new = &seq[cache.len()..];
            let ids = Tensor::new(new, model.device())?.unsqueeze(0)?;
            let logits = model.forward_cached(&ids, &mut cache)?;
            logits.i((0, new.len() - 1))
        },
        on_step,
    )
}

/// Generates by running the whole sequence again for every token: the reference the cached
/// path must match.
pub fn generate_uncached(model: &Llama, prompt: &[u32], p: &SamplingParams) -> Result<Generation> {
    run(
        prompt,
        p,
        |seq| {
            let ids = Tensor::new(seq, model.device())?.unsqueeze(0)?;
            let logits = model.forward(&ids)?;
            logits.i((0, seq.len() - 1))
        },
        |_| true,
    )
}

fn run(
    prompt: &[u32],
    p: &SamplingParams,
    mut next_logits: impl FnMut(&[u32]) -> Result<Tensor>,
    mut on_step: impl FnMut(&Step) -> bool,
) -> Result<Generation> {
    if prompt.is_empty() {
        return Err(candle_core::Error::Msg(
            "generation needs a non-empty prompt".into(),
        ));
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(p.seed);
    let mut seq = prompt.to_vec();
    let mut out = Vec::new();
    // Which tokens the repetition penalty applies to (the prompt and everything generated).
    let mut seen: Vec<bool> = Vec::new();
    while out.len() < p.max_tokens {
        let mut logits: Vec<f32> = next_logits(&seq)?.to_dtype(DType::F32)?.to_vec1()?;
        let (logprob, top) = match p.logprobs {
            Some(n) => {
                let lp = log_softmax(&logits);
                let top = top_n(&lp, n);
                (Some(lp), top)
            }
            None => (None, Vec::new()),
        };
        if p.repetition_penalty != 1.0 {
            if seen.is_empty() {
                seen = vec![false; logits.len()];
                for &t in &seq {
                    if let Some(s) = seen.get_mut(t as usize) {
                        *s = true;
                    }
                }
            }
            penalize(&mut logits, &seen, p.repetition_penalty);
        }
        let tok = sample(&logits, p, &mut rng);
        out.push(tok);
        seq.push(tok);
        if let Some(s) = seen.get_mut(tok as usize) {
            *s = true;
        }
        if p.stop.contains(&tok) {
            return Ok(Generation {
                tokens: out,
                finish: FinishReason::Stop,
            });
        }
        let step = Step {
            token: tok,
            logprob: logprob
                .as_ref()
                .and_then(|lp| lp.get(tok as usize).copied()),
            top,
        };
        if !on_step(&step) {
            return Ok(Generation {
                tokens: out,
                finish: FinishReason::Halted,
            });
        }
    }
    Ok(Generation {
        tokens: out,
        finish: FinishReason::Length,
    })
}

/// transformers' `RepetitionPenaltyLogitsProcessor`: a seen token's logit is divided by the
/// penalty when positive, multiplied when negative.
fn penalize(logits: &mut [f32], seen: &[bool], penalty: f64) {
    for (l, s) in logits.iter_mut().zip(seen) {
        if *s {
            let v = *l as f64;
            *l = if v < 0.0 { v * penalty } else { v / penalty } as f32;
        }
    }
}

/// Log-probabilities of one position's logits (computed in f64).
pub fn log_softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let sum: f64 = logits.iter().map(|&v| (v as f64 - max).exp()).sum();
    let lse = max + sum.ln();
    logits.iter().map(|&v| (v as f64 - lse) as f32).collect()
}

/// The `n` most likely tokens, best first (ties: the lower id first).
pub fn top_n(logprobs: &[f32], n: usize) -> Vec<TokenLogprob> {
    let mut ids: Vec<u32> = (0..logprobs.len() as u32).collect();
    let order = |a: &u32, b: &u32| {
        logprobs[*b as usize]
            .total_cmp(&logprobs[*a as usize])
            .then(a.cmp(b))
    };
    let n = n.min(ids.len());
    if n == 0 {
        return Vec::new();
    }
    if n < ids.len() {
        ids.select_nth_unstable_by(n - 1, order);
        ids.truncate(n);
    }
    ids.sort_by(order);
    ids.into_iter()
        .map(|token| TokenLogprob {
            token,
            logprob: logprobs[token as usize],
        })
        .collect()
}

/// Picks the next token from one position's logits: argmax when greedy, else temperature, then
/// top-k, top-p and min-p (transformers' order), then a draw from what is left.
pub fn sample(logits: &[f32], p: &SamplingParams, rng: &mut impl Rng) -> u32 {
    let argmax = || {
        logits
            .iter()
            .enumerate()
            .fold((0usize, f32::NEG_INFINITY), |best, (i, &v)| {
                if v > best.1 {
                    (i, v)
                } else {
                    best
                }
            })
            .0 as u32
    };
    if p.temperature <= 0.0 {
        return argmax();
    }
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let mut probs: Vec<(usize, f64)> = logits
        .iter()
        .enumerate()
        .map(|(i, &v)| (i, ((v as f64 - max) / p.temperature).exp()))
        .collect();
    probs.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    if p.top_k > 0 && p.top_k < probs.len() {
        probs.truncate(p.top_k);
    }
    let total: f64 = probs.iter().map(|x| x.1).sum();
    let mut kept = Vec::new();
    let mut mass = 0.0;
    for (i, w) in probs {
        kept.push((i, w));
        mass += w / total;
        if mass >= p.top_p {
            break;
        }
    }
    if p.min_p > 0.0 {
        let best = kept.first().map_or(0.0, |x| x.1);
        kept.retain(|x| x.1 >= p.min_p * best);
    }
    let kept_total: f64 = kept.iter().map(|x| x.1).sum();
    let mut u = rng.gen::<f64>() * kept_total;
    for (i, w) in &kept {
        if u < *w {
            return *i as u32;
        }
        u -= w;
    }
    kept.last().map_or_else(argmax, |x| x.0 as u32)
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;
    use crate::model::max_abs_diff;

    fn model() -> Llama {
        // Seeded weights: the same model on every run.
        let spec = crate::model::test_model::TestModelSpec {
            seed: 1,
            ..Default::default()
        };
        crate::model::test_model::test_model(&spec, DType::F32, &Device::Cpu).unwrap()
    }

    #[test]
    fn the_kv_cache_generates_exactly_the_uncached_tokens() {
        let m = model();
        let prompt = [3u32, 17, 5, 9];
        for p in [
            SamplingParams {
                max_tokens: 12,
                ..Default::default()
            },
            SamplingParams {
                max_tokens: 12,
                temperature: 0.9,
                top_p: 0.8,
                top_k: 50,
                min_p: 0.01,
                repetition_penalty: 1.3,
                seed: 7,
                stop: vec![],
                logprobs: Some(3),
            },
        ] {
            let a = generate(&m, &prompt, &p).unwrap();
            let b = generate_uncached(&m, &prompt, &p).unwrap();
            assert_eq!(a, b);
            assert_eq!(a.tokens.len(), 12);
        }
        // The cached logits themselves match the full pass at every position.
        let ids: Vec<u32> = vec![1, 2, 3, 4, 5, 6, 7];
        let full = m
            .forward(
                &Tensor::new(ids.as_slice(), &Device::Cpu)
                    .unwrap()
                    .unsqueeze(0)
                    .unwrap(),
            )
            .unwrap();
        let mut cache = KvCache::default();
        let first = m
            .forward_cached(
                &Tensor::new(&ids[..4], &Device::Cpu)
                    .unwrap()
                    .unsqueeze(0)
                    .unwrap(),
                &mut cache,
            )
            .unwrap();
        let rest = m
            .forward_cached(
                &Tensor::new(&ids[4..], &Device::Cpu)
                    .unwrap()
                    .unsqueeze(0)
                    .unwrap(),
                &mut cache,
            )
            .unwrap();
        let both = Tensor::cat(&[&first, &rest], 1).unwrap();
        let d = max_abs_diff(&both, &full).unwrap();
        assert!(d < 1e-5, "cached vs full logits differ by {d}");
        assert_eq!(cache.len(), 7);
    }

    #[test]
    fn seeds_stop_tokens_and_budgets_behave() {
        let m = model();
        let p = SamplingParams {
            max_tokens: 20,
            temperature: 1.0,
            seed: 1,
            ..Default::default()
        };
        let a = generate(&m, &[1, 2], &p).unwrap();
        assert_eq!(
            a,
            generate(&m, &[1, 2], &p).unwrap(),
            "same seed, same tokens"
        );
        let other = generate(
            &m,
            &[1, 2],
            &SamplingParams {
                seed: 2,
                ..p.clone()
            },
        )
        .unwrap();
        assert_ne!(a.tokens, other.tokens, "another seed samples differently");
        let stop = a.tokens[3];
        let s = generate(
            &m,
            &[1, 2],
            &SamplingParams {
                stop: vec![stop],
                ..p.clone()
            },
        )
        .unwrap();
        assert_eq!(s.finish, FinishReason::Stop);
        assert_eq!(*s.tokens.last().unwrap(), stop);
        assert!(s.tokens.len() <= 4);
        assert!(generate(&m, &[], &p).is_err());
    }

    #[test]
    fn top_p_keeps_only_the_nucleus() {
        // Probabilities ~ [0.64, 0.24, 0.09, 0.03]: top_p 0.5 leaves only token 0.
        let logits = [3.0f32, 2.0, 1.0, 0.0];
        let p = SamplingParams {
            temperature: 1.0,
            top_p: 0.5,
            ..Default::default()
        };
        let mut rng = rand::rngs::StdRng::seed_from_u64(0);
        assert!((0..200).all(|_| sample(&logits, &p, &mut rng) == 0));
        let p = SamplingParams {
            temperature: 1.0,
            top_p: 1.0,
            ..Default::default()
        };
        let seen: std::collections::BTreeSet<u32> =
            (0..2000).map(|_| sample(&logits, &p, &mut rng)).collect();
        assert_eq!(seen.len(), 4);
    }

    #[test]
    fn top_k_and_min_p_cut_the_tail() {
        let logits = [3.0f32, 2.0, 1.0, 0.0];
        let mut rng = rand::rngs::StdRng::seed_from_u64(0);
        let seen = |p: &SamplingParams, rng: &mut rand::rngs::StdRng| {
            (0..2000)
                .map(|_| sample(&logits, p, rng))
                .collect::<std::collections::BTreeSet<u32>>()
        };
        let base = SamplingParams {
            temperature: 1.0,
            ..Default::default()
        };
        let k2 = SamplingParams {
            top_k: 2,
            ..base.clone()
        };
        assert_eq!(seen(&k2, &mut rng).into_iter().collect::<Vec<_>>(), [0, 1]);
        // p(2)/p(0) = e^-2 ~ 0.135, p(3)/p(0) ~ 0.05: min_p 0.1 keeps three.
        let m = SamplingParams {
            min_p: 0.1,
            ..base.clone()
        };
        assert_eq!(
            seen(&m, &mut rng).into_iter().collect::<Vec<_>>(),
            [0, 1, 2]
        );
    }

    #[test]
    fn the_repetition_penalty_is_transformers_and_applies_to_greedy_decoding() {
        let mut logits = vec![2.0f32, -1.0, 0.5, 3.0];
        penalize(&mut logits, &[true, true, false, false], 2.0);
        assert_eq!(logits, [1.0, -2.0, 0.5, 3.0]);
        // Greedy with a strong penalty never repeats a token while unseen ones are left.
        let m = model();
        let p = SamplingParams {
            max_tokens: 12,
            repetition_penalty: 1e6,
            ..Default::default()
        };
        let prompt = [1u32, 2];
        let g = generate(&m, &prompt, &p).unwrap();
        let mut all: Vec<u32> = prompt.to_vec();
        all.extend(&g.tokens);
        let distinct: std::collections::BTreeSet<u32> = all.iter().copied().collect();
        assert_eq!(distinct.len(), all.len(), "{all:?}");
        assert_eq!(g, generate_uncached(&m, &prompt, &p).unwrap());
    }

    #[test]
    fn logprobs_are_the_models_distribution_and_the_caller_can_halt() {
        let m = model();
        let prompt = [5u32, 6, 7];
        let p = SamplingParams {
            max_tokens: 6,
            logprobs: Some(3),
            ..Default::default()
        };
        let mut steps = Vec::new();
        let g = generate_with(&m, &prompt, &p, |s| {
            steps.push(s.clone());
            steps.len() < 4
        })
        .unwrap();
        assert_eq!(g.finish, FinishReason::Halted);
        assert_eq!(g.tokens.len(), 4);
        // The first step against an independent computation from the full forward pass.
        let x = Tensor::new(&prompt[..], &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let last: Vec<f32> = m.forward(&x).unwrap().i((0, 2)).unwrap().to_vec1().unwrap();
        let z: f64 = last.iter().map(|&v| (v as f64).exp()).sum();
        let s = &steps[0];
        let want = (last[s.token as usize] as f64 - z.ln()) as f32;
        assert!((s.logprob.unwrap() - want).abs() < 1e-4);
        // Greedy: the chosen token is the most likely one; the top list is sorted.
        for s in &steps {
            assert_eq!(s.top.len(), 3);
            assert_eq!(s.top[0].token, s.token);
            assert_eq!(Some(s.top[0].logprob), s.logprob);
            assert!(s.top.windows(2).all(|w| w[0].logprob >= w[1].logprob));
        }
        assert_eq!(steps.iter().map(|s| s.token).collect::<Vec<_>>(), g.tokens);
        assert_eq!(top_n(&[0.0, -1.0, -0.5], 0), []);
        assert_eq!(top_n(&[0.0, -1.0, -0.5], 9).len(), 3);
    }
}
