//! `holdfast migrate status|plan|up`: how schema changes reach a running fleet. Serving
//! processes no longer migrate on start (they refuse a database that is not exactly their
//! build's, unless `--migrate`); an operator looks (`status`), reads what would run (`plan`)
//! and runs it once (`up`), guarded so that no request waits behind a migration longer than
//! `--lock-timeout` (see `holdfast_store`'s migrate module).

use anyhow::Context;
use holdfast_store::{MigrateMode, MigrateUntil, MigrationGuard, Phase, SchemaState, Store};

use crate::cli::GuardArgs;
use serde::Serialize;

use crate::cli::MigrateCommand;

#[derive(Debug, Serialize)]
struct SchemaLine {
    schema: &'static str,
    applied: Vec<i64>,
    pending: Vec<String>,
    /// Recorded by a newer build; this build does not know them.
    unknown: Vec<String>,
    /// Applied, but the file differs in this build.
    changed: Vec<String>,
}

pub async fn run(cmd: MigrateCommand) -> anyhow::Result<()> {
    match cmd {
        MigrateCommand::Status(list) => {
            let (store, opts) = inspect(&list.store, Existing::Required).await?;
            let lines = lines(&store, &opts).await?;
            store.close().await;
            if list.json {
                println!("{}", serde_json::to_string_pretty(&lines)?);
            } else {
                for l in &lines {
                    println!("{}", describe(l));
                }
            }
        }
        MigrateCommand::Plan(only) => {
            let (store, opts) = inspect(&only.store, Existing::MayCreate).await?;
            let states = store.migration_status(&opts).await?;
            let backend = store.backend();
            store.close().await;
            let pending: Vec<_> = states.iter().flat_map(|s| s.pending.iter()).collect();
            if pending.is_empty() {
                println!("-- nothing to run: the database has every migration of this build");
            }
            for m in pending {
                println!(
                    "-- {} ({})\n{}",
                    m.file,
                    backend.name(),
                    m.render(backend).trim_end()
                );
            }
        }
        MigrateCommand::Lint { files } => lint(&files)?,
        MigrateCommand::Down {
            store,
            schema,
            to,
            guard,
        } => {
            let (db, opts) = inspect(&store, Existing::Required).await?;
            let undone = match keep_up_to(&db, &opts, &schema, &to).await {
                Ok(to) => db
                    .migrate_down(&opts, &schema, to, &guard.to_guard())
                    .await
                    .context("undoing migrations"),
                Err(e) => Err(e),
            };
            let lines = lines(&db, &opts).await;
            db.close().await;
            let undone = undone?;
            println!("undid {} migration(s): {}", undone.len(), undone.join(", "));
            for l in &lines? {
                println!("{}", describe(l));
            }
        }
        MigrateCommand::Up {
            store,
            to,
            schema,
            guard,
        } => {
            let guard = guard.to_guard();
            let (db, opts) = inspect(&store, Existing::MayCreate).await?;
            let states = db.migration_status(&opts).await;
            let until = states
                .map_err(anyhow::Error::from)
                .and_then(|states| target(&states, to.as_deref(), schema.as_deref()));
            let migrated = match until {
                Ok(until) => db
                    .migrate_up(&opts, &guard, &until)
                    .await
                    .context("migrating"),
                Err(e) => Err(e),
            };
            let lines = lines(&db, &opts).await;
            db.close().await;
            let applied = migrated?;
            println!(
                "applied {} migration(s): {}",
                applied.len(),
                applied.join(", ")
            );
            for l in &lines? {
                println!("{}", describe(l));
            }
        }
    }
    Ok(())
}

/// How far `up` goes: `--to` a phase of the next pending change, or a version of `--schema`;
/// without `--to`, everything short of a contract.
fn target(
    states: &[SchemaState],
    to: Option<&str>,
    schema: Option<&str>,
) -> anyhow::Result<MigrateUntil> {
    let known: Vec<&str> = states.iter().map(|s| s.schema).collect();
    let scope: Vec<&SchemaState> = match schema {
        Some(name) => {
            let Some(s) = states.iter().find(|s| s.schema == name) else {
                anyhow::bail!(
                    "no schema named {name:?} (this build has {known:?}); nothing was changed"
                );
            };
            vec![s]
        }
        None => states.iter().collect(),
    };
    let Some(to) = to else {
        return Ok(MigrateUntil::BeforeContract);
    };
    if let Ok(version) = to.parse::<i64>() {
        let [state] = scope[..] else {
            anyhow::bail!("--to {version} needs --schema (one of {known:?}); nothing was changed");
        };
        let all = state.applied.len() + state.pending.len();
        if let Some(m) = state.pending.iter().find(|m| m.version == version) {
            return Ok(MigrateUntil::Version {
                schema: state.schema,
                version: m.version,
            });
        }
        if state.applied.contains(&version) {
            anyhow::bail!(
                "{} migration {version} is already applied; nothing was changed",
                state.schema
            );
        }
        anyhow::bail!(
            "this build has no {} migration {version} (it has 1 to {all}); nothing was changed",
            state.schema
        );
    }
    let Some(phase) = Phase::parse(to) else {
        let names: Vec<&str> = Phase::ALL.iter().map(|p| p.name()).collect();
        anyhow::bail!(
            "--to {to:?} is neither a version nor a phase ({}); nothing was changed",
            names.join(", ")
        );
    };
    for state in scope {
        if let Some(m) = state.pending.iter().find(|m| m.phase == Some(phase)) {
            return Ok(MigrateUntil::Version {
                schema: state.schema,
                version: m.version,
            });
        }
    }
    anyhow::bail!("no change has a pending {phase} phase (see `holdfast migrate status`); nothing was changed")
}

/// The version `down --to` keeps: a number, or the applied migration of that phase.
async fn keep_up_to(
    db: &Store,
    opts: &holdfast_store::StoreOptions,
    schema: &str,
    to: &str,
) -> anyhow::Result<i64> {
    if let Ok(version) = to.parse::<i64>() {
        return Ok(version);
    }
    let Some(phase) = Phase::parse(to) else {
        anyhow::bail!("--to {to:?} is neither a version nor a phase; nothing was changed");
    };
    let states = db.migration_status(opts).await?;
    let applied = states
        .iter()
        .filter(|s| s.schema == schema)
        .flat_map(|s| s.applied.iter().copied())
        .collect::<Vec<_>>();
    std::iter::once(&holdfast_store::STORE_SCHEMA)
        .chain(opts.schemas.iter().copied())
        .filter(|s| s.name == schema)
        .flat_map(|s| s.migrations.iter())
        .filter(|m| m.phase == Some(phase) && applied.contains(&m.version))
        .map(|m| m.version)
        .max()
        .with_context(|| {
            format!("schema {schema:?} has no applied {phase} phase; nothing was changed")
        })
}

/// Whether a command may create the database (`plan`, `up`) or needs one (`status`, `down`).
enum Existing {
    Required,
    MayCreate,
}

/// The store the flags name, opened to look at its migrations (nothing applied or refused),
/// with the options that name its schemas.
async fn inspect(
    args: &crate::cli::StoreArgs,
    existing: Existing,
) -> anyhow::Result<(Store, holdfast_store::StoreOptions)> {
    let opts = crate::store_options(args, MigrateMode::Inspect)?;
    let store = match existing {
        Existing::Required => crate::open_existing_store(args, MigrateMode::Inspect).await?,
        Existing::MayCreate => crate::open_store(args, MigrateMode::Inspect).await?,
    };
    Ok((store, opts))
}

async fn lines(
    store: &Store,
    opts: &holdfast_store::StoreOptions,
) -> anyhow::Result<Vec<SchemaLine>> {
    Ok(store
        .migration_status(opts)
        .await?
        .into_iter()
        .map(|s| SchemaLine {
            schema: s.schema,
            applied: s.applied.clone(),
            pending: s
                .pending
                .iter()
                .map(|m| match m.phase {
                    Some(p) => format!("{} ({p})", m.file),
                    None => m.file.to_owned(),
                })
                .collect(),
            unknown: s
                .unknown
                .iter()
                .map(|r| match r.phase {
                    Some(p) => format!("{} ({p})", r.file),
                    None => r.file.clone(),
                })
                .collect(),
            changed: s.changed.iter().map(|(f, _, _)| (*f).to_owned()).collect(),
        })
        .collect())
}

/// `store: 8 applied, up to date` or `shop: 0 applied, 1 pending (…)`.
fn describe(l: &SchemaLine) -> String {
    let mut out = format!("{}: {} applied", l.schema, l.applied.len());
    if l.pending.is_empty() && l.unknown.is_empty() && l.changed.is_empty() {
        out.push_str(", up to date");
    }
    for (what, files) in [
        ("pending", &l.pending),
        ("UNKNOWN to this build (a newer build migrated)", &l.unknown),
        ("CHANGED since applied", &l.changed),
    ] {
        if !files.is_empty() {
            out.push_str(&format!(", {} {what}: {}", files.len(), files.join(", ")));
        }
    }
    out
}

/// The released migrations' excuses (see the files' own header).
const EXCUSES: &[(&str, &str)] = &[
    (
        "crates/holdfast-store/migrations/",
        include_str!("../../holdfast-store/migrations/EXCUSES"),
    ),
    (
        "crates/holdfast-shop/migrations/",
        include_str!("../../holdfast-shop/migrations/EXCUSES"),
    ),
];

/// One squawk warning, on the file as written (line numbers of the original file).
#[derive(Debug, Clone, PartialEq)]
struct Warning {
    file: String,
    line: usize,
    rule: String,
    message: String,
}

/// What `up` sets before running a migration on Postgres (the default guard), so squawk
/// judges the statements as they run.
const GUARD_PREFIX: &str =
    "SET LOCAL lock_timeout = '500ms';\nSET LOCAL statement_timeout = '60s';\n";

fn lint(extra: &[std::path::PathBuf]) -> anyhow::Result<()> {
    use holdfast_store::Backend;
    let dir = tempfile::tempdir()?;
    let mut originals: Vec<(std::path::PathBuf, String)> = Vec::new();
    let mut add = |name: String, original: String, sql: &str| -> anyhow::Result<()> {
        let path = dir.path().join(format!("{:03}_{name}", originals.len()));
        std::fs::write(&path, format!("{GUARD_PREFIX}{sql}"))?;
        originals.push((path, original));
        Ok(())
    };
    for schema in [&holdfast_store::STORE_SCHEMA, &holdfast_shop::SCHEMA] {
        for m in schema.migrations {
            // Postgres's own file, where the migration has one.
            let file = match m.postgres {
                Some(_) => m.file.replace(".sql", ".postgres.sql"),
                None => m.file.to_owned(),
            };
            let name = file.rsplit('/').next().unwrap_or(&file).to_owned();
            add(name, file.clone(), &m.render(Backend::Postgres))?;
        }
    }
    for file in extra {
        let sql =
            std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
        let sql = holdfast_store::render_migration(&sql, Backend::Postgres);
        let name = file
            .file_name()
            .map_or("extra.sql".into(), |n| n.to_string_lossy().into_owned());
        add(name, file.display().to_string(), &sql)?;
    }
    let out = std::process::Command::new("squawk")
        .args(["--assume-in-transaction", "--reporter", "gcc"])
        .args(originals.iter().map(|(p, _)| p))
        .output()
        .context(
            "running squawk (pip install squawk-cli; scripts/install-ops-tools.sh installs it)",
        )?;
    let warnings = parse_gcc(&String::from_utf8_lossy(&out.stdout), &originals);
    let excuses = excuses();
    let mut unexcused = 0;
    for w in &warnings {
        match excused(w, &excuses) {
            Some(why) => println!("{}:{} {} — excused: {why}", w.file, w.line, w.rule),
            None => {
                unexcused += 1;
                println!(
                    "{}:{} {} — {} — NOT EXCUSED",
                    w.file, w.line, w.rule, w.message
                );
            }
        }
    }
    println!(
        "squawk: {} migration(s), {} warning(s), {} excused, {unexcused} without an excuse",
        originals.len(),
        warnings.len(),
        warnings.len() - unexcused
    );
    anyhow::ensure!(
        unexcused == 0,
        "{unexcused} squawk warning(s) without an excuse: fix the statement, or write `-- squawk-ignore RULE` above it with the reason"
    );
    Ok(())
}

/// `path:line:col: warning: rule message` lines (squawk counts lines from 0), mapped back to
/// the original files' 1-based lines (the guard's lines taken off).
fn parse_gcc(text: &str, originals: &[(std::path::PathBuf, String)]) -> Vec<Warning> {
    let prefix_lines = GUARD_PREFIX.lines().count();
    text.lines()
        .filter_map(|line| {
            let (path, rest) = line.split_once(':')?;
            let (line_no, rest) = rest.split_once(':')?;
            let (_col, rest) = rest.split_once(": ")?;
            let rest = rest
                .strip_prefix("warning: ")
                .or_else(|| rest.strip_prefix("error: "))?;
            let (rule, message) = rest.split_once(' ').unwrap_or((rest, ""));
            let original = originals
                .iter()
                .find(|(p, _)| p.to_str() == Some(path))
                .map(|(_, o)| o.clone())?;
            Some(Warning {
                file: original,
                line: (line_no.parse::<usize>().ok()? + 1).saturating_sub(prefix_lines),
                rule: rule.to_owned(),
                message: message.to_owned(),
            })
        })
        .collect()
}

/// `(file path, rule, excuse)` from the EXCUSES files.
fn excuses() -> Vec<(String, String, String)> {
    EXCUSES
        .iter()
        .flat_map(|(dir, text)| {
            text.lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with('#'))
                .filter_map(move |l| {
                    let mut parts = l.splitn(3, char::is_whitespace);
                    let file = parts.next()?;
                    let rest = l[file.len()..].trim_start();
                    let (rule, why) = rest.split_once(char::is_whitespace)?;
                    Some((
                        format!("{dir}{file}"),
                        rule.to_owned(),
                        why.trim().to_owned(),
                    ))
                })
        })
        .collect()
}

fn excused<'a>(w: &Warning, excuses: &'a [(String, String, String)]) -> Option<&'a str> {
    excuses
        .iter()
        .find(|(file, rule, _)| *file == w.file && *rule == w.rule)
        .map(|(_, _, why)| why.as_str())
}

impl GuardArgs {
    fn to_guard(&self) -> MigrationGuard {
        MigrationGuard {
            lock_timeout: self.lock_timeout,
            statement_timeout: self.statement_timeout,
            deadline: self.deadline,
            batch_rows: self.batch_rows,
            batch_pause: self.batch_pause,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warnings_map_back_to_their_files_and_only_listed_ones_are_excused() {
        let originals = vec![(
            std::path::PathBuf::from("/tmp/x/001_0003_sessions.sql"),
            "crates/holdfast-store/migrations/0003_sessions.sql".to_owned(),
        )];
        let text = "/tmp/x/001_0003_sessions.sql:7:0: warning: require-concurrent-index-creation During normal index creation, table updates are blocked.\n\
                    /tmp/x/001_0003_sessions.sql:9:0: warning: ban-drop-column Dropping a column may break existing clients.\n\
                    unrelated noise\n";
        let warnings = parse_gcc(text, &originals);
        assert_eq!(warnings.len(), 2);
        assert_eq!(
            warnings[0].line, 6,
            "1-based, the guard's two lines taken off"
        );
        let excuses = excuses();
        assert!(excused(&warnings[0], &excuses).is_some_and(|why| why.contains("CONCURRENTLY")));
        assert_eq!(
            excused(&warnings[1], &excuses),
            None,
            "a planted warning is not excused"
        );
    }
}
