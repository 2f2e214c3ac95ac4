//! tus 1.0.0 as a client sees it, through the real router (sessions, CSRF, the edge's layers)
//! on both engines: uploads that move between instances, the fence between two writers,
//! bytes kept when a body is cut, and every bad request's status — with nothing appended.

use axum::body::Body;
use axum::http::{Request, StatusCode};
use base64::Engine;
use bytes::Bytes;
use holdfast_testkit::app::raw_request;
use holdfast_testkit::db::with_fresh_db;
use holdfast_testkit::uploads::{data, header, offset_of, small_parts, spawn_uploads, OCTETS};
use holdfast_testkit::{both_backends, Backend};
use holdfast_uploads::UploadOptions;
use sha2::Digest;
use std::time::Duration;

/// `s` in base64.
fn b64(s: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(s)
}

async fn options_advertise_exactly_what_is_supported(backend: Backend) {
    with_fresh_db(backend, "tus_options", |url| async move {
        let app = spawn_uploads(&url, UploadOptions::default()).await;
        let r = app
            .send(raw_request(
                "OPTIONS",
                "/api/uploads",
                None,
                Vec::new(),
                &[],
            ))
            .await;
        assert_eq!(r.status, StatusCode::NO_CONTENT);
        assert_eq!(header(&r, "tus-version"), Some("1.0.0"));
        assert_eq!(
            header(&r, "tus-extension"),
            Some("creation,creation-with-upload,expiration,checksum,termination")
        );
        assert_eq!(header(&r, "tus-checksum-algorithm"), Some("sha1,sha256"));
        assert_eq!(
            header(&r, "tus-max-size"),
            Some((4i64 << 30).to_string().as_str())
        );
    })
    .await;
}

async fn an_upload_moves_between_instances_and_downloads_whole(backend: Backend) {
    with_fresh_db(backend, "tus_two_instances", |url| async move {
        let a = spawn_uploads(&url, small_parts()).await;
        let b = a.sibling(small_parts()).await;
        let cookie = a.user("uploader@example.com").await;
        let bytes = data(300 * 1024, 7);
        let meta = format!(
            "filename {},filetype {}",
            b64("review.mp4"),
            b64("video/mp4")
        );
        let at = a.create(&cookie, bytes.len(), &meta).await;

        let first = a.patch(&cookie, &at, 0, &bytes[..100_000], &[]).await;
        assert_eq!(first.status, StatusCode::NO_CONTENT);
        assert_eq!(offset_of(&first), Some(100_000));

        // The other instance knows where the upload stands, and continues it.
        let h = b.head(&cookie, &at).await;
        assert_eq!(h.status, StatusCode::OK);
        assert_eq!(offset_of(&h), Some(100_000));
        assert_eq!(header(&h, "upload-length"), Some("307200"));
        assert_eq!(header(&h, "upload-metadata"), Some(meta.as_str()));
        assert_eq!(header(&h, "cache-control"), Some("no-store"));
        let sum = base64::engine::general_purpose::STANDARD
            .encode(sha2::Sha256::digest(&bytes[100_000..]));
        let rest = b
            .patch(
                &cookie,
                &at,
                100_000,
                &bytes[100_000..],
                &[("upload-checksum", &format!("sha256 {sum}"))],
            )
            .await;
        assert_eq!(
            rest.status,
            StatusCode::NO_CONTENT,
            "{}",
            String::from_utf8_lossy(&rest.body)
        );
        assert_eq!(offset_of(&rest), Some(bytes.len() as i64));
        assert!(
            header(&rest, "upload-expires").is_none(),
            "a complete upload does not expire"
        );

        let whole = a.get(&cookie, &at, &[]).await;
        assert_eq!(whole.status, StatusCode::OK);
        assert!(whole.body == bytes, "the download is the bytes sent");
        assert_eq!(
            header(&whole, "content-disposition"),
            Some("attachment; filename=\"review.mp4\"")
        );
        assert_eq!(
            header(&whole, "content-type"),
            Some("application/octet-stream")
        );
        let part = b
            .get(&cookie, &at, &[("range", "bytes=65530-131080")])
            .await;
        assert_eq!(part.status, StatusCode::PARTIAL_CONTENT);
        assert_eq!(
            header(&part, "content-range"),
            Some("bytes 65530-131080/307200")
        );
        assert!(
            part.body == bytes[65530..=131080],
            "a range across parts is those bytes"
        );
        let past = b.get(&cookie, &at, &[("range", "bytes=307200-")]).await;
        assert_eq!(past.status, StatusCode::RANGE_NOT_SATISFIABLE);
        assert_eq!(header(&past, "content-range"), Some("bytes */307200"));

        let listed = b.get(&cookie, "/api/uploads", &[]).await.json();
        let one = &listed["uploads"][0];
        assert_eq!(one["location"], at.as_str());
        assert_eq!(one["complete"], true);
        assert_eq!(one["offset"], 307200);
        assert_eq!(one["metadata"]["filename"], "review.mp4");

        // Termination: gone from every instance, and its bytes from the disk.
        let id = at.rsplit('/').next().expect("an id");
        assert!(a.dir.path().join("uploads").join(id).exists());
        let del = a
            .send(raw_request(
                "DELETE",
                &at,
                None,
                Vec::new(),
                &[("cookie", &cookie), ("tus-resumable", "1.0.0")],
            ))
            .await;
        assert_eq!(del.status, StatusCode::NO_CONTENT);
        assert_eq!(b.head(&cookie, &at).await.status, StatusCode::NOT_FOUND);
        assert_eq!(b.get(&cookie, &at, &[]).await.status, StatusCode::NOT_FOUND);
        assert!(
            !a.dir.path().join("uploads").join(id).exists(),
            "the parts are gone"
        );
    })
    .await;
}

async fn creation_with_upload_takes_the_first_bytes(backend: Backend) {
    with_fresh_db(backend, "tus_creation_with_upload", |url| async move {
        let app = spawn_uploads(&url, small_parts()).await;
        let cookie = app.user("creator@example.com").await;
        let bytes = data(150_000, 3);
        let r = app
            .send(raw_request(
                "POST",
                "/api/uploads",
                Some(OCTETS),
                bytes[..70_000].to_vec(),
                &[
                    ("cookie", &cookie),
                    ("tus-resumable", "1.0.0"),
                    ("upload-length", "150000"),
                ],
            ))
            .await;
        assert_eq!(r.status, StatusCode::CREATED);
        assert_eq!(offset_of(&r), Some(70_000));
        let at = header(&r, "location").expect("Location").to_owned();
        let rest = app.patch(&cookie, &at, 70_000, &bytes[70_000..], &[]).await;
        // First bytes that fail their checksum: nothing appended, but the upload exists and
        // the answer says where, so the client can resume it.
        let bad = app
            .send(raw_request(
                "POST",
                "/api/uploads",
                Some(OCTETS),
                bytes[..1000].to_vec(),
                &[
                    ("cookie", &cookie),
                    ("tus-resumable", "1.0.0"),
                    ("upload-length", "2000"),
                    ("upload-checksum", "sha1 AAAAAAAAAAAAAAAAAAAAAAAAAAA="),
                ],
            ))
            .await;
        assert_eq!(bad.status.as_u16(), 460);
        let there = header(&bad, "location").expect("a Location with the failure");
        assert_eq!(offset_of(&app.head(&cookie, there).await), Some(0));
        assert_eq!(rest.status, StatusCode::NO_CONTENT);
        assert!(app.get(&cookie, &at, &[]).await.body == bytes);
    })
    .await;
}

/// A body that hands out `chunks` one at a time, says when the server first asks for one,
/// and then waits for `go` before the rest (or, with `cut`, fails instead of ending).
fn gated_body(
    chunks: Vec<Vec<u8>>,
    cut: bool,
) -> (
    Body,
    tokio::sync::oneshot::Receiver<()>,
    tokio::sync::oneshot::Sender<()>,
) {
    let (asked_tx, asked_rx) = tokio::sync::oneshot::channel();
    let (go_tx, go_rx) = tokio::sync::oneshot::channel::<()>();
    let state = (chunks.into_iter(), Some(asked_tx), Some(go_rx), cut);
    let stream =
        futures::stream::unfold(state, |(mut chunks, mut asked, mut go, cut)| async move {
            if let Some(asked) = asked.take() {
                let _ = asked.send(());
                let first = chunks.next()?;
                return Some((
                    Ok::<_, std::io::Error>(Bytes::from(first)),
                    (chunks, None, go, cut),
                ));
            }
            if let Some(go) = go.take() {
                let _ = go.await;
            }
            match chunks.next() {
                Some(c) => Some((Ok(Bytes::from(c)), (chunks, None, None, cut))),
                None if cut => Some((
                    Err(std::io::Error::other("connection reset")),
                    (chunks, None, None, false),
                )),
                None => None,
            }
        });
    (Body::from_stream(stream), asked_rx, go_tx)
}

fn streamed_patch(
    at: &str,
    cookie: &str,
    offset: usize,
    length: Option<usize>,
    body: Body,
) -> Request<Body> {
    let mut b = Request::builder()
        .method("PATCH")
        .uri(at)
        .header("host", "shop.test")
        .header("cookie", cookie)
        .header("tus-resumable", "1.0.0")
        .header("upload-offset", offset.to_string())
        .header("content-type", OCTETS);
    if let Some(n) = length {
        b = b.header("content-length", n.to_string());
    }
    b.body(body).expect("request")
}

async fn two_patches_at_one_offset_give_one_204_and_one_423(backend: Backend) {
    with_fresh_db(backend, "tus_two_writers", |url| async move {
        let a = spawn_uploads(&url, small_parts()).await;
        let b = a.sibling(small_parts()).await;
        let cookie = a.user("racer@example.com").await;
        let bytes = data(200_000, 9);
        let at = a.create(&cookie, bytes.len(), "").await;

        let (body, asked, go) =
            gated_body(vec![bytes[..1000].to_vec(), bytes[1000..].to_vec()], false);
        let first = tokio::spawn({
            let (router, req) = (
                a.router.clone(),
                streamed_patch(&at, &cookie, 0, Some(bytes.len()), body),
            );
            async move { holdfast_testkit::app::send(&router, req).await }
        });
        // The server reads a body only after it took the upload: the lease is A's now.
        asked.await.expect("the first PATCH's body is being read");
        let second = b.patch(&cookie, &at, 0, &bytes, &[]).await;
        assert_eq!(
            second.status,
            StatusCode::LOCKED,
            "{}",
            String::from_utf8_lossy(&second.body)
        );
        assert_eq!(
            offset_of(&second),
            Some(0),
            "the refusal names the authoritative offset"
        );
        assert!(second.is_problem());

        go.send(()).expect("release the first body");
        let first = first.await.expect("first PATCH");
        assert_eq!(first.status, StatusCode::NO_CONTENT);
        assert_eq!(offset_of(&first), Some(200_000));
        // Once the first is done, the second's offset is stale: 409 with where it stands.
        let late = b.patch(&cookie, &at, 0, &bytes, &[]).await;
        assert_eq!(late.status, StatusCode::CONFLICT);
        assert_eq!(offset_of(&late), Some(200_000));
        assert!(
            b.get(&cookie, &at, &[]).await.body == bytes,
            "only the winner's bytes"
        );
    })
    .await;
}

async fn a_cut_body_keeps_what_was_durable(backend: Backend) {
    with_fresh_db(backend, "tus_cut_body", |url| async move {
        let app = spawn_uploads(&url, small_parts()).await;
        let cookie = app.user("cut@example.com").await;
        let bytes = data(400_000, 5);
        let at = app.create(&cookie, bytes.len(), "").await;
        // 200,000 bytes arrive of the 400,000 declared, then the connection breaks.
        let (body, asked, go) = gated_body(
            vec![bytes[..150_000].to_vec(), bytes[150_000..200_000].to_vec()],
            true,
        );
        let req = streamed_patch(&at, &cookie, 0, Some(bytes.len()), body);
        let sent = tokio::spawn({
            let router = app.router.clone();
            async move { holdfast_testkit::app::send(&router, req).await }
        });
        asked.await.expect("body read");
        go.send(()).expect("go");
        let cut = sent.await.expect("PATCH");
        assert_eq!(cut.status, StatusCode::BAD_REQUEST);
        assert_eq!(
            offset_of(&cut),
            Some(200_000),
            "every byte that arrived was kept"
        );
        assert_eq!(offset_of(&app.head(&cookie, &at).await), Some(200_000));
        // The client resumes from there: nothing is sent twice.
        let rest = app
            .patch(&cookie, &at, 200_000, &bytes[200_000..], &[])
            .await;
        assert_eq!(rest.status, StatusCode::NO_CONTENT);
        assert!(app.get(&cookie, &at, &[]).await.body == bytes);
    })
    .await;
}

/// A body that goes quiet is cut after the idle timeout even while the lease is being renewed
/// (renewals are not traffic); what arrived is kept, and the upload is free at once.
async fn a_stalled_body_is_cut_and_the_upload_freed(backend: Backend) {
    with_fresh_db(backend, "tus_stalled_body", |url| async move {
        let opts = UploadOptions {
            body_idle_timeout: Duration::from_millis(400),
            lease: Duration::from_millis(300),
            ..small_parts()
        };
        let app = spawn_uploads(&url, opts).await;
        let cookie = app.user("stalled@example.com").await;
        let bytes = data(300_000, 8);
        let at = app.create(&cookie, bytes.len(), "").await;
        let (body, asked, _never) = gated_body(vec![bytes[..100_000].to_vec(), Vec::new()], false);
        let req = streamed_patch(&at, &cookie, 0, Some(bytes.len()), body);
        let sent = tokio::spawn({
            let router = app.router.clone();
            async move { holdfast_testkit::app::send(&router, req).await }
        });
        asked.await.expect("body read");
        let cut = tokio::time::timeout(Duration::from_secs(10), sent)
            .await
            .expect("the stalled PATCH ends")
            .expect("PATCH");
        assert_eq!(
            cut.status,
            StatusCode::BAD_REQUEST,
            "{}",
            String::from_utf8_lossy(&cut.body)
        );
        assert_eq!(offset_of(&cut), Some(100_000));
        let rest = app
            .patch(&cookie, &at, 100_000, &bytes[100_000..], &[])
            .await;
        assert_eq!(
            rest.status,
            StatusCode::NO_CONTENT,
            "the lease was released"
        );
        assert!(app.get(&cookie, &at, &[]).await.body == bytes);
    })
    .await;
}

/// Each bad request gets its status as problem+json (HEAD: the status alone), and the upload
/// stays exactly where it was.
async fn bad_requests_get_their_status_and_append_nothing(backend: Backend) {
    with_fresh_db(backend, "tus_bad_input", |url| async move {
        let app = spawn_uploads(&url, small_parts()).await;
        let cookie = app.user("careless@example.com").await;
        let other = app.user("other@example.com").await;
        let bytes = data(100_000, 1);
        let at = app.create(&cookie, bytes.len(), "").await;
        assert_eq!(
            app.patch(&cookie, &at, 0, &bytes[..10_000], &[])
                .await
                .status,
            StatusCode::NO_CONTENT
        );
        let unknown = "/api/uploads/0123456789abcdef0123456789abcdef";
        let wrong_sum =
            base64::engine::general_purpose::STANDARD.encode(sha2::Sha256::digest(b"other bytes"));
        let wrong_sum = format!("sha256 {wrong_sum}");

        // A PATCH as a well-behaved client sends it, with one standard header replaced
        // (or, with an empty value, left out).
        let patch = |body: &[u8], change: (&'static str, &str)| {
            let standard = [
                ("cookie", cookie.as_str()),
                ("upload-offset", "10000"),
                ("tus-resumable", "1.0.0"),
            ];
            let mut headers: Vec<(&str, &str)> = standard
                .into_iter()
                .filter(|(k, _)| *k != change.0)
                .collect();
            if !change.1.is_empty() {
                headers.push(change);
            }
            raw_request("PATCH", &at, Some(OCTETS), body.to_vec(), &headers)
        };
        let next = &bytes[10_000..20_000];
        let keep = ("x-unchanged", "");
        // A creation, with these headers beside the session.
        let post = |content_type: Option<&str>, body: &[u8], headers: &[(&str, &str)]| {
            let mut all = vec![("cookie", cookie.as_str()), ("tus-resumable", "1.0.0")];
            all.extend_from_slice(headers);
            raw_request("POST", "/api/uploads", content_type, body.to_vec(), &all)
        };
        let undeclared = Body::from_stream(futures::stream::iter(vec![
            Ok::<_, std::io::Error>(Bytes::from(data(70_000, 2))),
            Ok(Bytes::from(data(20_001, 2))),
        ]));
        let cases: Vec<(&str, Request<Body>, StatusCode)> = vec![
            (
                "no Tus-Resumable",
                patch(next, ("tus-resumable", "")),
                StatusCode::PRECONDITION_FAILED,
            ),
            (
                "another tus version",
                patch(next, ("tus-resumable", "0.2.2")),
                StatusCode::PRECONDITION_FAILED,
            ),
            (
                "offset behind",
                patch(&bytes[..10_000], ("upload-offset", "0")),
                StatusCode::CONFLICT,
            ),
            (
                "offset ahead",
                patch(&bytes[20_000..30_000], ("upload-offset", "20000")),
                StatusCode::CONFLICT,
            ),
            (
                "no offset",
                patch(next, ("upload-offset", "")),
                StatusCode::BAD_REQUEST,
            ),
            (
                "negative offset",
                patch(next, ("upload-offset", "-1")),
                StatusCode::BAD_REQUEST,
            ),
            (
                "wrong content type",
                raw_request(
                    "PATCH",
                    &at,
                    Some("application/json"),
                    next.to_vec(),
                    &[
                        ("cookie", &cookie),
                        ("upload-offset", "10000"),
                        ("tus-resumable", "1.0.0"),
                    ],
                ),
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ),
            (
                "past Upload-Length",
                patch(&data(90_001, 2), keep),
                StatusCode::PAYLOAD_TOO_LARGE,
            ),
            (
                "past Upload-Length, undeclared",
                streamed_patch(&at, &cookie, 10_000, None, undeclared),
                StatusCode::PAYLOAD_TOO_LARGE,
            ),
            (
                "bad checksum",
                patch(next, ("upload-checksum", &wrong_sum)),
                StatusCode::from_u16(460).expect("460"),
            ),
            (
                "unknown checksum algorithm",
                patch(next, ("upload-checksum", "md5 AAAAAAAAAAAAAAAAAAAAAA==")),
                StatusCode::BAD_REQUEST,
            ),
            (
                "another user's upload",
                patch(next, ("cookie", &other)),
                StatusCode::NOT_FOUND,
            ),
            (
                "another user's download",
                raw_request("GET", &at, None, Vec::new(), &[("cookie", &other)]),
                StatusCode::NOT_FOUND,
            ),
            (
                "another user's delete",
                raw_request(
                    "DELETE",
                    &at,
                    None,
                    Vec::new(),
                    &[("cookie", &other), ("tus-resumable", "1.0.0")],
                ),
                StatusCode::NOT_FOUND,
            ),
            (
                "unknown upload",
                raw_request(
                    "PATCH",
                    unknown,
                    Some(OCTETS),
                    next.to_vec(),
                    &[
                        ("cookie", &cookie),
                        ("upload-offset", "10000"),
                        ("tus-resumable", "1.0.0"),
                    ],
                ),
                StatusCode::NOT_FOUND,
            ),
            (
                "garbage id",
                raw_request(
                    "PATCH",
                    "/api/uploads/..%2f..%2fetc",
                    Some(OCTETS),
                    next.to_vec(),
                    &[
                        ("cookie", &cookie),
                        ("upload-offset", "10000"),
                        ("tus-resumable", "1.0.0"),
                    ],
                ),
                StatusCode::NOT_FOUND,
            ),
            (
                "no session",
                patch(next, ("cookie", "")),
                StatusCode::UNAUTHORIZED,
            ),
            (
                "cross-site",
                patch(next, ("sec-fetch-site", "cross-site")),
                StatusCode::FORBIDDEN,
            ),
            (
                "download before complete",
                raw_request("GET", &at, None, Vec::new(), &[("cookie", &cookie)]),
                StatusCode::CONFLICT,
            ),
            (
                "creation without Upload-Length",
                post(None, b"", &[]),
                StatusCode::BAD_REQUEST,
            ),
            (
                "creation with deferred length",
                post(None, b"", &[("upload-defer-length", "1")]),
                StatusCode::BAD_REQUEST,
            ),
            (
                "creation past Tus-Max-Size",
                post(None, b"", &[("upload-length", "4294967297")]),
                StatusCode::PAYLOAD_TOO_LARGE,
            ),
            (
                "malformed Upload-Metadata",
                post(
                    None,
                    b"",
                    &[
                        ("upload-length", "10"),
                        ("upload-metadata", "filename not*base64"),
                    ],
                ),
                StatusCode::BAD_REQUEST,
            ),
            (
                "creation body of another type",
                post(Some("text/plain"), b"hello", &[("upload-length", "10")]),
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ),
        ];
        for (what, req, status) in cases {
            let r = app.send(req).await;
            assert_eq!(
                r.status,
                status,
                "{what}: {}",
                String::from_utf8_lossy(&r.body)
            );
            assert!(r.is_problem(), "{what}: answered as problem+json");
            // The edge's own refusals (CSRF) come before tus is reached.
            if what != "cross-site" {
                assert_eq!(
                    header(&r, "tus-resumable"),
                    Some("1.0.0"),
                    "{what}: says its tus version"
                );
            }
            let h = app.head(&cookie, &at).await;
            assert_eq!(offset_of(&h), Some(10_000), "{what}: nothing appended");
        }
        let no_tus = app
            .send(raw_request(
                "HEAD",
                &at,
                None,
                Vec::new(),
                &[("cookie", &cookie)],
            ))
            .await;
        assert_eq!(no_tus.status, StatusCode::PRECONDITION_FAILED);
        assert_eq!(header(&no_tus, "tus-version"), Some("1.0.0"));
        assert_eq!(
            app.head(&cookie, unknown).await.status,
            StatusCode::NOT_FOUND
        );
        assert_eq!(app.head(&other, &at).await.status, StatusCode::NOT_FOUND);
        let listed = app.get(&other, "/api/uploads", &[]).await.json();
        assert_eq!(
            listed["uploads"].as_array().map(Vec::len),
            Some(0),
            "another user lists nothing of this one's"
        );

        // The bytes still fit exactly: the upload completes from where it stood.
        let rest = app.patch(&cookie, &at, 10_000, &bytes[10_000..], &[]).await;
        assert_eq!(rest.status, StatusCode::NO_CONTENT);
        assert!(app.get(&cookie, &at, &[]).await.body == bytes);
    })
    .await;
}

async fn expired_and_over_quota_uploads_are_refused(backend: Backend) {
    with_fresh_db(backend, "tus_expiry_quota", |url| async move {
        let expiring = spawn_uploads(
            &url,
            UploadOptions {
                expire_after: Duration::ZERO,
                ..small_parts()
            },
        )
        .await;
        let cookie = expiring.user("late@example.com").await;
        let at = expiring.create(&cookie, 10, "").await;
        let h = expiring.head(&cookie, &at).await;
        assert_eq!(h.status, StatusCode::GONE);
        let p = expiring.patch(&cookie, &at, 0, b"0123456789", &[]).await;
        assert_eq!(p.status, StatusCode::GONE);
        assert!(p.is_problem());
        // The reaper takes the expired upload's row and bytes.
        let id = at.rsplit('/').next().expect("id").to_owned();
        assert!(expiring.dir.path().join("uploads").join(&id).exists());
        assert_eq!(expiring.uploads.reap(10).await.expect("reap"), 1);
        assert_eq!(
            expiring.head(&cookie, &at).await.status,
            StatusCode::NOT_FOUND
        );
        assert!(!expiring.dir.path().join("uploads").join(&id).exists());
        assert_eq!(expiring.uploads.reap(10).await.expect("reap again"), 0);

        let opts = UploadOptions {
            quota: holdfast_store::UploadQuota {
                bytes: 1000,
                unfinished: 2,
            },
            ..small_parts()
        };
        let tight = expiring.sibling(opts).await;
        tight.create(&cookie, 600, "").await;
        let over = tight
            .send(raw_request(
                "POST",
                "/api/uploads",
                None,
                Vec::new(),
                &[
                    ("cookie", &cookie),
                    ("tus-resumable", "1.0.0"),
                    ("upload-length", "401"),
                ],
            ))
            .await;
        assert_eq!(over.status, StatusCode::FORBIDDEN);
        assert!(over.is_problem());
        tight.create(&cookie, 400, "").await;
        let third = tight
            .send(raw_request(
                "POST",
                "/api/uploads",
                None,
                Vec::new(),
                &[
                    ("cookie", &cookie),
                    ("tus-resumable", "1.0.0"),
                    ("upload-length", "0"),
                ],
            ))
            .await;
        assert_eq!(
            third.status,
            StatusCode::FORBIDDEN,
            "two unfinished uploads at most"
        );
    })
    .await;
}

/// The fence, at the store: a writer whose lease ran out and was taken over can neither get
/// a part number nor move the offset, whatever it believes.
async fn a_stale_writer_never_moves_the_offset(backend: Backend) {
    with_fresh_db(backend, "tus_stale_writer", |url| async move {
        let app = spawn_uploads(&url, small_parts()).await;
        let cookie = app.user("stale@example.com").await;
        let at = app.create(&cookie, 100, "").await;
        let id = at.rsplit('/').next().expect("id");
        let me = app.get(&cookie, "/api/me", &[]).await.json();
        let owner = me["id"].as_str().expect("user id").to_owned();
        let t0 = holdfast_core::now_ms();
        let old = app
            .store
            .upload_take(&owner, id, t0, t0 + 1000)
            .await
            .expect("take")
            .expect("taken")
            .0;
        assert!(
            app.store
                .upload_take(&owner, id, t0 + 999, t0 + 2000)
                .await
                .expect("take")
                .is_none(),
            "held"
        );
        let new = app
            .store
            .upload_take(&owner, id, t0 + 1000, t0 + 3000)
            .await
            .expect("take")
            .expect("expired lease")
            .0;
        assert!(new.attempt > old.attempt);
        let part = |n| holdfast_store::UploadPart {
            part_no: n,
            start_offset: 0,
            part_length: 10,
            sha256: "00".into(),
            etag: None,
        };
        let stale_no = app.store.upload_next_part(id, old.attempt, t0 + 5000).await;
        assert!(
            matches!(stale_no, Err(holdfast_store::Error::UploadLeaseLost)),
            "{stale_no:?}"
        );
        let new_no = app
            .store
            .upload_next_part(id, new.attempt, t0 + 3000)
            .await
            .expect("part no");
        let ack =
            |attempt, parts: &'static [holdfast_store::UploadPart]| holdfast_store::UploadAck {
                id: "",
                attempt,
                from_offset: 0,
                parts,
                now: t0,
                expires_at: t0 + 10_000,
                lease_until: None,
                replaces: None,
            };
        let stale_parts: &'static [_] = Box::leak(Box::new([part(new_no + 100)]));
        let stale = app
            .store
            .upload_ack(&holdfast_store::UploadAck {
                id,
                ..ack(old.attempt, stale_parts)
            })
            .await;
        assert!(
            matches!(stale, Err(holdfast_store::Error::UploadLeaseLost)),
            "{stale:?}"
        );
        let fresh_parts: &'static [_] = Box::leak(Box::new([part(new_no)]));
        let moved = app
            .store
            .upload_ack(&holdfast_store::UploadAck {
                id,
                ..ack(new.attempt, fresh_parts)
            })
            .await
            .expect("ack");
        assert_eq!(moved, 10);
        // Acknowledging the same bytes twice is refused too: the offset is no longer 0.
        let twice = app
            .store
            .upload_ack(&holdfast_store::UploadAck {
                id,
                ..ack(new.attempt, fresh_parts)
            })
            .await;
        assert!(twice.is_err());
        assert_eq!(offset_of(&app.head(&cookie, &at).await), Some(10));
        assert_eq!(
            app.store.upload_parts(id).await.expect("ledger"),
            fresh_parts.to_vec()
        );
    })
    .await;
}

both_backends!(multi_thread;
    options_advertise_exactly_what_is_supported,
    an_upload_moves_between_instances_and_downloads_whole,
    creation_with_upload_takes_the_first_bytes,
    two_patches_at_one_offset_give_one_204_and_one_423,
    a_cut_body_keeps_what_was_durable,
    a_stalled_body_is_cut_and_the_upload_freed,
    bad_requests_get_their_status_and_append_nothing,
    expired_and_over_quota_uploads_are_refused,
    a_stale_writer_never_moves_the_offset,
    an_unfinished_upload_takes_a_sha1_checksum_and_is_terminated,
);

async fn an_unfinished_upload_takes_a_sha1_checksum_and_is_terminated(backend: Backend) {
    with_fresh_db(backend, "tus_terminate_unfinished", |url| async move {
        let a = spawn_uploads(&url, small_parts()).await;
        let b = a.sibling(small_parts()).await;
        let cookie = a.user("quitter@example.com").await;
        let bytes = data(200 * 1024, 3);
        let at = a.create(&cookie, bytes.len(), "").await;
        let sum =
            base64::engine::general_purpose::STANDARD.encode(sha1::Sha1::digest(&bytes[..100_000]));
        let first = a
            .patch(
                &cookie,
                &at,
                0,
                &bytes[..100_000],
                &[("upload-checksum", &format!("sha1 {sum}"))],
            )
            .await;
        assert_eq!(
            first.status,
            StatusCode::NO_CONTENT,
            "{}",
            String::from_utf8_lossy(&first.body)
        );
        assert_eq!(offset_of(&first), Some(100_000));

        // Terminated half-way, through the other instance: gone everywhere, bytes too.
        let id = at.rsplit('/').next().expect("an id");
        assert!(a.dir.path().join("uploads").join(id).exists());
        assert_eq!(b.delete(&cookie, &at).await.status, StatusCode::NO_CONTENT);
        assert_eq!(a.head(&cookie, &at).await.status, StatusCode::NOT_FOUND);
        let late = a.patch(&cookie, &at, 100_000, &bytes[100_000..], &[]).await;
        assert_eq!(
            late.status,
            StatusCode::NOT_FOUND,
            "no PATCH after termination"
        );
        a.reap_now().await;
        assert!(
            !a.dir.path().join("uploads").join(id).exists(),
            "the parts are gone"
        );
        let listed = a.get(&cookie, "/api/uploads", &[]).await.json();
        assert_eq!(listed["uploads"].as_array().map(Vec::len), Some(0));
    })
    .await;
}
