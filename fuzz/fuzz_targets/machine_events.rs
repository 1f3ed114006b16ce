#![no_main]

libfuzzer_sys::fuzz_target!(
    |data: &[u8]| distillery_coordinator::fuzz_targets::machine_events(data)
);
