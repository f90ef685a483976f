"""The repository's own rules: generated code is fresh, import arrows point down, every error maps."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import subprocess
import sys
import tomllib
from pathlib import Path

import grpc
import pytest

import broker
from broker.api.status import STATUS, status_for
from broker.domain import errors

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


def _contracts() -> dict[str, dict]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return {c["id"]: c for c in config["tool"]["importlinter"]["contracts"]}


def _layer_names(contract: dict) -> list[set[str]]:
    return [{name.strip() for name in layer.replace(":", "|").split("|")} for layer in contract["layers"]]


TOP_LEVEL = {m.name for m in pkgutil.iter_modules(broker.__path__)}


def test_the_package_holds_only_sub_packages_and_entry_points() -> None:
    modules = {m.name for m in pkgutil.iter_modules(broker.__path__) if not m.ispkg}
    assert modules == {"__main__"}, f"modules directly in broker/: {sorted(modules)}"


def test_every_sub_package_has_a_two_part_docstring() -> None:
    for name in sorted(TOP_LEVEL - {"__main__", "_proto"}):
        doc = (importlib.import_module(f"broker.{name}").__doc__ or "").strip()
        assert "\n\n" in doc, f"broker.{name} needs a summary line and a line on what it may import"


def test_the_layers_contract_names_every_sub_package() -> None:
    named = set().union(*_layer_names(_contracts()["layers"]))
    assert named == TOP_LEVEL


def test_everything_below_the_api_layer_is_forbidden_grpc() -> None:
    layers = _layer_names(_contracts()["layers"])
    below_api = set().union(*layers[next(i for i, layer in enumerate(layers) if "api" in layer) + 1:])
    core = {m.removeprefix("broker.") for m in _contracts()["core-no-grpc"]["source_modules"]}
    assert core == below_api - {"_proto"}


def test_every_product_package_is_forbidden_the_testing_kit() -> None:
    product = {m.removeprefix("broker.") for m in _contracts()["no-testing-kit"]["source_modules"]}
    assert product == TOP_LEVEL - {"testing"}


SDK_PACKAGES = {"client", "verifier", "mcp"}
# What an SDK-only install ships besides the SDKs themselves.
SDK_FOUNDATION = {"domain", "jose", "_proto"}


def test_the_sdks_are_forbidden_every_server_package() -> None:
    contract = _contracts()["sdk-installs-alone"]
    assert {m.removeprefix("broker.") for m in contract["source_modules"]} == SDK_PACKAGES
    forbidden = {m.removeprefix("broker.") for m in contract["forbidden_modules"] if m.startswith("broker.")}
    assert forbidden == TOP_LEVEL - SDK_PACKAGES - SDK_FOUNDATION - {"__main__", "testing"}


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
