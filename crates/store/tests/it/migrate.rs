//! Migration modes and the cross-process lock.

use e2a_store::{
    Store, StoreConfig,
    migrate::{self, MigrateError, MigrationMode},
};
use e2a_testkit::TestDb;

fn store_for(db: &TestDb) -> Store {
    Store::new(&StoreConfig::new(db.url())).unwrap()
}

#[tokio::test]
async fn auto_applies_everything_once_then_nothing() {
    let db = TestDb::empty().await;
    let store = store_for(&db);
    let first = store.migrate(MigrationMode::Auto).await.unwrap();
    assert_eq!(first.applied, migrate::embedded_names());
    let second = store.migrate(MigrationMode::Auto).await.unwrap();
    assert!(second.applied.is_empty());
    store
        .migrate(MigrationMode::Verify)
        .await
        .expect("verify after auto");
}

#[tokio::test]
async fn verify_on_an_unmigrated_database_names_every_pending_migration() {
    let db = TestDb::empty().await;
    let err = store_for(&db)
        .migrate(MigrationMode::Verify)
        .await
        .unwrap_err();
    let MigrateError::Pending(pending) = &err else {
        panic!("expected Pending, got {err:?}")
    };
    assert_eq!(pending, &migrate::embedded_names());
    let message = err.to_string();
    assert!(message.contains("V1__accounts"), "{message}");
    // Verify changed nothing.
    let client = db.client().await;
    let exists: bool = client
        .query_one("SELECT to_regclass('users') IS NOT NULL", &[])
        .await
        .unwrap()
        .get(0);
    assert!(!exists);
}

#[tokio::test]
async fn skip_touches_nothing() {
    let db = TestDb::empty().await;
    let report = store_for(&db).migrate(MigrationMode::Skip).await.unwrap();
    assert!(report.applied.is_empty());
    let client = db.client().await;
    let exists: bool = client
        .query_one(
            "SELECT to_regclass($1) IS NOT NULL",
            &[&migrate::HISTORY_TABLE],
        )
        .await
        .unwrap()
        .get(0);
    assert!(!exists);
}

#[tokio::test]
async fn unknown_applied_migrations_are_refused_by_name() {
    let db = TestDb::new().await;
    let client = db.client().await;
    client
        .execute(
            &format!(
                "INSERT INTO {} (version, name, applied_on, checksum) VALUES (999, 'from_the_future', '', '1')",
                migrate::HISTORY_TABLE
            ),
            &[],
        )
        .await
        .unwrap();
    let store = store_for(&db);
    for mode in [MigrationMode::Auto, MigrationMode::Verify] {
        let err = store.migrate(mode).await.unwrap_err();
        assert!(
            matches!(&err, MigrateError::Unknown(v) if v == &["V999__from_the_future".to_owned()]),
            "{err:?}"
        );
    }
}

#[tokio::test]
async fn concurrent_migrations_against_an_empty_database_both_succeed() {
    // Without the advisory lock both runners would try to create the same
    // tables and one would fail; with it, one applies and the other finds
    // nothing pending.
    let db = TestDb::empty().await;
    let (a, b) = (store_for(&db), store_for(&db));
    let (ra, rb) = tokio::join!(
        a.migrate(MigrationMode::Auto),
        b.migrate(MigrationMode::Auto)
    );
    let (ra, rb) = (ra.expect("first migrator"), rb.expect("second migrator"));
    let mut counts = [ra.applied.len(), rb.applied.len()];
    counts.sort();
    assert_eq!(counts, [0, migrate::embedded_names().len()]);
}

#[tokio::test]
async fn the_lock_serialises_a_migrator_behind_a_holder() {
    // Hold the lock from another session: the migrator must wait, then run.
    let db = TestDb::empty().await;
    let holder = db.client().await;
    holder
        .execute(
            "SELECT pg_advisory_lock($1)",
            &[&migrate::MIGRATION_LOCK_KEY],
        )
        .await
        .unwrap();
    let store = store_for(&db);
    let task = tokio::spawn(async move { store.migrate(MigrationMode::Auto).await });
    // Wait until the migrator is blocked on the lock (visible in pg_locks).
    super::until_blocked(
        &holder,
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted",
        "the migrator",
    )
    .await;
    assert!(!task.is_finished());
    holder
        .execute(
            "SELECT pg_advisory_unlock($1)",
            &[&migrate::MIGRATION_LOCK_KEY],
        )
        .await
        .unwrap();
    let report = task.await.unwrap().unwrap();
    assert_eq!(report.applied.len(), migrate::embedded_names().len());
}
