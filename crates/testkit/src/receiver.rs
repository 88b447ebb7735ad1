//! A webhook receiver for tests and benchmarks: a real HTTP/1.1 server on
//! 127.0.0.1 (keep-alive, `Content-Length` bodies — what the webhook client
//! sends) that records every request and answers as the test decides.
//!
//! It also watches concurrency: [`Receiver::max_concurrent`] is the most
//! requests it ever had open at once for one path, which is how tests see
//! that a webhook never gets two deliveries in flight.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::mpsc,
};

/// One request as received.
#[derive(Debug, Clone)]
pub struct Request {
    /// The path (with query), e.g. `/hook/1`.
    pub path: String,
    /// Headers with lower-cased names, in arrival order.
    pub headers: Vec<(String, String)>,
    /// The body bytes.
    pub body: Vec<u8>,
    /// When the first byte of the request arrived.
    pub first_byte_at: Instant,
}

impl Request {
    /// The first value of header `name` (any case).
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }

    /// The body parsed as JSON (panics when it is not: a test failure).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("body of {} is not JSON: {e}", self.path))
    }
}

/// How to answer one request.
#[derive(Debug, Clone)]
pub struct Reply {
    /// The status code.
    pub status: u16,
    /// Extra headers.
    pub headers: Vec<(String, String)>,
    /// Wait this long before answering (holds the request open).
    pub delay: Duration,
}

impl Reply {
    /// `status` at once, no extra headers.
    pub fn status(status: u16) -> Self {
        Self {
            status,
            headers: Vec::new(),
            delay: Duration::ZERO,
        }
    }

    /// Adds a header.
    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    /// Answers after `delay`.
    pub fn after(mut self, delay: Duration) -> Self {
        self.delay = delay;
        self
    }
}

type Script = Arc<dyn Fn(&Request) -> Reply + Send + Sync>;

#[derive(Default)]
struct Concurrency {
    open: HashMap<String, usize>,
    max: HashMap<String, usize>,
}

/// A running receiver; stops when dropped (its accept task is aborted).
pub struct Receiver {
    addr: SocketAddr,
    rx: mpsc::UnboundedReceiver<Request>,
    concurrency: Arc<Mutex<Concurrency>>,
    accept: tokio::task::JoinHandle<()>,
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

impl Receiver {
    /// A receiver answering `200` to everything.
    pub async fn ok() -> Self {
        Self::start(|_| Reply::status(200)).await
    }

    /// A receiver answering what `script` says for each request.
    pub async fn start(script: impl Fn(&Request) -> Reply + Send + Sync + 'static) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the receiver");
        let addr = listener.local_addr().expect("receiver address");
        let (tx, rx) = mpsc::unbounded_channel();
        let concurrency = Arc::new(Mutex::new(Concurrency::default()));
        let script: Script = Arc::new(script);
        let seen = concurrency.clone();
        let accept = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let _ = stream.set_nodelay(true);
                tokio::spawn(serve(stream, script.clone(), tx.clone(), seen.clone()));
            }
        });
        Self {
            addr,
            rx,
            concurrency,
            accept,
        }
    }

    /// The socket address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:<port><path>`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// The next request, waiting up to `within`; `None` if none came.
    pub async fn next_within(&mut self, within: Duration) -> Option<Request> {
        tokio::time::timeout(within, self.rx.recv())
            .await
            .ok()
            .flatten()
    }

    /// The next request (panics after 30 s without one).
    pub async fn next(&mut self) -> Request {
        self.next_within(Duration::from_secs(30))
            .await
            .expect("the receiver got no request within 30 s")
    }

    /// Every request received so far and not yet taken.
    pub fn drain(&mut self) -> Vec<Request> {
        let mut out = Vec::new();
        while let Ok(r) = self.rx.try_recv() {
            out.push(r);
        }
        out
    }

    /// The most requests ever open at once for `path`.
    pub fn max_concurrent(&self, path: &str) -> usize {
        let c = self.concurrency.lock().unwrap_or_else(|p| p.into_inner());
        c.max.get(path).copied().unwrap_or(0)
    }

    /// The most requests ever open at once for any one path.
    pub fn max_concurrent_per_path(&self) -> usize {
        let c = self.concurrency.lock().unwrap_or_else(|p| p.into_inner());
        c.max.values().copied().max().unwrap_or(0)
    }
}

async fn serve(
    mut stream: TcpStream,
    script: Script,
    tx: mpsc::UnboundedSender<Request>,
    concurrency: Arc<Mutex<Concurrency>>,
) {
    let mut buf = Vec::new();
    while let Some(request) = read_request(&mut stream, &mut buf).await {
        let path = request.path.clone();
        {
            let mut c = concurrency.lock().unwrap_or_else(|p| p.into_inner());
            let open = c.open.entry(path.clone()).or_default();
            *open += 1;
            let now = *open;
            let max = c.max.entry(path.clone()).or_default();
            *max = (*max).max(now);
        }
        let reply = script(&request);
        let _ = tx.send(request);
        if !reply.delay.is_zero() {
            tokio::time::sleep(reply.delay).await;
        }
        {
            let mut c = concurrency.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(open) = c.open.get_mut(&path) {
                *open -= 1;
            }
        }
        let mut head = format!("HTTP/1.1 {} X\r\nContent-Length: 0\r\n", reply.status);
        for (n, v) in &reply.headers {
            head.push_str(&format!("{n}: {v}\r\n"));
        }
        head.push_str("\r\n");
        if stream.write_all(head.as_bytes()).await.is_err() {
            return;
        }
    }
}

/// Reads one request (head and `Content-Length` body) from `stream`,
/// keeping any bytes of the next one in `buf`. `None` at EOF or on garbage.
async fn read_request(stream: &mut TcpStream, buf: &mut Vec<u8>) -> Option<Request> {
    let mut first_byte_at = (!buf.is_empty()).then(Instant::now);
    let head_end = loop {
        if let Some(pos) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break pos;
        }
        let mut tmp = [0u8; 16 * 1024];
        let n = stream.read(&mut tmp).await.ok()?;
        if n == 0 {
            return None;
        }
        first_byte_at.get_or_insert_with(Instant::now);
        buf.extend_from_slice(&tmp[..n]);
    };
    let head = String::from_utf8(buf[..head_end].to_vec()).ok()?;
    let mut lines = head.split("\r\n");
    let path = lines.next()?.split(' ').nth(1)?.to_owned();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let len: usize = headers
        .iter()
        .find(|(n, _)| n == "content-length")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0);
    let body_start = head_end + 4;
    while buf.len() < body_start + len {
        let mut tmp = [0u8; 64 * 1024];
        let n = stream.read(&mut tmp).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&tmp[..n]);
    }
    let body = buf[body_start..body_start + len].to_vec();
    buf.drain(..body_start + len);
    Some(Request {
        path,
        headers,
        body,
        first_byte_at: first_byte_at.unwrap_or_else(Instant::now),
    })
}
