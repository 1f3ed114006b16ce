//! Entry points for the fuzzers: `fuzz/` (cargo-fuzz, libFuzzer, nightly) and the seeded
//! mutation run in the test suite (`tests/tests/fuzz.rs`, stable) call the same functions.
//! Each takes arbitrary bytes and must return without panicking, hanging or allocating in
//! proportion to a length field the bytes claim; an error is a fine answer.

use std::cell::RefCell;
use std::path::{Path, PathBuf};

use crate::artifact::{parse_digest, safe_join, DirManifest};
use crate::gguf::{self, dequant, GgufFile};

/// Tensors larger than this are not dequantized by the fuzz target (the data of a tensor is
/// bounded by the file's length, but dequantizing megabytes per input only slows the fuzzer).
const DEQUANT_LIMIT: u64 = 1 << 16;

thread_local! {
    static SCRATCH: RefCell<Option<PathBuf>> = const { RefCell::new(None) };
}

/// A folder private to this thread for parsers that read files: in `/dev/shm` where there is
/// one (no disk writes per input), else the temp dir. Created once, reused; callers overwrite
/// the files they need.
pub fn scratch_dir() -> PathBuf {
    SCRATCH.with(|s| {
        s.borrow_mut()
            .get_or_insert_with(|| {
                let base = Path::new("/dev/shm");
                let base = if base.is_dir() {
                    base.to_path_buf()
                } else {
                    std::env::temp_dir()
                };
                static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
                let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let dir = base.join(format!("distillery-fuzz-{}-{n}", std::process::id()));
                // Failing to create it makes every write below fail, which the targets treat
                // as an I/O error: the fuzz run reports nothing then, the seeds' check does.
                let _ = std::fs::create_dir_all(&dir);
                dir
            })
            .clone()
    })
}

/// Writes `data` to `name` (a relative path; its folders are created) in this thread's scratch
/// folder and returns its path.
pub fn scratch_file(name: &str, data: &[u8]) -> Option<PathBuf> {
    let p = scratch_dir().join(name);
    if let Some(parent) = p.parent() {
        std::fs::create_dir_all(parent).ok()?;
    }
    std::fs::write(&p, data).ok()?;
    Some(p)
}

/// A GGUF file: the container (header, every metadata type, tensor infos), the Hugging Face
/// import of its metadata (`gguf::import`: config text, tensor names), and the dequantization
/// of its small tensors.
pub fn gguf_file(data: &[u8]) {
    let Some(p) = scratch_file("model.gguf", data) else {
        return;
    };
    let Ok(f) = GgufFile::open(&p) else {
        return;
    };
    for t in f.tensors() {
        if t.n_bytes <= DEQUANT_LIMIT {
            if let Ok(bytes) = f.tensor_data(t) {
                let _ = dequant::dequantize(t.ggml_type, &bytes, t.n_elements());
            }
        }
    }
    let _ = gguf::import(&f);
}

/// A directory artifact's manifest (what a worker or the coordinator reads before writing the
/// files it names) and every path and digest in it.
pub fn artifact_manifest(data: &[u8]) {
    let Some(m) = DirManifest::parse(data) else {
        return;
    };
    for e in &m.files {
        let _ = safe_join(Path::new("/nonexistent-root"), &e.path);
        let _ = parse_digest(&e.digest);
    }
}
