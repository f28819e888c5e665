"""The audit trail against real stores: SQLite files, a throwaway PostgreSQL, a moto S3 server,
real processes appending at once, and the `drflow audit` CLI."""

from __future__ import annotations

import datetime as dt
import itertools
import json
import multiprocessing as mp
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from pydantic import BaseModel, SecretStr

from drflow.audit import (
    GENESIS,
    REDACTED,
    AuditStore,
    AuditStoreError,
    Redactor,
    audited,
    export_to_file,
    export_to_s3,
    open_store,
    read_export_head,
    verify_export,
)
from drflow.audit.records import VerifyResult, record_hash
from drflow.audit.sqlite_store import SQLiteAuditStore
from lab import procs

DRFLOW = str(Path(sys.executable).parent / "drflow")
PG_BIN = Path("/usr/lib/postgresql/15/bin")
SECRET = "s3cr3t-Value-that-must-never-be-stored"


# -- helpers ------------------------------------------------------------------------------------

def _fill(store: AuditStore, n: int, actor: str = "flow:failover/run-1") -> None:
    for i in range(n):
        store.append(actor, f"step-{i}", f"pg-{i % 3}", {"i": i, "lag_bytes": i * 10},
                     "ok", f"reason {i}", duration_s=0.25 * i)


def _sql(db: Path, *statements: str) -> None:
    conn = sqlite3.connect(db, isolation_level=None)
    try:
        for stmt in statements:
            conn.execute(stmt)
    finally:
        conn.close()


def _triggers(db: Path) -> list[tuple[str, str]]:
    conn = sqlite3.connect(db)
    try:
        return list(conn.execute("SELECT name, sql FROM sqlite_schema WHERE type = 'trigger'"))
    finally:
        conn.close()


def _tamper_sqlite(db: Path, *statements: str, restore_triggers: bool = True) -> None:
    """What someone with write access to the file would do: drop the append-only triggers,
    edit, and put the triggers back so that the schema looks untouched."""
    saved = _triggers(db)
    _sql(db, *[f"DROP TRIGGER {name}" for name, _ in saved], *statements,
         *([sql for _, sql in saved] if restore_triggers else []))


@pytest.fixture()
def db(tmp_path: Path) -> Path:
    return tmp_path / "audit.db"


@pytest.fixture()
def store(db: Path) -> Iterator[AuditStore]:
    s = open_store(f"sqlite:///{db}")
    yield s
    s.close()


# -- the chain ----------------------------------------------------------------------------------

def test_records_chain_from_genesis_and_verify(store: AuditStore) -> None:
    assert store.head() == (0, GENESIS)
    assert store.verify().ok and store.verify().checked == 0
    _fill(store, 25)
    recs = store.records()
    assert [r.seq for r in recs] == list(range(1, 26))
    assert recs[0].prev_hash == GENESIS
    for before, after in itertools.pairwise(recs):
        assert after.prev_hash == before.hash
    for r in recs:
        assert record_hash(r.model_dump()) == r.hash
        assert dt.datetime.fromisoformat(r.time).utcoffset() == dt.timedelta(0)
    assert recs[3].duration_s == 0.75 and recs[3].parameters == {"i": 3, "lag_bytes": 30}
    assert store.head() == (25, recs[-1].hash)
    assert [r.seq for r in store.records(since_seq=20, limit=3)] == [21, 22, 23]
    res = store.verify()
    assert (res.ok, res.checked, res.head_seq, res.head_hash) == (True, 25, 25, recs[-1].hash)


def test_store_refuses_update_and_delete(store: AuditStore, db: Path) -> None:
    _fill(store, 3)
    for stmt in ("UPDATE audit_records SET outcome = 'ok' WHERE seq = 2",
                 "DELETE FROM audit_records WHERE seq = 3", "DELETE FROM audit_head"):
        with pytest.raises(sqlite3.IntegrityError, match=r"append-only|cannot be deleted"):
            _sql(db, stmt)
    assert store.verify().ok


@pytest.mark.parametrize(("column", "value"), [
    ("actor", "'slack:U999'"),
    ("target", "'pg-other'"),
    ("outcome", "'failed'"),
    ("reason", "'nothing to see'"),
    ("time", "'2020-01-01T00:00:00.000000+00:00'"),
    ("duration_s", "duration_s + 0.000001"),
    ("duration_s", "NULL"),
    ("duration_s", "CAST(duration_s AS BLOB)"),  # same digits, other storage type
    ("parameters", "replace(parameters, ',', ', ')"),  # same JSON value, other bytes
    ("parameters", "'{\"i\":4,\"lag_bytes\":0}'"),
    ("hash", "CASE WHEN hash LIKE 'a%' THEN 'b' ELSE 'a' END || substr(hash, 2)"),
    ("prev_hash", "upper(prev_hash)"),
])
def test_altered_field_names_the_record(store: AuditStore, db: Path, column: str,
                                        value: str) -> None:
    _fill(store, 10)
    store.close()
    _tamper_sqlite(db, f"UPDATE audit_records SET {column} = {value} WHERE seq = 5")
    res = store.verify()
    assert not res.ok and res.first_bad_seq == 5, res
    assert res.checked == 4
    assert "record 5" in res.summary()


def test_dropped_triggers_are_reported_too(store: AuditStore, db: Path) -> None:
    _fill(store, 4)
    _tamper_sqlite(db, "UPDATE audit_records SET target = 'x' WHERE seq = 2",
                   restore_triggers=False)
    res = store.verify()
    assert res.first_bad_seq == 2 and "schema altered" in (res.problem or "")


def test_deleting_a_middle_record_is_detected(store: AuditStore, db: Path) -> None:
    _fill(store, 8)
    _tamper_sqlite(db, "DELETE FROM audit_records WHERE seq = 4")
    res = store.verify()
    assert not res.ok and res.first_bad_seq == 4 and "record 4 is missing" in (res.problem or "")


def test_truncated_tail_is_detected_by_the_stored_head_and_by_an_anchor(
        store: AuditStore, db: Path, tmp_path: Path) -> None:
    _fill(store, 10)
    anchor = read_export_head(export_to_file(store, tmp_path / "export.jsonl"))
    assert anchor == store.head()

    # A plain DELETE of the last records: the head kept beside them still says 10.
    _tamper_sqlite(db, "DELETE FROM audit_records WHERE seq > 8")
    res = store.verify()
    assert not res.ok and res.first_bad_seq == 9 and "truncated" in (res.problem or "")

    # Moving that head back too leaves a chain that is valid on its own (no hash can tell the
    # end of a chain was cut), so only a head kept elsewhere catches it.
    h8 = store.records(since_seq=7, limit=1)[0].hash
    _tamper_sqlite(db, f"UPDATE audit_head SET seq = 8, hash = '{h8}'")
    assert store.verify().ok
    res = store.verify(expected_head=anchor)
    assert not res.ok and res.first_bad_seq == 9 and "truncated" in (res.problem or "")


def test_append_after_a_plain_truncation_cannot_hide_it(store: AuditStore, db: Path) -> None:
    _fill(store, 6)
    _tamper_sqlite(db, "DELETE FROM audit_records WHERE seq = 6")
    rec = store.append("gateway", "next", "g1")
    assert rec.seq == 7  # appends link to the stored head, not to the last surviving row
    res = store.verify()
    assert res.first_bad_seq == 6 and "record 6 is missing" in (res.problem or "")


def test_rewritten_chain_is_caught_only_by_an_external_anchor(store: AuditStore,
                                                              db: Path) -> None:
    _fill(store, 6)
    anchor = store.head()
    # Rewrite record 3 and re-hash everything after it, head included: self-consistent.
    rows = [r.to_row() for r in store.records()]
    rows[2]["target"] = "pg-rewritten"
    prev = rows[1]["hash"]
    stmts = []
    for row in rows[2:]:
        row["prev_hash"] = prev
        row["hash"] = record_hash({**row, "parameters": json.loads(row["parameters"])})
        prev = row["hash"]
        stmts.append(f"UPDATE audit_records SET target = '{row['target']}', "
                     f"prev_hash = '{row['prev_hash']}', hash = '{row['hash']}' "
                     f"WHERE seq = {row['seq']}")
    _tamper_sqlite(db, *stmts, f"UPDATE audit_head SET hash = '{prev}'")
    assert store.verify().ok
    res = store.verify(expected_head=anchor)
    assert not res.ok and res.first_bad_seq == 6 and "anchor" in (res.problem or "")


# -- bytes of the SQLite file -------------------------------------------------------------------

def _varint(data: bytes, at: int) -> tuple[int, int]:
    value = 0
    for i in range(9):
        b = data[at + i]
        if i == 8:
            return (value << 8) | b, 9
        value = (value << 7) | (b & 0x7F)
        if b < 0x80:
            return value, i + 1
    raise AssertionError("unreachable")


def _cells(db: Path, table: str) -> list[tuple[int, int, int]]:
    """(start, end, rowid) of every cell of `table`'s b-tree leaves, from the file format."""
    data = db.read_bytes()
    page_size = int.from_bytes(data[16:18], "big") or 65536
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    root = conn.execute("SELECT rootpage FROM sqlite_schema WHERE name = ?", (table,)).fetchone()
    conn.close()
    out: list[tuple[int, int, int]] = []

    def walk(pgno: int) -> None:
        base = (pgno - 1) * page_size
        hdr = base + (100 if pgno == 1 else 0)
        kind, ncells = data[hdr], int.from_bytes(data[hdr + 3:hdr + 5], "big")
        ptr_at = hdr + (12 if kind == 0x05 else 8)
        ptrs = [int.from_bytes(data[ptr_at + 2 * i:ptr_at + 2 * i + 2], "big")
                for i in range(ncells)]
        if kind == 0x05:  # interior table page: left children, then the right-most one
            for p in ptrs:
                walk(int.from_bytes(data[base + p:base + p + 4], "big"))
            walk(int.from_bytes(data[hdr + 8:hdr + 12], "big"))
            return
        assert kind == 0x0D, f"page {pgno} is not a table leaf"
        for p in ptrs:
            size, n1 = _varint(data, base + p)
            rowid, n2 = _varint(data, base + p + n1)
            assert size < page_size - 35, "record spills to overflow pages"
            out.append((base + p, base + p + n1 + n2 + size, rowid))

    walk(root[0])
    return out


def _content(db: Path) -> Any:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return (list(conn.execute("SELECT * FROM audit_records ORDER BY seq")),
                list(conn.execute("SELECT * FROM audit_head")))
    finally:
        conn.close()


def _flip(path: Path, offset: int, mask: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([b ^ mask]))


@pytest.fixture(scope="module")
def flipped_db() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="drflow-audit-flip-"))
    path = d / "audit.db"
    with open_store(f"sqlite:///{path}") as s:
        _fill(s, 18)  # just enough for two leaf pages under an interior page
    # Closing the last connection checkpointed everything into the file itself.
    assert not Path(f"{path}-wal").exists()
    yield path
    shutil.rmtree(d)


def test_every_flipped_record_byte_fails_verification(flipped_db: Path) -> None:
    store = open_store(f"sqlite:///{flipped_db}", create=False)
    original = flipped_db.read_bytes()
    cells = _cells(flipped_db, "audit_records")
    assert sorted(c[2] for c in cells) == list(range(1, 19))
    assert len({c[0] // 4096 for c in cells}) == 2  # the records span two pages
    head_cells = _cells(flipped_db, "audit_head")
    assert store.verify().ok
    exact = total = 0
    for start, end, rowid in cells + head_cells:
        for offset in range(start, end):
            mask = (0x01, 0x80, 0xFF, 0x20)[offset % 4]
            _flip(flipped_db, offset, mask)
            try:
                res = store.verify()  # must not raise, whatever the bytes
            finally:
                _flip(flipped_db, offset, mask)
            where = f"flip {mask:#x} at byte {offset} (record {rowid})"
            assert not res.ok, f"{where} went unnoticed"
            if (start, end, rowid) in cells:
                # A damaged record is always named; nearly always exactly (a flip in its
                # rowid can make it look like a neighbour that is out of place).
                assert res.first_bad_seq is not None, f"{where}: {res.problem}"
                exact += res.first_bad_seq == rowid
                total += 1
    assert flipped_db.read_bytes() == original
    print(f"\n{total} record-byte flips: all detected and named a record, {exact} exactly")
    assert exact >= 0.95 * total


def test_any_flipped_byte_is_detected_or_changes_no_record(flipped_db: Path) -> None:
    """Over the whole file: a flip either fails verify (or the open) or leaves every record and
    the head exactly as they were (unused space in pages, the schema cookie). Never silently
    different content."""
    store = open_store(f"sqlite:///{flipped_db}", create=False)
    original = _content(flipped_db)
    size = flipped_db.stat().st_size
    detected = harmless = 0
    for offset in [*range(100), *range(100, size, 9)]:
        _flip(flipped_db, offset, 0xFF)
        try:
            res = store.verify()
            if res.ok:
                assert _content(flipped_db) == original, f"byte {offset}: content changed"
                assert offset >= 100 or offset in (40, 41, 42, 43, 98, 99), offset
                harmless += 1
            else:
                detected += 1
        finally:
            _flip(flipped_db, offset, 0xFF)
    print(f"\nwhole file, {detected + harmless} flips: {detected} detected, {harmless} "
          "in bytes that hold no record (unused space, schema cookie)")
    assert detected > 0 and store.verify().ok


def test_header_fields_sqlite_ignores_are_checked(store: AuditStore, db: Path) -> None:
    _fill(store, 2)
    res = store.verify()
    assert res.ok and res.notes and "writer has the store open" in res.notes[0]
    store.close()
    assert store.verify().ok and not store.verify().notes
    for offset, what in ((48, "default cache size"), (80, "reserved"), (60, "user_version")):
        _flip(db, offset, 0x01)
        res = store.verify()
        _flip(db, offset, 0x01)
        assert not res.ok and what in (res.problem or ""), res


def test_garbage_file_is_reported_not_raised(tmp_path: Path) -> None:
    path = tmp_path / "audit.db"
    path.write_bytes(b"\x00" * 8192)
    res = open_store(f"sqlite:///{path}", create=False).verify()
    assert not res.ok and "not an SQLite database" in (res.problem or "")
    assert "no audit database" in (open_store(f"sqlite:///{tmp_path}/none.db").verify().problem
                                   or "")
    with pytest.raises(AuditStoreError, match="cannot open the audit database"):
        open_store(f"sqlite:///{path}").append("a", "b", "c")
    other = tmp_path / "prefect.db"
    _sql(other, "CREATE TABLE flow_run (id TEXT)")
    with pytest.raises(AuditStoreError, match="not a drflow audit store"):
        open_store(f"sqlite:///{other}").append("a", "b", "c")


# -- concurrency --------------------------------------------------------------------------------

def _append_worker(url: str, worker: int, per_thread: int, ready: Any) -> None:
    store = open_store(url)
    ready.wait(60)  # every process has imported and opened the store: go, all at once

    def run(t: int) -> None:
        for i in range(per_thread):
            store.append(f"worker:{worker}", "step", f"t{t}", {"i": i})
            time.sleep(0.002)  # a step's work between its audit records

    threads = [threading.Thread(target=run, args=(t,)) for t in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    store.close()


def _run_concurrently(url: str, workers: int, per_thread: int) -> None:
    ctx = mp.get_context("spawn")
    ready = ctx.Barrier(workers)
    ps = [ctx.Process(target=_append_worker, args=(url, w, per_thread, ready))
          for w in range(workers)]
    for p in ps:
        p.start()
    try:
        for p in ps:
            p.join(120)
        assert [p.exitcode for p in ps] == [0] * workers
    finally:
        for p in ps:
            if p.is_alive():
                p.kill()


def _check_one_chain(store: AuditStore, workers: int, per_worker: int) -> None:
    total = workers * per_worker
    res = store.verify()
    assert res.ok and res.checked == total, res
    recs = store.records()
    assert [r.seq for r in recs] == list(range(1, total + 1))
    for w in range(workers):
        assert sum(r.actor == f"worker:{w}" for r in recs) == per_worker
    # Interleaved, not one process after another: the lock was really contended.
    switches = sum(a.actor != b.actor for a, b in itertools.pairwise(recs))
    print(f"\n{total} appends from {workers} processes: {switches} hand-overs of the lock")
    assert switches > 4 * workers, switches


def test_processes_appending_at_once_keep_one_chain(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/new/audit.db"  # created by the racing processes themselves
    _run_concurrently(url, workers=4, per_thread=40)
    with open_store(url, create=False) as store:
        _check_one_chain(store, 4, 80)


def test_threads_appending_at_once_share_commits_and_keep_one_chain(store: AuditStore) -> None:
    # Five runbooks and a gateway in one process: appends that wait for a commit are written
    # together by the next one (one fsync), and each caller gets its own record back.
    store.append("warm", "up", "t", {})  # the connection exists, so the trace sees every commit
    commits: list[str] = []
    store._connection().set_trace_callback(  # type: ignore[attr-defined]
        lambda sql: commits.append(sql) if sql == "COMMIT" else None)
    go = threading.Barrier(8)
    got: dict[int, list[tuple[int, str]]] = {}

    def run(t: int) -> None:
        go.wait()
        got[t] = []
        for i in range(25):
            rec = store.append(f"runbook:{t}", "step", f"t{t}", {"i": i})
            got[t].append((rec.seq, rec.parameters["i"]))

    threads = [threading.Thread(target=run, args=(t,)) for t in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    res = store.verify()
    assert res.ok and res.checked == 201, res
    by_seq = {r.seq: r for r in store.records()}
    for t, mine in got.items():
        assert [i for _, i in mine] == list(range(25))
        assert all(by_seq[seq].actor == f"runbook:{t}" and by_seq[seq].parameters["i"] == i
                   for seq, i in mine)
    print(f"\n200 appends from 8 threads in {len(commits)} commits")
    assert len(commits) < 200


# -- redaction ----------------------------------------------------------------------------------

class _Creds(BaseModel):
    user: str
    password: SecretStr


def test_redaction_by_key_type_shape_and_value() -> None:
    r = Redactor([SECRET])
    out = r.value({
        "db_password": "p1", "apiKey": "k1", "X-Auth-Token": "t1", "credentials": {"u": "x"},
        "Authorization": "Bearer abc.def", "aws_secret_access_key": "s1",
        "nested": {"deeper": [{"token": "t2"}, SecretStr("in-a-list")],
                   "model": _Creds(user="pg", password=SecretStr("p2"))},
        "dsn": "postgresql://drflow:pw-in-url@db:5432/app",
        "header": "Authorization: Bearer eyJhbGciOi.x.y", "slack": "xoxb-123-456-abc",
        "note": f"leaked {SECRET} here", "idempotency_key": "incident-42", "lag_bytes": 12,
        "when": dt.datetime(2026, 1, 2, tzinfo=dt.UTC), "ids": {3, 1},
    })
    for k in ("db_password", "apiKey", "X-Auth-Token", "credentials", "Authorization",
              "aws_secret_access_key"):
        assert out[k] == REDACTED, k
    assert out["nested"]["deeper"] == [{"token": REDACTED}, REDACTED]
    assert out["nested"]["model"] == {"user": "pg", "password": REDACTED}
    assert out["dsn"] == f"postgresql://drflow:{REDACTED}@db:5432/app"
    assert "eyJ" not in out["header"] and "xoxb" not in out["slack"]
    assert out["note"] == f"leaked {REDACTED} here"
    assert out["idempotency_key"] == "incident-42" and out["lag_bytes"] == 12
    assert out["when"] == "2026-01-02T00:00:00+00:00" and out["ids"] == [1, 3]


def _secret_laden_appends(store: AuditStore) -> None:
    store.add_secret_values([SecretStr(SECRET)])
    store.append(f"slack:{SECRET}", "login", f"db://{SECRET}",
                 {"password": SECRET, "opts": [{"x": SecretStr(SECRET)}], "plain": SECRET,
                  "env": {"PGPASSWORD": SECRET}, "creds": _Creds(user="u", password=SECRET)},
                 "ok", f"because {SECRET}")
    with pytest.raises(RuntimeError), audited(store, "flow:x", "connect", "pg", {"k": SECRET}):
        raise RuntimeError(f"auth failed for password {SECRET}")


def test_secret_never_reaches_the_sqlite_bytes(store: AuditStore, db: Path) -> None:
    _secret_laden_appends(store)
    files = [db, Path(f"{db}-wal")]
    # While the store is open the records may sit in the WAL: check both files, then again
    # after close has checkpointed everything into the database file.
    assert REDACTED.encode() in b"".join(p.read_bytes() for p in files if p.exists())
    assert all(SECRET.encode() not in p.read_bytes() for p in files if p.exists())
    store.close()
    assert SECRET.encode() not in db.read_bytes()
    assert store.verify().ok
    failed = store.records()[-1]
    assert failed.outcome == "failed" and failed.parameters["error"] == {
        "type": "RuntimeError", "message": f"auth failed for password {REDACTED}"}


# -- audited steps ------------------------------------------------------------------------------

def test_audited_step_ok_refused_and_failed(store: AuditStore) -> None:
    with audited(store, "flow:failover/r1", "promote", "pg-b", {"timeout": 30},
                 reason="lag 0 B within RPO budget 1 MiB") as step:
        time.sleep(0.05)
        step.result["promoted"] = True
    with audited(store, "flow:failover/r1", "promote", "pg-c", {}) as step:
        step.outcome, step.reason = "refused", "lag 9 MiB exceeds RPO budget 1 MiB"
    with pytest.raises(TimeoutError), audited(store, "flow:failover/r1", "fence", "vm-a", {}):
        raise TimeoutError("vCenter did not answer in 10 s")
    recs = store.records()
    assert [(r.action, r.outcome) for r in recs] == [
        ("promote", "started"), ("promote", "ok"), ("promote", "started"),
        ("promote", "refused"), ("fence", "started"), ("fence", "failed")]
    started, ok = recs[0], recs[1]
    assert started.duration_s is None and ok.duration_s is not None and ok.duration_s >= 0.05
    assert ok.parameters == {"timeout": 30, "started_seq": 1, "result": {"promoted": True}}
    assert ok.reason == started.reason == "lag 0 B within RPO budget 1 MiB"
    assert recs[3].reason == "lag 9 MiB exceeds RPO budget 1 MiB"
    assert recs[5].parameters["error"] == {"type": "TimeoutError",
                                           "message": "vCenter did not answer in 10 s"}
    assert store.verify().ok


# -- export -------------------------------------------------------------------------------------

def test_file_export_verifies_on_its_own_and_shows_edits(store: AuditStore,
                                                         tmp_path: Path) -> None:
    _fill(store, 5)
    path = export_to_file(store, tmp_path / "out" / "audit.jsonl")
    lines = path.read_text().splitlines()
    assert len(lines) == 6 and json.loads(lines[-1])["head"] == {"seq": 5,
                                                                   "hash": store.head()[1]}
    res = verify_export(lines)
    assert res.ok and res.checked == 5
    lines[2] = lines[2].replace('"outcome":"ok"', '"outcome":"failed"')
    res = verify_export(lines)
    assert not res.ok and res.first_bad_seq == 3
    assert not verify_export(path.read_text().splitlines()[:-2]).ok  # cut short


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    d = Path(tempfile.mkdtemp(prefix="drflow-audit-moto-"))
    port = procs.free_port()
    log = d / "moto.log"
    proc = procs.spawn([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1",
                        "-p", str(port)], log)
    try:
        procs.wait_port(port, 30, "moto_server", proc, log)
        yield f"http://127.0.0.1:{port}"
    finally:
        procs.stop_tree(proc.pid)
        shutil.rmtree(d, ignore_errors=True)


def _s3(endpoint: str) -> Any:
    import boto3

    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                        aws_access_key_id="testing", aws_secret_access_key="testing")


@pytest.mark.parametrize("mode", ["GOVERNANCE", "COMPLIANCE"])
def test_s3_export_is_object_locked(store: AuditStore, s3_endpoint: str, mode: str) -> None:
    s3 = _s3(s3_endpoint)
    bucket = f"audit-{uuid.uuid4().hex[:10]}"
    s3.create_bucket(Bucket=bucket, ObjectLockEnabledForBucket=True)
    _fill(store, 7)
    before = dt.datetime.now(dt.UTC)
    key = export_to_s3(store, s3, bucket, "/drflow/prod/", retention_days=30, mode=mode)
    assert key.startswith("drflow/prod/drflow-audit-") and key.endswith("-seq0000000007.jsonl")
    head = s3.head_object(Bucket=bucket, Key=key)
    assert head["ObjectLockMode"] == mode
    until = head["ObjectLockRetainUntilDate"]
    assert abs((until - (before + dt.timedelta(days=30))).total_seconds()) < 120
    assert head["Metadata"]["drflow-head-hash"] == store.head()[1]
    body = s3.get_object(Bucket=bucket, Key=key)["Body"].read().decode()
    res = verify_export(body.splitlines())
    assert res.ok and res.checked == 7 and (res.head_seq, res.head_hash) == store.head()
    with pytest.raises(Exception, match="AccessDenied"):
        s3.delete_object(Bucket=bucket, Key=key, VersionId=head["VersionId"])


def test_s3_export_to_an_unlocked_bucket_says_what_to_do(store: AuditStore,
                                                        s3_endpoint: str) -> None:
    s3 = _s3(s3_endpoint)
    s3.create_bucket(Bucket="plain-audit-bucket")
    store.append("a", "b", "c")
    with pytest.raises(AuditStoreError, match="Object Lock enabled"):
        export_to_s3(store, s3, "plain-audit-bucket", "x", retention_days=1)
    with pytest.raises(ValueError, match="GOVERNANCE, COMPLIANCE"):
        export_to_s3(store, s3, "plain-audit-bucket", "x", retention_days=1, mode="LEGAL")


# -- PostgreSQL ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pg_server() -> Iterator[str]:
    """A throwaway PostgreSQL 15 on a free loopback port (as `postgres` when we are root)."""
    base = Path(tempfile.mkdtemp(prefix="drflow-audit-pg-", dir="/tmp"))
    as_pg: list[str] = []
    if os.geteuid() == 0:
        shutil.chown(base, "postgres", "postgres")
        as_pg = ["runuser", "-u", "postgres", "--"]
    data, port = base / "data", procs.free_port()
    started = False
    try:
        subprocess.run([*as_pg, str(PG_BIN / "initdb"), "-D", str(data), "-A", "trust",
                        "-U", "postgres", "-E", "UTF8", "--no-sync", "--no-instructions"],
                       check=True, capture_output=True, timeout=120)
        subprocess.run([*as_pg, str(PG_BIN / "pg_ctl"), "-D", str(data), "-l",
                        str(base / "pg.log"), "-w", "-t", "60", "-o",
                        f"-p {port} -k {base} -c listen_addresses=127.0.0.1 -c fsync=off",
                        "start"], check=True, capture_output=True, timeout=90)
        started = True
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        if started:
            subprocess.run([*as_pg, str(PG_BIN / "pg_ctl"), "-D", str(data), "-m", "immediate",
                            "stop"], capture_output=True, timeout=60)
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture()
def pg_url(pg_server: str) -> Iterator[str]:
    name = f"audit_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(pg_server, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    yield pg_server.rsplit("/", 1)[0] + f"/{name}"
    with psycopg.connect(pg_server, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE {name} WITH (FORCE)")


def _pg(url: str, *statements: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        for stmt in statements:
            conn.execute(stmt)


def test_postgres_chain_tamper_and_truncation(pg_url: str) -> None:
    with open_store(pg_url) as store:
        _fill(store, 12)
        assert store.verify().ok and store.head()[0] == 12
        assert record_hash(store.records()[4].model_dump()) == store.records()[4].hash
        with pytest.raises(psycopg.errors.RaiseException, match="append-only"):
            _pg(pg_url, "UPDATE audit_records SET actor = 'x' WHERE seq = 3")
        with pytest.raises(psycopg.errors.RaiseException, match="append-only"):
            _pg(pg_url, "TRUNCATE audit_records")

        _pg(pg_url, "ALTER TABLE audit_records DISABLE TRIGGER audit_records_append_only",
            "UPDATE audit_records SET reason = 'edited' WHERE seq = 7")
        res = store.verify()
        assert res.first_bad_seq == 7 and "triggers removed or disabled" in (res.problem or "")
        _pg(pg_url, "UPDATE audit_records SET reason = 'reason 6' WHERE seq = 7",
            "ALTER TABLE audit_records ENABLE TRIGGER audit_records_append_only")
        assert store.verify().ok  # the original bytes back: the hash matches again

        anchor = store.head()
        _pg(pg_url, "ALTER TABLE audit_records DISABLE TRIGGER audit_records_append_only",
            "DELETE FROM audit_records WHERE seq IN (5, 12)",
            "ALTER TABLE audit_records ENABLE TRIGGER audit_records_append_only")
        res = store.verify(expected_head=anchor)
        assert not res.ok and res.first_bad_seq == 5 and "record 5 is missing" in str(res.problem)


def test_postgres_processes_appending_at_once_keep_one_chain(pg_url: str) -> None:
    # The tables do not exist yet: the racing processes create them.
    _run_concurrently(pg_url, workers=3, per_thread=15)
    with open_store(pg_url, create=False) as store:
        _check_one_chain(store, 3, 30)


def test_postgres_never_stores_a_secret(pg_url: str) -> None:
    with open_store(pg_url) as store:
        _secret_laden_appends(store)
        assert store.verify().ok
    with psycopg.connect(pg_url) as conn:
        dump = "".join(str(r) for r in conn.execute(
            "SELECT r::text FROM audit_records r UNION ALL SELECT h::text FROM audit_head h"))
    assert REDACTED in dump and SECRET not in dump


def test_postgres_missing_tables_and_bad_url(pg_url: str) -> None:
    res = open_store(pg_url, create=False).verify()
    assert not res.ok and "no audit tables" in (res.problem or "")
    with pytest.raises(AuditStoreError, match="unsupported audit store URL 'mysql://u:\\*\\*\\*@"):
        open_store("mysql://u:pw@h/db")


# -- the CLI ------------------------------------------------------------------------------------

def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items()
                if k not in ("DRFLOW_AUDIT_URL", "DRFLOW_CONFIG", "AWS_ENDPOINT_URL")}
    return subprocess.run([DRFLOW, "audit", *args], capture_output=True, text=True, timeout=60,
                          env={**full_env, "COLUMNS": "200", **(env or {})})


def test_cli_show_verify_and_file_export(store: AuditStore, db: Path, tmp_path: Path) -> None:
    _fill(store, 6)
    url = f"sqlite:///{db}"
    out = _cli("verify", "--url", url)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"ok, 6 records, head {store.head()[1]}"

    out = _cli("show", "--limit", "2", "--json", env={"DRFLOW_AUDIT_URL": url})
    assert out.returncode == 0, out.stderr
    assert [json.loads(line)["seq"] for line in out.stdout.splitlines()] == [5, 6]
    out = _cli("show", "--url", url)
    assert out.returncode == 0 and "flow:failover/run-1" in out.stdout and "step-5" in out.stdout

    export = tmp_path / "export.jsonl"
    out = _cli("export", "--url", url, "--to", str(export))
    assert out.returncode == 0, out.stderr
    assert _cli("verify-export", str(export)).returncode == 0

    _tamper_sqlite(db, "UPDATE audit_records SET actor = 'slack:U1' WHERE seq = 3")
    out = _cli("verify", "--url", url)
    assert out.returncode == 1 and "record 3" in out.stdout, out.stdout

    out = _cli("verify", "--url", f"sqlite:///{tmp_path}/missing.db")
    assert out.returncode == 1 and "no audit database" in out.stdout


def test_cli_anchor_and_config(store: AuditStore, db: Path, tmp_path: Path) -> None:
    _fill(store, 4)
    export = export_to_file(store, tmp_path / "anchor.jsonl")
    _tamper_sqlite(db, "DELETE FROM audit_records WHERE seq = 4",
                   f"UPDATE audit_head SET seq = 3, hash = '{store.records()[2].hash}'")
    # The config's audit.url is used when --url is absent.
    import yaml

    example = Path(__file__).resolve().parents[1] / "examples" / "drflow.yaml"
    cfg = yaml.safe_load(example.read_text())
    cfg["audit"] = {"url": f"sqlite:///{db}", "retention_days": 3}
    config = tmp_path / "drflow.yaml"
    config.write_text(yaml.safe_dump(cfg))
    assert _cli("verify", "--config", str(config)).returncode == 0
    out = _cli("verify", "--config", str(config), "--anchor", str(export))
    assert out.returncode == 1 and "record 4" in out.stdout and "truncated" in out.stdout
    out = _cli("verify", "--config", str(tmp_path / "nope.yaml"))
    assert out.returncode == 2 and "not found" in out.stderr


def test_cli_export_to_s3(store: AuditStore, db: Path, s3_endpoint: str) -> None:
    s3 = _s3(s3_endpoint)
    s3.create_bucket(Bucket="cli-audit", ObjectLockEnabledForBucket=True)
    _fill(store, 3)
    creds = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
    out = _cli("export", "--url", f"sqlite:///{db}", "--to", "s3://cli-audit/prod",
               "--retention-days", "2", "--mode", "COMPLIANCE",
               env={**creds, "AWS_ENDPOINT_URL": s3_endpoint})
    assert out.returncode == 0, out.stderr
    assert "s3://cli-audit/prod/drflow-audit-" in out.stdout and "COMPLIANCE" in out.stdout
    (obj,) = s3.list_objects_v2(Bucket="cli-audit", Prefix="prod/")["Contents"]
    assert s3.head_object(Bucket="cli-audit", Key=obj["Key"])["ObjectLockMode"] == "COMPLIANCE"
    out = _cli("export", "--url", f"sqlite:///{db}", "--to", "s3://no-such-bucket/x",
               "--endpoint-url", s3_endpoint, env=creds)
    assert out.returncode == 1 and "NoSuchBucket" in out.stderr and "Traceback" not in out.stderr


def test_verifying_in_the_appending_process_loses_no_record_of_another(tmp_path: Path) -> None:
    """The gateway's console verifies the trail in the process whose runbooks append to it,
    while other processes append too. A verification that opened and closed the file dropped
    this process's SQLite locks on it: records were lost."""
    path = tmp_path / "audit.db"
    store = SQLiteAuditStore(path)
    store.append("gateway", "a", "t", {}, "ok", "")
    other = (f"import sys; sys.path.insert(0, {str(Path(__file__).parents[1])!r}); "
             "from drflow.audit.sqlite_store import SQLiteAuditStore as S; "
             f"S({str(path)!r}).append('runner', 'b', 't', {{}}, 'ok', '')")
    for _ in range(3):
        assert store.verify().ok
        store.append("gateway", "a", "t", {}, "ok", "")
        subprocess.run([sys.executable, "-c", other], check=True, timeout=60)
    assert store.head()[0] == 7
    with sqlite3.connect(path) as c:
        assert c.execute("select count(*) from audit_records").fetchone()[0] == 7
    assert store.verify().ok
    store.close()


def test_a_verification_counts_its_records_in_words() -> None:
    assert VerifyResult(ok=True, checked=1, head_hash="h").summary() == "ok, 1 record, head h"
    assert VerifyResult(ok=True, checked=2, head_hash="h").summary() == "ok, 2 records, head h"
    assert VerifyResult(ok=False, checked=1, first_bad_seq=1, problem="hash differs").summary() \
        == "FAILED after checking 1 record: record 1: hash differs"
