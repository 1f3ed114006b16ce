//! The stable-toolchain fuzzer the test suite runs (`tests/tests/fuzz.rs`): seeded mutations
//! of the seed corpora under `fuzz/seeds/<target>/` (the ones libFuzzer starts from), fed to the
//! same `fuzz_targets` entry functions. Deterministic for a seed, so a failure is reproduced by
//! rerunning with the seed it prints.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// SplitMix64: small, seedable, good enough to pick mutations.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n > 0`).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
}

/// Values that break length and count fields: zero, one, sign bits, all ones, just past 32 bits.
const BOUNDARY: [u64; 12] = [
    0,
    1,
    0x7f,
    0x80,
    0xff,
    0xffff,
    0x7fff_ffff,
    0x8000_0000,
    0xffff_ffff,
    0x1_0000_0000,
    i64::MAX as u64,
    u64::MAX,
];

/// Numbers as text formats spell them, for replacing a run of digits.
const NUMBERS: [&str; 12] = [
    "0",
    "-1",
    "1",
    "4294967296",
    "18446744073709551615",
    "18446744073709551616",
    "-9223372036854775809",
    "1e309",
    "-0.0",
    "NaN",
    "1.5",
    "99999999999999999999999999",
];

/// Tokens that matter to the parsers (JSON, TOML, judge verdicts, GGUF magic).
const TOKENS: [&str; 20] = [
    "{", "}", "[", "]", "\"", ",", ":", "=", "\n", "[[", "]]", "[[A]]", "[[B>>A]]", "Rating: ",
    "null", "true", "GGUF", "\\u0000", "\u{2581}", "{{",
];

/// One random mutation of `data` (bit flips, bytes set, inserted or deleted, a chunk repeated
/// or dropped, a boundary integer written over a length field, a number or token replaced,
/// splicing with another seed).
pub fn mutate_once(rng: &mut Rng, data: &mut Vec<u8>, seeds: &[Vec<u8>]) {
    let len = data.len();
    match rng.below(11) {
        0 if len > 0 => {
            let i = rng.below(len);
            data[i] ^= 1 << rng.below(8);
        }
        1 if len > 0 => {
            let i = rng.below(len);
            data[i] = rng.next_u64() as u8;
        }
        2 => {
            let i = rng.below(len + 1);
            data.insert(i, rng.next_u64() as u8);
        }
        3 if len > 0 => {
            let i = rng.below(len);
            let n = 1 + rng.below((len - i).min(16));
            data.drain(i..i + n);
        }
        4 if len > 0 => {
            // Repeat a chunk (grows counts of repeated structures).
            let i = rng.below(len);
            let n = 1 + rng.below((len - i).min(64));
            let chunk = data[i..i + n].to_vec();
            let at = rng.below(len + 1);
            data.splice(at..at, chunk);
        }
        5 if len >= 8 => {
            // A boundary integer over a little-endian field of 1, 2, 4 or 8 bytes.
            let width = [1usize, 2, 4, 8][rng.below(4)];
            let i = rng.below(len - width + 1);
            let v = BOUNDARY[rng.below(BOUNDARY.len())];
            let v = if rng.below(4) == 0 {
                v.wrapping_sub(1)
            } else {
                v
            };
            data[i..i + width].copy_from_slice(&v.to_le_bytes()[..width]);
        }
        6 => {
            // Replace a run of ASCII digits with a number that breaks things.
            let digits: Vec<usize> = (0..len).filter(|&i| data[i].is_ascii_digit()).collect();
            if digits.is_empty() {
                return;
            }
            let start = digits[rng.below(digits.len())];
            let end = (start..len)
                .find(|&i| !data[i].is_ascii_digit())
                .unwrap_or(len);
            let n = NUMBERS[rng.below(NUMBERS.len())].as_bytes();
            data.splice(start..end, n.iter().copied());
        }
        7 => {
            let t = TOKENS[rng.below(TOKENS.len())].as_bytes();
            let at = rng.below(len + 1);
            data.splice(at..at, t.iter().copied());
        }
        8 if !seeds.is_empty() => {
            // Splice: our head, another seed's tail.
            let other = &seeds[rng.below(seeds.len())];
            let cut = rng.below(len + 1);
            let from = rng.below(other.len() + 1);
            data.truncate(cut);
            data.extend_from_slice(&other[from..]);
        }
        9 if len > 1 => {
            // Truncate (a file cut short).
            data.truncate(rng.below(len));
        }
        _ => {
            let i = rng.below(len + 1);
            data.insert(i, 0);
        }
    }
}

/// A failing input, with what it takes to reproduce it.
#[derive(Debug)]
pub struct Failure {
    pub target: String,
    pub seed: u64,
    pub iteration: usize,
    pub message: String,
    pub input_hex: String,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} panicked on input {} of seed {}: {}\n  input (hex): {}\n  reproduce: DISTILLERY_FUZZ_SEED={} cargo test -p distillery-tests --test fuzz {}",
            self.target, self.iteration, self.seed, self.message, self.input_hex, self.seed, self.target
        )
    }
}

/// What a run did.
#[derive(Debug)]
pub struct Report {
    pub inputs: usize,
    pub failures: Vec<Failure>,
    pub slowest: Duration,
}

/// Every file under `dir` (none when it does not exist), sorted by name.
pub fn read_dir_files(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out: Vec<(PathBuf, Vec<u8>)> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.path().is_file())
        .filter_map(|e| Some((e.path(), std::fs::read(e.path()).ok()?)))
        .collect();
    out.sort();
    out
}

fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".into())
}

/// Runs `target` on every seed, then on `inputs` mutations of them (1 to 4 stacked mutations
/// each, inputs capped at `max_len` bytes), catching every panic; stops after 5 failures.
pub fn run(
    name: &str,
    target: fn(&[u8]),
    seeds: &[Vec<u8>],
    inputs: usize,
    seed: u64,
    max_len: usize,
) -> Report {
    let mut rng = Rng::new(seed);
    let mut failures = Vec::new();
    let mut slowest = Duration::ZERO;
    let mut one = |i: usize, input: &[u8], failures: &mut Vec<Failure>| {
        let t = Instant::now();
        if let Err(p) = catch_unwind(AssertUnwindSafe(|| target(input))) {
            failures.push(Failure {
                target: name.to_string(),
                seed,
                iteration: i,
                message: panic_message(p.as_ref()),
                input_hex: hex(input),
            });
        }
        slowest = slowest.max(t.elapsed());
    };
    for (i, s) in seeds.iter().enumerate() {
        one(i, s, &mut failures);
    }
    let base: Vec<Vec<u8>> = if seeds.is_empty() {
        vec![Vec::new()]
    } else {
        seeds.to_vec()
    };
    let mut ran = seeds.len();
    for i in 0..inputs {
        ran += 1;
        let mut data = base[rng.below(base.len())].clone();
        for _ in 0..1 + rng.below(4) {
            mutate_once(&mut rng, &mut data, &base);
        }
        data.truncate(max_len);
        one(seeds.len() + i, &data, &mut failures);
        if failures.len() >= 5 {
            break;
        }
    }
    Report {
        inputs: ran,
        failures,
        slowest,
    }
}

/// Lower-case hex of `b`.
pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Bytes from lower-case hex (`None` if it is not hex).
pub fn unhex(s: &str) -> Option<Vec<u8>> {
    let s = s.trim();
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}
