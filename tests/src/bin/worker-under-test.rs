//! The `worker` binary's exact entry point, built by this crate so that `cargo test` builds it
//! before the end-to-end tests run (cargo builds only a package's own binaries for its tests).

#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    distillery_worker::tune_allocator();
    std::process::exit(distillery_worker::cli::main());
}
