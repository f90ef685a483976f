"""Mutual TLS for an MCP server on uvicorn, so certificate-bound broker tokens can be checked.

uvicorn does not hand the client's certificate to the app, so `PeerCertProtocol` (its HTTP/1.1
protocol, one more line per connection) puts the verified peer certificate of each TLS
connection into the request's `scope["state"]`, where `broker.verifier.asgi.peer_certificate`
finds it. `server_config` makes the uvicorn config that requires a client certificate from the
trust bundle; `client_context` is the agent's side, from its identity.
"""

from __future__ import annotations

import os
import shutil
import socket
import ssl
import tempfile
from pathlib import Path
from typing import Any

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from broker.client.identity import Material
from broker.verifier.asgi import PEER_CERT_STATE


class PeerCertProtocol(H11Protocol):
    """uvicorn's h11 protocol, exposing each connection's client certificate (DER) to the app."""

    def connection_made(self, transport: Any) -> None:  # type: ignore[override]
        super().connection_made(transport)
        ssl_object = transport.get_extra_info("ssl_object")
        der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
        if der:
            self.app_state = {**self.app_state, PEER_CERT_STATE: der}


def server_config(
    app: Any, sock: socket.socket, *, cert_file: str | Path, key_file: str | Path, client_ca_file: str | Path,
    **kw: Any,
) -> uvicorn.Config:
    """A uvicorn config serving `app` on `sock` over TLS that requires a client certificate."""
    host, port = sock.getsockname()[:2]
    return uvicorn.Config(
        app, host=host, port=port, http=PeerCertProtocol, ssl_certfile=str(cert_file), ssl_keyfile=str(key_file),
        ssl_ca_certs=str(client_ca_file), ssl_cert_reqs=ssl.CERT_REQUIRED, lifespan="on", **kw,
    )


def client_context(material: Material, *, server_roots_pem: bytes | None = None) -> ssl.SSLContext:
    """An SSL context presenting the agent's X.509-SVID and trusting `server_roots_pem` (default: its roots)."""
    context = ssl.create_default_context(cadata=(server_roots_pem or material.roots_pem).decode())
    if material.cert_chain_pem and material.key_pem:
        # ssl loads a client certificate from files only: a private folder, removed at once.
        folder = tempfile.mkdtemp(prefix="mcp-tls-")
        try:
            chain, key = Path(folder) / "chain.pem", Path(folder) / "key.pem"
            chain.write_bytes(material.cert_chain_pem)
            fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(material.key_pem)
            context.load_cert_chain(chain, key)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
    return context
