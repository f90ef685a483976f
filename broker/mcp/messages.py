"""What an MCP request body asks for: the tools it calls (JSON-RPC, one message or a batch)."""

from __future__ import annotations

import json
from typing import Any


def tool_calls(body: bytes) -> tuple[list[str], Any] | None:
    """(tool names called, the id of the first request), or None when the body is not JSON-RPC."""
    try:
        message = json.loads(body) if body else None
    except (ValueError, UnicodeDecodeError):
        return None
    messages = message if isinstance(message, list) else [message]
    names: list[str] = []
    first_id = None
    for m in messages:
        if not isinstance(m, dict):
            return None
        if first_id is None and "id" in m:
            first_id = m["id"]
        if m.get("method") == "tools/call":
            params = m.get("params")
            name = params.get("name") if isinstance(params, dict) else None
            names.append(name if isinstance(name, str) else "")
    return names, first_id


def tool_action(name: str) -> str:
    """The default action a tool needs: `tool:<name>`."""
    return f"tool:{name}"
