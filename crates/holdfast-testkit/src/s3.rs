//! A real S3-compatible server per test: moto's server (`scripts/install-s3-server.sh`
//! installs it), on a free port, killed when dropped. Without it a test is skipped with a
//! note, except under `CI=true`, where it fails.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const INSTALL: &str = "scripts/install-s3-server.sh";

/// A running S3 server.
pub struct S3Server {
    child: Child,
    /// `http://127.0.0.1:PORT`.
    pub endpoint: String,
}

impl S3Server {
    /// Starts one, or `None` (skip) when moto is not installed outside CI.
    pub async fn start(test: &str) -> Option<S3Server> {
        let installed = Command::new("python3")
            .args(["-c", "import moto.server"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !installed {
            assert!(
                !holdfast_store::testing::in_ci(),
                "{test}: moto's S3 server is missing: run {INSTALL} (CI=true: not skipping)"
            );
            eprintln!("{test}: skipped on S3 (run {INSTALL})");
            return None;
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let child = Command::new("python3")
            .args([
                "-m",
                "moto.server",
                "-H",
                "127.0.0.1",
                "-p",
                &port.to_string(),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn moto's server");
        let server = S3Server {
            child,
            endpoint: format!("http://127.0.0.1:{port}"),
        };
        let started = Instant::now();
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "{test}: moto's server did not listen within 30 s"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Some(server)
    }

    /// Creates `bucket`; its `s3://` URL.
    pub async fn bucket(&self, bucket: &str) -> String {
        let r = reqwest::Client::new()
            .put(format!("{}/{bucket}", self.endpoint))
            .send()
            .await
            .expect("create the bucket");
        assert!(r.status().is_success(), "create bucket: {}", r.status());
        format!("s3://{bucket}")
    }

    /// The keys in `bucket`, as its listing names them.
    pub async fn keys(&self, bucket: &str) -> Vec<String> {
        self.keys_under(bucket, "").await
    }

    /// The keys in `bucket` that start with `prefix` (the first 1,000).
    pub async fn keys_under(&self, bucket: &str, prefix: &str) -> Vec<String> {
        let xml = reqwest::get(format!(
            "{}/{bucket}?list-type=2&prefix={prefix}",
            self.endpoint
        ))
        .await
        .expect("list the bucket")
        .text()
        .await
        .expect("listing");
        xml.split("<Key>")
            .skip(1)
            .filter_map(|s| s.split("</Key>").next())
            .map(str::to_owned)
            .collect()
    }

    /// The `AWS_*` variables that point a client at this server (its test credentials).
    pub fn aws_env(&self) -> [(&'static str, &str); 3] {
        [
            ("AWS_ENDPOINT_URL", self.endpoint.as_str()),
            ("AWS_ACCESS_KEY_ID", "test"),
            ("AWS_SECRET_ACCESS_KEY", "test"),
        ]
    }

    /// Multipart uploads begun in `bucket` and neither completed nor aborted.
    pub async fn open_multiparts(&self, bucket: &str) -> usize {
        let xml = reqwest::get(format!("{}/{bucket}?uploads", self.endpoint))
            .await
            .expect("list multipart uploads")
            .text()
            .await
            .expect("listing");
        xml.matches("<UploadId>").count()
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
