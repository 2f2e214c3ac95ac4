//! Where backups go: a directory (the default kind: another disk, a mounted volume) or an
//! S3-compatible bucket (the scale-out kind).

use std::fmt;
use std::path::PathBuf;

use crate::Error;

/// A backup target, parsed from `DIR` or `s3://bucket[/prefix]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// An absolute directory path.
    Dir(PathBuf),
    /// A bucket and a key prefix (without slashes at either end; may be empty). The endpoint,
    /// region and credentials come from the standard `AWS_*` environment variables, as for
    /// the upload blob store: `AWS_ENDPOINT_URL` (or `AWS_ENDPOINT`), `AWS_DEFAULT_REGION`
    /// (or `AWS_REGION`), `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`.
    S3 { bucket: String, prefix: String },
}

impl Target {
    pub fn parse(text: &str) -> Result<Target, Error> {
        let bad = |why: &str| {
            Error::Usage(format!(
                "{text:?}: {why}; a backup target is a directory or s3://bucket[/prefix]"
            ))
        };
        if let Some(rest) = text.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            if bucket.is_empty() {
                return Err(bad("no bucket"));
            }
            return Ok(Target::S3 {
                bucket: bucket.to_owned(),
                prefix: prefix.trim_matches('/').to_owned(),
            });
        }
        if text.trim().is_empty() {
            return Err(bad("empty"));
        }
        if text.contains("://") {
            return Err(bad("an unknown scheme"));
        }
        let dir = std::path::absolute(text).map_err(|_| bad("not a usable path"))?;
        Ok(Target::Dir(dir))
    }

    /// The S3 endpoint from the environment, if one is set.
    fn endpoint() -> Option<String> {
        env(&["AWS_ENDPOINT_URL", "AWS_ENDPOINT"])
    }

    /// Whether the target is reached without TLS (an `http://` S3 endpoint).
    pub(crate) fn plain_http(&self) -> bool {
        matches!(self, Target::S3 { .. })
            && Self::endpoint().is_some_and(|e| e.starts_with("http://"))
    }

    /// Fails fast, with the reason, when the target's S3 endpoint does not accept
    /// connections (Litestream's own client retries an unreachable endpoint for a long time).
    pub(crate) async fn reachable(&self) -> Result<(), Error> {
        let Some(endpoint) = Self::endpoint().filter(|_| matches!(self, Target::S3 { .. })) else {
            return Ok(());
        };
        let (tls, rest) = match endpoint.split_once("://") {
            Some((scheme, rest)) => (scheme == "https", rest),
            None => (true, endpoint.as_str()),
        };
        let authority = rest.split('/').next().unwrap_or(rest);
        let addr = if authority
            .rsplit_once(':')
            .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
        {
            authority.to_owned()
        } else {
            format!("{authority}:{}", if tls { 443 } else { 80 })
        };
        let unreachable = |why: String| Error::Tool {
            what: format!("cannot reach the backup at {self}"),
            detail: format!("{endpoint}: {why}"),
        };
        match tokio::time::timeout(
            std::time::Duration::from_secs(5),
            tokio::net::TcpStream::connect(&addr),
        )
        .await
        {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(unreachable(e.to_string())),
            Err(_) => Err(unreachable("no connection within 5 s".to_owned())),
        }
    }

    /// The `replica:` block of a Litestream configuration for this target, indented for a
    /// `dbs:` entry. Values are JSON strings, which YAML reads as they are. Credentials stay
    /// in the environment, never in the file.
    pub(crate) fn replica_yaml(&self) -> String {
        let q = |s: &str| serde_json::Value::from(s).to_string();
        let mut out = String::from("    replica:\n");
        match self {
            Target::Dir(dir) => {
                out += &format!(
                    "      type: file\n      path: {}\n",
                    q(&dir.to_string_lossy())
                );
            }
            Target::S3 { bucket, prefix } => {
                out += &format!("      type: s3\n      bucket: {}\n", q(bucket));
                if !prefix.is_empty() {
                    out += &format!("      path: {}\n", q(prefix));
                }
                let region = env(&["AWS_DEFAULT_REGION", "AWS_REGION"])
                    .unwrap_or_else(|| "us-east-1".to_owned());
                out += &format!("      region: {}\n", q(&region));
                if let Some(endpoint) = Self::endpoint() {
                    // A custom endpoint is an S3-compatible server: address buckets by path.
                    out += &format!(
                        "      endpoint: {}\n      force-path-style: true\n",
                        q(&endpoint)
                    );
                }
            }
        }
        // The promised RPO (≤ 1 s): Litestream looks at the WAL every 500 ms (the database's
        // `monitor-interval`) and ships what it found every 500 ms. With the default 1 s for
        // both, the lose-primary drill lost a write acknowledged 1,012 ms before the loss;
        // looking every 250 ms cost 11-13% of checkout throughput, every 500 ms 7%
        // (docs/PERFORMANCE.md). (On S3 that is two PUTs a second while writes flow.)
        out += "      sync-interval: 500ms\n";
        out
    }
}

/// The first of `names` set (and not empty) in the environment.
fn env(names: &[&str]) -> Option<String> {
    names
        .iter()
        .find_map(|n| std::env::var(n).ok().filter(|v| !v.is_empty()))
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Dir(dir) => write!(f, "{}", dir.display()),
            Target::S3 { bucket, prefix } if prefix.is_empty() => write!(f, "s3://{bucket}"),
            Target::S3 { bucket, prefix } => write!(f, "s3://{bucket}/{prefix}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn targets_parse_or_say_why_not() {
        assert_eq!(
            Target::parse("s3://shop/backups/").unwrap(),
            Target::S3 {
                bucket: "shop".into(),
                prefix: "backups".into()
            }
        );
        assert_eq!(Target::parse("s3://shop").unwrap().to_string(), "s3://shop");
        assert!(
            matches!(Target::parse("/srv/backup").unwrap(), Target::Dir(d) if d == Path::new("/srv/backup"))
        );
        assert!(matches!(Target::parse("rel").unwrap(), Target::Dir(d) if d.is_absolute()));
        for bad in ["s3://", "s3:///x", "", "  ", "gs://bucket", "http://x/y"] {
            let e = Target::parse(bad).unwrap_err().to_string();
            assert!(e.contains("a backup target is"), "{bad}: {e}");
        }
    }

    #[test]
    fn the_s3_replica_names_no_secret() {
        let yaml = Target::parse("s3://b/p").unwrap().replica_yaml();
        assert!(
            yaml.contains("type: s3") && yaml.contains("bucket: \"b\""),
            "{yaml}"
        );
        assert!(!yaml.to_lowercase().contains("secret"), "{yaml}");
    }
}
