//! PostgreSQL backups in an S3-compatible bucket. The base backup and the WAL receiver write
//! into a local spool (the directory layout of [`crate::postgres`]); a mirror ships it:
//!
//! ```text
//! postgres.json                       the marker, as in a directory
//! base/<UTC time>/<file…>             a base backup's files; complete once
//! base/<UTC time>.done                this exists (written last); it lists the base
//!                                     backup's directories, which objects cannot hold empty
//! wal/<segment>                       a completed WAL segment
//! wal/<segment>.partial.<offset hex>  the bytes of the segment being received, from offset
//!                                     on, as far as the receiver had flushed them
//! proven                              the newest WAL position the bucket holds
//! ```
//!
//! Every 250 ms the mirror ships what the receiver has flushed since (a few small PUTs a
//! second while writes flow); a completed segment replaces its pieces. What was shipped
//! leaves the spool, so the local disk holds only the segment being received. A restore
//! fetches the chosen base backup and the WAL since into a scratch directory and restores
//! from there as from a directory.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures::TryStreamExt;
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::path::Path as Key;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use time::OffsetDateTime;
use tokio::sync::watch;

use crate::litestream::{Point, Points};
use crate::postgres;
use crate::{Error, Target};

/// A bucket and the prefix under it.
#[derive(Clone)]
pub(crate) struct Bucket {
    s3: Arc<AmazonS3>,
    prefix: String,
    shown: String,
}

fn remote(what: &str) -> impl FnOnce(object_store::Error) -> Error + '_ {
    move |e| Error::Tool {
        what: what.to_owned(),
        detail: e.to_string(),
    }
}

fn not_found(e: &object_store::Error) -> bool {
    matches!(e, object_store::Error::NotFound { .. })
}

impl Bucket {
    /// The bucket of an `s3://` target, with the endpoint, region and credentials of the
    /// standard `AWS_*` variables.
    pub(crate) fn open(target: &Target) -> Result<Bucket, Error> {
        let Target::S3 { bucket, prefix } = target else {
            return Err(Error::Usage(format!("{target} is not an S3 target")));
        };
        let mut builder = AmazonS3Builder::from_env().with_bucket_name(bucket);
        let env = |names: &[&str]| {
            names
                .iter()
                .find_map(|n| std::env::var(n).ok().filter(|v| !v.is_empty()))
        };
        if let Some(endpoint) = env(&["AWS_ENDPOINT_URL", "AWS_ENDPOINT"]) {
            builder = builder
                .with_allow_http(endpoint.starts_with("http://"))
                .with_endpoint(endpoint);
        }
        if let Some(region) = env(&["AWS_DEFAULT_REGION", "AWS_REGION"]) {
            builder = builder.with_region(region);
        }
        let s3 = builder.build().map_err(remote("opening the bucket"))?;
        Ok(Bucket {
            s3: Arc::new(s3),
            prefix: prefix.clone(),
            shown: target.to_string(),
        })
    }

    fn key(&self, rel: &str) -> Key {
        if self.prefix.is_empty() {
            Key::from(rel)
        } else {
            Key::from(format!("{}/{rel}", self.prefix))
        }
    }

    /// `key` relative to the prefix.
    fn rel(&self, key: &Key) -> String {
        let key = key.as_ref();
        match self.prefix.is_empty() {
            true => key.to_owned(),
            false => key
                .strip_prefix(&format!("{}/", self.prefix))
                .unwrap_or(key)
                .to_owned(),
        }
    }

    async fn put(&self, rel: &str, bytes: Vec<u8>) -> Result<(), Error> {
        self.s3
            .put(&self.key(rel), PutPayload::from(bytes))
            .await
            .map(|_| ())
            .map_err(remote(&format!("writing {rel} to {}", self.shown)))
    }

    async fn get(&self, rel: &str) -> Result<Option<bytes::Bytes>, Error> {
        match self.s3.get(&self.key(rel)).await {
            Ok(got) => got
                .bytes()
                .await
                .map(Some)
                .map_err(remote(&format!("reading {rel} from {}", self.shown))),
            Err(e) if not_found(&e) => Ok(None),
            Err(e) => Err(remote(&format!("reading {rel} from {}", self.shown))(e)),
        }
    }

    /// Every object under `rel` (a folder), relative to the prefix, with its size and time.
    async fn list(&self, rel: &str) -> Result<Vec<(String, u64, OffsetDateTime)>, Error> {
        let listed: Vec<_> = self
            .s3
            .list(Some(&self.key(rel)))
            .try_collect()
            .await
            .map_err(remote(&format!("listing {}", self.shown)))?;
        Ok(listed
            .into_iter()
            .map(|m| {
                let at = OffsetDateTime::from_unix_timestamp(m.last_modified.timestamp())
                    .unwrap_or(OffsetDateTime::UNIX_EPOCH);
                (self.rel(&m.location), m.size, at)
            })
            .collect())
    }

    async fn delete(&self, rel: &str) -> Result<(), Error> {
        match self.s3.delete(&self.key(rel)).await {
            Err(e) if !not_found(&e) => {
                Err(remote(&format!("removing {rel} from {}", self.shown))(e))
            }
            _ => Ok(()),
        }
    }

    /// Whether the bucket holds a PostgreSQL backup (its marker).
    pub(crate) async fn holds_postgres(&self) -> Result<bool, Error> {
        Ok(self.get(postgres::MARKER).await?.is_some())
    }

    /// The base backups the bucket holds complete, oldest first.
    async fn bases(&self) -> Result<Vec<(OffsetDateTime, String)>, Error> {
        let mut found: Vec<(OffsetDateTime, String)> = self
            .list("base")
            .await?
            .into_iter()
            .filter_map(|(rel, _, _)| {
                let stamp = rel.strip_prefix("base/")?.strip_suffix(".done")?.to_owned();
                Some((postgres::parse_stamp(&stamp)?, stamp))
            })
            .collect();
        found.sort();
        Ok(found)
    }

    /// Whether a complete base backup is there.
    pub(crate) async fn has_base(&self) -> Result<bool, Error> {
        Ok(!self.bases().await?.is_empty())
    }
}

/// Ships a spool to a bucket; see the module docs.
pub(crate) struct Mirror {
    bucket: Bucket,
    spool: PathBuf,
    /// The segment being shipped in pieces and how much of it is in the bucket.
    partial: Option<(String, u64)>,
    marker_checked: bool,
    /// The newest WAL position the bucket holds.
    shipped: watch::Sender<u64>,
}

impl Mirror {
    pub(crate) fn new(bucket: Bucket, spool: PathBuf) -> Mirror {
        Mirror {
            bucket,
            spool,
            partial: None,
            marker_checked: false,
            shipped: watch::channel(0).0,
        }
    }

    /// Follows what the bucket holds.
    pub(crate) fn shipped(&self) -> watch::Receiver<u64> {
        self.shipped.subscribe()
    }

    /// Ships until the task is dropped: every 250 ms, what the receiver has flushed.
    pub(crate) async fn run(mut self, url: String) {
        let mut conn = None;
        loop {
            tokio::time::sleep(Duration::from_millis(250)).await;
            if conn.is_none() {
                conn = postgres::connect(&url).await.ok();
            }
            let Some(c) = conn.as_mut() else { continue };
            let flushed = match postgres::receiver_flushed(c).await {
                Ok(flushed) => flushed,
                Err(_) => {
                    conn = None;
                    continue;
                }
            };
            if let Err(e) = self.ship(flushed.unwrap_or(0)).await {
                tracing::warn!(error = %e, "shipping the backup to its bucket");
            }
        }
    }

    /// One pass: the marker, finished base backups, completed segments, and the segment
    /// being received as far as `flushed`. What is in the bucket leaves the spool.
    pub(crate) async fn ship(&mut self, flushed: u64) -> Result<(), Error> {
        if !self.marker_checked {
            let local = std::fs::read(self.spool.join(postgres::MARKER))
                .map_err(Error::io("reading the spool's marker"))?;
            match self.bucket.get(postgres::MARKER).await? {
                None => self.bucket.put(postgres::MARKER, local).await?,
                Some(theirs) if !postgres::same_cluster(&theirs, &local) => {
                    return Err(Error::Usage(format!(
                        "{} holds a backup of another PostgreSQL cluster: give each cluster a prefix of its own",
                        self.bucket.shown
                    )))
                }
                Some(_) => {}
            }
            self.marker_checked = true;
        }
        self.ship_bases().await?;
        let wal = self.spool.join("wal");
        let mut names: Vec<String> = std::fs::read_dir(&wal)
            .map_err(Error::io("reading the spool"))?
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        for name in &names {
            if name.ends_with(".partial") {
                continue;
            }
            let bytes = std::fs::read(wal.join(name)).map_err(Error::io("reading the spool"))?;
            self.bucket.put(&format!("wal/{name}"), bytes).await?;
            for (rel, _, _) in self.bucket.list("wal").await? {
                if rel.starts_with(&format!("wal/{name}.partial.")) {
                    self.bucket.delete(&rel).await?;
                }
            }
            std::fs::remove_file(wal.join(name)).map_err(Error::io("clearing the spool"))?;
        }
        let mut reached = *self.shipped.borrow();
        if let Some(name) = names.iter().find(|n| n.ends_with(".partial")) {
            let segment = name.trim_end_matches(".partial");
            let file = wal.join(name);
            let size = std::fs::metadata(&file).map(|m| m.len()).unwrap_or(0);
            if let Some(start) = segment_start(segment, size) {
                let end = flushed.saturating_sub(start).min(size);
                let from = match &self.partial {
                    Some((shipping, offset)) if shipping == segment => *offset,
                    _ => 0,
                };
                if end > from {
                    let bytes = read_range(&file, from, end)?;
                    self.bucket
                        .put(&format!("wal/{segment}.partial.{from:08x}"), bytes)
                        .await?;
                    self.partial = Some((segment.to_owned(), end));
                }
                reached = reached.max(start + end.max(from));
            }
        } else if let Some(last) = names.iter().rfind(|n| n.len() == 24) {
            reached = reached.max(segment_start(last, 16 << 20).unwrap_or(0) + (16 << 20));
        }
        if reached > *self.shipped.borrow() {
            self.bucket
                .put(postgres::PROVEN, postgres::lsn_text(reached).into_bytes())
                .await?;
            self.shipped.send_replace(reached);
        }
        Ok(())
    }

    async fn ship_bases(&self) -> Result<(), Error> {
        let base = self.spool.join("base");
        for entry in std::fs::read_dir(&base).map_err(Error::io("reading the spool"))? {
            let entry = entry.map_err(Error::io("reading the spool"))?;
            let stamp = entry.file_name().to_string_lossy().into_owned();
            if postgres::parse_stamp(&stamp).is_none() {
                continue;
            }
            let mut dirs = Vec::new();
            for (rel, file) in files_under(&entry.path(), "", &mut dirs)? {
                let bytes = std::fs::read(&file).map_err(Error::io("reading a base backup"))?;
                self.bucket
                    .put(&format!("base/{stamp}/{rel}"), bytes)
                    .await?;
            }
            self.bucket
                .put(&format!("base/{stamp}.done"), dirs.join("\n").into_bytes())
                .await?;
            std::fs::remove_dir_all(entry.path()).map_err(Error::io("clearing the spool"))?;
        }
        Ok(())
    }
}

/// The files under `dir`, with their paths relative to it; its directories go in `dirs`.
fn files_under(
    dir: &Path,
    rel: &str,
    dirs: &mut Vec<String>,
) -> Result<Vec<(String, PathBuf)>, Error> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(Error::io("reading a base backup"))? {
        let entry = entry.map_err(Error::io("reading a base backup"))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let sub = if rel.is_empty() {
            name
        } else {
            format!("{rel}/{name}")
        };
        if entry.path().is_dir() {
            dirs.push(sub.clone());
            out.extend(files_under(&entry.path(), &sub, dirs)?);
        } else {
            out.push((sub, entry.path()));
        }
    }
    Ok(out)
}

fn read_range(file: &Path, from: u64, to: u64) -> Result<Vec<u8>, Error> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(file).map_err(Error::io("reading the spool"))?;
    f.seek(SeekFrom::Start(from))
        .map_err(Error::io("reading the spool"))?;
    let mut bytes = vec![0; (to - from) as usize];
    f.read_exact(&mut bytes)
        .map_err(Error::io("reading the spool"))?;
    Ok(bytes)
}

/// The WAL position a segment file of `size` bytes begins at, from its name.
fn segment_start(name: &str, size: u64) -> Option<u64> {
    if name.len() != 24 || size == 0 || !size.is_power_of_two() {
        return None;
    }
    let log = u64::from_str_radix(&name[8..16], 16).ok()?;
    let seg = u64::from_str_radix(&name[16..24], 16).ok()?;
    Some((log << 32) + seg * size)
}

/// Fetches what a restore as of `at` needs from the bucket into `dir` (the layout of a
/// directory target): the marker, the proven position, the base backup chosen, and the WAL
/// from that base backup's first segment on, its pieces put back together.
pub(crate) async fn fetch(
    bucket: &Bucket,
    dir: &Path,
    at: Option<OffsetDateTime>,
) -> Result<(), Error> {
    let marker = bucket
        .get(postgres::MARKER)
        .await?
        .ok_or_else(|| Error::NoBackup {
            target: bucket.shown.clone(),
            why: format!("no {}", postgres::MARKER),
        })?;
    for sub in ["base", "wal"] {
        std::fs::create_dir_all(dir.join(sub)).map_err(Error::io("a scratch directory"))?;
    }
    std::fs::write(dir.join(postgres::MARKER), marker).map_err(Error::io("a scratch file"))?;
    if let Some(proven) = bucket.get(postgres::PROVEN).await? {
        std::fs::write(dir.join(postgres::PROVEN), proven).map_err(Error::io("a scratch file"))?;
    }
    let bases = bucket.bases().await?;
    let (_, stamp) = postgres::choose(&bases, at, &bucket.shown)?;
    let base = dir.join("base").join(&stamp);
    let dirs = bucket
        .get(&format!("base/{stamp}.done"))
        .await?
        .unwrap_or_default();
    for sub in String::from_utf8_lossy(&dirs)
        .lines()
        .filter(|l| !l.is_empty())
    {
        if sub.split('/').any(|part| part == ".." || part.is_empty()) {
            continue;
        }
        std::fs::create_dir_all(base.join(sub)).map_err(Error::io("a scratch directory"))?;
    }
    for (rel, _, _) in bucket.list(&format!("base/{stamp}/")).await? {
        let Some(inside) = rel.strip_prefix(&format!("base/{stamp}/")) else {
            continue;
        };
        let path = base.join(inside);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(Error::io("a scratch directory"))?;
        }
        let bytes = bucket.get(&rel).await?.unwrap_or_default();
        std::fs::write(&path, bytes).map_err(Error::io("a scratch file"))?;
    }
    let start = postgres::start_segment(&base)?;
    let wal = bucket.list("wal").await?;
    let whole: Vec<&str> = wal
        .iter()
        .filter_map(|(rel, _, _)| rel.strip_prefix("wal/"))
        .filter(|n| !n.contains(".partial."))
        .collect();
    for name in &whole {
        if postgres::wanted_segment(name, &start) {
            let bytes = bucket
                .get(&format!("wal/{name}"))
                .await?
                .unwrap_or_default();
            std::fs::write(dir.join("wal").join(name), bytes)
                .map_err(Error::io("a scratch file"))?;
        }
    }
    // The pieces of a segment that was never completed, each at its offset.
    let mut pieces: Vec<(&str, u64, &str)> = wal
        .iter()
        .filter_map(|(rel, _, _)| {
            let name = rel.strip_prefix("wal/")?;
            let (segment, offset) = name.split_once(".partial.")?;
            Some((segment, u64::from_str_radix(offset, 16).ok()?, rel.as_str()))
        })
        .filter(|(segment, _, _)| {
            !whole.contains(segment) && postgres::wanted_segment(segment, &start)
        })
        .collect();
    pieces.sort();
    for (segment, offset, rel) in pieces {
        use std::io::{Seek, SeekFrom, Write};
        let path = dir.join("wal").join(format!("{segment}.partial"));
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(Error::io("a scratch file"))?;
        // A segment's full size, as the receiver keeps it (zeros past what was received).
        file.set_len(file.metadata().map(|m| m.len()).unwrap_or(0).max(16 << 20))
            .map_err(Error::io("a scratch file"))?;
        let bytes = bucket.get(rel).await?.unwrap_or_default();
        file.seek(SeekFrom::Start(offset))
            .and_then(|_| file.write_all(&bytes))
            .map_err(Error::io("a scratch file"))?;
    }
    Ok(())
}

/// What the bucket holds: its base backups, and WAL up to the newest object.
pub(crate) async fn points(bucket: &Bucket) -> Result<Points, Error> {
    if !bucket.holds_postgres().await? {
        return Err(Error::NoBackup {
            target: bucket.shown.clone(),
            why: format!("no {}", postgres::MARKER),
        });
    }
    let everything = bucket.list("").await?;
    let snapshots: Vec<Point> = bucket
        .bases()
        .await?
        .into_iter()
        .map(|(at, stamp)| Point {
            at,
            bytes: everything
                .iter()
                .filter(|(rel, _, _)| rel.starts_with(&format!("base/{stamp}/")))
                .map(|(_, size, _)| size)
                .sum(),
            txid: stamp,
        })
        .collect();
    let first = snapshots
        .first()
        .map(|s| s.at)
        .ok_or_else(|| Error::NoBackup {
            target: bucket.shown.clone(),
            why: "it holds no base backup".into(),
        })?;
    let last = everything
        .iter()
        .filter(|(rel, _, _)| rel.starts_with("wal/"))
        .max_by_key(|(_, _, at)| *at)
        .map(|(rel, size, at)| Point {
            at: *at,
            txid: rel.trim_start_matches("wal/").to_owned(),
            bytes: *size,
        })
        .or_else(|| snapshots.last().cloned())
        .ok_or_else(|| Error::NoBackup {
            target: bucket.shown.clone(),
            why: "it holds no base backup".into(),
        })?;
    Ok(Points {
        snapshots,
        first,
        last,
        files: everything.len(),
        bytes: everything.iter().map(|(_, size, _)| size).sum(),
    })
}

/// Waits until the bucket holds WAL to at least `at` (10 s at most).
pub(crate) async fn shipped_to(shipped: &mut watch::Receiver<u64>, at: u64) -> Result<(), Error> {
    let reached = tokio::time::timeout(Duration::from_secs(10), shipped.wait_for(|s| *s >= at))
        .await
        .is_ok_and(|r| r.is_ok());
    match reached {
        true => Ok(()),
        false => Err(Error::Tool {
            what: "proving the backup".into(),
            detail: format!(
                "the bucket has WAL to {}, the server flushed to {}",
                postgres::lsn_text(*shipped.borrow()),
                postgres::lsn_text(at)
            ),
        }),
    }
}

/// Waits until the bucket's `proven` position reaches `at` (10 s at most): the proof that a
/// running mirror, in whatever process, shipped it.
pub(crate) async fn bucket_reaches(bucket: &Bucket, at: u64) -> Result<(), Error> {
    let started = std::time::Instant::now();
    loop {
        let proven = bucket
            .get(postgres::PROVEN)
            .await?
            .and_then(|b| postgres::lsn(std::str::from_utf8(&b).ok()?.trim()))
            .unwrap_or(0);
        if proven >= at {
            return Ok(());
        }
        if started.elapsed() > Duration::from_secs(10) {
            return Err(Error::Tool {
                what: "proving the backup".into(),
                detail: format!(
                    "{} has WAL to {}, the server flushed to {}",
                    bucket.shown,
                    postgres::lsn_text(proven),
                    postgres::lsn_text(at)
                ),
            });
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_segment_name_says_where_it_begins() {
        let mib16 = 16 << 20;
        assert_eq!(
            segment_start("000000010000000000000003", mib16),
            Some(3 * mib16)
        );
        assert_eq!(
            segment_start("000000020000000100000002", mib16),
            Some((1 << 32) + 2 * mib16)
        );
        assert_eq!(segment_start("00000001000000000000000", mib16), None);
        assert_eq!(segment_start("000000010000000000000003", 1000), None);
    }
}
