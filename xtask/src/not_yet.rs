//! Placeholder for commands that are declared but not written yet: prints
//! "not yet implemented in xtask" and exits 2.

use std::process::ExitCode;

use crate::CmdResult;

/// Accepts (and ignores) any arguments, so the command line of the future
/// command already parses.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Arguments of the future command (ignored for now).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub args: Vec<String>,
}

/// Reports that `cargo xtask <command>` does not exist yet; always exit code 2.
pub fn run(command: &str, _args: Args) -> CmdResult {
    eprintln!("`cargo xtask {command}` is not yet implemented in xtask");
    Ok(ExitCode::from(2))
}
