//! The balancer's own RED figures (requests by status class, their duration, retries,
//! throttling, connections), and `/ops/metrics`: those plus every process's `/metrics`
//! (instances' operator addresses and workers' addresses, from the published instance list)
//! merged into one valid exposition, each family's `# HELP`/`# TYPE` once and its series
//! together. Every process labels its own series (`role`, `instance`), so the merged page adds
//! up: sum it by `role`.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::BodyExt;
use serde::Deserialize;

use crate::Balancer;

/// Upper bounds (seconds) of the request-duration histogram.
const BUCKETS: [f64; 10] = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0];

/// Counters the proxy path bumps; rendered by [`Balancer::render_metrics`].
#[derive(Default)]
pub(crate) struct Red {
    /// Answers by status class: 1xx (index 0) … 5xx (index 4).
    by_class: [AtomicU64; 5],
    /// Cumulative-to-be: one count per bucket (and one past the last).
    buckets: [AtomicU64; BUCKETS.len() + 1],
    /// Microseconds, summed.
    sum_us: AtomicU64,
}

impl Red {
    pub(crate) fn record(&self, status: StatusCode, took: Duration) {
        let class = usize::from(status.as_u16() / 100).clamp(1, 5) - 1;
        self.by_class[class].fetch_add(1, Ordering::Relaxed);
        let s = took.as_secs_f64();
        let slot = BUCKETS
            .iter()
            .position(|&b| s <= b)
            .unwrap_or(BUCKETS.len());
        self.buckets[slot].fetch_add(1, Ordering::Relaxed);
        self.sum_us.fetch_add(
            u64::try_from(took.as_micros()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
    }
}

/// One second of the balancer's traffic, for the operator page's charts.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Second {
    /// Unix time, seconds.
    pub t: i64,
    pub requests: u64,
    /// 5xx answers.
    pub errors: u64,
    /// Bucket bounds: the answer time under which half (99%) of the second's requests fell.
    pub p50_ms: f64,
    pub p99_ms: f64,
}

/// The last five minutes, one [`Second`] each, and the counters at the last tick.
#[derive(Default)]
pub(crate) struct History {
    seconds: std::sync::Mutex<std::collections::VecDeque<Second>>,
    last: std::sync::Mutex<([u64; 5], [u64; BUCKETS.len() + 1])>,
}

const HISTORY_SECONDS: usize = 300;

impl Red {
    fn snapshot(&self) -> ([u64; 5], [u64; BUCKETS.len() + 1]) {
        (
            std::array::from_fn(|i| self.by_class[i].load(Ordering::Relaxed)),
            std::array::from_fn(|i| self.buckets[i].load(Ordering::Relaxed)),
        )
    }
}

/// The bucket bound (ms) under which a `q` share of `counts` fell.
fn quantile_ms(counts: &[u64], q: f64) -> f64 {
    let total: u64 = counts.iter().sum();
    if total == 0 {
        return 0.0;
    }
    let mut cumulative = 0;
    for (i, n) in counts.iter().enumerate() {
        cumulative += n;
        if cumulative as f64 >= q * total as f64 {
            return BUCKETS.get(i).map_or(10_000.0, |b| b * 1000.0);
        }
    }
    10_000.0
}

impl Balancer {
    /// Records one [`Second`] a second, forever (the operator page's charts).
    pub(crate) async fn record_history_forever(self) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            let now = self.inner.red.snapshot();
            let mut last = self
                .inner
                .history
                .last
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let classes: Vec<u64> = (0..5).map(|i| now.0[i] - last.0[i]).collect();
            let buckets: Vec<u64> = (0..now.1.len()).map(|i| now.1[i] - last.1[i]).collect();
            *last = now;
            drop(last);
            let second = Second {
                t: holdfast_core::now_ms() / 1000,
                requests: classes.iter().sum(),
                errors: classes[4],
                p50_ms: quantile_ms(&buckets, 0.5),
                p99_ms: quantile_ms(&buckets, 0.99),
            };
            let mut seconds = self
                .inner
                .history
                .seconds
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if seconds.len() == HISTORY_SECONDS {
                seconds.pop_front();
            }
            seconds.push_back(second);
        }
    }

    /// The last five minutes, oldest first.
    pub fn history(&self) -> Vec<Second> {
        self.inner
            .history
            .seconds
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .cloned()
            .collect()
    }
}

/// One process in the published instance list.
#[derive(Deserialize)]
struct Listed {
    role: String,
    addr: String,
    ops_addr: Option<String>,
}

impl Balancer {
    /// The balancer's own families, labelled `role="balancer"`.
    pub fn render_metrics(&self) -> String {
        let red = &self.inner.red;
        let mut out = String::new();
        let family = |out: &mut String, name: &str, kind: &str, help: &str| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        };
        family(
            &mut out,
            "holdfast_balancer_requests_total",
            "counter",
            "Requests the balancer answered, by status class.",
        );
        for (i, class) in ["1xx", "2xx", "3xx", "4xx", "5xx"].iter().enumerate() {
            let n = red.by_class[i].load(Ordering::Relaxed);
            let _ = writeln!(
                out,
                "holdfast_balancer_requests_total{{role=\"balancer\",class=\"{class}\"}} {n}"
            );
        }
        family(
            &mut out,
            "holdfast_balancer_request_duration_seconds",
            "histogram",
            "Time from a request's head to the balancer's answer.",
        );
        let mut cumulative = 0;
        for (i, bound) in BUCKETS
            .iter()
            .map(|b| b.to_string())
            .chain(["+Inf".to_owned()])
            .enumerate()
        {
            cumulative += red.buckets[i].load(Ordering::Relaxed);
            let _ = writeln!(out, "holdfast_balancer_request_duration_seconds_bucket{{role=\"balancer\",le=\"{bound}\"}} {cumulative}");
        }
        let sum = red.sum_us.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(
            out,
            "holdfast_balancer_request_duration_seconds_sum{{role=\"balancer\"}} {sum}"
        );
        let _ = writeln!(
            out,
            "holdfast_balancer_request_duration_seconds_count{{role=\"balancer\"}} {cumulative}"
        );
        let counters = [
            (
                "holdfast_balancer_retries_total",
                "Attempts re-sent to another instance.",
                self.retries_total(),
            ),
            (
                "holdfast_balancer_throttled_total",
                "Requests that waited for their client's turn (per-address pace).",
                self.inner.throttled.load(Ordering::Relaxed),
            ),
            (
                "holdfast_balancer_rate_limited_total",
                "Requests refused (429) by the per-address pace.",
                self.inner.rate_limited.load(Ordering::Relaxed),
            ),
            (
                "holdfast_balancer_upstream_freezes_total",
                "Times a live instance stopped answering its liveness probe in time (stopped or hung, not gone).",
                self.inner.freezes.load(Ordering::Relaxed),
            ),
            (
                "holdfast_balancer_slow_clients_total",
                "Requests cut off (408) because their body did not arrive in time.",
                self.inner.slow_clients.load(Ordering::Relaxed),
            ),
            (
                "holdfast_balancer_connections_refused_total",
                "Connections refused at once, over the total or the per-address connection cap.",
                self.inner.connections_refused.load(Ordering::Relaxed),
            ),
        ];
        for (name, help, n) in counters {
            family(&mut out, name, "counter", help);
            let _ = writeln!(out, "{name}{{role=\"balancer\"}} {n}");
        }
        family(
            &mut out,
            "holdfast_balancer_open_connections",
            "gauge",
            "Client connections open now.",
        );
        let _ = writeln!(
            out,
            "holdfast_balancer_open_connections{{role=\"balancer\"}} {}",
            self.open_connections()
        );
        family(
            &mut out,
            "holdfast_balancer_stalled_bodies",
            "gauge",
            "Requests whose body has been arriving for over a second (slow clients), now.",
        );
        let _ = writeln!(
            out,
            "holdfast_balancer_stalled_bodies{{role=\"balancer\"}} {}",
            self.inner.stalled_bodies.load(Ordering::Relaxed)
        );
        family(
            &mut out,
            "holdfast_balancer_upstreams",
            "gauge",
            "Upstream instances: configured, and how many are healthy, alive, ejected.",
        );
        let ups = self.upstreams();
        for (state, n) in [
            ("configured", ups.len()),
            ("healthy", ups.iter().filter(|u| u.healthy).count()),
            ("alive", ups.iter().filter(|u| u.alive).count()),
            ("ejected", ups.iter().filter(|u| u.ejected).count()),
        ] {
            let _ = writeln!(
                out,
                "holdfast_balancer_upstreams{{role=\"balancer\",state=\"{state}\"}} {n}"
            );
        }
        out
    }

    /// `/ops/metrics`: the balancer's own families and every listed process's, merged.
    pub(crate) async fn fleet_metrics(&self) -> String {
        let listed: Vec<Listed> = {
            let json = self
                .inner
                .instances
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .clone();
            serde_json::from_slice(&json).unwrap_or_default()
        };
        let targets: Vec<String> = listed
            .into_iter()
            .filter_map(|l| match l.role.as_str() {
                "web" => l.ops_addr,
                "worker" => Some(l.addr),
                _ => None,
            })
            .collect();
        let scrapes = futures::future::join_all(targets.iter().map(|t| self.scrape(t))).await;
        let mut texts = vec![self.render_metrics()];
        let fleet = self
            .inner
            .fleet_metrics
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        if let Some(fleet) = fleet {
            texts.push(fleet().await);
        }
        texts.extend(scrapes.into_iter().flatten());
        merge(&texts)
    }

    async fn scrape(&self, addr: &str) -> Option<String> {
        let req = Request::get(format!("http://{addr}/metrics"))
            .body(crate::proxy::upstream_full(Bytes::new()))
            .ok()?;
        let fetch = async {
            let resp = self.inner.client.request(req).await.ok()?;
            let body = resp.into_body().collect().await.ok()?.to_bytes();
            String::from_utf8(body.to_vec()).ok()
        };
        tokio::time::timeout(MEMBER_SCRAPE_TIMEOUT, fetch)
            .await
            .ok()
            .flatten()
    }
}

/// How long the combined scrape waits for one process. Short on purpose: a frozen instance
/// must cost the combined scrape its own figures, not the whole scrape (Prometheus gives up
/// on a scrape after its timeout, 1 s in the drill, and would then see nothing at all).
const MEMBER_SCRAPE_TIMEOUT: Duration = Duration::from_millis(400);

/// Merges expositions: each family's `# HELP` and `# TYPE` once (the first seen), then all
/// its samples from every text, families in name order.
pub(crate) fn merge(texts: &[String]) -> String {
    #[derive(Default)]
    struct Family {
        help: Option<String>,
        kind: Option<String>,
        samples: Vec<String>,
    }
    let mut families: BTreeMap<String, Family> = BTreeMap::new();
    for text in texts {
        let mut current = String::new();
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            let described = [("# HELP ", true), ("# TYPE ", false)]
                .into_iter()
                .find_map(|(prefix, help)| Some((line.strip_prefix(prefix)?, help)));
            if let Some((rest, help)) = described {
                current = rest
                    .split_whitespace()
                    .next()
                    .unwrap_or_default()
                    .to_owned();
                let family = families.entry(current.clone()).or_default();
                let slot = if help {
                    &mut family.help
                } else {
                    &mut family.kind
                };
                slot.get_or_insert_with(|| line.to_owned());
            } else if !line.starts_with('#') {
                let name: String = line
                    .chars()
                    .take_while(|c| *c != '{' && *c != ' ')
                    .collect();
                // A sample belongs to the family announced before it when it is one of its
                // series (`x`, `x_bucket`, `x_sum`, `x_count`); otherwise to its own name.
                let family = if !current.is_empty() && name.starts_with(current.as_str()) {
                    current.clone()
                } else {
                    name
                };
                families
                    .entry(family)
                    .or_default()
                    .samples
                    .push(line.to_owned());
            }
        }
    }
    let mut out = String::new();
    for (_, f) in families {
        for line in f.help.iter().chain(&f.kind).chain(&f.samples) {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merged_families_have_one_help_and_type_and_all_their_series() {
        let a = "# HELP x_total X.\n# TYPE x_total counter\nx_total{role=\"web\",instance=\"a\"} 1\n# HELP h H.\n# TYPE h histogram\nh_bucket{le=\"+Inf\"} 2\nh_sum 0.5\nh_count 2\n".to_owned();
        let b =
            "# HELP x_total X.\n# TYPE x_total counter\nx_total{role=\"web\",instance=\"b\"} 4\n"
                .to_owned();
        let merged = merge(&[a, b]);
        assert_eq!(merged.matches("# TYPE x_total").count(), 1);
        assert_eq!(merged.matches("# HELP x_total").count(), 1);
        let x: Vec<&str> = merged
            .lines()
            .filter(|l| l.starts_with("x_total"))
            .collect();
        assert_eq!(x.len(), 2);
        // A histogram's series stay under its one TYPE line, in order.
        let h = merged.find("# TYPE h histogram").unwrap();
        assert!(merged[h..].starts_with("# TYPE h histogram\nh_bucket"));
        assert!(merged.contains("h_sum 0.5\nh_count 2\n"));
    }
}
