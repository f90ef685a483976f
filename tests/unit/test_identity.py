"""The SPIFFE ID parser against the SPIFFE-ID specification, rule by rule.

Spec: https://github.com/spiffe/spiffe/blob/main/standards/SPIFFE-ID.md (sections 2, 2.1-2.3).
Section 2.4 calls the scheme and trust domain case-insensitive, but 2.1 says the host MUST be
lower case; like go-spiffe and py-spiffe we take the strict reading and refuse upper case.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from broker.domain.errors import InvalidRequest, InvalidSpiffeId
from broker.domain.identity import MAX_ID_BYTES, SpiffeId, TrustDomain, matches_any

PREFIX = "spiffe://example.org/"


def _id_of_bytes(total: int) -> str:
    """A valid-looking SPIFFE ID of exactly `total` ASCII bytes."""
    return PREFIX + "a" * (total - len(PREFIX))


@dataclass(frozen=True, slots=True)
class Valid:
    id: str
    text: str
    trust_domain: str
    path: str


@dataclass(frozen=True, slots=True)
class Invalid:
    id: str
    text: str
    rule: str  # a fragment of the reason, so the case fails for the rule it is about


VALID = [
    Valid("trust-domain-only", "spiffe://example.org", "example.org", ""),
    Valid("one-segment", "spiffe://example.org/workload", "example.org", "/workload"),
    Valid(
        "k8s-style-path",
        "spiffe://k8s-west.example.com/ns/staging/sa/default",
        "k8s-west.example.com",
        "/ns/staging/sa/default",
    ),
    Valid(
        "uuid-path",
        "spiffe://example.com/9eebccd2-12bf-40a6-b262-65fe0487d453",
        "example.com",
        "/9eebccd2-12bf-40a6-b262-65fe0487d453",
    ),
    Valid("td-underscore", "spiffe://trust_domain_name.example.com/a", "trust_domain_name.example.com", "/a"),
    Valid("td-dash-dot-digits", "spiffe://a-1.b-2.c3/x", "a-1.b-2.c3", "/x"),
    Valid("td-single-char", "spiffe://a", "a", ""),
    Valid("td-ipv4-dotted-quad", "spiffe://10.0.0.1/x", "10.0.0.1", "/x"),
    Valid("td-punycode", "spiffe://xn--exmple-cua.org/x", "xn--exmple-cua.org", "/x"),
    Valid("td-255-bytes", "spiffe://" + "a" * 255, "a" * 255, ""),
    Valid("path-upper-case", "spiffe://example.org/Agent/PROD", "example.org", "/Agent/PROD"),
    Valid("path-all-allowed-chars", "spiffe://example.org/aZ09.-_/x", "example.org", "/aZ09.-_/x"),
    Valid("path-three-dots-is-not-a-dot-segment", "spiffe://example.org/...", "example.org", "/..."),
    Valid("path-dot-prefixed-segment", "spiffe://example.org/.hidden/a..b", "example.org", "/.hidden/a..b"),
    Valid("path-many-segments", "spiffe://example.org/a/b/c/d/e/f", "example.org", "/a/b/c/d/e/f"),
    Valid("exactly-2048-bytes", _id_of_bytes(2048), "example.org", _id_of_bytes(2048)[len(PREFIX) - 1 :]),
]

# Characters RFC 3986 allows in a path (sub-delims, ':' '@', '~') or that are common
# mistakes, but that SPIFFE-ID 2.2 leaves out of [a-zA-Z0-9.-_].
_PATH_PUNCTUATION = "~!$&'()*+,;=:@\\\"<>[]^`{|}"

INVALID = [
    # scheme (section 2)
    Invalid("empty", "", "empty"),
    Invalid("scheme-missing", "example.org/workload", "scheme"),
    Invalid("scheme-upper-case", "SPIFFE://example.org/workload", "scheme"),
    Invalid("scheme-mixed-case", "Spiffe://example.org/workload", "scheme"),
    Invalid("scheme-http", "http://example.org/workload", "scheme"),
    Invalid("scheme-https", "https://example.org/workload", "scheme"),
    Invalid("scheme-one-slash", "spiffe:/example.org/workload", "scheme"),
    Invalid("scheme-no-slashes", "spiffe:example.org", "scheme"),
    Invalid("scheme-no-colon", "spiffe//example.org", "scheme"),
    Invalid("scheme-relative", "//example.org/workload", "scheme"),
    Invalid("leading-space", " spiffe://example.org/workload", "scheme"),
    # trust domain (section 2.1)
    Invalid("td-missing", "spiffe://", "trust domain is missing"),
    Invalid("td-missing-with-path", "spiffe:///workload", "trust domain is missing"),
    Invalid("td-upper-case", "spiffe://Example.org/workload", "trust domain"),
    Invalid("td-all-upper-case", "spiffe://EXAMPLE.ORG", "trust domain"),
    Invalid("td-unicode", "spiffe://exämple.org/workload", "trust domain"),
    Invalid("td-fullwidth-unicode", "spiffe://\uff45xample.org", "trust domain"),
    Invalid("td-port", "spiffe://example.org:8443/workload", "trust domain"),
    Invalid("td-empty-port-colon", "spiffe://example.org:/workload", "trust domain"),
    Invalid("td-userinfo", "spiffe://user@example.org/workload", "trust domain"),
    Invalid("td-userinfo-password", "spiffe://user:pw@example.org/workload", "trust domain"),
    Invalid("td-percent-encoded", "spiffe://exa%6Dple.org/workload", "trust domain"),
    Invalid("td-ipv6", "spiffe://[::1]/workload", "trust domain"),
    Invalid("td-space", "spiffe://example org/workload", "trust domain"),
    Invalid("td-query", "spiffe://example.org?x=1", "trust domain"),
    Invalid("td-fragment", "spiffe://example.org#frag", "trust domain"),
    Invalid("td-backslash", "spiffe://example.org\\workload", "trust domain"),
    Invalid("td-256-bytes", "spiffe://" + "a" * 256, "255"),
    # path (section 2.2)
    Invalid("path-only-slash", "spiffe://example.org/", "trailing slash"),
    Invalid("path-trailing-slash", "spiffe://example.org/a/", "trailing slash"),
    Invalid("path-leading-empty-segment", "spiffe://example.org//a", "empty segment"),
    Invalid("path-inner-empty-segment", "spiffe://example.org/a//b", "empty segment"),
    Invalid("path-dot", "spiffe://example.org/.", "dot segment"),
    Invalid("path-dot-dot", "spiffe://example.org/..", "dot segment"),
    Invalid("path-inner-dot", "spiffe://example.org/a/./b", "dot segment"),
    Invalid("path-inner-dot-dot", "spiffe://example.org/a/../b", "dot segment"),
    Invalid("path-trailing-dot-dot", "spiffe://example.org/a/..", "dot segment"),
    Invalid("path-percent-encoded-space", "spiffe://example.org/a%20b", "'%'"),
    Invalid("path-percent-encoded-dots", "spiffe://example.org/%2E%2E", "'%'"),
    Invalid("path-query", "spiffe://example.org/a?b", "'?'"),
    Invalid("path-query-key-value", "spiffe://example.org/a?b=c", "character outside"),
    Invalid("path-empty-query", "spiffe://example.org/a?", "'?'"),
    Invalid("path-fragment", "spiffe://example.org/a#frag", "'#'"),
    Invalid("path-empty-fragment", "spiffe://example.org/a#", "'#'"),
    Invalid("path-space", "spiffe://example.org/a b", "' '"),
    Invalid("path-tab", "spiffe://example.org/a\tb", "'\\t'"),
    Invalid("path-newline", "spiffe://example.org/a\nb", "'\\n'"),
    Invalid("path-nul", "spiffe://example.org/a\x00b", "'\\x00'"),
    Invalid("path-unicode", "spiffe://example.org/ä", "'ä'"),
    Invalid("path-emoji", "spiffe://example.org/agent-🤖", "'🤖'"),
    *(Invalid(f"path-char-{ord(c):02x}", f"spiffe://example.org/a{c}b", repr(c)) for c in _PATH_PUNCTUATION),
    # length (section 2.3): bytes, not characters
    Invalid("2049-bytes", _id_of_bytes(2049), f"longer than {MAX_ID_BYTES} bytes"),
    Invalid("far-too-long", _id_of_bytes(10_000), f"longer than {MAX_ID_BYTES} bytes"),
    Invalid("multibyte-over-2048-bytes-under-2048-chars", PREFIX + "é" * 1014, f"longer than {MAX_ID_BYTES} bytes"),
]


def test_the_tables_are_big_enough_and_ids_unique() -> None:
    ids = [c.id for c in VALID] + [c.id for c in INVALID]
    assert len(ids) >= 60
    assert len(ids) == len(set(ids))
    assert len(_id_of_bytes(2048).encode()) == 2048
    assert len((PREFIX + "é" * 1014).encode()) == 2049 and len(PREFIX + "é" * 1014) < 2048


@pytest.mark.parametrize("case", VALID, ids=lambda c: c.id)
def test_valid_id_parses_into_trust_domain_and_path(case: Valid) -> None:
    sid = SpiffeId.parse(case.text)
    assert sid.trust_domain == TrustDomain(case.trust_domain)
    assert sid.path == case.path


@pytest.mark.parametrize("case", VALID, ids=lambda c: c.id)
def test_valid_id_round_trips_through_str(case: Valid) -> None:
    sid = SpiffeId.parse(case.text)
    assert str(sid) == case.text
    assert SpiffeId.parse(str(sid)) == sid


@pytest.mark.parametrize("case", INVALID, ids=lambda c: c.id)
def test_invalid_id_is_refused_with_the_rule_it_breaks(case: Invalid) -> None:
    with pytest.raises(InvalidSpiffeId) as info:
        SpiffeId.parse(case.text)
    assert case.rule in info.value.reason


def test_invalid_spiffe_id_is_an_invalid_request() -> None:
    with pytest.raises(InvalidRequest):
        SpiffeId.parse("spiffe://Example.org")


def test_non_string_is_refused() -> None:
    with pytest.raises(InvalidSpiffeId, match="not a string"):
        SpiffeId.parse(b"spiffe://example.org/a")  # type: ignore[arg-type]


@dataclass(frozen=True, slots=True)
class Built:
    id: str
    trust_domain: str
    path: str


@pytest.mark.parametrize(
    "case",
    [
        Built("td-upper-case", "Example.org", "/a"),
        Built("td-empty", "", "/a"),
        Built("path-without-leading-slash", "example.org", "a"),
        Built("path-trailing-slash", "example.org", "/a/"),
        Built("path-dot-dot", "example.org", "/a/.."),
        Built("over-2048-bytes", "example.org", "/" + "a" * 2048),
    ],
    ids=lambda c: c.id,
)
def test_constructing_directly_validates_too(case: Built) -> None:
    with pytest.raises(InvalidSpiffeId):
        SpiffeId(TrustDomain(case.trust_domain), case.path)


def test_path_is_case_sensitive() -> None:
    assert SpiffeId.parse("spiffe://example.org/Agent") != SpiffeId.parse("spiffe://example.org/agent")


def test_equal_ids_are_equal_and_hash_alike() -> None:
    a, b = SpiffeId.parse("spiffe://example.org/a/b"), SpiffeId.parse("spiffe://example.org/a/b")
    assert a == b
    assert {a: 1}[b] == 1


def test_spiffe_id_is_immutable() -> None:
    sid = SpiffeId.parse("spiffe://example.org/a")
    with pytest.raises(AttributeError):
        sid.path = "/b"  # type: ignore[misc]


@dataclass(frozen=True, slots=True)
class TdCase:
    id: str
    text: str
    name: str | None  # None: refused


TRUST_DOMAINS = [
    TdCase("bare-name", "example.org", "example.org"),
    TdCase("bare-name-underscore", "my_td.example-1.org", "my_td.example-1.org"),
    TdCase("spiffe-form", "spiffe://example.org", "example.org"),
    TdCase("spiffe-form-with-path", "spiffe://example.org/workload", None),
    TdCase("spiffe-form-trailing-slash", "spiffe://example.org/", None),
    TdCase("spiffe-form-upper-scheme", "SPIFFE://example.org", None),
    TdCase("spiffe-form-empty", "spiffe://", None),
    TdCase("bare-upper-case", "Example.org", None),
    TdCase("bare-empty", "", None),
    TdCase("bare-with-path", "example.org/workload", None),
    TdCase("bare-with-port", "example.org:443", None),
    TdCase("bare-with-userinfo", "me@example.org", None),
    TdCase("bare-unicode", "exämple.org", None),
    TdCase("bare-percent-encoded", "exa%6Dple.org", None),
    TdCase("http-url", "https://example.org", None),
    TdCase("bare-256-bytes", "a" * 256, None),
]


@pytest.mark.parametrize("case", TRUST_DOMAINS, ids=lambda c: c.id)
def test_trust_domain_parse(case: TdCase) -> None:
    if case.name is None:
        with pytest.raises(InvalidSpiffeId):
            TrustDomain.parse(case.text)
    else:
        td = TrustDomain.parse(case.text)
        assert td == TrustDomain(case.name)
        assert str(td) == case.name


def test_trust_domain_id_is_spiffe_id_without_path() -> None:
    td = TrustDomain.parse("example.org")
    assert td.id() == SpiffeId.parse("spiffe://example.org")
    assert str(td.id()) == "spiffe://example.org"
    assert TrustDomain.parse(str(td.id())) == td


@dataclass(frozen=True, slots=True)
class MemberCase:
    id: str
    spiffe_id: str
    trust_domain: str
    expected: bool


@pytest.mark.parametrize(
    "case",
    [
        MemberCase("same-domain", "spiffe://example.org/a", "example.org", True),
        MemberCase("domain-own-id", "spiffe://example.org", "example.org", True),
        MemberCase("other-domain", "spiffe://example.com/a", "example.org", False),
        MemberCase("parent-domain-is-not-a-member", "spiffe://sub.example.org/a", "example.org", False),
        MemberCase("suffix-is-not-a-member", "spiffe://example.org/a", "org", False),
        MemberCase("lookalike-prefix", "spiffe://example.org.evil.com/a", "example.org", False),
    ],
    ids=lambda c: c.id,
)
def test_member_of(case: MemberCase) -> None:
    assert SpiffeId.parse(case.spiffe_id).member_of(TrustDomain(case.trust_domain)) is case.expected


@dataclass(frozen=True, slots=True)
class GlobCase:
    id: str
    principal: str
    patterns: tuple[str, ...]
    expected: bool


OPS = "spiffe://example.org/operator/*"


@pytest.mark.parametrize(
    "case",
    [
        GlobCase("exact", "spiffe://example.org/operator/alice", ("spiffe://example.org/operator/alice",), True),
        GlobCase("exact-differs", "spiffe://example.org/operator/bob", ("spiffe://example.org/operator/alice",), False),
        GlobCase("star-one-segment", "spiffe://example.org/operator/alice", (OPS,), True),
        GlobCase("star-spans-segments", "spiffe://example.org/operator/team/alice", (OPS,), True),
        GlobCase("star-needs-the-slash", "spiffe://example.org/operator", (OPS,), False),
        GlobCase("longer-sibling-segment", "spiffe://example.org/operators/alice", (OPS,), False),
        GlobCase("other-trust-domain", "spiffe://evil.org/operator/alice", (OPS,), False),
        GlobCase("lookalike-trust-domain", "spiffe://example.org.evil.org/operator/alice", (OPS,), False),
        GlobCase("case-sensitive", "spiffe://example.org/Operator/alice", (OPS,), False),
        GlobCase("no-patterns", "spiffe://example.org/operator/alice", (), False),
        GlobCase("second-pattern-matches", "spiffe://example.org/ci/runner", (OPS, "spiffe://example.org/ci/*"), True),
        GlobCase(
            "star-in-trust-domain", "spiffe://eu.example.org/operator/a", ("spiffe://*.example.org/operator/*",), True
        ),
        GlobCase(
            "star-inside-segment", "spiffe://example.org/agent-7/run", ("spiffe://example.org/agent-*/run",), True
        ),
    ],
    ids=lambda c: c.id,
)
def test_matches_any(case: GlobCase) -> None:
    assert matches_any(case.principal, case.patterns) is case.expected
