"""`broker`: run the broker server.

broker serve --config broker.toml
broker serve --dev [--dir certs/dev]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import importlib.util
import json
import logging
import os
import signal
import sys
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from broker.domain.errors import ConfigError, PolicyError

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_CONFIG = 2
_STD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None)).keys()) | {"message", "asctime"}


class _Formatter(logging.Formatter):
    """`time level logger message key=value ...`: facts as fields, lower-case messages."""

    def format(self, record: logging.LogRecord) -> str:
        line = f"{self.formatTime(record)} {record.levelname.lower()} {record.name} {record.getMessage()}"
        extras = {k: v for k, v in vars(record).items() if k not in _STD_ATTRS}
        if extras:
            line += " " + " ".join(f"{k}={json.dumps(v, default=str)}" for k, v in sorted(extras.items()))
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def _setup_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter())
    logging.basicConfig(level=getattr(logging, level.upper()), handlers=[handler], force=True)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="broker", description="Workload-identity credential broker for AI agents.")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the broker")
    where = serve.add_mutually_exclusive_group(required=True)
    where.add_argument("--config", type=Path, help="path to broker.toml")
    where.add_argument("--dev", action="store_true", help="write dev certs, policy and config, then serve them")
    serve.add_argument("--dir", type=Path, default=Path("certs/dev"), help="folder for --dev material")
    serve.add_argument(
        "--dev-ports",
        default="8443,8444,8080",
        metavar="MTLS,TOKEN,HTTP",
        help="ports of the --dev listeners on 127.0.0.1 (default 8443,8444,8080)",
    )
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return parser


async def _serve(config_path: Path) -> int:
    # Imported here, after the server-extra check: configuration and wiring need the server's parts.
    from broker.app.server import build_app
    from broker.config.settings import load_config
    from broker.ops.collector import FrozenSurvivors

    app = build_app(load_config(config_path))
    try:
        await app.start()
    except BaseException:
        await app.stop(grace=0)  # whatever listeners did start
        raise
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, app.reload_policy)
    # What exists now (modules, config, policy, keys: some 40,000 objects) lives as long as the
    # process. Frozen, it is left out of every full collection, which otherwise pauses the event
    # loop for tens of milliseconds on a small machine (45 ms measured on 2 shared cores).
    gc.collect()
    gc.freeze()
    # And what outlives each later full collection (the lease records) is frozen in turn.
    collector = asyncio.create_task(FrozenSurvivors().run(), name="collector")
    print(f"broker ready: {json.dumps(app.ports)}", flush=True)
    await stop.wait()
    logging.getLogger("broker").info("shutting down")
    collector.cancel()
    await app.stop(grace=5.0)
    return EXIT_OK


def run(main_coro: Coroutine[Any, Any, int]) -> int:
    """Run the broker's event loop: uvloop when installed (less CPU per call), else asyncio's own.

    `BROKER_EVENT_LOOP=asyncio` in the environment forces the standard loop (for comparison).
    """
    if os.environ.get("BROKER_EVENT_LOOP", "") != "asyncio":
        try:
            import uvloop
        except ImportError:
            pass
        else:
            return uvloop.run(main_coro)
    return asyncio.run(main_coro)


# What the `server` extra brings; the base install is the SDKs alone.
SERVER_MODULES = (
    "cedarpy", "prometheus_client", "grpc_health", "grpc_reflection", "psycopg", "psycopg_pool", "orjson",
)


def _missing_server_part() -> str | None:
    return next((m for m in SERVER_MODULES if importlib.util.find_spec(m) is None), None)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    missing = _missing_server_part()
    if missing is not None:
        print(f"broker: the server is not installed (no {missing}): pip install 'agent-credential-broker[server]'",
              file=sys.stderr)
        return EXIT_FAILED
    _setup_logging(args.log_level)
    log = logging.getLogger("broker")
    config_path = args.config
    if args.dev:
        from broker.cli.dev import DevPorts, write_dev_setup

        try:
            ports = DevPorts(*(int(p) for p in args.dev_ports.split(",")))
        except (TypeError, ValueError):
            print("broker: --dev-ports takes three port numbers: MTLS,TOKEN,HTTP", file=sys.stderr)
            return EXIT_CONFIG
        config_path = write_dev_setup(args.dir, ports)
        log.info("dev setup written", extra={"dir": str(args.dir), "config": str(config_path)})
    try:
        return run(_serve(config_path))
    except ConfigError as e:
        print(f"broker: config error: {e.reason}", file=sys.stderr)
        return EXIT_CONFIG
    except PolicyError as e:
        print(f"broker: policy error: {e.reason}", file=sys.stderr)
        return EXIT_CONFIG
    except OSError as e:
        print(f"broker: {e}", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
