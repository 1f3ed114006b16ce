//! Text generation: greedy or temperature / top-p sampling with a seed, stop tokens, a token
//! budget, and a KV cache so each new token costs one position of compute.

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
    pub seed: u64,
    /// Generation ends after any of these (it is included in the output).
    pub stop: Vec<u32>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            max_tokens: 64,
            temperature: 0.0,
            top_p: 1.0,
            seed: 0,
            stop: Vec::new(),
        }
    }
}

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    Stop,
    Length,
}

/// Generated tokens (the prompt excluded).
#[derive(Debug, Clone, PartialEq)]
pub struct Generation {
    pub tokens: Vec<u32>,
    pub finish: FinishReason,
}

/// Generates with a KV cache.
pub fn generate(model: &Llama, prompt: &[u32], p: &SamplingParams) -> Result<Generation> {
    let mut cache = KvCache::default();
    run(prompt, p, |seq| {
        // Only the positions the cache has not seen: the whole prompt first, then one token.
        let new = &seq[cache.len()..];
        let ids = Tensor::new(new, model.device())?.unsqueeze(0)?;
        let logits = model.forward_cached(&ids, &mut cache)?;
        logits.i((0, new.len() - 1))
    })
}

/// Generates by running the whole sequence again for every token: the reference the cached
/// path must match.
pub fn generate_uncached(model: &Llama, prompt: &[u32], p: &SamplingParams) -> Result<Generation> {
    run(prompt, p, |seq| {
        let ids = Tensor::new(seq, model.device())?.unsqueeze(0)?;
        let logits = model.forward(&ids)?;
        logits.i((0, seq.len() - 1))
    })
}

fn run(
    prompt: &[u32],
    p: &SamplingParams,
    mut next_logits: impl FnMut(&[u32]) -> Result<Tensor>,
) -> Result<Generation> {
    if prompt.is_empty() {
        return Err(candle_core::Error::Msg(
            "generation needs a non-empty prompt".into(),
        ));
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(p.seed);
    let mut seq = prompt.to_vec();
    let mut out = Vec::new();
    while out.len() < p.max_tokens {
        let logits: Vec<f32> = next_logits(&seq)?.to_dtype(DType::F32)?.to_vec1()?;
        let tok = sample(&logits, p, &mut rng);
        out.push(tok);
        seq.push(tok);
        if p.stop.contains(&tok) {
            return Ok(Generation {
                tokens: out,
                finish: FinishReason::Stop,
            });
        }
    }
    Ok(Generation {
        tokens: out,
        finish: FinishReason::Length,
    })
}

/// Picks the next token from one position's logits.
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
    let total: f64 = probs.iter().map(|x| x.1).sum();
    probs.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    let mut kept = Vec::new();
    let mut mass = 0.0;
    for (i, w) in probs {
        kept.push((i, w));
        mass += w / total;
        if mass >= p.top_p {
            break;
        }
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
                seed: 7,
                stop: vec![],
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
            top_p: 1.0,
            seed: 1,
            stop: vec![],
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
}
