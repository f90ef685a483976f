"""Serve an ASGI app (an MCP server, a resource server) on loopback port 0, in the running loop.

    async with serve_asgi(lambda base_url: gate.wrap(server.streamable_http_app())) as base_url:
        ...

`tls` (cert, key and client-CA files) serves HTTPS requiring a client certificate, whose DER
reaches the app (see `broker.mcp.transport`). Needs the `[mcp]` extra (uvicorn).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import uvicorn

from broker.mcp.transport import server_config

_START_TIMEOUT = 10.0


@contextlib.asynccontextmanager
async def serve_asgi(
    make_app: Callable[[str], Any], *, tls: tuple[Path, Path, Path] | None = None
) -> AsyncIterator[str]:
    """Bind 127.0.0.1:0, build the app for its base URL, serve it until the block ends.

    Raises:
        RuntimeError: the server did not start.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    base_url = f"{'https' if tls else 'http'}://127.0.0.1:{port}"
    app = make_app(base_url)
    if tls is None:
        config = uvicorn.Config(app, host="127.0.0.1", port=port, lifespan="on", log_level="warning")
    else:
        cert, key, client_ca = tls
        config = server_config(app, sock, cert_file=cert, key_file=key, client_ca_file=client_ca,
                               log_level="warning")
    server = uvicorn.Server(config)
    serving = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        deadline = asyncio.get_running_loop().time() + _START_TIMEOUT
        while not server.started:  # uvicorn offers a flag, not an event: wait for it, bounded
            if serving.done() or asyncio.get_running_loop().time() > deadline:
                raise RuntimeError("the ASGI server did not start")
            await asyncio.sleep(0.01)
        yield base_url
    finally:
        server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(serving, 10)
        sock.close()
