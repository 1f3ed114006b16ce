//! The `worker` command line (DESIGN.md §4).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use crate::agent::{Agent, AgentConfig};
use crate::devices::parse_devices;
use clap::{Parser, Subcommand};
use distillery_proto::client::Target;

#[derive(Parser)]
#[command(
    name = "worker",
    version,
    about = "Distillery worker: joins a coordinator and runs its tasks"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Write a tiny random Llama with a byte-level tokenizer as a Hugging Face directory.
    MakeTestModel {
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 64)]
        hidden: usize,
        #[arg(long, default_value_t = 256)]
        intermediate: usize,
        #[arg(long, default_value_t = 2)]
        layers: usize,
        #[arg(long, default_value_t = 4)]
        heads: usize,
        #[arg(long, default_value_t = 2)]
        kv_heads: usize,
        /// Tie the output head to the embeddings.
        #[arg(long)]
        tied: bool,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Architecture: llama, mistral, qwen2, qwen3 or gemma3_text.
        #[arg(long, default_value = "llama", value_parser = parse_arch)]
        arch: crate::model::config::Arch,
        /// Also write it as a GGUF file (F32 tensors, as llama.cpp's converter lays them out).
        #[arg(long)]
        gguf: Option<PathBuf>,
    },
    /// Serve a model over an OpenAI-compatible API (/v1/chat/completions, /v1/completions,
    /// /v1/models).
    Serve {
        /// Hugging Face directory or .gguf file.
        #[arg(long)]
        model: PathBuf,
        #[arg(long, default_value = "127.0.0.1:8000")]
        listen: std::net::SocketAddr,
        /// The model id clients name (default: the file or folder name).
        #[arg(long)]
        name: Option<String>,
        /// Another id the model answers to, listed by /v1/models (repeatable).
        #[arg(long = "served-model-name")]
        served_model_names: Vec<String>,
        /// A Jinja chat template file to use instead of the model's own (chat_template.jinja,
        /// tokenizer_config.json, GGUF tokenizer.chat_template); needed for a model without one.
        #[arg(long)]
        chat_template: Option<PathBuf>,
        /// One of the model's named chat templates (default: "default").
        #[arg(long)]
        chat_template_name: Option<String>,
        /// `auto`: requests that leave out temperature, top_p, top_k, min_p,
        /// repetition_penalty or max_tokens get generation_config.json's values (as vLLM);
        /// `none`: OpenAI's defaults. Its eos_token_id ends answers either way.
        #[arg(long, default_value = "auto", value_parser = ["auto", "none"])]
        generation_config: String,
    },
    /// Convert any loadable model (Hugging Face directory or .gguf) to a Hugging Face directory.
    Convert {
        input: PathBuf,
        #[arg(long)]
        out: PathBuf,
    },
    /// Measure a model on a text file (JSON lines with a "text" field, or plain text): perplexity
    /// and bits per byte as the campaign's Evaluate phase measures them, and with `--teacher`
    /// the mean per-token KL(teacher ‖ student) at temperature 1. Prints one JSON object.
    Eval {
        /// Hugging Face directory.
        #[arg(long)]
        model: PathBuf,
        /// A teacher directory (same tokenizer) for the KL.
        #[arg(long)]
        teacher: Option<PathBuf>,
        #[arg(long)]
        data: PathBuf,
        /// Context window (perplexity advances by half a window; the KL uses whole windows).
        #[arg(long, default_value_t = 512)]
        seq_len: usize,
        /// Tokens measured at most (whole documents up to this count).
        #[arg(long, default_value_t = 32768)]
        max_tokens: usize,
    },
    /// GPU checks (builds with the cuda feature): NCCL all-reduce, a distillation step, throughput.
    GpuCheck {
        #[arg(long, default_value = "cuda:0")]
        device: String,
    },
    /// Join a coordinator and run tasks until stopped.
    Join {
        #[arg(long, env = "DISTILLERY_ADDR")]
        coordinator: String,
        /// cpu, cpu:N or cuda:0,1,...
        #[arg(long, default_value = "cpu")]
        devices: String,
        #[arg(long, default_value = "./distillery-work")]
        work_dir: PathBuf,
        /// Bearer token (role `worker`).
        #[arg(long, env = "DISTILLERY_TOKEN", hide_env_values = true)]
        token: Option<String>,
        /// CA certificate (PEM) for an https coordinator.
        #[arg(long, alias = "tls-ca", env = "DISTILLERY_CA_CERT")]
        ca_cert: Option<String>,
        /// Client certificate (PEM) for a coordinator started with `--tls-client-ca`
        /// (mutual TLS; in addition to the worker token).
        #[arg(long, requires = "tls_key")]
        tls_cert: Option<String>,
        /// The client certificate's private key (PEM).
        #[arg(long, requires = "tls_cert")]
        tls_key: Option<String>,
        /// Labels, `key=value`, repeatable.
        #[arg(long = "label")]
        labels: Vec<String>,
    },
}

/// Runs the `worker` command line; returns the exit code.
pub fn main() -> i32 {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
                let _ = e.print();
                return 0;
            }
            let first = distillery_proto::client::one_line_usage_error(&e.render().to_string());
            eprintln!("worker: {first} (see `worker --help`)");
            return 2;
        }
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
    let code = match cli.command {
        Command::Serve {
            model,
            listen,
            name,
            served_model_names,
            chat_template,
            chat_template_name,
            generation_config,
        } => {
            let opts = crate::serve::ServeOptions {
                name,
                aliases: served_model_names,
                chat_template: crate::model::chat::TemplateChoice {
                    file: chat_template,
                    name: chat_template_name,
                },
                generation_defaults: generation_config == "auto",
            };
            let served = match crate::serve::load_served(&model, opts) {
                Ok(m) => m,
                Err(e) => {
                    eprintln!("worker: serve: {e}");
                    return 2;
                }
            };
            let rt = match tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("worker: cannot start the async runtime: {e}");
                    return 1;
                }
            };
            match rt.block_on(crate::serve::serve(served, listen)) {
                Ok(()) => 0,
                Err(e) => {
                    eprintln!("worker: serve: cannot listen on {listen}: {e}");
                    1
                }
            }
        }
        Command::GpuCheck { device } => crate::gpu_check::run(&device),
        Command::Eval {
            model,
            teacher,
            data,
            seq_len,
            max_tokens,
        } => match eval(&model, teacher.as_deref(), &data, seq_len, max_tokens) {
            Ok(v) => {
                println!("{v}");
                0
            }
            Err(e) => {
                eprintln!("worker: eval: {e}");
                2
            }
        },
        Command::Convert { input, out } => {
            written("convert", &out, crate::model::io::convert(&input, &out))
        }
        Command::MakeTestModel {
            out,
            hidden,
            intermediate,
            layers,
            heads,
            kv_heads,
            tied,
            seed,
            arch,
            gguf,
        } => {
            let spec = crate::model::test_model::TestModelSpec {
                arch,
                hidden_size: hidden,
                intermediate_size: intermediate,
                num_layers: layers,
                num_heads: heads,
                num_kv_heads: kv_heads,
                tie_word_embeddings: tied,
                seed,
            };
            let result = crate::model::test_model::write_test_model(&out, &spec).and_then(|m| {
                if let Some(g) = &gguf {
                    let tok = crate::model::tokenizer::byte_level().map_err(|e| {
                        crate::model::io::ModelIoError::Invalid {
                            path: g.display().to_string(),
                            message: e.to_string(),
                        }
                    })?;
                    crate::model::gguf::write_gguf(
                        &m,
                        g,
                        &|_, _| candle_core::quantized::GgmlDType::F32,
                        Some(&tok),
                        Some(crate::model::chat::CHATML_TEMPLATE),
                    )?;
                }
                Ok(m)
            });
            written("make-test-model", &out, result)
        }
        Command::Join {
            coordinator,
            devices,
            work_dir,
            token,
            ca_cert,
            tls_cert,
            tls_key,
            labels,
        } => {
            let devices = match parse_devices(&devices) {
                Ok(d) => d,
                Err(e) => {
                    eprintln!("worker: {e}");
                    return 2;
                }
            };
            let mut label_map = BTreeMap::new();
            for l in labels {
                let Some((k, v)) = l.split_once('=') else {
                    eprintln!("worker: --label {l:?}: expected key=value");
                    return 2;
                };
                label_map.insert(k.to_string(), v.to_string());
            }
            let cfg = AgentConfig {
                target: Target {
                    url: coordinator,
                    token,
                    ca_cert,
                    client_identity: tls_cert.zip(tls_key),
                },
                devices,
                work_dir,
                host: hostname::get()
                    .map(|h| h.to_string_lossy().into_owned())
                    .unwrap_or_else(|_| "unknown".into()),
                labels: label_map,
            };
            join(cfg)
        }
    };
    code
}

fn join(cfg: AgentConfig) -> i32 {
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("worker: cannot start the async runtime: {e}");
            return 1;
        }
    };
    rt.block_on(async move {
        let agent = match Agent::new(cfg, Arc::new(crate::tasks::builtin())) {
            Ok(a) => a,
            Err(e) => {
                eprintln!("worker: {e:#}");
                return 2;
            }
        };
        tokio::select! {
            r = agent.run() => match r {
                Ok(()) => 0,
                Err(e) => {
                    eprintln!("worker: {e:#}");
                    1
                }
            },
            _ = tokio::signal::ctrl_c() => 0,
        }
    })
}

/// Prints where a model was written and its size, or the error; the exit code.
fn written(
    what: &str,
    out: &std::path::Path,
    r: Result<crate::model::Llama, crate::model::io::ModelIoError>,
) -> i32 {
    match r {
        Ok(m) => {
            println!("{} ({} parameters)", out.display(), m.num_params());
            0
        }
        Err(e) => {
            eprintln!("worker: {what}: {e}");
            2
        }
    }
}

fn parse_arch(s: &str) -> Result<crate::model::config::Arch, String> {
    crate::model::config::Arch::from_model_type(s).ok_or_else(|| {
        format!("{s:?} is not an architecture: use llama, mistral, qwen2, qwen3 or gemma3_text")
    })
}

/// `worker eval`: the JSON object it prints.
fn eval(
    model: &std::path::Path,
    teacher: Option<&std::path::Path>,
    data: &std::path::Path,
    seq_len: usize,
    max_tokens: usize,
) -> Result<serde_json::Value, String> {
    use crate::model::{io, perplexity, tokenizer};
    let cpu = candle_core::Device::Cpu;
    let load = |p: &std::path::Path| -> Result<_, String> {
        if !p.is_dir() {
            return Err(format!(
                "{} is not a model directory (convert a .gguf file with `worker convert FILE --out DIR`)",
                p.display()
            ));
        }
        let m = io::load_dir(p, candle_core::DType::F32, &cpu).map_err(|e| e.to_string())?;
        let t = tokenizer::load(&p.join("tokenizer.json"))
            .map_err(|e| format!("{}: {e}", p.display()))?;
        Ok((m, t))
    };
    let (m, tok) = load(model)?;
    let docs = crate::data::read_documents(data).map_err(|e| format!("{}: {e}", data.display()))?;
    let eos = crate::tasks::common::eos_id(&m);
    let (ids, bytes) = crate::data::encode_for_eval(&tok, &docs, eos, max_tokens)?;
    if ids.len() < 2 {
        return Err(format!("{} has no text to measure", data.display()));
    }
    let window = seq_len.clamp(2, m.config.max_position_embeddings.max(2));
    let p =
        perplexity::perplexity(&m, &ids, bytes, window, window / 2).map_err(|e| e.to_string())?;
    let mut out = serde_json::json!({
        "model": model.display().to_string(),
        "params": m.num_params(),
        "tokens": p.tokens,
        "perplexity": p.perplexity(),
        "bits_per_byte": p.bits_per_byte(),
    });
    if let Some(t) = teacher {
        let (tm, ttok) = load(t)?;
        if tm.config.vocab_size != m.config.vocab_size
            || tokenizer::encode(&ttok, "Tokenizers, compared.", false).ok()
                != tokenizer::encode(&tok, "Tokenizers, compared.", false).ok()
        {
            return Err(format!(
                "{} and {} do not share a tokenizer: the KL needs the same vocabulary",
                t.display(),
                model.display()
            ));
        }
        let kl = perplexity::mean_kl(&m, &tm, &ids, window, 4).map_err(|e| e.to_string())?;
        out["kd_loss"] = serde_json::json!(kl);
        out["teacher"] = serde_json::json!(t.display().to_string());
    }
    Ok(out)
}
