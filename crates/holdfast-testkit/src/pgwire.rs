//! How many round trips a process makes to PostgreSQL to run its statements, counted on the
//! wire: a relay between it and the server that reads the frontend's messages and counts each
//! extended-protocol exchange that executes something (up to its `Sync`, which the client then
//! waits on) and each simple `Query`. A figure from the protocol itself, not from a timing. It refuses TLS, so that it can read.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// The relay; it serves until the test's runtime ends.
pub struct RoundTrips {
    url: String,
    count: Arc<Counts>,
}

/// What the relay has seen, over every connection.
#[derive(Default)]
struct Counts {
    /// Round trips that ran statements.
    statements: AtomicU64,
    /// Lone `Sync`s: a client checking that a connection answers, running nothing.
    pings: AtomicU64,
}

impl RoundTrips {
    /// Relays to the server `url` names (`postgres://user@host:port/db`).
    pub async fn start(url: &str) -> Self {
        let parsed = reqwest::Url::parse(url).expect("a postgres:// url");
        let server = format!(
            "{}:{}",
            parsed.host_str().expect("a host"),
            parsed.port().unwrap_or(5432)
        );
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let count = Arc::new(Counts::default());
        let counted = count.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let (server, count) = (server.clone(), counted.clone());
                tokio::spawn(async move {
                    if let Ok(upstream) = TcpStream::connect(&server).await {
                        let _ = (client.set_nodelay(true), upstream.set_nodelay(true));
                        relay(client, upstream, count).await;
                    }
                });
            }
        });
        let mut relayed = parsed.clone();
        relayed.set_host(Some("127.0.0.1")).expect("host");
        relayed.set_port(Some(port)).expect("port");
        Self {
            url: relayed.to_string(),
            count,
        }
    }

    /// The URL that reaches the server through the relay.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Round trips that ran statements so far, over every connection.
    pub fn count(&self) -> u64 {
        self.count.statements.load(Ordering::SeqCst)
    }

    /// Pings so far (a lone `Sync`, which runs nothing), over every connection.
    pub fn pings(&self) -> u64 {
        self.count.pings.load(Ordering::SeqCst)
    }
}

async fn relay(mut client: TcpStream, mut upstream: TcpStream, count: Arc<Counts>) {
    let Ok(startup) = refuse_encryption(&mut client).await else {
        return;
    };
    if upstream.write_all(&startup).await.is_err() {
        return;
    }
    let (mut from_client, mut to_client) = client.into_split();
    let (mut from_server, mut to_server) = upstream.into_split();
    let down = tokio::spawn(async move { tokio::io::copy(&mut from_server, &mut to_client).await });
    let _ = frontend(&mut from_client, &mut to_server, &count).await;
    let _ = to_server.shutdown().await;
    down.abort();
}

/// Reads the client's first messages, which have no type byte, answering its requests for
/// TLS or GSS encryption with "no" so that the rest can be read, and returns the startup
/// message to forward.
async fn refuse_encryption(client: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    const ENCRYPTION_REQUESTS: [u32; 2] = [80_877_103, 80_877_104];
    loop {
        let len = client.read_u32().await?;
        let mut rest = vec![0; (len as usize).saturating_sub(4)];
        client.read_exact(&mut rest).await?;
        let code = rest
            .get(..4)
            .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]));
        if code.is_some_and(|c| ENCRYPTION_REQUESTS.contains(&c)) {
            client.write_all(b"N").await?;
            continue;
        }
        return Ok([&len.to_be_bytes()[..], &rest].concat());
    }
}

/// Copies the frontend's typed messages one by one, counting each `Sync` that ends an
/// exchange which executed something and each simple `Query`: the round trips that ran
/// statements. A prepare (`Parse`, `Describe`, `Sync`, once per statement and connection)
/// runs none. A lone `Sync` (nothing sent since the last one: sqlx's ping) is counted apart.
async fn frontend(
    from: &mut tokio::net::tcp::OwnedReadHalf,
    to: &mut tokio::net::tcp::OwnedWriteHalf,
    count: &Counts,
) -> std::io::Result<()> {
    let (mut executed, mut sent_since_sync) = (false, false);
    loop {
        let kind = from.read_u8().await?;
        let len = from.read_u32().await?;
        let mut rest = vec![0; (len as usize).saturating_sub(4)];
        from.read_exact(&mut rest).await?;
        match kind {
            b'S' if std::mem::take(&mut executed) => {
                count.statements.fetch_add(1, Ordering::SeqCst);
            }
            b'S' if !sent_since_sync => {
                count.pings.fetch_add(1, Ordering::SeqCst);
            }
            b'E' => executed = true,
            b'Q' => {
                count.statements.fetch_add(1, Ordering::SeqCst);
            }
            _ => {}
        }
        sent_since_sync = !matches!(kind, b'S' | b'Q');
        to.write_all(&[&[kind][..], &len.to_be_bytes(), &rest].concat())
            .await?;
    }
}
