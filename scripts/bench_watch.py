"""Revocation latency to many watchers, and the bench's own dev material; used by bench_exchange.py.

`write_bench_setup` writes the dev setup, then re-mints it from a CA and a JWT-SVID signer
this process keeps, so the bench can also present a JWT-SVID (the bearer path) and give each
of its watchers an operator identity of its own (the broker allows a few streams per watcher).

The latency run: watcher processes hold `--watchers` `WatchRevocations` streams (spread over
several processes, so a watcher's own event loop does not queue the others), while a prober
exchanges a lease and revokes it, several times a second. A sample is the time from just
before `Revoke` is sent until one watcher has the event, on the system-wide monotonic clock.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import queue
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from grpc import aio

from broker._proto import broker_pb2 as pb
from broker._proto import broker_pb2_grpc as pb_grpc
from broker.cli.dev import AGENTS, BROKER_ID, OPERATOR_ID, TRUST_DOMAIN, DevPorts, write_dev_setup
from broker.pki.x509_ca import SpiffeCA
from broker.testing.jwt_issuer import JwtSvidIssuer

STREAMS_PER_WATCHER = 4  # below the broker's per-principal stream limit
WATCH_PROCESSES = 4
BEARER_TTL = 3600


@dataclass(frozen=True, slots=True)
class BenchSetup:
    config: Path
    folder: Path
    bearer_token: str  # a JWT-SVID of the planner for the broker's audience
    watchers: tuple[str, ...]  # file names of the watcher SVIDs


def _write_svid(ca: SpiffeCA, spiffe_id: str, folder: Path, name: str) -> None:
    ca.x509_svid(spiffe_id, ttl=24 * 3600).write(folder, name)
    for suffix in (".pem", "-key.pem"):
        os.chmod(folder / f"{name}{suffix}", 0o600)


def write_bench_setup(folder: Path, *, watchers: int) -> BenchSetup:
    """The dev setup on port 0 everywhere, re-minted with keys this process holds."""
    config = write_dev_setup(folder, DevPorts(listen=0, token_listen=0, http_listen=0))
    ca = SpiffeCA(TRUST_DOMAIN)
    (folder / f"{TRUST_DOMAIN}.bundle.pem").write_bytes(ca.bundle_pem())
    ca.server_svid(BROKER_ID).write(folder, "broker")
    _write_svid(ca, OPERATOR_ID, folder, "operator")
    for name, spiffe_id in AGENTS.items():
        _write_svid(ca, spiffe_id, folder, name)
    names = []
    for i in range(-(-watchers // STREAMS_PER_WATCHER) + WATCH_PROCESSES):
        names.append(f"watch-{i}")
        _write_svid(ca, f"spiffe://{TRUST_DOMAIN}/operator/watch-{i}", folder, names[-1])
    jwt = JwtSvidIssuer(TRUST_DOMAIN)
    (folder / f"{TRUST_DOMAIN}.jwks.json").write_text(json.dumps(jwt.jwks()))
    token = jwt.jwt_svid(AGENTS["planner"], BROKER_ID, ttl=BEARER_TTL)
    return BenchSetup(config=config, folder=folder, bearer_token=token, watchers=tuple(names))


def aio_channel(port: int, folder: Path, name: str) -> aio.Channel:
    creds = grpc.ssl_channel_credentials(
        root_certificates=(folder / f"{TRUST_DOMAIN}.bundle.pem").read_bytes(),
        private_key=(folder / f"{name}-key.pem").read_bytes(),
        certificate_chain=(folder / f"{name}.pem").read_bytes(),
    )
    return aio.secure_channel(f"127.0.0.1:{port}", creds, options=[("grpc.ssl_target_name_override", "localhost")])


# -- watcher processes ----------------------------------------------------------------------


async def _watch(
    stub: pb_grpc.CredentialBrokerStub, seen: list[tuple[str, float, float]], ready: asyncio.Event
) -> None:
    stream = stub.WatchRevocations(pb.WatchRevocationsRequest())
    await stream.initial_metadata()
    ready.set()
    async for event in stream:
        # monotonic for the end-to-end figure; wall time against the broker's revoked_at for the fan-out
        seen.append((event.lease_id, time.monotonic(), time.time() - event.revoked_at.ToNanoseconds() / 1e9))


async def _watchers(port: int, folder: Path, names: list[str], count: int, outbox: Any, stop: Any) -> None:
    channels = {name: aio_channel(port, folder, name) for name in names}
    seen: list[tuple[str, float, float]] = []
    readies = [asyncio.Event() for _ in range(count)]
    stubs = [pb_grpc.CredentialBrokerStub(channels[names[i // STREAMS_PER_WATCHER]]) for i in range(count)]
    tasks = [asyncio.create_task(_watch(stub, seen, ready)) for stub, ready in zip(stubs, readies, strict=True)]
    await asyncio.wait_for(asyncio.gather(*(r.wait() for r in readies)), 30)
    outbox.put(("ready", count))
    while not stop.is_set():
        await asyncio.sleep(0.05)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for channel in channels.values():
        await channel.close()
    outbox.put(("seen", seen))


def watcher_main(port: int, folder: str, names: list[str], count: int, outbox: Any, stop: Any) -> None:
    """One watcher process: `count` streams over the identities `names`, until `stop` is set."""
    try:
        asyncio.run(_watchers(port, Path(folder), names, count, outbox, stop))
    except Exception as e:  # report rather than die silently: the parent is waiting
        outbox.put(("error", f"{type(e).__name__}: {e}"[:300]))


# -- the prober ------------------------------------------------------------------------------


async def _probe(port: int, folder: Path, start: float, end: float, rate: float) -> list[tuple[str, float]]:
    agent = aio_channel(port, folder, "planner")
    operator = aio_channel(port, folder, "operator")
    exchange = pb_grpc.CredentialBrokerStub(agent).Exchange
    revoke = pb_grpc.BrokerAdminStub(operator).Revoke
    sent: list[tuple[str, float]] = []
    await asyncio.sleep(max(0.0, start - time.monotonic()))
    n = 0
    while time.monotonic() < end:
        n += 1
        answer = await exchange(
            pb.ExchangeRequest(
                task_id=f"probe-{n}", audience=AGENTS["repo"], actions=["repo:read"], resource="repo:org/app"
            ),
            timeout=5,
        )
        began = time.monotonic()
        await revoke(pb.RevokeRequest(lease_id=answer.lease_id), timeout=5)
        sent.append((answer.lease_id, began))
        await asyncio.sleep(max(0.0, began + 1 / rate - time.monotonic()))
    await agent.close()
    await operator.close()
    return sent


def run_latency(port: int, setup: BenchSetup, watchers: int, start: float, end: float, ctx: Any) -> dict[str, Any]:
    """Watcher processes up, probes from `start` to `end`, then every (watcher, revocation) latency."""
    outbox, stop = ctx.Queue(), ctx.Event()
    per = [watchers // WATCH_PROCESSES + (i < watchers % WATCH_PROCESSES) for i in range(WATCH_PROCESSES)]
    procs, at = [], 0
    for count in per:
        taken = -(-count // STREAMS_PER_WATCHER)  # identities of its own for each process
        names = list(setup.watchers[at : at + taken])
        procs.append(ctx.Process(target=watcher_main, args=(port, str(setup.folder), names, count, outbox, stop)))
        at += taken
    for proc in procs:
        proc.start()
    return {"procs": procs, "outbox": outbox, "stop": stop, "per": per, "start": start, "end": end}


def _drain(outbox: Any, kind: str, count: int, timeout: float) -> list[Any]:
    got, deadline = [], time.monotonic() + timeout
    while len(got) < count:
        try:
            message = outbox.get(timeout=max(0.01, deadline - time.monotonic()))
        except queue.Empty as e:
            raise RuntimeError(f"only {len(got)} of {count} watcher processes sent {kind!r}") from e
        if message[0] == "error":
            raise RuntimeError(f"a watcher process failed: {message[1]}")
        got.append(message[1])
    return got


def _pct(ordered: list[float], q: float) -> float:
    """Nearest rank, in milliseconds; NaN for no samples."""
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))] * 1000


def latency_figures(sent: list[tuple[str, float]], seen: list[list[tuple[str, float, float]]], watchers: int) -> dict:
    """End to end: from just before Revoke was sent. Fan-out: from the broker's revoked_at (wall clock)."""
    began = dict(sent)
    samples, fanout, received = [], [], defaultdict(int)
    for per_process in seen:
        for lease_id, at, after_revoked in per_process:
            if lease_id in began:
                samples.append(at - began[lease_id])
                fanout.append(after_revoked)
                received[lease_id] += 1
    samples.sort()
    fanout.sort()
    missing = sum(watchers - received[lease_id] for lease_id in began)
    return {
        "revocations": len(sent),
        "watchers": watchers,
        "samples": len(samples),
        "missing": missing,
        "p50_ms": _pct(samples, 0.50),
        "p99_ms": _pct(samples, 0.99),
        "max_ms": samples[-1] * 1000 if samples else float("nan"),
        "fanout_p50_ms": _pct(fanout, 0.50),
        "fanout_p99_ms": _pct(fanout, 0.99),
        "fanout_max_ms": fanout[-1] * 1000 if fanout else float("nan"),
    }


def wait_ready(handle: dict[str, Any]) -> None:
    """Block until every watcher process has all its streams open."""
    _drain(handle["outbox"], "ready", len(handle["procs"]), 60)


def probe_and_collect(port: int, folder: Path, handle: dict[str, Any], watchers: int, rate: float) -> dict:
    """Probe in this process (the watchers are up), then stop them and compute the figures."""
    sent = asyncio.run(_probe(port, folder, handle["start"], handle["end"], rate))
    time.sleep(0.5)  # let the last events arrive; a missing one is counted, not waited for
    handle["stop"].set()
    seen = _drain(handle["outbox"], "seen", len(handle["procs"]), 30)
    for proc in handle["procs"]:
        proc.join(timeout=5)
        if proc.is_alive():
            proc.terminate()
    return latency_figures(sent, seen, watchers)
