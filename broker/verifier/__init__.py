"""The verifier SDK for resource servers: check a broker token, its scope, binding and revocation.

May import `broker.client` (its broker connection), `broker.jose`, `broker.domain`, the
generated `broker._proto` and grpc; never the server's parts, so it installs without them.
"""

from broker.verifier.errors import InsufficientScope, TokenRejected
from broker.verifier.verifier import TokenVerifier, VerifiedToken, current_token

__all__ = ["InsufficientScope", "TokenRejected", "TokenVerifier", "VerifiedToken", "current_token"]
