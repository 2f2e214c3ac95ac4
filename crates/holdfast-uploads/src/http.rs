//! The routes: tus on `{base}` and `{base}/{id}`, plus a listing (`GET {base}`) and a
//! download with `Range` (`GET {base}/{id}`). Every route but `OPTIONS` takes the session's
//! user ([`Authed`]), and every lookup is by that user: another user's upload is a 404.

use crate::blob::PartPlace;
use crate::tus::{self, BadHeader, Checksum, Metadata, RangeAsk, OFFSET_OCTET_STREAM};
use crate::{Error, Uploads};
use axum::body::{Body, HttpBody};
use axum::extract::{FromRef, State};
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use bytes::Bytes;
use futures::StreamExt;
use holdfast_store::{NewUpload, UploadAck, UploadPart, UploadRow};
use holdfast_web::{AppError, AppState, Authed, PathParam};
use serde_json::json;
use sha2::Digest;
use std::time::{Duration, Instant, SystemTime};

const TUS_RESUMABLE: HeaderName = HeaderName::from_static("tus-resumable");
const TUS_VERSION: HeaderName = HeaderName::from_static("tus-version");
const UPLOAD_OFFSET: HeaderName = HeaderName::from_static("upload-offset");
const UPLOAD_LENGTH: HeaderName = HeaderName::from_static("upload-length");
const UPLOAD_METADATA: HeaderName = HeaderName::from_static("upload-metadata");
const UPLOAD_EXPIRES: HeaderName = HeaderName::from_static("upload-expires");
const UPLOAD_CHECKSUM: HeaderName = HeaderName::from_static("upload-checksum");
const UPLOAD_DEFER_LENGTH: HeaderName = HeaderName::from_static("upload-defer-length");

/// The uploads routes under [`UploadOptions::base_path`](crate::UploadOptions::base_path),
/// on the edge's sessions. Give them to `holdfast_web::app_with_streams` as streams (no
/// request deadline, no small body limit): a `PATCH` flows for as long as its bytes keep
/// coming.
pub fn router<S>(edge: AppState, uploads: Uploads) -> Router<S> {
    let base = uploads.opts.base_path.clone();
    routes::<Ctx>(&base).with_state(Ctx { edge, uploads })
}

/// The routes' own state: the edge's and the uploads'.
#[derive(Clone)]
struct Ctx {
    edge: AppState,
    uploads: Uploads,
}

impl FromRef<Ctx> for AppState {
    fn from_ref(c: &Ctx) -> AppState {
        c.edge.clone()
    }
}

impl FromRef<Ctx> for Uploads {
    fn from_ref(c: &Ctx) -> Uploads {
        c.uploads.clone()
    }
}

/// The uploads routes under `base` for an application whose state gives both the edge's
/// [`AppState`] and [`Uploads`].
pub fn routes<S>(base: &str) -> Router<S>
where
    S: Clone + Send + Sync + 'static,
    Uploads: FromRef<S>,
    AppState: FromRef<S>,
{
    Router::new()
        .route(base, get(list).post(create).options(options))
        .route(
            &format!("{base}/{{id}}"),
            get(download).head(head).patch(patch).delete(terminate),
        )
        .route_layer(axum::middleware::map_response(tus_resumable))
}

/// Every answer says which protocol version it speaks.
async fn tus_resumable(mut resp: Response) -> Response {
    resp.headers_mut()
        .insert(TUS_RESUMABLE, HeaderValue::from_static(tus::TUS_VERSION));
    resp
}

/// A refused request: the problem, and the headers tus wants beside it (the authoritative
/// offset, the supported version). Boxed: it travels up every `?`.
struct Refusal(Box<Refused>);

struct Refused {
    error: AppError,
    headers: HeaderMap,
}

impl Refusal {
    fn new(status: StatusCode, slug: &'static str, detail: impl Into<String>) -> Self {
        AppError::new(status, slug, detail).into()
    }
    /// With the upload's authoritative offset.
    fn at(mut self, offset: i64) -> Self {
        self.0
            .headers
            .insert(UPLOAD_OFFSET, HeaderValue::from(offset));
        self
    }
}

impl From<AppError> for Refusal {
    fn from(error: AppError) -> Self {
        Self(Box::new(Refused {
            error,
            headers: HeaderMap::new(),
        }))
    }
}

impl From<BadHeader> for Refusal {
    fn from(e: BadHeader) -> Self {
        AppError::bad_request("bad-tus-header", e.to_string()).into()
    }
}

impl From<Error> for Refusal {
    fn from(e: Error) -> Self {
        match e {
            Error::Store(holdfast_store::Error::UploadLeaseLost) => Refusal::new(
                StatusCode::CONFLICT,
                "upload-taken-over",
                "another request took this upload over; ask HEAD for its offset",
            ),
            Error::Store(e) => AppError::from(e).into(),
            Error::Blob(e) => AppError::unavailable(format!("blob store: {e}")).into(),
        }
    }
}

impl From<holdfast_store::Error> for Refusal {
    fn from(e: holdfast_store::Error) -> Self {
        Error::Store(e).into()
    }
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        let Refused { error, headers } = *self.0;
        (headers, error).into_response()
    }
}

type Answer = Result<Response, Refusal>;

/// `Tus-Resumable: 1.0.0` on a tus request, or 412 naming the version this server speaks.
fn speaks_tus(headers: &HeaderMap) -> Result<(), Refusal> {
    if headers.get(&TUS_RESUMABLE).map(HeaderValue::as_bytes) == Some(tus::TUS_VERSION.as_bytes()) {
        return Ok(());
    }
    let mut r = Refusal::new(
        StatusCode::PRECONDITION_FAILED,
        "tus-version",
        "send Tus-Resumable: 1.0.0 (the only version this server speaks)",
    );
    r.0.headers
        .insert(TUS_VERSION, HeaderValue::from_static(tus::TUS_VERSION));
    Err(r)
}

fn header_str<'h>(headers: &'h HeaderMap, name: &HeaderName) -> Result<Option<&'h str>, Refusal> {
    headers
        .get(name)
        .map(|v| {
            v.to_str().map_err(|_| {
                Refusal::new(
                    StatusCode::BAD_REQUEST,
                    "bad-tus-header",
                    format!("{name} must be ASCII"),
                )
            })
        })
        .transpose()
}

/// Whether the request's body is tus bytes: `Some(true)` for `offset+octet-stream`,
/// `Some(false)` for any other declared type, `None` for none.
fn is_offset_stream(headers: &HeaderMap) -> Option<bool> {
    headers.get(header::CONTENT_TYPE).map(|v| {
        v.to_str()
            .ok()
            .and_then(|v| v.split(';').next())
            .is_some_and(|t| t.trim().eq_ignore_ascii_case(OFFSET_OCTET_STREAM))
    })
}

/// The body's length if it is known before it arrives: `Content-Length`, or what the body
/// itself says it holds.
fn declared_length(headers: &HeaderMap, body: &Body) -> Result<Option<i64>, Refusal> {
    let header = header_str(headers, &header::CONTENT_LENGTH)?
        .map(|v| tus::byte_count("Content-Length", v))
        .transpose()
        .map_err(Refusal::from)?;
    Ok(header.or_else(|| body.size_hint().exact().and_then(|n| i64::try_from(n).ok())))
}

fn http_date(ms: i64) -> HeaderValue {
    let at = SystemTime::UNIX_EPOCH + Duration::from_millis(u64::try_from(ms).unwrap_or(0));
    HeaderValue::from_str(&httpdate::fmt_http_date(at)).unwrap_or(HeaderValue::from_static(""))
}

/// An upload id as this server makes them (32 lowercase hex digits); anything else names
/// no upload.
fn upload_id(PathParam(id): &PathParam) -> Result<&str, Refusal> {
    if id.len() == 32 && id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        Ok(id)
    } else {
        Err(no_such_upload())
    }
}

fn no_such_upload() -> Refusal {
    AppError::not_found("no such upload").into()
}

fn expired() -> Refusal {
    Refusal::new(
        StatusCode::GONE,
        "upload-expired",
        "this upload expired unfinished",
    )
}

/// The owner's live upload, or why not: 404 (none, deleted, another user's) or 410 (expired).
async fn live_upload(up: &Uploads, owner: &str, id: &str) -> Result<UploadRow, Refusal> {
    let row = up
        .store
        .upload_get(owner, id)
        .await?
        .ok_or_else(no_such_upload)?;
    if row.is_expired(holdfast_core::now_ms()) {
        return Err(expired());
    }
    Ok(row)
}

/// `OPTIONS`: what this server supports.
async fn options(State(up): State<Uploads>) -> Response {
    let mut h = HeaderMap::new();
    h.insert(TUS_VERSION, HeaderValue::from_static(tus::TUS_VERSION));
    h.insert(
        HeaderName::from_static("tus-extension"),
        HeaderValue::from_static(tus::TUS_EXTENSIONS),
    );
    h.insert(
        HeaderName::from_static("tus-max-size"),
        HeaderValue::from(up.opts.max_size),
    );
    h.insert(
        HeaderName::from_static("tus-checksum-algorithm"),
        HeaderValue::from_static(tus::TUS_CHECKSUMS),
    );
    (StatusCode::NO_CONTENT, h).into_response()
}

/// `POST`: a new upload (creation), perhaps with its first bytes (creation-with-upload).
async fn create(
    State(up): State<Uploads>,
    authed: Authed,
    headers: HeaderMap,
    body: Body,
) -> Answer {
    speaks_tus(&headers)?;
    if headers.contains_key(&UPLOAD_DEFER_LENGTH) {
        return Err(AppError::bad_request(
            "defer-length-unsupported",
            "this server needs Upload-Length at creation (no creation-defer-length)",
        )
        .into());
    }
    let length = header_str(&headers, &UPLOAD_LENGTH)?
        .ok_or_else(|| {
            Refusal::new(
                StatusCode::BAD_REQUEST,
                "upload-length-missing",
                "a new upload needs Upload-Length",
            )
        })
        .and_then(|v| tus::byte_count("Upload-Length", v).map_err(Refusal::from))?;
    if length > up.opts.max_size {
        return Err(Refusal::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "upload-too-large",
            format!(
                "an upload holds at most {} bytes (Tus-Max-Size)",
                up.opts.max_size
            ),
        ));
    }
    let metadata = Metadata::parse(header_str(&headers, &UPLOAD_METADATA)?.unwrap_or(""))?;
    let declared = declared_length(&headers, &body)?;
    let with_bytes = match is_offset_stream(&headers) {
        Some(true) => true,
        Some(false) if !body.is_end_stream() => return Err(unsupported_type()),
        _ => false,
    };
    let checksum = header_str(&headers, &UPLOAD_CHECKSUM)?
        .map(Checksum::parse)
        .transpose()?;
    let subject = up
        .attach
        .subject(&up.store, &authed.user_id, &metadata)
        .await?;

    let id = uuid::Uuid::new_v4().simple().to_string();
    let handle = up.blobs.begin(&id).await.map_err(Refusal::from)?;
    let now = holdfast_core::now_ms();
    let lease_until = with_bytes.then(|| now + lease_ms(&up));
    let created = up
        .store
        .upload_create(&NewUpload {
            id: &id,
            owner_id: &authed.user_id,
            subject: &subject,
            length,
            metadata: metadata.raw(),
            blob_handle: handle.as_deref(),
            now,
            expires_at: now + expire_ms(&up),
            lease_until,
            quota: up.opts.quota,
        })
        .await;
    if matches!(created, Ok(false)) {
        // Refused for certain (over quota). A failure may have created the row after all:
        // then the reaper removes it all with the upload.
        let _ = up.blobs.remove(&id, handle.as_deref()).await;
    }
    if !created? {
        return Err(Refusal::new(
            StatusCode::FORBIDDEN,
            "upload-quota-exceeded",
            format!(
                "you may hold at most {} bytes in {} unfinished uploads; finish or delete some",
                up.opts.quota.bytes, up.opts.quota.unfinished
            ),
        ));
    }
    let mut h = HeaderMap::new();
    let location = format!("{}/{id}", up.opts.base_path);
    h.insert(
        header::LOCATION,
        HeaderValue::from_str(&location).map_err(AppError::internal)?,
    );
    if with_bytes {
        let row = UploadRow {
            id: id.clone(),
            owner_id: authed.user_id.clone(),
            subject,
            upload_length: length,
            upload_offset: 0,
            metadata: metadata.raw().to_owned(),
            blob_handle: handle,
            attempt: 1,
            lease_until,
            created_at: now,
            expires_at: now + expire_ms(&up),
            completed_at: None,
            deleted_at: None,
        };
        // The upload exists whatever happens to its first bytes: a failure here is answered
        // as a PATCH's would be, and the client resumes from the offset HEAD gives.
        let offset = receive(&up, &row, None, body, declared, checksum)
            .await
            .map_err(|mut refused| {
                // The upload exists: the client resumes it from the offset HEAD gives.
                if let Some(l) = h.get(header::LOCATION) {
                    refused.0.headers.insert(header::LOCATION, l.clone());
                }
                refused
            })?;
        h.insert(UPLOAD_OFFSET, HeaderValue::from(offset));
        if offset < length {
            h.insert(
                UPLOAD_EXPIRES,
                http_date(holdfast_core::now_ms() + expire_ms(&up)),
            );
        }
    } else {
        h.insert(UPLOAD_EXPIRES, http_date(now + expire_ms(&up)));
    }
    Ok((StatusCode::CREATED, h).into_response())
}

fn unsupported_type() -> Refusal {
    Refusal::new(
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "wrong-content-type",
        format!("upload bytes are sent as Content-Type: {OFFSET_OCTET_STREAM}"),
    )
}

fn lease_ms(up: &Uploads) -> i64 {
    i64::try_from(up.opts.lease.as_millis()).unwrap_or(i64::MAX)
}

fn expire_ms(up: &Uploads) -> i64 {
    i64::try_from(up.opts.expire_after.as_millis()).unwrap_or(i64::MAX / 2)
}

/// `HEAD`: where the upload stands.
async fn head(
    State(up): State<Uploads>,
    authed: Authed,
    id: PathParam,
    headers: HeaderMap,
) -> Answer {
    speaks_tus(&headers)?;
    let row = live_upload(&up, &authed.user_id, upload_id(&id)?).await?;
    let mut h = HeaderMap::new();
    h.insert(UPLOAD_OFFSET, HeaderValue::from(row.upload_offset));
    h.insert(UPLOAD_LENGTH, HeaderValue::from(row.upload_length));
    if !row.metadata.is_empty() {
        if let Ok(v) = HeaderValue::from_str(&row.metadata) {
            h.insert(UPLOAD_METADATA, v);
        }
    }
    if !row.is_complete() {
        h.insert(UPLOAD_EXPIRES, http_date(row.expires_at));
    }
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok((StatusCode::OK, h).into_response())
}

/// `PATCH`: bytes at the upload's offset.
async fn patch(
    State(up): State<Uploads>,
    authed: Authed,
    id: PathParam,
    headers: HeaderMap,
    body: Body,
) -> Answer {
    speaks_tus(&headers)?;
    if is_offset_stream(&headers) != Some(true) {
        return Err(unsupported_type());
    }
    let client_offset = header_str(&headers, &UPLOAD_OFFSET)?
        .ok_or_else(|| {
            Refusal::new(
                StatusCode::BAD_REQUEST,
                "upload-offset-missing",
                "a PATCH needs Upload-Offset",
            )
        })
        .and_then(|v| tus::byte_count("Upload-Offset", v).map_err(Refusal::from))?;
    let declared = declared_length(&headers, &body)?;
    let checksum = header_str(&headers, &UPLOAD_CHECKSUM)?
        .map(Checksum::parse)
        .transpose()?;
    let id = upload_id(&id)?;
    let now = holdfast_core::now_ms();
    let Some((row, first_part)) = up
        .store
        .upload_take(&authed.user_id, id, now, now + lease_ms(&up))
        .await?
    else {
        // Not taken: say why, with the offset as it stands.
        let row = live_upload(&up, &authed.user_id, id).await?;
        if row.is_complete() || row.upload_offset != client_offset {
            return Err(offset_mismatch(row.upload_offset));
        }
        return Err(Refusal::new(
            StatusCode::LOCKED,
            "upload-busy",
            "another request is writing this upload; retry shortly",
        )
        .at(row.upload_offset));
    };
    if row.upload_offset != client_offset {
        up.store.upload_release(&row.id, row.attempt).await?;
        return Err(offset_mismatch(row.upload_offset));
    }
    let offset = receive(&up, &row, Some(first_part), body, declared, checksum).await?;
    let mut h = HeaderMap::new();
    h.insert(UPLOAD_OFFSET, HeaderValue::from(offset));
    if offset < row.upload_length {
        h.insert(
            UPLOAD_EXPIRES,
            http_date(holdfast_core::now_ms() + expire_ms(&up)),
        );
    }
    Ok((StatusCode::NO_CONTENT, h).into_response())
}

fn offset_mismatch(offset: i64) -> Refusal {
    Refusal::new(
        StatusCode::CONFLICT,
        "upload-offset-mismatch",
        format!("the upload is at offset {offset}; send bytes from there"),
    )
    .at(offset)
}

/// A part being written: its writer, number, where it starts, its size and digest so far.
struct OpenPart {
    writer: Box<dyn crate::PartWriter>,
    part_no: i64,
    start: i64,
    len: i64,
    sha: sha2::Sha256,
}

/// Takes `body` into the upload that `row` (taken, as attempt `row.attempt`) describes, at
/// its offset; the new offset. Releases the lease whatever happens.
async fn receive(
    up: &Uploads,
    row: &UploadRow,
    first_part: Option<i64>,
    body: Body,
    declared: Option<i64>,
    checksum: Option<Checksum>,
) -> Result<i64, Refusal> {
    // A blob store that keeps tails (see `BlobStore::keeps_tails`): the ledger's last part, if
    // short, is absorbed into this PATCH's first part.
    let tail = if up.blobs.keeps_tails() {
        let parts = up.store.upload_parts(&row.id).await?;
        parts
            .last()
            .filter(|p| p.etag.is_none() && p.start_offset + p.part_length == row.upload_offset)
            .cloned()
    } else {
        None
    };
    let mut r = Receiver {
        up,
        row,
        offset: row.upload_offset,
        next_start: row.upload_offset,
        progressive: checksum.is_none() && declared.is_some(),
        pending: Vec::new(),
        tail,
        absorbed: None,
        reserved: first_part,
    };
    let outcome = r.run(body, declared, checksum).await;
    if outcome.is_err() {
        r.discard_pending().await;
        let _ = up.store.upload_release(&row.id, row.attempt).await;
    }
    outcome
}

struct Receiver<'a> {
    up: &'a Uploads,
    row: &'a UploadRow,
    /// The acknowledged offset.
    offset: i64,
    /// Acknowledge each part as it fills (no checksum to wait for, and a declared length, so
    /// nothing past the upload's end can arrive).
    progressive: bool,
    /// Durable parts not yet acknowledged (a checksum, or an undeclared length, is pending).
    pending: Vec<UploadPart>,
    /// Where the next part starts.
    next_start: i64,
    /// A short last part in the ledger, to be absorbed by this PATCH's first part.
    tail: Option<UploadPart>,
    /// The tail absorbed by a pending part: its acknowledgement replaces it.
    absorbed: Option<UploadPart>,
    /// A part number the take already reserved for the first part.
    reserved: Option<i64>,
}

impl Receiver<'_> {
    fn lease_until(&self) -> i64 {
        holdfast_core::now_ms() + lease_ms(self.up)
    }

    async fn run(
        &mut self,
        body: Body,
        declared: Option<i64>,
        checksum: Option<Checksum>,
    ) -> Result<i64, Refusal> {
        let (up, row) = (self.up, self.row);
        let room = row.upload_length - row.upload_offset;
        if declared.is_some_and(|n| n > room) {
            return Err(past_the_end(room));
        }
        let mut hasher = checksum.as_ref().map(Checksum::hasher);
        let mut frames = body.into_data_stream();
        let mut open: Option<OpenPart> = None;
        let mut received: i64 = 0;
        let renew_every = up.opts.lease / 3;
        let mut next_renewal = Instant::now() + renew_every;
        // A body is idle from its last frame: renewing the lease meanwhile does not count.
        let mut last_frame = Instant::now();
        let interrupted = loop {
            let idle_until = last_frame + up.opts.body_idle_timeout;
            let frame = tokio::select! {
                frame = tokio::time::timeout_at(idle_until.into(), frames.next()) => frame,
                () = tokio::time::sleep_until(next_renewal.into()) => {
                    up.store.upload_renew(&row.id, row.attempt, self.lease_until()).await?;
                    next_renewal = Instant::now() + renew_every;
                    continue;
                }
            };
            last_frame = Instant::now();
            let mut bytes: Bytes = match frame {
                Ok(None) => break None,
                Ok(Some(Ok(bytes))) => bytes,
                Ok(Some(Err(e))) => break Some(e.to_string()),
                Err(_) => break Some("the body stalled".to_owned()),
            };
            received += bytes.len() as i64;
            if received > room {
                if let Some(part) = open.take() {
                    let done = self.finish(part).await?;
                    self.pending.push(done);
                }
                return Err(past_the_end(room));
            }
            if let Some(h) = hasher.as_mut() {
                h.update(&bytes);
            }
            while !bytes.is_empty() {
                let mut part = match open.take() {
                    Some(part) => part,
                    None => {
                        let part = self.open_part().await?;
                        next_renewal = Instant::now() + renew_every;
                        part
                    }
                };
                let room_in_part = up.opts.part_size - part.len as usize;
                let chunk = bytes.split_to(room_in_part.min(bytes.len()));
                part.sha.update(&chunk);
                part.len += chunk.len() as i64;
                part.writer.write(chunk).await?;
                if part.len as usize == up.opts.part_size {
                    let done = self.finish(part).await?;
                    self.pending.push(done);
                    if self.progressive {
                        self.ack(Some(self.lease_until())).await?;
                        next_renewal = Instant::now() + renew_every;
                    }
                } else {
                    open = Some(part);
                }
            }
        };
        if let Some(part) = open.take() {
            let done = self.finish(part).await?;
            self.pending.push(done);
        }
        if let Some(why) = interrupted {
            // The client went away or stalled. What arrived is durable; keep it when nothing
            // (a checksum, an undeclared length) stands in the way, as tus asks.
            if self.progressive {
                self.ack(None).await?;
            }
            return Err(Refusal::new(
                StatusCode::BAD_REQUEST,
                "body-incomplete",
                format!("{why}; ask HEAD for the offset and resume"),
            )
            .at(self.offset));
        }
        if let (Some(c), Some(h)) = (checksum, hasher) {
            if !c.matches(h) {
                return Err(Refusal::new(
                    StatusCode::from_u16(tus::CHECKSUM_MISMATCH).unwrap_or(StatusCode::BAD_REQUEST),
                    "checksum-mismatch",
                    "the body does not match Upload-Checksum; nothing was appended",
                )
                .at(self.offset));
            }
        }
        self.ack(None).await?;
        if self.offset == row.upload_length {
            let parts = up.store.upload_parts(&row.id).await?;
            up.blobs
                .complete(&row.id, row.blob_handle.as_deref(), &parts)
                .await?;
        }
        Ok(self.offset)
    }

    /// Starts the next part where the acknowledged and pending bytes end (or, absorbing a
    /// tail, where the tail starts, with its bytes); its number comes from the ledger (and
    /// renews the lease).
    async fn open_part(&mut self) -> Result<OpenPart, Refusal> {
        let (up, row) = (self.up, self.row);
        let part_no = match self.reserved.take() {
            Some(n) => n,
            None => {
                up.store
                    .upload_next_part(&row.id, row.attempt, self.lease_until())
                    .await?
            }
        };
        let tail = self.tail.take();
        let start = tail.as_ref().map_or(self.next_start, |t| t.start_offset);
        let writer = up
            .blobs
            .part(
                &row.id,
                row.blob_handle.as_deref(),
                PartPlace {
                    no: part_no,
                    start,
                    size: up.opts.part_size,
                },
            )
            .await?;
        let mut part = OpenPart {
            writer,
            part_no,
            start,
            len: 0,
            sha: sha2::Sha256::new(),
        };
        if let Some(tail) = tail {
            let range = tail.start_offset as u64..(tail.start_offset + tail.part_length) as u64;
            let mut bytes = up
                .blobs
                .read(
                    &row.id,
                    row.blob_handle.as_deref(),
                    std::slice::from_ref(&tail),
                    range,
                )
                .await?;
            while let Some(chunk) = bytes.next().await {
                let chunk = chunk.map_err(Error::Blob)?;
                part.sha.update(&chunk);
                part.len += chunk.len() as i64;
                part.writer.write(chunk).await?;
            }
            self.absorbed = Some(tail);
        }
        self.next_start = start;
        Ok(part)
    }

    async fn finish(&mut self, part: OpenPart) -> Result<UploadPart, Refusal> {
        let last = part.start + part.len == self.row.upload_length;
        let etag = self.renewing(part.writer.finish(last)).await?;
        self.next_start = part.start + part.len;
        Ok(UploadPart {
            part_no: part.part_no,
            start_offset: part.start,
            part_length: part.len,
            sha256: hex::encode(part.sha.finalize()),
            etag,
        })
    }

    /// Runs `work` (making a part durable: an fsync, an S3 PUT) while renewing the lease every
    /// third of it, so that no other writer can take the upload meanwhile; a renewal that
    /// finds the upload taken abandons the work (its part will never be named).
    async fn renewing<T>(
        &self,
        work: impl std::future::Future<Output = Result<T, Error>>,
    ) -> Result<T, Refusal> {
        let (up, row) = (self.up, self.row);
        tokio::pin!(work);
        loop {
            tokio::select! {
                done = &mut work => return Ok(done?),
                () = tokio::time::sleep(up.opts.lease / 3) => {
                    up.store.upload_renew(&row.id, row.attempt, self.lease_until()).await?;
                }
            }
        }
    }

    /// Acknowledges the pending parts (fenced by the attempt and the offset), keeping the
    /// lease until `lease_until` or releasing it.
    async fn ack(&mut self, lease_until: Option<i64>) -> Result<(), Refusal> {
        let now = holdfast_core::now_ms();
        let parts = std::mem::take(&mut self.pending);
        let replaces = if parts.is_empty() {
            None
        } else {
            self.absorbed.take()
        };
        match self
            .up
            .store
            .upload_ack(&UploadAck {
                id: &self.row.id,
                attempt: self.row.attempt,
                from_offset: self.offset,
                parts: &parts,
                now,
                expires_at: now + expire_ms(self.up),
                lease_until,
                replaces: replaces.as_ref(),
            })
            .await
        {
            Ok(offset) => {
                self.offset = offset;
                if let Some(tail) = replaces {
                    // No longer named by the ledger; if this fails, completion sweeps it.
                    let _ = self
                        .up
                        .blobs
                        .drop_part(&self.row.id, self.row.blob_handle.as_deref(), tail.part_no)
                        .await;
                }
                Ok(())
            }
            Err(e) => {
                // It may have committed (a connection lost at COMMIT): its parts are left where
                // they are, never deleted here; unnamed ones go when the upload completes or
                // is removed.
                self.absorbed = replaces;
                Err(e.into())
            }
        }
    }

    /// Throws away durable parts that will never be acknowledged.
    async fn discard_pending(&mut self) {
        for p in std::mem::take(&mut self.pending) {
            let _ = self
                .up
                .blobs
                .drop_part(&self.row.id, self.row.blob_handle.as_deref(), p.part_no)
                .await;
        }
    }
}

fn past_the_end(room: i64) -> Refusal {
    Refusal::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "past-upload-length",
        format!("the body runs past Upload-Length ({room} bytes left); nothing was appended"),
    )
}

/// `DELETE` (termination): the upload is gone at once; its bytes go now, or with the reaper.
async fn terminate(
    State(up): State<Uploads>,
    authed: Authed,
    id: PathParam,
    headers: HeaderMap,
) -> Answer {
    speaks_tus(&headers)?;
    let id = upload_id(&id)?;
    let row = up
        .store
        .upload_delete(&authed.user_id, id, holdfast_core::now_ms())
        .await?
        .ok_or_else(no_such_upload)?;
    match up.blobs.remove(&row.id, row.blob_handle.as_deref()).await {
        Ok(()) => up.store.upload_forget(&row.id).await?,
        Err(e) => tracing::warn!(upload = %row.id, error = %e, "upload bytes left for the reaper"),
    }
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// `GET {base}`: the user's uploads, newest first.
async fn list(State(up): State<Uploads>, authed: Authed) -> Answer {
    let rows = up.store.upload_list(&authed.user_id, 100).await?;
    let now = holdfast_core::now_ms();
    let uploads: Vec<_> = rows
        .iter()
        .map(|r| {
            let metadata = Metadata::parse(&r.metadata).unwrap_or_default().to_map();
            json!({
                "id": r.id,
                "location": format!("{}/{}", up.opts.base_path, r.id),
                "subject": r.subject,
                "length": r.upload_length,
                "offset": r.upload_offset,
                "complete": r.is_complete(),
                "expired": r.is_expired(now),
                "metadata": metadata,
                "created_at": r.created_at,
                "expires_at": (!r.is_complete()).then_some(r.expires_at),
            })
        })
        .collect();
    Ok(Json(json!({ "uploads": uploads })).into_response())
}

/// `GET {base}/{id}`: a complete upload's bytes, whole or one `Range`, as an attachment.
async fn download(
    State(up): State<Uploads>,
    authed: Authed,
    id: PathParam,
    headers: HeaderMap,
) -> Answer {
    let row = live_upload(&up, &authed.user_id, upload_id(&id)?).await?;
    if !row.is_complete() {
        return Err(Refusal::new(
            StatusCode::CONFLICT,
            "upload-incomplete",
            "this upload is not complete yet",
        )
        .at(row.upload_offset));
    }
    let len = row.upload_length as u64;
    let mut h = HeaderMap::new();
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    let asked = tus::range(
        headers.get(header::RANGE).and_then(|v| v.to_str().ok()),
        len,
    );
    let (status, start, end) = match asked {
        RangeAsk::Whole => (StatusCode::OK, 0, len),
        RangeAsk::Part(s, e) => {
            let v = format!("bytes {s}-{}/{len}", e - 1);
            h.insert(
                header::CONTENT_RANGE,
                HeaderValue::from_str(&v).map_err(AppError::internal)?,
            );
            (StatusCode::PARTIAL_CONTENT, s, e)
        }
        RangeAsk::Unsatisfiable => {
            let mut r = Refusal::new(
                StatusCode::RANGE_NOT_SATISFIABLE,
                "range-not-satisfiable",
                format!("the upload has {len} bytes"),
            );
            let v = format!("bytes */{len}");
            if let Ok(v) = HeaderValue::from_str(&v) {
                r.0.headers.insert(header::CONTENT_RANGE, v);
            }
            return Err(r);
        }
    };
    let parts = up.store.upload_parts(&row.id).await?;
    let stream = up
        .blobs
        .read(&row.id, row.blob_handle.as_deref(), &parts, start..end)
        .await?;
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(end - start));
    h.insert(
        HeaderName::from_static("x-content-type-options"),
        HeaderValue::from_static("nosniff"),
    );
    let filename = Metadata::parse(&row.metadata)
        .ok()
        .and_then(|m| m.get("filename").map(safe_filename))
        .unwrap_or_else(|| format!("{}.bin", row.id));
    if let Ok(v) = HeaderValue::from_str(&format!("attachment; filename=\"{filename}\"")) {
        h.insert(header::CONTENT_DISPOSITION, v);
    }
    Ok((status, h, Body::from_stream(stream)).into_response())
}

/// A filename safe to put in a header: letters, digits, `.`, `-`, `_`; at most 100 of them.
fn safe_filename(name: &str) -> String {
    let s: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_') {
                c
            } else {
                '_'
            }
        })
        .take(100)
        .collect();
    if s.trim_matches('.').is_empty() {
        "upload.bin".into()
    } else {
        s
    }
}
