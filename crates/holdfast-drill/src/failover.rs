//! The `promote-standby` fault: the database's primary dies under load and its standby is
//! promoted, as a managed database's failover flips it; the system must follow.
//!
//! The drill runs a streaming standby beside its cluster (`pg_basebackup -R`, asynchronous
//! replication) and gives `up` both hosts in one URL, each through the fault proxy. Mid-load
//! the primary is stopped at once (`pg_ctl stop -m immediate`: no shutdown checkpoint, no
//! goodbye to clients) and the standby promoted (`pg_ctl promote`). The instances find the
//! new primary themselves (`holdfast-store`'s `primary.rs`); users retry what failed with
//! their keys.
//!
//! The report gets the promotion's time and the writes' recovery time (the flip → the first
//! order acknowledged that was asked for after it; goal ≤ 5 s); the checker is given the
//! flip's moment: acknowledged orders the promoted standby never received (replication is
//! asynchronous) may be lost within [`LOSS_WINDOW_MS`] before it, listed by id, and any
//! other loss is a violation.
//!
//! The `fail-replica` fault stops the standby at once instead, while it serves the reads that
//! may go to a replica (the catalog, order history); the instances must send those reads to
//! the primary without an error, and the checker's read-your-writes count
//! (`orders_missing_on_read`) must stay 0 throughout, with the standby alive and without it.

use serde::Serialize;

use crate::system::Control;
use crate::users::Clock;

/// How long before the flip an acknowledged write may be missing on the promoted standby and
/// the drill still pass: asynchronous replication on one machine lags by milliseconds; this
/// is a second of slack.
pub const LOSS_WINDOW_MS: u64 = 1000;

/// What the fault saw.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct Observed {
    /// When the primary was gone (its stop returned), on the drill's clock (ms since the load
    /// started).
    pub flipped_at_ms: u64,
    /// How long `pg_ctl promote` took.
    pub promote_ms: u64,
}

/// Stops the primary at once and promotes the standby; the fault's target line.
pub(crate) async fn run(ctl: &Control, clock: Clock) -> Result<String, String> {
    let primary = ctl.db().ok_or("no database server in this drill")?.clone();
    let standby = ctl.standby().ok_or("no standby in this drill")?.clone();
    primary.stop().await;
    // Taken once every process of the old primary is gone (`pg_ctl stop -w` returned), as the
    // checker reads it: an answer before it may have come from the old primary, one after it
    // came from the promoted standby. Taken before the stop, a checkout the old primary
    // committed while it was being stopped, and never shipped to the standby, counted as lost
    // outside the window.
    let flipped_at_ms = clock.ms();
    let took = standby.promote().await.map_err(|e| e.to_string())?;
    ctl.set_failover(Observed {
        flipped_at_ms,
        promote_ms: took.as_millis() as u64,
    });
    Ok(format!(
        "the primary (stopped at once); the standby on :{} promoted in {:.2} s",
        standby.port,
        took.as_secs_f64()
    ))
}

/// How long `fail-replica` watches where reads go after it stopped the standby.
pub const REPLICA_LOST_WATCH: std::time::Duration = std::time::Duration::from_secs(3);

/// What `fail-replica` saw: the fleet's reads that may go to a standby
/// (`holdfast_store_replica_reads_total`), by where they were served.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct ReplicaLost {
    /// Served by the standby before it was stopped (none, and the fault fails: it would
    /// prove nothing).
    pub replica_reads_before: u64,
    /// Served by the standby in the [`REPLICA_LOST_WATCH`] after it was stopped (reads
    /// already under way when it stopped, at most).
    pub replica_reads_after: u64,
    /// Served by the primary in that time.
    pub primary_reads_after: u64,
}

/// The fleet's `holdfast_store_replica_reads_total` by `served` (`replica`, `primary`), from
/// the balancer's `/ops/metrics`.
async fn replica_reads(ctl: &Control) -> Result<(u64, u64), String> {
    let url = format!("{}/ops/metrics", ctl.ops_url());
    let page = reqwest::get(&url)
        .await
        .and_then(reqwest::Response::error_for_status)
        .map_err(|e| format!("{url}: {e}"))?
        .text()
        .await
        .map_err(|e| format!("{url}: {e}"))?;
    let sum = |served: &str| {
        page.lines()
            .filter(|l| {
                l.starts_with("holdfast_store_replica_reads_total{")
                    && l.contains(&format!("served=\"{served}\""))
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>() as u64
    };
    Ok((sum("replica"), sum("primary")))
}

/// Stops the standby at once while it serves reads, and watches the reads move to the
/// primary; the fault's target line.
pub(crate) async fn fail_replica(ctl: &Control) -> Result<String, String> {
    let standby = ctl.standby().ok_or("no standby in this drill")?.clone();
    let (replica_before, primary_before) = replica_reads(ctl).await?;
    if replica_before == 0 {
        return Err("the standby had served no reads: losing it would prove nothing".into());
    }
    standby.stop().await;
    tokio::time::sleep(REPLICA_LOST_WATCH).await;
    let (replica_after, primary_after) = replica_reads(ctl).await?;
    let seen = ReplicaLost {
        replica_reads_before: replica_before,
        replica_reads_after: replica_after.saturating_sub(replica_before),
        primary_reads_after: primary_after.saturating_sub(primary_before),
    };
    ctl.set_replica_lost(seen.clone());
    Ok(format!(
        "the standby on :{} (stopped at once after serving {} reads; in the {} s after, \
         {} reads on the primary, {} on the standby)",
        standby.port,
        seen.replica_reads_before,
        REPLICA_LOST_WATCH.as_secs(),
        seen.primary_reads_after,
        seen.replica_reads_after
    ))
}
