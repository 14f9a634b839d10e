fn main() {
    std::process::exit(mmfuser_convert::cli::main());
}
