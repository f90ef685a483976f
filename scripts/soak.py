#!/usr/bin/env python3
"""A soak of a live broker: agents at work, an operator revoking at random, 20 watchers.

    .venv/bin/python scripts/soak.py [--seconds 60] [--max-requests 200000] [--agents 6] [--seed 1]

Writes a dev setup (fresh CA and SVIDs) into a temp folder and starts `python -m broker serve`
on loopback ports the system picks. Agents exchange, renew, delegate and complete tasks; an
operator revokes by lease, task, subject and (rarely) all; resource servers introspect tokens;
20 `WatchRevocations` streams listen (8 as the operator for all leases, 6 each as the two
audiences). Bounded by `--seconds` and `--max-requests`. At the end every lease is revoked and
the broker's own list of leases is the ground truth. It holds when:

- no token introspects active once a revocation (or CompleteTask) covering it has returned;
- every watcher got every end event it is entitled to (its audience, or all) exactly once;
- broker RSS after the warm-up grows no more than what it must remember (ended leases are
  kept until their token's exp plus a 300 s grace) explains, plus a small allowance;
- only expected status codes occur.

It prints what it held and exits 1 on any violation, 2 when it could not run.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import tempfile
import time
import urllib.request
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "scripts"):  # run from a checkout without installing; the bench's broker runner
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import bench_exchange as bench  # noqa: E402
import grpc  # noqa: E402
from grpc import aio  # noqa: E402

from broker._proto import broker_pb2 as pb  # noqa: E402
from broker._proto import broker_pb2_grpc as pb_grpc  # noqa: E402
from broker.cli.dev import AGENTS, TRUST_DOMAIN, DevPorts, write_dev_setup  # noqa: E402

ACCESS_TOKEN = "urn:ietf:params:oauth:token-type:access_token"
AUDIENCES = {"repo": AGENTS["repo"], "deployer": AGENTS["deployer"]}
RESOURCE = "repo:org/app"
WATCHERS = (("operator", "", 8), ("repo", AGENTS["repo"], 6), ("deployer", AGENTS["deployer"], 6))
# Codes a well-behaved broker may answer in this soak, per RPC, and why.
EXPECTED = {
    "Exchange": {"OK", "PERMISSION_DENIED", "UNAUTHENTICATED", "FAILED_PRECONDITION"},  # closed task, dead parent
    "Renew": {"OK", "FAILED_PRECONDITION"},  # the lease ended meanwhile
    "CompleteTask": {"OK"},
    "Introspect": {"OK"},
    "Revoke": {"OK"},
    "ListLeases": {"OK"},
}
CALL_TIMEOUT = 10.0
RSS_ALLOWANCE = 24 * 2**20  # allocator slack, gRPC buffers, caches filling up
RSS_PER_KEPT_LEASE = 8 * 1024  # a kept lease, its task and audit/feed share: ~3 KB measured


@dataclass
class Held:
    """One issued lease as the soak saw it."""

    id: str
    token: str
    task_id: str
    client: str
    subject: str
    audience: str
    parent: str | None
    issued: float  # monotonic time the Exchange answer arrived
    dead_since: float | None = None  # when a revocation covering it returned


@dataclass
class Soak:
    """Shared state of one soak run."""

    folder: Path
    port: int
    deadline: float
    max_requests: int
    rng: random.Random
    channels: dict[str, aio.Channel] = field(default_factory=dict)
    leases: dict[str, Held] = field(default_factory=dict)
    codes: Counter[tuple[str, str]] = field(default_factory=Counter)
    violations: Counter[str] = field(default_factory=Counter)
    seen: list[Counter[str]] = field(default_factory=list)
    watch_ends: Counter[str] = field(default_factory=Counter)
    selectors: Counter[str] = field(default_factory=Counter)
    dead_checked: int = 0
    requests: int = 0

    def running(self) -> bool:
        return time.monotonic() < self.deadline and self.requests < self.max_requests

    def violation(self, text: str) -> None:
        self.violations[text] += 1

    def channel(self, name: str) -> aio.Channel:
        if name not in self.channels:
            creds = grpc.ssl_channel_credentials(
                root_certificates=(self.folder / f"{TRUST_DOMAIN}.bundle.pem").read_bytes(),
                private_key=(self.folder / f"{name}-key.pem").read_bytes(),
                certificate_chain=(self.folder / f"{name}.pem").read_bytes(),
            )
            options = [("grpc.ssl_target_name_override", "localhost")]
            self.channels[name] = aio.secure_channel(f"127.0.0.1:{self.port}", creds, options=options)
        return self.channels[name]

    async def call(self, rpc: str, method: object, request: object) -> object | None:
        """One unary call; its status code is counted, a failure answers None."""
        self.requests += 1
        try:
            answer = await method(request, timeout=CALL_TIMEOUT)  # type: ignore[operator]
        except aio.AioRpcError as e:
            self.codes[(rpc, e.code().name)] += 1
            if e.code().name not in EXPECTED[rpc]:
                self.violation(f"{rpc} answered {e.code().name}: {e.details()}")
            return None
        self.codes[(rpc, "OK")] += 1
        return answer


# -- agents ---------------------------------------------------------------------------------


async def agent(soak: Soak, name: str, index: int) -> None:
    """Exchange, renew, delegate (a worker presents a planner's token) and complete, at random."""
    stub = pb_grpc.CredentialBrokerStub(soak.channel(name))
    principal, tasks, serial = AGENTS[name], [], 0
    while soak.running():
        roll = soak.rng.random()
        if roll < 0.45 or not tasks:
            task_id = soak.rng.choice(tasks) if tasks else ""
            if not tasks or soak.rng.random() < 0.3:
                serial += 1
                task_id = f"soak-{name}-{index}-{serial}"
                tasks = [*tasks[-4:], task_id]
            await exchange(soak, stub, principal, task_id)
        elif roll < 0.65 and name == "worker":
            await delegate(soak, stub, principal)
        elif roll < 0.85:
            mine = [h for h in list(soak.leases.values())[-200:] if h.client == principal]
            if mine:
                request = pb.RenewRequest(lease_id=soak.rng.choice(mine).id, ttl_seconds=soak.rng.randint(2, 8))
                await soak.call("Renew", stub.Renew, request)
        else:
            task_id = tasks.pop(soak.rng.randrange(len(tasks)))
            started = time.monotonic()
            if await soak.call("CompleteTask", stub.CompleteTask, pb.CompleteTaskRequest(task_id=task_id)):
                await mark_dead(soak, [h for h in soak.leases.values() if h.task_id == task_id], started)


async def exchange(soak: Soak, stub: pb_grpc.CredentialBrokerStub, principal: str, task_id: str) -> None:
    audience = soak.rng.choice(list(AUDIENCES.values()))
    actions = soak.rng.choice([["repo:read"], ["repo:read", "repo:write"]])
    request = pb.ExchangeRequest(
        task_id=task_id, audience=audience, actions=actions, resource=RESOURCE, ttl_seconds=soak.rng.randint(2, 8)
    )
    answer = await soak.call("Exchange", stub.Exchange, request)
    if answer is not None:
        soak.leases[answer.lease_id] = Held(
            answer.lease_id, answer.access_token, task_id, principal, principal, audience, None, time.monotonic()
        )


async def delegate(soak: Soak, stub: pb_grpc.CredentialBrokerStub, principal: str) -> None:
    parents = [h for h in list(soak.leases.values())[-100:] if h.client == AGENTS["planner"] and h.parent is None]
    if not parents:
        return
    parent = soak.rng.choice(parents)
    request = pb.ExchangeRequest(
        actions=["repo:read"],
        ttl_seconds=soak.rng.randint(2, 8),
        subject_token=parent.token,
        subject_token_type=ACCESS_TOKEN,
    )
    answer = await soak.call("Exchange", stub.Exchange, request)
    if answer is not None:
        soak.leases[answer.lease_id] = Held(
            answer.lease_id,
            answer.access_token,
            parent.task_id,
            principal,
            parent.subject,
            parent.audience,
            parent.id,
            time.monotonic(),
        )


# -- the operator and the resource servers ----------------------------------------------------


def _covered(soak: Soak, selector: str, value: str) -> list[Held]:
    """The leases a revocation by `selector` covers, descendants included."""
    leases = list(soak.leases.values())
    if selector == "lease_id":
        roots = {value}
    elif selector == "task_id":
        roots = {h.id for h in leases if h.task_id == value}
    elif selector == "subject":
        roots = {h.id for h in leases if value in (h.subject, h.client)}
    else:
        roots = {h.id for h in leases}
    found, frontier = set(roots), set(roots)
    while frontier:
        frontier = {h.id for h in leases if h.parent in frontier} - found
        found |= frontier
    return [soak.leases[i] for i in found]


async def operator(soak: Soak) -> None:
    """Revoke at random by every selector; right after each returns, what it covered must be inactive."""
    stub = pb_grpc.BrokerAdminStub(soak.channel("operator"))
    while soak.running():
        await asyncio.sleep(soak.rng.uniform(0.02, 0.12))
        leases = list(soak.leases.values())
        if not leases:
            continue
        pick = soak.rng.choice(leases)
        selector = soak.rng.choices(["lease_id", "task_id", "subject", "all"], weights=[50, 30, 15, 2])[0]
        value = {"lease_id": pick.id, "task_id": pick.task_id, "subject": pick.client, "all": ""}[selector]
        await revoke(soak, stub, selector, value)


async def revoke(soak: Soak, stub: pb_grpc.BrokerAdminStub, selector: str, value: str) -> None:
    started = time.monotonic()
    request = pb.RevokeRequest(all=True) if selector == "all" else pb.RevokeRequest(**{selector: value})
    if await soak.call("Revoke", stub.Revoke, request) is not None:
        soak.selectors[selector] += 1
        await mark_dead(soak, _covered(soak, selector, value), started)


async def mark_dead(soak: Soak, covered: list[Held], started: float) -> None:
    """Leases issued before `started` are dead from now on; introspect a sample of them at once."""
    now = time.monotonic()
    dead = [h for h in covered if h.issued < started]
    for held in dead:
        held.dead_since = held.dead_since or now
    for held in soak.rng.sample(dead, min(5, len(dead))):
        await introspect(soak, held)


async def introspect(soak: Soak, held: Held) -> None:
    name = next(n for n, a in AUDIENCES.items() if a == held.audience)
    stub = pb_grpc.CredentialBrokerStub(soak.channel(name))
    asked = time.monotonic()
    answer = await soak.call("Introspect", stub.Introspect, pb.IntrospectRequest(token=held.token))
    if answer is not None and held.dead_since is not None and held.dead_since <= asked:
        soak.dead_checked += 1
        if answer.active:
            soak.violation(f"lease {held.id} introspects active after its revocation returned")


async def resource_server(soak: Soak) -> None:
    """Introspect random tokens, living and revoked alike."""
    while soak.running():
        leases = list(soak.leases.values())
        if leases:
            await introspect(soak, soak.rng.choice(leases))
        else:
            await asyncio.sleep(0.01)


# -- watchers -------------------------------------------------------------------------------


async def watch(soak: Soak, name: str, audience: str, seen: Counter[str], ready: asyncio.Event) -> None:
    stub = pb_grpc.CredentialBrokerStub(soak.channel(name))
    stream = stub.WatchRevocations(pb.WatchRevocationsRequest(audience=audience))
    try:
        await stream.initial_metadata()
        ready.set()
        async for event in stream:
            seen[event.lease_id] += 1
    except aio.AioRpcError as e:
        soak.watch_ends[e.code().name] += 1
        if e.code() is not grpc.StatusCode.CANCELLED:
            soak.violation(f"a {name} watcher ended with {e.code().name}: {e.details()}")
    finally:
        ready.set()
    soak.watch_ends["ended"] += 1


async def ground_truth(soak: Soak) -> list[pb.Lease]:
    stub = pb_grpc.BrokerAdminStub(soak.channel("operator"))
    leases, token = [], ""
    while True:
        request = pb.ListLeasesRequest(include_inactive=True, page_size=1000, page_token=token)
        page = await soak.call("ListLeases", stub.ListLeases, request)
        if page is None:
            return leases
        leases.extend(page.leases)
        token = page.next_page_token
        if not token:
            return leases


async def check_watchers(soak: Soak, audiences: list[str], leases: list[pb.Lease]) -> dict[str, int]:
    """Wait (bounded) until every watcher has what it is entitled to, then compare exactly."""
    entitled = [Counter(x.id for x in leases if not a or x.audience == a) for a in audiences]
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and any(
        seen.keys() < want.keys() for seen, want in zip(soak.seen, entitled, strict=True)
    ):
        await asyncio.sleep(0.1)
    for i, (seen, want) in enumerate(zip(soak.seen, entitled, strict=True)):
        if seen != want:
            missing = len(want.keys() - seen.keys())
            extra = len(seen.keys() - want.keys())
            twice = sum(1 for n in seen.values() if n > 1)
            soak.violation(f"watcher {i}: {missing} events missing, {extra} unexpected, {twice} delivered twice")
    return {"events_delivered": sum(sum(s.values()) for s in soak.seen), "leases_listed": len(leases)}


# -- memory ---------------------------------------------------------------------------------


def kept_leases(http_port: int) -> int:
    """Active leases plus tombstones, from the broker's /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/metrics", timeout=5) as response:
        text = response.read().decode()
    kept = 0
    for line in text.splitlines():
        if line.startswith(('broker_leases{kind="active"', 'broker_leases{kind="tombstones"')):
            kept += int(float(line.rsplit(" ", 1)[1]))
    return kept


async def sample_memory(soak: Soak, broker: object, samples: list[tuple[float, int, int]]) -> None:
    while soak.running():
        rss = broker.rss_bytes()
        kept = await asyncio.to_thread(kept_leases, broker.ports["http"])
        samples.append((time.monotonic(), rss, kept))
        await asyncio.sleep(0.5)


def check_memory(soak: Soak, samples: list[tuple[float, int, int]], warm_until: float) -> dict[str, float]:
    after = [s for s in samples if s[0] >= warm_until]
    if len(after) < 2:
        soak.violation("too few memory samples after the warm-up")
        return {}
    (_, rss0, kept0), (_, rss1, kept1) = after[0], after[-1]
    allowed = RSS_ALLOWANCE + max(0, kept1 - kept0) * RSS_PER_KEPT_LEASE
    if rss1 - rss0 > allowed:
        soak.violation(f"broker RSS grew {(rss1 - rss0) / 2**20:.1f} MiB after warm-up, allowed {allowed / 2**20:.1f}")
    return {
        "rss_warm_mib": rss0 / 2**20,
        "rss_end_mib": rss1 / 2**20,
        "kept_warm": kept0,
        "kept_end": kept1,
        "rss_allowed_growth_mib": allowed / 2**20,
    }


# -- the run --------------------------------------------------------------------------------


async def soak_run(soak: Soak, broker: object, args: argparse.Namespace) -> dict[str, object]:
    watchers, ready, audiences = [], [], []
    for name, audience, count in WATCHERS:
        for _ in range(count):
            seen, event = Counter(), asyncio.Event()
            soak.seen.append(seen)
            ready.append(event)
            audiences.append(audience)
            watchers.append(asyncio.create_task(watch(soak, name, audience, seen, event)))
    await asyncio.wait_for(asyncio.gather(*(e.wait() for e in ready)), 30)
    soak.deadline = time.monotonic() + args.seconds
    samples: list[tuple[float, int, int]] = []
    names = [("planner", "worker")[i % 2] for i in range(args.agents)]
    workers = [agent(soak, name, i) for i, name in enumerate(names)]
    await asyncio.gather(*workers, operator(soak), resource_server(soak), sample_memory(soak, broker, samples))
    # Everything ends now, so every lease the broker lists is one every entitled watcher must see.
    await revoke(soak, pb_grpc.BrokerAdminStub(soak.channel("operator")), "all", "")
    leases = await ground_truth(soak)
    figures = await check_watchers(soak, audiences, leases)
    for task in watchers:
        task.cancel()
    await asyncio.gather(*watchers, return_exceptions=True)
    warm_until = soak.deadline - args.seconds + min(args.warmup, args.seconds / 2)
    return figures | check_memory(soak, samples, warm_until)


def report(soak: Soak, figures: dict[str, object], seconds: float) -> None:
    by_rpc: dict[str, Counter[str]] = defaultdict(Counter)
    for (rpc, code), n in soak.codes.items():
        by_rpc[rpc][code] += n
    print(
        f"soak: {soak.requests:,} requests in {seconds:.1f} s, {len(soak.leases):,} leases issued "
        f"({sum(1 for h in soak.leases.values() if h.parent):,} delegated), 20 watchers"
    )
    for rpc, codes in sorted(by_rpc.items()):
        print(f"  {rpc:<13}" + ", ".join(f"{code} {n:,}" for code, n in codes.most_common()))
    print(f"  revocations  {dict(soak.selectors)}")
    print(
        f"  held: {soak.dead_checked:,} introspections of revoked tokens, all inactive"
        if not any("introspects active" in v for v in soak.violations)
        else "  FAILED: a revoked token was active"
    )
    print(
        f"  watchers: {figures.get('events_delivered', 0):,} events delivered for "
        f"{figures.get('leases_listed', 0):,} leases listed; streams ended early: {dict(soak.watch_ends) or 'none'}"
    )
    if "rss_end_mib" in figures:
        print(
            f"  broker RSS {figures['rss_warm_mib']:.1f} MiB after warm-up -> {figures['rss_end_mib']:.1f} MiB at "
            f"the end, kept leases {figures['kept_warm']:,} -> {figures['kept_end']:,} "
            f"(allowed growth {figures['rss_allowed_growth_mib']:.1f} MiB)"
        )
    for text, n in soak.violations.most_common(20):
        print(f"  VIOLATION ({n}x): {text}")
    total = sum(soak.violations.values())
    print("soak held" if not total else f"soak FAILED: {total} violations")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=60.0, help="how long the load runs (default 60)")
    p.add_argument("--max-requests", type=int, default=200_000, help="stop after this many calls (default 200000)")
    p.add_argument("--agents", type=int, default=6, help="agent loops, half planners, half workers (default 6)")
    p.add_argument("--warmup", type=float, default=5.0, help="seconds before memory is judged (default 5)")
    p.add_argument("--seed", type=int, default=1, help="random seed (default 1)")
    return p


async def _main(args: argparse.Namespace, folder: Path, broker: object) -> int:
    soak = Soak(folder, broker.ports["mtls"], float("inf"), args.max_requests, random.Random(args.seed))
    started = time.monotonic()
    try:
        figures = await soak_run(soak, broker, args)
    finally:
        for channel in soak.channels.values():
            await channel.close()
    report(soak, figures, time.monotonic() - started)
    return 1 if soak.violations else 0


def main() -> int:
    args = _parser().parse_args()
    if args.seconds <= 0 or args.max_requests < 1 or args.agents < 2:
        _parser().error("--seconds and --max-requests must be positive, --agents at least 2")
    with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
        folder = Path(tmp) / "dev"
        config = write_dev_setup(folder, DevPorts(listen=0, token_listen=0, http_listen=0))
        bench.lift_rate_limit(config)
        try:
            with bench.BrokerProcess(config, Path(tmp)) as broker:
                code = asyncio.run(_main(args, folder, broker))
        except bench.BenchError as e:
            print(f"soak: could not run: {e}", file=sys.stderr)
            return 2
        if broker.exit_code != 0:
            print(f"soak: broker did not stop cleanly (exit {broker.exit_code})", file=sys.stderr)
            return 1
    return code


if __name__ == "__main__":
    sys.exit(main())
