#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| distillery_proto::fuzz_targets::artifact_manifest(data));
