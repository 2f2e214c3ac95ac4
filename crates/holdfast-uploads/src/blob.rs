//! Where an upload's bytes live: one small trait, [`BlobStore`], and its backends.
//!
//! A blob store keeps *parts*: each writer's bytes go into a part numbered by the store's
//! ledger (`Store::upload_next_part`), a number no other writer ever gets, so a writer that lost
//! its lease can only ever write into a part the ledger will never name. A part is durable
//! when [`PartWriter::finish`] returns; only then is it acknowledged. Reads follow the ledger.

use crate::Error;
use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use futures::stream::BoxStream;
use holdfast_store::UploadPart;
use std::io::{Read, Seek, SeekFrom, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};

/// A stream of an upload's bytes.
pub type ByteStream = BoxStream<'static, Result<Bytes, std::io::Error>>;

/// Where upload bytes are kept. Every method may be called by any instance for any upload.
#[async_trait]
pub trait BlobStore: Send + Sync + 'static {
    /// Prepares for a new upload; the handle returned (if any) is kept with the upload's row
    /// and passed back to every later call.
    async fn begin(&self, upload: &str) -> Result<Option<String>, Error>;
    /// Starts a part of `upload` at `place`.
    async fn part(
        &self,
        upload: &str,
        handle: Option<&str>,
        place: PartPlace,
    ) -> Result<Box<dyn PartWriter>, Error>;
    /// Whether a part shorter than the part size that is not the upload's last is kept only
    /// as a *tail*: acknowledged and durable, but absorbed (re-read and written again) by the
    /// next PATCH's first part, so that every part but the last is exactly the part size (S3's
    /// multipart upload wants parts of at least 5 MiB, numbered by position).
    fn keeps_tails(&self) -> bool {
        false
    }
    /// Throws away a finished part the ledger will not name (a checksum that did not match).
    async fn drop_part(
        &self,
        upload: &str,
        handle: Option<&str>,
        part_no: i64,
    ) -> Result<(), Error>;
    /// The upload is complete and `parts` is its whole ledger.
    async fn complete(
        &self,
        upload: &str,
        handle: Option<&str>,
        parts: &[UploadPart],
    ) -> Result<(), Error>;
    /// Bytes `range` of a complete upload whose ledger is `parts`.
    async fn read(
        &self,
        upload: &str,
        handle: Option<&str>,
        parts: &[UploadPart],
        range: Range<u64>,
    ) -> Result<ByteStream, Error>;
    /// Removes everything kept for `upload`, named by the ledger or not. Removing what is
    /// already gone succeeds.
    async fn remove(&self, upload: &str, handle: Option<&str>) -> Result<(), Error>;
}

/// One part being written. Dropped without [`PartWriter::finish`], its bytes were never
/// acknowledged and may be left behind until the upload is removed.
#[async_trait]
pub trait PartWriter: Send {
    async fn write(&mut self, bytes: Bytes) -> Result<(), Error>;
    /// Makes the part durable; the store's tag for it, if it has one (`None` for a store
    /// that keeps tails: this part is a tail). `last`: it ends the upload.
    async fn finish(self: Box<Self>, last: bool) -> Result<Option<String>, Error>;
}

/// Where a part goes: its number (unique to its writer, from the ledger), the offset it
/// starts at, and the upload's part size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartPlace {
    pub no: i64,
    pub start: i64,
    pub size: usize,
}

/// Parts as files under a directory on a local disk (the default: `<data dir>/uploads`): one
/// directory per upload, one file per part. Durable means `fdatasync` on the file and `fsync`
/// on the directory that names it.
#[derive(Debug, Clone)]
pub struct LocalDir {
    root: PathBuf,
}

/// How much a local part buffers before it writes (one system call per this many bytes).
const WRITE_BUFFER: usize = 1024 * 1024;
/// How much of a part one read hands to the response at a time.
const READ_CHUNK: usize = 256 * 1024;

impl LocalDir {
    /// Parts under `root`, created if missing.
    pub fn new(root: impl Into<PathBuf>) -> Result<Self, Error> {
        let root = root.into();
        std::fs::create_dir_all(&root)?;
        Ok(Self { root })
    }

    fn dir(&self, upload: &str) -> PathBuf {
        self.root.join(upload)
    }

    fn part_path(&self, upload: &str, part_no: i64) -> PathBuf {
        self.dir(upload).join(format!("{part_no:010}"))
    }
}

/// Makes a directory's entries durable.
fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> Result<T, Error> {
    Ok(tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| std::io::Error::other(e.to_string()))??)
}

#[async_trait]
impl BlobStore for LocalDir {
    async fn begin(&self, upload: &str) -> Result<Option<String>, Error> {
        let (root, dir) = (self.root.clone(), self.dir(upload));
        blocking(move || {
            std::fs::create_dir_all(&dir)?;
            sync_dir(&root)
        })
        .await?;
        Ok(None)
    }

    async fn part(
        &self,
        upload: &str,
        _handle: Option<&str>,
        place: PartPlace,
    ) -> Result<Box<dyn PartWriter>, Error> {
        let (dir, path) = (self.dir(upload), self.part_path(upload, place.no));
        // The directory is the upload's (made by `begin`): a writer whose upload was removed
        // meanwhile finds it gone instead of leaving a file behind.
        let file = blocking(move || {
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&path)
        })
        .await?;
        Ok(Box::new(LocalPart::start(file, dir)))
    }

    async fn drop_part(
        &self,
        upload: &str,
        _handle: Option<&str>,
        part_no: i64,
    ) -> Result<(), Error> {
        let path = self.part_path(upload, part_no);
        blocking(move || match std::fs::remove_file(path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        })
        .await
    }

    async fn complete(
        &self,
        upload: &str,
        _handle: Option<&str>,
        parts: &[UploadPart],
    ) -> Result<(), Error> {
        // The ledger's parts are the upload; any other file in its directory is a part a
        // writer never got acknowledged (it died, or lost its lease): sweep them now.
        let dir = self.dir(upload);
        let keep: std::collections::HashSet<String> =
            parts.iter().map(|p| format!("{:010}", p.part_no)).collect();
        blocking(move || {
            for entry in std::fs::read_dir(&dir)? {
                let entry = entry?;
                if !keep.contains(entry.file_name().to_string_lossy().as_ref()) {
                    std::fs::remove_file(entry.path())?;
                }
            }
            Ok(())
        })
        .await
    }

    async fn read(
        &self,
        upload: &str,
        _handle: Option<&str>,
        parts: &[UploadPart],
        range: Range<u64>,
    ) -> Result<ByteStream, Error> {
        // Each piece: a part's file, where to start in it, how many bytes.
        let mut pieces = std::collections::VecDeque::new();
        for p in parts {
            let (start, len) = (p.start_offset as u64, p.part_length as u64);
            let (from, to) = (range.start.max(start), range.end.min(start + len));
            if from < to {
                pieces.push_back((self.part_path(upload, p.part_no), from - start, to - from));
            }
        }
        let stream = futures::stream::try_unfold(
            (pieces, None::<(std::fs::File, u64)>),
            |(mut pieces, mut open)| async move {
                loop {
                    if let Some((file, left)) = open.take() {
                        if left > 0 {
                            let want = left.min(READ_CHUNK as u64) as usize;
                            let (file, chunk) = tokio::task::spawn_blocking(move || {
                                let mut file = file;
                                let mut buf = vec![0; want];
                                file.read_exact(&mut buf)?;
                                Ok::<_, std::io::Error>((file, buf))
                            })
                            .await
                            .map_err(|e| std::io::Error::other(e.to_string()))??;
                            let left = left - chunk.len() as u64;
                            return Ok(Some((Bytes::from(chunk), (pieces, Some((file, left))))));
                        }
                    }
                    let Some((path, skip, len)) = pieces.pop_front() else {
                        return Ok(None);
                    };
                    let file = tokio::task::spawn_blocking(move || {
                        let mut f = std::fs::File::open(path)?;
                        f.seek(SeekFrom::Start(skip))?;
                        Ok::<_, std::io::Error>(f)
                    })
                    .await
                    .map_err(|e| std::io::Error::other(e.to_string()))??;
                    open = Some((file, len));
                }
            },
        );
        Ok(Box::pin(stream))
    }

    async fn remove(&self, upload: &str, _handle: Option<&str>) -> Result<(), Error> {
        let (root, dir) = (self.root.clone(), self.dir(upload));
        blocking(move || match std::fs::remove_dir_all(&dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => sync_dir(&root),
        })
        .await
    }
}

/// A part file being written: bytes gather in `buf` and go a megabyte at a time to a thread
/// of its own that writes them, so the network and the disk work at once. At most
/// [`WRITES_QUEUED`] megabytes wait for it.
struct LocalPart {
    /// `None` once finished.
    to_writer: Option<tokio::sync::mpsc::Sender<Bytes>>,
    /// The writer: it writes what it is sent, then (once the sender is gone) makes the file
    /// and its name durable.
    writer: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
    buf: BytesMut,
}

/// Buffers queued for a part's writer thread.
const WRITES_QUEUED: usize = 4;

impl LocalPart {
    fn start(mut file: std::fs::File, dir: PathBuf) -> Self {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Bytes>(WRITES_QUEUED);
        let writer = tokio::task::spawn_blocking(move || {
            while let Some(data) = rx.blocking_recv() {
                file.write_all(&data)?;
            }
            file.sync_data()?;
            sync_dir(&dir)
        });
        Self {
            to_writer: Some(tx),
            writer: Some(writer),
            buf: BytesMut::with_capacity(WRITE_BUFFER),
        }
    }

    /// Hands the buffer to the writer; a writer that stopped says why.
    async fn flush(&mut self) -> Result<(), Error> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let data = self.buf.split().freeze();
        let sent = match &self.to_writer {
            Some(tx) => tx.send(data).await.is_ok(),
            None => false,
        };
        if sent {
            Ok(())
        } else {
            self.to_writer = None;
            Err(self
                .writer_result()
                .await
                .err()
                .unwrap_or_else(|| std::io::Error::other("the part's writer stopped").into()))
        }
    }

    async fn writer_result(&mut self) -> Result<(), Error> {
        match self.writer.take() {
            Some(w) => Ok(w
                .await
                .map_err(|e| std::io::Error::other(e.to_string()))??),
            None => Err(std::io::Error::other("the part's writer is gone").into()),
        }
    }
}

#[async_trait]
impl PartWriter for LocalPart {
    async fn write(&mut self, bytes: Bytes) -> Result<(), Error> {
        self.buf.extend_from_slice(&bytes);
        if self.buf.len() >= WRITE_BUFFER {
            self.flush().await?;
        }
        Ok(())
    }

    async fn finish(mut self: Box<Self>, _last: bool) -> Result<Option<String>, Error> {
        self.flush().await?;
        // The writer ends once the sender is gone: it syncs the file and its directory.
        self.to_writer = None;
        self.writer_result().await?;
        Ok(None)
    }
}
