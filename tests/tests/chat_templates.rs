//! Chat templates against transformers itself. Needs the tests' Python (`.ci/run` creates
//! `.venv-parity`; elsewhere set DISTILLERY_PYTHON or the test says why it skipped): directories
//! that transformers' `save_pretrained` writes (chat_template.jinja, additional_chat_templates/,
//! the legacy named list) render here exactly the string its `apply_chat_template(...,
//! tokenize=False)` renders, and tokenize to the same ids; `worker serve` serves such a
//! directory with that prompt.

use std::path::Path;

use distillery_tests::python::{python_or_skip, python_script};
use distillery_tests::ServeProc;
use distillery_worker::model::chat::{resolve, Message, ModelTemplates, TemplateChoice};
use distillery_worker::model::test_model::{write_test_model, TestModelSpec};
use distillery_worker::model::tokenizer;
use serde_json::Value;

fn transformers_cases(py: &Path, tokenizer_json: &Path, out: &Path) -> Value {
    let run = std::process::Command::new(py)
        .arg(python_script("chat_templates.py"))
        .arg(tokenizer_json)
        .arg(out)
        .env("TRANSFORMERS_OFFLINE", "1")
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .expect("run python");
    assert!(
        run.status.success(),
        "chat_templates.py failed: {}",
        String::from_utf8_lossy(&run.stderr)
    );
    serde_json::from_slice(&run.stdout).expect("chat_templates.py prints JSON")
}

fn messages(v: &Value) -> Vec<Message> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|m| Message::new(m["role"].as_str().unwrap(), m["content"].as_str().unwrap()))
        .collect()
}

#[test]
fn templates_saved_by_transformers_render_and_tokenize_as_transformers_does() {
    let Some(py) =
        python_or_skip("templates_saved_by_transformers_render_and_tokenize_as_transformers_does")
    else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    write_test_model(&model, &TestModelSpec::default()).unwrap();
    let saved = dir.path().join("saved");
    std::fs::create_dir_all(&saved).unwrap();
    let got = transformers_cases(&py, &model.join("tokenizer.json"), &saved);
    let cases = got["cases"].as_array().unwrap();
    assert!(cases.len() >= 40, "{} cases", cases.len());
    assert!(saved.join("smollm/chat_template.jinja").is_file());
    assert!(saved
        .join("named/additional_chat_templates/rag.jinja")
        .is_file());
    let (mut rendered, mut refused) = (0, 0);
    for case in cases {
        let d = saved.join(case["dir"].as_str().unwrap());
        let templates = ModelTemplates::from_dir(&d).unwrap();
        let choice = TemplateChoice {
            file: None,
            name: case["template_name"].as_str().map(str::to_string),
        };
        let t = resolve(&templates, &choice).unwrap();
        let out = t.render(
            &messages(&case["messages"]),
            case["add_generation_prompt"].as_bool().unwrap(),
        );
        match case["text"].as_str() {
            Some(text) => {
                let out = out.unwrap_or_else(|e| panic!("{case}: {e}"));
                assert_eq!(out, text, "{case}");
                let tok = tokenizer::load(&d.join("tokenizer.json")).unwrap();
                let ids: Vec<u32> = case["ids"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|i| i.as_u64().unwrap() as u32)
                    .collect();
                assert_eq!(tokenizer::encode(&tok, &out, false).unwrap(), ids, "{case}");
                rendered += 1;
            }
            None => {
                let e = out.unwrap_err().to_string();
                let why = case["error"].as_str().unwrap();
                assert!(e.contains(why), "{e} should say {why:?}");
                refused += 1;
            }
        }
    }
    assert!(
        rendered > 30 && refused >= 4,
        "{rendered} rendered, {refused} refused"
    );

    // The model with the tokenizer files transformers 5 wrote (its template in
    // chat_template.jinja, none in tokenizer_config.json) is served with that template.
    for f in [
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
    ] {
        std::fs::copy(saved.join("smollm").join(f), model.join(f)).unwrap();
    }
    let tc: Value = serde_json::from_str(
        &std::fs::read_to_string(model.join("tokenizer_config.json")).unwrap(),
    )
    .unwrap();
    assert!(tc.get("chat_template").is_none(), "{tc}");
    let case = cases
        .iter()
        .find(|c| c["dir"] == "smollm" && c["add_generation_prompt"] == true)
        .unwrap();
    let server = ServeProc::start(&model, &["--name", "smol"]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let v: Value = rt.block_on(async {
        reqwest::Client::new()
            .post(format!("{}/chat/completions", server.base()))
            .json(&serde_json::json!({"messages": case["messages"], "max_tokens": 1}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    });
    assert_eq!(
        v["usage"]["prompt_tokens"].as_u64().unwrap() as usize,
        case["ids"].as_array().unwrap().len(),
        "{v}"
    );
}
