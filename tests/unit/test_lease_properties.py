"""Property-based tests of leases, delegation and approvals against a small reference model.

A hypothesis state machine drives the real core (Exchange, Leasing, Admin, the reaper, the
lease table and the approval store, wired as `server.build_app` does) with random sequences
of exchanges, renewals, delegations, revocations by every selector, task completions,
approval decisions, introspections and clock advances. A model written here predicts which
leases each step ends and what every call answers; after every step the invariants are
checked: no active lease past its expiry or its task's deadline, no child outliving or
out-scoping its parent, every end event emitted exactly once, the indexes agreeing with a
full scan, and (at the end) memory back to empty once every tombstone's time is up.
"""

from __future__ import annotations

import asyncio
import functools
import io
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from broker.approvals.store import RETENTION_SECONDS, ApprovalState
from broker.domain.errors import (
    ApprovalDenied,
    ApprovalExpired,
    ApprovalNotPending,
    BrokerError,
    CredentialRejected,
    LeaseInactive,
    LeaseNotFound,
    LifetimeExhausted,
    PermissionDenied,
    PolicyDenied,
    QuotaExceeded,
    TaskConflict,
    TaskNotFound,
)
from broker.domain.identity import Identity
from broker.domain.intent import TOKEN_TYPE_ACCESS_TOKEN, Intent
from broker.jose.keys import SigningKey
from broker.leases.table import Lease, LeaseEnded, LeaseState, LeaseTable
from broker.ops.audit import AuditLog
from broker.policy.engine import PolicyEngine
from broker.store.base import MemoryStore
from broker.testing.clock import FakeClock
from broker.testing.x509_ca import SpiffeCA
from broker.tokens.minter import TokenMinter
from broker.usecases.exchange import Exchange
from broker.usecases.issuance import ISSUED, PENDING_APPROVAL, Issued, Issuer, Settings
from broker.usecases.lifecycle import Leasing
from broker.usecases.operations import Admin
from broker.usecases.reaper import Reaper
from broker.verify import Verifiers, X509SvidVerifier
from tests.support.properties import bounded

T0 = 1_750_000_000
TD = "example.org"
BROKER_ID = f"spiffe://{TD}/broker"
AGENTS = tuple(f"spiffe://{TD}/agent/{name}" for name in ("a", "b", "c"))
OPERATOR = f"spiffe://{TD}/operator/ops"
GATEWAY = f"spiffe://{TD}/service/gateway"
TASKS = ("t0", "t1", "t2", "t3")
REPO, SERVICE = "repo", "svc"
REPO_ACTIONS = ("repo:read", "repo:clone", "repo:merge")
POLICY = """\
@id("agents-read")
permit (principal, action in [Action::"repo:read", Action::"repo:clone"], resource == Resource::"repo:org/app");

@id("merge-is-short")
@max_ttl("120")
permit (principal, action == Action::"repo:merge", resource == Resource::"repo:org/app");

@id("deploy-needs-approval")
@approval("required")
permit (principal, action == Action::"deploy", resource == Resource::"service:app");
"""
SETTINGS = dict(default_ttl=60, max_ttl=300, max_task_lifetime=600, approval_ttl=120, max_pending_approvals=2)
GRACE = 30.0
ADVANCES = (0, 1, 7, 30, 59, 61, 121, 301, 601, 1000)


@functools.cache
def _world() -> tuple[Path, Verifiers, dict[str, Identity]]:
    """The CA, the policy file and one mTLS identity per principal: made once (keys are slow)."""
    folder = Path(tempfile.mkdtemp(prefix="lease-properties-"))
    (folder / "broker.cedar").write_text(POLICY)
    ca = SpiffeCA(TD, now=T0)
    verifiers = Verifiers(x509=X509SvidVerifier({TD: [ca.root]}), jwt_svid=None, oidc=[])
    callers = {}
    for principal in (*AGENTS, OPERATOR, GATEWAY):
        svid = ca.x509_svid(principal, ttl=30 * 86_400, now=T0)
        callers[principal] = verifiers.verify_peer(svid.cert_pem(), [], now=T0)
    return folder, verifiers, callers


@dataclass
class ModelLease:
    id: str
    task_id: str
    subject: str
    client: str
    audience: str
    scope: tuple[str, ...]
    expires_at: float
    token_exp: float
    token: str
    parent: str | None
    depth: int
    active: bool = True


@dataclass
class ModelTask:
    owner: str
    deadline: float
    open: bool = True


@dataclass
class ModelApproval:
    id: str
    client: str
    task_id: str
    expires_at: float
    parent: str | None  # for a delegation: the parent lease, and the presented token's exp
    token_exp: float | None
    state: ApprovalState = ApprovalState.PENDING


@dataclass
class Model:
    leases: dict[str, ModelLease] = field(default_factory=dict)
    tasks: dict[str, ModelTask] = field(default_factory=dict)
    approvals: dict[str, ModelApproval] = field(default_factory=dict)

    def active(self) -> list[ModelLease]:
        return [m for m in self.leases.values() if m.active]

    def with_descendants(self, roots: set[str]) -> set[str]:
        found, frontier = set(roots), set(roots)
        while frontier:
            frontier = {m.id for m in self.active() if m.parent in frontier} - found
            found |= frontier
        return found

    def end(self, ids: set[str]) -> None:
        for lease_id in ids:
            self.leases[lease_id].active = False

    def pending(self, client: str) -> int:
        return sum(1 for a in self.approvals.values() if a.client == client and a.state is ApprovalState.PENDING)


class LeaseMachine(RuleBasedStateMachine):
    """Drives the core and the model side by side; see the module docstring."""

    def __init__(self) -> None:
        super().__init__()
        folder, verifiers, self.callers = _world()
        self.clock = FakeClock(start=T0)
        self.loop = asyncio.new_event_loop()
        self.leases = LeaseTable(tombstone_grace=GRACE)
        self.approvals = self.leases.approvals
        self.minter = TokenMinter(BROKER_ID, SigningKey.generate())
        audit = AuditLog(io.StringIO(), clock=self.clock)
        self.store = MemoryStore(self.leases, minter=self.minter)
        self.store.on_committed(audit.on_event)
        self.ends: Counter[str] = Counter()
        self.step_ends: list[str] = []
        self.leases.subscribe(self._on_event)
        settings = Settings(issuer=BROKER_ID, introspectors=(GATEWAY,), **SETTINGS)
        core = {"store": self.store, "minter": self.minter, "audit": audit, "clock": self.clock}
        issuer = Issuer(settings=settings, **core)
        policy = PolicyEngine.from_files(folder / "broker.cedar")
        self.exchange = Exchange(
            verifiers=verifiers, policy=policy, issuer=issuer, settings=settings, **core
        )
        self.leasing = Leasing(policy=policy, issuer=issuer, settings=settings, **core)
        self.admin = Admin(policy=policy, **core)
        self.reaper = Reaper(store=self.store, minter=self.minter, clock=self.clock)
        self.model = Model()

    def _on_event(self, event: object) -> None:
        if isinstance(event, LeaseEnded):
            self.ends[event.lease.id] += 1
            self.step_ends.append(event.lease.id)

    def _expect_ended(self, ids: set[str]) -> None:
        """The leases this step ended are exactly `ids`, each once; the model follows."""
        assert sorted(self.step_ends) == sorted(ids)
        self.model.end(ids)
        self.step_ends.clear()

    def _run(self, coro: object) -> Issued:
        return self.loop.run_until_complete(coro)  # type: ignore[arg-type]

    @property
    def now(self) -> float:
        return self.clock.now()

    # -- recording what the core answered ------------------------------------------------

    def _record_issued(self, issued: Issued, caller: str, parent: ModelLease | None) -> None:
        lease = issued.lease
        assert issued.state == ISSUED and lease is not None
        assert lease.expires_at > self.now
        task = self.model.tasks[lease.task_id]
        assert lease.expires_at <= task.deadline
        if parent is None:
            assert lease.expires_at <= self.now + SETTINGS["max_ttl"]
        else:
            assert lease.expires_at <= parent.expires_at
            assert set(lease.scope) <= set(parent.scope)
            assert lease.task_id == parent.task_id and lease.depth == parent.depth + 1
        self.model.leases[lease.id] = ModelLease(
            id=lease.id,
            task_id=lease.task_id,
            subject=lease.subject,
            client=caller,
            audience=lease.audience,
            scope=lease.scope,
            expires_at=lease.expires_at,
            token_exp=lease.expires_at,
            token=issued.access_token,
            parent=parent.id if parent else None,
            depth=parent.depth + 1 if parent else 0,
        )

    def _root_outcome(self, agent: str, task_id: str) -> type[BrokerError] | None:
        task = self.model.tasks.get(task_id)
        if task is not None and (task.owner != agent or not task.open):
            return TaskConflict
        return None

    # -- rules ---------------------------------------------------------------------------

    @initialize(agent=st.sampled_from(AGENTS), task_id=st.sampled_from(TASKS))
    def start_with_a_lease(self, agent: str, task_id: str) -> None:
        self.exchange_root(agent, task_id, "repo", list(REPO_ACTIONS), 0)

    @initialize(agents=st.lists(st.sampled_from(AGENTS), min_size=1, max_size=3))
    def then_a_delegation_chain(self, agents: list[str]) -> None:
        # Initializers run in random order: with no lease yet there is nothing to delegate.
        for depth, agent in enumerate(agents):
            if self.model.leases:
                self.delegate(len(self.model.leases) - 1 if depth else 0, agent, widen=False, ttl=0)

    @rule(
        agent=st.sampled_from(AGENTS),
        task_id=st.sampled_from(TASKS),
        kind=st.sampled_from(["repo", "repo", "repo", "deploy", "forbidden"]),
        actions=st.lists(st.sampled_from(REPO_ACTIONS), min_size=1, max_size=3, unique=True),
        ttl=st.sampled_from([0, 1, 30, 200, 3600]),
    )
    def exchange_root(self, agent: str, task_id: str, kind: str, actions: list[str], ttl: int) -> None:
        audience, resource = (SERVICE, "service:app") if kind == "deploy" else (REPO, "repo:org/app")
        wanted = ("deploy",) if kind == "deploy" else ("repo:delete",) if kind == "forbidden" else tuple(actions)
        intent = Intent.parse(
            task_id=task_id, audience=audience, actions=wanted, resource=resource, ttl_seconds=ttl, context={}
        )
        expected = self._root_outcome(agent, task_id)
        if expected is None and kind == "forbidden":
            expected = PolicyDenied
        if expected is None and kind == "deploy" and self.model.pending(agent) >= SETTINGS["max_pending_approvals"]:
            expected = QuotaExceeded
        try:
            issued = self._run(self.exchange.exchange(self.callers[agent], intent))
        except BrokerError as e:
            assert type(e) is expected, e
            return self._expect_ended(set())
        assert expected is None, f"expected {expected}, got {issued.state}"
        if kind == "deploy":
            assert issued.state == PENDING_APPROVAL
            self._record_approval(issued.approval_id, agent, task_id, parent=None, token_exp=None)
        else:
            self.model.tasks.setdefault(task_id, ModelTask(owner=agent, deadline=self.now + 600))
            self._record_issued(issued, agent, parent=None)
        self._expect_ended(set())

    def _record_approval(self, approval_id: str, client: str, task_id: str, **kw: object) -> None:
        self.model.approvals[approval_id] = ModelApproval(
            id=approval_id, client=client, task_id=task_id, expires_at=self.now + SETTINGS["approval_ttl"], **kw
        )

    def _pick(self, items: list, index: int):
        return items[index % len(items)]

    @precondition(lambda self: self.model.leases)
    @rule(
        index=st.integers(0, 10**6),
        agent=st.sampled_from(AGENTS),
        widen=st.booleans(),
        ttl=st.sampled_from([0, 5, 900]),
    )
    def delegate(self, index: int, agent: str, widen: bool, ttl: int) -> None:
        parent = self._pick(list(self.model.leases.values()), index)
        # Widening asks for an action policy would allow but the parent does not hold, when there is one.
        unheld = [a for a in REPO_ACTIONS if a not in parent.scope] or ["repo:delete"]
        actions = (*parent.scope[:1], unheld[0]) if widen else parent.scope[-1:]
        intent = Intent.parse(
            task_id="",
            audience="",
            actions=actions,
            resource="",
            ttl_seconds=ttl,
            context={},
            subject_token=parent.token,
            subject_token_type=TOKEN_TYPE_ACCESS_TOKEN,
        )
        expected: type[BrokerError] | None = None
        if not parent.active:
            expected = CredentialRejected
        elif parent.depth + 1 > 3:
            expected = PermissionDenied
        elif widen:
            expected = PolicyDenied
        elif "deploy" in actions and self.model.pending(agent) >= SETTINGS["max_pending_approvals"]:
            expected = QuotaExceeded
        try:
            issued = self._run(self.exchange.exchange(self.callers[agent], intent))
        except BrokerError as e:
            assert type(e) is expected, e
            return self._expect_ended(set())
        assert expected is None, f"expected {expected}, got {issued.state}"
        if "deploy" in actions:
            assert issued.state == PENDING_APPROVAL
            self._record_approval(
                issued.approval_id, agent, parent.task_id, parent=parent.id, token_exp=parent.expires_at
            )
        else:
            self._record_issued(issued, agent, parent=parent)
        self._expect_ended(set())

    @precondition(lambda self: self.model.leases)
    @rule(index=st.integers(0, 10**6), by_holder=st.booleans(), ttl=st.sampled_from([0, 2, 100, 3600]))
    def renew(self, index: int, by_holder: bool, ttl: int) -> None:
        lease = self._pick(list(self.model.leases.values()), index)
        caller = lease.client if by_holder else next(a for a in AGENTS if a != lease.client)
        expected: type[BrokerError] | None = None
        if not by_holder:
            expected = LeaseNotFound
        elif not lease.active:
            expected = LeaseInactive
        elif "deploy" in lease.scope:
            expected = PolicyDenied  # a fresh approval is needed
        try:
            issued = self._run(self.leasing.renew(self.callers[caller], lease.id, ttl))
        except BrokerError as e:
            assert type(e) is expected, e
            return self._expect_ended(set())
        assert expected is None, f"expected {expected}"
        renewed = issued.lease
        assert renewed is not None and self.now < renewed.expires_at
        assert renewed.expires_at <= self.model.tasks[lease.task_id].deadline
        if lease.parent is not None:
            assert renewed.expires_at <= self.model.leases[lease.parent].expires_at
        lease.expires_at = renewed.expires_at
        lease.token_exp = max(lease.token_exp, renewed.expires_at)
        lease.token = issued.access_token
        self._expect_ended(set())

    @precondition(lambda self: self.model.leases)
    @rule(index=st.integers(0, 10**6))
    def revoke_lease(self, index: int) -> None:
        lease = self._pick(list(self.model.leases.values()), index)
        ended = self.model.with_descendants({lease.id}) if lease.active else set()
        assert self._run(self.admin.revoke_lease(self.callers[OPERATOR], lease.id, "")) == len(ended)
        self._expect_ended(ended)

    @rule(task_id=st.sampled_from(TASKS))
    def revoke_task(self, task_id: str) -> None:
        ended = {m.id for m in self.model.active() if m.task_id == task_id}
        assert self._run(self.admin.revoke_task(self.callers[OPERATOR], task_id, "")) == len(ended)
        if task_id in self.model.tasks:
            self.model.tasks[task_id].open = False
        self._expect_ended(ended)

    @rule(subject=st.sampled_from(AGENTS))
    def revoke_subject(self, subject: str) -> None:
        roots = {m.id for m in self.model.active() if subject in (m.subject, m.client)}
        ended = self.model.with_descendants(roots)
        assert self._run(self.admin.revoke_subject(self.callers[OPERATOR], subject, "")) == len(ended)
        self._expect_ended(ended)

    @rule()
    def revoke_all(self) -> None:
        ended = {m.id for m in self.model.active()}
        assert self._run(self.admin.revoke_all(self.callers[OPERATOR], "")) == len(ended)
        self._expect_ended(ended)

    @rule(agent=st.sampled_from(AGENTS), task_id=st.sampled_from(TASKS))
    def complete(self, agent: str, task_id: str) -> None:
        task = self.model.tasks.get(task_id)
        expected = TaskNotFound if task is None else TaskConflict if task.owner != agent else None
        try:
            count = self._run(self.leasing.complete_task(self.callers[agent], task_id))
        except BrokerError as e:
            assert type(e) is expected, e
            return self._expect_ended(set())
        assert expected is None and task is not None
        ended = {m.id for m in self.model.active() if m.task_id == task_id} if task.open else set()
        assert count == len(ended)
        task.open = False
        self._expect_ended(ended)

    @precondition(lambda self: self.model.leases)
    @rule(index=st.integers(0, 10**6))
    def introspect(self, index: int) -> None:
        lease = self._pick(list(self.model.leases.values()), index)
        answer = self._run(self.leasing.introspect(self.callers[GATEWAY], lease.token))
        assert answer.active is lease.active
        self._expect_ended(set())

    @precondition(lambda self: self.model.approvals)
    @rule(index=st.integers(0, 10**6), approve=st.booleans())
    def decide(self, index: int, approve: bool) -> None:
        approval = self._pick(list(self.model.approvals.values()), index)
        expected = None if approval.state is ApprovalState.PENDING else ApprovalNotPending
        if approval.state is ApprovalState.EXPIRED:
            expected = ApprovalExpired
        decide = self.admin.approve if approve else self.admin.deny
        try:
            self._run(decide(self.callers[OPERATOR], approval.id, ""))
        except BrokerError as e:
            assert type(e) is expected, e
            return self._expect_ended(set())
        assert expected is None
        approval.state = ApprovalState.APPROVED if approve else ApprovalState.DENIED
        self._expect_ended(set())

    @precondition(lambda self: any(a.state is not ApprovalState.PENDING for a in self.model.approvals.values()))
    @rule(index=st.integers(0, 10**6))
    def await_decision(self, index: int) -> None:
        decided = [a for a in self.model.approvals.values() if a.state is not ApprovalState.PENDING]
        approval = self._pick(decided, index)
        expected = self._await_outcome(approval)
        try:
            issued = self._run(self.exchange.await_approval(self.callers[approval.client], approval.id))
        except BrokerError as e:
            assert type(e) is expected, e
            return self._expect_ended(set())
        assert expected is None, f"expected {expected}"
        parent = self.model.leases[approval.parent] if approval.parent else None
        if parent is None:
            self.model.tasks.setdefault(approval.task_id, ModelTask(owner=approval.client, deadline=self.now + 600))
        self._record_issued(issued, approval.client, parent=parent)
        approval.state = ApprovalState.USED
        self._expect_ended(set())

    def _await_outcome(self, approval: ModelApproval) -> type[BrokerError] | None:
        errors = {
            ApprovalState.DENIED: ApprovalDenied,
            ApprovalState.EXPIRED: ApprovalExpired,
            ApprovalState.USED: ApprovalNotPending,
        }
        if approval.state in errors:
            return errors[approval.state]
        if approval.parent is None:
            return self._root_outcome(approval.client, approval.task_id)
        if not self.model.leases[approval.parent].active:
            return LeaseInactive
        if approval.token_exp is not None and approval.token_exp - self.now < 1:
            return LifetimeExhausted  # the token handed over has run out, whatever its lease did
        return None

    @rule(seconds=st.sampled_from(ADVANCES))
    def advance(self, seconds: int) -> None:
        now = self.clock.advance(seconds)
        self._run(self.reaper.expire())
        self._expect_ended(self._due(now))
        self._forget(now)

    def _due(self, now: float) -> set[str]:
        """What the reaper must end at `now`: expired leases, leases of past-deadline tasks, descendants."""
        model = self.model
        dead_tasks = {t for t, task in model.tasks.items() if task.open and task.deadline <= now}
        for task_id in dead_tasks:
            model.tasks[task_id].open = False
        roots = {m.id for m in model.active() if m.expires_at <= now or m.task_id in dead_tasks}
        return model.with_descendants(roots)

    def _forget(self, now: float) -> None:
        """Drop what the broker no longer needs to remember at `now`."""
        model = self.model
        for task_id in [t for t, task in model.tasks.items() if task.deadline + GRACE <= now]:
            del model.tasks[task_id]
        for lease_id in [m.id for m in model.leases.values() if not m.active and m.token_exp + GRACE <= now]:
            del model.leases[lease_id]
        for approval in list(model.approvals.values()):
            if approval.expires_at <= now and approval.state in (ApprovalState.PENDING, ApprovalState.APPROVED):
                approval.state = ApprovalState.EXPIRED
            if approval.expires_at + RETENTION_SECONDS <= now:
                del model.approvals[approval.id]

    # -- invariants ----------------------------------------------------------------------

    @invariant()
    def active_leases_keep_every_bound(self) -> None:
        now = self.now
        for lease in self.leases.list():
            task = self.leases.get_task(lease.task_id)
            assert lease.expires_at > now
            assert task is not None and task.is_open(now)
            if lease.parent_id is not None:
                parent = self.leases.get(lease.parent_id)
                assert parent is not None and parent.state is LeaseState.ACTIVE
                assert lease.expires_at <= parent.token_exp
                assert set(lease.scope) <= set(parent.scope)
                assert (lease.task_id, lease.depth) == (parent.task_id, parent.depth + 1)

    @invariant()
    def table_agrees_with_the_model(self) -> None:
        kept = self._scan()
        assert set(kept) == set(self.model.leases)
        for lease_id, m in self.model.leases.items():
            assert (kept[lease_id].state is LeaseState.ACTIVE) is m.active
            assert self.ends[lease_id] == (0 if m.active else 1)
        assert max(self.ends.values(), default=0) <= 1
        for approval in self.model.approvals.values():
            stored = self.approvals.get(approval.id)
            assert stored is not None and stored.state is approval.state

    def _scan(self) -> dict[str, Lease]:
        return {lease.id: lease for lease in self.leases.list(include_inactive=True)}

    @invariant()
    def indexes_agree_with_a_full_scan(self) -> None:
        kept = list(self._scan().values())
        for attr in ("task_id", "subject", "audience"):
            for key in {getattr(lease, attr) for lease in kept}:
                found = self.leases.list(include_inactive=True, **{attr: key})
                assert found == sorted((x for x in kept if getattr(x, attr) == key), key=lambda x: (x.issued_at, x.id))
        ids = {lease.id for lease in kept}
        for lease in kept:
            children = tuple(sorted(x.id for x in kept if x.parent_id == lease.id))
            assert self.leases.children(lease.id) == children
        active = sum(1 for x in kept if x.state is LeaseState.ACTIVE)
        tasks = {t for t in TASKS if self.leases.get_task(t) is not None}
        assert self.leases.counts() == {"active": active, "tombstones": len(kept) - active, "tasks": len(tasks)}
        assert set(tasks) == set(self.model.tasks)
        footprint = self.leases.footprint()
        kept_parents = {x.parent_id for x in kept if x.parent_id in ids}
        delegated = [x for x in kept if x.client_id != x.subject]
        assert footprint["index_entries"] == 3 * len(kept) + len(delegated) + sum(1 for x in kept if x.parent_id in ids)
        owners = {self.leases.get_task(t).owner for t in tasks}  # type: ignore[union-attr]
        keys = (
            len({x.task_id for x in kept})
            + len({x.subject for x in kept})
            + len({x.audience for x in kept})
            + len({x.client_id for x in delegated})
            + len(kept_parents)
            + len(owners)
        )
        assert footprint["index_keys"] == keys

    def teardown(self) -> None:
        try:
            # Far past every deadline, expiry, tombstone grace and approval retention.
            self.clock.advance(600 + 300 + GRACE + SETTINGS["approval_ttl"] + RETENTION_SECONDS + 1)
            self._run(self.reaper.expire())
            self._expect_ended(self._due(self.now))
            self._forget(self.now)
            assert not self.model.leases and not self.model.tasks and not self.model.approvals
            assert self.leases.footprint() == {"leases": 0, "tasks": 0, "heap": 0, "index_keys": 0, "index_entries": 0}
            assert self.approvals.list(include_decided=True) == []
            assert self.approvals.next_deadline() is None
            assert all(count == 1 for count in self.ends.values())
        finally:
            self.loop.close()


LeaseMachine.TestCase.settings = bounded(120, stateful_step_count=45)
TestLeaseProperties = LeaseMachine.TestCase
