//! `holdfast-uploads` in-process, without the shop: the edge's accounts and sessions plus the
//! uploads routes (attached to nothing), on a fresh store of either engine and a blob
//! directory. Siblings share the database and the blob directory, as instances of one
//! machine do, so a test can start an upload on one and finish it on another.

use crate::app::{raw_request, send, Reply};
use axum::body::Body;
use axum::http::Request;
use axum::http::StatusCode;
use axum::Router;
use holdfast_store::{Store, StoreOptions};
use holdfast_uploads::{BlobStore, LocalDir, Unattached, UploadOptions, Uploads};
use holdfast_web::AppState;
use std::sync::Arc;

/// One instance serving uploads.
pub struct UploadApp {
    pub router: Router,
    pub uploads: Uploads,
    pub store: Store,
    pub url: String,
    /// Where local parts are (unless `blobs` is elsewhere).
    pub dir: Arc<tempfile::TempDir>,
    pub blobs: Arc<dyn BlobStore>,
}

/// An instance on the database at `url` (migrated here), blobs in a new directory.
pub async fn spawn_uploads(url: &str, opts: UploadOptions) -> UploadApp {
    let dir = Arc::new(tempfile::tempdir().expect("tempdir"));
    let blobs = Arc::new(LocalDir::new(dir.path().join("uploads")).expect("blob dir"));
    instance(url, dir, blobs, opts).await
}

/// [`spawn_uploads`] with its blobs in `blobs` (an S3 bucket, say).
pub async fn spawn_uploads_on(
    url: &str,
    blobs: Arc<dyn BlobStore>,
    opts: UploadOptions,
) -> UploadApp {
    instance(
        url,
        Arc::new(tempfile::tempdir().expect("tempdir")),
        blobs,
        opts,
    )
    .await
}

async fn instance(
    url: &str,
    dir: Arc<tempfile::TempDir>,
    blobs: Arc<dyn BlobStore>,
    opts: UploadOptions,
) -> UploadApp {
    let store = Store::open(&StoreOptions::new(url))
        .await
        .expect("open the store");
    let uploads = Uploads::new(store.clone(), blobs.clone(), Arc::new(Unattached), opts);
    let edge = AppState::new(store.clone(), crate::app::local(), None);
    let router = holdfast_web::app_with_streams(
        edge.clone(),
        Router::new(),
        holdfast_uploads::router(edge, uploads.clone()),
    );
    UploadApp {
        router,
        uploads,
        store,
        url: url.to_owned(),
        dir,
        blobs,
    }
}

/// The content type of tus bytes.
pub const OCTETS: &str = "application/offset+octet-stream";

/// Deterministic bytes: `n` of them, different for each `seed`.
pub fn data(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// A header of a reply, if it is there and ASCII.
pub fn header<'r>(r: &'r Reply, name: &str) -> Option<&'r str> {
    r.headers.get(name).and_then(|v| v.to_str().ok())
}

/// The `Upload-Offset` a reply names.
pub fn offset_of(r: &Reply) -> Option<i64> {
    header(r, "upload-offset").and_then(|v| v.parse().ok())
}

/// Options with 64 KiB parts, so a few hundred KiB cross several.
pub fn small_parts() -> UploadOptions {
    UploadOptions {
        part_size: 64 * 1024,
        ..UploadOptions::default()
    }
}

/// A tus creation (`POST /api/uploads`) of `length` bytes with `metadata`, by `cookie`'s user.
pub fn creation(cookie: &str, length: usize, metadata: &str) -> axum::http::Request<Body> {
    raw_request(
        "POST",
        "/api/uploads",
        None,
        Vec::new(),
        &[
            ("cookie", cookie),
            ("tus-resumable", "1.0.0"),
            ("upload-length", &length.to_string()),
            ("upload-metadata", metadata),
        ],
    )
}

impl UploadApp {
    /// `POST /api/uploads` of `length` bytes with `metadata`, which must succeed: its
    /// `Location`.
    pub async fn create(&self, cookie: &str, length: usize, metadata: &str) -> String {
        let r = self.send(creation(cookie, length, metadata)).await;
        assert_eq!(
            r.status,
            StatusCode::CREATED,
            "{}",
            String::from_utf8_lossy(&r.body)
        );
        assert_eq!(header(&r, "tus-resumable"), Some("1.0.0"));
        assert!(
            header(&r, "upload-expires").is_some(),
            "an unfinished upload says when it expires"
        );
        header(&r, "location").expect("Location").to_owned()
    }

    /// `PATCH` of `bytes` at `offset`, with `extra` headers.
    pub async fn patch(
        &self,
        cookie: &str,
        at: &str,
        offset: usize,
        bytes: &[u8],
        extra: &[(&str, &str)],
    ) -> Reply {
        let offset = offset.to_string();
        let mut headers = vec![
            ("cookie", cookie),
            ("tus-resumable", "1.0.0"),
            ("upload-offset", offset.as_str()),
        ];
        headers.extend_from_slice(extra);
        self.send(raw_request(
            "PATCH",
            at,
            Some(OCTETS),
            bytes.to_vec(),
            &headers,
        ))
        .await
    }

    pub async fn head(&self, cookie: &str, at: &str) -> Reply {
        self.send(raw_request(
            "HEAD",
            at,
            None,
            Vec::new(),
            &[("cookie", cookie), ("tus-resumable", "1.0.0")],
        ))
        .await
    }

    pub async fn get(&self, cookie: &str, at: &str, extra: &[(&str, &str)]) -> Reply {
        let mut headers = vec![("cookie", cookie)];
        headers.extend_from_slice(extra);
        self.send(raw_request("GET", at, None, Vec::new(), &headers))
            .await
    }

    /// Reaps expired and deleted uploads now; how many went.
    pub async fn reap_now(&self) -> usize {
        self.uploads.reap(100).await.expect("reap")
    }

    pub async fn delete(&self, cookie: &str, at: &str) -> Reply {
        self.send(raw_request(
            "DELETE",
            at,
            None,
            Vec::new(),
            &[("cookie", cookie), ("tus-resumable", "1.0.0")],
        ))
        .await
    }

    /// Another instance on the same database and blob store, with its own options.
    pub async fn sibling(&self, opts: UploadOptions) -> UploadApp {
        instance(&self.url, self.dir.clone(), self.blobs.clone(), opts).await
    }

    /// Signs up and logs in; the `Cookie` header value.
    pub async fn user(&self, email: &str) -> String {
        crate::app::sign_up(&self.router, email).await
    }

    pub async fn send(&self, req: Request<Body>) -> Reply {
        send(&self.router, req).await
    }
}
