//! `worker gpu-check`: the GPU checks of the distillation issue, in the worker binary because the
//! GPU machines have no Rust toolchain (`scripts/gpu-check.sh` runs it). On one GPU: the NCCL
//! all-reduce equals the CPU sum; a distillation step on the GPU equals the same step on the CPU
//! (float tolerance) and training lowers the loss; and distillation tokens/s for the
//! SmolLM2-135M shape (teacher) and a 70% student. Prints one JSON object per check.

/// Runs the checks on `device` (`cuda:N`); returns the exit code.
pub fn run(device: &str) -> i32 {
    #[cfg(not(feature = "cuda"))]
    {
        eprintln!("worker gpu-check: this worker was built without the cuda feature (scripts/build-cuda.sh builds it); device {device} not checked");
        2
    }
    #[cfg(feature = "cuda")]
    {
        match cuda::run(device) {
            Ok(true) => 0,
            Ok(false) => 1,
            Err(e) => {
                eprintln!("worker gpu-check: {e}");
                1
            }
        }
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use std::time::Instant;

    use candle_core::{DType, Device};

    use crate::collective::nccl::{new_id, Nccl};
    use crate::collective::{Collective, Solo};
    use crate::distill::data::Domain;
    use crate::distill::train::{TrainConfig, Trainer};
    use crate::model::test_model::{test_model, TestModelSpec};
    use crate::model::{Llama, LlamaConfig};

    fn cfg(seq_len: usize, micro: usize, steps: u64) -> TrainConfig {
        TrainConfig {
            seq_len,
            micro_batch: micro,
            global_batch: micro,
            total_steps: steps,
            lr: 1e-3,
            warmup_steps: 2,
            temperature: 1.0,
            ce_weight: 0.0,
            seed: 1,
            max_grad_norm: 1.0,
            weight_decay: 0.01,
            dynamic: None,
            precision: Default::default(),
            shard_optimizer: false,
            recompute: false,
        }
    }

    fn domain(vocab: u32, seq_len: usize) -> Vec<Domain> {
        vec![Domain {
            name: "synthetic".into(),
            sequences: (0..64u32)
                .map(|i| {
                    (0..=seq_len as u32)
                        .map(|j| (i * 131 + j * 17) % vocab)
                        .collect()
                })
                .collect(),
        }]
    }

    fn same_weights(dst: &Llama, src: &Llama) -> Result<(), String> {
        for ((_, a), (_, b)) in dst.named_vars().iter().zip(src.named_vars()) {
            a.set(
                &b.as_tensor()
                    .to_device(a.device())
                    .map_err(|e| e.to_string())?,
            )
            .map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    pub fn run(device: &str) -> Result<bool, String> {
        let idx: usize = device
            .strip_prefix("cuda:")
            .and_then(|i| i.parse().ok())
            .ok_or_else(|| format!("device {device:?} is not cuda:N"))?;
        let gpu = Device::new_cuda(idx).map_err(|e| format!("{device}: {e}"))?;
        let mut ok = true;

        // 1. NCCL all-reduce (one rank per GPU) equals the CPU sum.
        let n = (1 << 22) + 7;
        let input: Vec<f32> = (0..n).map(|i| ((i % 1000) as f32) * 0.5 - 3.0).collect();
        let mut buf = input.clone();
        let id = new_id().map_err(|e| e.to_string())?;
        let mut nccl = Nccl::connect(&gpu, 0, 1, &id).map_err(|e| e.to_string())?;
        let t = Instant::now();
        nccl.all_reduce_sum(&mut buf).map_err(|e| e.to_string())?;
        let secs = t.elapsed().as_secs_f64();
        let mut cpu = input.clone();
        Solo.all_reduce_sum(&mut cpu).map_err(|e| e.to_string())?;
        let equal = buf == cpu;
        ok &= equal;
        println!(
            "{}",
            serde_json::json!({"check": "nccl_all_reduce_equals_cpu_sum", "ok": equal, "floats": n,
                "seconds": secs, "gb_per_s": (n * 4) as f64 / secs / 1e9})
        );

        // 2. One distillation step on the GPU equals it on the CPU; 20 steps lower the loss.
        let spec = TestModelSpec {
            seed: 5,
            ..Default::default()
        };
        let teacher_cpu = test_model(&spec, DType::F32, &Device::Cpu).map_err(|e| e.to_string())?;
        let teacher_gpu = test_model(&spec, DType::F32, &gpu).map_err(|e| e.to_string())?;
        same_weights(&teacher_gpu, &teacher_cpu)?;
        let student_spec = TestModelSpec {
            seed: 6,
            ..Default::default()
        };
        let s_cpu =
            test_model(&student_spec, DType::F32, &Device::Cpu).map_err(|e| e.to_string())?;
        let s_gpu = test_model(&student_spec, DType::F32, &gpu).map_err(|e| e.to_string())?;
        same_weights(&s_gpu, &s_cpu)?;
        let vocab = teacher_cpu.config.vocab_size as u32;
        let (mut solo_a, mut solo_b) = (Solo, Solo);
        let mut a = Trainer::new(
            s_cpu,
            Some(&teacher_cpu),
            cfg(32, 4, 20),
            &mut solo_a,
            domain(vocab, 32),
            &[1.0],
            vec![],
        );
        let mut b = Trainer::new(
            s_gpu,
            Some(&teacher_gpu),
            cfg(32, 4, 20),
            &mut solo_b,
            domain(vocab, 32),
            &[1.0],
            vec![],
        );
        let sa = a.train_step().map_err(|e| e.to_string())?;
        let sb = b.train_step().map_err(|e| e.to_string())?;
        let mut max_diff = 0f64;
        for ((_, x), (_, y)) in a.student.named_vars().iter().zip(b.student.named_vars()) {
            let y = y
                .as_tensor()
                .to_device(&Device::Cpu)
                .map_err(|e| e.to_string())?;
            max_diff = max_diff
                .max(crate::model::max_abs_diff(x.as_tensor(), &y).map_err(|e| e.to_string())?);
        }
        let mut last = sb.loss;
        for _ in 1..20 {
            last = b.train_step().map_err(|e| e.to_string())?.loss;
        }
        let step_ok = max_diff < 1e-3 && (sa.loss - sb.loss).abs() < 1e-3 && last < sb.loss;
        ok &= step_ok;
        println!(
            "{}",
            serde_json::json!({"check": "gpu_distill_step_equals_cpu", "ok": step_ok, "max_weight_diff": max_diff,
                "loss_cpu": sa.loss, "loss_gpu": sb.loss, "loss_after_20_steps": last})
        );

        // 3. Distillation throughput, SmolLM2-135M shape teacher and the 70% student the
        //    parameter-budget search picks (as in benches/distill.rs).
        let shape = |h: u32, i: u32, heads: u32, layers: u32| {
            LlamaConfig::from_json(
                &serde_json::json!({"hidden_size": h, "intermediate_size": i, "num_attention_heads": heads,
                    "num_key_value_heads": 3, "head_dim": 64, "num_hidden_layers": layers, "vocab_size": 49152,
                    "tie_word_embeddings": true, "rope_theta": 100000.0, "max_position_embeddings": 8192})
                .to_string(),
            )
            .map_err(|e| e.to_string())
        };
        let tc = shape(576, 1536, 9, 30)?;
        let target = crate::prune::plan::Target {
            params: Some(0.7),
            ..Default::default()
        };
        let s = crate::prune::plan::choose_shape(&crate::prune::plan::shape_of(&tc), &target)
            .map_err(|e| e.to_string())?;
        let teacher = Llama::new(tc, DType::F32, &gpu).map_err(|e| e.to_string())?;
        let sc = shape(
            s.hidden_size,
            s.intermediate_size,
            s.num_attention_heads,
            s.num_layers,
        )?;
        let student = Llama::new(sc, DType::F32, &gpu).map_err(|e| e.to_string())?;
        let (seq, micro) = (512, 8);
        let mut solo = Solo;
        let mut t = Trainer::new(
            student,
            Some(&teacher),
            cfg(seq, micro, 10),
            &mut solo,
            domain(49152, seq),
            &[1.0],
            vec![],
        );
        t.train_step().map_err(|e| e.to_string())?;
        let start = Instant::now();
        let steps = 5;
        for _ in 0..steps {
            t.train_step().map_err(|e| e.to_string())?;
        }
        let secs = start.elapsed().as_secs_f64();
        println!(
            "{}",
            serde_json::json!({"check": "distill_throughput_smollm2_135m_to_70pct", "ok": true,
                "tokens_per_s": (steps * seq * micro) as f64 / secs, "seq_len": seq, "micro_batch": micro})
        );
        Ok(ok)
    }
}
