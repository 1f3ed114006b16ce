use std::collections::{BTreeMap, BTreeSet};

use proptest::prelude::*;

use super::sequence::{cfg, lref, outputs_for, search_spec, spec, Harness, Op, CORRECTION, DIGEST};
use super::*;
use crate::phases::kind;

fn register(st: &mut State, devices: &[&str]) -> String {
    let t = apply(
        st,
        &cfg(),
        Event::Register {
            host: "h".into(),
            devices: devices.iter().map(|d| d.to_string()).collect(),
            device_memory: Vec::new(),
            labels: BTreeMap::new(),
            version: "0".into(),
            task_kinds: kind::ALL.iter().map(|k| k.to_string()).collect(),
            nonce: 7,
            previous: None,
            now: 0,
        },
    )
    .unwrap();
    match t.reply {
        Reply::WorkerId(w) => w,
        r => panic!("{r:?}"),
    }
}

fn submit(st: &mut State, spec: pb::CampaignSpec, now: Millis) -> String {
    match apply(
        st,
        &cfg(),
        Event::Submit {
            spec: Box::new(spec),
            now,
        },
    )
    .unwrap()
    .reply
    {
        Reply::CampaignId(c) => c,
        r => panic!("{r:?}"),
    }
}

fn poll(st: &mut State, w: &str, devices: &[&str], now: Millis) -> Vec<Assignment> {
    poll_events(st, w, devices, now).0
}

fn poll_events(
    st: &mut State,
    w: &str,
    devices: &[&str],
    now: Millis,
) -> (Vec<Assignment>, Vec<pb::Event>) {
    let t = apply(
        st,
        &cfg(),
        Event::Poll {
            worker: w.into(),
            free_devices: devices.iter().map(|d| d.to_string()).collect(),
            now,
        },
    )
    .unwrap();
    let a = t
        .effects
        .into_iter()
        .flat_map(|e| match e {
            Effect::Assign {
                worker,
                assignments,
            } if worker == w => assignments,
            _ => Vec::new(),
        })
        .collect();
    (a, t.events)
}

fn complete(st: &mut State, a: &Assignment, now: Millis) -> Result<Transition, MachineError> {
    let (outputs, metrics) = outputs_for(st, &a.task_id);
    apply(
        st,
        &cfg(),
        Event::Complete {
            lease: lref(a),
            outputs,
            metrics,
            now,
        },
    )
}

/// Runs every task to completion with one worker of `devices`; returns the event kinds.
fn drive(st: &mut State, w: &str, devices: &[&str], c: &str) -> Vec<pb::Event> {
    let mut events = Vec::new();
    let mut now = 10;
    for _ in 0..200 {
        if st.campaigns[c].state.is_terminal() {
            break;
        }
        let (a, evs) = poll_events(st, w, devices, now);
        events.extend(evs);
        assert!(
            !a.is_empty(),
            "no work handed out in {:?}",
            st.campaigns[c].rounds
        );
        for x in &a {
            events.extend(complete(st, x, now).unwrap().events);
        }
        now += 10;
    }
    events
}

#[test]
fn a_campaign_runs_through_every_phase_in_order() {
    let mut st = State::default();
    let judge = "[evaluation]\nperplexity = true\njudge = { backend = \"openai\", base_url = \"http://x/v1\", model = \"j\", questions = \"/q\" }\n";
    let c = submit(&mut st, spec(2, 1, judge), 0);
    let w = register(&mut st, &["cpu"]);
    let events = drive(&mut st, &w, &["cpu"], &c);
    assert_eq!(st.campaigns[&c].state, CampaignState::Succeeded);
    let phases: Vec<(u32, String)> = events
        .iter()
        .filter(|e| e.kind == "phase_started")
        .map(|e| (e.round, e.phase.clone()))
        .collect();
    let expect: Vec<(u32, String)> = [0, 1]
        .iter()
        .flat_map(|r| {
            ["prune", "distill", "evaluate", "judge"]
                .iter()
                .map(move |p| (*r, p.to_string()))
        })
        .filter(|x| x != &(0, "score".into()))
        .collect::<Vec<_>>();
    // Round 0's score phase started at submit; round 1's at round 0's gate.
    let mut expect_all = expect.clone();
    expect_all.insert(4, (1, "score".into()));
    assert_eq!(phases, expect_all);
    // Teacher figures are computed once and reused: one teacher perplexity and answers task.
    let teacher_tasks = st
        .tasks
        .values()
        .filter(|t| t.params.get("role").is_some_and(|r| r == "teacher"))
        .count();
    assert_eq!(teacher_tasks, 2);
    let r1 = &st.campaigns[&c].rounds[1];
    assert_eq!(r1.metrics["teacher_perplexity"], 10.0);
    assert_eq!(r1.metrics["judge.win_rate"], 0.4);
    assert_eq!(r1.artifacts["student"], DIGEST);
    // Round 1 starts from round 0's student.
    assert_eq!(r1.source, DIGEST);
    // Sequence numbers are contiguous.
    let seqs: Vec<u64> = events.iter().map(|e| e.seq).collect();
    assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1));
}

#[test]
fn a_stale_report_is_refused_and_changes_nothing() {
    let mut st = State::default();
    let c = submit(&mut st, spec(1, 1, ""), 0);
    let w1 = register(&mut st, &["cpu"]);
    let w2 = register(&mut st, &["cpu"]);
    let a = poll(&mut st, &w1, &["cpu"], 0);
    assert_eq!(a.len(), 1);
    // w1 stops heart-beating: the lease expires and the task goes to w2 after its backoff.
    apply(&mut st, &cfg(), Event::Tick { now: 1_001 }).unwrap();
    assert_eq!(st.tasks[&a[0].task_id].state, TaskState::Pending);
    let b = poll(&mut st, &w2, &["cpu"], 1_200);
    assert_eq!(b[0].task_id, a[0].task_id);
    assert!(b[0].lease_id > a[0].lease_id);
    let before = st.clone();
    let err = complete(&mut st, &a[0], 1_300).unwrap_err();
    assert!(matches!(err, MachineError::StaleLease { .. }), "{err:?}");
    assert_eq!(st, before);
    let hb = apply(
        &mut st,
        &cfg(),
        Event::Heartbeat {
            worker: w1.clone(),
            leases: vec![lref(&a[0])],
            now: 1_300,
        },
    )
    .unwrap();
    assert!(matches!(hb.reply, Reply::Heartbeat { ref cancelled, .. } if cancelled.len() == 1));
    complete(&mut st, &b[0], 1_300).unwrap();
    assert_eq!(st.tasks[&b[0].task_id].state, TaskState::Succeeded);
    assert_eq!(st.campaigns[&c].state, CampaignState::Running);
}

#[test]
fn a_gang_is_placed_all_at_once_across_workers() {
    let mut st = State::default();
    let c = submit(&mut st, spec(1, 2, "[evaluation]\nperplexity = false\n"), 0);
    let w1 = register(&mut st, &["cpu"]);
    let w2 = register(&mut st, &["cpu"]);
    // Score (2 shards) and prune first.
    for _ in 0..3 {
        let a = poll(&mut st, &w1, &["cpu"], 0);
        for x in a {
            complete(&mut st, &x, 0).unwrap();
        }
    }
    assert_eq!(st.campaigns[&c].rounds[0].phase, Phase::Distill);
    // One free slot is not enough for a gang of two.
    assert!(poll(&mut st, &w1, &["cpu"], 1).is_empty());
    let a2 = poll(&mut st, &w2, &["cpu"], 1);
    assert_eq!(a2.len(), 1);
    let lease = &st.leases[&a2[0].task_id];
    assert_eq!(lease.ranks.len(), 2);
    let workers: BTreeSet<&str> = lease.ranks.iter().map(|r| r.worker.as_str()).collect();
    assert_eq!(workers.len(), 2);
    let ranks = [
        LeaseRef {
            task_id: a2[0].task_id.clone(),
            lease_id: a2[0].lease_id,
            rank: 0,
        },
        LeaseRef {
            task_id: a2[0].task_id.clone(),
            lease_id: a2[0].lease_id,
            rank: 1,
        },
    ];
    // Rendezvous is a barrier: the first rank waits, the second releases both.
    let r0 = apply(
        &mut st,
        &cfg(),
        Event::Rendezvous {
            lease: ranks[0].clone(),
            key: "init".into(),
            payload: b"a".to_vec(),
            now: 2,
        },
    )
    .unwrap();
    assert_eq!(r0.reply, Reply::Rendezvous(None));
    let r1 = apply(
        &mut st,
        &cfg(),
        Event::Rendezvous {
            lease: ranks[1].clone(),
            key: "init".into(),
            payload: b"b".to_vec(),
            now: 2,
        },
    )
    .unwrap();
    assert_eq!(
        r1.reply,
        Reply::Rendezvous(Some(vec![b"a".to_vec(), b"b".to_vec()]))
    );
    assert!(r1
        .effects
        .iter()
        .any(|e| matches!(e, Effect::RendezvousReady { payloads, .. } if payloads.len() == 2)));
    // One rank dies: the whole gang attempt ends and is re-leased as a whole.
    apply(
        &mut st,
        &cfg(),
        Event::Heartbeat {
            worker: w1.clone(),
            leases: vec![ranks[0].clone(), ranks[1].clone()],
            now: 900,
        },
    )
    .unwrap();
    apply(&mut st, &cfg(), Event::Tick { now: 1_500 }).unwrap();
    let task = &st.tasks[&a2[0].task_id];
    assert_eq!(task.state, TaskState::Pending);
    assert!(task
        .error
        .as_deref()
        .unwrap_or_default()
        .contains("stopped heart-beating"));
}

#[test]
fn retries_back_off_then_fail_the_campaign_with_the_error() {
    let mut st = State::default();
    let c = submit(
        &mut st,
        spec(1, 1, "[scheduling]\nmax_attempts = 2\nscore_shards = 1\n"),
        0,
    );
    let w = register(&mut st, &["cpu"]);
    let a = poll(&mut st, &w, &["cpu"], 0);
    apply(
        &mut st,
        &cfg(),
        Event::Fail {
            lease: lref(&a[0]),
            error: "oom".into(),
            retryable: true,
            lost: false,
            now: 0,
        },
    )
    .unwrap();
    // Backoff: not before 100 ms.
    assert!(poll(&mut st, &w, &["cpu"], 50).is_empty());
    let t = apply(&mut st, &cfg(), Event::Tick { now: 150 }).unwrap();
    let b: Vec<_> = t
        .effects
        .iter()
        .filter(|e| matches!(e, Effect::Assign { .. }))
        .collect();
    assert_eq!(b.len(), 1);
    let Effect::Assign { assignments, .. } = b[0] else {
        unreachable!()
    };
    apply(
        &mut st,
        &cfg(),
        Event::Fail {
            lease: lref(&assignments[0]),
            error: "oom again".into(),
            retryable: true,
            lost: false,
            now: 200,
        },
    )
    .unwrap();
    let camp = &st.campaigns[&c];
    assert_eq!(camp.state, CampaignState::Failed);
    let err = camp.error.clone().unwrap();
    assert!(
        err.contains("after 2 attempt(s)") && err.contains("oom again"),
        "{err}"
    );
    assert!(st.tasks.values().all(|t| t.state.is_terminal()));
    assert!(st.leases.is_empty());
}

#[test]
fn pause_revokes_leases_and_resume_hands_them_out_again() {
    let mut st = State::default();
    let c = submit(&mut st, spec(1, 1, ""), 0);
    let w = register(&mut st, &["cpu"]);
    let a = poll(&mut st, &w, &["cpu"], 0);
    apply(
        &mut st,
        &cfg(),
        Event::Pause {
            campaign: c.clone(),
            now: 1,
        },
    )
    .unwrap();
    let hb = apply(
        &mut st,
        &cfg(),
        Event::Heartbeat {
            worker: w.clone(),
            leases: vec![lref(&a[0])],
            now: 2,
        },
    )
    .unwrap();
    assert!(matches!(hb.reply, Reply::Heartbeat { ref cancelled, .. } if cancelled.len() == 1));
    let t = &st.tasks[&a[0].task_id];
    assert_eq!(
        (t.failed, t.lost, t.revoked),
        (0, 1, 1),
        "a revoked attempt is lost and charged to nothing"
    );
    assert!(poll(&mut st, &w, &["cpu"], 3).is_empty());
    let t = apply(
        &mut st,
        &cfg(),
        Event::Resume {
            campaign: c.clone(),
            now: 4,
        },
    )
    .unwrap();
    assert!(t.effects.iter().any(|e| matches!(e, Effect::Assign { .. })));
    assert!(apply(
        &mut st,
        &cfg(),
        Event::Resume {
            campaign: c.clone(),
            now: 5
        }
    )
    .is_err());
    apply(
        &mut st,
        &cfg(),
        Event::Cancel {
            campaign: c.clone(),
            now: 6,
        },
    )
    .unwrap();
    assert_eq!(st.campaigns[&c].state, CampaignState::Cancelled);
    assert!(apply(
        &mut st,
        &cfg(),
        Event::Pause {
            campaign: c.clone(),
            now: 7
        }
    )
    .is_err());
}

#[test]
fn the_gate_stops_or_extends_once() {
    for (on_fail, extended) in [("stop", false), ("extend_distill", true)] {
        let mut st = State::default();
        let gate = format!("[gate]\nmax_perplexity_ratio = 0.5\non_fail = \"{on_fail}\"\n");
        let c = submit(&mut st, spec(1, 1, &gate), 0);
        let w = register(&mut st, &["cpu"]);
        drive(&mut st, &w, &["cpu"], &c);
        let camp = &st.campaigns[&c];
        assert_eq!(camp.state, CampaignState::Failed);
        assert!(
            camp.error
                .as_deref()
                .unwrap()
                .contains("gate.max_perplexity_ratio"),
            "{:?}",
            camp.error
        );
        let distills: Vec<&Task> = st
            .tasks
            .values()
            .filter(|t| t.kind == kind::DISTILL)
            .collect();
        assert_eq!(distills.len(), if extended { 2 } else { 1 });
        if extended {
            assert_eq!(distills[1].params["tokens"], "200");
            assert_eq!(camp.rounds[0].extensions, 1);
        }
    }
}

#[test]
fn completion_without_required_outputs_is_refused() {
    let mut st = State::default();
    submit(&mut st, spec(1, 1, ""), 0);
    let w = register(&mut st, &["cpu"]);
    let a = poll(&mut st, &w, &["cpu"], 0);
    let before = st.clone();
    let e = apply(
        &mut st,
        &cfg(),
        Event::Complete {
            lease: lref(&a[0]),
            outputs: BTreeMap::new(),
            metrics: BTreeMap::new(),
            now: 1,
        },
    );
    assert!(matches!(e, Err(MachineError::InvalidArgument(_))));
    assert_eq!(st, before);
}

#[test]
fn recovery_expires_overdue_leases_and_extends_live_ones() {
    let mut st = State::default();
    submit(&mut st, spec(1, 1, ""), 0);
    let w1 = register(&mut st, &["cpu"]);
    let w2 = register(&mut st, &["cpu"]);
    let a = poll(&mut st, &w1, &["cpu"], 0);
    let b = poll(&mut st, &w2, &["cpu"], 0);
    // w2 keeps heart-beating until the coordinator stops at t=1500; w1 stopped at t=0.
    apply(
        &mut st,
        &cfg(),
        Event::Heartbeat {
            worker: w2.clone(),
            leases: vec![lref(&b[0])],
            now: 1_400,
        },
    )
    .unwrap();
    apply(
        &mut st,
        &cfg(),
        Event::Heartbeat {
            worker: w2.clone(),
            leases: vec![lref(&b[0])],
            now: 1_500,
        },
    )
    .unwrap();
    let persisted = st.clone();
    // Restart 10 s later: reload from the persisted records.
    let mut st = State::from_parts(
        persisted.campaigns,
        persisted.tasks,
        persisted.leases,
        persisted.workers,
        persisted.meta,
    );
    apply(&mut st, &cfg(), Event::Recover { now: 11_500 }).unwrap();
    assert_eq!(st.tasks[&a[0].task_id].state, TaskState::Pending);
    assert_eq!(st.tasks[&b[0].task_id].state, TaskState::Leased);
    assert_eq!(st.leases[&b[0].task_id].ranks[0].deadline_ms, 12_500);
}

/// Score and prune done with one worker: the campaign waits at its distill gang of `world`.
fn to_distill(st: &mut State, w: &str, c: &str) {
    for now in 0..10 {
        if st.campaigns[c].rounds[0].phase == Phase::Distill {
            return;
        }
        for x in poll(st, w, &["cpu"], now) {
            complete(st, &x, now).unwrap();
        }
    }
    panic!("never reached distill: {:?}", st.campaigns[c].rounds[0]);
}

fn fail_ev(a: &Assignment, lost: bool, now: Millis) -> Event {
    Event::Fail {
        lease: lref(a),
        error: if lost {
            "collective: failed to fill whole buffer".into()
        } else {
            "bad input".into()
        },
        retryable: true,
        lost,
        now,
    }
}

#[test]
fn lost_attempts_never_exhaust_max_attempts() {
    let mut st = State::default();
    let c = submit(
        &mut st,
        spec(
            1,
            2,
            "[scheduling]\nmax_attempts = 1\nscore_shards = 1\n[evaluation]\nperplexity = false\n",
        ),
        0,
    );
    let w1 = register(&mut st, &["cpu"]);
    let w2 = register(&mut st, &["cpu"]);
    to_distill(&mut st, &w1, &c);
    let mut now = 100;
    for i in 0..10u32 {
        assert!(poll(&mut st, &w1, &["cpu"], now).is_empty() || i > 0);
        let a = poll(&mut st, &w2, &["cpu"], now);
        let a = if a.is_empty() {
            poll(&mut st, &w1, &["cpu"], now)
        } else {
            a
        };
        assert_eq!(a.len(), 1, "attempt {i} not leased");
        let task = a[0].task_id.clone();
        if i % 2 == 0 {
            // A surviving rank reports its collective broke.
            let t = apply(&mut st, &cfg(), fail_ev(&a[0], true, now)).unwrap();
            assert!(
                t.events.iter().any(|e| e.kind == "task_lost"),
                "{:?}",
                t.events
            );
        } else {
            // Nobody reports: the leases expire.
            now += 2_000;
            apply(&mut st, &cfg(), Event::Tick { now }).unwrap();
        }
        let t = &st.tasks[&task];
        assert_eq!(t.state, TaskState::Pending);
        assert_eq!((t.failed, t.lost, t.attempts), (0, i + 1, i + 1));
        assert_eq!(st.campaigns[&c].state, CampaignState::Running);
        now += 2_000;
        // Both workers poll again after the backoff.
        poll(&mut st, &w1, &["cpu"], now);
    }
    // One failure of its own is enough with max_attempts = 1.
    let a = poll(&mut st, &w2, &["cpu"], now);
    assert_eq!(a.len(), 1);
    apply(&mut st, &cfg(), fail_ev(&a[0], false, now)).unwrap();
    let camp = &st.campaigns[&c];
    assert_eq!(camp.state, CampaignState::Failed);
    let err = camp.error.clone().unwrap();
    assert!(
        err.contains("failed after 1 attempt(s) (10 more lost)"),
        "{err}"
    );
}

#[test]
fn max_lost_is_respected_and_pause_revocations_count_toward_nothing() {
    let mut st = State::default();
    let c = submit(
        &mut st,
        spec(1, 1, "[scheduling]\nmax_lost = 2\nscore_shards = 1\n"),
        0,
    );
    let w = register(&mut st, &["cpu"]);
    let mut now = 0;
    // Two pauses revoke the attempt: free.
    assert_eq!(poll(&mut st, &w, &["cpu"], now).len(), 1);
    for _ in 0..2 {
        apply(
            &mut st,
            &cfg(),
            Event::Pause {
                campaign: c.clone(),
                now,
            },
        )
        .unwrap();
        assert!(st.leases.is_empty());
        assert!(
            poll(&mut st, &w, &["cpu"], now).is_empty(),
            "leased while paused"
        );
        now += 5_000;
        apply(&mut st, &cfg(), Event::Tick { now }).unwrap();
        assert!(st.leases.is_empty(), "leased while paused");
        let t = apply(
            &mut st,
            &cfg(),
            Event::Resume {
                campaign: c.clone(),
                now,
            },
        )
        .unwrap();
        assert!(t.effects.iter().any(|e| matches!(e, Effect::Assign { .. })));
    }
    // Two losses are retried, the third is one too many.
    for i in 0..3u32 {
        let a = if i == 0 {
            let l = &st.leases.values().next().expect("leased at resume");
            vec![Assignment {
                task_id: l.task_id.clone(),
                lease_id: l.lease_id,
                rank: 0,
                world_size: 1,
                device: "cpu".into(),
                campaign: c.clone(),
            }]
        } else {
            now += 5_000;
            poll(&mut st, &w, &["cpu"], now)
        };
        assert_eq!(a.len(), 1, "loss {i}");
        apply(&mut st, &cfg(), fail_ev(&a[0], true, now)).unwrap();
        let t = &st.tasks[&a[0].task_id];
        assert_eq!((t.lost, t.revoked, t.failed), (3 + i, 2, 0));
        if i < 2 {
            assert_eq!(t.state, TaskState::Pending);
        }
    }
    let camp = &st.campaigns[&c];
    assert_eq!(camp.state, CampaignState::Failed);
    let err = camp.error.clone().unwrap();
    assert!(err.contains("scheduling.max_lost = 2"), "{err}");
}

#[test]
fn a_restarted_worker_loses_its_attempts_at_once() {
    let mut st = State::default();
    let c = submit(
        &mut st,
        spec(1, 1, "[scheduling]\nmax_attempts = 1\nscore_shards = 1\n"),
        0,
    );
    let w = register(&mut st, &["cpu"]);
    let a = poll(&mut st, &w, &["cpu"], 0);
    assert_eq!(a.len(), 1);
    let t = apply(
        &mut st,
        &cfg(),
        Event::Register {
            host: "h".into(),
            devices: vec!["cpu".into()],
            device_memory: Vec::new(),
            labels: BTreeMap::new(),
            version: "0".into(),
            task_kinds: kind::ALL.iter().map(|k| k.to_string()).collect(),
            nonce: 8,
            previous: Some(w.clone()),
            now: 10,
        },
    )
    .unwrap();
    let lost = t
        .events
        .iter()
        .find(|e| e.kind == "task_lost")
        .expect("lost at once");
    assert!(lost.message.contains("restarted"), "{}", lost.message);
    assert!(st.leases.is_empty());
    let task = &st.tasks[&a[0].task_id];
    assert_eq!(
        (task.state, task.lost, task.failed),
        (TaskState::Pending, 1, 0)
    );
    assert_eq!(st.campaigns[&c].state, CampaignState::Running);
    // The old process's late report is refused and changes nothing.
    let before = st.clone();
    assert!(complete(&mut st, &a[0], 20).is_err());
    assert_eq!(st, before);
}

#[test]
fn retry_continues_a_failed_campaign_from_its_failed_phase() {
    let mut st = State::default();
    let c = submit(
        &mut st,
        spec(1, 1, "[scheduling]\nmax_attempts = 2\nscore_shards = 2\n"),
        0,
    );
    let w = register(&mut st, &["cpu"]);
    // Retry refuses a campaign that did not fail, and changes nothing.
    let before = st.clone();
    let e = apply(
        &mut st,
        &cfg(),
        Event::Retry {
            campaign: c.clone(),
            now: 1,
        },
    )
    .unwrap_err();
    assert!(
        matches!(e, MachineError::InvalidState(ref m) if m.contains("not failed")),
        "{e}"
    );
    assert_eq!(st, before);
    // Score shard 0 succeeds, shard 1 fails twice by itself.
    let a = poll(&mut st, &w, &["cpu", "cpu2"].map(|d| d)[..1], 0);
    assert_eq!(a.len(), 1);
    complete(&mut st, &a[0], 0).unwrap();
    let done = a[0].task_id.clone();
    let mut now = 0;
    let mut failed_task = String::new();
    for _ in 0..2 {
        now += 5_000;
        let a = poll(&mut st, &w, &["cpu"], now);
        assert_eq!(a.len(), 1);
        failed_task = a[0].task_id.clone();
        apply(&mut st, &cfg(), fail_ev(&a[0], false, now)).unwrap();
    }
    assert_eq!(st.campaigns[&c].state, CampaignState::Failed);
    assert_eq!(st.tasks[&failed_task].state, TaskState::Failed);
    let leases_before = st.meta.last_lease_id;
    let t = apply(
        &mut st,
        &cfg(),
        Event::Retry {
            campaign: c.clone(),
            now,
        },
    )
    .unwrap();
    let retry = t
        .events
        .iter()
        .find(|e| e.kind == "campaign_retry")
        .expect("a retry event");
    assert!(retry.message.contains("bad input"), "{}", retry.message);
    let camp = &st.campaigns[&c];
    assert_eq!(camp.state, CampaignState::Running);
    assert_eq!(camp.error, None);
    assert_eq!(camp.rounds[0].state, RoundState::Running);
    let ft = &st.tasks[&failed_task];
    assert_eq!(ft.state, TaskState::Pending);
    assert_eq!((ft.attempts, ft.failed, ft.lost), (0, 0, 0));
    // The shard that succeeded is kept and never leased again.
    assert_eq!(st.tasks[&done].state, TaskState::Succeeded);
    let a = poll(&mut st, &w, &["cpu"], now);
    assert_eq!(a.len(), 1);
    assert_eq!(a[0].task_id, failed_task);
    assert!(a[0].lease_id > leases_before);
    let events = {
        complete(&mut st, &a[0], now).unwrap();
        drive(&mut st, &w, &["cpu"], &c)
    };
    assert_eq!(st.campaigns[&c].state, CampaignState::Succeeded);
    assert!(!events
        .iter()
        .any(|e| e.kind == "task_leased" && (e.task_id == done || e.task_id == failed_task)));
    // A second retry of a succeeded campaign is refused.
    assert!(apply(&mut st, &cfg(), Event::Retry { campaign: c, now }).is_err());
}

#[test]
fn a_retried_distillation_resumes_from_its_last_checkpoint() {
    let mut st = State::default();
    let c = submit(
        &mut st,
        spec(1, 1, "[scheduling]\nmax_attempts = 1\nscore_shards = 1\n"),
        0,
    );
    let w = register(&mut st, &["cpu"]);
    to_distill(&mut st, &w, &c);
    let a = poll(&mut st, &w, &["cpu"], 100);
    assert_eq!(st.tasks[&a[0].task_id].kind, kind::DISTILL);
    apply(
        &mut st,
        &cfg(),
        Event::Progress {
            lease: lref(&a[0]),
            metrics: BTreeMap::new(),
            checkpoint: Some(DIGEST.into()),
            message: String::new(),
            now: 101,
        },
    )
    .unwrap();
    apply(&mut st, &cfg(), fail_ev(&a[0], false, 102)).unwrap();
    assert_eq!(st.campaigns[&c].state, CampaignState::Failed);
    let round_before = st.campaigns[&c].rounds[0].clone();
    apply(
        &mut st,
        &cfg(),
        Event::Retry {
            campaign: c.clone(),
            now: 103,
        },
    )
    .unwrap();
    let t = &st.tasks[&a[0].task_id];
    assert_eq!(
        t.checkpoint.as_deref(),
        Some(DIGEST),
        "the checkpoint is kept"
    );
    // Artifacts and metrics of the finished phases are kept.
    let r = &st.campaigns[&c].rounds[0];
    assert_eq!(r.artifacts, round_before.artifacts);
    assert_eq!(r.metrics, round_before.metrics);
    let b = poll(&mut st, &w, &["cpu"], 104);
    assert_eq!(b.len(), 1);
    assert_eq!(b[0].task_id, a[0].task_id);
}

#[test]
fn status_view_lists_every_task_with_its_attempts() {
    let mut st = State::default();
    let c = submit(&mut st, spec(1, 1, "[scheduling]\nscore_shards = 1\n"), 0);
    let w = register(&mut st, &["cpu"]);
    let a = poll(&mut st, &w, &["cpu"], 0);
    apply(&mut st, &cfg(), fail_ev(&a[0], true, 0)).unwrap();
    let v = campaign_view(&st, &c).unwrap();
    assert_eq!(v.task_records.len(), 1);
    let r = &v.task_records[0];
    assert_eq!(
        (
            r.kind.as_str(),
            r.state.as_str(),
            r.attempts,
            r.lost,
            r.failed
        ),
        (kind::SCORE, "pending", 1, 1, 0)
    );
}

// ---- property test: random event sequences keep the invariants (see sequence.rs) ----

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        1 => any::<u8>().prop_map(Op::Submit),
        1 => ((1u8..3), proptest::option::of(any::<u8>())).prop_map(|(n, p)| Op::Register(n, p)),
        4 => (any::<u8>(), any::<u8>()).prop_map(|(w, m)| Op::Poll(w, m)),
        6 => (any::<u8>(), any::<bool>()).prop_map(|(i, s)| Op::Complete(i, s)),
        1 => (any::<u8>(), any::<bool>()).prop_map(|(i, r)| Op::Fail(i, r)),
        2 => any::<u8>().prop_map(Op::Lost),
        1 => any::<u8>().prop_map(Op::Rendezvous),
        2 => any::<u8>().prop_map(Op::Heartbeat),
        2 => (0u16..1500).prop_map(Op::Advance),
        1 => any::<u8>().prop_map(Op::Pause),
        1 => any::<u8>().prop_map(Op::Resume),
        1 => any::<u8>().prop_map(Op::Cancel),
        1 => any::<u8>().prop_map(Op::Retry),
        1 => Just(Op::Recover),
        1 => (any::<u8>(), any::<u8>()).prop_map(|(i, r)| Op::Forged(i, r)),
        1 => (any::<u8>(), any::<u8>()).prop_map(|(i, w)| Op::BadComplete(i, w)),
        1 => (any::<u8>(), any::<u8>()).prop_map(|(i, w)| Op::Progress(i, w)),
        1 => any::<u8>().prop_map(Op::Unknown),
        1 => any::<u8>().prop_map(Op::BadSubmit),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    #[test]
    fn random_event_sequences_keep_the_invariants(ops in proptest::collection::vec(op(), 1..120)) {
        if let Err(e) = Harness::run(&ops) {
            return Err(TestCaseError::fail(e));
        }
    }
}

fn complete_with(
    st: &mut State,
    a: &Assignment,
    outputs: &[(&str, &str)],
    metrics: &[(&str, f64)],
    now: Millis,
) -> Result<Transition, MachineError> {
    apply(
        st,
        &cfg(),
        Event::Complete {
            lease: lref(a),
            outputs: outputs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            metrics: metrics.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
            now,
        },
    )
}

fn digest(n: u32) -> String {
    format!("sha256:{n:064x}")
}

/// Persists and reloads every record the way the store does (JSON), then recovers.
fn restart(st: &State, now: Millis) -> State {
    fn again<T: Serialize + serde::de::DeserializeOwned>(
        m: &BTreeMap<String, T>,
    ) -> BTreeMap<String, T> {
        m.iter()
            .map(|(k, v)| {
                let bytes = serde_json::to_vec(v).unwrap();
                (k.clone(), serde_json::from_slice(&bytes).unwrap())
            })
            .collect()
    }
    let meta = serde_json::from_slice(&serde_json::to_vec(&st.meta).unwrap()).unwrap();
    let mut back = State::from_parts(
        again(&st.campaigns),
        again(&st.tasks),
        again(&st.leases),
        again(&st.workers),
        meta,
    );
    apply(&mut back, &cfg(), Event::Recover { now }).unwrap();
    back
}

/// Runs a searching campaign's prune and search phases with `scores` per candidate; returns
/// the state at the start of the distill phase, and whether it restarted mid-search.
fn run_search(scores: &[f64], restart_mid_search: bool) -> (State, String) {
    let mut st = State::default();
    let k = scores.len() as u32;
    let c = submit(
        &mut st,
        search_spec(1, 1, k, "[scheduling]\nscore_shards = 1\n"),
        0,
    );
    let w1 = register(&mut st, &["cpu:0", "cpu:1"]);
    let w2 = register(&mut st, &["cpu:0"]);
    // Score.
    let a = poll(&mut st, &w1, &["cpu:0"], 1);
    assert_eq!(st.tasks[&a[0].task_id].kind, kind::SCORE);
    complete(&mut st, &a[0], 2).unwrap();
    // Prune: one task per candidate.
    let r = &st.campaigns[&c].rounds[0];
    assert_eq!(r.phase, Phase::Prune);
    assert_eq!(r.phase_tasks.len(), k as usize);
    let mut pruned = poll(&mut st, &w1, &["cpu:0", "cpu:1"], 3);
    pruned.extend(poll(&mut st, &w2, &["cpu:0"], 3));
    while pruned.len() < k as usize {
        let more = poll(&mut st, &w1, &["cpu:0", "cpu:1"], 3);
        assert!(!more.is_empty());
        pruned.extend(more);
    }
    for a in &pruned {
        let i: u32 = st.tasks[&a.task_id].params["candidate"].parse().unwrap();
        assert_eq!(st.tasks[&a.task_id].params["candidates"], k.to_string());
        // A candidate's prune must say which shape it chose.
        let refused = complete_with(&mut st, a, &[("pruned", &digest(100 + i))], &[], 4);
        assert!(
            matches!(refused, Err(MachineError::InvalidArgument(_))),
            "{refused:?}"
        );
        complete_with(
            &mut st,
            a,
            &[("pruned", &digest(100 + i)), ("scores", &digest(99))],
            &[
                ("params", 1000.0 + f64::from(i)),
                ("shape.hidden_size", 64.0 - 8.0 * f64::from(i)),
                ("shape.intermediate_size", 96.0),
                ("shape.num_attention_heads", 8.0),
                ("shape.num_layers", 4.0 - f64::from(i % 2)),
            ],
            4,
        )
        .unwrap();
    }
    // Search: one gang per candidate, all in parallel where devices allow.
    let r = &st.campaigns[&c].rounds[0];
    assert_eq!(r.phase, Phase::Search);
    assert_eq!(r.candidates.len(), k as usize);
    for (i, x) in r.candidates.iter().enumerate() {
        assert_eq!(x.index, i as u32);
        assert_eq!(x.pruned, digest(100 + i as u32));
        assert_eq!(x.params, 1000 + i as u64);
        let t = &st.tasks[x.task.as_ref().unwrap()];
        assert_eq!(t.kind, kind::SEARCH);
        assert_eq!(t.inputs["pruned"], x.pruned);
        assert_eq!(t.params["stop_tokens"], "40");
        assert_eq!(t.params["tokens"], "100");
        assert_eq!(t.params["by"], "kd_loss");
    }
    assert_eq!(r.artifacts["scores"], digest(99));
    assert!(!r.artifacts.contains_key("pruned"), "no winner yet");
    let mut running = poll(&mut st, &w1, &["cpu:0", "cpu:1"], 5);
    running.extend(poll(&mut st, &w2, &["cpu:0"], 5));
    assert_eq!(
        running.len(),
        (k as usize).min(3),
        "candidates run in parallel"
    );
    let mut now = 6;
    let mut done = 0;
    while done < k as usize {
        if running.is_empty() {
            running = poll(&mut st, &w1, &["cpu:0", "cpu:1"], now);
        }
        let a = running.remove(0);
        let i = st.campaigns[&c].rounds[0]
            .candidates
            .iter()
            .position(|x| x.task.as_deref() == Some(a.task_id.as_str()))
            .unwrap();
        apply(
            &mut st,
            &cfg(),
            Event::Progress {
                lease: lref(&a),
                metrics: [("progress.distill.tokens".to_string(), 20.0)].into(),
                checkpoint: Some(digest(300 + i as u32)),
                message: String::new(),
                now,
            },
        )
        .unwrap();
        // The view shows live tokens before the candidate finishes.
        let view = campaign_view(&st, &c).unwrap();
        assert_eq!(view.rounds[0].candidates[i].tokens, 20);
        assert_eq!(view.rounds[0].candidates[i].score, None);
        complete_with(
            &mut st,
            &a,
            &[
                ("student", &digest(200 + i as u32)),
                ("checkpoint", &digest(400 + i as u32)),
            ],
            &[("search.score", scores[i]), ("distill.tokens", 48.0)],
            now,
        )
        .unwrap();
        done += 1;
        now += 1;
        if restart_mid_search && done == 1 {
            st = restart(&st, now);
            // A restart loses the live leases' long polls, not the candidates.
            assert_eq!(st.campaigns[&c].rounds[0].candidates.len(), k as usize);
            running.retain(|x| {
                st.leases
                    .get(&x.task_id)
                    .is_some_and(|l| l.lease_id == x.lease_id)
            });
        }
    }
    (st, c)
}

#[test]
fn a_search_distills_every_candidate_and_the_round_continues_the_lowest_scoring_one() {
    let scores = [0.9, 0.5, 0.7];
    let (st, c) = run_search(&scores, false);
    let r = &st.campaigns[&c].rounds[0];
    assert_eq!(r.phase, Phase::Distill);
    let winners: Vec<u32> = r
        .candidates
        .iter()
        .filter(|x| x.winner)
        .map(|x| x.index)
        .collect();
    assert_eq!(
        winners,
        vec![1],
        "the lowest score wins: {:?}",
        r.candidates
    );
    for (x, s) in r.candidates.iter().zip(scores) {
        assert_eq!(x.score, Some(s));
        assert_eq!(x.tokens, 48);
        assert_eq!(x.checkpoint, Some(digest(400 + x.index)));
        assert_eq!(x.student, Some(digest(200 + x.index)));
    }
    // The round is now the winner's: its model, shape, and checkpoint to continue from.
    assert_eq!(r.artifacts["pruned"], digest(101));
    assert_eq!(r.artifacts["search_checkpoint"], digest(401));
    assert_eq!(r.metrics["params"], 1001.0);
    assert_eq!(r.metrics["shape.hidden_size"], 56.0);
    assert_eq!(r.metrics["search.winner"], 1.0);
    assert_eq!(r.metrics["search.score"], 0.5);
    let d = &st.tasks[&r.phase_tasks[0]];
    assert_eq!(d.kind, kind::DISTILL);
    assert_eq!(d.inputs["pruned"], digest(101));
    assert_eq!(d.inputs["init_checkpoint"], digest(401));
    assert_eq!(
        d.params["tokens"], "100",
        "the winner continues to the round's tokens"
    );
    // The client view: one winner, the scores reported.
    let view = campaign_view(&st, &c).unwrap();
    let v = &view.rounds[0].candidates;
    assert_eq!(v.len(), 3);
    assert_eq!(v.iter().filter(|x| x.winner).count(), 1);
    assert!(v[1].winner);
    assert_eq!(v[0].score, Some(0.9));
    assert_eq!(v[2].tokens, 48);
    // The report's records cover the search tasks like every task: an attempt each, closed,
    // and their progress curve.
    for x in &r.candidates {
        let t = &st.tasks[x.task.as_ref().unwrap()];
        assert_eq!(t.attempt_log.len(), 1, "{:?}", t.attempt_log);
        assert_eq!(t.attempt_log[0].outcome, Some(AttemptOutcome::Succeeded));
        let tokens: Vec<f64> = t
            .progress
            .all()
            .map(|p| p.metrics["distill.tokens"])
            .collect();
        assert_eq!(tokens, vec![20.0]);
        let rec = view
            .task_records
            .iter()
            .find(|r| Some(&r.id) == x.task.as_ref())
            .unwrap();
        assert_eq!(rec.attempt_log[0].outcome, "succeeded");
        assert_eq!(rec.progress.len(), 1);
    }
}

#[test]
fn a_search_survives_a_coordinator_restart_midway_with_the_same_outcome() {
    let scores = [0.3, 0.2, 0.25];
    let (a, ca) = run_search(&scores, false);
    let (b, cb) = run_search(&scores, true);
    let (ra, rb) = (&a.campaigns[&ca].rounds[0], &b.campaigns[&cb].rounds[0]);
    assert_eq!(ra.candidates, rb.candidates);
    assert_eq!(ra.artifacts, rb.artifacts);
    assert_eq!(ra.metrics, rb.metrics);
    assert!(rb.candidates[1].winner);
}

#[test]
fn the_winner_is_the_lowest_finite_score_first_index_on_ties() {
    let with = |scores: &[Option<f64>]| -> Vec<Candidate> {
        scores
            .iter()
            .map(|s| Candidate {
                score: *s,
                ..Candidate::default()
            })
            .collect()
    };
    assert_eq!(
        super::search::winner(&with(&[Some(2.0), Some(1.0), Some(3.0)])),
        Some(1)
    );
    assert_eq!(
        super::search::winner(&with(&[Some(1.0), Some(1.0)])),
        Some(0)
    );
    assert_eq!(super::search::winner(&with(&[None, Some(5.0)])), Some(1));
    assert_eq!(super::search::winner(&with(&[None, None])), None);
    assert_eq!(super::search::winner(&[]), None);
}

#[test]
fn a_search_where_no_candidate_has_a_finite_score_fails_the_campaign_with_the_scores() {
    let mut st = State::default();
    let c = submit(
        &mut st,
        search_spec(1, 1, 2, "[scheduling]\nscore_shards = 1\n"),
        0,
    );
    let w = register(&mut st, &["cpu"]);
    let mut now = 1;
    while st.campaigns[&c].rounds[0].phase != Phase::Search {
        for a in poll(&mut st, &w, &["cpu"], now) {
            complete(&mut st, &a, now).unwrap();
        }
        now += 1;
    }
    for _ in 0..2 {
        let a = poll(&mut st, &w, &["cpu"], now);
        complete_with(
            &mut st,
            &a[0],
            &[("student", DIGEST), ("checkpoint", DIGEST)],
            &[("search.score", f64::NAN), ("distill.tokens", 48.0)],
            now,
        )
        .unwrap();
        now += 1;
    }
    let camp = &st.campaigns[&c];
    assert_eq!(camp.state, CampaignState::Failed);
    let err = camp.error.clone().unwrap();
    assert!(
        err.contains("no candidate has a finite validation kd_loss"),
        "{err}"
    );
}

#[test]
fn teacher_correction_runs_before_round_0_and_the_corrected_teacher_is_used_from_then_on() {
    let mut st = State::default();
    let c = submit(
        &mut st,
        spec(
            2,
            1,
            &format!("{CORRECTION}[scheduling]\nscore_shards = 1\n"),
        ),
        0,
    );
    // Round 0 starts with the correction gang (world_size 2), nothing else.
    let r = &st.campaigns[&c].rounds[0];
    assert_eq!(r.phase, Phase::Correct);
    assert_eq!(r.phase_tasks.len(), 1);
    let t = &st.tasks[&r.phase_tasks[0]];
    assert_eq!((t.kind.as_str(), t.world_size), (kind::CORRECT, 2));
    assert_eq!(t.inputs["teacher"], "path:/m");
    assert_eq!(t.params["tokens"], "64");
    let w = register(&mut st, &["cpu:0", "cpu:1"]);
    let gang = poll(&mut st, &w, &["cpu:0", "cpu:1"], 1);
    assert_eq!(gang.len(), 2);
    let corrected = digest(7);
    apply(
        &mut st,
        &cfg(),
        Event::Progress {
            lease: lref(&gang[0]),
            metrics: [("progress.distill.loss".to_string(), 2.7)].into(),
            checkpoint: None,
            message: String::new(),
            now: 1,
        },
    )
    .unwrap();
    for a in &gang {
        complete_with(
            &mut st,
            a,
            &[("teacher", &corrected)],
            &[("correct.tokens", 64.0), ("correct.final_loss", 2.5)],
            2,
        )
        .unwrap();
    }
    let camp = &st.campaigns[&c];
    assert_eq!(camp.teacher_artifacts["corrected_teacher"], corrected);
    assert_eq!(
        camp.rounds[0].source, corrected,
        "round 0 prunes the corrected teacher"
    );
    assert_eq!(camp.rounds[0].phase, Phase::Score);
    // The correction's attempt (one gang on w) and its curve are kept for the report.
    let ct = &st.tasks[&gang[0].task_id];
    assert_eq!(ct.attempt_log.len(), 1, "{:?}", ct.attempt_log);
    assert_eq!(ct.attempt_log[0].workers, vec![w.clone(), w.clone()]);
    assert_eq!(ct.attempt_log[0].end_ms, Some(2));
    assert_eq!(ct.attempt_log[0].outcome, Some(AttemptOutcome::Succeeded));
    assert_eq!(ct.progress.all().count(), 1);
    let mut seen = Vec::new();
    let mut now = 3;
    while !st.campaigns[&c].state.is_terminal() {
        let a = poll(&mut st, &w, &["cpu:0", "cpu:1"], now);
        assert!(!a.is_empty(), "{:?}", st.campaigns[&c].rounds);
        for x in &a {
            seen.push(st.tasks[&x.task_id].clone());
            complete(&mut st, x, now).unwrap();
        }
        now += 1;
    }
    assert_eq!(st.campaigns[&c].state, CampaignState::Succeeded);
    // Only one correction, ever.
    assert_eq!(
        st.tasks
            .values()
            .filter(|t| t.kind == kind::CORRECT)
            .count(),
        1
    );
    for t in &seen {
        assert_eq!(
            t.inputs["teacher"], corrected,
            "{} uses the corrected teacher",
            t.kind
        );
        if t.round == 0 {
            assert_eq!(t.inputs["source"], corrected);
        }
    }
    // The evaluation measured both teachers, once each.
    let ppl: Vec<(&str, &str)> = seen
        .iter()
        .filter(|t| t.kind == kind::PERPLEXITY)
        .map(|t| {
            (
                t.params["role"].as_str(),
                match t.params["role"].as_str() {
                    "original_teacher" => t.inputs["original_teacher"].as_str(),
                    "teacher" => t.inputs["teacher"].as_str(),
                    _ => t.inputs["student"].as_str(),
                },
            )
        })
        .collect();
    assert!(ppl.contains(&("teacher", corrected.as_str())), "{ppl:?}");
    assert!(ppl.contains(&("original_teacher", "path:/m")), "{ppl:?}");
    assert_eq!(
        ppl.iter().filter(|(r, _)| *r == "original_teacher").count(),
        1
    );
    let m = &st.campaigns[&c].rounds[1].metrics;
    assert_eq!(m["teacher_perplexity"], 10.0);
    assert_eq!(m["original_teacher_perplexity"], 10.0);
    assert_eq!(m["teacher_correction.tokens"], 64.0);
    assert_eq!(m["teacher_correction.final_loss"], 2.5);
    // Every round's gate decision is logged, with its reason.
    for r in &st.campaigns[&c].rounds {
        let g = r.gate_log.last().expect("a gate decision");
        assert_eq!(g.decision, "pass", "{:?}", r.gate_log);
        assert!(!g.reason.is_empty());
    }
}

#[test]
fn a_correction_survives_a_restart_and_its_phase_can_be_retried() {
    let mut st = State::default();
    let c = submit(
        &mut st,
        spec(
            1,
            1,
            &format!("{CORRECTION}[scheduling]\nmax_attempts = 1\n"),
        ),
        0,
    );
    let w = register(&mut st, &["cpu:0", "cpu:1"]);
    let gang = poll(&mut st, &w, &["cpu:0", "cpu:1"], 1);
    apply(
        &mut st,
        &cfg(),
        Event::Progress {
            lease: lref(&gang[0]),
            metrics: BTreeMap::new(),
            checkpoint: Some(digest(5)),
            message: String::new(),
            now: 2,
        },
    )
    .unwrap();
    // The coordinator restarts: the gang keeps its lease (a full timeout from now), then the
    // gang stops heart-beating and the attempt is lost.
    let mut st = restart(&st, 10_000);
    let tid = gang[0].task_id.clone();
    assert_eq!(st.tasks[&tid].state, TaskState::Leased);
    apply(&mut st, &cfg(), Event::Tick { now: 11_001 }).unwrap();
    assert_eq!(st.tasks[&tid].state, TaskState::Pending);
    assert_eq!(st.tasks[&tid].lost, 1);
    assert_eq!(
        st.tasks[&tid].checkpoint,
        Some(digest(5)),
        "resumes from its checkpoint"
    );
    // It fails by itself: retry continues the correction phase.
    let again = poll(&mut st, &w, &["cpu:0", "cpu:1"], 20_000);
    assert_eq!(again.len(), 2);
    apply(&mut st, &cfg(), fail_ev(&again[0], false, 20_001)).unwrap();
    assert_eq!(st.campaigns[&c].state, CampaignState::Failed);
    apply(
        &mut st,
        &cfg(),
        Event::Retry {
            campaign: c.clone(),
            now: 20_002,
        },
    )
    .unwrap();
    assert_eq!(st.campaigns[&c].rounds[0].phase, Phase::Correct);
    let third = poll(&mut st, &w, &["cpu:0", "cpu:1"], 20_003);
    assert_eq!(third[0].task_id, tid);
}

#[test]
fn attempts_and_progress_are_kept_in_the_task_record() {
    let mut st = State::default();
    submit(&mut st, spec(1, 1, ""), 0);
    let w1 = register(&mut st, &["cpu"]);
    let w2 = register(&mut st, &["cpu"]);
    let a = poll(&mut st, &w1, &["cpu"], 10);
    let tid = a[0].task_id.clone();
    // Progress reports become points without the `progress.` prefix, at the event's time.
    for i in 0..3u32 {
        apply(
            &mut st,
            &cfg(),
            Event::Progress {
                lease: lref(&a[0]),
                metrics: [("progress.score.sequences".to_string(), f64::from(i))].into(),
                checkpoint: None,
                message: String::new(),
                now: 20 + u64::from(i),
            },
        )
        .unwrap();
    }
    let pts: Vec<(u64, f64)> = st.tasks[&tid]
        .progress
        .all()
        .map(|p| (p.time_ms, p.metrics["score.sequences"]))
        .collect();
    assert_eq!(pts, vec![(20, 0.0), (21, 1.0), (22, 2.0)]);
    // w1's lease expires (lost), w2 finishes the task: two attempts, each with its worker, times
    // and ending.
    apply(&mut st, &cfg(), Event::Tick { now: 1_100 }).unwrap();
    let b = poll(&mut st, &w2, &["cpu"], 1_300);
    assert_eq!(b[0].task_id, tid);
    complete(&mut st, &b[0], 1_400).unwrap();
    let log = &st.tasks[&tid].attempt_log;
    assert_eq!(log.len(), 2, "{log:?}");
    assert_eq!(log[0].workers, vec![w1.clone()]);
    assert_eq!((log[0].start_ms, log[0].end_ms), (10, Some(1_100)));
    assert_eq!(log[0].outcome, Some(AttemptOutcome::Lost));
    assert_eq!(log[1].workers, vec![w2.clone()]);
    assert_eq!((log[1].start_ms, log[1].end_ms), (1_300, Some(1_400)));
    assert_eq!(log[1].outcome, Some(AttemptOutcome::Succeeded));
    // Both reach the client view.
    let view = campaign_view(&st, &st.tasks[&tid].campaign.clone()).unwrap();
    let rec = view.task_records.iter().find(|t| t.id == tid).unwrap();
    assert_eq!(rec.progress.len(), 3);
    assert_eq!(rec.attempt_log[0].outcome, "lost");
    assert_eq!(rec.attempt_log[1].end_ms, 1_400);
}

const RANKED: &str = "[evaluation]\nperplexity = true\njudge = { backend = \"openai\", base_url = \"http://x/v1\", model = \"j\", questions = \"/q\", ranking = true }\n";

#[test]
fn a_ranking_judge_gets_every_earlier_model_and_judgment_and_the_gate_reads_the_elo_drop() {
    // The teacher beats each student 8 to 2: 400·log10(4) = 241 points below the teacher.
    for (limit, passes) in [(300.0, true), (200.0, false)] {
        let mut st = State::default();
        let gate = format!("{RANKED}[gate]\nmax_elo_drop = {limit}\n");
        let c = submit(&mut st, spec(2, 1, &gate), 0);
        let w = register(&mut st, &["cpu"]);
        let events = drive(&mut st, &w, &["cpu"], &c);
        let camp = &st.campaigns[&c];
        let r0 = &camp.rounds[0].metrics;
        let want = 400.0 * 4f64.log10();
        assert!((r0["judge.elo_drop"] - want).abs() < 0.5, "{r0:?}");
        assert_eq!(r0["judge.ranking.teacher.elo"], 1000.0);
        assert!(r0["judge.ranking.round0.ci_low"] < r0["judge.ranking.round0.elo"]);
        let results: Vec<&pb::Event> = events.iter().filter(|e| e.kind == "judge_result").collect();
        assert!(
            results[0].message.contains("rating 759"),
            "{}",
            results[0].message
        );
        assert!(results[0]
            .message
            .contains("not comparable with published MT-Bench"));
        assert_eq!(results[0].metrics["judge.elo_drop"], r0["judge.elo_drop"]);
        if !passes {
            assert_eq!(camp.state, CampaignState::Failed);
            assert!(
                camp.error.as_deref().unwrap().contains("gate.max_elo_drop"),
                "{:?}",
                camp.error
            );
            continue;
        }
        assert_eq!(camp.state, CampaignState::Succeeded);
        // Round 1's judge task: the teacher's and round 0's answers, round 0's judgments.
        let judge1 = st
            .tasks
            .values()
            .find(|t| t.kind == kind::JUDGE && t.round == 1)
            .unwrap();
        for k in [
            "ranking_answers.teacher",
            "ranking_answers.round0",
            "prior_judgments.round0.judgments",
            "answers",
            "baseline_answers",
        ] {
            assert!(
                judge1.inputs.contains_key(k),
                "{k} missing from {:?}",
                judge1.inputs
            );
        }
        let judge0 = st
            .tasks
            .values()
            .find(|t| t.kind == kind::JUDGE && t.round == 0)
            .unwrap();
        assert!(!judge0
            .inputs
            .keys()
            .any(|k| k.starts_with("prior_judgments")));
    }
}

#[test]
fn a_judge_phase_run_again_after_an_extension_replaces_the_counts() {
    let mut st = State::default();
    let gate = format!("{RANKED}[gate]\nmin_win_rate = 0.9\non_fail = \"extend_distill\"\n");
    let c = submit(&mut st, spec(1, 1, &gate), 0);
    let w = register(&mut st, &["cpu"]);
    drive(&mut st, &w, &["cpu"], &c);
    let camp = &st.campaigns[&c];
    assert_eq!(camp.rounds[0].extensions, 1);
    assert_eq!(camp.state, CampaignState::Failed);
    let m = &camp.rounds[0].metrics;
    // Two judge phases ran; the second one's counts are the round's, not their sum.
    assert_eq!(
        (m["judge.wins"], m["judge.ties"], m["judge.losses"]),
        (3.0, 2.0, 5.0)
    );
    assert_eq!(m["judge.battles.teacher.round0.a_wins"], 8.0);
}

#[test]
fn after_teacher_correction_the_judge_baseline_and_the_ranking_teacher_are_the_corrected_teacher() {
    let mut st = State::default();
    let c = submit(
        &mut st,
        spec(
            2,
            1,
            &format!("{CORRECTION}{RANKED}[scheduling]\nscore_shards = 1\n"),
        ),
        0,
    );
    let w = register(&mut st, &["cpu:0", "cpu:1"]);
    let gang = poll(&mut st, &w, &["cpu:0", "cpu:1"], 1);
    let corrected = digest(7);
    for a in &gang {
        complete_with(
            &mut st,
            a,
            &[("teacher", &corrected)],
            &[("correct.tokens", 64.0)],
            2,
        )
        .unwrap();
    }
    let mut events = Vec::new();
    let mut now = 3;
    while !st.campaigns[&c].state.is_terminal() {
        let (a, evs) = poll_events(&mut st, &w, &["cpu:0", "cpu:1"], now);
        events.extend(evs);
        assert!(!a.is_empty(), "{:?}", st.campaigns[&c].rounds);
        for x in &a {
            events.extend(complete(&mut st, x, now).unwrap().events);
        }
        now += 1;
    }
    assert_eq!(st.campaigns[&c].state, CampaignState::Succeeded);
    // The teacher's answers (baseline, ranking anchor) come from the corrected teacher, once.
    let teacher_gen: Vec<&Task> = st
        .tasks
        .values()
        .filter(|t| t.kind == kind::GENERATE && t.params["role"] != "student")
        .collect();
    assert_eq!(teacher_gen.len(), 1, "one teacher answers task");
    assert_eq!(teacher_gen[0].params["role"], "teacher");
    assert_eq!(teacher_gen[0].inputs["teacher"], corrected);
    let camp = &st.campaigns[&c];
    let answers = &camp.teacher_artifacts["teacher_answers"];
    for t in st.tasks.values().filter(|t| t.kind == kind::JUDGE) {
        assert_eq!(t.inputs["teacher"], corrected);
        assert_eq!(&t.inputs["baseline_answers"], answers);
        assert_eq!(&t.inputs["ranking_answers.teacher"], answers);
    }
    // The ranking is anchored on that teacher, and each judge phase reports its result.
    for r in &camp.rounds {
        assert_eq!(r.metrics["judge.ranking.teacher.elo"], 1000.0);
        assert!(r.metrics["judge.elo_drop"] > 0.0);
    }
    assert_eq!(
        events.iter().filter(|e| e.kind == "judge_result").count(),
        2
    );
}

#[test]
fn a_corrupt_checkpoint_is_dropped_and_a_corrupt_output_fails_its_campaign_by_name() {
    let mut st = State::default();
    let c = submit(&mut st, spec(1, 1, "[scheduling]\nscore_shards = 1\n"), 0);
    let w = register(&mut st, &["cpu"]);
    to_distill(&mut st, &w, &c);
    let a = poll(&mut st, &w, &["cpu"], 100);
    let cp = digest(77);
    apply(
        &mut st,
        &cfg(),
        Event::Progress {
            lease: lref(&a[0]),
            metrics: BTreeMap::new(),
            checkpoint: Some(cp.clone()),
            message: String::new(),
            now: 101,
        },
    )
    .unwrap();
    // A checkpoint only saves time: dropped, the campaign runs on and the task starts over.
    let t = apply(
        &mut st,
        &cfg(),
        Event::ArtifactCorrupt {
            refs: vec![cp.clone()],
            now: 102,
        },
    )
    .unwrap();
    let task = &st.tasks[&a[0].task_id];
    assert_eq!(task.checkpoint, None);
    assert!(task.error.as_deref().is_some_and(|e| e.contains(&cp)));
    assert!(t.dirty.tasks.contains(&a[0].task_id));
    assert_eq!(st.campaigns[&c].state, CampaignState::Running);

    // The round's pruned model (a finished phase's output) is needed: the campaign fails, and
    // its error names the artifact and what it was.
    let pruned = st.campaigns[&c].rounds[0].artifacts["pruned"].clone();
    apply(
        &mut st,
        &cfg(),
        Event::ArtifactCorrupt {
            refs: vec![digest(999), pruned.clone()],
            now: 103,
        },
    )
    .unwrap();
    let camp = &st.campaigns[&c];
    assert_eq!(camp.state, CampaignState::Failed);
    let err = camp.error.clone().unwrap_or_default();
    assert!(err.contains("is corrupt on the coordinator"), "{err}");
    assert!(err.contains("rounds[0].artifacts.pruned"), "{err}");
    assert!(err.contains(&pruned) && err.contains(&digest(999)), "{err}");
    assert!(
        !st.leases.contains_key(&a[0].task_id),
        "its lease is revoked"
    );

    // An artifact nothing refers to changes nothing.
    let before = st.clone();
    let t = apply(
        &mut st,
        &cfg(),
        Event::ArtifactCorrupt {
            refs: vec![digest(12345)],
            now: 104,
        },
    )
    .unwrap();
    assert!(t.dirty.is_empty());
    assert_eq!(st, before);
}
