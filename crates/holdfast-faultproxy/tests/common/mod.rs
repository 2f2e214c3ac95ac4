//! Upstreams, clients and bounded waits shared by the test binaries.
#![allow(dead_code)]

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use holdfast_faultproxy::FaultProxy;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// The bound on every wait for something that should happen.
pub const WAIT: Duration = Duration::from_secs(5);

pub async fn within<T>(what: &str, fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(WAIT, fut)
        .await
        .unwrap_or_else(|_| panic!("timed out after {WAIT:?}: {what}"))
}

/// An upstream that echoes every byte and passes a half-close back.
pub async fn echo_server() -> SocketAddr {
    serve(|mut conn| async move {
        let (mut r, mut w) = conn.split();
        let _ = tokio::io::copy(&mut r, &mut w).await;
        let _ = w.shutdown().await;
    })
    .await
}

/// An upstream that writes `payload` to each connection and closes it.
pub async fn sending_server(payload: Vec<u8>) -> SocketAddr {
    serve(move |mut conn| {
        let payload = payload.clone();
        async move {
            let _ = conn.write_all(&payload).await;
            let _ = conn.shutdown().await;
        }
    })
    .await
}

async fn serve<F, Fut>(handle: F) -> SocketAddr
where
    F: Fn(TcpStream) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((conn, _)) = listener.accept().await {
            tokio::spawn(handle(conn));
        }
    });
    addr
}

/// A fault proxy with one proxy, `name`, in front of `upstream`; returns its address.
pub async fn proxy_to(fp: &FaultProxy, name: &str, upstream: SocketAddr) -> SocketAddr {
    let info = fp
        .create_proxy(name, "127.0.0.1:0", &upstream.to_string())
        .await
        .unwrap();
    info.listen_addr().expect("bound address")
}

/// Serves the HTTP API on a free port; returns its base URL.
pub async fn serve_api(fp: &FaultProxy) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(fp.clone().serve_api(listener, std::future::pending()));
    url
}

pub async fn connect(addr: SocketAddr) -> TcpStream {
    within("connect", TcpStream::connect(addr)).await.unwrap()
}

/// Sends `msg` and waits for it to come back; returns the round-trip time.
pub async fn round_trip(conn: &mut TcpStream, msg: &[u8]) -> Duration {
    let start = Instant::now();
    conn.write_all(msg).await.unwrap();
    let mut back = vec![0; msg.len()];
    within("echo", conn.read_exact(&mut back)).await.unwrap();
    assert_eq!(back, msg);
    start.elapsed()
}

/// Reads until the peer closes: the bytes, and how the stream ended.
pub async fn read_until_closed(conn: &mut TcpStream) -> (Vec<u8>, io::Result<()>) {
    let mut data = Vec::new();
    let mut buf = [0; 4096];
    within("connection close", async {
        loop {
            match conn.read(&mut buf).await {
                Ok(0) => return (data, Ok(())),
                Ok(n) => data.extend_from_slice(&buf[..n]),
                Err(e) => return (data, Err(e)),
            }
        }
    })
    .await
}

/// True if nothing arrives on `conn` for `quiet` (the connection stays open and silent).
pub async fn stays_silent(conn: &mut TcpStream, quiet: Duration) -> bool {
    let mut buf = [0; 64];
    tokio::time::timeout(quiet, conn.read(&mut buf))
        .await
        .is_err()
}
