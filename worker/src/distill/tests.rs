use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use candle_core::{DType, Device};

use super::data::Domain;
use super::train::{DynamicBatchLoading, TrainConfig, Trainer};
use crate::collective::ring::{bind, Ring};
use crate::collective::{Collective, Solo};
use crate::model::test_model::{test_model, TestModelSpec};
use crate::model::{max_abs_diff, tokenizer, Llama};
use crate::prune::{apply::apply, importance::score, plan, scores};

const TEXT: &str = "The cat sat on the mat. The dog sat on the log. A bird sang in the tree, \
and the cat looked at the bird. The dog ran to the tree and the bird flew away. ";

fn sequences(text: &str, seq_len: usize) -> Vec<Vec<u32>> {
    let tok = tokenizer::byte_level().unwrap();
    let docs: Vec<String> = (0..20).map(|i| format!("{i} {}", text.repeat(3))).collect();
    crate::data::pack(&tok, &docs, Some(257), seq_len + 1, 1000).unwrap()
}

fn cfg(steps: u64) -> TrainConfig {
    TrainConfig {
        seq_len: 24,
        micro_batch: 2,
        global_batch: 4,
        total_steps: steps,
        lr: 3e-3,
        warmup_steps: 2,
        temperature: 1.0,
        ce_weight: 0.0,
        seed: 9,
        max_grad_norm: 1.0,
        weight_decay: 0.01,
        dynamic: None,
        precision: Default::default(),
        shard_optimizer: false,
        recompute: false,
    }
}

fn domains() -> Vec<Domain> {
    vec![
        Domain {
            name: "animals".into(),
            sequences: sequences(TEXT, 24),
        },
        Domain {
            name: "digits".into(),
            sequences: sequences("0123456789 9876543210 1357924680 ", 24),
        },
    ]
}

fn tiny(seed: u64) -> Llama {
    test_model(
        &TestModelSpec {
            seed,
            ..Default::default()
        },
        DType::F32,
        &Device::Cpu,
    )
    .unwrap()
}

fn copy(m: &Llama) -> Llama {
    let c = test_model(&TestModelSpec::default(), DType::F32, &Device::Cpu).unwrap();
    let src = m.named_vars();
    for ((_, a), (_, b)) in c.named_vars().iter().zip(&src) {
        a.set(b.as_tensor()).unwrap();
    }
    c
}

fn weights_of(m: &Llama) -> Vec<candle_core::Tensor> {
    m.named_vars()
        .iter()
        .map(|(_, v)| v.as_tensor().copy().unwrap())
        .collect()
}

fn max_weight_diff(a: &Llama, b: &Llama) -> f64 {
    weights_of(a)
        .iter()
        .zip(weights_of(b))
        .map(|(x, y)| max_abs_diff(x, &y).unwrap())
        .fold(0.0, f64::max)
}

fn mean_ppl(m: &Llama, seqs: &[Vec<u32>]) -> f64 {
    let rows: Vec<Vec<u32>> = seqs.iter().map(|s| s[..24].to_vec()).collect();
    crate::model::perplexity::mean_nll(m, &rows, 4, &[])
        .unwrap()
        .exp()
}

#[test]
fn distillation_brings_a_pruned_student_back_towards_its_teacher() {
    // A teacher that knows the text: a tiny model trained briefly without a teacher.
    let teacher = tiny(1);
    let d = domains();
    let mut solo = Solo;
    let mut t = Trainer::new(
        teacher,
        None,
        cfg(80),
        &mut solo,
        d.clone(),
        &[1.0, 0.0],
        vec![],
    );
    for _ in 0..80 {
        t.train_step().unwrap();
    }
    let teacher = t.student;
    let held_out = sequences(TEXT, 24)[30..40].to_vec();
    let teacher_ppl = mean_ppl(&teacher, &held_out);
    // Prune it (width and depth), then distill.
    let imp = score(&teacher, &held_out[..4], 2, |_, _| true).unwrap();
    let src = plan::shape_of(&teacher.config);
    let mut target = src;
    target.hidden_size = 40;
    target.intermediate_size = 96;
    target.num_layers = 1;
    let keep = plan::plan(&src, &scores(&imp, &[]).unwrap(), &target).unwrap();
    let student = apply(&teacher, &keep).unwrap();
    let pruned_ppl = mean_ppl(&student, &held_out);
    let mut solo = Solo;
    let mut c = cfg(60);
    c.temperature = 2.0;
    let mut kd = Trainer::new(
        student,
        Some(&teacher),
        c,
        &mut solo,
        d,
        &[1.0, 0.0],
        vec![],
    );
    let kl_before = kd.eval_kl(&held_out).unwrap();
    let mut first = None;
    let mut last = None;
    for _ in 0..60 {
        let s = kd.train_step().unwrap();
        first.get_or_insert(s.loss);
        last = Some(s);
    }
    let kl_after = kd.eval_kl(&held_out).unwrap();
    let student_ppl = mean_ppl(&kd.student, &held_out);
    eprintln!(
        "teacher ppl {teacher_ppl:.2}, pruned {pruned_ppl:.2}, distilled {student_ppl:.2}; KL {kl_before:.3} -> {kl_after:.3}; loss {:?} -> {:?}",
        first,
        last.map(|s| s.loss)
    );
    assert!(
        teacher_ppl < 20.0,
        "the teacher did not learn: {teacher_ppl}"
    );
    assert!(kl_after < 0.5 * kl_before, "KL {kl_before} -> {kl_after}");
    assert!(
        student_ppl < 0.5 * pruned_ppl,
        "ppl {pruned_ppl} -> {student_ppl}"
    );
    let last = last.unwrap();
    assert_eq!(last.step, 60);
    assert_eq!(last.tokens, 60 * 4 * 24);
}

/// Runs `steps` steps on `n` ranks (threads over a loopback ring; n = 1: no ring) from the same
/// student and returns rank 0's trained model.
fn run_ranks(n: usize, steps: u64, resume_at: Option<u64>) -> Llama {
    let teacher = tiny(3);
    let listeners: Vec<_> = (0..n)
        .map(|_| bind(IpAddr::V4(Ipv4Addr::LOCALHOST)).unwrap())
        .collect();
    let addrs: Vec<SocketAddr> = listeners.iter().map(|l| l.local_addr().unwrap()).collect();
    let ck = tempfile::tempdir().unwrap();
    let out: Vec<Llama> = std::thread::scope(|s| {
        let hs: Vec<_> = listeners
            .into_iter()
            .enumerate()
            .map(|(r, l)| {
                let (addrs, teacher, ck) = (addrs.clone(), &teacher, ck.path().to_path_buf());
                s.spawn(move || {
                    let mut coll: Box<dyn Collective> = if n == 1 {
                        Box::new(Solo)
                    } else {
                        Box::new(
                            Ring::connect(
                                r,
                                l,
                                &addrs,
                                Duration::from_secs(10),
                                Duration::from_secs(30),
                            )
                            .unwrap(),
                        )
                    };
                    let mk = |coll: &mut dyn Collective| -> Llama {
                        let student = copy(teacher);
                        // A different starting point than the teacher.
                        for (_, v) in student.named_vars() {
                            v.set(&(v.as_tensor() * 0.8).unwrap()).unwrap();
                        }
                        let mut t = Trainer::new(
                            student,
                            Some(teacher),
                            cfg(steps),
                            coll,
                            domains(),
                            &[0.6, 0.4],
                            vec![],
                        );
                        let dir = ck.join(format!("rank{r}"));
                        if let Some(k) = resume_at {
                            for _ in 0..k {
                                t.train_step().unwrap();
                            }
                            t.save_checkpoint(&dir, None).unwrap();
                            let (data, opt, loss) = (t.data.clone(), t.opt.clone(), t.last_loss);
                            assert!(loss.is_finite());
                            drop(t);
                            // A new process would start here: any student, state from disk.
                            let mut t2 = Trainer::new(
                                tiny(77),
                                Some(teacher),
                                cfg(steps),
                                coll,
                                domains(),
                                &[0.6, 0.4],
                                vec![],
                            );
                            t2.load_checkpoint(&dir).unwrap();
                            assert_eq!((t2.step, &t2.data, &t2.opt), (k, &data, &opt));
                            // A run resumed at its last step still knows its final loss.
                            assert_eq!(t2.last_loss, loss);
                            while t2.step < steps {
                                t2.train_step().unwrap();
                            }
                            return t2.student;
                        }
                        while t.step < steps {
                            t.train_step().unwrap();
                        }
                        t.student
                    };
                    mk(coll.as_mut())
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut it = out.into_iter();
    let first = it.next().unwrap();
    for other in it {
        assert_eq!(max_weight_diff(&first, &other), 0.0, "ranks diverged");
    }
    first
}

#[test]
fn two_ranks_over_the_ring_equal_one_rank_over_the_same_global_batch() {
    let one = run_ranks(1, 4, None);
    let two = run_ranks(2, 4, None);
    let d = max_weight_diff(&one, &two);
    eprintln!("max |w1 - w2| after 4 steps: {d:e}");
    assert!(d < 1e-5, "{d}");
    // And training moved the weights well beyond that tolerance.
    let untrained = copy(&tiny(3));
    assert!(max_weight_diff(&one, &untrained) > 1e-2);
}

#[test]
fn a_resumed_run_is_bit_identical_to_an_uninterrupted_one() {
    for n in [1, 2] {
        let straight = run_ranks(n, 5, None);
        let resumed = run_ranks(n, 5, Some(2));
        assert_eq!(max_weight_diff(&straight, &resumed), 0.0, "{n} ranks");
    }
}

#[test]
fn dynamic_batch_loading_shifts_weight_to_the_domain_furthest_above_its_reference() {
    let teacher = tiny(4);
    let student = copy(&teacher);
    let d = domains();
    let val: Vec<Vec<Vec<u32>>> = d.iter().map(|x| x.sequences[..3].to_vec()).collect();
    let mut c = cfg(6);
    // Both domains' losses are ~ln(260) for this random student: a reference far below it
    // for "digits" and at it for "animals".
    c.dynamic = Some(DynamicBatchLoading {
        reference: vec![9.0, 1.0],
        update_every: 2,
    });
    let mut solo = Solo;
    let mut t = Trainer::new(student, Some(&teacher), c, &mut solo, d, &[0.5, 0.5], val);
    let losses = t.validation_losses().unwrap();
    assert!(losses.iter().all(|l| *l > 2.0 && *l < 9.0), "{losses:?}");
    for _ in 0..3 {
        t.train_step().unwrap();
    }
    assert!(t.data.weights[1] > 0.9, "{:?}", t.data.weights);
    assert!((t.data.weights.iter().sum::<f64>() - 1.0).abs() < 1e-9);
}
