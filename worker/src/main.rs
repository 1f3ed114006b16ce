// mimalloc keeps and reuses large blocks (see `tune_allocator`).
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    distillery_worker::tune_allocator();
    std::process::exit(distillery_worker::cli::main());
}
