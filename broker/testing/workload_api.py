"""A mock SPIFFE Workload API on a unix socket, speaking the real gRPC protocol.

py-spiffe's own client (and any other Workload API client) works against it: X.509-SVIDs and
bundles are streamed (`FetchX509SVID`, `FetchX509Bundles`, `FetchJWTBundles`), JWT-SVIDs are
minted on request (`FetchJWTSVID`) and checked (`ValidateJWTSVID`). As the specification
requires, a call without the `workload.spiffe.io: true` metadata fails with INVALID_ARGUMENT.
`rotate()` pushes a new SVID down every open X.509 stream.

    with MockWorkloadApi.for_issuer(issuer, "spiffe://example.org/agent") as api:
        os.environ["SPIFFE_ENDPOINT_SOCKET"] = api.address
"""

from __future__ import annotations

import functools
import json
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path
from types import TracebackType

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from google.protobuf import json_format, struct_pb2
from spiffe._proto import workload_pb2 as wl
from spiffe._proto import workload_pb2_grpc as wl_grpc

from broker.domain.errors import CredentialRejected
from broker.domain.identity import SpiffeId
from broker.jose.jws import parse_token, verify_token
from broker.jose.keys import KeySet
from broker.pki.x509_ca import X509Svid
from broker.testing.mock_issuer import MockIssuer

HEADER = "workload.spiffe.io"
_MAX_STREAMS = 32


def load_svid(chain_pem: bytes, key_pem: bytes) -> X509Svid:
    """An `X509Svid` from PEM files (a chain, leaf first, and its private key)."""
    certs = x509.load_pem_x509_certificates(chain_pem)
    key = serialization.load_pem_private_key(key_pem, password=None)
    return X509Svid(cert=certs[0], key=key, intermediates=tuple(certs[1:]))  # type: ignore[arg-type]


def _der_chain(svid: X509Svid) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.DER) for c in (svid.cert, *svid.intermediates))


def _der_key(svid: X509Svid) -> bytes:
    return svid.key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption())


def _der_bundle(bundle_pem: bytes) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.DER) for c in x509.load_pem_x509_certificates(bundle_pem))


class MockWorkloadApi:
    """The Workload API of one workload: its SVID, its trust domain's bundles, on a unix socket.

    Use `for_issuer` (SVIDs minted by the test kit's mock issuer, a new one on each `rotate()`)
    or `for_svid` (given SVIDs, e.g. files a dev setup wrote; `rotate(svid)` pushes another).
    """

    def __init__(
        self,
        spiffe_id: str,
        mint_svid: Callable[[], X509Svid],
        bundle_pem: bytes,
        *,
        jwt_bundle_json: str | None = None,
        mint_jwt: Callable[[str, list[str]], str] | None = None,
        socket_path: str | Path | None = None,
    ) -> None:
        self.spiffe_id = spiffe_id
        self.trust_domain = SpiffeId.parse(spiffe_id).trust_domain.name
        self._mint_svid = mint_svid
        self._bundle_der = _der_bundle(bundle_pem)
        self._jwt_bundle = jwt_bundle_json
        self._mint_jwt = mint_jwt
        self._owned_dir: str | None = None
        if socket_path is None:
            self._owned_dir = tempfile.mkdtemp(prefix="wlapi-")  # short: unix socket paths max ~100 bytes
            socket_path = Path(self._owned_dir) / "agent.sock"
        self.socket_path = Path(socket_path)
        self._cond = threading.Condition()
        self._generation = 0
        self._svid = mint_svid()
        self._stopped = False
        self.rotations = 0
        self._server: grpc.Server | None = None

    @classmethod
    def for_issuer(
        cls, issuer: MockIssuer, spiffe_id: str, *, ttl: float = 3600, socket_path: str | Path | None = None
    ) -> MockWorkloadApi:
        """SVIDs for `spiffe_id` from `issuer`'s CA of its trust domain, JWT-SVIDs from its JWT issuer."""
        td = SpiffeId.parse(spiffe_id).trust_domain.name
        ca, jwt = issuer.ca(td), issuer.jwt(td)
        return cls(
            spiffe_id, lambda: ca.x509_svid(spiffe_id, ttl=ttl), ca.bundle_pem(), jwt_bundle_json=jwt.jwks_json(),
            mint_jwt=lambda sub, audience: jwt.jwt_svid(sub, audience), socket_path=socket_path,
        )

    @classmethod
    def for_svid(cls, svid: X509Svid, bundle_pem: bytes, *, socket_path: str | Path | None = None) -> MockWorkloadApi:
        """Serve `svid` (an X.509-SVID made elsewhere) with `bundle_pem` as its trust domain's roots."""
        uri = svid.cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        spiffe_id = uri.get_values_for_type(x509.UniformResourceIdentifier)[0]
        return cls(spiffe_id, lambda: svid, bundle_pem, socket_path=socket_path)

    @property
    def address(self) -> str:
        """The `SPIFFE_ENDPOINT_SOCKET` value: `unix:///path/to/agent.sock`."""
        return f"unix://{self.socket_path}"

    @property
    def svid(self) -> X509Svid:
        with self._cond:
            return self._svid

    def start(self) -> MockWorkloadApi:
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=_MAX_STREAMS, thread_name_prefix="wlapi"))
        wl_grpc.add_SpiffeWorkloadAPIServicer_to_server(_Servicer(self), server)
        if server.add_insecure_port(f"unix:{self.socket_path}") == 0:
            raise OSError(f"cannot listen on {self.socket_path}")
        server.start()
        self._server = server
        return self

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
        if self._server is not None:
            self._server.stop(grace=0.5).wait(5)
            self._server = None
        if self._owned_dir is not None:
            shutil.rmtree(self._owned_dir, ignore_errors=True)

    def __enter__(self) -> MockWorkloadApi:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def rotate(self, svid: X509Svid | None = None) -> X509Svid:
        """Replace the SVID (a freshly minted one, or `svid`) and push it to every open stream."""
        new = svid or self._mint_svid()
        with self._cond:
            self._svid = new
            self._generation += 1
            self.rotations += 1
            self._cond.notify_all()
        return new

    # --- what the servicer serves ------------------------------------------------------------

    def x509_response(self) -> wl.X509SVIDResponse:
        svid = self.svid
        entry = wl.X509SVID(spiffe_id=self.spiffe_id, x509_svid=_der_chain(svid), x509_svid_key=_der_key(svid),
                            bundle=self._bundle_der)
        return wl.X509SVIDResponse(svids=[entry])

    def x509_bundles(self) -> wl.X509BundlesResponse:
        return wl.X509BundlesResponse(bundles={self.trust_domain: self._bundle_der})

    def jwt_bundles(self) -> wl.JWTBundlesResponse:
        bundles = {self.trust_domain: self._jwt_bundle.encode()} if self._jwt_bundle else {}
        return wl.JWTBundlesResponse(bundles=bundles)

    def jwt_svid(self, audience: list[str]) -> str | None:
        return None if self._mint_jwt is None else self._mint_jwt(self.spiffe_id, audience)

    def validate(self, token: str, audience: str) -> dict:
        """Raises: CredentialRejected."""
        if not self._jwt_bundle:
            raise CredentialRejected("no jwt bundle")
        keys = KeySet.from_jwks(json.loads(self._jwt_bundle))
        return verify_token(parse_token(token), keys, audience=audience, now=time.time(), leeway=30)

    def updates(self, context: grpc.ServicerContext) -> Iterator[int]:
        """Yield the generation now, then again after each rotation, until stopped or cancelled."""
        with self._cond:
            generation = self._generation
        context.add_callback(self._wake)
        yield generation
        while True:
            with self._cond:
                self._cond.wait_for(functools.partial(self._changed_since, generation, context))
                if self._stopped or not context.is_active():
                    return
                generation = self._generation
            yield generation

    def _changed_since(self, generation: int, context: grpc.ServicerContext) -> bool:
        return self._stopped or self._generation != generation or not context.is_active()

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify_all()


def _check_header(context: grpc.ServicerContext) -> None:
    if dict(context.invocation_metadata()).get(HEADER) != "true":
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, "security header missing from request")


class _Servicer(wl_grpc.SpiffeWorkloadAPIServicer):
    def __init__(self, api: MockWorkloadApi) -> None:
        self._api = api

    def FetchX509SVID(self, request, context):
        _check_header(context)
        for _ in self._api.updates(context):
            yield self._api.x509_response()

    def FetchX509Bundles(self, request, context):
        _check_header(context)
        for _ in self._api.updates(context):
            yield self._api.x509_bundles()

    def FetchJWTBundles(self, request, context):
        _check_header(context)
        for _ in self._api.updates(context):
            yield self._api.jwt_bundles()

    def FetchJWTSVID(self, request, context):
        _check_header(context)
        if not request.audience:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "audience must be specified")
        if request.spiffe_id and request.spiffe_id != self._api.spiffe_id:
            context.abort(grpc.StatusCode.PERMISSION_DENIED, "no identity issued for that spiffe id")
        token = self._api.jwt_svid(list(request.audience))
        if token is None:
            context.abort(grpc.StatusCode.UNAVAILABLE, "this workload api issues no jwt-svids")
        return wl.JWTSVIDResponse(svids=[wl.JWTSVID(spiffe_id=self._api.spiffe_id, svid=token)])

    def ValidateJWTSVID(self, request, context):
        _check_header(context)
        if not request.audience or not request.svid:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "audience and svid must be specified")
        try:
            claims = self._api.validate(request.svid, request.audience)
        except CredentialRejected as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, e.reason)
        struct = struct_pb2.Struct()
        json_format.ParseDict(json.loads(json.dumps(claims)), struct)
        return wl.ValidateJWTSVIDResponse(spiffe_id=str(claims.get("sub", "")), claims=struct)
