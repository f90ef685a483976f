"""X.509-SVID verification: `cryptography`'s path building plus the SPIFFE rules on top.

The leaf's own SPIFFE ID picks the trust domain, and only that domain's roots may anchor
the chain: bundles are never pooled, so a chain that another domain's CA signed fails even
if that CA is trusted for its own domain.

Order of checks: the SPIFFE rules on the leaf come first so that a refusal names the rule
(the library would refuse several of these too, but with its own wording), then validity
with skew, then the library builds and checks the path (signatures, intermediates are CAs
within path length, every certificate valid at the validation time).
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
from collections.abc import Mapping, Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from broker.domain.errors import CredentialRejected, InvalidSpiffeId
from broker.domain.identity import AuthKind, Identity, SpiffeId, TrustDomain

# A peer chain longer than this is refused before any path building (bounds the work an
# unauthenticated peer can cause); real SVID chains have at most a few intermediates.
MAX_INTERMEDIATES = 8
# Path length the library may build, trust anchor included.
MAX_CHAIN_DEPTH = 8

_BOTH_AUTH = frozenset({ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH})


def _reject(rule: str) -> CredentialRejected:
    return CredentialRejected(f"x509: {rule}")


def load_bundle(path: Path) -> tuple[x509.Certificate, ...]:
    """Read an X.509 bundle: one or more PEM root certificates, all of them CAs.

    Raises:
        ValueError: the file cannot be read, holds no certificate, or holds a non-CA.
    """
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise ValueError(f"cannot read bundle {path}: {e.strerror or e}") from e
    try:
        certs = tuple(x509.load_pem_x509_certificates(data))
    except ValueError as e:
        raise ValueError(f"bundle {path} holds no readable PEM certificate") from e
    for index, cert in enumerate(certs):
        if not _is_ca(cert):
            raise ValueError(f"bundle {path}: certificate {index} is not a CA")
    return certs


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except (x509.ExtensionNotFound, ValueError, x509.DuplicateExtension):
        return False


def x5t_s256(cert: x509.Certificate) -> str:
    """The RFC 8705 certificate thumbprint: base64url, unpadded, of SHA-256 over the DER."""
    digest = hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def _load_blob(blob: object) -> list[x509.Certificate]:
    if isinstance(blob, str):
        blob = blob.encode("utf-8", "replace")
    if not isinstance(blob, bytes | bytearray | memoryview):
        raise _reject("certificate is not PEM")
    data = bytes(blob)
    if not data.strip():
        return []
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError as e:
        raise _reject("certificate is not PEM") from e


def _split_peer(leaf_pem: bytes, chain_pem: Sequence[bytes]) -> tuple[x509.Certificate, list[x509.Certificate]]:
    """The leaf and the untrusted intermediates, without the leaf and without duplicates."""
    leaf_certs = _load_blob(leaf_pem)
    if not leaf_certs:
        raise _reject("no peer certificate")
    leaf, extra = leaf_certs[0], leaf_certs[1:]
    if isinstance(chain_pem, bytes | bytearray | str):  # one blob passed where a list was meant
        chain_pem = [chain_pem]
    intermediates: list[x509.Certificate] = []
    seen = {leaf}
    for cert in [*extra, *(c for blob in chain_pem for c in _load_blob(blob))]:
        if cert not in seen:
            seen.add(cert)
            intermediates.append(cert)
    if len(intermediates) > MAX_INTERMEDIATES:
        raise _reject("chain too long")
    return leaf, intermediates


def _spiffe_id(exts: x509.Extensions) -> SpiffeId:
    try:
        sans = exts.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound as e:
        raise _reject("exactly one URI SAN required") from e
    uris = sans.get_values_for_type(x509.UniformResourceIdentifier)
    if len(uris) != 1:
        raise _reject("exactly one URI SAN required")
    try:
        spiffe_id = SpiffeId.parse(uris[0])
    except InvalidSpiffeId as e:
        raise _reject("URI SAN is not a SPIFFE ID") from e
    if not spiffe_id.path:
        # X509-SVID 3.1 and 5.2: a leaf names a workload; spiffe://<td> alone names the trust domain.
        raise _reject("a workload's SPIFFE ID must have a path")
    return spiffe_id


def _check_leaf_usage(exts: x509.Extensions) -> None:
    try:
        basic = exts.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        basic = None  # absent basicConstraints means "not a CA" (RFC 5280 4.2.1.9)
    if basic is not None and basic.ca:
        raise _reject("leaf must not be a CA")
    try:
        ku_ext = exts.get_extension_for_class(x509.KeyUsage)
    except x509.ExtensionNotFound as e:
        raise _reject("key usage required") from e
    if not ku_ext.critical:
        raise _reject("key usage must be critical")
    usage = ku_ext.value
    if not usage.digital_signature:
        raise _reject("key usage must include digitalSignature")
    if usage.key_cert_sign:
        raise _reject("leaf must not have keyCertSign")
    if usage.crl_sign:
        raise _reject("leaf must not have cRLSign")
    try:
        eku = exts.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return
    if not _BOTH_AUTH.issubset(eku):
        raise _reject("extended key usage must include both clientAuth and serverAuth")


def _validation_time(leaf: x509.Certificate, now: float, skew: float) -> dt.datetime:
    """The time to verify the chain at: `now`, moved into the leaf's window by at most `skew`.

    The library has no notion of skew, so rather than widening every certificate's window
    we clamp the validation time into the leaf's validity. Because the move is at most
    `skew`, every certificate of the path is still checked within `skew` of `now`; an
    issuer whose own window ends (or starts) inside that same skew band on the other
    side is refused, which errs on the strict side.
    """
    not_before = leaf.not_valid_before_utc.timestamp()
    not_after = leaf.not_valid_after_utc.timestamp()
    if now + skew < not_before:
        raise _reject("certificate not yet valid")
    if now - skew > not_after:
        raise _reject("certificate expired")
    return dt.datetime.fromtimestamp(min(max(now, not_before), not_after), dt.UTC)


class X509SvidVerifier:
    """Verifies a peer's X.509-SVID chain against the bundle of the trust domain it names."""

    def __init__(self, bundles: Mapping[str, Sequence[x509.Certificate]], *, clock_skew: float = 30) -> None:
        """Keep one trust store per trust domain.

        Raises:
            InvalidSpiffeId: a key is not a trust domain name.
            ValueError: a trust domain has an empty bundle, or the skew is negative.
        """
        if clock_skew < 0:
            raise ValueError("clock skew must not be negative")
        self._skew = float(clock_skew)
        self._stores: dict[str, Store] = {}
        for name, roots in bundles.items():
            TrustDomain(name)
            if not roots:
                raise ValueError(f"bundle of {name} is empty")
            self._stores[name] = Store(list(roots))

    @property
    def trust_domains(self) -> tuple[str, ...]:
        return tuple(self._stores)

    def verify(self, leaf_pem: bytes, chain_pem: Sequence[bytes], *, now: float) -> Identity:
        """Verify the peer's leaf and chain (as gRPC's auth context gives them) at `now`.

        Raises:
            CredentialRejected: "x509: <rule>" naming the first rule the chain breaks.
        """
        leaf, intermediates = _split_peer(leaf_pem, chain_pem)
        try:
            exts = leaf.extensions
        except (ValueError, x509.DuplicateExtension, x509.UnsupportedGeneralNameType) as e:
            raise _reject("malformed certificate extensions") from e
        spiffe_id = _spiffe_id(exts)
        domain = spiffe_id.trust_domain.name
        store = self._stores.get(domain)
        if store is None:
            raise _reject(f"unknown trust domain {domain}")
        _check_leaf_usage(exts)
        at = _validation_time(leaf, now, self._skew)
        verifier = PolicyBuilder().store(store).time(at).max_chain_depth(MAX_CHAIN_DEPTH).build_client_verifier()
        try:
            verifier.verify(leaf, intermediates)
        except (VerificationError, ValueError) as e:
            raise _reject(f"chain does not verify against the bundle of {domain}") from e
        return Identity(
            principal=str(spiffe_id),
            kind=AuthKind.X509_SVID,
            trust_domain=domain,
            expires_at=leaf.not_valid_after_utc.timestamp(),
            x5t_s256=x5t_s256(leaf),
        )
