"""The optional plain-HTTP listener: JWKS, discovery, Prometheus metrics and a health probe.

Served from a thread with the standard library; it only reads published state. The OIDC
discovery document is served only when `tokens.issuer` names an https issuer URL: OIDC
Discovery 4.3 (and RFC 8414 3.3) make the document's `issuer` the URL it was fetched under, so
a document naming the broker's SPIFFE ID would be refused by every standard client.
"""

from __future__ import annotations

import json
import logging
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest
from prometheus_client.core import GaugeMetricFamily

from broker.backends.manager import Backends
from broker.leases.table import LeaseTable
from broker.tokens.minter import TokenMinter

log = logging.getLogger(__name__)

DISCOVERY_PATH = "/.well-known/openid-configuration"
JWKS_PATH = "/.well-known/jwks.json"
# The claims the broker's tokens may carry (the README lists what each means).
CLAIMS = ("iss", "sub", "aud", "exp", "iat", "nbf", "jti", "client_id", "scope", "resource", "txn", "act", "cnf")


def discovery_document(issuer: str, algorithm: str) -> dict[str, Any]:
    """OIDC Discovery 1.0 section 3 metadata for the broker as issuer of its tokens.

    No `authorization_endpoint` or `token_endpoint`: the broker has no OAuth HTTP endpoints
    (exchange, introspection and revocation are gRPC). `response_types_supported` and
    `subject_types_supported` are required fields; the values are the minimal honest ones.
    """
    return {
        "issuer": issuer,
        "jwks_uri": issuer.rstrip("/") + JWKS_PATH,
        "response_types_supported": ["id_token"],
        "subject_types_supported": ["public"],
        "id_token_signing_alg_values_supported": [algorithm],
        "claims_supported": list(CLAIMS),
    }


class _LeaseCollector:
    """Exposes the lease table's counts at scrape time (no bookkeeping on the hot path)."""

    def __init__(self, leases: LeaseTable) -> None:
        self._leases = leases

    def collect(self):
        gauge = GaugeMetricFamily("broker_leases", "Leases and tasks the broker remembers", labels=["kind"])
        for kind, count in self._leases.counts().items():
            gauge.add_metric([kind], count)
        yield gauge


class _BackendCollector:
    """Each backend's reachability and pending revocations, read at scrape time."""

    def __init__(self, backends: Backends) -> None:
        self._backends = backends

    def collect(self):
        up = GaugeMetricFamily("broker_backend_up", "1 when the backend answered its last contact", labels=["backend"])
        pending = GaugeMetricFamily(
            "broker_backend_revoke_pending", "Roles whose revocation has not yet succeeded", labels=["backend"]
        )
        for name, status in self._backends.statuses().items():
            up.add_metric([name], 1 if status.up else 0)
            pending.add_metric([name], len(self._backends.pending(name)))
        yield up
        yield pending


class HttpListener:
    """`/.well-known/jwks.json`, `/.well-known/openid-configuration`, `/metrics`, `/healthz`."""

    def __init__(
        self,
        address: str,
        *,
        minter: TokenMinter,
        leases: LeaseTable,
        issuer: str | None,
        algorithm: str = "ES256",
        backends: Backends | None = None,
    ) -> None:
        """`issuer` is `tokens.issuer`: None serves no discovery document."""
        host, _, port = address.rpartition(":")
        self._address = (host.strip("[]") or "127.0.0.1", int(port))
        self._minter = minter
        self._collectors = [_LeaseCollector(leases)] + ([_BackendCollector(backends)] if backends else [])
        self._backends = backends
        self._server: ThreadingHTTPServer | None = None
        self._discovery: bytes | None = None
        self._discovery_paths: frozenset[str] = frozenset()
        self._jwks_paths = frozenset({JWKS_PATH})
        if issuer is not None:
            # Under the issuer's own path too, for a proxy at the issuer URL that passes it through.
            prefix = urlsplit(issuer).path.rstrip("/")
            self._discovery = json.dumps(discovery_document(issuer, algorithm)).encode()
            self._discovery_paths = frozenset({DISCOVERY_PATH, prefix + DISCOVERY_PATH})
            self._jwks_paths = frozenset({JWKS_PATH, prefix + JWKS_PATH})

    def start(self) -> int:
        """Bind and serve in a daemon thread; returns the bound port."""
        handler = self._handler()
        self._server = ThreadingHTTPServer(self._address, handler)
        self._server.daemon_threads = True
        for collector in self._collectors:
            REGISTRY.register(collector)
        threading.Thread(target=self._server.serve_forever, name="broker-http", daemon=True).start()
        return self._server.server_address[1]

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            for collector in self._collectors:
                REGISTRY.unregister(collector)
            self._server = None

    def _health(self) -> str:
        """`ok`, then one line per backend: the broker serves even while a backend is down."""
        lines = ["ok"]
        for name, status in (self._backends.statuses() if self._backends else {}).items():
            lines.append(f"backend {name}: up" if status.up else f"backend {name}: down ({status.error})")
        return "\n".join(lines) + "\n"

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        listener = self

        class Handler(BaseHTTPRequestHandler):
            server_version = "broker"
            sys_version = ""

            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                if path in listener._jwks_paths:
                    self._send(HTTPStatus.OK, "application/json", listener._minter.jwks_json().encode())
                elif path in listener._discovery_paths and listener._discovery is not None:
                    self._send(HTTPStatus.OK, "application/json", listener._discovery)
                elif path == "/metrics":
                    self._send(HTTPStatus.OK, CONTENT_TYPE_LATEST, generate_latest(REGISTRY))
                elif path == "/healthz":
                    self._send(HTTPStatus.OK, "text/plain", listener._health().encode())
                else:
                    self._send(HTTPStatus.NOT_FOUND, "text/plain", b"not found\n")

            def _send(self, status: HTTPStatus, content_type: str, body: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Cache-Control", "no-store" if status != HTTPStatus.OK else "max-age=60")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                log.debug("http request", extra={"line": format % args})

        return Handler
