//! Chat templates: where a model's template comes from (one resolution function, never a guess)
//! and rendering it exactly as transformers' `apply_chat_template(..., tokenize=False)` does.
//!
//! Resolution order ([`resolve`]): the user's template file (`worker serve --chat-template`, a
//! spec's `chat_template`), else the model's own: `chat_template.jinja` plus
//! `additional_chat_templates/*.jinja` (what transformers 5 writes; when present they replace
//! the ones in the config, as transformers loads them), else `tokenizer_config.json`
//! `chat_template` as a string or a list of `{name, template}`, else a GGUF file's
//! `tokenizer.chat_template`. A named template is chosen with `--chat-template-name`; otherwise
//! `default`. No template is an error that says what was looked at and how to give one.
//!
//! Rendering matches transformers' sandbox: `trim_blocks`, `lstrip_blocks`, loop controls,
//! `raise_exception`, `strftime_now` (local time), its `tojson` (`json.dumps` with
//! `ensure_ascii=False`, no HTML escaping, `indent` / `separators` / `sort_keys`), Python string
//! and dict methods, `{% generation %}` blocks, `tools` and `documents` as `none`, and the
//! tokenizer's named special tokens (`bos_token`, `eos_token`, ..., from strings or AddedToken
//! dicts) as variables.

use distillery_proto::py_json::{float_repr, json_string};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use minijinja::value::{Kwargs, ValueKind};
use minijinja::{Environment, ErrorKind, Value};
use serde::Serialize;

/// A ChatML template: what the tiny test models carry in their `tokenizer_config.json`.
pub const CHATML_TEMPLATE: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// What `--chat-template` says when a model has none (also the fix in [`ChatTemplateError`]).
const HOW_TO_GIVE_ONE: &str = "give one: `worker serve --chat-template FILE` (a Jinja file like a model's chat_template.jinja), or in a campaign spec `chat_template = \"FILE\"` under [teacher] (answers of the teacher and its students) or [evaluation.judge] (a local judge)";

/// Why no template could be chosen, compiled or rendered.
#[derive(Debug, thiserror::Error)]
pub enum ChatTemplateError {
    #[error("{model}: has no chat template (looked at {}); a model without one cannot be chatted with: {HOW_TO_GIVE_ONE}", looked_at.join(", "))]
    Missing {
        model: String,
        looked_at: Vec<String>,
    },
    #[error("{model}: has no chat template named {name:?} (it has {}); pick one of those with --chat-template-name", names(available))]
    UnknownName {
        model: String,
        name: String,
        available: Vec<String>,
    },
    #[error("{model}: has several chat templates ({}) and none is called \"default\"; pick one with --chat-template-name", names(available))]
    NoDefault {
        model: String,
        available: Vec<String>,
    },
    #[error("--chat-template {file} and --chat-template-name {name:?} exclude each other: a template file has no named templates; drop one")]
    FileAndName { file: String, name: String },
    #[error("{path}: {source} (check the path of the chat template)")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Invalid { path: String, message: String },
    #[error("chat template from {source_name} does not compile: {message}; fix the template or give another with --chat-template FILE")]
    Syntax {
        source_name: String,
        message: String,
    },
    #[error("the chat template (from {source_name}) refused these messages: {message}")]
    Render {
        source_name: String,
        message: String,
    },
}

fn names(v: &[String]) -> String {
    v.iter()
        .map(|n| format!("{n:?}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// One chat message as templates see it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn new(role: &str, content: impl Into<String>) -> Message {
        Message {
            role: role.to_string(),
            content: content.into(),
        }
    }
}

/// The user's say in which template is used.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TemplateChoice {
    /// A Jinja file that replaces the model's template (`--chat-template`).
    pub file: Option<PathBuf>,
    /// One of the model's named templates (`--chat-template-name`); `default` otherwise.
    pub name: Option<String>,
}

/// Named special tokens a template can read (`bos_token`, `eos_token`, `unk_token`, ...), as
/// transformers' `special_tokens_map` holds them.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SpecialTokens(pub BTreeMap<String, String>);

impl SpecialTokens {
    /// The special tokens of a `tokenizer_config.json` the way transformers 5 reads them: the
    /// named ones, every other `*_token` key holding a token, and the `extra_special_tokens`
    /// dict; a token is a string or an AddedToken dict (`{"content": ...}`). Without
    /// `added_tokens_decoder` (an old save), `special_tokens_map.json` overrides, as there.
    pub fn from_config(config: &serde_json::Value, legacy_map: Option<&serde_json::Value>) -> Self {
        let mut out = BTreeMap::new();
        let take = |obj: &serde_json::Map<String, serde_json::Value>, out: &mut BTreeMap<_, _>| {
            for (k, v) in obj {
                if k.ends_with("_token") {
                    if let Some(t) = token_text(v) {
                        out.insert(k.clone(), t);
                    }
                }
            }
            if let Some(extra) = obj.get("extra_special_tokens").and_then(|e| e.as_object()) {
                for (k, v) in extra {
                    if let Some(t) = token_text(v) {
                        out.insert(k.clone(), t);
                    }
                }
            }
        };
        if let Some(obj) = config.as_object() {
            take(obj, &mut out);
        }
        if config.get("added_tokens_decoder").is_none() {
            if let Some(obj) = legacy_map.and_then(|m| m.as_object()) {
                take(obj, &mut out);
            }
        }
        SpecialTokens(out)
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        self.0.get(name).map(String::as_str)
    }
}

/// A token as tokenizer configs spell it: a string or an AddedToken dict.
fn token_text(v: &serde_json::Value) -> Option<String> {
    match v {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(o) => o.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}

/// A model's own templates (by name; a single one is `default`), where they came from, and what
/// was looked at to find them.
#[derive(Debug, Clone, Default)]
pub struct ModelTemplates {
    /// The model, as errors name it.
    pub model: String,
    /// name -> (template, where it was read).
    pub templates: BTreeMap<String, (String, String)>,
    pub specials: SpecialTokens,
    pub looked_at: Vec<String>,
}

fn read_json(path: &Path) -> Result<Option<serde_json::Value>, ChatTemplateError> {
    match std::fs::read_to_string(path) {
        Ok(text) => serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| ChatTemplateError::Invalid {
                path: path.display().to_string(),
                message: format!("is not valid JSON: {e}"),
            }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(ChatTemplateError::Read {
            path: path.display().to_string(),
            source,
        }),
    }
}

fn read_text(path: &Path) -> Result<String, ChatTemplateError> {
    std::fs::read_to_string(path).map_err(|source| ChatTemplateError::Read {
        path: path.display().to_string(),
        source,
    })
}

impl ModelTemplates {
    /// What a Hugging Face directory holds, read as transformers reads it.
    pub fn from_dir(dir: &Path) -> Result<Self, ChatTemplateError> {
        let mut t = ModelTemplates {
            model: dir.display().to_string(),
            ..Default::default()
        };
        let jinja = dir.join("chat_template.jinja");
        t.looked_at.push("chat_template.jinja".into());
        if jinja.is_file() {
            t.templates.insert(
                "default".into(),
                (read_text(&jinja)?, jinja.display().to_string()),
            );
        }
        let extra = dir.join("additional_chat_templates");
        t.looked_at.push("additional_chat_templates/*.jinja".into());
        if extra.is_dir() {
            let entries = std::fs::read_dir(&extra).map_err(|source| ChatTemplateError::Read {
                path: extra.display().to_string(),
                source,
            })?;
            for entry in entries.flatten() {
                let p = entry.path();
                let Some(name) = p
                    .file_name()
                    .and_then(|n| n.to_str())
                    .and_then(|n| n.strip_suffix(".jinja"))
                else {
                    continue;
                };
                t.templates
                    .insert(name.to_string(), (read_text(&p)?, p.display().to_string()));
            }
        }
        let config_path = dir.join("tokenizer_config.json");
        t.looked_at
            .push("tokenizer_config.json `chat_template`".into());
        let config = read_json(&config_path)?.unwrap_or_default();
        let legacy = read_json(&dir.join("special_tokens_map.json"))?;
        t.specials = SpecialTokens::from_config(&config, legacy.as_ref());
        // Template files, when there are any, replace the config's templates (as transformers).
        if t.templates.is_empty() {
            let at = |what: &str| format!("{} {what}", config_path.display());
            match config.get("chat_template") {
                None | Some(serde_json::Value::Null) => {}
                Some(serde_json::Value::String(s)) => {
                    t.templates
                        .insert("default".into(), (s.clone(), at("`chat_template`")));
                }
                Some(serde_json::Value::Array(list)) => {
                    for (i, item) in list.iter().enumerate() {
                        let (Some(name), Some(template)) = (
                            item.get("name").and_then(|n| n.as_str()),
                            item.get("template").and_then(|n| n.as_str()),
                        ) else {
                            return Err(ChatTemplateError::Invalid {
                                path: config_path.display().to_string(),
                                message: format!("chat_template[{i}] must be {{\"name\": ..., \"template\": ...}} with two strings"),
                            });
                        };
                        t.templates.insert(
                            name.to_string(),
                            (template.to_string(), at(&format!("`chat_template` {name:?}"))),
                        );
                    }
                }
                Some(other) => {
                    return Err(ChatTemplateError::Invalid {
                        path: config_path.display().to_string(),
                        message: format!(
                            "chat_template must be a string or a list of {{name, template}}, not {other}"
                        ),
                    })
                }
            }
        }
        Ok(t)
    }

    /// What a GGUF file's metadata holds (`tokenizer.chat_template`, the BOS and EOS tokens).
    pub fn from_gguf(
        path: &Path,
        template: Option<String>,
        bos_token: Option<String>,
        eos_token: Option<String>,
    ) -> Self {
        let mut specials = BTreeMap::new();
        for (k, v) in [("bos_token", bos_token), ("eos_token", eos_token)] {
            if let Some(v) = v {
                specials.insert(k.to_string(), v);
            }
        }
        ModelTemplates {
            model: path.display().to_string(),
            templates: template
                .map(|t| {
                    BTreeMap::from([(
                        "default".to_string(),
                        (t, format!("{} tokenizer.chat_template", path.display())),
                    )])
                })
                .unwrap_or_default(),
            specials: SpecialTokens(specials),
            looked_at: vec!["GGUF tokenizer.chat_template".into()],
        }
    }
}

/// The one place a chat template is chosen: the user's file, else the model's named or default
/// template; none is an error naming what was looked at and how to give one.
pub fn resolve(
    model: &ModelTemplates,
    choice: &TemplateChoice,
) -> Result<ChatTemplate, ChatTemplateError> {
    let available = || model.templates.keys().cloned().collect::<Vec<_>>();
    let (text, source) =
        match (&choice.file, &choice.name) {
            (Some(file), Some(name)) => {
                return Err(ChatTemplateError::FileAndName {
                    file: file.display().to_string(),
                    name: name.clone(),
                })
            }
            (Some(file), None) => (read_text(file)?, file.display().to_string()),
            (None, Some(name)) => model.templates.get(name).cloned().ok_or_else(|| {
                ChatTemplateError::UnknownName {
                    model: model.model.clone(),
                    name: name.clone(),
                    available: available(),
                }
            })?,
            (None, None) if model.templates.is_empty() => {
                return Err(ChatTemplateError::Missing {
                    model: model.model.clone(),
                    looked_at: model.looked_at.clone(),
                })
            }
            (None, None) => model.templates.get("default").cloned().ok_or_else(|| {
                ChatTemplateError::NoDefault {
                    model: model.model.clone(),
                    available: available(),
                }
            })?,
        };
    ChatTemplate::new(&text, &source, model.specials.clone())
}

/// A compiled chat template with the special tokens it sees.
pub struct ChatTemplate {
    env: Environment<'static>,
    /// Where the template was read (for errors and logs).
    pub source: String,
    pub specials: SpecialTokens,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("source", &self.source)
            .field("specials", &self.specials)
            .finish()
    }
}

impl ChatTemplate {
    /// Compiles `text` (read from `source`) in transformers' environment.
    pub fn new(
        text: &str,
        source: &str,
        specials: SpecialTokens,
    ) -> Result<ChatTemplate, ChatTemplateError> {
        let mut env = Environment::new();
        let syntax = minijinja::syntax::SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .map_err(|e| ChatTemplateError::Syntax {
                source_name: source.to_string(),
                message: e.to_string(),
            })?;
        env.set_syntax(syntax);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> Result<Value, minijinja::Error> {
                Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
            },
        );
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", tojson);
        env.add_template_owned("chat", without_generation_tags(text))
            .map_err(|e| ChatTemplateError::Syntax {
                source_name: source.to_string(),
                message: describe(&e),
            })?;
        Ok(ChatTemplate {
            env,
            source: source.to_string(),
            specials,
        })
    }

    /// `apply_chat_template(messages, tokenize=False, add_generation_prompt=...)`.
    pub fn render(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
    ) -> Result<String, ChatTemplateError> {
        let fail = |e: minijinja::Error| ChatTemplateError::Render {
            source_name: self.source.clone(),
            message: describe(&e),
        };
        let template = self.env.get_template("chat").map_err(fail)?;
        let ctx = minijinja::context! {
            messages => Value::from(minijinja::value::Serde(messages)),
            tools => Value::from(()),
            documents => Value::from(()),
            add_generation_prompt => add_generation_prompt,
            ..Value::from(minijinja::value::Serde(&self.specials.0))
        };
        template.render(ctx).map_err(fail)
    }

    pub fn bos_token(&self) -> Option<&str> {
        self.specials.get("bos_token")
    }

    pub fn eos_token(&self) -> Option<&str> {
        self.specials.get("eos_token")
    }
}

/// An error's own words (what `raise_exception` was given, or what went wrong) and its line.
fn describe(e: &minijinja::Error) -> String {
    let mut m = e
        .detail()
        .map_or_else(|| e.kind().to_string(), str::to_string);
    if e.kind() != ErrorKind::InvalidOperation {
        m = format!("{}: {m}", e.kind());
    }
    if let Some(line) = e.line() {
        let _ = write!(m, " (template line {line})");
    }
    m
}

/// transformers' `{% generation %}...{% endgeneration %}` marks the assistant's tokens for
/// training masks and renders its body unchanged: here it becomes an `if true` block with the
/// same whitespace control.
fn without_generation_tags(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find("{%") {
        out.push_str(&rest[..start]);
        let tag = &rest[start..];
        // The closing `%}` is searched after the opening `{%` (in `{%}` they overlap).
        let Some(end) = tag[2..].find("%}").map(|e| e + 2) else {
            out.push_str(tag);
            return out;
        };
        let inner = &tag[2..end];
        let (left, body) = match inner.strip_prefix(['-', '+']) {
            Some(b) => (&inner[..1], b),
            None => ("", inner),
        };
        let (body, right) = match body.strip_suffix(['-', '+']) {
            Some(b) => (b, &body[body.len() - 1..]),
            None => (body, ""),
        };
        match body.trim() {
            "generation" => {
                let _ = write!(out, "{{%{left} if true {right}%}}");
            }
            "endgeneration" => {
                let _ = write!(out, "{{%{left} endif {right}%}}");
            }
            _ => out.push_str(&tag[..end + 2]),
        }
        rest = &tag[end + 2..];
    }
    out.push_str(rest);
    out
}

/// `strftime_now(format)`: the local time as Python's `datetime.now().strftime(format)`.
fn strftime_now(format: String) -> Result<Value, minijinja::Error> {
    use chrono::format::{Item, StrftimeItems};
    let items: Vec<Item> = StrftimeItems::new(&format).collect();
    if items.iter().any(|i| matches!(i, Item::Error)) {
        return Err(minijinja::Error::new(
            ErrorKind::InvalidOperation,
            format!("strftime_now: {format:?} is not a strftime format"),
        ));
    }
    let mut s = String::new();
    write!(
        s,
        "{}",
        chrono::Local::now().format_with_items(items.into_iter())
    )
    .map_err(|_| {
        minijinja::Error::new(
            ErrorKind::InvalidOperation,
            format!("strftime_now: cannot format {format:?}"),
        )
    })?;
    Ok(Value::from(s))
}

/// How `json.dumps` lays out JSON.
struct JsonStyle {
    ensure_ascii: bool,
    indent: Option<String>,
    item_sep: String,
    key_sep: String,
    sort_keys: bool,
}

/// transformers' `tojson`: `json.dumps(x, ensure_ascii=False, indent=None, separators=None,
/// sort_keys=False)` (the first two also positional).
fn tojson(
    value: Value,
    ensure_ascii: Option<Value>,
    indent: Option<Value>,
    kwargs: Kwargs,
) -> Result<Value, minijinja::Error> {
    let arg = |pos: Option<Value>, name: &str| -> Result<Option<Value>, minijinja::Error> {
        Ok(match kwargs.get::<Option<Value>>(name)? {
            Some(v) => Some(v),
            None => pos,
        })
    };
    let ensure_ascii = arg(ensure_ascii, "ensure_ascii")?.is_some_and(|v| v.is_true());
    let indent = match arg(indent, "indent")? {
        None => None,
        Some(v) if v.is_none() => None,
        Some(v) => Some(match v.as_str() {
            Some(s) => s.to_string(),
            None => " ".repeat(v.as_usize().unwrap_or(0)),
        }),
    };
    let (mut item_sep, mut key_sep) = if indent.is_some() {
        (",".to_string(), ": ".to_string())
    } else {
        (", ".to_string(), ": ".to_string())
    };
    if let Some(seps) = arg(None, "separators")?.filter(|v| !v.is_none()) {
        let parts: Vec<Value> = seps.try_iter()?.collect();
        match parts.as_slice() {
            [a, b] if a.as_str().is_some() && b.as_str().is_some() => {
                item_sep = a.as_str().unwrap_or_default().to_string();
                key_sep = b.as_str().unwrap_or_default().to_string();
            }
            _ => {
                return Err(minijinja::Error::new(
                    ErrorKind::InvalidOperation,
                    "tojson: separators must be a pair of strings",
                ))
            }
        }
    }
    let sort_keys = arg(None, "sort_keys")?.is_some_and(|v| v.is_true());
    kwargs.assert_all_used()?;
    let style = JsonStyle {
        ensure_ascii,
        indent,
        item_sep,
        key_sep,
        sort_keys,
    };
    let mut out = String::new();
    write_json(&value, &style, 0, &mut out)?;
    Ok(Value::from(out))
}

fn not_serializable(kind: impl std::fmt::Display) -> minijinja::Error {
    minijinja::Error::new(
        ErrorKind::InvalidOperation,
        format!("tojson: a value of type {kind} is not JSON serializable"),
    )
}

fn write_json(
    v: &Value,
    style: &JsonStyle,
    level: usize,
    out: &mut String,
) -> Result<(), minijinja::Error> {
    match v.kind() {
        ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if v.is_true() { "true" } else { "false" }),
        ValueKind::Number if v.is_integer() => {
            let _ = write!(out, "{v}");
        }
        ValueKind::Number => {
            let f = f64::try_from(v.clone())?;
            out.push_str(&float_repr(f));
        }
        ValueKind::String => json_string(out, v.as_str().unwrap_or_default(), style.ensure_ascii),
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<Value> = v.try_iter()?.collect();
            write_container(out, style, level, '[', ']', items.len(), |i, out| {
                write_json(&items[i], style, level + 1, out)
            })?;
        }
        ValueKind::Map => {
            let mut entries: Vec<(String, Value)> = Vec::new();
            for key in v.try_iter()? {
                let item = v.get_item(&key)?;
                entries.push((json_key(&key)?, item));
            }
            if style.sort_keys {
                entries.sort_by(|a, b| a.0.cmp(&b.0));
            }
            write_container(out, style, level, '{', '}', entries.len(), |i, out| {
                json_string(out, &entries[i].0, style.ensure_ascii);
                out.push_str(&style.key_sep);
                write_json(&entries[i].1, style, level + 1, out)
            })?;
        }
        other => return Err(not_serializable(other)),
    }
    Ok(())
}

/// `[a, b]` / `{...}` with `json.dumps`' separators and indentation.
fn write_container(
    out: &mut String,
    style: &JsonStyle,
    level: usize,
    open: char,
    close: char,
    n: usize,
    mut item: impl FnMut(usize, &mut String) -> Result<(), minijinja::Error>,
) -> Result<(), minijinja::Error> {
    out.push(open);
    if n == 0 {
        out.push(close);
        return Ok(());
    }
    for i in 0..n {
        if i > 0 {
            out.push_str(&style.item_sep);
        }
        if let Some(ind) = &style.indent {
            out.push('\n');
            out.push_str(&ind.repeat(level + 1));
        }
        item(i, out)?;
    }
    if let Some(ind) = &style.indent {
        out.push('\n');
        out.push_str(&ind.repeat(level));
    }
    out.push(close);
    Ok(())
}

/// A dict key as `json.dumps` writes it: strings as they are, numbers, booleans and None
/// spelled the JSON way.
fn json_key(k: &Value) -> Result<String, minijinja::Error> {
    Ok(match k.kind() {
        ValueKind::String => k.as_str().unwrap_or_default().to_string(),
        ValueKind::Bool => (if k.is_true() { "true" } else { "false" }).to_string(),
        ValueKind::None => "null".to_string(),
        ValueKind::Number if k.is_integer() => k.to_string(),
        ValueKind::Number => float_repr(f64::try_from(k.clone())?),
        other => {
            return Err(minijinja::Error::new(
                ErrorKind::InvalidOperation,
                format!("tojson: keys must be str, int, float, bool or None, not {other}"),
            ))
        }
    })
}

#[cfg(test)]
mod tests;
