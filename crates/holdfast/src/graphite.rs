//! `--graphite HOST:PORT`: the figures a process serves on `/metrics`, pushed to Graphite's
//! carbon in its plaintext protocol (`path value unix-seconds`, one per line, over TCP) every
//! `--graphite-every`, for shops whose monitoring is Graphite rather than Prometheus.
//!
//! One sample `holdfast_http_requests_total{role="web",instance="10.0.0.5:8080",route="/api/cart",status="200"} 7`
//! becomes `holdfast.web.10_0_0_5_8080.holdfast_http_requests_total.route__api_cart.status_200 7 T`:
//! the prefix, the role and instance labels as levels, the family, then every other label as
//! `name_value`, each level cleaned to `[A-Za-z0-9_-]`. Histograms arrive as their `_bucket`
//! (by `le`), `_sum` and `_count` series. The push never holds up the process: a carbon that is
//! down costs one failed connect per interval and a log line when that changes.

use std::future::Future;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tracing::{info, warn};

use crate::cli::GraphiteArgs;

/// Starts pushing `render()`'s exposition text to carbon, if `--graphite` was given.
pub fn spawn<F, Fut>(args: &GraphiteArgs, render: F)
where
    F: Fn() -> Fut + Send + 'static,
    Fut: Future<Output = String> + Send,
{
    let Some(target) = args.graphite.clone() else {
        return;
    };
    let (every, prefix) = (args.graphite_every, args.graphite_prefix.clone());
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut connection: Option<TcpStream> = None;
        let mut failing = false;
        loop {
            tick.tick().await;
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs();
            let lines = to_plaintext(&render().await, &prefix, now);
            match push(&mut connection, &target, lines.as_bytes()).await {
                Ok(()) if failing => {
                    info!(%target, "graphite push works again");
                    failing = false;
                }
                Err(error) if !failing => {
                    warn!(%target, %error, "graphite push failed; retrying every interval");
                    failing = true;
                }
                _ => {}
            }
        }
    });
}

/// Writes on the kept connection, or a new one; a failed write drops it for the next round.
async fn push(
    connection: &mut Option<TcpStream>,
    target: &str,
    bytes: &[u8],
) -> std::io::Result<()> {
    if connection.is_none() {
        let stream = tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(target))
            .await
            .map_err(|_| {
                std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out")
            })??;
        *connection = Some(stream);
    }
    let Some(stream) = connection.as_mut() else {
        return Ok(());
    };
    let written = tokio::time::timeout(Duration::from_secs(5), stream.write_all(bytes)).await;
    match written {
        Ok(Ok(())) => Ok(()),
        Ok(Err(error)) => {
            *connection = None;
            Err(error)
        }
        Err(_) => {
            *connection = None;
            Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "write timed out",
            ))
        }
    }
}

/// Prometheus exposition text as Graphite plaintext lines stamped `now` (module docs).
/// Comments, malformed lines and values that are not finite numbers are left out.
pub fn to_plaintext(exposition: &str, prefix: &str, now: u64) -> String {
    let mut out = String::new();
    for line in exposition.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let Ok(value) = value.parse::<f64>() else {
            continue;
        };
        if !value.is_finite() {
            continue;
        }
        let Some((name, labels)) = parse_series(series) else {
            continue;
        };
        let label = |key: &str| labels.iter().find(|(k, _)| k == key).map(|(_, v)| v);
        let mut path = clean(prefix);
        for key in ["role", "instance"] {
            if let Some(v) = label(key) {
                path.push('.');
                path.push_str(&clean(v));
            }
        }
        path.push('.');
        path.push_str(&clean(name));
        for (k, v) in labels
            .iter()
            .filter(|(k, _)| k != "role" && k != "instance")
        {
            path.push('.');
            path.push_str(&clean(&format!("{k}_{v}")));
        }
        out.push_str(&format!("{path} {value} {now}\n"));
    }
    out
}

/// `name{k="v",…}` into the name and its labels (values unescaped); `None` if malformed.
fn parse_series(series: &str) -> Option<(&str, Vec<(String, String)>)> {
    let Some((name, rest)) = series.split_once('{') else {
        return Some((series, Vec::new()));
    };
    let body = rest.strip_suffix('}')?;
    let mut labels = Vec::new();
    let mut chars = body.chars().peekable();
    loop {
        let key: String = chars.by_ref().take_while(|c| *c != '=').collect();
        if key.is_empty() {
            break;
        }
        if chars.next() != Some('"') {
            return None;
        }
        let mut value = String::new();
        loop {
            match chars.next()? {
                '\\' => match chars.next()? {
                    'n' => value.push('\n'),
                    other => value.push(other),
                },
                '"' => break,
                c => value.push(c),
            }
        }
        labels.push((key.trim_start_matches(',').trim().to_owned(), value));
        if chars.peek() == Some(&',') {
            chars.next();
        }
    }
    Some((name, labels))
}

/// One path level: Graphite splits on `.` and chokes on spaces, so everything outside
/// `[A-Za-z0-9_-]` becomes `_`.
fn clean(level: &str) -> String {
    level
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_become_paths_with_role_and_instance_first() {
        let text = "# HELP holdfast_http_requests_total Requests.\n\
            # TYPE holdfast_http_requests_total counter\n\
            holdfast_http_requests_total{role=\"web\",instance=\"127.0.0.1:8080\",route=\"/api/cart\",status=\"200\"} 7\n\
            holdfast_http_request_duration_seconds_bucket{role=\"web\",instance=\"h:1\",le=\"+Inf\"} 3\n\
            holdfast_balancer_open_connections{role=\"balancer\"} 2\n\
            holdfast_odd{role=\"web\",instance=\"h:1\",why=\"a \\\"quoted\\\", comma\"} 1.5\n\
            holdfast_runtime_workers 2\n\
            holdfast_nan{role=\"web\"} NaN\n\
            garbage line without value x\n";
        let lines: Vec<String> = to_plaintext(text, "holdfast", 1_700_000_000)
            .lines()
            .map(str::to_owned)
            .collect();
        assert_eq!(
            lines,
            [
                "holdfast.web.127_0_0_1_8080.holdfast_http_requests_total.route__api_cart.status_200 7 1700000000",
                "holdfast.web.h_1.holdfast_http_request_duration_seconds_bucket.le__Inf 3 1700000000",
                "holdfast.balancer.holdfast_balancer_open_connections 2 1700000000",
                "holdfast.web.h_1.holdfast_odd.why_a__quoted___comma 1.5 1700000000",
                "holdfast.holdfast_runtime_workers 2 1700000000",
            ]
        );
    }
}
