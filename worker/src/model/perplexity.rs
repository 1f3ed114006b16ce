//! Perplexity over a tokenized corpus with strided windows (each window keeps earlier tokens as
//! context and scores only targets not scored before), plus bits per byte, so models with
//! different tokenizers compare.

use candle_core::{DType, Result, Tensor, D};

use super::llama::{ForwardOptions, Llama};

/// Summed negative log-likelihood and what it was over.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Perplexity {
    /// Sum of -ln p(target) over scored targets.
    pub nll_sum: f64,
    /// Targets scored (every token but the first).
    pub tokens: usize,
    /// UTF-8 bytes of the text the tokens encode.
    pub bytes: usize,
}

impl Perplexity {
    pub fn perplexity(&self) -> f64 {
        (self.nll_sum / self.tokens.max(1) as f64).exp()
    }

    pub fn bits_per_byte(&self) -> f64 {
        self.nll_sum / std::f64::consts::LN_2 / self.bytes.max(1) as f64
    }
}

/// Scores `tokens` (encoding `bytes` bytes of text) in windows of `window` tokens advancing by
/// `stride` (at most `window - 1`, so every target has at least one token of context).
pub fn perplexity(
    model: &Llama,
    tokens: &[u32],
    bytes: usize,
    window: usize,
    stride: usize,
) -> Result<Perplexity> {
    if window < 2 {
        return Err(candle_core::Error::Msg(format!(
            "perplexity window {window} must be at least 2"
        )));
    }
    let stride = stride.clamp(1, window - 1);
    let mut nll_sum = 0.0;
    let mut scored_to = 1; // targets are tokens[1..]; tokens[..scored_to] are done
    let mut begin = 0;
    while scored_to < tokens.len() {
        let end = (begin + window).min(tokens.len());
        let ids = Tensor::new(&tokens[begin..end], model.device())?.unsqueeze(0)?;
        let logp =
            candle_nn::ops::log_softmax(&model.forward(&ids)?.to_dtype(DType::F64)?, D::Minus1)?;
        let logp = logp.squeeze(0)?;
        // Position p predicts tokens[begin + p + 1]; score the targets not scored yet.
        let first = scored_to.max(begin + 1);
        let positions: Vec<u32> = (first..end).map(|j| (j - begin - 1) as u32).collect();
        let targets: Vec<u32> = tokens[first..end].to_vec();
        let pos = Tensor::new(positions.as_slice(), model.device())?;
        let tgt = Tensor::new(targets.as_slice(), model.device())?.unsqueeze(1)?;
        let picked = logp.index_select(&pos, 0)?.gather(&tgt, 1)?;
        nll_sum -= picked.sum_all()?.to_scalar::<f64>()?;
        scored_to = end;
        begin += stride;
    }
    Ok(Perplexity {
        nll_sum,
        tokens: tokens.len().saturating_sub(1),
        bytes,
    })
}

/// Mean next-token negative log-likelihood of `sequences` with `skip` layers skipped.
pub fn mean_nll(
    model: &Llama,
    sequences: &[Vec<u32>],
    batch: usize,
    skip: &[usize],
) -> Result<f64> {
    let mut sum = 0.0;
    let mut n = 0usize;
    for chunk in sequences.chunks(batch.max(1)) {
        let ids = Tensor::new(chunk.to_vec(), model.device())?;
        let t = ids.dim(1)?;
        if t < 2 {
            continue;
        }
        let logits = model.forward_with(
            &ids,
            ForwardOptions {
                skip_layers: skip,
                ..Default::default()
            },
        )?;
        let logp = candle_nn::ops::log_softmax(
            &logits.narrow(1, 0, t - 1)?.to_dtype(DType::F32)?,
            D::Minus1,
        )?;
        let targets = ids.narrow(1, 1, t - 1)?.unsqueeze(D::Minus1)?;
        let picked = logp.gather(&targets.contiguous()?, D::Minus1)?;
        sum -= picked.to_dtype(DType::F64)?.sum_all()?.to_scalar::<f64>()?;
        n += picked.elem_count();
    }
    Ok(sum / n.max(1) as f64)
}

/// Mean per-token forward KL, `KL(teacher ‖ student)` at temperature 1, over `tokens` cut into
/// non-overlapping windows of `window` positions (each window's last token is only a target),
/// `batch` windows per forward. A trailing piece shorter than a window is left out.
pub fn mean_kl(
    student: &Llama,
    teacher: &Llama,
    tokens: &[u32],
    window: usize,
    batch: usize,
) -> Result<f64> {
    if window < 1 {
        return Err(candle_core::Error::Msg(
            "KL window must be at least 1".into(),
        ));
    }
    let rows: Vec<&[u32]> = tokens.chunks_exact(window + 1).collect();
    if rows.is_empty() {
        return Err(candle_core::Error::Msg(format!(
            "no full window of {} tokens to measure the KL on ({} tokens)",
            window + 1,
            tokens.len()
        )));
    }
    mean_kl_rows(student, teacher, &rows, batch, 1.0)
}

/// Mean per-token `KL(teacher ‖ student)` at `temperature` over `rows` (each `T + 1` tokens:
/// the first `T` are the input, the last `T` the targets), `batch` rows per forward.
pub fn mean_kl_rows(
    student: &Llama,
    teacher: &Llama,
    rows: &[&[u32]],
    batch: usize,
    temperature: f64,
) -> Result<f64> {
    let (mut kl, mut n) = (0.0, 0usize);
    for micro in rows.chunks(batch.max(1)) {
        let t = micro
            .iter()
            .map(|r| r.len())
            .min()
            .unwrap_or(1)
            .saturating_sub(1);
        let ids: Vec<Vec<u32>> = micro.iter().map(|r| r[..t].to_vec()).collect();
        let tgts: Vec<Vec<u32>> = micro.iter().map(|r| r[1..=t].to_vec()).collect();
        let ids = Tensor::new(ids, student.device())?;
        let targets = Tensor::new(tgts, student.device())?;
        // The distillation's own loss: fused on the CPU, composed elsewhere.
        let l = crate::distill::loss::kd_loss(
            &student.forward(&ids)?,
            &teacher.forward(&ids)?,
            &targets,
            temperature,
            0.0,
        )?;
        kl += l.kl;
        n += l.positions;
    }
    Ok(kl / n.max(1) as f64)
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, IndexOp};

    use super::*;
    use crate::model::LlamaConfig;

    fn model() -> Llama {
        let c = LlamaConfig::from_json(
            r#"{"hidden_size": 32, "intermediate_size": 48, "num_attention_heads": 4, "num_key_value_heads": 2,
                "num_hidden_layers": 2, "vocab_size": 40, "initializer_range": 0.3}"#,
        )
        .unwrap();
        Llama::new(c, DType::F32, &Device::Cpu).unwrap()
    }

    /// Naive: one pass, -ln softmax by hand for every next token.
    fn naive(m: &Llama, toks: &[u32]) -> f64 {
        let logits = m
            .forward(
                &Tensor::new(toks, &Device::Cpu)
                    .unwrap()
                    .unsqueeze(0)
                    .unwrap(),
            )
            .unwrap();
        let mut nll = 0.0;
        for t in 0..toks.len() - 1 {
            let row: Vec<f32> = logits.i((0, t)).unwrap().to_vec1().unwrap();
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
            let lse = max
                + row
                    .iter()
                    .map(|v| (*v as f64 - max).exp())
                    .sum::<f64>()
                    .ln();
            nll += lse - row[toks[t + 1] as usize] as f64;
        }
        nll
    }

    #[test]
    fn one_window_equals_the_naive_sum_and_strides_score_every_target_once() {
        let m = model();
        let toks: Vec<u32> = (0..23).map(|i| (i * 11 + 5) % 40).collect();
        let whole = perplexity(&m, &toks, 100, 64, 32).unwrap();
        assert!(
            (whole.nll_sum - naive(&m, &toks)).abs() < 1e-3,
            "{} vs {}",
            whole.nll_sum,
            naive(&m, &toks)
        );
        assert_eq!(whole.tokens, 22);
        assert!(
            (whole.bits_per_byte() - whole.nll_sum / std::f64::consts::LN_2 / 100.0).abs() < 1e-12
        );
        for (window, stride) in [(2, 1), (5, 4), (8, 3), (8, 100), (23, 1)] {
            let r = perplexity(&m, &toks, 100, window, stride).unwrap();
            assert_eq!(r.tokens, 22);
            // Less context than one window can only cost likelihood on average; it must stay finite.
            assert!(
                r.nll_sum.is_finite() && r.nll_sum > 0.0,
                "{window}/{stride}"
            );
        }
        // Windows of exactly two tokens score each target from its predecessor alone.
        let pairs: f64 = (0..22).map(|i| naive(&m, &toks[i..i + 2])).sum();
        let r = perplexity(&m, &toks, 100, 2, 1).unwrap();
        assert!((r.nll_sum - pairs).abs() < 1e-3);
        assert!(perplexity(&m, &toks, 1, 1, 1).is_err());
    }

    #[test]
    fn mean_kl_is_zero_against_itself_and_equals_the_direct_sum_against_another_model() {
        let a = model();
        let b = model();
        let toks: Vec<u32> = (0..41u32).map(|i| (i * 7 + 3) % 40).collect();
        // 41 tokens, windows of 9 (+1 target): 4 full windows, the rest left out.
        assert!(mean_kl(&a, &a, &toks, 9, 3).unwrap().abs() < 1e-6);
        let got = mean_kl(&a, &b, &toks, 9, 3).unwrap();
        let mut want = 0.0;
        for w in toks.chunks_exact(10) {
            let ids = Tensor::new(&w[..9], &Device::Cpu)
                .unwrap()
                .unsqueeze(0)
                .unwrap();
            let lp = |m: &Llama| {
                candle_nn::ops::log_softmax(
                    &m.forward(&ids).unwrap().to_dtype(DType::F64).unwrap(),
                    D::Minus1,
                )
                .unwrap()
                .i(0)
                .unwrap()
                .to_vec2::<f64>()
                .unwrap()
            };
            let (s, t) = (lp(&a), lp(&b));
            for (sr, tr) in s.iter().zip(&t) {
                want += tr
                    .iter()
                    .zip(sr)
                    .map(|(t, s)| t.exp() * (t - s))
                    .sum::<f64>();
            }
        }
        want /= 36.0;
        assert!(want > 1e-3, "two random models differ: {want}");
        assert!((got - want).abs() < 1e-4 * want.max(1.0), "{got} vs {want}");
        assert!(mean_kl(&a, &b, &toks[..5], 9, 3).is_err());
    }
}
