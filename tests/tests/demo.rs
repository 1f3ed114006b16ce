//! `coordinator demo` end to end (a short teacher training): the embedded coordinator and two
//! in-process workers run the two-round example campaign to success; the table shows a teacher
//! well above perplexity 1, each round's pruned model worse than after its distillation, the
//! judge's result or why there is none, and the report the demo wrote.

use std::process::Command;

use distillery_tests::bin;

#[test]
fn the_demo_runs_the_example_campaign_to_a_table_a_report_and_a_loadable_student() {
    let dir = tempfile::tempdir().unwrap();
    let started = std::time::Instant::now();
    let out = Command::new(bin("coordinator"))
        .args([
            "demo",
            "--workers",
            "2",
            "--teacher-seconds",
            "20",
            "--teacher-steps",
            "80",
            "--dir",
        ])
        .arg(dir.path())
        .output()
        .expect("run the demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "demo failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!(
        "demo took {:.0} s:\n{stdout}",
        started.elapsed().as_secs_f64()
    );
    assert!(
        stdout.contains("campaign c000001 (demo): succeeded"),
        "{stdout}"
    );
    // Not a terminal: plain lines, progress included.
    assert!(
        stdout
            .lines()
            .any(|l| l.contains(" distill ") && l.contains("% step ") && l.contains(" loss ")),
        "{stdout}"
    );
    let row = |name: &str| -> Vec<String> {
        stdout
            .lines()
            .find(|l| l.starts_with(name))
            .unwrap_or_else(|| panic!("no {name} row in {stdout}"))
            .split_whitespace()
            .map(str::to_string)
            .collect()
    };
    let teacher = row("teacher ");
    let teacher_ppl: f64 = teacher[3].parse().expect("teacher perplexity");
    assert!(
        (3.0..60.0).contains(&teacher_ppl),
        "the corpus has entropy: teacher perplexity {teacher_ppl}"
    );
    let teacher_params: u64 = teacher[1].parse().unwrap();
    let mut last_params = teacher_params;
    for r in ["round 0", "round 1"] {
        let cols = row(r);
        let params: u64 = cols[2]
            .parse()
            .unwrap_or_else(|_| panic!("params in {cols:?}"));
        let pruned: f64 = cols[3]
            .parse()
            .unwrap_or_else(|_| panic!("pruned ppl in {cols:?}"));
        let distilled: f64 = cols[4]
            .parse()
            .unwrap_or_else(|_| panic!("ppl in {cols:?}"));
        assert!(params < last_params, "rounds shrink: {cols:?}");
        last_params = params;
        assert!(
            pruned > distilled * 1.05,
            "distillation pulls the pruned model back: {cols:?}"
        );
        assert!(distilled > teacher_ppl * 0.95, "{cols:?}");
        let line = cols.join(" ");
        assert!(
            line.contains("no verdict") || line.contains('/'),
            "judge counts or why there are none: {line}"
        );
    }
    if stdout.contains("no verdict") {
        assert!(stdout.contains("cannot judge"), "{stdout}");
    }
    let report = dir.path().join("report.html");
    assert!(
        stdout.contains(&format!("report:  {}", report.display())),
        "{stdout}"
    );
    let html = std::fs::read_to_string(&report).expect("the demo wrote its report");
    for chart in ["chart-frontier", "chart-timeline", "chart-loss-"] {
        assert!(html.contains(chart), "{chart} in the report");
    }
    assert!(html.contains("pruned, before distillation"));

    let student = dir.path().join("student");
    let m = distillery_worker::model::io::load_dir(
        &student,
        candle_core::DType::F32,
        &candle_core::Device::Cpu,
    )
    .expect("the student loads");
    assert_eq!(m.config.num_hidden_layers, 3);
    assert_eq!(m.config.hidden_size, 80);
    assert!(student.join("tokenizer.json").is_file());
}
