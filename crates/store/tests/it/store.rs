//! The Store: transactions, retries, availability errors.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU32, Ordering},
    },
    time::{Duration, Instant},
};

use e2a_store::{IsolationLevel, Store, StoreConfig, StoreError};

#[tokio::test]
async fn transaction_commits_or_rolls_back_as_a_unit() {
    let (db, store) = super::store().await;
    let raw = db.client().await;
    raw.batch_execute("CREATE TABLE t (v int)").await.unwrap();
    store
        .transaction(&(), |tx, ()| {
            Box::pin(async move {
                tx.execute("INSERT INTO t VALUES (1)", &[]).await?;
                tx.execute("INSERT INTO t VALUES (2)", &[]).await?;
                Ok(())
            })
        })
        .await
        .unwrap();
    let err = store
        .transaction(&(), |tx, ()| {
            Box::pin(async move {
                tx.execute("INSERT INTO t VALUES (3)", &[]).await?;
                Err::<(), _>(StoreError::Invalid("stop".into()))
            })
        })
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Invalid(_)));
    let n: i64 = raw
        .query_one("SELECT count(*) FROM t", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 2);
}

#[tokio::test]
async fn serialization_failures_are_retried_until_both_commit() {
    let (db, store) = super::store().await;
    db.client()
        .await
        .batch_execute("CREATE TABLE counter (v int); INSERT INTO counter VALUES (0)")
        .await
        .unwrap();
    let attempts = Arc::new(AtomicU32::new(0));
    let barrier = Arc::new(tokio::sync::Barrier::new(2));
    let run = |store: Store, attempts: Arc<AtomicU32>, barrier: Arc<tokio::sync::Barrier>| async move {
        store
            .transaction_with(IsolationLevel::Serializable, &(), move |tx, ()| {
                let first = attempts.fetch_add(1, Ordering::SeqCst) < 2;
                let barrier = barrier.clone();
                Box::pin(async move {
                    let v: i32 = tx.query_one("SELECT v FROM counter", &[]).await?.get(0);
                    if first {
                        // Both first attempts read before either writes: a
                        // guaranteed serialization conflict.
                        barrier.wait().await;
                    }
                    tx.execute("UPDATE counter SET v = $1", &[&(v + 1)]).await?;
                    Ok(())
                })
            })
            .await
    };
    let (a, b) = tokio::join!(
        run(store.clone(), attempts.clone(), barrier.clone()),
        run(store.clone(), attempts.clone(), barrier.clone())
    );
    a.unwrap();
    b.unwrap();
    let v: i32 = db
        .client()
        .await
        .query_one("SELECT v FROM counter", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(v, 2, "no lost update");
    assert!(
        attempts.load(Ordering::SeqCst) >= 3,
        "one transaction was retried"
    );
}

/// Two transactions lock two rows in opposite orders: PostgreSQL aborts one
/// with a deadlock (40P01), the helper runs it again, and both commit.
#[tokio::test]
async fn deadlocks_are_retried_until_both_commit() {
    let (db, store) = super::store().await;
    db.client()
        .await
        .batch_execute(
            "CREATE TABLE pair (k int PRIMARY KEY, v int); INSERT INTO pair VALUES (1, 0), (2, 0)",
        )
        .await
        .unwrap();
    let attempts = Arc::new(AtomicU32::new(0));
    let barrier = Arc::new(tokio::sync::Barrier::new(2));
    let run = |store: Store,
               first: i32,
               attempts: Arc<AtomicU32>,
               barrier: Arc<tokio::sync::Barrier>| async move {
        store
            .transaction(&(), move |tx, ()| {
                let initial = attempts.fetch_add(1, Ordering::SeqCst) < 2;
                let barrier = barrier.clone();
                Box::pin(async move {
                    tx.batch_execute("SET LOCAL deadlock_timeout = '50ms'")
                        .await?;
                    tx.execute("UPDATE pair SET v = v + 1 WHERE k = $1", &[&first])
                        .await?;
                    if initial {
                        // Both hold their first row before either asks for
                        // the other's: a guaranteed deadlock.
                        barrier.wait().await;
                    }
                    tx.execute("UPDATE pair SET v = v + 1 WHERE k = $1", &[&(3 - first)])
                        .await?;
                    Ok(())
                })
            })
            .await
    };
    let (a, b) = tokio::join!(
        run(store.clone(), 1, attempts.clone(), barrier.clone()),
        run(store.clone(), 2, attempts.clone(), barrier.clone())
    );
    a.unwrap();
    b.unwrap();
    let v: i64 = db
        .client()
        .await
        .query_one("SELECT sum(v)::int8 FROM pair", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(v, 4, "both transactions committed once each");
    assert!(
        attempts.load(Ordering::SeqCst) >= 3,
        "the deadlock victim was retried"
    );
}

#[tokio::test]
async fn an_unreachable_database_is_unavailable_within_the_timeouts() {
    // A port nothing listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut config = StoreConfig::new(format!("postgres://postgres@127.0.0.1:{port}/nothing"));
    config.connect_timeout = Duration::from_millis(500);
    config.acquire_timeout = Duration::from_millis(500);
    let store = Store::new(&config).unwrap();
    let err = store.client().await.unwrap_err();
    assert!(err.is_unavailable(), "{err:?}");
    assert!(!err.is_login_refused(), "nobody refused anything: {err:?}");
    let started = Instant::now();
    let err = store
        .wait_until_ready(Duration::from_secs(1))
        .await
        .unwrap_err();
    assert!(err.is_unavailable(), "{err:?}");
    assert!(started.elapsed() < Duration::from_secs(10));
}

/// `url` connecting as `user` (a query parameter overrides the URL's user;
/// in the key=value form the last value wins).
fn with_user(url: &str, user: &str) -> String {
    match (url.contains("://"), url.contains('?')) {
        (true, true) => format!("{url}&user={user}"),
        (true, false) => format!("{url}?user={user}"),
        (false, _) => format!("{url} user={user}"),
    }
}

#[tokio::test]
async fn a_refused_login_is_unavailable_and_ends_start_up_at_once() {
    let (db, _store) = super::store().await;
    for (what, url) in [
        // 28000 on a trust-auth server, 28P01 where passwords are checked.
        ("unknown role", with_user(db.url(), "e2a_no_such_role")),
        // 3D000.
        (
            "unknown database",
            e2a_testkit::with_database(db.url(), "e2a_no_such_database"),
        ),
    ] {
        let store = Store::new(&StoreConfig::new(url)).unwrap();
        // While a service runs this is an outage (HTTP 503, SMTP 451)…
        let err = store.client().await.unwrap_err();
        assert!(err.is_unavailable(), "{what}: {err:?}");
        assert!(err.is_login_refused(), "{what}: {err:?}");
        let code = std::error::Error::source(&err)
            .and_then(|s| s.downcast_ref::<tokio_postgres::Error>())
            .and_then(|e| e.code())
            .map(|c| c.code().to_owned())
            .unwrap_or_default();
        assert!(
            code.starts_with("28") || code == "3D000",
            "{what}: SQLSTATE {code}"
        );
        // …and at start-up a configuration error: no waiting it out.
        let started = Instant::now();
        let err = store
            .wait_until_ready(Duration::from_secs(30))
            .await
            .unwrap_err();
        assert!(err.is_login_refused(), "{what}: {err:?}");
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{what}: returned after {:?}",
            started.elapsed()
        );
    }
}

#[tokio::test]
async fn a_cancelled_statement_is_unavailable() {
    let (_db, store) = super::store().await;
    let c = store.client().await.unwrap();
    c.batch_execute("SET statement_timeout = '50ms'")
        .await
        .unwrap();
    let err = StoreError::from(c.query("SELECT pg_sleep(5)", &[]).await.unwrap_err());
    assert!(err.is_unavailable(), "57014 is retried, not a 500: {err:?}");
    assert!(!err.is_login_refused(), "{err:?}");
}

#[tokio::test]
async fn invalid_urls_are_configuration_errors() {
    assert!(Store::new(&StoreConfig::new("postgres://host:notaport/db")).is_err());
}

#[tokio::test]
async fn pool_status_reflects_use() {
    let (_db, store) = super::store().await;
    let c = store.client().await.unwrap();
    let s = store.pool_status();
    assert_eq!(s.max_size, 16);
    assert!(s.size >= 1);
    drop(c);
    store.ping(Duration::from_secs(2)).await.unwrap();
}

/// A connection's statement cache is emptied at checkout once it holds more
/// than `MAX_CACHED_STATEMENTS` (list statements vary with their filters, so
/// a client could otherwise grow one connection's cache, and its server
/// process's plans, without bound). Below the bound it is kept.
#[tokio::test]
async fn the_statement_cache_of_a_connection_is_bounded() {
    let db = e2a_testkit::TestDb::new().await;
    let mut config = StoreConfig::new(db.url());
    config.pool_size = 1;
    let store = Store::new(&config).unwrap();
    let c = store.client().await.unwrap();
    for i in 0..e2a_store::MAX_CACHED_STATEMENTS {
        c.prepare_cached(&format!("SELECT {i}")).await.unwrap();
    }
    drop(c);
    let c = store.client().await.unwrap();
    assert_eq!(c.statement_cache.size(), e2a_store::MAX_CACHED_STATEMENTS);
    c.prepare_cached("SELECT 'one more'").await.unwrap();
    drop(c);
    let c = store.client().await.unwrap();
    assert_eq!(c.statement_cache.size(), 0);
    c.execute("SELECT 1", &[]).await.unwrap();
}
