//! Per-test databases: migrated, isolated from each other, dropped on `Drop`.

use e2a_testkit::{TEST_DB_PREFIX, TestDb, template_db};

async fn database_exists(probe: &TestDb, name: &str) -> bool {
    let client = probe.client().await;
    let row = client
        .query_one(
            "SELECT count(*) FROM pg_database WHERE datname = $1",
            &[&name],
        )
        .await
        .expect("query pg_database");
    row.get::<_, i64>(0) == 1
}

async fn has_table(db: &TestDb, table: &str) -> bool {
    let client = db.client().await;
    let row = client
        .query_one("SELECT to_regclass($1) IS NOT NULL", &[&table])
        .await
        .expect("query to_regclass");
    row.get(0)
}

#[tokio::test]
async fn two_databases_are_isolated() {
    let a = TestDb::new().await;
    let b = TestDb::new().await;
    assert_ne!(a.name(), b.name());
    assert_ne!(a.url(), b.url());

    a.client()
        .await
        .batch_execute("CREATE TABLE only_in_a (id int); INSERT INTO only_in_a VALUES (1)")
        .await
        .expect("create table in a");

    assert!(has_table(&a, "only_in_a").await);
    assert!(
        !has_table(&b, "only_in_a").await,
        "a table created in one database leaked into another"
    );
}

#[tokio::test]
async fn new_database_is_migrated_and_empty_one_is_not() {
    let migrated = TestDb::new().await;
    let empty = TestDb::empty().await;
    assert!(
        has_table(&migrated, e2a_store::migrate::HISTORY_TABLE).await,
        "TestDb::new() must be cloned from the migrated template"
    );
    assert!(!has_table(&empty, e2a_store::migrate::HISTORY_TABLE).await);

    // The empty database migrates like a production database would.
    let mut client = empty.client().await;
    e2a_store::migrate::run(&mut client, e2a_store::migrate::MigrationMode::Auto)
        .await
        .expect("migrating the empty database");
    assert!(has_table(&empty, e2a_store::migrate::HISTORY_TABLE).await);
}

#[tokio::test]
async fn database_is_dropped_after_drop() {
    let probe = TestDb::new().await;
    let db = TestDb::new().await;
    let name = db.name().to_owned();
    // An open connection must not prevent the drop.
    let client = db.client().await;
    client.simple_query("SELECT 1").await.expect("select 1");
    assert!(database_exists(&probe, &name).await);

    drop(db);

    assert!(
        !database_exists(&probe, &name).await,
        "{name} still exists after Drop"
    );
    assert!(client.simple_query("SELECT 1").await.is_err());
    // The template survives and is still clonable.
    assert!(database_exists(&probe, template_db()).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_databases_can_be_created_concurrently() {
    let tasks: Vec<_> = (0..8).map(|_| tokio::spawn(TestDb::new())).collect();
    let mut dbs = Vec::new();
    for task in tasks {
        dbs.push(task.await.expect("TestDb::new() panicked"));
    }
    let mut names: Vec<&str> = dbs.iter().map(TestDb::name).collect();
    names.sort_unstable();
    names.dedup();
    assert_eq!(names.len(), 8);
}

#[tokio::test]
async fn template_is_named_after_the_schema_and_complete() {
    let probe = TestDb::new().await;
    let template = template_db();
    assert!(template.starts_with("e2a_tpl_"), "{template}");
    assert!(template.len() <= 63, "{template}");
    assert!(database_exists(&probe, template).await);
    assert!(!database_exists(&probe, &format!("{template}_building")).await);

    // The template says which migrations it holds.
    let client = probe.client().await;
    let comment: Option<String> = client
        .query_one(
            "SELECT shobj_description(oid, 'pg_database') FROM pg_database WHERE datname = $1",
            &[&template],
        )
        .await
        .expect("read the template's comment")
        .get(0);
    let comment = comment.unwrap_or_default();
    for label in e2a_store::migrate::embedded_names() {
        assert!(comment.contains(&label), "{label} missing from {comment:?}");
    }
}

#[tokio::test]
async fn database_names_carry_a_host_tag_and_the_pid() {
    let db = TestDb::new().await;
    let rest = db
        .name()
        .strip_prefix(TEST_DB_PREFIX)
        .unwrap_or_else(|| panic!("{} lacks the prefix", db.name()));
    let parts: Vec<&str> = rest.split('_').collect();
    assert_eq!(parts.len(), 3, "{}", db.name());
    assert_eq!(parts[0].len(), 8, "{}", db.name());
    assert!(
        parts[0]
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    );
    assert_eq!(parts[1], std::process::id().to_string());
    assert!(db.name().len() <= 63);
}
