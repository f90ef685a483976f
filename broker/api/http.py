"""The optional plain-HTTP listener: JWKS, discovery, Prometheus metrics and a health probe.

Served from a thread with the standard library; it only reads published state.
"""

from __future__ import annotations

import json
import logging
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest
from prometheus_client.core import GaugeMetricFamily

from broker.leases.table import LeaseTable
from broker.tokens.minter import TokenMinter

log = logging.getLogger(__name__)


class _LeaseCollector:
    """Exposes the lease table's counts at scrape time (no bookkeeping on the hot path)."""

    def __init__(self, leases: LeaseTable) -> None:
        self._leases = leases

    def collect(self):
        gauge = GaugeMetricFamily("broker_leases", "Leases and tasks the broker remembers", labels=["kind"])
        for kind, count in self._leases.counts().items():
            gauge.add_metric([kind], count)
        yield gauge


class HttpListener:
    """`/.well-known/jwks.json`, `/.well-known/openid-configuration`, `/metrics`, `/healthz`."""

    def __init__(self, address: str, *, minter: TokenMinter, leases: LeaseTable, issuer: str) -> None:
        host, _, port = address.rpartition(":")
        self._address = (host.strip("[]") or "127.0.0.1", int(port))
        self._minter = minter
        self._issuer = issuer
        self._collector = _LeaseCollector(leases)
        self._server: ThreadingHTTPServer | None = None
        self._jwks_uri = ""

    def start(self) -> int:
        """Bind and serve in a daemon thread; returns the bound port."""
        handler = self._handler()
        self._server = ThreadingHTTPServer(self._address, handler)
        self._server.daemon_threads = True
        host, port = self._server.server_address[:2]
        # From the configuration, never from the request's Host header (which a client controls).
        netloc = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self._jwks_uri = f"http://{netloc}/.well-known/jwks.json"
        REGISTRY.register(self._collector)
        threading.Thread(target=self._server.serve_forever, name="broker-http", daemon=True).start()
        return self._server.server_address[1]

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            REGISTRY.unregister(self._collector)
            self._server = None

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        listener = self

        class Handler(BaseHTTPRequestHandler):
            server_version = "broker"
            sys_version = ""

            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                if path == "/.well-known/jwks.json":
                    self._send(HTTPStatus.OK, "application/json", listener._minter.jwks_json().encode())
                elif path == "/.well-known/openid-configuration":
                    doc = {
                        "issuer": listener._issuer,
                        "jwks_uri": listener._jwks_uri,
                        "id_token_signing_alg_values_supported": ["ES256", "EdDSA"],
                    }
                    self._send(HTTPStatus.OK, "application/json", json.dumps(doc).encode())
                elif path == "/metrics":
                    self._send(HTTPStatus.OK, CONTENT_TYPE_LATEST, generate_latest(REGISTRY))
                elif path == "/healthz":
                    self._send(HTTPStatus.OK, "text/plain", b"ok\n")
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
