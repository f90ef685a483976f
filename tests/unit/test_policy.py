"""PolicyEngine: Cedar decisions, obligations, ids, context safety and atomic reload."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from broker.domain.errors import PolicyError
from broker.policy.engine import Decision, PolicyEngine

REPO_ROOT = Path(__file__).resolve().parents[2]

ALICE = "spiffe://example.org/alice"
CI_BOT = "spiffe://example.org/ci/bot"
OIDC_USER = "oidc:https://issuer.test#42"

POLICY = """
permit (principal == Workload::"spiffe://example.org/alice", action == Action::"repo:read", resource);

@id("ci-merge")
@max_ttl("1800")
permit (principal in Team::"ci", action == Action::"repo:merge", resource)
when { resource has sensitivity && resource.sensitivity == "low" };

@id("prod-ticket")
@max_ttl("900")
permit (principal in Team::"ci", action == Action::"repo:merge", resource)
when { resource has sensitivity && resource.sensitivity == "prod" && context.request has ticket };

@id("ci-merge-short")
@max_ttl("300")
permit (principal in Team::"ci", action == Action::"repo:merge", resource == Resource::"repo:org/short");

@id("deploy")
@approval("required")
permit (principal in Team::"ci", action == Action::"deploy", resource);

@id("deny-delegated-deploy")
forbid (principal, action == Action::"deploy", resource) when { context.delegated };

@id("claims-admin")
permit (principal, action == Action::"admin:view", resource)
when { context has claims && context.claims has groups && context.claims.groups.contains("admins") };
"""

ENTITIES = [
    {"uid": {"type": "Team", "id": "ci"}, "attrs": {}, "parents": []},
    {"uid": {"type": "Workload", "id": CI_BOT}, "attrs": {}, "parents": [{"type": "Team", "id": "ci"}]},
    {"uid": {"type": "Resource", "id": "repo:org/low"}, "attrs": {"sensitivity": "low"}, "parents": []},
    {"uid": {"type": "Resource", "id": "repo:org/short"}, "attrs": {"sensitivity": "low"}, "parents": []},
    {"uid": {"type": "Resource", "id": "repo:org/prod"}, "attrs": {"sensitivity": "prod"}, "parents": []},
    {"uid": {"type": "Resource", "id": "repo:org/secret"}, "attrs": {"sensitivity": "restricted"}, "parents": []},
]


def base_context(**overrides: Any) -> dict[str, Any]:
    context: dict[str, Any] = {
        "task_id": "task-1",
        "audience": "spiffe://example.org/api",
        "ttl_seconds": 300,
        "auth": "x509-svid",
        "trust_domain": "example.org",
        "delegated": False,
        "delegation_depth": 0,
        "actor": None,
        "claims": {},
        "request": {},
    }
    context.update(overrides)
    return context


def write_engine(tmp_path: Path, policy: str = POLICY, entities: Any = ENTITIES) -> PolicyEngine:
    policy_path = tmp_path / "broker.cedar"
    policy_path.write_text(policy)
    entities_path = None
    if entities is not None:
        entities_path = tmp_path / "entities.json"
        entities_path.write_text(entities if isinstance(entities, str) else json.dumps(entities))
    return PolicyEngine.from_files(policy_path, entities_path)


@pytest.fixture
def engine(tmp_path: Path) -> PolicyEngine:
    return write_engine(tmp_path)


# --- single decisions ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DecideCase:
    id: str
    principal: str
    action: str
    resource: str
    allowed: bool
    policies: tuple[str, ...]
    reason: str
    context: Mapping[str, Any] = field(default_factory=dict)
    max_ttl: int | None = None
    approval: bool = False


DECIDE_CASES = [
    DecideCase("permit", ALICE, "repo:read", "repo:org/app", True, ("policy0",), "permitted by policy0"),
    DecideCase("default-deny", ALICE, "repo:merge", "repo:org/low", False, (), "no policy permits repo:merge"),
    DecideCase(
        "unknown-principal-denied",
        "spiffe://example.org/nobody",
        "repo:read",
        "repo:org/app",
        False,
        (),
        "no policy permits repo:read",
    ),
    DecideCase(
        "team-member-permitted",
        CI_BOT,
        "repo:merge",
        "repo:org/low",
        True,
        ("ci-merge",),
        "permitted by ci-merge",
        max_ttl=1800,
    ),
    DecideCase(
        "restricted-resource-denied", CI_BOT, "repo:merge", "repo:org/secret", False, (), "no policy permits repo:merge"
    ),
    DecideCase(
        "prod-without-ticket-denied", CI_BOT, "repo:merge", "repo:org/prod", False, (), "no policy permits repo:merge"
    ),
    DecideCase(
        "prod-with-ticket-capped",
        CI_BOT,
        "repo:merge",
        "repo:org/prod",
        True,
        ("prod-ticket",),
        "permitted by prod-ticket",
        context={"request": {"ticket": "OPS-1"}},
        max_ttl=900,
    ),
    DecideCase(
        "two-permits-smallest-ttl",
        CI_BOT,
        "repo:merge",
        "repo:org/short",
        True,
        ("ci-merge", "ci-merge-short"),
        "permitted by ci-merge, ci-merge-short",
        max_ttl=300,
    ),
    DecideCase(
        "approval-required", CI_BOT, "deploy", "env:prod", True, ("deploy",), "permitted by deploy", approval=True
    ),
    DecideCase(
        "forbid-overrides-permit",
        CI_BOT,
        "deploy",
        "env:prod",
        False,
        ("deny-delegated-deploy",),
        "forbidden by deny-delegated-deploy",
        context={"delegated": True, "delegation_depth": 1},
    ),
    DecideCase(
        "oidc-claim-permitted",
        OIDC_USER,
        "admin:view",
        "console",
        True,
        ("claims-admin",),
        "permitted by claims-admin",
        context={"auth": "oidc", "claims": {"groups": ["dev", "admins"]}},
    ),
    DecideCase(
        "oidc-claim-missing-denied",
        OIDC_USER,
        "admin:view",
        "console",
        False,
        (),
        "no policy permits admin:view",
        context={"auth": "oidc", "claims": {"groups": ["dev"]}},
    ),
]


@pytest.mark.parametrize("case", DECIDE_CASES, ids=lambda c: c.id)
def test_decide(engine: PolicyEngine, case: DecideCase) -> None:
    decision = engine.decide(case.principal, case.action, case.resource, base_context(**case.context))
    assert decision == Decision(
        allowed=case.allowed,
        policies=case.policies,
        max_ttl=case.max_ttl,
        approval_required=case.approval,
        errors=decision.errors,
        reason=case.reason,
    )


def test_unknown_principal_and_resource_have_no_parents_and_no_attributes(tmp_path: Path) -> None:
    policy = """
    @id("bare") permit (principal, action == Action::"a", resource)
    when { !(principal has team) && !(resource has sensitivity) && !(principal in Team::"ci") };
    """
    engine = write_engine(tmp_path, policy, ENTITIES)
    decision = engine.decide("spiffe://example.org/new", "a", "repo:org/new", base_context())
    assert decision.allowed
    assert decision.policies == ("bare",)


def test_evaluation_error_is_reported_with_the_policy_name(tmp_path: Path) -> None:
    policy = '@id("needs-owner") permit (principal, action, resource) when { resource.owner == "me" };'
    engine = write_engine(tmp_path, policy, ENTITIES)
    decision = engine.decide(ALICE, "repo:read", "repo:org/low", base_context())
    assert not decision.allowed
    assert len(decision.errors) == 1
    assert "`needs-owner`" in decision.errors[0]


# --- policy ids ------------------------------------------------------------------------------


def test_policy_ids_follow_id_annotation_else_file_position(tmp_path: Path) -> None:
    policy = """
    permit (principal, action == Action::"a0", resource);
    @id("named-1") permit (principal, action == Action::"a1", resource);
    permit (principal, action == Action::"a2", resource);
    @id("") permit (principal, action == Action::"a3", resource);
    @id("named-4") @max_ttl("44") permit (principal, action == Action::"a4", resource);
    permit (principal, action == Action::"a5", resource);
    @id("named-6") forbid (principal, action == Action::"a6", resource);
    @id permit (principal, action == Action::"a7", resource);
    """
    engine = write_engine(tmp_path, policy, None)
    expected = {
        "a0": "policy0",
        "a1": "named-1",
        "a2": "policy2",
        "a3": "policy3",
        "a4": "named-4",
        "a5": "policy5",
        "a6": "named-6",
        "a7": "policy7",
    }
    named = {action: engine.decide(ALICE, action, "r", {}).policies for action in expected}
    assert named == {action: (name,) for action, name in expected.items()}
    assert engine.decide(ALICE, "a4", "r", {}).max_ttl == 44


# --- several actions -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DecideAllCase:
    id: str
    actions: tuple[str, ...]
    resource: str
    allowed: bool
    policies: tuple[str, ...]
    reason: str
    context: Mapping[str, Any] = field(default_factory=dict)
    max_ttl: int | None = None
    approval: bool = False


DECIDE_ALL_CASES = [
    DecideAllCase(
        "all-permitted-most-restrictive",
        ("repo:merge", "deploy"),
        "repo:org/low",
        True,
        ("ci-merge", "deploy"),
        "permitted by ci-merge, deploy",
        max_ttl=1800,
        approval=True,
    ),
    DecideAllCase(
        "one-not-permitted",
        ("deploy", "repo:merge", "repo:read"),
        "repo:org/secret",
        False,
        (),
        "no policy permits repo:merge",
    ),
    DecideAllCase(
        "one-forbidden",
        ("repo:merge", "deploy"),
        "repo:org/low",
        False,
        ("deny-delegated-deploy",),
        "forbidden by deny-delegated-deploy for deploy",
        context={"delegated": True},
    ),
    DecideAllCase(
        "duplicates-once",
        ("repo:merge", "repo:merge"),
        "repo:org/short",
        True,
        ("ci-merge", "ci-merge-short"),
        "permitted by ci-merge, ci-merge-short",
        max_ttl=300,
    ),
    DecideAllCase("no-actions", (), "repo:org/low", False, (), "no actions requested"),
]


@pytest.mark.parametrize("case", DECIDE_ALL_CASES, ids=lambda c: c.id)
def test_decide_all(engine: PolicyEngine, case: DecideAllCase) -> None:
    decision = engine.decide_all(CI_BOT, case.actions, case.resource, base_context(**case.context))
    assert (decision.allowed, decision.policies, decision.reason) == (case.allowed, case.policies, case.reason)
    assert (decision.max_ttl, decision.approval_required) == (case.max_ttl, case.approval)


# --- context safety --------------------------------------------------------------------------

CLAIMS_POLICY = """
@id("score") permit (principal, action == Action::"score", resource) when { context.claims.score == "1.5" };
@id("no-null") permit (principal, action == Action::"null", resource) when { !(context.claims has gone) };
@id("deep") permit (principal, action == Action::"deep", resource) when { context.claims.a.b.c == 7 };
@id("big") permit (principal, action == Action::"big", resource)
when { context.claims.big == "123456789012345678901234567890" };
@id("admins") permit (principal, action == Action::"inject", resource)
when { context.claims.team in Team::"admins" };
@id("ip") permit (principal, action == Action::"inject-ip", resource) when { context.claims.addr.isLoopback() };
@id("set") permit (principal, action == Action::"set", resource) when { context.claims.tags.contains("x") };
"""


@dataclass(frozen=True, slots=True)
class ClaimsCase:
    id: str
    action: str
    claims: Any
    allowed: bool


CLAIMS_CASES = [
    ClaimsCase("float-becomes-string", "score", {"score": 1.5}, True),
    ClaimsCase("none-dropped", "null", {"gone": None, "kept": 1}, True),
    ClaimsCase("nested-records", "deep", {"a": {"b": {"c": 7, "d": [1.0, None, {"e": None}]}}}, True),
    ClaimsCase("int-beyond-i64-becomes-string", "big", {"big": 123456789012345678901234567890}, True),
    ClaimsCase("entity-escape-not-honoured", "inject", {"team": {"__entity": {"type": "Team", "id": "admins"}}}, False),
    ClaimsCase(
        "extension-escape-not-honoured", "inject-ip", {"addr": {"__extn": {"fn": "ip", "arg": "127.0.0.1"}}}, False
    ),
    ClaimsCase(
        "nan-inf-bytes-objects-do-not-spoil-the-rest",
        "score",
        {
            "score": 1.5,
            "nan": float("nan"),
            "inf": float("-inf"),
            "raw": b"\x00",
            "obj": object(),
            7: "int key",
            "huge": -(2**80),
        },
        True,
    ),
    ClaimsCase("tuple-and-set-become-sets", "set", {"tags": ("x", None, 2.5)}, True),
    # not valid UTF-8 text: Cedar cannot take it, so the request is denied rather than raising
    ClaimsCase("lone-surrogate-is-a-deny", "score", {"score": 1.5, "name": "bad \ud800"}, False),
]


def _deep(levels: int) -> dict[str, Any]:
    value: dict[str, Any] = {"leaf": 1}
    for _ in range(levels):
        value = {"next": value}
    return value


@pytest.mark.parametrize("case", CLAIMS_CASES, ids=lambda c: c.id)
def test_odd_claims_do_not_crash(tmp_path: Path, case: ClaimsCase) -> None:
    engine = write_engine(
        tmp_path, CLAIMS_POLICY, [{"uid": {"type": "Team", "id": "admins"}, "attrs": {}, "parents": []}]
    )
    decision = engine.decide(OIDC_USER, case.action, "r", base_context(auth="oidc", claims=case.claims))
    assert decision.allowed is case.allowed


def test_very_deep_and_cyclic_claims_do_not_crash(tmp_path: Path) -> None:
    engine = write_engine(tmp_path, CLAIMS_POLICY, None)
    cyclic: dict[str, Any] = {"score": "1.5"}
    cyclic["self"] = cyclic
    for claims in (cyclic, {"score": "1.5", "deep": _deep(500)}):
        assert engine.decide(OIDC_USER, "score", "r", base_context(claims=claims)).allowed


def test_odd_principal_and_resource_ids_are_taken_literally(engine: PolicyEngine) -> None:
    decision = engine.decide('spiffe://example.org/a"b\n', "repo:read", 'repo:"x"\n', base_context())
    assert decision.reason == "no policy permits repo:read"


# --- loading and reloading -------------------------------------------------------------------


def test_version_is_short_hex_and_covers_entities(tmp_path: Path) -> None:
    full = write_engine(tmp_path, POLICY, ENTITIES)
    other = tmp_path / "other"
    other.mkdir()
    fewer_entities = write_engine(other, POLICY, ENTITIES[:1])
    assert len(full.version) == 16
    assert set(full.version) <= set("0123456789abcdef")
    assert full.version != fewer_entities.version


def test_reload_with_changed_file_changes_decision_and_version(tmp_path: Path) -> None:
    engine = write_engine(tmp_path, 'permit (principal, action == Action::"a", resource);', None)
    before = engine.version
    assert engine.decide(ALICE, "a", "r", {}).allowed
    (tmp_path / "broker.cedar").write_text('@id("b-only") permit (principal, action == Action::"b", resource);')
    assert engine.reload() == engine.version != before
    assert not engine.decide(ALICE, "a", "r", {}).allowed
    assert engine.decide(ALICE, "b", "r", {}).policies == ("b-only",)


def test_reload_of_changed_entities_changes_membership(tmp_path: Path) -> None:
    engine = write_engine(tmp_path)
    assert engine.decide(CI_BOT, "repo:merge", "repo:org/low", base_context()).allowed
    (tmp_path / "entities.json").write_text(json.dumps(ENTITIES[2:]))
    engine.reload()
    assert not engine.decide(CI_BOT, "repo:merge", "repo:org/low", base_context()).allowed


@dataclass(frozen=True, slots=True)
class BadFileCase:
    id: str
    policy: str
    entities: str
    message: str


BAD_FILE_CASES = [
    BadFileCase("policy-syntax", "permit (principal, action, resource", "[]", "does not parse"),
    BadFileCase("policy-unknown-variable", "permit (principal, action, resource) when { x };", "[]", "does not parse"),
    BadFileCase("entities-not-json", "permit (principal, action, resource);", "{nope", "entities file"),
    BadFileCase(
        "entities-float-attr",
        "permit (principal, action, resource);",
        '[{"uid": {"type": "A", "id": "x"}, "attrs": {"f": 1.5}, "parents": []}]',
        "entities file",
    ),
    BadFileCase("max-ttl-zero", '@max_ttl("0") permit (principal, action, resource);', "[]", "@max_ttl"),
    BadFileCase("max-ttl-negative", '@max_ttl("-5") permit (principal, action, resource);', "[]", "@max_ttl"),
    BadFileCase("max-ttl-unit", '@max_ttl("15m") permit (principal, action, resource);', "[]", "@max_ttl"),
    BadFileCase("max-ttl-fraction", '@max_ttl("1.5") permit (principal, action, resource);', "[]", "@max_ttl"),
    BadFileCase("max-ttl-empty", "@max_ttl permit (principal, action, resource);", "[]", "@max_ttl"),
    BadFileCase("approval-bare", "@approval permit (principal, action, resource);", "[]", "@approval"),
    BadFileCase("approval-value", '@approval("maybe") permit (principal, action, resource);', "[]", "@approval"),
    BadFileCase("obligation-on-forbid", '@max_ttl("60") forbid (principal, action, resource);', "[]", "permit"),
    BadFileCase(
        "duplicate-id",
        '@id("x") permit (principal, action, resource);\n@id("x") forbid (principal, action, resource);',
        "[]",
        "used twice",
    ),
    BadFileCase("template", "permit (principal == ?principal, action, resource);", "[]", "template"),
]


@pytest.mark.parametrize("case", BAD_FILE_CASES, ids=lambda c: c.id)
def test_bad_files_are_refused_at_load(tmp_path: Path, case: BadFileCase) -> None:
    with pytest.raises(PolicyError) as caught:
        write_engine(tmp_path, case.policy, case.entities)
    assert case.message in caught.value.reason
    assert "\n" not in caught.value.reason
    assert len(caught.value.reason) < 400


@pytest.mark.parametrize("case", BAD_FILE_CASES, ids=lambda c: c.id)
def test_bad_files_on_reload_keep_the_running_policy(tmp_path: Path, case: BadFileCase) -> None:
    engine = write_engine(tmp_path)
    version = engine.version
    (tmp_path / "broker.cedar").write_text(case.policy)
    (tmp_path / "entities.json").write_text(case.entities)
    with pytest.raises(PolicyError):
        engine.reload()
    assert engine.version == version
    assert engine.decide(CI_BOT, "repo:merge", "repo:org/low", base_context()).policies == ("ci-merge",)


def test_parser_message_is_passed_on(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match=r"broker\.cedar does not parse: .*end of input"):
        write_engine(tmp_path, "permit (principal, action, resource", None)


@pytest.mark.parametrize("missing", ["policy", "entities"])
def test_missing_file_is_a_policy_error(tmp_path: Path, missing: str) -> None:
    policy_path = tmp_path / "broker.cedar"
    entities_path = tmp_path / "entities.json"
    if missing == "entities":
        policy_path.write_text(POLICY)
    with pytest.raises(PolicyError, match=f"{missing} file .* not found"):
        PolicyEngine.from_files(policy_path, entities_path)


# --- the shipped sample policy -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SampleCase:
    id: str
    principal: str
    actions: tuple[str, ...]
    resource: str
    allowed: bool
    request: Mapping[str, str] = field(default_factory=dict)
    delegated: bool = False
    max_ttl: int | None = None
    approval: bool = False


SAMPLE_CI = "spiffe://example.org/agent/ci"
SAMPLE_RELEASE = "spiffe://example.org/agent/release"
SAMPLE_CASES = [
    SampleCase("ci-reads-internal", SAMPLE_CI, ("repo:read",), "repo:org/app", True, max_ttl=1800),
    SampleCase("ci-not-restricted", SAMPLE_CI, ("repo:read",), "vault:org/secrets", False),
    SampleCase("prod-needs-ticket", SAMPLE_RELEASE, ("repo:merge",), "repo:org/infra", False),
    SampleCase(
        "prod-with-ticket", SAMPLE_RELEASE, ("repo:merge",), "repo:org/infra", True, {"ticket": "OPS-7"}, max_ttl=900
    ),
    SampleCase(
        "deploy-needs-approval",
        SAMPLE_RELEASE,
        ("repo:read", "deploy"),
        "env:prod",
        True,
        {"ticket": "OPS-7"},
        max_ttl=600,
        approval=True,
    ),
    SampleCase(
        "delegated-deploy-forbidden",
        SAMPLE_RELEASE,
        ("deploy",),
        "env:prod",
        False,
        {"ticket": "OPS-7"},
        delegated=True,
    ),
    SampleCase("quarantined", "spiffe://example.org/agent/legacy", ("repo:read",), "repo:org/app", False),
]


@pytest.mark.parametrize("case", SAMPLE_CASES, ids=lambda c: c.id)
def test_sample_policy(case: SampleCase) -> None:
    engine = PolicyEngine.from_files(REPO_ROOT / "policy" / "broker.cedar", REPO_ROOT / "policy" / "entities.json")
    context = base_context(request=dict(case.request), delegated=case.delegated)
    decision = engine.decide_all(case.principal, case.actions, case.resource, context)
    assert (decision.allowed, decision.max_ttl, decision.approval_required) == (
        case.allowed,
        case.max_ttl,
        case.approval,
    )


def test_an_entity_ref_put_in_by_the_broker_is_an_entity(tmp_path: Path) -> None:
    from broker.policy.engine import EntityRef

    policy = '@id("ci-acts") permit (principal, action == Action::"act", resource) when { context.who in Team::"ci" };'
    engine = write_engine(tmp_path, policy)
    assert engine.decide(CI_BOT, "act", "r", base_context(who=EntityRef("Workload", CI_BOT))).allowed
    assert not engine.decide(CI_BOT, "act", "r", base_context(who=EntityRef("Workload", "spiffe://x/y"))).allowed
    forged = {"__entity": {"type": "Workload", "id": CI_BOT}}
    assert not engine.decide(CI_BOT, "act", "r", base_context(who=forged)).allowed
