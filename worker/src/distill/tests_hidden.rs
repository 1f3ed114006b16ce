//! The loss family inside the trainer: intermediate-state distillation through a learned
//! projection (gradients reach the projection and the student's layers as finite differences
//! say; recomputation gives the same gradients; a resumed run is bit-identical, projection
//! included; the exported student has no projection), and cross-entropy only.

use candle_core::{DType, Device, Tensor};

use super::data::Domain;
use super::hidden::{hidden_loss, initial_projection, HiddenDistill, HiddenLoss, PROJECTION};
use super::loss::Divergence;
use super::train::{Objective, TrainConfig, Trainer, AUX_FILE};
use crate::collective::Solo;
use crate::model::test_model::{test_model, TestModelSpec};
use crate::model::{tokenizer, Llama};
use crate::prune::{apply::apply, importance::score, plan, scores};

const TEXT: &str = "The cat sat on the mat. The dog sat on the log. A bird sang in the tree, \
and the cat looked at the bird. The dog ran to the tree and the bird flew away. ";

fn domains() -> Vec<Domain> {
    let tok = tokenizer::byte_level().unwrap();
    let docs: Vec<String> = (0..20).map(|i| format!("{i} {}", TEXT.repeat(3))).collect();
    vec![Domain {
        name: "animals".into(),
        sequences: crate::data::pack(&tok, &docs, Some(257), 17, 1000).unwrap(),
    }]
}

fn teacher(dtype: DType) -> Llama {
    test_model(
        &TestModelSpec {
            num_layers: 3,
            seed: 3,
            ..Default::default()
        },
        dtype,
        &Device::Cpu,
    )
    .unwrap()
}

/// The teacher pruned to 48 channels and 2 layers, with the pairs and channel map its prune
/// record would hold.
fn pruned(teacher: &Llama) -> (Llama, HiddenDistill) {
    let seqs: Vec<Vec<u32>> = domains()[0].sequences[..4].to_vec();
    let imp = score(teacher, &seqs, 2, |_, _| true).unwrap();
    let src = plan::shape_of(&teacher.config);
    let mut target = src;
    target.hidden_size = 48;
    target.num_layers = 2;
    let keep = plan::plan(&src, &scores(&imp, &[]).unwrap(), &target).unwrap();
    let student = apply(teacher, &keep).unwrap();
    let h = HiddenDistill {
        pairs: keep.layers.iter().copied().enumerate().collect(),
        loss: HiddenLoss::Cosine,
        channels: Some(keep.channels.clone()),
    };
    (student, h)
}

fn cfg(steps: u64, objective: Objective) -> TrainConfig {
    TrainConfig {
        seq_len: 16,
        micro_batch: 2,
        global_batch: 4,
        total_steps: steps,
        lr: 3e-3,
        warmup_steps: 1,
        temperature: 2.0,
        ce_weight: 0.3,
        seed: 5,
        max_grad_norm: 1.0,
        weight_decay: 0.01,
        dynamic: None,
        precision: Default::default(),
        shard_optimizer: false,
        recompute: false,
        objective,
    }
}

fn hidden_objective(h: HiddenDistill) -> Objective {
    Objective {
        divergence: Some(Divergence::ReverseKl),
        top_k: Some(16),
        hidden: Some(h),
    }
}

fn weights(m: &Llama) -> Vec<(String, Vec<f32>)> {
    m.named_vars()
        .into_iter()
        .map(|(n, v)| (n, v.as_tensor().flatten_all().unwrap().to_vec1().unwrap()))
        .collect()
}

#[test]
fn the_hidden_loss_gradient_reaches_the_projection_and_the_student_layers_as_finite_differences_say(
) {
    let t = teacher(DType::F64);
    let (s, h) = pruned(&t);
    let ids = Tensor::new(vec![domains()[0].sequences[0][..12].to_vec()], &Device::Cpu).unwrap();
    let (s_layers, t_layers): (Vec<usize>, Vec<usize>) = h.pairs.iter().copied().unzip();
    let (_, th) = t.forward_hidden(&ids, false, &t_layers).unwrap();
    let w = candle_core::Var::from_tensor(
        &initial_projection(64, h.channels.as_ref().unwrap(), DType::F64, &Device::Cpu).unwrap(),
    )
    .unwrap();
    // Move the projection off its 0/1 start so its gradient is generic.
    w.set(&w.as_tensor().affine(0.9, 0.01).unwrap()).unwrap();
    let value = || -> f64 {
        let (_, sh) = s.forward_hidden(&ids, true, &s_layers).unwrap();
        hidden_loss(&sh, &th, Some(w.as_tensor()), HiddenLoss::Cosine)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    };
    let (_, sh) = s.forward_hidden(&ids, true, &s_layers).unwrap();
    let l = hidden_loss(&sh, &th, Some(w.as_tensor()), HiddenLoss::Cosine).unwrap();
    let g = l.backward().unwrap();
    let vars: std::collections::HashMap<String, candle_core::Var> =
        s.named_vars().into_iter().collect();
    let mut checked = 0;
    let targets: Vec<(&str, candle_core::Var)> = vec![
        ("projection", w.clone()),
        (
            "layer 0 down_proj",
            vars["model.layers.0.mlp.down_proj.weight"].clone(),
        ),
        (
            "layer 1 q_proj",
            vars["model.layers.1.self_attn.q_proj.weight"].clone(),
        ),
        ("embedding", vars["model.embed_tokens.weight"].clone()),
    ];
    for (what, v) in targets {
        let grad: Vec<f64> = g
            .get(v.as_tensor())
            .unwrap_or_else(|| panic!("no gradient reached the {what}"))
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let base: Vec<f64> = v.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
        // The entries with the largest gradients, and the first.
        let mut idx: Vec<usize> = (0..grad.len()).collect();
        idx.sort_by(|a, b| grad[*b].abs().total_cmp(&grad[*a].abs()));
        idx.truncate(3);
        idx.push(0);
        assert!(
            grad[idx[0]].abs() > 1e-6,
            "{what}: gradient {:e}",
            grad[idx[0]]
        );
        for i in idx {
            let eps = 1e-6;
            let probe = |d: f64| {
                let mut x = base.clone();
                x[i] += d;
                v.set(&Tensor::from_vec(x, v.shape(), &Device::Cpu).unwrap())
                    .unwrap();
                let y = value();
                v.set(&Tensor::from_vec(base.clone(), v.shape(), &Device::Cpu).unwrap())
                    .unwrap();
                y
            };
            let fd = (probe(eps) - probe(-eps)) / (2.0 * eps);
            assert!(
                (fd - grad[i]).abs() <= 1e-6 * fd.abs().max(1e-3),
                "{what}[{i}]: backward {} vs finite differences {fd}",
                grad[i]
            );
            checked += 1;
        }
    }
    assert_eq!(checked, 16);
}

#[test]
fn recomputation_with_hidden_states_gives_the_gradients_of_the_full_graph() {
    let t = teacher(DType::F32);
    let grads = |recompute: bool| -> Vec<f32> {
        let (s, h) = pruned(&t);
        let mut c = cfg(1, hidden_objective(h));
        c.recompute = recompute;
        let mut solo = Solo;
        let mut tr = Trainer::new(s, Some(&t), c, &mut solo, domains(), &[1.0], vec![]).unwrap();
        let st = tr.train_step().unwrap();
        assert!(st.hidden > 0.0 && st.hidden.is_finite(), "{st:?}");
        tr.last_gradients().unwrap()
    };
    let (full, re) = (grads(false), grads(true));
    assert_eq!(full.len(), re.len());
    let scale = full.iter().fold(0f32, |m, x| m.max(x.abs()));
    let diff = full
        .iter()
        .zip(&re)
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    // The projection is the last 64 x 48 entries: it gets a gradient in both.
    let proj = &full[full.len() - 64 * 48..];
    assert!(
        proj.iter().any(|x| x.abs() > 1e-6),
        "no gradient on the projection"
    );
    eprintln!("hidden states: max |g - g_recompute| = {diff:e} (max |g| = {scale:e})");
    assert!(diff <= 1e-5 * scale, "{diff} vs {scale}");
}

#[test]
fn a_resumed_run_with_a_projection_is_bit_identical_and_the_exported_student_has_none() {
    let t = teacher(DType::F32);
    let (student0, h) = pruned(&t);
    let obj = hidden_objective(h.clone());
    let ck = tempfile::tempdir().unwrap();
    // Straight: 5 steps.
    let mut solo = Solo;
    let mut a = Trainer::new(
        pruned(&t).0,
        Some(&t),
        cfg(5, obj.clone()),
        &mut solo,
        domains(),
        &[1.0],
        vec![],
    )
    .unwrap();
    let start_proj = a.master_weights().unwrap()[PROJECTION]
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    while a.step < 5 {
        a.train_step().unwrap();
    }
    let a_master = a.master_weights().unwrap();
    let end_proj: Vec<f32> = a_master[PROJECTION]
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    assert_ne!(start_proj, end_proj, "the projection did not train");
    // Interrupted at step 2, resumed by a fresh trainer whose projection starts elsewhere.
    let mut solo1 = Solo;
    let mut b = Trainer::new(
        student0,
        Some(&t),
        cfg(5, obj.clone()),
        &mut solo1,
        domains(),
        &[1.0],
        vec![],
    )
    .unwrap();
    while b.step < 2 {
        b.train_step().unwrap();
    }
    b.save_checkpoint(ck.path(), None).unwrap();
    assert!(ck.path().join(AUX_FILE).is_file());
    let mut solo2 = Solo;
    let other = HiddenDistill {
        channels: Some((0..48).rev().collect()),
        ..h.clone()
    };
    let mut c = Trainer::new(
        pruned(&t).0,
        Some(&t),
        cfg(5, hidden_objective(other)),
        &mut solo2,
        domains(),
        &[1.0],
        vec![],
    )
    .unwrap();
    c.load_checkpoint(ck.path()).unwrap();
    while c.step < 5 {
        c.train_step().unwrap();
    }
    assert_eq!(
        weights(&a.student),
        weights(&c.student),
        "student weights differ"
    );
    let c_proj: Vec<f32> = c.master_weights().unwrap()[PROJECTION]
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    assert_eq!(end_proj, c_proj, "projection differs");
    // The exported student: exactly the student's tensors, loadable as a model of its shape.
    let out = tempfile::tempdir().unwrap();
    a.save_student(out.path(), None).unwrap();
    let saved =
        candle_core::safetensors::load(out.path().join("model.safetensors"), &Device::Cpu).unwrap();
    let mut names: Vec<String> = saved.into_keys().collect();
    names.sort();
    let want: Vec<String> = a.student.named_vars().into_iter().map(|(n, _)| n).collect();
    assert_eq!(names, want);
    let m = crate::model::io::load_dir(out.path(), DType::F32, &Device::Cpu).unwrap();
    assert_eq!(m.config.hidden_size, 48);
    // A checkpoint without the projection is refused by a run that trains one.
    let plain = tempfile::tempdir().unwrap();
    let mut solo3 = Solo;
    let mut p = Trainer::new(
        pruned(&t).0,
        Some(&t),
        cfg(5, Objective::default()),
        &mut solo3,
        domains(),
        &[1.0],
        vec![],
    )
    .unwrap();
    p.train_step().unwrap();
    p.save_checkpoint(plain.path(), None).unwrap();
    let e = c.load_checkpoint(plain.path()).unwrap_err().to_string();
    assert!(
        e.contains(AUX_FILE) || e.contains("other parameters"),
        "{e}"
    );
}

#[test]
fn cross_entropy_only_with_a_teacher_equals_training_without_one() {
    let t = teacher(DType::F32);
    let run = |with_teacher: bool| {
        let mut solo = Solo;
        let obj = Objective {
            divergence: None,
            top_k: None,
            hidden: None,
        };
        let mut c = cfg(3, obj);
        c.ce_weight = 0.0;
        let mut tr = Trainer::new(
            pruned(&t).0,
            with_teacher.then_some(&t),
            c,
            &mut solo,
            domains(),
            &[1.0],
            vec![],
        )
        .unwrap();
        for _ in 0..3 {
            let s = tr.train_step().unwrap();
            assert_eq!(s.kl, 0.0);
        }
        weights(&tr.student)
    };
    assert_eq!(run(true), run(false));
}
