//! The `keyward` binary: parses the command line and calls into the library.

fn main() -> std::process::ExitCode {
    keyward::cli::main()
}
