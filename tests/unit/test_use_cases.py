"""The use cases (exchange, renew, complete, introspect, delegate, approve) over real collaborators.

Everything is built in-process as `server.build_app` wires it: a real CA and JWT-SVID issuer,
real verifiers, Cedar policy from a file, the lease table, the minter and the audit log into a
string buffer. Time is a fake clock; nothing listens and nothing sleeps.
"""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from broker.approvals.store import Approval, ApprovalStore
from broker.domain.errors import (
    ApprovalDenied,
    BrokerError,
    CredentialRejected,
    InvalidRequest,
    LeaseInactive,
    LeaseNotFound,
    LifetimeExhausted,
    PermissionDenied,
    PolicyDenied,
    QuotaExceeded,
    TaskConflict,
    TaskNotFound,
)
from broker.domain.identity import AuthKind, Identity
from broker.domain.intent import TOKEN_TYPE_ACCESS_TOKEN, TOKEN_TYPE_ID_TOKEN, TOKEN_TYPE_JWT, Intent
from broker.jose.jws import token_hash
from broker.jose.keys import SigningKey
from broker.leases.table import Lease, LeaseState, LeaseTable, Reason
from broker.ops.audit import AuditLog
from broker.policy.engine import PolicyEngine
from broker.store.base import MemoryStore
from broker.testing.clock import FakeClock
from broker.testing.jwt_issuer import JwtSvidIssuer
from broker.testing.x509_ca import SpiffeCA
from broker.tokens.minter import TokenMinter
from broker.usecases.exchange import Exchange
from broker.usecases.issuance import ISSUED, PENDING_APPROVAL, Issued, Issuer, Settings
from broker.usecases.lifecycle import Leasing
from broker.usecases.operations import Admin
from broker.verify import JwtSvidVerifier, Verifiers, X509SvidVerifier

T0 = 1_750_000_000
DAY = 86_400
TD = "example.org"
BROKER_ID = f"spiffe://{TD}/broker"
AGENT = f"spiffe://{TD}/agent/planner"
OTHER = f"spiffe://{TD}/agent/outsider"
SUB1 = f"spiffe://{TD}/agent/worker"
SUB2 = f"spiffe://{TD}/agent/helper"
SUB3 = f"spiffe://{TD}/agent/intern"
HUMAN = f"spiffe://{TD}/user/alice"
REPO = f"spiffe://{TD}/service/repo"
GATEWAY = f"spiffe://{TD}/service/gateway"
OPERATOR = f"spiffe://{TD}/operator/ops"
RESOURCE = "repo:org/app"

READ_POLICY = """\
@id("agents-read")
permit (principal, action in [Action::"repo:read", Action::"repo:clone"], resource == Resource::"repo:org/app");
"""
OTHER_POLICIES = """\
@id("merge-is-short")
@max_ttl("120")
permit (principal, action == Action::"repo:merge", resource == Resource::"repo:org/app");

@id("deploy-needs-approval")
@approval("required")
permit (principal, action == Action::"deploy", resource == Resource::"service:app");
"""
POLICY = READ_POLICY + "\n" + OTHER_POLICIES


@dataclass(frozen=True, slots=True)
class Authorities:
    """The trust domain's signers, made once per module (key generation is the slow part)."""

    ca: SpiffeCA
    jwt: JwtSvidIssuer
    stranger_jwt: JwtSvidIssuer  # same trust domain name, keys nobody trusts


@pytest.fixture(scope="module")
def authorities() -> Authorities:
    return Authorities(ca=SpiffeCA(TD, now=T0), jwt=JwtSvidIssuer(TD), stranger_jwt=JwtSvidIssuer(TD))


@dataclass
class Broker:
    """One broker's core, wired as `server.build_app` does, plus helpers to drive it."""

    authorities: Authorities
    clock: FakeClock
    policy_path: Path
    policy: PolicyEngine
    leases: LeaseTable
    approvals: ApprovalStore
    minter: TokenMinter
    audit_sink: io.StringIO
    verifiers: Verifiers
    settings: Settings
    exchange: Exchange
    leasing: Leasing
    admin: Admin
    tokens: list[str] = field(default_factory=list)  # every token seen, to check the audit

    def operator(self) -> Identity:
        return Identity(principal=OPERATOR, kind=AuthKind.X509_SVID, expires_at=self.clock.now() + DAY)

    def decide(self, approval_id: str, *, approve: bool = True, note: str = "") -> Approval:
        """An operator's decision, through the operators' use case."""
        decide = self.admin.approve if approve else self.admin.deny
        return asyncio.run(decide(self.operator(), approval_id, note))

    def x509_caller(self, spiffe_id: str, *, ttl: float = DAY) -> Identity:
        """A caller proven by an X.509-SVID, verified by the real verifier."""
        svid = self.authorities.ca.x509_svid(spiffe_id, ttl=ttl, now=self.clock.now())
        return self.verifiers.verify_peer(svid.cert_pem(), [], now=self.clock.now())

    def jwt_svid(
        self, spiffe_id: str, *, ttl: float = 600, audience: str = BROKER_ID, signer: JwtSvidIssuer | None = None
    ) -> str:
        """A JWT-SVID for `spiffe_id`, signed by the trusted issuer unless `signer` says otherwise."""
        token = (signer or self.authorities.jwt).jwt_svid(spiffe_id, audience, ttl=ttl, now=self.clock.now())
        self.tokens.append(token)
        return token

    def ask(
        self,
        caller: Identity,
        *,
        task_id: str = "task-1",
        actions: tuple[str, ...] = ("repo:read",),
        ttl: int = 0,
        audience: str = REPO,
        resource: str = RESOURCE,
        subject_token: str = "",
        subject_token_type: str = "",
        context: dict[str, str] | None = None,
    ) -> Issued:
        """Run one Exchange to its answer."""
        intent = Intent.parse(
            task_id=task_id,
            audience=audience,
            actions=actions,
            resource=resource,
            ttl_seconds=ttl,
            context=context or {},
            subject_token=subject_token,
            subject_token_type=subject_token_type or (TOKEN_TYPE_JWT if subject_token else ""),
        )
        issued = asyncio.run(self.exchange.exchange(caller, intent))
        if issued.access_token:
            self.tokens.append(issued.access_token)
        return issued

    def delegate(self, caller: Identity, parent_token: str, **kw: Any) -> Issued:
        """A sub-agent's Exchange presenting its parent's broker token."""
        kw.setdefault("task_id", "")
        kw.setdefault("audience", "")
        kw.setdefault("resource", "")
        return self.ask(caller, subject_token=parent_token, subject_token_type=TOKEN_TYPE_ACCESS_TOKEN, **kw)

    def renew(self, caller: Identity, lease_id: str, ttl: int = 0) -> Issued:
        issued = asyncio.run(self.leasing.renew(caller, lease_id, ttl))
        self.tokens.append(issued.access_token)
        return issued

    def lease(self, lease_id: str) -> Lease:
        lease = self.leases.get(lease_id)
        assert lease is not None
        return lease

    def claims(self, token: str) -> dict[str, Any]:
        return self.minter.verify(token, now=self.clock.now())

    def audit_text(self) -> str:
        return self.audit_sink.getvalue()

    def audit_records(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.audit_text().splitlines()]

    def state_records(self) -> list[dict[str, Any]]:
        """The audit records of lease, task and token changes (decisions excluded)."""
        return [r for r in self.audit_records() if r["kind"].split(".")[0] in ("lease", "task", "token")]

    def write_policy(self, text: str) -> None:
        self.policy_path.write_text(text)
        self.policy.reload()


Build = Callable[..., Broker]


def _verifiers(authorities: Authorities) -> Verifiers:
    return Verifiers(
        x509=X509SvidVerifier({TD: [authorities.ca.root]}, clock_skew=30),
        jwt_svid=JwtSvidVerifier({TD: authorities.jwt.jwks()}, audience=BROKER_ID, clock_skew=30),
        oidc=[],
    )


def _build(
    authorities: Authorities, folder: Path, *, sink: Any = None, on_failure: str = "refuse", **overrides: Any
) -> Broker:
    """Wire the core as `server.build_app` does; `overrides` are `Settings` fields.

    `sink` replaces the audit log's string buffer (a test's failing stand-in writes through to it).
    """
    clock = FakeClock(start=T0)
    policy_path = folder / "broker.cedar"
    policy_path.write_text(POLICY)
    policy = PolicyEngine.from_files(policy_path)
    leases = LeaseTable(tombstone_grace=300)
    approvals = leases.approvals
    minter = TokenMinter(BROKER_ID, SigningKey.generate())
    buffer = io.StringIO()
    audit = AuditLog(buffer if sink is None else sink, clock=clock, on_failure=on_failure)
    store = MemoryStore(leases, minter=minter)
    store.on_committed(audit.on_event)
    verifiers = _verifiers(authorities)
    settings = Settings(issuer=BROKER_ID, **{"introspectors": (GATEWAY,), **overrides})
    issuer = Issuer(store=store, minter=minter, audit=audit, clock=clock, settings=settings)
    core = {"store": store, "minter": minter, "audit": audit, "clock": clock, "settings": settings}
    return Broker(
        authorities=authorities,
        clock=clock,
        policy_path=policy_path,
        policy=policy,
        leases=leases,
        approvals=approvals,
        minter=minter,
        audit_sink=buffer if sink is None else sink.buffer,
        verifiers=verifiers,
        settings=settings,
        exchange=Exchange(verifiers=verifiers, policy=policy, issuer=issuer, **core),
        leasing=Leasing(policy=policy, issuer=issuer, **core),
        admin=Admin(policy=policy, store=store, minter=minter, audit=audit, clock=clock),
    )


@pytest.fixture
def build(authorities: Authorities, tmp_path: Path) -> Build:
    """Builds a broker; keyword arguments override `Settings` fields."""
    return lambda **overrides: _build(authorities, tmp_path, **overrides)


@pytest.fixture
def broker(build: Build) -> Broker:
    return build()


def _id(issued: Issued) -> str:
    assert issued.lease is not None
    return issued.lease.id


def _expires_in(broker: Broker, issued: Issued) -> float:
    assert issued.lease is not None
    return issued.lease.expires_at - broker.clock.now()


# -- exchange ---------------------------------------------------------------------------


def test_exchange_for_x509_caller_issues_a_token_for_the_caller(broker: Broker) -> None:
    caller = broker.x509_caller(AGENT)
    issued = broker.ask(caller, actions=("repo:read", "repo:clone"), ttl=60)
    assert issued.state == ISSUED
    assert issued.lease is not None
    claims = broker.claims(issued.access_token)
    assert claims["iss"] == BROKER_ID
    assert (claims["sub"], claims["client_id"], claims["aud"]) == (AGENT, AGENT, REPO)
    assert (claims["scope"], claims["resource"], claims["txn"]) == ("repo:read repo:clone", RESOURCE, "task-1")
    assert claims["jti"] == issued.lease.id
    assert claims["exp"] == T0 + 60 == issued.lease.expires_at
    assert claims["cnf"] == {"x5t#S256": caller.x5t_s256}
    assert "act" not in claims


def test_exchange_records_an_active_lease_under_a_new_task(broker: Broker) -> None:
    issued = broker.ask(broker.x509_caller(AGENT), task_id="build-7")
    assert issued.lease is not None
    lease = broker.lease(issued.lease.id)
    assert lease.state is LeaseState.ACTIVE
    assert (lease.task_id, lease.subject, lease.client_id, lease.parent_id) == ("build-7", AGENT, AGENT, None)
    task = broker.leases.get_task("build-7")
    assert task is not None
    assert (task.owner, task.deadline) == (AGENT, T0 + broker.settings.max_task_lifetime)


def test_exchange_with_jwt_svid_subject_token_issues_for_the_subject(broker: Broker) -> None:
    caller = broker.x509_caller(AGENT)
    issued = broker.ask(caller, subject_token=broker.jwt_svid(HUMAN), ttl=60)
    assert issued.lease is not None
    claims = broker.claims(issued.access_token)
    assert (claims["sub"], claims["client_id"]) == (HUMAN, AGENT)
    assert (issued.lease.subject, issued.lease.client_id) == (HUMAN, AGENT)
    task = broker.leases.get_task("task-1")
    assert task is not None
    assert task.owner == HUMAN


def test_exchange_for_jwt_svid_caller_has_no_certificate_binding(broker: Broker) -> None:
    caller = asyncio.run(broker.verifiers.verify_token(broker.jwt_svid(AGENT), now=T0))
    assert caller.kind is AuthKind.JWT_SVID
    issued = broker.ask(caller, ttl=60)
    claims = broker.claims(issued.access_token)
    assert (claims["sub"], claims["client_id"]) == (AGENT, AGENT)
    assert "cnf" not in claims


def test_exchange_policy_decision_is_audited(broker: Broker) -> None:
    broker.ask(broker.x509_caller(AGENT))
    decisions = [r for r in broker.audit_records() if r["kind"] == "decision"]
    assert len(decisions) == 1
    assert decisions[0]["decision"] == "allow"
    assert decisions[0]["policies"] == ["agents-read"]


@dataclass(frozen=True, slots=True)
class Cap:
    id: str
    capped_by: str
    expires_in: int
    ttl: int = 0
    action: str = "repo:read"
    svid_ttl: int = DAY
    subject_token_ttl: int | None = None
    max_task_lifetime: float = 8 * 3600


CAPS = [
    Cap("default", "default", 300),
    Cap("requested", "requested", 60, ttl=60),
    Cap("max_ttl", "max_ttl", 3600, ttl=7200),
    Cap("policy", "policy", 120, ttl=600, action="repo:merge"),
    Cap("task_deadline", "task_deadline", 200, ttl=600, max_task_lifetime=200),
    Cap("subject_token", "subject_token", 90, ttl=600, subject_token_ttl=90),
    Cap("subject_svid", "subject_svid", 100, ttl=600, svid_ttl=100),
    Cap("caller_credential", "caller_credential", 100, ttl=600, svid_ttl=100, subject_token_ttl=500),
]


@pytest.mark.parametrize("case", CAPS, ids=[c.id for c in CAPS])
def test_exchange_ttl_is_the_smallest_cap_and_names_it(build: Build, case: Cap) -> None:
    broker = build(max_task_lifetime=case.max_task_lifetime)
    caller = broker.x509_caller(AGENT, ttl=case.svid_ttl)
    subject = broker.jwt_svid(AGENT, ttl=case.subject_token_ttl) if case.subject_token_ttl else ""
    issued = broker.ask(caller, actions=(case.action,), ttl=case.ttl, subject_token=subject)
    assert issued.ttl_capped_by == case.capped_by
    assert _expires_in(broker, issued) == case.expires_in
    assert broker.claims(issued.access_token)["exp"] == T0 + case.expires_in


def test_exchange_at_the_task_deadline_is_lease_inactive(build: Build) -> None:
    broker = build(max_task_lifetime=100)
    caller = broker.x509_caller(AGENT)
    broker.ask(caller)
    broker.clock.advance(100)  # the deadline has come; the reaper has not run yet
    before = broker.leases.counts()
    with pytest.raises(LifetimeExhausted, match="task_deadline"):
        broker.ask(caller)
    assert broker.leases.counts() == before


# -- renew ------------------------------------------------------------------------------


def test_renew_extends_the_same_lease(broker: Broker) -> None:
    caller = broker.x509_caller(AGENT)
    first = broker.ask(caller, ttl=60)
    assert first.lease is not None
    broker.clock.advance(50)
    renewed = broker.renew(caller, first.lease.id, 60)
    assert renewed.lease is not None
    assert renewed.lease.id == first.lease.id
    assert broker.lease(first.lease.id).expires_at == T0 + 110
    claims = broker.claims(renewed.access_token)
    assert (claims["jti"], claims["exp"]) == (first.lease.id, T0 + 110)
    assert renewed.access_token != first.access_token


def test_renewed_lease_outlives_its_first_expiry(broker: Broker) -> None:
    caller = broker.x509_caller(AGENT)
    first = broker.ask(caller, ttl=60)
    assert first.lease is not None
    broker.clock.advance(50)
    broker.renew(caller, first.lease.id, 60)
    broker.clock.advance(20)
    broker.leases.expire_due(broker.clock.now())
    assert broker.lease(first.lease.id).is_active(broker.clock.now())


@dataclass(frozen=True, slots=True)
class RenewCap:
    id: str
    capped_by: str
    expires_in: int  # after the renewal, from the clock at renewal
    renew_ttl: int
    action: str = "repo:read"
    max_task_lifetime: float = 8 * 3600
    delegated: bool = False
    subject_token_ttl: int | None = None
    renewer_svid_ttl: int = DAY


RENEW_CAPS = [
    RenewCap("default", "default", 300, renew_ttl=0),
    RenewCap("requested", "requested", 45, renew_ttl=45),
    RenewCap("policy", "policy", 120, renew_ttl=600, action="repo:merge"),
    RenewCap("task_deadline", "task_deadline", 350, renew_ttl=600, max_task_lifetime=400),
    RenewCap("parent_lease", "parent_lease", 250, renew_ttl=600, delegated=True),
    RenewCap("subject_token", "subject_token", 50, renew_ttl=600, subject_token_ttl=100),
    RenewCap("caller_credential", "caller_credential", 70, renew_ttl=600, renewer_svid_ttl=70),
]


@pytest.mark.parametrize("case", RENEW_CAPS, ids=[c.id for c in RENEW_CAPS])
def test_renew_ttl_is_the_smallest_cap_and_names_it(build: Build, case: RenewCap) -> None:
    broker = build(max_task_lifetime=case.max_task_lifetime)
    holder = owner = broker.x509_caller(AGENT)
    subject = broker.jwt_svid(HUMAN, ttl=case.subject_token_ttl) if case.subject_token_ttl else ""
    parent = broker.ask(owner, actions=(case.action,), ttl=60 if subject else 300, subject_token=subject)
    lease_id = _id(parent)
    if case.delegated:
        holder = broker.x509_caller(SUB1)
        lease_id = _id(broker.delegate(holder, parent.access_token, ttl=100))
    broker.clock.advance(50)
    # the holder renews with the credential it holds now
    holder = broker.x509_caller(holder.principal, ttl=case.renewer_svid_ttl)
    renewed = broker.renew(holder, lease_id, case.renew_ttl)
    assert renewed.ttl_capped_by == case.capped_by
    assert _expires_in(broker, renewed) == case.expires_in


def test_renew_after_revoke_is_lease_inactive(broker: Broker) -> None:
    caller = broker.x509_caller(AGENT)
    lease_id = _id(broker.ask(caller))
    broker.leases.revoke(lease_id, Reason.OPERATOR, now=T0, initiator=OPERATOR)
    with pytest.raises(LeaseInactive, match="revoked"):
        broker.renew(caller, lease_id, 60)


def test_renew_after_expiry_is_lease_inactive(broker: Broker) -> None:
    caller = broker.x509_caller(AGENT)
    lease_id = _id(broker.ask(caller, ttl=60))
    broker.clock.advance(60)
    with pytest.raises(LeaseInactive, match="expired"):
        broker.renew(caller, lease_id, 60)


def test_renew_of_someone_elses_lease_is_lease_not_found(broker: Broker) -> None:
    lease_id = _id(broker.ask(broker.x509_caller(AGENT)))
    with pytest.raises(LeaseNotFound):
        broker.renew(broker.x509_caller(OTHER), lease_id, 60)
    assert broker.lease(lease_id).expires_at == T0 + 300


def test_renew_of_unknown_lease_is_lease_not_found(broker: Broker) -> None:
    with pytest.raises(LeaseNotFound):
        broker.renew(broker.x509_caller(AGENT), "lse_nothing", 60)


def test_renewal_refused_by_reloaded_policy_revokes_the_lease(broker: Broker) -> None:
    caller = broker.x509_caller(AGENT)
    lease_id = _id(broker.ask(caller))
    broker.write_policy(OTHER_POLICIES)
    with pytest.raises(PolicyDenied, match="renewal denied"):
        broker.renew(caller, lease_id, 60)
    lease = broker.lease(lease_id)
    assert (lease.state, lease.reason, lease.initiator) == (LeaseState.REVOKED, Reason.RENEWAL_DENIED, AGENT)


def test_renewal_refused_by_policy_revokes_delegated_children(broker: Broker) -> None:
    caller = broker.x509_caller(AGENT)
    parent = broker.ask(caller)
    child = broker.delegate(broker.x509_caller(SUB1), parent.access_token)
    broker.write_policy(OTHER_POLICIES)
    with pytest.raises(PolicyDenied):
        broker.renew(caller, _id(parent), 60)
    assert broker.lease(_id(child)).reason is Reason.PARENT_REVOKED


# -- complete_task ----------------------------------------------------------------------


def test_complete_task_by_owner_revokes_every_lease_and_counts_them(broker: Broker) -> None:
    caller = broker.x509_caller(AGENT)
    first = broker.ask(caller)
    second = broker.ask(caller, actions=("repo:clone",))
    child = broker.delegate(broker.x509_caller(SUB1), first.access_token)
    assert asyncio.run(broker.leasing.complete_task(caller, "task-1")) == 3
    leases = [broker.lease(_id(i)) for i in (first, second, child)]
    assert {(lease.state, lease.reason) for lease in leases} == {(LeaseState.REVOKED, Reason.TASK_COMPLETED)}


def test_complete_task_by_another_principal_is_task_conflict(broker: Broker) -> None:
    lease_id = _id(broker.ask(broker.x509_caller(AGENT)))
    with pytest.raises(TaskConflict):
        asyncio.run(broker.leasing.complete_task(broker.x509_caller(OTHER), "task-1"))
    assert broker.lease(lease_id).state is LeaseState.ACTIVE


def test_complete_unknown_task_is_task_not_found(broker: Broker) -> None:
    with pytest.raises(TaskNotFound):
        asyncio.run(broker.leasing.complete_task(broker.x509_caller(AGENT), "no-such-task"))


def test_complete_task_twice_counts_zero_the_second_time(broker: Broker) -> None:
    caller = broker.x509_caller(AGENT)
    broker.ask(caller)
    assert asyncio.run(broker.leasing.complete_task(caller, "task-1")) == 1
    assert asyncio.run(broker.leasing.complete_task(caller, "task-1")) == 0


def test_completed_task_refuses_new_exchanges(broker: Broker) -> None:
    caller = broker.x509_caller(AGENT)
    broker.ask(caller)
    asyncio.run(broker.leasing.complete_task(caller, "task-1"))
    with pytest.raises(TaskConflict, match="completed"):
        broker.ask(caller)


def test_complete_task_with_ill_formed_id_is_invalid_request(broker: Broker) -> None:
    with pytest.raises(InvalidRequest, match="task_id"):
        asyncio.run(broker.leasing.complete_task(broker.x509_caller(AGENT), "bad task"))


# -- introspect -------------------------------------------------------------------------


def test_introspect_active_token_by_its_audience(broker: Broker) -> None:
    issued = broker.ask(broker.x509_caller(AGENT), ttl=60)
    answer = asyncio.run(broker.leasing.introspect(broker.x509_caller(REPO), issued.access_token))
    assert answer.active is True
    assert answer.lease == issued.lease
    assert answer.expires_at == T0 + 60


def test_introspect_expired_token_is_inactive(broker: Broker) -> None:
    issued = broker.ask(broker.x509_caller(AGENT), ttl=60)
    resource_server = broker.x509_caller(REPO)
    broker.clock.advance(60)
    assert asyncio.run(broker.leasing.introspect(resource_server, issued.access_token)).active is False


def test_introspect_token_of_expired_lease_is_inactive_before_exp(broker: Broker) -> None:
    caller = broker.x509_caller(AGENT)
    first = broker.ask(caller, ttl=60)
    broker.renew(caller, _id(first), 30)
    broker.clock.advance(40)  # the lease ended at +30; the first token's exp is +60
    broker.leases.expire_due(broker.clock.now())
    assert asyncio.run(broker.leasing.introspect(broker.x509_caller(REPO), first.access_token)).active is False


def test_introspect_revoked_token_is_inactive(broker: Broker) -> None:
    issued = broker.ask(broker.x509_caller(AGENT))
    broker.leases.revoke(_id(issued), Reason.OPERATOR, now=T0, initiator=OPERATOR)
    answer = asyncio.run(broker.leasing.introspect(broker.x509_caller(REPO), issued.access_token))
    assert answer.active is False
    assert answer.lease is None


def test_introspect_forged_token_is_inactive(broker: Broker) -> None:
    issued = broker.ask(broker.x509_caller(AGENT))
    forger = TokenMinter(BROKER_ID, SigningKey.generate())
    forged = forger.mint(broker.claims(issued.access_token))
    assert asyncio.run(broker.leasing.introspect(broker.x509_caller(REPO), forged)).active is False


def test_introspect_garbage_is_inactive(broker: Broker) -> None:
    assert asyncio.run(broker.leasing.introspect(broker.x509_caller(REPO), "not-a-token")).active is False


def test_introspect_by_someone_other_than_the_audience_is_permission_denied(broker: Broker) -> None:
    issued = broker.ask(broker.x509_caller(AGENT))
    with pytest.raises(PermissionDenied):
        asyncio.run(broker.leasing.introspect(broker.x509_caller(OTHER), issued.access_token))


def test_introspect_by_configured_introspector_is_allowed(broker: Broker) -> None:
    issued = broker.ask(broker.x509_caller(AGENT))
    answer = asyncio.run(broker.leasing.introspect(broker.x509_caller(GATEWAY), issued.access_token))
    assert answer.active is True
    assert answer.lease is not None
    assert answer.lease.id == _id(issued)


# -- delegation -------------------------------------------------------------------------


def _chain(broker: Broker, depth: int) -> list[Issued]:
    """A root lease for AGENT, then `depth` delegations, each presenting the previous token."""
    issued = [broker.ask(broker.x509_caller(AGENT), ttl=600)]
    for actor in (SUB1, SUB2, SUB3)[:depth]:
        issued.append(broker.delegate(broker.x509_caller(actor), issued[-1].access_token))
    return issued


def test_delegation_keeps_the_subject_and_nests_the_actors(broker: Broker) -> None:
    chain = _chain(broker, 3)
    claims = broker.claims(chain[-1].access_token)
    assert (claims["sub"], claims["client_id"], claims["txn"], claims["aud"]) == (AGENT, SUB3, "task-1", REPO)
    assert claims["act"] == {"sub": SUB3, "act": {"sub": SUB2, "act": {"sub": SUB1}}}
    leases = [broker.lease(_id(i)) for i in chain]
    assert [lease.parent_id for lease in leases] == [None, *(lease.id for lease in leases[:-1])]
    assert [lease.depth for lease in leases] == [0, 1, 2, 3]


def test_delegated_lease_never_outlives_its_parent(broker: Broker) -> None:
    parent = broker.ask(broker.x509_caller(AGENT), ttl=100)
    child = broker.delegate(broker.x509_caller(SUB1), parent.access_token, ttl=600)
    assert child.ttl_capped_by == "parent_lease"
    assert broker.lease(_id(child)).expires_at == broker.lease(_id(parent)).expires_at


def test_delegation_deeper_than_the_maximum_is_permission_denied(build: Build) -> None:
    broker = build(max_delegation_depth=2)
    chain = _chain(broker, 2)
    with pytest.raises(PermissionDenied, match="max_delegation_depth"):
        broker.delegate(broker.x509_caller(SUB3), chain[-1].access_token)


def test_revoking_the_root_revokes_every_descendant_three_levels_deep(broker: Broker) -> None:
    chain = _chain(broker, 3)
    root_id = _id(chain[0])
    changed = broker.leases.revoke(root_id, Reason.OPERATOR, now=T0, initiator=OPERATOR)
    assert [lease.id for lease in changed] == [_id(i) for i in chain]
    leases = [broker.lease(_id(i)) for i in chain]
    assert [lease.state for lease in leases] == [LeaseState.REVOKED] * 4
    assert [lease.reason for lease in leases] == [Reason.OPERATOR] + [Reason.PARENT_REVOKED] * 3
    resource_server = broker.x509_caller(REPO)
    assert not any(asyncio.run(broker.leasing.introspect(resource_server, i.access_token)).active for i in chain)


def test_delegation_cannot_leave_its_task(broker: Broker) -> None:
    parent = broker.ask(broker.x509_caller(AGENT))
    broker.ask(broker.x509_caller(SUB1), task_id="task-2")
    with pytest.raises(TaskConflict, match="cannot leave its task"):
        broker.delegate(broker.x509_caller(SUB1), parent.access_token, task_id="task-2")


def test_delegation_cannot_change_audience(broker: Broker) -> None:
    parent = broker.ask(broker.x509_caller(AGENT))
    with pytest.raises(PolicyDenied, match="cannot change audience"):
        broker.delegate(broker.x509_caller(SUB1), parent.access_token, audience=GATEWAY)


def test_delegation_may_narrow_scope(broker: Broker) -> None:
    parent = broker.ask(broker.x509_caller(AGENT), actions=("repo:read", "repo:clone"))
    child = broker.delegate(broker.x509_caller(SUB1), parent.access_token, actions=("repo:clone",))
    assert broker.claims(child.access_token)["scope"] == "repo:clone"


def test_revoking_a_delegated_lease_leaves_its_parent_active(broker: Broker) -> None:
    chain = _chain(broker, 2)
    broker.leases.revoke(_id(chain[1]), Reason.OPERATOR, now=T0, initiator=OPERATOR)
    states = [broker.lease(_id(i)).state for i in chain]
    assert states == [LeaseState.ACTIVE, LeaseState.REVOKED, LeaseState.REVOKED]


# -- approvals --------------------------------------------------------------------------


def _deploy(broker: Broker, caller: Identity) -> Issued:
    return broker.ask(caller, actions=("deploy",), resource="service:app", audience="service:app", ttl=60)


def test_exchange_needing_approval_issues_nothing_yet(broker: Broker) -> None:
    pending = _deploy(broker, broker.x509_caller(AGENT))
    assert (pending.state, pending.access_token, pending.lease) == (PENDING_APPROVAL, "", None)
    assert pending.approval_id.startswith("apr_")
    assert broker.leases.counts() == {"active": 0, "tombstones": 0, "tasks": 0}


def test_await_approval_issues_once_an_operator_approves(broker: Broker) -> None:
    caller = broker.x509_caller(AGENT)
    pending = _deploy(broker, caller)

    async def scenario() -> Issued:
        waiter = asyncio.create_task(broker.exchange.await_approval(caller, pending.approval_id))
        await asyncio.sleep(0)
        assert not waiter.done()
        await broker.admin.approve(broker.operator(), pending.approval_id, "ok")
        return await waiter

    issued = asyncio.run(scenario())
    assert issued.state == ISSUED
    claims = broker.claims(issued.access_token)
    assert (claims["sub"], claims["scope"], claims["exp"]) == (AGENT, "deploy", T0 + 60)


def test_await_approval_after_a_denial_is_approval_denied(broker: Broker) -> None:
    caller = broker.x509_caller(AGENT)
    pending = _deploy(broker, caller)
    broker.decide(pending.approval_id, approve=False, note="not today")
    with pytest.raises(ApprovalDenied, match="not today"):
        asyncio.run(broker.exchange.await_approval(caller, pending.approval_id))
    assert broker.leases.counts()["active"] == 0


def test_renewal_of_an_approved_lease_needs_a_fresh_approval(broker: Broker) -> None:
    caller = broker.x509_caller(AGENT)
    pending = _deploy(broker, caller)
    broker.decide(pending.approval_id)
    issued = asyncio.run(broker.exchange.await_approval(caller, pending.approval_id))
    with pytest.raises(PolicyDenied, match="fresh approval"):
        broker.renew(caller, _id(issued), 60)
    assert broker.lease(_id(issued)).state is LeaseState.ACTIVE


# -- failures change nothing ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Refusal:
    id: str
    error: type[BrokerError]
    caller: str = AGENT
    action: str = "repo:read"
    resource: str = RESOURCE
    subject: str = ""  # how the subject token is spoiled: see `_spoiled_subject`


REFUSALS = [
    Refusal("policy_deny", PolicyDenied, action="repo:delete"),
    Refusal("policy_deny_other_resource", PolicyDenied, resource="repo:org/secret"),
    Refusal("task_conflict", TaskConflict, caller=OTHER),
    Refusal("task_conflict_via_subject_token", TaskConflict, subject="other_principal"),
    Refusal("subject_token_wrong_audience", CredentialRejected, subject="wrong_audience"),
    Refusal("subject_token_expired", CredentialRejected, subject="expired"),
    Refusal("subject_token_untrusted_key", CredentialRejected, subject="untrusted_key"),
    Refusal("subject_token_garbage", CredentialRejected, subject="garbage"),
    Refusal("id_token_of_unconfigured_issuer", CredentialRejected, subject="unconfigured_issuer"),
    Refusal("delegation_from_revoked_lease", CredentialRejected, subject="revoked_parent"),
    Refusal("delegation_widening_scope", PolicyDenied, action="repo:merge", subject="parent"),
]


def _spoiled_subject(broker: Broker, kind: str, parent: Issued, revoked: Issued) -> tuple[str, str]:
    """(subject_token, subject_token_type) for a refusal case."""
    match kind:
        case "other_principal":
            return broker.jwt_svid(OTHER), TOKEN_TYPE_JWT
        case "wrong_audience":
            return broker.jwt_svid(HUMAN, audience=REPO), TOKEN_TYPE_JWT
        case "expired":
            token = broker.authorities.jwt.jwt_svid(HUMAN, BROKER_ID, ttl=60, now=T0 - 600)
            return token, TOKEN_TYPE_JWT
        case "untrusted_key":
            return broker.jwt_svid(HUMAN, signer=broker.authorities.stranger_jwt), TOKEN_TYPE_JWT
        case "unconfigured_issuer":
            return broker.jwt_svid(HUMAN), TOKEN_TYPE_ID_TOKEN
        case "garbage":
            return "not.a.jwt", TOKEN_TYPE_JWT
        case "revoked_parent":
            return revoked.access_token, TOKEN_TYPE_ACCESS_TOKEN
        case "parent":
            return parent.access_token, TOKEN_TYPE_ACCESS_TOKEN
    return "", ""


@pytest.mark.parametrize("case", REFUSALS, ids=[c.id for c in REFUSALS])
def test_failed_request_changes_no_state(broker: Broker, case: Refusal) -> None:
    owner = broker.x509_caller(AGENT)
    parent = broker.ask(owner)
    revoked = broker.ask(owner, actions=("repo:clone",))
    broker.leases.revoke(_id(revoked), Reason.OPERATOR, now=T0, initiator=OPERATOR)
    caller = broker.x509_caller(case.caller)
    token, token_type = _spoiled_subject(broker, case.subject, parent, revoked)
    delegated = token_type == TOKEN_TYPE_ACCESS_TOKEN
    before = (broker.leases.counts(), broker.leases.footprint(), broker.state_records())
    with pytest.raises(case.error):
        broker.ask(
            caller,
            actions=(case.action,),
            resource="" if delegated else case.resource,
            audience="" if delegated else REPO,
            task_id="" if delegated else "task-1",
            subject_token=token,
            subject_token_type=token_type,
        )
    assert (broker.leases.counts(), broker.leases.footprint(), broker.state_records()) == before
    assert broker.approvals.list(include_decided=True) == []


def test_policy_deny_is_audited_as_a_decision(broker: Broker) -> None:
    with pytest.raises(PolicyDenied):
        broker.ask(broker.x509_caller(AGENT), actions=("repo:delete",))
    decision = broker.audit_records()[-1]
    assert (decision["kind"], decision["decision"]) == ("decision", "deny")
    assert "repo:delete" in decision["reason"]


# -- the audit trail --------------------------------------------------------------------


def test_audit_never_contains_a_token(broker: Broker) -> None:
    caller = broker.x509_caller(AGENT)
    root = broker.ask(caller, context={"reason": "nightly build"})
    broker.ask(caller, subject_token=broker.jwt_svid(AGENT), task_id="task-2")
    child = broker.delegate(broker.x509_caller(SUB1), root.access_token)
    broker.renew(caller, _id(root), 60)
    asyncio.run(broker.leasing.introspect(broker.x509_caller(REPO), child.access_token))
    asyncio.run(broker.leasing.complete_task(caller, "task-1"))
    text = broker.audit_text()
    assert len(broker.tokens) == 5  # four broker tokens and one JWT-SVID
    for token in broker.tokens:
        assert token not in text
        for segment in token.split("."):
            assert segment not in text
    issued = [r["token_sha256"] for r in broker.audit_records() if r["kind"] == "token.issued"]
    assert issued == [token_hash(t) for t in broker.tokens if t in _access_tokens(broker)]


def _access_tokens(broker: Broker) -> set[str]:
    """The broker's own tokens among those seen (the others are JWT-SVIDs)."""
    mine = set()
    for token in broker.tokens:
        try:
            broker.minter.verify(token, now=T0)
        except CredentialRejected:
            continue
        mine.add(token)
    return mine


def test_introspector_glob_is_honoured(build: Build) -> None:
    broker = build(introspectors=(f"spiffe://{TD}/gateway/*",))
    issued = broker.ask(broker.x509_caller(AGENT))
    gateway = broker.x509_caller(f"spiffe://{TD}/gateway/eu")
    answer = asyncio.run(broker.leasing.introspect(gateway, issued.access_token))
    assert answer.active is True


def test_jwt_svid_caller_renewal_is_capped_by_its_fresh_token_not_the_first(build: Build) -> None:
    broker = build()
    first = asyncio.run(broker.verifiers.verify_token(broker.jwt_svid(AGENT, ttl=400), now=T0))
    issued = broker.ask(first, ttl=300)
    broker.clock.advance(250)
    fresh = asyncio.run(broker.verifiers.verify_token(broker.jwt_svid(AGENT, ttl=600), now=broker.clock.now()))
    renewed = broker.renew(fresh, issued.lease.id, 300)
    assert renewed.ttl_capped_by == "requested"
    assert renewed.lease.expires_at == int(broker.clock.now()) + 300


def test_a_caller_waiting_on_too_many_approvals_is_rate_limited(build: Build) -> None:
    broker = build(max_pending_approvals=2)
    caller = broker.x509_caller(AGENT)
    for task in ("t1", "t2"):
        assert broker.ask(caller, task_id=task, actions=("deploy",), resource="service:app").state == PENDING_APPROVAL
    with pytest.raises(QuotaExceeded, match="waiting on 2 approvals"):
        broker.ask(caller, task_id="t3", actions=("deploy",), resource="service:app")
    assert broker.approvals.pending_count(caller.principal) == 2


def test_a_principal_with_too_many_tasks_cannot_open_another(build: Build) -> None:
    broker = build(max_tasks_per_principal=2)
    caller = broker.x509_caller(AGENT)
    broker.ask(caller, task_id="t1")
    broker.ask(caller, task_id="t2")
    broker.ask(caller, task_id="t2")  # an existing task is still usable
    with pytest.raises(QuotaExceeded, match="already has 2 tasks"):
        broker.ask(caller, task_id="t3")
    assert broker.leases.get_task("t3") is None


def test_an_approved_request_this_broker_cannot_read_is_refused_and_issues_nothing(broker: Broker) -> None:
    from dataclasses import replace as changed

    from broker.domain.errors import ApprovalNotPending

    caller = broker.x509_caller(AGENT)
    pending = _deploy(broker, caller)
    approval = broker.decide(pending.approval_id)
    # As if written by another version of the broker: the table holds what the log said.
    broker.approvals._approvals[approval.id] = changed(approval, request={"version": 99})
    with pytest.raises(ApprovalNotPending, match="cannot be read"):
        asyncio.run(broker.exchange.await_approval(caller, pending.approval_id))
    assert broker.leases.counts()["active"] == 0
