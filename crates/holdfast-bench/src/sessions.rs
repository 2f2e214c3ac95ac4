//! `holdfast bench sessions`: what Holdfast's Redis session tier costs against the ecosystem's
//! answer, tower-sessions with its own Redis store (`tower-sessions-redis-store`, on fred).
//!
//! One operation is what a request does to its session: **load it and save it**. For
//! tower-sessions that is `SessionStore::load` then `save` (a `GET` and a `SET … XX EXAT`, what
//! its middleware does for a session with an inactivity expiry). For Holdfast it is
//! `Sessions::load` with `touch_every` = 0, so every load also saves: a `GET`, a `SET … XX PX`
//! and a last-use write queued for the durable backstop (a SQLite store here), which one writer
//! task batches into the store *while the phase runs* — the backstop is not switched off to
//! look good. Both sides get one Redis connection (multiplexed/pipelined by its client), the
//! same Redis, the same number of sessions holding the same facts (user id, created, last use,
//! expiry), the same concurrency; phases alternate between the systems so drift hits both.
//! Holdfast's keys live under a fresh prefix, tower-sessions' under their random ids; both are
//! deleted at the end.

use crate::cli::BenchSessionsArgs;
use anyhow::{ensure, Context};
use futures::future::BoxFuture;
use hdrhistogram::Histogram;
use holdfast_sessions::redis::aio::ConnectionManager;
use holdfast_sessions::{Config, SessionTier, Sessions};
use holdfast_store::{Store, StoreOptions};
use serde::Serialize;
use serde_json::json;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tower_sessions_core_014::session::{Id, Record};
use tower_sessions_core_014::SessionStore;
use tower_sessions_redis_store::fred::prelude::{Client, ClientLike, Config as FredConfig};
use tower_sessions_redis_store::RedisStore;

/// Sessions per user: users are rows the backstop's foreign key needs, not the point.
const SESSIONS_PER_USER: usize = 20;

#[derive(Debug, Default, Serialize)]
struct Phase {
    ops: u64,
    errors: u64,
    secs: f64,
    p50_us: u64,
    p99_us: u64,
}

#[derive(Debug, Serialize)]
struct System {
    name: &'static str,
    ops: u64,
    errors: u64,
    ops_per_s: f64,
    /// Median over phases.
    p50_us: u64,
    p99_us: u64,
    value_bytes: u64,
    phases: Vec<Phase>,
}

type Op = Arc<dyn Fn(usize) -> BoxFuture<'static, bool> + Send + Sync>;

pub async fn run(args: BenchSessionsArgs) -> anyhow::Result<()> {
    ensure!(
        args.sessions > 0 && args.concurrency > 0 && args.rounds > 0,
        "nothing to do"
    );
    let dir = tempfile::tempdir()?;
    let store = Store::open(&StoreOptions::new(holdfast_store::testing::sqlite_url(
        dir.path(),
    )))
    .await
    .context("opening the backstop store")?;
    let admin = holdfast_sessions::connect_redis(&args.redis_url)?;
    let _: String = holdfast_sessions::redis::cmd("PING")
        .query_async(&mut admin.clone())
        .await
        .with_context(|| format!("Redis at {}", args.redis_url))?;
    let prefix = format!("holdfast-bench:{:016x}", rand::random::<u64>());
    let config = Config {
        touch_every: Duration::ZERO,
        ..Config::new(Duration::from_secs(1800), Duration::from_secs(12 * 3600))
    };
    let holdfast = Sessions::new(
        SessionTier::Redis {
            conn: holdfast_sessions::connect_redis(&args.redis_url)?,
            prefix: prefix.clone(),
        },
        store.clone(),
        config,
    );

    let fred = Client::new(FredConfig::from_url(&args.redis_url)?, None, None, None);
    fred.init().await.context("fred connecting to Redis")?;
    let peer = RedisStore::new(fred.clone());

    eprintln!(
        "bench sessions: {} sessions, {} clients, {} × {:?} per system, Redis {}",
        args.sessions, args.concurrency, args.rounds, args.duration, args.redis_url
    );
    let (tokens, ids) = setup(&args, &store, &holdfast, &peer).await?;
    let holdfast_bytes = strlen(&admin, &format!("{prefix}:s:{}", hash(&tokens[0]))).await?;
    let tower_bytes = strlen(&admin, &ids[0].to_string()).await?;

    let holdfast_op: Op = {
        let (s, tokens) = (holdfast.clone(), Arc::new(tokens));
        Arc::new(move |i| {
            let (s, tokens) = (s.clone(), tokens.clone());
            Box::pin(async move { matches!(s.load(&tokens[i % tokens.len()]).await, Ok(Some(_))) })
        })
    };
    let tower_op: Op = {
        let (t, ids) = (peer.clone(), Arc::new(ids.clone()));
        Arc::new(move |i| {
            let (t, ids) = (t.clone(), ids.clone());
            Box::pin(async move { tower_load_save(&t, &ids[i % ids.len()]).await })
        })
    };

    let (mut hf, mut ts) = (Vec::new(), Vec::new());
    for round in 0..args.rounds {
        // Alternate which goes first, so neither always inherits a warm (or tired) machine.
        let order = if round % 2 == 0 {
            [true, false]
        } else {
            [false, true]
        };
        for is_holdfast in order {
            let (op, phases) = if is_holdfast {
                (&holdfast_op, &mut hf)
            } else {
                (&tower_op, &mut ts)
            };
            let p = phase(op.clone(), args.concurrency, args.duration).await;
            eprintln!(
                "  round {}: {:<14} {:>9.0} ops/s  p50 {:>5} µs  p99 {:>6} µs  errors {}",
                round + 1,
                if is_holdfast {
                    "holdfast"
                } else {
                    "tower-sessions"
                },
                p.ops as f64 / p.secs,
                p.p50_us,
                p.p99_us,
                p.errors
            );
            phases.push(p);
        }
    }
    // Everything the phases queued reaches the backstop before the figures are final.
    let flushed = Instant::now();
    holdfast.flush().await;
    let flush_ms = flushed.elapsed().as_secs_f64() * 1000.0;
    let stats = holdfast.stats();

    let holdfast = summarize("holdfast (redis + async backstop)", hf, holdfast_bytes);
    let tower = summarize("tower-sessions-redis-store", ts, tower_bytes);
    let ratio = holdfast.ops_per_s / tower.ops_per_s;
    println!(
        "\n{:<36} {:>10} {:>9} {:>9} {:>7}",
        "system", "ops/s", "p50 µs", "p99 µs", "bytes"
    );
    for s in [&holdfast, &tower] {
        println!(
            "{:<36} {:>10.0} {:>9} {:>9} {:>7}",
            s.name, s.ops_per_s, s.p50_us, s.p99_us, s.value_bytes
        );
    }
    println!(
        "\nratio holdfast / tower-sessions: {ratio:.3} (target ≥ 0.9)\n\
         backstop: {} last-use writes handed to the store, {} written on the request path \
         (queue full), {} failed batches; queue drained {flush_ms:.0} ms after the last phase",
        stats.backstop_rows, stats.backstop_sync_writes, stats.backstop_errors
    );
    if let Some(path) = &args.json {
        let doc = json!({
            "bench": "sessions",
            "redis": args.redis_url,
            "sessions": args.sessions,
            "concurrency": args.concurrency,
            "phase_secs": args.duration.as_secs_f64(),
            "rounds": args.rounds,
            "connections_per_system": 1,
            "systems": [holdfast, tower],
            "ratio": ratio,
            "backstop": {
                "writes": stats.backstop_rows,
                "sync_writes": stats.backstop_sync_writes,
                "failed_batches": stats.backstop_errors,
                "drain_ms_after_last_phase": flush_ms,
            },
        });
        std::fs::write(path, serde_json::to_vec_pretty(&doc)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }

    holdfast_cache::delete_prefix(&admin, &prefix).await?;
    for id in &ids {
        peer.delete(id).await.context("deleting a bench session")?;
    }
    Ok(())
}

/// The same population on both sides: `args.sessions` sessions, each naming a user.
async fn setup(
    args: &BenchSessionsArgs,
    store: &Store,
    holdfast: &Sessions,
    tower: &RedisStore<Client>,
) -> anyhow::Result<(Vec<String>, Vec<Id>)> {
    let mut users = Vec::new();
    for i in 0..args.sessions.div_ceil(SESSIONS_PER_USER) {
        let email = holdfast_core::Email::parse(&format!("bench{i}@example.com"))?;
        users.push(store.user_create(&email, "argon2id$bench").await?.id);
    }
    let (mut tokens, mut ids) = (Vec::new(), Vec::new());
    let now = holdfast_core::now_ms();
    let expiry = time::OffsetDateTime::now_utc() + time::Duration::minutes(30);
    for i in 0..args.sessions {
        let user = &users[i % users.len()];
        tokens.push(holdfast.login(user, None).await?.token().to_owned());
        let mut record = Record {
            id: Id::default(),
            data: [
                ("user_id".to_owned(), json!(user)),
                ("created_at".to_owned(), json!(now)),
                ("last_seen_at".to_owned(), json!(now)),
            ]
            .into_iter()
            .collect(),
            expiry_date: expiry,
        };
        tower.create(&mut record).await?;
        ids.push(record.id);
    }
    Ok((tokens, ids))
}

/// What tower-sessions' middleware does for a used session with an inactivity expiry.
async fn tower_load_save(store: &RedisStore<Client>, id: &Id) -> bool {
    let Ok(Some(mut record)) = store.load(id).await else {
        return false;
    };
    record
        .data
        .insert("last_seen_at".into(), json!(holdfast_core::now_ms()));
    record.expiry_date = time::OffsetDateTime::now_utc() + time::Duration::minutes(30);
    store.save(&record).await.is_ok()
}

/// `concurrency` closed loops running `op` for `duration`.
async fn phase(op: Op, concurrency: usize, duration: Duration) -> Phase {
    let started = Instant::now();
    let until = started + duration;
    let mut loops = Vec::new();
    for c in 0..concurrency {
        let op = op.clone();
        loops.push(tokio::spawn(async move {
            let mut hist = Histogram::<u64>::new(3).expect("3 significant figures is valid");
            let (mut ops, mut errors, mut i) = (0u64, 0u64, c);
            while Instant::now() < until {
                let t = Instant::now();
                if op(i).await {
                    ops += 1;
                } else {
                    errors += 1;
                }
                let _ = hist.record(t.elapsed().as_micros() as u64);
                i += concurrency;
            }
            (ops, errors, hist)
        }));
    }
    let mut p = Phase::default();
    let mut hist = Histogram::<u64>::new(3).expect("3 significant figures is valid");
    for l in loops {
        if let Ok((ops, errors, h)) = l.await {
            p.ops += ops;
            p.errors += errors;
            let _ = hist.add(h);
        }
    }
    p.secs = started.elapsed().as_secs_f64();
    p.p50_us = hist.value_at_quantile(0.5);
    p.p99_us = hist.value_at_quantile(0.99);
    p
}

fn summarize(name: &'static str, phases: Vec<Phase>, value_bytes: u64) -> System {
    let median = |mut v: Vec<u64>| {
        v.sort_unstable();
        v[v.len() / 2]
    };
    let ops = phases.iter().map(|p| p.ops).sum();
    let secs: f64 = phases.iter().map(|p| p.secs).sum();
    System {
        name,
        ops,
        errors: phases.iter().map(|p| p.errors).sum(),
        ops_per_s: ops as f64 / secs,
        p50_us: median(phases.iter().map(|p| p.p50_us).collect()),
        p99_us: median(phases.iter().map(|p| p.p99_us).collect()),
        value_bytes,
        phases,
    }
}

fn hash(token: &str) -> String {
    holdfast_core::SessionId::parse(token)
        .map(|id| id.storage_hash())
        .unwrap_or_default()
}

async fn strlen(conn: &ConnectionManager, key: &str) -> anyhow::Result<u64> {
    Ok(holdfast_sessions::redis::cmd("STRLEN")
        .arg(key)
        .query_async(&mut conn.clone())
        .await?)
}
