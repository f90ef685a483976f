"""Events as JSON documents, for the shared event log.

Every field of every event is plain data: strings, numbers, lists and maps. The one value the
broker puts in a lease's policy context that is not (`EntityRef`, the acting agent as a Cedar
entity) is written as a tagged map and read back as itself. Decoding is strict: a document
this code did not write fails with `ValueError`, never with a half-built event.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import fields
from typing import Any

from broker.approvals.store import Approval, ApprovalChanged, ApprovalState, Change
from broker.leases.events import (
    Event,
    Lease,
    LeaseEnded,
    LeaseGranted,
    LeaseRenewed,
    LeaseState,
    Reason,
    Task,
    TaskClosed,
    TaskOpened,
    TaskState,
)
from broker.policy.engine import EntityRef

_ENTITY = "__broker_entity__"
_LEASE_TUPLES = ("scope", "actor_chain")


def _plain(value: Any) -> Any:
    if isinstance(value, EntityRef):
        return {_ENTITY: [value.type, value.id]}
    if isinstance(value, Mapping):
        # A claim or request value can never pose as the tag: the key is not kept from input (the
        # policy engine drops `__` keys from claims anyway), so only a real EntityRef revives as one.
        return {str(k): _plain(v) for k, v in value.items() if k != _ENTITY}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def _revive(value: Any) -> Any:
    if isinstance(value, dict):
        if set(value) == {_ENTITY}:
            kind, ident = value[_ENTITY]
            return EntityRef(str(kind), str(ident))
        return {k: _revive(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_revive(v) for v in value]
    return value


def _lease_doc(lease: Lease) -> dict[str, Any]:
    doc = {f.name: getattr(lease, f.name) for f in fields(Lease)}
    doc["context"] = _plain(lease.context)
    doc["scope"], doc["actor_chain"] = list(lease.scope), list(lease.actor_chain)
    return doc


def _lease(doc: Mapping[str, Any]) -> Lease:
    values = dict(doc)
    for name in _LEASE_TUPLES:
        values[name] = tuple(values[name])
    values["state"] = LeaseState(values["state"])
    values["reason"] = Reason(values["reason"]) if values["reason"] is not None else None
    values["context"] = _revive(values["context"])
    return Lease(**values)


def _task_doc(task: Task) -> dict[str, Any]:
    return {f.name: getattr(task, f.name) for f in fields(Task)}


def _task(doc: Mapping[str, Any]) -> Task:
    values = dict(doc)
    values["state"] = TaskState(values["state"])
    values["reason"] = Reason(values["reason"]) if values["reason"] is not None else None
    return Task(**values)


def _approval_doc(approval: Approval) -> dict[str, Any]:
    return {f.name: _plain(getattr(approval, f.name)) for f in fields(Approval)}


def _approval(doc: Mapping[str, Any]) -> Approval:
    values = {f.name: doc[f.name] for f in fields(Approval)}
    values["actions"], values["policies"] = tuple(values["actions"]), tuple(values["policies"])
    values["state"] = ApprovalState(values["state"])
    values["request"] = _revive(values["request"])
    return Approval(**values)


def encode(event: Event) -> tuple[str, str]:
    """`(kind, json)` for one event.

    Raises:
        TypeError: not a lease table event, or a value that is not plain data.
    """
    match event:
        case LeaseGranted(lease=lease, at=at) | LeaseEnded(lease=lease, at=at):
            body: dict[str, Any] = {"lease": _lease_doc(lease), "at": at}
        case LeaseRenewed():
            body = {f.name: getattr(event, f.name) for f in fields(LeaseRenewed)}
        case TaskOpened(task=task, at=at) | TaskClosed(task=task, at=at):
            body = {"task": _task_doc(task), "at": at}
        case ApprovalChanged(approval=approval, change=change, at=at):
            body = {"approval": _approval_doc(approval), "change": change.value, "at": at}
        case _:
            raise TypeError(f"not a lease table event: {type(event).__name__}")
    return type(event).__name__, json.dumps(body, separators=(",", ":"), allow_nan=False)


def decode(kind: str, body: Mapping[str, Any]) -> Event:
    """The event `encode` wrote as `(kind, body)`.

    Raises:
        ValueError: an unknown kind or a document that does not fit it.
    """
    try:
        if kind in ("LeaseGranted", "LeaseEnded"):
            cls = LeaseGranted if kind == "LeaseGranted" else LeaseEnded
            return cls(lease=_lease(body["lease"]), at=float(body["at"]))
        if kind == "LeaseRenewed":
            return LeaseRenewed(**{f.name: body[f.name] for f in fields(LeaseRenewed)})
        if kind in ("TaskOpened", "TaskClosed"):
            cls2 = TaskOpened if kind == "TaskOpened" else TaskClosed
            return cls2(task=_task(body["task"]), at=float(body["at"]))
        if kind == "ApprovalChanged":
            return ApprovalChanged(_approval(body["approval"]), Change(body["change"]), float(body["at"]))
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"event {kind}: {e}") from e
    raise ValueError(f"unknown event kind {kind!r}")
