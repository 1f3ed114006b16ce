fn main() {
    std::process::exit(distillery_coordinator::cli::main());
}
