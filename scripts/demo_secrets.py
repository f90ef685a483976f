#!/usr/bin/env python3
"""The dynamic-secrets step of the demo: a real PostgreSQL login that lives and dies with the lease.

Starts a throwaway PostgreSQL and a broker with a `[[backends]]` entry for it, then: the planner
gets a database login for its task, reads a table, is refused a write, and after CompleteTask its
open session is cut off. Where no PostgreSQL can be found, it says so in one line and exits 0.
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import psycopg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from broker._proto import broker_pb2 as pb  # noqa: E402
from broker._proto import broker_pb2_grpc as pb_grpc  # noqa: E402
from broker.cli.dev import DevPorts, write_dev_setup  # noqa: E402
from broker.testing.postgres import PostgresServer, PostgresUnavailable  # noqa: E402

TASK = "report-7"
AUDIENCE = "postgres://analytics"
POLICY = """
// The demo's dynamic secret: agents may read the analytics database, nothing more.
@id("agents-read-analytics")
@max_ttl("900")
permit (principal in Team::"agents", action == Action::"db:read", resource == Resource::"db:analytics");
"""


def step(text: str) -> None:
    print(f"\n\033[1m== {text}\033[0m", flush=True)


def say(text: str) -> None:
    print(f"   {text}", flush=True)


def prepare_database(pg: PostgresServer) -> str:
    dsn = pg.create_database("analytics")
    with psycopg.connect(dsn, autocommit=True) as conn:
        for statement in (
            "CREATE ROLE analytics_reader NOLOGIN",
            "CREATE TABLE sales (region text, amount int)",
            "INSERT INTO sales VALUES ('north', 120), ('south', 80), ('west', 200)",
            "GRANT SELECT ON sales TO analytics_reader",
        ):
            conn.execute(statement)
    return dsn


def write_setup(folder: Path, admin_dsn: str) -> Path:
    config = write_dev_setup(folder, DevPorts(0, 0, 0))
    (folder / "analytics-admin.dsn").write_text(admin_dsn + "\n")
    (folder / "analytics-admin.dsn").chmod(0o600)
    with config.open("a") as f:
        f.write('\n[[backends]]\nname = "analytics"\nkind = "postgres"\naudience = "postgres://analytics"\n'
                'dsn_file = "analytics-admin.dsn"\ngrants = { "db:read" = ["analytics_reader"] }\n')
    with (folder / "policy.cedar").open("a") as f:
        f.write(POLICY)
    return config


def start_broker(config: Path) -> tuple[subprocess.Popen[str], dict[str, int]]:
    log = (config.parent / "broker.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "broker", "serve", "--config", str(config)], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=log)
    for line in proc.stdout:
        if line.startswith("broker ready: "):
            return proc, json.loads(line.removeprefix("broker ready: "))
    raise SystemExit(f"the broker did not start: see {config.parent / 'broker.log'}")


def channel(folder: Path, name: str, port: int) -> grpc.Channel:
    creds = grpc.ssl_channel_credentials(
        root_certificates=(folder / "example.org.bundle.pem").read_bytes(),
        private_key=(folder / f"{name}-key.pem").read_bytes(),
        certificate_chain=(folder / f"{name}.pem").read_bytes(),
    )
    return grpc.secure_channel(f"127.0.0.1:{port}", creds, options=[("grpc.ssl_target_name_override", "localhost")])


def story(folder: Path, port: int) -> None:
    agent = pb_grpc.CredentialBrokerStub(channel(folder, "planner", port))
    operator = pb_grpc.BrokerAdminStub(channel(folder, "operator", port))

    step("dynamic secrets: the planner gets a database login for its task")
    resp = agent.Exchange(pb.ExchangeRequest(task_id=TASK, audience=AUDIENCE, actions=["db:read"],
                                             resource="db:analytics", ttl_seconds=600), timeout=15)
    secret = resp.secret
    fields = dict(secret.fields)
    say(f"lease {resp.lease_id}, backend {secret.backend}, login role {fields['username']}")
    say(f"host {fields['host']}:{fields['port']} dbname {fields['dbname']}; "
        f"password: {len(fields['password'])} characters, returned this once and never logged")
    lease = operator.GetLease(pb.GetLeaseRequest(lease_id=resp.lease_id), timeout=5)
    say(f"brokerctl leases show: backend={lease.backend} role={lease.role} revocation={lease.revocation.state}")

    step("it reads the table its group role may read")
    session = psycopg.connect(fields["dsn"], autocommit=True)
    total = session.execute("SELECT sum(amount) FROM sales").fetchone()[0]
    say(f"SELECT sum(amount) FROM sales -> {total}")

    step("and is refused a write, by PostgreSQL itself")
    try:
        session.execute("INSERT INTO sales VALUES ('east', 1)")
        raise SystemExit("the write went through: the demo's grants are wrong")
    except psycopg.errors.InsufficientPrivilege as e:
        say(f"INSERT -> refused: {e.diag.message_primary}")

    step("the planner completes the task: the role is disabled, its session ended, the role dropped")
    done = agent.CompleteTask(pb.CompleteTaskRequest(task_id=TASK), timeout=5)
    say(f"CompleteTask revoked {done.revoked_count} lease")
    deadline = time.monotonic() + 20
    while operator.GetLease(pb.GetLeaseRequest(lease_id=resp.lease_id), timeout=5).revocation.state != "DONE":
        if time.monotonic() > deadline:
            raise SystemExit("the role was not dropped in time")
        time.sleep(0.1)
    try:
        session.execute("SELECT 1")
        raise SystemExit("the open session survived the lease")
    except psycopg.OperationalError as e:
        say(f"the open session's next query -> {str(e).splitlines()[0]}")
    try:
        psycopg.connect(fields["dsn"], connect_timeout=5).close()
        raise SystemExit("a new login with the old password worked")
    except psycopg.OperationalError:
        say("a new login with the same credential -> refused")

    audit = (folder / "audit.jsonl").read_text()
    assert fields["password"] not in audit, "the password is in the audit trail"
    dropped = [json.loads(line) for line in audit.splitlines() if '"backend.role_dropped"' in line]
    say(f"audit: {len(dropped)} backend.role_dropped record(s) naming role {dropped[0]['role']}; no password in it")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dir", type=Path, required=True, help="folder for this step's material")
    args = parser.parse_args()
    try:
        pg = PostgresServer().start()
    except PostgresUnavailable as e:
        print(f"\n== dynamic secrets: skipped, no PostgreSQL on this machine ({e})")
        return 0
    folder = args.dir / "secrets"
    try:
        proc, ports = start_broker(write_setup(folder, prepare_database(pg)))
        try:
            story(folder, ports["mtls"])
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(15)
    finally:
        pg.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
