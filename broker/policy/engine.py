"""Cedar policy: one decision per (principal, action, resource, context).

The policy file is parsed once into a `cedarpy.PolicySet` and the entities file once into a
`cedarpy.Entities`; both are immutable handles, so a decision reads one snapshot and a reload
swaps the whole snapshot with one attribute assignment. Default deny, forbid wins.

Policy ids: a policy's `@id("...")` annotation, else Cedar's positional id (`policy0`,
`policy1`, ... in file order). Obligations are annotations on the permits that decided:
`@max_ttl("900")` (seconds) and `@approval("required")`; the most restrictive one holds.

Context values are made Cedar-safe: Cedar has no floats and no null, so `None` values are
dropped, floats become their decimal string (`1.5` -> `"1.5"`, to compare with
`decimal(...)` or as text), ints outside i64 become strings, and record keys starting with
`__` are dropped (Cedar JSON reads `__entity` / `__extn` as escapes, which a token claim
must never be able to forge).
"""

from __future__ import annotations

import hashlib
import json
import operator
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import cedarpy
import orjson

from broker.domain.errors import PolicyError

PRINCIPAL_TYPE = "Workload"
ACTION_TYPE = "Action"
RESOURCE_TYPE = "Resource"

_I64_MIN, _I64_MAX = -(2**63), 2**63 - 1
_MAX_DEPTH = 16  # deeper claim structures are dropped: no policy reads them, recursion stays bounded
_MAX_MESSAGE = 300
_TTL_RE = re.compile(r"[0-9]{1,10}")
_ERROR_ID_RE = re.compile(r"`(policy\d+)`")


@dataclass(frozen=True, slots=True)
class EntityRef:
    """A reference to an entity, put in the context by the broker itself (never from input).

    Claims and request context can never produce one: their `__entity` escapes are dropped.
    """

    type: str
    id: str


@dataclass(frozen=True, slots=True)
class Decision:
    """The answer of the policy engine, with the obligations of the permits that decided."""

    allowed: bool
    policies: tuple[str, ...]
    max_ttl: int | None
    approval_required: bool
    errors: tuple[str, ...]
    reason: str


@dataclass(frozen=True, slots=True)
class _Policy:
    name: str
    order: int
    max_ttl: int | None
    approval: bool


_FILE_ORDER = operator.attrgetter("order")


@dataclass(frozen=True, slots=True)
class _Snapshot:
    policy_set: cedarpy.PolicySet
    entities: cedarpy.Entities
    policies: Mapping[str, _Policy]  # keyed by Cedar's own id (policyN)
    version: str


class PolicyEngine:
    """Decides requests against a Cedar policy file and an optional entities file."""

    def __init__(self, policy_path: Path, entities_path: Path | None = None) -> None:
        """Load both files.

        Raises:
            PolicyError: a file is missing or does not parse, or an annotation is invalid.
        """
        self._policy_path = policy_path
        self._entities_path = entities_path
        self._snapshot = _load(policy_path, entities_path)

    @classmethod
    def from_files(cls, policy_path: Path, entities_path: Path | None = None) -> PolicyEngine:
        """Build an engine from a policy file and an optional Cedar JSON entities file.

        Raises:
            PolicyError: a file is missing or does not parse, or an annotation is invalid.
        """
        return cls(policy_path, entities_path)

    @property
    def version(self) -> str:
        """Short sha256 of the policy text and the entities text in force."""
        return self._snapshot.version

    def reload(self) -> str:
        """Re-read both files and swap them in at once; return the new version.

        Raises:
            PolicyError: a file is missing or does not parse; the running policy stays.
        """
        snapshot = _load(self._policy_path, self._entities_path)
        self._snapshot = snapshot  # one assignment: a decision sees the old or the new, never a mix
        return snapshot.version

    def decide(self, principal: str, action: str, resource: str, context: Mapping[str, Any]) -> Decision:
        """Decide one action; never raises for odd context values (they are made Cedar-safe)."""
        snapshot = self._snapshot
        request = _request(principal, action, resource, _context_json(context))
        return _evaluate(snapshot, [action], [request])[0]

    def decide_all(self, principal: str, actions: Sequence[str], resource: str, context: Mapping[str, Any]) -> Decision:
        """Decide several actions: granted only if every one is permitted.

        `policies` is the union of the permits (or, on deny, of the policies that denied);
        obligations combine most restrictively; a deny names the first denied action.
        """
        unique = list(dict.fromkeys(actions))
        if not unique:
            return Decision(False, (), None, False, (), "no actions requested")
        snapshot = self._snapshot
        ctx = _context_json(context)
        requests = [_request(principal, action, resource, ctx) for action in unique]
        decisions = _evaluate(snapshot, unique, requests)
        return _combine(unique, decisions)


def _request(principal: str, action: str, resource: str, context_json: str) -> dict[str, Any]:
    # the dict form of a uid takes any id text (quotes, newlines) without escaping
    return {
        "principal": {"type": PRINCIPAL_TYPE, "id": principal},
        "action": {"type": ACTION_TYPE, "id": action},
        "resource": {"type": RESOURCE_TYPE, "id": resource},
        "context": context_json,
    }


def _evaluate(snapshot: _Snapshot, actions: Sequence[str], requests: list[dict[str, Any]]) -> list[Decision]:
    try:
        results = cedarpy.is_authorized_batch(requests, snapshot.policy_set, snapshot.entities)
    except (ValueError, TypeError) as e:  # fail closed: a request Cedar cannot take is a deny
        error = _short(str(e))
        return [Decision(False, (), None, False, (error,), f"cannot evaluate {a}") for a in actions]
    return [_decision(snapshot, a, r) for a, r in zip(actions, results, strict=True)]


def _decision(snapshot: _Snapshot, action: str, result: cedarpy.AuthzResult) -> Decision:
    diagnostics = result.diagnostics
    policies = snapshot.policies
    deciding = [policies[r] for r in diagnostics.reasons if r in policies]
    if len(deciding) > 1:
        deciding.sort(key=_FILE_ORDER)
    names = tuple(p.name for p in deciding)
    found = diagnostics.errors
    errors = tuple(_rename_ids(snapshot, e) for e in found) if found else ()
    if result.allowed:
        ttls = [p.max_ttl for p in deciding if p.max_ttl is not None]
        return Decision(
            allowed=True,
            policies=names,
            max_ttl=min(ttls) if ttls else None,
            approval_required=any(p.approval for p in deciding),
            errors=errors,
            reason=f"permitted by {', '.join(names)}",
        )
    if names:
        reason = f"forbidden by {', '.join(names)}"
    elif result.decision is cedarpy.Decision.NoDecision:
        reason = f"cannot evaluate {action}"
    else:
        reason = f"no policy permits {action}"
    return Decision(False, names, None, False, errors, reason)


def _combine(actions: Sequence[str], decisions: Sequence[Decision]) -> Decision:
    if len(decisions) == 1 and decisions[0].allowed and len(set(decisions[0].errors)) == len(decisions[0].errors):
        return decisions[0]  # what the general case below yields for one permitted action
    errors = _union(d.errors for d in decisions)
    denied = [(a, d) for a, d in zip(actions, decisions, strict=True) if not d.allowed]
    if denied:
        action, first = denied[0]
        # "no policy permits X" names the action already; a forbid names only the policies
        reason = f"{first.reason} for {action}" if first.policies else first.reason
        return Decision(False, _union(d.policies for _, d in denied), None, False, errors, reason)
    names = _union(d.policies for d in decisions)
    ttls = [d.max_ttl for d in decisions if d.max_ttl is not None]
    return Decision(
        allowed=True,
        policies=names,
        max_ttl=min(ttls) if ttls else None,
        approval_required=any(d.approval_required for d in decisions),
        errors=errors,
        reason=f"permitted by {', '.join(names)}",
    )


def _union(groups: Iterable[tuple[str, ...]]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(item for group in groups for item in group))


def _rename_ids(snapshot: _Snapshot, message: str) -> str:
    def name(match: re.Match[str]) -> str:
        policy = snapshot.policies.get(match.group(1))
        return f"`{policy.name}`" if policy else match.group(0)

    return _ERROR_ID_RE.sub(name, message)


# --- context -----------------------------------------------------------------------------


def _context_json(context: Mapping[str, Any]) -> str:
    record = _record(context, 0)
    try:
        return orjson.dumps(record).decode()  # a tenth of json's cost, on every decision
    except (TypeError, ValueError):  # orjson refuses lone surrogates, which json escapes
        return json.dumps(record)


def _cedar_value(value: Any, depth: int = 0) -> Any:
    """Return `value` as a Cedar-safe JSON value, or None when it must be dropped."""
    kind = type(value)
    if kind is str or kind is bool:  # the common cases first, by exact type (bool before int)
        return value
    if kind is int:
        return value if _I64_MIN <= value <= _I64_MAX else str(value)
    if value is None:
        return None
    if isinstance(value, int):  # an int subclass (bool is final and handled above)
        number = int(value)
        return number if _I64_MIN <= number <= _I64_MAX else str(number)
    if isinstance(value, str):
        return str(value)
    if isinstance(value, float):
        return repr(float(value))
    if isinstance(value, EntityRef):
        return {"__entity": {"type": value.type, "id": value.id}}
    if depth >= _MAX_DEPTH:
        return None
    if isinstance(value, Mapping):
        return _record(value, depth + 1)
    if isinstance(value, list | tuple | set | frozenset):
        items = (_cedar_value(item, depth + 1) for item in value)
        return [item for item in items if item is not None]
    return None  # bytes, objects: nothing a policy could compare against


def _record(mapping: Mapping[Any, Any], depth: int) -> dict[str, Any]:
    record: dict[str, Any] = {}
    for key, value in mapping.items():
        name = key if type(key) is str else str(key)
        if name.startswith("__"):
            continue
        converted = _cedar_value(value, depth)
        if converted is not None:
            record[name] = converted
    return record


# --- loading -----------------------------------------------------------------------------


def _load(policy_path: Path, entities_path: Path | None) -> _Snapshot:
    policy_text = _read(policy_path, "policy")
    entities_text = _read(entities_path, "entities") if entities_path is not None else ""
    try:
        policy_set = cedarpy.PolicySet.from_str(policy_text)
        as_json = json.loads(cedarpy.policies_to_json_str(policy_text))
    except ValueError as e:
        raise PolicyError(f"policy file {policy_path.name} does not parse: {_short(str(e))}") from e
    policies = _policies(as_json)
    if len(policies) != len(policy_set):
        raise PolicyError("policy ids from cedar do not line up")
    try:
        entities = cedarpy.Entities.from_json_str(entities_text or "[]")
    except ValueError as e:
        name = entities_path.name if entities_path else "entities"
        raise PolicyError(f"entities file {name} does not parse: {_short(str(e))}") from e
    digest = hashlib.sha256(policy_text.encode() + b"\0" + entities_text.encode()).hexdigest()
    return _Snapshot(policy_set, entities, MappingProxyType(policies), digest[:16])


def _read(path: Path, what: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError as e:
        raise PolicyError(f"{what} file {path} not found") from e
    except (OSError, UnicodeDecodeError) as e:
        raise PolicyError(f"{what} file {path} cannot be read: {type(e).__name__}") from e


def _policies(as_json: Mapping[str, Any]) -> dict[str, _Policy]:
    if as_json.get("templates"):
        raise PolicyError("policy templates (?principal, ?resource) are not supported: nothing links them")
    policies: dict[str, _Policy] = {}
    seen: dict[str, str] = {}
    # Cedar numbers policies by position (policy0, policy1, ...): sort numerically for file order
    static = sorted(as_json.get("staticPolicies", {}).items(), key=lambda item: _position(item[0]))
    for order, (cedar_id, body) in enumerate(static):
        policy = _policy(cedar_id, order, body.get("effect", ""), body.get("annotations") or {})
        if policy.name in seen:
            raise PolicyError(f"policy id {policy.name!r} is used twice")
        seen[policy.name] = cedar_id
        policies[cedar_id] = policy
    return policies


def _position(cedar_id: str) -> tuple[int, str]:
    digits = cedar_id.removeprefix("policy")
    return (int(digits), "") if digits.isascii() and digits.isdigit() else (_I64_MAX, cedar_id)


def _policy(cedar_id: str, order: int, effect: str, annotations: Mapping[str, str]) -> _Policy:
    name = annotations.get("id") or cedar_id  # a bare @id or @id("") names nothing
    # a bare annotation (`@max_ttl` with no value) comes as null: present, and invalid
    max_ttl = None if "max_ttl" not in annotations else annotations["max_ttl"] or ""
    approval = None if "approval" not in annotations else annotations["approval"] or ""
    if effect != "permit" and (max_ttl is not None or approval is not None):
        raise PolicyError(f"policy {name}: @max_ttl and @approval belong on permit policies")
    if max_ttl is not None and (not _TTL_RE.fullmatch(max_ttl) or int(max_ttl) <= 0):
        raise PolicyError(f"policy {name}: @max_ttl must be a positive number of seconds, got {max_ttl!r}")
    if approval not in (None, "required"):
        raise PolicyError(f'policy {name}: @approval must be "required", got {approval!r}')
    return _Policy(name, order, int(max_ttl) if max_ttl is not None else None, approval == "required")


def _short(message: str) -> str:
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    text = "; ".join(lines[:3])
    return text if len(text) <= _MAX_MESSAGE else text[: _MAX_MESSAGE - 3] + "..."
