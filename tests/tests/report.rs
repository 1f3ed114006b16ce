//! The campaign report of a real campaign (real workers, a tiny model, a real distillation):
//! served on the metrics port, written by `coordinator report`, identical both ways, drawn by
//! headless Chromium with its charts present (SVG elements with data, and the charts' colours
//! in the screenshot); the progress series it is drawn from survives a coordinator restart.

use std::time::Duration;

use distillery_tests::browser::{self, chromium_or_skip};
use distillery_tests::*;
use distillery_worker::model::test_model::{write_test_model, TestModelSpec};

fn spec(dir: &std::path::Path) -> std::path::PathBuf {
    let teacher = dir.join("teacher");
    write_test_model(
        &teacher,
        &TestModelSpec {
            num_layers: 3,
            seed: 5,
            ..Default::default()
        },
    )
    .unwrap();
    write_corpus(
        dir,
        &["calib.jsonl", "train.jsonl", "val.jsonl"],
        distillery_coordinator::demo::corpus(120, 3),
    );
    let toml = format!(
        "name = \"report-e2e\"\nseed = 3\n[teacher]\nmodel = \"{}\"\n[data]\n\
         calibration = {{ path = \"calib.jsonl\", samples = 8, seq_len = 32 }}\n\
         train = [ {{ name = \"stories\", path = \"train.jsonl\" }} ]\n\
         validation = [ {{ name = \"stories\", path = \"val.jsonl\" }} ]\n\
         [evaluation]\nperplexity = true\n\
         [gate]\nmax_perplexity_ratio = 100.0\n\
         [[rounds]]\ntarget = {{ hidden_size = 48, intermediate_size = 192, num_layers = 2 }}\n\
         distill = {{ tokens = 4096, seq_len = 32, micro_batch = 2, world_size = 2, lr = 0.003, warmup_steps = 2, checkpoint_every = 8 }}\n",
        teacher.display()
    );
    write_spec(dir, "report.toml", &toml)
}

#[test]
fn a_real_campaigns_report_is_served_written_and_drawn_with_its_charts() {
    let fx = tempfile::tempdir().unwrap();
    let metrics = format!("127.0.0.1:{}", free_port());
    let mut args: Vec<&str> = ML_TIMING.to_vec();
    args.extend(["--metrics-listen", metrics.as_str()]);
    let mut coord = CoordinatorProc::start(&fx.path().join("data"), &args);
    let _w1 = WorkerProc::real(&coord.url(), &fx.path().join("w1"), "cpu");
    let _w2 = WorkerProc::real(&coord.url(), &fx.path().join("w2"), "cpu");
    let id = submit(&coord, &spec(fx.path()));
    let v = wait_terminal(&coord, &id, Duration::from_secs(300));
    assert_eq!(v["state"], "succeeded", "{v}");

    // status --json: the distillation's downsampled progress series and its attempts.
    let distill = v["rounds"][0]["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["kind"] == "distill")
        .expect("a distill task")
        .clone();
    let series = distill["progress"].as_array().expect("progress series");
    // One point per step (32 < the cap), more only if an attempt was lost and resumed.
    assert!(series.len() >= 32, "{}", series.len());
    assert_eq!(series.last().unwrap()["metrics"]["distill.step"], 32.0);
    assert!(series.iter().all(|p| p["metrics"]["distill.loss"]
        .as_f64()
        .is_some_and(f64::is_finite)));
    let attempts = distill["attempt_log"].as_array().expect("attempt log");
    assert_eq!(
        attempts.last().unwrap()["outcome"],
        "succeeded",
        "{attempts:?}"
    );
    assert_eq!(attempts.len() as u64, distill["attempts"].as_u64().unwrap());
    for a in attempts {
        assert_eq!(
            a["workers"].as_array().unwrap().len(),
            2,
            "a gang of 2: {a}"
        );
        assert!(a["end_ms"].as_u64().unwrap() >= a["start_ms"].as_u64().unwrap());
    }
    assert_eq!(v["rounds"][0]["gate"][0]["decision"], "pass", "{v}");
    assert!(
        v["rounds"][0]["metrics"]["source"]["params"]
            .as_f64()
            .unwrap()
            > v["rounds"][0]["params"].as_f64().unwrap()
    );

    // Served and written: the same page.
    let served = http_get(&metrics, &format!("/campaigns/{id}/report")).expect("report served");
    let (head, body) = served.split_once("\r\n\r\n").expect("HTTP response");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.contains("text/html"), "{head}");
    let file = fx.path().join("out/report.html");
    let out = coord.cli(&["report", &id, "--out", file.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let written = std::fs::read_to_string(&file).unwrap();
    assert_eq!(written, body, "the served report is the written one");
    for fetch in ["<script", "<link", "src=", "href=\"http", "url(", "@import"] {
        assert!(!written.contains(fetch), "self-contained: {fetch}");
    }

    // Bad input: one line, exit 2.
    let missing = coord.cli(&["report", "c999999", "--out", file.to_str().unwrap()]);
    assert_eq!(missing.status.code(), Some(2));
    let err = String::from_utf8_lossy(&missing.stderr);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("c999999"), "{err}");
    let unwritable = coord.cli(&[
        "report",
        &id,
        "--out",
        fx.path().join("report.toml/x.html").to_str().unwrap(),
    ]);
    assert_eq!(unwritable.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&unwritable.stderr).contains("--out"));
    let nf = http_get(&metrics, "/campaigns/c999999/report").unwrap();
    assert!(nf.starts_with("HTTP/1.1 404"), "{nf}");
    assert!(http_get(&metrics, "/metrics")
        .unwrap()
        .contains("distillery_tasks"));

    // The series is durable: the same after a restart.
    coord.restart();
    let after = coord.status_json(Some(&id));
    assert_eq!(after["rounds"][0]["tasks"], v["rounds"][0]["tasks"]);
    assert_eq!(after["rounds"][0]["gate"], v["rounds"][0]["gate"]);

    let Some(chromium) = chromium_or_skip("report in chromium") else {
        return;
    };
    let dom = browser::dump_dom(&chromium, &file, fx.path());
    let tid = distill["id"].as_str().unwrap();
    // Loss and KL over 32 steps; the frontier from the teacher to the student; the timeline.
    let loss = browser::figure(&dom, &format!("loss-{tid}")).expect("loss chart in the DOM");
    assert_eq!(
        browser::polyline_points(loss, "#D62728"),
        series.len(),
        "loss curve"
    );
    assert_eq!(
        browser::polyline_points(loss, "#1F77B4"),
        series.len(),
        "KL curve"
    );
    let frontier = browser::figure(&dom, "frontier").expect("frontier chart");
    assert_eq!(
        browser::polyline_points(frontier, "#2CA02C"),
        2,
        "teacher → round 0"
    );
    assert!(frontier.contains("teacher\n</text>") && frontier.contains("round 0\n</text>"));
    let timeline = browser::figure(&dom, "timeline").expect("timeline chart");
    assert!(timeline.matches("<rect").count() >= 5, "attempt bars");
    for id in [format!("lr-{tid}"), format!("tps-{tid}")] {
        assert!(browser::figure(&dom, &id).is_some(), "{id}");
    }
    // The screenshot shows the charts' colours: the loss (red), KL (blue), the students'
    // frontier (green) and the teacher's point (orange). The HTML legends' swatches are paler
    // (opacity 0.7): every pixel counted here is one a chart drew.
    let shot = browser::screenshot(&chromium, &file, fx.path(), 1400, 3200);
    // Kept for a look when the test fails.
    let _ = std::fs::copy(
        &shot.path,
        std::env::temp_dir().join("distillery-report-e2e.png"),
    );
    let _ = std::fs::copy(
        &file,
        std::env::temp_dir().join("distillery-report-e2e.html"),
    );
    let counts: Vec<(&str, usize)> = [
        ("loss", (0xd6, 0x27, 0x28)),
        ("kl", (0x1f, 0x77, 0xb4)),
        ("students", (0x2c, 0xa0, 0x2c)),
        ("teacher", (0xff, 0x7f, 0x0e)),
    ]
    .iter()
    .map(|(n, c)| (*n, shot.count(*c, 12)))
    .collect();
    eprintln!(
        "screenshot {}x{} ({}): colour pixels {counts:?}",
        shot.width,
        shot.height,
        shot.path.display()
    );
    for (n, c) in &counts {
        assert!(*c >= 40, "too few {n} pixels in the screenshot: {counts:?}");
    }
}
