"""Dynamic-secret benchmark: a PostgreSQL login role made and dropped per lease, against its floor.

    python bench/bench_secrets.py [--roles 400] [--concurrency 4]

Starts a throwaway PostgreSQL (`broker.testing.postgres`), then drives the PostgreSQL backend
directly, `--concurrency` operations at a time through its admin pool:

- floor: `SELECT 1` on the same pool (one round trip, no broker logic);
- provision: CREATE ROLE with a fresh password and SCRAM verifier, GRANT, COMMENT, one transaction;
- revoke: NOLOGIN, end sessions, REASSIGN/DROP OWNED, DROP ROLE.

For each: operations/s, p50/p99 latency, this process's CPU per operation, and the longest the
event loop was held (a 1 ms ticker's worst lateness). Then the SCRAM verifier alone, computed on
the loop and in a worker thread, to show what moving it off the loop buys. RSS at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import statistics
import time
from collections.abc import Awaitable, Callable

from broker.backends.postgres import PostgresBackend, scram_verifier
from broker.config.backends import BackendConfig
from broker.testing.postgres import PostgresServer


class Ticker:
    """How late a 1 ms sleep wakes, at worst: how long something held the loop."""

    def __init__(self) -> None:
        self.worst = 0.0
        self._task: asyncio.Task | None = None

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            start = loop.time()
            await asyncio.sleep(0.001)
            self.worst = max(self.worst, loop.time() - start - 0.001)

    def __enter__(self) -> Ticker:
        self._task = asyncio.ensure_future(self._run())
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def measure(name: str, n: int, concurrency: int, op: Callable[[int], Awaitable[object]]) -> dict[str, float]:
    latencies: list[float] = []
    queue = iter(range(n))

    async def worker() -> None:
        for i in queue:
            start = time.perf_counter()
            await op(i)
            latencies.append(time.perf_counter() - start)

    cpu, wall = _cpu(), time.perf_counter()
    with Ticker() as ticker:
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall, cpu = time.perf_counter() - wall, _cpu() - cpu
    q = statistics.quantiles(latencies, n=100)
    row = {"ops": n / wall, "p50": q[49] * 1e3, "p99": q[98] * 1e3, "cpu": cpu / n * 1e3, "held": ticker.worst * 1e3}
    print(f"{name:<10} {row['ops']:>8.0f}/s  p50 {row['p50']:6.2f} ms  p99 {row['p99']:6.2f} ms  "
          f"cpu {row['cpu']:5.2f} ms/op  loop held at most {row['held']:6.2f} ms", flush=True)
    return row


async def verifier_on_loop(n: int) -> None:
    for label, compute in (("on the loop", _inline), ("in a thread", _threaded)):
        with Ticker() as ticker:
            start = time.perf_counter()
            for _ in range(n):
                await compute()
            each = (time.perf_counter() - start) / n * 1e3
            await asyncio.sleep(0.005)
        print(f"verifier {label:<12} {each:5.2f} ms each, loop held at most {ticker.worst * 1e3:6.2f} ms", flush=True)


async def _inline() -> None:
    scram_verifier("x" * 32)
    await asyncio.sleep(0)


async def _threaded() -> None:
    await asyncio.to_thread(scram_verifier, "x" * 32)


async def run(pg: PostgresServer, roles: int, concurrency: int) -> None:
    dsn = pg.create_database("bench")
    pg.psql("CREATE ROLE bench_reader NOLOGIN")
    config = BackendConfig(name="bench", kind="postgres", audience="postgres://bench", dsn=dsn,
                           grants={"db:read": ("bench_reader",)}, role_prefix="bench_")
    backend = PostgresBackend(config)
    await backend.open()
    names = [backend.new_role() for _ in range(roles)]
    expires = time.time() + 3600

    async def select(i: int) -> None:
        async with backend._connection() as conn:  # the pool the operations use
            await conn.execute("SELECT 1")

    try:
        for i in range(concurrency * 2):  # warm-up: the first contact makes the pool
            await select(i)
        floor = await measure("floor", roles, concurrency, select)
        made = await measure("provision", roles, concurrency, lambda i: backend.provision(names[i], ("bench_reader",),
                                                                                           expires, created_at=0.0))
        dropped = await measure("revoke", roles, concurrency, lambda i: backend.revoke(names[i]))
        assert await backend.roles() == {}, "every role should be gone"
        print(f"ratio to the floor: provision {floor['ops'] / made['ops']:.1f}x the time of a round trip, "
              f"revoke {floor['ops'] / dropped['ops']:.1f}x", flush=True)
        await verifier_on_loop(50)
    finally:
        await backend.close()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"max RSS {rss:.1f} MiB", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--roles", type=int, default=400)
    parser.add_argument("--concurrency", type=int, default=4)
    args = parser.parse_args()
    with PostgresServer() as pg:
        asyncio.run(run(pg, args.roles, args.concurrency))


if __name__ == "__main__":
    main()
