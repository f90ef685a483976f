"""Exchange on the memory store, one PostgreSQL replica and N replicas on one port; revocation A -> B.

Run as `scripts/bench_exchange.py --store postgres --replicas N` (or directly). Starts a
throwaway PostgreSQL and `broker serve` processes on loopback, drives `Exchange` over mTLS from
client threads for a fixed time per setup, and prints throughput, p50/p99 latency, and CPU per
Exchange counting the broker processes and the PostgreSQL server processes both. Then, with
two replicas, measures revocation latency: from `Revoke` returning on replica A to the event
arriving on watchers of replica B. Bounded in time and count; loopback only.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from broker._proto import broker_pb2 as pb  # noqa: E402
from broker._proto import broker_pb2_grpc as pb_grpc  # noqa: E402
from broker.cli.dev import DevPorts, _dev_config, write_dev_setup  # noqa: E402
from broker.testing.postgres import PostgresServer  # noqa: E402

AUDIENCE = "spiffe://example.org/service/repo"
TICKS = os.sysconf("SC_CLK_TCK")


def cpu_of(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        except (OSError, IndexError):
            continue
    return total / TICKS


def postgres_pids(server: PostgresServer | None) -> list[int]:
    if server is None:
        return []
    main = int((server._data / "postmaster.pid").read_text().split()[0])
    children = subprocess.run(["pgrep", "-P", str(main)], capture_output=True, text=True).stdout.split()
    return [main, *map(int, children)]


def start(folder: Path, name: str, port: int, store: str) -> tuple[subprocess.Popen[str], int]:
    text = _dev_config(DevPorts(port, 0, 0)).replace('path = "audit.jsonl"', f'path = "audit-{name}.jsonl"')
    text = text.replace("[server]\n", "[server]\nreuse_port = true\n" if store else "[server]\n", 1)
    text += "\n[limits]\nrate_per_second = 1000000\nrate_burst = 1000000\nmax_streams_per_watcher = 1000\n"
    if store:
        text += f'\n[store]\nbackend = "postgres"\ndsn_file = "store.dsn"\nreplica_id = "{name}"\n'
    config = folder / f"broker-{name}.toml"
    config.write_text(text)
    proc = subprocess.Popen(
        [sys.executable, "-m", "broker", "serve", "--config", str(config), "--log-level", "warning"],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, text=True, stdout=subprocess.PIPE,
        stderr=(folder / f"{name}.log").open("a"),
    )  # fmt: skip
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith("broker ready: "):
            return proc, json.loads(line.removeprefix("broker ready: "))["mtls"]
    raise SystemExit(f"broker {name} did not start: {(folder / f'{name}.log').read_text()[-2000:]}")


def channel(folder: Path, port: int, who: str) -> grpc.Channel:
    creds = grpc.ssl_channel_credentials(
        root_certificates=(folder / "example.org.bundle.pem").read_bytes(),
        private_key=(folder / f"{who}-key.pem").read_bytes(),
        certificate_chain=(folder / f"{who}.pem").read_bytes(),
    )
    options = [("grpc.ssl_target_name_override", "localhost"), ("grpc.use_local_subchannel_pool", 1)]
    return grpc.secure_channel(f"127.0.0.1:{port}", creds, options=options)


def request(i: int) -> pb.ExchangeRequest:
    return pb.ExchangeRequest(task_id=f"bench-{i % 500}", audience=AUDIENCE, actions=["repo:read"],
                              resource="repo:org/app")  # fmt: skip


def drive(folder: Path, port: int, threads: int, seconds: float) -> tuple[list[float], int, float]:
    latencies: list[list[float]] = [[] for _ in range(threads)]
    errors = [0] * threads
    stubs = [pb_grpc.CredentialBrokerStub(channel(folder, port, "planner")) for _ in range(threads)]
    for stub in stubs:
        stub.Exchange(request(0), timeout=10)  # connect and warm up
    end = time.monotonic() + seconds

    def run(k: int) -> None:
        i = k
        while time.monotonic() < end:
            t = time.perf_counter()
            try:
                stubs[k].Exchange(request(i), timeout=10)
                latencies[k].append(time.perf_counter() - t)
            except grpc.RpcError:
                errors[k] += 1
            i += threads

    began = time.monotonic()
    workers = [threading.Thread(target=run, args=(k,)) for k in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return sorted(x for lat in latencies for x in lat), sum(errors), time.monotonic() - began


def pct(ordered: list[float], q: float) -> float:
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000 if ordered else float("nan")


def measure(name: str, folder: Path, port: int, pids: list[int], args: argparse.Namespace) -> dict:
    before = cpu_of(pids)
    lat, errors, took = drive(folder, port, args.threads, args.seconds)
    cpu = cpu_of(pids) - before
    calls = len(lat)
    row = {"setup": name, "calls": calls, "errors": errors, "per_s": calls / took, "p50_ms": pct(lat, 0.5),
           "p99_ms": pct(lat, 0.99), "cpu_ms_per_call": cpu / max(calls, 1) * 1000}  # fmt: skip
    print(f"  {name:<28} {row['per_s']:8.0f}/s  p50 {row['p50_ms']:6.2f} ms  p99 {row['p99_ms']:6.2f} ms  "
          f"cpu {row['cpu_ms_per_call']:5.2f} ms/Exchange  errors {errors}", flush=True)  # fmt: skip
    return row


def revocation_latency(folder: Path, port_a: int, port_b: int, count: int, watchers: int) -> dict:
    planner = pb_grpc.CredentialBrokerStub(channel(folder, port_a, "planner"))
    operator = pb_grpc.BrokerAdminStub(channel(folder, port_a, "operator"))
    arrived: dict[str, list[float]] = {}
    lock = threading.Condition()
    calls = []
    for _ in range(watchers):
        call = pb_grpc.CredentialBrokerStub(channel(folder, port_b, "repo")).WatchRevocations(
            pb.WatchRevocationsRequest(), timeout=300
        )
        call.initial_metadata()
        calls.append(call)

        def read(c=call) -> None:
            try:
                for event in c:
                    with lock:
                        arrived.setdefault(event.lease_id, []).append(time.perf_counter())
                        lock.notify_all()
            except grpc.RpcError:
                pass

        threading.Thread(target=read, daemon=True).start()
    latencies = []
    for i in range(count):
        lease_id = planner.Exchange(request(10_000 + i), timeout=10).lease_id
        operator.Revoke(pb.RevokeRequest(lease_id=lease_id), timeout=10)
        returned = time.perf_counter()
        with lock:
            lock.wait_for(lambda lid=lease_id: len(arrived.get(lid, ())) >= watchers, timeout=10)
            latencies += [t - returned for t in arrived.get(lease_id, ())]
    for call in calls:
        call.cancel()
    latencies.sort()
    row = {"revocations": count, "watchers": watchers, "p50_ms": pct(latencies, 0.5), "p99_ms": pct(latencies, 0.99)}
    print(f"  revoke on A -> {watchers} watchers on B: p50 {row['p50_ms']:.2f} ms  p99 {row['p99_ms']:.2f} ms "
          f"({count} revocations)", flush=True)  # fmt: skip
    return row


def reserve_port() -> socket.socket:
    """A bound, not listening, SO_REUSEPORT socket: holds a port the replicas then share."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


def stop(procs: list[subprocess.Popen[str]]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--store", default="postgres", choices=["postgres"])
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--threads", type=int, default=8, help="client threads, one channel each (default 8)")
    p.add_argument("--seconds", type=float, default=8.0, help="measured seconds per setup (default 8)")
    p.add_argument("--revocations", type=int, default=200)
    p.add_argument("--watchers", type=int, default=10)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="bench-replicas-") as tmp, PostgresServer() as server:
        folder = Path(tmp)
        write_dev_setup(folder, DevPorts(0, 0, 0))
        print(f"Exchange for {args.seconds:g} s per setup, {args.threads} client threads (cpu: broker + postgres)")
        proc, port = start(folder, "memory", 0, "")
        try:
            rows.append(measure("memory store, 1 broker", folder, port, [proc.pid], args))
        finally:
            stop([proc])
        for n in (1, args.replicas):
            (folder / "store.dsn").write_text(server.create_database(f"bench_{n}") + "\n")
            holder = reserve_port()
            shared = holder.getsockname()[1]
            procs = []
            try:
                for i in range(n):
                    procs.append(start(folder, f"r{n}{i}", shared, "postgres")[0])
                holder.close()
                pids = [pr.pid for pr in procs] + postgres_pids(server)
                rows.append(measure(f"postgres, {n} replica(s), 1 port", folder, shared, pids, args))
                if n >= 2 and n == args.replicas:
                    a = start(folder, "ra", 0, "postgres")
                    b = start(folder, "rb", 0, "postgres")
                    procs += [a[0], b[0]]
                    rows.append(revocation_latency(folder, a[1], b[1], args.revocations, args.watchers))
            finally:
                holder.close()
                stop(procs)
    floor = rows[0]
    for row in rows[1:]:
        if "per_s" in row:
            print(f"  {row['setup']}: {row['per_s'] / floor['per_s']:.2f}x the memory store's throughput, "
                  f"{row['cpu_ms_per_call'] / floor['cpu_ms_per_call']:.2f}x its CPU per Exchange")  # fmt: skip
    if args.json:
        print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
