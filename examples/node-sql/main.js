'use strict';
// The example worker: serves one queue's `example.work` jobs beside jobqd's Python workers.
//
//   DATABASE_URL=postgresql://worker@db/app JOBQD_QUEUE=default node main.js
//
// Environment: DATABASE_URL (else the PG* variables), JOBQD_QUEUE (default), JOBQD_WORKER
// (a name for `jobqctl show`; default node-HOST-PID), JOBQD_CONCURRENCY (10),
// JOBQD_LEASE_SECONDS (30), JOBQD_POLL_MS (1000), JOBQD_SCHEMA (jobqd), JOBQD_LOG=debug.
//
// `example.work` jobs take {"ms": how long to work, "fail_once": fail the first attempt,
// "not_before": a Unix time before which the job snoozes}. Each run that does the work records
// (job id, attempt, pid, task) in the application's `ledger` table; see README.md.

const os = require('node:os');
const { setTimeout: sleep } = require('node:timers/promises');
const { Pool } = require('pg');
const { Worker, Snooze } = require('./worker');

const env = process.env;
const name = env.JOBQD_WORKER || `node-${os.hostname()}-${process.pid}`;
const concurrency = Number(env.JOBQD_CONCURRENCY || 10);
const debug = env.JOBQD_LOG === 'debug';

function log(event, fields) {
  if (!debug && event === 'claimed') return;
  process.stdout.write(`${JSON.stringify({ at: new Date().toISOString(), event, worker: name, ...fields })}\n`);
}

const handlers = {
  'example.work': async (job, { signal, pool }) => {
    const { ms = 0, fail_once: failOnce = false, not_before: notBefore } = job.args;
    const wait = notBefore ? notBefore - Date.now() / 1000 : 0;
    if (wait > 0) throw new Snooze(wait);
    await pool.query('INSERT INTO ledger (job_id, attempt, pid, task) VALUES ($1, $2, $3, $4)', [
      job.id,
      job.attempt,
      process.pid,
      job.task,
    ]);
    await sleep(ms, undefined, { signal }); // a lost lease aborts the work
    if (failOnce && job.attempt === 1) throw new Error('failing the first attempt, as asked');
    return { worker: name };
  },
};

async function main() {
  const pool = new Pool({
    connectionString: env.DATABASE_URL,
    max: concurrency + 3, // the handlers' queries, the claims and heartbeats, the LISTEN
    application_name: `jobqd node worker ${name}`,
  });
  pool.on('error', (err) => log('connection error', { error: err.message }));
  const worker = new Worker({
    pool,
    queue: env.JOBQD_QUEUE || 'default',
    name,
    handlers,
    concurrency,
    leaseSeconds: Number(env.JOBQD_LEASE_SECONDS || 30),
    pollMs: Number(env.JOBQD_POLL_MS || 1000),
    schema: env.JOBQD_SCHEMA || 'jobqd',
    log,
  });
  let signals = 0;
  const onSignal = (sig) => {
    signals += 1;
    if (signals > 1) process.exit(1); // a second signal: stop now, leases expire and are reaped
    log('stopping', { signal: sig, in_flight: worker.inflight.size });
    worker.stop();
  };
  process.on('SIGTERM', onSignal);
  process.on('SIGINT', onSignal);
  log('started', { queue: worker.queue, concurrency, lease_seconds: worker.leaseSeconds });
  await worker.run();
  await pool.end();
  log('stopped', {});
}

main().catch((err) => {
  log('failed', { error: err.message });
  process.exit(1);
});
