fn main() {
    std::process::exit(distillery_worker::cli::main());
}
