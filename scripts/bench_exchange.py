#!/usr/bin/env python3
"""Exchange throughput and latency against a live broker, then the lease table alone.

    .venv/bin/python scripts/bench_exchange.py [--clients 4] [--inflight 4] [--seconds 10] [--json]

Part 1 writes a dev setup (fresh CA, SVIDs, dev policy) into a temp folder, starts
`python -m broker serve` on loopback ports chosen by the system, and drives `Exchange` over
mTLS from several client processes, each with its own channel and a few calls in flight, for a
bounded time after a warm-up; then the same load against `grpc.health.v1.Health/Check`, the
floor of TLS + gRPC + one asyncio servicer; then `Exchange` with a JWT-SVID bearer on the
token listener, `Introspect`, and `Exchange` again while `--watchers` revocation streams
measure the latency of revocations made meanwhile. It prints each target as a ratio measured
in the same run. Part 2 times `bench/bench_leases.py`. See bench/README.md for each figure.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import math
import multiprocessing as mp
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402
from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: E402

from broker._proto import broker_pb2 as pb  # noqa: E402
from broker._proto import broker_pb2_grpc as pb_grpc  # noqa: E402
from broker.cli.dev import TRUST_DOMAIN  # noqa: E402

sys.path.insert(0, str(ROOT / "scripts"))
import bench_watch  # noqa: E402

AGENT = "planner"  # allowed by the dev policy to read repo:org/app
AUDIENCE = f"spiffe://{TRUST_DOMAIN}/service/repo"
RESOURCE = "repo:org/app"
ACTIONS = ("repo:read",)
READY_TIMEOUT = 30.0  # broker start, client process spawn and first call
CALL_TIMEOUT = 5.0  # one call; also how far past the window a client may run
STOP_TIMEOUT = 15.0  # the broker's own grace is 5 s
# The per-principal rate limit (50/s by default) would cap every client at once, since they
# all call as the same agent: the bench measures the broker, so it lifts the limit.
UNLIMITED = 1_000_000


class BenchError(Exception):
    """The benchmark could not run as set up (broker did not start, a client failed its check)."""


@dataclass(frozen=True, slots=True)
class Target:
    """What one client process needs: where to call, what, how hard and when."""

    port: int
    folder: str
    rpc: str
    index: int
    inflight: int
    warmup: float
    seconds: float
    token: str = ""  # the bearer JWT-SVID, or the token to introspect
    name: str = AGENT  # whose SVID the channel presents


@dataclass(slots=True)
class Tally:
    """One thread's measured calls."""

    latencies: list[float] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)


def _channel(target: Target) -> grpc.Channel:
    folder = Path(target.folder)
    roots = (folder / f"{TRUST_DOMAIN}.bundle.pem").read_bytes()
    if target.rpc == "bearer":  # the token listener: server TLS only, identity in the metadata
        creds = grpc.ssl_channel_credentials(root_certificates=roots)
    else:
        creds = grpc.ssl_channel_credentials(
            root_certificates=roots,
            private_key=(folder / f"{target.name}-key.pem").read_bytes(),
            certificate_chain=(folder / f"{target.name}.pem").read_bytes(),
        )
    return grpc.secure_channel(
        f"127.0.0.1:{target.port}", creds, options=[("grpc.ssl_target_name_override", "localhost")]
    )


def _call_and_check(target: Target, channel: grpc.Channel) -> tuple[Any, Any, str]:
    """The stub method, its request, and why the first answer is wrong ("" when it is right)."""
    if target.rpc in ("exchange", "bearer"):
        call = pb_grpc.CredentialBrokerStub(channel).Exchange
        if target.rpc == "bearer":
            call = functools.partial(call, metadata=(("authorization", f"Bearer {target.token}"),))
        request = pb.ExchangeRequest(
            task_id=f"bench-{target.rpc}-{target.index}", audience=AUDIENCE, actions=list(ACTIONS), resource=RESOURCE
        )
        first = call(request, timeout=CALL_TIMEOUT)
        wrong = "" if first.state == "ISSUED" and first.access_token else f"state {first.state!r}"
    elif target.rpc == "introspect":
        call = pb_grpc.CredentialBrokerStub(channel).Introspect
        request = pb.IntrospectRequest(token=target.token)
        first = call(request, timeout=CALL_TIMEOUT)
        wrong = "" if first.active else "token not active"
    else:
        call = health_pb2_grpc.HealthStub(channel).Check
        request = health_pb2.HealthCheckRequest(service="")
        first = call(request, timeout=CALL_TIMEOUT)
        wrong = "" if first.status == health_pb2.HealthCheckResponse.SERVING else f"status {first.status}"
    return call, request, wrong


def _drive(call: Any, request: Any, start: float, end: float, tally: Tally) -> None:
    """Call back to back until `end`; keep calls that start at `start` or later and end by `end`."""
    while (began := time.monotonic()) < end:
        error = ""
        try:
            call(request, timeout=CALL_TIMEOUT)
        except grpc.RpcError as e:
            error = e.code().name if isinstance(e, grpc.Call) else type(e).__name__
        ended = time.monotonic()
        if began >= start and ended <= end:
            if error:
                tally.errors[error] += 1
            else:
                tally.latencies.append(ended - began)


def client_main(target: Target, outbox: Any, go: Any, start_at: Any) -> None:
    """One client process: connect, check one call, wait for the start, drive the load."""
    try:
        with _channel(target) as channel:
            grpc.channel_ready_future(channel).result(timeout=READY_TIMEOUT)
            call, request, wrong = _call_and_check(target, channel)
            outbox.put(("ready", target.index, wrong))
            if wrong or not go.wait(READY_TIMEOUT):
                return
            start = start_at.value + target.warmup
            end = start + target.seconds
            tallies = [Tally() for _ in range(target.inflight)]
            threads = [
                threading.Thread(target=_drive, args=(call, request, start, end, t), daemon=True) for t in tallies
            ]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(end - time.monotonic() + 2 * CALL_TIMEOUT)
            latencies = [x for t in tallies for x in t.latencies]
            errors = sum((t.errors for t in tallies), Counter())
            outbox.put(("result", target.index, latencies, dict(errors)))
    except Exception as e:  # report rather than die silently: the parent is waiting
        outbox.put(("ready", target.index, f"{type(e).__name__}: {e}"[:300]))


def _collect(inbox: Any, kind: str, count: int, deadline: float) -> list[tuple]:
    got: list[tuple] = []
    while len(got) < count:
        left = deadline - time.monotonic()
        if left <= 0:
            raise BenchError(f"only {len(got)} of {count} clients sent {kind!r} in time")
        try:
            message = inbox.get(timeout=left)
        except queue.Empty as e:
            raise BenchError(f"only {len(got)} of {count} clients sent {kind!r} in time") from e
        if message[0] != kind:
            raise BenchError(f"client {message[1]} failed: {message[2]}")
        if kind == "ready" and message[2]:
            raise BenchError(f"client {message[1]} not ready: {message[2]}")
        got.append(message)
    return got


def run_load(
    rpc: str, broker: BrokerProcess, folder: Path, args: argparse.Namespace, *, token: str = "", watch: Any = None
) -> dict[str, Any]:
    """Spawn the client processes, start them together, merge what they measured.

    `watch` (a `bench_watch.BenchSetup`) also runs the revocation-latency probe in the window.
    """
    ctx = mp.get_context("spawn")
    inbox, go, start_at = ctx.Queue(), ctx.Event(), ctx.Value("d", 0.0)
    port = broker.ports["token" if rpc == "bearer" else "mtls"]
    name = "repo" if rpc == "introspect" else AGENT  # the token's audience may introspect it
    target = Target(port, str(folder), rpc, 0, args.inflight, args.warmup, args.seconds, token, name)
    probe = None
    procs = [
        ctx.Process(target=client_main, args=(replace(target, index=i), inbox, go, start_at), daemon=True)
        for i in range(args.clients)
    ]
    for proc in procs:
        proc.start()
    try:
        _collect(inbox, "ready", args.clients, time.monotonic() + READY_TIMEOUT)
        if watch is not None:
            probe = _start_probe(broker, watch, args, ctx)
        start_at.value = time.monotonic() + 0.05  # CLOCK_MONOTONIC is system-wide on Linux
        go.set()
        window = start_at.value + args.warmup
        if probe is not None:
            probe.window(window, window + args.seconds)
        cpu = [_sample_at(window, broker), _sample_at(window + args.seconds, broker)]
        deadline = window + args.seconds + 3 * CALL_TIMEOUT
        results = _collect(inbox, "result", args.clients, deadline)
        latency = probe.result() if probe is not None else None
    finally:
        for proc in procs:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.terminate()
                proc.join(timeout=2)
    figures = summarise([r[2] for r in results], [r[3] for r in results], args.seconds)
    if latency is not None:
        figures["revocation"] = latency
    return figures | _cpu_figures(cpu[0], cpu[1], figures["calls"])


class _Probe:
    """The revocation-latency probe on a thread of this process, watchers in their own processes."""

    def __init__(self, broker: BrokerProcess, setup: Any, args: argparse.Namespace, ctx: Any) -> None:
        self._broker, self._setup, self._args, self._ctx = broker, setup, args, ctx
        self._ready = threading.Event()
        self._figures: dict[str, Any] = {}
        self._error: BaseException | None = None
        self._handle = bench_watch.run_latency(broker.ports["mtls"], setup, args.watchers, 0.0, 0.0, ctx)
        bench_watch.wait_ready(self._handle)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def window(self, start: float, end: float) -> None:
        self._handle["start"], self._handle["end"] = start, end
        self._ready.set()

    def _run(self) -> None:
        try:
            self._ready.wait(READY_TIMEOUT)
            port, folder = self._broker.ports["mtls"], self._setup.folder
            self._figures = bench_watch.probe_and_collect(
                port, folder, self._handle, self._args.watchers, self._args.revocation_rate
            )
        except BaseException as e:  # reported by result()
            self._error = e

    def result(self) -> dict[str, Any]:
        self._thread.join(READY_TIMEOUT + self._args.seconds + 60)
        if self._error is not None or self._thread.is_alive():
            raise BenchError(f"revocation probe failed: {self._error or 'timed out'}")
        return self._figures


def _start_probe(broker: BrokerProcess, setup: Any, args: argparse.Namespace, ctx: Any) -> _Probe:
    return _Probe(broker, setup, args, ctx)


def _sample_at(when: float, broker: BrokerProcess) -> tuple[float, float, float]:
    """At `when`: the broker's CPU seconds, and the machine's busy and total CPU seconds."""
    time.sleep(max(0.0, when - time.monotonic()))
    ticks = os.sysconf("SC_CLK_TCK")
    jiffies = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = jiffies[3] + jiffies[4]  # idle + iowait
    total = sum(jiffies[:8])  # guest time is already counted in user
    return broker.cpu_seconds(), (total - idle) / ticks, total / ticks


def _cpu_figures(before: tuple[float, float, float], after: tuple[float, float, float], calls: int) -> dict:
    broker_s, busy_s, total_s = (a - b for a, b in zip(after, before, strict=True))
    wall_s = total_s / (os.cpu_count() or 1)
    return {
        "broker_cpu_pct": 100 * broker_s / wall_s if wall_s else math.nan,
        "broker_cpu_ms_per_call": 1000 * broker_s / calls if calls else math.nan,
        "machine_busy_pct": 100 * busy_s / total_s if total_s else math.nan,
    }


def _percentile(ordered: list[float], q: float) -> float:
    """Nearest rank; NaN for no samples."""
    if not ordered:
        return math.nan
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def summarise(latencies: list[list[float]], errors: list[dict[str, int]], seconds: float) -> dict[str, Any]:
    ordered = sorted(x for per_client in latencies for x in per_client)
    kinds = sum((Counter(e) for e in errors), Counter())
    ms = 1000.0
    return {
        "calls": len(ordered),
        "calls_per_s": len(ordered) / seconds,
        "p50_ms": _percentile(ordered, 0.50) * ms,
        "p99_ms": _percentile(ordered, 0.99) * ms,
        "max_ms": (ordered[-1] if ordered else math.nan) * ms,
        "errors": sum(kinds.values()),
        "error_kinds": dict(kinds),
    }


class BrokerProcess:
    """`python -m broker serve --config ...` as a child; stopped with SIGTERM on exit."""

    def __init__(self, config: Path, folder: Path) -> None:
        self._config = config
        self._out = folder / "broker.stdout"
        self._log = folder / "broker.log"
        self._proc: subprocess.Popen | None = None
        self.ports: dict[str, int] = {}
        self.exit_code: int | None = None  # None after stop(): it had to be killed
        self.stop_s = math.nan
        self._stopped = False

    def __enter__(self) -> BrokerProcess:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        command = [sys.executable, "-m", "broker", "serve", "--config", str(self._config), "--log-level", "warning"]
        with self._out.open("wb") as out, self._log.open("wb") as log:
            self._proc = subprocess.Popen(command, stdout=out, stderr=log, env=env, cwd=ROOT)
        try:
            self.ports = self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def pid(self) -> int:
        assert self._proc is not None
        return self._proc.pid

    def _wait_ready(self) -> dict[str, int]:
        """Raises: BenchError when the broker exits or stays silent past READY_TIMEOUT."""
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            for line in self._out.read_text().splitlines():
                if line.startswith("broker ready: "):
                    return json.loads(line.removeprefix("broker ready: "))
            if self._proc is not None and self._proc.poll() is not None:
                raise BenchError(f"broker exited with {self._proc.returncode}: {self.log_tail()}")
            time.sleep(0.05)
        raise BenchError(f"broker not ready after {READY_TIMEOUT:.0f} s: {self.log_tail()}")

    def log_tail(self, lines: int = 5) -> str:
        return " | ".join(self._log.read_text(errors="replace").splitlines()[-lines:])

    def rss_bytes(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise BenchError("no VmRSS in /proc status")

    def cpu_seconds(self) -> float:
        """User + system CPU time of the broker process, all threads."""
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        """SIGTERM, wait for the graceful stop; SIGKILL only if it hangs (then exit_code is None)."""
        if self._proc is None or self._stopped:
            return
        self._stopped = True
        started = time.monotonic()
        if self._proc.poll() is None:
            self._proc.send_signal(signal.SIGTERM)
        try:
            self.exit_code = self._proc.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait(timeout=5)
        self.stop_s = time.monotonic() - started


def lease_counts(http_port: int, audit: Path) -> dict[str, int]:
    """Leases the broker holds (its /metrics gauge) and `lease.granted` records in its audit log."""
    with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/metrics", timeout=5) as response:
        text = response.read().decode()
    counts = {}
    for line in text.splitlines():
        if line.startswith("broker_leases{"):
            kind = line.split('kind="', 1)[1].split('"', 1)[0]
            counts[f"leases_{kind}"] = int(float(line.rsplit(" ", 1)[1]))
    counts["audit_lease_granted"] = sum(1 for line in audit.open() if '"kind":"lease.granted"' in line)
    return counts


def lift_rate_limit(config: Path) -> None:
    """Set `[limits] rate_per_second`, `rate_burst` and `max_tasks_per_principal` high in the dev config.

    A load run opens tasks far faster than an agent would, and a closed task counts against its
    owner's quota until its deadline.
    """
    names = ("rate_per_second", "rate_burst", "max_tasks_per_principal")
    keep = [line for line in config.read_text().splitlines() if not line.startswith(names)]
    lifted = [f"rate_per_second = {UNLIMITED}", f"rate_burst = {UNLIMITED}", f"max_tasks_per_principal = {UNLIMITED}"]
    if "[limits]" in keep:
        at = keep.index("[limits]") + 1
        keep[at:at] = lifted
    else:
        keep += ["", "[limits]", *lifted]
    config.write_text("\n".join(keep) + "\n")


def run_broker_part(args: argparse.Namespace) -> dict[str, Any]:
    """Part 1: the live broker under Exchange, Health/Check, bearer Exchange, Introspect and watch loads."""
    with tempfile.TemporaryDirectory(prefix="bench-exchange-") as tmp:
        folder = Path(tmp) / "dev"
        setup = bench_watch.write_bench_setup(folder, watchers=args.watchers)
        lift_rate_limit(setup.config)
        with BrokerProcess(setup.config, Path(tmp)) as broker:
            figures: dict[str, Any] = {"broker_ports": broker.ports, "rss_start_bytes": broker.rss_bytes()}
            figures["exchange"] = run_load("exchange", broker, folder, args)
            figures["rss_after_exchange_bytes"] = broker.rss_bytes()
            figures.update(lease_counts(broker.ports["http"], folder / "audit.jsonl"))
            figures["health"] = run_load("health", broker, folder, args)
            figures["rss_after_health_bytes"] = broker.rss_bytes()
            if not args.skip_modes:
                _run_modes(broker, folder, setup, args, figures)
        figures["broker_exit_code"] = broker.exit_code
        figures["broker_stop_s"] = broker.stop_s
    figures.update(ratios(figures))
    grown = figures["rss_after_exchange_bytes"] - figures["rss_start_bytes"]
    figures["rss_growth_per_lease_bytes"] = grown / max(1, figures["audit_lease_granted"])
    return figures


def _run_modes(broker: BrokerProcess, folder: Path, setup: Any, args: argparse.Namespace, figures: dict) -> None:
    # The mTLS Exchange again right before the bearer one, so the two compared ran on a broker
    # in the same state (table size, warmth); the first Exchange run starts on a fresh broker.
    figures["exchange_again"] = run_load("exchange", broker, folder, args)
    figures["bearer"] = run_load("bearer", broker, folder, args, token=setup.bearer_token)
    token = _one_token(broker.ports["mtls"], folder)
    figures["introspect"] = run_load("introspect", broker, folder, args, token=token)
    if args.watchers > 0:
        figures["exchange_watched"] = run_load("exchange", broker, folder, args, watch=setup)


def _one_token(port: int, folder: Path) -> str:
    """One access token of the planner for the repo audience (what Introspect is asked about)."""
    target = Target(port, str(folder), "exchange", 999, 1, 0, 0)
    with _channel(target) as channel:
        _, _, wrong = _call_and_check(target, channel)
        if wrong:
            raise BenchError(f"no token to introspect: {wrong}")
        request = pb.ExchangeRequest(
            task_id="bench-introspect", audience=AUDIENCE, actions=list(ACTIONS), resource=RESOURCE, ttl_seconds=3600
        )
        return pb_grpc.CredentialBrokerStub(channel).Exchange(request, timeout=CALL_TIMEOUT).access_token


def _ratio(a: float, b: float) -> float:
    return a / b if b and not math.isnan(b) else math.nan


def ratios(figures: dict[str, Any]) -> dict[str, float]:
    """The targets, each a ratio of figures measured in this run."""
    ex, he = figures["exchange"], figures["health"]
    out = {
        "ratio_calls_per_s": _ratio(ex["calls_per_s"], he["calls_per_s"]),
        "ratio_p50": _ratio(ex["p50_ms"], he["p50_ms"]),
        "ratio_cpu_per_call": _ratio(ex["broker_cpu_ms_per_call"], he["broker_cpu_ms_per_call"]),
    }
    if "bearer" in figures:
        mtls = figures["exchange_again"]["broker_cpu_ms_per_call"]
        out["ratio_bearer_cpu"] = _ratio(figures["bearer"]["broker_cpu_ms_per_call"], mtls)
        out["ratio_introspect_cpu"] = _ratio(
            figures["introspect"]["broker_cpu_ms_per_call"], he["broker_cpu_ms_per_call"]
        )
    return out


TARGETS = (
    ("ratio_calls_per_s", ">=", 0.42, "Exchange throughput / Check throughput"),
    ("ratio_cpu_per_call", "<=", 3.0, "broker CPU per Exchange / per Check"),
    ("ratio_bearer_cpu", "<=", 1.15, "broker CPU per bearer Exchange / per mTLS Exchange just before it"),
)
REVOCATION_P99_TARGET_MS = 20.0


def _bench_leases() -> Any:
    spec = importlib.util.spec_from_file_location("bench_leases", ROOT / "bench" / "bench_leases.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_lease_part(args: argparse.Namespace) -> dict[str, Any]:
    """Part 2: rates at --leases without tracemalloc, memory in a traced run at --memory-leases."""
    bench = _bench_leases()
    if args.memory_leases == args.leases:
        return bench.run(args.leases, memory=True) | {"memory_leases": args.leases}
    figures = bench.run(args.leases, memory=False)
    if args.memory_leases > 0:
        traced = bench.run(args.memory_leases, memory=True)
        figures |= {k: v for k, v in traced.items() if "bytes" in k or k == "table_mib"}
        figures["memory_leases"] = args.memory_leases
    return figures


def _mib(n: float) -> str:
    return f"{n / 2**20:,.1f} MiB"


def print_broker_part(f: dict[str, Any], args: argparse.Namespace) -> None:
    print(
        f"broker under load: {args.clients} client processes x {args.inflight} in flight, mTLS on loopback, "
        f"{args.warmup:g} s warm-up, {args.seconds:g} s measured, rate limit lifted, nproc {os.cpu_count()}"
    )
    print(
        f"  {'rpc':<14}{'calls':>9}{'calls/s':>10}{'p50 ms':>8}{'p99 ms':>8}{'max ms':>8}{'errors':>7}"
        f"{'broker CPU':>11}{'CPU ms/call':>12}{'machine busy':>13}"
    )
    rows = (
        ("Exchange", "exchange"),
        ("Health/Check", "health"),
        ("Exchange again", "exchange_again"),
        ("Exchange JWT", "bearer"),
        ("Introspect", "introspect"),
        ("Exchange+watch", "exchange_watched"),
    )
    for name, key in rows:
        if key not in f:
            continue
        r = f[key]
        print(
            f"  {name:<14}{r['calls']:>9,}{r['calls_per_s']:>10,.1f}{r['p50_ms']:>8.2f}{r['p99_ms']:>8.2f}"
            f"{r['max_ms']:>8.2f}{r['errors']:>7,}{r['broker_cpu_pct']:>10.0f}%{r['broker_cpu_ms_per_call']:>12.3f}"
            f"{r['machine_busy_pct']:>12.0f}%"
        )
        if r["error_kinds"]:
            print(f"  {'':<14}errors by code: {r['error_kinds']}")
    print(f"  exchange/health: {f['ratio_calls_per_s']:.3f} x the throughput, {f['ratio_p50']:.2f} x the p50 latency")
    print_targets(f)
    grown = f["rss_after_exchange_bytes"] - f["rss_start_bytes"]
    print(
        f"  broker RSS      {_mib(f['rss_start_bytes'])} at start, {_mib(f['rss_after_exchange_bytes'])} after "
        f"Exchange (+{_mib(grown)}), {_mib(f['rss_after_health_bytes'])} after Health"
    )
    print(
        f"  leases held     {f.get('leases_active', 0):,} active, {f.get('leases_tombstones', 0):,} tombstones, "
        f"{f.get('leases_tasks', 0):,} tasks; {f['audit_lease_granted']:,} lease.granted in the audit log"
    )
    print(f"  RSS growth      {f['rss_growth_per_lease_bytes']:,.0f} B per lease granted (rough: all broker memory)")
    exit_code = "killed (no exit on SIGTERM)" if f["broker_exit_code"] is None else f"exit {f['broker_exit_code']}"
    print(f"  broker stop     SIGTERM -> {exit_code} in {f['broker_stop_s']:.2f} s")


def print_targets(f: dict[str, Any]) -> None:
    """Each target as measured in this run, and whether it was met."""
    for key, op, limit, what in TARGETS:
        value = f.get(key, math.nan)
        met = value >= limit if op == ">=" else value <= limit
        print(f"  target          {what}: {value:.3f} ({op} {limit:g}: {'met' if met else 'NOT met'})")
    if "introspect" in f:
        print(f"  introspect      broker CPU per Introspect / per Check: {f['ratio_introspect_cpu']:.3f}")
    rev = f.get("exchange_watched", {}).get("revocation")
    if rev:
        met = rev["p99_ms"] < REVOCATION_P99_TARGET_MS and not rev["missing"]
        print(
            f"  target          revocation to {rev['watchers']} watchers while Exchanges run: "
            f"p50 {rev['p50_ms']:.2f} ms, p99 {rev['p99_ms']:.2f} ms, max {rev['max_ms']:.2f} ms over "
            f"{rev['revocations']} revocations, {rev['samples']:,} deliveries, {rev['missing']} missing "
            f"(p99 < {REVOCATION_P99_TARGET_MS:g} ms: {'met' if met else 'NOT met'})"
        )
        print(
            f"  fan-out         from the broker's revoked_at to each watcher: p50 {rev['fanout_p50_ms']:.2f} ms, "
            f"p99 {rev['fanout_p99_ms']:.2f} ms, max {rev['fanout_max_ms']:.2f} ms (wall clocks of one machine)"
        )


def print_lease_part(f: dict[str, Any]) -> None:
    print(f"lease table alone (bench/bench_leases.py), {f['leases']:,} leases")
    print(f"  grants/s      {f['grants_per_s']:>12,.0f}   ({f['grant_s']:.2f} s, tasks of 100)")
    print(f"  expiries/s    {f['expiries_per_s']:>12,.0f}   ({f['expire_s']:.2f} s, one expire_due call)")
    print(f"  purges/s      {f['purges_per_s']:>12,.0f}   ({f['purge_s']:.2f} s, tombstones past token exp)")
    if "bytes_per_lease" in f:
        at = f"tracemalloc at {f['memory_leases']:,} leases, {f['table_mib']:,.0f} MiB in all"
        print(f"  bytes/lease   {f['bytes_per_lease']:>12,.0f}   ({at})")
        print(f"    records     {f['record_bytes_per_lease']:>12,.0f}   (Lease objects and their strings)")
        print(f"    table       {f['table_bytes_per_lease']:>12,.0f}   (dicts, index sets, heap, tasks)")


def _jsonable(value: Any) -> Any:
    """NaN (no samples) becomes null, so the output is strict JSON."""
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=4, help="client processes (default 4)")
    p.add_argument("--inflight", type=int, default=4, help="calls in flight per client process (default 4)")
    p.add_argument("--seconds", type=float, default=10.0, help="measured seconds per rpc (default 10)")
    p.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds before each run (default 2)")
    p.add_argument("--leases", type=int, default=1_000_000, help="lease table size for part 2 (default 1000000)")
    p.add_argument(
        "--memory-leases",
        type=int,
        default=200_000,
        help="table size for the tracemalloc run (default 200000; = --leases for the full figure; 0 skips)",
    )
    p.add_argument(
        "--watchers", type=int, default=100, help="revocation streams in the watch run (default 100; 0 skips)"
    )
    p.add_argument("--revocation-rate", type=float, default=10.0, help="revocations per second in it (default 10)")
    p.add_argument("--skip-modes", action="store_true", help="only Exchange and Check (no bearer, Introspect, watch)")
    p.add_argument("--skip-broker", action="store_true", help="only part 2")
    p.add_argument("--skip-leases", action="store_true", help="only part 1")
    p.add_argument("--json", action="store_true", help="also print every figure as one JSON object at the end")
    return p


def main() -> int:
    if "--store" in sys.argv[1:]:
        # `--store postgres --replicas N`: the replicas benchmark, in its own script.
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import bench_replicas

        return bench_replicas.main(sys.argv[1:])
    args = _parser().parse_args()
    if min(args.clients, args.inflight) < 1 or args.seconds <= 0 or args.warmup < 0 or args.leases < 1:
        _parser().error("--clients, --inflight, --seconds and --leases must be positive, --warmup not negative")
    started = time.monotonic()
    figures: dict[str, Any] = {"nproc": os.cpu_count(), "clients": args.clients, "inflight": args.inflight}
    figures |= {"seconds": args.seconds, "warmup": args.warmup}
    try:
        if not args.skip_broker:
            figures["broker"] = run_broker_part(args)
            print_broker_part(figures["broker"], args)
        if not args.skip_leases:
            figures["lease_table"] = run_lease_part(args)
            print_lease_part(figures["lease_table"])
    except BenchError as e:
        print(f"bench_exchange: {e}", file=sys.stderr)
        return 1
    figures["total_s"] = time.monotonic() - started
    print(f"total {figures['total_s']:.1f} s")
    if args.json:
        print(json.dumps(_jsonable(figures), indent=2, sort_keys=True, allow_nan=False))
    return 0 if figures.get("broker", {}).get("broker_exit_code", 0) == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
