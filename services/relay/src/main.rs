//! `orly`: the relay and, by subcommand or by the name it is started under, every orly
//! service and the launcher (see [`orly::cli`]).

fn main() -> std::process::ExitCode {
    orly::cli::main()
}
