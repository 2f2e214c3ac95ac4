//! Driving the `litestream` binary: where it is, the configuration it reads, and the few
//! commands we use (`replicate`, `sync`, `ltx`, `restore`), each under a deadline and with its
//! failure turned into one line.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use serde::Deserialize;
use time::OffsetDateTime;

use crate::{Backup, Error, Synced, Target};

/// How long one Litestream command may run (an unreachable S3 endpoint is retried inside it).
const COMMAND_DEADLINE: Duration = Duration::from_secs(30);

/// The binary: `$LITESTREAM`, else `litestream` on `PATH`, else where pip puts scripts.
pub(crate) fn binary() -> Result<PathBuf, Error> {
    if let Some(path) = std::env::var_os("LITESTREAM").filter(|p| !p.is_empty()) {
        return Ok(PathBuf::from(path));
    }
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    if let Some(home) = std::env::var_os("HOME") {
        dirs.push(Path::new(&home).join(".local/bin"));
    }
    dirs.push("/usr/local/bin".into());
    dirs.into_iter()
        .map(|d| d.join("litestream"))
        .find(|p| p.is_file())
        .ok_or(Error::NoTool)
}

/// A Litestream configuration file for one database and its target, with the control socket
/// beside it.
pub(crate) struct Config {
    pub path: PathBuf,
    pub socket: PathBuf,
    pub database: PathBuf,
    /// The target is reached over plain HTTP (a local S3-compatible server), so a CA bundle
    /// means nothing to it; Litestream's S3 client refuses to start when `AWS_CA_BUNDLE` is
    /// set, so it is left out of its environment then.
    plain_http: bool,
}

impl Config {
    /// Writes the configuration for `backup` into `dir` (created if need be).
    pub fn write_for(backup: &Backup, dir: &Path) -> Result<Config, Error> {
        std::fs::create_dir_all(dir).map_err(Error::io(format!("creating {}", dir.display())))?;
        let config = Config {
            path: dir.join("litestream.yml"),
            socket: dir.join("litestream.sock"),
            database: backup.source.sqlite_file()?.to_path_buf(),
            plain_http: backup.target.plain_http(),
        };
        let q = |p: &Path| serde_json::Value::from(p.to_string_lossy()).to_string();
        let yaml = format!(
            "# Written by holdfast for {target}; rewritten on every start.\n\
             socket:\n  enabled: true\n  path: {socket}\n\
             dbs:\n  - path: {db}\n    monitor-interval: 500ms\n{replica}",
            target = backup.target,
            socket = q(&config.socket),
            db = q(&config.database),
            replica = backup.target.replica_yaml(),
        );
        std::fs::write(&config.path, yaml)
            .map_err(Error::io(format!("writing {}", config.path.display())))?;
        Ok(config)
    }

    fn flag(&self) -> [OsString; 2] {
        ["-config".into(), self.path.clone().into()]
    }

    /// Adjusts a Litestream command's environment for this target.
    fn environment(&self, cmd: &mut tokio::process::Command) {
        if self.plain_http {
            cmd.env_remove("AWS_CA_BUNDLE");
        }
    }
}

/// What a finished command printed.
struct Output {
    stdout: String,
}

/// Runs `litestream ARGS` to completion within [`COMMAND_DEADLINE`]; a non-zero exit is an
/// [`Error::Tool`] carrying its last `Error:` line (or the last line it printed).
async fn run(what: &str, config: Option<&Config>, args: &[OsString]) -> Result<Output, Error> {
    let mut cmd = tokio::process::Command::new(binary()?);
    if let Some(config) = config {
        config.environment(&mut cmd);
    }
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let child = cmd.spawn().map_err(Error::io("starting litestream"))?;
    let out = match tokio::time::timeout(COMMAND_DEADLINE, child.wait_with_output()).await {
        Ok(out) => out.map_err(Error::io("running litestream"))?,
        Err(_) => {
            return Err(Error::Tool {
                what: what.to_owned(),
                detail: format!("no answer within {} s", COMMAND_DEADLINE.as_secs()),
            })
        }
    };
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if out.status.success() {
        return Ok(Output { stdout });
    }
    Err(Error::Tool {
        what: what.to_owned(),
        detail: last_words(&String::from_utf8_lossy(&out.stderr), &stdout),
    })
}

/// The line that says why: Litestream ends a failure with `Error: …`.
fn last_words(stderr: &str, stdout: &str) -> String {
    let lines = || stderr.lines().chain(stdout.lines()).map(str::trim).rev();
    lines()
        .find_map(|l| l.strip_prefix("Error: "))
        .or_else(|| lines().find(|l| !l.is_empty()))
        .unwrap_or("it failed without a word")
        .to_owned()
}

/// The long-running `litestream replicate` for `config`, not yet started; it dies with its
/// supervisor.
pub(crate) fn replicate_command(config: &Config) -> Result<tokio::process::Command, Error> {
    let mut cmd = dies_with_parent(binary()?);
    cmd.arg("replicate").args(config.flag());
    config.environment(&mut cmd);
    Ok(cmd)
}

/// `program`, under `setpriv --pdeathsig KILL` where util-linux's `setpriv` is installed, so
/// it dies with the process that started it even when that one is SIGKILLed.
pub(crate) fn dies_with_parent(program: PathBuf) -> tokio::process::Command {
    let setpriv = ["/usr/bin/setpriv", "/bin/setpriv"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.is_file());
    match setpriv {
        Some(setpriv) => {
            let mut cmd = tokio::process::Command::new(setpriv);
            cmd.args(["--pdeathsig", "KILL", "--"]).arg(program);
            cmd
        }
        None => tokio::process::Command::new(program),
    }
}

/// One replication pass (`replicate -once`), for a database no running replication owns.
pub(crate) async fn replicate_once(config: &Config, target: &Target) -> Result<(), Error> {
    target.reachable().await?;
    let mut args: Vec<OsString> = vec!["replicate".into(), "-once".into()];
    args.extend(config.flag());
    run("backing up", Some(config), &args).await.map(|_| ())
}

#[derive(Deserialize)]
struct SyncAnswer {
    txid: u64,
    replica_txid: u64,
}

/// Asks the running replication (through its control socket) to ship everything now and
/// waits until the target has it.
pub(crate) async fn sync(backup: &Backup) -> Result<Synced, Error> {
    let started = std::time::Instant::now();
    let socket = backup.run_dir.join("litestream.sock");
    let args: Vec<OsString> = vec![
        "sync".into(),
        "-wait".into(),
        "-timeout".into(),
        "20".into(),
        "-json".into(),
        "-socket".into(),
        socket.into(),
        backup.source.sqlite_file()?.to_path_buf().into(),
    ];
    let out = run("syncing the backup", None, &args).await?;
    let answer: SyncAnswer = serde_json::from_str(&out.stdout).map_err(|e| Error::Tool {
        what: "syncing the backup".into(),
        detail: format!("an answer we cannot read ({e}): {}", out.stdout.trim()),
    })?;
    if answer.replica_txid < answer.txid {
        return Err(Error::Tool {
            what: "syncing the backup".into(),
            detail: format!(
                "the target has transaction {:#x}, the database {:#x}",
                answer.replica_txid, answer.txid
            ),
        });
    }
    Ok(Synced {
        txid: Some(answer.replica_txid),
        took: started.elapsed(),
    })
}

#[derive(Deserialize)]
struct LtxFile {
    level: u32,
    max_txid: String,
    size: u64,
    timestamp: String,
}

impl LtxFile {
    /// When the file was written; a timestamp we cannot read sorts first.
    fn at(&self) -> OffsetDateTime {
        OffsetDateTime::parse(
            &self.timestamp,
            &time::format_description::well_known::Rfc3339,
        )
        .unwrap_or(OffsetDateTime::UNIX_EPOCH)
    }
}

/// One restorable moment: a snapshot, or the newest change shipped.
#[derive(Debug, Clone)]
pub struct Point {
    pub at: OffsetDateTime,
    /// The last transaction it includes (Litestream's TXID, hexadecimal).
    pub txid: String,
    pub bytes: u64,
}

/// What a target holds.
#[derive(Debug, Clone)]
pub struct Points {
    /// The full snapshots, oldest first.
    pub snapshots: Vec<Point>,
    /// The oldest moment a restore can return to.
    pub first: OffsetDateTime,
    /// The newest change at the target.
    pub last: Point,
    /// Files in the target, all levels.
    pub files: usize,
    pub bytes: u64,
}

/// Lists the target's files (`ltx -level all`) and sums them up.
pub(crate) async fn points(config: &Config, target: &Target) -> Result<Points, Error> {
    target.reachable().await?;
    let mut args: Vec<OsString> = vec!["ltx".into()];
    args.extend(config.flag());
    args.extend(["-level".into(), "all".into(), "-json".into()]);
    args.push(config.database.clone().into());
    let out = run(
        &format!("reading the backup at {target}"),
        Some(config),
        &args,
    )
    .await?;
    // An empty listing prints nothing (or `null`); anything else must read as files.
    let listing = out.stdout.trim();
    let files: Vec<LtxFile> = if listing.is_empty() || listing == "null" {
        Vec::new()
    } else {
        serde_json::from_str(listing).map_err(|e| Error::Tool {
            what: format!("reading the backup at {target}"),
            detail: format!("a listing we cannot read ({e})"),
        })?
    };
    let no_backup = |why: &str| Error::NoBackup {
        target: target.to_string(),
        why: why.to_owned(),
    };
    if files.is_empty() {
        let why = match target {
            Target::Dir(dir) if !dir.exists() => "no such directory",
            _ => "it holds no Litestream files",
        };
        return Err(no_backup(why));
    }
    let point = |f: &LtxFile| Point {
        at: f.at(),
        txid: f.max_txid.clone(),
        bytes: f.size,
    };
    let mut snapshots: Vec<Point> = files.iter().filter(|f| f.level == 9).map(point).collect();
    snapshots.sort_by_key(|p| p.at);
    let newest = files
        .iter()
        .max_by(|a, b| a.max_txid.cmp(&b.max_txid).then(a.at().cmp(&b.at())))
        .map(point)
        .ok_or_else(|| no_backup("it holds no Litestream files"))?;
    let first = snapshots
        .first()
        .map(|s| s.at)
        .or_else(|| files.iter().map(LtxFile::at).min())
        .unwrap_or(newest.at);
    Ok(Points {
        snapshots,
        first,
        last: newest,
        files: files.len(),
        bytes: files.iter().map(|f| f.size).sum(),
    })
}

/// Restores `config.database` (a path that must not exist) from the target as of `at` (the
/// newest by default). The integrity check is ours, after it (`restore::check`): Litestream's
/// own would run the same full check a second time.
pub(crate) async fn restore(
    config: &Config,
    target: &Target,
    at: Option<OffsetDateTime>,
) -> Result<(), Error> {
    let mut args: Vec<OsString> = vec!["restore".into()];
    args.extend(config.flag());
    if let Some(at) = at {
        args.extend(["-timestamp".into(), crate::rfc3339(at).into()]);
    }
    args.push(config.database.clone().into());
    run(&format!("restoring from {target}"), Some(config), &args)
        .await
        .map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failure_is_its_error_line() {
        assert_eq!(
            last_words(
                "time=… level=INFO msg=x\nError: no matching backup files available\n",
                ""
            ),
            "no matching backup files available"
        );
        assert_eq!(last_words("", "something\n\n"), "something");
        assert_eq!(last_words("", ""), "it failed without a word");
    }
}
