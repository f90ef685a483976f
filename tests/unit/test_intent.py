"""Intent: every field rule of an exchange request, and the TTL rule (`cap_ttl`)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from broker.domain.errors import InvalidRequest
from broker.domain.intent import (
    MAX_AUDIENCE,
    MAX_RESOURCE,
    MAX_TTL_SECONDS,
    TOKEN_TYPE_ACCESS_TOKEN,
    TOKEN_TYPE_ID_TOKEN,
    TOKEN_TYPE_JWT,
    Intent,
    Lifetime,
    Limits,
    cap_ttl,
)

AUD = "spiffe://example.org/service/repo"
LIMITS = Limits(max_actions=4, max_context_entries=3, max_context_bytes=64)
SAML = "urn:ietf:params:oauth:token-type:saml2"
T0 = 1_750_000_000


@dataclass(frozen=True, slots=True)
class Req:
    """One exchange request; every field defaults to a valid value."""

    id: str
    task_id: str = "task-1"
    audience: str = AUD
    actions: tuple[str, ...] = ("repo:read",)
    resource: str = "repo:org/app"
    ttl_seconds: int = 0
    context: tuple[tuple[str, str], ...] = ()
    subject_token: str = ""
    subject_token_type: str = ""
    error: str = ""  # a fragment of the InvalidRequest reason, for the refused cases

    def parse(self, limits: Limits = LIMITS) -> Intent:
        return Intent.parse(
            task_id=self.task_id,
            audience=self.audience,
            actions=self.actions,
            resource=self.resource,
            ttl_seconds=self.ttl_seconds,
            context=dict(self.context),
            subject_token=self.subject_token,
            subject_token_type=self.subject_token_type,
            limits=limits,
        )


def _ids(cases: list[Req]) -> list[str]:
    return [c.id for c in cases]


REFUSED = [
    # task_id
    Req("task_id_empty", task_id="", error="task_id is required"),
    Req("task_id_starts_with_dash", task_id="-task", error="task_id must be 1-128 characters"),
    Req("task_id_starts_with_dot", task_id=".task", error="task_id must be 1-128 characters"),
    Req("task_id_has_space", task_id="task 1", error="task_id must be 1-128 characters"),
    Req("task_id_has_quote", task_id='task"1', error="task_id must be 1-128 characters"),
    Req("task_id_non_ascii", task_id="tâche", error="task_id must be 1-128 characters"),
    Req("task_id_129_chars", task_id="t" * 129, error="task_id must be 1-128 characters"),
    Req("task_id_trailing_newline", task_id="task-1\n", error="task_id must be 1-128 characters"),
    # audience
    Req("audience_empty", audience="", error="audience is required"),
    Req("audience_has_space", audience="repo server", error="audience must not contain spaces"),
    Req("audience_has_quote", audience='repo"', error="audience must not contain spaces"),
    Req("audience_has_backslash", audience="repo\\x", error="audience must not contain spaces"),
    Req("audience_has_control_char", audience="repo\x00", error="audience must not contain spaces"),
    Req("audience_too_long", audience="a" * (MAX_AUDIENCE + 1), error=f"audience is longer than {MAX_AUDIENCE}"),
    # resource
    Req("resource_empty", resource="", error="resource is required"),
    Req("resource_has_tab", resource="repo:\torg", error="resource must not contain spaces"),
    Req("resource_has_newline", resource="repo:org\n", error="resource must not contain spaces"),
    Req("resource_too_long", resource="r" * (MAX_RESOURCE + 1), error=f"resource is longer than {MAX_RESOURCE}"),
    # actions
    Req("actions_none", actions=(), error="at least one action is required"),
    Req("actions_too_many", actions=("a", "b", "c", "d", "e"), error="at most 4 actions"),
    Req("action_empty", actions=("",), error="is not a valid action name"),
    Req("action_has_space", actions=("repo read",), error="is not a valid action name"),
    Req("action_starts_with_colon", actions=(":read",), error="is not a valid action name"),
    Req("action_has_at_sign", actions=("repo@read",), error="is not a valid action name"),
    Req("action_129_chars", actions=("a" * 129,), error="is not a valid action name"),
    Req("action_wildcard", actions=("repo:*",), error="is not a valid action name"),
    Req("action_repeated", actions=("repo:read", "repo:clone", "repo:read"), error="'repo:read' is repeated"),
    # ttl
    Req("ttl_negative", ttl_seconds=-1, error="ttl_seconds must be between 0 and"),
    Req("ttl_over_maximum", ttl_seconds=MAX_TTL_SECONDS + 1, error="ttl_seconds must be between 0 and"),
    # context
    Req("context_too_many_entries", context=(("a", "1"), ("b", "2"), ("c", "3"), ("d", "4")), error="at most 3"),
    Req("context_too_large", context=(("ticket", "x" * 59),), error="larger than 64 bytes"),
    Req("context_size_counts_utf8_bytes", context=(("k", "é" * 32),), error="larger than 64 bytes"),
    Req("context_key_empty", context=(("", "x"),), error="must match"),
    Req("context_key_starts_with_digit", context=(("1ticket", "x"),), error="must match"),
    Req("context_key_has_space", context=(("the ticket", "x"),), error="must match"),
    Req("context_key_has_colon", context=(("a:b", "x"),), error="must match"),
    Req("context_key_65_chars", context=(("k" * 65, ""),), error="must match"),
    # subject token and its type
    Req("subject_token_without_type", subject_token="tok", error="subject_token_type must be one of"),
    Req("subject_token_unknown_type", subject_token="tok", subject_token_type=SAML, error="must be one of"),
    Req("type_without_subject_token", subject_token_type=TOKEN_TYPE_JWT, error="given without subject_token"),
    Req("delegation_type_without_token", subject_token_type=TOKEN_TYPE_ACCESS_TOKEN, error="without subject_token"),
    # delegation defaults apply to empty fields only, and only to delegation
    Req(
        "delegation_bad_task_id",
        task_id="bad task",
        subject_token="tok",
        subject_token_type=TOKEN_TYPE_ACCESS_TOKEN,
        error="task_id must be",
    ),
    Req(
        "delegation_bad_audience",
        audience="bad audience",
        subject_token="tok",
        subject_token_type=TOKEN_TYPE_ACCESS_TOKEN,
        error="audience must not contain",
    ),
    Req(
        "delegation_bad_resource",
        resource='"x"',
        subject_token="tok",
        subject_token_type=TOKEN_TYPE_ACCESS_TOKEN,
        error="resource must not contain",
    ),
    Req(
        "delegation_still_needs_actions",
        task_id="",
        audience="",
        resource="",
        actions=(),
        subject_token="tok",
        subject_token_type=TOKEN_TYPE_ACCESS_TOKEN,
        error="at least one action",
    ),
    Req(
        "jwt_subject_token_needs_task_id",
        task_id="",
        subject_token="tok",
        subject_token_type=TOKEN_TYPE_JWT,
        error="task_id is required",
    ),
    Req(
        "id_token_needs_audience",
        audience="",
        subject_token="tok",
        subject_token_type=TOKEN_TYPE_ID_TOKEN,
        error="audience is required",
    ),
    Req("plain_request_needs_resource", resource="", error="resource is required"),
]


@pytest.mark.parametrize("req", REFUSED, ids=_ids(REFUSED))
def test_parse_refuses_ill_formed_field(req: Req) -> None:
    with pytest.raises(InvalidRequest) as info:
        req.parse()
    assert req.error in info.value.reason


ACCEPTED = [
    Req("minimal"),
    Req("task_id_128_chars", task_id="t" * 128),
    Req("task_id_with_every_allowed_punctuation", task_id="9a._:@/-Z"),
    Req("audience_512_chars", audience="a" * MAX_AUDIENCE),
    Req("resource_512_chars", resource="r" * MAX_RESOURCE),
    Req("resource_non_ascii_printable", resource="repo:org/café"),
    Req("ttl_zero_means_default", ttl_seconds=0),
    Req("ttl_at_maximum", ttl_seconds=MAX_TTL_SECONDS),
    Req("actions_at_limit", actions=("a", "b", "c", "d")),
    Req("action_with_slash_dot_and_dash", actions=("repo:read", "db/prod.migrate-1")),
    Req("action_128_chars", actions=("a" * 128,)),
    Req("context_at_entry_limit", context=(("a", "1"), ("b", "2"), ("c", "3"))),
    Req("context_exactly_at_byte_limit", context=(("ticket", "x" * 58),)),
    Req("context_key_64_chars", context=(("k" * 64, ""),)),
    Req("context_key_with_underscore_dot_dash", context=(("_a.b-c", "x"),)),
    Req("context_value_is_free_text", context=(("reason", 'fix "bug" now\n'),)),
    Req("jwt_subject_token", subject_token="tok", subject_token_type=TOKEN_TYPE_JWT),
    Req("id_token_subject_token", subject_token="tok", subject_token_type=TOKEN_TYPE_ID_TOKEN),
    Req("delegation_with_every_field", subject_token="tok", subject_token_type=TOKEN_TYPE_ACCESS_TOKEN),
    Req(
        "delegation_defaults_task_audience_resource",
        task_id="",
        audience="",
        resource="",
        subject_token="tok",
        subject_token_type=TOKEN_TYPE_ACCESS_TOKEN,
    ),
]


@pytest.mark.parametrize("req", ACCEPTED, ids=_ids(ACCEPTED))
def test_parse_accepts_well_formed_request(req: Req) -> None:
    intent = req.parse()
    assert (intent.task_id, intent.audience, intent.resource) == (req.task_id, req.audience, req.resource)
    assert intent.actions == req.actions
    assert intent.ttl_seconds == req.ttl_seconds
    assert dict(intent.context) == dict(req.context)
    assert (intent.subject_token, intent.subject_token_type) == (req.subject_token, req.subject_token_type)


@pytest.mark.parametrize(
    ("token_type", "delegated"),
    [("", False), (TOKEN_TYPE_JWT, False), (TOKEN_TYPE_ID_TOKEN, False), (TOKEN_TYPE_ACCESS_TOKEN, True)],
    ids=["none", "jwt", "id_token", "access_token"],
)
def test_only_an_access_token_subject_makes_a_delegation(token_type: str, delegated: bool) -> None:
    req = Req("x", subject_token="tok" if token_type else "", subject_token_type=token_type)
    assert req.parse().delegated is delegated


def test_parse_names_the_first_wrong_field() -> None:
    req = Req("x", task_id="", audience="", actions=(), ttl_seconds=-1)
    with pytest.raises(InvalidRequest, match="task_id is required"):
        req.parse()


def test_parse_checks_the_subject_token_type_before_other_fields() -> None:
    req = Req("x", task_id="", subject_token="tok")
    with pytest.raises(InvalidRequest, match="subject_token_type must be one of"):
        req.parse()


def test_parsed_actions_keep_request_order_as_a_tuple() -> None:
    intent = Req("x", actions=("repo:write", "repo:read")).parse()
    assert intent.actions == ("repo:write", "repo:read")


def test_parsed_context_is_a_sorted_read_only_copy() -> None:
    context = {"zeta": "1", "alpha": "2"}
    intent = Intent.parse(
        task_id="t", audience=AUD, actions=["a"], resource="r", ttl_seconds=0, context=context, limits=LIMITS
    )
    context["alpha"] = "changed"
    assert list(intent.context) == ["alpha", "zeta"]
    assert intent.context["alpha"] == "2"
    with pytest.raises(TypeError):
        intent.context["beta"] = "3"  # type: ignore[index]


def _kwargs(req: Req) -> dict:
    """The request's fields without `limits`, so that `Intent.parse` uses its default."""
    return {
        "task_id": req.task_id,
        "audience": req.audience,
        "actions": req.actions,
        "resource": req.resource,
        "ttl_seconds": req.ttl_seconds,
        "context": dict(req.context),
    }


@pytest.mark.parametrize(("count", "accepted"), [(16, True), (17, False)], ids=["16", "17"])
def test_default_limits_allow_sixteen_actions(count: int, accepted: bool) -> None:
    actions = tuple(f"a{i}" for i in range(count))
    req = Req("x", actions=actions)
    if accepted:
        assert Intent.parse(**_kwargs(req)).actions == actions
    else:
        with pytest.raises(InvalidRequest, match="at most 16 actions"):
            Intent.parse(**_kwargs(req))


# -- the TTL rule ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Caps:
    id: str
    first: tuple[str, float]
    caps: tuple[tuple[str, float | None], ...]
    expires_in: int  # expected expiry, seconds after T0
    capped_by: str
    now: float = T0


CAPS = [
    Caps("requested_without_caps", ("requested", 60), (), 60, "requested"),
    Caps("default_without_caps", ("default", 300), (), 300, "default"),
    Caps("requested_under_every_cap", ("requested", 60), (("max_ttl", 3600), ("policy", 900)), 60, "requested"),
    Caps("default_under_every_cap", ("default", 300), (("max_ttl", 3600), ("task_deadline", 500)), 300, "default"),
    Caps("smaller_cap_wins", ("requested", 600), (("max_ttl", 3600), ("policy", 120)), 120, "policy"),
    Caps(
        "smallest_of_several_caps_wins",
        ("requested", 600),
        (("max_ttl", 500), ("policy", 400), ("task_deadline", 50), ("parent_lease", 70)),
        50,
        "task_deadline",
    ),
    Caps("cap_equal_to_request_keeps_requested", ("requested", 3600), (("max_ttl", 3600),), 3600, "requested"),
    Caps("cap_equal_to_default_keeps_default", ("default", 300), (("policy", 300),), 300, "default"),
    Caps("tie_between_caps_keeps_earlier", ("requested", 600), (("max_ttl", 100), ("policy", 100)), 100, "max_ttl"),
    Caps(
        "later_tie_does_not_replace_winner",
        ("requested", 600),
        (("policy", 100), ("subject_token", 100), ("caller_credential", 100)),
        100,
        "policy",
    ),
    Caps("none_caps_are_ignored", ("default", 300), (("policy", None), ("parent_lease", None)), 300, "default"),
    Caps("none_before_a_real_cap", ("requested", 600), (("policy", None), ("subject_svid", 90)), 90, "subject_svid"),
    Caps("fractional_now_floors_to_whole_second", ("requested", 60), (), 60, "requested", now=T0 + 0.75),
    Caps("fractional_cap_floors", ("requested", 600), (("subject_token", 59.9),), 59, "subject_token"),
    Caps("cap_with_nothing_left", ("requested", 60), (("task_deadline", 0.0),), 0, "task_deadline"),
    Caps("cap_already_past", ("requested", 60), (("parent_lease", -5.0),), -5, "parent_lease"),
]


@pytest.mark.parametrize("case", CAPS, ids=[c.id for c in CAPS])
def test_cap_ttl_takes_the_smallest_and_names_it(case: Caps) -> None:
    expected = Lifetime(expires_at=T0 + case.expires_in, capped_by=case.capped_by)
    assert cap_ttl(case.now, case.first, case.caps) == expected


def test_cap_ttl_expiry_is_a_whole_number_of_seconds() -> None:
    lifetime = cap_ttl(T0 + 0.5, ("requested", 10.25), ())
    assert isinstance(lifetime.expires_at, int)
    assert lifetime.expires_at == T0 + 10


def test_cap_ttl_never_ends_after_a_fractional_cap() -> None:
    now = T0 + 0.9
    lifetime = cap_ttl(now, ("requested", 600), (("parent_lease", 30.05),))
    assert lifetime.expires_at <= now + 30.05
