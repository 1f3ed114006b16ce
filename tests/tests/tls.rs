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

/// A CA (`NAME-ca.pem`) and a client certificate it signed (`NAME.crt`, `NAME.key`).
fn write_client_ca_and_cert(dir: &std::path::Path, name: &str) {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate().expect("CA key");
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, format!("{name} client CA"));
    let ca_cert = ca_params.self_signed(&ca_key).expect("CA certificate");
    let issuer = Issuer::from_params(&ca_params, &ca_key);
    let key = KeyPair::generate().expect("key");
    let mut params = CertificateParams::new(vec![format!("{name}.workers")]).expect("params");
    params
        .distinguished_name
        .push(DnType::CommonName, format!("{name} worker"));
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    let cert = params.signed_by(&key, &issuer).expect("certificate");
    std::fs::write(dir.join(format!("{name}-ca.pem")), ca_cert.pem()).expect("write CA");
    std::fs::write(dir.join(format!("{name}.crt")), cert.pem()).expect("write cert");
    std::fs::write(dir.join(format!("{name}.key")), key.serialize_pem()).expect("write key");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_need_a_client_certificate_from_the_client_ca() {
    use distillery_proto::client::Target;
    use distillery_proto::v1 as pb;
    let fx = fixture();
    let dir = fx.path();
    write_tls_files(dir);
    write_client_ca_and_cert(dir, "ours");
    write_client_ca_and_cert(dir, "rogue");
    std::fs::write(
        dir.join("tokens"),
        "client client-token-0123456789\nworker worker-token-0123456789\n",
    )
    .unwrap();

    let port = free_port();
    let metrics = free_port();
    let p = |f: &str| dir.join(f).display().to_string();
    let mut child = std::process::Command::new(bin("coordinator"))
        .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
        .args(["--tls-cert", &p("tls.crt"), "--tls-key", &p("tls.key")])
        .args([
            "--tls-client-ca",
            &p("ours-ca.pem"),
            "--tokens",
            &p("tokens"),
        ])
        .args(["--metrics-listen", &format!("127.0.0.1:{metrics}")])
        .arg("--data-dir")
        .arg(dir.join("data"))
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let https = format!("https://localhost:{port}");
    let target = |identity: Option<&str>| Target {
        url: https.clone(),
        token: Some("worker-token-0123456789".into()),
        ca_cert: Some(p("ca.pem")),
        client_identity: identity.map(|n| (p(&format!("{n}.crt")), p(&format!("{n}.key")))),
    };
    let register = |t: Target| async move {
        let ch = t.channel().await.map_err(|e| e.to_string())?;
        let mut w = t.workers(ch).map_err(|e| e.to_string())?;
        w.register(pb::RegisterRequest {
            host: "h".into(),
            devices: vec!["cpu".into()],
            ..Default::default()
        })
        .await
        .map(|r| r.into_inner().worker_id)
        .map_err(|s| format!("{:?}: {}", s.code(), s.message()))
    };
    // The right certificate and the worker token: registered.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let ok = loop {
        let r = register(target(Some("ours"))).await;
        if r.is_ok() || std::time::Instant::now() > deadline {
            break r;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    assert!(ok.as_ref().is_ok_and(|id| id.starts_with('w')), "{ok:?}");

    // No certificate: refused by name, even with the right token.
    let none = register(target(None)).await;
    let err = none.expect_err("a worker without a certificate is refused");
    assert!(err.starts_with("Unauthenticated"), "{err}");
    assert!(err.contains("--tls-client-ca"), "{err}");
    // A certificate of another CA: the handshake fails, nothing is registered.
    let rogue = register(target(Some("rogue"))).await;
    assert!(rogue.is_err(), "{rogue:?}");
    // The right certificate does not replace the token.
    let mut no_token = target(Some("ours"));
    no_token.token = None;
    let err = register(no_token)
        .await
        .expect_err("the token is still needed");
    assert!(err.starts_with("Unauthenticated"), "{err}");

    // Clients need no certificate: their token is enough.
    let out = std::process::Command::new(bin("coordinator"))
        .args([
            "status",
            "--json",
            "--addr",
            &https,
            "--ca-cert",
            &p("ca.pem"),
        ])
        .env("DISTILLERY_TOKEN", "client-token-0123456789")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // End to end: `worker join` with the certificate registers and polls; one with the other
    // CA's certificate never registers.
    let mut rogue_worker = std::process::Command::new(bin("worker"))
        .args(["join", "--coordinator", &https, "--tls-ca", &p("ca.pem")])
        .args(["--tls-cert", &p("rogue.crt"), "--tls-key", &p("rogue.key")])
        .arg("--work-dir")
        .arg(dir.join("w-rogue"))
        .env("DISTILLERY_TOKEN", "worker-token-0123456789")
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut worker = std::process::Command::new(bin("worker"))
        .args(["join", "--coordinator", &https, "--tls-ca", &p("ca.pem")])
        .args(["--tls-cert", &p("ours.crt"), "--tls-key", &p("ours.key")])
        .arg("--work-dir")
        .arg(dir.join("w"))
        .env("DISTILLERY_TOKEN", "worker-token-0123456789")
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let addr = format!("127.0.0.1:{metrics}");
    let polling = eventually(std::time::Duration::from_secs(30), || {
        scrape(&addr).contains("distillery_workers_polling 1")
    });
    // Registered: the test's own worker and the joined one; never the rogue.
    std::thread::sleep(std::time::Duration::from_millis(500));
    let text = scrape(&addr);
    let _ = worker.kill();
    let _ = worker.wait();
    let _ = rogue_worker.kill();
    let _ = rogue_worker.wait();
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        polling,
        "the worker with the right certificate polls: {text}"
    );
    assert!(text.contains("distillery_workers 2\n"), "{text}");
}
