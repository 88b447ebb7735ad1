//! The `e2a-deliverer` binary: see the `e2a_deliverer` library.

fn main() -> std::process::ExitCode {
    e2a_runtime::main::<e2a_deliverer::Config, _, _>(e2a_deliverer::serve)
}
