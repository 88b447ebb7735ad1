//! The `e2a-relay` binary: see the `e2a_relay` library.

fn main() -> std::process::ExitCode {
    e2a_runtime::main::<e2a_relay::Config, _, _>(e2a_relay::serve)
}
