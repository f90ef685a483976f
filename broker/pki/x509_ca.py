"""A SPIFFE trust domain's X.509 CA for tests and dev setups.

`SpiffeCA` holds a root (and optionally an intermediate) with EC P-256 keys and mints
X.509-SVIDs, well-formed or with exactly one named defect (`flaw`), so tests can check
that the verifier refuses each rule on its own. The SPIFFE ID of an SVID is deliberately
not checked against the CA's trust domain: a test can mint a forgery that names another
domain and is signed by this one.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

PrivateKey = ec.EllipticCurvePrivateKey

FLAWS = frozenset(
    {
        "expired",
        "not_yet_valid",
        "ca_leaf",
        "two_uri_sans",
        "no_uri_san",
        "key_cert_sign",
        "crl_sign",
        "no_digital_signature",
        "no_key_usage",
        "key_usage_not_critical",
        "eku_server_only",
    }
)

ROOT_LIFETIME = dt.timedelta(days=3650)
INTERMEDIATE_LIFETIME = dt.timedelta(days=365)
# CA certificates start a day before `now` so that SVIDs minted "in the past" by tests
# (to check expiry and skew) still sit inside their issuers' validity.
CA_BACKDATE = dt.timedelta(days=1)
# How far outside the window the "expired" and "not_yet_valid" flaws put an SVID: well
# beyond any sane clock skew.
FLAW_OFFSET = dt.timedelta(hours=1)


def _utc(now: float | None) -> dt.datetime:
    seconds = dt.datetime.now(dt.UTC).timestamp() if now is None else now
    return dt.datetime.fromtimestamp(seconds, dt.UTC)


def _new_key() -> PrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _to_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


@dataclass(frozen=True, slots=True)
class X509Svid:
    """An X.509-SVID: leaf certificate, its private key and the intermediates up to the root."""

    cert: x509.Certificate
    key: PrivateKey
    intermediates: tuple[x509.Certificate, ...] = ()

    def cert_pem(self) -> bytes:
        """The leaf alone, PEM."""
        return _to_pem(self.cert)

    def key_pem(self) -> bytes:
        """The private key as unencrypted PKCS#8 PEM."""
        return self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def chain_pem(self) -> bytes:
        """The leaf followed by its intermediates, PEM."""
        return b"".join(_to_pem(c) for c in (self.cert, *self.intermediates))

    def write(self, folder: Path, name: str) -> tuple[Path, Path]:
        """Write `<name>.pem` (the chain) and `<name>-key.pem` (mode 0600) into `folder`.

        Returns the two paths, chain first.

        Raises:
            OSError: the folder is not writable.
        """
        folder.mkdir(parents=True, exist_ok=True)
        cert_path = folder / f"{name}.pem"
        key_path = folder / f"{name}-key.pem"
        cert_path.write_bytes(self.chain_pem())
        # Create the key file private from the start, and tighten an existing one.
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o600)
            f.write(self.key_pem())
        return cert_path, key_path


@dataclass(frozen=True, slots=True)
class _Issuer:
    cert: x509.Certificate
    key: PrivateKey


def _ca_cert(
    name: x509.Name,
    key: PrivateKey,
    issuer: _Issuer | None,
    *,
    trust_domain: str,
    not_before: dt.datetime,
    lifetime: dt.timedelta,
    path_length: int | None,
) -> x509.Certificate:
    """A CA certificate for `key`, signed by `issuer` (self-signed when None)."""
    public = key.public_key()
    signer_name, signer_key = (issuer.cert.subject, issuer.key) if issuer else (name, key)
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(signer_name)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_before + lifetime)
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
        .add_extension(_key_usage(digital_signature=False, cert_sign=True, crl_sign=True), critical=True)
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(f"spiffe://{trust_domain}")]),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(signer_key.public_key()), critical=False)
        .sign(signer_key, hashes.SHA256())
    )


def _key_usage(
    *,
    digital_signature: bool,
    key_encipherment: bool = False,
    cert_sign: bool = False,
    crl_sign: bool = False,
) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=False,
        key_encipherment=key_encipherment,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=crl_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _validity(now: dt.datetime, ttl: float, flaw: str | None) -> tuple[dt.datetime, dt.datetime]:
    lifetime = dt.timedelta(seconds=ttl)
    if flaw == "expired":
        not_after = now - FLAW_OFFSET
        return not_after - lifetime, not_after
    if flaw == "not_yet_valid":
        not_before = now + FLAW_OFFSET
        return not_before, not_before + lifetime
    return now, now + lifetime


def _sans(
    spiffe_id: str, flaw: str | None, dns_names: Sequence[str], ip_addresses: Sequence[str]
) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    if flaw != "no_uri_san":
        names.append(x509.UniformResourceIdentifier(spiffe_id))
    if flaw == "two_uri_sans":
        names.append(x509.UniformResourceIdentifier(spiffe_id.rstrip("/") + "/second"))
    names.extend(x509.DNSName(d) for d in dns_names)
    names.extend(x509.IPAddress(ipaddress.ip_address(a)) for a in ip_addresses)
    return names


def _leaf_key_usage(flaw: str | None) -> tuple[x509.KeyUsage, bool] | None:
    if flaw == "no_key_usage":
        return None
    usage = _key_usage(
        digital_signature=flaw != "no_digital_signature",
        key_encipherment=True,
        cert_sign=flaw == "key_cert_sign",
        crl_sign=flaw == "crl_sign",
    )
    return usage, flaw != "key_usage_not_critical"


def _leaf_eku(flaw: str | None) -> x509.ExtendedKeyUsage:
    if flaw == "eku_server_only":
        return x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH])
    return x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH])


class SpiffeCA:
    """A trust domain's CA: a root, and optionally an intermediate that signs the SVIDs.

    `root_key` (and `intermediate_key`) are exposed for tests that craft their own odd
    certificates under this root; never print them.
    """

    def __init__(self, trust_domain: str, *, intermediate: bool = False, now: float | None = None) -> None:
        self.trust_domain = trust_domain
        start = _utc(now) - CA_BACKDATE
        self.root_key = _new_key()
        root_name = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "SPIFFE"),
                x509.NameAttribute(NameOID.COMMON_NAME, f"{trust_domain} root CA"),
            ]
        )
        self.root = _ca_cert(
            root_name,
            self.root_key,
            None,
            trust_domain=trust_domain,
            not_before=start,
            lifetime=ROOT_LIFETIME,
            path_length=None,
        )
        self.intermediate: x509.Certificate | None = None
        self.intermediate_key: PrivateKey | None = None
        if intermediate:
            self.intermediate_key = _new_key()
            name = x509.Name(
                [
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, "SPIFFE"),
                    x509.NameAttribute(NameOID.COMMON_NAME, f"{trust_domain} intermediate CA"),
                ]
            )
            self.intermediate = _ca_cert(
                name,
                self.intermediate_key,
                _Issuer(self.root, self.root_key),
                trust_domain=trust_domain,
                not_before=start,
                lifetime=INTERMEDIATE_LIFETIME,
                path_length=0,
            )

    def bundle_pem(self) -> bytes:
        """The trust domain's X.509 bundle: its root certificate, PEM."""
        return _to_pem(self.root)

    def _signer(self) -> _Issuer:
        if self.intermediate is not None and self.intermediate_key is not None:
            return _Issuer(self.intermediate, self.intermediate_key)
        return _Issuer(self.root, self.root_key)

    def x509_svid(
        self,
        spiffe_id: str,
        *,
        ttl: float = 3600,
        now: float | None = None,
        flaw: str | None = None,
        dns_names: Sequence[str] = (),
        ip_addresses: Sequence[str] = (),
    ) -> X509Svid:
        """Mint an X.509-SVID valid from `now` for `ttl` seconds, or with one `flaw` (see `FLAWS`).

        Raises:
            ValueError: unknown flaw, or an address that is not an IP address.
        """
        if flaw is not None and flaw not in FLAWS:
            raise ValueError(f"unknown flaw {flaw!r}")
        key = _new_key()
        signer = self._signer()
        not_before, not_after = _validity(_utc(now), ttl, flaw)
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "SPIFFE")]))
            .issuer_name(signer.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=flaw == "ca_leaf", path_length=None), critical=True)
            .add_extension(_leaf_eku(flaw), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(signer.key.public_key()), critical=False)
        )
        sans = _sans(spiffe_id, flaw, dns_names, ip_addresses)
        if sans:  # an empty SAN extension is not valid DER, so "no_uri_san" alone omits it
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        usage = _leaf_key_usage(flaw)
        if usage is not None:
            builder = builder.add_extension(usage[0], critical=usage[1])
        cert = builder.sign(signer.key, hashes.SHA256())
        chain = (self.intermediate,) if self.intermediate is not None else ()
        return X509Svid(cert=cert, key=key, intermediates=chain)

    def server_svid(self, spiffe_id: str, hosts: Sequence[str] = ("localhost", "127.0.0.1"), **kw: Any) -> X509Svid:
        """An SVID a TLS server can present: the URI SAN plus DNS/IP SANs for `hosts`.

        gRPC clients check the host they dial against the DNS/IP SANs, so `hosts` must
        name it (the defaults cover `localhost` and `127.0.0.1`).

        Raises:
            ValueError: as `x509_svid`.
        """
        dns: list[str] = []
        ips: list[str] = []
        for host in hosts:
            try:
                ipaddress.ip_address(host)
            except ValueError:
                dns.append(host)
            else:
                ips.append(host)
        return self.x509_svid(spiffe_id, dns_names=dns, ip_addresses=ips, **kw)
