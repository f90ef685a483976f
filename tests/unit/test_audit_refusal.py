"""audit.on_failure: with "refuse" (the default) nothing is issued that cannot be recorded."""

from __future__ import annotations

import asyncio
import io
from pathlib import Path

import pytest

from broker.approvals.store import ApprovalState
from broker.domain.errors import AuditUnavailable, PolicyDenied
from broker.leases.table import LeaseState
from broker.ops.audit import AuditLog
from broker.testing.clock import FakeClock
from broker.testing.jwt_issuer import JwtSvidIssuer
from broker.testing.x509_ca import SpiffeCA
from broker.usecases.issuance import ISSUED, PENDING_APPROVAL
from tests.support.faults import FullDisk
from tests.unit.test_use_cases import AGENT, T0, TD, Authorities, Broker, _build


@pytest.fixture(scope="module")
def signers() -> Authorities:
    return Authorities(ca=SpiffeCA(TD, now=T0), jwt=JwtSvidIssuer(TD), stranger_jwt=JwtSvidIssuer(TD))


@pytest.fixture
def disk() -> FullDisk:
    return FullDisk()


def _broker(signers: Authorities, tmp_path: Path, disk: FullDisk, on_failure: str = "refuse") -> Broker:
    return _build(signers, tmp_path, sink=disk, on_failure=on_failure)


def test_exchange_while_audit_fails_is_audit_unavailable_and_changes_nothing(
    signers: Authorities, tmp_path: Path, disk: FullDisk
) -> None:
    broker = _broker(signers, tmp_path, disk)
    caller = broker.x509_caller(AGENT)
    disk.full = True
    with pytest.raises(AuditUnavailable) as caught:
        broker.ask(caller)
    assert caught.value.reason == "audit unavailable"
    assert broker.leases.counts() == {"active": 0, "tombstones": 0, "tasks": 0}


def test_exchange_succeeds_again_once_writes_do(signers: Authorities, tmp_path: Path, disk: FullDisk) -> None:
    broker = _broker(signers, tmp_path, disk)
    caller = broker.x509_caller(AGENT)
    disk.full = True
    with pytest.raises(AuditUnavailable):
        broker.ask(caller)
    disk.full = False
    issued = broker.ask(caller)
    assert issued.state == ISSUED
    kinds = [r["kind"] for r in broker.audit_records()]
    assert {"decision", "lease.granted", "token.issued"} <= set(kinds)


def test_token_is_issued_only_after_its_record_is_written(
    signers: Authorities, tmp_path: Path, disk: FullDisk
) -> None:
    # The disk fills between the decision and the token record: the token is withheld and its lease ended.
    broker = _broker(signers, tmp_path, disk)
    caller = broker.x509_caller(AGENT)
    real_write = disk.write

    def fill_after_the_decision(text: str) -> int:
        if '"kind":"lease.granted"' in text:
            disk.full = True
        return real_write(text)

    disk.write = fill_after_the_decision  # type: ignore[method-assign]
    with pytest.raises(AuditUnavailable):
        broker.ask(caller)
    assert broker.leases.counts()["active"] == 0
    assert all(lease.state is LeaseState.REVOKED for lease in broker.leases.list(include_inactive=True))


def test_renewal_while_audit_fails_is_audit_unavailable_and_keeps_the_expiry(
    signers: Authorities, tmp_path: Path, disk: FullDisk
) -> None:
    broker = _broker(signers, tmp_path, disk)
    caller = broker.x509_caller(AGENT)
    issued = broker.ask(caller, ttl=60)
    assert issued.lease is not None
    disk.full = True
    broker.clock.advance(30)
    with pytest.raises(AuditUnavailable):
        broker.renew(caller, issued.lease.id, 60)
    assert broker.lease(issued.lease.id).expires_at == issued.lease.expires_at


def test_a_request_needing_approval_is_refused_while_audit_fails(
    signers: Authorities, tmp_path: Path, disk: FullDisk
) -> None:
    broker = _broker(signers, tmp_path, disk)
    caller = broker.x509_caller(AGENT)
    disk.full = True
    with pytest.raises(AuditUnavailable):
        broker.ask(caller, actions=("deploy",), resource="service:app", audience="service:app", ttl=60)
    assert broker.approvals.list(include_decided=True) == []


def test_an_approved_request_is_not_issued_while_audit_fails(
    signers: Authorities, tmp_path: Path, disk: FullDisk
) -> None:
    broker = _broker(signers, tmp_path, disk)
    caller = broker.x509_caller(AGENT)
    pending = broker.ask(caller, actions=("deploy",), resource="service:app", audience="service:app", ttl=60)
    assert pending.state == PENDING_APPROVAL
    broker.decide(pending.approval_id)
    disk.full = True
    with pytest.raises(AuditUnavailable):
        asyncio.run(broker.exchange.await_approval(caller, pending.approval_id))
    disk.full = False
    assert asyncio.run(broker.exchange.await_approval(caller, pending.approval_id)).state == ISSUED


def test_an_approval_that_cannot_be_recorded_is_refused_and_stays_pending(
    signers: Authorities, tmp_path: Path, disk: FullDisk
) -> None:
    broker = _broker(signers, tmp_path, disk)
    caller = broker.x509_caller(AGENT)
    pending = broker.ask(caller, actions=("deploy",), resource="service:app", audience="service:app", ttl=60)
    disk.full = True
    with pytest.raises(AuditUnavailable):
        broker.decide(pending.approval_id)
    [approval] = broker.approvals.list(include_decided=True)
    assert approval.state is ApprovalState.PENDING
    disk.full = False
    assert broker.decide(pending.approval_id).state is ApprovalState.APPROVED


def test_a_denial_goes_through_while_audit_fails(signers: Authorities, tmp_path: Path, disk: FullDisk) -> None:
    broker = _broker(signers, tmp_path, disk)
    pending = broker.ask(
        broker.x509_caller(AGENT), actions=("deploy",), resource="service:app", audience="service:app", ttl=60
    )
    disk.full = True
    assert broker.decide(pending.approval_id, approve=False).state is ApprovalState.DENIED


def test_a_refusal_is_still_answered_while_audit_fails(
    signers: Authorities, tmp_path: Path, disk: FullDisk
) -> None:
    broker = _broker(signers, tmp_path, disk)
    disk.full = True
    with pytest.raises(PolicyDenied):
        broker.ask(broker.x509_caller(AGENT), actions=("repo:write",))


def test_completing_a_task_proceeds_while_audit_fails(signers: Authorities, tmp_path: Path, disk: FullDisk) -> None:
    broker = _broker(signers, tmp_path, disk)
    caller = broker.x509_caller(AGENT)
    broker.ask(caller)
    disk.full = True
    assert asyncio.run(broker.leasing.complete_task(caller, "task-1")) == 1
    assert broker.leases.counts()["active"] == 0


def test_continue_issues_while_audit_fails(signers: Authorities, tmp_path: Path, disk: FullDisk) -> None:
    broker = _broker(signers, tmp_path, disk, on_failure="continue")
    disk.full = True
    assert broker.ask(broker.x509_caller(AGENT)).state == ISSUED


@pytest.mark.parametrize("spoil", ["closed", "full-device"])
def test_required_record_on_a_dead_sink_is_audit_unavailable(spoil: str, tmp_path: Path) -> None:
    if spoil == "closed":
        sink = io.StringIO()
        sink.close()
        audit = AuditLog(sink, clock=FakeClock(start=T0))
    else:
        audit = AuditLog.open("/dev/full", clock=FakeClock(start=T0))   # writes fail with ENOSPC
    with pytest.raises(AuditUnavailable):
        audit.require("decision", decision="allow")
    assert audit.record("lease.revoked", lease_id="l1") is False   # best-effort records never raise
    assert audit.failed_writes == 2


def test_continue_mode_never_raises(tmp_path: Path) -> None:
    audit = AuditLog.open("/dev/full", clock=FakeClock(start=T0), on_failure="continue")
    audit.require("decision", decision="allow")
    assert audit.failed_writes == 1


def test_closing_a_log_on_a_full_disk_does_not_raise() -> None:
    audit = AuditLog.open("/dev/full", clock=FakeClock(start=T0))
    audit.record("lease.revoked", lease_id="l1")
    audit.close()
