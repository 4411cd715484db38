"""sovpack.json and signature statements are untrusted input: strict parsing, precise refusals."""

from __future__ import annotations

import base64
import copy
import json
import re
from datetime import datetime, timezone

import pytest

from sovpack.bundle.keys import generate_key_pair, load_private_key, load_public_key
from sovpack.bundle.metadata import BundleMetadata, FileEntry, parse_expiry, parse_metadata
from sovpack.bundle.signature import build_statement, parse_signature, parse_statement, sign_statement
from sovpack.common.safepath import case_collisions, unsafe_reason
from sovpack.errors import Refused, UsageError

HEX = "ab" * 32


def valid_document() -> dict:
    metadata = BundleMetadata(
        name="m",
        version=2,
        created=datetime(2026, 1, 1, tzinfo=timezone.utc),
        shard_size=1 << 26,
        files=[FileEntry("a.gguf", 10, HEX, (HEX,), "weights", "gguf", {"file_type": "F16"}, {"type": "local"})],
    )
    return json.loads(metadata.to_bytes())


def parse(doc: dict):
    return parse_metadata(json.dumps(doc).encode())


def test_round_trip():
    metadata = parse(valid_document())
    assert (metadata.name, metadata.version, metadata.files[0].path) == ("m", 2, "a.gguf")
    assert json.loads(metadata.to_bytes()) == valid_document()


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda d: d.update(extra=1), "unknown field"),
        (lambda d: d.update(format="other"), "field 'format'"),
        (lambda d: d.update(format_version=2), "format_version 2 is not supported"),
        (lambda d: d.update(version=0), "version must be >= 1"),
        (lambda d: d.update(version=True), "field 'version' is missing or not of type int"),
        (lambda d: d.update(shard_size=1000), "shard_size a power of two"),
        (lambda d: d.update(name="../evil"), "bundle name '../evil' is not allowed"),
        (lambda d: d.update(created="yesterday"), "must be a UTC time"),
        (lambda d: d["files"][0].update(path="../../etc/passwd"), "unsafe file path"),
        (lambda d: d["files"][0].update(path="/abs"), "absolute path"),
        (lambda d: d["files"][0].update(path="signatures/x.sig"), "reserved"),
        (lambda d: d["files"][0].update(sha256="xyz"), "invalid size or digest"),
        (lambda d: d["files"][0].update(size=-1), "invalid size or digest"),
        (lambda d: d["files"][0].update(shards=[HEX, HEX]), "lists 2 shard digests, expected 1"),
        (lambda d: d["files"][0].update(source={"repo": "x"}), "source without a 'type'"),
        (lambda d: d["files"].append(copy.deepcopy(d["files"][0])), "lists the same file twice"),
        (lambda d: d["files"].append(dict(copy.deepcopy(d["files"][0]), path="A.GGUF")), "differ only by case"),
        (lambda d: d["files"][0].pop("role"), "field 'files[0].role' is missing"),
    ],
)
def test_refusals_name_the_field(edit, message):
    doc = valid_document()
    edit(doc)
    with pytest.raises(Refused, match=re.escape(message)):
        parse(doc)


def test_not_json():
    with pytest.raises(Refused, match="sovpack.json is not valid JSON"):
        parse_metadata(b"\xff\xfe")


@pytest.mark.parametrize(
    "path, reason",
    [
        ("ok/file.gguf", None),
        ("", "empty"),
        ("a//b", "empty, '.' or '..'"),
        ("a/./b", "empty, '.' or '..'"),
        ("a\\b", "backslash"),
        ("con:", "FAT32"),
        ("trailing. ", "ends with a space or dot"),
        ("nul\x00", "control character"),
    ],
)
def test_safe_paths(path, reason):
    got = unsafe_reason(path)
    assert (got is None) if reason is None else (reason in got)


def test_case_collisions():
    assert case_collisions(["a", "B", "b"]) == [("B", "b")]


def test_expiry_forms():
    now = datetime(2026, 1, 1, tzinfo=timezone.utc)
    assert parse_expiry("10d", now) == datetime(2026, 1, 11, tzinfo=timezone.utc)
    assert parse_expiry("2027-03-04", now) == datetime(2027, 3, 4, tzinfo=timezone.utc)
    assert parse_expiry(None, now) is None
    with pytest.raises(UsageError, match="--expires 'tomorrow'"):
        parse_expiry("tomorrow", now)


@pytest.fixture
def signed_payload(tmp_path):
    key = generate_key_pair("k", tmp_path)
    payload = build_statement("m", {"sovpack.json": HEX, "a.gguf": "cd" * 32})
    return sign_statement(load_private_key(key.private_path), payload), load_public_key(key.public_path)


def test_signature_round_trip(signed_payload):
    raw, public_key = signed_payload
    sig = parse_signature(raw, "signatures/k.sig")
    assert sig.verify(public_key)
    statement = parse_statement(sig.payload, "signatures/k.sig")
    assert statement.subject_name == "m" and statement.resources["a.gguf"] == "cd" * 32


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda d: d.update(mediaType="x"), "media type 'x'"),
        (lambda d: d["dsseEnvelope"].update(payloadType="text/plain"), "payload type"),
        (lambda d: d["dsseEnvelope"]["signatures"].append({"sig": "", "keyid": ""}), "expected exactly 1"),
        (lambda d: d["dsseEnvelope"].update(payload="***"), "not a valid model-signing signature file"),
        (lambda d: d["verificationMaterial"]["publicKey"].update(hint="short"), "hint is not a SHA-256"),
        (lambda d: d.pop("dsseEnvelope"), "KeyError"),
    ],
)
def test_malformed_signature_files(signed_payload, edit, message):
    doc = json.loads(signed_payload[0])
    edit(doc)
    with pytest.raises(Refused, match=message):
        parse_signature(json.dumps(doc).encode(), "signatures/k.sig")


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda s: s.update(predicateType="https://example.com/other"), "expected model-signing v1.0"),
        (lambda s: s["predicate"]["serialization"].update(method="shards"), "sovpack signs whole files"),
        (lambda s: s["subject"][0]["digest"].update(sha256=HEX), "inconsistent"),
        (lambda s: s["predicate"]["resources"].append(dict(s["predicate"]["resources"][0])), "twice"),
        (lambda s: s.update(subject=[]), "malformed"),
    ],
)
def test_malformed_statements(edit, message):
    statement = json.loads(build_statement("m", {"sovpack.json": HEX}))
    edit(statement)
    with pytest.raises(Refused, match=message):
        parse_statement(json.dumps(statement).encode(), "signatures/k.sig")


def test_signature_does_not_verify_with_another_key(signed_payload, tmp_path):
    other = generate_key_pair("other", tmp_path / "o")
    sig = parse_signature(signed_payload[0], "s")
    assert not sig.verify(load_public_key(other.public_path))
    tampered = json.loads(signed_payload[0])
    tampered["dsseEnvelope"]["payload"] = base64.b64encode(b'{"_type": "x"}').decode()
    assert not parse_signature(json.dumps(tampered).encode(), "s").verify(signed_payload[1])
