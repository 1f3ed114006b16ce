//! The `coordinator` binary's exact entry point, built by this crate so that `cargo test` builds it
//! before the end-to-end tests run (cargo builds only a package's own binaries for its tests).

fn main() {
    std::process::exit(distillery_coordinator::cli::main());
}
