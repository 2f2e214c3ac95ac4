//! The `kill-mid-upload` fault: video reviews uploaded with tus through the balancer while the
//! instances taking their PATCHes are SIGKILLed.
//!
//! [`UPLOADERS`] virtual users each order a product (so they may review it) and then upload
//! files of 2–8 MiB, one after another, in PATCHes of [`CHUNK`] bytes sent at a slow link's
//! pace, resuming after any failure as a tus client does (`HEAD` for the offset, then on from
//! there; a 423 while the dead writer's lease runs out is waited out). Meanwhile the killer
//! looks (through `/proc`) for the web instance that has an upload part open — the one in the
//! middle of a PATCH — and SIGKILLs it, every few seconds, while another instance is up. When the fault's time is up,
//! each uploader finishes the file it is on, and every upload the server declared complete is
//! downloaded and hashed.
//!
//! [`judge`] holds the history to the uploads' invariants (`docs/INVARIANTS.md`): a complete
//! upload has the SHA-256 its client sent; no acknowledged offset ever goes backwards; a
//! resume re-sends at most one chunk; every upload finishes once the faults stop.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::checker::Violation;
use crate::faults::Rng;
use crate::system::Control;

/// Concurrent uploaders.
pub const UPLOADERS: usize = 4;
/// The bytes one PATCH carries.
pub const CHUNK: usize = 1 << 20;
/// A PATCH body goes out in pieces this large, [`PACE`] apart (about 80 ms per chunk).
const PIECE: usize = 64 * 1024;
const PACE: Duration = Duration::from_millis(5);
/// How long the killer rests after a kill (an instance restarts meanwhile).
const KILL_EVERY: Duration = Duration::from_millis(2500);
/// The product every uploader orders and reviews.
const SKU: &str = "HELMET";

/// One upload as its client lived it.
#[derive(Clone, Debug, Default, Serialize)]
pub struct UploadRun {
    /// Which uploader (its account) sent it.
    pub uploader: usize,
    pub location: String,
    pub length: u64,
    /// Hex SHA-256 of the bytes the client sent.
    pub sha256: String,
    /// Every offset the server acknowledged (a PATCH's 204 or a HEAD), in order.
    pub acknowledged: Vec<u64>,
    /// Per resume: the bytes sent again (where the failed PATCH ended, minus where the
    /// server said to go on from).
    pub resent: Vec<u64>,
    /// The server said complete (offset = length).
    pub completed: bool,
    /// Hex SHA-256 of the download of a complete upload (`None`: not read back).
    pub downloaded_sha256: Option<String>,
    /// Why it did not finish, if it did not.
    pub note: String,
}

/// What the fault saw.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Observed {
    pub uploads: Vec<UploadRun>,
    /// Instances SIGKILLed while they held an upload part open.
    pub kills_mid_patch: u64,
    pub chunk_bytes: u64,
    /// The orders the uploaders placed (so they may review), read back at the end.
    pub orders: Vec<String>,
}

impl Observed {
    pub fn completed(&self) -> usize {
        self.uploads.iter().filter(|u| u.completed).count()
    }
    pub fn resumes(&self) -> usize {
        self.uploads.iter().map(|u| u.resent.len()).sum()
    }
    pub fn max_resent(&self) -> u64 {
        self.uploads
            .iter()
            .flat_map(|u| u.resent.iter().copied())
            .max()
            .unwrap_or(0)
    }
}

/// The uploads' invariants against what the fault saw (pure: the tests plant violations).
pub fn judge(seen: &Observed) -> Vec<Violation> {
    let mut out = Vec::new();
    for u in &seen.uploads {
        if let Some(w) = u.acknowledged.windows(2).find(|w| w[1] < w[0]) {
            out.push(Violation {
                invariant: "upload_offsets_backwards",
                detail: format!("{}: acknowledged {} and then {}", u.location, w[0], w[1]),
            });
        }
        if let Some(r) = u.resent.iter().find(|&&r| r > seen.chunk_bytes) {
            out.push(Violation {
                invariant: "upload_resent_over_chunk",
                detail: format!(
                    "{}: a resume sent {r} bytes again (a chunk is {})",
                    u.location, seen.chunk_bytes
                ),
            });
        }
        match (&u.downloaded_sha256, u.completed) {
            (Some(got), true) if *got != u.sha256 => out.push(Violation {
                invariant: "uploads_corrupted",
                detail: format!(
                    "{}: complete, but its bytes hash to {got}, not the {} sent",
                    u.location, u.sha256
                ),
            }),
            (None, true) => out.push(Violation {
                invariant: "uploads_corrupted",
                detail: format!("{}: complete, but could not be read back", u.location),
            }),
            (_, false) => out.push(Violation {
                invariant: "uploads_unfinished",
                detail: format!(
                    "{}: not complete after the faults stopped ({})",
                    u.location, u.note
                ),
            }),
            _ => {}
        }
    }
    if seen.uploads.is_empty() {
        out.push(Violation {
            invariant: "uploads_unfinished",
            detail: "no upload was even started: the fault showed nothing".into(),
        });
    }
    out
}

/// Runs the fault for `hold`; its line for the report (what it saw goes to `ctl`).
pub(crate) async fn run(ctl: &Control, hold: Duration, seed: u64) -> Result<String, String> {
    let base = ctl.public_url();
    let deadline = Instant::now() + hold;
    let runs = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = tokio::task::JoinSet::new();
    for n in 0..UPLOADERS {
        let (base, runs) = (base.clone(), runs.clone());
        let mut rng = Rng::new(seed ^ (n as u64 + 1).wrapping_mul(0x9e37_79b9));
        tasks.spawn(async move {
            let client = match Uploader::new(&base, n).await {
                Ok(c) => c,
                Err(note) => {
                    lock(&runs).push(UploadRun {
                        uploader: n,
                        note,
                        ..UploadRun::default()
                    });
                    return None;
                }
            };
            while Instant::now() < deadline {
                let length = 2 * CHUNK + (rng.next_u64() % (6 * CHUNK as u64)) as usize;
                let mut run = client.upload(length, &mut rng).await;
                run.uploader = n;
                lock(&runs).push(run);
            }
            Some(client)
        });
    }
    let mut kills = 0u64;
    while Instant::now() < deadline {
        // One at a time, and only while another instance is up to take over.
        if ctl.instances("web").len() >= 2 && kill_a_writer(ctl, deadline).await {
            kills += 1;
        }
        tokio::time::sleep(KILL_EVERY).await;
    }
    let mut uploaders = Vec::new();
    while let Some(joined) = tasks.join_next().await {
        if let Ok(Some(uploader)) = joined {
            uploaders.push(uploader);
        }
    }
    // Read back with each uploader's own session: every complete upload, and its order.
    let mut uploads = std::mem::take(&mut *lock(&runs));
    let mut orders = Vec::new();
    for up in &uploaders {
        let (n, order) = &up.order;
        for u in uploads
            .iter_mut()
            .filter(|u| u.uploader == *n && u.completed)
        {
            u.downloaded_sha256 = download_sha(&up.http, &base, &u.location).await;
        }
        for _ in 0..20 {
            let read = up
                .http
                .get(format!("{base}/api/orders/{order}"))
                .send()
                .await;
            if read.is_ok_and(|r| r.status() == 200) {
                orders.push(order.clone());
                break;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
    let seen = Observed {
        uploads,
        kills_mid_patch: kills,
        chunk_bytes: CHUNK as u64,
        orders,
    };
    let line = format!(
        "{} uploads ({} complete), {} instances killed mid-PATCH, {} resumes, at most {} KiB sent again",
        seen.uploads.len(),
        seen.completed(),
        seen.kills_mid_patch,
        seen.resumes(),
        seen.max_resent() / 1024
    );
    ctl.set_uploads(seen);
    Ok(line)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Waits (until `deadline`, at most 2 s) for a web instance to hold an upload part open, and
/// SIGKILLs it; whether it did.
async fn kill_a_writer(ctl: &Control, deadline: Instant) -> bool {
    let uploads = ctl.data_dir().join("uploads");
    let until = (Instant::now() + Duration::from_secs(2)).min(deadline);
    while Instant::now() < until {
        let pids: Vec<u32> = ctl.instances("web").into_iter().map(|i| i.pid).collect();
        if let Some(pid) = writing_under(&pids, &uploads) {
            return ctl.signal(pid, nix::sys::signal::Signal::SIGKILL);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    false
}

/// The first of `pids` with a file open under `dir` (through `/proc`): with `dir` a data
/// dir's `uploads/`, the web instance in the middle of writing an upload part.
pub fn writing_under(pids: &[u32], dir: &Path) -> Option<u32> {
    let dir = dir.canonicalize().ok()?;
    pids.iter().copied().find(|pid| {
        std::fs::read_dir(format!("/proc/{pid}/fd")).is_ok_and(|fds| {
            fds.flatten()
                .filter_map(|fd| std::fs::read_link(fd.path()).ok())
                .any(|target| target.starts_with(&dir))
        })
    })
}

/// The email of uploader `n`.
fn email(n: usize) -> String {
    format!("uploader{n}@drill.test")
}

const PASSWORD: &str = "uploader password 1";

/// One uploader: a logged-in user who ordered [`SKU`].
struct Uploader {
    http: reqwest::Client,
    base: String,
    /// Its number, and the id of its order.
    order: (usize, String),
}

impl Uploader {
    async fn new(base: &str, n: usize) -> Result<Uploader, String> {
        let http = logged_in(base, n).await?;
        let add = serde_json::json!({ "sku": SKU, "qty": 1 });
        for _ in 0..50 {
            let added = http
                .post(format!("{base}/api/cart/items"))
                .header("idempotency-key", format!("uploader-{n}-add"))
                .json(&add)
                .send()
                .await;
            if !added.is_ok_and(|r| r.status().is_success()) {
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
            let ordered = http
                .post(format!("{base}/api/checkout"))
                .header("idempotency-key", format!("uploader-{n}-order"))
                .send()
                .await;
            if let Ok(r) = ordered {
                if r.status().is_success() {
                    let body: serde_json::Value = r.json().await.unwrap_or_default();
                    if let Some(id) = body["order_id"].as_str() {
                        return Ok(Uploader {
                            http,
                            base: base.to_owned(),
                            order: (n, id.to_owned()),
                        });
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        Err(format!("{} could not order {SKU} to review", email(n)))
    }

    /// One upload of `length` seeded bytes, resumed until complete (or given up 60 s after
    /// its last progress).
    async fn upload(&self, length: usize, rng: &mut Rng) -> UploadRun {
        let seed = rng.next_u64();
        let bytes: Bytes = (0..length)
            .map(|i| {
                (seed
                    .wrapping_add(i as u64)
                    .wrapping_mul(0x9e37_79b9_7f4a_7c15)
                    >> 56) as u8
            })
            .collect::<Vec<u8>>()
            .into();
        let mut run = UploadRun {
            length: length as u64,
            sha256: hex::encode(Sha256::digest(&bytes)),
            ..UploadRun::default()
        };
        let Some(location) = self.create(length).await else {
            run.note = "creation never succeeded".into();
            return run;
        };
        run.location = location;
        let mut offset = 0usize;
        let mut last_progress = Instant::now();
        let mut failed_end: Option<usize> = None;
        while offset < length {
            if last_progress.elapsed() > Duration::from_secs(60) {
                run.note = format!("no progress for 60 s at offset {offset}");
                return run;
            }
            if let Some(end) = failed_end.take() {
                // Resume: where does the server say we are?
                match self.head(&run.location).await {
                    Some(at) => {
                        run.acknowledged.push(at as u64);
                        run.resent.push(end.saturating_sub(at) as u64);
                        offset = at;
                    }
                    None => {
                        failed_end = Some(end);
                        tokio::time::sleep(Duration::from_millis(250)).await;
                        continue;
                    }
                }
            }
            let end = (offset + CHUNK).min(length);
            match self
                .patch(&run.location, offset, bytes.slice(offset..end))
                .await
            {
                Patched::To(at) => {
                    run.acknowledged.push(at as u64);
                    offset = at;
                    last_progress = Instant::now();
                }
                Patched::Busy => tokio::time::sleep(Duration::from_millis(500)).await,
                Patched::Failed => {
                    failed_end = Some(end);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
        run.completed = true;
        run
    }

    async fn create(&self, length: usize) -> Option<String> {
        use base64::Engine;
        let meta = format!(
            "sku {},filename {}",
            base64::engine::general_purpose::STANDARD.encode(SKU),
            base64::engine::general_purpose::STANDARD.encode("review.bin")
        );
        for _ in 0..100 {
            let r = self
                .http
                .post(format!("{}/api/uploads", self.base))
                .header("tus-resumable", "1.0.0")
                .header("upload-length", length.to_string())
                .header("upload-metadata", &meta)
                .send()
                .await;
            if let Ok(r) = r {
                if r.status() == 201 {
                    return r
                        .headers()
                        .get("location")
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_owned);
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        None
    }

    async fn head(&self, location: &str) -> Option<usize> {
        let r = self
            .http
            .head(format!("{}{location}", self.base))
            .header("tus-resumable", "1.0.0")
            .send()
            .await
            .ok()?;
        if r.status() != 200 {
            return None;
        }
        r.headers()
            .get("upload-offset")?
            .to_str()
            .ok()?
            .parse()
            .ok()
    }

    async fn patch(&self, location: &str, offset: usize, bytes: Bytes) -> Patched {
        let len = bytes.len();
        let pieces = futures::stream::unfold(bytes, |mut rest| async move {
            if rest.is_empty() {
                return None;
            }
            tokio::time::sleep(PACE).await;
            let piece = rest.split_to(rest.len().min(PIECE));
            Some((Ok::<_, std::io::Error>(piece), rest))
        });
        let r = self
            .http
            .patch(format!("{}{location}", self.base))
            .header("tus-resumable", "1.0.0")
            .header("upload-offset", offset.to_string())
            .header("content-type", "application/offset+octet-stream")
            .header("content-length", len.to_string())
            .body(reqwest::Body::wrap_stream(pieces))
            .send()
            .await;
        let Ok(r) = r else {
            return Patched::Failed;
        };
        let at = r
            .headers()
            .get("upload-offset")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok());
        match (r.status().as_u16(), at) {
            (204, Some(at)) => Patched::To(at),
            (423, _) => Patched::Busy,
            _ => Patched::Failed,
        }
    }
}

enum Patched {
    /// Acknowledged: the upload is at this offset now.
    To(usize),
    /// Another writer's lease is still running.
    Busy,
    /// No answer, or one that says to ask where the upload stands.
    Failed,
}

/// A client with a cookie jar, logged in as uploader `n` (signing up first).
async fn logged_in(base: &str, n: usize) -> Result<reqwest::Client, String> {
    let http = reqwest::Client::builder()
        .cookie_store(true)
        .timeout(Duration::from_secs(30))
        // An address of its own, as the drill's users have (per-address limits see people).
        .local_address(holdfast_core::loopback_source(100_000 + n as u64))
        .build()
        .map_err(|e| e.to_string())?;
    let creds = serde_json::json!({ "email": email(n), "password": PASSWORD });
    for _ in 0..50 {
        let _ = http
            .post(format!("{base}/api/signup"))
            .json(&creds)
            .send()
            .await;
        if let Ok(r) = http
            .post(format!("{base}/api/login"))
            .json(&creds)
            .send()
            .await
        {
            if r.status().is_success() {
                return Ok(http);
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Err(format!("{} could not log in", email(n)))
}

/// The SHA-256 of a download of `location` with `http`'s session (its uploader's).
async fn download_sha(http: &reqwest::Client, base: &str, location: &str) -> Option<String> {
    for _ in 0..20 {
        if let Ok(r) = http.get(format!("{base}{location}")).send().await {
            if r.status() == 200 {
                let body = r.bytes().await.ok()?;
                return Some(hex::encode(Sha256::digest(&body)));
            }
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn clean() -> Observed {
        Observed {
            uploads: vec![UploadRun {
                uploader: 0,
                location: "/api/uploads/a".into(),
                length: 3 << 20,
                sha256: "aa".into(),
                acknowledged: vec![1 << 20, 1 << 20, 2 << 20, 3 << 20],
                resent: vec![0],
                completed: true,
                downloaded_sha256: Some("aa".into()),
                note: String::new(),
            }],
            kills_mid_patch: 1,
            chunk_bytes: CHUNK as u64,
            orders: vec![],
        }
    }

    #[test]
    fn a_clean_run_passes_and_each_planted_violation_is_caught() {
        assert_eq!(judge(&clean()), Vec::new());
        let plant = |f: fn(&mut UploadRun)| {
            let mut seen = clean();
            f(&mut seen.uploads[0]);
            judge(&seen)
                .into_iter()
                .map(|v| v.invariant)
                .collect::<Vec<_>>()
        };
        assert_eq!(
            plant(|u| u.acknowledged = vec![2 << 20, 1 << 20, 3 << 20]),
            ["upload_offsets_backwards"]
        );
        assert_eq!(
            plant(|u| u.resent = vec![CHUNK as u64 + 1]),
            ["upload_resent_over_chunk"]
        );
        assert_eq!(
            plant(|u| u.downloaded_sha256 = Some("bb".into())),
            ["uploads_corrupted"]
        );
        assert_eq!(plant(|u| u.downloaded_sha256 = None), ["uploads_corrupted"]);
        assert_eq!(plant(|u| u.completed = false), ["uploads_unfinished"]);
        assert_eq!(
            judge(&Observed::default())
                .iter()
                .map(|v| v.invariant)
                .collect::<Vec<_>>(),
            ["uploads_unfinished"]
        );
    }
}
