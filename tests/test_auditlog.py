"""The verdict log: written before append returns, hash chain, rotation, tamper detection."""

from __future__ import annotations

import errno
import hashlib
import os
import re
import stat
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ebpf_guard import auditlog
from ebpf_guard.auditlog import (
    GENESIS,
    AuditLogError,
    VerdictLog,
    event_record,
    head_path,
    log_files,
    record_for,
    verify_log,
)
from ebpf_guard.events import Event, Kind
from ebpf_guard.verdicts import Decision, Mode, Scope, Verdict


def _event(**kw) -> Event:
    base = dict(
        kind=Kind.EXEC,
        ts_ns=1_000,
        pid=42,
        tgid=42,
        ppid=1,
        uid=1000,
        comm="agent",
        cgroup_id=7,
        start_ns=500,
        raw_path="rm",
        path="/usr/bin/rm",
        argv=("rm", "-rf", "/"),
    )
    base.update(kw)
    return Event(**base)


def _decision(**kw) -> Decision:
    return Decision(Verdict.KILL, "no-rm-rf", "rm -rf / is never ok", _event(**kw))


def _fill(path: Path, n: int, **kw) -> list[dict]:
    with VerdictLog(path, **kw) as vl:
        return [vl.append({"type": "test", "n": i}) for i in range(n)]


# -- file layout: [(file, [line bytes])] in chronological order --------------------------------


def _read_set(path: Path) -> list[tuple[Path, list[bytes]]]:
    return [(f, f.read_bytes().splitlines(keepends=True)) for f in log_files(path)]


def _write_set(files: list[tuple[Path, list[bytes]]]) -> None:
    for f, lines in files:
        f.write_bytes(b"".join(lines))


def _locate(files: list[tuple[Path, list[bytes]]], seq: int) -> tuple[int, int]:
    """(file index, line index) of record `seq` (records are 1-based and contiguous)."""
    k = seq - 1
    for fi, (_, lines) in enumerate(files):
        if k < len(lines):
            return fi, k
        k -= len(lines)
    raise IndexError(seq)


def _rehash(line: bytes) -> bytes:
    body = re.sub(rb',"hash":"[0-9a-f]{64}"}\n$', b"}", line)
    h = hashlib.sha256(body).hexdigest().encode()
    return body[:-1] + b',"hash":"' + h + b'"}\n'


# -- appending --------------------------------------------------------------------------------


def test_append_returns_written_record_and_is_on_disk_before_return(tmp_path: Path) -> None:
    path = tmp_path / "log" / "verdicts.jsonl"
    with VerdictLog(path) as vl:
        rec = vl.append({"type": "session", "event": "start"})
        # Same thread, right after return: the line is already in the file (no buffering).
        lines = path.read_bytes().splitlines()
        assert len(lines) == 1
        on_disk = orjson.loads(lines[0])
        assert on_disk == rec
        assert rec["seq"] == 1 and rec["prev"] == GENESIS
        assert (
            rec["hash"]
            == hashlib.sha256(lines[0][: lines[0].rindex(b',"hash"')] + b"}").hexdigest()
        )
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", rec["ts"])
        rec2 = vl.append({"type": "session", "event": "end"})
        assert rec2["seq"] == 2 and rec2["prev"] == rec["hash"]
        head = orjson.loads(head_path(path).read_bytes())
        assert head == {"seq": 2, "hash": rec2["hash"]}
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(head_path(path).stat().st_mode) == 0o600
    assert len(head_path(path).read_bytes()) == auditlog.HEAD_SIZE


def test_reopen_continues_seq_and_chain(tmp_path: Path) -> None:
    path = tmp_path / "verdicts.jsonl"
    first = _fill(path, 3)
    with VerdictLog(path) as vl:
        assert vl.seq == 3
        rec = vl.append({"type": "test"})
    assert rec["seq"] == 4 and rec["prev"] == first[-1]["hash"]
    assert verify_log(path) == auditlog.VerifyResult(True, 4)


def test_reserved_keys_are_replaced(tmp_path: Path) -> None:
    with VerdictLog(tmp_path / "v.jsonl") as vl:
        rec = vl.append({"type": "t", "seq": 99, "prev": "x", "hash": "y"})
    assert rec["seq"] == 1 and rec["prev"] == GENESIS and rec["hash"] != "y"
    assert verify_log(tmp_path / "v.jsonl").ok


def test_second_writer_refused(tmp_path: Path) -> None:
    with VerdictLog(tmp_path / "v.jsonl"):
        with pytest.raises(AuditLogError, match="in use"):
            VerdictLog(tmp_path / "v.jsonl")


def test_threads_keep_one_chain(tmp_path: Path) -> None:
    path = tmp_path / "v.jsonl"
    with VerdictLog(path, max_bytes=4096) as vl:

        def work(t: int) -> None:
            for i in range(50):
                vl.append({"type": "test", "t": t, "i": i})

        threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    res = verify_log(path)
    assert res.ok and res.records == 400, res


def test_rotation_keeps_chain(tmp_path: Path) -> None:
    path = tmp_path / "verdicts.jsonl"
    recs = _fill(path, 30, max_bytes=1000)
    files = log_files(path)
    assert [f.name for f in files[:3]] == [
        "verdicts.jsonl.1",
        "verdicts.jsonl.2",
        "verdicts.jsonl.3",
    ]
    assert files[-1] == path and len(files) > 3
    assert all(f.stat().st_size <= 1000 for f in files)
    # The first record of each file links to the last record of the previous file.
    for older, newer in zip(files, files[1:], strict=False):
        last = orjson.loads(older.read_bytes().splitlines()[-1])
        first = orjson.loads(newer.read_bytes().splitlines()[0])
        assert first["prev"] == last["hash"] and first["seq"] == last["seq"] + 1
    assert verify_log(path) == auditlog.VerifyResult(True, 30)
    # Reopening continues after rotation too.
    more = _fill(path, 5, max_bytes=1000)
    assert more[0]["seq"] == 31 and more[0]["prev"] == recs[-1]["hash"]
    assert verify_log(path).records == 35


def test_reopen_after_rotation_with_empty_current_file(tmp_path: Path) -> None:
    # A crash right after the rename leaves no current file; the tail is in the newest .N.
    path = tmp_path / "v.jsonl"
    recs = _fill(path, 10, max_bytes=800)
    path.rename(path.with_name("v.jsonl.99"))
    with VerdictLog(path) as vl:
        assert vl.append({"type": "t"})["prev"] == recs[-1]["hash"]
    assert verify_log(path).ok


# -- records ----------------------------------------------------------------------------------


def test_record_for_exec() -> None:
    rec = record_for(
        _decision(),
        mode=Mode.ENFORCE,
        action="killed",
        incident="/var/lib/x/inc-1",
        extra={"window_flags": 3},
    )
    assert rec["type"] == "verdict" and rec["verdict"] == "KILL" and rec["mode"] == "enforce"
    assert rec["rule"] == "no-rm-rf" and rec["action"] == "killed" and rec["scope"] == "process"
    assert rec["incident"] == "/var/lib/x/inc-1" and rec["window_flags"] == 3
    assert rec["enforced_in_kernel"] is False
    assert rec["event"] == {
        "kind": "exec",
        "ts_ns": 1000,
        "pid": 42,
        "tgid": 42,
        "ppid": 1,
        "uid": 1000,
        "comm": "agent",
        "cgroup": 7,
        "start_ns": 500,
        "path": "/usr/bin/rm",
        "raw_path": "rm",
        "argv": ["rm", "-rf", "/"],
    }
    orjson.dumps(rec)  # plain JSON data
    with pytest.raises(ValueError, match="collides"):
        record_for(_decision(), mode="audit", action="none", extra={"verdict": "SAFE"})


@pytest.mark.parametrize(
    ("fields", "expect"),
    [
        (
            dict(family="ipv4", addr="10.0.0.1", port=443),
            {"family": "ipv4", "dest": "10.0.0.1:443"},
        ),
        (dict(family="ipv6", addr="::1", port=22), {"family": "ipv6", "dest": "[::1]:22"}),
        (
            dict(family="unix", addr="/run/docker.sock"),
            {"family": "unix", "dest": "/run/docker.sock"},
        ),
    ],
)
def test_event_record_connect(fields: dict, expect: dict) -> None:
    d = event_record(_event(kind=Kind.CONNECT, raw_path="", path="", argv=(), **fields))
    assert {k: d[k] for k in expect} == expect
    assert "argv" not in d and "path" not in d


def test_event_record_open() -> None:
    d = event_record(
        _event(
            kind=Kind.OPEN,
            access=frozenset({"write", "create"}),
            flags=0o101,
            path="/etc/passwd",
            raw_path="../etc/passwd",
            argv=(),
        )
    )
    assert d["access"] == ["create", "write"] and d["path"] == "/etc/passwd" and d["flags"] == 0o101


def test_verdict_record_roundtrip_through_log(tmp_path: Path) -> None:
    d = Decision(Verdict.HALT, "r", "why", _event(), Scope.CGROUP, enforced_in_kernel=True)
    with VerdictLog(tmp_path / "v.jsonl") as vl:
        rec = vl.append(record_for(d, mode="confirm", action="frozen"))
    assert orjson.loads((tmp_path / "v.jsonl").read_bytes()) == rec
    assert rec["scope"] == "cgroup" and rec["enforced_in_kernel"] is True


def test_non_json_data_refused_not_serialized_around_redaction(tmp_path: Path) -> None:
    @dataclass
    class Secretive:
        token: str

    with VerdictLog(tmp_path / "v.jsonl") as vl:
        for bad in ({1, 2}, Secretive("ghp_" + "a" * 36), object()):
            with pytest.raises(AuditLogError, match="not plain JSON"):
                vl.append({"type": "t", "x": bad})
        assert vl.seq == 0
        vl.append({"type": "t"})
    assert verify_log(tmp_path / "v.jsonl").records == 1


def test_undecodable_path_is_logged_not_fatal(tmp_path: Path) -> None:
    weird = b"/tmp/\xff\xfe-name".decode("utf-8", "surrogateescape")
    with VerdictLog(tmp_path / "v.jsonl") as vl:
        rec = vl.append(record_for(_decision(path=weird), mode="audit", action="none"))
    assert rec["event"]["path"] == "/tmp/\\xff\\xfe-name"
    assert verify_log(tmp_path / "v.jsonl").ok


# -- failures ---------------------------------------------------------------------------------


def test_parent_is_a_regular_file(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(AuditLogError, match="cannot open audit log"):
        VerdictLog(tmp_path / "file" / "verdicts.jsonl")


def test_path_is_a_directory(tmp_path: Path) -> None:
    (tmp_path / "verdicts.jsonl").mkdir()
    with pytest.raises(AuditLogError, match="cannot open audit log"):
        VerdictLog(tmp_path / "verdicts.jsonl")


def test_disk_full_raises_and_leaves_log_consistent(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "v.jsonl"
    with VerdictLog(path) as vl:
        vl.append({"type": "t"})
        real_write = os.write

        def full(fd: int, data: bytes) -> int:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        monkeypatch.setattr(auditlog.os, "write", full)
        with pytest.raises(AuditLogError, match="No space left"):
            vl.append({"type": "t"})

        calls = []

        def short(fd: int, data: bytes) -> int:
            calls.append(len(data))
            if len(calls) == 1:
                return real_write(fd, data[:10])  # a partial line hits the disk...
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # ...and the disk is full

        monkeypatch.setattr(auditlog.os, "write", short)
        with pytest.raises(AuditLogError, match="No space left"):  # the reason, not "short write"
            vl.append({"type": "t"})
        assert len(calls) == 2

        monkeypatch.setattr(auditlog.os, "write", lambda fd, data: 0)
        with pytest.raises(AuditLogError, match="short write"):
            vl.append({"type": "t"})
        monkeypatch.setattr(auditlog.os, "write", real_write)
        rec = vl.append({"type": "t"})
        assert rec["seq"] == 2  # the partial line was cut off again
        assert rec["unwritten_before"] == 3 and vl.unwritten_total == 3  # the loss is told
    res = verify_log(path)
    assert res.ok and res.records == 2 and res.unwritten == 3


def test_dev_full(tmp_path: Path) -> None:
    # A real ENOSPC from the kernel: swap the open log fd for /dev/full.
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full")
    vl = VerdictLog(tmp_path / "v.jsonl")
    try:
        fd = os.open("/dev/full", os.O_WRONLY)
        os.dup2(fd, vl._fd)  # same fd number, now /dev/full
        os.close(fd)
        with pytest.raises(AuditLogError, match="No space left"):
            vl.append({"type": "t"})
    finally:
        vl.close()


# -- verify: clean and tampered ---------------------------------------------------------------


def _tampered(tmp_path: Path, n: int = 10, max_bytes: int | None = None):
    path = tmp_path / "verdicts.jsonl"
    _fill(path, n, max_bytes=max_bytes)
    return path, _read_set(path)


@pytest.mark.parametrize("max_bytes", [None, 700])
def test_edit_middle_record(tmp_path: Path, max_bytes: int | None) -> None:
    path, files = _tampered(tmp_path, max_bytes=max_bytes)
    fi, li = _locate(files, 5)
    files[fi][1][li] = files[fi][1][li].replace(b'"n":4', b'"n":9')
    _write_set(files)
    res = verify_log(path)
    assert not res.ok and res.first_bad_seq == 5 and res.records == 4
    assert (
        res.problem
        == f"{files[fi][0].name}:{li + 1}: seq 5: record does not match its hash (edited)"
    )
    assert res.file == str(files[fi][0]) and res.line == li + 1


def test_edit_with_recomputed_hash_caught_by_next_prev(tmp_path: Path) -> None:
    path, files = _tampered(tmp_path)
    lines = files[0][1]
    lines[4] = _rehash(lines[4].replace(b'"n":4', b'"n":9'))
    _write_set(files)
    res = verify_log(path)
    assert not res.ok and res.first_bad_seq == 6
    assert (
        res.problem
        == "verdicts.jsonl:6: seq 6: prev hash does not match record 5 (edited or reordered)"
    )


def test_edit_last_record_with_recomputed_hash_caught_by_head(tmp_path: Path) -> None:
    path, files = _tampered(tmp_path)
    files[0][1][9] = _rehash(files[0][1][9].replace(b'"n":9', b'"n":0'))
    _write_set(files)
    res = verify_log(path)
    assert (
        not res.ok and res.first_bad_seq == 10 and "head file or last records edited" in res.problem
    )


@pytest.mark.parametrize("max_bytes", [None, 700])
def test_delete_record(tmp_path: Path, max_bytes: int | None) -> None:
    path, files = _tampered(tmp_path, max_bytes=max_bytes)
    fi, li = _locate(files, 4)
    del files[fi][1][li]
    _write_set(files)
    res = verify_log(path)
    assert not res.ok and res.first_bad_seq == 4
    assert res.problem.endswith("seq 4: found seq 5 after seq 3: seq 4 missing (deleted)")


def test_delete_several_records(tmp_path: Path) -> None:
    path, files = _tampered(tmp_path)
    del files[0][1][3:6]
    _write_set(files)
    res = verify_log(path)
    assert res.first_bad_seq == 4 and "seqs 4..6 missing (deleted)" in res.problem


def test_delete_rotated_file(tmp_path: Path) -> None:
    path, files = _tampered(tmp_path, n=20, max_bytes=500)
    assert len(files) >= 3
    first_missing = orjson.loads(files[1][1][0])["seq"]
    files[1][0].unlink()
    res = verify_log(path)
    assert not res.ok and res.first_bad_seq == first_missing and "deleted" in res.problem


def test_swap_records(tmp_path: Path) -> None:
    path, files = _tampered(tmp_path)
    lines = files[0][1]
    lines[6], lines[7] = lines[7], lines[6]
    _write_set(files)
    res = verify_log(path)
    assert not res.ok and res.first_bad_seq == 7
    assert (
        res.problem
        == "verdicts.jsonl:7: seq 7: found seq 8 where seq 7 belongs (records reordered)"
    )


def test_swap_with_renumbered_seq_caught_by_prev(tmp_path: Path) -> None:
    # A smarter reorder that also swaps the seq numbers (and rehashes) breaks the prev links.
    path, files = _tampered(tmp_path)
    lines = files[0][1]
    a, b = lines[6], lines[7]
    lines[6] = _rehash(b.replace(b'"seq":8', b'"seq":7'))
    lines[7] = _rehash(a.replace(b'"seq":7', b'"seq":8'))
    _write_set(files)
    res = verify_log(path)
    assert res.first_bad_seq == 7 and "prev hash does not match record 6" in res.problem


@pytest.mark.parametrize("cut", [1, 3])
def test_truncate_end_caught_by_head(tmp_path: Path, cut: int) -> None:
    path, files = _tampered(tmp_path)
    del files[0][1][-cut:]
    _write_set(files)
    res = verify_log(path)
    assert not res.ok and res.first_bad_seq == 11 - cut and res.records == 10 - cut
    assert "truncated" in res.problem and "says the log ends at seq 10" in res.problem


def test_truncate_mid_line(tmp_path: Path) -> None:
    path, files = _tampered(tmp_path)
    files[0][1][-1] = files[0][1][-1][:40]
    _write_set(files)
    res = verify_log(path)
    assert not res.ok and res.first_bad_seq == 10 and res.line == 10


def test_truncate_everything(tmp_path: Path) -> None:
    path, _ = _tampered(tmp_path)
    path.write_bytes(b"")
    res = verify_log(path)
    assert not res.ok and res.first_bad_seq == 1 and "seqs 1..10 missing (truncated)" in res.problem


def test_edit_head(tmp_path: Path) -> None:
    path, _ = _tampered(tmp_path)
    hp = head_path(path)
    good = hp.read_bytes()
    hp.write_bytes(good.replace(b'"seq":10', b'"seq":12'))
    assert verify_log(path).first_bad_seq == 11
    hp.write_bytes(good.replace(b'"seq":10', b'"seq":7'))
    res = verify_log(path)
    assert not res.ok and "head file or last records edited" in res.problem
    hp.write_bytes(b"garbage")
    res = verify_log(path)
    assert not res.ok and res.problem.startswith("verdicts.jsonl.head: head file is not valid")
    hp.unlink()
    res = verify_log(path)
    assert not res.ok and "missing" in res.problem


def test_head_one_behind_is_accepted_and_healed(tmp_path: Path) -> None:
    # The state a crash between the log write and the head write leaves behind.
    path = tmp_path / "v.jsonl"
    recs = _fill(path, 5)
    hp = head_path(path)
    hp.write_bytes(orjson.dumps({"seq": 4, "hash": recs[3]["hash"]}).ljust(127) + b"\n")
    res = verify_log(path)
    assert res.ok and res.records == 5 and "one record behind" in res.notes[0]
    with VerdictLog(path) as vl:
        assert vl.seq == 5
    assert orjson.loads(hp.read_bytes())["seq"] == 5


def test_verify_missing_log(tmp_path: Path) -> None:
    res = verify_log(tmp_path / "nope.jsonl")
    assert not res.ok and "no such log" in res.problem


# -- reopening a damaged log ------------------------------------------------------------------


def test_reopen_refuses_truncated_log_then_repair_marks_it(tmp_path: Path) -> None:
    path, files = _tampered(tmp_path)
    del files[0][1][-2:]
    _write_set(files)
    with pytest.raises(
        AuditLogError, match=r"says the last record is seq 10 but the log ends at seq 8"
    ):
        VerdictLog(path)
    with VerdictLog(path, repair=True) as vl:
        assert vl.seq == 11
        rec = vl.append({"type": "t"})
    assert rec["seq"] == 12
    repair = orjson.loads(path.read_bytes().splitlines()[-2])
    assert repair["type"] == "chain_repair" and repair["prev"] == GENESIS and repair["seq"] == 11
    assert repair["head"]["seq"] == 10 and repair["tail"]["seq"] == 8
    res = verify_log(path)
    assert res.ok and res.records == 10 and "chain repaired" in res.notes[0]


def test_reopen_refuses_torn_tail_then_repair(tmp_path: Path) -> None:
    path, files = _tampered(tmp_path)
    files[0][1][-1] = files[0][1][-1][:50]
    _write_set(files)
    with pytest.raises(AuditLogError, match="inconsistent"):
        VerdictLog(path)
    with VerdictLog(path, repair=True) as vl:
        vl.append({"type": "t"})
    res = verify_log(path)
    assert res.ok and "damaged line verdicts.jsonl:10" in res.notes[0], res


def test_repair_torn_tail_in_rotated_file(tmp_path: Path) -> None:
    path = tmp_path / "v.jsonl"
    _fill(path, 10, max_bytes=600)
    path.unlink()  # as after a crash right after rotation: the tail is in the newest .N
    newest = log_files(path)[-1]
    newest.write_bytes(newest.read_bytes()[:-30])
    with VerdictLog(path, repair=True) as vl:
        vl.append({"type": "t", "x": "\ud800"})  # a lone surrogate is escaped, not fatal
    res = verify_log(path)
    assert res.ok and f"damaged line {newest.name}" in res.notes[0], res


def test_reopen_refuses_missing_head_and_edited_tail(tmp_path: Path) -> None:
    path, files = _tampered(tmp_path)
    head_path(path).unlink()
    with pytest.raises(AuditLogError, match="missing"):
        VerdictLog(path)
    _fill(tmp_path / "b.jsonl", 3)
    b = tmp_path / "b.jsonl"
    b.write_bytes(b.read_bytes().replace(b'"n":2', b'"n":3'))
    with pytest.raises(AuditLogError, match="edited"):
        VerdictLog(b)


def test_repair_record_does_not_hide_earlier_damage(tmp_path: Path) -> None:
    path, files = _tampered(tmp_path)
    del files[0][1][2]  # a deletion in the middle, then a truncation at the end
    del files[0][1][-1]
    _write_set(files)
    with VerdictLog(path, repair=True) as vl:
        vl.append({"type": "t"})
    res = verify_log(path)
    assert not res.ok and res.first_bad_seq == 3


# -- property: any single tamper is caught, at the tampered record ---------------------------


TAMPERS = ["edit", "flip", "delete", "swap", "truncate", "rehash", "head"]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    notes=st.lists(st.text(max_size=40), min_size=1, max_size=25),
    max_bytes=st.sampled_from([None, 400, 900]),
    tamper=st.sampled_from(TAMPERS),
    data=st.data(),
)
def test_any_single_tamper_is_detected(notes, max_bytes, tamper, data) -> None:
    n = len(notes)
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "verdicts.jsonl"
        with VerdictLog(path, max_bytes=max_bytes) as vl:
            for i, note in enumerate(notes):
                vl.append({"type": "test", "n": i, "note": note})
        assert verify_log(path).ok
        files = _read_set(path)
        k = data.draw(st.integers(1, n), label="seq")
        fi, li = _locate(files, k)
        lines = files[fi][1]
        expect_max = k
        if tamper == "edit":
            lines[li] = lines[li].replace(f'"n":{k - 1},'.encode(), f'"n":{k + 1000},'.encode())
        elif tamper == "flip":
            pos = data.draw(st.integers(0, len(lines[li]) - 1), label="pos")
            x = data.draw(st.integers(1, 255), label="xor")
            b = bytearray(lines[li])
            b[pos] ^= x
            lines[li] = bytes(b)
        elif tamper == "delete":
            del lines[li]
        elif tamper == "swap":
            if n < 2:
                return
            k = min(k, n - 1)
            fi, li = _locate(files, k)
            fj, lj = _locate(files, k + 1)
            files[fi][1][li], files[fj][1][lj] = files[fj][1][lj], files[fi][1][li]
            expect_max = k
        elif tamper == "truncate":
            del lines[li:]
            for _, later in files[fi + 1 :]:
                later.clear()
        elif tamper == "rehash":
            lines[li] = _rehash(lines[li].replace(f'"n":{k - 1},'.encode(), b'"n":-1,'))
            expect_max = k + 1
        elif tamper == "head":
            hp = head_path(path)
            seq_new = data.draw(st.integers(0, n + 5).filter(lambda s: s != n), label="head seq")
            hp.write_bytes(
                hp.read_bytes().replace(f'"seq":{n},'.encode(), f'"seq":{seq_new},'.encode())
            )
            expect_max = n + 1
        _write_set(files)
        res = verify_log(path)
        assert not res.ok, (tamper, k, res)
        assert res.first_bad_seq is not None and res.first_bad_seq <= expect_max, (tamper, k, res)
        if tamper in ("edit", "flip", "delete", "swap", "truncate"):
            assert res.first_bad_seq == k, (tamper, k, res)
        assert res.problem


# -- issue #7: loss on a really full disk, counted and carried -------------------------------


def _fill_up(path: Path) -> None:
    """Zeros into `path` until its filesystem is full."""
    with open(path, "wb", buffering=0) as f:
        while True:
            try:
                f.write(b"\0" * 4096)
            except OSError as e:
                assert e.errno == errno.ENOSPC
                return


def _append_until_lost(vl: VerdictLog, lost_wanted: int) -> int:
    """Appends until `lost_wanted` appends failed; returns how many were written meanwhile (the
    log's last page takes a few more records before the first failure)."""
    written = lost = 0
    while lost < lost_wanted:
        try:
            vl.append({"type": "test", "pad": "x" * 200})
            written += 1
        except AuditLogError as e:
            # Also when part of the line still fitted (it is cut off again): the real reason.
            assert "No space left on device" in str(e)
            lost += 1
    return written


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (mounts a tmpfs)")
def test_full_tmpfs_loses_records_counts_them_and_the_log_says_so(tmp_path: Path) -> None:
    import subprocess

    mnt = tmp_path / "tiny"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)], check=True)
    try:
        path, filler = mnt / "v.jsonl", mnt / "filler"
        with VerdictLog(path) as vl:
            vl.append({"type": "session", "event": "start"})
            _fill_up(filler)
            written = 1 + _append_until_lost(vl, 40)
            assert vl.unwritten_total == 40 and vl.seq == written
            filler.unlink()  # space again: the next record carries the count
            rec = vl.append({"type": "test"})
            assert rec["seq"] == written + 1 and rec["unwritten_before"] == 40
            assert "unwritten_before" not in vl.append({"type": "test"})
            _fill_up(filler)
            written = vl.seq + _append_until_lost(vl, 25)
            assert vl.unwritten_total == 65
        # The session ended on a full disk: no record carries the last 25, the head file does
        # (rewritten in place, which needs no new block).
        res = verify_log(path)
        assert res.ok and res.records == written, res
        assert (res.unwritten, res.unwritten_at_end) == (65, 25)
        lost = [n for n in res.notes if "could NOT be written" in n]
        assert len(lost) == 2 and "40 records before it" in lost[0]
        assert f"25 records after seq {written}" in lost[1]
        filler.unlink()
        with VerdictLog(path) as vl:  # the next session's first record carries them
            assert vl.append({"type": "session", "event": "start"})["unwritten_before"] == 25
            assert vl.unwritten_total == 0  # lost by the session before, not by this one
        res = verify_log(path)
        assert res.ok and (res.unwritten, res.unwritten_at_end) == (65, 0)
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


# -- issue #7: property: the verifier never raises and never passes a damaged log ------------

VERIFY_EXAMPLES = 1000  # README "What is lost, and how you are told" cites this number


@pytest.fixture(scope="module")
def rotated_log() -> dict[str, bytes]:
    """A valid log in several rotated files, with one record lost in the middle and one at the
    end (so the head file carries a loss count too): file name -> bytes."""
    import errno as errno_

    def full(fd: int, data: bytes) -> int:
        raise OSError(errno_.ENOSPC, os.strerror(errno_.ENOSPC))

    with tempfile.TemporaryDirectory() as d, pytest.MonkeyPatch.context() as mp:
        path = Path(d) / "verdicts.jsonl"
        with VerdictLog(path, max_bytes=700) as vl:
            for i in range(12):
                vl.append({"type": "test", "n": i, "note": "é" * (i % 3)})
                if i == 4:
                    mp.setattr(auditlog.os, "write", full)
                    with pytest.raises(AuditLogError):
                        vl.append({"type": "test", "n": -1})
                    mp.undo()
            with pytest.raises(AuditLogError):  # lost before any byte is written: no rotation
                vl.append({"type": "test", "n": object()})
        files = {f.name: f.read_bytes() for f in [*log_files(path), head_path(path)]}
        res = verify_log(path)
    assert res.ok and (res.unwritten, res.unwritten_at_end) == (2, 1), res
    assert len(files) >= 4 and all(files.values())
    return files


def test_verifier_never_raises_and_never_passes_a_truncated_or_edited_log(rotated_log) -> None:
    from collections import Counter

    from click.testing import CliRunner

    from ebpf_guard.cli import main

    runner = CliRunner()
    names = sorted(rotated_log)
    runs: Counter[str] = Counter()

    @settings(max_examples=VERIFY_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(data=st.data())
    def check(data) -> None:
        files = dict(rotated_log)
        kind = data.draw(st.sampled_from(["truncate", "delete", "edit"]), label="kind")
        if kind == "truncate":
            name = data.draw(st.sampled_from(names), label="file")
            files[name] = files[name][: data.draw(st.integers(0, len(files[name]) - 1), label="at")]
        elif kind == "delete":
            del files[data.draw(st.sampled_from(names), label="file")]
        else:
            for _ in range(data.draw(st.integers(1, 3), label="edits")):
                name = data.draw(st.sampled_from(names), label="file")
                b = bytearray(files[name])
                b[data.draw(st.integers(0, len(b) - 1), label="pos")] = data.draw(st.integers(0, 255))
                files[name] = bytes(b)
        with tempfile.TemporaryDirectory() as d:
            for name, content in files.items():
                (Path(d) / name).write_bytes(content)
            path = Path(d) / "verdicts.jsonl"
            res = verify_log(path)  # raising here fails the property
            cli = runner.invoke(main, ["verify", str(path)])
        assert cli.exception is None or isinstance(cli.exception, SystemExit), repr(cli.exception)
        if files == rotated_log:  # edits that put back what was there
            runs["identical"] += 1
            assert res.ok and cli.exit_code == 0, res
            return
        runs[kind] += 1
        assert not res.ok and res.problem and not res.unreadable, (kind, res)
        assert cli.exit_code == 4, cli.output

    check()
    total = sum(runs.values())
    print(f"\nverifier property: {total} examples ({dict(runs)}): 0 raised, 0 damaged logs passed")
    assert total == VERIFY_EXAMPLES and runs["truncate"] and runs["delete"] and runs["edit"]
