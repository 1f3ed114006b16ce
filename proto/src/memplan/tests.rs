use super::*;
use crate::shape::param_count;

fn shape(
    h: u32,
    inter: u32,
    heads: u32,
    kv: u32,
    layers: u32,
    vocab: u32,
    tie: bool,
) -> ModelShape {
    let mut s = ModelShape {
        hidden_size: h,
        intermediate_size: inter,
        num_attention_heads: heads,
        num_key_value_heads: kv,
        num_layers: layers,
        vocab_size: vocab,
        tie_word_embeddings: tie,
        head_dim: 128,
        ..Default::default()
    };
    s.params = param_count(&s);
    s
}

fn llama_8b() -> ModelShape {
    shape(4096, 14336, 32, 8, 32, 128_256, false)
}

fn setup(teacher: ModelShape, student: ModelShape) -> Setup {
    Setup {
        teacher,
        student,
        world_size: 8,
        micro_batch: 1,
        seq_len: 4096,
        precision: Precision::F32,
        teacher_precision: Precision::F32,
        shard_optimizer: false,
        recompute: false,
        temperature_is_one: true,
        device: DeviceKind::Cuda,
        kd: Default::default(),
    }
}

#[test]
fn published_sizes_of_the_example_teachers() {
    // Llama-3.1-8B and Mistral-Nemo-Base-2407 as their model cards give them.
    assert_eq!(param_count(&llama_8b()), 8_030_261_248);
    let nemo = shape(5120, 14336, 32, 8, 40, 131_072, false);
    assert_eq!(param_count(&nemo), 12_247_782_400);
}

#[test]
fn weights_gradients_and_optimizer_follow_the_table() {
    let t = llama_8b();
    let s = shape(3072, 9216, 24, 8, 32, 128_256, false);
    let (pt, ps) = (param_count(&t), param_count(&s));
    let mut su = setup(t, s);
    let p = plan(&su);
    assert_eq!(p.teacher_weights, pt * 4);
    assert_eq!(p.student_weights, ps * 4);
    assert_eq!(p.gradients, ps * 4);
    assert_eq!(p.optimizer, ps * 12);
    assert_eq!(p.runtime, CUDA_RUNTIME_BYTES);
    su.precision = Precision::Bf16;
    su.teacher_precision = Precision::Bf16;
    su.shard_optimizer = true;
    let q = plan(&su);
    assert_eq!(q.teacher_weights, pt * 2);
    assert_eq!(q.student_weights, ps * 2);
    // Gradient accumulators stay f32; the master weights and moments are split 8 ways.
    assert_eq!(q.gradients, ps * 4);
    assert_eq!(q.optimizer, 12 * ps.div_ceil(8));
    assert_eq!(
        q.total,
        q.teacher_weights
            + q.student_weights
            + q.gradients
            + q.optimizer
            + q.activations
            + q.loss
            + q.teacher_forward.max(q.backward)
            + q.runtime
    );
    assert_eq!(q.hidden, 0);
}

#[test]
fn hidden_states_count_the_projection_and_the_teacher_states_and_ce_only_loads_no_teacher() {
    let t = llama_8b();
    let s = shape(3072, 9216, 24, 8, 32, 128_256, false);
    let base = setup(t, s);
    let mut h = base;
    h.kd.hidden_pairs = 32;
    let (q0, q) = (plan(&base), plan(&h));
    // The projection 4096 x 3072: f32 weights, f32 gradients, master + moments (unsharded);
    // 32 pairs of 4096-wide teacher states (f32) and four f32 loss tensors each, 4096 tokens.
    let proj = 4096u64 * 3072;
    let states = 32 * 4096 * 4096u64;
    assert_eq!(
        q.hidden,
        proj * 4 + proj * 4 + 12 * proj + states * (4 + 16)
    );
    assert_eq!(q.total, q0.total + q.hidden);
    // Equal widths: no projection, only the states.
    let mut same = h;
    same.student.hidden_size = 4096;
    assert_eq!(plan(&same).hidden, states * 20);
    // CE only: no teacher weights or forward.
    let mut ce = base;
    ce.kd.no_teacher = true;
    let qc = plan(&ce);
    assert_eq!((qc.teacher_weights, qc.teacher_forward), (0, 0));
    assert!(qc.total < q0.total);
    // A general divergence on the composed path holds more vocabulary tensors.
    let mut g = base;
    g.kd.general_divergence = true;
    assert!(plan(&g).loss > q0.loss);
    // And the spec fields map onto it.
    let d = DistillSpec {
        loss: "jsd".into(),
        hidden: Some(crate::v1::HiddenDistillSpec {
            auto_pairs: true,
            ..Default::default()
        }),
        ..Default::default()
    };
    assert_eq!(
        KdSetup::from_distill(&d, 30),
        KdSetup {
            general_divergence: true,
            no_teacher: false,
            hidden_pairs: 30
        }
    );
}

/// The activations of a tiny model counted tensor by tensor, independently of the constants'
/// grouping: what `layer_forward` and `attention` allocate for a GQA layer.
#[test]
fn activations_of_a_tiny_gqa_model_counted_by_hand() {
    let mut st = ModelShape {
        hidden_size: 64,
        intermediate_size: 96,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        head_dim: 16,
        num_layers: 3,
        vocab_size: 50,
        tie_word_embeddings: true,
        ..Default::default()
    };
    st.params = param_count(&st);
    let mut su = setup(st, st);
    su.micro_batch = 2;
    su.seq_len = 8;
    // The composed ops (what GPUs run): counted by hand below.
    su.device = DeviceKind::Cuda;
    let (bt, h, q, kv, i, heads, t) = (16.0, 64.0, 64.0, 32.0, 96.0, 4.0, 8.0);
    let per_layer = [
        // attn norm: x², x·inv, ·w
        3.0 * bt * h,
        // q, k, v projections
        bt * q + 2.0 * bt * kv,
        // rope on q and k: neg half, cat, ·cos, ·sin, sum
        4.5 * bt * q + 4.5 * bt * kv,
        // repeat_kv of k and v, kᵀ contiguous
        3.0 * bt * q,
        // scores: matmul, scale, mask, sub max, exp, div
        6.0 * 2.0 * heads * t * t,
        // probs·v, merged heads copy, o_proj
        2.0 * bt * q + bt * h,
        // residual, mlp norm (3), gate, silu, up, product, down, residual
        bt * h + 3.0 * bt * h + 4.0 * bt * i + 2.0 * bt * h,
    ]
    .iter()
    .sum::<f64>();
    let outside = 4.0 * bt * h;
    let p = plan(&su);
    assert_eq!(
        p.activations_full,
        ((3.0 * per_layer + outside) * 4.0) as u64
    );
    assert_eq!(
        p.activations_recompute,
        ((3.0 * bt * h + per_layer + outside) * 4.0) as u64
    );
    assert_eq!(p.activations, p.activations_full);
    // Logits (compute dtype) + 8 f32 vocabulary tensors of the KD loss at T = 1.
    assert_eq!(p.loss, (bt * 50.0 * (4.0 + 8.0 * 4.0)) as u64);
    su.temperature_is_one = false;
    su.precision = Precision::Bf16;
    let p2 = plan(&su);
    assert_eq!(p2.loss, (bt * 50.0 * (2.0 + 12.0 * 4.0)) as u64);
    su.recompute = true;
    assert_eq!(plan(&su).activations, plan(&su).activations_recompute);
    // The CPU's fused kernels: per layer 6.5 hidden + 3 q + 3 kv + 3 intermediate tensors, no
    // T × T scores; the loss keeps only the f32 logits.
    su.device = DeviceKind::Cpu;
    su.recompute = false;
    su.precision = Precision::F32;
    let fused_layer = bt * (6.5 * h + 3.0 * q + 3.0 * kv + 3.0 * i);
    let f = plan(&su);
    assert_eq!(
        f.activations_full,
        ((3.0 * fused_layer + 2.0 * bt * h) * 4.0) as u64
    );
    assert_eq!(f.loss, (bt * 50.0 * 4.0) as u64);
    // bf16 on the CPU is autocast: f32 weights, activations and loss, bf16 matrix multiplies.
    su.precision = Precision::Bf16;
    let m = plan(&su);
    assert_eq!(m.student_weights, f.student_weights);
    assert_eq!(m.backward, f.backward);
    assert_eq!(m.activations_full, f.activations_full);
    assert_eq!(m.activations_recompute, f.activations_recompute);
    assert_eq!(m.loss, f.loss);
}

#[test]
fn the_8b_teacher_at_f32_needs_changes_and_the_first_single_change_that_fits_is_named() {
    let t = llama_8b();
    let s = shape(3072, 9216, 24, 8, 32, 128_256, false);
    let dev = parse_size("80GiB").unwrap();
    for seq in [512, 1024, 2048] {
        let mut su = setup(t, s);
        su.seq_len = seq;
        // f32 weights (24 + 12 bytes per student parameter, 4 per teacher parameter) alone
        // exceed 80 GiB.
        assert!(!fits(&plan(&su), dev), "seq {seq}");
        let sug = suggest(&su, dev).expect("some change fits");
        assert!(sug.total <= usable(dev));
        let order = [
            Change::TeacherBf16,
            Change::StudentBf16,
            Change::ShardOptimizer,
            Change::Recompute,
        ];
        match order
            .iter()
            .find(|c| total_with(&su, &[**c]) <= usable(dev))
        {
            Some(first) => assert_eq!(sug.changes, vec![*first], "seq {seq}"),
            None => assert!(sug.changes.len() > 1, "seq {seq}: {sug}"),
        }
        let mut fixed = su;
        for c in &sug.changes {
            c.apply(&mut fixed);
        }
        assert!(fits(&plan(&fixed), dev));
        assert_eq!(plan(&fixed).total, sug.total);
        assert!(
            suggest(&fixed, dev).is_none(),
            "already fits: nothing to suggest"
        );
    }
}

#[test]
fn the_order_of_single_changes_is_teacher_bf16_first() {
    let t = llama_8b();
    let s = shape(3072, 9216, 24, 8, 32, 128_256, false);
    let mut su = setup(t, s);
    su.seq_len = 256;
    su.recompute = true;
    let p = plan(&su);
    // A device just too small for this setup but large enough once the teacher is bf16: both
    // the teacher change and others would fit; the teacher's comes first.
    let dev = ((p.total - p.teacher_weights / 2) as f64 / (1.0 - SAFETY_MARGIN)) as u64 + 1;
    assert!(!fits(&p, dev));
    let sug = suggest(&su, dev).unwrap();
    assert_eq!(sug.changes, vec![Change::TeacherBf16]);
}

#[test]
fn a_combination_when_no_single_change_fits_and_none_when_nothing_can() {
    let t = llama_8b();
    let s = shape(3072, 9216, 24, 8, 32, 128_256, false);
    let mut su = setup(t, s);
    su.seq_len = 1024;
    let all = {
        let mut x = su;
        x.teacher_precision = Precision::Bf16;
        x.precision = Precision::Bf16;
        x.shard_optimizer = true;
        x.recompute = true;
        plan(&x).total
    };
    let best_single = [
        Change::TeacherBf16,
        Change::StudentBf16,
        Change::ShardOptimizer,
        Change::Recompute,
    ]
    .iter()
    .map(|c| total_with(&su, &[*c]))
    .min()
    .unwrap();
    assert!(all < best_single);
    let dev = (all as f64 / (1.0 - SAFETY_MARGIN)) as u64 + 1;
    let sug = suggest(&su, dev).unwrap();
    assert!(sug.changes.len() > 1, "{sug}");
    assert!(sug.total <= usable(dev));
    // Each change in it is needed.
    for i in 0..sug.changes.len() {
        let mut fewer = sug.changes.clone();
        fewer.remove(i);
        assert!(total_with(&su, &fewer) > usable(dev), "{sug} without {i}");
    }
    // A device smaller than the teacher's bf16 weights: nothing makes a rank fit, and the floor
    // says how far off it is.
    assert_eq!(suggest(&su, 8 << 30), None);
    assert!(floor(&su) > usable(8 << 30));
    assert!(floor(&su) <= all);
    assert!(floor(&su) >= param_count(&t) * 2 + param_count(&s) * (2 + 4));
}

#[test]
fn more_ranks_are_suggested_only_with_a_sharded_optimizer() {
    let t = llama_8b();
    let s = shape(3072, 9216, 24, 8, 32, 128_256, false);
    let mut su = setup(t, s);
    su.seq_len = 512;
    su.micro_batch = 1;
    su.precision = Precision::Bf16;
    su.teacher_precision = Precision::Bf16;
    su.recompute = true;
    su.shard_optimizer = true;
    su.world_size = 2;
    let at = |w: u32| total_with(&su, &[Change::WorldSize(w)]);
    // A device that 6 ranks fit and 5 do not.
    let dev = (at(6) as f64 / (1.0 - SAFETY_MARGIN)) as u64 + 1;
    assert!(at(5) > usable(dev));
    let sug = suggest(&su, dev).unwrap();
    assert_eq!(sug.changes, vec![Change::WorldSize(6)]);
    assert_eq!(
        sug.to_string(),
        format!("set world_size = 6 (then {} per rank)", gib(at(6)))
    );
}

#[test]
fn micro_batch_is_halved_as_often_as_needed() {
    let t = llama_8b();
    let s = shape(3072, 9216, 24, 8, 32, 128_256, false);
    let mut su = setup(t, s);
    su.precision = Precision::Bf16;
    su.teacher_precision = Precision::Bf16;
    su.shard_optimizer = true;
    su.recompute = true;
    su.seq_len = 2048;
    su.micro_batch = 16;
    let at = |m: u32| total_with(&su, &[Change::MicroBatch(m)]);
    let dev = (at(4) as f64 / (1.0 - SAFETY_MARGIN)) as u64 + 1;
    assert!(at(8) > usable(dev));
    assert_eq!(
        suggest(&su, dev).unwrap().changes,
        vec![Change::MicroBatch(4)]
    );
}

#[test]
fn sizes_parse_with_binary_and_decimal_units() {
    assert_eq!(parse_size("80GiB").unwrap(), 80 << 30);
    assert_eq!(parse_size("80G").unwrap(), 80 << 30);
    assert_eq!(parse_size("80GB").unwrap(), 80_000_000_000);
    assert_eq!(parse_size("1.5 MiB").unwrap(), 3 << 19);
    assert_eq!(parse_size("4096").unwrap(), 4096);
    for bad in ["", "GiB", "80 parsecs", "-1GiB", "0"] {
        assert!(parse_size(bad).is_err(), "{bad:?}");
    }
}

#[test]
fn device_kinds_of_slots() {
    assert_eq!(DeviceKind::of_slot("cpu"), Some(DeviceKind::Cpu));
    assert_eq!(DeviceKind::of_slot("cpu:3"), Some(DeviceKind::Cpu));
    assert_eq!(DeviceKind::of_slot("cuda:0"), Some(DeviceKind::Cuda));
    assert_eq!(DeviceKind::of_slot("tpu:0"), None);
}

#[test]
fn recompute_shrinks_the_gradient_store_to_one_layer_or_the_ends() {
    let s = llama_8b();
    assert_eq!(grad_store_params(&s, false), param_count(&s));
    // Untied 128256 x 4096 embedding and head (+ the final norm) outweigh one layer (218M).
    assert_eq!(grad_store_params(&s, true), 2 * 128_256 * 4096 + 4096);
    let mut deep = shape(512, 2048, 8, 8, 4, 1000, true);
    deep.head_dim = 64;
    let layer = (param_count(&deep) - 1000 * 512 - 512) / 4;
    assert_eq!(grad_store_params(&deep, true), layer);
}
