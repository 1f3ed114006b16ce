use candle_core::{DType, Device, Tensor};

use super::apply::apply;
use super::importance::{score, DepthScores, Importance};
use super::plan::{plan, shape_of, top_k, KeepPlan};
use super::*;
use crate::model::max_abs_diff;
use crate::model::test_model::{test_model, TestModelSpec};
use crate::model::Llama;

fn sequences(n: usize, t: usize, seed: u32) -> Vec<Vec<u32>> {
    (0..n)
        .map(|i| {
            (0..t)
                .map(|j| {
                    ((i as u32 * 31 + j as u32 * 17 + seed * 7).wrapping_mul(2654435761u32) >> 7)
                        % 256
                })
                .collect()
        })
        .collect()
}

fn model(spec: TestModelSpec) -> Llama {
    test_model(&spec, DType::F32, &Device::Cpu).unwrap()
}

fn set(m: &Llama, name: &str, f: impl Fn(&mut Vec<Vec<f32>>)) {
    let vars = m.varmap.data().lock().unwrap();
    let var = &vars[name];
    let t = var.as_tensor();
    let mut rows: Vec<Vec<f32>> = if t.rank() == 1 {
        vec![t.to_vec1().unwrap()]
    } else {
        t.to_vec2().unwrap()
    };
    f(&mut rows);
    let flat: Vec<f32> = rows.concat();
    var.set(&Tensor::from_vec(flat, t.shape().clone(), &Device::Cpu).unwrap())
        .unwrap();
}

fn scored(m: &Llama) -> Importance {
    score(m, &sequences(6, 16, 1), 2, |_, _| true).unwrap()
}

fn ids() -> Tensor {
    Tensor::new(sequences(2, 12, 9), &Device::Cpu).unwrap()
}

#[test]
fn pruning_to_the_source_shape_reproduces_its_logits_exactly() {
    for tied in [false, true] {
        let m = model(TestModelSpec {
            tie_word_embeddings: tied,
            seed: 4,
            ..Default::default()
        });
        let src = shape_of(&m.config);
        let s = scores(&scored(&m), &[]).unwrap();
        let p = plan(&src, &s, &src).unwrap();
        let pruned = apply(&m, &p).unwrap();
        assert_eq!(pruned.config.hidden_size, m.config.hidden_size);
        let d = max_abs_diff(
            &m.forward(&ids()).unwrap(),
            &pruned.forward(&ids()).unwrap(),
        )
        .unwrap();
        assert_eq!(d, 0.0, "tied={tied}");
    }
}

#[test]
fn a_neuron_whose_weights_are_zero_scores_zero_and_goes_first() {
    let m = model(TestModelSpec::default());
    for w in ["gate_proj", "up_proj"] {
        set(&m, &format!("model.layers.1.mlp.{w}.weight"), |r| {
            r[37].iter_mut().for_each(|x| *x = 0.0)
        });
    }
    let n = scored(&m).neuron_scores();
    assert_eq!(n[1][37], 0.0);
    assert!(n[1].iter().enumerate().all(|(i, v)| i == 37 || *v > 0.0));
    let kept = top_k(&n[1], n[1].len() - 1);
    assert!(!kept.contains(&37) && kept.len() == 255);
}

#[test]
fn a_silent_head_goes_first_within_its_kv_group() {
    // 4 heads in 2 KV groups of 2. Head 0 attends uniformly (zero query), so its output is the
    // running mean of near-zero-mean values; head 1 (same group, same values) attends sharply.
    // Group 1's heads are both made uniform, so globally the two weakest heads would be 2 and 3,
    // yet each group must keep one.
    let m = model(TestModelSpec {
        seed: 7,
        ..Default::default()
    });
    let hd = m.config.head_dim();
    set(&m, "model.layers.0.self_attn.q_proj.weight", |r| {
        for (i, row) in r.iter_mut().enumerate() {
            let head = i / hd;
            let s = if head == 1 { 40.0 } else { 0.0 };
            row.iter_mut().for_each(|x| *x *= s);
        }
    });
    let imp = score(&m, &sequences(6, 48, 3), 3, |_, _| true).unwrap();
    let h = imp.head_scores();
    assert!(h[0][0] < 0.7 * h[0][1], "{:?}", h[0]);
    let src = shape_of(&m.config);
    let s = scores(&imp, &[]).unwrap();
    let mut target = src;
    target.num_attention_heads = 2;
    let p = plan(&src, &s, &target).unwrap();
    assert!(
        p.heads[0].contains(&1) && !p.heads[0].contains(&0),
        "{:?}",
        p.heads[0]
    );
    assert_eq!(p.heads[0].iter().filter(|h| **h >= 2).count(), 1);
}

#[test]
fn an_identity_layer_has_zero_block_importance_and_is_removed_first() {
    let m = model(TestModelSpec {
        num_layers: 3,
        ..Default::default()
    });
    for w in ["self_attn.o_proj", "mlp.down_proj"] {
        set(&m, &format!("model.layers.1.{w}.weight"), |r| {
            r.iter_mut().flatten().for_each(|x| *x = 0.0)
        });
    }
    let imp = scored(&m);
    let bi = imp.block_importance();
    assert!(bi[1].abs() < 1e-6, "{bi:?}");
    assert!(bi[0] > 1e-3 && bi[2] > 1e-3, "{bi:?}");
    let src = shape_of(&m.config);
    let mut target = src;
    target.num_layers = 2;
    let p = plan(&src, &scores(&imp, &[]).unwrap(), &target).unwrap();
    assert_eq!(p.layers, vec![0, 2]);
    // The pruned model computes exactly what the source computes with that layer skipped.
    let pruned = apply(&m, &p).unwrap();
    let skipped = m
        .forward_with(
            &ids(),
            crate::model::llama::ForwardOptions {
                skip_layers: &[1],
                ..Default::default()
            },
        )
        .unwrap();
    assert_eq!(
        max_abs_diff(&skipped, &pruned.forward(&ids()).unwrap()).unwrap(),
        0.0
    );
    // Perplexity depth scores agree: skipping the identity layer changes nothing.
    let d = DepthScores::compute(&m, &sequences(4, 16, 2), 2, &[0, 1, 2], |_, _| true).unwrap();
    assert!(
        (d.ppl_skip[1] - d.ppl_full).abs() < 1e-4 * d.ppl_full,
        "{d:?}"
    );
    // (On a random model skipping a real layer may help or hurt; the score is the increase.)
    let s = scores(&imp, std::slice::from_ref(&d)).unwrap();
    for l in 0..3 {
        assert_eq!(s.depth[l], d.ppl_skip[l] - d.ppl_full);
    }
    // Depth scores from several groups must cover every layer.
    let partial = DepthScores {
        layers: vec![0, 2],
        ppl_skip: vec![1.0, 2.0],
        ppl_full: 1.0,
    };
    assert!(scores(&imp, &[partial]).unwrap_err().contains("[1]"));
}

#[test]
fn a_channel_scaled_up_by_the_norm_weights_ranks_highest() {
    let m = model(TestModelSpec::default());
    for l in 0..2 {
        for n in ["input_layernorm", "post_attention_layernorm"] {
            set(&m, &format!("model.layers.{l}.{n}.weight"), |r| {
                r[0][13] *= 8.0
            });
        }
    }
    let c = scored(&m).channel_scores();
    let best = top_k(&c, 1);
    assert_eq!(best, vec![13], "{c:?}");
}

#[test]
fn three_shards_merge_to_the_unsharded_scores() {
    let m = model(TestModelSpec {
        seed: 2,
        ..Default::default()
    });
    let all = sequences(9, 16, 5);
    let whole = score(&m, &all, 4, |_, _| true).unwrap();
    let mut merged = Importance::new(&m.config);
    let dir = tempfile::tempdir().unwrap();
    for k in 0..3 {
        let shard: Vec<Vec<u32>> = all.iter().skip(k).step_by(3).cloned().collect();
        let part = score(&m, &shard, 2, |_, _| true).unwrap();
        // Through the artifact format, as the tasks do.
        let p = dir.path().join(format!("s{k}.safetensors"));
        part.save(&p).unwrap();
        merged.merge(&Importance::load(&p).unwrap()).unwrap();
    }
    assert_eq!(merged.sequences, 9);
    let close = |a: &[Vec<f64>], b: &[Vec<f64>]| {
        a.iter()
            .flatten()
            .zip(b.iter().flatten())
            .all(|(x, y)| (x - y).abs() <= 1e-5 * x.abs().max(y.abs()).max(1e-12))
    };
    assert!(close(&merged.neuron, &whole.neuron));
    assert!(close(&merged.attn, &whole.attn));
    assert!(close(&merged.attn_norm, &whole.attn_norm));
    assert!(close(&merged.mlp_norm, &whole.mlp_norm));
    assert!(close(
        std::slice::from_ref(&merged.bi_sum),
        std::slice::from_ref(&whole.bi_sum)
    ));
    assert_eq!(merged.bi_tokens, whole.bi_tokens);
    // And the plans they lead to are the same.
    let src = shape_of(&m.config);
    let mut target = src;
    target.hidden_size = 48;
    target.intermediate_size = 128;
    let a: KeepPlan = plan(&src, &scores(&merged, &[]).unwrap(), &target).unwrap();
    let b = plan(&src, &scores(&whole, &[]).unwrap(), &target).unwrap();
    assert_eq!(a, b);
}

#[test]
fn combined_pruning_yields_a_model_of_the_target_shape_and_size() {
    let m = model(TestModelSpec {
        num_layers: 3,
        tie_word_embeddings: true,
        ..Default::default()
    });
    let src = shape_of(&m.config);
    let mut target = src;
    target.hidden_size = 48;
    target.intermediate_size = 192;
    target.num_attention_heads = 2;
    target.num_layers = 2;
    target.params = distillery_proto::shape::param_count(&target);
    let p = plan(&src, &scores(&scored(&m), &[]).unwrap(), &target).unwrap();
    let pruned = apply(&m, &p).unwrap();
    assert_eq!(pruned.num_params() as u64, target.params);
    assert_eq!(pruned.config.head_dim(), m.config.head_dim());
    assert_eq!(pruned.config.num_kv_heads(), 2);
    let logits = pruned.forward(&ids()).unwrap();
    assert_eq!(logits.dims(), &[2, 12, m.config.vocab_size]);
}

fn arch_model(c: crate::model::LlamaConfig, seed: u64) -> Llama {
    let m = Llama::new(c, DType::F32, &Device::Cpu).unwrap();
    // Deterministic weights (candle's own init is unseeded).
    let mut state = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
    for (name, var) in m.named_vars() {
        let n = var.as_tensor().elem_count();
        let v: Vec<f32> = (0..n)
            .map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let u = ((state >> 11) as f64 / (1u64 << 53) as f64 - 0.5) as f32;
                if name.ends_with("norm.weight") {
                    0.2 * u + if m.config.arch().gemma() { 0.0 } else { 1.0 }
                } else {
                    0.4 * u
                }
            })
            .collect();
        var.set(&Tensor::from_vec(v, var.as_tensor().shape().clone(), &Device::Cpu).unwrap())
            .unwrap();
    }
    m
}

fn small_ids() -> Tensor {
    Tensor::new(
        sequences(2, 9, 3)
            .into_iter()
            .map(|r| r.into_iter().map(|x| x % 40).collect::<Vec<u32>>())
            .collect::<Vec<_>>(),
        &Device::Cpu,
    )
    .unwrap()
}

fn small_scored(m: &Llama) -> Importance {
    let calib: Vec<Vec<u32>> = sequences(6, 10, 2)
        .into_iter()
        .map(|r| r.into_iter().map(|x| x % 40).collect())
        .collect();
    score(m, &calib, 2, |_, _| true).unwrap()
}

#[test]
fn every_architecture_prunes_to_its_own_shape_exactly_and_to_a_smaller_one() {
    for c in crate::model::llama::tests::arch_configs() {
        let arch = c.model_type.clone();
        let m = arch_model(c, 5);
        let imp = small_scored(&m);
        assert_eq!(
            imp.post_norm.iter().all(|l| !l.is_empty()),
            m.config.arch().gemma(),
            "{arch}: Gemma's post norms are scored, and only Gemma has them"
        );
        let src = shape_of(&m.config);
        let s = scores(&imp, &[]).unwrap();
        let same = apply(&m, &plan(&src, &s, &src).unwrap()).unwrap();
        let d = max_abs_diff(
            &m.forward(&small_ids()).unwrap(),
            &same.forward(&small_ids()).unwrap(),
        )
        .unwrap();
        assert_eq!(d, 0.0, "{arch}");
        let mut target = src;
        target.hidden_size = 24;
        target.intermediate_size = 32;
        target.num_attention_heads = 2;
        target.num_layers = 2;
        target.params = distillery_proto::shape::param_count(&target);
        let p = plan(&src, &s, &target).unwrap();
        let pruned = apply(&m, &p).unwrap();
        assert_eq!(pruned.num_params() as u64, target.params, "{arch}");
        let kept: Vec<_> = p.layers.iter().map(|&l| m.config.layer_types[l]).collect();
        assert_eq!(pruned.config.layer_types, kept, "{arch}");
        for (j, &l) in p.layers.iter().enumerate() {
            assert_eq!(
                pruned.config.layer_window(j),
                m.config.layer_window(l),
                "{arch}"
            );
            assert_eq!(
                pruned.config.layer_rope(j),
                m.config.layer_rope(l),
                "{arch}"
            );
        }
        // q/k norms act per head_dim and stay whole.
        if m.config.arch().qk_norm() {
            let w = |model: &Llama, i: usize| {
                model.varmap.data().lock().unwrap()
                    [&format!("model.layers.{i}.self_attn.q_norm.weight")]
                    .as_tensor()
                    .clone()
            };
            assert_eq!(
                max_abs_diff(&w(&pruned, 0), &w(&m, p.layers[0])).unwrap(),
                0.0
            );
        }
    }
}

#[test]
fn each_of_gemmas_four_norms_feeds_the_channel_score() {
    let gemma = crate::model::llama::tests::arch_configs().remove(4);
    assert!(gemma.arch().gemma());
    for norm in [
        "input_layernorm",
        "post_attention_layernorm",
        "pre_feedforward_layernorm",
        "post_feedforward_layernorm",
    ] {
        let m = arch_model(gemma.clone(), 6);
        for l in 0..3 {
            // Gemma scales by (1 + w): w = 15 makes the channel 16x larger out of this norm.
            set(&m, &format!("model.layers.{l}.{norm}.weight"), |r| {
                r[0][13] = 15.0
            });
        }
        let imp = small_scored(&m);
        let c = imp.channel_scores();
        assert_eq!(top_k(&c, 1), vec![13], "{norm}: {c:?}");
        // And the accumulators survive the artifact format.
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s.safetensors");
        imp.save(&p).unwrap();
        assert_eq!(Importance::load(&p).unwrap(), imp);
    }
}

fn deep(seed: u64) -> Llama {
    model(TestModelSpec {
        num_layers: 8,
        seed,
        ..Default::default()
    })
}

#[test]
fn taylor_sums_of_three_shards_merge_to_the_unsharded_taylor_scores() {
    use super::importance::score_with;
    let m = deep(6);
    let all = sequences(9, 16, 3);
    let whole = score_with(&m, &all, 4, true, |_, _| true).unwrap();
    let mut merged = Importance::new(&m.config);
    let dir = tempfile::tempdir().unwrap();
    for k in 0..3 {
        let shard: Vec<Vec<u32>> = all.iter().skip(k).step_by(3).cloned().collect();
        let part = score_with(&m, &shard, 2, true, |_, _| true).unwrap();
        let p = dir.path().join(format!("t{k}.safetensors"));
        part.save(&p).unwrap();
        merged.merge(&Importance::load(&p).unwrap()).unwrap();
    }
    let (a, b) = (
        merged.taylor_block_scores(&m).unwrap(),
        whole.taylor_block_scores(&m).unwrap(),
    );
    eprintln!("Taylor block scores, merged {a:?}\n                     whole  {b:?}");
    assert_eq!(merged.taylor.as_ref().unwrap().tokens, 9.0 * 15.0);
    assert!(b.iter().all(|x| *x > 0.0));
    for (x, y) in a.iter().zip(&b) {
        assert!((x - y).abs() <= 1e-5 * y.abs(), "{a:?} vs {b:?}");
    }
    // Not the sum of the shards' own |W·G| (the abs comes after the merge): merging the
    // scores instead of the sums would give a different, larger number.
    let parts: f64 = (0..3)
        .map(|k| {
            let shard: Vec<Vec<u32>> = all.iter().skip(k).step_by(3).cloned().collect();
            let p = score_with(&m, &shard, 2, true, |_, _| true).unwrap();
            let t = p.taylor.as_ref().unwrap().tokens;
            p.taylor_block_scores(&m).unwrap()[4] * t / (9.0 * 15.0)
        })
        .sum();
    assert!(parts > b[4] * (1.0 + 1e-3), "{parts} vs {}", b[4]);
    let src = shape_of(&m.config);
    let mut target = src;
    target.num_layers = 6;
    let pa = plan(&src, &scores_by_taylor(&merged, &m).unwrap(), &target).unwrap();
    let pb = plan(&src, &scores_by_taylor(&whole, &m).unwrap(), &target).unwrap();
    assert_eq!(pa, pb);
    // Shards with and without Taylor sums do not mix.
    let plain = score(&m, &all[..2], 2, |_, _| true).unwrap();
    let mut mixed = whole.clone();
    assert!(mixed.merge(&plain).unwrap_err().contains("Taylor"));
}

#[test]
fn taylor_plus_scores_an_identity_block_lowest_and_keeps_the_first_four_and_last_two() {
    use super::importance::score_with;
    let m = deep(7);
    // Block 5 made an identity-ish no-op (its output projections scaled by 1e-3), and block 1,
    // which Taylor+ protects, nearly so (1e-2).
    for (layer, k) in [(5, 1e-3f32), (1, 1e-2)] {
        for w in ["self_attn.o_proj", "mlp.down_proj"] {
            set(&m, &format!("model.layers.{layer}.{w}.weight"), |r| {
                r.iter_mut().flatten().for_each(|x| *x *= k)
            });
        }
    }
    let imp = score_with(&m, &sequences(6, 16, 8), 2, true, |_, _| true).unwrap();
    let raw = imp.taylor_block_scores(&m).unwrap();
    eprintln!("Taylor block scores {raw:?}");
    let lowest = raw
        .iter()
        .enumerate()
        .min_by(|a, b| a.1.total_cmp(b.1))
        .unwrap()
        .0;
    assert_eq!(lowest, 5, "{raw:?}");
    assert!(
        raw[1] < raw[4],
        "block 1 should score below block 4: {raw:?}"
    );
    let s = scores_by_taylor(&imp, &m).unwrap();
    for l in [0, 1, 2, 3, 6, 7] {
        assert_eq!(s.depth[l], f64::INFINITY, "block {l} is protected");
    }
    assert_eq!((s.depth[4], s.depth[5]), (raw[4], raw[5]));
    let src = shape_of(&m.config);
    let mut target = src;
    target.num_layers = 7;
    assert_eq!(
        plan(&src, &s, &target).unwrap().layers,
        vec![0, 1, 2, 3, 4, 6, 7]
    );
    // Dropping both droppable blocks keeps every protected one, whatever their scores.
    target.num_layers = 6;
    assert_eq!(
        plan(&src, &s, &target).unwrap().layers,
        vec![0, 1, 2, 3, 6, 7]
    );
    assert_eq!(taylor_droppable(8), 2);
    assert_eq!(taylor_droppable(5), 0);
}

#[test]
fn magnitude_width_importance_ranks_the_units_with_the_largest_weights_first() {
    use super::baseline::{apply_width_importance, WidthImportance};
    let m = model(TestModelSpec {
        seed: 11,
        ..Default::default()
    });
    let c = m.config.clone();
    let hd = c.head_dim();
    // Neuron 3 of layer 0 (its down_proj column), head 1 of layer 1 (its q rows) and
    // embedding channel 5 (its embedding column) get large weights.
    set(&m, "model.layers.0.mlp.down_proj.weight", |rows| {
        rows.iter_mut().for_each(|r| r[3] *= 50.0)
    });
    set(&m, "model.layers.1.self_attn.q_proj.weight", |rows| {
        rows[hd..2 * hd]
            .iter_mut()
            .for_each(|r| r.iter_mut().for_each(|v| *v *= 50.0))
    });
    set(&m, "model.embed_tokens.weight", |rows| {
        rows.iter_mut().for_each(|r| r[5] *= 50.0)
    });
    let act = scores(&scored(&m), &[]).unwrap();
    let mut mag = act.clone();
    apply_width_importance(WidthImportance::Magnitude, &m, 0, &mut mag).unwrap();
    assert_eq!(top_k(&mag.neuron[0], 1), vec![3]);
    assert_eq!(top_k(&mag.head[1], 1), vec![1]);
    assert_eq!(top_k(&mag.channel, 1), vec![5]);
    assert_eq!(
        mag.depth, act.depth,
        "depth scores are not the baseline's business"
    );
    assert_eq!(mag.neuron[0].len(), c.intermediate_size);
    assert_eq!(mag.head[1].len(), c.num_attention_heads);
    // Magnitude equals the hand-computed norm of one neuron's weights.
    let vars: std::collections::HashMap<_, _> = m.named_vars().into_iter().collect();
    let sq = |name: &str| -> Vec<Vec<f32>> { vars[name].as_tensor().to_vec2().unwrap() };
    let (g, u, d) = (
        sq("model.layers.0.mlp.gate_proj.weight"),
        sq("model.layers.0.mlp.up_proj.weight"),
        sq("model.layers.0.mlp.down_proj.weight"),
    );
    let want: f64 = g[7]
        .iter()
        .chain(&u[7])
        .chain(d.iter().map(|r| &r[7]))
        .map(|v| f64::from(*v).powi(2))
        .sum::<f64>()
        .sqrt();
    assert!((mag.neuron[0][7] - want).abs() < 1e-9 * want.max(1.0));

    // Random: seeded, different per seed, every score in [0, 1).
    let mut r1 = act.clone();
    let mut r2 = act.clone();
    let mut r3 = act.clone();
    apply_width_importance(WidthImportance::Random, &m, 1, &mut r1).unwrap();
    apply_width_importance(WidthImportance::Random, &m, 1, &mut r2).unwrap();
    apply_width_importance(WidthImportance::Random, &m, 2, &mut r3).unwrap();
    assert_eq!(r1, r2);
    assert_ne!(r1.channel, r3.channel);
    assert_ne!(r1.channel, act.channel);
    assert!(r1.channel.iter().all(|v| (0.0..1.0).contains(v)));
    // Activation leaves the scores as they are; unknown names are refused by name.
    let mut a = act.clone();
    apply_width_importance(WidthImportance::Activation, &m, 1, &mut a).unwrap();
    assert_eq!(a, act);
    assert_eq!(
        WidthImportance::parse("").unwrap(),
        WidthImportance::Activation
    );
    let e = WidthImportance::parse("wanda").unwrap_err();
    assert!(e.contains("\"wanda\"") && e.contains("magnitude"), "{e}");
    // The plans differ: the baselines keep other units than activation importance does.
    let src = shape_of(&c);
    let mut t = src;
    t.intermediate_size /= 2;
    let p_act = plan(&src, &act, &t).unwrap();
    let p_rand = plan(&src, &r1, &t).unwrap();
    assert_ne!(p_act.neurons, p_rand.neurons);
}
