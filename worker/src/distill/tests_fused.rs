//! Twenty distillation steps with the fused CPU kernels on and off end at the same weights.

use candle_core::{DType, Device};

use super::data::Domain;
use super::train::{TrainConfig, Trainer};
use crate::collective::Solo;
use crate::model::config::Arch;
use crate::model::ops::fused::{with_kernels, Kernels};
use crate::model::test_model::{test_model, TestModelSpec};
use crate::model::{max_abs_diff, tokenizer, Llama};

const TEXT: &str = "The cat sat on the mat. The dog sat on the log. A bird sang in the tree, \
and the cat looked at the bird. The dog ran to the tree and the bird flew away. ";

fn domain(seq_len: usize) -> Domain {
    let tok = tokenizer::byte_level().unwrap();
    let docs: Vec<String> = (0..20).map(|i| format!("{i} {}", TEXT.repeat(3))).collect();
    Domain {
        name: "animals".into(),
        sequences: crate::data::pack(&tok, &docs, Some(257), seq_len + 1, 1000).unwrap(),
    }
}

fn cfg(steps: u64, seq_len: usize) -> TrainConfig {
    TrainConfig {
        seq_len,
        micro_batch: 2,
        global_batch: 4,
        total_steps: steps,
        lr: 3e-3,
        warmup_steps: 2,
        temperature: 2.0,
        ce_weight: 0.5,
        seed: 9,
        max_grad_norm: 1.0,
        weight_decay: 0.01,
        dynamic: None,
        precision: Default::default(),
        shard_optimizer: false,
        recompute: false,
        objective: Default::default(),
    }
}

fn model(arch: Arch, seed: u64) -> Llama {
    let spec = TestModelSpec {
        seed,
        arch,
        ..Default::default()
    };
    test_model(&spec, DType::F32, &Device::Cpu).unwrap()
}

/// 20 steps from the same student; (the loss of each step, the final weights).
fn train(arch: Arch, kernels: Kernels) -> (Vec<f64>, Vec<candle_core::Tensor>) {
    with_kernels(kernels, || {
        let teacher = model(arch, 3);
        let student = model(arch, 3);
        for (_, v) in student.named_vars() {
            v.set(&(v.as_tensor() * 0.8).unwrap()).unwrap();
        }
        let mut solo = Solo;
        // 24 positions: longer than Gemma's 16-position window in the test model.
        let mut t = Trainer::new(
            student,
            Some(&teacher),
            cfg(20, 24),
            &mut solo,
            vec![domain(24)],
            &[1.0],
            vec![],
        )
        .unwrap();
        let losses = (0..20).map(|_| t.train_step().unwrap().loss).collect();
        let w = t
            .student
            .named_vars()
            .iter()
            .map(|(_, v)| v.as_tensor().copy().unwrap())
            .collect();
        (losses, w)
    })
}

#[test]
fn twenty_steps_with_the_fused_kernels_equal_the_composed_path() {
    for arch in [Arch::Llama, Arch::Gemma3] {
        let (lf, wf) = train(arch, Kernels::all());
        let (lc, wc) = train(arch, Kernels::none());
        let d_loss = lf
            .iter()
            .zip(&lc)
            .map(|(a, b)| (a - b).abs() / b.abs())
            .fold(0.0, f64::max);
        let d_w = wf
            .iter()
            .zip(&wc)
            .map(|(a, b)| max_abs_diff(a, b).unwrap())
            .fold(0.0, f64::max);
        let mean_abs = |x: candle_core::Tensor| {
            x.abs()
                .unwrap()
                .mean_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap() as f64
        };
        let (mut n, mut diff, mut moved) = (0usize, 0.0, 0.0);
        for ((a, b), (_, init)) in wf.iter().zip(&wc).zip(model(arch, 3).named_vars()) {
            let k = a.elem_count() as f64;
            n += a.elem_count();
            diff += k * mean_abs((a - b).unwrap());
            moved += k * mean_abs((b - (init.as_tensor() * 0.8).unwrap()).unwrap());
        }
        let (diff, moved) = (diff / n as f64, moved / n as f64);
        eprintln!(
            "{arch:?}: loss {:.4} -> {:.4}; fused vs composed: max rel loss diff {d_loss:.1e}, \
             mean |dw| {diff:.1e} (max {d_w:.1e}); mean |w - w0| {moved:.1e}",
            lc[0], lc[19]
        );
        assert!(
            lc[19] < 0.6 * lc[0],
            "{arch:?}: the loss did not fall: {lc:?}"
        );
        // The paths differ by f32 rounding (sums in another order, exp within 2 ulp): ~1e-6
        // relative in each gradient, so in the losses.
        assert!(
            d_loss < 2e-5,
            "{arch:?}: losses differ by {d_loss:e}: {lf:?} vs {lc:?}"
        );
        // Weights: on average as close as rounding makes them. The maximum is bounded by
        // AdamW's first step, lr·sign(g): an element whose gradient is ~0 (rounding-sized)
        // can step either way, by up to 2·lr·(warmup 1/2) = 3e-3; measured ~2e-4, and it does
        // not grow over the 20 steps. A wrong gradient moves the mean by ~lr.
        assert!(diff < 2e-6, "{arch:?}: mean weight difference {diff:e}");
        assert!(d_w < 3e-3, "{arch:?}: max weight difference {d_w:e}");
        assert!(
            moved > 1000.0 * diff,
            "{arch:?}: training moved the weights by {moved:e}"
        );
    }
}
