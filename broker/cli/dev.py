"""`broker serve --dev`: write a self-contained dev trust domain, policy and config, then serve.

Everything written here is development material: a fresh CA, SVIDs for the broker, an
operator and two demo agents, a JWT bundle, a sample policy, and a `broker.toml` that uses
them. Private keys are written 0600 and never leave the folder.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from broker.jose.keys import SigningKey
from broker.pki.x509_ca import SpiffeCA

TRUST_DOMAIN = "example.org"
BROKER_ID = f"spiffe://{TRUST_DOMAIN}/broker"
OPERATOR_ID = f"spiffe://{TRUST_DOMAIN}/operator/alice"
AGENTS = {
    "planner": f"spiffe://{TRUST_DOMAIN}/agent/planner",
    "worker": f"spiffe://{TRUST_DOMAIN}/agent/worker",
    "repo": f"spiffe://{TRUST_DOMAIN}/service/repo",
    "deployer": f"spiffe://{TRUST_DOMAIN}/service/deployer",
}

DEV_POLICY = """\
// Dev policy written by `broker serve --dev`. Default deny; forbid wins.

// Agents may read and write the app's repository.
@id("agents-use-repos")
@max_ttl("900")
permit (
  principal in Team::"agents",
  action in [Action::"repo:read", Action::"repo:write"],
  resource == Resource::"repo:org/app"
);

// A worker may act for the planner, but only to read: delegation narrows, never widens.
@id("worker-reads-for-planner")
forbid (principal, action, resource)
when { context.delegated && context.actor == "spiffe://example.org/agent/worker" && action != Action::"repo:read" };

// Production deploys need a change ticket and a human's yes, and live ten minutes at most.
@id("deploy-needs-approval")
@approval("required")
@max_ttl("600")
permit (
  principal == Workload::"spiffe://example.org/agent/planner",
  action == Action::"deploy:prod",
  resource == Resource::"service:app"
)
when { context.request has ticket };

// Agents may connect to the repo service's MCP tools and read files; no policy lets them delete a
// repository, so that tool stays closed (default deny).
@id("agents-read-repo-tools")
@max_ttl("300")
permit (
  principal in Team::"agents",
  action in [Action::"mcp:connect", Action::"tool:read_file"],
  resource == Resource::"mcp:repo-tools"
);

// Nothing touches secret resources through the broker.
@id("no-secrets")
forbid (principal, action, resource)
when { resource has sensitivity && resource.sensitivity == "secret" };
"""

DEV_ENTITIES = [
    {"uid": {"type": "Team", "id": "agents"}, "attrs": {}, "parents": []},
    {"uid": {"type": "Workload", "id": AGENTS["planner"]}, "attrs": {}, "parents": [{"type": "Team", "id": "agents"}]},
    {"uid": {"type": "Workload", "id": AGENTS["worker"]}, "attrs": {}, "parents": [{"type": "Team", "id": "agents"}]},
    {"uid": {"type": "Resource", "id": "repo:org/app"}, "attrs": {"sensitivity": "internal"}, "parents": []},
    {"uid": {"type": "Resource", "id": "vault:prod"}, "attrs": {"sensitivity": "secret"}, "parents": []},
]


DEV_CONFIG_TEMPLATE = """\
# Written by `broker serve --dev`: development settings only.
[server]
listen = "127.0.0.1:{listen}"
token_listen = "127.0.0.1:{token_listen}"
http_listen = "127.0.0.1:{http_listen}"
cert = "broker.pem"
key = "broker-key.pem"
spiffe_id = "{broker_id}"

[[trust_domains]]
name = "{trust_domain}"
bundle = "{trust_domain}.bundle.pem"
jwt_bundle = "{trust_domain}.jwks.json"

[tokens]
algorithm = "ES256"
default_ttl = "5m"
max_ttl = "1h"
max_task_lifetime = "8h"
max_delegation_depth = 3
clock_skew = "30s"

[policy]
file = "policy.cedar"
entities = "entities.json"

[admin]
spiffe_ids = ["spiffe://{trust_domain}/operator/*"]
introspectors = []

[audit]
path = "audit.jsonl"

[approvals]
ttl = "15m"
"""


@dataclass(frozen=True, slots=True)
class DevPorts:
    listen: int = 8443
    token_listen: int = 8444
    http_listen: int = 8080


def _write(path: Path, data: str | bytes, *, private: bool = False) -> None:
    raw = data.encode() if isinstance(data, str) else data
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(raw)


def _dev_config(ports: DevPorts) -> str:
    """The dev `broker.toml`: the files `write_dev_setup` writes, served on `ports` of 127.0.0.1."""
    return DEV_CONFIG_TEMPLATE.format(
        listen=ports.listen,
        token_listen=ports.token_listen,
        http_listen=ports.http_listen,
        broker_id=BROKER_ID,
        trust_domain=TRUST_DOMAIN,
    )


def write_dev_setup(folder: Path, ports: DevPorts = DevPorts()) -> Path:
    """Write dev certs, JWT bundle, policy and config into `folder`; return the config path."""
    folder.mkdir(parents=True, exist_ok=True)
    os.chmod(folder, 0o700)
    ca = SpiffeCA(TRUST_DOMAIN)
    _write(folder / f"{TRUST_DOMAIN}.bundle.pem", ca.bundle_pem())
    ca.server_svid(BROKER_ID).write(folder, "broker")
    ca.x509_svid(OPERATOR_ID, ttl=24 * 3600).write(folder, "operator")
    for name, spiffe_id in AGENTS.items():
        ca.x509_svid(spiffe_id, ttl=24 * 3600).write(folder, name)
    # A JWT bundle so the dev config shows the key; its private half is not kept anywhere.
    jwks = {"keys": [SigningKey.generate().public_jwk()]}
    _write(folder / f"{TRUST_DOMAIN}.jwks.json", json.dumps(jwks, indent=2) + "\n")
    _write(folder / "policy.cedar", DEV_POLICY)
    _write(folder / "entities.json", json.dumps(DEV_ENTITIES, indent=2) + "\n")
    config = folder / "broker.toml"
    _write(config, _dev_config(ports))
    return config
