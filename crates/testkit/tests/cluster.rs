//! The cluster manager directly: start failures carry the server log and a
//! hint, a taken port is replaced when allowed, clusters re-attach by
//! directory, and clusters land where the server's OS user can reach them.

use std::net::TcpListener;
use std::path::PathBuf;

use e2a_testkit::cluster::{Cluster, ClusterError, ClusterStatus, PgBinaries, PortChoice, Reaper};

/// The per-test directory name: `<pid>-` first, so the testkit sweeps it if
/// this process dies without cleaning up.
fn leaf(name: &str) -> String {
    format!("{}-cluster-test-{name}", std::process::id())
}

/// A new, stopped throwaway cluster, removed when the reaper drops. Placed
/// like the testkit places its own clusters: under the target directory, or
/// under the temp directory when the server's OS user cannot enter the
/// target directory (root with the checkout under `/root` or in a `0700`
/// directory).
fn new_cluster(name: &str) -> (Cluster, Reaper) {
    let bins = PgBinaries::find().expect("PostgreSQL server binaries");
    e2a_testkit::init_throwaway_cluster(&bins, &e2a_testkit::cluster_base_dirs(), &leaf(name))
        .expect("initdb")
}

/// A fresh directory that nobody else can reach, for tests that need one.
fn scratch_dir(name: &str) -> PathBuf {
    let base = e2a_testkit::cluster_base_dirs()
        .into_iter()
        .next()
        .expect("at least the temp directory");
    base.join(leaf(name))
}

/// True when this process runs as root (the server then runs as `postgres`).
fn running_as_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").expect("/proc/self").uid() == 0
}

/// Removes a scratch directory or file when dropped.
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        if std::fs::remove_dir_all(&self.0).is_err() {
            let _ = std::fs::remove_file(&self.0);
        }
    }
}

#[test]
fn a_base_the_server_user_cannot_enter_is_skipped() {
    use std::os::unix::fs::PermissionsExt;
    // What a checkout under /root or in a `mktemp -d` directory looks like
    // from the server's side: the first base sits inside a 0700 directory.
    let private = std::env::temp_dir().join(format!("e2a-private-checkout-{}", std::process::id()));
    let _cleanup = RemoveOnDrop(private.clone());
    std::fs::create_dir_all(&private).expect("mkdir");
    std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o700)).expect("chmod");
    let first = private.join("target").join("e2a-testpg");
    let fallback = std::env::temp_dir().join("e2a-testpg");

    let bins = PgBinaries::find().expect("PostgreSQL server binaries");
    let (mut cluster, _reaper) = e2a_testkit::init_throwaway_cluster(
        &bins,
        &[first.clone(), fallback.clone()],
        &leaf("private"),
    )
    .expect("a usable base");
    let expected = if running_as_root() {
        // `postgres` cannot search the 0700 directory: the fallback is used.
        &fallback
    } else {
        // The server runs as us, so the first base is fine.
        &first
    };
    assert!(
        cluster.data_dir().starts_with(expected),
        "{} is not under {}",
        cluster.data_dir().display(),
        expected.display()
    );
    cluster.start(PortChoice::AnyFree).expect("start");
    assert_eq!(cluster.status().expect("status"), ClusterStatus::Running);
    cluster.stop().expect("stop");
}

#[test]
fn the_error_of_the_last_base_is_reported_when_none_is_usable() {
    // A base below a regular file can never be created.
    let file = std::env::temp_dir().join(format!("e2a-not-a-dir-{}", std::process::id()));
    std::fs::write(&file, b"").expect("write");
    let _cleanup = RemoveOnDrop(file.clone());
    let bins = PgBinaries::find().expect("PostgreSQL server binaries");
    let err = e2a_testkit::init_throwaway_cluster(&bins, &[file.join("base")], &leaf("none"))
        .expect_err("no usable base");
    assert!(matches!(err, ClusterError::Io { .. }), "{err:?}");
    assert!(!file.join("base").exists());
}

#[test]
fn start_on_a_taken_port_fails_with_the_server_log() {
    let (mut cluster, _reaper) = new_cluster("taken");
    let _squatter = TcpListener::bind(("127.0.0.1", cluster.port())).expect("occupy the port");

    let err = cluster
        .start(PortChoice::Same)
        .expect_err("the port is taken");
    assert!(matches!(err, ClusterError::StartFailed { .. }), "{err:?}");
    let message = err.to_string();
    assert!(
        message.contains("could not bind"),
        "no log tail in: {message}"
    );
    assert!(
        message.contains("apt-get install postgresql"),
        "no hint in: {message}"
    );
    assert_eq!(cluster.status().expect("status"), ClusterStatus::Stopped);
}

#[test]
fn any_free_port_replaces_a_taken_one_and_reattaches() {
    let (mut cluster, _reaper) = new_cluster("anyfree");
    let taken = cluster.port();
    let _squatter = TcpListener::bind(("127.0.0.1", taken)).expect("occupy the port");

    cluster.start(PortChoice::AnyFree).expect("start elsewhere");
    assert_ne!(cluster.port(), taken);
    assert_eq!(
        cluster.url("db"),
        format!("postgres://postgres@127.0.0.1:{}/db", cluster.port())
    );

    // Re-attach by directory: same port, running; start is idempotent.
    let mut again = Cluster::open(cluster.data_dir()).expect("open");
    assert_eq!(again.port(), cluster.port());
    assert_eq!(again.status().expect("status"), ClusterStatus::Running);
    again.start(PortChoice::Same).expect("idempotent start");

    again.stop().expect("stop");
    assert_eq!(cluster.status().expect("status"), ClusterStatus::Stopped);
    again.stop().expect("idempotent stop");
}

#[test]
fn open_refuses_a_directory_without_a_cluster() {
    let dir = scratch_dir("empty");
    std::fs::create_dir_all(&dir).expect("mkdir");
    let err = Cluster::open(&dir).expect_err("no cluster there");
    assert!(matches!(err, ClusterError::NotACluster(_)), "{err:?}");
    std::fs::remove_dir_all(&dir).expect("cleanup");
}
