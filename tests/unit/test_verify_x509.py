"""X.509-SVID verification: SPIFFE rules on the leaf, per-domain bundles, skew, PEM handling."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from broker.domain.errors import CredentialRejected
from broker.domain.identity import AuthKind
from broker.testing.x509_ca import SpiffeCA, X509Svid
from broker.verify.x509 import X509SvidVerifier, load_bundle

NOW = 1_750_000_000.0
TTL = 600
SKEW = 30
AGENT = "spiffe://example.org/agent"
CHAIN_FAILS = "x509: chain does not verify against the bundle of example.org"


@dataclass(frozen=True, slots=True)
class Cas:
    direct: SpiffeCA
    layered: SpiffeCA
    foreign: SpiffeCA
    unknown: SpiffeCA


@pytest.fixture(scope="module")
def cas() -> Cas:
    return Cas(
        direct=SpiffeCA("example.org", now=NOW),
        layered=SpiffeCA("example.org", intermediate=True, now=NOW),
        foreign=SpiffeCA("example.net", intermediate=True, now=NOW),
        unknown=SpiffeCA("unknown.test", now=NOW),
    )


@pytest.fixture(scope="module")
def verifier(cas: Cas) -> X509SvidVerifier:
    return X509SvidVerifier(
        {"example.org": [cas.direct.root, cas.layered.root], "example.net": [cas.foreign.root]},
        clock_skew=SKEW,
    )


def _pems(svid: X509Svid) -> tuple[bytes, list[bytes]]:
    return svid.cert_pem(), [c.public_bytes(serialization.Encoding.PEM) for c in svid.intermediates]


def _ca_of(cas: Cas, layered: bool) -> SpiffeCA:
    return cas.layered if layered else cas.direct


def _rejection(verifier: X509SvidVerifier, leaf: bytes, chain: list[bytes], at: float = NOW) -> str:
    with pytest.raises(CredentialRejected) as info:
        verifier.verify(leaf, chain, now=at)
    return info.value.reason


# --- good chains ------------------------------------------------------------------------------


@pytest.mark.parametrize("layered", [False, True], ids=["from-root", "via-intermediate"])
def test_good_svid_yields_its_identity(cas: Cas, verifier: X509SvidVerifier, layered: bool) -> None:
    svid = _ca_of(cas, layered).x509_svid(AGENT, ttl=TTL, now=NOW)
    identity = verifier.verify(*_pems(svid), now=NOW)
    assert identity.principal == AGENT
    assert identity.kind is AuthKind.X509_SVID
    assert identity.trust_domain == "example.org"
    assert identity.expires_at == NOW + TTL


def test_x5t_s256_is_unpadded_base64url_sha256_of_leaf_der(cas: Cas, verifier: X509SvidVerifier) -> None:
    svid = cas.direct.x509_svid(AGENT, now=NOW)
    der = svid.cert.public_bytes(serialization.Encoding.DER)
    expected = base64.urlsafe_b64encode(hashlib.sha256(der).digest()).rstrip(b"=").decode()
    identity = verifier.verify(svid.cert_pem(), [], now=NOW)
    assert identity.x5t_s256 == expected
    assert len(expected) == 43


@dataclass(frozen=True, slots=True)
class PemShape:
    id: str
    build: Callable[[X509Svid, SpiffeCA], tuple[bytes, list[bytes]]]


PEM_SHAPES = [
    PemShape("leaf-and-intermediate-in-one-blob", lambda s, ca: (s.cert_pem(), [s.chain_pem()])),
    PemShape("leaf-as-its-own-blob", lambda s, ca: (s.cert_pem(), [s.cert_pem(), *_pems(s)[1]])),
    PemShape("root-sent-too", lambda s, ca: (s.cert_pem(), [s.chain_pem(), ca.bundle_pem()])),
    PemShape("intermediate-twice", lambda s, ca: (s.cert_pem(), [*_pems(s)[1], *_pems(s)[1]])),
    PemShape("whole-chain-as-leaf", lambda s, ca: (s.chain_pem(), [])),
    PemShape("empty-blob-ignored", lambda s, ca: (s.cert_pem(), [b"", *_pems(s)[1]])),
]


@pytest.mark.parametrize("shape", PEM_SHAPES, ids=lambda c: c.id)
def test_peer_chain_shapes_grpc_may_give_are_accepted(cas: Cas, verifier: X509SvidVerifier, shape: PemShape) -> None:
    svid = cas.layered.x509_svid(AGENT, now=NOW)
    identity = verifier.verify(*shape.build(svid, cas.layered), now=NOW)
    assert identity.principal == AGENT


def test_missing_intermediate_fails(cas: Cas, verifier: X509SvidVerifier) -> None:
    svid = cas.layered.x509_svid(AGENT, now=NOW)
    assert _rejection(verifier, svid.cert_pem(), []) == CHAIN_FAILS


def test_server_svid_verifies_and_names_hosts(cas: Cas, verifier: X509SvidVerifier) -> None:
    svid = cas.layered.server_svid("spiffe://example.org/broker", now=NOW)
    sans = svid.cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["localhost"]
    assert [str(a) for a in sans.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert verifier.verify(*_pems(svid), now=NOW).principal == "spiffe://example.org/broker"


# --- one flaw, one rule -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FlawCase:
    flaw: str
    rule: str


FLAW_CASES = [
    FlawCase("ca_leaf", "x509: leaf must not be a CA"),
    FlawCase("two_uri_sans", "x509: exactly one URI SAN required"),
    FlawCase("no_uri_san", "x509: exactly one URI SAN required"),
    FlawCase("key_cert_sign", "x509: leaf must not have keyCertSign"),
    FlawCase("crl_sign", "x509: leaf must not have cRLSign"),
    FlawCase("no_digital_signature", "x509: key usage must include digitalSignature"),
    FlawCase("no_key_usage", "x509: key usage required"),
    FlawCase("key_usage_not_critical", "x509: key usage must be critical"),
    FlawCase("eku_server_only", "x509: extended key usage must include both clientAuth and serverAuth"),
    FlawCase("expired", "x509: certificate expired"),
    FlawCase("not_yet_valid", "x509: certificate not yet valid"),
]


@pytest.mark.parametrize("layered", [False, True], ids=["from-root", "via-intermediate"])
@pytest.mark.parametrize("case", FLAW_CASES, ids=lambda c: c.flaw)
def test_each_flaw_is_refused_with_its_rule(
    cas: Cas, verifier: X509SvidVerifier, case: FlawCase, layered: bool
) -> None:
    svid = _ca_of(cas, layered).x509_svid(AGENT, ttl=TTL, now=NOW, flaw=case.flaw)
    assert _rejection(verifier, *_pems(svid)) == case.rule


def test_no_uri_san_beside_dns_san_is_refused(cas: Cas, verifier: X509SvidVerifier) -> None:
    svid = cas.direct.x509_svid(AGENT, now=NOW, flaw="no_uri_san", dns_names=["agent.example.org"])
    assert _rejection(verifier, *_pems(svid)) == "x509: exactly one URI SAN required"


def test_uri_san_that_is_not_a_spiffe_id_is_refused(cas: Cas, verifier: X509SvidVerifier) -> None:
    svid = cas.direct.x509_svid("https://example.org/agent", now=NOW)
    assert _rejection(verifier, *_pems(svid)) == "x509: URI SAN is not a SPIFFE ID"


def test_trust_domain_id_without_a_path_is_not_a_workload(cas: Cas, verifier: X509SvidVerifier) -> None:
    # X509-SVID 3.1 and 5.2: a leaf's SPIFFE ID has a non-root path; spiffe://example.org names the domain.
    svid = cas.direct.x509_svid("spiffe://example.org", now=NOW)
    assert _rejection(verifier, *_pems(svid)) == "x509: a workload's SPIFFE ID must have a path"


# --- which bundle ------------------------------------------------------------------------------


def test_other_domains_ca_cannot_sign_for_this_domain(cas: Cas, verifier: X509SvidVerifier) -> None:
    forged = cas.foreign.x509_svid(AGENT, now=NOW)
    assert _rejection(verifier, *_pems(forged)) == CHAIN_FAILS


def test_other_domains_ca_signs_for_its_own_domain(cas: Cas, verifier: X509SvidVerifier) -> None:
    svid = cas.foreign.x509_svid("spiffe://example.net/agent", now=NOW)
    assert verifier.verify(*_pems(svid), now=NOW).trust_domain == "example.net"


def test_unknown_trust_domain_is_refused(cas: Cas, verifier: X509SvidVerifier) -> None:
    svid = cas.unknown.x509_svid("spiffe://unknown.test/agent", now=NOW)
    assert _rejection(verifier, *_pems(svid)) == "x509: unknown trust domain unknown.test"


# --- validity and skew ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SkewCase:
    id: str
    at: float
    rule: str | None  # None: accepted


SKEW_CASES = [
    SkewCase("before-start-inside-skew", NOW - SKEW + 1, None),
    SkewCase("before-start-at-skew", NOW - SKEW, None),
    SkewCase("before-start-outside-skew", NOW - SKEW - 1, "x509: certificate not yet valid"),
    SkewCase("after-end-inside-skew", NOW + TTL + SKEW - 1, None),
    SkewCase("after-end-at-skew", NOW + TTL + SKEW, None),
    SkewCase("after-end-outside-skew", NOW + TTL + SKEW + 1, "x509: certificate expired"),
]


@pytest.mark.parametrize("layered", [False, True], ids=["from-root", "via-intermediate"])
@pytest.mark.parametrize("case", SKEW_CASES, ids=lambda c: c.id)
def test_validity_allows_the_clock_skew(cas: Cas, verifier: X509SvidVerifier, case: SkewCase, layered: bool) -> None:
    svid = _ca_of(cas, layered).x509_svid(AGENT, ttl=TTL, now=NOW)
    if case.rule is None:
        assert verifier.verify(*_pems(svid), now=case.at).principal == AGENT
    else:
        assert _rejection(verifier, *_pems(svid), at=case.at) == case.rule


def test_zero_skew_refuses_a_second_early(cas: Cas) -> None:
    strict = X509SvidVerifier({"example.org": [cas.direct.root]}, clock_skew=0)
    svid = cas.direct.x509_svid(AGENT, ttl=TTL, now=NOW)
    assert strict.verify(svid.cert_pem(), [], now=NOW).principal == AGENT
    assert _rejection(strict, svid.cert_pem(), [], at=NOW - 1) == "x509: certificate not yet valid"


# --- garbage -------------------------------------------------------------------------------------

JUNK_PEM = b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"


@dataclass(frozen=True, slots=True)
class GarbageCase:
    id: str
    leaf: bytes | None  # None: a good leaf
    chain: tuple[object, ...]
    rule: str


GARBAGE_CASES = [
    GarbageCase("leaf-not-pem", b"garbage", (), "x509: certificate is not PEM"),
    GarbageCase("leaf-junk-der", JUNK_PEM, (), "x509: certificate is not PEM"),
    GarbageCase("leaf-empty", b"", (), "x509: no peer certificate"),
    GarbageCase("chain-not-pem", None, (b"garbage",), "x509: certificate is not PEM"),
    GarbageCase("chain-junk-der", None, (JUNK_PEM,), "x509: certificate is not PEM"),
    GarbageCase("chain-not-bytes", None, (42,), "x509: certificate is not PEM"),
]


@pytest.mark.parametrize("case", GARBAGE_CASES, ids=lambda c: c.id)
def test_garbage_pem_is_rejected_not_crashed(cas: Cas, verifier: X509SvidVerifier, case: GarbageCase) -> None:
    leaf = cas.direct.x509_svid(AGENT, now=NOW).cert_pem() if case.leaf is None else case.leaf
    assert _rejection(verifier, leaf, list(case.chain)) == case.rule  # type: ignore[arg-type]


def test_overlong_chain_is_refused(cas: Cas, verifier: X509SvidVerifier) -> None:
    svid = cas.direct.x509_svid(AGENT, now=NOW)
    extra = [SpiffeCA(f"td{i}.test", now=NOW).bundle_pem() for i in range(9)]
    assert _rejection(verifier, svid.cert_pem(), extra) == "x509: chain too long"


# --- crafted intermediates ------------------------------------------------------------------------


def _cert(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: x509.Certificate,
    issuer_key: ec.EllipticCurvePrivateKey,
    *,
    ca: bool,
    path_length: int | None = None,
    uri: str | None = None,
) -> x509.Certificate:
    start = dt.datetime.fromtimestamp(NOW, dt.UTC)
    usage = dict.fromkeys(
        [
            "content_commitment",
            "key_encipherment",
            "data_encipherment",
            "key_agreement",
            "encipher_only",
            "decipher_only",
        ],
        False,
    )
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(issuer.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + dt.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=path_length if ca else None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=not ca, key_cert_sign=ca, crl_sign=ca, **usage), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), critical=False)
    )
    if uri is not None:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]), critical=False
        ).add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH]),
            critical=False,
        )
    return builder.sign(issuer_key, hashes.SHA256())


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


@dataclass(frozen=True, slots=True)
class CraftedCase:
    id: str
    intermediate_is_ca: bool
    path_length: int | None  # of the top intermediate
    levels: int  # intermediates between root and leaf
    accepted: bool


CRAFTED_CASES = [
    CraftedCase("ca-intermediate", True, None, 1, True),
    CraftedCase("non-ca-intermediate", False, None, 1, False),
    CraftedCase("two-levels-within-path-length", True, 1, 2, True),
    CraftedCase("two-levels-beyond-path-length-0", True, 0, 2, False),
]


@pytest.mark.parametrize("case", CRAFTED_CASES, ids=lambda c: c.id)
def test_intermediates_must_be_cas_within_path_length(cas: Cas, verifier: X509SvidVerifier, case: CraftedCase) -> None:
    issuer, issuer_key = cas.direct.root, cas.direct.root_key
    chain: list[bytes] = []
    for level in range(case.levels):
        key = ec.generate_private_key(ec.SECP256R1())
        top = level == 0
        cert = _cert(
            f"intermediate {level}",
            key,
            issuer,
            issuer_key,
            ca=case.intermediate_is_ca or not top,
            path_length=case.path_length if top else None,
        )
        chain.insert(0, _pem(cert))
        issuer, issuer_key = cert, key
    leaf = _cert("leaf", ec.generate_private_key(ec.SECP256R1()), issuer, issuer_key, ca=False, uri=AGENT)
    if case.accepted:
        assert verifier.verify(_pem(leaf), chain, now=NOW).principal == AGENT
    else:
        assert _rejection(verifier, _pem(leaf), chain) == CHAIN_FAILS


def test_rejection_chains_the_library_error(cas: Cas, verifier: X509SvidVerifier) -> None:
    forged = cas.foreign.x509_svid(AGENT, now=NOW)
    with pytest.raises(CredentialRejected) as info:
        verifier.verify(*_pems(forged), now=NOW)
    assert info.value.__cause__ is not None


# --- bundles ----------------------------------------------------------------------------------------


def test_load_bundle_reads_every_root(tmp_path: Path, cas: Cas) -> None:
    path = tmp_path / "bundle.pem"
    path.write_bytes(cas.direct.bundle_pem() + cas.layered.bundle_pem())
    assert load_bundle(path) == (cas.direct.root, cas.layered.root)


@dataclass(frozen=True, slots=True)
class BadBundle:
    id: str
    content: bytes | None  # None: no file at all
    message: str


@pytest.mark.parametrize(
    "case",
    [
        BadBundle("missing", None, "cannot read bundle"),
        BadBundle("garbage", b"not a pem", "holds no readable PEM certificate"),
        BadBundle("leaf-not-ca", b"LEAF", "is not a CA"),
    ],
    ids=lambda c: c.id,
)
def test_load_bundle_refuses_bad_files(tmp_path: Path, cas: Cas, case: BadBundle) -> None:
    path = tmp_path / "bundle.pem"
    if case.content is not None:
        leaf = cas.direct.x509_svid(AGENT, now=NOW).cert_pem()
        path.write_bytes(leaf if case.content == b"LEAF" else case.content)
    with pytest.raises(ValueError, match=case.message):
        load_bundle(path)


def test_empty_bundle_is_refused_at_construction() -> None:
    with pytest.raises(ValueError, match=r"bundle of example\.org is empty"):
        X509SvidVerifier({"example.org": []})


def test_svid_write_makes_private_key_file(tmp_path: Path, cas: Cas, verifier: X509SvidVerifier) -> None:
    svid = cas.layered.x509_svid(AGENT, now=NOW)
    cert_path, key_path = svid.write(tmp_path, "agent")
    assert key_path.stat().st_mode & 0o777 == 0o600
    assert serialization.load_pem_private_key(key_path.read_bytes(), None).public_key() == svid.key.public_key()
    chain = cert_path.read_bytes()
    assert verifier.verify(chain, [chain], now=NOW).principal == AGENT
