#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| distillery_worker::fuzz_targets::prune_record(data));
