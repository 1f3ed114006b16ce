use std::path::PathBuf;

use super::*;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/chat_templates")
}

fn messages(v: &serde_json::Value) -> Vec<Message> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|m| Message::new(m["role"].as_str().unwrap(), m["content"].as_str().unwrap()))
        .collect()
}

/// Directories written by transformers 5.24's `save_pretrained` (chat_template.jinja,
/// additional_chat_templates/, the legacy named list) render exactly what its
/// `apply_chat_template(..., tokenize=False)` rendered (recorded by
/// tests/python/chat_templates.py --record; tests/tests/chat_templates.rs reruns it live).
#[test]
fn templates_saved_by_transformers_render_what_transformers_rendered() {
    let expected: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("expected.json")).unwrap())
            .unwrap();
    let recorded_day = expected["today"].as_str().unwrap();
    let today = chrono::Local::now().format("%d %b %Y").to_string();
    let cases = expected["cases"].as_array().unwrap();
    assert!(cases.len() >= 40, "{} cases", cases.len());
    let (mut rendered, mut refused) = (0, 0);
    for case in cases {
        let dir = fixtures().join("saved").join(case["dir"].as_str().unwrap());
        let model = ModelTemplates::from_dir(&dir).unwrap();
        let choice = TemplateChoice {
            file: None,
            name: case["template_name"].as_str().map(str::to_string),
        };
        let t = resolve(&model, &choice).unwrap();
        let got = t.render(
            &messages(&case["messages"]),
            case["add_generation_prompt"].as_bool().unwrap(),
        );
        match case["text"].as_str() {
            Some(text) => {
                let want = text.replace(recorded_day, &today);
                assert_eq!(got.unwrap(), want, "{case}");
                rendered += 1;
            }
            None => {
                let e = got.unwrap_err().to_string();
                let why = case["error"].as_str().unwrap();
                assert!(e.contains(why), "{e} should say {why:?}");
                assert!(e.contains("refused these messages"), "{e}");
                refused += 1;
            }
        }
    }
    assert!(
        rendered > 30 && refused >= 4,
        "{rendered} rendered, {refused} refused"
    );
}

#[test]
fn a_model_without_a_template_is_refused_with_what_was_looked_at_and_the_fix() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("tokenizer_config.json"),
        r#"{"bos_token": "<s>", "eos_token": "</s>"}"#,
    )
    .unwrap();
    let model = ModelTemplates::from_dir(dir.path()).unwrap();
    let e = resolve(&model, &TemplateChoice::default())
        .unwrap_err()
        .to_string();
    for needle in [
        "has no chat template",
        "chat_template.jinja",
        "additional_chat_templates",
        "tokenizer_config.json",
        "--chat-template FILE",
        "[teacher]",
    ] {
        assert!(e.contains(needle), "{e} should mention {needle:?}");
    }
    // A directory without any tokenizer files says the same.
    let empty = tempfile::tempdir().unwrap();
    let model = ModelTemplates::from_dir(empty.path()).unwrap();
    assert!(matches!(
        resolve(&model, &TemplateChoice::default()),
        Err(ChatTemplateError::Missing { .. })
    ));
    // So does a GGUF file without tokenizer.chat_template.
    let g = ModelTemplates::from_gguf(Path::new("m.gguf"), None, Some("<s>".into()), None);
    let e = resolve(&g, &TemplateChoice::default())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("m.gguf") && e.contains("GGUF tokenizer.chat_template"),
        "{e}"
    );
    // A broken config is an error, not "no template".
    std::fs::write(dir.path().join("tokenizer_config.json"), "{oops").unwrap();
    let e = ModelTemplates::from_dir(dir.path())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("tokenizer_config.json") && e.contains("not valid JSON"),
        "{e}"
    );
    std::fs::write(
        dir.path().join("tokenizer_config.json"),
        r#"{"chat_template": 7}"#,
    )
    .unwrap();
    let e = ModelTemplates::from_dir(dir.path())
        .unwrap_err()
        .to_string();
    assert!(e.contains("must be a string or a list"), "{e}");
}

#[test]
fn named_templates_are_chosen_by_name_and_default_otherwise() {
    let dir = tempfile::tempdir().unwrap();
    let config = serde_json::json!({
        "bos_token": {"__type": "AddedToken", "content": "<s>", "lstrip": false},
        "eos_token": "</s>",
        "chat_template": [
            {"name": "default", "template": "D{{ bos_token }}{{ messages[0].content }}"},
            {"name": "tool_use", "template": "T{{ messages[0].content }}"},
        ],
    });
    std::fs::write(dir.path().join("tokenizer_config.json"), config.to_string()).unwrap();
    let model = ModelTemplates::from_dir(dir.path()).unwrap();
    let hi = [Message::new("user", "hi")];
    let pick = |name: Option<&str>| {
        resolve(
            &model,
            &TemplateChoice {
                file: None,
                name: name.map(str::to_string),
            },
        )
    };
    assert_eq!(pick(None).unwrap().render(&hi, true).unwrap(), "D<s>hi");
    assert_eq!(
        pick(Some("tool_use")).unwrap().render(&hi, true).unwrap(),
        "Thi"
    );
    let e = pick(Some("rag")).unwrap_err().to_string();
    assert!(
        e.contains("\"rag\"")
            && e.contains("\"default\", \"tool_use\"")
            && e.contains("--chat-template-name"),
        "{e}"
    );
    // Several templates and no default: the user must pick.
    let config = serde_json::json!({"chat_template": [{"name": "a", "template": "A"}, {"name": "b", "template": "B"}]});
    std::fs::write(dir.path().join("tokenizer_config.json"), config.to_string()).unwrap();
    let model = ModelTemplates::from_dir(dir.path()).unwrap();
    let e = resolve(&model, &TemplateChoice::default())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("none is called \"default\"") && e.contains("\"a\", \"b\""),
        "{e}"
    );
    // A malformed entry names itself.
    let config = serde_json::json!({"chat_template": [{"name": "a"}]});
    std::fs::write(dir.path().join("tokenizer_config.json"), config.to_string()).unwrap();
    let e = ModelTemplates::from_dir(dir.path())
        .unwrap_err()
        .to_string();
    assert!(e.contains("chat_template[0]"), "{e}");
}

#[test]
fn the_users_file_comes_first_and_template_files_replace_the_config() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("tokenizer_config.json"),
        serde_json::json!({"eos_token": "</s>", "chat_template": "config"}).to_string(),
    )
    .unwrap();
    let hi = [Message::new("user", "hi")];
    let render = |choice: &TemplateChoice| {
        let model = ModelTemplates::from_dir(dir.path()).unwrap();
        resolve(&model, choice).unwrap().render(&hi, false).unwrap()
    };
    assert_eq!(render(&TemplateChoice::default()), "config");
    std::fs::write(dir.path().join("chat_template.jinja"), "jinja file\n").unwrap();
    // Jinja drops a template's single trailing newline, as transformers' environment does.
    assert_eq!(render(&TemplateChoice::default()), "jinja file");
    let mine = dir.path().join("mine.jinja");
    std::fs::write(&mine, "mine {{ eos_token }}").unwrap();
    let choice = TemplateChoice {
        file: Some(mine.clone()),
        name: None,
    };
    assert_eq!(render(&choice), "mine </s>");
    let model = ModelTemplates::from_dir(dir.path()).unwrap();
    let both = TemplateChoice {
        file: Some(mine),
        name: Some("default".into()),
    };
    assert!(matches!(
        resolve(&model, &both),
        Err(ChatTemplateError::FileAndName { .. })
    ));
    let missing = TemplateChoice {
        file: Some(dir.path().join("nope.jinja")),
        name: None,
    };
    let e = resolve(&model, &missing).unwrap_err().to_string();
    assert!(e.contains("nope.jinja"), "{e}");
    // A template that does not compile says where it came from.
    std::fs::write(dir.path().join("chat_template.jinja"), "{% for %}").unwrap();
    let model = ModelTemplates::from_dir(dir.path()).unwrap();
    let e = resolve(&model, &TemplateChoice::default())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("chat_template.jinja") && e.contains("does not compile"),
        "{e}"
    );
}

#[test]
fn special_tokens_are_read_as_transformers_reads_them() {
    let config = serde_json::json!({
        "bos_token": {"__type": "AddedToken", "content": "<bos>", "special": true},
        "eos_token": "<eos>",
        "pad_token": null,
        "image_token": "<img>",
        "add_bos_token": true,
        "extra_special_tokens": {"boi_token": "<boi>"},
        "added_tokens_decoder": {},
    });
    let s = SpecialTokens::from_config(&config, None);
    assert_eq!(s.get("bos_token"), Some("<bos>"));
    assert_eq!(s.get("eos_token"), Some("<eos>"));
    assert_eq!(s.get("image_token"), Some("<img>"));
    assert_eq!(s.get("boi_token"), Some("<boi>"));
    assert_eq!(s.get("pad_token"), None);
    assert_eq!(s.get("add_bos_token"), None);
    // special_tokens_map.json counts only for old saves without added_tokens_decoder.
    let legacy = serde_json::json!({"eos_token": {"content": "</s>"}, "unk_token": "<unk>"});
    let s = SpecialTokens::from_config(&config, Some(&legacy));
    assert_eq!(s.get("eos_token"), Some("<eos>"));
    let old = serde_json::json!({"eos_token": "<eos>"});
    let s = SpecialTokens::from_config(&old, Some(&legacy));
    assert_eq!(s.get("eos_token"), Some("</s>"));
    assert_eq!(s.get("unk_token"), Some("<unk>"));
}

#[test]
fn chatml_and_transformers_builtins_render() {
    let msgs = vec![
        Message::new("user", "Hi"),
        Message::new("assistant", "Hello"),
    ];
    let t = ChatTemplate::new(CHATML_TEMPLATE, "test", SpecialTokens::default()).unwrap();
    assert_eq!(
        t.render(&msgs, true).unwrap(),
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello<|im_end|>\n<|im_start|>assistant\n"
    );
    // {% generation %} blocks render their body; whitespace control is kept.
    let g = "{% for m in messages %}{% if m.role == 'assistant' %}{%- generation -%} [{{ m.content }}] {%- endgeneration %}{% else %}{{ m.content }}{% endif %}{% endfor %}";
    let t = ChatTemplate::new(g, "test", SpecialTokens::default()).unwrap();
    assert_eq!(t.render(&msgs, false).unwrap(), "Hi[Hello]");
    // strftime_now formats the local time; a bad format is an error, not a panic.
    let t =
        ChatTemplate::new("{{ strftime_now('%Y') }}", "test", SpecialTokens::default()).unwrap();
    assert_eq!(
        t.render(&msgs, false).unwrap(),
        chrono::Local::now().format("%Y").to_string()
    );
    let t =
        ChatTemplate::new("{{ strftime_now('%Q') }}", "test", SpecialTokens::default()).unwrap();
    assert!(t
        .render(&msgs, false)
        .unwrap_err()
        .to_string()
        .contains("strftime"));
    // tools and documents are none, as transformers passes them (booleans print as Python's).
    let t = ChatTemplate::new(
        "{{ tools is defined }}{{ tools is none }}{{ documents is none }}{{ bos_token is defined }}",
        "test",
        SpecialTokens::default(),
    )
    .unwrap();
    assert_eq!(t.render(&msgs, false).unwrap(), "TrueTrueTrueFalse");
    // Undefined values are not JSON.
    let t = ChatTemplate::new("{{ nothing | tojson }}", "test", SpecialTokens::default()).unwrap();
    assert!(t.render(&msgs, false).is_err());
}

#[test]
fn floats_and_strings_are_written_as_pythons_json_dumps_writes_them() {
    for (f, s) in [
        (0.5, "0.5"),
        (2.0, "2.0"),
        (-3.0, "-3.0"),
        (1e20, "1e+20"),
        (1.5e16, "1.5e+16"),
        (1e15, "1000000000000000.0"),
        (0.0001, "0.0001"),
        (0.00001, "1e-05"),
        (-1.25e-7, "-1.25e-07"),
        (123.456, "123.456"),
        (0.1 + 0.2, "0.30000000000000004"),
        (0.0, "0.0"),
        (f64::INFINITY, "Infinity"),
        (f64::NAN, "NaN"),
    ] {
        assert_eq!(float_repr(f), s, "{f}");
    }
    let mut out = String::new();
    json_string(&mut out, "a\"b\\c\n\u{1}é😀\u{7f}", false);
    assert_eq!(out, "\"a\\\"b\\\\c\\n\\u0001é😀\u{7f}\"");
    let mut out = String::new();
    json_string(&mut out, "é😀\u{7f}", true);
    assert_eq!(out, "\"\\u00e9\\ud83d\\ude00\\u007f\"");
}

#[test]
fn malformed_block_tags_are_template_errors_not_panics() {
    for text in [
        "hi {%} there",
        "{%",
        "{%%}",
        "{%-%}",
        "{%+}",
        "a {% generation",
        "{%}%}",
    ] {
        let r = std::panic::catch_unwind(|| {
            ChatTemplate::new(text, "test", SpecialTokens::default())
                .and_then(|t| t.render(&[Message::new("user", "x")], true))
        });
        assert!(r.is_ok(), "{text:?} panicked");
        assert!(r.unwrap().is_err(), "{text:?} was accepted");
    }
}
