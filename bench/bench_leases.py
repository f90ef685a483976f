"""Lease table benchmark: grants/s, expiries/s and purges/s at n leases, and memory per lease.

    python bench/bench_leases.py --leases 1000000

Leases look like real ones: 32-hex ids, 100 leases per task, a pool of subjects and
audiences, one lease in ten delegated from the one before it, expiries spread over an hour.
Rates are timed without tracemalloc; memory is measured in a second, traced run.
"""

from __future__ import annotations

import argparse
import gc
import time
import tracemalloc
from collections.abc import Iterator

from broker.leases.table import Lease, LeaseTable

T0 = 1_700_000_000.0
SPREAD = 3_600.0  # expiries spread over an hour
TOKEN_GRACE = 2 * SPREAD  # token exp this long after the lease, so expiry and purge are timed apart
LEASES_PER_TASK = 100


def _leases(n: int) -> Iterator[Lease]:
    scope = ("repo:read", "repo:write")
    for i in range(n):
        expires_at = T0 + 60 + SPREAD * i / n
        parent_id = None
        if i % 10 == 9:  # delegated from the previous lease, so it may not outlive it
            parent_id = f"{i - 1:032x}"
            expires_at = T0 + 60 + SPREAD * (i - 1) / n
        yield Lease(
            id=f"{i:032x}",
            task_id=f"task-{i // LEASES_PER_TASK}",
            subject=f"spiffe://example.org/agent/{i % 1000}",
            client_id=f"spiffe://example.org/agent/{i % 1000}",
            audience=f"svc-{i % 20}",
            scope=scope,
            resource="repo:org/app",
            issued_at=T0,
            expires_at=expires_at,
            token_exp=expires_at + TOKEN_GRACE,
            parent_id=parent_id,
            depth=1 if parent_id else 0,
        )


def _fill(table: LeaseTable, leases: list[Lease]) -> None:
    for start in range(0, len(leases), LEASES_PER_TASK):
        task_id = leases[start].task_id
        table.open_task(task_id, leases[start].subject, now=T0, deadline=T0 + 8 * 3_600)
        for lease in leases[start : start + LEASES_PER_TASK]:
            table.grant(lease, now=T0)


def _rates(n: int) -> dict[str, float]:
    leases = list(_leases(n))
    table = LeaseTable()
    started = time.perf_counter()
    _fill(table, leases)
    grant_s = time.perf_counter() - started
    del leases
    started = time.perf_counter()
    expired = table.expire_due(T0 + 60 + SPREAD)
    expire_s = time.perf_counter() - started
    assert len(expired) == n and table.counts()["active"] == 0
    del expired
    started = time.perf_counter()
    table.expire_due(T0 + 60 + SPREAD + TOKEN_GRACE)
    purge_s = time.perf_counter() - started
    assert table.counts()["tombstones"] == 0
    return {
        "grant_s": grant_s,
        "grants_per_s": n / grant_s,
        "expire_s": expire_s,
        "expiries_per_s": n / expire_s,
        "purge_s": purge_s,
        "purges_per_s": n / purge_s,
    }


def _memory(n: int) -> dict[str, float]:
    gc.collect()
    tracemalloc.start()
    try:
        baseline = tracemalloc.get_traced_memory()[0]
        leases = list(_leases(n))
        records = tracemalloc.get_traced_memory()[0] - baseline
        table = LeaseTable()
        _fill(table, leases)
        del leases
        gc.collect()
        used = tracemalloc.get_traced_memory()[0] - baseline
    finally:
        tracemalloc.stop()
    assert table.counts()["active"] == n
    return {
        "bytes_per_lease": used / n,
        "record_bytes_per_lease": records / n,
        "table_bytes_per_lease": (used - records) / n,
        "table_mib": used / 2**20,
    }


def run(n: int = 1_000_000, *, memory: bool = True) -> dict:
    """Benchmark a table of `n` leases; returns the figures as a dict."""
    figures: dict[str, float] = {"leases": n}
    figures.update(_rates(n))
    if memory:
        figures.update(_memory(n))
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--leases", type=int, default=1_000_000, help="number of leases (default 1000000)")
    parser.add_argument("--no-memory", action="store_true", help="skip the tracemalloc run")
    args = parser.parse_args()
    started = time.perf_counter()
    f = run(args.leases, memory=not args.no_memory)
    print(f"leases          {f['leases']:>12,}")
    print(f"grants/s        {f['grants_per_s']:>12,.0f}   ({f['grant_s']:.2f} s, tasks of {LEASES_PER_TASK})")
    print(f"expiries/s      {f['expiries_per_s']:>12,.0f}   ({f['expire_s']:.2f} s, one expire_due call)")
    print(f"purges/s        {f['purges_per_s']:>12,.0f}   ({f['purge_s']:.2f} s, tombstones past token exp)")
    if "bytes_per_lease" in f:
        print(f"bytes/lease     {f['bytes_per_lease']:>12,.0f}   (tracemalloc; {f['table_mib']:,.0f} MiB in all)")
        print(f"  records       {f['record_bytes_per_lease']:>12,.0f}   (Lease objects and their strings)")
        print(f"  table         {f['table_bytes_per_lease']:>12,.0f}   (dicts, index sets, heap, tasks)")
    print(f"total           {time.perf_counter() - started:>12.1f} s")


if __name__ == "__main__":
    main()
