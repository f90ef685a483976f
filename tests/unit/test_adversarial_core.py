"""An attacker's inputs to the pure core: each is refused, fails closed, or is taken as data."""

from __future__ import annotations

import asyncio
import base64
import io
import json
from dataclasses import dataclass

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from broker.domain.errors import CredentialRejected, InvalidRequest
from broker.domain.identity import matches_any
from broker.domain.intent import TOKEN_TYPE_ACCESS_TOKEN, TOKEN_TYPE_ID_TOKEN, TOKEN_TYPE_JWT, Intent, cap_ttl
from broker.jose.keys import SigningKey
from broker.leases.table import Lease
from broker.ops.audit import AuditLog
from broker.policy.engine import PolicyEngine
from broker.testing.clock import FakeClock
from broker.testing.jwt_issuer import JwtSvidIssuer
from broker.testing.x509_ca import SpiffeCA
from broker.tokens.minter import TokenMinter
from broker.usecases.operations import LeaseFilter, _decode_token, _encode_token
from broker.verify import JwtSvidVerifier, Verifiers, X509SvidVerifier

T0 = 1_750_000_000.0
TD = "example.org"
BROKER_ID = f"spiffe://{TD}/broker"
AGENT = f"spiffe://{TD}/agent/planner"
ADMIN_GLOBS = (f"spiffe://{TD}/operator/*",)


# ---- policy: request and token data never becomes Cedar syntax or an entity ----------------------------------


ENTITY_POLICY = """\
@id("team-claim")
permit (principal, action == Action::"repo:admin", resource)
when { context.claims has team && context.claims.team == Team::"admins" };

@id("nested-team-claim")
permit (principal, action == Action::"repo:admin", resource)
when { context.claims has org && context.claims.org has team && context.claims.org.team == Team::"admins" };

@id("ticket")
permit (principal, action == Action::"db:migrate", resource)
when { context.request has ticket };

@id("no-secrets")
forbid (principal, action, resource == Resource::"vault:prod");
"""


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> PolicyEngine:
    path = tmp_path_factory.mktemp("policy") / "policy.cedar"
    path.write_text(ENTITY_POLICY)
    return PolicyEngine(path)


ADMINS = {"type": "Team", "id": "admins"}


@dataclass(frozen=True, slots=True)
class Forgery:
    name: str
    action: str
    context: dict


FORGERIES = [
    Forgery("entity_in_claims", "repo:admin", {"claims": {"team": {"__entity": ADMINS}}}),
    Forgery("entity_nested_in_claims", "repo:admin", {"claims": {"org": {"team": {"__entity": ADMINS}}}}),
    Forgery("entity_inside_a_list", "repo:admin", {"claims": {"team": [{"__entity": ADMINS}]}}),
    Forgery("bare_entity_claims", "repo:admin", {"claims": {"__entity": ADMINS}}),
    Forgery("entity_as_request_key", "db:migrate", {"request": {"__entity": '{"type":"Team","id":"admins"}'}}),
    Forgery("extension_as_request_key", "db:migrate", {"request": {"__extn": "ticket"}}),
]


@pytest.mark.parametrize("case", FORGERIES, ids=[c.name for c in FORGERIES])
def test_escapes_in_context_never_forge_an_entity_or_a_key(engine: PolicyEngine, case: Forgery) -> None:
    decision = engine.decide(AGENT, case.action, "repo:org/app", case.context)
    assert not decision.allowed


def test_the_forgeries_above_would_work_with_real_values(engine: PolicyEngine) -> None:
    # The same shapes with honest values do permit, so the refusals above are the escapes being dropped.
    assert engine.decide(AGENT, "db:migrate", "db:prod", {"request": {"ticket": "CHG-1"}}).allowed


@pytest.mark.parametrize(
    "resource",
    ['vault:prod" || true || "', 'vault:prod"', "vault:prod\\", "Resource::\"vault:prod\"", "vault:prod\u200b"],
)
def test_resource_text_is_one_literal_id(engine: PolicyEngine, resource: str) -> None:
    # Only the exact id is the forbidden resource; nothing in the text reaches the parser.
    decision = engine.decide(AGENT, "db:migrate", resource, {"request": {"ticket": "x"}})
    assert decision.allowed and decision.policies == ("ticket",)


@pytest.mark.parametrize(
    "context",
    [
        {"claims": {"sub": "a\ud800"}},
        {"request": {"ticket": "\udfff"}},
        {"claims": {"n": 2**200, "f": float("nan"), "g": float("-inf"), "b": b"bytes", "o": object()}},
        {"claims": {"deep": json.loads("[" * 500 + "]" * 500)}},
    ],
    ids=["surrogate_claim", "surrogate_request", "unrepresentable_values", "very_deep"],
)
def test_hostile_context_values_never_raise(engine: PolicyEngine, context: dict) -> None:
    decision = engine.decide(AGENT, "repo:admin", "repo:org/app", context)
    assert not decision.allowed


def test_a_principal_cedar_cannot_take_fails_closed(engine: PolicyEngine) -> None:
    decision = engine.decide("oidc:x#\ud800", "db:migrate", "db:prod", {"request": {"ticket": "x"}})
    assert not decision.allowed and decision.errors


# ---- identity: token types and admin globs --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Kit:
    verifiers: Verifiers
    issuer: JwtSvidIssuer


@pytest.fixture(scope="module")
def kit() -> Kit:
    issuer = JwtSvidIssuer(TD)
    verifiers = Verifiers(
        x509=X509SvidVerifier({TD: [SpiffeCA(TD, now=T0).root]}),
        jwt_svid=JwtSvidVerifier({TD: issuer.jwks()}, audience=BROKER_ID),
        oidc=[],
    )
    return Kit(verifiers, issuer)


def _broker_token(now: float) -> str:
    minter = TokenMinter(BROKER_ID, SigningKey.generate())
    claims = {"iss": BROKER_ID, "sub": AGENT, "aud": BROKER_ID, "exp": int(now) + 300, "iat": int(now),
              "nbf": int(now), "jti": "lse_1", "client_id": AGENT, "scope": "repo:read"}
    return minter.mint(claims)


@pytest.mark.parametrize("token_type", [None, TOKEN_TYPE_JWT, TOKEN_TYPE_ID_TOKEN])
def test_a_broker_token_proves_no_identity(kit: Kit, token_type: str | None) -> None:
    with pytest.raises(CredentialRejected):
        asyncio.run(kit.verifiers.verify_token(_broker_token(T0), now=T0, token_type=token_type))


def test_a_jwt_svid_presented_as_an_id_token_is_refused(kit: Kit) -> None:
    token = kit.issuer.jwt_svid(AGENT, BROKER_ID, now=T0)
    assert asyncio.run(kit.verifiers.verify_token(token, now=T0, token_type=TOKEN_TYPE_JWT)).principal == AGENT
    with pytest.raises(CredentialRejected):
        asyncio.run(kit.verifiers.verify_token(token, now=T0, token_type=TOKEN_TYPE_ID_TOKEN))


def test_the_access_token_type_is_never_verified_as_a_workload_token(kit: Kit) -> None:
    token = kit.issuer.jwt_svid(AGENT, BROKER_ID, now=T0)
    with pytest.raises(InvalidRequest):
        asyncio.run(kit.verifiers.verify_token(token, now=T0, token_type=TOKEN_TYPE_ACCESS_TOKEN))


@pytest.mark.parametrize(
    "principal",
    [
        f"spiffe://{TD}/operator",
        f"spiffe://{TD}/operators/alice",
        f"spiffe://{TD}.evil.test/operator/alice",
        f"spiffe://evil.test/{TD}/operator/alice",
        f"spiffe://{TD}/agent/operator/alice",
        f"oidc:https://issuer.test#spiffe://{TD}/operator/alice",
        f"SPIFFE://{TD}/operator/alice",
    ],
)
def test_admin_glob_matches_nothing_outside_its_folder(principal: str) -> None:
    assert not matches_any(principal, ADMIN_GLOBS)
    assert matches_any(f"spiffe://{TD}/operator/alice", ADMIN_GLOBS)


# ---- requests: hostile text is refused before it reaches anything ----------------------------------------------


@pytest.mark.parametrize(
    "field,value",
    [
        ("audience", "a\u202eb"),
        ("audience", "a\u2028b"),
        ("audience", "a\x85b"),
        ("audience", 'a"b'),
        ("resource", "r\x00"),
        ("resource", "r\\"),
        ("task_id", "t\u0661"),  # an Arabic-Indic digit is not [0-9]
        ("task_id", "t\n"),
    ],
)
def test_intent_refuses_text_that_could_confuse_a_reader(field: str, value: str) -> None:
    fields = {"task_id": "t", "audience": "aud", "resource": "r", field: value}
    with pytest.raises(InvalidRequest, match=field):
        Intent.parse(actions=["repo:read"], ttl_seconds=0, context={}, **fields)


@pytest.mark.parametrize("now", [T0, T0 + 0.25, T0 + 0.999])
def test_cap_ttl_never_ends_after_any_cap(now: float) -> None:
    caps = [("max_ttl", 3600.0), ("parent_lease", 10.4), ("subject_token", 10.6), ("policy", None)]
    lifetime = cap_ttl(now, ("requested", 2.0**62), caps)
    assert lifetime.capped_by == "parent_lease" and lifetime.expires_at <= now + 10.4


# ---- operator listing: an attacker-shaped page token is a bad request ------------------------------------------


def _page_token(raw: str) -> str:
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def test_a_page_token_of_our_own_round_trips() -> None:
    flt = LeaseFilter(task_id="t")
    lease = Lease(id="lse_1", task_id="t", subject=AGENT, client_id=AGENT, audience="a", scope=("x",),
                  resource="r", issued_at=T0, expires_at=T0 + 5, token_exp=T0 + 5)
    assert _decode_token(_encode_token(lease, flt), flt) == (T0, "lse_1")


@pytest.mark.parametrize("raw", ["[]", '"x"', "1", '{"a":1}', '[0,"x"]', "[null,null,null]", "not json"])
def test_a_page_token_of_the_wrong_shape_is_invalid_request(raw: str) -> None:
    with pytest.raises(InvalidRequest):
        _decode_token(_page_token(raw), LeaseFilter())


# ---- audit: a token never reaches the trail --------------------------------------------------------------------


@pytest.fixture
def sink() -> io.StringIO:
    return io.StringIO()


@pytest.fixture
def audit(sink: io.StringIO) -> AuditLog:
    return AuditLog(sink, clock=FakeClock(T0))


@pytest.mark.parametrize("glue", [" ", ":", "=", "/", '"'], ids=["space", "colon", "equals", "slash", "quote"])
def test_a_token_after_a_separator_is_hashed(audit: AuditLog, sink: io.StringIO, glue: str) -> None:
    token = _broker_token(T0)
    audit.record("decision", audience=f"aud{glue}{token}", note=[f"x{glue}{token}"], reason={"r": token})
    assert token not in sink.getvalue() and token.rsplit(".", 1)[-1] not in sink.getvalue()


def test_a_pem_key_in_any_field_is_redacted(audit: AuditLog, sink: io.StringIO) -> None:
    pem = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    audit.record("operator.revoke", note=pem, value={"nested": [pem]})
    assert "PRIVATE KEY" not in sink.getvalue() and pem.splitlines()[1] not in sink.getvalue()
