"""The MCP gate: broker tokens on the official MCP SDK, one credential per tool call.

May import `broker.verifier`, `broker.client` and the `mcp` SDK with its HTTP stack (the `[mcp]`
extra); never the server's parts. Without the extra, importing it says what to install.
"""

try:
    import mcp as _mcp  # noqa: F401
except ImportError as e:  # pragma: no cover - exercised by the packaging test
    raise ImportError("broker.mcp needs the MCP SDK: pip install 'agent-credential-broker[mcp]'") from e

from broker.mcp.client import BrokerAuth, ToolClient, connect
from broker.mcp.server import BrokerTokenVerifier, ToolGate, tool_action

__all__ = ["BrokerAuth", "BrokerTokenVerifier", "ToolClient", "ToolGate", "connect", "tool_action"]
