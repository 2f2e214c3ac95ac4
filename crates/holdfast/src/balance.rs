//! `holdfast balance`: the balancer alone, in front of web instances something else runs — an
//! orchestrator, or the compose file in `ops/container/`. `up` runs the same balancer with
//! instances of its own; here the instances are named by `host:port`, and a name that resolves
//! to several addresses (a compose service with replicas) stands for every one of them. Names
//! are resolved again every `--resolve-every`, so replicas that come and go are followed; a
//! failed lookup keeps the last good set rather than emptying the pool.
//!
//! And `holdfast probe URL`: a health check for images with no shell and no curl (the
//! container's `HEALTHCHECK`): exit 0 on a 2xx answer within the timeout, else 1.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{ensure, Context};
use holdfast_balancer::Balancer;
use tokio::net::TcpListener;
use tracing::{info, warn};

use crate::cli::{BalanceArgs, ProbeArgs};

pub async fn run(args: BalanceArgs) -> anyhow::Result<()> {
    let terminated = crate::on_terminate()?;
    let balancer = Balancer::new(crate::up::shop_balancer_options(args.client_rate));
    let first = resolve_all(&args.upstreams).await;
    ensure!(
        !first.is_empty(),
        "none of the upstreams {:?} resolves to an address",
        args.upstreams
    );
    balancer.set_upstreams(first);
    tokio::spawn(follow_upstreams(
        balancer.clone(),
        args.upstreams.clone(),
        args.resolve_every,
    ));

    crate::graphite::spawn(&args.graphite, {
        let balancer = balancer.clone();
        move || std::future::ready(balancer.render_metrics())
    });
    let listener = TcpListener::bind(args.addr)
        .await
        .with_context(|| format!("binding {}", args.addr))?;
    let ops_listener = TcpListener::bind(args.ops_addr)
        .await
        .with_context(|| format!("binding --ops-addr {}", args.ops_addr))?;
    let (addr, ops_addr) = (listener.local_addr()?, ops_listener.local_addr()?);
    tokio::spawn(
        balancer
            .clone()
            .serve_operator(ops_listener, std::future::pending()),
    );
    crate::announce_listening(addr, Some(ops_addr))?;
    info!(%addr, %ops_addr, upstreams = ?args.upstreams, "balancer listening");
    balancer
        .serve(listener, async move {
            let signal = terminated.await;
            info!(signal, "stopping: in-flight requests may finish");
        })
        .await?;
    Ok(())
}

/// Every address the `host:port` names resolve to, in a stable order; names that do not
/// resolve are logged and skipped.
async fn resolve_all(names: &[String]) -> Vec<SocketAddr> {
    let mut addrs = Vec::new();
    for name in names {
        match tokio::net::lookup_host(name.as_str()).await {
            Ok(found) => addrs.extend(found),
            Err(error) => warn!(upstream = %name, %error, "upstream does not resolve"),
        }
    }
    addrs.sort();
    addrs.dedup();
    addrs
}

async fn follow_upstreams(balancer: Balancer, names: Vec<String>, every: Duration) {
    let mut known = resolve_all(&names).await;
    loop {
        tokio::time::sleep(every).await;
        let now = resolve_all(&names).await;
        if !now.is_empty() && now != known {
            info!(upstreams = ?now, "upstreams changed");
            balancer.set_upstreams(now.clone());
            known = now;
        }
    }
}

pub async fn probe(args: ProbeArgs) -> anyhow::Result<()> {
    let http = reqwest::Client::builder()
        .timeout(args.timeout)
        .build()
        .context("building an HTTP client")?;
    let resp = http
        .get(&args.url)
        .send()
        .await
        .with_context(|| format!("GET {}", args.url))?;
    ensure!(
        resp.status().is_success(),
        "GET {} answered {}",
        args.url,
        resp.status()
    );
    Ok(())
}
