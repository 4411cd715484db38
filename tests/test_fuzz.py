"""Fuzzing every parser of untrusted bytes, and the commands that read them: no input may give a traceback.

Each parser gets genuine input (written by sovpack or the format's own library) mutated by
hypothesis - bytes flipped, inserted, deleted, repeated, cut, JSON values swapped for any
JSON (deep nesting, huge numbers, wrong types) - and must either accept it or raise the one
documented refusal. That includes the X.509 a certificate signature carries (its chain's DER
mutated, then checked against the trusted root), CRLs from outside and in the store, trusted
roots in the store, and the signing time a statement records. The commands (verify, inspect,
import from a stream, audit verify) must end with a documented exit code, never an exception.

`make test` runs the "test" profile (a few seconds per parser); `make fuzz` sets
SOVPACK_FUZZ=1 for the "fuzz" profile, which runs far more cases. Show the number of cases
run per parser with `pytest tests/test_fuzz.py --hypothesis-show-statistics`.
"""

from __future__ import annotations

import base64
import contextlib
import inspect
import io
import json
import os
import shutil
import struct
import tempfile
from pathlib import Path

import pytest
from builders import card_images, python_wheel, sentencepiece_model, write_gguf, write_safetensors
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sovpack.bundle.metadata import parse_metadata
from sovpack.bundle.signature import parse_signature, parse_statement
from sovpack.bundle.trust import load_trust
from sovpack.cli import main
from sovpack.common import safe_json
from sovpack.errors import FormatError, Refused, SovpackError
from sovpack.formats import examine
from sovpack.formats.gguf import inspect_gguf
from sovpack.formats.images import inspect_image
from sovpack.formats.pickle import hidden_pickle, pickle_stream
from sovpack.formats.safetensors import inspect_safetensors
from sovpack.formats.sentencepiece import inspect_sentencepiece
from sovpack.formats.wheel import inspect_wheel
from sovpack.runtime import installer
from sovpack.runtime.upgrade import bounded_json
from sovpack.store.audit import AuditLog
from sovpack.store.record import read_record
from sovpack.store.store import Store
from sovpack.transfer.import_ import import_bundle
from sovpack.transfer.index import parse_index

_COMMON = {"deadline": None, "database": None, "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large]}
settings.register_profile("test", max_examples=60, **_COMMON)
settings.register_profile("fuzz", max_examples=3000, **_COMMON)
FUZZ = os.environ.get("SOVPACK_FUZZ") == "1"
PROFILE = "fuzz" if FUZZ else "test"
DOCUMENTED_EXIT_CODES = {0, 1, 2, 3}


CASES: dict[str, int] = {}  # cases run per parser or command, reported at the end of the module


def examples(n: int):
    """`n` cases under `make test`, 50 times as many under `make fuzz`; each case is counted under the test's name.

    Goes below @given, so that the count is of cases, not of calls.
    """
    configured = settings(settings.get_profile(PROFILE), max_examples=n * 50 if FUZZ else n)

    def decorate(run):
        name = os.environ.get("PYTEST_CURRENT_TEST", "?").split("::")[-1].split(" ")[0]

        def counted(*args, **kwargs):
            CASES[name] = CASES.get(name, 0) + 1
            return run(*args, **kwargs)

        counted.__signature__ = inspect.signature(run)
        return configured(counted)

    return decorate


@pytest.fixture(scope="module", autouse=True)
def report_cases(request):
    yield
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is not None and capture is not None and CASES:
        with capture.global_and_fixture_disabled():
            reporter.write_line(f"\nfuzz cases run ({PROFILE} profile): " + ", ".join(f"{k} {v}" for k, v in CASES.items()))


# ---- mutations


def json_values():
    scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20)
    return st.recursive(
        scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    )


@st.composite
def mutated(draw, seed: bytes) -> bytes:
    """`seed` with a few byte-level mutations."""
    data = bytearray(seed)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "set", "insert", "delete", "cut", "repeat", "nest"]))
        pos = draw(st.integers(0, max(len(data) - 1, 0)))
        if op == "flip" and data:
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and data:
            data[pos] = draw(st.sampled_from([0, 0x7F, 0x80, 0xFF, ord("{"), ord("["), ord('"'), ord("\\"), ord(".")]))
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        elif op == "delete":
            del data[pos : pos + draw(st.integers(1, 64))]
        elif op == "cut":
            del data[pos:]
        elif op == "repeat":
            end = pos + draw(st.integers(1, 64))
            data[pos:pos] = data[pos:end] * draw(st.integers(1, 8))
        elif op == "nest":
            depth = draw(st.sampled_from([10, 65, 1000, 100_000]))
            data[pos:pos] = b"[" * depth
    return bytes(data)


def _paths(doc, prefix=()):
    yield prefix
    if isinstance(doc, dict):
        for key, value in doc.items():
            yield from _paths(value, (*prefix, key))
    elif isinstance(doc, list):
        for i, value in enumerate(doc):
            yield from _paths(value, (*prefix, i))


@st.composite
def json_mutated(draw, doc: object, encode=lambda d: json.dumps(d).encode()) -> bytes:
    """`doc` with one value swapped for any JSON value (or a key removed), then possibly byte-mutated."""
    doc = json.loads(json.dumps(doc))
    paths = [p for p in _paths(doc) if p]
    path = draw(st.sampled_from(paths))
    parent = doc
    for key in path[:-1]:
        parent = parent[key]
    if isinstance(parent, dict) and draw(st.booleans()):
        del parent[path[-1]]
    else:
        parent[path[-1]] = draw(json_values())
    raw = encode(doc)
    return draw(mutated(raw)) if draw(st.booleans()) else raw


def any_input(seed: bytes, doc: object | None = None):
    """Genuine bytes mutated, JSON-aware mutations when the seed is JSON, and plain random bytes."""
    options = [mutated(seed), st.binary(max_size=512)]
    if doc is not None:
        options.append(json_mutated(doc))
    return st.one_of(*options)


# ---- genuine inputs, made once


@pytest.fixture(scope="module")
def seeds(tmp_path_factory):
    """A signed bundle, its export stream and index, a store with an audit log, and real files of every kind."""
    from builders import write_model_dir

    from sovpack.bundle.keys import generate_key_pair

    root = tmp_path_factory.mktemp("fuzz")
    generate_key_pair("alice", root / "keys", "p256")
    model = write_model_dir(root / "model", gguf=True)
    bundle, media, store = root / "bundle", root / "media", root / "store"
    quiet = contextlib.redirect_stdout(io.StringIO())
    with quiet, contextlib.redirect_stderr(io.StringIO()):
        assert main(["pack", str(model), "--out", str(bundle), "--name", "tiny", "--version", "3"]) == 0
        assert main(["sign", str(bundle), "--key", str(root / "keys" / "alice.key")]) == 0
        assert main(["export", str(bundle), "--to", str(media), "--key", str(root / "keys" / "alice.key")]) == 0
        assert main(["trust", "add", str(root / "keys" / "alice.pub"), "--store", str(store)]) == 0
        assert main(["verify", str(bundle), "--trust", str(root / "keys" / "alice.pub")]) == 0
        assert main(["import", str(media), "--store", str(store)]) == 0
    signature = next((bundle / "signatures").glob("*.sig"))
    pki = _certificate_seeds(root, model)
    images = {path.rsplit(".", 1)[1].upper(): data for path, data in card_images((4, 4)).items()}
    return {
        "root": root,
        "bundle": bundle,
        "media": media,
        "store": store,
        "pub": root / "keys" / "alice.pub",
        "signature": signature.read_bytes(),
        "statement": base64.b64decode(json.loads(signature.read_bytes())["dsseEnvelope"]["payload"]),
        "metadata": (bundle / "sovpack.json").read_bytes(),
        "index": (media / "tiny-v3.index.json").read_bytes(),
        "audit": (store / "audit.log").read_bytes(),
        "safetensors": write_safetensors(root / "w.safetensors").read_bytes(),
        "gguf": write_gguf(root / "w.gguf").read_bytes(),
        "images": images,
        "sentencepiece": sentencepiece_model(),
        "wheel": python_wheel({"demo/data/case.pkl": b"\x80\x04K\x01."}),
        "lock": _runtime_lock(),
        **pki,
    }


def _certificate_seeds(root: Path, model: Path) -> dict:
    """A bundle signed with a certificate chain, a store trusting its root and holding its issuer's CRL."""
    from test_certificates import CA

    ca = CA(root / "ca")
    key, chain, cert = ca.leaf("Officer Jones")
    bundle, store = root / "certified", root / "pki-store"
    quiet = contextlib.redirect_stdout(io.StringIO())
    with quiet, contextlib.redirect_stderr(io.StringIO()):
        assert main(["pack", str(model), "--out", str(bundle), "--name", "tiny", "--version", "3"]) == 0
        assert main(["sign", str(bundle), "--key", str(key), "--cert", str(chain)]) == 0
        assert main(["trust", "add-root", str(ca.root_pem), "--name", "mod-root", "--store", str(store)]) == 0
        crl = ca.crl()  # revokes nobody
        assert main(["trust", "crl", "add", str(crl), "--issuer", str(ca.intermediate_pem), "--store", str(store)]) == 0
        assert main(["verify", str(bundle), "--store", str(store)]) == 0
    signature = next((bundle / "signatures").glob("*.sig"))
    return {
        "certified": bundle,
        "pki_store": store,
        "certificate_signature": signature.read_bytes(),
        "certificate_statement": base64.b64decode(json.loads(signature.read_bytes())["dsseEnvelope"]["payload"]),
        "crl_pem": crl.read_bytes(),
        "crl_der": next((store / "trust" / "crls").glob("*.crl")).read_bytes(),
        "root_pem": ca.root_pem.read_bytes(),
        "intermediate_pem": ca.intermediate_pem,
    }


def _runtime_lock() -> bytes:
    """A runtime-lock.json as `sovpack runtime build` writes it (sovpack/runtime/build.py)."""
    wheels = [{"path": f"wheels/{n}", "size": 1000 + i, "sha256": f"{i:064x}"} for i, n in enumerate(["pip-1-py3-none-any.whl"])]
    return json.dumps(
        {
            "format": installer.LOCK_FORMAT,
            "format_version": installer.LOCK_FORMAT_VERSION,
            "name": installer.RUNTIME_NAME,
            "version": 2,
            "sovpack_version": "0.1.0",
            "requirement": "sovpack[serve]==0.1.0",
            "target": {"python": "3.11", "machine": "x86_64", "platform": "linux-x86_64", "libc": "glibc-2.36"},
            "gpu": None,
            "installer": {"path": installer.INSTALLER_FILE, "sha256": "ab" * 32},
            "pip_wheel": wheels[0]["path"],
            "wheels": wheels,
        },
        indent=2,
    ).encode()


def scratch_file(data: bytes, name: str = "f") -> Path:
    directory = Path(tempfile.mkdtemp(prefix="sovpack-fuzz-"))
    path = directory / name
    path.write_bytes(data)
    return path


@contextlib.contextmanager
def scratch(data: bytes, name: str = "f"):
    path = scratch_file(data, name)
    try:
        yield path
    finally:
        shutil.rmtree(path.parent, ignore_errors=True)


# ---- parsers


def test_safe_json(seeds):
    @given(any_input(seeds["metadata"], json.loads(seeds["metadata"])))
    @examples(300)
    def run(raw):
        try:
            parsed = safe_json.loads(raw, max_bytes=1 << 20)
        except ValueError:
            return
        assert parsed == json.loads(raw)  # what it accepts, it reads as json does

    run()


def _only(refusal: type[Exception], parse, *args) -> None:
    try:
        parse(*args)
    except refusal:
        pass


def test_signature_files(seeds):
    @given(any_input(seeds["signature"], json.loads(seeds["signature"])))
    @examples(200)
    def run(raw):
        _only(Refused, parse_signature, raw, "signatures/x.sig")

    run()


def test_signed_statements(seeds):
    @given(any_input(seeds["statement"], json.loads(seeds["statement"])))
    @examples(200)
    def run(raw):
        _only(Refused, parse_statement, raw, "signatures/x.sig")

    run()


def test_sovpack_json(seeds):
    @given(any_input(seeds["metadata"], json.loads(seeds["metadata"])))
    @examples(300)
    def run(raw):
        _only(Refused, parse_metadata, raw)

    run()


def test_export_index(seeds):
    @given(any_input(seeds["index"], json.loads(seeds["index"])))
    @examples(200)
    def run(raw):
        _only(Refused, parse_index, raw, "tiny-v3.index.json")

    run()


def _safetensors_with(header: bytes, data: bytes) -> bytes:
    return struct.pack("<Q", len(header)) + header + data


def test_safetensors_headers(seeds):
    genuine = seeds["safetensors"]
    (length,) = struct.unpack("<Q", genuine[:8])
    header, data = json.loads(genuine[8 : 8 + length]), genuine[8 + length :]
    headers = json_mutated(header, encode=lambda d: _safetensors_with(json.dumps(d).encode(), data))

    @given(st.one_of(mutated(genuine), headers))
    @examples(300)
    def run(raw):
        with scratch(raw) as path:
            _only(FormatError, inspect_safetensors, path)

    run()


def test_gguf_headers(seeds):
    @given(mutated(seeds["gguf"]))
    @examples(300)
    def run(raw):
        with scratch(raw) as path:
            _only(FormatError, inspect_gguf, path)

    run()


def test_sentencepiece_models(seeds):
    @given(any_input(seeds["sentencepiece"]))
    @examples(300)
    def run(raw):
        _only(FormatError, inspect_sentencepiece, raw, "tokenizer.model")

    run()


@pytest.mark.parametrize("kind", ["PNG", "JPEG", "GIF", "WEBP"])
def test_images(seeds, kind):
    @given(mutated(seeds["images"][kind]))
    @examples(150)
    def run(raw):
        from sovpack.formats.images import image_type

        if image_type(raw):
            _only(FormatError, inspect_image, raw, "card.img")

    run()


def test_pickle_detection_never_raises(seeds):
    @given(st.one_of(st.binary(max_size=256), mutated(b"\x80\x04\x95\x10\x00\x00\x00\x00\x00\x00\x00]\x94(K\x01K\x02e.")))
    @examples(300)
    def run(raw):
        pickle_stream(raw)
        hidden_pickle(raw, scan_local_headers=True)

    run()


def test_the_gate(seeds):
    genuine = [seeds["safetensors"], seeds["gguf"], seeds["sentencepiece"], seeds["metadata"], *seeds["images"].values()]
    genuine.append(seeds["wheel"])

    @given(st.one_of(st.binary(max_size=512), st.sampled_from(genuine).flatmap(mutated)), st.booleans())
    @examples(300)
    def run(raw, allowed):
        with scratch(raw, "file") as path:
            _only(FormatError, examine, path, "file", ["*"] if allowed else [])

    run()


def test_python_wheels(seeds):
    @given(mutated(seeds["wheel"]), st.sampled_from(["demo-1.0-py3-none-any.whl", "file"]))
    @examples(300)
    def run(raw, name):
        _only(FormatError, inspect_wheel, raw, name)
        with scratch(raw, name) as path:
            _only(FormatError, examine, path, f"wheels/{name}", ["wheels/*"])

    run()


def test_runtime_locks(seeds):
    """The lock as the installer on the media reads it (its own bounded parse) and as sovpack reads it (safe_json)."""

    @given(any_input(seeds["lock"], json.loads(seeds["lock"])))
    @examples(300)
    def run(raw):
        for loads in (installer.bounded_loads, bounded_json):
            _only(installer.Refused, installer.parse_lock, raw, "runtime-lock.json", loads)
        try:
            parsed = installer.bounded_loads(raw, 1 << 20)
        except ValueError:
            return
        assert parsed == json.loads(raw)  # what it accepts, it reads as json does

    run()


def test_audit_lines(seeds):
    @given(mutated(seeds["audit"]))
    @examples(150)
    def run(raw):
        with scratch(raw, "audit.log") as path:
            log = AuditLog(path)
            _only(Refused, log.verify_chain)
            _only(Refused, log.records)

    run()


def test_head_witness(seeds):
    witness = (seeds["store"] / "state" / "audit-head.json").read_bytes()
    for damaged in (b'{"records":1,"head":"","offset":-2}', b'{"records":-2,"head":""}', b"[]"):  # were tracebacks
        with scratch(seeds["audit"], "audit.log") as path:
            (path.parent / "audit-head.json").write_bytes(damaged)
            with pytest.raises(Refused, match="is damaged"):
                AuditLog(path, path.parent / "audit-head.json").verify_chain()

    @given(any_input(witness, json.loads(witness)))
    @examples(150)
    def run(raw):
        with scratch(seeds["audit"], "audit.log") as path:
            (path.parent / "audit-head.json").write_bytes(raw)
            log = AuditLog(path, path.parent / "audit-head.json")
            _only(Refused, log.verify_chain)
            log.append("fuzz")  # a damaged witness stays as evidence; the record is written all the same

    run()


def test_store_records(seeds):
    record = (seeds["store"] / "records" / "tiny" / "3.json").read_bytes()

    @given(any_input(record, json.loads(record)))
    @examples(200)
    def run(raw):
        with scratch(raw, "3.json") as path:
            _only(Refused, read_record, path, "tiny", 3)

    run()


def test_oci_manifests(seeds):
    from sovpack.bundle.metadata import parse_metadata
    from sovpack.oci.layout import build_artifact, parse_manifest

    bundle = seeds["bundle"]
    signatures = {f"signatures/{p.name}": p.read_bytes() for p in (bundle / "signatures").glob("*.sig")}
    manifest = build_artifact(parse_metadata(seeds["metadata"]), seeds["metadata"], signatures).manifest
    metadata = parse_metadata(seeds["metadata"])
    with pytest.raises(Refused, match="not a ModelPack model artifact"):  # a config that is not an object (was AttributeError)
        parse_manifest(json.dumps({"schemaVersion": 2, "config": [1]}).encode(), "registry.example/tiny:3")

    @given(any_input(manifest, json.loads(manifest)))
    @examples(200)
    def run(raw):
        try:
            parse_manifest(raw, "registry.example/tiny:3").check_against(metadata, "registry.example/tiny:3")
        except Refused:
            pass

    run()


def _chain_mutated(signature: bytes):
    """The certificate signature with one certificate of its chain byte-mutated (still base64 in valid JSON)."""
    doc = json.loads(signature)
    chain = doc["verificationMaterial"]["x509CertificateChain"]["certificates"]

    @st.composite
    def build(draw):
        i = draw(st.integers(0, len(chain) - 1))
        der = draw(mutated(base64.b64decode(chain[i]["rawBytes"])))
        copy = json.loads(json.dumps(doc))
        copy["verificationMaterial"]["x509CertificateChain"]["certificates"][i]["rawBytes"] = base64.b64encode(der).decode()
        return json.dumps(copy).encode()

    return build()


def _certificate_policy(seeds):
    from sovpack.store.store import Store

    return Store(seeds["pki_store"]).trust_policy()


def _with_chain_der(signature: bytes, i: int, change) -> bytes:
    doc = json.loads(signature)
    entry = doc["verificationMaterial"]["x509CertificateChain"]["certificates"][i]
    entry["rawBytes"] = base64.b64encode(change(base64.b64decode(entry["rawBytes"]))).decode()
    return json.dumps(doc).encode()


def test_certificates_cryptography_parses_lazily_are_refused(seeds):
    """What fuzzing found: cryptography parsed these only when a field was read, raising InvalidVersion,
    UnsupportedAlgorithm or a warning (not ValueError) out of verify, inspect and trust crl add."""
    from sovpack.bundle.certificates import load_crl

    genuine = seeds["certificate_signature"]
    ec_key = bytes.fromhex("06072a8648ce3d0201")  # the OID of an EC public key

    def serial_negative(der: bytes) -> bytes:
        at = der.index(b"\x02\x14", 4) + 2  # the 20-byte serial after the version
        return der[:at] + bytes([der[at] | 0x80]) + der[at + 1 :]

    for i, change in [
        (0, lambda der: der.replace(b"\xa0\x03\x02\x01\x02", b"\xa0\x03\x02\x01\x0a", 1)),  # version 11: InvalidVersion
        (1, lambda der: der.replace(ec_key, ec_key[:-1] + b"\x05", 1)),  # unknown key type: UnsupportedAlgorithm
        (0, serial_negative),  # a serial that is not positive: CryptographyDeprecationWarning
    ]:
        changed = _with_chain_der(genuine, i, change)
        assert changed != genuine
        with pytest.raises(Refused, match="not a certificate sovpack can read"):
            parse_signature(changed, "signatures/x.sig")
    crl = seeds["crl_der"].replace(b"\x02\x01\x01", b"\x02\x01\x7f", 1)  # CRL version 128: InvalidVersion
    with scratch(crl, "issuing.crl") as path, pytest.raises(Refused, match="not a certificate revocation list"):
        load_crl(path)


def test_certificate_chains(seeds):
    """Signature files carrying a certificate chain, the chain's DER mutated; what parses is checked against the root."""
    from datetime import datetime, timezone

    from sovpack.bundle.verify import _certified_signer

    genuine = seeds["certificate_signature"]
    policy = _certificate_policy(seeds)
    now = datetime.now(timezone.utc)

    @given(st.one_of(_chain_mutated(genuine), any_input(genuine, json.loads(genuine))))
    @examples(300)
    def run(raw):
        try:
            sig = parse_signature(raw, "signatures/x.sig")
            if sig.certificates:
                _certified_signer(sig, parse_statement(sig.payload, sig.name), policy, now)
        except Refused:
            pass

    run()


def test_certificate_revocation_lists(seeds):
    """CRLs from outside (trust crl add) and as the store holds them (trust/crls/), DER and PEM, mutated."""
    from sovpack.bundle.certificates import load_crl
    from sovpack.store.store import Store

    @given(st.one_of(mutated(seeds["crl_der"]), mutated(seeds["crl_pem"])))
    @examples(200)
    def run(raw):
        with scratch(raw, "issuing.crl") as path:
            _only(Refused, load_crl, path)
        store = Path(tempfile.mkdtemp(prefix="sovpack-fuzz-")) / "store"
        try:
            shutil.copytree(seeds["pki_store"], store)
            (held,) = (store / "trust" / "crls").glob("*.crl")
            held.write_bytes(raw)
            _only(Refused, Store(store).crls)
            with scratch(raw, "issuing.crl") as path:
                try:
                    Store(store).add_crl(path, seeds["intermediate_pem"])
                except SovpackError as e:
                    assert e.exit_code in (1, 2), e
        finally:
            shutil.rmtree(store.parent, ignore_errors=True)

    run()


def test_trusted_roots_in_the_store(seeds):
    """trust/roots/NAME.pem and its rule NAME.json, mutated: read as a root, or refused as damaged."""
    from sovpack.store.store import Store

    rule = b'{"require_eku": "codeSigning", "subject": "CN=*"}'

    @given(st.one_of(mutated(seeds["root_pem"]), st.just(seeds["root_pem"])), any_input(rule, json.loads(rule)))
    @examples(150)
    def run(pem, rule_bytes):
        store = Path(tempfile.mkdtemp(prefix="sovpack-fuzz-")) / "store"
        try:
            shutil.copytree(seeds["pki_store"], store)
            (store / "trust" / "roots" / "mod-root.pem").write_bytes(pem)
            (store / "trust" / "roots" / "mod-root.json").write_bytes(rule_bytes)
            _only(Refused, Store(store).trusted_roots)
        finally:
            shutil.rmtree(store.parent, ignore_errors=True)

    run()


def _with_signed_at(statement: bytes, value) -> bytes:
    doc = json.loads(statement)
    doc["predicate"]["signed_at"] = value
    return json.dumps(doc).encode()


def test_signing_times(seeds):
    """The signed_at a statement records, any text or JSON value; one that parses is then the time a chain is checked at."""
    from datetime import datetime, timezone

    from sovpack.bundle.signature import SignatureFile
    from sovpack.bundle.verify import _certified_signer

    statement = seeds["certificate_statement"]
    sig = parse_signature(seeds["certificate_signature"], "signatures/x.sig")
    policy = _certificate_policy(seeds)
    now = datetime.now(timezone.utc)
    times = st.one_of(
        st.text(max_size=30),
        st.datetimes().map(lambda t: t.strftime("%Y-%m-%dT%H:%M:%SZ")),
        st.sampled_from(["0001-01-01T00:00:00Z", "9999-12-31T23:59:59Z", "2027-02-30T00:00:00Z", "2027-01-01T24:00:00Z"]),
        json_values(),
    )

    @given(st.one_of(times.map(lambda t: _with_signed_at(statement, t)), json_mutated(json.loads(statement))))
    @examples(200)
    def run(raw):
        try:
            parsed = parse_statement(raw, "signatures/x.sig")
            _certified_signer(SignatureFile(sig.name, sig.key_hint, raw, sig.signature, sig.certificates), parsed, policy, now)
        except Refused:
            pass

    run()


# ---- commands on untrusted input


def run_cli(*args) -> int:
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        code = main([str(a) for a in args])
    assert code in DOCUMENTED_EXIT_CODES, code
    return code


def _bundle_copy(seeds) -> Path:
    copy = Path(tempfile.mkdtemp(prefix="sovpack-fuzz-")) / "bundle"
    shutil.copytree(seeds["bundle"], copy)
    return copy


def test_verify_command(seeds):
    signature_name = next((seeds["bundle"] / "signatures").glob("*.sig")).name

    @given(
        st.sampled_from(["sovpack.json", f"signatures/{signature_name}", "config.json", "model.safetensors"]),
        st.data(),
    )
    @examples(40)
    def run(target, data):
        bundle = _bundle_copy(seeds)
        try:
            raw = (bundle / target).read_bytes()
            doc = json.loads(raw) if target.endswith((".json", ".sig")) else None
            (bundle / target).write_bytes(data.draw(any_input(raw, doc)))
            run_cli("verify", bundle, "--trust", seeds["pub"])
        finally:
            shutil.rmtree(bundle.parent, ignore_errors=True)

    run()


def test_verify_command_with_certificate_signatures(seeds):
    genuine = seeds["certificate_signature"]
    signature_name = next((seeds["certified"] / "signatures").glob("*.sig")).name

    @given(st.one_of(_chain_mutated(genuine), any_input(genuine, json.loads(genuine))))
    @examples(40)
    def run(raw):
        bundle = Path(tempfile.mkdtemp(prefix="sovpack-fuzz-")) / "bundle"
        try:
            shutil.copytree(seeds["certified"], bundle)
            (bundle / "signatures" / signature_name).write_bytes(raw)
            run_cli("verify", bundle, "--store", seeds["pki_store"], "--json")
            run_cli("inspect", bundle)
        finally:
            shutil.rmtree(bundle.parent, ignore_errors=True)

    run()


def test_inspect_command(seeds):
    @given(any_input(seeds["metadata"], json.loads(seeds["metadata"])))
    @examples(60)
    def run(raw):
        bundle = _bundle_copy(seeds)
        try:
            (bundle / "sovpack.json").write_bytes(raw)
            run_cli("inspect", bundle)
            run_cli("inspect", bundle, "--json")
        finally:
            shutil.rmtree(bundle.parent, ignore_errors=True)

    run()


def test_import_from_a_stream(seeds):
    stream = b"".join(p.read_bytes() for p in sorted(seeds["media"].glob("tiny-v3.0*")))

    @given(st.one_of(mutated(stream), mutated(stream[:4096])))
    @examples(40)
    def run(raw):
        store_dir = Path(tempfile.mkdtemp(prefix="sovpack-fuzz-"))
        try:
            import_bundle("-", Store(store_dir), load_trust([seeds["pub"]]), stdin=io.BytesIO(raw))
        except SovpackError as e:
            assert e.exit_code in (1, 3), e  # 3: a stream cut short can also read as an I/O failure
        finally:
            shutil.rmtree(store_dir, ignore_errors=True)

    run()


def test_audit_verify_command(seeds):
    @given(mutated(seeds["audit"]))
    @examples(60)
    def run(raw):
        store = Path(tempfile.mkdtemp(prefix="sovpack-fuzz-")) / "store"
        try:
            shutil.copytree(seeds["store"], store)
            (store / "audit.log").write_bytes(raw)
            assert run_cli("audit", "verify", "--store", store) in (0, 1)
            assert run_cli("audit", "show", "--store", store) in (0, 1)
        finally:
            shutil.rmtree(store.parent, ignore_errors=True)

    run()
