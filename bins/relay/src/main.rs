//! The `e2a-relay` binary: see the `e2a_relay` library.

// The relay keeps the system allocator (unlike the other services): its
// memory bound under a flood of large messages (docs/operations.md,
// "Memory") is measured with it, and mimalloc's per-thread segments
// raised the peak by a fifth.

fn main() -> std::process::ExitCode {
    e2a_runtime::main::<e2a_relay::Config, _, _>(e2a_relay::serve)
}
