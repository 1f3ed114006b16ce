//! `coordinator demo` end to end (a short teacher training): the embedded coordinator and two
//! in-process workers run the two-round example campaign to success and report it.

use std::process::Command;

use distillery_tests::bin;

#[test]
fn the_demo_runs_the_example_campaign_to_a_report_and_a_loadable_student() {
    let dir = tempfile::tempdir().unwrap();
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
    assert!(
        stdout.contains("campaign c000001 (demo): succeeded"),
        "{stdout}"
    );
    // Two report rows with parameters, perplexity vs the teacher, judge and distillation figures.
    let rows: Vec<&str> = stdout
        .lines()
        .filter(|l| l.starts_with("0 ") || l.starts_with("1 "))
        .collect();
    assert_eq!(rows.len(), 2, "{stdout}");
    for r in &rows {
        let cols: Vec<&str> = r.split_whitespace().collect();
        assert!(cols[1].parse::<u64>().is_ok(), "params in {r}");
        assert!(
            cols[2].parse::<f64>().is_ok() && cols[3].parse::<f64>().is_ok(),
            "perplexities in {r}"
        );
        assert!(r.contains('/'), "judge counts in {r}");
    }
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
