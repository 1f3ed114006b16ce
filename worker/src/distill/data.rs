//! Training data: per-domain packed sequences, a deterministic sampler (the domain of every
//! sequence of every step is a pure function of the seed, the step and its position in the global
//! batch; each domain is read in order through a cursor), and Sheared-LLaMA dynamic batch
//! loading of the domain weights.

/// One training domain: packed sequences of `seq_len + 1` tokens (inputs and shifted targets).
#[derive(Debug, Clone)]
pub struct Domain {
    pub name: String,
    pub sequences: Vec<Vec<u32>>,
}

/// Where the data stands: what a checkpoint must hold to continue identically.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct DataState {
    /// Sequences consumed per domain.
    pub cursors: Vec<u64>,
    /// Sampling weights per domain (sum 1).
    pub weights: Vec<f64>,
}

impl DataState {
    pub fn new(weights: &[f64]) -> DataState {
        let total: f64 = weights.iter().sum();
        DataState {
            cursors: vec![0; weights.len()],
            weights: weights
                .iter()
                .map(|w| {
                    if total > 0.0 {
                        w / total
                    } else {
                        1.0 / weights.len() as f64
                    }
                })
                .collect(),
        }
    }
}

/// SplitMix64: a counter-based generator, so sampling needs no RNG state beyond the step.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A uniform number in [0, 1) for (seed, step, index).
pub fn uniform(seed: u64, step: u64, index: u64) -> f64 {
    let h = mix(seed ^ mix(step.wrapping_mul(0x1000_0000_01B3) ^ mix(index)));
    (h >> 11) as f64 / (1u64 << 53) as f64
}

/// The global batch of `step`: `n` (domain, sequence) pairs, advancing the cursors.
pub fn global_batch(
    domains: &[Domain],
    state: &mut DataState,
    seed: u64,
    step: u64,
    n: usize,
) -> Vec<(usize, Vec<u32>)> {
    (0..n)
        .map(|j| {
            let u = uniform(seed, step, j as u64);
            let mut acc = 0.0;
            let mut d = domains.len() - 1;
            for (i, w) in state.weights.iter().enumerate() {
                acc += w;
                if u < acc {
                    d = i;
                    break;
                }
            }
            let seqs = &domains[d].sequences;
            let k = (state.cursors[d] % seqs.len() as u64) as usize;
            state.cursors[d] += 1;
            (d, seqs[k].clone())
        })
        .collect()
}

/// Sheared-LLaMA's update: `w <- softmax(log w + (l - r))`, then `w <- (1 - c)·w + c/k`.
pub fn update_weights(weights: &[f64], losses: &[f64], reference: &[f64], c: f64) -> Vec<f64> {
    let logits: Vec<f64> = weights
        .iter()
        .zip(losses.iter().zip(reference))
        .map(|(w, (l, r))| w.max(1e-300).ln() + (l - r).max(0.0))
        .collect();
    let max = logits.iter().cloned().fold(f64::MIN, f64::max);
    let e: Vec<f64> = logits.iter().map(|x| (x - max).exp()).collect();
    let z: f64 = e.iter().sum();
    let k = weights.len() as f64;
    e.iter().map(|x| (1.0 - c) * x / z + c / k).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sampling_follows_the_weights_and_is_a_function_of_seed_and_step() {
        let domains: Vec<Domain> = (0..2)
            .map(|d| Domain {
                name: format!("d{d}"),
                sequences: (0..5).map(|i| vec![d * 100 + i]).collect(),
            })
            .collect();
        let mut a = DataState::new(&[0.7, 0.3]);
        let mut counts = [0usize; 2];
        for step in 0..200 {
            for (d, _) in global_batch(&domains, &mut a, 7, step, 10) {
                counts[d] += 1;
            }
        }
        let share = counts[0] as f64 / 2000.0;
        assert!((share - 0.7).abs() < 0.04, "{share}");
        // Same seed, same steps -> same batches and cursors.
        let mut b = DataState::new(&[0.7, 0.3]);
        let mut c = DataState::new(&[0.7, 0.3]);
        for step in 0..5 {
            assert_eq!(
                global_batch(&domains, &mut b, 7, step, 4),
                global_batch(&domains, &mut c, 7, step, 4)
            );
        }
        assert_eq!(b, c);
        // Each domain is read in order, cycling.
        let mut s = DataState::new(&[1.0, 0.0]);
        let first: Vec<Vec<u32>> = global_batch(&domains, &mut s, 1, 0, 7)
            .into_iter()
            .map(|(_, x)| x)
            .collect();
        assert_eq!(first[0], vec![0]);
        assert_eq!(first[5], vec![0]);
        assert_eq!(first[6], vec![1]);
    }

    #[test]
    fn dynamic_batch_loading_moves_weight_to_the_domain_furthest_above_its_reference() {
        let w = vec![0.5, 0.3, 0.2];
        let losses = vec![3.0, 2.0, 1.0];
        let refs = vec![2.9, 1.0, 1.2];
        let n = update_weights(&w, &losses, &refs, 1e-4);
        assert!((n.iter().sum::<f64>() - 1.0).abs() < 1e-12);
        // Domain 1 exceeds its reference by 1.0, the others by 0.1 and below.
        assert!(n[1] > w[1] && n[0] < w[0] && n[2] < w[2], "{n:?}");
        // Nothing above reference: unchanged apart from the smoothing.
        let same = update_weights(&w, &[1.0; 3], &[2.0; 3], 1e-4);
        for (a, b) in same.iter().zip(&w) {
            assert!((a - ((1.0 - 1e-4) * b + 1e-4 / 3.0)).abs() < 1e-12);
        }
    }
}
