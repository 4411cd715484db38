"""Signing with keys on a PKCS#11 token: a real SoftHSM2 token (Debian `softhsm2`, which .ci/run installs)
initialised in a temporary directory, through python-pkcs11; the signatures checked by sovpack and by model-signing.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pkcs11
import pytest
from test_bundle import model_signing_verify

from sovpack.bundle.keys import key_id, load_public_key
from sovpack.bundle.pkcs11 import parse_uri
from sovpack.errors import UsageError

MODULE_PATHS = (Path("/usr/lib/softhsm/libsofthsm2.so"), Path("/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so"))
PIN, TOKEN = "4321", "officer-card"


def softhsm_module() -> Path:
    """SoftHSM2's module; skip without it, except in CI (CI=true), where its absence is a failure."""
    module = next((p for p in MODULE_PATHS if p.is_file()), None)
    if module is None or shutil.which("softhsm2-util") is None:
        message = "SoftHSM2 is not installed (apt-get install softhsm2)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return module


@pytest.fixture(scope="session")
def softhsm_conf(tmp_path_factory) -> Path:
    """One SoftHSM2 configuration for the session: the module reads it once per process, when first loaded."""
    directory = tmp_path_factory.mktemp("softhsm")
    (directory / "tokens").mkdir()
    conf = directory / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {directory / 'tokens'}\nobjectstore.backend = file\nlog.level = ERROR\n")
    return conf


@pytest.fixture
def token(tmp_path, monkeypatch, softhsm_conf):
    """A freshly initialised SoftHSM2 token, with a label of its own (TOKEN-N); returns the URI naming it."""
    module = softhsm_module()
    label = f"{TOKEN}-{len(list((softhsm_conf.parent / 'tokens').iterdir()))}"
    monkeypatch.setenv("SOFTHSM2_CONF", str(softhsm_conf))
    subprocess.run(
        ["softhsm2-util", "--init-token", "--free", "--label", label, "--pin", PIN, "--so-pin", "87654321"],
        check=True,
        capture_output=True,
    )
    monkeypatch.setenv("SOVPACK_PKCS11_MODULE", str(module))
    pkcs11.lib(str(module)).reinitialize()  # the in-process module lists its slots again (a new process does anyway)
    (tmp_path / "pin").write_text(PIN + "\n")
    return f"pkcs11:token={label}"


def label_of(uri: str) -> str:
    return uri.removeprefix("pkcs11:token=")


def keygen_on_token(cli, tmp_path, uri: str, name: str = "officer", curve: str = "p384"):
    return cli("keygen", name, "--dir", tmp_path / "pub", "--pkcs11", uri, "--pin-file", tmp_path / "pin", "--curve", curve)


@pytest.mark.parametrize("curve", ["p384", "p256"])
def test_keygen_sign_verify_with_a_token_key(cli, tmp_path, token, signed_bundle, curve):
    uri = f"{token};object=officer;id=%01"
    made = keygen_on_token(cli, tmp_path, uri, curve=curve)
    assert made.code == 0, made.err
    public = tmp_path / "pub" / "officer.pub"
    assert "cannot be exported" in made.out and not (tmp_path / "pub" / "officer.key").exists()
    assert load_public_key(public).curve.key_size == (384 if curve == "p384" else 256)

    signed = cli("sign", signed_bundle, "--pkcs11", uri, "--pin-file", tmp_path / "pin")
    assert signed.code == 0, signed.err
    verified = cli("verify", signed_bundle, "--trust", public, "--json")
    assert verified.code == 0, verified.out
    signature = signed_bundle / "signatures" / f"{key_id(load_public_key(public))}.sig"
    interop = model_signing_verify(signed_bundle, signature, public)
    assert interop.returncode == 0, interop.stdout + interop.stderr


def test_the_object_can_be_named_by_id_alone(cli, tmp_path, token, signed_bundle):
    assert keygen_on_token(cli, tmp_path, f"{token};object=officer;id=%0a%0b").code == 0
    signed = cli("sign", signed_bundle, "--pkcs11", f"{token};id=%0A%0B", "--pin-file", tmp_path / "pin")
    assert signed.code == 0, signed.err
    assert cli("verify", signed_bundle, "--trust", tmp_path / "pub" / "officer.pub").code == 0


def test_wrong_pin_is_a_refusal_naming_the_token(cli, tmp_path, token, signed_bundle):
    uri = f"{token};object=officer"
    assert keygen_on_token(cli, tmp_path, uri).code == 0
    before = sorted(p.name for p in (signed_bundle / "signatures").iterdir())
    (tmp_path / "wrong").write_text("0000")
    result = cli("sign", signed_bundle, "--pkcs11", uri, "--pin-file", tmp_path / "wrong")
    assert result.code == 1
    assert f"token '{label_of(token)}' refused the PIN" in result.err
    assert sorted(p.name for p in (signed_bundle / "signatures").iterdir()) == before


def test_missing_object_and_missing_token_are_usage_errors_naming_them(cli, tmp_path, token, signed_bundle):
    assert keygen_on_token(cli, tmp_path, f"{token};object=officer").code == 0
    missing = cli("sign", signed_bundle, "--pkcs11", f"{token};object=nobody", "--pin-file", tmp_path / "pin")
    assert missing.code == 2
    assert f"token '{label_of(token)}' holds no key with label 'nobody'" in missing.err
    no_token = cli("sign", signed_bundle, "--pkcs11", "pkcs11:token=lost-card;object=officer", "--pin-file", tmp_path / "pin")
    assert no_token.code == 2 and "no token 'lost-card'" in no_token.err


def test_keygen_refuses_a_second_key_with_the_same_label(cli, tmp_path, token):
    assert keygen_on_token(cli, tmp_path, f"{token};object=officer").code == 0
    again = keygen_on_token(cli, tmp_path, f"{token};object=officer", name="other")
    assert again.code == 2 and "already holds a key with label 'officer'" in again.err
    assert not (tmp_path / "pub" / "other.pub").exists()


def test_no_pin_without_a_terminal_is_a_usage_error(cli, tmp_path, token, signed_bundle):
    result = cli("sign", signed_bundle, "--pkcs11", f"{token};object=officer")
    assert result.code == 2 and f"token '{label_of(token)}' needs its PIN: give --pin-file" in result.err


def test_export_signs_the_index_with_a_token_key(cli, tmp_path, token, signed_bundle):
    uri = f"{token};object=officer"
    assert keygen_on_token(cli, tmp_path, uri).code == 0
    exported = cli("export", signed_bundle, "--to", tmp_path / "media", "--pkcs11", uri, "--pin-file", tmp_path / "pin")
    assert exported.code == 0, exported.err
    assert next((tmp_path / "media").glob("*.index.sig"), None) is not None
    trust = ("--trust", tmp_path / "keys" / "alice.pub", "--trust", tmp_path / "pub" / "officer.pub")
    imported = cli("import", tmp_path / "media", *trust, "--store", tmp_path / "s")
    assert imported.code == 0, imported.err
    assert "not in the trust set" not in imported.out + imported.err


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("token=x;object=y", "must start with 'pkcs11:'"),
        ("pkcs11:token=x;object=y;pin-value=1234", "must not carry the PIN"),
        ("pkcs11:token=x;object=y?pin-source=file:/p", "not with pin-source"),
        ("pkcs11:object=y", "names no token"),
        ("pkcs11:token=x", "names no key"),
        ("pkcs11:token=x;object=y;colour=red", "unknown or malformed attribute 'colour'"),
        ("pkcs11:token=x;object=y?module-path=/nonexistent.so", "PKCS#11 module /nonexistent.so"),
    ],
)
def test_uris_sovpack_refuses(uri, message, monkeypatch):
    monkeypatch.setenv("SOVPACK_PKCS11_MODULE", str(Path(__file__)))
    with pytest.raises(UsageError, match=message.replace("(", r"\(").replace("?", r"\?")):
        parse_uri(uri)
    assert "1234" not in message


def test_uri_percent_encoding_and_module_from_the_uri():
    uri = parse_uri(f"pkcs11:token=My%20Card;object=officer;id=%01%ff?module-path={Path(__file__)}")
    assert (uri.token, uri.object, uri.id, uri.module) == ("My Card", "officer", b"\x01\xff", Path(__file__))
