//! TLS: a coordinator with a certificate serves `https://` clients that trust its CA, and
//! nothing else.

use distillery_tests::*;

#[test]
fn clients_reach_a_tls_coordinator_only_with_its_ca() {
    let fx = fixture();
    let dir = fx.path();
    write_tls_files(dir);

    let port = free_port();
    let mut child = std::process::Command::new(bin("coordinator"))
        .args([
            "serve",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--tls-cert",
        ])
        .arg(dir.join("tls.crt"))
        .arg("--tls-key")
        .arg(dir.join("tls.key"))
        .arg("--data-dir")
        .arg(dir.join("data"))
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let https = format!("https://localhost:{port}");
    let status = |addr: &str, ca: Option<&std::path::Path>| {
        let mut c = std::process::Command::new(bin("coordinator"));
        c.args(["status", "--json", "--addr", addr])
            .env_remove("DISTILLERY_CA_CERT");
        if let Some(ca) = ca {
            c.arg("--ca-cert").arg(ca);
        }
        c.output().unwrap()
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let ok = loop {
        let out = status(&https, Some(&dir.join("ca.pem")));
        if out.status.success() || std::time::Instant::now() > deadline {
            break out;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&ok.stdout).unwrap();
    assert_eq!(v["campaigns"], serde_json::json!([]));
    // Without the CA the server's certificate is not trusted; plaintext does not speak TLS.
    assert!(!status(&https, None).status.success());
    assert!(!status(&format!("http://127.0.0.1:{port}"), None)
        .status
        .success());
    let _ = child.kill();
    let _ = child.wait();
}
