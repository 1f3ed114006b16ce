use std::path::Path;

use super::*;
use crate::machine::{apply, Config, Event, MachineError, State};
use crate::spec::{self, FileChecks};

/// SmolLM2-135M's shape (the example campaign's teacher).
fn smollm2() -> pb::ModelShape {
    let mut s = pb::ModelShape {
        hidden_size: 576,
        intermediate_size: 1536,
        num_attention_heads: 9,
        num_key_value_heads: 3,
        num_layers: 30,
        vocab_size: 49152,
        tie_word_embeddings: true,
        head_dim: 64,
        ..Default::default()
    };
    s.params = distillery_proto::shape::param_count(&s);
    s
}

fn spec_with(rounds: &str) -> pb::CampaignSpec {
    let text = format!(
        "name = \"t\"\n[teacher]\nmodel = \"/m\"\n[data]\ncalibration = {{ path = \"/c\" }}\n\
         train = [{{ name = \"web\", path = \"/w\" }}]\nvalidation = [{{ name = \"web\", path = \"/v\" }}]\n{rounds}"
    );
    let mut s = spec::parse(&text, Path::new("/"), FileChecks::None).expect("valid test spec");
    if let Some(t) = s.teacher.as_mut() {
        t.shape = Some(smollm2());
    }
    s
}

const TWO_ROUNDS: &str = "[[rounds]]\ntarget = { intermediate_size = 1280, num_layers = 28 }\n\
    distill = { tokens = 1000, seq_len = 512, micro_batch = 4, world_size = 2 }\n\
    [[rounds]]\ntarget = { params = 0.8 }\n\
    distill = { tokens = 1000, seq_len = 512, micro_batch = 4, world_size = 2, precision = \"bf16\" }\n";

#[test]
fn student_shapes_follow_the_targets_round_after_round() {
    let spec = spec_with(TWO_ROUNDS);
    let shapes = student_shapes(&spec).unwrap();
    assert_eq!(shapes.len(), 2);
    assert_eq!(
        (
            shapes[0].hidden_size,
            shapes[0].intermediate_size,
            shapes[0].num_layers
        ),
        (576, 1280, 28)
    );
    // Round 1's budget is 80% of round 0's student, chosen as the prune phase will.
    let want = distillery_worker::prune::plan::choose_shape(
        &shapes[0],
        &distillery_worker::prune::plan::Target {
            params: Some(0.8),
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(shapes[1], want);
    assert!(shapes[1].params < shapes[0].params);
    let plans = campaign_plan(&spec, DeviceKind::Cpu, Some(24 << 30)).unwrap();
    assert_eq!(plans[1].setup.precision, memplan::Precision::Bf16);
    assert_eq!(plans[0].plan.student_weights, shapes[0].params * 4);
    // bf16 on the CPU is autocast: the student stays f32 (its matrix multiplies run in bf16).
    assert_eq!(plans[1].plan.student_weights, shapes[1].params * 4);
    assert_eq!(plans[0].fits, Some(true));
    let text = render_text(&plans);
    assert!(
        text.contains("round 1:") && text.contains("fits yes"),
        "{text}"
    );
}

#[test]
fn a_spec_without_a_teacher_shape_has_no_plan() {
    let mut spec = spec_with(TWO_ROUNDS);
    spec.teacher.as_mut().unwrap().shape = None;
    let e = campaign_plan(&spec, DeviceKind::Cpu, None).unwrap_err();
    assert!(e.contains("no teacher shape"), "{e}");
    // Submit cannot judge it: accepted.
    assert_eq!(check_registered(&spec, &[("cpu".into(), 1 << 30)]), Ok(()));
}

#[test]
fn submit_check_against_registered_devices() {
    let spec = spec_with(TWO_ROUNDS);
    let need = campaign_plan(&spec, DeviceKind::Cpu, None).unwrap()[0]
        .plan
        .total;
    // No devices, or one of unknown size: accepted.
    assert_eq!(check_registered(&spec, &[]), Ok(()));
    assert_eq!(
        check_registered(&spec, &[("cpu".into(), 1 << 20), ("cuda:0".into(), 0)]),
        Ok(())
    );
    // A device the first round fits: accepted.
    let big = (need as f64 / (1.0 - memplan::SAFETY_MARGIN)) as u64 + (1 << 20);
    assert_eq!(check_registered(&spec, &[("cpu".into(), big)]), Ok(()));
    // Too small a device: refused, naming the round, the need, the device and a change.
    let small = need / 2;
    let e = check_registered(
        &spec,
        &[("cpu:0".into(), small), ("cpu:1".into(), small / 2)],
    )
    .unwrap_err();
    assert!(e.starts_with("rounds[0]: a rank needs "), "{e}");
    assert!(e.contains(&gib(need)), "{e}");
    assert!(e.contains(&format!("(cpu) has {}", gib(small))), "{e}");
    assert!(e.contains("; set "), "{e}");
    // A large enough device of another kind makes it fit somewhere.
    assert_eq!(
        check_registered(&spec, &[("cpu".into(), small), ("cuda:0".into(), 80 << 30)]),
        Ok(())
    );
}

fn register(st: &mut State, memory: Vec<u64>) -> Result<(), MachineError> {
    apply(
        st,
        &Config::default(),
        Event::Register {
            host: "h".into(),
            devices: vec!["cpu".into()],
            device_memory: memory,
            labels: Default::default(),
            version: "0".into(),
            task_kinds: vec!["distill".into()],
            nonce: 1,
            previous: None,
            now: 1,
        },
    )
    .map(|_| ())
}

fn submit(st: &mut State, spec: &pb::CampaignSpec) -> Result<(), MachineError> {
    apply(
        st,
        &Config::default(),
        Event::Submit {
            spec: Box::new(spec.clone()),
            now: 2,
        },
    )
    .map(|_| ())
}

#[test]
fn the_machine_refuses_a_round_that_fits_no_registered_device() {
    let spec = spec_with(TWO_ROUNDS);
    // Nobody registered: accepted (a worker may still come).
    let mut st = State::default();
    submit(&mut st, &spec).unwrap();
    assert_eq!(st.campaigns.len(), 1);
    // One worker with 1 GiB of host memory: refused, nothing stored.
    let mut st = State::default();
    register(&mut st, vec![1 << 30]).unwrap();
    let e = submit(&mut st, &spec).unwrap_err().to_string();
    assert!(e.starts_with("spec.rounds[0]: a rank needs"), "{e}");
    assert!(st.campaigns.is_empty());
    // The same worker with 64 GiB: accepted.
    let mut st = State::default();
    register(&mut st, vec![64 << 30]).unwrap();
    submit(&mut st, &spec).unwrap();
    assert_eq!(st.campaigns.len(), 1);
    // A memory list that does not match the devices is refused at registration.
    let mut st = State::default();
    assert!(register(&mut st, vec![1, 2]).is_err());
}

#[test]
fn json_carries_every_line_and_the_fit() {
    let spec = spec_with(TWO_ROUNDS);
    let plans = campaign_plan(&spec, DeviceKind::Cpu, Some(1 << 30)).unwrap();
    let v = to_json(&plans);
    let r0 = &v[0];
    assert_eq!(r0["fits"], false);
    assert_eq!(r0["bytes"]["total"], plans[0].plan.total);
    assert_eq!(r0["bytes"]["teacher_weights"], smollm2().params * 4);
    assert!(r0["suggestion"].is_object() || r0["suggestion"].is_null());
    for k in [
        "student_weights",
        "gradients",
        "master_and_moments",
        "activations",
        "activations_without_recompute",
        "activations_with_recompute",
        "loss",
        "teacher_forward",
        "backward",
        "runtime",
    ] {
        assert!(r0["bytes"][k].as_u64().is_some(), "{k}");
    }
}

#[test]
fn the_teacher_correction_is_planned_as_the_whole_teacher_trained_in_f32_and_checked_at_submit() {
    let plain = spec_with(TWO_ROUNDS);
    assert_eq!(correction_plan(&plain, DeviceKind::Cpu, None), Ok(None));
    let spec = spec_with(&format!(
        "{TWO_ROUNDS}[teacher_correction]\ntokens = 1000\nseq_len = 1024\nmicro_batch = 8\n"
    ));
    let c = correction_plan(&spec, DeviceKind::Cpu, Some(24 << 30))
        .unwrap()
        .unwrap();
    assert!(c.correction);
    let teacher = smollm2().params;
    // The teacher is the model being trained: f32 weights, f32 gradients, master + m + v; no
    // KD teacher loaded.
    assert_eq!(c.plan.student_weights, teacher * 4);
    assert_eq!(c.plan.teacher_weights, 0);
    assert!(c.plan.gradients >= teacher * 4);
    assert_eq!((c.setup.micro_batch, c.setup.seq_len), (8, 1024));
    assert_eq!(c.fits, Some(true));
    let text = render_text(std::slice::from_ref(&c));
    assert!(
        text.starts_with("teacher correction") && text.contains("before round 0"),
        "{text}"
    );
    assert_eq!(to_json(std::slice::from_ref(&c))[0]["phase"], "correct");
    // It trains a larger model than round 0 distills: a device round 0 fits but the correction
    // does not is refused at submit, naming the correction.
    let round0 = campaign_plan(&spec, DeviceKind::Cpu, None).unwrap()[0]
        .plan
        .total;
    assert!(c.plan.total > round0, "{} vs {round0}", c.plan.total);
    let between = ((round0 + c.plan.total) / 2) as f64 / (1.0 - memplan::SAFETY_MARGIN);
    let e = check_registered(&spec, &[("cpu".into(), between as u64)]).unwrap_err();
    assert!(
        e.starts_with("teacher_correction: a rank trains the whole teacher"),
        "{e}"
    );
    assert_eq!(
        check_registered(&plain, &[("cpu".into(), between as u64)]),
        Ok(())
    );
}
