//! The `e2a-api` binary: see the `e2a_api` library.

fn main() -> std::process::ExitCode {
    e2a_runtime::main::<e2a_api::Config, _, _>(e2a_api::serve)
}
