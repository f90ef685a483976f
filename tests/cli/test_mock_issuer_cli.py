"""`python -m broker.testing.mock_issuer` as a process: files, OIDC over HTTP, clean stop.

A subprocess and a loopback socket in a unit test: the brief for the mock issuer asks
for the command itself to be exercised end to end, and it is quick (well under a second).
"""

from __future__ import annotations

import json
import queue
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import jwt
import pytest

from broker.verify.x509 import X509SvidVerifier, load_bundle

AGENT = "spiffe://example.org/agent"
START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
HTTP_TIMEOUT = 5.0


@dataclass(frozen=True, slots=True)
class Running:
    proc: subprocess.Popen[str]
    lines: list[str]
    issuer: str


def _pump(stream: object, sink: queue.Queue[str | None]) -> None:
    for line in stream:  # type: ignore[attr-defined]
        sink.put(line.rstrip("\n"))
    sink.put(None)


def _wait_ready(proc: subprocess.Popen[str]) -> list[str]:
    lines: queue.Queue[str | None] = queue.Queue()
    threading.Thread(target=_pump, args=(proc.stdout, lines), daemon=True).start()
    seen: list[str] = []
    deadline = time.monotonic() + START_TIMEOUT
    while (left := deadline - time.monotonic()) > 0:
        try:
            line = lines.get(timeout=left)
        except queue.Empty:
            break
        if line is None:
            break
        seen.append(line)
        if line == "ready":
            return seen
    raise AssertionError(f"mock issuer not ready; stdout so far: {seen}")


@pytest.fixture
def running(tmp_path: Path) -> Iterator[Running]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "broker.testing.mock_issuer", "--out", str(tmp_path), "--svid", AGENT, "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        lines = _wait_ready(proc)
        issuer = next(line.split(" ", 1)[1] for line in lines if line.startswith("issuer "))
        yield Running(proc, lines, issuer)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=STOP_TIMEOUT)
        if proc.stdout is not None:
            proc.stdout.close()


def _get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=HTTP_TIMEOUT) as response:
        assert response.status == 200
        return json.load(response)


def test_cli_writes_bundle_jwks_and_svid_files(tmp_path: Path, running: Running) -> None:
    names = ["example.org.bundle.pem", "example.org.jwks.json", "agent.pem", "agent-key.pem", "agent.jwt"]
    for name in names:
        assert (tmp_path / name).is_file(), name
        assert f"wrote {tmp_path / name}" in running.lines
    assert (tmp_path / "agent-key.pem").stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "agent.jwt").stat().st_mode & 0o777 == 0o600


def test_cli_bundle_verifies_the_written_svid(tmp_path: Path, running: Running) -> None:
    verifier = X509SvidVerifier({"example.org": load_bundle(tmp_path / "example.org.bundle.pem")})
    chain = (tmp_path / "agent.pem").read_bytes()
    identity = verifier.verify(chain, [chain], now=time.time())
    assert identity.principal == AGENT


def test_cli_jwks_verifies_the_written_jwt_svid(tmp_path: Path, running: Running) -> None:
    keys = jwt.PyJWKSet.from_dict(json.loads((tmp_path / "example.org.jwks.json").read_text()))
    token = (tmp_path / "agent.jwt").read_text().strip()
    header = jwt.get_unverified_header(token)
    key = next(k for k in keys.keys if k.key_id == header["kid"])
    claims = jwt.decode(token, key, algorithms=[header["alg"]], audience="spiffe://example.org/broker")
    assert claims["sub"] == AGENT


def test_cli_serves_oidc_discovery_and_jwks(running: Running) -> None:
    assert running.issuer.startswith("http://127.0.0.1:")
    discovery = _get_json(running.issuer + "/.well-known/openid-configuration")
    assert discovery["issuer"] == running.issuer
    jwks = _get_json(discovery["jwks_uri"])
    assert jwks["keys"]
    assert all("d" not in key for key in jwks["keys"])


def test_cli_exits_zero_on_sigterm(running: Running) -> None:
    running.proc.send_signal(signal.SIGTERM)
    assert running.proc.wait(timeout=STOP_TIMEOUT) == 0


def test_cli_refuses_a_bad_spiffe_id_with_exit_2(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "broker.testing.mock_issuer", "--out", str(tmp_path), "--svid", "http://nope"],
        capture_output=True,
        text=True,
        timeout=START_TIMEOUT,
        check=False,
    )
    assert done.returncode == 2
    assert "scheme must be 'spiffe://'" in done.stderr
    assert not any(tmp_path.iterdir())
