//! Store engines end to end: an online backup of a working coordinator restores into the other
//! engine and finishes the campaign there; a data dir of the other engine is one error line
//! (exit 2) and never an empty store; `migrate` moves a data dir between engines.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use distillery_coordinator::store::{backup, data_dir, Records, StoreKind};
use distillery_tests::*;

const FAST: &[&str] = &[
    "--lease-timeout-ms",
    "3000",
    "--heartbeat-interval-ms",
    "300",
    "--poll-timeout-ms",
    "2000",
    "--backoff-base-ms",
    "100",
];

fn args(store: &str) -> Vec<&str> {
    FAST.iter().copied().chain(["--store", store]).collect()
}

fn run(args: &[&str]) -> std::process::Output {
    Command::new(bin("coordinator"))
        .args(args)
        .env_remove("DISTILLERY_STORE")
        .output()
        .expect("run coordinator")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn read_backup(path: &Path) -> Records {
    let bytes = std::fs::read(path).unwrap();
    backup::decode(&bytes, "test").unwrap().1
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let dest = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &dest);
        } else {
            std::fs::copy(e.path(), dest).unwrap();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_online_backup_of_a_working_coordinator_restores_into_sled_and_finishes_there() {
    let fx = fixture();
    let data = fx.path().join("data");
    let coord = CoordinatorProc::start(&data, &args("redb"));
    let env = [("SCRIPT_TASK_MS", "300".to_string())];
    let w = WorkerProc::scripted(&coord.url(), &fx.path().join("w1"), &env);
    let id = submit(
        &coord,
        &write_spec(fx.path(), "s.toml", &spec_toml(1, 1, "")),
    );
    wait_event(&coord, &id, Duration::from_secs(60), |e| {
        e.kind == "phase_started" && e.phase == "distill"
    })
    .await;
    // While it serves and the worker reports: the backup goes through the coordinator.
    let file = fx.path().join("backup.jsonl");
    let out = coord.cli(&[
        "backup",
        "--data-dir",
        data.to_str().unwrap(),
        "--out",
        file.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let said = text(&out.stdout);
    assert!(said.contains("online via"), "{said}");
    let records = read_backup(&file);
    let (state, events) = records.to_state().unwrap();
    assert_eq!(state.campaigns.len(), 1);
    assert_eq!(state.meta.last_seq, events.len() as u64);
    assert!(events.len() >= 5, "{} events", events.len());

    // The campaign goes on; the backup's log is exactly the first events of the live one.
    let v = wait_terminal(&coord, &id, Duration::from_secs(60));
    assert_eq!(v["state"], "succeeded");
    let live = all_events(&coord, &id).await;
    assert!(live.len() > events.len());
    let ours: Vec<_> = events
        .iter()
        .filter(|e| e.campaign_id == id)
        .cloned()
        .collect();
    assert_eq!(ours.len(), events.len(), "one campaign, every event is its");
    assert_eq!(live[..ours.len()], ours[..]);
    drop(w);
    drop(coord);

    // Restore into the other engine; the artifacts directory is copied as files.
    let restored = fx.path().join("restored");
    let out = run(&[
        "restore",
        file.to_str().unwrap(),
        "--data-dir",
        restored.to_str().unwrap(),
        "--store",
        "sled",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(
        data_dir::recorded(&restored).unwrap(),
        Some(StoreKind::Sled)
    );
    // Round trip: an (offline) backup of the restored sled store holds the same records.
    let again = fx.path().join("again.jsonl");
    let out = run(&[
        "backup",
        "--data-dir",
        restored.to_str().unwrap(),
        "--out",
        again.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("(offline)"),
        "{}",
        text(&out.stdout)
    );
    assert_eq!(read_backup(&again), records);
    copy_dir(&data.join("artifacts"), &restored.join("artifacts"));

    // Served from the restore, the campaign resumes where the backup was taken and finishes.
    let coord = CoordinatorProc::start(&restored, &args("sled"));
    assert_eq!(coord.status_json(Some(&id))["state"], "running");
    let _w = WorkerProc::scripted(&coord.url(), &fx.path().join("w2"), &env);
    let v = wait_terminal(&coord, &id, Duration::from_secs(90));
    assert_eq!(v["state"], "succeeded", "{v}");
    let after = all_events(&coord, &id).await;
    assert_eq!(
        after[..ours.len()],
        ours[..],
        "the restored log goes on from the backup"
    );
}

#[test]
fn a_data_dir_of_the_other_engine_is_one_error_line_and_migrate_moves_it() {
    let fx = fixture();
    let data = fx.path().join("data");
    let d = data.to_str().unwrap();
    let coord = CoordinatorProc::start(&data, &args("sled"));
    let id = submit(
        &coord,
        &write_spec(fx.path(), "s.toml", &spec_toml(1, 1, "")),
    );
    // Online from a sled coordinator too (read under its state lock).
    let online = fx.path().join("online.jsonl");
    let out = coord.cli(&["backup", "--data-dir", d, "--out", online.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("(sled, online via"),
        "{}",
        text(&out.stdout)
    );
    drop(coord);

    let port = free_port().to_string();
    let listen = format!("127.0.0.1:{port}");
    let out = run(&[
        "serve",
        "--data-dir",
        d,
        "--store",
        "redb",
        "--listen",
        &listen,
    ]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    let err = text(&out.stderr);
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(
        lines,
        [format!(
            "coordinator: serve: data dir {d} holds a sled store, not redb: pass --store sled, or migrate it with `coordinator migrate --data-dir {d} --to redb`"
        )],
        "{err}"
    );
    assert!(
        !data.join("state.redb").exists(),
        "no empty redb store made"
    );

    // The sled store is intact: backed up offline, then migrated to redb.
    let file = fx.path().join("b.jsonl");
    let out = run(&["backup", "--data-dir", d, "--out", file.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let before = read_backup(&file);
    assert_eq!(before.campaigns.keys().collect::<Vec<_>>(), [&id]);
    let online = read_backup(&online);
    assert_eq!(online.campaigns, before.campaigns);
    assert_eq!(online.tasks, before.tasks);
    assert_eq!(online.events, before.events);
    let out = run(&["migrate", "--data-dir", d, "--to", "redb"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("sled -> redb"),
        "{}",
        text(&out.stdout)
    );
    let coord = CoordinatorProc::start(&data, &args("redb"));
    assert_eq!(coord.status_json(Some(&id))["state"], "pending");
    drop(coord);
    let out = run(&["backup", "--data-dir", d, "--out", file.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let after = read_backup(&file);
    // The restart recovered (events, meta) but every campaign and task record is the same.
    assert_eq!(after.campaigns, before.campaigns);
    assert_eq!(after.tasks, before.tasks);
    assert_eq!(
        after.events.range(..=before.events.len() as u64).count(),
        before.events.len()
    );

    // A restore never writes into a data dir that holds anything.
    let out = run(&["restore", file.to_str().unwrap(), "--data-dir", d]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("not empty"),
        "{}",
        text(&out.stderr)
    );
    // A damaged backup is refused before anything is written.
    let mut bytes = std::fs::read(&file).unwrap();
    let i = bytes.len() / 2;
    bytes[i] ^= 0x01;
    std::fs::write(&file, &bytes).unwrap();
    let fresh = fx.path().join("fresh");
    let out = run(&[
        "restore",
        file.to_str().unwrap(),
        "--data-dir",
        fresh.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stderr).lines().count(),
        1,
        "{}",
        text(&out.stderr)
    );
    assert!(!fresh.exists());
}
