//! Bad input and access control at the edges: specs, arguments, tokens, artifact names.

use distillery_proto::v1 as pb;
use distillery_tests::*;

/// (replace this, with this, field named in the error).
const BAD_SPECS: &[(&str, &str, &str)] = &[
    (
        "name = \"e2e\"",
        "name = \"e2e\"\ncolour = \"blue\"",
        "colour",
    ),
    ("seed = 1", "seed = \"one\"", "seed"),
    (
        "model = \"teacher\"",
        "model = \"no-such-model\"",
        "teacher.model",
    ),
    (
        "model = \"teacher\"",
        "model = \"web.jsonl\"",
        "teacher.model",
    ),
    (
        "target = { num_layers = 3 }",
        "target = { num_layers = 9 }",
        "rounds[0].target.num_layers",
    ),
    (
        "target = { num_layers = 3 }",
        "target = { num_attention_heads = 7 }",
        "rounds[0].target.num_attention_heads",
    ),
    (
        "target = { num_layers = 3 }",
        "target = { hidden_size = 65 }",
        "rounds[0].target.hidden_size",
    ),
    (
        "world_size = 1",
        "world_size = 0",
        "rounds[0].distill.world_size",
    ),
    ("tokens = 1000", "tokens = -5", "rounds[0].distill.tokens"),
    (
        "path = \"calib.jsonl\"",
        "path = \"missing.jsonl\"",
        "data.calibration.path",
    ),
    (
        "train = [ { name = \"web\", path = \"web.jsonl\" } ]",
        "train = []",
        "data.train",
    ),
    (
        "validation = [ { name = \"web\", path = \"web-val.jsonl\" } ]",
        "validation = []",
        "evaluation.perplexity",
    ),
    (
        "seed = 1",
        "seed = 1\n[gate]\non_fail = \"panic\"",
        "gate.on_fail",
    ),
    (
        "seed = 1",
        "seed = 1\n[scheduling]\nmax_attempts = 0",
        "scheduling.max_attempts",
    ),
    ("[[rounds]]", "[[rouns]]", "rouns"),
];

#[test]
fn bad_specs_exit_2_with_one_line_and_leave_the_store_untouched() {
    let fx = fixture();
    let coord = CoordinatorProc::start(&fx.path().join("data"), &[]);
    let good = spec_toml(1, 1, "");
    for (from, to, field) in BAD_SPECS {
        assert!(good.contains(from), "template lacks {from:?}");
        let p = write_spec(fx.path(), "bad.toml", &good.replacen(from, to, 1));
        let out = coord.cli(&["submit", p.to_str().unwrap()]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{to:?}: {err}");
        assert_eq!(
            err.trim_end().lines().count(),
            1,
            "one line for {to:?}: {err}"
        );
        assert!(
            err.contains(&format!("{field}:")),
            "{to:?} must name {field}: {err}"
        );
        assert!(!err.contains("panicked") && out.stdout.is_empty());
    }
    // Not a file, and not TOML at all.
    for (name, body) in [
        ("none.toml", None),
        ("garbage.toml", Some("this is [not toml")),
    ] {
        let p = fx.path().join(name);
        if let Some(b) = body {
            std::fs::write(&p, b).unwrap();
        }
        let out = coord.cli(&["submit", p.to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(2));
        assert_eq!(
            String::from_utf8_lossy(&out.stderr)
                .trim_end()
                .lines()
                .count(),
            1
        );
    }
    assert_eq!(
        coord.status_json(None)["campaigns"],
        serde_json::json!([]),
        "nothing reached the store"
    );
    // The good spec still goes through.
    let id = submit(&coord, &write_spec(fx.path(), "good.toml", &good));
    assert_eq!(coord.status_json(Some(&id))["state"], "pending");
}

#[test]
fn bad_arguments_exit_2_with_one_line() {
    let fx = fixture();
    let coord = CoordinatorProc::start(&fx.path().join("data"), &[]);
    for args in [
        vec!["submit"],
        vec!["status", "--bogus"],
        vec!["frobnicate"],
        vec!["status", "c999999"],
        vec!["cancel", "c999999"],
        vec!["artifact", "get", "../../etc/passwd", "--out", "/tmp/x"],
        vec!["status", "--addr", "not-a-url"],
    ] {
        let out = coord.cli(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert_eq!(err.trim_end().lines().count(), 1, "{args:?}: {err}");
    }
    // A coordinator that is not there is a failure, not bad input.
    let out = coord.cli(&["status", "--addr", "http://127.0.0.1:9"]);
    assert_eq!(out.status.code(), Some(1));
    // Serve refuses a bad tokens file before touching the data dir.
    let bad = fx.path().join("tokens");
    std::fs::write(&bad, "root hunter2\n").unwrap();
    let out = std::process::Command::new(bin("coordinator"))
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--tokens",
            bad.to_str().unwrap(),
            "--data-dir",
        ])
        .arg(fx.path().join("other-data"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(!fx.path().join("other-data").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_and_roles_are_enforced() {
    let fx = fixture();
    let tokens = fx.path().join("tokens");
    let (client, worker) = (
        "client-token-0123456789abcdef",
        "worker-token-0123456789abcdef",
    );
    std::fs::write(&tokens, format!("client {client}\nworker {worker}\n")).unwrap();
    let mut coord = CoordinatorProc::start(
        &fx.path().join("data"),
        &["--tokens", tokens.to_str().unwrap()],
    );

    let code = |r: Result<(), tonic::Status>| r.err().map(|s| s.code());
    let mut anon = coord.campaigns(None).await;
    assert_eq!(
        code(anon.list(pb::ListCampaignsRequest {}).await.map(|_| ())),
        Some(tonic::Code::Unauthenticated)
    );
    let mut wrong = coord.campaigns(Some("not-a-token-at-all-xxxxxxxx")).await;
    assert_eq!(
        code(wrong.list(pb::ListCampaignsRequest {}).await.map(|_| ())),
        Some(tonic::Code::Unauthenticated)
    );
    let mut as_worker = coord.campaigns(Some(worker)).await;
    let spec = distillery_coordinator::spec::load_file(&write_spec(
        fx.path(),
        "s.toml",
        &spec_toml(1, 1, ""),
    ))
    .unwrap();
    let submit = as_worker
        .submit(pb::SubmitRequest {
            spec: Some(spec.clone()),
            ..Default::default()
        })
        .await;
    assert_eq!(
        code(submit.map(|_| ())),
        Some(tonic::Code::PermissionDenied)
    );
    // Retry is a client call: a worker token and no token are refused.
    let retry = pb::CampaignRef {
        campaign_id: "c000001".into(),
    };
    assert_eq!(
        code(as_worker.retry(retry.clone()).await.map(|_| ())),
        Some(tonic::Code::PermissionDenied)
    );
    assert_eq!(
        code(anon.retry(retry).await.map(|_| ())),
        Some(tonic::Code::Unauthenticated)
    );
    let mut w_as_client = coord.workers(Some(client)).await;
    let reg = pb::RegisterRequest {
        host: "h".into(),
        devices: vec!["cpu".into()],
        ..Default::default()
    };
    assert_eq!(
        code(w_as_client.register(reg.clone()).await.map(|_| ())),
        Some(tonic::Code::PermissionDenied)
    );
    let mut w_anon = coord.workers(None).await;
    assert_eq!(
        code(w_anon.register(reg.clone()).await.map(|_| ())),
        Some(tonic::Code::Unauthenticated)
    );
    assert_eq!(
        coord.status_json_with(client)["campaigns"],
        serde_json::json!([]),
        "refused calls changed nothing"
    );

    let mut ok_client = coord.campaigns(Some(client)).await;
    ok_client
        .submit(pb::SubmitRequest {
            spec: Some(spec),
            ..Default::default()
        })
        .await
        .expect("client may submit");
    let mut ok_worker = coord.workers(Some(worker)).await;
    ok_worker.register(reg).await.expect("worker may register");

    // The CLI without a token: one line, exit 1.
    let out = coord.cli(&["status"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("DISTILLERY_TOKEN") && err.trim_end().lines().count() == 1,
        "{err}"
    );
    coord.token = Some(client.into());
    assert!(coord.cli(&["status"]).status.success());
    let _ = &mut coord;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn artifact_names_are_digests_never_paths() {
    let fx = fixture();
    let coord = CoordinatorProc::start(&fx.path().join("data"), &[]);
    let mut w = coord.workers(None).await;
    for bad in [
        "../../../etc/passwd",
        "/etc/passwd",
        "sha256:../../x",
        &"z".repeat(64),
    ] {
        let e = w
            .get_artifact(pb::GetArtifactRequest {
                digest: bad.to_string(),
            })
            .await
            .expect_err("refused");
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{bad}");
    }
    let e = w
        .get_artifact(pb::GetArtifactRequest {
            digest: "ab".repeat(32),
        })
        .await
        .expect_err("absent");
    assert_eq!(e.code(), tonic::Code::NotFound);
    // An upload that names the wrong digest is refused and stores nothing.
    let f = fx.path().join("blob");
    std::fs::write(&f, vec![7u8; 3 << 20]).unwrap();
    let e = w
        .put_artifact(distillery_proto::artifact::file_chunks(
            f.clone(),
            "cd".repeat(32),
        ))
        .await
        .expect_err("mismatch");
    assert_eq!(e.code(), tonic::Code::DataLoss);
    let (digest, size) = distillery_proto::artifact::digest_file(&f).await.unwrap();
    let r = w
        .put_artifact(distillery_proto::artifact::file_chunks(
            f.clone(),
            digest.clone(),
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((r.digest.as_str(), r.size), (digest.as_str(), size));
    let out = fx.path().join("back");
    let o = coord.cli(&["artifact", "get", &digest, "--out", out.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(
        std::fs::read(out.join(&digest)).unwrap(),
        std::fs::read(&f).unwrap()
    );
}

/// What one reflection version says: the services it lists, and for each `(service, method)`
/// asked about, the method's input and output types from the file descriptor it returns.
#[derive(Debug, PartialEq)]
struct Reflected {
    services: Vec<String>,
    methods: Vec<(String, String)>,
}

/// The `(input, output)` types of `service.method` in encoded file descriptors.
fn method_types(files: &[Vec<u8>], service: &str, method: &str) -> Option<(String, String)> {
    use prost::Message;
    let (package, name) = service.rsplit_once('.')?;
    files.iter().find_map(|bytes| {
        let f = prost_types::FileDescriptorProto::decode(bytes.as_slice()).ok()?;
        if f.package() != package {
            return None;
        }
        let s = f.service.iter().find(|s| s.name() == name)?;
        let m = s.method.iter().find(|m| m.name() == method)?;
        Some((m.input_type().to_string(), m.output_type().to_string()))
    })
}

/// Asks one reflection version to list the services and describe `methods`, with `token` (or
/// none) in the metadata.
macro_rules! reflect {
    ($version:ident, $target:expr, $methods:expr) => {{
        use tonic_reflection::pb::$version::server_reflection_client::ServerReflectionClient;
        use tonic_reflection::pb::$version::server_reflection_request::MessageRequest;
        use tonic_reflection::pb::$version::server_reflection_response::MessageResponse;
        use tonic_reflection::pb::$version::ServerReflectionRequest;
        let target: &distillery_proto::client::Target = $target;
        let methods: &[(&str, &str)] = $methods;
        let ch = target.channel().await.unwrap();
        let token = distillery_proto::client::BearerToken::new(target.token.as_deref()).unwrap();
        let mut r = ServerReflectionClient::with_interceptor(ch, token);
        let mut reqs = vec![MessageRequest::ListServices(String::new())];
        for (service, _) in methods {
            reqs.push(MessageRequest::FileContainingSymbol(service.to_string()));
        }
        let n = reqs.len();
        let reqs = reqs.into_iter().map(|m| ServerReflectionRequest {
            host: String::new(),
            message_request: Some(m),
        });
        let mut stream = r
            .server_reflection_info(futures::stream::iter(reqs))
            .await
            .expect("reflection answers")
            .into_inner();
        let mut services = Vec::new();
        let mut files: Vec<Vec<u8>> = Vec::new();
        for _ in 0..n {
            let resp = stream.message().await.unwrap().expect("a response");
            match resp.message_response {
                Some(MessageResponse::ListServicesResponse(list)) => {
                    services = list.service.into_iter().map(|s| s.name).collect();
                }
                Some(MessageResponse::FileDescriptorResponse(fd)) => {
                    files.extend(fd.file_descriptor_proto)
                }
                other => panic!("unexpected reflection answer {other:?}"),
            }
        }
        services.sort();
        let methods = methods
            .iter()
            .map(|(s, m)| {
                let (i, o) = method_types(&files, s, m)
                    .unwrap_or_else(|| panic!("{s}.{m} is not described"));
                (i, o)
            })
            .collect();
        Reflected { services, methods }
    }};
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_both_reflection_versions_answer_without_a_token() {
    let fx = fixture();
    let tokens = fx.path().join("tokens");
    let client = "client-token-0123456789abcdef";
    std::fs::write(&tokens, format!("client {client}\n")).unwrap();
    let coord = CoordinatorProc::start(
        &fx.path().join("data"),
        &["--tokens", tokens.to_str().unwrap()],
    );
    let methods: &[(&str, &str)] = &[
        ("distillery.v1.CampaignService", "Submit"),
        ("distillery.v1.WorkerService", "PollTask"),
        ("grpc.health.v1.Health", "Check"),
    ];
    let want = Reflected {
        services: vec![
            "distillery.v1.CampaignService".into(),
            "distillery.v1.WorkerService".into(),
            "grpc.health.v1.Health".into(),
            "grpc.reflection.v1.ServerReflection".into(),
            "grpc.reflection.v1alpha.ServerReflection".into(),
        ],
        methods: vec![
            (
                ".distillery.v1.SubmitRequest".into(),
                ".distillery.v1.SubmitResponse".into(),
            ),
            (
                ".distillery.v1.PollTaskRequest".into(),
                ".distillery.v1.PollTaskResponse".into(),
            ),
            (
                ".grpc.health.v1.HealthCheckRequest".into(),
                ".grpc.health.v1.HealthCheckResponse".into(),
            ),
        ],
    };
    // Schema and health are public; a token, right or wrong, changes nothing there.
    for token in [None, Some(client), Some("not-a-token-at-all-000000")] {
        let target = coord.target(token);
        assert_eq!(reflect!(v1, &target, methods), want, "v1, token {token:?}");
        assert_eq!(
            reflect!(v1alpha, &target, methods),
            want,
            "v1alpha, token {token:?}"
        );
        let ch = target.channel().await.unwrap();
        let health = tonic_health::pb::health_client::HealthClient::new(ch)
            .check(tonic_health::pb::HealthCheckRequest {
                service: "distillery.v1.CampaignService".into(),
            })
            .await
            .expect("health answers")
            .into_inner();
        assert_eq!(
            health.status,
            tonic_health::pb::health_check_response::ServingStatus::Serving as i32
        );
    }
    // The services reflection describes still want the token.
    let mut anon = coord.campaigns(None).await;
    let e = anon.list(pb::ListCampaignsRequest {}).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated);
    let mut ok = coord.campaigns(Some(client)).await;
    ok.list(pb::ListCampaignsRequest {})
        .await
        .expect("client token works");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_messages_are_refused() {
    let fx = fixture();
    let coord = CoordinatorProc::start(&fx.path().join("data"), &[]);
    let mut w = coord.workers(None).await;
    let lease = pb::LeaseRef {
        task_id: "t00000001".into(),
        lease_id: 1,
        rank: 0,
    };
    let e = w
        .rendezvous(pb::RendezvousRequest {
            lease: Some(lease.clone()),
            key: "k".into(),
            payload: vec![0; 100 * 1024],
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    // Past the 16 MiB message bound the server refuses before any handler runs (a client
    // without our own bound, to reach the server's).
    let ch = coord.target(None).channel().await.unwrap();
    let mut raw = pb::worker_service_client::WorkerServiceClient::new(ch)
        .max_encoding_message_size(usize::MAX);
    let e = raw
        .report_progress(pb::ReportProgressRequest {
            lease: Some(lease),
            message: "x".repeat(17 << 20),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert!(
        matches!(
            e.code(),
            tonic::Code::OutOfRange | tonic::Code::ResourceExhausted
        ),
        "{e:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_toml_spec_sent_as_text_is_parsed_by_the_coordinator_like_the_cli_parses_it() {
    let fx = fixture();
    let coord = CoordinatorProc::start(&fx.path().join("data"), &[]);
    let text = spec_toml(2, 1, "");
    let path = write_spec(fx.path(), "s.toml", &text);
    let dir = fx.path().to_str().unwrap().to_string();
    let mut c = coord.campaigns(None).await;
    let submit = |spec: Option<pb::CampaignSpec>, toml: &str, dir: &str| pb::SubmitRequest {
        spec,
        spec_toml: toml.to_string(),
        spec_dir: dir.to_string(),
    };
    let refused = |r: Result<tonic::Response<pb::SubmitResponse>, tonic::Status>| {
        let e = r.expect_err("refused");
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
        e.message().to_string()
    };
    let cli_spec = distillery_coordinator::spec::load_file(&path).unwrap();
    // One of spec and spec_toml; an absolute folder for the relative paths.
    let both = refused(c.submit(submit(Some(cli_spec.clone()), &text, &dir)).await);
    assert!(both.contains("both"), "{both}");
    let neither = refused(c.submit(submit(None, "", "")).await);
    assert!(neither.contains("spec_toml"), "{neither}");
    let relative = refused(c.submit(submit(None, &text, "spec-folder")).await);
    assert!(relative.contains("spec_dir"), "{relative}");
    // The parser's own errors, with the field path and where it looked.
    let missing = refused(
        c.submit(submit(
            None,
            &text.replace("\"web.jsonl\"", "\"gone.jsonl\""),
            &dir,
        ))
        .await,
    );
    assert!(
        missing.starts_with("data.train[0].path: ") && missing.contains("gone.jsonl"),
        "{missing}"
    );
    assert_eq!(
        coord.status_json(None)["campaigns"],
        serde_json::json!([]),
        "refused submissions changed nothing"
    );

    // Accepted, it is the very spec `coordinator submit` sends (absolute paths, teacher shape).
    let id = c
        .submit(submit(None, &text, &dir))
        .await
        .expect("accepted")
        .into_inner()
        .campaign_id;
    let got = c
        .get(pb::GetCampaignRequest { campaign_id: id })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.spec, Some(cli_spec));
}

/// Every RPC of the Distillery services, from the compiled descriptor (so a new RPC joins the
/// matrix by itself): (service, method).
fn every_rpc() -> Vec<(String, String)> {
    use prost::Message;
    let set = prost_types::FileDescriptorSet::decode(distillery_proto::v1::FILE_DESCRIPTOR_SET)
        .expect("the compiled descriptor set decodes");
    let mut out = Vec::new();
    for f in &set.file {
        for s in &f.service {
            for m in &s.method {
                out.push((
                    format!("{}.{}", f.package(), s.name()),
                    m.name().to_string(),
                ));
            }
        }
    }
    out
}

/// The access matrix, walked for real: every RPC of every service × {client token, worker
/// token, no token, an unknown token}, each called over gRPC with an empty message. Clients may
/// call `CampaignService` only, workers `WorkerService` only; without a token or with an unknown
/// one every RPC is `Unauthenticated`, with the other role's token `PermissionDenied`, and an
/// admitted call is never answered with either (it fails, if at all, on its empty arguments).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_rpc_times_every_role_follows_the_access_matrix() {
    use tonic::codegen::http::uri::PathAndQuery;
    let fx = fixture();
    let tokens = fx.path().join("tokens");
    let (client, worker) = (
        "client-token-0123456789abcdef",
        "worker-token-0123456789abcdef",
    );
    std::fs::write(&tokens, format!("client {client}\nworker {worker}\n")).unwrap();
    let coord = CoordinatorProc::start(
        &fx.path().join("data"),
        &["--tokens", tokens.to_str().unwrap()],
    );
    let rpcs = every_rpc();
    let services: std::collections::BTreeSet<&str> = rpcs.iter().map(|(s, _)| s.as_str()).collect();
    assert_eq!(
        services.into_iter().collect::<Vec<_>>(),
        [
            "distillery.v1.CampaignService",
            "distillery.v1.WorkerService"
        ],
        "a new service needs its row in the matrix"
    );
    assert!(rpcs.len() >= 18, "{rpcs:?}");
    let ch = coord.target(None).channel().await.expect("connect");
    let callers = [
        ("client", Some(client)),
        ("worker", Some(worker)),
        ("none", None),
        ("unknown", Some("not-a-token-at-all-0123456789")),
    ];
    let mut table = Vec::new();
    for (service, method) in &rpcs {
        let owner = if service.ends_with("CampaignService") {
            "client"
        } else {
            "worker"
        };
        for (who, token) in callers {
            let mut grpc = tonic::client::Grpc::new(ch.clone());
            grpc.ready().await.expect("channel ready");
            let mut req = tonic::Request::new(futures::stream::iter([()]));
            if let Some(t) = token {
                req.metadata_mut()
                    .insert("authorization", format!("Bearer {t}").parse().unwrap());
            }
            let path = PathAndQuery::try_from(format!("/{service}/{method}")).unwrap();
            let codec = tonic_prost::ProstCodec::<(), ()>::default();
            // An admitted call may stay open (a watch, a long poll): its headers are enough.
            let got = tokio::time::timeout(
                std::time::Duration::from_secs(10),
                grpc.streaming(req, path, codec),
            )
            .await;
            let code = match got {
                Err(_) => None, // still open: admitted
                Ok(Ok(_)) => None,
                Ok(Err(s)) => Some(s.code()),
            };
            let want = match who {
                "none" | "unknown" => Some(tonic::Code::Unauthenticated),
                w if w == owner => None,
                _ => Some(tonic::Code::PermissionDenied),
            };
            let ok = match want {
                Some(w) => code == Some(w),
                None => !matches!(
                    code,
                    Some(tonic::Code::Unauthenticated | tonic::Code::PermissionDenied)
                ),
            };
            table.push(format!(
                "{service}/{method} as {who}: {code:?} (want {})",
                want.map_or("admitted".to_string(), |w| format!("{w:?}"))
            ));
            assert!(ok, "{}", table.last().unwrap());
        }
    }
    assert_eq!(table.len(), rpcs.len() * callers.len());
    // Nothing any refused call asked for happened.
    assert_eq!(
        coord.status_json_with(client)["campaigns"],
        serde_json::json!([])
    );
}
