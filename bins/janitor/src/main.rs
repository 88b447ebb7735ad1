//! The `e2a-janitor` binary: see the `e2a_janitor` library.

fn main() -> std::process::ExitCode {
    e2a_runtime::main::<e2a_janitor::Config, _, _>(e2a_janitor::serve)
}
