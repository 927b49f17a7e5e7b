"""jobqd adapter for the shared peer benchmark harness (shared/bench-peers/bench.py).

bench/side_by_side.sh copies it into a scratch copy of the harness as adapters/jobqd_adapter.py,
so jobqd is measured by exactly the driver that measures procrastinate and pgqueuer. The worker
is jobqd's own Worker (the code a daemon child runs), on a thread of the harness's worker
process so that the harness's asyncio READY/GO protocol keeps working.
"""

import asyncio
import dataclasses
import signal
import time

import psycopg

from jobqd import Client, task
from jobqd.config.settings import Settings
from jobqd.store.migrate import migrate
from jobqd.tasks import registry
from jobqd.worker.process import Worker, WorkerConfig

from .base import BaseAdapter


class UnbatchedWorker(Worker):
    """For measuring what batching outcomes gains (`--extra '{"unbatched":true}'`): the same
    worker, but every outcome is written in a transaction of its own before the next claim."""

    def _exchange(self, claim):
        for outcome in self.inflight.take():
            self.inflight.put_back([outcome])
            super()._exchange(False)
        super()._exchange(claim)


class Adapter(BaseAdapter):
    tables = ["jobqd.jobs"]
    remaining_sql = "SELECT count(*) FROM jobqd.jobs WHERE state IN ('queued', 'running')"
    total_sql = "SELECT count(*) FROM jobqd.jobs"

    async def open(self):
        await super().open()
        self.client = Client(self.dsn)

    async def close(self):
        self.client.close()
        await super().close()

    async def setup(self):
        def run():
            with psycopg.connect(self.dsn, autocommit=True) as conn:
                migrate(conn, "jobqd")

        await asyncio.to_thread(run)

    async def enqueue_single(self, n):
        await asyncio.to_thread(lambda: [self.client.enqueue("noop") for _ in range(n)])

    async def enqueue_bulk(self, n, batch):
        def run():
            for i in range(0, n, batch):
                self.client.enqueue_many([("noop", None)] * min(batch, n - i))

        await asyncio.to_thread(run)

    async def enqueue_latency(self, seq):
        await asyncio.to_thread(self.client.enqueue, "lat", {"seq": seq})

    async def make_worker(self, concurrency, extra, on_job):
        @task("noop")
        def noop(job):
            on_job()

        @task("lat")
        def lat(job):
            print(f"LAT {job.args['seq']} {time.time()}", flush=True)

        config = dataclasses.replace(
            WorkerConfig.from_settings(self.dsn, Settings.default(), "default"),
            concurrency=concurrency,
            completion_batch=extra.get("completion_batch", 100),
            completion_interval=extra.get("completion_interval", 0.005),
        )
        worker_class = UnbatchedWorker if extra.get("unbatched") else Worker
        worker = worker_class(config, registry)

        async def run():
            loop = asyncio.get_running_loop()
            for s in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(s, worker.stop)
            await asyncio.to_thread(worker.run)

        return run
