//! The cluster manager directly: start failures carry the server log and a
//! hint, a taken port is replaced when allowed, clusters re-attach by directory.

use std::net::TcpListener;
use std::path::PathBuf;

use e2a_testkit::cluster::{
    Cluster, ClusterError, ClusterOptions, ClusterStatus, PgBinaries, PortChoice, Reaper,
};

fn scratch_dir(name: &str) -> PathBuf {
    let base = e2a_testkit::target_dir().unwrap_or_else(std::env::temp_dir);
    base.join("e2a-testpg")
        .join(format!("{}-cluster-test-{name}", std::process::id()))
}

/// A new, stopped throwaway cluster, removed when the reaper drops.
fn new_cluster(name: &str) -> (Cluster, Reaper) {
    let bins = PgBinaries::find().expect("PostgreSQL server binaries");
    let dir = scratch_dir(name);
    let reaper = Reaper::spawn(&bins, &dir).expect("reaper");
    let cluster = Cluster::init(bins, &dir, &ClusterOptions::throwaway()).expect("initdb");
    (cluster, reaper)
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
