//! Locating the server binaries, and the hint when they are missing.

use std::ffi::OsString;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use e2a_testkit::cluster::{ClusterError, PgBinaries};

/// A fresh, empty scratch directory for one test.
fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("e2a-testkit-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create scratch dir");
    dir
}

fn fake_tools(bin: &Path, tools: &[&str]) {
    std::fs::create_dir_all(bin).expect("create bin dir");
    for tool in tools {
        let file = bin.join(tool);
        std::fs::write(&file, "#!/bin/sh\nexit 0\n").expect("write fake tool");
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    }
}

#[test]
fn missing_binaries_produce_the_install_hint() {
    let empty = scratch("empty");
    let path = OsString::from(empty.join("bin"));
    let err = PgBinaries::find_in(Some(&path), std::slice::from_ref(&empty), None)
        .expect_err("nothing to find in an empty directory");
    assert!(matches!(err, ClusterError::BinariesNotFound { .. }));
    let message = err.to_string();
    for needle in [
        "initdb",
        "pg_ctl",
        "not found on PATH",
        &format!("{}/*/bin", empty.display()),
        "apt-get install postgresql",
        "E2A_TEST_DATABASE_URL",
    ] {
        assert!(
            message.contains(needle),
            "{needle:?} missing from: {message}"
        );
    }
    std::fs::remove_dir_all(&empty).expect("cleanup");
}

#[test]
fn highest_complete_version_wins_and_path_comes_first() {
    let root = scratch("versions");
    fake_tools(&root.join("9.6/bin"), &["initdb", "pg_ctl"]);
    fake_tools(&root.join("15/bin"), &["initdb", "pg_ctl", "postgres"]);
    fake_tools(&root.join("16/bin"), &["initdb"]); // incomplete: no pg_ctl
    std::fs::create_dir_all(root.join("main/bin")).expect("non-version dir");

    let found = PgBinaries::find_in(None, std::slice::from_ref(&root), None).expect("find");
    assert_eq!(found.bin_dir, root.join("15/bin"));
    assert_eq!(found.initdb(), root.join("15/bin/initdb"));

    // A preferred major (the data directory's PG_VERSION) beats the highest.
    let found = PgBinaries::find_in(None, std::slice::from_ref(&root), Some("9.6")).expect("find");
    assert_eq!(found.bin_dir, root.join("9.6/bin"));

    // PATH beats the version roots.
    let on_path = root.join("onpath");
    fake_tools(&on_path, &["initdb", "pg_ctl"]);
    let path = std::env::join_paths([root.join("nothing-here"), on_path.clone()]).expect("join");
    let found = PgBinaries::find_in(Some(&path), std::slice::from_ref(&root), None).expect("find");
    assert_eq!(found.bin_dir, on_path);

    // Non-executable files do not count.
    let not_exec = root.join("notexec");
    fake_tools(&not_exec, &["initdb", "pg_ctl"]);
    for tool in ["initdb", "pg_ctl"] {
        std::fs::set_permissions(not_exec.join(tool), std::fs::Permissions::from_mode(0o644))
            .expect("chmod");
    }
    let path = OsString::from(&not_exec);
    let err = PgBinaries::find_in(Some(&path), &[], None).expect_err("not executable");
    assert!(err.to_string().contains("apt-get install postgresql"));

    std::fs::remove_dir_all(&root).expect("cleanup");
}
