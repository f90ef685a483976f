"""Reading one TOML table of `broker.toml`, and the checks of single values in it.

Every error is a `ConfigError` whose `key` is the dotted name of the offending key
(`tokens.default_ttl`, `trust_domains[1].bundle`); `broker.config.settings` builds the sections
from these pieces. Relative paths resolve against the config file's folder.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from broker.domain.errors import ConfigError, InvalidSpiffeId
from broker.domain.identity import SCHEME, SpiffeId

_LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})
_DURATION = re.compile(r"(?:(?P<h>\d+)h)?(?:(?P<m>\d+)m)?(?:(?P<s>\d+)s)?")
_MISSING: Any = object()


def parse_duration(value: str | int | float, key: str) -> float:
    """Seconds in `value`: "90s", "5m", "1h", "1h30m", or a number of seconds.

    Raises:
        ConfigError: not a duration, or not positive.
    """
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise ConfigError(key, 'must be a duration such as "90s", "5m", "1h30m" or a number of seconds')
    if isinstance(value, str):
        match = _DURATION.fullmatch(value)
        if not value or match is None:
            raise ConfigError(key, f'not a duration: {value!r} (use e.g. "90s", "5m", "1h30m")')
        h, m, s = (int(match.group(g) or 0) for g in ("h", "m", "s"))
        seconds = float(h * 3600 + m * 60 + s)
    else:
        seconds = float(value)
    if not math.isfinite(seconds) or seconds <= 0:
        raise ConfigError(key, "must be positive")
    return seconds


class Table:
    """One TOML table being read; knows its dotted key and the folder paths resolve against."""

    def __init__(self, data: Any, key: str, base: Path) -> None:
        if not isinstance(data, dict):
            raise ConfigError(key, "must be a table")
        self.data, self.key, self.base = data, key, base

    def sub(self, name: str) -> str:
        return f"{self.key}.{name}" if self.key else name

    def allow(self, *names: str) -> None:
        unknown = sorted(set(self.data) - set(names))
        if unknown:
            raise ConfigError(self.sub(unknown[0]), "unknown key")

    def raw(self, name: str, default: Any = _MISSING) -> Any:
        if name in self.data:
            return self.data[name]
        if default is _MISSING:
            raise ConfigError(self.sub(name), "is required")
        return default

    def string(self, name: str, default: Any = _MISSING) -> Any:
        """The string at `name`; `default` (may be None) when absent, an error when no default."""
        if name not in self.data:
            return self.raw(name, default)
        value = self.data[name]
        if not isinstance(value, str) or not value:
            raise ConfigError(self.sub(name), "must be a non-empty string")
        return value

    def path(self, name: str, default: Any = _MISSING) -> Any:
        """A path that must name an existing file; relative to the config folder."""
        text = self.string(name, default)
        if text is None:
            return None
        resolved = resolve_path(self.base, text)
        if not resolved.is_file():
            problem = "not a file" if resolved.exists() else "file not found"
            raise ConfigError(self.sub(name), f"{problem}: {resolved}")
        return resolved

    def duration(self, name: str, default: float) -> float:
        return parse_duration(self.raw(name, default), self.sub(name))

    def integer(self, name: str, default: int, low: int, high: int | None = None) -> int:
        value = self.raw(name, default)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(self.sub(name), "must be an integer")
        if value < low or (high is not None and value > high):
            bounds = f"between {low} and {high}" if high is not None else f"at least {low}"
            raise ConfigError(self.sub(name), f"must be {bounds}")
        return value

    def strings(self, name: str) -> tuple[str, ...]:
        value = self.raw(name, [])
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise ConfigError(self.sub(name), "must be a list of non-empty strings")
        return tuple(value)


def resolve_path(base: Path, text: str) -> Path:
    """`text` as a path relative to `base`, normalised (no `..` left in it)."""
    return Path(os.path.normpath(base / text))


def check_listen(value: str | None, key: str) -> str | None:
    """`host:port`; an IPv6 host goes in brackets, as gRPC wants it."""
    if value is None:
        return None
    host, sep, port = value.rpartition(":")
    name = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    bad_host = not name or (name == host and bool(set(host) & set("[]:"))) or any(c.isspace() for c in host)
    if not sep or bad_host or not (port.isascii() and port.isdigit()) or int(port) > 65535:
        raise ConfigError(key, f'must be "host:port" with a port from 0 to 65535, not {value!r}')
    return value


def check_url(value: str, key: str) -> str:
    """https, or plain http only on the loopback interface (tests and local issuers)."""
    try:
        parts = urlsplit(value)
        _ = parts.port  # raises on a port that is not a number
    except ValueError as e:
        raise ConfigError(key, f"not a url: {value!r}") from e
    loopback = parts.scheme == "http" and parts.hostname in _LOOPBACK_HOSTS
    if not (parts.scheme == "https" and parts.hostname) and not loopback:
        raise ConfigError(key, "must be an https:// url (http:// only for 127.0.0.1 or localhost)")
    if parts.username is not None or parts.query or parts.fragment:
        raise ConfigError(key, "must not have user info, a query or a fragment")
    return value


def check_issuer_url(value: str, key: str) -> str:
    """An OAuth/OIDC issuer identifier (RFC 8414 2, OIDC Discovery 3): https, a host, no query or fragment."""
    try:
        parts = urlsplit(value)
        _ = parts.port
    except ValueError as e:
        raise ConfigError(key, f"not a url: {value!r}") from e
    if parts.scheme != "https" or not parts.hostname:
        raise ConfigError(key, f"must be an https:// url, not {value!r}")
    if parts.username is not None or parts.query or parts.fragment:
        raise ConfigError(key, "must not have user info, a query or a fragment")
    return value


def check_spiffe_pattern(value: str, key: str) -> str:
    """A SPIFFE ID, or a glob whose `*` stand for valid characters of one."""
    if not value.startswith(SCHEME):
        raise ConfigError(key, f"must be a spiffe:// id or glob, not {value!r}")
    # Authority is scoped to a trust domain (SPIFFE-ID 4.1.2): a `*` there would also
    # match look-alike domains such as `example.org.evil.test`.
    if "*" in value[len(SCHEME) :].split("/", 1)[0]:
        raise ConfigError(key, f"a glob must name its trust domain literally, not {value!r}")
    try:
        SpiffeId.parse(value.replace("*", "x"))
    except InvalidSpiffeId as e:
        raise ConfigError(key, f"not a spiffe id or glob: {value!r}: {e.reason}") from e
    return value
