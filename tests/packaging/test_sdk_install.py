"""The SDKs install alone: a clean venv with the base distribution has no server parts.

The wheel is built from a copy of the sources (the worktree stays clean) and installed into a
new venv by this venv's pip; its dependencies come from the package index (or pip's cache).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
INSTALL_TIMEOUT = 300

CHECK = """
import importlib.util, sys
import broker.client, broker.verifier
from broker.client import AgentClient, PemIdentity, SyncAgentClient
from broker.verifier import TokenVerifier
TokenVerifier(issuer="spiffe://example.org/broker", audience="spiffe://example.org/service/repo",
              jwks_url="http://127.0.0.1:1/jwks", revocations="none")
absent = [m for m in ("cedarpy", "prometheus_client", "grpc_health", "grpc_reflection", "psycopg", "orjson", "mcp")
          if importlib.util.find_spec(m) is not None]
assert not absent, f"server or extra parts installed: {absent}"
try:
    import broker.mcp
except ImportError as e:
    assert "[mcp]" in str(e), e
else:
    raise AssertionError("broker.mcp imported without the mcp extra")
print("sdk ok")
"""


def _run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=INSTALL_TIMEOUT, check=False)


def test_the_base_install_is_the_sdks_without_the_server(tmp_path: Path) -> None:
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "broker", source / "broker", ignore=shutil.ignore_patterns("__pycache__"))
    built = _run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                 str(tmp_path / "dist"), str(source))
    assert built.returncode == 0, built.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    venv = tmp_path / "venv"
    assert _run(sys.executable, "-m", "venv", "--without-pip", str(venv)).returncode == 0
    python = venv / "bin" / "python"
    installed = _run(sys.executable, "-m", "pip", "--python", str(python), "install", "-q", str(wheel))
    assert installed.returncode == 0, installed.stderr[-2000:]
    checked = _run(str(python), "-c", CHECK, cwd=tmp_path)
    assert checked.returncode == 0, checked.stderr[-2000:]
    assert checked.stdout.strip() == "sdk ok"
    serve = _run(str(venv / "bin" / "broker"), "serve", "--config", "broker.toml", cwd=tmp_path)
    assert serve.returncode == 1
    assert "agent-credential-broker[server]" in serve.stderr
