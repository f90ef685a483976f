"""The demo's story runs end to end against `broker serve --dev` (as `scripts/demo` runs it)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from tests.cli.test_serve import ROOT, _ready_ports, _start

DEMO_TIMEOUT = 120


def test_the_demo_story_holds(tmp_path: Path) -> None:
    broker = _start("--dev", "--dir", str(tmp_path), "--dev-ports", "0,0,0")
    try:
        ports = _ready_ports(broker)
        demo = subprocess.run(
            [sys.executable, str(ROOT / "scripts" / "demo.py"), "--dir", str(tmp_path),
             "--addr", f"127.0.0.1:{ports['mtls']}", "--http", f"http://127.0.0.1:{ports['http']}",
             "--revocation-wait", "30"],  # the story, not this machine's speed, is under test
            env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=DEMO_TIMEOUT,
            check=False,
        )
    finally:
        broker.send_signal(signal.SIGTERM)
        broker.wait(timeout=30)
    assert demo.returncode == 0, demo.stdout[-3000:] + demo.stderr[-3000:]
    out = demo.stdout
    assert "read_file -> '# RELEASE.md'" in out
    assert "delete_repo refused by policy" in out
    assert "that credential presented for delete_repo: HTTP 403" in out
    assert "the next read_file call with the held token: HTTP 401 (token revoked)" in out
    assert "tokens in the audit log: none" in out
    assert "demo complete" in out
