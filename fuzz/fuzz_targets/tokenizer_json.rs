#![no_main]

libfuzzer_sys::fuzz_target!(
    // `tokenizers` panics on some malformed files; `tokenizer::from_bytes` catches that panic
    // and returns an error. libFuzzer's hook would abort on the caught panic, so the default
    // hook is put back: a panic that escapes the target still aborts (libfuzzer-sys catches it
    // at the boundary and aborts), a caught one only prints.
    init: {
        let _ = std::panic::take_hook();
    },
    |data: &[u8]| distillery_worker::fuzz_targets::tokenizer_json(data)
);
