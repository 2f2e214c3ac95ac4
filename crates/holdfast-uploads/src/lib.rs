//! Long uploads that survive the instance: tus 1.0.0 (core, creation, creation-with-upload,
//! expiration, checksum with sha1 and sha256, termination) with no sticky sessions.
//!
//! Why a crate of its own: an upload is the third kind of state a web service owns, after its
//! records and its sessions, and the one that breaks "any instance serves any request" first
//! (tus servers usually need sticky routing or a lock server). Here nothing about an upload
//! lives in a process:
//!
//! - **State in the durable store** (`holdfast_store`'s `uploads` and `upload_parts`): the
//!   length, the acknowledged offset, the metadata, the fence and the part ledger. Any
//!   instance answers `HEAD` and continues a `PATCH`.
//! - **Bytes in a blob store** ([`BlobStore`]): [`LocalDir`] by default, [`S3Blobs`] for a
//!   fleet that shares no disk; as parts, each numbered by the ledger.
//! - **One writer at a time, fenced**: a `PATCH` takes the upload for a short lease
//!   ([`UploadOptions::lease`], renewed while bytes flow) by bumping its `attempt`; every part
//!   it acknowledges names that attempt and the offset it started from, so a writer that
//!   stalled past its lease can never move the offset after a newer writer did. A second
//!   `PATCH` while the lease runs gets 423 with the authoritative `Upload-Offset`.
//! - **Acknowledged means durable**: a part is acknowledged (the offset moves) only after the
//!   blob store said its bytes are durable. Without a checksum to check, a `PATCH` with a
//!   declared length acknowledges every [`UploadOptions::part_size`] bytes as they come, so an
//!   instance killed mid-`PATCH` loses at most the part it was writing.
//!
//! The application decides what an upload may be attached to ([`Attach`]) and mounts
//! [`router`]; [`Uploads::reap`] removes expired and deleted uploads' bytes.
//!
//! Architecture invariant: no upload state in memory between requests, and no byte
//! acknowledged before it is durable.

pub mod blob;
mod http;
mod s3;
pub mod tus;

pub use blob::{BlobStore, ByteStream, LocalDir, PartPlace, PartWriter};
pub use http::{router, routes};
pub use s3::S3Blobs;
pub use tus::Metadata;

use async_trait::async_trait;
use holdfast_store::Store;
use holdfast_web::AppError;
use std::sync::Arc;
use std::time::Duration;

/// What can go wrong below the HTTP edge.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("store: {0}")]
    Store(#[from] holdfast_store::Error),
    #[error("blob store: {0}")]
    Blob(#[from] std::io::Error),
}

/// The knobs. Defaults are production values.
#[derive(Debug, Clone)]
pub struct UploadOptions {
    /// Where the routes are mounted (`Location` headers name uploads under it).
    pub base_path: String,
    /// The largest upload (`Tus-Max-Size`).
    pub max_size: i64,
    /// What one user may hold at once: bytes declared by uploads not deleted, and unfinished
    /// uploads.
    pub quota: holdfast_store::UploadQuota,
    /// An unfinished upload untouched this long expires (`Upload-Expires`) and is reaped.
    pub expire_after: Duration,
    /// How long a `PATCH` holds an upload without renewing (it renews every third of this
    /// while bytes arrive). A resumed upload whose last writer died waits at most this long.
    pub lease: Duration,
    /// Bytes per blob part: acknowledged (without a checksum) as each fills, so the most an
    /// instance killed mid-`PATCH` loses.
    pub part_size: usize,
    /// A body that sends nothing for this long is abandoned (what arrived and is durable is
    /// kept when it can be).
    pub body_idle_timeout: Duration,
}

impl Default for UploadOptions {
    fn default() -> Self {
        Self {
            base_path: "/api/uploads".into(),
            max_size: 4 << 30,
            quota: holdfast_store::UploadQuota {
                bytes: 16 << 30,
                unfinished: 32,
            },
            expire_after: Duration::from_secs(24 * 3600),
            lease: Duration::from_secs(4),
            part_size: 8 << 20,
            body_idle_timeout: Duration::from_secs(30),
        }
    }
}

/// What an application says an upload is for. Called on creation with the user and the
/// upload's metadata; the answer is the upload's `subject` (shown in listings), or the
/// client's mistake as an error (a 4xx; the upload is not created).
#[async_trait]
pub trait Attach: Send + Sync + 'static {
    async fn subject(
        &self,
        store: &Store,
        user: &str,
        metadata: &Metadata,
    ) -> Result<String, AppError>;
}

/// Uploads attached to nothing in particular (subject `""`).
pub struct Unattached;

#[async_trait]
impl Attach for Unattached {
    async fn subject(&self, _: &Store, _: &str, _: &Metadata) -> Result<String, AppError> {
        Ok(String::new())
    }
}

/// The uploads' state for the routes: the store, the blob store, the options and the
/// application's [`Attach`]. Cheap to clone.
#[derive(Clone)]
pub struct Uploads {
    store: Store,
    blobs: Arc<dyn BlobStore>,
    attach: Arc<dyn Attach>,
    opts: Arc<UploadOptions>,
}

impl Uploads {
    pub fn new(
        store: Store,
        blobs: Arc<dyn BlobStore>,
        attach: Arc<dyn Attach>,
        opts: UploadOptions,
    ) -> Self {
        Self {
            store,
            blobs,
            attach,
            opts: Arc::new(opts),
        }
    }

    pub fn options(&self) -> &UploadOptions {
        &self.opts
    }

    /// Removes the bytes and rows of uploads deleted, or expired unfinished, by now (at most
    /// `limit`); how many went. Any number of instances may reap at once: each upload is
    /// taken (fenced) before its bytes go, and a writer that resumed it first keeps it.
    pub async fn reap(&self, limit: i64) -> Result<usize, Error> {
        let now = holdfast_core::now_ms();
        let mut reaped = 0;
        let mut failed = None;
        for row in self.store.upload_reapable(now, limit).await? {
            if !self.store.upload_take_for_reaping(&row, now).await? {
                continue;
            }
            // One upload whose bytes cannot go now does not hold up the others.
            match self.blobs.remove(&row.id, row.blob_handle.as_deref()).await {
                Ok(()) => {
                    self.store.upload_forget(&row.id).await?;
                    reaped += 1;
                }
                Err(e) => failed = Some(e),
            }
        }
        match failed {
            Some(e) if reaped == 0 => Err(e),
            Some(e) => {
                tracing::warn!(error = %e, "some uploads' bytes could not be removed; will try again");
                Ok(reaped)
            }
            None => Ok(reaped),
        }
    }

    /// Reaps every `every` until `shutdown` resolves; failures are logged and tried again.
    pub async fn run_reaper(
        &self,
        every: Duration,
        shutdown: impl std::future::Future<Output = ()>,
    ) {
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                () = &mut shutdown => return,
                () = tokio::time::sleep(every) => {}
            }
            match self.reap(100).await {
                Ok(0) => {}
                Ok(n) => tracing::info!(reaped = n, "reaped expired or deleted uploads"),
                Err(e) => tracing::warn!(error = %e, "reaping uploads failed; will try again"),
            }
        }
    }
}
