// The demo runs workers in-process: mimalloc keeps large blocks for reuse (see
// `distillery_worker::tune_allocator`).
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    distillery_worker::tune_allocator();
    std::process::exit(distillery_coordinator::cli::main());
}
