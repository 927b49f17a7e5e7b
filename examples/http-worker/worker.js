'use strict';
// A jobqd worker for Node over the HTTP API (docs/http-api.md), with nothing but the global
// fetch: claim with a long-poll (`wait`) up to the free slots, renew every lease held in one
// batched heartbeat at most every lease/3, write each outcome fenced by its lease token, stop
// work whose lease was lost (409 or missing from a heartbeat), and on stop() claim no more and
// let the jobs in flight finish.

const { setTimeout: sleep } = require('node:timers/promises');

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

/** An answer other than 2xx; `status` 409 means the lease was lost. */
class HttpError extends Error {
  constructor(status, message) {
    super(`${status}: ${message}`);
    this.status = status;
  }
}

const UNKNOWN_TASK_SNOOZE = 30; // seconds: a worker that knows the task may take it meanwhile
const RETRY_PAUSE_MS = 1000; // after a failed claim (daemon restarting, network)

class HttpWorker {
  /**
   * @param {object} o
   * @param {string} o.url               the http child, e.g. http://127.0.0.1:9187
   * @param {string} o.token             a bearer token with the `worker` scope
   * @param {string} o.queue             the queue to serve
   * @param {string} o.name              this worker's name, shown by `jobqctl show` / `status`
   * @param {Object<string, Function>} o.handlers  task name -> async (job, {signal})
   * @param {number} [o.concurrency=10]  jobs at once
   * @param {number} [o.leaseSeconds=30] lease per claim; heartbeats every leaseSeconds / 3
   * @param {number} [o.waitSeconds=20]  how long one claim long-polls when nothing is due
   * @param {Function} [o.log]           (event, fields) -> void
   */
  constructor(o) {
    this.url = o.url.replace(/\/+$/, '');
    this.token = o.token;
    this.queue = o.queue;
    this.name = o.name;
    this.handlers = o.handlers;
    this.concurrency = o.concurrency || 10;
    this.leaseSeconds = o.leaseSeconds || 30;
    this.waitSeconds = o.waitSeconds ?? 20;
    this.log = o.log || (() => {});
    this.batch = Math.max(1, Math.floor(this.concurrency / 2)); // free slots worth a claim
    this.inflight = new Map(); // job id -> {job, controller, deadline, lost, finishing}
    this.stopping = false;
    this.claiming = null; // the AbortController of the claim being long-polled
    this.slotFreed = null; // resolves the wait for a free slot
    this.drained = new AbortController(); // aborted once run() has nothing left in flight
  }

  /** One JSON request; resolves to the parsed answer, rejects with an HttpError. */
  async call(method, path, body, signal) {
    const response = await fetch(this.url + path, {
      method,
      headers: { Authorization: `Bearer ${this.token}`, 'Content-Type': 'application/json' },
      body: body === undefined ? undefined : JSON.stringify(body),
      signal,
    });
    const answer = await response.json().catch(() => ({}));
    if (!response.ok) throw new HttpError(response.status, answer.error || response.statusText);
    return answer;
  }

  /** Serve the queue until stop(); resolves once every job in flight has finished. */
  async run() {
    const beats = this.heartbeats();
    try {
      while (!this.stopping) {
        const free = this.concurrency - this.inflight.size;
        // One claim per free slot would double the requests: wait for half of them.
        if (free === 0 || (this.inflight.size > 0 && free < this.batch)) {
          await new Promise((resolve) => (this.slotFreed = resolve));
          continue;
        }
        try {
          await this.claim(free);
        } catch (err) {
          if (this.stopping) break;
          this.log('claim failed', { error: err.message });
          await sleep(RETRY_PAUSE_MS);
        }
      }
      while (this.inflight.size > 0) await new Promise((resolve) => (this.slotFreed = resolve));
    } finally {
      this.stopping = true;
      this.drained.abort(); // the heartbeat loop's wait ends now, not lease/3 later
      await beats;
    }
  }

  /** Claim no more jobs (an open long-poll is cut); run() resolves when those in flight end. */
  stop() {
    this.stopping = true;
    if (this.claiming) this.claiming.abort();
    this.freeSlot();
  }

  freeSlot() {
    if (this.slotFreed) {
      const resolve = this.slotFreed;
      this.slotFreed = null;
      resolve();
    }
  }

  async claim(max) {
    this.claiming = new AbortController();
    let jobs;
    try {
      const body = { max, lease: this.leaseSeconds, worker: this.name, wait: this.waitSeconds };
      ({ jobs } = await this.call(
        'POST',
        `/queues/${encodeURIComponent(this.queue)}/claim`,
        body,
        this.claiming.signal,
      ));
    } finally {
      this.claiming = null;
    }
    const deadline = Date.now() + this.leaseSeconds * 1000;
    if (jobs.length) this.log('claimed', { jobs: jobs.map((j) => [j.id, j.lease_token]) });
    for (const job of jobs) {
      const entry = { job, controller: new AbortController(), deadline };
      this.inflight.set(job.id, entry);
      this.execute(entry); // not awaited: the slots run side by side
    }
  }

  /** Renew every lease held in one request, every leaseSeconds / 3; drop what was lost. */
  async heartbeats() {
    const every = (this.leaseSeconds * 1000) / 3;
    while (!(this.stopping && this.inflight.size === 0)) {
      await sleep(every, undefined, { signal: this.drained.signal }).catch(() => {});
      if (this.drained.signal.aborted) return;
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
        const { lost } = await this.call('POST', '/jobs/heartbeat', {
          lease: this.leaseSeconds,
          jobs: live.map((e) => ({ id: e.job.id, lease_token: e.job.lease_token })),
        });
        const gone = new Set(lost);
        for (const e of live) {
          if (gone.has(e.job.id)) this.lose(e, 'lease lost (reaped or cancelled)');
          else e.deadline = sentAt + this.leaseSeconds * 1000;
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
      if (!handler) throw new Snooze(UNKNOWN_TASK_SNOOZE);
      const result = await handler(job, { signal: entry.controller.signal });
      outcome = ['complete', { result: result === undefined ? null : result }];
    } catch (err) {
      if (err instanceof Snooze) outcome = ['snooze', { seconds: err.seconds }];
      else if (err instanceof Discard) outcome = ['discard', { reason: err.message }];
      else {
        outcome = [
          'fail',
          {
            error: String((err && err.message) || err),
            retry_in: err instanceof RetryIn ? err.seconds : null,
            kind: (err && err.name) || 'Error',
            traceback: (err && err.stack) || null,
          },
        ];
      }
    }
    entry.finishing = true;
    try {
      if (entry.lost) return; // someone else may hold the job now: write nothing
      const [action, body] = outcome;
      const answer = await this.call('POST', `/jobs/${job.id}/${action}`, {
        lease_token: job.lease_token,
        ...body,
      });
      if (action !== 'complete') this.log(action, { ...fields, state: answer.state });
    } catch (err) {
      if (err.status === 409) this.log('outcome dropped: the lease was lost', fields);
      else this.log('outcome not written', { ...fields, error: err.message });
    } finally {
      this.inflight.delete(job.id);
      this.freeSlot();
    }
  }
}

module.exports = { HttpWorker, HttpError, Snooze, Discard, RetryIn };
