fn main() -> std::process::ExitCode {
    imgate::cli::main()
}
