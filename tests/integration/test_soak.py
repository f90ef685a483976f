"""The soak (`scripts/soak.py`) in a 15-second version: a live broker under random load and revocations.

The script is its own oracle (see its docstring); this test runs it as a process, as an
operator would, and asserts that it held and that it really exercised what it checks.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _figure(pattern: str, text: str) -> int:
    match = re.search(pattern, text)
    assert match, f"{pattern!r} not in the soak's report:\n{text}"
    return int(match.group(1).replace(",", ""))


def test_a_fifteen_second_soak_holds() -> None:
    run = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "soak.py"), "--seconds", "15", "--agents", "4", "--warmup", "5"],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=ROOT,
    )
    report = run.stdout + run.stderr
    assert run.returncode == 0, report
    assert "soak held" in run.stdout
    assert "VIOLATION" not in run.stdout
    # It did what it claims to check: revoked tokens introspected, events delivered, delegations made.
    assert _figure(r"held: ([\d,]+) introspections of revoked tokens", run.stdout) > 0
    assert _figure(r"watchers: ([\d,]+) events delivered", run.stdout) > 0
    assert _figure(r"\(([\d,]+) delegated\)", run.stdout) > 0
    for selector in ("lease_id", "task_id", "subject", "all"):
        assert f"'{selector}'" in run.stdout, f"no revocation by {selector}:\n{report}"
