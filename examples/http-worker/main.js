'use strict';
// The example worker: serves one queue's `example.work` jobs over jobqd's HTTP API, beside
// jobqd's Python workers. Plain Node 18 or later, no dependencies:
//
//   JOBQD_URL=http://127.0.0.1:9187 JOBQD_TOKEN=... JOBQD_QUEUE=default node main.js
//
// Environment: JOBQD_URL (the daemon's http.listen), JOBQD_TOKEN (a token with the `worker`
// scope), JOBQD_QUEUE (default), JOBQD_WORKER (a name for `jobqctl show`; default
// http-HOST-PID), JOBQD_CONCURRENCY (10), JOBQD_LEASE_SECONDS (30), JOBQD_WAIT_SECONDS (20, how
// long one claim long-polls), JOBQD_LEDGER_FILE (append one JSON line per run there),
// JOBQD_LOG=debug.
//
// `example.work` jobs take {"ms": how long to work, "fail_once": fail the first attempt,
// "not_before": a Unix time before which the job snoozes}; see README.md.

const fs = require('node:fs');
const os = require('node:os');
const { setTimeout: sleep } = require('node:timers/promises');
const { HttpWorker, Snooze } = require('./worker');

const env = process.env;
const name = env.JOBQD_WORKER || `http-${os.hostname()}-${process.pid}`;
const concurrency = Number(env.JOBQD_CONCURRENCY || 10);
const debug = env.JOBQD_LOG === 'debug';

function log(event, fields) {
  if (!debug && event === 'claimed') return;
  process.stdout.write(`${JSON.stringify({ at: new Date().toISOString(), event, worker: name, ...fields })}\n`);
}

/** What ran, one JSON line per run that did the work (job id, attempt, pid, task, time). */
function record(job) {
  if (!env.JOBQD_LEDGER_FILE) return;
  const line = { job_id: job.id, attempt: job.attempt, pid: process.pid, task: job.task };
  fs.appendFileSync(env.JOBQD_LEDGER_FILE, `${JSON.stringify({ ...line, at: Date.now() / 1000 })}\n`);
}

const handlers = {
  'example.work': async (job, { signal }) => {
    const { ms = 0, fail_once: failOnce = false, not_before: notBefore } = job.args;
    const wait = notBefore ? notBefore - Date.now() / 1000 : 0;
    if (wait > 0) throw new Snooze(wait);
    record(job);
    await sleep(ms, undefined, { signal }); // a lost lease aborts the work
    if (failOnce && job.attempt === 1) throw new Error('failing the first attempt, as asked');
    return { worker: name };
  },
};

async function main() {
  if (!env.JOBQD_URL || !env.JOBQD_TOKEN) {
    throw new Error('set JOBQD_URL (the daemon\'s http.listen) and JOBQD_TOKEN (a worker token)');
  }
  const worker = new HttpWorker({
    url: env.JOBQD_URL,
    token: env.JOBQD_TOKEN,
    queue: env.JOBQD_QUEUE || 'default',
    name,
    handlers,
    concurrency,
    leaseSeconds: Number(env.JOBQD_LEASE_SECONDS || 30),
    waitSeconds: Number(env.JOBQD_WAIT_SECONDS || 20),
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
  log('stopped', {});
}

main().catch((err) => {
  log('failed', { error: err.message });
  process.exit(1);
});
