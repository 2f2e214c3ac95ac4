//! The `lose-primary` fault: the whole node is lost and a fresh one is restored from the
//! continuous backup, under load.
//!
//! `holdfast up` (the balancer, every instance and worker, and the backup's replicator, which
//! all die with it) is SIGKILLed and its data directory destroyed: the disk is gone (on
//! Postgres the drill's cluster is stopped at once and its data directory destroyed too).
//! Then, as an operator would: `holdfast restore --backup … --to <the data dir> --provider-url
//! …` (integrity check and reconciliation with the provider included; on Postgres into the
//! cluster's data directory, which starts again on its port), and `holdfast up` again on the
//! same address, backing up to a fresh directory. Users keep shopping across it, retrying
//! what failed with their keys.
//!
//! The report gets RTO (loss → the first 2xx the restored node served through the address),
//! the restore's own time and line, and — from the checker, which is given the loss's moment
//! — the acknowledged writes the restore lost, by id: allowed within [`LOSS_WINDOW_MS`] before
//! the loss (the backup ships every second), a violation before that.

use std::time::{Duration, Instant};

use serde::Serialize;

use crate::system::Control;
use crate::users::Clock;

/// How long before the loss an acknowledged write may be lost with it and the drill still
/// pass: the backup's one-second sync interval, its upload, and a second of slack.
pub const LOSS_WINDOW_MS: u64 = 2000;

/// What the fault saw.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct Observed {
    /// When the node was lost, on the drill's clock (ms since the load started).
    pub lost_at_ms: u64,
    /// Loss → the first 2xx served by the restored node through the same address.
    pub rto_ms: u64,
    /// How long `holdfast restore` took (restore, integrity check, reconciliation).
    pub restore_ms: u64,
    /// `holdfast restore`'s own line.
    pub restore_said: String,
    /// Whether it said `integrity_check ok` (SQLite) or `pg_amcheck ok` (it fails otherwise).
    pub integrity_ok: bool,
}

/// Loses the node and restores it; the fault's target line. Whatever fails once the node is
/// lost is recorded as a failed restore (the drill then fails with `restore_failed`, and its
/// users stop).
pub(crate) async fn run(ctl: &Control, clock: Clock) -> Result<String, String> {
    let killed = ctl.kill_node().await?;
    let lost = Instant::now();
    let lost_at_ms = clock.ms();
    let restoring = Instant::now();
    let failed = |why: String, restore_ms: u64| {
        ctl.set_restore(Observed {
            lost_at_ms,
            restore_ms,
            restore_said: why.clone(),
            ..Observed::default()
        });
        why
    };
    let said = match ctl.destroy_data().and(Ok(())) {
        Ok(()) => ctl.restore_node().await,
        Err(why) => Err(why),
    };
    let restore_ms = restoring.elapsed().as_millis() as u64;
    let said = said.map_err(|why| failed(format!("the restore failed: {why}"), restore_ms))?;
    ctl.start_next_node().await.map_err(|why| {
        failed(
            format!("the restored node did not start: {why}"),
            restore_ms,
        )
    })?;
    let url = format!("{}/api/products", ctl.public_url());
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()
        .map_err(|e| failed(e.to_string(), restore_ms))?;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(r) = http.get(&url).send().await {
            if r.status().is_success() {
                break;
            }
        }
        if Instant::now() > deadline {
            return Err(failed(
                "the restored node served nothing within 60 s".into(),
                restore_ms,
            ));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let rto_ms = lost.elapsed().as_millis() as u64;
    let integrity_ok = said.contains("integrity_check ok") || said.contains("pg_amcheck ok");
    ctl.set_restore(Observed {
        lost_at_ms,
        rto_ms,
        restore_ms,
        restore_said: said,
        integrity_ok,
    });
    Ok(format!(
        "the node ({killed} processes and its data dir); restored and serving after {:.1} s",
        rto_ms as f64 / 1000.0
    ))
}
