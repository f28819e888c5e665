"""The audit record, its canonical form and hash, and verification of a chain of them."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict

# The first record links to this fixed value (there is nothing before it).
GENESIS = "0" * 64

# The stored columns, in order; `parameters` is stored as canonical JSON text.
FIELDS = ("seq", "time", "actor", "action", "target", "parameters", "outcome", "duration_s",
          "reason", "prev_hash", "hash")

_HEX64 = re.compile(r"[0-9a-f]{64}")


def canonical_json(value: Any) -> str:
    """One fixed text for a JSON value: sorted keys, no spaces, ASCII only, no NaN."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                      allow_nan=False)


def record_hash(fields: Mapping[str, Any]) -> str:
    """SHA-256 (hex) of the canonical JSON of every field except `hash`, `prev_hash` included."""
    body = {k: fields[k] for k in FIELDS if k != "hash"}
    return hashlib.sha256(canonical_json(body).encode("ascii")).hexdigest()


class AuditRecord(BaseModel):
    """One append-only entry: who did what to what, with which parameters, how it went and why."""

    model_config = ConfigDict(frozen=True)

    seq: int
    time: str
    actor: str
    action: str
    target: str
    parameters: dict[str, Any]
    outcome: str
    duration_s: float | None = None
    reason: str = ""
    prev_hash: str
    hash: str

    def to_row(self) -> dict[str, Any]:
        """The stored form: parameters as canonical JSON text."""
        row = self.model_dump()
        row["parameters"] = canonical_json(self.parameters)
        return row

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> AuditRecord:
        data = dict(row)
        data["parameters"] = json.loads(data["parameters"])
        return cls.model_validate(data)


@dataclass(frozen=True)
class VerifyResult:
    """Outcome of a verification; `first_bad_seq` names the first record found wrong, if any."""

    ok: bool
    checked: int
    first_bad_seq: int | None = None
    problem: str | None = None
    head_seq: int = 0
    head_hash: str = GENESIS
    notes: tuple[str, ...] = ()  # checks that could not run, and why

    def summary(self) -> str:
        if self.ok:
            return f"ok, {count_records(self.checked)}, head {self.head_hash}"
        where = f"record {self.first_bad_seq}: " if self.first_bad_seq is not None else ""
        return f"FAILED after checking {count_records(self.checked)}: {where}{self.problem}"


def count_records(n: int) -> str:
    """"1 record", "2 records"."""
    return f"{n} record" if n == 1 else f"{n} records"


_TYPES: dict[str, tuple[type, ...]] = {
    "seq": (int,), "time": (str,), "actor": (str,), "action": (str,), "target": (str,),
    "parameters": (str,), "outcome": (str,), "duration_s": (float, type(None)),
    "reason": (str,), "prev_hash": (str,), "hash": (str,),
}


def _row_problem(row: Mapping[str, Any]) -> str | None:
    """What is wrong with one stored row on its own (types, encodings, hash), or None."""
    for name, types in _TYPES.items():
        v = row.get(name)
        if not isinstance(v, types) or isinstance(v, bool):
            return f"field {name!r} has type {type(v).__name__}, expected " + \
                "/".join(t.__name__ for t in types)
    if not _HEX64.fullmatch(row["hash"]) or not _HEX64.fullmatch(row["prev_hash"]):
        return "hash or prev_hash is not 64 lowercase hex digits"
    try:
        params = json.loads(row["parameters"])
    except ValueError:
        return "parameters are not valid JSON"
    # Re-serialising must give the stored bytes back: whitespace or key order edits count too.
    if not isinstance(params, dict) or canonical_json(params) != row["parameters"]:
        return "parameters are not in canonical form (edited outside drflow)"
    fields = dict(row)
    fields["parameters"] = params
    if record_hash(fields) != row["hash"]:
        return "content does not match its hash (a field was altered)"
    return None


def verify_rows(rows: Iterable[Mapping[str, Any]],
                expected_head: tuple[int, str] | None = None,
                stored_head: tuple[int, str] | None = None) -> VerifyResult:
    """Check a whole chain, streaming, from seq 1: each hash, each link, seq continuity.

    `expected_head` is an anchor kept outside the store (an export's last line, a head written
    down earlier): the chain must still contain that record with that hash, which is what
    detects a truncated tail. `stored_head` is the head the store recorded alongside its last
    append; it catches a plain DELETE of the last rows but not someone who also rewrites it.
    """
    checked = 0
    prev_seq, prev_hash = 0, GENESIS
    anchor_seen = expected_head is None
    for row in rows:
        seq = row.get("seq")
        if not isinstance(seq, int) or isinstance(seq, bool):
            return VerifyResult(False, checked, prev_seq + 1,
                                f"seq is {seq!r}, expected {prev_seq + 1}", prev_seq, prev_hash)
        if seq != prev_seq + 1:
            missing = (f"record {prev_seq + 1} is missing" if seq > prev_seq + 1
                       else f"seq {seq} repeats or goes backwards")
            return VerifyResult(False, checked, prev_seq + 1,
                                f"{missing} (found seq {seq} after {prev_seq})",
                                prev_seq, prev_hash)
        problem = _row_problem(row)
        if problem is None and row["prev_hash"] != prev_hash:
            problem = (f"prev_hash {row['prev_hash'][:16]}… does not link to record "
                       f"{prev_seq} ({prev_hash[:16]}…)")
        if problem is not None:
            return VerifyResult(False, checked, seq, problem, prev_seq, prev_hash)
        checked += 1
        prev_seq, prev_hash = seq, row["hash"]
        if expected_head is not None and seq == expected_head[0]:
            if prev_hash != expected_head[1]:
                return VerifyResult(False, checked, seq,
                                    f"hash differs from the external anchor "
                                    f"({expected_head[1][:16]}…): the chain was rewritten",
                                    prev_seq, prev_hash)
            anchor_seen = True
    if not anchor_seen and expected_head is not None:
        return VerifyResult(False, checked, prev_seq + 1,
                            f"chain ends at record {prev_seq} but the external anchor names "
                            f"record {expected_head[0]}: records {prev_seq + 1}.."
                            f"{expected_head[0]} were removed (truncated)", prev_seq, prev_hash)
    if stored_head is not None and stored_head != (prev_seq, prev_hash):
        s_seq, s_hash = stored_head
        if not isinstance(s_seq, int) or not isinstance(s_hash, str):
            return VerifyResult(False, checked, None,
                                f"the store's head is damaged ({s_seq!r}, {s_hash!r})",
                                prev_seq, prev_hash)
        if s_seq > prev_seq:
            problem = (f"chain ends at record {prev_seq} but the store's head says {s_seq}: "
                       f"records {prev_seq + 1}..{s_seq} were removed (truncated)")
            bad: int | None = prev_seq + 1
        elif s_seq < prev_seq:
            problem = (f"the store's head says {s_seq} but records go on to {prev_seq}: "
                       f"records {s_seq + 1}..{prev_seq} were not appended through drflow")
            bad = s_seq + 1
        else:
            problem = (f"the store's head hash ({s_hash[:16]}…) does not match the last "
                       f"record's ({prev_hash[:16]}…)")
            bad = prev_seq
        return VerifyResult(False, checked, bad, problem, prev_seq, prev_hash)
    return VerifyResult(True, checked, None, None, prev_seq, prev_hash)


def with_problems(result: VerifyResult, problems: Sequence[str]) -> VerifyResult:
    """The chain's result with the store's own problems (file, schema, triggers) added to it."""
    if not problems:
        return result
    joined = "; ".join(problems)
    if not result.ok:
        return dataclasses.replace(result, problem=f"{result.problem}; also: {joined}")
    return VerifyResult(False, result.checked, None, joined, result.head_seq, result.head_hash,
                        result.notes)
