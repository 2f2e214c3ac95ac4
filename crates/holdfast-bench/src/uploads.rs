//! `holdfast bench uploads`: tus upload throughput of `holdfast serve` (one instance, local
//! blob store, SQLite, every part fsynced before it is acknowledged) against `@tus/server`
//! with its file store (npm; `crates/holdfast-uploads/scripts/install-peers.sh`), on the same
//! disk, with the same client and chunk size, taking turns; and against the disk itself
//! (sequential writes of one chunk each, fsynced). Then one upload of `--rss-mib` to a fresh
//! instance, for its peak resident memory.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytes::Bytes;
use serde::Serialize;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::cli::BenchUploadsArgs;

/// A tus server under test: where to create uploads, and how to authenticate.
struct Target {
    name: &'static str,
    /// The creation URL (`…/api/uploads`, `…/files`).
    endpoint: String,
    /// The origin, for `Location`s that are paths.
    origin: String,
    cookie: Option<String>,
    child: Child,
}

#[derive(Debug, Default, Serialize)]
struct Figures {
    /// MB/s (10⁶ bytes) per round.
    one_big: Vec<f64>,
    concurrent: Vec<f64>,
}

#[derive(Debug, Serialize)]
struct Results {
    chunk_mib: usize,
    big_mib: usize,
    concurrent: usize,
    small_mib: usize,
    holdfast: Figures,
    tus_server: Figures,
    /// Sequential writes of one chunk each, fsynced: the disk's own pace.
    raw_disk_mb_s: Vec<f64>,
    one_big_vs_peer: f64,
    concurrent_vs_peer: f64,
    one_big_vs_disk: f64,
    concurrent_vs_disk: f64,
    /// `holdfast serve`'s peak resident memory (VmHWM) after one upload of `rss_mib`, and
    /// before it.
    rss_mib: usize,
    peak_rss_mib: Option<f64>,
    rss_before_mib: Option<f64>,
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 0 => (v[n / 2 - 1] + v[n / 2]) / 2.0,
        n => v[n / 2],
    }
}

pub async fn run(args: BenchUploadsArgs) -> anyhow::Result<()> {
    let program = match &args.program {
        Some(p) => p.clone(),
        None => crate::sibling("holdfast")?,
    };
    let parent = match &args.dir {
        Some(d) => d.clone(),
        None => std::env::current_dir()?,
    };
    let scratch = tempfile::tempdir_in(&parent).context("a scratch directory for the run")?;
    let modules = node_modules()?;
    let mib = 1usize << 20;
    let data: Bytes = (0..args.big_mib.max(args.small_mib * args.concurrent) * mib)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect::<Vec<u8>>()
        .into();
    let chunk = args.chunk_mib * mib;
    let http = reqwest::Client::builder().build()?;
    let mut ours = Figures::default();
    let mut peer = Figures::default();
    let mut raw = Vec::new();
    for round in 0..args.rounds {
        let order: [&str; 2] = if round % 2 == 0 {
            ["holdfast", "tus-server"]
        } else {
            ["tus-server", "holdfast"]
        };
        for which in order {
            let dir = scratch.path().join(format!("{which}-{round}"));
            let target = match which {
                "holdfast" => start_holdfast(&program, &dir, &http).await?,
                _ => start_tus_server(&modules, &dir).await?,
            };
            let big = timed(&http, &target, &[data.slice(..args.big_mib * mib)], chunk).await?;
            let smalls: Vec<Bytes> = (0..args.concurrent)
                .map(|i| data.slice(i * args.small_mib * mib..(i + 1) * args.small_mib * mib))
                .collect();
            let many = timed(&http, &target, &smalls, chunk).await?;
            println!(
                "round {round}  {:<10} one {} MiB: {big:7.1} MB/s   {} × {} MiB at once: {many:7.1} MB/s",
                target.name, args.big_mib, args.concurrent, args.small_mib
            );
            let figures = if which == "holdfast" {
                &mut ours
            } else {
                &mut peer
            };
            figures.one_big.push(big);
            figures.concurrent.push(many);
            stop(target).await;
            let _ = std::fs::remove_dir_all(&dir);
        }
        let disk = raw_disk(scratch.path(), &data.slice(..args.big_mib * mib), chunk)?;
        println!(
            "round {round}  raw disk   {disk:7.1} MB/s (one {} MiB write + fsync at a time)",
            args.chunk_mib
        );
        raw.push(disk);
    }
    let (peak, before) = if args.rss_mib > 0 {
        let dir = scratch.path().join("rss");
        let target = start_holdfast(&program, &dir, &http).await?;
        let pid = target.child.id().context("the instance's pid")?;
        let before = vm_hwm_mib(pid);
        let one = Bytes::from(vec![7u8; args.rss_mib * mib]);
        timed(&http, &target, &[one], chunk).await?;
        let peak = vm_hwm_mib(pid);
        stop(target).await;
        (peak, before)
    } else {
        (None, None)
    };
    let ratio = |a: &[f64], b: &[f64]| (median(a) / median(b) * 100.0).round() / 100.0;
    let r = Results {
        chunk_mib: args.chunk_mib,
        big_mib: args.big_mib,
        concurrent: args.concurrent,
        small_mib: args.small_mib,
        one_big_vs_peer: ratio(&ours.one_big, &peer.one_big),
        concurrent_vs_peer: ratio(&ours.concurrent, &peer.concurrent),
        one_big_vs_disk: ratio(&ours.one_big, &raw),
        concurrent_vs_disk: ratio(&ours.concurrent, &raw),
        holdfast: ours,
        tus_server: peer,
        raw_disk_mb_s: raw,
        rss_mib: args.rss_mib,
        peak_rss_mib: peak,
        rss_before_mib: before,
    };
    println!(
        "\nmedians: holdfast / @tus/server  one upload {:.2}×   {} at once {:.2}×;  holdfast / raw disk  {:.2}× and {:.2}×",
        r.one_big_vs_peer, r.concurrent, r.concurrent_vs_peer, r.one_big_vs_disk, r.concurrent_vs_disk
    );
    if let (Some(peak), Some(before)) = (r.peak_rss_mib, r.rss_before_mib) {
        println!(
            "holdfast serve: peak RSS {peak:.1} MiB after one {} MiB upload ({before:.1} MiB before it)",
            r.rss_mib
        );
    }
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_vec_pretty(&r)?)?;
    }
    Ok(())
}

/// `crates/holdfast-uploads/tools/node/node_modules`, with @tus/server in it.
fn node_modules() -> anyhow::Result<PathBuf> {
    let modules =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../holdfast-uploads/tools/node/node_modules");
    if !modules.join("@tus/server/package.json").exists() {
        bail!("@tus/server is not installed: run crates/holdfast-uploads/scripts/install-peers.sh");
    }
    Ok(modules)
}

/// Waits for the child's line starting with `prefix`; the rest of it.
async fn listening(child: &mut Child, prefix: &str) -> anyhow::Result<String> {
    let stdout = child.stdout.take().context("the child's stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    let found = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(line) = lines.next_line().await? {
            if let Some(rest) = line.strip_prefix(prefix) {
                return Ok::<_, std::io::Error>(Some(rest.trim().to_owned()));
            }
        }
        Ok(None)
    })
    .await
    .context("waiting for the server to listen")??;
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    found.context("the server exited before it listened")
}

async fn start_holdfast(
    program: &Path,
    dir: &Path,
    http: &reqwest::Client,
) -> anyhow::Result<Target> {
    std::fs::create_dir_all(dir)?;
    let mut child = Command::new(program)
        .args([
            "serve",
            "--addr",
            "127.0.0.1:0",
            "--migrate",
            "--insecure-cookies",
            "--data-dir",
        ])
        .arg(dir)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .context("starting holdfast serve")?;
    let rest = listening(&mut child, "HOLDFAST_LISTENING").await?;
    let addr = rest.split_whitespace().next().context("an address")?;
    let origin = format!("http://{addr}");
    // A reviewer: signed up, logged in, and has ordered what they review.
    let creds = serde_json::json!({ "email": "bench@example.com", "password": "bench password 1" });
    http.post(format!("{origin}/api/signup"))
        .json(&creds)
        .send()
        .await?;
    let login = http
        .post(format!("{origin}/api/login"))
        .json(&creds)
        .send()
        .await?;
    let cookie = login
        .headers()
        .get("set-cookie")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .context("a session cookie")?
        .to_owned();
    let add = http
        .post(format!("{origin}/api/cart/items"))
        .header("cookie", &cookie)
        .json(&serde_json::json!({ "sku": "HELMET", "qty": 1 }))
        .send()
        .await?;
    anyhow::ensure!(add.status().is_success(), "add to cart: {}", add.status());
    let order = http
        .post(format!("{origin}/api/checkout"))
        .header("cookie", &cookie)
        .header("idempotency-key", "bench-review-order")
        .send()
        .await?;
    anyhow::ensure!(order.status().is_success(), "checkout: {}", order.status());
    Ok(Target {
        name: "holdfast",
        endpoint: format!("{origin}/api/uploads"),
        origin,
        cookie: Some(cookie),
        child,
    })
}

async fn start_tus_server(modules: &Path, dir: &Path) -> anyhow::Result<Target> {
    std::fs::create_dir_all(dir)?;
    let mut child = Command::new("node")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("node/tus_server.js"))
        .arg(dir)
        .arg("0")
        .env("NODE_PATH", modules)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .context("starting node (is it installed?)")?;
    let port = listening(&mut child, "LISTENING").await?;
    let origin = format!("http://127.0.0.1:{port}");
    Ok(Target {
        name: "@tus/server",
        endpoint: format!("{origin}/files"),
        origin,
        cookie: None,
        child,
    })
}

async fn stop(mut target: Target) {
    let _ = target.child.kill().await;
}

/// Uploads every file at once (each its own tus upload, PATCHes of `chunk`); MB/s overall.
async fn timed(
    http: &reqwest::Client,
    target: &Target,
    files: &[Bytes],
    chunk: usize,
) -> anyhow::Result<f64> {
    let started = Instant::now();
    let uploads = files.iter().map(|f| upload(http, target, f.clone(), chunk));
    futures::future::try_join_all(uploads).await?;
    let bytes: usize = files.iter().map(Bytes::len).sum();
    Ok(bytes as f64 / started.elapsed().as_secs_f64() / 1e6)
}

/// One tus upload of `file`, created then sent in PATCHes of `chunk`.
async fn upload(
    http: &reqwest::Client,
    target: &Target,
    file: Bytes,
    chunk: usize,
) -> anyhow::Result<()> {
    use base64::Engine;
    let with_cookie = |r: reqwest::RequestBuilder| match &target.cookie {
        Some(c) => r.header("cookie", c),
        None => r,
    };
    let meta = format!(
        "sku {},filename {}",
        base64::engine::general_purpose::STANDARD.encode("HELMET"),
        base64::engine::general_purpose::STANDARD.encode("bench.bin")
    );
    let created = with_cookie(http.post(&target.endpoint))
        .header("tus-resumable", "1.0.0")
        .header("upload-length", file.len().to_string())
        .header("upload-metadata", meta)
        .send()
        .await?;
    anyhow::ensure!(
        created.status() == 201,
        "{}: creation answered {}",
        target.name,
        created.status()
    );
    let location = created
        .headers()
        .get("location")
        .and_then(|v| v.to_str().ok())
        .context("a Location")?;
    let url = if location.starts_with("http") {
        location.to_owned()
    } else {
        format!("{}{location}", target.origin)
    };
    let mut offset = 0;
    while offset < file.len() {
        let end = (offset + chunk).min(file.len());
        let r = with_cookie(http.patch(&url))
            .header("tus-resumable", "1.0.0")
            .header("upload-offset", offset.to_string())
            .header("content-type", "application/offset+octet-stream")
            .body(file.slice(offset..end))
            .send()
            .await?;
        anyhow::ensure!(
            r.status() == 204,
            "{}: PATCH answered {}",
            target.name,
            r.status()
        );
        offset = end;
    }
    Ok(())
}

/// The disk's own pace: `data` written to a new file under `dir` one `chunk` at a time, each
/// followed by `fdatasync`, as a part is made durable; MB/s.
fn raw_disk(dir: &Path, data: &[u8], chunk: usize) -> anyhow::Result<f64> {
    use std::io::Write;
    let path = dir.join("raw-disk");
    let started = Instant::now();
    let mut f = std::fs::File::create(&path)?;
    for piece in data.chunks(chunk) {
        f.write_all(piece)?;
        f.sync_data()?;
    }
    let took = started.elapsed();
    drop(f);
    std::fs::remove_file(&path)?;
    Ok(data.len() as f64 / took.as_secs_f64() / 1e6)
}

/// A process's peak resident memory so far, MiB (`VmHWM`).
fn vm_hwm_mib(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kb / 1024.0)
}
