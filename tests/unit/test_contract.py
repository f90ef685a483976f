"""The repository's own rules: generated code is fresh, import arrows point down, every error maps."""

from __future__ import annotations

import inspect
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from broker import errors
from broker.api.status import STATUS, status_for

ROOT = Path(__file__).resolve().parents[2]


def test_generated_proto_modules_are_fresh(tmp_path: Path) -> None:
    subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_proto.py"), "--out", str(tmp_path)], check=True,
                   capture_output=True)
    for name in ("broker_pb2.py", "broker_pb2.pyi", "broker_pb2_grpc.py"):
        committed = (ROOT / "broker" / "_proto" / name).read_text()
        assert (tmp_path / name).read_text() == committed, f"{name} is stale: run scripts/gen_proto.py"


def test_import_contracts_hold() -> None:
    lint = Path(sys.executable).parent / "lint-imports"
    result = subprocess.run([str(lint)], cwd=ROOT, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout[-3000:]


ERROR_CLASSES = [
    cls for _, cls in inspect.getmembers(errors, inspect.isclass)
    if issubclass(cls, errors.BrokerError) and cls is not errors.BrokerError
]


@pytest.mark.parametrize("cls", ERROR_CLASSES, ids=[c.__name__ for c in ERROR_CLASSES])
def test_every_domain_error_has_its_own_status(cls: type[errors.BrokerError]) -> None:
    assert cls in STATUS, f"{cls.__name__} has no entry in broker.api.status.STATUS"
    assert STATUS[cls] not in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL)


def test_most_specific_class_wins() -> None:
    assert status_for(errors.PolicyDenied("no")) == grpc.StatusCode.PERMISSION_DENIED
    assert status_for(errors.InvalidSpiffeId("bad")) == grpc.StatusCode.INVALID_ARGUMENT
    assert status_for(errors.ApprovalExpired("late")) == grpc.StatusCode.DEADLINE_EXCEEDED
    assert status_for(errors.LeaseInactive("gone")) == grpc.StatusCode.FAILED_PRECONDITION
