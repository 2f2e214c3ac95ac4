//! The S3 blob store against a real S3-compatible server (moto's, `scripts/install-s3-server.sh`):
//! uploads in PATCHes smaller than S3's 5 MiB part minimum, moving between instances, end as
//! one object with exactly the bytes sent; tails are absorbed and swept; termination and the
//! reaper leave the bucket empty, with no multipart upload left open.

use holdfast_testkit::s3::S3Server;
use holdfast_testkit::uploads::{data, offset_of, spawn_uploads_on};
use holdfast_uploads::{S3Blobs, UploadOptions};
use std::sync::Arc;
use std::time::Duration;

/// S3's smallest part (but the last): the part size of these tests.
const FIVE_MIB: usize = 5 << 20;

fn s3_parts() -> UploadOptions {
    UploadOptions {
        part_size: FIVE_MIB,
        ..UploadOptions::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn small_patches_on_two_instances_become_one_object() {
    let Some(s3) = S3Server::start("s3_small_patches").await else {
        return;
    };
    let bucket = s3.bucket("reviews").await;
    let blobs = S3Blobs::at_endpoint(&format!("{bucket}/videos"), &s3.endpoint, "test", "test")
        .expect("S3 blob store");
    let db = tempfile::tempdir().expect("tempdir");
    let url = holdfast_store::testing::sqlite_url(db.path());
    let a = spawn_uploads_on(&url, Arc::new(blobs), s3_parts()).await;
    let b = a.sibling(s3_parts()).await;
    let cookie = a.user("s3@example.com").await;
    let bytes = data(12 << 20, 4);
    let at = a.create(&cookie, bytes.len(), "").await;
    assert_eq!(s3.open_multiparts("reviews").await, 1, "begun at creation");

    // 1 MiB at a time, on alternate instances: each PATCH ends in a tail the next absorbs.
    let mut offset = 0;
    for (i, chunk) in bytes[..8 << 20].chunks(1 << 20).enumerate() {
        let app = if i % 2 == 0 { &a } else { &b };
        let r = app.patch(&cookie, &at, offset, chunk, &[]).await;
        assert_eq!(r.status, 204, "{}", String::from_utf8_lossy(&r.body));
        offset += chunk.len();
        assert_eq!(offset_of(&r), Some(offset as i64));
        assert_eq!(offset_of(&b.head(&cookie, &at).await), Some(offset as i64));
    }
    let tails = s3.keys("reviews").await;
    assert_eq!(tails.len(), 1, "one tail waits to be absorbed: {tails:?}");
    assert!(
        tails[0].starts_with("videos/") && tails[0].contains(".tails/"),
        "{tails:?}"
    );

    // The rest in one PATCH with a checksum, on the other instance.
    use base64::Engine;
    use sha2::Digest;
    let sum =
        base64::engine::general_purpose::STANDARD.encode(sha2::Sha256::digest(&bytes[offset..]));
    let r = b
        .patch(
            &cookie,
            &at,
            offset,
            &bytes[offset..],
            &[("upload-checksum", &format!("sha256 {sum}"))],
        )
        .await;
    assert_eq!(r.status, 204, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(offset_of(&r), Some(bytes.len() as i64));

    let whole = a.get(&cookie, &at, &[]).await;
    assert_eq!(whole.status, 200);
    assert!(whole.body == bytes, "the object is the bytes sent");
    let part = b
        .get(&cookie, &at, &[("range", "bytes=5242870-5242889")])
        .await;
    assert_eq!(part.status, 206);
    assert!(
        part.body == bytes[5_242_870..5_242_890],
        "a range across a part boundary"
    );
    let id = at.rsplit('/').next().expect("id");
    assert_eq!(
        s3.keys("reviews").await,
        [format!("videos/{id}")],
        "one object, tails swept"
    );
    assert_eq!(
        s3.open_multiparts("reviews").await,
        0,
        "the multipart upload is complete"
    );

    assert_eq!(a.delete(&cookie, &at).await.status, 204);
    assert!(
        s3.keys("reviews").await.is_empty(),
        "termination removes the object"
    );
    assert_eq!(b.head(&cookie, &at).await.status, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_reaper_aborts_an_expired_uploads_multipart_state() {
    let Some(s3) = S3Server::start("s3_reaper").await else {
        return;
    };
    let bucket = s3.bucket("reaped").await;
    let blobs = S3Blobs::at_endpoint(&bucket, &s3.endpoint, "test", "test").expect("S3 blob store");
    let db = tempfile::tempdir().expect("tempdir");
    let url = holdfast_store::testing::sqlite_url(db.path());
    let live = spawn_uploads_on(&url, Arc::new(blobs), s3_parts()).await;
    let cookie = live.user("reaped@example.com").await;
    let at = live.create(&cookie, 3 << 20, "").await;
    let r = live.patch(&cookie, &at, 0, &data(1 << 20, 1), &[]).await;
    assert_eq!(r.status, 204);
    assert_eq!(s3.keys("reaped").await.len(), 1, "a tail");
    assert_eq!(s3.open_multiparts("reaped").await, 1);

    // An instance whose uploads expire at once sees it expired, and its reaper takes it all.
    let expiring = live
        .sibling(UploadOptions {
            expire_after: Duration::ZERO,
            ..s3_parts()
        })
        .await;
    assert_eq!(live.reap_now().await, 0, "not expired yet");
    let r = expiring
        .patch(&cookie, &at, 1 << 20, &data(1 << 20, 2), &[])
        .await;
    assert_eq!(
        r.status, 204,
        "a PATCH moves the expiry (to now, on this instance)"
    );
    assert_eq!(expiring.reap_now().await, 1);
    assert!(s3.keys("reaped").await.is_empty(), "tails gone");
    assert_eq!(
        s3.open_multiparts("reaped").await,
        0,
        "multipart upload aborted"
    );
    assert_eq!(live.head(&cookie, &at).await.status, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn terminating_an_unfinished_upload_aborts_its_multipart_state() {
    let Some(s3) = S3Server::start("s3_terminate").await else {
        return;
    };
    let bucket = s3.bucket("terminated").await;
    let blobs = S3Blobs::at_endpoint(&bucket, &s3.endpoint, "test", "test").expect("S3 blob store");
    let db = tempfile::tempdir().expect("tempdir");
    let url = holdfast_store::testing::sqlite_url(db.path());
    let live = spawn_uploads_on(&url, Arc::new(blobs), s3_parts()).await;
    let cookie = live.user("terminated@example.com").await;
    let at = live.create(&cookie, 12 << 20, "").await;
    let r = live
        .patch(&cookie, &at, 0, &data(FIVE_MIB + (1 << 20), 4), &[])
        .await;
    assert_eq!(r.status, 204);
    assert_eq!(offset_of(&r), Some((FIVE_MIB + (1 << 20)) as i64));
    assert_eq!(s3.open_multiparts("terminated").await, 1, "a part is up");

    assert_eq!(live.delete(&cookie, &at).await.status, 204);
    assert_eq!(live.head(&cookie, &at).await.status, 404);
    live.reap_now().await;
    assert!(s3.keys("terminated").await.is_empty(), "no tail left");
    assert_eq!(
        s3.open_multiparts("terminated").await,
        0,
        "the terminated upload's multipart upload is aborted"
    );
}
