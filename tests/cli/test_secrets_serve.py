"""`broker serve` with a PostgreSQL backend, as real processes: a crash leaves no access behind, and a
replica's crash takes away none that its leases still grant."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from broker._proto import broker_pb2_grpc as pb_grpc
from broker.testing.postgres import PostgresServer
from tests.support.harness import PLANNER, Material, channel_options, postgres_store, write_config
from tests.support.secrets import (
    SECRET_POLICY,
    Analytics,
    db_request,
    login,
    login_refused,
    make_analytics,
    wait_until,
)

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def db(postgres: PostgresServer, pg_dsn: str) -> Analytics:
    return make_analytics(postgres, pg_dsn)


def _config(material: Material, folder: Path, db: Analytics, dsn_file: Path, store: str = "") -> Path:
    config = write_config(material, folder, extra=db.backend_toml(dsn_file) + store)
    with (folder / "policy.cedar").open("a") as f:
        f.write(SECRET_POLICY)
    return config


class Serve:
    """One `broker serve --config` process."""

    def __init__(self, config: Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "broker", "serve", "--config", str(config)],
            cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, text=True,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip
        self.ports = self._ready()

    def _ready(self, timeout: float = 30.0) -> dict[str, int]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if line.startswith("broker ready: "):
                return json.loads(line.removeprefix("broker ready: "))
            if not line and self.proc.poll() is not None:
                raise AssertionError(f"broker exited {self.proc.returncode}: {self.proc.stderr.read()}")
        raise AssertionError("broker did not become ready")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


@pytest.fixture
def serve() -> Iterator[list[Serve]]:
    started: list[Serve] = []
    yield started
    for s in started:
        s.stop()


def _agent(material: Material, port: int) -> tuple[grpc.Channel, pb_grpc.CredentialBrokerStub]:
    svid = material.svid(PLANNER)
    creds = grpc.ssl_channel_credentials(material.roots_pem, svid.key_pem(), svid.chain_pem())
    channel = grpc.secure_channel(f"127.0.0.1:{port}", creds, options=channel_options())
    return channel, pb_grpc.CredentialBrokerStub(channel)


def test_after_a_sigkill_the_restarted_broker_drops_every_role_it_made(
    material: Material, tmp_path: Path, db: Analytics, serve: list[Serve]
) -> None:
    dsn_file = tmp_path / "admin.dsn"
    dsn_file.write_text(db.dsn)
    config = _config(material, tmp_path, db, dsn_file)
    first = Serve(config)
    serve.append(first)
    channel, agent = _agent(material, first.ports["mtls"])
    with channel:
        secrets = [agent.Exchange(db_request(task_id=f"t{i}", ttl_seconds=600), timeout=10).secret for i in range(2)]
    roles = {s.fields["username"] for s in secrets}
    assert roles <= db.roles()
    first.proc.kill()
    first.proc.wait(10)
    assert roles <= db.roles()  # nothing dropped them: the broker had no chance
    second = Serve(config)
    serve.append(second)
    wait_until(lambda: not (roles & db.roles()), what="the restarted broker to drop the orphaned roles")
    assert all(login_refused(s.fields["dsn"]) for s in secrets)
    audit = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    found = {r["role"] for r in audit if r["kind"] == "backend.orphan_found"}
    assert found == roles


def test_an_unreadable_dsn_file_is_a_config_error_naming_the_key(
    material: Material, tmp_path: Path, db: Analytics
) -> None:
    config = _config(material, tmp_path, db, tmp_path / "missing.dsn")
    proc = subprocess.run([sys.executable, "-m", "broker", "serve", "--config", str(config)], cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2
    assert "backends[0].dsn_file" in proc.stderr and "Traceback" not in proc.stderr


def test_a_sigkilled_replica_s_roles_outlive_it_until_their_leases_end_on_another_replica(
    material: Material, tmp_path: Path, db: Analytics, pg_dsn: str, serve: list[Serve]
) -> None:
    dsn_file = tmp_path / "admin.dsn"
    dsn_file.write_text(db.dsn)
    configs = {}
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        configs[name] = _config(material, tmp_path / name, db, dsn_file, store=postgres_store(pg_dsn, name))
    a = Serve(configs["a"])
    serve.append(a)
    channel, agent = _agent(material, a.ports["mtls"])
    with channel:
        kept = agent.Exchange(db_request(task_id="kept", ttl_seconds=600), timeout=10)
        short = agent.Exchange(db_request(task_id="short", ttl_seconds=3), timeout=10)
    a.proc.kill()
    a.proc.wait(10)
    b = Serve(configs["b"])  # its first reconciliation runs at start, with A's roles in the database
    serve.append(b)
    short_role, kept_role = short.secret.fields["username"], kept.secret.fields["username"]
    wait_until(lambda: short_role not in db.roles(), timeout=30, what="the survivor to drop the expired lease's role")
    assert kept_role in db.roles()
    with login(kept.secret) as conn:
        assert conn.execute("SELECT sum(amount) FROM sales").fetchone() == (350,)
    audit = [json.loads(line) for line in (tmp_path / "b" / "audit.jsonl").read_text().splitlines()]
    assert [(r["role"], r["cause"]) for r in audit if r["kind"] == "backend.role_dropped"] == [(short_role, "EXPIRED")]
    assert not [r for r in audit if r["kind"] == "backend.orphan_found"]
