"""Where an agent's identity comes from: files, PEM in memory, the SPIFFE Workload API, a token.

Each source answers `material()` with what the channel to the broker needs now, and a
`version` that changes when the identity does (a rotated SVID, rewritten files), so the client
knows to build a new channel. Bearer sources add `authorization` metadata to every call.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from cryptography.hazmat.primitives import serialization

from broker.client.errors import IdentityUnavailable

TokenProvider = Callable[[], str | Awaitable[str]]


@dataclass(frozen=True, slots=True)
class Material:
    """What a channel is built from: a client chain and key for mTLS (or none), and the roots."""

    version: int
    roots_pem: bytes
    cert_chain_pem: bytes | None = None
    key_pem: bytes | None = None


class Identity(Protocol):
    """An identity source; `bearer` is None for mTLS sources."""

    bearer: TokenProvider | None

    def material(self) -> Material:
        """The current material. Raises: IdentityUnavailable."""
        ...

    async def start(self) -> None: ...

    def close(self) -> None: ...


class _FixedIdentity:
    """An identity whose material never changes."""

    bearer: TokenProvider | None = None
    _material: Material

    def material(self) -> Material:
        return self._material

    async def start(self) -> None:
        return None

    def close(self) -> None:
        return None


class ChannelIdentity(_FixedIdentity):
    """The identity already inside a channel built elsewhere (see `AgentClient` on a channel)."""

    def __init__(self) -> None:
        self._material = Material(0, b"")


class PemIdentity(_FixedIdentity):
    """An X.509-SVID given as PEM bytes: the chain (leaf first), its key and the broker's roots."""

    def __init__(self, cert_chain_pem: bytes, key_pem: bytes, roots_pem: bytes) -> None:
        self._material = Material(1, roots_pem, cert_chain_pem, key_pem)


class FileIdentity:
    """An X.509-SVID in files, re-read when any of them changes (as a SPIFFE helper rewrites them)."""

    bearer: TokenProvider | None = None

    def __init__(self, cert: str | Path, key: str | Path, bundle: str | Path) -> None:
        self._paths = (Path(cert), Path(key), Path(bundle))
        self._lock = threading.Lock()
        self._stamp: tuple[tuple[int, int], ...] | None = None
        self._material: Material | None = None

    def _stat(self) -> tuple[tuple[int, int], ...]:
        try:
            return tuple((s.st_mtime_ns, s.st_size) for s in (os.stat(p) for p in self._paths))
        except OSError as e:
            raise IdentityUnavailable(f"cannot read identity file: {e.strerror}") from e

    def material(self) -> Material:
        stamp = self._stat()
        with self._lock:
            if stamp != self._stamp or self._material is None:
                try:
                    cert, key, bundle = (p.read_bytes() for p in self._paths)
                except OSError as e:
                    raise IdentityUnavailable(f"cannot read identity file: {e.strerror}") from e
                version = (self._material.version + 1) if self._material else 1
                self._material, self._stamp = Material(version, bundle, cert, key), stamp
            return self._material

    async def start(self) -> None:
        self.material()

    def close(self) -> None:
        return None


def _pem_chain(certs: list) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


class WorkloadApiIdentity:
    """The X.509-SVID the SPIFFE Workload API hands this workload, following its rotations.

    `socket` is the Workload API address (`unix:///path`); None reads `SPIFFE_ENDPOINT_SOCKET`.
    """

    bearer: TokenProvider | None = None

    def __init__(self, socket: str | None = None, *, timeout: float = 10.0) -> None:
        self._socket = socket
        self._timeout = timeout
        self._source = None
        self._lock = threading.Lock()
        self._version = 0
        self._material: Material | None = None
        self.rotated = threading.Event()  # set on each update after the first; tests and callers may wait

    async def start(self) -> None:
        if self._source is None:
            await asyncio.to_thread(self._open)

    def _open(self) -> None:
        from spiffe import X509Source  # imported here: only this source needs py-spiffe
        from spiffe.errors import PySpiffeError

        try:
            source = X509Source(socket_path=self._socket, timeout_in_seconds=self._timeout)
        except PySpiffeError as e:
            raise IdentityUnavailable(f"workload api: {e}") from e
        self._source = source
        self._refresh()
        source.subscribe_for_updates(self._on_update)

    def _on_update(self) -> None:
        self._refresh()
        self.rotated.set()

    def _refresh(self) -> None:
        context = self._source.get_x509_context()
        svid = context.default_svid
        key = svid.private_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        roots = b"".join(_pem_chain(list(b.x509_authorities)) for b in context.x509_bundle_set.bundles)
        chain = _pem_chain(svid.cert_chain)
        with self._lock:
            if self._material is not None and self._material.cert_chain_pem == chain:
                return
            self._version += 1
            self._material = Material(self._version, roots, chain, key)

    @property
    def spiffe_id(self) -> str:
        """The SPIFFE ID of the current SVID. Raises: IdentityUnavailable before `start`."""
        if self._source is None:
            raise IdentityUnavailable("workload api identity is not started")
        return str(self._source.get_x509_context().default_svid.spiffe_id)

    def material(self) -> Material:
        with self._lock:
            if self._material is None:
                raise IdentityUnavailable("workload api identity is not started")
            return self._material

    def close(self) -> None:
        source, self._source = self._source, None
        if source is not None:
            source.close()


class BearerIdentity(_FixedIdentity):
    """A token-listener identity: a JWT-SVID or OIDC ID token from `provider`, fetched per call.

    `provider` is a plain or async callable returning the current token; `roots_pem` verifies
    the broker's server certificate.
    """

    def __init__(self, provider: TokenProvider, roots_pem: bytes) -> None:
        self.bearer = provider
        self._material = Material(1, roots_pem)


async def bearer_token(provider: TokenProvider) -> str:
    """The provider's current token. Raises: IdentityUnavailable when it fails or gives nothing."""
    try:
        token = provider()
        if inspect.isawaitable(token):
            token = await token
    except Exception as e:  # a user's callable: whatever it raises, the identity is unavailable
        raise IdentityUnavailable(f"token provider failed: {type(e).__name__}") from e
    if not isinstance(token, str) or not token:
        raise IdentityUnavailable("token provider returned no token")
    return token


def workload_api_jwt_svid(audience: str, socket: str | None = None) -> TokenProvider:
    """A token provider that fetches a JWT-SVID for `audience` from the Workload API on each call."""

    def fetch() -> str:
        from spiffe import WorkloadApiClient
        from spiffe.errors import PySpiffeError

        try:
            with WorkloadApiClient(socket_path=socket, default_timeout=10) as client:
                return client.fetch_jwt_svid(audience={audience}).token
        except PySpiffeError as e:
            raise IdentityUnavailable(f"workload api: {e}") from e

    async def provider() -> str:
        return await asyncio.to_thread(fetch)

    return provider
