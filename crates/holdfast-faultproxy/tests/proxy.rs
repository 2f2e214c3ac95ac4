//! The data plane through the Rust API: real sockets on 127.0.0.1, one proxy per test.

mod common;

use std::io;
use std::time::{Duration, Instant};

use common::*;
use holdfast_faultproxy::{FaultProxy, Stream, Toxic, ToxicSpec};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

async fn echo_proxy() -> (FaultProxy, std::net::SocketAddr) {
    let fp = FaultProxy::new();
    let addr = proxy_to(&fp, "db", echo_server().await).await;
    (fp, addr)
}

/// A latency toxic of `ms` without jitter.
fn latency_toxic(ms: u64) -> ToxicSpec {
    ToxicSpec::new(Toxic::Latency {
        latency: ms,
        jitter: 0,
    })
}

async fn add(fp: &FaultProxy, toxic: ToxicSpec) {
    fp.add_toxic("db", toxic).await.unwrap();
}

#[tokio::test]
async fn passes_bytes_both_ways_and_the_half_close() {
    let (_fp, addr) = echo_proxy().await;
    let mut conn = connect(addr).await;
    let sent: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    let (mut r, mut w) = conn.split();
    let write = async {
        w.write_all(&sent).await.unwrap();
        w.shutdown().await.unwrap();
    };
    let mut back = Vec::new();
    let read = r.read_to_end(&mut back);
    within("echo of 200 KB", async { tokio::join!(write, read).1 })
        .await
        .unwrap();
    assert_eq!(back, sent);
}

#[tokio::test]
async fn latency_slows_a_live_connection_and_removing_it_restores() {
    let (fp, addr) = echo_proxy().await;
    let mut conn = connect(addr).await;
    round_trip(&mut conn, b"warm").await;

    let latency = Duration::from_millis(300);
    add(&fp, latency_toxic(300)).await;
    assert!(round_trip(&mut conn, b"slow").await >= latency);
    fp.remove_toxic("db", "latency_downstream").await.unwrap();
    assert!(round_trip(&mut conn, b"fast").await < latency);

    // A chunk already held back goes out as soon as its latency is removed.
    add(&fp, latency_toxic(60_000)).await;
    conn.write_all(b"held").await.unwrap();
    assert!(stays_silent(&mut conn, Duration::from_millis(200)).await);
    fp.remove_toxic("db", "latency_downstream").await.unwrap();
    let mut back = [0; 4];
    within("released chunk", conn.read_exact(&mut back))
        .await
        .unwrap();
    assert_eq!(&back, b"held");
}

#[tokio::test]
async fn disabling_cuts_live_connections_and_refuses_new_ones_until_reenabled() {
    let (fp, addr) = echo_proxy().await;
    let mut live = connect(addr).await;
    round_trip(&mut live, b"up").await;

    fp.set_enabled("db", false).await.unwrap();
    let (data, _) = read_until_closed(&mut live).await;
    assert!(data.is_empty());
    assert!(
        TcpStream::connect(addr).await.is_err(),
        "connect must be refused"
    );
    assert!(!fp.proxy("db").await.unwrap().enabled);

    fp.set_enabled("db", true).await.unwrap();
    let mut conn = connect(addr).await;
    round_trip(&mut conn, b"back").await;
}

#[tokio::test]
async fn timeout_drops_data_and_closes_or_holds_until_removed() {
    let (fp, addr) = echo_proxy().await;
    add(&fp, ToxicSpec::new(Toxic::Timeout { timeout: 200 })).await;
    let start = Instant::now();
    let mut conn = connect(addr).await;
    conn.write_all(b"lost").await.unwrap();
    let (data, _) = read_until_closed(&mut conn).await;
    assert!(data.is_empty());
    assert!(start.elapsed() >= Duration::from_millis(200));

    fp.remove_toxic("db", "timeout_downstream").await.unwrap();
    add(
        &fp,
        ToxicSpec::new(Toxic::Timeout { timeout: 0 }).with_name("hold"),
    )
    .await;
    let mut conn = connect(addr).await;
    conn.write_all(b"lost").await.unwrap();
    assert!(stays_silent(&mut conn, Duration::from_millis(300)).await);
    fp.remove_toxic("db", "hold").await.unwrap();
    let (data, _) = read_until_closed(&mut conn).await;
    assert!(data.is_empty(), "data dropped while held must not reappear");
}

#[tokio::test]
async fn reset_peer_resets_the_connection() {
    let (fp, addr) = echo_proxy().await;
    add(&fp, ToxicSpec::new(Toxic::ResetPeer { timeout: 0 })).await;
    let mut conn = connect(addr).await;
    conn.write_all(b"ping").await.unwrap();
    let (data, end) = read_until_closed(&mut conn).await;
    assert!(data.is_empty());
    assert_eq!(end.unwrap_err().kind(), io::ErrorKind::ConnectionReset);
}

#[tokio::test]
async fn slow_close_delays_the_close() {
    let fp = FaultProxy::new();
    let addr = proxy_to(&fp, "db", sending_server(b"bye".to_vec()).await).await;
    add(&fp, ToxicSpec::new(Toxic::SlowClose { delay: 300 })).await;
    let start = Instant::now();
    let mut conn = connect(addr).await;
    let (data, end) = read_until_closed(&mut conn).await;
    end.unwrap();
    assert_eq!(data, b"bye");
    assert!(start.elapsed() >= Duration::from_millis(300));
}

#[tokio::test]
async fn slicer_delivers_intact_data_in_several_reads() {
    let (fp, addr) = echo_proxy().await;
    let toxic = Toxic::Slicer {
        average_size: 10,
        size_variation: 0,
        delay: 10_000,
    };
    add(&fp, ToxicSpec::new(toxic)).await;
    let mut conn = connect(addr).await;
    let sent: Vec<u8> = (0..100).collect();
    conn.write_all(&sent).await.unwrap();
    let (mut back, mut reads) = (Vec::new(), 0);
    let mut buf = [0; 1024];
    while back.len() < sent.len() {
        let n = within("slice", conn.read(&mut buf)).await.unwrap();
        assert!(n > 0, "closed early");
        back.extend_from_slice(&buf[..n]);
        reads += 1;
    }
    assert_eq!(back, sent);
    assert!(
        reads >= 2,
        "100 bytes in 10-byte slices 10 ms apart came in {reads} read(s)"
    );
}

#[tokio::test]
async fn limit_data_closes_after_the_limit() {
    let (fp, addr) = echo_proxy().await;
    add(&fp, ToxicSpec::new(Toxic::LimitData { bytes: 10 })).await;
    let mut conn = connect(addr).await;
    conn.write_all(&[7; 20]).await.unwrap();
    let (data, end) = read_until_closed(&mut conn).await;
    end.unwrap();
    assert_eq!(data, [7; 10]);
}

#[tokio::test]
async fn bandwidth_paces_the_stream() {
    let fp = FaultProxy::new();
    let payload = vec![1; 50_000];
    let addr = proxy_to(&fp, "db", sending_server(payload.clone()).await).await;
    add(&fp, ToxicSpec::new(Toxic::Bandwidth { rate: 100 })).await;
    let start = Instant::now();
    let mut conn = connect(addr).await;
    let (data, end) = read_until_closed(&mut conn).await;
    end.unwrap();
    assert_eq!(data, payload);
    // 50 KB at 100 KB/s is 0.5 s, less the first 100 ms piece that goes at once.
    let elapsed = start.elapsed();
    assert!(elapsed >= Duration::from_millis(350), "{elapsed:?}");
}

#[tokio::test]
async fn toxicity_zero_never_applies_and_one_always_does() {
    let (fp, addr) = echo_proxy().await;
    let cut_after_one_byte = ToxicSpec::new(Toxic::LimitData { bytes: 1 });
    add(&fp, cut_after_one_byte.clone().with_toxicity(0.0)).await;
    for _ in 0..10 {
        let mut conn = connect(addr).await;
        round_trip(&mut conn, b"ping").await;
    }
    fp.remove_toxic("db", "limit_data_downstream")
        .await
        .unwrap();
    add(&fp, cut_after_one_byte.with_toxicity(1.0)).await;
    for _ in 0..10 {
        let mut conn = connect(addr).await;
        conn.write_all(b"ping").await.unwrap();
        assert_eq!(read_until_closed(&mut conn).await.0, b"p");
    }
}

#[tokio::test]
async fn upstream_toxics_act_on_requests_only() {
    let (fp, addr) = echo_proxy().await;
    let toxic = latency_toxic(300);
    add(&fp, toxic.with_stream(Stream::Upstream)).await;
    assert_eq!(fp.toxics("db").await.unwrap()[0].name, "latency_upstream");
    let mut conn = connect(addr).await;
    assert!(round_trip(&mut conn, b"req").await >= Duration::from_millis(300));
}

#[tokio::test]
async fn dropping_the_last_handle_closes_everything() {
    let (fp, addr) = echo_proxy().await;
    let mut conn = connect(addr).await;
    round_trip(&mut conn, b"up").await;
    drop(fp);
    assert!(read_until_closed(&mut conn).await.0.is_empty());
    assert!(
        TcpStream::connect(addr).await.is_err(),
        "connect must be refused"
    );
}
