//! A private cluster can be stopped and started again on the same port.

use e2a_testkit::PrivateCluster;

async fn select_one(url: &str) -> Result<i32, tokio_postgres::Error> {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
    tokio::spawn(connection);
    let row = client.query_one("SELECT 1", &[]).await?;
    Ok(row.get(0))
}

#[tokio::test]
async fn stop_then_start_again_on_the_same_port() {
    let pg = PrivateCluster::start().await;
    let url = pg.database_url();
    let port = pg.port();
    assert!(url.contains(&format!(":{port}/")), "{url}");
    assert!(pg.is_running().await);
    assert_eq!(select_one(&url).await.expect("connect before stop"), 1);

    // The schema is migrated.
    let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .expect("connect");
    tokio::spawn(connection);
    let migrated: bool = client
        .query_one(
            "SELECT to_regclass($1) IS NOT NULL",
            &[&e2a_store::migrate::HISTORY_TABLE],
        )
        .await
        .expect("query")
        .get(0);
    assert!(migrated);

    pg.stop().await;
    assert!(!pg.is_running().await);
    assert!(
        select_one(&url).await.is_err(),
        "connected to a stopped cluster"
    );
    // An open session is terminated by the stop.
    assert!(client.query_one("SELECT 1", &[]).await.is_err());
    // Stopping twice is fine.
    pg.stop().await;

    pg.start_again().await;
    assert_eq!(pg.port(), port);
    assert_eq!(select_one(&url).await.expect("connect after restart"), 1);
}

#[tokio::test]
async fn dropping_removes_the_cluster() {
    let pg = PrivateCluster::start().await;
    let url = pg.url("postgres");
    assert_eq!(select_one(&url).await.expect("connect"), 1);
    drop(pg);
    assert!(
        select_one(&url).await.is_err(),
        "cluster still up after drop"
    );
}
