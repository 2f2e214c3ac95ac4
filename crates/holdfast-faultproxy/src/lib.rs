//! A TCP fault-injection proxy that speaks the Toxiproxy HTTP API.
//!
//! Game-day drills need the network between Holdfast and its dependencies (PostgreSQL,
//! Redis, the payment provider) to go bad on cue: slow, lossy, cut, reset. Toxiproxy is the
//! usual tool for that and has clients in every language, but it is one more Go binary to
//! install, version and supervise. This crate is a Toxiproxy in-process: the drill and tests
//! drive it through [`FaultProxy`], and anything that already speaks Toxiproxy (client
//! libraries, `curl` scripts) drives it through [`FaultProxy::serve_api`].
//!
//! ```no_run
//! # async fn drill() -> Result<(), holdfast_faultproxy::Error> {
//! use holdfast_faultproxy::{FaultProxy, Toxic, ToxicSpec};
//!
//! let faults = FaultProxy::new();
//! let pg = faults.create_proxy("postgres", "127.0.0.1:0", "127.0.0.1:5432").await?;
//! // … point Holdfast at `pg.listen` …
//! let slow = ToxicSpec::new(Toxic::Latency { latency: 500, jitter: 50 });
//! faults.add_toxic("postgres", slow).await?;
//! faults.set_enabled("postgres", false).await?; // partition: connections cut, connects refused
//! faults.reset().await; // back to healthy
//! # Ok(()) }
//! ```
//!
//! Compatible with Toxiproxy's v2 HTTP API (JSON in and out, errors as
//! `{"error": "...", "status": N}`):
//! - `GET /version`: `{"version": "2.7.0"}`, like current Toxiproxy.
//! - `GET /proxies` (map of name to proxy), `POST /proxies` (201, 409 if the name exists),
//!   `GET`, `POST`/`PATCH` (update `listen`, `upstream`, `enabled`) and `DELETE` (204)
//!   on `/proxies/{proxy}`. A `listen` with port 0 reports the bound port.
//! - `POST /populate` (create, or replace when `listen`/`upstream` differ; 201 with
//!   `{"proxies": [...]}`) and `POST /reset` (enable every proxy, remove every toxic; 204).
//! - `GET`/`POST /proxies/{proxy}/toxics` (create answers 200; default name
//!   `<type>_<stream>`, stream `downstream`, toxicity 1) and `GET`, `POST`/`PATCH` (merge
//!   `attributes`, set `toxicity`), `DELETE` on `/proxies/{proxy}/toxics/{toxic}`.
//! - Toxics `latency`, `bandwidth`, `timeout`, `reset_peer`, `slow_close`, `slicer`,
//!   `limit_data` with Toxiproxy's attributes; see [`Toxic`]. `toxicity` is drawn per
//!   connection when a toxic first meets it, and again when the toxic is updated.
//! - Changes reach live connections at once: a new, updated or removed toxic acts on data
//!   already in flight (a delayed chunk goes out as soon as its latency is removed), removing
//!   a `timeout` closes the connections it held, and `enabled: false` closes the listener and
//!   every connection (new ones are refused) until re-enabled on the same address.
//! - Requests whose `User-Agent` starts with `Mozilla/` are refused (403), as in Toxiproxy, so
//!   a web page cannot drive the API.
//!
//! Not compatible: no `/metrics`, no TLS, none of Toxiproxy's other toxics. Where Toxiproxy
//! closes the whole connection when one side closes, this proxy passes the half-close on.
//! Removing a `timeout` closes only the connections it held (Toxiproxy: every connection on
//! that stream), and its clock does not restart with each chunk. `slicer` draws each piece's
//! size independently rather than by Toxiproxy's recursive halving. Input is checked more
//! strictly (toxicity must be in 0..=1, attributes non-negative integers), and a missing
//! `listen` means `127.0.0.1:0`.

mod api;
mod error;
mod link;
mod toxic;

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio::sync::{watch, Mutex};

pub use error::Error;
pub use toxic::{Stream, Toxic, ToxicSpec};

use crate::link::{ActiveToxic, Run, Toxics};
use crate::toxic::ToxicPatch;

/// The Toxiproxy release whose API this crate follows; `GET /version` reports it.
pub const TOXIPROXY_VERSION: &str = "2.7.0";

const DEFAULT_LISTEN: &str = "127.0.0.1:0";

/// The fault proxy: a set of named TCP proxies and their toxics. A cheap-to-clone handle;
/// the proxies live until the last handle is dropped, which closes them all.
#[derive(Clone, Default)]
pub struct FaultProxy {
    inner: Arc<Inner>,
}

#[derive(Default)]
struct Inner {
    proxies: Mutex<BTreeMap<String, Proxy>>,
    ids: AtomicU64,
}

/// A proxy as the API shows it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ProxyInfo {
    pub name: String,
    /// The bound address once the proxy has been enabled (with the real port when port 0
    /// was asked for); until then the address as given.
    pub listen: String,
    pub upstream: String,
    pub enabled: bool,
    pub toxics: Vec<ToxicSpec>,
}

impl ProxyInfo {
    /// `listen` as a socket address, once bound.
    pub fn listen_addr(&self) -> Option<SocketAddr> {
        self.listen.parse().ok()
    }
}

/// A proxy to create, as `POST /proxies` and `POST /populate` take it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProxySpec {
    #[serde(default)]
    pub name: String,
    /// `host:port` to listen on; port 0 picks a free one. Empty means `127.0.0.1:0`.
    #[serde(default)]
    pub listen: String,
    /// `host:port` to connect to, resolved on every new connection.
    #[serde(default)]
    pub upstream: String,
    #[serde(default = "enabled_by_default")]
    pub enabled: bool,
}

fn enabled_by_default() -> bool {
    true
}

impl ProxySpec {
    pub fn new(name: &str, listen: &str, upstream: &str) -> Self {
        ProxySpec {
            name: name.to_owned(),
            listen: listen.to_owned(),
            upstream: upstream.to_owned(),
            enabled: true,
        }
    }

    fn validate(&self) -> Result<(), Error> {
        if self.name.is_empty() {
            return Err(Error::MissingField("name"));
        }
        if self.upstream.is_empty() {
            return Err(Error::MissingField("upstream"));
        }
        Ok(())
    }
}

/// Changes to a proxy; `None` keeps the current value. Changing `listen` or `upstream`
/// restarts the proxy, closing its connections (as in Toxiproxy).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProxyUpdate {
    #[serde(default)]
    pub listen: Option<String>,
    #[serde(default)]
    pub upstream: Option<String>,
    #[serde(default)]
    pub enabled: Option<bool>,
}

struct Proxy {
    name: String,
    listen: String,
    upstream: String,
    toxics: Vec<ActiveToxic>,
    /// What live connections see of `toxics`.
    published: watch::Sender<Toxics>,
    /// `Some` while enabled.
    run: Option<Run>,
}

impl Proxy {
    fn new(spec: &ProxySpec) -> Self {
        Proxy {
            name: spec.name.clone(),
            listen: spec.listen.clone(),
            upstream: spec.upstream.clone(),
            toxics: Vec::new(),
            published: watch::channel(Vec::new().into()).0,
            run: None,
        }
    }

    fn info(&self) -> ProxyInfo {
        ProxyInfo {
            name: self.name.clone(),
            listen: self.listen.clone(),
            upstream: self.upstream.clone(),
            enabled: self.run.is_some(),
            toxics: self.toxics.iter().map(|t| t.spec.clone()).collect(),
        }
    }

    fn publish(&self) {
        self.published.send_replace(self.toxics.clone().into());
    }

    async fn start(&mut self) -> Result<(), Error> {
        if self.run.is_some() {
            return Ok(());
        }
        let listen = if self.listen.is_empty() {
            DEFAULT_LISTEN
        } else {
            &self.listen
        };
        let listen_error = |error| Error::Listen {
            listen: listen.to_owned(),
            error,
        };
        let listener = TcpListener::bind(listen).await.map_err(listen_error)?;
        let bound = listener.local_addr().map_err(listen_error)?;
        self.listen = bound.to_string();
        let toxics = self.published.subscribe();
        self.run = Some(Run::start(listener, self.upstream.clone(), toxics));
        Ok(())
    }

    async fn stop(&mut self) {
        if let Some(run) = self.run.take() {
            run.stop().await;
        }
    }

    fn toxic_index(&self, name: &str) -> Result<usize, Error> {
        self.toxics
            .iter()
            .position(|t| t.spec.name == name)
            .ok_or_else(|| Error::ToxicNotFound {
                proxy: self.name.clone(),
                toxic: name.to_owned(),
            })
    }
}

/// Whether a requested `listen` names the address a proxy already has: the same text, or
/// port 0 on the same IP (so repeating a `/populate` with port 0 leaves proxies alone).
fn same_listen(requested: &str, current: &str) -> bool {
    if requested == current {
        return true;
    }
    match (
        requested.parse::<SocketAddr>(),
        current.parse::<SocketAddr>(),
    ) {
        (Ok(r), Ok(c)) => r.port() == 0 && r.ip() == c.ip(),
        _ => false,
    }
}

fn get<'a>(proxies: &'a mut BTreeMap<String, Proxy>, name: &str) -> Result<&'a mut Proxy, Error> {
    proxies
        .get_mut(name)
        .ok_or_else(|| Error::ProxyNotFound(name.to_owned()))
}

impl FaultProxy {
    pub fn new() -> Self {
        Self::default()
    }

    /// Serves the Toxiproxy HTTP API on `listener` until `shutdown` completes. The proxies
    /// outlive the API; they close when the last handle is dropped.
    pub async fn serve_api(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> io::Result<()> {
        axum::serve(listener, api::router(self))
            .with_graceful_shutdown(shutdown)
            .await
    }

    /// Creates and enables a proxy (`POST /proxies`).
    pub async fn create_proxy(
        &self,
        name: &str,
        listen: &str,
        upstream: &str,
    ) -> Result<ProxyInfo, Error> {
        self.add_proxy(ProxySpec::new(name, listen, upstream)).await
    }

    /// Creates a proxy, enabled or not (`POST /proxies`).
    pub async fn add_proxy(&self, spec: ProxySpec) -> Result<ProxyInfo, Error> {
        spec.validate()?;
        let mut proxies = self.inner.proxies.lock().await;
        if proxies.contains_key(&spec.name) {
            return Err(Error::ProxyExists(spec.name));
        }
        let mut proxy = Proxy::new(&spec);
        if spec.enabled {
            proxy.start().await?;
        }
        let info = proxy.info();
        proxies.insert(spec.name, proxy);
        Ok(info)
    }

    /// Every proxy, by name.
    pub async fn proxies(&self) -> Vec<ProxyInfo> {
        let proxies = self.inner.proxies.lock().await;
        proxies.values().map(Proxy::info).collect()
    }

    pub async fn proxy(&self, name: &str) -> Result<ProxyInfo, Error> {
        let mut proxies = self.inner.proxies.lock().await;
        Ok(get(&mut proxies, name)?.info())
    }

    /// Updates a proxy (`POST`/`PATCH /proxies/{proxy}`).
    pub async fn update_proxy(&self, name: &str, update: ProxyUpdate) -> Result<ProxyInfo, Error> {
        let mut proxies = self.inner.proxies.lock().await;
        let proxy = get(&mut proxies, name)?;
        let listen = update.listen.filter(|l| !same_listen(l, &proxy.listen));
        let upstream = update.upstream.filter(|u| *u != proxy.upstream);
        let enabled = update.enabled.unwrap_or(proxy.run.is_some());
        if listen.is_some() || upstream.is_some() || !enabled {
            proxy.stop().await;
        }
        if let Some(listen) = listen {
            proxy.listen = listen;
        }
        if let Some(upstream) = upstream {
            proxy.upstream = upstream;
        }
        if enabled {
            proxy.start().await?;
        }
        Ok(proxy.info())
    }

    /// Cuts (`false`: the listener and every connection close, new connections are refused)
    /// or restores (`true`: listening again on the same address) the link.
    pub async fn set_enabled(&self, name: &str, enabled: bool) -> Result<(), Error> {
        let update = ProxyUpdate {
            enabled: Some(enabled),
            ..ProxyUpdate::default()
        };
        self.update_proxy(name, update).await.map(drop)
    }

    /// Deletes a proxy, closing its listener and connections.
    pub async fn delete_proxy(&self, name: &str) -> Result<(), Error> {
        let mut proxy = {
            let mut proxies = self.inner.proxies.lock().await;
            proxies
                .remove(name)
                .ok_or_else(|| Error::ProxyNotFound(name.to_owned()))?
        };
        proxy.stop().await;
        Ok(())
    }

    /// Creates or replaces proxies (`POST /populate`): a proxy whose `listen` and `upstream`
    /// are unchanged is left as it is (toxics included); any other is replaced by a new one.
    /// On error, the proxies before the failing one stay applied.
    pub async fn populate(&self, specs: Vec<ProxySpec>) -> Result<Vec<ProxyInfo>, Error> {
        match self.populate_partial(specs).await {
            (applied, None) => Ok(applied),
            (_, Some(error)) => Err(error),
        }
    }

    pub(crate) async fn populate_partial(
        &self,
        specs: Vec<ProxySpec>,
    ) -> (Vec<ProxyInfo>, Option<Error>) {
        for (i, spec) in specs.iter().enumerate() {
            if let Err(error) = spec.validate() {
                return (Vec::new(), Some(error));
            }
            if specs[..i].iter().any(|s| s.name == spec.name) {
                let error = Error::BadRequest(format!("duplicate proxy name {:?}", spec.name));
                return (Vec::new(), Some(error));
            }
        }
        let mut proxies = self.inner.proxies.lock().await;
        let mut applied = Vec::with_capacity(specs.len());
        for spec in specs {
            if let Some(existing) = proxies.get(&spec.name) {
                if same_listen(&spec.listen, &existing.listen) && spec.upstream == existing.upstream
                {
                    applied.push(existing.info());
                    continue;
                }
            }
            if let Some(mut replaced) = proxies.remove(&spec.name) {
                replaced.stop().await;
            }
            let mut proxy = Proxy::new(&spec);
            if spec.enabled {
                if let Err(error) = proxy.start().await {
                    return (applied, Some(error));
                }
            }
            applied.push(proxy.info());
            proxies.insert(spec.name, proxy);
        }
        (applied, None)
    }

    /// Enables every proxy and removes every toxic (`POST /reset`). A proxy whose address
    /// cannot be bound again stays disabled (logged).
    pub async fn reset(&self) {
        let mut proxies = self.inner.proxies.lock().await;
        for proxy in proxies.values_mut() {
            proxy.toxics.clear();
            proxy.publish();
            if let Err(error) = proxy.start().await {
                tracing::warn!(proxy = %proxy.name, %error, "fault proxy: reset could not re-enable");
            }
        }
    }

    /// Adds a toxic (`POST /proxies/{proxy}/toxics`); returns it with its name filled in.
    pub async fn add_toxic(&self, proxy: &str, toxic: ToxicSpec) -> Result<ToxicSpec, Error> {
        let toxic = toxic.normalized()?;
        let id = self.next_id();
        let mut proxies = self.inner.proxies.lock().await;
        let proxy = get(&mut proxies, proxy)?;
        if proxy.toxic_index(&toxic.name).is_ok() {
            return Err(Error::ToxicExists {
                proxy: proxy.name.clone(),
                toxic: toxic.name,
            });
        }
        proxy.toxics.push(ActiveToxic {
            id,
            rev: id,
            spec: toxic.clone(),
        });
        proxy.publish();
        Ok(toxic)
    }

    /// Replaces the type, attributes and toxicity of the toxic named `toxic.name`; its stream
    /// stays. Live connections draw its toxicity again.
    pub async fn update_toxic(&self, proxy: &str, toxic: ToxicSpec) -> Result<ToxicSpec, Error> {
        let toxic = toxic.normalized()?;
        let name = toxic.name.clone();
        self.modify_toxic(proxy, &name, |current| {
            Ok(ToxicSpec {
                stream: current.stream,
                ..toxic
            })
        })
        .await
    }

    /// `POST`/`PATCH /proxies/{proxy}/toxics/{toxic}`.
    pub(crate) async fn patch_toxic(
        &self,
        proxy: &str,
        name: &str,
        patch: ToxicPatch,
    ) -> Result<ToxicSpec, Error> {
        self.modify_toxic(proxy, name, |current| current.patched(patch))
            .await
    }

    async fn modify_toxic(
        &self,
        proxy: &str,
        name: &str,
        change: impl FnOnce(&ToxicSpec) -> Result<ToxicSpec, Error>,
    ) -> Result<ToxicSpec, Error> {
        let rev = self.next_id();
        let mut proxies = self.inner.proxies.lock().await;
        let proxy = get(&mut proxies, proxy)?;
        let index = proxy.toxic_index(name)?;
        let toxic = &mut proxy.toxics[index];
        toxic.spec = change(&toxic.spec)?;
        toxic.rev = rev;
        let spec = toxic.spec.clone();
        proxy.publish();
        Ok(spec)
    }

    /// The toxics of a proxy, in the order they were added.
    pub async fn toxics(&self, proxy: &str) -> Result<Vec<ToxicSpec>, Error> {
        Ok(self.proxy(proxy).await?.toxics)
    }

    pub async fn toxic(&self, proxy: &str, name: &str) -> Result<ToxicSpec, Error> {
        let mut proxies = self.inner.proxies.lock().await;
        let proxy = get(&mut proxies, proxy)?;
        Ok(proxy.toxics[proxy.toxic_index(name)?].spec.clone())
    }

    /// Removes a toxic; live connections stop feeling it at once.
    pub async fn remove_toxic(&self, proxy: &str, toxic: &str) -> Result<(), Error> {
        let mut proxies = self.inner.proxies.lock().await;
        let proxy = get(&mut proxies, proxy)?;
        let index = proxy.toxic_index(toxic)?;
        proxy.toxics.remove(index);
        proxy.publish();
        Ok(())
    }

    fn next_id(&self) -> u64 {
        self.inner.ids.fetch_add(1, Ordering::Relaxed) + 1
    }
}

impl fmt::Debug for FaultProxy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FaultProxy").finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::same_listen;

    #[test]
    fn port_zero_matches_the_bound_address_on_the_same_ip() {
        assert!(same_listen("127.0.0.1:0", "127.0.0.1:4100"));
        assert!(same_listen("localhost:4100", "localhost:4100"));
        assert!(!same_listen("127.0.0.1:4101", "127.0.0.1:4100"));
        assert!(!same_listen("0.0.0.0:0", "127.0.0.1:4100"));
    }
}
