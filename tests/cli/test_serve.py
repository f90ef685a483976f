"""`broker serve` run as a real process: dev mode, health over mTLS, SIGTERM, config errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

ROOT = Path(__file__).resolve().parents[2]


def _start(*args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, "-m", "broker", "serve", *args],
        cwd=ROOT,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def _ready_ports(proc: subprocess.Popen[str], timeout: float = 30.0) -> dict[str, int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if line.startswith("broker ready: "):
            return json.loads(line.removeprefix("broker ready: "))
        if not line and proc.poll() is not None:
            raise AssertionError(f"broker exited {proc.returncode}: {proc.stderr.read()}")
    raise AssertionError("broker did not become ready")


def test_dev_mode_serves_health_over_mtls_and_stops_on_sigterm(tmp_path: Path) -> None:
    proc = _start("--dev", "--dir", str(tmp_path / "dev"), "--dev-ports", "0,0,0")
    try:
        ports = _ready_ports(proc)
        dev = tmp_path / "dev"
        creds = grpc.ssl_channel_credentials(
            root_certificates=(dev / "example.org.bundle.pem").read_bytes(),
            private_key=(dev / "planner-key.pem").read_bytes(),
            certificate_chain=(dev / "planner.pem").read_bytes(),
        )
        with grpc.secure_channel(
            f"127.0.0.1:{ports['mtls']}", creds, options=[("grpc.ssl_target_name_override", "localhost")]
        ) as channel:
            status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10).status
        assert status == health_pb2.HealthCheckResponse.SERVING
        assert oct((dev / "broker-key.pem").stat().st_mode & 0o777) == "0o600"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
        assert "broker stopped" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_config_error_names_the_key_and_exits_2(tmp_path: Path) -> None:
    config = tmp_path / "broker.toml"
    config.write_text('[server]\nlisten = "127.0.0.1:0"\n')
    proc = _start("--config", str(config))
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 2
    assert "config error" in err and "server." in err
    assert "Traceback" not in err


def test_unparsable_policy_exits_2_with_the_parser_message(tmp_path: Path) -> None:
    proc = _start("--dev", "--dir", str(tmp_path / "dev"), "--dev-ports", "0,0,0")
    ports = _ready_ports(proc)
    assert ports["mtls"] > 0
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=20)
    (tmp_path / "dev" / "policy.cedar").write_text("permit (principal, action resource);")
    again = _start("--config", str(tmp_path / "dev" / "broker.toml"))
    _, err = again.communicate(timeout=30)
    assert again.returncode == 2 and "policy error" in err and "does not parse" in err


def _wait_for_log(proc: subprocess.Popen[str], text: str, seen: list[str], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        seen.append(line)
        if text in line:
            return
        if not line and proc.poll() is not None:
            break
    raise AssertionError(f"no {text!r} in the broker log: {''.join(seen)[-2000:]}")


def test_sighup_reloads_the_policy_and_a_bad_file_keeps_the_old_one(tmp_path: Path) -> None:
    dev = tmp_path / "dev"
    proc = _start("--dev", "--dir", str(dev), "--dev-ports", "0,0,0")
    seen: list[str] = []
    try:
        _ready_ports(proc)
        policy = dev / "policy.cedar"
        extra = '\n@id("extra")\nforbid (principal, action, resource == Resource::"x");\n'
        policy.write_text(policy.read_text() + extra)
        proc.send_signal(signal.SIGHUP)
        _wait_for_log(proc, "policy reloaded", seen)
        policy.write_text("permit (principal, action resource);")
        proc.send_signal(signal.SIGHUP)
        _wait_for_log(proc, "policy reload refused", seen)
        assert "does not parse" in seen[-1]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_port_in_use_is_a_config_error_naming_the_key(tmp_path: Path) -> None:
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = _start("--dev", "--dir", str(tmp_path / "dev"), "--dev-ports", f"{port},0,0")
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 2
    assert "config error: server.listen" in err and "Traceback" not in err
