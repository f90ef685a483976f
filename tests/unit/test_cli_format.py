"""brokerctl's pure formatting: durations, time left, tables, blocks and JSON."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from broker._proto import broker_pb2 as pb
from broker.cli import format as fmt

NOW = 1_700_000_000.0


def ts(seconds: float) -> Timestamp:
    out = Timestamp()
    out.FromNanoseconds(int(seconds * 1e9))
    return out


@dataclass(frozen=True, slots=True)
class DurationCase:
    id: str
    seconds: float
    text: str


DURATIONS = [
    DurationCase("zero", 0, "0s"),
    DurationCase("seconds", 42.9, "42s"),
    DurationCase("minutes", 252, "4m12s"),
    DurationCase("minute-padding", 61, "1m01s"),
    DurationCase("hours", 3723, "1h02m03s"),
    DurationCase("negative-is-zero", -5, "0s"),
]


@pytest.mark.parametrize("case", DURATIONS, ids=lambda c: c.id)
def test_duration_is_compact(case: DurationCase) -> None:
    assert fmt.duration(case.seconds) == case.text


def test_time_left_counts_from_now_and_is_a_dash_once_ended() -> None:
    assert fmt.time_left(ts(NOW + 252.5), ended=False, now=NOW) == "4m12s"
    assert fmt.time_left(ts(NOW + 252), ended=True, now=NOW) == "-"


def test_iso_is_utc_to_the_second() -> None:
    assert fmt.iso(ts(0.75)) == "1970-01-01T00:00:00Z"


def test_table_aligns_columns_and_fills_empty_cells() -> None:
    text = fmt.table(("A", "LONGER"), [("xxxx", "1"), ("y", "")])
    assert text.splitlines() == ["A     LONGER", "xxxx  1", "y     -"]


def test_lease_table_has_one_row_per_lease() -> None:
    active = pb.Lease(id="l1", subject="s", task_id="t", audience="a", scope=["r", "w"], state="ACTIVE",
                      expires_at=ts(NOW + 90))
    revoked = pb.Lease(id="l2", subject="s", task_id="t", audience="a", scope=["r"], state="REVOKED",
                       expires_at=ts(NOW + 90))
    lines = fmt.lease_table([active, revoked], now=NOW).splitlines()
    assert lines[0].split() == list(fmt.LEASE_HEADERS)
    assert lines[1].split() == ["l1", "s", "t", "a", "r,w", "ACTIVE", "1m30s"]
    assert lines[2].split() == ["l2", "s", "t", "a", "r", "REVOKED", "-"]


def test_lease_table_says_so_when_empty() -> None:
    assert fmt.lease_table([], now=NOW) == "no leases"


def test_lease_block_names_every_field_once() -> None:
    lease = pb.Lease(id="l1", task_id="t", subject="s", state="REVOKED", reason="OPERATOR",
                     issued_at=ts(NOW), expires_at=ts(NOW + 60), revoked_at=ts(NOW + 30), children=["c1", "c2"])
    lines = fmt.lease_block(lease, now=NOW).splitlines()
    fields = dict(line.split(":", 1) for line in lines)
    assert len(fields) == len(lines)
    assert fields["id"].strip() == "l1" and fields["reason"].strip() == "OPERATOR"
    assert fields["left"].strip() == "-" and fields["children"].strip() == "c1,c2"
    assert fields["ended"].strip() == fmt.iso(ts(NOW + 30)) and fields["parent"].strip() == "-"


def test_revoked_line_counts_in_english() -> None:
    assert [fmt.revoked_line(n) for n in (0, 1, 2)] == ["revoked 0 leases", "revoked 1 lease", "revoked 2 leases"]


def test_json_keeps_proto_names_and_default_values() -> None:
    data = json.loads(fmt.to_json(pb.RevokeResponse(revoked_count=0)))
    assert list(data) == ["revoked_count"] and int(data["revoked_count"]) == 0
    lease = json.loads(fmt.to_json(pb.Lease(id="l1", task_id="t")))
    assert lease["task_id"] == "t" and lease["reason"] == "" and "revoked_at" not in lease


def test_lease_block_shows_backend_role_and_a_pending_revocation() -> None:
    lease = pb.Lease(
        id="lse_1", state="REVOKED", issued_at=ts(NOW - 60), expires_at=ts(NOW + 60), revoked_at=ts(NOW - 5),
        backend="analytics", role="brk_0a",
        revocation=pb.BackendRevocation(state="PENDING", attempts=3, last_error="connection refused",
                                        next_attempt_at=ts(NOW + 4)),
    )
    lines = fmt.lease_block(lease, now=NOW).splitlines()
    assert "backend:     analytics" in lines and "role:        brk_0a" in lines
    assert "revocation:  PENDING (3 failed attempts, next in 4s): connection refused" in lines


def test_lease_block_of_a_lease_without_a_secret_shows_dashes() -> None:
    lease = pb.Lease(id="lse_2", state="ACTIVE", issued_at=ts(NOW), expires_at=ts(NOW + 60))
    block = fmt.lease_block(lease, now=NOW)
    assert "backend:     -" in block and "revocation:  -" in block
