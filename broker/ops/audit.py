"""The audit trail: one JSON object per line for every decision and every lease or task change.

Records never hold a token or a key. Field names that could carry one are refused outright,
and any value that still looks like a JWT (three base64url segments, header first) is replaced
by its hash, so a token pasted into a free-text field (a note, a reason) is not written either.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import sys
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TextIO

import orjson

from broker.approvals.store import ApprovalChanged, Change
from broker.domain.clock import Clock
from broker.domain.errors import AuditUnavailable
from broker.jose.jws import token_hash
from broker.leases.events import Event, LeaseEnded, LeaseGranted, LeaseRenewed, LeaseState, TaskClosed, TaskOpened
from broker.ops.metrics import AUDIT_FAILED_WRITES

log = logging.getLogger(__name__)

FORBIDDEN_FIELDS = frozenset({"token", "access_token", "subject_token", "key", "private_key"})
_FORBIDDEN_SUFFIXES = ("_token", "_key", "secret", "password")
_RESERVED_FIELDS = frozenset({"ts", "kind"})
# A compact JWS/JWE: its header is a JSON object, so the first segment starts with "eyJ" ('{"').
# No lookbehind: a JWT glued to a word ("aud-eyJ...") must be caught too; a false positive
# only hashes a harmless string.
_JWT_LIKE = re.compile(r"eyJ[A-Za-z0-9_-]{4,}(?:\.[A-Za-z0-9_-]*){2,}")
_FILE_FLAGS = os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_CLOEXEC", 0)


# Formatted whole seconds recently used: a record's own time and its expiry times repeat
# from one record to the next. Cleared when full, so it stays small.
_SECONDS: dict[int, str] = {}
_SECONDS_KEPT = 256
_ENCODER = json.JSONEncoder(separators=(",", ":"))


def _encode(record: Mapping[str, Any]) -> str:
    """One compact JSON line: orjson (three records per Exchange, a tenth of json's cost), else json.

    orjson refuses what json takes (ints beyond 64 bits, lone surrogates): those go through json.
    A line must stay ASCII, as json writes it: orjson leaves non-ASCII text raw, and a raw
    U+2028 or U+0085 splits the line for `splitlines()` readers, and a sink that is not UTF-8
    would refuse the write (and so, with `refuse`, the request); such a record goes through json.
    """
    try:
        line = orjson.dumps(record).decode()
    except (TypeError, ValueError):  # orjson.JSONEncodeError is a TypeError
        return _ENCODER.encode(record)
    return line if line.isascii() else _ENCODER.encode(record)


def rfc3339(t: float) -> str:
    """POSIX seconds as RFC 3339 UTC with milliseconds, e.g. "2026-01-02T03:04:05.678Z".

    Equal to `datetime.fromtimestamp(t, UTC).isoformat(timespec="milliseconds")` with "Z":
    microseconds rounded half-even as datetime does, then truncated to milliseconds.

    Raises:
        ValueError, OverflowError, OSError: `t` is outside what datetime can represent.
    """
    second = math.floor(t)
    micros = round((t - second) * 1_000_000)
    if micros == 1_000_000:
        second, micros = second + 1, 0
    prefix = _SECONDS.get(second)
    if prefix is None:
        prefix = datetime.fromtimestamp(second, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S")
        if len(_SECONDS) >= _SECONDS_KEPT:
            _SECONDS.clear()
        _SECONDS[second] = prefix
    return f"{prefix}.{micros // 1000:03d}Z"


# Field names that passed `_check_name`: they come from code, so a few dozen cover them all; a
# refusal is never remembered. Capped so that names built from input could not grow it for good.
_CHECKED_NAMES: set[str] = set()
_CHECKED_KEPT = 512


def _check_name(name: str) -> None:
    if len(_CHECKED_NAMES) >= _CHECKED_KEPT:
        _CHECKED_NAMES.clear()
    if _is_forbidden(name):
        raise ValueError(f"audit field {name!r} could carry a secret: record token_hash(...) instead")
    if name in _RESERVED_FIELDS:
        raise ValueError(f"audit field {name!r} is reserved")


def _is_forbidden(name: str) -> bool:
    lowered = name.lower()
    return lowered in FORBIDDEN_FIELDS or lowered.endswith(_FORBIDDEN_SUFFIXES)


def _scrub(value: Any) -> Any:
    """Replace JWT-looking strings anywhere in `value` by their hash, PEM keys by a marker.

    Nested maps come from callers' input (a request's context), so a secret-looking key
    inside one is redacted rather than refused: the request still gets its audit record.
    """
    if isinstance(value, str):
        if "PRIVATE KEY" in value:
            return "[redacted]"
        return _JWT_LIKE.sub(lambda m: token_hash(m.group(0)), value) if "eyJ" in value else value
    if type(value) is list or type(value) is tuple:  # before the Mapping check, an ABC's slow isinstance
        return [_scrub(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # NaN and inf are not JSON
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, Mapping):
        return {str(k): "[redacted]" if _is_forbidden(str(k)) else _scrub(v) for k, v in value.items()}
    if isinstance(value, set | frozenset):
        return [_scrub(v) for v in sorted(value, key=str)]
    if isinstance(value, list | tuple):
        return [_scrub(v) for v in value]
    return _scrub(str(value))


def _field_value(name: str, value: Any) -> Any:
    if type(value) is str and "eyJ" not in value and "PRIVATE KEY" not in value:
        return value  # the common case: nothing to scrub
    is_number = isinstance(value, int | float) and not isinstance(value, bool)
    if is_number and (name.endswith("_at") or name == "deadline"):
        try:
            return rfc3339(value)
        except (ValueError, OverflowError, OSError):
            pass  # out of datetime's range: keep the number
    return _scrub(value)


ON_FAILURE = ("refuse", "continue")


@dataclass(frozen=True, slots=True)
class Decided:
    """One decision on a request, as the `decision` record says it; made and recorded by one replica.

    A decision changes no shared state, so it is no event in the store's log: the use case that
    decided hands this value to `AuditLog.decision`, the one place that writes it.
    """

    client_id: str
    actions: tuple[str, ...]
    allowed: bool
    reason: str
    policies: tuple[str, ...] = ()
    principal: str | None = None
    auth: str | None = None
    task_id: str | None = None
    resource: str | None = None
    audience: str | None = None
    delegated: bool = False
    approval_required: bool = False
    parent_lease_id: str | None = None
    lease_id: str | None = None
    renewal: bool = False


class AuditLog:
    """Writes audit records as JSON lines to a text sink, flushed per record.

    A failed write is logged once (and again only after a write has succeeded in between) and
    counted in `failed_writes`. `record` never raises into the caller; `require` is for the
    records a grant depends on (an allowing decision, an issued token, an approval): with
    `on_failure="refuse"` it raises `AuditUnavailable`, so nothing is issued unrecorded.
    """

    def __init__(self, sink: TextIO, *, clock: Clock, owns_sink: bool = False, on_failure: str = "refuse") -> None:
        if on_failure not in ON_FAILURE:
            raise ValueError(f"on_failure must be one of {', '.join(ON_FAILURE)}")
        self._sink = sink
        self._clock = clock
        self._owns_sink = owns_sink
        self._refuse = on_failure == "refuse"
        self._lock = threading.Lock()
        self._failing = False
        self.failed_writes = 0

    @classmethod
    def open(cls, path: str, *, clock: Clock, on_failure: str = "refuse") -> AuditLog:
        """Open the audit log: "-" is stdout; any other path is appended to, created with mode 0600.

        Raises:
            OSError: the file cannot be opened (missing folder, no permission, a directory).
        """
        if path == "-":
            return cls(sys.stdout, clock=clock, on_failure=on_failure)
        fd = os.open(path, _FILE_FLAGS, 0o600)
        try:
            sink = os.fdopen(fd, "a", buffering=1, encoding="utf-8")
        except BaseException:
            os.close(fd)
            raise
        return cls(sink, clock=clock, owns_sink=True, on_failure=on_failure)

    def record(self, kind: str, /, **fields: Any) -> bool:
        """Write {"ts", "kind", **fields}; None values are dropped, `*_at` times become RFC 3339.

        Returns whether the record was written.

        Raises:
            ValueError: a field name that could carry a token or key, or a reserved name.
        """
        return self._write(self._clock.now(), kind, fields)

    def require(self, kind: str, /, **fields: Any) -> None:
        """Write a record that what follows depends on; as `record` otherwise.

        Raises:
            AuditUnavailable: the write failed and `on_failure` is "refuse".
            ValueError: a field name that could carry a token or key, or a reserved name.
        """
        if not self._write(self._clock.now(), kind, fields) and self._refuse:
            raise AuditUnavailable("audit unavailable")

    def decision(self, decided: Decided, *, required: bool) -> None:
        """Record a decision; `required` when a grant depends on it (refused in "refuse" mode then).

        Raises:
            AuditUnavailable: `required`, the write failed and `on_failure` is "refuse".
        """
        fields = {
            "principal": decided.principal,
            "client_id": decided.client_id,
            "auth": decided.auth,
            "lease_id": decided.lease_id,
            "task_id": decided.task_id or None,
            "actions": list(decided.actions),
            "resource": decided.resource,
            "audience": decided.audience,
            "delegated": decided.delegated or None,
            "decision": "allow" if decided.allowed else "deny",
            "policies": list(decided.policies),
            "reason": decided.reason,
            "approval_required": decided.approval_required or None,
            "parent_lease_id": decided.parent_lease_id,
            "renewal": decided.renewal or None,
        }
        if not self._write(self._clock.now(), "decision", fields) and required and self._refuse:
            raise AuditUnavailable("audit unavailable")

    def ahead(self, event: ApprovalChanged) -> None:
        """Record an operator's decision before it commits: refused (in "refuse" mode) when it cannot be.

        Called from inside the decision's batch, so an approval never takes effect unrecorded;
        `on_event` then skips it. A commit that fails after this leaves the record of a decision
        that did not take effect (the operator was answered UNAVAILABLE).

        Raises:
            AuditUnavailable: the write failed and `on_failure` is "refuse".
        """
        kind, fields = _event_record(event) or ("approval", {})
        if not self._write(event.at, kind, fields) and self._refuse and event.change is Change.APPROVED:
            raise AuditUnavailable("audit unavailable")

    def on_event(self, event: Event) -> None:
        """Committed-batch reader: one record per event, stamped with the event's own time."""
        if isinstance(event, ApprovalChanged) and event.change in AHEAD:
            return  # written by `ahead`, before the decision committed
        record = _event_record(event)
        if record is None:
            # never raise into the table's publish loop: the other subscribers still run
            log.error("audit got an unknown event", extra={"event_type": type(event).__name__})
            return
        self._write(event.at, *record)

    def close(self) -> None:
        """Close the sink if this log opened it (stdout stays open)."""
        with self._lock:
            if self._owns_sink and not self._sink.closed:
                try:
                    self._sink.close()
                except OSError as e:  # a full disk fails the final flush too: stopping must not
                    log.error("audit log not closed cleanly", extra={"error": str(e)})

    def _write(self, ts: float, kind: str, fields: Mapping[str, Any]) -> bool:
        record: dict[str, Any] = {"ts": rfc3339(ts), "kind": kind}
        for name, value in fields.items():
            if name not in _CHECKED_NAMES:
                _check_name(name)
                _CHECKED_NAMES.add(name)
            if value is not None:
                record[name] = _field_value(name, value)
        line = _encode(record) + "\n"
        with self._lock:
            try:
                self._sink.write(line)
                self._sink.flush()
            except (OSError, ValueError) as e:  # ValueError: the sink was closed under us
                self.failed_writes += 1
                AUDIT_FAILED_WRITES.inc()
                if not self._failing:
                    self._failing = True
                    log.error("audit write failed", extra={"kind": kind, "error": str(e)})
                return False
            if self._failing:
                self._failing = False
                log.warning("audit writes recovered", extra={"failed_writes": self.failed_writes})
            return True


def _lease_fields(event: LeaseGranted | LeaseEnded) -> dict[str, Any]:
    lease = event.lease
    return {
        "lease_id": lease.id,
        "task_id": lease.task_id,
        "subject": lease.subject,
        "client_id": lease.client_id,
        "audience": lease.audience,
        "scope": list(lease.scope),
        "resource": lease.resource,
        "parent_id": lease.parent_id,
        "actor_chain": list(lease.actor_chain) or None,
        "depth": lease.depth or None,
        "expires_at": lease.expires_at,
        "backend": lease.backend,
        "role": lease.role,
    }


# Operators' decisions are recorded before they commit (`AuditLog.ahead`); every other change after.
AHEAD = frozenset({Change.APPROVED, Change.DENIED})


def _approval_fields(event: ApprovalChanged) -> dict[str, Any]:
    approval = event.approval
    fields: dict[str, Any] = {
        "approval_id": approval.id,
        "principal": approval.principal,
        "client_id": approval.client_id,
        "task_id": approval.task_id,
    }
    match event.change:
        case Change.REQUESTED:
            fields.update(
                actions=list(approval.actions),
                resource=approval.resource,
                audience=approval.audience,
                policies=list(approval.policies),
            )
        case Change.APPROVED | Change.DENIED:
            fields.update(operator=approval.decided_by, note=approval.note or None)
        case Change.USED | Change.RELEASED:
            fields.update(lease_id=approval.lease_id or None, approved_by=approval.decided_by)
    return fields


def _event_record(event: Event) -> tuple[str, dict[str, Any]] | None:
    match event:
        case ApprovalChanged(change=change):
            return f"approval.{change.value}", _approval_fields(event)
        case LeaseGranted():
            return "lease.granted", {**_lease_fields(event), "issued_at": event.lease.issued_at}
        case LeaseRenewed(lease_id=lease_id, expires_at=expires_at, token_exp=token_exp):
            return "lease.renewed", {"lease_id": lease_id, "expires_at": expires_at, "token_exp": rfc3339(token_exp)}
        case LeaseEnded(lease=lease):
            kind = "lease.expired" if lease.state is LeaseState.EXPIRED else "lease.revoked"
            return kind, {**_lease_fields(event), "reason": lease.reason, "initiator": lease.initiator}
        case TaskOpened(task=task):
            return "task.opened", {"task_id": task.id, "owner": task.owner, "deadline": task.deadline}
        case TaskClosed(task=task):
            return "task.closed", {
                "task_id": task.id,
                "owner": task.owner,
                "state": task.state,
                "reason": task.reason,
            }
    return None
