#!/usr/bin/env node
// Holdfast's harness for measuring graphile-worker (npm) side by side with
// `holdfast bench jobs`. Our own code; it only uses graphile-worker's public API.
//
//   node bench.js --url postgres://…/fresh_db --jobs 20000 --rate 200 --seconds 5
//                 [--processes 1] [--concurrency 24] [--local-queue 500]
//                 [--complete-batch-delay 0] [--pool 25] [--poll-interval 2000]
//
// Two modes, same as Holdfast's own bench:
// - burn-down: bulk-insert N no-op jobs with `addJobs`, then start the worker(s) and time
//   them until every job is completed. graphile-worker deletes a job when it completes it,
//   so "completed" is checked as an empty jobs table after the workers stopped (a graceful
//   stop flushes batched completions first).
// - steady state: workers idle; this process inserts one job at a time (`addJob`) at
//   --rate for --seconds; each job carries its insert time (µs since the epoch, taken just
//   before the insert) and the task records start - insert.
//
// Workers run in child processes (this file, forked with --child) so several can be used;
// each one is a graphile-worker `run()` pool. Prints one JSON line on stdout:
// {"peer":"graphile-worker","version":..,"burn_down_jobs_per_s":..,"latency_ms":{"p50":..,"p99":..},"settings":{..}}
"use strict";

const path = require("path");
const { fork } = require("child_process");
const NODE_MODULES = path.join(__dirname, "..", "node", "node_modules");
const gw = require(path.join(NODE_MODULES, "graphile-worker"));
const VERSION = require(path.join(NODE_MODULES, "graphile-worker", "package.json")).version;

function parseArgs(argv) {
  const o = {
    url: null,
    jobs: 20000,
    rate: 200,
    seconds: 5,
    // Tuned as graphile-worker's performance docs recommend (concurrency 24, a local queue,
    // batched completion with a 0 ms delay), then swept on this machine: a 2000-job local
    // queue and two worker processes did best (see README.md).
    processes: 2,
    concurrency: 24,
    localQueue: 2000,
    completeBatchDelay: 0,
    pool: 0,
    pollInterval: 2000,
    child: false,
  };
  for (let i = 2; i < argv.length; i++) {
    const k = argv[i];
    const v = () => argv[++i];
    switch (k) {
      case "--url": o.url = v(); break;
      case "--jobs": o.jobs = Number(v()); break;
      case "--rate": o.rate = Number(v()); break;
      case "--seconds": o.seconds = Number(v()); break;
      case "--processes": o.processes = Number(v()); break;
      case "--concurrency": o.concurrency = Number(v()); break;
      case "--local-queue": o.localQueue = Number(v()); break;
      case "--complete-batch-delay": o.completeBatchDelay = Number(v()); break;
      case "--pool": o.pool = Number(v()); break;
      case "--poll-interval": o.pollInterval = Number(v()); break;
      case "--child": o.child = true; break;
      default: throw new Error(`unknown flag ${k}`);
    }
  }
  if (!o.url) throw new Error("--url is required");
  if (!o.pool) o.pool = Math.max(10, o.concurrency + 2); // the docs' advice
  return o;
}

const nowUs = () => Math.round((performance.timeOrigin + performance.now()) * 1000);
const quiet = new gw.Logger(() => (level, message) => {
  if (level === "error") process.stderr.write(`graphile-worker: ${message}\n`);
});

function workerOptions(o, taskList) {
  return {
    connectionString: o.url,
    concurrency: o.concurrency,
    maxPoolSize: o.pool,
    pollInterval: o.pollInterval,
    useNodeTime: true,
    noHandleSignals: true,
    logger: quiet,
    taskList,
    preset: {
      worker: {
        localQueue: o.localQueue > 0 ? { size: o.localQueue } : undefined,
        completeJobBatchDelay: o.completeBatchDelay,
        failJobBatchDelay: o.completeBatchDelay,
      },
    },
  };
}

// ---- child: one graphile-worker pool, driven by the parent over IPC ----------------------

async function child(o) {
  let handled = 0;
  let unsent = 0;
  let flushQueued = false;
  let latencies = [];
  const flush = () => {
    flushQueued = false;
    if (unsent > 0) process.send({ handled: unsent });
    unsent = 0;
  };
  const taskList = {
    noop: async (payload) => {
      const started = nowUs();
      if (payload && payload.t) latencies.push(started - payload.t);
      handled++;
      unsent++;
      if (!flushQueued) {
        flushQueued = true;
        setImmediate(flush);
      }
    },
  };
  let runner = null;
  process.on("message", async (msg) => {
    try {
      if (msg.cmd === "start") {
        latencies = [];
        runner = await gw.run(workerOptions(o, taskList));
        process.send({ started: true });
      } else if (msg.cmd === "stop") {
        await runner.stop();
        await runner.promise.catch(() => {});
        flush();
        process.send({ stopped: true, latencies });
        runner = null;
      } else if (msg.cmd === "exit") {
        process.exit(0);
      }
    } catch (e) {
      process.stderr.write(`graphile child: ${e && e.stack}\n`);
      process.exit(1);
    }
  });
  process.send({ loaded: true });
}

// ---- parent --------------------------------------------------------------------------------

function spawnChildren(o) {
  const args = process.argv.slice(2).concat(["--child"]);
  const kids = [];
  for (let i = 0; i < o.processes; i++) {
    const c = fork(__filename, args, { stdio: ["ignore", "ignore", "inherit", "ipc"] });
    c.handled = 0;
    kids.push(c);
  }
  return kids;
}

const once = (c, key) =>
  new Promise((resolve, reject) => {
    const on = (m) => {
      if (m && m[key]) {
        c.off("message", on);
        resolve(m);
      }
    };
    c.on("message", on);
    c.once("exit", (code) => reject(new Error(`worker process exited (${code})`)));
  });

/** Starts the workers; resolves when `target` jobs have been handled in total. */
function handledAll(kids, target, deadlineMs, what) {
  return new Promise((resolve, reject) => {
    let total = 0;
    const timer = setTimeout(
      () => reject(new Error(`${what}: only ${total} of ${target} jobs ran in ${deadlineMs} ms`)),
      deadlineMs,
    );
    for (const c of kids) {
      c.on("message", (m) => {
        if (m && m.handled) {
          total += m.handled;
          if (total >= target) {
            clearTimeout(timer);
            resolve(total);
          }
        }
      });
    }
  });
}

async function stopAll(kids) {
  const res = await Promise.all(
    kids.map((c) => {
      const p = once(c, "stopped");
      c.send({ cmd: "stop" });
      return p;
    }),
  );
  for (const c of kids) c.removeAllListeners("message");
  return res.flatMap((r) => r.latencies);
}

async function startAll(kids) {
  await Promise.all(
    kids.map((c) => {
      const p = once(c, "started");
      c.send({ cmd: "start" });
      return p;
    }),
  );
}

function quantileMs(sortedUs, q) {
  if (sortedUs.length === 0) return 0;
  const i = Math.min(sortedUs.length, Math.max(1, Math.ceil(q * sortedUs.length))) - 1;
  return sortedUs[i] / 1000;
}

async function parent(o) {
  // Installs graphile-worker's schema in the fresh database.
  await gw.runMigrations({ connectionString: o.url, logger: quiet });
  const utils = await gw.makeWorkerUtils({ connectionString: o.url, logger: quiet });
  const kids = spawnChildren(o);
  await Promise.all(kids.map((c) => once(c, "loaded")));

  // Burn-down.
  const t0 = performance.now();
  for (let left = o.jobs; left > 0; ) {
    const k = Math.min(1000, left);
    await utils.addJobs(Array.from({ length: k }, () => ({ identifier: "noop", payload: {} })));
    left -= k;
  }
  process.stderr.write(
    `  graphile-worker: inserted ${o.jobs} jobs in ${((performance.now() - t0) / 1000).toFixed(2)} s\n`,
  );
  let all = handledAll(kids, o.jobs, 600000, "burn-down");
  const started = performance.now();
  await startAll(kids);
  await all;
  await stopAll(kids); // graceful: flushes batched completions
  const burnSecs = (performance.now() - started) / 1000;
  const left = await utils.withPgClient((c) =>
    c.query("SELECT count(*)::int AS n FROM graphile_worker._private_jobs"),
  );
  if (left.rows[0].n !== 0) throw new Error(`burn-down: ${left.rows[0].n} jobs left`);

  // Steady state.
  const total = Math.max(1, Math.round(o.rate * o.seconds));
  all = handledAll(kids, total, 600000, "steady state");
  await startAll(kids);
  await new Promise((r) => setTimeout(r, 500));
  const period = 1000 / o.rate;
  const t1 = performance.now();
  for (let i = 0; i < total; i++) {
    const due = t1 + i * period;
    const wait = due - performance.now();
    if (wait > 0) await new Promise((r) => setTimeout(r, wait));
    await utils.addJob("noop", { t: nowUs() });
  }
  const achieved = total / ((performance.now() - t1) / 1000);
  if (achieved < 0.9 * o.rate) {
    process.stderr.write(`  graphile-worker: the producer only reached ${achieved.toFixed(0)}/s\n`);
  }
  await all;
  const lat = (await stopAll(kids)).sort((a, b) => a - b);
  for (const c of kids) c.send({ cmd: "exit" });
  await utils.release();

  process.stdout.write(
    JSON.stringify({
      peer: "graphile-worker",
      version: VERSION,
      backend: "postgres",
      jobs: o.jobs,
      burn_down_jobs_per_s: o.jobs / burnSecs,
      latency_ms: { p50: quantileMs(lat, 0.5), p99: quantileMs(lat, 0.99), max: quantileMs(lat, 1) },
      settings: {
        processes: o.processes,
        concurrency: o.concurrency,
        local_queue: o.localQueue,
        complete_job_batch_delay_ms: o.completeBatchDelay,
        max_pool_size: o.pool,
        poll_interval_ms: o.pollInterval,
        use_node_time: true,
        wakeup: "LISTEN jobs:insert",
        node: process.version,
      },
    }) + "\n",
  );
}

const o = parseArgs(process.argv);
(o.child ? child(o) : parent(o)).catch((e) => {
  process.stderr.write(`graphile bench: ${e && e.stack ? e.stack : e}\n`);
  process.exit(1);
});
