'use strict';
// A jobqd worker for Node over the SQL protocol (docs/protocol.md): claim in batches up to the
// free slots, heartbeat every lease held in one call at most every lease/3, write each
// outcome fenced by its lease token, stop work whose lease was lost, and on stop() claim no
// more and let the jobs in flight finish.

const { setTimeout: sleep } = require('node:timers/promises');

const UNKNOWN_TASK_SNOOZE = 30; // seconds

/** Throw from a handler to run the job again after `seconds` without spending an attempt. */
class Snooze extends Error {
  constructor(seconds) {
    super(`snoozed for ${seconds}s`);
    this.name = 'Snooze';
    this.seconds = seconds;
  }
}

/** Throw from a handler to end the job dead at once, without retrying. */
class Discard extends Error {
  constructor(reason) {
    super(reason);
    this.name = 'Discard';
  }
}

/** Throw from a handler to fail this attempt and retry after `seconds` (not the backoff). */
class RetryIn extends Error {
  constructor(seconds, reason) {
    super(reason || `retry in ${seconds}s`);
    this.name = 'RetryIn';
    this.seconds = seconds;
  }
}

class Worker {
  /**
   * @param {object} o
   * @param {import('pg').Pool} o.pool   connections for claims, outcomes and handlers
   * @param {string} o.queue             the queue to serve
   * @param {string} o.name              this worker's name, shown by `jobqctl show` / `status`
   * @param {Object<string, Function>} o.handlers  task name -> async (job, {signal, pool})
   * @param {number} [o.concurrency=10]  jobs at once
   * @param {number} [o.leaseSeconds=30] lease per claim; heartbeats every leaseSeconds / 3
   * @param {number} [o.pollMs=1000]     claim at least this often when idle (NOTIFY is a hint)
   * @param {string} [o.schema='jobqd']
   * @param {Function} [o.log]           (event, fields) -> void
   */
  constructor(o) {
    this.pool = o.pool;
    this.queue = o.queue;
    this.name = o.name;
    this.handlers = o.handlers;
    this.concurrency = o.concurrency || 10;
    this.leaseSeconds = o.leaseSeconds || 30;
    this.pollMs = o.pollMs || 1000;
    this.schema = o.schema || 'jobqd';
    this.log = o.log || (() => {});
    this.inflight = new Map(); // job id -> {job, controller, deadline}
    this.stopping = false;
    this.wakeUp = null; // resolves the idle wait early
    this.listener = null;
    this.finished = new AbortController(); // ends the heartbeat loop's wait once drained
  }

  fn(name) {
    return `"${this.schema.replace(/"/g, '""')}".${name}`;
  }

  /** Serve the queue until stop(); resolves once every job in flight has finished. */
  async run() {
    await this.listen();
    const beats = this.heartbeats();
    try {
      while (!this.stopping) {
        const free = this.concurrency - this.inflight.size;
        let claimed = 0;
        if (free > 0) {
          try {
            claimed = await this.claim(free);
          } catch (err) {
            this.log('claim failed', { error: err.message });
          }
        }
        // A full batch means there is probably more: claim again as soon as a slot frees.
        if (this.stopping || (claimed === free && free > 0)) continue;
        await this.idle(free > 0 ? this.pollMs : null);
      }
      while (this.inflight.size > 0) await this.idle(null);
    } finally {
      this.stopping = true;
      this.finished.abort();
      await beats;
      if (this.listener) this.listener.release();
    }
  }

  /** Claim no more jobs; run() resolves when those in flight are done. */
  stop() {
    this.stopping = true;
    this.wake();
  }

  wake() {
    if (this.wakeUp) this.wakeUp();
  }

  idle(ms) {
    return new Promise((resolve) => {
      const timer = ms === null ? null : setTimeout(resolve, ms);
      this.wakeUp = () => {
        if (timer) clearTimeout(timer);
        this.wakeUp = null;
        resolve();
      };
    });
  }

  /** LISTEN on the queue's channel so that a new job wakes us before the next poll. */
  async listen() {
    this.listener = await this.pool.connect();
    const { rows } = await this.listener.query(`SELECT ${this.fn('queue_channel')}($1) AS c`, [
      this.queue,
    ]);
    this.listener.on('notification', () => this.wake());
    await this.listener.query(`LISTEN ${this.listener.escapeIdentifier(rows[0].c)}`);
  }

  async claim(max) {
    const { rows } = await this.pool.query(
      `SELECT id, task, args, attempt, max_attempts, lease_token
         FROM ${this.fn('claim')}($1, $2, make_interval(secs => $3), $4)`,
      [this.queue, max, this.leaseSeconds, this.name],
    );
    const deadline = Date.now() + this.leaseSeconds * 1000;
    if (rows.length) {
      this.log('claimed', { jobs: rows.map((r) => [r.id, r.lease_token]) });
    }
    for (const job of rows) {
      const entry = { job, controller: new AbortController(), deadline };
      this.inflight.set(job.id, entry);
      this.execute(entry); // not awaited: the slots run side by side
    }
    return rows.length;
  }

  /** Renew every lease held in one call, every leaseSeconds / 3; drop what was lost. */
  async heartbeats() {
    const every = (this.leaseSeconds * 1000) / 3;
    while (!this.finished.signal.aborted) {
      try {
        await sleep(every, undefined, { signal: this.finished.signal });
      } catch {
        return; // run() is done: nothing is held any more
      }
      // Jobs whose outcome is being written are left out: their lease ends with it.
      const held = [...this.inflight.values()].filter((e) => !e.lost && !e.finishing);
      const now = Date.now();
      for (const e of held) {
        // Our own clock gives a lease up before the database's expiry when renewals fail.
        if (now >= e.deadline) this.lose(e, 'lease expired before it could be renewed');
      }
      const live = held.filter((e) => !e.lost);
      if (!live.length) continue;
      const sentAt = Date.now();
      try {
        const { rows } = await this.pool.query(
          `SELECT id FROM ${this.fn('heartbeat')}($1, $2, make_interval(secs => $3))`,
          [live.map((e) => e.job.id), live.map((e) => e.job.lease_token), this.leaseSeconds],
        );
        const renewed = new Set(rows.map((r) => r.id));
        for (const e of live) {
          if (renewed.has(e.job.id)) e.deadline = sentAt + this.leaseSeconds * 1000;
          else this.lose(e, 'lease lost (reaped or cancelled)');
        }
      } catch (err) {
        this.log('heartbeat failed', { error: err.message });
      }
    }
  }

  lose(entry, why) {
    entry.lost = true;
    entry.controller.abort(new Error(why));
    this.log('lease lost', { id: entry.job.id, attempt: entry.job.attempt, why });
  }

  async execute(entry) {
    const { job } = entry;
    const fields = { id: job.id, queue: this.queue, task: job.task, attempt: job.attempt };
    let outcome;
    try {
      const handler = this.handlers[job.task];
      // A task this worker does not know waits for one that does, its attempt not spent.
      if (!handler) throw new Snooze(UNKNOWN_TASK_SNOOZE);
      const result = await handler(job, { signal: entry.controller.signal, pool: this.pool });
      outcome = ['complete', [result === undefined ? null : JSON.stringify(result)]];
    } catch (err) {
      if (err instanceof Snooze) outcome = ['snooze', [err.seconds]];
      else if (err instanceof Discard) outcome = ['discard', [err.message]];
      else {
        const retryIn = err instanceof RetryIn ? err.seconds : null;
        outcome = [
          'fail',
          [String(err && err.message), retryIn, (err && err.name) || 'Error', err && err.stack],
        ];
      }
    }
    entry.finishing = true;
    try {
      if (entry.lost) return; // someone else may hold the job now: write nothing
      const [name, extra] = outcome;
      const args = [job.id, job.lease_token, ...extra];
      // fail()'s fourth argument, retry_in, is an interval; null means the queue's backoff.
      const marks = args.map((_, i) =>
        i === 3 && name === 'fail' ? `make_interval(secs => $${i + 1})` : `$${i + 1}`,
      );
      const { rows } = await this.pool.query(
        `SELECT state FROM ${this.fn(name)}(${marks.join(', ')})`,
        args,
      );
      if (!rows.length) this.log('outcome dropped: the lease was lost', fields);
      else if (name !== 'complete') this.log(name, { ...fields, state: rows[0].state });
    } catch (err) {
      this.log('outcome not written', { ...fields, error: err.message });
    } finally {
      this.inflight.delete(job.id);
      this.wake();
    }
  }
}

module.exports = { Worker, Snooze, Discard, RetryIn };
