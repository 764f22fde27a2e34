//! `patd`: personal access token authentication for gateway operators. See
//! [`tower_pat::gateway`] and `patd --help`.

fn main() -> std::process::ExitCode {
    tower_pat::gateway::cli::main()
}
