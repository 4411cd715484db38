"""Issue 13: the file-kind gate, and hostile input that got a traceback or slipped through, each reproduced and refused."""

from __future__ import annotations

import io
import json
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from builders import WHEEL_FILE, card_images, python_wheel, sentencepiece_model, write_safetensors
from helpers import ROOT, audit_records, export, old_gnu_sparse_member, tar_member, tar_stream, volumes

from sovpack.bundle.directory import read_metadata, read_metadata_bytes, write_metadata
from sovpack.bundle.keys import key_id, load_private_key
from sovpack.bundle.metadata import FileEntry
from sovpack.bundle.sign import statement_for
from sovpack.bundle.signature import build_statement, sign_statement
from sovpack.common.hashing import digest_file, sha256_bytes

DEEP = b"[" * 100_000


class Payload:
    """What a hostile pickle does when loaded: here, something visible and harmless."""

    def __reduce__(self):
        return (print, ("pickle payload ran",))


def zipped(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def npz_of_objects() -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, weights=np.array([{"w": 1}, None], dtype=object))
    return buffer.getvalue()


# The bypasses of the issue: (file name, bytes, what the refusal must say it is)
PICKLES = [
    ("model.sav", pickle.dumps(Payload(), protocol=0), "a pickle of protocol 0"),
    ("weights", pickle.dumps(Payload(), protocol=1), "a pickle of protocol 1"),
    ("weights.npy", pickle.dumps(Payload(), protocol=0), "a pickle of protocol 0"),
    ("weights.dat", pickle.dumps(Payload(), protocol=1), "a pickle of protocol 1"),
    ("tokenizer.model", pickle.dumps(Payload(), protocol=0), "a pickle of protocol 0"),
    (
        "model.weights",
        zipped({"blobs/anything": pickle.dumps(Payload(), protocol=2)}),
        "zip archive holding a pickle of protocol 2",
    ),
    ("arrays.npz", npz_of_objects(), "zip archive holding a numpy array of Python objects"),
    ("prefixed.data", b"\0" * 4096 + zipped({"data.pkl": pickle.dumps(Payload())}), "zip archive holding a pickle"),
    ("objects.npy", None, "a numpy array of Python objects"),
    ("model.safetensors", pickle.dumps(Payload(), protocol=5), "a pickle of protocol 5"),
]


def pickle_case(name: str, data: bytes | None, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if data is None:
        np.save(path, np.array([{"w": 1}], dtype=object), allow_pickle=True)  # path ends in .npy: kept as named
    else:
        path.write_bytes(data)
    return path


def force_sign(bundle: Path, key_file: Path) -> None:
    """Sign whatever sovpack.json says, without `sign`'s checks: how an attacker or a buggy tool would."""
    raw = read_metadata_bytes(bundle)
    key = load_private_key(key_file)
    (bundle / "signatures").mkdir(exist_ok=True)
    payload = statement_for(read_metadata(bundle), sha256_bytes(raw))
    (bundle / "signatures" / f"{key_id(key.public_key())}.sig").write_bytes(sign_statement(key, payload))


def smuggle(bundle: Path, rel: str, key_file: Path, *, fmt: str = "other", allowed: list[str] | None = None) -> None:
    """Put a file into a signed bundle around the gate: listed in sovpack.json, signed by a trusted key."""
    metadata = read_metadata(bundle)
    digest = digest_file(bundle / rel)
    metadata.files.append(FileEntry(rel, digest.size, digest.sha256, digest.shards, "other", fmt, None, {"type": "local"}))
    metadata.allowed_files = allowed or []
    write_metadata(bundle, metadata)
    force_sign(bundle, key_file)


def refusal(result) -> str:
    assert result.code == 1, (result.code, result.out, result.err)
    return result.out + result.err


# 1. the gate: pickles


@pytest.mark.parametrize("name, data, looks_like", PICKLES, ids=[p[0] for p in PICKLES])
def test_pack_refuses_every_pickle_bypass(tmp_path, cli, model_dir, name, data, looks_like):
    pickle_case(name, data, model_dir / name)
    for allowance in ((), ("--allow-file", "*")):  # no allowance lets a pickle through
        message = refusal(cli("pack", model_dir, "--out", tmp_path / "b", "--name", "tiny", *allowance))
        assert f"{name}: refused as pickle-based weights" in message and looks_like in message
        assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("name, data, looks_like", PICKLES, ids=[p[0] for p in PICKLES])
def test_verify_refuses_every_pickle_bypass_on_its_own(cli, signed_bundle, keys, name, data, looks_like):
    rel = f"extra/{name}"
    pickle_case(name, data, signed_bundle / rel)
    smuggle(signed_bundle, rel, keys / "alice.key", allowed=["extra/*"])
    result = cli("verify", signed_bundle, "--trust", keys / "alice.pub", "--json")
    report = json.loads(result.out)
    assert result.code == 1 and report["error"]["step"] == "formats" and report["error"]["subject"] == rel
    assert f"{rel}: refused as pickle-based weights" in report["error"]["message"] and looks_like in report["error"]["message"]


def test_import_refuses_a_signed_pickle(tmp_path, cli, signed_bundle, keys, store):
    pickle_case("model.sav", PICKLES[0][1], signed_bundle / "model.sav")
    smuggle(signed_bundle, "model.sav", keys / "alice.key")
    media = export(cli, signed_bundle, tmp_path / "media")
    message = refusal(cli("import", media, "--store", store))
    assert "model.sav: refused as pickle-based weights: it is a pickle of protocol 0" in message
    assert not (store / "bundles").exists() or not any((store / "bundles").iterdir())


def test_fetch_refuses_a_pickle_by_its_bytes(tmp_path, cli):
    from hubserver import HubServer

    weights = write_safetensors(tmp_path / "src" / "model.safetensors").read_bytes()
    with HubServer() as hub:
        hub.add_repo("org/m", {"model.safetensors": weights, "config.json": b"{}", "weights.dat": pickle.dumps(Payload(), 1)})
        result = cli("fetch", "org/m", "--out", tmp_path / "b", "--include", "*", "--endpoint", hub.url)
    assert "weights.dat: refused as pickle-based weights: it is a pickle of protocol 1" in refusal(result)
    assert not (tmp_path / "b").exists()


# 1. the gate: kinds, allowances


def test_unknown_binary_is_refused_unless_allowed_and_the_allowance_is_signed_and_shown(tmp_path, cli, model_dir, keys):
    (model_dir / "onnx").mkdir()
    (model_dir / "onnx" / "model.onnx").write_bytes(b"\x08\x07\x12\x07pytorch" + bytes(range(256)))
    message = refusal(cli("pack", model_dir, "--out", tmp_path / "b", "--name", "tiny"))
    assert "onnx/model.onnx: refused: it is not a kind of file sovpack can check (it looks like unknown binary" in message
    assert "--allow-file" in message

    bundle = tmp_path / "b"
    packed = cli("pack", model_dir, "--out", bundle, "--name", "tiny", "--allow-file", "onnx/*.onnx")
    assert packed.code == 0, packed.err
    assert "--allow-file 'onnx/*.onnx' (signed): carries onnx/model.onnx" in packed.out
    metadata = json.loads((bundle / "sovpack.json").read_text())
    assert metadata["allowed_files"] == ["onnx/*.onnx"]
    assert {f["path"]: f["format"] for f in metadata["files"]}["onnx/model.onnx"] == "other"

    described = json.loads(cli("inspect", bundle, "--json").out)
    assert described["allowed_files"] == [{"glob": "onnx/*.onnx", "files": ["onnx/model.onnx"]}]
    assert "allowance --allow-file 'onnx/*.onnx' (signed): carries onnx/model.onnx" in cli("inspect", bundle).out

    assert cli("sign", bundle, "--key", keys / "alice.key").code == 0
    verified = cli("verify", bundle, "--trust", keys / "alice.pub")
    assert verified.code == 0 and "allowance --allow-file 'onnx/*.onnx' (signed): carries onnx/model.onnx" in verified.out
    assert "carried under the signed allowance: onnx/model.onnx" in verified.out
    report = json.loads(cli("verify", bundle, "--trust", keys / "alice.pub", "--json").out)
    assert report["allowed_files"] == [{"glob": "onnx/*.onnx", "files": ["onnx/model.onnx"]}]

    # the allowance is part of what was signed: dropping it breaks the signature; re-signing without it refuses the file
    metadata["allowed_files"] = []
    (bundle / "sovpack.json").write_text(json.dumps(metadata))
    assert "threshold not met" in refusal(cli("verify", bundle, "--trust", keys / "alice.pub"))
    force_sign(bundle, keys / "alice.key")
    message = refusal(cli("verify", bundle, "--trust", keys / "alice.pub"))
    assert "onnx/model.onnx: refused: it is not a kind of file sovpack can check" in message


def test_an_allowance_must_match_a_file(tmp_path, cli, model_dir):
    result = cli("pack", model_dir, "--out", tmp_path / "b", "--name", "tiny", "--allow-file", "*.onnx")
    assert result.code == 2 and "--allow-file '*.onnx' matches no file" in result.err


@pytest.mark.parametrize(
    "name, data, looks_like",
    [
        ("arrays.npy", None, "a numpy array"),
        ("blob.zip", zipped({"a.txt": b"hello"}), "a zip archive"),
        ("tool", b"\x7fELF\x02\x01\x01" + bytes(64), "an ELF executable"),
    ],
)
def test_other_kinds_are_named(tmp_path, cli, model_dir, name, data, looks_like):
    if data is None:
        np.save(model_dir / name, np.zeros(4, np.float32))
    else:
        (model_dir / name).write_bytes(data)
    message = refusal(cli("pack", model_dir, "--out", tmp_path / "b", "--name", "tiny"))
    assert f"{name}: refused: it is not a kind of file sovpack can check (it looks like {looks_like}" in message


def test_allowed_kinds_are_recognised_by_their_bytes(tmp_path, cli, model_dir, keys):
    files = card_images() | {
        "tokenizer.model": sentencepiece_model(),
        "chat_template.jinja": b"{{ messages }}",
        "NOTES": b"GIF89a is a text here\n",
    }
    files["weights.dat"] = write_safetensors(tmp_path / "w.safetensors").read_bytes()
    for rel, data in files.items():
        (model_dir / rel).parent.mkdir(parents=True, exist_ok=True)
        (model_dir / rel).write_bytes(data)
    assert cli("pack", model_dir, "--out", tmp_path / "b", "--name", "tiny").code == 0
    formats = {
        f["path"]: (f["format"], f.get("details")) for f in json.loads((tmp_path / "b" / "sovpack.json").read_text())["files"]
    }
    assert formats["card/figure.png"] == ("image", {"image": "png", "width": 16, "height": 8})
    assert formats["card/figure.jpeg"] == ("image", {"image": "jpeg", "width": 16, "height": 8})
    assert formats["card/figure.gif"] == ("image", {"image": "gif", "width": 16, "height": 8})
    assert formats["card/figure.webp"] == ("image", {"image": "webp"})
    assert formats["tokenizer.model"] == ("sentencepiece", {"pieces": 120})
    assert formats["weights.dat"][0] == "safetensors" and formats["weights.dat"][1]["tensor_count"] == 2
    assert formats["chat_template.jinja"][0] == "jinja" and formats["NOTES"][0] == "text"
    assert formats["config.json"][0] == "json" and formats["LICENSE"][0] == "text"
    assert cli("sign", tmp_path / "b", "--key", keys / "alice.key").code == 0
    assert cli("verify", tmp_path / "b", "--trust", keys / "alice.pub").code == 0


@pytest.mark.parametrize(
    "rel, mutate, message",
    [
        ("card/figure.png", lambda d: d + zipped({"a.txt": b"x"}), "bytes follow the end of the image"),
        ("card/figure.gif", lambda d: d[:-1], "ends without its trailer"),
        ("card/figure.jpeg", lambda d: d + b"\0" * 16, "16 bytes follow the end of the image"),
        ("card/figure.webp", lambda d: d + b"\0\0", "the RIFF size says"),
        ("tokenizer.model", lambda d: d[:-3], "malformed SentencePiece model"),
    ],
)
def test_malformed_allowed_kinds_are_refused(tmp_path, cli, model_dir, rel, mutate, message):
    data = (card_images() | {"tokenizer.model": sentencepiece_model()})[rel]
    (model_dir / rel).parent.mkdir(parents=True, exist_ok=True)
    (model_dir / rel).write_bytes(mutate(data))
    result = refusal(cli("pack", model_dir, "--out", tmp_path / "b", "--name", "tiny"))
    assert f"{rel}: " in result and message in result


def test_verify_checks_the_recorded_format_against_the_bytes(cli, signed_bundle, keys):
    metadata = read_metadata(signed_bundle)
    metadata.file("README.md").format = "image"
    write_metadata(signed_bundle, metadata)
    force_sign(signed_bundle, keys / "alice.key")
    assert "README.md: sovpack.json records it as image, but its bytes are text" in refusal(
        cli("verify", signed_bundle, "--trust", keys / "alice.pub")
    )


# 1. the gate: Python wheels (the runtime bundle), a kind of their own, only under an allowance

WHEEL_NAME = "wheels/demo-1.0-py3-none-any.whl"
DATA_PICKLE = {"demo/tests/data/case.pkl": pickle.dumps(Payload(), protocol=4)}  # as numpy ships one


def test_a_wheel_without_an_allowance_is_refused(tmp_path, cli, model_dir):
    for members, says in ((None, "it is a Python wheel, which installs code"), (DATA_PICKLE, "refused as pickle-based weights")):
        pickle_case(WHEEL_NAME, python_wheel(members), model_dir / WHEEL_NAME)
        message = refusal(cli("pack", model_dir, "--out", tmp_path / "b", "--name", "tiny"))
        assert f"{WHEEL_NAME}: " in message and says in message, message
        assert not (tmp_path / "b").exists()
    pickle_case(WHEEL_NAME, python_wheel(), model_dir / WHEEL_NAME)  # an allowance naming other files is not one for it
    message = refusal(cli("pack", model_dir, "--out", tmp_path / "b", "--name", "tiny", "--allow-file", "README.md"))
    assert f"{WHEEL_NAME}: refused: it is a Python wheel, which installs code" in message


def test_a_wheel_under_an_allowance_is_carried_with_its_own_data_pickle_and_shown(tmp_path, cli, model_dir, keys, store):
    pickle_case(WHEEL_NAME, python_wheel(DATA_PICKLE), model_dir / WHEEL_NAME)
    bundle = tmp_path / "b"
    packed = cli("pack", model_dir, "--out", bundle, "--name", "tiny", "--allow-file", "wheels/*.whl")
    assert packed.code == 0, packed.err
    assert "--allow-file 'wheels/*.whl' (signed): carries 1 Python wheel(s)" in packed.out
    entry = {f["path"]: f for f in json.loads((bundle / "sovpack.json").read_text())["files"]}[WHEEL_NAME]
    assert entry["format"] == "wheel" and entry["details"]["distribution"] == "demo"
    assert entry["details"]["tags"] == ["py3-none-any"] and entry["details"]["wheel_version"] == "1.0"
    described = json.loads(cli("inspect", bundle, "--json").out)
    assert described["allowed_files"] == [{"glob": "wheels/*.whl", "files": [WHEEL_NAME]}]

    assert cli("sign", bundle, "--key", keys / "alice.key").code == 0
    verified = cli("verify", bundle, "--trust", keys / "alice.pub", "--json")
    assert verified.code == 0, verified.out
    report = json.loads(verified.out)
    formats = next(c["detail"] for c in report["checks"] if c["step"] == "formats")
    assert formats.startswith("no pickles outside the allowed wheels;") and "1 wheel" in formats
    assert f"carried under the signed allowance: {WHEEL_NAME} (--allow-file 'wheels/*.whl')" in formats
    assert report["allowed_files"] == [{"glob": "wheels/*.whl", "files": [WHEEL_NAME]}]
    from sovpack.cli.bundle_commands import _details  # the details column of `inspect`

    assert _details(entry["details"]) == "wheel demo 1.0 (py3-none-any), 4 members"
    imported = cli("import", export(cli, bundle, tmp_path / "media"), "--store", store)
    assert imported.code == 0, imported.err


PRETENDERS = [
    ("no RECORD", python_wheel(record=False), "it has no demo-1.0.dist-info/RECORD"),
    ("no WHEEL", python_wheel(wheel=None), "it has no demo-1.0.dist-info/WHEEL"),
    ("Wheel-Version 2", python_wheel(wheel=WHEEL_FILE.replace("1.0", "2.0")), "Wheel-Version '2.0', not 1.x"),
    ("no Tag", python_wheel(wheel="Wheel-Version: 1.0\nRoot-Is-Purelib: true\n"), "no Tag"),
    ("RECORD without WHEEL", python_wheel(listed=("RECORD",)), "its RECORD does not list demo-1.0.dist-info/WHEEL"),
    ("two dist-info", python_wheel({"other-2.0.dist-info/WHEEL": WHEEL_FILE.encode()}), "2 top-level .dist-info"),
    ("bytes in front", b"\0" * 64 + python_wheel(), "does not start with a zip member"),
    ("bytes after", python_wheel() + b"\0" * 8, "bytes follow its zip end record"),
    ("plain zip", zipped({"a.txt": b"hello"}), "0 top-level .dist-info directories"),
    ("another name", python_wheel(dist_info="evil-1.0.dist-info"), "it holds evil-1.0.dist-info/"),
    ("text", b"just text\n", "does not start with a zip member"),
]


@pytest.mark.parametrize("data, problem", [p[1:] for p in PRETENDERS], ids=[p[0] for p in PRETENDERS])
def test_a_file_that_only_pretends_to_be_a_wheel_is_refused_under_the_allowance(tmp_path, cli, model_dir, data, problem):
    pickle_case(WHEEL_NAME, data, model_dir / WHEEL_NAME)
    message = refusal(cli("pack", model_dir, "--out", tmp_path / "b", "--name", "tiny", "--allow-file", "wheels/*.whl"))
    assert f"{WHEEL_NAME}: refused: it is not a valid Python wheel (" in message and problem in message, message
    assert not (tmp_path / "b").exists()


def test_a_pretend_wheel_holding_a_pickle_gets_no_exemption(tmp_path, cli, model_dir, keys):
    """A WHEEL file alone (the old stopgap's test) does not make a wheel: its pickle is refused, at pack and at verify."""
    pretender = python_wheel(DATA_PICKLE, record=False)
    pickle_case(WHEEL_NAME, pretender, model_dir / WHEEL_NAME)
    message = refusal(cli("pack", model_dir, "--out", tmp_path / "b", "--name", "tiny", "--allow-file", "wheels/*.whl"))
    assert f"{WHEEL_NAME}: refused as pickle-based weights: it is a zip archive holding a pickle" in message


def test_a_pickle_outside_a_wheel_is_refused_whatever_the_allowance(tmp_path, cli, model_dir):
    pickle_case(WHEEL_NAME, python_wheel(DATA_PICKLE), model_dir / WHEEL_NAME)
    pickle_case("extra/case.pkl", pickle.dumps(Payload(), protocol=4), model_dir / "extra" / "case.pkl")
    message = refusal(cli("pack", model_dir, "--out", tmp_path / "b", "--name", "tiny", "--allow-file", "*"))
    assert "extra/case.pkl: refused as pickle-based weights: it is a pickle of protocol 4" in message
    (model_dir / "extra" / "case.pkl").unlink()
    pickle_case("extra/model.zip", zipped({"case.pkl": pickle.dumps(Payload())}), model_dir / "extra" / "model.zip")
    message = refusal(cli("pack", model_dir, "--out", tmp_path / "b", "--name", "tiny", "--allow-file", "*"))
    assert "extra/model.zip: refused as pickle-based weights: it is a zip archive holding a pickle" in message
    (model_dir / "extra" / "model.zip").unlink()
    assert cli("pack", model_dir, "--out", tmp_path / "b", "--name", "tiny", "--allow-file", "*").code == 0


def test_verify_refuses_a_signed_wheel_without_its_allowance(cli, signed_bundle, keys):
    pickle_case(WHEEL_NAME, python_wheel(), signed_bundle / WHEEL_NAME)
    smuggle(signed_bundle, WHEEL_NAME, keys / "alice.key", fmt="wheel")
    report = json.loads(cli("verify", signed_bundle, "--trust", keys / "alice.pub", "--json").out)
    assert report["error"]["step"] == "formats" and report["error"]["subject"] == WHEEL_NAME
    assert "it is a Python wheel, which installs code" in report["error"]["message"]


# 2. no input gets a traceback


def deep_signature(bundle: Path) -> str:
    (bundle / "signatures" / "deep.sig").write_bytes(DEEP)
    return "signatures/deep.sig"


def test_a_deeply_nested_signature_file_is_refused_by_verify_inspect_and_import(tmp_path, cli, signed_bundle, keys, store):
    members = bundle_members(signed_bundle)  # as export would write them, before the signature is spoilt
    name = deep_signature(signed_bundle)
    message = refusal(cli("verify", signed_bundle, "--trust", keys / "alice.pub"))
    assert f"{name} is not a valid model-signing signature file" in message and "nests 100000 levels deep" in message
    described = json.loads(cli("inspect", signed_bundle, "--json").out)
    assert "nests 100000 levels deep" in next(s["problem"] for s in described["signatures"] if s["file"] == name)
    stream = tar_stream(members[:1] + [(f"tiny-v3/{name}", DEEP)] + members[1:])
    result = import_stream(stream, store)
    assert result.returncode == 1 and name.encode() in result.stderr and b"nests 100000 levels deep" in result.stderr


def bundle_members(bundle: Path) -> list[tuple[str, bytes]]:
    """(path in the stream, bytes) of every file, sovpack.json first, as an export stream holds them."""
    files = sorted(p.relative_to(bundle).as_posix() for p in bundle.rglob("*") if p.is_file())
    files.remove("sovpack.json")
    return [(f"tiny-v3/{rel}", (bundle / rel).read_bytes()) for rel in ["sovpack.json", *files]]


def import_stream(stream: bytes, store: Path) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, "-m", "sovpack", "import", "-", "--store", str(store)], input=stream, capture_output=True, cwd=ROOT
    )
    assert b"Traceback" not in result.stderr, result.stderr
    return result


def test_a_deeply_nested_signature_is_refused_by_serve(tmp_path, cli, signed_bundle, keys):
    deep_signature(signed_bundle)
    (tmp_path / "s").mkdir()  # serve creates no store: an empty one is an existing empty directory
    result = cli("serve", signed_bundle, "--trust", keys / "alice.pub", "--store", tmp_path / "s", "--port", "1")
    assert "signatures/deep.sig" in refusal(result) and "nests 100000 levels deep" in result.err
    refused = audit_records(tmp_path / "s")[-1]  # the refusal is audited, parse failure or not
    assert refused["event"] == "serve-refused" and refused["exit_code"] == 1 and "nests 100000 levels deep" in refused["reason"]


def test_a_deeply_nested_sovpack_json_is_refused_by_inspect_and_a_stream_import(tmp_path, cli, signed_bundle, store):
    (signed_bundle / "sovpack.json").write_bytes(DEEP)
    assert "sovpack.json is not valid JSON: it nests 100000 levels deep" in refusal(cli("inspect", signed_bundle))
    stream = tar_stream([("tiny-v3/sovpack.json", DEEP)])
    result = import_stream(stream, store)
    assert result.returncode == 1 and b"sovpack.json is not valid JSON: it nests 100000 levels deep" in result.stderr
    assert b"Traceback" not in result.stderr
    refused = audit_records(store)[-1]
    assert (refused["event"], refused["outcome"], refused["source"]) == ("import", "refused", {"kind": "stream"})
    assert "nests 100000 levels deep" in refused["reason"]


@pytest.mark.parametrize("which", ["index.json", "index.sig"])
def test_a_deeply_nested_index_or_index_signature_is_refused(tmp_path, cli, signed_bundle, keys, store, which):
    media = export(cli, signed_bundle, tmp_path / "media", "--key", keys / "alice.key")
    target = media / f"tiny-v3.{which}"
    target.write_bytes(DEEP)
    for command in (("import", media, "--store", store), ("check-volumes", media, "--store", store)):
        message = refusal(cli(*command))
        assert target.name in message and "nests 100000 levels deep" in message


@pytest.mark.parametrize(
    "header",
    [
        DEEP,
        b'{"__metadata__": ' + DEEP + b"}",
        b'{"__metadata__": {"a": ' + b"[" * 10 + b"]" * 10 + b"}}",
    ],
    ids=["top", "metadata-deep", "metadata-shallow"],
)
def test_a_deeply_nested_safetensors_header_is_refused(tmp_path, cli, model_dir, header):
    (model_dir / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header)
    message = refusal(cli("pack", model_dir, "--out", tmp_path / "b", "--name", "tiny"))
    assert "model.safetensors: " in message
    assert "nests" in message or "'__metadata__' must be an object of strings" in message


def test_a_deeply_nested_audit_line_is_refused(cli, store):
    with open(store / "audit.log", "ab") as log:
        log.write(DEEP + b"\n")
    message = refusal(cli("audit", "verify", "--store", store))
    assert "audit.log: line 2 is not an audit record" in message
    assert cli("trust", "threshold", "1", "--store", store).code == 0  # appending after it still works (seq counted from lines)


def test_a_deeply_nested_store_record_is_refused(cli, store):
    (store / "trust" / "policy.json").write_bytes(DEEP)
    message = refusal(cli("trust", "list", "--store", store))
    assert "policy.json" in message and "nests 100000 levels deep" in message


def test_a_deeply_nested_import_record_is_refused(tmp_path, cli, signed_bundle, store):
    assert cli("import", export(cli, signed_bundle, tmp_path / "media"), "--store", store).code == 0
    (store / "records" / "tiny" / "3.json").write_bytes(DEEP)  # the typed record (store/record.py) reads it bounded too
    message = refusal(cli("list", "--store", store))
    assert "records/tiny/3.json is damaged" in message and "nests 100000 levels deep" in message


@pytest.mark.parametrize(
    "witness",
    [DEEP, b'{"records": 1, "head": "", "offset": -2}', b'{"records": -2, "head": ""}', b"[]"],
    ids=["deep", "negative-offset", "negative-count", "not-an-object"],
)
def test_a_damaged_head_witness_is_refused_not_a_traceback(cli, store, witness):
    (store / "state" / "audit-head.json").write_bytes(witness)
    message = refusal(cli("audit", "verify", "--store", store))
    assert "audit-head.json, the audit log's head witness, is damaged" in message
    assert cli("trust", "threshold", "1", "--store", store).code == 0  # the record is written; the witness stays, as evidence
    assert (store / "state" / "audit-head.json").read_bytes() == witness


def test_a_100_mb_safetensors_header_of_empty_objects_is_refused_in_bounded_memory(tmp_path):
    """The issue measured 2.7 GB for 10 s. The parse runs in a child process that reports its own peak RSS."""
    path = tmp_path / "bomb.safetensors"
    entries = b",".join(b'"t%07d":{}' % i for i in range(100_000))
    header = (b"{" + b",".join([entries] * 100))[: 100 * 1024 * 1024]
    path.write_bytes(len(header).to_bytes(8, "little") + header)
    child = (
        "import resource, sys\n"
        "from pathlib import Path\n"
        "from sovpack.errors import FormatError\n"
        "from sovpack.formats.safetensors import inspect_safetensors\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "try:\n"
        "    inspect_safetensors(Path(sys.argv[1]))\n"
        "except FormatError as e:\n"
        "    print(e.detail)\n"
        "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)\n"
    )
    result = subprocess.run([sys.executable, "-c", child, str(path)], capture_output=True, text=True, cwd=ROOT, check=True)
    detail, grown = result.stdout.splitlines()
    assert "objects and arrays, over the limit of" in detail
    assert int(grown) < 4 * len(header), f"the parse took {int(grown) >> 20} MiB for a {len(header) >> 20} MiB header"


def test_a_file_and_a_path_inside_it_are_refused_not_an_io_error(tmp_path, cli, signed_bundle, store):
    metadata = json.loads((signed_bundle / "sovpack.json").read_text())
    readme = next(f for f in metadata["files"] if f["path"] == "README.md")
    metadata["files"].append(dict(readme, path="README.md/inner"))
    metadata["files"].sort(key=lambda f: f["path"])
    raw = json.dumps(metadata).encode()
    stream = tar_stream([("tiny-v3/sovpack.json", raw), ("tiny-v3/README.md", (signed_bundle / "README.md").read_bytes())])
    result = import_stream(stream, store)
    assert result.returncode == 1, result.stderr
    assert b"lists README.md as a file and README.md/inner inside it" in result.stderr


@pytest.mark.parametrize(
    "sparse",
    [
        old_gnu_sparse_member("tiny-v3/config.json"),
        tar_member("tiny-v3/config.json", b"", pax={"GNU.sparse.map": "1,x,3", "GNU.sparse.size": "10"}),
        tar_member("tiny-v3/config.json", b"no newline", pax={"GNU.sparse.major": "1", "GNU.sparse.minor": "0"}),
        tar_member("tiny-v3/config.json", b"", pax={"GNU.sparse.size": "10", "GNU.sparse.offset": "zz"}),
    ],
    ids=["gnu-old", "pax-0.1", "pax-1.0", "pax-0.0"],
)
def test_gnu_sparse_members_in_a_stream_are_refused(signed_bundle, store, sparse):
    metadata = (signed_bundle / "sovpack.json").read_bytes()
    result = import_stream(tar_stream([("tiny-v3/sovpack.json", metadata)], sparse), store)
    assert result.returncode == 1, result.stderr
    assert b"tiny-v3/config.json in the stream is a GNU sparse member; bundles hold only regular files" in result.stderr


# 5. the smaller findings


@pytest.mark.parametrize("which", ["volume", "index"])
def test_a_link_on_media_is_refused(tmp_path, cli, signed_bundle, store, which):
    media = export(cli, signed_bundle, tmp_path / "media")
    target = volumes(media)[0] if which == "volume" else media / "tiny-v3.index.json"
    genuine = tmp_path / "elsewhere" / target.name
    genuine.parent.mkdir()
    target.replace(genuine)
    target.symlink_to(genuine)
    for command in (("import", media, "--store", store), ("check-volumes", media, "--store", store)):
        message = refusal(cli(*command))
        assert f"{target.name} in {media} is a symbolic link" in message


@pytest.mark.parametrize("empty", ["gguf/nothing", "signatures/nothing"])
def test_an_empty_directory_in_a_bundle_is_refused(cli, signed_bundle, keys, empty):
    (signed_bundle / empty).mkdir()
    assert f"{empty}/ is an empty directory" in refusal(cli("verify", signed_bundle, "--trust", keys / "alice.pub"))


def resign_statement(bundle: Path, key_file: Path, edit) -> None:
    raw = read_metadata_bytes(bundle)
    metadata = read_metadata(bundle)
    resources = {f.path: f.sha256 for f in metadata.files} | {"sovpack.json": sha256_bytes(raw)}
    subject, resources = edit(metadata.name, resources)
    key = load_private_key(key_file)
    payload = build_statement(subject, resources)
    (bundle / "signatures" / f"{key_id(key.public_key())}.sig").write_bytes(sign_statement(key, payload))


def test_a_statement_for_another_bundle_is_refused(cli, signed_bundle, keys):
    resign_statement(signed_bundle, keys / "alice.key", lambda name, resources: ("other-model", resources))
    sig = next((signed_bundle / "signatures").glob("*.sig")).relative_to(signed_bundle)
    message = refusal(cli("verify", signed_bundle, "--trust", keys / "alice.pub"))
    assert f"{sig} signs a statement whose subject is bundle 'other-model', but this bundle is 'tiny'" in message


def test_upper_case_digests_are_refused(cli, signed_bundle, keys):
    resign_statement(
        signed_bundle, keys / "alice.key", lambda name, resources: (name, {k: v.upper() for k, v in resources.items()})
    )
    message = refusal(cli("verify", signed_bundle, "--trust", keys / "alice.pub"))
    assert "not a lower-case SHA-256 hex digest" in message and "signatures/" in message
