//! The `coordinator` command line (DESIGN.md §4). Errors are one line on stderr; exit 2 for bad
//! input (arguments, spec, files), 1 for other failures.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use distillery_proto::artifact::{self, parse_digest, DirManifest};
use distillery_proto::client::{error_chain, CampaignClient, Target};
use distillery_proto::v1 as pb;
use futures::StreamExt;
use serde_json::{json, Map, Value};

use crate::api::workers::WorkerTiming;
use crate::auth::Auth;
use crate::server::{self, ServeOptions};
use crate::spec;
use crate::store::backup::{self, BackupError};
use crate::store::data_dir::{self, DataDirError};
use crate::store::StoreKind;

#[derive(Parser, Debug)]
#[command(
    name = "coordinator",
    version,
    about = "Distillery coordinator: runs and follows pruning + distillation campaigns"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Args, Debug, Clone)]
pub struct ClientOpts {
    /// Coordinator URL.
    #[arg(
        long,
        env = "DISTILLERY_ADDR",
        default_value = "http://127.0.0.1:7070",
        global = true
    )]
    pub addr: String,
    /// Bearer token (role `client`).
    #[arg(long, env = "DISTILLERY_TOKEN", global = true, hide_env_values = true)]
    pub token: Option<String>,
    /// CA certificate (PEM) that signed the coordinator's TLS certificate, for https URLs.
    #[arg(long, env = "DISTILLERY_CA_CERT", global = true)]
    pub ca_cert: Option<String>,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the coordinator.
    Serve(ServeArgs),
    /// Validate a campaign spec and submit it; prints the campaign id.
    Submit {
        spec: PathBuf,
        /// Follow the campaign (progress on stderr); exit 0 iff it succeeds.
        #[arg(long)]
        wait: bool,
        #[command(flatten)]
        client: ClientOpts,
    },
    /// Per round and rank: the memory a distillation needs (weights, gradients, master weights
    /// and moments, activations, loss), whether it fits a device, and the cheapest change that
    /// makes it fit. Exit 0 when every round fits, 3 when one does not, 2 for bad input.
    Plan {
        spec: PathBuf,
        /// Memory of one device: a number and a unit, e.g. 80GiB, 24GB.
        #[arg(long)]
        device_memory: String,
        /// The kind of device the ranks run on: cuda or cpu (their fixed overhead differs).
        #[arg(long, default_value = "cuda")]
        device: String,
        /// Read the teacher's shape from this model directory (its config.json) or GGUF file
        /// instead of the spec's teacher.model (e.g. a config on a machine without the weights).
        #[arg(long)]
        teacher: Option<PathBuf>,
        /// One JSON object instead of the table.
        #[arg(long)]
        json: bool,
    },
    /// Show one campaign, or all.
    Status {
        id: Option<String>,
        /// One JSON object (`{"campaigns": [...]}` without an id).
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        client: ClientOpts,
    },
    /// Follow a campaign's progress; exit 0 iff it succeeded. On a terminal: a progress bar per
    /// running task; otherwise (or with --plain) one line per event.
    Watch {
        id: String,
        /// Plain log lines even on a terminal.
        #[arg(long)]
        plain: bool,
        #[command(flatten)]
        client: ClientOpts,
    },
    /// Write a campaign's report: one self-contained HTML file (no script, nothing fetched) with
    /// the size/quality frontier, each distillation's curves, judge results, gate decisions and
    /// the tasks per worker. The coordinator also serves it on `--metrics-listen` at
    /// `/campaigns/ID/report`.
    Report {
        id: String,
        /// The HTML file to write.
        #[arg(long)]
        out: PathBuf,
        #[command(flatten)]
        client: ClientOpts,
    },
    /// Cancel a campaign (running tasks stop within one heartbeat).
    Cancel {
        id: String,
        #[command(flatten)]
        client: ClientOpts,
    },
    /// Pause a campaign: running tasks stop and are re-leased on resume.
    Pause {
        id: String,
        #[command(flatten)]
        client: ClientOpts,
    },
    /// Resume a paused campaign.
    Resume {
        id: String,
        #[command(flatten)]
        client: ClientOpts,
    },
    /// Continue a failed campaign from its failed phase: that phase's unfinished tasks start
    /// over (a distillation from its last checkpoint); everything finished is kept.
    Retry {
        id: String,
        #[command(flatten)]
        client: ClientOpts,
    },
    /// Everything on this machine: writes a corpus, trains a small teacher, starts an embedded
    /// coordinator with in-process workers, runs the two-round example campaign, prints a report.
    Demo {
        /// In-process workers (each offers one CPU slot).
        #[arg(long, default_value_t = 2)]
        workers: usize,
        /// Where the data, the teacher, the coordinator's state and the student go.
        #[arg(long, default_value = "./distillery-demo")]
        dir: PathBuf,
        /// Teacher training budget in seconds (and steps).
        #[arg(long, default_value_t = 60)]
        teacher_seconds: u64,
        #[arg(long, default_value_t = 600)]
        teacher_steps: u64,
        /// Plain log lines even on a terminal (no progress bars).
        #[arg(long)]
        plain: bool,
        /// State store engine of the embedded coordinator (DIR/coordinator).
        #[arg(long, value_enum, env = "DISTILLERY_STORE")]
        store: Option<StoreKind>,
    },
    /// Back up the state store to FILE (engine-independent; `restore` reads it). With
    /// --data-dir: from the coordinator serving that dir (online, over --token's client role)
    /// or, when none is serving it, from the store itself. Without: from the coordinator at
    /// --addr.
    Backup {
        #[arg(long)]
        data_dir: Option<PathBuf>,
        #[arg(long)]
        out: PathBuf,
        #[command(flatten)]
        client: ClientOpts,
    },
    /// Restore a backup into a new (or empty) data dir, with either engine: restoring into the
    /// other engine is a migration.
    Restore {
        file: PathBuf,
        #[arg(long)]
        data_dir: PathBuf,
        /// Engine of the restored store (default: redb).
        #[arg(long, value_enum)]
        store: Option<StoreKind>,
    },
    /// Move a data dir's state store to the other engine, in place (stop the coordinator first).
    Migrate {
        #[arg(long)]
        data_dir: PathBuf,
        #[arg(long, value_enum)]
        to: StoreKind,
    },
    /// Fetch artifacts.
    Artifact {
        #[command(subcommand)]
        command: ArtifactCommand,
    },
}

#[derive(Subcommand, Debug)]
pub enum ArtifactCommand {
    /// Download an artifact by digest, or a campaign's latest student by campaign id.
    Get {
        what: String,
        #[arg(long)]
        out: PathBuf,
        #[command(flatten)]
        client: ClientOpts,
    },
}

#[derive(Args, Debug)]
pub struct ServeArgs {
    #[arg(long, default_value = "127.0.0.1:7070")]
    pub listen: SocketAddr,
    #[arg(long, default_value = "./distillery-data")]
    pub data_dir: PathBuf,
    /// State store engine. A fresh data dir gets this one (default: redb); an existing one must
    /// hold it (omit it to use whichever the dir holds).
    #[arg(long, value_enum, env = "DISTILLERY_STORE")]
    pub store: Option<StoreKind>,
    /// File of `ROLE TOKEN` lines (roles: client, worker). Without it only loopback is served.
    #[arg(long)]
    pub tokens: Option<PathBuf>,
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Mutual TLS for workers: every `WorkerService` call must come over a connection whose
    /// client certificate this CA (PEM) signed, in addition to the worker token. Clients
    /// (`CampaignService`) still authenticate by token alone. Needs --tls-cert/--tls-key.
    #[arg(long, requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,
    /// Serve Prometheus metrics on this address (`GET /metrics`).
    #[arg(long)]
    pub metrics_listen: Option<SocketAddr>,
    /// A lease not renewed for this long expires and its task is retried.
    #[arg(long, default_value_t = 30_000)]
    pub lease_timeout_ms: u64,
    /// How often workers heartbeat.
    #[arg(long, default_value_t = 5_000)]
    pub heartbeat_interval_ms: u64,
    /// How long a worker's poll waits for work.
    #[arg(long, default_value_t = 25_000)]
    pub poll_timeout_ms: u64,
    /// First retry delay (doubles per failed attempt).
    #[arg(long, default_value_t = 1_000)]
    pub backoff_base_ms: u64,
    #[arg(long, default_value_t = 60_000)]
    pub backoff_max_ms: u64,
    /// Largest spec a submit may carry, in bytes (TOML text, or the encoded spec).
    #[arg(long, default_value_t = crate::limits::DEFAULT_MAX_SPEC_BYTES)]
    pub max_spec_bytes: usize,
    /// Most tasks one phase of a spec may fan out to (shards, depth groups, candidates).
    #[arg(long, default_value_t = crate::machine::DEFAULT_MAX_TASKS_PER_PHASE)]
    pub max_tasks_per_phase: u32,
    /// Most bytes of artifacts (outputs and current checkpoints) one campaign may hold.
    #[arg(long, default_value_t = crate::limits::DEFAULT_MAX_ARTIFACT_BYTES_PER_CAMPAIGN)]
    pub max_artifact_bytes_per_campaign: u64,
    /// Most calls in flight (streams included) from one peer address.
    #[arg(long, default_value_t = crate::limits::DEFAULT_MAX_STREAMS_PER_PEER)]
    pub max_streams_per_peer: usize,
    /// Log as JSON lines.
    #[arg(long)]
    pub log_json: bool,
}

/// A failure with its exit code.
#[derive(Debug)]
pub struct CliError {
    pub code: i32,
    pub message: String,
}

impl CliError {
    pub fn input(message: impl Into<String>) -> CliError {
        CliError {
            code: 2,
            message: message.into(),
        }
    }
    pub fn other(message: impl Into<String>) -> CliError {
        CliError {
            code: 1,
            message: message.into(),
        }
    }
}

fn status_error(what: &str, s: tonic::Status) -> CliError {
    let code = match s.code() {
        tonic::Code::InvalidArgument
        | tonic::Code::NotFound
        | tonic::Code::FailedPrecondition
        | tonic::Code::ResourceExhausted => 2,
        _ => 1,
    };
    let msg = if s.code() == tonic::Code::Unavailable {
        format!("{what}: coordinator unavailable: {}", s.message())
    } else {
        format!("{what}: {}", s.message())
    };
    CliError { code, message: msg }
}

/// Runs the CLI; returns the process exit code.
pub fn main() -> i32 {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(
                e.kind(),
                ErrorKind::DisplayHelp
                    | ErrorKind::DisplayVersion
                    | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
            ) {
                let _ = e.print();
                return if e.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand {
                    2
                } else {
                    0
                };
            }
            let first = distillery_proto::client::one_line_usage_error(&e.render().to_string());
            eprintln!("coordinator: {first} (see `coordinator --help`)");
            return 2;
        }
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("coordinator: cannot start the async runtime: {e}");
            return 1;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("coordinator: {}", e.message);
            e.code
        }
    }
}

async fn run(cli: Cli) -> Result<i32, CliError> {
    match cli.command {
        Command::Serve(a) => serve(a).await,
        Command::Submit { spec, wait, client } => submit(&spec, wait, &client).await,
        Command::Plan {
            spec,
            device_memory,
            device,
            teacher,
            json,
        } => plan(&spec, &device_memory, &device, teacher.as_deref(), json),
        Command::Status { id, json, client } => status(id.as_deref(), json, &client).await,
        Command::Watch { id, plain, client } => {
            let mut c = connect(&client).await?;
            let mut view = crate::progress_view::for_stdout(plain);
            watch(&mut c, &client, &id, view.as_mut()).await
        }
        Command::Report { id, out, client } => report(&client, &id, &out).await,
        Command::Cancel { id, client } => control(&client, &id, "cancel").await,
        Command::Pause { id, client } => control(&client, &id, "pause").await,
        Command::Resume { id, client } => control(&client, &id, "resume").await,
        Command::Retry { id, client } => control(&client, &id, "retry").await,
        Command::Artifact {
            command: ArtifactCommand::Get { what, out, client },
        } => artifact_get(&client, &what, &out).await,
        Command::Demo {
            workers,
            dir,
            teacher_seconds,
            teacher_steps,
            plain,
            store,
        } => {
            crate::demo::run(crate::demo::DemoArgs {
                workers,
                dir,
                teacher_seconds,
                teacher_steps,
                plain,
                store,
            })
            .await
        }
        Command::Backup {
            data_dir,
            out,
            client,
        } => backup_cmd(data_dir.as_deref(), &out, &client).await,
        Command::Restore {
            file,
            data_dir,
            store,
        } => restore_cmd(&file, &data_dir, store.unwrap_or(StoreKind::DEFAULT)),
        Command::Migrate { data_dir, to } => migrate_cmd(&data_dir, to),
    }
}

fn init_logging(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        let _ = b.json().try_init();
    } else {
        let _ = b.try_init();
    }
}

async fn serve(a: ServeArgs) -> Result<i32, CliError> {
    init_logging(a.log_json);
    let mut opts = ServeOptions::new(a.listen, a.data_dir.clone());
    opts.store = a.store;
    if let Some(t) = &a.tokens {
        opts.auth = Auth::from_file(t).map_err(|e| CliError::input(format!("--tokens {e}")))?;
    }
    if let (Some(c), Some(k)) = (&a.tls_cert, &a.tls_key) {
        let cert = std::fs::read(c)
            .map_err(|e| CliError::input(format!("--tls-cert {}: {e}", c.display())))?;
        let key = std::fs::read(k)
            .map_err(|e| CliError::input(format!("--tls-key {}: {e}", k.display())))?;
        opts.tls = Some((cert, key));
    }
    if let Some(ca) = &a.tls_client_ca {
        let pem = std::fs::read(ca)
            .map_err(|e| CliError::input(format!("--tls-client-ca {}: {e}", ca.display())))?;
        opts.tls_client_ca = Some(pem);
        opts.auth = opts.auth.with_worker_certificates();
    }
    for (name, v) in [
        ("--lease-timeout-ms", a.lease_timeout_ms),
        ("--heartbeat-interval-ms", a.heartbeat_interval_ms),
        ("--poll-timeout-ms", a.poll_timeout_ms),
    ] {
        if v == 0 {
            return Err(CliError::input(format!("{name} must be positive")));
        }
    }
    if a.heartbeat_interval_ms * 2 > a.lease_timeout_ms {
        return Err(CliError::input(format!(
            "--heartbeat-interval-ms {} must be at most half of --lease-timeout-ms {} so a lease survives one lost heartbeat",
            a.heartbeat_interval_ms, a.lease_timeout_ms
        )));
    }
    for (name, v) in [
        ("--max-spec-bytes", a.max_spec_bytes as u64),
        ("--max-tasks-per-phase", u64::from(a.max_tasks_per_phase)),
        (
            "--max-artifact-bytes-per-campaign",
            a.max_artifact_bytes_per_campaign,
        ),
        ("--max-streams-per-peer", a.max_streams_per_peer as u64),
    ] {
        if v == 0 {
            return Err(CliError::input(format!("{name} must be positive")));
        }
    }
    opts.limits = crate::limits::Limits {
        max_spec_bytes: a.max_spec_bytes,
        max_artifact_bytes_per_campaign: a.max_artifact_bytes_per_campaign,
        max_streams_per_peer: a.max_streams_per_peer,
    };
    opts.machine.max_tasks_per_phase = a.max_tasks_per_phase;
    opts.metrics_listen = a.metrics_listen;
    opts.machine.lease_timeout_ms = a.lease_timeout_ms;
    opts.machine.backoff_base_ms = a.backoff_base_ms;
    opts.machine.backoff_max_ms = a.backoff_max_ms.max(a.backoff_base_ms);
    opts.timing = WorkerTiming {
        heartbeat_interval: Duration::from_millis(a.heartbeat_interval_ms),
        poll_timeout: Duration::from_millis(a.poll_timeout_ms),
        rendezvous_timeout: Duration::from_millis(a.poll_timeout_ms.min(20_000)),
    };
    opts.tick = Duration::from_millis((a.lease_timeout_ms / 10).clamp(20, 500));
    let started = std::time::Instant::now();
    let running = server::start(opts.clone()).await.map_err(serve_error)?;
    let (campaigns, tasks) = running.engine.read(|s| (s.campaigns.len(), s.tasks.len()));
    tracing::info!(
        addr = %running.addr,
        data_dir = %a.data_dir.display(),
        campaigns,
        tasks,
        store = %running.store,
        startup_ms = started.elapsed().as_millis() as u64,
        "coordinator serving"
    );
    if !opts.auth.has_tokens() {
        tracing::warn!("no --tokens given: accepting loopback clients and workers only");
    }
    tokio::select! {
        r = running.handle => match r {
            Ok(Ok(())) => Ok(0),
            Ok(Err(e)) => Err(CliError::other(format!("serve: {e:#}"))),
            Err(e) => Err(CliError::other(format!("serve: {e}"))),
        },
        _ = tokio::signal::ctrl_c() => {
            tracing::info!("interrupted; state is durable, exiting");
            Ok(0)
        }
    }
}

/// A failure to start serving: exit 2 when the data dir is the user's to fix (wrong engine).
pub(crate) fn serve_error(e: anyhow::Error) -> CliError {
    let input = e
        .downcast_ref::<DataDirError>()
        .is_some_and(|d| d.is_input());
    let msg = match e.downcast_ref::<DataDirError>() {
        Some(d) if input => d.to_string(),
        _ => format!("{e:#}"),
    };
    CliError {
        code: if input { 2 } else { 1 },
        message: format!("serve: {msg}"),
    }
}

fn backup_error(what: &str, e: BackupError) -> CliError {
    CliError {
        code: if e.is_input() { 2 } else { 1 },
        message: format!("{what}: {e}"),
    }
}

/// `coordinator backup`: online through the serving coordinator when there is one, else from
/// the store directly (which fails while another process holds it).
async fn backup_cmd(
    data_dir: Option<&Path>,
    out: &Path,
    client: &ClientOpts,
) -> Result<i32, CliError> {
    let Some(dir) = data_dir else {
        let (bytes, from) = backup_online(client, None).await?;
        return finish_backup(out, &bytes, &from);
    };
    match data_dir::recorded(dir) {
        Ok(Some(_)) => {}
        Ok(None) => {
            return Err(CliError::input(format!(
                "backup: {}",
                DataDirError::NoStore {
                    dir: dir.display().to_string()
                }
            )))
        }
        Err(e) => return Err(backup_error("backup", e.into())),
    }
    let url = std::fs::read_to_string(dir.join(data_dir::SERVE_URL_FILE))
        .ok()
        .map(|u| u.trim().to_string());
    if let Some(url) = &url {
        let c = ClientOpts {
            addr: url.clone(),
            ..client.clone()
        };
        match backup_online(&c, Some(dir)).await {
            Ok((bytes, from)) => return finish_backup(out, &bytes, &from),
            // Nobody answers there (a coordinator that was killed): back up the store itself.
            Err(e)
                if e.message.contains("cannot reach the coordinator")
                    || e.message.contains("coordinator unavailable") =>
            {
                tracing::debug!(error = %e.message, "no coordinator serves the data dir")
            }
            Err(e) => return Err(e),
        }
    }
    match backup::offline(dir) {
        Ok((bytes, summary)) => finish_backup(
            out,
            &bytes,
            &format!("{} (offline), {summary}", dir.display()),
        ),
        Err(BackupError::DataDir(e @ DataDirError::Open { .. })) => Err(CliError::other(format!(
            "backup: {e}; no coordinator answered at {} either (pass --token if it needs one)",
            url.as_deref()
                .unwrap_or("the URL a serving coordinator records in serve-url")
        ))),
        Err(e) => Err(backup_error("backup", e)),
    }
}

/// Streams a backup from the coordinator at `c.addr`; when `dir` is given, the coordinator must
/// be the one serving it.
async fn backup_online(c: &ClientOpts, dir: Option<&Path>) -> Result<(Vec<u8>, String), CliError> {
    let mut client = connect(c).await?;
    let mut stream = client
        .backup(pb::BackupRequest {})
        .await
        .map_err(|s| status_error("backup", s))?
        .into_inner();
    let mut bytes = Vec::new();
    let (mut served, mut engine, mut digest) = (String::new(), String::new(), String::new());
    while let Some(chunk) = stream
        .message()
        .await
        .map_err(|s| status_error("backup", s))?
    {
        if bytes.is_empty() && served.is_empty() {
            served = chunk.data_dir.clone();
            engine = chunk.engine.clone();
        }
        bytes.extend_from_slice(&chunk.data);
        if !chunk.digest.is_empty() {
            digest = chunk.digest;
        }
    }
    if let Some(dir) = dir {
        let want = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
        if Path::new(&served) != want {
            return Err(CliError::other(format!(
                "backup: the coordinator at {} serves {served}, not {}; back up with its own --data-dir or --addr",
                c.addr,
                want.display()
            )));
        }
    }
    let got = {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(&bytes))
    };
    if got != digest {
        return Err(CliError::other(format!(
            "backup: the stream from {} was damaged (sha256 {got}, the coordinator sent {digest}); try again",
            c.addr
        )));
    }
    Ok((bytes, format!("{served} ({engine}, online via {})", c.addr)))
}

fn finish_backup(out: &Path, bytes: &[u8], from: &str) -> Result<i32, CliError> {
    // Verify before writing: what is written restores.
    let (_, records) = backup::decode(bytes, "from the coordinator")
        .map_err(|e| CliError::other(format!("backup: {e}")))?;
    backup::write_file(out, bytes).map_err(|e| backup_error("backup", e))?;
    println!(
        "backup: {} <- {from}: {}, {} bytes",
        out.display(),
        backup::Summary::of(&records),
        bytes.len()
    );
    Ok(0)
}

fn restore_cmd(file: &Path, data_dir: &Path, store: StoreKind) -> Result<i32, CliError> {
    let s = backup::restore_file(file, data_dir, store).map_err(|e| backup_error("restore", e))?;
    println!(
        "restore: {} -> {} ({store}): {s}",
        file.display(),
        data_dir.display()
    );
    Ok(0)
}

fn migrate_cmd(data_dir: &Path, to: StoreKind) -> Result<i32, CliError> {
    let (from, s) = backup::migrate(data_dir, to).map_err(|e| backup_error("migrate", e))?;
    println!("migrate: {}: {from} -> {to}: {s}", data_dir.display());
    Ok(0)
}

fn target(c: &ClientOpts) -> Target {
    Target {
        url: c.addr.clone(),
        token: c.token.clone(),
        ca_cert: c.ca_cert.clone(),
        client_identity: None,
    }
}

async fn connect(c: &ClientOpts) -> Result<CampaignClient, CliError> {
    let t = target(c);
    let ch = t.channel().await.map_err(|e| match e {
        distillery_proto::client::ConnectError::BadUrl(_)
        | distillery_proto::client::ConnectError::BadCa { .. } => {
            CliError::input(format!("--addr: {e}"))
        }
        other => CliError::other(other.to_string()),
    })?;
    t.campaigns(ch).map_err(|e| CliError::input(e.to_string()))
}

async fn submit(path: &Path, wait: bool, client: &ClientOpts) -> Result<i32, CliError> {
    let spec =
        spec::load_file(path).map_err(|e| CliError::input(format!("{}: {e}", path.display())))?;
    let mut c = connect(client).await?;
    let id = c
        .submit(pb::SubmitRequest {
            spec: Some(spec),
            ..Default::default()
        })
        .await
        .map_err(|s| status_error("submit", s))?
        .into_inner()
        .campaign_id;
    println!("{id}");
    if wait {
        let mut view = crate::progress_view::Plain(Box::new(std::io::stderr()));
        return watch(&mut c, client, &id, &mut view).await;
    }
    Ok(0)
}

/// `coordinator plan`: reads only the teacher's config (the data need not exist here).
fn plan(
    path: &Path,
    device_memory: &str,
    device: &str,
    teacher: Option<&Path>,
    as_json: bool,
) -> Result<i32, CliError> {
    use distillery_proto::memplan::{parse_size, DeviceKind};
    let memory =
        parse_size(device_memory).map_err(|e| CliError::input(format!("--device-memory {e}")))?;
    let kind = DeviceKind::parse(device).map_err(|e| CliError::input(format!("--device {e}")))?;
    let bad_spec = |e: spec::SpecError| CliError::input(format!("{}: {e}", path.display()));
    let spec = match teacher {
        Some(t) => {
            let mut s = spec::load_file_with(path, spec::FileChecks::None).map_err(bad_spec)?;
            let shape = crate::source_model::read_shape(t)
                .map_err(|e| CliError::input(format!("--teacher {e}")))?;
            if let Some(teacher) = s.teacher.as_mut() {
                teacher.shape = Some(shape);
            }
            s
        }
        None => spec::load_file_with(path, spec::FileChecks::TeacherOnly).map_err(|e| {
            CliError::input(format!(
                "{}: {e} (give the teacher's config with --teacher DIR when the model is not on this machine)",
                path.display()
            ))
        })?,
    };
    let plans = crate::plan::campaign_plan(&spec, kind, Some(memory))
        .map_err(|e| CliError::input(format!("{}: {e}", path.display())))?;
    let correction = crate::plan::correction_plan(&spec, kind, Some(memory))
        .map_err(|e| CliError::input(format!("{}: {e}", path.display())))?;
    let all_fit = plans
        .iter()
        .chain(&correction)
        .all(|p| p.fits == Some(true));
    if as_json {
        let correction = correction
            .map(|c| crate::plan::to_json(std::slice::from_ref(&c))[0].clone())
            .unwrap_or(Value::Null);
        println!(
            "{}",
            json!({"spec": spec.name, "fits": all_fit, "teacher_correction": correction, "rounds": crate::plan::to_json(&plans)})
        );
    } else {
        if let Some(c) = &correction {
            print!("{}", crate::plan::render_text(std::slice::from_ref(c)));
        }
        print!("{}", crate::plan::render_text(&plans));
    }
    Ok(if all_fit { 0 } else { 3 })
}

async fn control(client: &ClientOpts, id: &str, what: &str) -> Result<i32, CliError> {
    let mut c = connect(client).await?;
    let r = pb::CampaignRef {
        campaign_id: id.to_string(),
    };
    let res = match what {
        "cancel" => c.cancel(r).await,
        "pause" => c.pause(r).await,
        "retry" => c.retry(r).await,
        _ => c.resume(r).await,
    }
    .map_err(|s| status_error(what, s))?
    .into_inner();
    println!("{} {}", res.id, state_name(res.state));
    Ok(0)
}

/// The lowercase state name used by the CLI and `--json`.
pub fn state_name(s: i32) -> &'static str {
    match pb::CampaignState::try_from(s).unwrap_or(pb::CampaignState::Unspecified) {
        pb::CampaignState::Pending => "pending",
        pb::CampaignState::Running => "running",
        pb::CampaignState::Paused => "paused",
        pb::CampaignState::Succeeded => "succeeded",
        pb::CampaignState::Failed => "failed",
        pb::CampaignState::Cancelled => "cancelled",
        pb::CampaignState::Unspecified => "unknown",
    }
}

fn nest(flat: &BTreeMap<String, f64>) -> Map<String, Value> {
    let mut root = Map::new();
    for (k, v) in flat {
        let parts: Vec<&str> = k.split('.').collect();
        let mut cur = &mut root;
        for p in &parts[..parts.len() - 1] {
            let e = cur
                .entry(p.to_string())
                .or_insert_with(|| Value::Object(Map::new()));
            if !e.is_object() {
                *e = Value::Object(Map::new());
            }
            cur = e.as_object_mut().expect("just made an object");
        }
        cur.insert(parts[parts.len() - 1].to_string(), json!(v));
    }
    root
}

/// One candidate of a round's search in `status --json`: `{index, shape, params, tokens, score,
/// winner, pruned, checkpoint, task_id}`.
pub fn candidate_json(x: &pb::Candidate) -> Value {
    let text = |s: &str| if s.is_empty() { Value::Null } else { json!(s) };
    json!({
        "index": x.index,
        "shape": {
            "hidden_size": x.hidden_size, "intermediate_size": x.intermediate_size,
            "num_attention_heads": x.num_attention_heads, "num_layers": x.num_layers,
        },
        "params": x.params,
        "tokens": x.tokens,
        "score": x.score,
        "winner": x.winner,
        "pruned": text(&x.pruned),
        "checkpoint": text(&x.checkpoint),
        "task_id": text(&x.task_id),
    })
}

/// One line of the plain-text report per search candidate.
pub fn candidate_line(x: &pb::Candidate) -> String {
    format!(
        "candidate #{} {}/{}/{}/{} (hidden/intermediate/heads/layers) params {} tokens {} score {}{}",
        x.index,
        x.hidden_size,
        x.intermediate_size,
        x.num_attention_heads,
        x.num_layers,
        x.params,
        x.tokens,
        x.score.map_or("-".to_string(), |s| format!("{s:.4}")),
        if x.winner { "  <- winner" } else { "" }
    )
}

/// The `status --json` object of one campaign (DESIGN.md §4 field names).
pub fn campaign_json(c: &pb::Campaign) -> Value {
    let judge_mode = c
        .spec
        .as_ref()
        .and_then(|s| s.evaluation.as_ref())
        .and_then(|e| e.judge.as_ref())
        .map(|j| j.mode.clone());
    let rounds: Vec<Value> = c
        .rounds
        .iter()
        .map(|r| {
            let flat: BTreeMap<String, f64> = r.metrics.clone().into_iter().collect();
            let mut metrics = nest(&flat);
            for k in ["perplexity", "teacher_perplexity"] {
                metrics.entry(k).or_insert(Value::Null);
            }
            let judge = metrics.entry("judge").or_insert_with(|| Value::Object(Map::new()));
            if let Some(j) = judge.as_object_mut() {
                for k in ["wins", "ties", "losses", "win_rate", "ci_low", "ci_high", "position_consistency", "unparsed"] {
                    j.entry(k).or_insert(Value::Null);
                }
                // What the figures can be compared with (only mode "mtbench" follows FastChat's
                // MT-Bench grading exactly).
                if let Some(mode) = &judge_mode {
                    let comparable = crate::spec::mtbench_comparable(mode);
                    j.insert("mode".into(), json!(mode));
                    j.insert("mtbench_comparable".into(), json!(comparable));
                    j.insert("comparability".into(), json!(comparability(mode)));
                }
            }
            let distill = metrics.entry("distill").or_insert_with(|| Value::Object(Map::new()));
            if let Some(d) = distill.as_object_mut() {
                for k in ["steps", "tokens", "final_loss", "world_size"] {
                    d.entry(k).or_insert(Value::Null);
                }
            }
            let target = r.target.as_ref().map(|t| {
                json!({
                    "hidden_size": t.hidden_size, "intermediate_size": t.intermediate_size,
                    "num_attention_heads": t.num_attention_heads, "num_layers": t.num_layers, "params": t.params,
                })
            });
            let mut artifacts: Map<String, Value> = r.artifacts.iter().map(|(k, v)| (k.clone(), json!(v))).collect();
            artifacts.entry("student").or_insert(Value::Null);
            let candidates: Vec<Value> = r.candidates.iter().map(candidate_json).collect();
            json!({
                "index": r.index,
                "state": r.state,
                "phase": r.phase,
                "params": flat.get("params").map(|p| json!(*p as u64)).unwrap_or(Value::Null),
                "target": target,
                "artifacts": artifacts,
                "metrics": metrics,
                "extensions": r.extensions,
                "candidates": candidates,
                "gate": r.gate.iter().map(|g| json!({
                    "time_ms": g.time_ms, "decision": g.decision, "reason": g.reason,
                    "metrics": g.metrics.iter().collect::<BTreeMap<_, _>>(),
                })).collect::<Vec<_>>(),
            })
        })
        .collect();
    let tasks = c.tasks.unwrap_or_default();
    let records: Vec<&pb::TaskRecord> = c.task_records.iter().collect();
    let task_json = |t: &pb::TaskRecord| {
        json!({
            "id": t.id, "kind": t.kind, "state": t.state, "round": t.round, "phase": t.phase,
            "world_size": t.world_size, "attempts": t.attempts, "lost": t.lost,
            "failed": t.failed, "revoked": t.revoked,
            "checkpoint": if t.checkpoint.is_empty() { Value::Null } else { json!(t.checkpoint) },
            "error": if t.error.is_empty() { Value::Null } else { json!(t.error) },
            "progress": t.progress.iter().map(|p| json!({
                "time_ms": p.time_ms,
                "metrics": p.metrics.iter().collect::<BTreeMap<_, _>>(),
            })).collect::<Vec<_>>(),
            "attempt_log": t.attempt_log.iter().map(|a| json!({
                "lease_id": a.lease_id, "workers": a.workers, "hosts": a.hosts,
                "start_ms": a.start_ms,
                "end_ms": if a.end_ms == 0 { Value::Null } else { json!(a.end_ms) },
                "outcome": if a.outcome.is_empty() { Value::Null } else { json!(a.outcome) },
            })).collect::<Vec<_>>(),
        })
    };
    let mut rounds = rounds;
    // The memory plan of each round's ranks (on a CUDA device; no fit: the client does not know
    // the workers' devices, the coordinator checked them at submit).
    let plans = c
        .spec
        .as_ref()
        .and_then(|s| {
            crate::plan::campaign_plan(s, distillery_proto::memplan::DeviceKind::Cuda, None).ok()
        })
        .map(|p| crate::plan::to_json(&p));
    for (i, r) in rounds.iter_mut().enumerate() {
        let plan = plans
            .as_ref()
            .and_then(|p| p.get(i).cloned())
            .unwrap_or(Value::Null);
        if let Some(o) = r.as_object_mut() {
            o.insert("memory_plan".into(), plan);
        }
    }
    for (r, pr) in rounds.iter_mut().zip(&c.rounds) {
        let mine: Vec<Value> = records
            .iter()
            .filter(|t| t.round == pr.index)
            .map(|t| task_json(t))
            .collect();
        if let Some(o) = r.as_object_mut() {
            o.insert("tasks".into(), Value::Array(mine));
        }
    }
    json!({
        "id": c.id,
        "name": c.name,
        "state": state_name(c.state),
        "error": if c.error.is_empty() { Value::Null } else { json!(c.error) },
        "created_ms": c.created_ms,
        "updated_ms": c.updated_ms,
        "tasks": {"pending": tasks.pending, "leased": tasks.leased, "succeeded": tasks.succeeded, "failed": tasks.failed, "cancelled": tasks.cancelled},
        "retries": c.retries,
        "rounds": rounds,
    })
}

/// The label shown beside a judge mode's figures.
pub fn comparability(mode: &str) -> &'static str {
    if crate::spec::mtbench_comparable(mode) {
        "MT-Bench (FastChat's prompts and grading, comparable with published MT-Bench)"
    } else {
        "not comparable with published MT-Bench"
    }
}

/// The plain-text lines on a round's judge results beyond the win rate: MT-Bench scores, the
/// length-controlled win rate, the ranking, agreement, and the comparability label.
pub fn judge_lines(round: u32, mode: Option<&str>, m: &BTreeMap<String, f64>) -> Vec<String> {
    let g = |k: &str| m.get(&format!("judge.{k}")).copied();
    let f = |v: Option<f64>, p: usize| v.map_or("-".to_string(), |x| format!("{x:.p$}"));
    let mut out = Vec::new();
    if let Some(mode) = mode {
        out.push(format!("judge mode {mode}: {}", comparability(mode)));
    }
    for (who, label) in [
        ("mtbench", "student"),
        ("teacher_mtbench", "teacher"),
        ("baseline_mtbench", "baseline"),
    ] {
        if g(&format!("{who}.overall")).is_some() || g(&format!("{who}.invalid")).is_some() {
            out.push(format!(
                "MT-Bench {label}: {} (turn 1 {}, turn 2 {}; {} invalid grades)",
                f(g(&format!("{who}.overall")), 2),
                f(g(&format!("{who}.turn1")), 2),
                f(g(&format!("{who}.turn2")), 2),
                f(g(&format!("{who}.invalid")), 0),
            ));
        }
    }
    if let Some(lc) = g("lc_win_rate") {
        out.push(format!(
            "win rate {} raw, {lc:.3} length-controlled (length coefficient {})",
            f(g("win_rate"), 3),
            f(g("lc_length_coef"), 2)
        ));
    }
    let mut ranked: Vec<(String, f64)> = m
        .iter()
        .filter_map(|(k, v)| {
            k.strip_prefix("judge.ranking.")
                .and_then(|r| r.strip_suffix(".elo"))
                .map(|n| (n.to_string(), *v))
        })
        .collect();
    ranked.sort_by(|a, b| b.1.total_cmp(&a.1));
    if !ranked.is_empty() {
        let list: Vec<String> = ranked
            .iter()
            .map(|(n, e)| {
                format!(
                    "{n} {e:.0} [{}, {}]",
                    f(g(&format!("ranking.{n}.ci_low")), 0),
                    f(g(&format!("ranking.{n}.ci_high")), 0)
                )
            })
            .collect();
        out.push(format!("ranking after round {round}: {}", list.join(", ")));
    }
    if let Some(k) = g("samples.k") {
        out.push(format!(
            "self-agreement over {k:.0} samples: {} agree, Krippendorff's alpha {}",
            f(g("samples.agreement"), 3),
            f(g("samples.alpha"), 3)
        ));
    }
    if g("second.n").is_some() {
        out.push(format!(
            "second judge: {} agree, Cohen's kappa {} ({} prompts, {} unparsed)",
            f(g("second.agreement"), 3),
            f(g("second.kappa"), 3),
            f(g("second.n"), 0),
            f(g("second.unparsed"), 0)
        ));
    }
    out
}

async fn status(id: Option<&str>, as_json: bool, client: &ClientOpts) -> Result<i32, CliError> {
    let mut c = connect(client).await?;
    let campaigns = match id {
        Some(id) => vec![c
            .get(pb::GetCampaignRequest {
                campaign_id: id.to_string(),
            })
            .await
            .map_err(|s| status_error("status", s))?
            .into_inner()],
        None => {
            c.list(pb::ListCampaignsRequest {})
                .await
                .map_err(|s| status_error("status", s))?
                .into_inner()
                .campaigns
        }
    };
    if as_json {
        let v = match id {
            Some(_) => campaign_json(&campaigns[0]),
            None => json!({"campaigns": campaigns.iter().map(campaign_json).collect::<Vec<_>>()}),
        };
        println!("{v}");
        return Ok(0);
    }
    if campaigns.is_empty() {
        println!("no campaigns");
    }
    for c in &campaigns {
        let t = c.tasks.unwrap_or_default();
        println!(
            "{}  {:<28} {:<10} tasks: {} done, {} running, {} pending, {} failed",
            c.id,
            c.name,
            state_name(c.state),
            t.succeeded,
            t.leased,
            t.pending,
            t.failed
        );
        if !c.error.is_empty() {
            println!("    error: {}", c.error);
        }
        for r in &c.rounds {
            let m: BTreeMap<String, f64> = r.metrics.clone().into_iter().collect();
            let fmt = |k: &str| {
                m.get(k)
                    .map(|v| format!("{v:.3}"))
                    .unwrap_or_else(|| "-".into())
            };
            println!(
                "    round {} {:<9} phase {:<8} params {:>12} ppl {} (teacher {}) win rate {} student {}",
                r.index,
                r.state,
                r.phase,
                m.get("params").map(|p| format!("{}", *p as u64)).unwrap_or_else(|| "-".into()),
                fmt("perplexity"),
                fmt("teacher_perplexity"),
                fmt("judge.win_rate"),
                r.artifacts.get("student").map(String::as_str).unwrap_or("-"),
            );
            if let Some(o) = m.get("original_teacher_perplexity") {
                println!(
                    "      teacher corrected: ppl {} (original teacher {o:.3})",
                    fmt("teacher_perplexity")
                );
            }
            for x in &r.candidates {
                println!("      {}", candidate_line(x));
            }
            let mode = c
                .spec
                .as_ref()
                .and_then(|s| s.evaluation.as_ref())
                .and_then(|e| e.judge.as_ref())
                .map(|j| j.mode.as_str());
            if m.keys().any(|k| k.starts_with("judge.")) {
                for line in judge_lines(r.index, mode, &m) {
                    println!("      {line}");
                }
            }
            // Tasks whose attempts did not all go smoothly: how many were lost, how many failed.
            for t in c
                .task_records
                .iter()
                .filter(|t| t.round == r.index && (t.lost > 0 || t.failed > 0))
            {
                println!(
                    "      task {} ({}) {}: {} attempt(s), {} lost, {} failed{}",
                    t.id,
                    t.kind,
                    t.state,
                    t.attempts,
                    t.lost,
                    t.failed,
                    if t.error.is_empty() {
                        String::new()
                    } else {
                        format!("; last: {}", t.error)
                    }
                );
            }
        }
    }
    Ok(0)
}

/// Follows a campaign's events (reconnecting across coordinator restarts); returns 0 iff it
/// succeeded.
pub async fn watch(
    c: &mut CampaignClient,
    client: &ClientOpts,
    id: &str,
    view: &mut dyn crate::progress_view::ProgressView,
) -> Result<i32, CliError> {
    let code = watch_events(c, client, id, view).await;
    view.finish();
    code
}

async fn watch_events(
    c: &mut CampaignClient,
    client: &ClientOpts,
    id: &str,
    view: &mut dyn crate::progress_view::ProgressView,
) -> Result<i32, CliError> {
    let mut next = 1u64;
    let mut failures = 0u32;
    // Failed events seen: one that a later `retry` continued is not the end.
    let mut failed_seen = 0u32;
    loop {
        let stream = c
            .watch(pb::WatchRequest {
                campaign_id: id.to_string(),
                from_seq: next,
            })
            .await;
        let mut stream = match stream {
            Ok(s) => s.into_inner(),
            Err(s) if s.code() == tonic::Code::Unavailable && failures < 60 => {
                failures += 1;
                tokio::time::sleep(Duration::from_secs(1)).await;
                *c = match connect(client).await {
                    Ok(c) => c,
                    Err(_) => continue,
                };
                continue;
            }
            Err(s) => return Err(status_error("watch", s)),
        };
        while let Some(item) = stream.next().await {
            let e = match item {
                Ok(e) => e,
                Err(_) => break,
            };
            failures = 0;
            next = e.seq + 1;
            view.event(&e);
            if e.kind == "search_decided" {
                // The candidates as the report shows them.
                let got = c
                    .get(pb::GetCampaignRequest {
                        campaign_id: id.to_string(),
                    })
                    .await;
                if let Ok(camp) = got {
                    let camp = camp.into_inner();
                    for x in camp
                        .rounds
                        .iter()
                        .filter(|r| r.index == e.round)
                        .flat_map(|r| &r.candidates)
                    {
                        view.note(&format!("    {}", candidate_line(x)));
                    }
                }
            }
            if e.kind == "campaign_state" {
                match pb::CampaignState::try_from(e.state) {
                    Ok(pb::CampaignState::Succeeded) => return Ok(0),
                    Ok(pb::CampaignState::Cancelled) => return Ok(1),
                    Ok(pb::CampaignState::Failed) => {
                        failed_seen += 1;
                        let retries = c
                            .get(pb::GetCampaignRequest {
                                campaign_id: id.to_string(),
                            })
                            .await
                            .map(|r| r.into_inner().retries)
                            .unwrap_or(0);
                        if failed_seen > retries {
                            return Ok(1);
                        }
                    }
                    _ => {}
                }
            }
        }
        // The stream ended without a terminal event: the coordinator went away. Reconnect.
        failures += 1;
        if failures > 60 {
            return Err(CliError::other(format!(
                "watch {id}: lost the coordinator at {}",
                client.addr
            )));
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        if let Ok(nc) = connect(client).await {
            *c = nc;
        }
    }
}

/// `coordinator report ID --out FILE`.
async fn report(client: &ClientOpts, id: &str, out: &Path) -> Result<i32, CliError> {
    let mut c = connect(client).await?;
    let camp = c
        .get(pb::GetCampaignRequest {
            campaign_id: id.to_string(),
        })
        .await
        .map_err(|s| status_error(&format!("report {id}"), s))?
        .into_inner();
    let html = crate::report::render(&campaign_json(&camp));
    write_report(out, &html)?;
    println!("{}", out.display());
    Ok(0)
}

/// Writes a report file (its folder created), or says where and why it could not.
pub fn write_report(out: &Path, html: &str) -> Result<(), CliError> {
    if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| {
            CliError::input(format!(
                "--out {}: cannot create {}: {e}",
                out.display(),
                dir.display()
            ))
        })?;
    }
    std::fs::write(out, html).map_err(|e| {
        CliError::input(format!(
            "--out {}: cannot write the report: {e} (choose a writable file path)",
            out.display()
        ))
    })
}

async fn artifact_get(client: &ClientOpts, what: &str, out: &Path) -> Result<i32, CliError> {
    let mut c = connect(client).await?;
    let digest = match parse_digest(what) {
        Ok(d) => d,
        Err(_) => {
            let camp = c
                .get(pb::GetCampaignRequest {
                    campaign_id: what.to_string(),
                })
                .await
                .map_err(|s| {
                    status_error(
                        &format!("artifact get {what}: neither a digest nor a campaign id"),
                        s,
                    )
                })?
                .into_inner();
            let student = camp
                .rounds
                .iter()
                .rev()
                .find_map(|r| r.artifacts.get("student").cloned())
                .ok_or_else(|| CliError::input(format!("campaign {what} has no student yet")))?;
            parse_digest(&student).map_err(|e| CliError::other(e.to_string()))?
        }
    };
    println!("{}", fetch_artifact(&mut c, &digest, out).await?);
    Ok(0)
}

/// Downloads an artifact (`sha256:<hex>` or the hex) into `out`: a directory artifact becomes
/// its files, a file artifact a file named by its digest. Returns a one-line summary.
pub async fn fetch_artifact(
    c: &mut CampaignClient,
    reference: &str,
    out: &Path,
) -> Result<String, CliError> {
    let digest = parse_digest(reference).map_err(|e| CliError::input(e.to_string()))?;
    std::fs::create_dir_all(out)
        .map_err(|e| CliError::input(format!("--out {}: {e}", out.display())))?;
    let blob = out.join(format!(".{digest}.download"));
    download(c, &digest, &blob).await?;
    let bytes =
        std::fs::read(&blob).map_err(|e| CliError::other(format!("{}: {e}", blob.display())))?;
    if let Some(m) = DirManifest::parse(&bytes) {
        for f in &m.files {
            let dest =
                artifact::safe_join(out, &f.path).map_err(|e| CliError::other(e.to_string()))?;
            download(c, &f.digest, &dest).await?;
        }
        let _ = std::fs::remove_file(&blob);
        Ok(format!(
            "{} ({} files) -> {}",
            digest,
            m.files.len(),
            out.display()
        ))
    } else {
        let dest = out.join(&digest);
        std::fs::rename(&blob, &dest)
            .map_err(|e| CliError::other(format!("{}: {e}", dest.display())))?;
        Ok(format!("{} -> {}", digest, dest.display()))
    }
}

async fn download(c: &mut CampaignClient, digest: &str, dest: &Path) -> Result<(), CliError> {
    let stream = c
        .get_artifact(pb::GetArtifactRequest {
            digest: digest.to_string(),
        })
        .await
        .map_err(|s| status_error(&format!("artifact {digest}"), s))?
        .into_inner();
    artifact::receive_to_file(stream, dest, Some(digest))
        .await
        .map_err(|e| CliError::other(format!("artifact {digest}: {}", error_chain(&e))))?;
    Ok(())
}
