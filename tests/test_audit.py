"""The audit log: what is recorded, `audit verify` and `audit show`, and tampering."""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import resource
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import audit_records, sovpack

from sovpack.errors import Refused
from sovpack.store.audit import AuditLog


@pytest.fixture
def audited_store(tmp_path, cli, keys, signed_bundle):
    """A store with a trust change, an accepted import, a refused one, a verification and a removal."""
    store = tmp_path / "store"
    assert cli("trust", "add", keys / "alice.pub", "--store", store).code == 0
    assert cli("export", signed_bundle, "--to", tmp_path / "out").code == 0
    assert cli("import", tmp_path / "out", "--store", store).code == 0
    assert cli("import", tmp_path / "out", "--store", store, "--trust", keys / "bob.pub").code == 0  # already installed
    assert cli("verify", "tiny", "--store", store).code == 0
    assert cli("remove", "tiny@3", "--store", store).code == 0
    assert cli("import", tmp_path / "out", "--store", store).code == 1  # rollback refused
    return store


def test_every_action_is_recorded(audited_store):
    records = audit_records(audited_store)
    assert [(r["event"], r.get("outcome")) for r in records] == [
        ("trust-add", None),
        ("import", "accepted"),
        ("import", "already-installed"),
        ("verify", None),
        ("remove", None),
        ("import", "refused"),
    ]
    accepted = records[1]
    assert accepted["name"] == "tiny" and accepted["version"] == 3 and accepted["accepted_by"] == ["alice"]
    assert accepted["source"]["kind"] == "volumes" and accepted["metadata_sha256"]
    assert "not newer than v3" in records[-1]["reason"] and records[-1]["exit_code"] == 1
    assert [r["seq"] for r in records] == list(range(1, 7))


def test_audit_verify_prints_the_head_digest(cli, audited_store):
    result = cli("audit", "verify", "--store", audited_store)
    last = (audited_store / "audit.log").read_bytes().splitlines()[-1]
    assert result.code == 0 and "6 record(s), chain intact" in result.out
    assert f"head sha256 {hashlib.sha256(last).hexdigest()}" in result.out


def test_audit_show(cli, audited_store):
    assert json.loads(cli("audit", "show", "--store", audited_store, "--json").out) == audit_records(audited_store)
    text = cli("audit", "show", "--store", audited_store).out
    assert "import" in text and "outcome=refused" in text and '"kind": "volumes"' in text


def test_an_edited_line_is_named(cli, audited_store):
    log = audited_store / "audit.log"
    lines = log.read_text().splitlines(keepends=True)
    lines[1] = lines[1].replace('"accepted"', '"refused"')
    log.write_text("".join(lines))
    result = cli("audit", "verify", "--store", audited_store)
    assert result.code == 1 and "the chain breaks at line 3" in result.err and "line 2 was edited" in result.err


def test_a_deleted_line_is_detected(cli, audited_store):
    log = audited_store / "audit.log"
    lines = log.read_text().splitlines(keepends=True)
    log.write_text("".join(lines[:2] + lines[3:]))
    result = cli("audit", "verify", "--store", audited_store)
    assert result.code == 1 and "line 3" in result.err


def test_a_garbled_line_is_named_by_show_and_verify(cli, audited_store):
    log = audited_store / "audit.log"
    lines = log.read_text().splitlines(keepends=True)
    lines[3] = "not json\n"
    log.write_text("".join(lines))
    assert "line 4 is not an audit record" in cli("audit", "verify", "--store", audited_store).err
    shown = cli("audit", "show", "--store", audited_store)
    assert shown.code == 1 and "line 4 is not an audit record" in shown.err


def test_appending_after_a_cut_off_line_keeps_records_whole(tmp_path):
    log = AuditLog(tmp_path / "audit.log")
    log.append("first")
    with open(log.path, "ab") as f:
        f.write(b'{"seq": 2, "ev')  # a crash in the middle of a write
    log.append("third")
    lines = log.path.read_bytes().splitlines()
    assert json.loads(lines[-1])["event"] == "third"
    with pytest.raises(Refused, match="line 2 is not an audit record"):
        log.verify_chain()


def test_concurrent_appends_from_several_processes_keep_the_chain(tmp_path):
    code = (
        "import sys; from pathlib import Path; from sovpack.store.audit import AuditLog\n"
        "log = AuditLog(Path(sys.argv[1]), Path(sys.argv[1] + '.head'))\n"
        "for i in range(25): log.append('tick', writer=sys.argv[2], i=i)"
    )
    writers = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "audit.log"), str(n)]) for n in range(4)]
    assert all(w.wait() == 0 for w in writers)
    log = AuditLog(tmp_path / "audit.log", tmp_path / "audit.log.head")
    assert log.verify_chain().records == 100
    assert json.loads(log.witness.read_bytes())["records"] == 100  # the witness followed every append


def test_an_empty_log_verifies(cli, tmp_path):
    (tmp_path / "empty").mkdir()  # a store nothing was recorded in yet (a missing one: test_cli.py)
    result = cli("audit", "verify", "--store", tmp_path / "empty")
    assert result.code == 0 and "0 record(s)" in result.out


def test_audit_log_path_in_store(tmp_path):
    from sovpack.store.store import Store

    assert Store(tmp_path).audit.path == Path(tmp_path) / "audit.log"


def test_a_cut_off_last_line_is_named_by_verify(cli, audited_store):
    log = audited_store / "audit.log"
    log.write_bytes(log.read_bytes()[:-20])  # a write cut off by a crash, or an edit
    result = cli("audit", "verify", "--store", audited_store)
    assert result.code == 1 and f"{log}: the last line is incomplete" in result.err


@pytest.mark.parametrize("keep", [5, 0])
def test_lines_cut_from_the_end_are_detected_by_the_head_witness(cli, audited_store, keep):
    log = audited_store / "audit.log"
    log.write_bytes(b"".join(log.read_bytes().splitlines(keepends=True)[:keep]))  # what is left still chains
    assert AuditLog(log).verify_chain().records == keep  # the log alone cannot tell
    result = cli("audit", "verify", "--store", audited_store)
    assert result.code == 1 and f"{log} holds {keep} records but had 6" in result.err, result.err
    assert "state/audit-head.json" in result.err


def test_the_witness_is_not_moved_by_appends_to_a_cut_log(cli, audited_store):
    log = audited_store / "audit.log"
    log.write_bytes(b"".join(log.read_bytes().splitlines(keepends=True)[:4]))
    for _ in range(3):  # the log grows past where it was cut, with other lines
        assert cli("trust", "threshold", "1", "--store", audited_store).code == 0
    assert AuditLog(log).verify_chain().records == 7
    result = cli("audit", "verify", "--store", audited_store)
    assert result.code == 1 and f"{log}: line 6 is not the one" in result.err, result.err


def test_a_crash_between_the_log_and_its_witness_is_no_alarm(tmp_path):
    log = AuditLog(tmp_path / "audit.log", tmp_path / "state" / "audit-head.json")
    log.append("first")
    behind = log.witness.read_bytes()
    log.append("second")
    log.witness.write_bytes(behind)  # killed after writing the record, before the witness
    assert log.verify_chain().records == 2
    log.append("third")  # the witness catches up
    assert json.loads(log.witness.read_bytes())["records"] == 3 and log.verify_chain().records == 3


def test_a_damaged_witness_is_named(cli, audited_store):
    witness = audited_store / "state" / "audit-head.json"
    witness.write_text("{")
    result = cli("audit", "verify", "--store", audited_store)
    assert result.code == 1 and f"{witness}, the audit log's head witness, is damaged" in result.err


def forge_records(log: Path, count: int) -> None:
    """Append `count` records chained correctly to the log, as someone who can write the file could."""
    for _ in range(count):
        last = log.read_bytes().splitlines()[-1]
        record = {"event": "forged", "prev": hashlib.sha256(last).hexdigest(), "seq": json.loads(last)["seq"] + 1, "time": "x"}
        with open(log, "ab") as f:
            f.write(json.dumps(record, sort_keys=True).encode() + b"\n")


def test_forged_records_do_not_freeze_the_witness(cli, audited_store, keys):
    log = audited_store / "audit.log"
    before = len(log.read_bytes().splitlines())
    forge_records(log, 2)
    assert cli("trust", "add", keys / "bob.pub", "--store", audited_store).code == 0  # genuine work after the forgery
    assert cli("trust", "remove", "bob", "--store", audited_store).code == 0
    witness = json.loads((audited_store / "state" / "audit-head.json").read_text())
    assert witness["records"] == before + 4
    log.write_bytes(b"".join(log.read_bytes().splitlines(keepends=True)[:before]))  # cut back, forged and genuine records
    result = cli("audit", "verify", "--store", audited_store)
    assert result.code == 1 and f"holds {before} records but had {before + 4}" in result.err, result.err


def without_file_growth_beyond(limit: int):
    """preexec_fn: writes past `limit` bytes fail with EFBIG (and no SIGXFSZ), as on a full disk."""

    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def test_a_change_whose_audit_record_cannot_be_written_does_not_happen(store, keys):
    log_size = (store / "audit.log").stat().st_size
    result = sovpack("trust", "add", keys / "bob.pub", "--store", store, preexec_fn=without_file_growth_beyond(log_size))
    assert result.returncode == 3 and b"audit.log" in result.stderr, result.stderr
    assert sorted(p.name for p in (store / "trust" / "keys").iterdir()) == ["alice.pub"]
    assert [r["event"] for r in audit_records(store)] == ["trust-add"]  # alice's, from the fixture
    assert sovpack("audit", "verify", "--store", store).returncode == 0


def test_trust_add_on_a_full_disk_trusts_nothing_and_says_so_in_the_log(cli, keys, small_disk):
    store = small_disk / "store"
    assert cli("trust", "add", keys / "alice.pub", "--store", store).code == 0
    with open(small_disk / "filler", "wb", buffering=0) as filler:  # every free block taken; audit.log has room in its last
        with contextlib.suppress(OSError):
            while filler.write(b"\0" * 4096):
                pass
    result = cli("trust", "add", keys / "bob.pub", "--store", store)
    assert result.code == 3 and "No space left on device" in result.err, result.err
    assert "bob" not in cli("trust", "list", "--store", store).out
    records = audit_records(store)
    assert [(r["event"], r.get("signer"), r.get("outcome")) for r in records] == [
        ("trust-add", "alice", None),
        ("trust-add", "bob", None),
        ("trust-add", "bob", "failed"),
    ]
    assert "No space left on device" in records[-1]["reason"]
    assert cli("audit", "verify", "--store", store).code == 0


RFC5424 = re.compile(rb"^<(\d+)>1 (\S+) (\S+) sovpack (\d+) (\S+) - \xef\xbb\xbf(.*)$", re.DOTALL)


@pytest.mark.parametrize("transport", ["unix", "udp"])
def test_every_record_is_copied_to_syslog(cli, store, keys, tmp_path, transport):
    if transport == "unix":
        receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        receiver.bind(str(tmp_path / "log.sock"))
        target = str(tmp_path / "log.sock")
    else:
        receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        receiver.bind(("127.0.0.1", 0))
        target = f"udp://127.0.0.1:{receiver.getsockname()[1]}"
    receiver.settimeout(10)
    with receiver:
        assert cli("audit", "syslog", target, "--store", store).code == 0
        assert b'"probe": true' in receiver.recv(65536)  # the target answered before the setting changed
        assert cli("trust", "add", keys / "bob.pub", "--store", store).code == 0
        assert cli("import", tmp_path / "nowhere", "--store", store).code == 2  # a usage error is not an import attempt
        message = RFC5424.match(receiver.recv(65536))
        line = (store / "audit.log").read_bytes().splitlines()[-1]
        assert message and message.group(5) == b"trust-add" and message.group(6) == line
        assert int(message.group(1)) == 10 * 8 + 5  # authpriv.notice
        assert f"copied to syslog {target}" in cli("audit", "verify", "--store", store).out
        assert cli("audit", "syslog", "off", "--store", store).code == 0
    records = audit_records(store)
    assert [(r["event"], r.get("target")) for r in records[-3:]] == [
        ("audit-syslog", target),
        ("trust-add", None),
        ("audit-syslog", None),
    ]


def test_a_syslog_target_that_does_not_answer_is_refused_and_changes_nothing(cli, store, tmp_path):
    before = (store / "audit.log").read_bytes()
    result = cli("audit", "syslog", str(tmp_path / "no-such.sock"), "--store", store)
    assert result.code == 3 and f"cannot send to the syslog target {tmp_path / 'no-such.sock'}" in result.err
    assert (store / "audit.log").read_bytes() == before and not (store / "state" / "syslog.json").exists()
    bad = cli("audit", "syslog", "syslog.example:514", "--store", store)
    assert bad.code == 2 and "give the absolute path of a Unix socket" in bad.err


def test_a_damaged_syslog_setting_is_named_by_audit_verify(cli, store):
    setting = store / "state" / "syslog.json"
    setting.parent.mkdir(parents=True, exist_ok=True)
    setting.write_text("{")
    result = cli("audit", "verify", "--store", store)
    assert result.code == 1 and f"{setting} is damaged: audit records are not being copied to syslog" in result.err
    assert cli("trust", "threshold", "1", "--store", store).code == 0  # appends stay best effort
    assert cli("audit", "syslog", "off", "--store", store).code == 0 and not setting.exists()
    assert cli("audit", "verify", "--store", store).code == 0
