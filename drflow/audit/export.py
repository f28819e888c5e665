"""Export the trail as JSON lines (records, then the chain head) to a file or to S3 under
Object Lock, and read such an export back as an external anchor."""

from __future__ import annotations

import datetime as dt
import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

from drflow.audit.records import GENESIS, VerifyResult, canonical_json, verify_rows
from drflow.audit.store import AuditStore, AuditStoreError, utc_now_iso

LOCK_MODES = ("GOVERNANCE", "COMPLIANCE")


def export_lines(store: AuditStore) -> Iterator[str]:
    """One canonical JSON line per record, then `{"head": {"seq", "hash"}, ...}`.

    The head is that of the last record written here, not the store's current head: appends
    made while exporting belong to the next export.
    """
    seq, last = 0, GENESIS
    count = 0
    for rec in store.iter_records():
        yield canonical_json(rec.model_dump()) + "\n"
        seq, last, count = rec.seq, rec.hash, count + 1
    yield canonical_json({"head": {"seq": seq, "hash": last}, "records": count,
                          "exported_at": utc_now_iso(), "store": store.location}) + "\n"


def _write_export(store: AuditStore, out: IO[bytes]) -> tuple[int, str]:
    last = ""
    for line in export_lines(store):
        out.write(line.encode("ascii"))
        last = line
    head = json.loads(last)["head"]  # the last line is always the head
    return int(head["seq"]), str(head["hash"])


def export_to_file(store: AuditStore, path: str | os.PathLike[str]) -> Path:
    """Write the export atomically (temporary file, fsync, rename); returns the path."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            _write_export(store, out)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def export_to_s3(store: AuditStore, s3_client: Any, bucket: str, key_prefix: str,
                 retention_days: int, mode: str = "GOVERNANCE") -> str:
    """Upload the export under `key_prefix`, locked (WORM) for `retention_days`; returns the key.

    The bucket must have Object Lock enabled. GOVERNANCE can be lifted by a principal with
    s3:BypassGovernanceRetention; COMPLIANCE cannot be shortened by anyone, root included.
    """
    mode = mode.upper()
    if mode not in LOCK_MODES:
        raise ValueError(f"Object Lock mode must be one of {', '.join(LOCK_MODES)}, not {mode!r}")
    if retention_days < 1:
        raise ValueError("retention_days must be at least 1")
    now = dt.datetime.now(dt.UTC)
    with tempfile.SpooledTemporaryFile(max_size=32 << 20) as body:
        head_seq, head_hash = _write_export(store, body)
        body.seek(0)
        name = f"drflow-audit-{now:%Y%m%dT%H%M%S%fZ}-seq{head_seq:010d}.jsonl"
        key = f"{key_prefix.strip('/')}/{name}" if key_prefix.strip("/") else name
        try:
            s3_client.put_object(
                Bucket=bucket, Key=key, Body=body, ContentType="application/x-ndjson",
                ChecksumAlgorithm="SHA256",
                Metadata={"drflow-head-seq": str(head_seq), "drflow-head-hash": head_hash},
                ObjectLockMode=mode,
                ObjectLockRetainUntilDate=now + dt.timedelta(days=retention_days))
        except Exception as exc:
            # moto says "ObjectLockConfiguration", AWS "Object Lock configuration".
            if "objectlock" in str(exc).lower().replace(" ", ""):
                raise AuditStoreError(
                    f"cannot export to s3://{bucket}/{key}: {exc}. The bucket must be created "
                    "with Object Lock enabled (create-bucket --object-lock-enabled-for-bucket)"
                ) from exc
            raise
    return key


def read_export(lines: Iterable[str]) -> tuple[list[dict[str, Any]], tuple[int, str] | None]:
    """Records and the head line of an export (head None when the export is cut short)."""
    rows: list[dict[str, Any]] = []
    head: tuple[int, str] | None = None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError as exc:
            raise AuditStoreError(f"line {n} of the export is not JSON: {exc}") from exc
        if "head" in obj and "seq" not in obj:
            head = (int(obj["head"]["seq"]), str(obj["head"]["hash"]))
        else:
            rows.append(obj)
    return rows, head


def read_export_head(path: str | os.PathLike[str]) -> tuple[int, str]:
    """The chain head recorded in an export file: an anchor for `verify(expected_head=...)`."""
    with open(path, encoding="ascii") as f:
        _, head = read_export(f)
    if head is None:
        raise AuditStoreError(f"{path} has no head line: not a complete drflow audit export")
    return head


def verify_export(lines: Iterable[str]) -> VerifyResult:
    """Verify an export on its own: every hash and link, ending exactly at its head line."""
    rows, head = read_export(lines)
    if head is None:
        return VerifyResult(False, 0, None, "the export has no head line (cut short?)")
    stored = []
    for r in rows:
        row = dict(r)
        # Stores keep parameters as canonical text; an export line holds them as an object.
        if isinstance(row.get("parameters"), dict):
            row["parameters"] = canonical_json(row["parameters"])
        stored.append(row)
    return verify_rows(stored, expected_head=head, stored_head=head)
