//! Where things are in the workspace: its root, `target/` and `migrations/`.

use std::path::{Path, PathBuf};

/// The workspace root (the parent of this crate's directory).
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives one level below the workspace root")
        .to_path_buf()
}

/// The cargo target directory (`CARGO_TARGET_DIR`, the one this binary was
/// built into, else `<root>/target`).
pub fn target_dir() -> PathBuf {
    e2a_testkit::target_dir().unwrap_or_else(|| root().join("target"))
}

/// The directory of the SQL migrations embedded by `e2a-store`.
pub fn migrations_dir() -> PathBuf {
    root().join("migrations")
}
