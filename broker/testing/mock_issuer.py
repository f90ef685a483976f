"""One facade over the test kit's issuers, and a standalone mock issuer.

`MockIssuer` hands out a SPIFFE CA and a JWT-SVID issuer per trust domain (made once,
then cached) and one OIDC provider started on first use:

    with MockIssuer() as issuer:
        svid = issuer.x509_svid("spiffe://example.org/agent")
        token = issuer.jwt_svid("spiffe://example.org/agent", "spiffe://example.org/broker")

Run standalone, it writes a trust domain's bundle, JWKS and SVIDs into a folder and serves
OIDC discovery and JWKS until SIGINT or SIGTERM:

    python -m broker.testing.mock_issuer --out certs --svid spiffe://example.org/agent --port 0
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import signal
import sys
import threading
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any

from broker.domain.errors import InvalidSpiffeId
from broker.domain.identity import SpiffeId, TrustDomain
from broker.testing.jwt_issuer import JwtSvidIssuer, OidcProvider
from broker.testing.x509_ca import SpiffeCA, X509Svid

DEFAULT_TRUST_DOMAIN = "example.org"


class MockIssuer:
    """SPIFFE CAs, JWT-SVID issuers and an OIDC provider for tests, made on demand.

    `now` (POSIX seconds) dates the CAs, so tests on a fake clock far from the wall clock
    still get roots valid at their times. `oidc_port` 0 picks a free port.
    """

    def __init__(self, *, now: float | None = None, oidc_port: int = 0) -> None:
        self._now = now
        self._oidc_port = oidc_port
        self._lock = threading.Lock()
        self._cas: dict[tuple[str, bool], SpiffeCA] = {}
        self._jwt: dict[str, JwtSvidIssuer] = {}
        self._oidc: OidcProvider | None = None

    def ca(self, trust_domain: str, *, intermediate: bool = False) -> SpiffeCA:
        """The CA of `trust_domain` (with an intermediate or not), made once."""
        key = (trust_domain, intermediate)
        with self._lock:
            if key not in self._cas:
                self._cas[key] = SpiffeCA(trust_domain, intermediate=intermediate, now=self._now)
            return self._cas[key]

    def jwt(self, trust_domain: str) -> JwtSvidIssuer:
        """The JWT-SVID issuer of `trust_domain`, made once."""
        with self._lock:
            if trust_domain not in self._jwt:
                self._jwt[trust_domain] = JwtSvidIssuer(trust_domain)
            return self._jwt[trust_domain]

    def oidc(self) -> OidcProvider:
        """The OIDC provider, started on first use and stopped by `close`.

        Raises:
            OSError: the port cannot be bound.
        """
        with self._lock:
            if self._oidc is None:
                self._oidc = _new_oidc_provider(self._oidc_port).start()
            return self._oidc

    def x509_svid(self, spiffe_id: str, *, intermediate: bool = False, **kw: Any) -> X509Svid:
        """An X.509-SVID from the CA of the trust domain `spiffe_id` names; `kw` as `SpiffeCA.x509_svid`.

        Raises:
            InvalidSpiffeId: `spiffe_id` is not a SPIFFE ID.
        """
        domain = SpiffeId.parse(spiffe_id).trust_domain.name
        return self.ca(domain, intermediate=intermediate).x509_svid(spiffe_id, **kw)

    def jwt_svid(self, spiffe_id: str, audience: str | list[str], **kw: Any) -> str:
        """A JWT-SVID from the issuer of the trust domain `spiffe_id` names; `kw` as `JwtSvidIssuer.jwt_svid`.

        Raises:
            InvalidSpiffeId: `spiffe_id` is not a SPIFFE ID.
        """
        domain = SpiffeId.parse(spiffe_id).trust_domain.name
        return self.jwt(domain).jwt_svid(spiffe_id, audience, **kw)

    def close(self) -> None:
        """Stop the OIDC provider, if it was started."""
        with self._lock:
            provider, self._oidc = self._oidc, None
        if provider is not None:
            provider.stop()

    def __enter__(self) -> MockIssuer:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def _new_oidc_provider(port: int) -> OidcProvider:
    if port == 0:
        return OidcProvider()
    # The agreed OidcProvider interface binds port 0 only; a fixed port needs its `port` keyword.
    if "port" not in inspect.signature(OidcProvider).parameters:
        raise ValueError("this OidcProvider cannot bind a chosen port; use port 0")
    return OidcProvider(port=port)  # type: ignore[call-arg]


# --- command line ------------------------------------------------------------------------------------


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m broker.testing.mock_issuer",
        description="write a trust domain's bundle, JWKS and SVIDs; serve OIDC discovery and JWKS",
    )
    parser.add_argument("--out", type=Path, required=True, help="folder to write into")
    parser.add_argument("--trust-domain", default=DEFAULT_TRUST_DOMAIN)
    parser.add_argument(
        "--svid",
        action="append",
        default=[],
        metavar="SPIFFE_ID",
        help="mint an X.509-SVID and a JWT-SVID for this id (repeatable)",
    )
    parser.add_argument(
        "--audience", default=None, help="audience of the JWT-SVIDs (default spiffe://<trust domain>/broker)"
    )
    parser.add_argument("--port", type=int, default=0, help="OIDC provider port on 127.0.0.1 (0: any free)")
    return parser.parse_args(argv)


def _svid_name(spiffe_id: SpiffeId, home: str) -> str:
    name = spiffe_id.path.strip("/").replace("/", "-") or "svid"
    return name if spiffe_id.trust_domain.name == home else f"{spiffe_id.trust_domain.name}-{name}"


def _write_private(path: Path, data: bytes) -> Path:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        os.fchmod(f.fileno(), 0o600)
        f.write(data)
    return path


def write_material(issuer: MockIssuer, out: Path, home: str, ids: list[SpiffeId], audience: str) -> list[Path]:
    """Write bundles and JWKS of every trust domain in play, then an SVID pair and a JWT-SVID per id.

    Returns the paths written, in order.

    Raises:
        OSError: the folder is not writable.
    """
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for domain in dict.fromkeys([home, *(i.trust_domain.name for i in ids)]):
        bundle = out / f"{domain}.bundle.pem"
        bundle.write_bytes(issuer.ca(domain).bundle_pem())
        jwks = out / f"{domain}.jwks.json"
        jwks.write_text(issuer.jwt(domain).jwks_json() + "\n")
        written += [bundle, jwks]
    for spiffe_id in ids:
        name = _svid_name(spiffe_id, home)
        written += issuer.x509_svid(str(spiffe_id)).write(out, name)
        token = issuer.jwt_svid(str(spiffe_id), audience)
        written.append(_write_private(out / f"{name}.jwt", token.encode() + b"\n"))
    return written


def _serve(issuer: MockIssuer, args: argparse.Namespace, home: str, ids: list[SpiffeId]) -> None:
    stop = threading.Event()

    def _on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    provider = issuer.oidc()  # first, so a port that cannot be had fails before any file is written
    audience = args.audience or f"spiffe://{home}/broker"
    for path in write_material(issuer, args.out, home, ids, audience):
        print(f"wrote {path}", flush=True)
    oidc_jwks = args.out / "issuer.jwks.json"
    oidc_jwks.write_text(json.dumps(provider.jwks(), indent=2, sort_keys=True) + "\n")
    print(f"wrote {oidc_jwks}", flush=True)
    print(f"issuer {provider.issuer}", flush=True)
    print("ready", flush=True)
    # A bounded wait, so the signal handler's flag is seen even if a wait is not interrupted.
    while not stop.wait(0.5):
        pass


def main(argv: list[str] | None = None) -> int:
    """Run the mock issuer until SIGINT or SIGTERM.

    Returns 0 on a clean stop, 1 when the files or the port cannot be had, 2 on bad arguments.
    """
    args = _parse_args(argv)
    try:
        ids = [SpiffeId.parse(s) for s in args.svid]
        home = TrustDomain(args.trust_domain).name
    except InvalidSpiffeId as e:
        print(f"mock_issuer: {e.reason}", file=sys.stderr)
        return 2
    try:
        with MockIssuer(oidc_port=args.port) as issuer:
            _serve(issuer, args, home, ids)
    except (OSError, ValueError) as e:
        print(f"mock_issuer: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
