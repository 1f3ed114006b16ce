//! `worker gpu-check`: the GPU checks of the distillation issues, in the worker binary because the
//! GPU machines have no Rust toolchain (`scripts/gpu-check.sh` runs it). On one GPU: the NCCL
//! all-reduce, reduce-scatter and all-gather on device buffers equal the CPU results; a
//! distillation step on the GPU equals the same step on the CPU (float tolerance) and training
//! lowers the loss; a bf16 step with a sharded optimizer on two ranks sharing the GPU (an
//! in-process gang: NCCL refuses two ranks on one device) equals the one-rank bf16 step; and
//! distillation tokens/s and MFU for the SmolLM2-135M shape (teacher) and a 70% student, f32
//! and bf16 + sharded, with the memory plan's per-rank prediction (`distillery_proto::memplan`,
//! as `coordinator plan` prints it) beside each. Prints one JSON object per check.

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

/// The memory plan of one rank (bytes per line, as `coordinator plan` counts them) for a CUDA
/// run of `teacher` → `student` at `micro × seq` on `world` ranks.
#[cfg(any(test, feature = "cuda"))]
pub(crate) fn plan_json(
    teacher: &crate::model::LlamaConfig,
    student: &crate::model::LlamaConfig,
    micro: usize,
    seq: usize,
    world: usize,
    precision: crate::distill::train::Precision,
    shard: bool,
) -> serde_json::Value {
    use distillery_proto::memplan::{self, DeviceKind, Setup};
    let plan = memplan::plan(&Setup {
        teacher: crate::prune::plan::shape_of(teacher),
        student: crate::prune::plan::shape_of(student),
        world_size: world as u32,
        micro_batch: micro as u32,
        seq_len: seq as u32,
        precision,
        teacher_precision: precision,
        shard_optimizer: shard,
        recompute: false,
        temperature_is_one: true,
        device: DeviceKind::Cuda,
        kd: Default::default(),
    });
    serde_json::json!({
        "teacher_weights": plan.teacher_weights, "student_weights": plan.student_weights,
        "gradients": plan.gradients, "optimizer": plan.optimizer,
        "activations": plan.activations, "loss": plan.loss, "runtime": plan.runtime,
        "total": plan.total,
    })
}

#[cfg(test)]
mod tests {
    use crate::distill::train::Precision;
    use crate::model::test_model::{test_model, TestModelSpec};

    #[test]
    fn the_gpu_check_reports_the_plan_the_coordinator_prints() {
        let m = test_model(
            &TestModelSpec::default(),
            candle_core::DType::F32,
            &candle_core::Device::Cpu,
        )
        .unwrap();
        let p = m.num_params() as u64;
        let one = super::plan_json(&m.config, &m.config, 1, 16, 1, Precision::F32, false);
        let two = super::plan_json(&m.config, &m.config, 1, 16, 2, Precision::Bf16, true);
        assert_eq!(one["student_weights"], p * 4);
        assert_eq!(one["gradients"], p * 4);
        assert_eq!(one["optimizer"], p * 12);
        assert_eq!(two["student_weights"], p * 2);
        assert_eq!(two["optimizer"], p.div_ceil(2) * 12);
        assert!(two["total"].as_u64() < one["total"].as_u64());
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use std::time::Instant;

    use candle_core::{DType, Device};

    use candle_core::Tensor;

    use crate::collective::local::LocalGang;
    use crate::collective::nccl::{new_id, Nccl};
    use crate::collective::{Collective, Solo};
    use crate::distill::data::Domain;
    use crate::distill::train::{Precision, TrainConfig, Trainer};
    use crate::model::test_model::{test_model, TestModelSpec};
    use crate::model::{Llama, LlamaConfig};

    /// The bf16 dense peak of the device, in FLOP/s, and its name (for MFU). Hopper SXM (H100 /
    /// H200): 989 TFLOP/s dense bf16 (NVIDIA's datasheet, without sparsity).
    const BF16_PEAK: (f64, &str) = (989e12, "H100/H200 SXM dense bf16, 989 TFLOP/s");

    fn e(x: impl std::fmt::Display) -> String {
        x.to_string()
    }

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
            objective: Default::default(),
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

        // 1. NCCL on device buffers (one rank per GPU) equals the CPU results.
        let n = (1 << 22) + 7;
        let input: Vec<f32> = (0..n).map(|i| ((i % 1000) as f32) * 0.5 - 3.0).collect();
        let buf = Tensor::new(input.as_slice(), &gpu).map_err(e)?;
        let id = new_id().map_err(e)?;
        let mut nccl = Nccl::connect(&gpu, 0, 1, &id).map_err(e)?;
        let t = Instant::now();
        nccl.all_reduce_sum(&buf).map_err(e)?;
        gpu.synchronize().map_err(e)?;
        let secs = t.elapsed().as_secs_f64();
        nccl.reduce_scatter_sum(&buf).map_err(e)?;
        nccl.all_gather(&buf).map_err(e)?;
        let mut host = vec![1.0f32, 2.0];
        nccl.all_reduce_host(&mut host).map_err(e)?;
        let got: Vec<f32> = buf
            .to_device(&Device::Cpu)
            .map_err(e)?
            .to_vec1()
            .map_err(e)?;
        let equal = got == input && host == vec![1.0, 2.0];
        ok &= equal;
        println!(
            "{}",
            serde_json::json!({"check": "nccl_device_collectives_equal_cpu", "ok": equal, "floats": n,
                "all_reduce_seconds": secs, "gb_per_s": (n * 4) as f64 / secs / 1e9})
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
        )
        .map_err(e)?;
        let mut b = Trainer::new(
            s_gpu.converted(DType::F32).map_err(e)?,
            Some(&teacher_gpu),
            cfg(32, 4, 20),
            &mut solo_b,
            domain(vocab, 32),
            &[1.0],
            vec![],
        )
        .map_err(e)?;
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

        // 3. bf16 + sharded optimizer on 2 ranks sharing the GPU = the 1-rank bf16 step.
        let bf16_cfg = |shard: bool, world: usize| {
            let mut c = cfg(32, 4 / world, 5);
            c.global_batch = 4;
            c.precision = Precision::Bf16;
            c.shard_optimizer = shard;
            c
        };
        let teacher_bf16 = teacher_gpu.converted(DType::BF16).map_err(e)?;
        let mut solo = Solo;
        let mut one = Trainer::new(
            s_gpu.converted(DType::F32).map_err(e)?,
            Some(&teacher_bf16),
            bf16_cfg(false, 1),
            &mut solo,
            domain(vocab, 32),
            &[1.0],
            vec![],
        )
        .map_err(e)?;
        let mut one_losses = Vec::new();
        for _ in 0..5 {
            one_losses.push(one.train_step().map_err(e)?.loss);
        }
        let one_w = one.master_weights().map_err(e)?;
        let ranks: Vec<Result<(Vec<f64>, f64), String>> = std::thread::scope(|sc| {
            let hs: Vec<_> = LocalGang::new(2)
                .into_iter()
                .map(|mut g| {
                    let (teacher, student, one_w) = (&teacher_bf16, &s_gpu, &one_w);
                    sc.spawn(move || -> Result<(Vec<f64>, f64), String> {
                        let mut t = Trainer::new(
                            student.converted(DType::F32).map_err(e)?,
                            Some(teacher),
                            bf16_cfg(true, 2),
                            &mut g,
                            domain(vocab, 32),
                            &[1.0],
                            vec![],
                        )
                        .map_err(e)?;
                        let mut losses = Vec::new();
                        for _ in 0..5 {
                            losses.push(t.train_step().map_err(e)?.loss);
                        }
                        let mut worst = 0f64;
                        for (k, w) in t.master_weights().map_err(e)? {
                            let o = one_w.get(&k).ok_or_else(|| format!("no {k}"))?;
                            worst = worst.max(crate::model::max_abs_diff(&w, o).map_err(e)?);
                        }
                        Ok((losses, worst))
                    })
                })
                .collect();
            hs.into_iter()
                .map(|h| h.join().unwrap_or_else(|_| Err("a rank panicked".into())))
                .collect()
        });
        let mut shard_ok = true;
        let mut worst = 0f64;
        let mut two_losses = Vec::new();
        for r in ranks {
            let (l, w) = r?;
            worst = worst.max(w);
            two_losses = l;
        }
        let loss_gap = one_losses
            .iter()
            .zip(&two_losses)
            .map(|(a, b)| (a - b).abs() / a.abs().max(1e-9))
            .fold(0.0, f64::max);
        // bf16 forward/backward: the two gangs sum the same bf16 gradients in another order.
        shard_ok &= worst < 2e-2 && loss_gap < 2e-2;
        ok &= shard_ok;
        println!(
            "{}",
            serde_json::json!({"check": "bf16_sharded_two_ranks_equal_one_rank", "ok": shard_ok,
                "max_master_weight_diff": worst, "max_relative_loss_gap": loss_gap,
                "losses_one_rank": one_losses, "losses_two_ranks": two_losses})
        );

        // 4. Distillation throughput, SmolLM2-135M shape teacher and the 70% student the
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
        let params = student.num_params() as f64;
        let teacher_bf16 = teacher.converted(DType::BF16).map_err(e)?;
        for (label, precision, shard) in [
            ("f32", Precision::F32, false),
            ("bf16_sharded_2_ranks", Precision::Bf16, true),
        ] {
            let world = if shard { 2 } else { 1 };
            let mut c = cfg(seq, micro, 10);
            c.global_batch = micro * world;
            c.precision = precision;
            c.shard_optimizer = shard;
            let teacher = if precision == Precision::Bf16 {
                &teacher_bf16
            } else {
                &teacher
            };
            let steps = 5;
            let secs: Vec<Result<f64, String>> = std::thread::scope(|sc| {
                let hs: Vec<_> = LocalGang::new(world)
                    .into_iter()
                    .map(|mut g| {
                        let (c, student) = (c.clone(), &student);
                        sc.spawn(move || -> Result<f64, String> {
                            let mut t = Trainer::new(
                                student.converted(DType::F32).map_err(e)?,
                                Some(teacher),
                                c,
                                &mut g,
                                domain(49152, seq),
                                &[1.0],
                                vec![],
                            )
                            .map_err(e)?;
                            t.train_step().map_err(e)?;
                            let start = Instant::now();
                            for _ in 0..steps {
                                t.train_step().map_err(e)?;
                            }
                            Ok(start.elapsed().as_secs_f64())
                        })
                    })
                    .collect();
                hs.into_iter()
                    .map(|h| h.join().unwrap_or_else(|_| Err("a rank panicked".into())))
                    .collect()
            });
            let mut slowest = 0f64;
            for s in secs {
                slowest = slowest.max(s?);
            }
            let tps = (steps * seq * micro * world) as f64 / slowest;
            println!(
                "{}",
                serde_json::json!({"check": "distill_throughput_smollm2_135m_to_70pct", "ok": true,
                    "precision": label, "ranks_on_one_gpu": world, "tokens_per_s": tps,
                    "seq_len": seq, "micro_batch": micro, "student_params": params,
                    "mfu": 6.0 * params * tps / BF16_PEAK.0, "mfu_peak": BF16_PEAK.1,
                    "memory_plan_per_rank": super::plan_json(&teacher.config, &student.config,
                        micro, seq, world, precision, shard)})
            );
        }
        Ok(ok)
    }
}
