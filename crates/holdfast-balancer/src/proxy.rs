//! Forwarding one client request: buffering, the retry rules, header hygiene, problem+json.

use std::error::Error as _;
use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::request::Parts;
use http::uri::{PathAndQuery, Uri};
use http::{Method, Request, Response, StatusCode, Version};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::Incoming;
use tokio::time::timeout;

use crate::{Balancer, Upstream};

pub(crate) type Body = BoxBody<Bytes, hyper::Error>;
/// What the balancer sends upstream: a buffered body, or a streamed one that may fail
/// (the client stalled or went away).
pub(crate) type UpstreamBody = BoxBody<Bytes, Box<dyn std::error::Error + Send + Sync>>;

/// A buffered body as an [`UpstreamBody`].
pub(crate) fn upstream_full(bytes: Bytes) -> UpstreamBody {
    Full::new(bytes).map_err(|never| match never {}).boxed()
}

use holdfast_http::IDEMPOTENCY_KEY;
const X_FORWARDED_FOR: &str = "x-forwarded-for";

/// Why an attempt produced no response to pass on.
enum Failure {
    /// The request never left the balancer: retrying is always safe.
    NotSent(String),
    /// The request may have reached the upstream.
    MaybeSent(String),
    /// No response within the attempt timeout; the request may have reached the upstream.
    TimedOut(SocketAddr),
    /// The upstream answered 503 and its `/readyz` says it is draining.
    Draining(SocketAddr),
    /// The upstream stopped answering its liveness probe while the request was in flight;
    /// the request may have reached it.
    Frozen(SocketAddr),
    /// The client's own body failed on its way (a streamed body stalled or was cut): the
    /// upstream is not to blame.
    ClientBody(String),
}

impl Balancer {
    pub(crate) async fn proxy(&self, req: Request<Incoming>, peer: SocketAddr) -> Response<Body> {
        let (parts, body) = req.into_parts();
        let streamed = self
            .inner
            .opts
            .streamed_routes
            .iter()
            .any(|route| route_matches(route, &parts.method, parts.uri.path()));
        if streamed {
            return self.proxy_streamed(parts, body, peer).await;
        }
        let body = match self.buffer(&parts.headers, body).await {
            Ok(body) => body,
            Err(resp) => return resp,
        };
        let retry_safe = is_retry_safe(
            &parts.method,
            parts.uri.path(),
            &parts.headers,
            &self.inner.opts.keyed_routes,
            &self.inner.opts.repeatable_routes,
        );
        let headers = forwarded_headers(&parts.headers, peer, Some(body.len()));
        let path = parts
            .uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"));

        let candidates = self.candidates();
        if candidates.is_empty() {
            let detail = if self.snapshot().is_empty() {
                "no upstream instance is configured"
            } else {
                "no upstream instance is answering"
            };
            return problem(StatusCode::SERVICE_UNAVAILABLE, detail);
        }
        let mut last = None;
        for (attempt, upstream) in candidates.iter().enumerate() {
            if attempt > 0 {
                self.inner.retries.fetch_add(1, Ordering::Relaxed);
            }
            let req = match upstream_request(
                &parts,
                upstream.addr,
                &path,
                &headers,
                upstream_full(body.clone()),
            ) {
                Ok(req) => req,
                Err(detail) => return problem(StatusCode::BAD_REQUEST, detail),
            };
            // On the last candidate even a draining upstream's 503 is the best answer we have.
            let retry_503 = retry_safe && attempt + 1 < candidates.len();
            let failure = match self.attempt(upstream, req, retry_503, true).await {
                Ok(resp) => return resp,
                Err(failure) => failure,
            };
            tracing::debug!(%failure, "attempt failed");
            if !retry_safe && failure.may_have_reached_upstream() {
                return unsafe_failure(&parts.method, &failure);
            }
            last = Some(failure);
        }
        let Some(failure) = last else {
            return problem(
                StatusCode::SERVICE_UNAVAILABLE,
                "no upstream instance answered",
            );
        };
        let detail = format!("every upstream failed; last: {failure}");
        tracing::warn!(method = %parts.method, uri = %parts.uri, %detail, "request failed");
        problem(failure.status(), detail)
    }

    /// A streamed route's request: its body flows to one upstream as it arrives (cut if it
    /// stalls for `body_read_timeout`), and is never re-sent: its body is gone once read.
    async fn proxy_streamed(
        &self,
        parts: Parts,
        body: Incoming,
        peer: SocketAddr,
    ) -> Response<Body> {
        let headers = forwarded_headers(&parts.headers, peer, None);
        let path = parts
            .uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"));
        let Some(upstream) = self.candidates().into_iter().next() else {
            return problem(
                StatusCode::SERVICE_UNAVAILABLE,
                "no upstream instance is answering",
            );
        };
        let body = idle_limited(body, self.inner.opts.body_read_timeout);
        let req = match upstream_request(&parts, upstream.addr, &path, &headers, body) {
            Ok(req) => req,
            Err(detail) => return problem(StatusCode::BAD_REQUEST, detail),
        };
        match self.attempt(&upstream, req, false, false).await {
            Ok(resp) => resp,
            Err(failure) => {
                let detail = format!(
                    "{failure}; a streamed request is sent once: ask the application where it \
                     stands and resume"
                );
                tracing::warn!(method = %parts.method, uri = %parts.uri, %detail, "request failed");
                problem(failure.status(), detail)
            }
        }
    }

    /// Sends `req` to `upstream` once; a failed attempt marks the upstream unhealthy. With
    /// `timed`, the answer's head must come within `attempt_timeout`.
    async fn attempt(
        &self,
        upstream: &Upstream,
        req: Request<UpstreamBody>,
        retry_503: bool,
        timed: bool,
    ) -> Result<Response<Body>, Failure> {
        let addr = upstream.addr;
        let frozen = upstream.frozen.notified();
        let limit = if timed {
            self.inner.opts.attempt_timeout
        } else {
            // A streamed body: the answer comes after the whole body, however long it takes.
            std::time::Duration::from_secs(365 * 24 * 3600)
        };
        let sent = timeout(limit, self.inner.client.request(req));
        let outcome = tokio::select! {
            outcome = sent => outcome,
            () = frozen => return Err(Failure::Frozen(addr)),
        };
        let eject = (
            self.inner.opts.eject_after_failures,
            self.inner.opts.ejection_time,
        );
        match outcome {
            Ok(Ok(resp)) => {
                let failed = matches!(
                    resp.status(),
                    StatusCode::INTERNAL_SERVER_ERROR
                        | StatusCode::BAD_GATEWAY
                        | StatusCode::GATEWAY_TIMEOUT
                );
                upstream.record(!failed, eject);
                if retry_503
                    && resp.status() == StatusCode::SERVICE_UNAVAILABLE
                    && self.is_draining(upstream).await
                {
                    return Err(Failure::Draining(addr));
                }
                Ok(downstream_response(resp))
            }
            Ok(Err(error)) if client_body_failed(&error) => Err(Failure::ClientBody(format!(
                "the request body failed on its way: {}",
                holdfast_core::error_chain(&error)
            ))),
            Ok(Err(error)) => {
                upstream.set_healthy(false);
                upstream.record(false, eject);
                let detail = format!("upstream {addr}: {}", holdfast_core::error_chain(&error));
                Err(if never_sent(&error) {
                    Failure::NotSent(detail)
                } else {
                    Failure::MaybeSent(detail)
                })
            }
            Err(_elapsed) => {
                upstream.set_healthy(false);
                upstream.record(false, eject);
                Err(Failure::TimedOut(addr))
            }
        }
    }

    /// Collects the request body so it can be re-sent, or answers 408/413/400.
    async fn buffer(&self, headers: &HeaderMap, body: Incoming) -> Result<Bytes, Response<Body>> {
        let max = self.inner.opts.max_buffered_body;
        let too_large = || {
            let mut resp = problem(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("request bodies are limited to {max} bytes"),
            );
            // The rest of the body is left unread, so this connection cannot carry another request.
            resp.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
            resp
        };
        let declared = headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|len| len > max as u64) {
            return Err(too_large());
        }
        let read = timeout(
            self.inner.opts.body_read_timeout,
            Limited::new(body, max).collect(),
        );
        let mut read = std::pin::pin!(read);
        // A body still arriving after a second is counted while it stalls: many at once is a
        // slow-client attack, visible before the timeout cuts them off.
        let read = tokio::select! {
            read = &mut read => read,
            () = tokio::time::sleep(STALLED_BODY_AFTER) => {
                let _stalled = Stalled::count(&self.inner.stalled_bodies);
                read.await
            }
        };
        let Ok(collected) = read else {
            self.inner.slow_clients.fetch_add(1, Ordering::Relaxed);
            let mut resp = problem(
                StatusCode::REQUEST_TIMEOUT,
                "the request body did not arrive in time",
            );
            resp.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
            return Err(resp);
        };
        match collected {
            Ok(collected) => Ok(collected.to_bytes()),
            Err(error) if error.is::<LengthLimitError>() => Err(too_large()),
            Err(error) => Err(problem(
                StatusCode::BAD_REQUEST,
                format!("could not read the request body: {error}"),
            )),
        }
    }

    /// A 503 came back: is the upstream draining (then the request goes elsewhere), or is this
    /// the application's own answer (then it is passed through)?
    async fn is_draining(&self, upstream: &Upstream) -> bool {
        !upstream.is_healthy() || !self.check_health(upstream).await
    }
}

impl Failure {
    fn may_have_reached_upstream(&self) -> bool {
        matches!(
            self,
            Self::MaybeSent(_) | Self::TimedOut(_) | Self::Frozen(_) | Self::ClientBody(_)
        )
    }

    fn status(&self) -> StatusCode {
        match self {
            Self::TimedOut(_) | Self::Frozen(_) => StatusCode::GATEWAY_TIMEOUT,
            Self::ClientBody(_) => StatusCode::BAD_REQUEST,
            _ => StatusCode::BAD_GATEWAY,
        }
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NotSent(detail) | Self::MaybeSent(detail) | Self::ClientBody(detail) => {
                f.write_str(detail)
            }
            Self::TimedOut(addr) => write!(f, "upstream {addr} did not answer in time"),
            Self::Draining(addr) => write!(f, "upstream {addr} is draining"),
            Self::Frozen(addr) => write!(f, "upstream {addr} stopped answering"),
        }
    }
}

fn unsafe_failure(method: &Method, failure: &Failure) -> Response<Body> {
    let detail = format!(
        "{failure}; the request may have reached it and was not retried because {method} \
         without an Idempotency-Key is not safe to repeat"
    );
    tracing::warn!(%method, %detail, "request failed");
    problem(failure.status(), detail)
}

/// Whether sending the request again can do no harm (see the crate docs): an idempotent
/// method, or a route the application declared to honour `Idempotency-Key`, called with one.
fn is_retry_safe(
    method: &Method,
    path: &str,
    headers: &HeaderMap,
    keyed: &[String],
    repeatable: &[String],
) -> bool {
    let declared = |routes: &[String]| {
        routes
            .iter()
            .any(|route| route_matches(route, method, path))
    };
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE | Method::TRACE
    ) || (headers.contains_key(IDEMPOTENCY_KEY) && declared(keyed))
        || declared(repeatable)
}

/// Whether `route` (`"POST /api/items/{id}"`: a method, then a path whose `{…}` segments match
/// any one segment) names this request.
fn route_matches(route: &str, method: &Method, path: &str) -> bool {
    let Some((m, pattern)) = route.split_once(' ') else {
        return false;
    };
    if m != method.as_str() {
        return false;
    }
    let (mut want, mut got) = (pattern.split('/'), path.split('/'));
    loop {
        match (want.next(), got.next()) {
            (None, None) => return true,
            (Some(w), Some(g))
                if w == g || (w.starts_with('{') && w.ends_with('}') && !g.is_empty()) => {}
            _ => return false,
        }
    }
}

/// Whether the attempt failed because the request's own body did (hyper's "user" errors: our
/// streamed client body stalled or was cut), not the upstream.
fn client_body_failed(error: &hyper_util::client::legacy::Error) -> bool {
    let mut source = error.source();
    while let Some(e) = source {
        if e.downcast_ref::<hyper::Error>()
            .is_some_and(hyper::Error::is_user)
        {
            return true;
        }
        source = e.source();
    }
    false
}

/// Whether the request certainly never reached the upstream: the connection could not be
/// established, or it closed before hyper started writing the request (hyper then reports the
/// request as canceled).
fn never_sent(error: &hyper_util::client::legacy::Error) -> bool {
    error.is_connect()
        || error
            .source()
            .and_then(|source| source.downcast_ref::<hyper::Error>())
            .is_some_and(hyper::Error::is_canceled)
}

/// A client's body passed on as it arrives; a wait of more than `idle` for the next frame
/// ends it with an error (the upstream sees the body cut short).
fn idle_limited(body: Incoming, idle: std::time::Duration) -> UpstreamBody {
    let frames = futures::stream::unfold(Some(body), move |body| async move {
        let mut body = body?;
        match timeout(idle, body.frame()).await {
            Ok(Some(Ok(frame))) => Some((Ok(frame), Some(body))),
            Ok(None) => None,
            Ok(Some(Err(e))) => Some((
                Err(Box::new(e) as Box<dyn std::error::Error + Send + Sync>),
                None,
            )),
            Err(_) => Some((Err("the request body stalled".into()), None)),
        }
    });
    http_body_util::StreamBody::new(frames).boxed()
}

fn upstream_request(
    parts: &Parts,
    addr: SocketAddr,
    path: &PathAndQuery,
    headers: &HeaderMap,
    body: UpstreamBody,
) -> Result<Request<UpstreamBody>, String> {
    let uri = Uri::builder()
        .scheme("http")
        .authority(addr.to_string())
        .path_and_query(path.clone())
        .build()
        .map_err(|error| format!("invalid request target: {error}"))?;
    let mut req = Request::new(body);
    *req.method_mut() = parts.method.clone();
    *req.uri_mut() = uri;
    *req.version_mut() = Version::HTTP_11;
    *req.headers_mut() = headers.clone();
    Ok(req)
}

/// The client's headers as sent upstream: end-to-end ones only, the body's length (a
/// buffered body's, `Some`; a streamed one keeps the client's `Content-Length`, if any), and
/// the client's address appended to `X-Forwarded-For`.
fn forwarded_headers(client: &HeaderMap, peer: SocketAddr, body_len: Option<usize>) -> HeaderMap {
    let mut headers = client.clone();
    strip_hop_by_hop(&mut headers);
    // The body is on its way; nothing to wait for.
    headers.remove(header::EXPECT);
    if let Some(body_len) = body_len {
        if headers.remove(header::CONTENT_LENGTH).is_some() || body_len > 0 {
            headers.insert(header::CONTENT_LENGTH, HeaderValue::from(body_len));
        }
    }
    let mut chain: Vec<&str> = client
        .get_all(X_FORWARDED_FOR)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect();
    let ip = peer.ip().to_string();
    chain.push(&ip);
    if let Ok(value) = HeaderValue::from_str(&chain.join(", ")) {
        headers.insert(X_FORWARDED_FOR, value);
    }
    headers
}

fn downstream_response(resp: Response<Incoming>) -> Response<Body> {
    let (mut parts, body) = resp.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    Response::from_parts(parts, body.boxed())
}

/// Removes the headers that describe one connection rather than the message (RFC 9110 §7.6.1).
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let listed: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    let proxy: Vec<HeaderName> = headers
        .keys()
        .filter(|name| name.as_str().starts_with("proxy-"))
        .cloned()
        .collect();
    let fixed = [
        header::CONNECTION,
        HeaderName::from_static("keep-alive"),
        header::TE,
        header::TRAILER,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
    ];
    for name in listed.into_iter().chain(proxy).chain(fixed) {
        headers.remove(name);
    }
}

pub(crate) fn full(bytes: Bytes) -> Body {
    Full::new(bytes).map_err(|never| match never {}).boxed()
}

/// An RFC 9457 problem response made by the balancer itself (type `about:blank`: the
/// status is the whole story, the detail says which upstream and why).
/// A 503 says when to come back.
pub(crate) fn problem(status: StatusCode, detail: impl Into<String>) -> Response<Body> {
    let p = holdfast_http::Problem::of_status(status, detail);
    let p = if status == StatusCode::SERVICE_UNAVAILABLE {
        p.retry_after(1)
    } else {
        p
    };
    p.to_response().map(full)
}

/// How long a request body may take to arrive before it counts as stalled.
const STALLED_BODY_AFTER: std::time::Duration = std::time::Duration::from_secs(1);

/// One stalled body in `holdfast_balancer_stalled_bodies`, for as long as it lives.
struct Stalled<'a>(&'a std::sync::atomic::AtomicU64);

impl<'a> Stalled<'a> {
    fn count(gauge: &'a std::sync::atomic::AtomicU64) -> Self {
        gauge.fetch_add(1, Ordering::Relaxed);
        Stalled(gauge)
    }
}

impl Drop for Stalled<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_safety_follows_method_and_declared_keyed_routes() {
        let none = HeaderMap::new();
        let mut keyed = HeaderMap::new();
        keyed.insert(IDEMPOTENCY_KEY, HeaderValue::from_static("k1"));
        let routes = [
            "POST /api/checkout".to_owned(),
            "POST /api/items/{id}".to_owned(),
        ];
        for (method, path, headers, safe) in [
            (Method::GET, "/x", &none, true),
            (Method::HEAD, "/x", &none, true),
            (Method::OPTIONS, "/x", &none, true),
            (Method::PUT, "/x", &none, true),
            (Method::DELETE, "/x", &none, true),
            (Method::TRACE, "/x", &none, true),
            (Method::POST, "/api/checkout", &none, false),
            (Method::POST, "/api/checkout", &keyed, true),
            (Method::POST, "/api/items/7", &keyed, true),
            (Method::POST, "/api/items/", &keyed, false),
            (Method::POST, "/api/items/7/x", &keyed, false),
            (Method::PATCH, "/api/checkout", &keyed, false),
            // A key on a route that does not honour it is no reason to send twice.
            (Method::POST, "/api/signup", &keyed, false),
            // A route declared repeatable is, key or not.
            (Method::POST, "/api/login", &none, true),
            (Method::POST, "/api/logins", &none, false),
        ] {
            let repeatable = ["POST /api/login".to_owned()];
            assert_eq!(
                is_retry_safe(&method, path, headers, &routes, &repeatable),
                safe,
                "{method} {path} {headers:?}"
            );
        }
    }

    #[test]
    fn hop_by_hop_headers_are_stripped_including_those_named_in_connection() {
        let mut headers = HeaderMap::new();
        for (name, value) in [
            ("connection", "keep-alive, x-session-hint"),
            ("keep-alive", "timeout=5"),
            ("proxy-authorization", "Basic x"),
            ("te", "trailers"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "websocket"),
            ("x-session-hint", "1"),
            ("cookie", "sid=1"),
            ("host", "shop.example"),
        ] {
            headers.append(name, HeaderValue::from_static(value));
        }
        strip_hop_by_hop(&mut headers);
        let mut left: Vec<&str> = headers.keys().map(HeaderName::as_str).collect();
        left.sort_unstable();
        assert_eq!(left, ["cookie", "host"]);
    }

    #[test]
    fn forwarded_for_appends_the_client_address() {
        let mut client = HeaderMap::new();
        client.insert(X_FORWARDED_FOR, HeaderValue::from_static("203.0.113.7"));
        let peer: SocketAddr = ([127, 0, 0, 1], 5000).into();
        let headers = forwarded_headers(&client, peer, Some(0));
        assert_eq!(headers[X_FORWARDED_FOR], "203.0.113.7, 127.0.0.1");
        assert!(!headers.contains_key(header::CONTENT_LENGTH));
        assert_eq!(
            forwarded_headers(&HeaderMap::new(), peer, Some(3))[header::CONTENT_LENGTH],
            "3"
        );
        // A streamed body keeps the length its client declared (none: chunked).
        client.insert(header::CONTENT_LENGTH, HeaderValue::from_static("1048576"));
        assert_eq!(
            forwarded_headers(&client, peer, None)[header::CONTENT_LENGTH],
            "1048576"
        );
        assert!(
            !forwarded_headers(&HeaderMap::new(), peer, None).contains_key(header::CONTENT_LENGTH)
        );
    }
}
