//! Upload bytes in S3-compatible object storage, through `object_store`'s multipart API, for
//! a fleet whose instances share no disk.
//!
//! An upload is one multipart upload of the object `<prefix>/<upload id>`, begun at creation;
//! its id is the upload's blob handle, kept in our store, so any instance continues it. Every
//! multipart part is exactly the part size and sits at its position (part number = offset ÷
//! part size + 1), except the upload's last; a shorter part that is not the last (the end of
//! a PATCH) is a *tail*: a plain object `<prefix>/<upload id>.tails/<part no>`, acknowledged
//! like any part, whose bytes the next PATCH re-reads into its first part (see
//! `BlobStore::keeps_tails`). Completion lists the ledger's parts with their ETags; S3 refuses
//! a part whose bytes are not the ones the ledger acknowledged.

use crate::blob::{BlobStore, ByteStream, PartPlace, PartWriter};
use crate::Error;
use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use futures::{StreamExt, TryStreamExt};
use holdfast_store::UploadPart;
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::multipart::{MultipartStore, PartId};
use object_store::path::Path;
use object_store::{GetOptions, ObjectStore, ObjectStoreExt, PutPayload};
use std::ops::Range;
use std::sync::Arc;

/// Parts in an S3 bucket (see the module docs).
#[derive(Debug, Clone)]
pub struct S3Blobs {
    s3: Arc<AmazonS3>,
    prefix: String,
}

fn remote(e: object_store::Error) -> Error {
    Error::Blob(std::io::Error::other(e.to_string()))
}

fn not_found(e: &object_store::Error) -> bool {
    matches!(e, object_store::Error::NotFound { .. })
}

impl S3Blobs {
    /// The bucket and prefix of `url` (`s3://bucket/some/prefix`), with the endpoint,
    /// region and credentials from the standard `AWS_*` environment variables
    /// (`AWS_ENDPOINT`, `AWS_ALLOW_HTTP`, `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
    /// `AWS_DEFAULT_REGION`). Nothing is contacted until the first upload.
    pub fn from_env(url: &str) -> Result<Self, Error> {
        Self::build(AmazonS3Builder::from_env(), url)
    }

    /// `url`'s bucket and prefix on the server at `endpoint` (`http://…` allowed), with these
    /// credentials: for tests and local servers.
    pub fn at_endpoint(
        url: &str,
        endpoint: &str,
        key_id: &str,
        secret: &str,
    ) -> Result<Self, Error> {
        let builder = AmazonS3Builder::new()
            .with_endpoint(endpoint)
            .with_allow_http(true)
            .with_region("us-east-1")
            .with_access_key_id(key_id)
            .with_secret_access_key(secret);
        Self::build(builder, url)
    }

    fn build(builder: AmazonS3Builder, url: &str) -> Result<Self, Error> {
        let rest = url.strip_prefix("s3://").ok_or_else(|| {
            Error::Blob(std::io::Error::other(format!(
                "{url}: an S3 blob store is named s3://bucket[/prefix]"
            )))
        })?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        let s3 = builder.with_bucket_name(bucket).build().map_err(remote)?;
        Ok(Self {
            s3: Arc::new(s3),
            prefix: prefix.trim_matches('/').to_owned(),
        })
    }

    fn object(&self, upload: &str) -> Path {
        if self.prefix.is_empty() {
            Path::from(upload)
        } else {
            Path::from(format!("{}/{upload}", self.prefix))
        }
    }

    fn tails(&self, upload: &str) -> Path {
        Path::from(format!("{}.tails", self.object(upload)))
    }

    fn tail(&self, upload: &str, part_no: i64) -> Path {
        Path::from(format!("{}/{part_no:010}", self.tails(upload)))
    }

    fn handle(handle: Option<&str>) -> Result<String, Error> {
        handle.map(str::to_owned).ok_or_else(|| {
            Error::Blob(std::io::Error::other(
                "an S3 upload without its multipart id",
            ))
        })
    }

    async fn remove_tails(&self, upload: &str) -> Result<(), Error> {
        let prefix = self.tails(upload);
        let tails: Vec<_> = self
            .s3
            .list(Some(&prefix))
            .try_collect()
            .await
            .map_err(remote)?;
        for t in tails {
            match self.s3.delete(&t.location).await {
                Err(e) if !not_found(&e) => return Err(remote(e)),
                _ => {}
            }
        }
        Ok(())
    }

    async fn stream(
        &self,
        path: &Path,
        range: Range<u64>,
    ) -> Result<ByteStream, object_store::Error> {
        let got = self
            .s3
            .get_opts(
                path,
                GetOptions {
                    range: Some(range.into()),
                    ..GetOptions::default()
                },
            )
            .await?;
        Ok(got
            .into_stream()
            .map_err(|e| std::io::Error::other(e.to_string()))
            .boxed())
    }
}

#[async_trait]
impl BlobStore for S3Blobs {
    async fn begin(&self, upload: &str) -> Result<Option<String>, Error> {
        let id = self
            .s3
            .create_multipart(&self.object(upload))
            .await
            .map_err(remote)?;
        Ok(Some(id))
    }

    async fn part(
        &self,
        upload: &str,
        handle: Option<&str>,
        place: PartPlace,
    ) -> Result<Box<dyn PartWriter>, Error> {
        Ok(Box::new(S3Part {
            blobs: self.clone(),
            upload: upload.to_owned(),
            handle: Self::handle(handle)?,
            place,
            buf: BytesMut::new(),
        }))
    }

    fn keeps_tails(&self) -> bool {
        true
    }

    async fn drop_part(
        &self,
        upload: &str,
        _handle: Option<&str>,
        part_no: i64,
    ) -> Result<(), Error> {
        // A multipart part the ledger does not name is left out of the completion; a tail is
        // an object of its own.
        match self.s3.delete(&self.tail(upload, part_no)).await {
            Err(e) if !not_found(&e) => Err(remote(e)),
            _ => Ok(()),
        }
    }

    async fn complete(
        &self,
        upload: &str,
        handle: Option<&str>,
        parts: &[UploadPart],
    ) -> Result<(), Error> {
        let object = self.object(upload);
        let ids: Vec<PartId> = parts
            .iter()
            .map(|p| PartId {
                content_id: p.etag.clone().unwrap_or_default(),
            })
            .collect();
        if let Err(e) = self
            .s3
            .complete_multipart(&object, &Self::handle(handle)?, ids)
            .await
        {
            // Completed already (by an instance that died before it could say so)?
            if self.s3.head(&object).await.is_err() {
                return Err(remote(e));
            }
        }
        self.remove_tails(upload).await
    }

    async fn read(
        &self,
        upload: &str,
        handle: Option<&str>,
        parts: &[UploadPart],
        range: Range<u64>,
    ) -> Result<ByteStream, Error> {
        if let [tail] = parts {
            if tail.etag.is_none() {
                let start = tail.start_offset as u64;
                let within = range.start - start..range.end - start;
                return self
                    .stream(&self.tail(upload, tail.part_no), within)
                    .await
                    .map_err(remote);
            }
        }
        if range.is_empty() {
            return Ok(futures::stream::empty().boxed());
        }
        let object = self.object(upload);
        match self.stream(&object, range.clone()).await {
            Ok(stream) => Ok(stream),
            // Acknowledged complete, but the instance that did it died before completing the
            // multipart upload: complete it now.
            Err(e) if not_found(&e) => {
                self.complete(upload, handle, parts).await?;
                self.stream(&object, range).await.map_err(remote)
            }
            Err(e) => Err(remote(e)),
        }
    }

    async fn remove(&self, upload: &str, handle: Option<&str>) -> Result<(), Error> {
        let object = self.object(upload);
        if let Some(id) = handle {
            // Gone already if it was completed or aborted before.
            let _ = self.s3.abort_multipart(&object, &id.to_owned()).await;
        }
        match self.s3.delete(&object).await {
            Err(e) if !not_found(&e) => return Err(remote(e)),
            _ => {}
        }
        self.remove_tails(upload).await
    }
}

/// A part on its way to S3: buffered (at most the part size), sent when finished — as a
/// multipart part if it is whole or the upload's last, else as a tail.
struct S3Part {
    blobs: S3Blobs,
    upload: String,
    handle: String,
    place: PartPlace,
    buf: BytesMut,
}

#[async_trait]
impl PartWriter for S3Part {
    async fn write(&mut self, bytes: Bytes) -> Result<(), Error> {
        self.buf.extend_from_slice(&bytes);
        Ok(())
    }

    async fn finish(self: Box<Self>, last: bool) -> Result<Option<String>, Error> {
        let payload = PutPayload::from(self.buf.freeze());
        let size = self.place.size.max(1) as i64;
        if payload.content_length() == self.place.size || last {
            let index = usize::try_from(self.place.start / size).map_err(|_| {
                Error::Blob(std::io::Error::other("a part before the upload's start"))
            })?;
            let part = self
                .blobs
                .s3
                .put_part(
                    &self.blobs.object(&self.upload),
                    &self.handle,
                    index,
                    payload,
                )
                .await
                .map_err(remote)?;
            Ok(Some(part.content_id))
        } else {
            self.blobs
                .s3
                .put(&self.blobs.tail(&self.upload, self.place.no), payload)
                .await
                .map_err(remote)?;
            Ok(None)
        }
    }
}
