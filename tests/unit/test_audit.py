"""The audit trail: JSON lines, time format, refused fields, file handling, lease events."""

from __future__ import annotations

import io
import json
import logging
import re
import stat
import sys
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from broker.jose.jws import token_hash
from broker.jose.keys import SigningKey
from broker.leases.events import LeaseState
from broker.leases.table import (
    Event,
    Lease,
    LeaseEnded,
    LeaseGranted,
    LeaseRenewed,
    LeaseTable,
    Reason,
    Task,
    TaskClosed,
    TaskOpened,
    TaskState,
)
from broker.ops.audit import AuditLog
from broker.testing.clock import FakeClock
from broker.tokens.minter import TokenMinter

T0 = 1_767_323_045.5  # 2026-01-02T03:04:05.500Z
TS = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")
# three long base64url segments: what a compact JWS/JWT looks like, whatever its header
JWT_LIKE = re.compile(r"[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]{10,}")


class FailingSink(io.StringIO):
    """A sink whose writes fail like a full disk until `heal()`."""

    def __init__(self) -> None:
        super().__init__()
        self.broken = True

    def write(self, s: str) -> int:
        if self.broken:
            raise OSError(28, "No space left on device")
        return super().write(s)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(start=T0)


@pytest.fixture
def sink() -> io.StringIO:
    return io.StringIO()


@pytest.fixture
def audit(sink: io.StringIO, clock: FakeClock) -> AuditLog:
    return AuditLog(sink, clock=clock)


def lines(sink: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in sink.getvalue().splitlines()]


def lease(**overrides: Any) -> Lease:
    base: dict[str, Any] = {
        "id": "lease-1",
        "task_id": "task-1",
        "subject": "spiffe://example.org/agent/7",
        "client_id": "spiffe://example.org/agent/7",
        "audience": "https://api.example",
        "scope": ("repo:read", "repo:merge"),
        "resource": "repo:org/app",
        "issued_at": T0,
        "expires_at": T0 + 300,
        "token_exp": T0 + 300,
    }
    base.update(overrides)
    return Lease(**base)


def task(**overrides: Any) -> Task:
    base: dict[str, Any] = {
        "id": "task-1",
        "owner": "spiffe://example.org/agent/7",
        "created_at": T0,
        "deadline": T0 + 3600,
    }
    base.update(overrides)
    return Task(**base)


# --- records ---------------------------------------------------------------------------------


def test_each_record_is_one_json_line(audit: AuditLog, sink: io.StringIO) -> None:
    audit.record("decision", principal="spiffe://example.org/agent/7", decision="allow")
    audit.record("decision", principal="spiffe://example.org/agent/8", reason="line one\nline two")
    assert sink.getvalue().count("\n") == 2
    assert [r["principal"] for r in lines(sink)] == ["spiffe://example.org/agent/7", "spiffe://example.org/agent/8"]


def test_record_starts_with_ts_and_kind(audit: AuditLog, sink: io.StringIO) -> None:
    audit.record("policy.reloaded", policy_version="abc123")
    assert lines(sink) == [{"ts": "2026-01-02T03:04:05.500Z", "kind": "policy.reloaded", "policy_version": "abc123"}]


def test_ts_is_rfc3339_utc_with_milliseconds_from_the_clock(
    audit: AuditLog, sink: io.StringIO, clock: FakeClock
) -> None:
    clock.advance(0.25)
    audit.record("x")
    ts = lines(sink)[0]["ts"]
    assert TS.fullmatch(ts)
    assert ts == "2026-01-02T03:04:05.750Z"


def test_none_values_are_dropped(audit: AuditLog, sink: io.StringIO) -> None:
    audit.record("approval.approved", approval_id="ap-1", note=None, renewal=False)
    assert lines(sink)[0] == {
        "ts": "2026-01-02T03:04:05.500Z",
        "kind": "approval.approved",
        "approval_id": "ap-1",
        "renewal": False,
    }


def test_fields_named_at_are_written_as_rfc3339(audit: AuditLog, sink: io.StringIO) -> None:
    audit.record("token.issued", expires_at=T0 + 60, ttl_seconds=60)
    record = lines(sink)[0]
    assert (record["expires_at"], record["ttl_seconds"]) == ("2026-01-02T03:05:05.500Z", 60)


@pytest.mark.parametrize(
    "name",
    [
        "token",
        "access_token",
        "subject_token",
        "key",
        "private_key",
        "Token",
        "actor_token",
        "signing_key",
        "client_secret",
        "password",
    ],
)
def test_fields_that_could_carry_a_secret_are_refused(name: str, audit: AuditLog, sink: io.StringIO) -> None:
    with pytest.raises(ValueError, match="could carry a secret"):
        audit.record("token.issued", lease_id="lease-1", **{name: "x"})
    assert sink.getvalue() == ""


@pytest.mark.parametrize("name", ["ts", "kind"])
def test_reserved_field_names_are_refused(name: str, audit: AuditLog) -> None:
    with pytest.raises(ValueError, match="reserved"):
        audit.record("decision", **{name: "x"})


def test_hash_and_key_id_fields_are_allowed(audit: AuditLog, sink: io.StringIO) -> None:
    audit.record("signing_key.rotated", kid="abc", token_sha256="sha256:00", token_exp=1)
    assert lines(sink)[0]["kid"] == "abc"


def test_a_jwt_inside_a_value_is_replaced_by_its_hash(audit: AuditLog, sink: io.StringIO) -> None:
    token = TokenMinter("iss", SigningKey.generate()).mint({"sub": "s"})
    audit.record("operator.revoke", note=f"leaked {token} here", context={"ticket": [token]})
    written = sink.getvalue()
    assert token not in written
    record = lines(sink)[0]
    assert record["note"] == f"leaked {token_hash(token)} here"
    assert record["context"] == {"ticket": [token_hash(token)]}


def test_a_pem_private_key_in_a_value_is_redacted(audit: AuditLog, sink: io.StringIO) -> None:
    key_pem = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    audit.record("policy.reload_failed", reason=key_pem.decode())
    assert lines(sink)[0]["reason"] == "[redacted]"


def test_ordinary_dotted_values_are_kept(audit: AuditLog, sink: io.StringIO) -> None:
    audit.record("decision", audience="eyeglasses.example.com", resource="api.v1.example")
    assert (lines(sink)[0]["audience"], lines(sink)[0]["resource"]) == ("eyeglasses.example.com", "api.v1.example")


def test_a_secret_looking_key_inside_a_map_is_redacted(audit: AuditLog, sink: io.StringIO) -> None:
    audit.record("decision", context={"ticket": "T-1", "api_key": "hunter2"})
    assert lines(sink)[0]["context"] == {"ticket": "T-1", "api_key": "[redacted]"}


def test_other_objects_are_written_as_scrubbed_text(audit: AuditLog, sink: io.StringIO) -> None:
    token = TokenMinter("iss", SigningKey.generate()).mint({"sub": "s"})
    audit.record("decision", path=Path("/etc/broker"), holder=RuntimeError(f"bad {token}"))
    record = lines(sink)[0]
    assert (record["path"], record["holder"]) == ("/etc/broker", f"bad {token_hash(token)}")


def test_non_finite_numbers_are_written_as_text(audit: AuditLog, sink: io.StringIO) -> None:
    audit.record("decision", ratio=float("nan"), expires_at=float("inf"))
    record = lines(sink)[0]
    assert (record["ratio"], record["expires_at"]) == ("nan", "inf")


def test_an_int_beyond_64_bits_is_written_as_the_number(audit: AuditLog, sink: io.StringIO) -> None:
    audit.record("decision", count=2**70)
    assert lines(sink)[0]["count"] == 2**70


def test_a_lone_surrogate_is_written_escaped(audit: AuditLog, sink: io.StringIO) -> None:
    audit.record("decision", reason="bad \ud800 text")
    assert "\\ud800" in sink.getvalue()
    assert lines(sink)[0]["reason"] == "bad \ud800 text"


def test_non_ascii_text_is_kept(audit: AuditLog, sink: io.StringIO) -> None:
    audit.record("decision", reason="r\u00e9sum\u00e9 \u2603")
    assert lines(sink)[0]["reason"] == "r\u00e9sum\u00e9 \u2603"


def test_token_hash_is_sha256_prefix_of_32_hex() -> None:
    assert re.fullmatch(r"sha256:[0-9a-f]{32}", token_hash("a.b.c"))


def test_token_hash_differs_per_token_and_is_stable() -> None:
    minter = TokenMinter("iss", SigningKey.generate())
    first, second = minter.mint({"jti": "1"}), minter.mint({"jti": "2"})
    assert token_hash(first) != token_hash(second)
    assert token_hash(first) == token_hash(first)


# --- sinks -------------------------------------------------------------------------------------


def test_open_creates_the_file_with_mode_0600(tmp_path: Path, clock: FakeClock) -> None:
    path = tmp_path / "audit.log"
    AuditLog.open(str(path), clock=clock).close()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_open_appends_to_an_existing_file(tmp_path: Path, clock: FakeClock) -> None:
    path = tmp_path / "audit.log"
    path.write_text('{"kind":"earlier"}\n')
    log = AuditLog.open(str(path), clock=clock)
    log.record("later")
    log.close()
    assert [json.loads(x)["kind"] for x in path.read_text().splitlines()] == ["earlier", "later"]


def test_each_record_reaches_the_file_before_close(tmp_path: Path, clock: FakeClock) -> None:
    path = tmp_path / "audit.log"
    log = AuditLog.open(str(path), clock=clock)
    log.record("decision", decision="deny")
    assert json.loads(path.read_text())["decision"] == "deny"
    log.close()


@pytest.mark.parametrize("where", ["missing-folder", "a-directory"])
def test_open_of_a_bad_path_raises_oserror(where: str, tmp_path: Path, clock: FakeClock) -> None:
    path = tmp_path / "absent" / "audit.log" if where == "missing-folder" else tmp_path
    with pytest.raises(OSError):
        AuditLog.open(str(path), clock=clock)


def test_dash_writes_to_stdout(clock: FakeClock, capsys: pytest.CaptureFixture[str]) -> None:
    log = AuditLog.open("-", clock=clock)
    log.record("decision", decision="allow")
    log.close()
    assert json.loads(capsys.readouterr().out)["decision"] == "allow"


def test_close_leaves_stdout_open(clock: FakeClock, capsys: pytest.CaptureFixture[str]) -> None:
    AuditLog.open("-", clock=clock).close()
    assert not sys.stdout.closed


def test_a_failing_write_does_not_raise_and_is_logged_once(clock: FakeClock, caplog: pytest.LogCaptureFixture) -> None:
    sink = FailingSink()
    log = AuditLog(sink, clock=clock)
    with caplog.at_level(logging.ERROR, logger="broker.ops.audit"):
        log.record("decision", decision="allow")
        log.record("decision", decision="deny")
    assert [r.getMessage() for r in caplog.records] == ["audit write failed"]
    assert log.failed_writes == 2


def test_writes_resume_after_a_failure(clock: FakeClock) -> None:
    sink = FailingSink()
    log = AuditLog(sink, clock=clock)
    log.record("lost")
    sink.broken = False
    log.record("kept")
    assert [r["kind"] for r in lines(sink)] == ["kept"]


def test_record_after_close_does_not_raise(tmp_path: Path, clock: FakeClock) -> None:
    log = AuditLog.open(str(tmp_path / "audit.log"), clock=clock)
    log.close()
    log.record("late")
    assert log.failed_writes == 1


# --- lease and task events ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class EventCase:
    id: str
    event: Callable[[], Event]
    kind: str
    fields: dict[str, Any]


EVENTS = [
    EventCase(
        "task-opened",
        lambda: TaskOpened(task=task(), at=T0),
        "task.opened",
        {"task_id": "task-1", "owner": "spiffe://example.org/agent/7", "deadline": "2026-01-02T04:04:05.500Z"},
    ),
    EventCase(
        "lease-granted",
        lambda: LeaseGranted(lease=lease(), at=T0),
        "lease.granted",
        {
            "lease_id": "lease-1",
            "task_id": "task-1",
            "subject": "spiffe://example.org/agent/7",
            "client_id": "spiffe://example.org/agent/7",
            "audience": "https://api.example",
            "scope": ["repo:read", "repo:merge"],
            "resource": "repo:org/app",
            "expires_at": "2026-01-02T03:09:05.500Z",
        },
    ),
    EventCase(
        "lease-renewed",
        lambda: LeaseRenewed(lease_id="lease-1", expires_at=T0 + 600, token_exp=T0 + 600, at=T0),
        "lease.renewed",
        {"lease_id": "lease-1", "expires_at": "2026-01-02T03:14:05.500Z"},
    ),
    EventCase(
        "lease-revoked",
        lambda: LeaseEnded(
            lease=lease(
                state=LeaseState.REVOKED, ended_at=T0, reason=Reason.OPERATOR, initiator="spiffe://example.org/ops"
            ),
            at=T0,
        ),
        "lease.revoked",
        {
            "lease_id": "lease-1",
            "reason": "OPERATOR",
            "initiator": "spiffe://example.org/ops",
            "subject": "spiffe://example.org/agent/7",
        },
    ),
    EventCase(
        "lease-expired",
        lambda: LeaseEnded(
            lease=lease(state=LeaseState.EXPIRED, ended_at=T0, reason=Reason.EXPIRED, initiator="broker"), at=T0
        ),
        "lease.expired",
        {"lease_id": "lease-1", "reason": "EXPIRED", "initiator": "broker"},
    ),
    EventCase(
        "task-closed",
        lambda: TaskClosed(task=task(state=TaskState.COMPLETED, ended_at=T0, reason=Reason.TASK_COMPLETED), at=T0),
        "task.closed",
        {"task_id": "task-1", "state": "COMPLETED", "reason": "TASK_COMPLETED"},
    ),
]


@pytest.mark.parametrize("case", EVENTS, ids=[c.id for c in EVENTS])
def test_event_becomes_one_record(case: EventCase, audit: AuditLog, sink: io.StringIO) -> None:
    audit.on_event(case.event())
    [record] = lines(sink)
    assert record["kind"] == case.kind
    assert {k: record.get(k) for k in case.fields} == case.fields


def test_event_record_is_stamped_with_the_event_time(audit: AuditLog, sink: io.StringIO, clock: FakeClock) -> None:
    clock.advance(30)
    audit.on_event(LeaseGranted(lease=lease(), at=T0 + 1))
    assert lines(sink)[0]["ts"] == "2026-01-02T03:04:06.500Z"


def test_delegated_lease_record_names_parent_and_actors(audit: AuditLog, sink: io.StringIO) -> None:
    child = lease(id="lease-2", parent_id="lease-1", actor_chain=("spiffe://example.org/sub",), depth=1)
    audit.on_event(LeaseGranted(lease=child, at=T0))
    record = lines(sink)[0]
    assert (record["parent_id"], record["actor_chain"], record["depth"]) == ("lease-1", ["spiffe://example.org/sub"], 1)


def test_an_unknown_event_is_logged_not_raised(
    audit: AuditLog, sink: io.StringIO, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.ERROR, logger="broker.ops.audit"):
        audit.on_event(object())  # type: ignore[arg-type]
    assert sink.getvalue() == ""
    assert [r.getMessage() for r in caplog.records] == ["audit got an unknown event"]


def test_a_lease_life_leaves_no_token_in_the_trail(audit: AuditLog, sink: io.StringIO, clock: FakeClock) -> None:
    minter = TokenMinter("spiffe://broker.example/broker", SigningKey.generate())
    table = LeaseTable()
    table.subscribe(audit.on_event)
    now = clock.now()
    table.open_task("task-1", "spiffe://example.org/agent/7", now=now, deadline=now + 3600)
    parent = table.grant(lease(issued_at=now, expires_at=now + 300, token_exp=now + 300), now=now)
    child = table.grant(
        lease(
            id="lease-2",
            parent_id=parent.id,
            actor_chain=("spiffe://example.org/sub",),
            depth=1,
            issued_at=now,
            expires_at=now + 200,
            token_exp=now + 200,
        ),
        now=now,
    )
    tokens = [minter.mint({"jti": x.id, "sub": x.subject, "exp": x.token_exp}) for x in (parent, child)]
    for token in tokens:
        audit.record("token.issued", lease_id="lease-1", token_sha256=token_hash(token), note=f"got {token}")
    table.renew(parent.id, expires_at=now + 400, token_exp=now + 400, now=clock.advance(10))
    table.revoke(parent.id, Reason.OPERATOR, now=clock.advance(10), initiator="spiffe://example.org/ops")
    table.open_task("task-2", "spiffe://example.org/agent/7", now=clock.now(), deadline=clock.now() + 60)
    table.grant(
        lease(
            id="lease-3",
            task_id="task-2",
            issued_at=clock.now(),
            expires_at=clock.now() + 30,
            token_exp=clock.now() + 30,
        ),
        now=clock.now(),
    )
    table.expire_due(clock.advance(61))
    written = sink.getvalue()
    kinds = [r["kind"] for r in lines(sink)]
    assert {"task.opened", "lease.granted", "lease.renewed", "lease.revoked", "lease.expired", "task.closed"} <= set(
        kinds
    )
    assert not JWT_LIKE.search(written)
    assert not any(part in written for token in tokens for part in token.split("."))


def test_replaying_events_gives_the_same_records(clock: FakeClock) -> None:
    events = [
        TaskOpened(task=task(), at=T0),
        LeaseGranted(lease=lease(), at=T0),
        LeaseEnded(
            lease=replace(lease(), state=LeaseState.REVOKED, ended_at=T0, reason=Reason.OPERATOR, initiator="ops"),
            at=T0 + 1,
        ),
    ]
    first, second = io.StringIO(), io.StringIO()
    for out in (first, second):
        log = AuditLog(out, clock=clock)
        for event in events:
            log.on_event(event)
        clock.advance(100)
    assert first.getvalue() == second.getvalue()


def test_a_decision_is_written_from_its_typed_value_with_nothing_unset(audit: AuditLog, sink: io.StringIO) -> None:
    from broker.ops.audit import Decided

    audit.decision(
        Decided(client_id="spiffe://td/a", actions=("repo:read",), allowed=False, reason="no policy", task_id=""),
        required=False,
    )
    [record] = [json.loads(line) for line in sink.getvalue().splitlines()]
    assert record["kind"] == "decision" and record["decision"] == "deny"
    assert {k: record[k] for k in ("client_id", "actions", "policies", "reason")} == {
        "client_id": "spiffe://td/a", "actions": ["repo:read"], "policies": [], "reason": "no policy"
    }
    assert not {"principal", "task_id", "renewal", "approval_required", "delegated"} & set(record)


@pytest.mark.parametrize("required", [True, False], ids=["grant-depends-on-it", "refusal"])
def test_a_decision_that_cannot_be_written_refuses_only_when_a_grant_depends_on_it(required: bool) -> None:
    from broker.domain.errors import AuditUnavailable
    from broker.ops.audit import Decided

    sink = io.StringIO()
    sink.close()
    audit = AuditLog(sink, clock=FakeClock(start=0))
    decided = Decided(client_id="c", actions=("a",), allowed=True, reason="")
    if required:
        with pytest.raises(AuditUnavailable):
            audit.decision(decided, required=True)
    else:
        audit.decision(decided, required=False)
    assert audit.failed_writes == 1


@pytest.mark.parametrize(
    "text", ["line\u2028separator", "next\u0085line", "r\u00e9sum\u00e9"], ids=["u2028", "nel", "e-acute"]
)
def test_every_record_is_one_ascii_line_whatever_text_it_holds(text: str, audit: AuditLog, sink: io.StringIO) -> None:
    audit.record("decision", reason=text)
    written = sink.getvalue()
    assert written.isascii() and len(written.splitlines()) == 1
    assert lines(sink)[0]["reason"] == text
