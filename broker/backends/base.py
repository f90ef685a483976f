"""What a dynamic-secret backend is: the interface, the secret it hands out, and its health."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Protocol

from broker.leases.table import LeaseTable


@dataclass(frozen=True, slots=True)
class Secret:
    """The lease's downstream half: what the agent needs to log in, until `expires_at`.

    `fields` may hold the password, so it is kept out of `repr` (a log of this object, or a
    traceback that shows it, never carries the password).
    """

    backend: str
    fields: Mapping[str, str] = field(repr=False)
    expires_at: float


@dataclass(frozen=True, slots=True)
class BackendStatus:
    """Whether the last contact with the backend worked; `error` is a short reason when not."""

    up: bool
    error: str = ""


class Backend(Protocol):
    """One downstream system the broker issues real credentials for.

    Every method that talks to the system raises `BackendUnavailable` (with a short reason that
    names the backend and never holds a password) when it cannot; `revoke` is idempotent: a
    role that is already gone (dropped by another replica) counts as revoked, and it says so.
    """

    name: str
    audience: str
    status: BackendStatus

    def groups_for(self, actions: tuple[str, ...]) -> tuple[str, ...]:
        """The group roles the actions grant. Raises: PermissionDenied naming an action without grants."""
        ...

    def new_role(self) -> str:
        """A fresh, unguessable role name under the backend's prefix."""
        ...

    def view(self, role: str, expires_at: float) -> Secret:
        """The secret for `role` without its password (what Renew returns)."""
        ...

    async def open(self) -> None:
        """Prepare connections; never raises for an unreachable system (the status says it)."""
        ...

    async def close(self) -> None: ...

    async def provision(self, role: str, groups: tuple[str, ...], expires_at: float, *, created_at: float) -> Secret:
        """Create the login `role` in `groups`, valid until `expires_at`, all or nothing; the
        role carries `created_at` (the broker's clock) for reconciliation to read back."""
        ...

    async def renew(self, role: str, expires_at: float) -> None:
        """Move the role's own expiry to `expires_at`."""
        ...

    async def revoke(self, role: str) -> bool:
        """Disable the role, end its sessions, drop it (and what it owns); False when it was already gone."""
        ...

    async def roles(self) -> dict[str, float]:
        """Every role this backend created that still exists, with its `created_at` (0 when it
        carries none: made by an older broker)."""
        ...


class Leases(Protocol):
    """What the backends read of the lease store (`broker.store`'s stores are such).

    `durable` is true when leases outlive this process (a shared store): then a stopping broker
    leaves the roles of live leases alone, and another replica may be making a role right now.
    `sync` is the store's read barrier: afterwards `table` holds every lease any replica had
    committed when it was called.
    """

    table: LeaseTable
    durable: bool

    async def sync(self) -> None: ...


def frozen(fields: Mapping[str, str]) -> Mapping[str, str]:
    return MappingProxyType(dict(fields))
