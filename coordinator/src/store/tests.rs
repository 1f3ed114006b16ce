//! Every store test runs against both engines.

use std::collections::BTreeMap;
use std::path::Path;

use super::backup;
use super::data_dir::{self, DataDirError};
use super::*;
use crate::machine::{apply, Config, Event, Reply};
use crate::phases::kind;

const ENGINES: [StoreKind; 2] = [StoreKind::Sled, StoreKind::Redb];

type Persisted = (
    BTreeMap<String, Campaign>,
    BTreeMap<String, Task>,
    BTreeMap<String, Lease>,
    BTreeMap<String, Worker>,
    Meta,
);

/// The persisted part of a state (`waiting` is transient, the rest derived).
fn persisted(st: &State) -> Persisted {
    (
        st.campaigns.clone(),
        st.tasks.clone(),
        st.leases.clone(),
        st.workers.clone(),
        st.meta.clone(),
    )
}

fn register_event(host: &str, now: u64) -> Event {
    Event::Register {
        host: host.into(),
        devices: vec!["cuda:0".into(), "cuda:1".into()],
        device_memory: vec![24 << 30, 24 << 30],
        labels: Default::default(),
        version: "0".into(),
        task_kinds: kind::ALL.iter().map(|k| k.to_string()).collect(),
        nonce: now as u32,
        previous: None,
        now,
    }
}

fn spec() -> pb::CampaignSpec {
    let text = "name = \"t\"\n[teacher]\nmodel = \"/m\"\n[data]\ncalibration = { path = \"/c\" }\n\
                train = [{ name = \"web\", path = \"/w\" }]\nvalidation = [{ name = \"web\", path = \"/v\" }]\n\
                [[rounds]]\ntarget = { num_layers = 2 }\ndistill = { tokens = 100, world_size = 1 }\n";
    crate::spec::parse(text, Path::new("/"), crate::spec::FileChecks::None)
        .expect("test spec is valid")
}

/// Drives a small history through `store` (two workers, two campaigns, leases handed out, one
/// campaign cancelled so records are removed too), committing and flushing each transition.
/// Returns the final state and every event, in order.
async fn history(store: &dyn StateStore) -> (State, Vec<pb::Event>) {
    let cfg = Config::default();
    let mut st = store.load().unwrap();
    let mut events = Vec::new();
    let mut workers = Vec::new();
    let mut campaigns = Vec::new();
    let mut now = 10;
    let step = |st: &mut State, e: Event, events: &mut Vec<pb::Event>| {
        let t = apply(st, &cfg, e).unwrap();
        store.commit(st, &t).unwrap();
        events.extend(t.events.iter().cloned());
        t.reply
    };
    for h in ["h1", "h2"] {
        now += 5;
        if let Reply::WorkerId(w) = step(&mut st, register_event(h, now), &mut events) {
            workers.push(w);
        }
    }
    for _ in 0..2 {
        now += 5;
        let e = Event::Submit {
            spec: Box::new(spec()),
            now,
        };
        if let Reply::CampaignId(c) = step(&mut st, e, &mut events) {
            campaigns.push(c);
        }
    }
    for w in &workers {
        now += 5;
        let e = Event::Poll {
            worker: w.clone(),
            free_devices: vec!["cuda:0".into(), "cuda:1".into()],
            now,
        };
        step(&mut st, e, &mut events);
    }
    store.flush().await.unwrap();
    assert!(!st.leases.is_empty(), "the history hands out leases");
    let leases_before = st.leases.len();
    now += 5;
    let e = Event::Cancel {
        campaign: campaigns[0].clone(),
        now,
    };
    step(&mut st, e, &mut events);
    store.flush().await.unwrap();
    assert!(st.leases.len() < leases_before, "cancel removes leases");
    assert_eq!(workers.len(), 2);
    assert_eq!(campaigns.len(), 2);
    (st, events)
}

fn all_events(store: &dyn StateStore) -> Vec<pb::Event> {
    store.events_from(0, usize::MAX).unwrap()
}

#[tokio::test]
async fn a_committed_transition_survives_reopen() {
    for engine in ENGINES {
        let dir = tempfile::tempdir().unwrap();
        let cfg = Config::default();
        let (worker, seqs) = {
            let store = engine.open_store(dir.path()).unwrap();
            let mut st = store.load().unwrap();
            let t = apply(&mut st, &cfg, register_event("h", 5)).unwrap();
            store.commit(&st, &t).unwrap();
            store.flush().await.unwrap();
            (st.workers.keys().next().cloned().unwrap(), st.meta.clone())
        };
        let store = engine.open_store(dir.path()).unwrap();
        let st = store.load().unwrap();
        assert!(st.workers.contains_key(&worker), "{engine}");
        // The device's memory survives a restart (submit checks against it).
        assert_eq!(
            st.workers[&worker].device_memory,
            vec![24u64 << 30, 24 << 30],
            "{engine}"
        );
        assert_eq!(st.meta, seqs, "{engine}");
    }
}

#[tokio::test]
async fn a_history_reads_back_equal_with_events_in_seq_order() {
    for engine in ENGINES {
        let dir = tempfile::tempdir().unwrap();
        let (st, events) = {
            let store = engine.open_store(dir.path()).unwrap();
            history(store.as_ref()).await
        };
        let store = engine.open_store(dir.path()).unwrap();
        let loaded = store.load().unwrap();
        assert_eq!(persisted(&loaded), persisted(&st), "{engine}");
        let got = all_events(store.as_ref());
        assert!(got.len() >= 8, "{engine}: {} events", got.len());
        assert_eq!(got, events, "{engine}");
        assert_eq!(
            got.iter().map(|e| e.seq).collect::<Vec<_>>(),
            (1..=got.len() as u64).collect::<Vec<_>>(),
            "{engine}"
        );
        assert_eq!(loaded.meta.last_seq, got.len() as u64, "{engine}");
        let page = store.events_from(3, 2).unwrap();
        assert_eq!(
            page.iter().map(|e| e.seq).collect::<Vec<_>>(),
            [3, 4],
            "{engine}"
        );
        assert!(store
            .events_from(got.len() as u64 + 1, 10)
            .unwrap()
            .is_empty());
    }
}

#[tokio::test]
async fn a_corrupt_record_names_its_table_and_key() {
    for engine in ENGINES {
        let dir = tempfile::tempdir().unwrap();
        let store = engine.open_store(dir.path()).unwrap();
        let mut r = Records::default();
        r.tasks.insert("t-7".into(), b"{not json".to_vec());
        r.events.insert(1, vec![0xff, 0xff, 0xff]);
        store.import(&r).unwrap();
        let e = store.load().unwrap_err();
        match &e {
            StoreError::Corrupt { tree, key, .. } => {
                assert_eq!((*tree, key.as_str()), ("tasks", "t-7"), "{engine}")
            }
            other => panic!("{engine}: {other}"),
        }
        assert!(
            e.to_string()
                .starts_with("state store: corrupt record \"t-7\" in tree tasks"),
            "{e}"
        );
        let e = store.events_from(0, 10).unwrap_err();
        assert!(
            matches!(&e, StoreError::Corrupt { tree: "events", key, .. } if key == "0000000000000001"),
            "{engine}: {e}"
        );
        // Importing into a store that holds records is refused.
        assert!(store.import(&r).is_err(), "{engine}");
    }
}

#[tokio::test]
async fn a_backup_restores_exactly_into_either_engine() {
    for from in ENGINES {
        let src = tempfile::tempdir().unwrap();
        let (st, events) = {
            let store = data_dir::open_data_dir(src.path(), Some(from)).unwrap();
            history(store.as_ref()).await
        };
        let (bytes, summary) = backup::offline(src.path()).unwrap();
        assert_eq!(summary.events, events.len());
        assert_eq!(summary.campaigns, 2);
        let (header, records) = backup::decode(&bytes, "test").unwrap();
        assert_eq!(header.engine, from.as_str());
        for to in ENGINES {
            let dst = tempfile::tempdir().unwrap();
            let dir = dst.path().join("restored");
            let s = backup::restore_records(&records, &dir, to).unwrap();
            assert_eq!(s, summary);
            assert_eq!(data_dir::recorded(&dir).unwrap(), Some(to));
            let store = data_dir::open_data_dir(&dir, None).unwrap();
            assert_eq!(store.kind(), to);
            let loaded = store.load().unwrap();
            assert_eq!(persisted(&loaded), persisted(&st), "{from} -> {to}");
            assert_eq!(all_events(store.as_ref()), events, "{from} -> {to}");
            // Byte for byte: a backup of the restored store is the same file, but its header.
            let again = backup::encode(&store.export().unwrap(), from, header.created_ms);
            assert_eq!(again, bytes, "{from} -> {to}");
        }
    }
}

#[tokio::test]
async fn a_damaged_or_misplaced_backup_is_refused() {
    let src = tempfile::tempdir().unwrap();
    {
        let store = data_dir::open_data_dir(src.path(), Some(StoreKind::Redb)).unwrap();
        history(store.as_ref()).await;
    }
    let (bytes, _) = backup::offline(src.path()).unwrap();
    // One changed byte inside a record.
    let mut damaged = bytes.clone();
    let i = damaged.len() / 2;
    damaged[i] = if damaged[i] == b'0' { b'1' } else { b'0' };
    let e = backup::decode(&damaged, "b.jsonl").unwrap_err();
    assert!(e.is_input());
    assert!(e.to_string().contains("checksum mismatch"), "{e}");
    // Truncated.
    let e = backup::decode(&bytes[..bytes.len() - 30], "b.jsonl").unwrap_err();
    assert!(e.to_string().contains("truncated"), "{e}");
    // Not a backup.
    let e = backup::decode(b"hello\nworld\n", "b.jsonl").unwrap_err();
    assert!(e.is_input(), "{e}");
    // A non-empty data dir is never restored into, and is left as it was.
    let (_, records) = backup::decode(&bytes, "b.jsonl").unwrap();
    let e = backup::restore_records(&records, src.path(), StoreKind::Sled).unwrap_err();
    assert!(e.is_input());
    assert!(e.to_string().contains("not empty"), "{e}");
    assert_eq!(
        data_dir::recorded(src.path()).unwrap(),
        Some(StoreKind::Redb)
    );
}

#[test]
fn the_wrong_engine_is_one_clear_error_and_never_an_empty_store() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().join("data");
    drop(data_dir::open_data_dir(&d, Some(StoreKind::Redb)).unwrap());
    let e = data_dir::open_data_dir(&d, Some(StoreKind::Sled))
        .err()
        .expect("refused");
    assert!(e.is_input());
    assert_eq!(
        e.to_string(),
        format!(
            "data dir {0} holds a redb store, not sled: pass --store redb, or migrate it with `coordinator migrate --data-dir {0} --to sled`",
            d.display()
        )
    );
    assert!(
        !StoreKind::Sled.store_path(&d).exists(),
        "no sled store created"
    );
    // Without --store the recorded engine is used.
    assert_eq!(
        data_dir::open_data_dir(&d, None).unwrap().kind(),
        StoreKind::Redb
    );
    // A data dir from before the engine file (sled's `state/` only) is sled.
    let old = dir.path().join("old");
    drop(SledStore::open(&StoreKind::Sled.store_path(&old)).unwrap());
    assert_eq!(data_dir::recorded(&old).unwrap(), Some(StoreKind::Sled));
    assert!(matches!(
        data_dir::open_data_dir(&old, Some(StoreKind::Redb)),
        Err(DataDirError::WrongEngine { .. })
    ));
    // A garbled engine file is named, not guessed.
    std::fs::write(d.join(data_dir::ENGINE_FILE), "rocks\n").unwrap();
    let e = data_dir::open_data_dir(&d, None).err().expect("refused");
    assert!(e.to_string().contains("says \"rocks\""), "{e}");
}

#[tokio::test]
async fn migrate_moves_every_record_to_the_other_engine_and_back() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (st, events) = {
        let store = data_dir::open_data_dir(d, Some(StoreKind::Sled)).unwrap();
        history(store.as_ref()).await
    };
    let (before, _) = backup::offline(d).unwrap();
    for (to, from) in [
        (StoreKind::Redb, StoreKind::Sled),
        (StoreKind::Sled, StoreKind::Redb),
    ] {
        let (was, summary) = backup::migrate(d, to).unwrap();
        assert_eq!(was, from);
        assert_eq!(summary.events, events.len());
        assert!(
            !from.store_path(d).exists(),
            "the old {from} store is removed"
        );
        let store = data_dir::open_data_dir(d, None).unwrap();
        assert_eq!(store.kind(), to);
        assert_eq!(persisted(&store.load().unwrap()), persisted(&st));
        assert_eq!(all_events(store.as_ref()), events);
    }
    let (after, _) = backup::offline(d).unwrap();
    assert_eq!(
        backup::decode(&after, "a").unwrap().1,
        backup::decode(&before, "b").unwrap().1
    );
    let e = backup::migrate(d, StoreKind::Sled).unwrap_err();
    assert!(e.to_string().contains("already holds a sled store"), "{e}");
}

#[tokio::test]
async fn an_engine_backup_is_its_durable_state_and_restores_into_the_other_engine() {
    for engine in ENGINES {
        let dir = tempfile::tempdir().unwrap();
        let store = engine.open_store(dir.path()).unwrap();
        let (_, events) = history(store.as_ref()).await;
        // Opening recovers (a transition of its own, with events): the backup has it too.
        let eng = crate::engine::Engine::open(store, Config::default())
            .await
            .unwrap();
        let records = eng.backup().await.unwrap();
        let (st, evs) = records.to_state().unwrap();
        assert_eq!(persisted(&st), eng.read(persisted), "{engine}");
        assert_eq!(evs, eng.store().events_from(0, usize::MAX).unwrap());
        assert!(evs.len() >= events.len() && evs[..events.len()] == events[..]);
        assert_eq!(st.meta.last_seq, evs.len() as u64);
        let other = tempfile::tempdir().unwrap();
        let to = engine.other();
        backup::restore_records(&records, &other.path().join("d"), to).unwrap();
        let restored = data_dir::open_data_dir(&other.path().join("d"), Some(to)).unwrap();
        assert_eq!(
            persisted(&restored.load().unwrap()),
            eng.read(persisted),
            "{engine} -> {to}"
        );
        assert_eq!(all_events(restored.as_ref()), evs);
    }
}

/// Not a test: the latency of one durable transition (commit, then flush) per engine, for the
/// README's figures. `cargo test -p distillery-coordinator --lib durable_transition_latency --
/// --ignored --nocapture`.
#[tokio::test]
#[ignore]
async fn durable_transition_latency() {
    const N: usize = 300;
    for engine in ENGINES {
        let dir = tempfile::tempdir().unwrap();
        let store = engine.open_store(dir.path()).unwrap();
        let cfg = Config::default();
        let mut st = store.load().unwrap();
        let mut commit_us = Vec::new();
        let mut durable_us = Vec::new();
        for i in 0..N {
            let t = apply(&mut st, &cfg, register_event(&format!("h{i}"), i as u64)).unwrap();
            let t0 = std::time::Instant::now();
            store.commit(&st, &t).unwrap();
            let t1 = std::time::Instant::now();
            store.flush().await.unwrap();
            commit_us.push((t1 - t0).as_micros() as u64);
            durable_us.push(t0.elapsed().as_micros() as u64);
        }
        commit_us.sort_unstable();
        durable_us.sort_unstable();
        let p = |v: &[u64], q: f64| v[((v.len() as f64 * q) as usize).min(v.len() - 1)];
        println!(
            "{engine}: commit p50 {} us p99 {} us; commit + flush p50 {} us p99 {} us ({N} transitions)",
            p(&commit_us, 0.5),
            p(&commit_us, 0.99),
            p(&durable_us, 0.5),
            p(&durable_us, 0.99)
        );
        // Restart cost: 50k task-sized records (copies of a real task record) and 50k events.
        let records = store.export().unwrap();
        let big = tempfile::tempdir().unwrap();
        let mut r = Records::default();
        let (st2, _) = {
            let s2 = engine.open_store(&big.path().join("h")).unwrap();
            history(s2.as_ref()).await
        };
        let task = encode(st2.tasks.values().next().unwrap()).unwrap();
        let event = records.events.values().next().cloned().unwrap_or_else(|| {
            pb::Event {
                seq: 1,
                kind: "task_progress".into(),
                ..Default::default()
            }
            .encode_to_vec()
        });
        for i in 0..50_000u64 {
            r.tasks.insert(format!("t{i:08}"), task.clone());
            r.events.insert(i + 1, event.clone());
        }
        let path = big.path().join("d");
        std::fs::create_dir_all(&path).unwrap();
        let t0 = std::time::Instant::now();
        engine.open_store(&path).unwrap().import(&r).unwrap();
        let import_ms = t0.elapsed().as_millis();
        let t0 = std::time::Instant::now();
        let store = engine.open_store(&path).unwrap();
        let loaded = store.load().unwrap();
        println!(
            "{engine}: import of {} records {import_ms} ms; reopen + load of {} task records: {} ms",
            r.len(),
            loaded.tasks.len(),
            t0.elapsed().as_millis()
        );
    }
}

#[tokio::test]
async fn a_failed_flush_is_final_and_said_even_with_no_one_waiting() {
    use crate::faults::{Fault, FaultInjection, FaultyStore};
    for engine in ENGINES {
        let dir = tempfile::tempdir().unwrap();
        let faults = FaultInjection::new();
        let store: Arc<dyn StateStore> = Arc::new(FaultyStore::new(
            engine.open_store(dir.path()).unwrap(),
            faults.clone(),
        ));
        let commit = GroupCommit::start(store);
        commit.durable().await.unwrap();
        assert_eq!(*commit.failed().borrow(), None);
        // The waiter gives up at once (a cancelled request): the failure is still recorded.
        faults.set(Fault::FlushIo);
        let mut failed = commit.failed();
        drop(tokio::time::timeout(std::time::Duration::ZERO, commit.durable()).await);
        let cause = failed.wait_for(|f| f.is_some()).await.unwrap().clone();
        assert!(
            cause.is_some_and(|c| c.contains("Input/output")),
            "{engine}"
        );
        // The disk works again, but nothing after a lost write may be called durable.
        faults.set(Fault::None);
        let e = commit.durable().await.unwrap_err();
        assert!(e.contains("Input/output"), "{engine}: {e}");
    }
}
