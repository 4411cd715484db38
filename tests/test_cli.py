"""The command line a new user meets: stores that do not exist, usage lines and errors, output at 80 columns."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
from helpers import ROOT, export, flip_byte, sovpack

# --- a store that does not exist -------------------------------------------------------------

READING_COMMANDS = [
    ["list"],
    ["list", "--json"],
    ["remove", "tiny"],
    ["verify", "tiny"],
    ["trust", "list"],
    ["trust", "remove", "alice"],
    ["trust", "threshold", "2"],
    ["trust", "crl", "add", "issuing.crl"],
    ["audit", "verify"],
    ["audit", "show"],
    ["audit", "syslog", "off"],
    ["serve", "tiny"],
    ["push", "tiny", "127.0.0.1:5000/models/tiny"],
]


@pytest.mark.parametrize("args", READING_COMMANDS, ids=" ".join)
def test_a_mistyped_store_is_a_usage_error_and_is_not_created(cli, tmp_path, args):
    missing = tmp_path / "no" / "such" / "store"
    result = cli(*args, "--store", missing)
    assert result.code == 2, result.out + result.err
    assert f"no store exists at {missing} (--store)" in result.err and "sovpack trust add KEY.pub" in result.err
    assert result.out == "" and not (tmp_path / "no").exists()


def test_commands_that_read_the_store_for_its_trust_need_it_too(cli, signed_bundle, tmp_path):
    out = export(cli, signed_bundle, tmp_path / "out")
    missing = tmp_path / "nowhere"
    for args in (["verify", signed_bundle], ["check-volumes", out], ["import", out], ["pull", "127.0.0.1:5000/models/tiny:3"]):
        result = cli(*args, "--store", missing)
        assert result.code == 2 and f"no store exists at {missing} (--store)" in result.err, (args, result.err)
    assert not missing.exists()


def test_push_of_a_bundle_directory_needs_the_store_it_audits_in(cli, signed_bundle, tmp_path):
    missing = tmp_path / "nowhere"
    result = cli("push", signed_bundle, "127.0.0.1:5000/models/tiny", "--store", missing)
    assert result.code == 2 and f"no store exists at {missing} (--store)" in result.err
    assert not missing.exists()


def test_sovpack_home_pointing_nowhere_is_named(cli, tmp_path, monkeypatch):
    monkeypatch.setenv("SOVPACK_HOME", str(tmp_path / "typo"))
    for args in (["list"], ["audit", "verify"]):
        result = cli(*args)
        assert result.code == 2 and f"no store exists at {tmp_path / 'typo'} ($SOVPACK_HOME)" in result.err
    assert not (tmp_path / "typo").exists()


def test_the_default_store_on_a_fresh_machine(cli, tmp_path, monkeypatch):
    monkeypatch.delenv("SOVPACK_HOME")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    default = tmp_path / "data" / "sovpack"
    result = cli("list")
    assert result.code == 2
    assert f"no store exists yet at {default} (the default store)" in result.err
    assert "`sovpack trust add KEY.pub` or `sovpack import DIR --trust KEY.pub` creates one" in result.err
    assert "--store DIR or set $SOVPACK_HOME" in result.err
    assert not (tmp_path / "data").exists()


def test_a_store_path_that_is_a_file_is_named(cli, tmp_path):
    (tmp_path / "file").write_text("")
    for args in (["list"], ["trust", "add", "KEY.pub"]):
        result = cli(*args, "--store", tmp_path / "file")
        assert result.code == 2 and f"{tmp_path / 'file'} (--store) is not a directory" in result.err


def test_trust_add_and_import_create_the_store_and_say_so(cli, signed_bundle, keys, tmp_path):
    trusting = tmp_path / "trusting"
    added = cli("trust", "add", keys / "alice.pub", "--store", trusting)
    assert added.code == 0 and f"created a new store at {trusting}" in added.err and trusting.is_dir()
    again = cli("trust", "add", keys / "bob.pub", "--store", trusting)
    assert again.code == 0 and "created" not in again.err

    out = export(cli, signed_bundle, tmp_path / "out")
    importing = tmp_path / "importing"
    imported = cli("import", out, "--trust", keys / "alice.pub", "--store", importing)
    assert imported.code == 0 and f"created a new store at {importing}" in imported.err
    assert (importing / "bundles" / "tiny" / "3").is_dir()


def test_refused_for_a_usage_reason_a_creating_command_creates_nothing(cli, keys, tmp_path):
    new = tmp_path / "new"
    for args in (
        ["trust", "add", keys / "nothing.pub"],
        ["trust", "add-root", keys / "nothing.pem"],
        ["trust", "add-root", keys / "alice.pub"],  # not a certificate
        ["import", tmp_path / "no-volumes", "--trust", keys / "alice.pub"],
        ["import", tmp_path, "--trust", keys / "nothing.pub"],
    ):
        result = cli(*args, "--store", new)
        assert result.code == 2 and "created" not in result.err, (args, result.err)
    assert not new.exists()


def test_serve_of_a_missing_bundle_creates_no_default_store(cli, tmp_path, monkeypatch):
    monkeypatch.delenv("SOVPACK_HOME")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    result = cli("serve", "missing")
    assert result.code == 2 and "no store exists yet at" in result.err
    assert not (tmp_path / "data").exists()


# --- usage lines and usage errors ------------------------------------------------------------


def _all_commands():
    import typer

    from sovpack.cli import app

    def walk(command, path):
        yield path
        for name, sub in getattr(command, "commands", {}).items():
            yield from walk(sub, [*path, name])

    return list(walk(typer.main.get_command(app), []))


@pytest.mark.parametrize("path", _all_commands(), ids=lambda p: " ".join(p) or "sovpack")
def test_help_uses_the_readme_placeholders(cli, path):
    result = cli(*path, "--help")
    assert result.code == 0
    assert not re.search(r"[{}]|<(str|path|int|float|text)>", result.out), result.out
    assert result.out.startswith(f"Usage: {' '.join(['sovpack', *path])} [OPTIONS]")


def test_usage_lines_read_as_the_readme_commands(cli):
    expected = {
        ("verify",): ["BUNDLE_OR_NAME[@V]", "--trust DIR_OR_PUBFILE", "--threshold K", "--store DIR"],
        ("serve",): [
            "NAME_OR_BUNDLE",
            "--api-key-file FILE",
            "--port N",
            "--n-gpu-layers auto|N",
            "--alias NAME",
            "--max-n N",
            "--header-timeout SECONDS",
            "--max-pending-connections N",
        ],
        ("export",): ["BUNDLE", "--to DIR|-", "--key KEYFILE", "--password-file FILE", "--volume-size SIZE", "--pkcs11 URI"],
        ("import",): ["DIR_OR_INDEX_OR_-", "--store DIR"],
        ("keygen",): ["NAME", "--dir DIR", "--curve p384|p256", "--pkcs11 URI", "--pin-file FILE"],
        ("sign",): ["BUNDLE", "--key KEYFILE", "--password-file FILE", "--pkcs11 URI", "--pin-file FILE", "--cert CHAIN.pem"],
        ("trust", "add"): ["PUBFILE", "--name NAME"],
        ("trust", "add-root"): ["ROOT.pem", "--name NAME", "--require-eku USAGE", "--subject PATTERN", "--store DIR"],
        ("trust", "crl", "add"): ["FILE", "--issuer CA.pem", "--store DIR"],
        ("remove",): ["NAME[@VERSION]"],
        ("audit", "syslog"): ["TARGET|off", "--store DIR"],
        ("push",): ["NAME_OR_BUNDLE REGISTRY/REPO[:TAG]", "--chunk-size SIZE", "--username USER", "--ca-file FILE"],
        ("pull",): ["REGISTRY/REPO:TAG|REGISTRY/REPO@sha256:D", "--trust DIR_OR_PUBFILE", "--password-file FILE"],
        ("runtime", "build"): ["--out BUNDLE", "--version N", "--gpu cuda", "--source DIR"],
        ("runtime", "install"): ["sovpack-runtime[@V]", "--prefix DIR", "--store DIR"],
        ("runtime", "rollback"): ["--prefix DIR", "--store DIR"],
    }
    for path, pieces in expected.items():
        text = cli(*path, "--help").out
        for piece in pieces:
            assert piece in text, (path, piece)
    assert "Usage: sovpack serve [OPTIONS] NAME_OR_BUNDLE\n" in cli("serve", "--help").out


@pytest.mark.parametrize(
    "args, message, usage",
    [
        (["bogus"], "No such command 'bogus'.", "Usage: sovpack [OPTIONS] COMMAND [ARGS]..."),
        (["serve"], "Missing argument 'NAME_OR_BUNDLE'.", "Usage: sovpack serve [OPTIONS] NAME_OR_BUNDLE"),
        (["verify", "x", "--threshold", "two"], "Invalid value for '--threshold'", "Usage: sovpack verify [OPTIONS]"),
        (["list", "--bogus"], "No such option: --bogus", "Usage: sovpack list [OPTIONS]"),
        (["trust", "frobnicate"], "No such command 'frobnicate'.", "Usage: sovpack trust [OPTIONS] COMMAND"),
    ],
    ids=["unknown command", "missing argument", "bad option value", "unknown option", "unknown subcommand"],
)
def test_typer_usage_errors_are_one_error_line_and_the_usage(args, message, usage):
    result = sovpack(*args, env=os.environ | {"COLUMNS": "80"})
    lines = result.stderr.decode().splitlines()
    assert result.returncode == 2 and result.stdout == b""
    assert len(lines) == 2, lines
    assert lines[0].startswith("error: ") and message in lines[0]
    assert lines[1].startswith(usage) and f"`{usage.split(' [')[0].removeprefix('Usage: ')} -h` for help" in lines[1]


def test_help_stays_free_of_heavy_imports():
    heavy = ("huggingface_hub", "llama_cpp", "fastapi", "uvicorn", "sovpack.store.store")
    probe = (
        "import sys; from sovpack.cli import main; main(['--help']); main(['serve', '--help']);"
        f"print(sorted(m for m in {heavy} if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0 and result.stdout.splitlines()[-1] == "[]", result.stderr


# --- output at 80 columns --------------------------------------------------------------------


def _install(cli, bundle, store, tmp_path, name):
    out = export(cli, bundle, tmp_path / f"out-{name}")
    assert cli("import", out, "--store", store).code == 0


def test_list_at_80_columns_keeps_names_versions_and_dates_on_one_line(cli, model_dir, keys, store, tmp_path):
    long_name = "smollm2-135m-instruct-with-a-name-longer-than-any-terminal-column"
    assert cli("trust", "add", keys / "bob.pub", "--store", store).code == 0
    for name in ("smollm2-135m-instruct", long_name):
        bundle = tmp_path / name
        assert cli("pack", model_dir, "--out", bundle, "--name", name, "--version", "12", "--expires", "2099-01-01").code == 0
        assert cli("sign", bundle, "--key", keys / "alice.key").code == 0
        assert cli("sign", bundle, "--key", keys / "bob.key").code == 0
        _install(cli, bundle, store, tmp_path, name)

    listed = sovpack("list", "--store", store, env=os.environ | {"COLUMNS": "80"})
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.decode().splitlines()
    assert all(len(line) <= 80 for line in lines), lines
    imported = json.loads(cli("list", "--store", store, "--json").out)["bundles"][0]["imported"][:10]
    short = next(line for line in lines if line.startswith("smollm2-135m-instruct "))
    assert re.search(rf"smollm2-135m-instruct +12 .* 2099-01-01 .* {imported}$", short), short
    truncated = next(line for line in lines if line.startswith("smollm2-135m-instruct-w"))
    assert re.match(r"smollm2-135m-instruct-w[a-z-]*… ", truncated) and re.search(
        rf" 12 .* 2099-01-01 .* {imported}$", truncated
    ), truncated


def test_verify_refused_is_one_line_on_stderr_at_80_columns(cli, signed_bundle, keys):
    flip_byte(signed_bundle / "config.json", 3)
    env = os.environ | {"COLUMNS": "80"}
    result = sovpack("verify", signed_bundle, "--trust", keys / "alice.pub", env=env)
    assert result.returncode == 1
    refused = [line for line in result.stderr.decode().splitlines() if line.startswith("REFUSED")]
    assert len(refused) == 1 and refused[0].startswith("REFUSED tiny v3: config.json does not match its digest")
    assert len(refused[0]) > 80 and b"REFUSED" not in result.stdout
    as_json = sovpack("verify", signed_bundle, "--trust", keys / "alice.pub", "--json", env=env)
    assert as_json.returncode == 1 and json.loads(as_json.stdout)["ok"] is False and b"REFUSED" not in as_json.stderr


# --- serve after an import under --trust -----------------------------------------------------


def test_serve_after_an_import_under_trust_file_says_how_to_trust_the_signers(cli, signed_bundle, keys, tmp_path):
    store = tmp_path / "secure"
    out = export(cli, signed_bundle, tmp_path / "out")
    assert cli("import", out, "--trust", keys / "alice.pub", "--store", store).code == 0
    refused = cli("serve", "tiny", "--store", store)
    assert refused.code == 1
    assert "accepted by alice, but only 0 of those keys are still trusted" in refused.err
    assert "trust its signers in this store with `sovpack trust add FILE`" in refused.err and "--trust FILE" in refused.err
    assert cli("trust", "add", keys / "alice.pub", "--store", store).code == 0
    assert cli("verify", "tiny", "--store", store).code == 0
