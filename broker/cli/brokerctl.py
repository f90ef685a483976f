"""`brokerctl`: the operators' command line, a sync gRPC client of `BrokerAdmin` over mTLS.

    brokerctl [--addr HOST:PORT] [--cert C --key K --ca BUNDLE] [--json] [--timeout S] COMMAND

Settings also come from BROKERCTL_ADDR, BROKERCTL_CERT, BROKERCTL_KEY and BROKERCTL_CA (flags win).
Exit 0 on success, 1 when the broker refused or cannot be reached, 2 on a usage error.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from broker._proto import broker_pb2 as pb
from broker.cli import format as fmt

if TYPE_CHECKING:  # grpc loads in main(), after its log level is set
    import grpc

    from broker._proto import broker_pb2_grpc as pb_grpc

EXIT_OK = 0
EXIT_REFUSED = 1
EXIT_USAGE = 2
DEFAULT_ADDR = "127.0.0.1:8443"
DEFAULT_SERVER_NAME = "localhost"
DEFAULT_TIMEOUT = 10.0
PAGE_SIZE = 100
PROG = "brokerctl"


class UsageError(Exception):
    """A problem with how brokerctl was called (exit 2)."""


@dataclass(frozen=True, slots=True)
class Settings:
    addr: str
    server_name: str
    cert: Path
    key: Path
    ca: Path
    json: bool
    timeout: float


@dataclass(frozen=True, slots=True)
class Call:
    """What a command handler needs: the stub, its per-RPC timeout, the output mode and the local time."""

    admin: pb_grpc.BrokerAdminStub
    timeout: float
    json: bool
    now: float


Handler = Callable[[Call, argparse.Namespace], str]


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be greater than 0: {text!r}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {text!r}")
    return value


def _pair(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key.strip(), value


def _add_globals(parser: argparse.ArgumentParser, *, suppress: bool) -> None:
    """The connection options; on subcommands they are SUPPRESSed so they only override when given."""
    default: dict = {"default": argparse.SUPPRESS} if suppress else {}
    parser.add_argument("--addr", help=f"broker mTLS address (env BROKERCTL_ADDR, default {DEFAULT_ADDR})", **default)
    parser.add_argument("--cert", help="operator SVID certificate chain, PEM (env BROKERCTL_CERT)", **default)
    parser.add_argument("--key", help="operator SVID private key, PEM (env BROKERCTL_KEY)", **default)
    parser.add_argument("--ca", help="trust bundle that verifies the broker, PEM (env BROKERCTL_CA)", **default)
    parser.add_argument(
        "--server-name", help=f"TLS name in the broker's certificate (default {DEFAULT_SERVER_NAME})", **default
    )
    parser.add_argument("--json", action="store_true", help="machine-readable JSON output", **default)
    parser.add_argument(
        "--timeout", type=_positive_float, help=f"seconds per call (default {DEFAULT_TIMEOUT:g})", **default
    )


def _leaf(sub: argparse._SubParsersAction, name: str, handler: Handler, help_text: str) -> argparse.ArgumentParser:
    parser = sub.add_parser(name, help=help_text, description=help_text)
    _add_globals(parser, suppress=True)
    parser.set_defaults(handler=handler)
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Operate a workload-identity credential broker.")
    _add_globals(parser, suppress=False)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _leases_parsers(commands)
    _revoke_parser(commands)
    _policy_parsers(commands)
    _approvals_parsers(commands)
    return parser


def _group(commands: argparse._SubParsersAction, name: str, help_text: str) -> argparse._SubParsersAction:
    parser = commands.add_parser(name, help=help_text, description=help_text)
    return parser.add_subparsers(dest=f"{name}_command", required=True, metavar="SUBCOMMAND")


def _leases_parsers(commands: argparse._SubParsersAction) -> None:
    leases = _group(commands, "leases", "list and inspect leases")
    ls = _leaf(leases, "list", leases_list, "list leases (every page)")
    ls.add_argument("--task", default="", help="only leases of this task")
    ls.add_argument("--subject", default="", help="only leases on behalf of this principal")
    ls.add_argument("--audience", default="", help="only leases for this audience")
    ls.add_argument("--all", action="store_true", help="also revoked and expired leases still remembered")
    ls.add_argument("--limit", type=_positive_int, help="at most this many leases")
    ls.add_argument(
        "--revoke-pending", action="store_true", help="only leases whose dynamic secret is not yet revoked downstream"
    )
    _leaf(leases, "show", leases_show, "show one lease").add_argument("lease_id", metavar="ID")


def _revoke_parser(commands: argparse._SubParsersAction) -> None:
    revoke = _leaf(commands, "revoke", revoke_cmd, "revoke leases by one selector (descendants too)")
    selector = revoke.add_mutually_exclusive_group(required=True)
    selector.add_argument("--lease", help="one lease by id")
    selector.add_argument("--task", help="every lease of a task")
    selector.add_argument("--subject", help="every lease on behalf of a principal")
    selector.add_argument("--all", action="store_true", help="every lease; also rotates the signing key")
    revoke.add_argument("--reason", default="", help="note recorded in the audit trail")
    revoke.add_argument("--yes", action="store_true", help="skip the confirmation --all asks for at a terminal")


def _policy_parsers(commands: argparse._SubParsersAction) -> None:
    policy = _group(commands, "policy", "dry-run and reload policy")
    check = _leaf(policy, "check", policy_check, "explain the decision for one request")
    check.add_argument("--principal", required=True)
    check.add_argument("--action", required=True)
    check.add_argument("--resource", required=True)
    check.add_argument("--context", type=_pair, action="append", default=[], metavar="KEY=VALUE")
    _leaf(policy, "reload", policy_reload, "re-read the policy files")


def _approvals_parsers(commands: argparse._SubParsersAction) -> None:
    approvals = _group(commands, "approvals", "decide pending exchanges")
    _leaf(approvals, "list", approvals_list, "list pending approvals").add_argument(
        "--all", action="store_true", help="also decided approvals still remembered"
    )
    for name, handler in (("approve", approvals_approve), ("deny", approvals_deny)):
        decide = _leaf(approvals, name, handler, f"{name} a pending exchange")
        decide.add_argument("approval_id", metavar="ID")
        decide.add_argument("--note", default="", help="recorded with the decision")


# ---- commands: each makes its calls and returns the text to print ----


def leases_list(call: Call, args: argparse.Namespace) -> str:
    """Every page of ListLeases, up to --limit.

    Raises:
        grpc.RpcError: the broker refused a page.
    """
    leases: list[pb.Lease] = []
    token = ""
    while True:
        want = PAGE_SIZE if args.limit is None else min(args.limit - len(leases), PAGE_SIZE)
        request = pb.ListLeasesRequest(
            task_id=args.task, subject=args.subject, audience=args.audience,
            include_inactive=args.all, page_size=want, page_token=token, revoke_pending=args.revoke_pending,
        )  # fmt: skip
        page = call.admin.ListLeases(request, timeout=call.timeout)
        leases.extend(page.leases)
        if not page.next_page_token or page.next_page_token == token:
            break
        if args.limit is not None and len(leases) >= args.limit:
            break
        token = page.next_page_token
    if args.limit is not None:
        leases = leases[: args.limit]
    if call.json:
        return fmt.to_json({"leases": [fmt.message_dict(lease) for lease in leases]})
    return fmt.lease_table(leases, now=call.now)


def leases_show(call: Call, args: argparse.Namespace) -> str:
    lease = call.admin.GetLease(pb.GetLeaseRequest(lease_id=args.lease_id), timeout=call.timeout)
    return fmt.to_json(lease) if call.json else fmt.lease_block(lease, now=call.now)


def revoke_cmd(call: Call, args: argparse.Namespace) -> str:
    if args.lease is not None:
        request = pb.RevokeRequest(lease_id=args.lease, reason=args.reason)
    elif args.task is not None:
        request = pb.RevokeRequest(task_id=args.task, reason=args.reason)
    elif args.subject is not None:
        request = pb.RevokeRequest(subject=args.subject, reason=args.reason)
    else:
        request = pb.RevokeRequest(all=True, reason=args.reason)
    resp = call.admin.Revoke(request, timeout=call.timeout)
    return fmt.to_json(resp) if call.json else fmt.revoked_line(resp.revoked_count)


def policy_check(call: Call, args: argparse.Namespace) -> str:
    request = pb.CheckPolicyRequest(
        principal=args.principal, action=args.action, resource=args.resource, context=dict(args.context)
    )
    resp = call.admin.CheckPolicy(request, timeout=call.timeout)
    return fmt.to_json(resp) if call.json else fmt.decision_block(resp)


def policy_reload(call: Call, args: argparse.Namespace) -> str:
    resp = call.admin.ReloadPolicy(pb.ReloadPolicyRequest(), timeout=call.timeout)
    return fmt.to_json(resp) if call.json else f"policy reloaded: version {resp.policy_version}"


def approvals_list(call: Call, args: argparse.Namespace) -> str:
    resp = call.admin.ListApprovals(pb.ListApprovalsRequest(include_decided=args.all), timeout=call.timeout)
    if call.json:
        return fmt.to_json({"approvals": [fmt.message_dict(a) for a in resp.approvals]})
    return fmt.approval_table(list(resp.approvals), now=call.now)


def approvals_approve(call: Call, args: argparse.Namespace) -> str:
    request = pb.ApproveRequest(approval_id=args.approval_id, note=args.note)
    approval = call.admin.Approve(request, timeout=call.timeout)
    return fmt.to_json(approval) if call.json else fmt.approval_block(approval)


def approvals_deny(call: Call, args: argparse.Namespace) -> str:
    approval = call.admin.Deny(pb.DenyRequest(approval_id=args.approval_id, note=args.note), timeout=call.timeout)
    return fmt.to_json(approval) if call.json else fmt.approval_block(approval)


# ---- settings, channel, errors ----


def _check_usage(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Rules argparse cannot say; `parser.error` exits 2 with the usage line."""
    if args.handler is revoke_cmd and args.all and not args.yes and sys.stdin.isatty():
        # At a terminal, a person confirms; scripts (no tty) run `revoke --all` as documented.
        answer = input("revoke every lease and rotate the signing key? [y/N] ")
        if answer.strip().lower() not in ("y", "yes"):
            parser.error("revoke --all not confirmed")
    if args.handler is policy_check:
        keys = [key for key, _ in args.context]
        if len(keys) != len(set(keys)):
            parser.error("--context: a key is given more than once")


def settings(args: argparse.Namespace, env: Mapping[str, str]) -> Settings:
    """Flags, then BROKERCTL_* variables, then defaults.

    Raises:
        UsageError: the certificate, key or CA bundle is not named.
    """
    paths: dict[str, Path] = {}
    for name in ("cert", "key", "ca"):
        value = getattr(args, name, None) or env.get(f"BROKERCTL_{name.upper()}", "")
        if not value:
            raise UsageError(f"--{name} (or BROKERCTL_{name.upper()}) is required: the broker admits operators by mTLS")
        paths[name] = Path(value)
    return Settings(
        addr=getattr(args, "addr", None) or env.get("BROKERCTL_ADDR", "") or DEFAULT_ADDR,
        server_name=getattr(args, "server_name", None) or DEFAULT_SERVER_NAME,
        cert=paths["cert"],
        key=paths["key"],
        ca=paths["ca"],
        json=bool(getattr(args, "json", False)),
        timeout=getattr(args, "timeout", None) or DEFAULT_TIMEOUT,
    )


_CERT, _KEY = b"-----BEGIN CERTIFICATE-----", b"PRIVATE KEY-----"
_PEM_MARKERS = {"cert": _CERT, "ca": _CERT, "key": _KEY}
_PEM_WHAT = {"cert": "PEM certificate", "ca": "PEM certificate", "key": "PEM private key"}
UNREACHABLE_HINT = "check --addr, --ca, --server-name and the --cert/--key pair"


def _read(flag: str, path: Path) -> bytes:
    """The file's bytes, if it at least looks like the right kind of PEM (gRPC's own errors are vague).

    Raises:
        UsageError: naming the flag and the path, never the content.
    """
    try:
        data = path.read_bytes()
    except OSError as e:
        raise UsageError(f"cannot read the --{flag} file {path}: {e.strerror or e.__class__.__name__}") from e
    if _PEM_MARKERS[flag] not in data:
        raise UsageError(f"the --{flag} file {path} holds no {_PEM_WHAT[flag]}")
    return data


def open_channel(s: Settings) -> grpc.Channel:
    """Raises: UsageError for an unreadable certificate, key or bundle."""
    import grpc

    creds = grpc.ssl_channel_credentials(
        root_certificates=_read("ca", s.ca), private_key=_read("key", s.key), certificate_chain=_read("cert", s.cert)
    )
    return grpc.secure_channel(s.addr, creds, options=[("grpc.ssl_target_name_override", s.server_name)])


def _one_line(text: str | None) -> str:
    return " ".join((text or "").split())


def rpc_error_line(error: grpc.RpcError, addr: str) -> str:
    import grpc

    code = error.code() if hasattr(error, "code") else None
    details = _one_line(error.details() if hasattr(error, "details") else str(error))
    if code is grpc.StatusCode.UNAVAILABLE:
        return f"{PROG}: cannot reach the broker at {addr}: {details} ({UNREACHABLE_HINT})"
    name = code.name.lower() if code is not None else "error"
    return f"{PROG}: {name}: {details}"


def _run(args: argparse.Namespace) -> int:
    import grpc

    from broker._proto import broker_pb2_grpc as pb_grpc

    try:
        s = settings(args, os.environ)
        channel = open_channel(s)
    except UsageError as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return EXIT_USAGE
    with channel:
        call = Call(admin=pb_grpc.BrokerAdminStub(channel), timeout=s.timeout, json=s.json, now=time.time())
        try:
            text = args.handler(call, args)
        except grpc.RpcError as e:
            print(rpc_error_line(e, s.addr), file=sys.stderr)
            return EXIT_REFUSED
    print(text)
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    """Run one brokerctl command; returns the exit code."""
    # gRPC's C core logs TLS failures to stderr in several lines; our one-line error says what matters.
    # It reads the level once, when grpc is first imported (GRPC_VERBOSITY=ERROR brings the logs back).
    os.environ.setdefault("GRPC_VERBOSITY", "NONE")
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_usage(parser, args)
    try:
        return _run(args)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # the reader went away (`brokerctl leases list | head`): stop quietly, with the shell's SIGPIPE code
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    sys.exit(main())
