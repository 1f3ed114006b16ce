use super::*;
use crate::model::generate::generate;
use crate::model::test_model::{write_test_model, TestModelSpec};

fn served(opts: ServeOptions) -> (tempfile::TempDir, ServedModel) {
    let dir = tempfile::tempdir().unwrap();
    let spec = TestModelSpec {
        seed: 3,
        ..Default::default()
    };
    write_test_model(dir.path(), &spec).unwrap();
    let m = load_served(dir.path(), opts).unwrap();
    (dir, m)
}

fn greedy(max_tokens: usize) -> SamplingParams {
    SamplingParams {
        max_tokens,
        ..Default::default()
    }
}

#[test]
fn a_test_model_serves_with_its_template_and_stop_tokens() {
    let (_dir, m) = served(ServeOptions {
        name: Some("tiny".into()),
        aliases: vec!["tiny".into(), "alias".into(), "alias".into()],
        ..Default::default()
    });
    assert_eq!(m.ids().collect::<Vec<_>>(), ["tiny", "alias"]);
    // "</s>" from the tokenizer and 257 from generation_config.json: one stop token.
    assert_eq!(m.stop_tokens, [257]);
    assert!(
        m.chat
            .source
            .ends_with("tokenizer_config.json `chat_template`"),
        "{}",
        m.chat.source
    );
    assert!(m.defaults.is_none());
    let ids = m.chat_prompt(&[Message::new("user", "hi")]).unwrap();
    let text = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n";
    assert_eq!(ids, tokenizer::encode(&m.tokenizer, text, false).unwrap());
}

#[test]
fn a_model_without_a_chat_template_is_refused_unless_one_is_given() {
    let dir = tempfile::tempdir().unwrap();
    write_test_model(dir.path(), &TestModelSpec::default()).unwrap();
    let tc = dir.path().join("tokenizer_config.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&tc).unwrap()).unwrap();
    v.as_object_mut().unwrap().remove("chat_template");
    std::fs::write(&tc, v.to_string()).unwrap();
    let e = load_served(dir.path(), ServeOptions::default())
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("has no chat template") && e.contains("--chat-template FILE"),
        "{e}"
    );
    let file = dir.path().join("mine.jinja");
    std::fs::write(&file, "{% for m in messages %}{{ m.content }}{% endfor %}").unwrap();
    let given = ServeOptions {
        chat_template: TemplateChoice {
            file: Some(file),
            name: None,
        },
        ..Default::default()
    };
    let m = load_served(dir.path(), given.clone()).unwrap();
    assert_eq!(
        m.chat_prompt(&[Message::new("user", "ab")]).unwrap(),
        [97, 98]
    );
    // generation_config.json fields that would change the answer refuse the model.
    std::fs::write(
        dir.path().join("generation_config.json"),
        r#"{"eos_token_id": 257, "num_beams": 4}"#,
    )
    .unwrap();
    let strict = ServeOptions {
        generation_defaults: true,
        ..given.clone()
    };
    let e = load_served(dir.path(), strict.clone())
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("num_beams") && e.contains("beam search"), "{e}");
    // Campaign answers (greedy, the file's sampling fields unused) still load.
    let m = load_served(dir.path(), given).unwrap();
    assert_eq!(m.stop_tokens, [257]);
}

#[test]
fn deltas_add_up_to_the_answer_and_stop_strings_cut_it() {
    let (_dir, m) = served(ServeOptions::default());
    let prompt = m.chat_prompt(&[Message::new("user", "Hello")]).unwrap();
    let whole = m.answer(&prompt, greedy(40), &[]).unwrap();
    assert_eq!(whole.prompt_tokens, prompt.len());
    let mut pieces = Vec::new();
    let o = m
        .generate_text(&prompt, greedy(40), &[], |piece, _| {
            pieces.push(piece.to_string());
            true
        })
        .unwrap();
    assert_eq!(pieces.concat(), whole.text);
    assert_eq!(o.completion_tokens, whole.completion_tokens);
    assert!(whole.text.chars().count() >= 4, "{:?}", whole.text);
    // A stop string taken from the middle of the answer cuts it there.
    let chars: Vec<char> = whole.text.chars().collect();
    let stop: String = chars[2..4].iter().collect();
    let cut = m
        .answer(&prompt, greedy(40), std::slice::from_ref(&stop))
        .unwrap();
    assert_eq!(cut.finish, Finish::Stop);
    assert_eq!(cut.text, whole.text[..whole.text.find(&stop).unwrap()]);
    assert!(cut.completion_tokens < whole.completion_tokens || whole.finish == Finish::Stop);
    // Logprobs come with every token of the answer, bytes and all.
    let mut p = greedy(40);
    p.logprobs = Some(2);
    let lp = m.answer(&prompt, p, &[]).unwrap();
    assert_eq!(lp.text, whole.text);
    let n_content = whole.completion_tokens - usize::from(whole.finish == Finish::Stop);
    assert_eq!(lp.logprobs.len(), n_content);
    // Their bytes spell the answer, special tokens (which the text skips) included.
    let bytes: Vec<u8> = lp.logprobs.iter().flat_map(|t| t.bytes.clone()).collect();
    let g = generate(&m.model, &prompt, &{
        let mut p = greedy(40);
        p.stop = m.stop_tokens.clone();
        p
    })
    .unwrap();
    let content = &g.tokens[..n_content];
    assert_eq!(
        String::from_utf8_lossy(&bytes),
        m.tokenizer.decode(content, false).unwrap()
    );
    for t in &lp.logprobs {
        assert_eq!(t.top.len(), 2);
        assert_eq!(t.top[0].2, t.logprob, "greedy picks the most likely token");
        assert!(t.logprob <= 0.0);
    }
    // The receiver can end it.
    let mut calls = 0;
    let o = m
        .generate_text(&prompt, greedy(40), &[], |_, _| {
            calls += 1;
            calls < 2
        })
        .unwrap();
    assert_eq!(o.finish, Finish::Cancelled);
    // Too long for the context: the error says what to change.
    let e = m.answer(&prompt, greedy(5000), &[]).unwrap_err();
    assert!(
        e.contains("context is 2048") && e.contains("max_tokens"),
        "{e}"
    );
}

#[test]
fn the_same_seed_samples_the_same_answer() {
    let (_dir, m) = served(ServeOptions::default());
    let prompt = m.chat_prompt(&[Message::new("user", "Hello")]).unwrap();
    let p = |seed| SamplingParams {
        max_tokens: 30,
        temperature: 1.0,
        seed,
        ..Default::default()
    };
    let a = m.answer(&prompt, p(5), &[]).unwrap();
    assert_eq!(a, m.answer(&prompt, p(5), &[]).unwrap());
    let others: Vec<String> = (6..10)
        .map(|s| m.answer(&prompt, p(s), &[]).unwrap().text)
        .collect();
    assert!(others.iter().any(|t| *t != a.text));
}

#[test]
fn a_gguf_file_serves_with_its_own_template_or_is_refused_without_one() {
    let dir = tempfile::tempdir().unwrap();
    let m = crate::model::test_model::test_model(
        &TestModelSpec::default(),
        candle_core::DType::F32,
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let tok = tokenizer::byte_level().unwrap();
    let f32 = |_: &str, _: &[usize]| candle_core::quantized::GgmlDType::F32;
    let with = dir.path().join("with.gguf");
    crate::model::gguf::write_gguf(&m, &with, &f32, Some(&tok), Some(chat::CHATML_TEMPLATE))
        .unwrap();
    let s = load_served(&with, ServeOptions::default()).unwrap();
    assert!(
        s.chat.source.ends_with("tokenizer.chat_template"),
        "{}",
        s.chat.source
    );
    assert_eq!(
        s.chat_prompt(&[Message::new("user", "hi")]).unwrap().len(),
        "S".len() + "user\nhi".len() + "E\nS".len() + "assistant\n".len()
    );
    let without = dir.path().join("without.gguf");
    crate::model::gguf::write_gguf(&m, &without, &f32, Some(&tok), None).unwrap();
    let e = load_served(&without, ServeOptions::default())
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("without.gguf")
            && e.contains("GGUF tokenizer.chat_template")
            && e.contains("--chat-template FILE"),
        "{e}"
    );
}
