"""What `brokerctl` prints: tables, key: value blocks and JSON. Pure functions of messages and `now`."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Any

from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

from broker._proto import broker_pb2 as pb

NONE = "-"
LEASE_HEADERS = ("ID", "SUBJECT", "TASK", "AUDIENCE", "SCOPE", "STATE", "LEFT")
APPROVAL_HEADERS = ("ID", "STATE", "PRINCIPAL", "TASK", "AUDIENCE", "ACTIONS", "RESOURCE", "LEFT")


def duration(seconds: float) -> str:
    """`42s`, `4m12s`, `1h02m03s`; negative values count as zero."""
    total = max(0, int(seconds))
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m{secs:02d}s"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


def seconds(ts: Timestamp) -> float:
    return ts.seconds + ts.nanos / 1e9


def iso(ts: Timestamp) -> str:
    """RFC 3339 UTC to the second, e.g. `2025-01-02T03:04:05Z`."""
    return datetime.fromtimestamp(ts.seconds, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def time_left(expires_at: Timestamp, *, ended: bool, now: float) -> str:
    """Time until `expires_at` by the local clock, or `-` for something that already ended."""
    if ended:
        return NONE
    return duration(seconds(expires_at) - now)


def table(headers: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """Left-aligned columns two spaces apart, no trailing blanks."""
    grid = [list(headers), *[[cell or NONE for cell in row] for row in rows]]
    widths = [max(len(row[i]) for row in grid) for i in range(len(headers))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in grid]
    return "\n".join(lines)


def block(pairs: Sequence[tuple[str, str]]) -> str:
    """`key: value` lines with the values aligned."""
    width = max(len(key) for key, _ in pairs) + 1
    return "\n".join(f"{key + ':':<{width}} {value or NONE}".rstrip() for key, value in pairs)


def _joined(values: Iterable[str]) -> str:
    return ",".join(values)


def _lease_ended(lease: pb.Lease) -> bool:
    return lease.state != "ACTIVE"


def lease_table(leases: Sequence[pb.Lease], *, now: float) -> str:
    if not leases:
        return "no leases"
    rows = [
        (
            lease.id,
            lease.subject,
            lease.task_id,
            lease.audience,
            _joined(lease.scope),
            lease.state,
            time_left(lease.expires_at, ended=_lease_ended(lease), now=now),
        )
        for lease in leases
    ]
    return table(LEASE_HEADERS, rows)


def lease_block(lease: pb.Lease, *, now: float) -> str:
    ended = lease.revoked_at if lease.HasField("revoked_at") else None
    return block(
        [
            ("id", lease.id),
            ("task", lease.task_id),
            ("subject", lease.subject),
            ("client", lease.client_id),
            ("audience", lease.audience),
            ("scope", " ".join(lease.scope)),
            ("resource", lease.resource),
            ("state", lease.state),
            ("issued", iso(lease.issued_at)),
            ("expires", iso(lease.expires_at)),
            ("left", time_left(lease.expires_at, ended=_lease_ended(lease), now=now)),
            ("ended", iso(ended) if ended is not None else ""),
            ("reason", lease.reason),
            ("parent", lease.parent),
            ("children", _joined(lease.children)),
            ("actor chain", " <- ".join(lease.actor_chain)),
            ("backend", lease.backend),
            ("role", lease.role),
            ("revocation", revocation_text(lease.revocation, now=now) if lease.HasField("revocation") else ""),
        ]
    )


def revocation_text(revocation: pb.BackendRevocation, *, now: float) -> str:
    """`PENDING (3 attempts, next in 4s): last error`, or just the state."""
    if revocation.state != "PENDING":
        return revocation.state
    attempts = f"{revocation.attempts} failed attempt{'' if revocation.attempts == 1 else 's'}"
    text = f"PENDING ({attempts}, next in {duration(seconds(revocation.next_attempt_at) - now)})"
    return f"{text}: {revocation.last_error}" if revocation.last_error else text


def approval_table(approvals: Sequence[pb.Approval], *, now: float) -> str:
    if not approvals:
        return "no approvals"
    rows = [
        (
            a.approval_id,
            a.state,
            a.principal,
            a.task_id,
            a.audience,
            _joined(a.actions),
            a.resource,
            time_left(a.expires_at, ended=a.state != "PENDING", now=now),
        )
        for a in approvals
    ]
    return table(APPROVAL_HEADERS, rows)


def approval_block(approval: pb.Approval) -> str:
    context = ", ".join(f"{key}={value}" for key, value in sorted(approval.context.items()))
    return block(
        [
            ("approval", approval.approval_id),
            ("state", approval.state),
            ("principal", approval.principal),
            ("client", approval.client_id),
            ("task", approval.task_id),
            ("audience", approval.audience),
            ("actions", " ".join(approval.actions)),
            ("resource", approval.resource),
            ("ttl", duration(approval.ttl_seconds) if approval.ttl_seconds else "default"),
            ("context", context),
            ("decided by", approval.decided_by),
            ("note", approval.note),
        ]
    )


def decision_block(resp: pb.CheckPolicyResponse) -> str:
    return block(
        [
            ("decision", resp.decision),
            ("policies", _joined(resp.policies)),
            ("max ttl", duration(resp.max_ttl_seconds) if resp.max_ttl_seconds else ""),
            ("approval required", "yes" if resp.approval_required else "no"),
            ("errors", "; ".join(resp.errors)),
        ]
    )


def revoked_line(count: int) -> str:
    return f"revoked {count} lease{'' if count == 1 else 's'}"


def message_dict(message: Message) -> dict[str, Any]:
    """The proto3 JSON mapping with the .proto field names, default values included."""
    try:
        return MessageToDict(
            message,
            preserving_proto_field_name=True,
            always_print_fields_with_no_presence=True,
            unquote_int64_if_possible=True,
        )
    except TypeError:  # protobuf before 6 has no unquote_int64_if_possible: int64 stays a string
        return MessageToDict(message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)


def to_json(value: Message | dict[str, Any]) -> str:
    data = message_dict(value) if isinstance(value, Message) else value
    return json.dumps(data, indent=2, sort_keys=True)
