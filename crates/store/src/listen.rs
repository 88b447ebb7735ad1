//! `LISTEN` on a dedicated connection ([`Store::dedicated_config`]).
//!
//! [`Store::dedicated_config`]: crate::Store::dedicated_config

pub use tokio_postgres::Config;
use tokio_postgres::{AsyncMessage, NoTls};

/// Connects with `pg`, runs `LISTEN channel`, calls `on_listening` once it
/// is in place and `on_notification` for every notification after that, until
/// the connection fails or closes; returns why it stopped. Cancel it by
/// dropping the future (the connection closes with it). `channel` must be
/// a plain identifier (it is not quoted).
pub async fn listen_once(
    pg: &Config,
    channel: &str,
    on_listening: impl FnOnce(),
    mut on_notification: impl FnMut(),
) -> String {
    let (client, mut connection) = match pg.connect(NoTls).await {
        Ok(pair) => pair,
        Err(e) => return e.to_string(),
    };
    let driver = async {
        loop {
            match std::future::poll_fn(|cx| connection.poll_message(cx)).await {
                Some(Ok(AsyncMessage::Notification(_))) => on_notification(),
                Some(Ok(_)) => {}
                Some(Err(e)) => return e.to_string(),
                None => return "connection closed".to_owned(),
            }
        }
    };
    let setup = async {
        match client.batch_execute(&format!("LISTEN {channel}")).await {
            Ok(()) => {
                on_listening();
                std::future::pending::<String>().await
            }
            Err(e) => e.to_string(),
        }
    };
    tokio::select! {
        lost = driver => lost,
        failed = setup => failed,
    }
}
