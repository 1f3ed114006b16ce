//! Entry points for the fuzzers (`fuzz/` with libFuzzer, and the seeded mutation run in
//! `tests/tests/fuzz.rs`): the campaign spec a client submits and the event sequences every RPC
//! turns into. Each takes arbitrary bytes and must return without panicking or hanging; the
//! machine target also fails (panics, which the fuzzers report) when an invariant breaks.

use std::path::Path;

use crate::machine::sequence::{Harness, Op};
use crate::spec::{self, FileChecks};

/// Campaign spec TOML as `SubmitRequest.spec_toml` reaches the server (files not looked at),
/// then the machine's wire validation of what it parsed to.
pub fn spec_toml(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(s) = spec::parse(text, Path::new("/spec-dir"), FileChecks::None) {
        let _ = spec::validate_wire(&s);
    }
}

/// The bytes decoded into a sequence of events (valid, stale, forged, malformed) applied to an
/// empty state, every invariant checked after each.
pub fn machine_events(data: &[u8]) {
    // Long inputs only repeat what short ones do, more slowly.
    let ops = Op::decode(&data[..data.len().min(3 * 400)]);
    if let Err(e) = Harness::run(&ops) {
        panic!("state machine invariant broken: {e}");
    }
}

/// A teacher as `submit` reads its shape: the bytes as `config.json` text and as a `.gguf` file,
/// through `source_model` (the worker's config parser, the GGUF import, the parameter count).
pub fn teacher_shape(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = crate::source_model::from_hf_config(Path::new("config.json"), text);
    }
    if let Some(p) = distillery_proto::fuzz_targets::scratch_file("teacher.gguf", data) {
        let _ = crate::source_model::read_shape(&p);
    }
}
