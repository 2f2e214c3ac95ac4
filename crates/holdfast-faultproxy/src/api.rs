//! The Toxiproxy v2 HTTP API over [`FaultProxy`].

use std::collections::BTreeMap;

use axum::body::Bytes;
use axum::extract::{Path, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::de::DeserializeOwned;
use serde_json::json;

use crate::toxic::{ToxicJson, ToxicPatch};
use crate::{Error, FaultProxy, ProxyInfo, ProxySpec, ProxyUpdate, ToxicSpec, TOXIPROXY_VERSION};

pub(crate) fn router(proxy: FaultProxy) -> Router {
    Router::new()
        .route("/version", get(version))
        .route("/reset", post(reset))
        .route("/populate", post(populate))
        .route("/proxies", get(proxy_index).post(proxy_create))
        .route(
            "/proxies/{proxy}",
            get(proxy_show)
                .post(proxy_update)
                .patch(proxy_update)
                .delete(proxy_delete),
        )
        .route(
            "/proxies/{proxy}/toxics",
            get(toxic_index).post(toxic_create),
        )
        .route(
            "/proxies/{proxy}/toxics/{toxic}",
            get(toxic_show)
                .post(toxic_update)
                .patch(toxic_update)
                .delete(toxic_delete),
        )
        .fallback(|| async { error_response(StatusCode::NOT_FOUND, "not found") })
        .layer(middleware::from_fn(refuse_browsers))
        .with_state(proxy)
}

/// Toxiproxy's guard: a web page must not be able to reconfigure the network.
async fn refuse_browsers(request: Request, next: Next) -> Response {
    let browser = request
        .headers()
        .get(header::USER_AGENT)
        .is_some_and(|ua| ua.as_bytes().starts_with(b"Mozilla/"));
    if browser {
        return error_response(StatusCode::FORBIDDEN, "User agent not allowed");
    }
    next.run(request).await
}

struct ApiError(Error);

impl From<Error> for ApiError {
    fn from(error: Error) -> Self {
        ApiError(error)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        error_response(status_of(&self.0), &self.0.to_string())
    }
}

fn status_of(error: &Error) -> StatusCode {
    let status = StatusCode::from_u16(error.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    if status.is_server_error() {
        tracing::warn!(%error, "fault proxy API");
    }
    status
}

fn error_response(status: StatusCode, message: &str) -> Response {
    let body = json!({"error": message, "status": status.as_u16()});
    (status, Json(body)).into_response()
}

type ApiResult<T> = Result<T, ApiError>;

/// Toxiproxy decodes every body as JSON whatever its `Content-Type`; so does this.
fn parse<T: DeserializeOwned>(body: &[u8]) -> Result<T, Error> {
    serde_json::from_slice(body).map_err(|e| Error::BadRequest(e.to_string()))
}

async fn version() -> Json<serde_json::Value> {
    Json(json!({"version": TOXIPROXY_VERSION}))
}

async fn reset(State(fp): State<FaultProxy>) -> StatusCode {
    fp.reset().await;
    StatusCode::NO_CONTENT
}

async fn populate(State(fp): State<FaultProxy>, body: Bytes) -> ApiResult<Response> {
    let specs: Vec<ProxySpec> = parse(&body)?;
    let (proxies, error) = fp.populate_partial(specs).await;
    Ok(match error {
        None => (StatusCode::CREATED, Json(json!({"proxies": proxies}))).into_response(),
        // Toxiproxy's shape: the error, plus the proxies applied before it.
        Some(error) => {
            let status = status_of(&error);
            let body = json!({"error": error.to_string(), "status": status.as_u16(),
                "proxies": proxies});
            (status, Json(body)).into_response()
        }
    })
}

async fn proxy_index(State(fp): State<FaultProxy>) -> Json<BTreeMap<String, ProxyInfo>> {
    let proxies = fp.proxies().await;
    Json(proxies.into_iter().map(|p| (p.name.clone(), p)).collect())
}

async fn proxy_create(
    State(fp): State<FaultProxy>,
    body: Bytes,
) -> ApiResult<(StatusCode, Json<ProxyInfo>)> {
    let spec = parse(&body)?;
    Ok((StatusCode::CREATED, Json(fp.add_proxy(spec).await?)))
}

async fn proxy_show(
    State(fp): State<FaultProxy>,
    Path(name): Path<String>,
) -> ApiResult<Json<ProxyInfo>> {
    Ok(Json(fp.proxy(&name).await?))
}

async fn proxy_update(
    State(fp): State<FaultProxy>,
    Path(name): Path<String>,
    body: Bytes,
) -> ApiResult<Json<ProxyInfo>> {
    let update: ProxyUpdate = parse(&body)?;
    Ok(Json(fp.update_proxy(&name, update).await?))
}

async fn proxy_delete(
    State(fp): State<FaultProxy>,
    Path(name): Path<String>,
) -> ApiResult<StatusCode> {
    fp.delete_proxy(&name).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn toxic_index(
    State(fp): State<FaultProxy>,
    Path(name): Path<String>,
) -> ApiResult<Json<Vec<ToxicSpec>>> {
    Ok(Json(fp.toxics(&name).await?))
}

async fn toxic_create(
    State(fp): State<FaultProxy>,
    Path(name): Path<String>,
    body: Bytes,
) -> ApiResult<Json<ToxicSpec>> {
    // The proxy is looked up first so an unknown proxy is a 404 whatever the body.
    fp.proxy(&name).await?;
    let toxic = ToxicSpec::try_from(parse::<ToxicJson>(&body)?)?;
    Ok(Json(fp.add_toxic(&name, toxic).await?))
}

async fn toxic_show(
    State(fp): State<FaultProxy>,
    Path((proxy, toxic)): Path<(String, String)>,
) -> ApiResult<Json<ToxicSpec>> {
    Ok(Json(fp.toxic(&proxy, &toxic).await?))
}

async fn toxic_update(
    State(fp): State<FaultProxy>,
    Path((proxy, toxic)): Path<(String, String)>,
    body: Bytes,
) -> ApiResult<Json<ToxicSpec>> {
    fp.toxic(&proxy, &toxic).await?;
    let patch: ToxicPatch = parse(&body)?;
    Ok(Json(fp.patch_toxic(&proxy, &toxic, patch).await?))
}

async fn toxic_delete(
    State(fp): State<FaultProxy>,
    Path((proxy, toxic)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    fp.remove_toxic(&proxy, &toxic).await?;
    Ok(StatusCode::NO_CONTENT)
}
