"""`brokerctl` as a process against a live broker: output, exit codes, settings, errors."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from broker._proto import broker_pb2 as pb
from tests.support.harness import OPERATOR_ID, PLANNER, WORKER, Harness, Material

ROOT = Path(__file__).resolve().parents[2]
REPO_AUDIENCE = "spiffe://example.org/service/repo"
REPO = "repo:org/app"
RUN_TIMEOUT = 30
RPC_TIMEOUT = 5


@dataclass(frozen=True, slots=True)
class Files:
    cert: Path
    key: Path
    ca: Path


@dataclass(frozen=True, slots=True)
class Ctl:
    """brokerctl pointed at one broker with one identity."""

    addr: str
    files: Files

    def flags(self) -> list[str]:
        return ["--addr", self.addr, "--cert", str(self.files.cert), "--key", str(self.files.key),
                "--ca", str(self.files.ca)]

    def env(self) -> dict[str, str]:
        return {"BROKERCTL_ADDR": self.addr, "BROKERCTL_CERT": str(self.files.cert),
                "BROKERCTL_KEY": str(self.files.key), "BROKERCTL_CA": str(self.files.ca)}

    def __call__(self, *args: str) -> subprocess.CompletedProcess[str]:
        return brokerctl(*self.flags(), *args)

    def json(self, *args: str) -> dict:
        result = self("--json", *args)
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)


def brokerctl(*args: str, env: dict[str, str] | None = None, argv0: list[str] | None = None
              ) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("BROKERCTL_")}
    command = argv0 if argv0 is not None else [sys.executable, "-m", "broker.cli.brokerctl"]
    return subprocess.run([*command, *args], cwd=ROOT, env={**clean, **(env or {})},
                          capture_output=True, text=True, timeout=RUN_TIMEOUT)


def write_files(material: Material, folder: Path, spiffe_id: str, name: str) -> Files:
    cert, key = material.svid(spiffe_id).write(folder, name)
    ca = folder / "roots.pem"
    ca.write_bytes(material.roots_pem)
    return Files(cert=cert, key=key, ca=ca)


@pytest.fixture
def unreachable() -> Iterator[str]:
    """An address nothing answers on, for as long as the test runs: bound, never listening.

    The port stays ours (no other process can take it and answer), and a connection to a bound
    socket that does not listen is refused at once: a deterministic "cannot reach".
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield f"127.0.0.1:{s.getsockname()[1]}"


def grant(harness: Harness, task_id: str, agent: str = PLANNER) -> str:
    """A fresh lease; the fake clock ticks first so listing order (issued_at, id) is grant order."""
    harness.clock.advance(0.01)
    request = pb.ExchangeRequest(task_id=task_id, audience=REPO_AUDIENCE, actions=["repo:read"], resource=REPO)
    resp = harness.agent(agent).Exchange(request, timeout=RPC_TIMEOUT)
    assert resp.state == "ISSUED"
    return resp.lease_id


def ask_approval(harness: Harness) -> str:
    request = pb.ExchangeRequest(task_id="deploy-1", audience="spiffe://example.org/service/deployer",
                                 actions=["deploy:prod"], resource="service:app")
    resp = harness.agent(PLANNER).Exchange(request, timeout=RPC_TIMEOUT)
    assert resp.state == "PENDING_APPROVAL" and resp.approval_id
    return resp.approval_id


def lease_state(ctl: Ctl, lease_id: str) -> str:
    return ctl.json("leases", "show", lease_id)["state"]


def refused(result: subprocess.CompletedProcess[str], code: str) -> bool:
    """Exit 1 and one stderr line `brokerctl: <code>: ...`, nothing on stdout."""
    lines = result.stderr.strip().splitlines()
    return (result.returncode == 1 and result.stdout == "" and len(lines) == 1
            and lines[0].startswith(f"brokerctl: {code}: "))


@pytest.fixture
def files(material: Material, tmp_path: Path) -> Files:
    return write_files(material, tmp_path, OPERATOR_ID, "operator")


@pytest.fixture
def ctl(harness: Harness, files: Files) -> Ctl:
    return Ctl(addr=f"127.0.0.1:{harness.broker.mtls_port}", files=files)


# ---- leases ----


def test_leases_list_prints_a_table_row_with_time_left(harness: Harness, ctl: Ctl) -> None:
    lease_id = grant(harness, "task-a")
    result = ctl("leases", "list")
    assert result.returncode == 0, result.stderr
    header, row = result.stdout.strip().splitlines()
    assert header.split() == ["ID", "SUBJECT", "TASK", "AUDIENCE", "SCOPE", "STATE", "LEFT"]
    assert row.split()[:6] == [lease_id, PLANNER, "task-a", REPO_AUDIENCE, "repo:read", "ACTIVE"]
    assert re.fullmatch(r"[45]m\d\ds", row.split()[6])  # default ttl 5m, by the local clock


def test_leases_list_json_lists_the_leases(harness: Harness, ctl: Ctl) -> None:
    first, second = grant(harness, "task-a"), grant(harness, "task-b", WORKER)
    out = ctl.json("leases", "list")
    assert [lease["id"] for lease in out["leases"]] == [first, second]
    assert out["leases"][0]["subject"] == PLANNER and out["leases"][0]["scope"] == ["repo:read"]


def test_leases_list_filters_by_task(harness: Harness, ctl: Ctl) -> None:
    wanted = grant(harness, "task-a")
    grant(harness, "task-b")
    out = ctl.json("leases", "list", "--task", "task-a")
    assert [lease["id"] for lease in out["leases"]] == [wanted]


def test_leases_list_follows_every_page_and_stops_at_the_limit(harness: Harness, ctl: Ctl) -> None:
    ids = [grant(harness, "task-many") for _ in range(105)]  # more than one page of 100
    assert [lease["id"] for lease in ctl.json("leases", "list")["leases"]] == ids
    assert [lease["id"] for lease in ctl.json("leases", "list", "--limit", "102")["leases"]] == ids[:102]


def test_leases_list_all_includes_revoked_leases(harness: Harness, ctl: Ctl) -> None:
    lease_id = grant(harness, "task-a")
    assert ctl("revoke", "--lease", lease_id).returncode == 0
    assert ctl.json("leases", "list")["leases"] == []
    assert [lease["state"] for lease in ctl.json("leases", "list", "--all")["leases"]] == ["REVOKED"]
    row = ctl("leases", "list", "--all").stdout.strip().splitlines()[1]
    assert row.split()[-2:] == ["REVOKED", "-"]


def test_leases_show_prints_key_value_lines(harness: Harness, ctl: Ctl) -> None:
    lease_id = grant(harness, "task-a")
    result = ctl("leases", "show", lease_id)
    assert result.returncode == 0, result.stderr
    fields = dict(re.split(r":\s+", line, maxsplit=1) for line in result.stdout.strip().splitlines())
    assert fields["id"] == lease_id and fields["subject"] == PLANNER and fields["task"] == "task-a"
    assert fields["state"] == "ACTIVE" and fields["resource"] == REPO and fields["scope"] == "repo:read"


def test_leases_show_unknown_lease_is_not_found(ctl: Ctl) -> None:
    assert refused(ctl("leases", "show", "lse_nope"), "not_found")


# ---- revoke ----


@dataclass(frozen=True, slots=True)
class RevokeCase:
    id: str
    selector: Callable[[str], list[str]]  # from the PLANNER lease id
    count: int
    other_survives: bool  # WORKER's lease on another task


REVOKE_CASES = [
    RevokeCase("lease", lambda lease_id: ["--lease", lease_id], 1, True),
    RevokeCase("task", lambda _: ["--task", "task-a"], 1, True),
    RevokeCase("subject", lambda _: ["--subject", PLANNER], 1, True),
    RevokeCase("all", lambda _: ["--all"], 2, False),
    RevokeCase("all-yes", lambda _: ["--all", "--yes"], 2, False),
]


@pytest.mark.parametrize("case", REVOKE_CASES, ids=lambda c: c.id)
def test_revoke_by_selector_prints_the_count_and_revokes(harness: Harness, ctl: Ctl, case: RevokeCase) -> None:
    lease_id, other = grant(harness, "task-a"), grant(harness, "task-b", WORKER)
    result = ctl("revoke", *case.selector(lease_id), "--reason", "incident 42")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"revoked {case.count} lease{'s' if case.count > 1 else ''}"
    shown = ctl.json("leases", "show", lease_id)
    assert (shown["state"], shown["reason"]) == ("REVOKED", "OPERATOR")
    assert lease_state(ctl, other) == ("ACTIVE" if case.other_survives else "REVOKED")


def test_revoke_json_reports_the_count(harness: Harness, ctl: Ctl) -> None:
    grant(harness, "task-a")
    assert ctl.json("revoke", "--task", "task-a") == {"revoked_count": 1}
    assert ctl.json("revoke", "--task", "task-a") == {"revoked_count": 0}


# ---- policy ----


@dataclass(frozen=True, slots=True)
class CheckCase:
    id: str
    args: tuple[str, ...]
    decision: str
    policies: str


CHECK_CASES = [
    CheckCase("allow", ("--action", "repo:read", "--resource", REPO), "ALLOW", "agents-use-repo"),
    CheckCase("deny", ("--action", "repo:merge", "--resource", REPO), "DENY", "-"),
    CheckCase("context-allows", ("--action", "db:migrate", "--resource", "db:prod", "--context", "ticket=CHG-1"),
              "ALLOW", "migrate-needs-ticket"),
    CheckCase("no-context-denies", ("--action", "db:migrate", "--resource", "db:prod"), "DENY", "-"),
]


@pytest.mark.parametrize("case", CHECK_CASES, ids=lambda c: c.id)
def test_policy_check_prints_the_decision(ctl: Ctl, case: CheckCase) -> None:
    result = ctl("policy", "check", "--principal", PLANNER, *case.args)
    assert result.returncode == 0, result.stderr
    fields = dict(re.split(r":\s+", line, maxsplit=1) for line in result.stdout.strip().splitlines())
    assert (fields["decision"], fields["policies"]) == (case.decision, case.policies)


def test_policy_check_json_has_the_obligations(ctl: Ctl) -> None:
    out = ctl.json("policy", "check", "--principal", PLANNER, "--action", "deploy:prod", "--resource", "service:app")
    assert out["decision"] == "ALLOW" and out["approval_required"] is True
    assert out["policies"] == ["deploy-needs-approval"] and out["max_ttl_seconds"] == 600


def test_policy_reload_prints_the_version(ctl: Ctl) -> None:
    result = ctl("policy", "reload")
    assert result.returncode == 0, result.stderr
    assert re.fullmatch(r"policy reloaded: version \S+", result.stdout.strip())
    assert ctl.json("policy", "reload")["policy_version"] == result.stdout.split()[-1]


# ---- approvals ----


def test_approvals_list_without_pending_ones_succeeds(ctl: Ctl) -> None:
    result = ctl("approvals", "list")
    assert (result.returncode, result.stdout.strip()) == (0, "no approvals")
    assert ctl.json("approvals", "list") == {"approvals": []}


def test_approvals_list_shows_a_pending_exchange_and_approve_decides_it(harness: Harness, ctl: Ctl) -> None:
    approval_id = ask_approval(harness)
    assert approval_id in ctl("approvals", "list").stdout
    approved = ctl.json("approvals", "approve", approval_id, "--note", "change 7 ok")
    assert (approved["state"], approved["note"], approved["decided_by"]) == ("APPROVED", "change 7 ok", OPERATOR_ID)
    assert ctl.json("approvals", "list")["approvals"] == []
    assert [a["state"] for a in ctl.json("approvals", "list", "--all")["approvals"]] == ["APPROVED"]


def test_approvals_deny_decides_a_pending_exchange(harness: Harness, ctl: Ctl) -> None:
    approval_id = ask_approval(harness)
    result = ctl("approvals", "deny", approval_id, "--note", "not today")
    assert result.returncode == 0, result.stderr
    assert re.search(r"^state:\s+DENIED$", result.stdout, re.MULTILINE)


def test_approve_unknown_id_is_not_found(ctl: Ctl) -> None:
    assert refused(ctl("approvals", "approve", "apr_unknown"), "not_found")


# ---- errors and settings ----


def test_non_admin_caller_is_permission_denied(harness: Harness, material: Material, tmp_path: Path) -> None:
    planner = Ctl(addr=f"127.0.0.1:{harness.broker.mtls_port}",
                  files=write_files(material, tmp_path, PLANNER, "planner"))
    assert refused(planner("leases", "list"), "permission_denied")


def test_unreachable_broker_exits_1_with_a_hint(files: Files, unreachable: str) -> None:
    addr = unreachable
    result = Ctl(addr=addr, files=files)("--timeout", "5", "leases", "list")
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.startswith(f"brokerctl: cannot reach the broker at {addr}: ")
    assert "--addr" in result.stderr and len(result.stderr.strip().splitlines()) == 1


@dataclass(frozen=True, slots=True)
class UsageCase:
    id: str
    args: Callable[[Files], list[str]]
    says: str


USAGE_CASES = [
    UsageCase("no-command", lambda f: [], "required: COMMAND"),
    UsageCase("two-selectors", lambda f: ["revoke", "--lease", "l1", "--task", "t1"], "not allowed with argument"),
    UsageCase("no-selector", lambda f: ["revoke"], "one of the arguments"),
    UsageCase("missing-cert-file", lambda f: ["--cert", str(f.cert.with_name("absent.pem")), "leases", "list"],
              "absent.pem"),
    UsageCase("key-file-is-a-certificate", lambda f: ["--key", str(f.cert), "leases", "list"], "no PEM private key"),
    UsageCase("bad-context", lambda f: ["policy", "check", "--principal", PLANNER, "--action", "a",
                                        "--resource", "r", "--context", "ticket"], "KEY=VALUE"),
    UsageCase("bad-limit", lambda f: ["leases", "list", "--limit", "0"], "at least 1"),
]


@pytest.mark.parametrize("case", USAGE_CASES, ids=lambda c: c.id)
def test_usage_error_exits_2(files: Files, case: UsageCase, unreachable: str) -> None:
    # nothing answers: a command that got past the usage checks would exit 1, not 2
    result = brokerctl(*case.args(files), env=Ctl(addr=unreachable, files=files).env())
    assert (result.returncode, result.stdout) == (2, "")
    assert case.says in result.stderr and "Traceback" not in result.stderr


def test_settings_come_from_the_environment(harness: Harness, ctl: Ctl) -> None:
    lease_id = grant(harness, "task-a")
    result = brokerctl("leases", "list", env=ctl.env())
    assert result.returncode == 0, result.stderr
    assert lease_id in result.stdout


def test_flags_win_over_the_environment(harness: Harness, ctl: Ctl, unreachable: str) -> None:
    lease_id = grant(harness, "task-a")
    env = {**ctl.env(), "BROKERCTL_ADDR": unreachable}
    result = brokerctl("--addr", ctl.addr, "leases", "list", env=env)
    assert result.returncode == 0, result.stderr
    assert lease_id in result.stdout


def test_global_options_may_follow_the_command(harness: Harness, ctl: Ctl) -> None:
    lease_id = grant(harness, "task-a")
    result = brokerctl("leases", "show", lease_id, "--json", *ctl.flags())
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["id"] == lease_id


def test_scripts_brokerctl_runs_from_a_checkout(harness: Harness, ctl: Ctl) -> None:
    lease_id = grant(harness, "task-a")
    result = brokerctl("leases", "list", env=ctl.env(), argv0=[str(ROOT / "scripts" / "brokerctl")])
    assert result.returncode == 0, result.stderr
    assert lease_id in result.stdout
