//! The Toxiproxy HTTP API: status codes, JSON shapes and errors as Toxiproxy answers them.

mod common;

use common::*;
use holdfast_faultproxy::FaultProxy;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use tokio::net::TcpStream;

struct Api {
    url: String,
    http: reqwest::Client,
}

impl Api {
    async fn start() -> Api {
        Api {
            url: serve_api(&FaultProxy::new()).await,
            http: reqwest::Client::new(),
        }
    }

    /// Sends a request; the answer's status and JSON body (`Null` when empty).
    async fn call(&self, method: Method, path: &str, body: Option<Value>) -> (StatusCode, Value) {
        let mut request = self.http.request(method, format!("{}{path}", self.url));
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = within(path, request.send()).await.unwrap();
        let status = response.status();
        let bytes = response.bytes().await.unwrap();
        let json = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).unwrap()
        };
        (status, json)
    }
}

/// Asserts a Toxiproxy error: `{"error": "<prefix>…", "status": <status>}`.
fn assert_error((status, body): (StatusCode, Value), expected: StatusCode, prefix: &str) {
    assert_eq!(status, expected, "{body}");
    assert_eq!(body["status"], expected.as_u16(), "{body}");
    let message = body["error"].as_str().unwrap();
    assert!(
        message.starts_with(prefix),
        "{message:?} should start with {prefix:?}"
    );
}

fn listen_of(proxy: &Value) -> std::net::SocketAddr {
    proxy["listen"].as_str().unwrap().parse().unwrap()
}

#[tokio::test]
async fn proxies_are_created_shown_updated_and_deleted() {
    let api = Api::start().await;
    let upstream = echo_server().await.to_string();
    let (status, version) = api.call(Method::GET, "/version", None).await;
    assert_eq!(status, StatusCode::OK);
    assert!(version["version"].as_str().unwrap().starts_with("2."));

    let create = json!({"name": "db", "listen": "127.0.0.1:0", "upstream": upstream});
    let (status, proxy) = api
        .call(Method::POST, "/proxies", Some(create.clone()))
        .await;
    assert_eq!(status, StatusCode::CREATED);
    let addr = listen_of(&proxy);
    assert_ne!(addr.port(), 0, "listen must report the bound port");
    let expected = json!({"name": "db", "listen": addr.to_string(), "upstream": upstream,
        "enabled": true, "toxics": []});
    assert_eq!(proxy, expected);
    round_trip(&mut connect(addr).await, b"hi").await;

    let conflict = api.call(Method::POST, "/proxies", Some(create)).await;
    assert_error(conflict, StatusCode::CONFLICT, "proxy already exists");
    let (_, all) = api.call(Method::GET, "/proxies", None).await;
    assert_eq!(all, json!({"db": expected}));

    let (status, proxy) = api
        .call(Method::POST, "/proxies/db", Some(json!({"enabled": false})))
        .await;
    assert_eq!((status, &proxy["enabled"]), (StatusCode::OK, &json!(false)));
    assert!(TcpStream::connect(addr).await.is_err());
    let (_, proxy) = api
        .call(Method::PATCH, "/proxies/db", Some(json!({"enabled": true})))
        .await;
    assert_eq!(proxy, expected, "re-enabled on the same address");
    round_trip(&mut connect(addr).await, b"hi").await;

    let (status, _) = api.call(Method::DELETE, "/proxies/db", None).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let missing = api.call(Method::GET, "/proxies/db", None).await;
    assert_error(missing, StatusCode::NOT_FOUND, "proxy not found");
    let missing = api.call(Method::DELETE, "/proxies/db", None).await;
    assert_error(missing, StatusCode::NOT_FOUND, "proxy not found");
}

#[tokio::test]
async fn toxics_are_created_updated_and_removed() {
    let api = Api::start().await;
    let upstream = echo_server().await.to_string();
    let create = json!({"name": "db", "listen": "127.0.0.1:0", "upstream": upstream});
    api.call(Method::POST, "/proxies", Some(create)).await;

    let latency = json!({"type": "latency", "attributes": {"latency": 100}});
    let (status, toxic) = api
        .call(Method::POST, "/proxies/db/toxics", Some(latency.clone()))
        .await;
    assert_eq!(status, StatusCode::OK);
    let expected = json!({"name": "latency_downstream", "type": "latency", "stream": "downstream",
        "toxicity": 1.0, "attributes": {"latency": 100, "jitter": 0}});
    assert_eq!(toxic, expected);

    let cases = [
        (latency, StatusCode::CONFLICT, "toxic already exists"),
        (
            json!({"type": "nope"}),
            StatusCode::BAD_REQUEST,
            "invalid toxic type",
        ),
        (
            json!({"type": "latency", "stream": "sideways"}),
            StatusCode::BAD_REQUEST,
            "stream was invalid",
        ),
        (
            json!({"type": "latency", "toxicity": 2}),
            StatusCode::BAD_REQUEST,
            "bad request body",
        ),
    ];
    for (body, status, prefix) in cases {
        let answer = api
            .call(Method::POST, "/proxies/db/toxics", Some(body))
            .await;
        assert_error(answer, status, prefix);
    }
    let missing = api
        .call(
            Method::POST,
            "/proxies/nope/toxics",
            Some(json!({"type": "latency"})),
        )
        .await;
    assert_error(missing, StatusCode::NOT_FOUND, "proxy not found");

    let path = "/proxies/db/toxics/latency_downstream";
    let (status, toxic) = api
        .call(
            Method::POST,
            path,
            Some(json!({"attributes": {"jitter": 5}})),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(toxic["attributes"], json!({"latency": 100, "jitter": 5}));
    let (_, toxic) = api
        .call(Method::PATCH, path, Some(json!({"toxicity": 0.5})))
        .await;
    assert_eq!(toxic["toxicity"], json!(0.5));
    assert_eq!(toxic["attributes"]["jitter"], json!(5));

    let (_, list) = api.call(Method::GET, "/proxies/db/toxics", None).await;
    assert_eq!(list, json!([toxic]));
    let (_, shown) = api.call(Method::GET, path, None).await;
    assert_eq!(shown, toxic);
    let (_, proxy) = api.call(Method::GET, "/proxies/db", None).await;
    assert_eq!(proxy["toxics"], json!([toxic]));

    let (status, _) = api.call(Method::DELETE, path, None).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let missing = api.call(Method::DELETE, path, None).await;
    assert_error(missing, StatusCode::NOT_FOUND, "toxic not found");
    let missing = api.call(Method::GET, path, None).await;
    assert_error(missing, StatusCode::NOT_FOUND, "toxic not found");
}

#[tokio::test]
async fn populate_creates_or_replaces_and_reset_restores() {
    let api = Api::start().await;
    let upstream = echo_server().await.to_string();
    let other_upstream = echo_server().await.to_string();
    let spec = |name: &str, upstream: &str| json!({"name": name, "listen": "127.0.0.1:0", "upstream": upstream});
    let both = json!([spec("a", &upstream), spec("b", &upstream)]);

    let (status, created) = api
        .call(Method::POST, "/populate", Some(both.clone()))
        .await;
    assert_eq!(status, StatusCode::CREATED);
    let proxies = created["proxies"].as_array().unwrap();
    assert_eq!(proxies.len(), 2);
    let (a, b) = (listen_of(&proxies[0]), listen_of(&proxies[1]));
    round_trip(&mut connect(b).await, b"b").await;

    let (_, again) = api.call(Method::POST, "/populate", Some(both)).await;
    assert_eq!(again, created, "unchanged proxies are left alone");

    let toxic = json!({"type": "timeout", "attributes": {"timeout": 0}});
    api.call(Method::POST, "/proxies/a/toxics", Some(toxic))
        .await;
    api.call(Method::POST, "/proxies/b", Some(json!({"enabled": false})))
        .await;
    let (status, _) = api.call(Method::POST, "/reset", None).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (_, all) = api.call(Method::GET, "/proxies", None).await;
    for (name, addr) in [("a", a), ("b", b)] {
        assert_eq!(all[name]["enabled"], json!(true));
        assert_eq!(all[name]["toxics"], json!([]));
        round_trip(&mut connect(addr).await, name.as_bytes()).await;
    }

    let replace = json!([spec("a", &other_upstream)]);
    let (_, replaced) = api.call(Method::POST, "/populate", Some(replace)).await;
    assert_eq!(replaced["proxies"][0]["upstream"], json!(other_upstream));

    let invalid = json!([{"name": "c", "listen": "127.0.0.1:0"}]);
    let answer = api.call(Method::POST, "/populate", Some(invalid)).await;
    assert_error(
        answer,
        StatusCode::BAD_REQUEST,
        "missing required field: upstream",
    );
}

#[tokio::test]
async fn bad_requests_unknown_routes_and_browsers_get_toxiproxy_errors() {
    let api = Api::start().await;
    let response = api
        .http
        .post(format!("{}/proxies", api.url))
        .body("{not json")
        .send()
        .await
        .unwrap();
    let status = response.status();
    let body = response.json().await.unwrap();
    assert_error((status, body), StatusCode::BAD_REQUEST, "bad request body");

    let missing = api
        .call(Method::POST, "/proxies", Some(json!({"name": "x"})))
        .await;
    assert_error(
        missing,
        StatusCode::BAD_REQUEST,
        "missing required field: upstream",
    );
    let unknown = api.call(Method::GET, "/nowhere", None).await;
    assert_error(unknown, StatusCode::NOT_FOUND, "not found");

    let response = api
        .http
        .get(format!("{}/proxies", api.url))
        .header("User-Agent", "Mozilla/5.0")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::FORBIDDEN);
}
