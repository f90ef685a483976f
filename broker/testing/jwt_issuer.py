"""Token issuers for tests: a JWT-SVID signer per trust domain, and an OIDC provider on HTTP.

Both mint well-formed tokens by default and bad ones on request: extra or overriding claims,
dropped claims, extra or overriding header fields, another signing algorithm (including
`none`, and HS256 keyed with the public key, the classic key-confusion attack) or another key.
Keys are made at run time and never written anywhere by this module.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

ALGORITHMS = ("ES256", "ES384", "RS256", "PS256", "EdDSA")
DISCOVERY_PATH = "/.well-known/openid-configuration"
JWKS_PATH = "/.well-known/jwks.json"
_THUMBPRINT_MEMBERS = {"RSA": ("e", "kty", "n"), "EC": ("crv", "kty", "x", "y"), "OKP": ("crv", "kty", "x")}
_HMAC_HASHES = {"HS256": hashlib.sha256, "HS384": hashlib.sha384, "HS512": hashlib.sha512}


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def generate_key(algorithm: str) -> Any:
    """A new private key fit for `algorithm` (one of ALGORITHMS)."""
    if algorithm == "ES256":
        return ec.generate_private_key(ec.SECP256R1())
    if algorithm == "ES384":
        return ec.generate_private_key(ec.SECP384R1())
    if algorithm in ("RS256", "PS256"):
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    if algorithm == "EdDSA":
        return ed25519.Ed25519PrivateKey.generate()
    raise ValueError(f"algorithm must be one of {', '.join(ALGORITHMS)}, not {algorithm!r}")


def public_jwk(private_key: Any, algorithm: str) -> dict[str, Any]:
    """The public JWK of `private_key` with its RFC 7638 thumbprint as `kid`."""
    jwk = jwt.get_algorithm_by_name(algorithm).to_jwk(private_key.public_key(), as_dict=True)
    members = _THUMBPRINT_MEMBERS[jwk["kty"]]
    canonical = json.dumps({m: jwk[m] for m in members}, separators=(",", ":"), sort_keys=True)
    public = {m: jwk[m] for m in members}
    return {**public, "kid": _b64(hashlib.sha256(canonical.encode()).digest()), "alg": algorithm, "use": "sig"}


def sign_compact(header: dict[str, Any], payload: dict[str, Any], *, alg: str, key: Any) -> str:
    """A compact JWS of `payload` whose signature is made with `alg`, whatever `header` says.

    `alg` "none" gives an empty signature; HS* takes `key` as the HMAC secret (bytes).
    """
    signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(payload).encode())}"
    if alg == "none":
        signature = b""
    elif alg in _HMAC_HASHES:
        signature = hmac.new(key, signing_input.encode(), _HMAC_HASHES[alg]).digest()
    else:
        algorithm = jwt.get_algorithm_by_name(alg)
        signature = algorithm.sign(signing_input.encode(), algorithm.prepare_key(key))
    return f"{signing_input}.{_b64(signature)}"


@dataclass(frozen=True, slots=True)
class _Key:
    kid: str
    algorithm: str
    private_key: Any
    jwk: dict[str, Any]

    @classmethod
    def generate(cls, algorithm: str) -> _Key:
        private_key = generate_key(algorithm)
        jwk = public_jwk(private_key, algorithm)
        return cls(kid=jwk["kid"], algorithm=algorithm, private_key=private_key, jwk=jwk)

    def public_pem(self) -> bytes:
        return self.private_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )


class _KeyRing:
    """Signing keys, current first; shared by both issuers. Thread-safe (the provider serves it)."""

    def __init__(self, algorithm: str) -> None:
        self.algorithm = algorithm
        self._lock = threading.Lock()
        self._keys = [_Key.generate(algorithm)]

    @property
    def current(self) -> _Key:
        with self._lock:
            return self._keys[0]

    def rotate(self, *, keep_old: bool) -> str:
        key = _Key.generate(self.algorithm)
        with self._lock:
            self._keys = [key, *self._keys] if keep_old else [key]
        return key.kid

    def jwks(self) -> dict[str, Any]:
        with self._lock:
            return {"keys": [dict(k.jwk) for k in self._keys]}

    def mint(
        self, claims: dict[str, Any], *, alg: str | None, kid: str | None, key: Any, headers: dict[str, Any] | None
    ) -> str:
        current = self.current
        sign_alg = alg or current.algorithm
        if key is None:
            # HS* with no key given: the public key as HMAC secret, i.e. the key-confusion attack.
            key = (
                None
                if sign_alg == "none"
                else (current.public_pem() if sign_alg in _HMAC_HASHES else current.private_key)
            )
        header = {"alg": sign_alg, "typ": "JWT", "kid": kid or current.kid, **(headers or {})}
        header = {name: value for name, value in header.items() if value is not None}
        return sign_compact(header, claims, alg=sign_alg, key=key)


def _claims(
    base: dict[str, Any], ttl: float, now: float | None, claims: dict[str, Any] | None, drop: Sequence[str]
) -> dict[str, Any]:
    issued = int(time.time() if now is None else now)
    result = {**base, "iat": issued, "exp": int(issued + ttl), **(claims or {})}
    for name in drop:
        result.pop(name, None)
    return result


class JwtSvidIssuer:
    """A trust domain's JWT-SVID signer and its JWT bundle."""

    def __init__(self, trust_domain: str, *, algorithm: str = "ES256") -> None:
        self.trust_domain = trust_domain
        self._ring = _KeyRing(algorithm)

    @property
    def algorithm(self) -> str:
        return self._ring.algorithm

    @property
    def current_kid(self) -> str:
        return self._ring.current.kid

    def jwks(self) -> dict[str, Any]:
        """The JWT bundle: public keys only, current first, each with kid, alg and use "sig"."""
        return self._ring.jwks()

    def jwks_json(self) -> str:
        return json.dumps(self.jwks(), indent=2)

    def rotate(self) -> str:
        """Sign with a new key from now on; the old one stays in the bundle. Returns the new kid."""
        return self._ring.rotate(keep_old=True)

    def jwt_svid(
        self,
        spiffe_id: str,
        audience: str | list[str],
        *,
        ttl: float = 300,
        now: float | None = None,
        claims: dict[str, Any] | None = None,
        headers: dict[str, Any] | None = None,
        drop: Sequence[str] = (),
        alg: str | None = None,
        key: Any = None,
    ) -> str:
        """A JWT-SVID for `spiffe_id`; the keyword arguments spoil it on purpose.

        `claims` overrides or adds claims, `drop` removes them (e.g. "exp"); `headers` overrides
        or adds header fields (a None value removes one, e.g. {"kid": None}); `alg` signs with
        another algorithm ("none", "HS256" keyed with the public key, ...); `key` signs with
        another private key (or HMAC secret) while the header keeps this issuer's kid.
        """
        payload = _claims({"sub": spiffe_id, "aud": audience}, ttl, now, claims, drop)
        return self._ring.mint(payload, alg=alg, kid=None, key=key, headers=headers)


def _handler(provider: OidcProvider) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            status, body = provider._respond(self.path.split("?", 1)[0])
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    return Handler


class OidcProvider:
    """An OIDC provider on 127.0.0.1 (a free port by default): discovery, JWKS, ID tokens to order."""

    def __init__(self, *, algorithm: str = "RS256", port: int = 0) -> None:
        """`port` 0 (the default) takes a free port when started."""
        self._ring = _KeyRing(algorithm)
        self._port = port
        self._lock = threading.Lock()
        self._available = True
        self._released = threading.Event()
        self._released.set()
        self._jwks_requests = 0
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> OidcProvider:
        """Serve in a daemon thread; idempotent."""
        if self._server is None:
            server = ThreadingHTTPServer(("127.0.0.1", self._port), _handler(self))
            server.daemon_threads = True
            self._thread = threading.Thread(
                target=server.serve_forever, kwargs={"poll_interval": 0.05}, name="oidc-provider", daemon=True
            )
            self._server = server
            self._thread.start()
        return self

    def stop(self) -> None:
        server, thread, self._server, self._thread = self._server, self._thread, None, None
        if server is not None:
            server.shutdown()
            server.server_close()
        if thread is not None:
            thread.join(timeout=5)

    def __enter__(self) -> OidcProvider:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    @property
    def issuer(self) -> str:
        if self._server is None:
            raise RuntimeError("the oidc provider is not started")
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    @property
    def jwks_uri(self) -> str:
        return self.issuer + JWKS_PATH

    @property
    def discovery_uri(self) -> str:
        return self.issuer + DISCOVERY_PATH

    @property
    def jwks_requests(self) -> int:
        """How many GETs of the JWKS path arrived (503 answers included)."""
        with self._lock:
            return self._jwks_requests

    def set_available(self, up: bool) -> None:
        """When down, every path answers 503."""
        with self._lock:
            self._available = up

    def hold(self) -> None:
        """From now on every GET waits (at most 30 s) until `release()`: a stalled issuer."""
        self._released.clear()

    def release(self) -> None:
        """Answer the GETs waiting since `hold()`, and every later one at once."""
        self._released.set()

    def jwks(self) -> dict[str, Any]:
        return self._ring.jwks()

    def discovery(self) -> dict[str, Any]:
        return {
            "issuer": self.issuer,
            "jwks_uri": self.jwks_uri,
            "id_token_signing_alg_values_supported": [self._ring.algorithm],
            "response_types_supported": ["id_token"],
            "subject_types_supported": ["public"],
        }

    def rotate_key(self, *, keep_old: bool = True) -> str:
        """Sign with a new key from now on; returns its kid."""
        return self._ring.rotate(keep_old=keep_old)

    def id_token(
        self,
        sub: str,
        audience: str | list[str],
        *,
        ttl: float = 300,
        now: float | None = None,
        claims: dict[str, Any] | None = None,
        headers: dict[str, Any] | None = None,
        drop: Sequence[str] = (),
        alg: str | None = None,
        kid: str | None = None,
    ) -> str:
        """An ID token of this issuer; the keyword arguments spoil it as in `JwtSvidIssuer.jwt_svid`.

        `kid` puts another kid in the header (the signature still uses the current key).
        """
        payload = _claims({"iss": self.issuer, "sub": sub, "aud": audience}, ttl, now, claims, drop)
        return self._ring.mint(payload, alg=alg, kid=kid, key=None, headers=headers)

    def _respond(self, path: str) -> tuple[int, dict[str, Any]]:
        self._released.wait(30)
        with self._lock:
            if path == JWKS_PATH:
                self._jwks_requests += 1
            available = self._available
        if not available:
            return 503, {"error": "temporarily_unavailable"}
        if path == DISCOVERY_PATH:
            return 200, self.discovery()
        if path == JWKS_PATH:
            return 200, self.jwks()
        return 404, {"error": "not_found"}
