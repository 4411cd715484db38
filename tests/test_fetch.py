"""sovpack fetch: the real huggingface_hub client, over a real loopback socket, against tests/hubserver.py."""

from __future__ import annotations

import hashlib
import json
import pickle
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from builders import write_gguf, write_safetensors
from hubserver import HubServer, git_blob_id
from huggingface_hub import constants

import sovpack.fetch.hub
from sovpack.bundle.directory import read_metadata, scan_tree
from sovpack.bundle.metadata import parse_metadata
from sovpack.bundle.pack import StagedBundle
from sovpack.common.sizes import human_size
from sovpack.errors import Refused, UsageError
from sovpack.fetch.download import bundle_name
from sovpack.fetch.hub import Hub, RemoteFile
from sovpack.fetch.plan import matches, select_gguf_files, select_model_files
from sovpack.fetch.spec import load_spec, parse_gguf_option, parse_repo_ref

ROOT = Path(__file__).resolve().parent.parent
MODEL = "org/tiny"
GGUF = "quant/tiny-GGUF"
MIB = 1 << 20
HEX40 = re.compile(r"^[0-9a-f]{40}$")
staging_dir = StagedBundle.staging_dir


@pytest.fixture(autouse=True)
def fast_retries(hf_home, monkeypatch):
    """Every test runs against an isolated huggingface_hub home (conftest) and retries without sleeping."""
    monkeypatch.setattr(sovpack.fetch.hub, "RETRY_WAIT", 0.0)
    return hf_home


@pytest.fixture
def server():
    with HubServer() as hub:
        yield hub


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def model_files(tmp_path: Path, weights_mib: float = 0) -> dict[str, bytes]:
    """A small model repository as the Hub holds one, with files the default selection must leave out."""
    import numpy as np

    tensors = None
    if weights_mib:
        n = int(weights_mib * MIB) // 4
        tensors = {"model.embed_tokens.weight": np.random.default_rng(1).standard_normal(n).astype(np.float32)}
    weights = write_safetensors(tmp_path / "src" / "model.safetensors", tensors).read_bytes()
    return {
        "model.safetensors": weights,
        "config.json": json.dumps({"architectures": ["LlamaForCausalLM"], "hidden_size": 16}).encode(),
        "generation_config.json": b'{"max_new_tokens": 32}',
        "tokenizer.json": json.dumps({"version": "1.0", "model": {"type": "BPE"}}).encode(),
        "tokenizer_config.json": json.dumps({"chat_template": "{{ messages }}"}).encode(),
        "README.md": b"# tiny\n",
        "LICENSE": b"Apache-2.0\n",
        ".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n",
        "onnx/model.onnx": b"not selected by default",
        "pytorch_model.bin": pickle.dumps({"w": [1, 2, 3]}),
    }


DEFAULT_SELECTED = {
    "model.safetensors",
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "README.md",
    "LICENSE",
}


def gguf_files(tmp_path: Path) -> dict[str, bytes]:
    out = tmp_path / "gguf-src"
    names = ["tiny-Q4_K_M.gguf", "tiny-Q8_0.gguf", "tiny-F16-00001-of-00002.gguf", "tiny-F16-00002-of-00002.gguf"]
    files = {name: write_gguf(out / name, n_tensors=i + 1).read_bytes() for i, name in enumerate(names)}
    files["README.md"] = b"# GGUF builds\n"
    return files


@pytest.fixture
def repos(server, tmp_path):
    """org/tiny (main, tag v1) and quant/tiny-GGUF; returns their commits."""
    model = model_files(tmp_path)
    commit = server.add_repo(MODEL, model, tags=["v1"])
    gguf_commit = server.add_repo(GGUF, gguf_files(tmp_path))
    return {"model": commit, "gguf": gguf_commit, "files": model}


def run_fetch(cli, server, *args):
    return cli("fetch", *args, "--endpoint", server.url)


def resolve_gets(server, suffix: str = "") -> list:
    return [r for r in server.requests if r.method == "GET" and "/resolve/" in r.path and r.path.endswith(suffix)]


def hub_file(server, repo: str, path: str, data: bytes, commit: str) -> RemoteFile:
    lfs = sha256(data) if path.endswith((".safetensors", ".gguf")) or len(data) > 1024 else None
    from hubserver import lfs_pointer

    blob = git_blob_id(lfs_pointer(lfs, len(data))) if lfs else git_blob_id(data)
    return RemoteFile(repo, commit, path, len(data), blob, lfs)


# --------------------------------------------------------------------------- the bundle


def test_fetch_writes_a_bundle_like_pack_with_provenance(cli, server, repos, tmp_path, keys):
    out = tmp_path / "bundle"
    result = run_fetch(cli, server, MODEL, "--out", out, "--name", "tiny", "--version", "2", "--expires", "2030-01-01")
    assert result.code == 0, result.err

    metadata = parse_metadata((out / "sovpack.json").read_bytes())  # the schema pack writes, validated
    assert (metadata.name, metadata.version) == ("tiny", 2)
    assert metadata.expires.year == 2030 and metadata.created_by.startswith("sovpack ")
    assert {f.path for f in metadata.files} == DEFAULT_SELECTED
    assert set(scan_tree(out).files) == DEFAULT_SELECTED | {"sovpack.json"}  # nothing else: no state, no partials
    assert not staging_dir(out).exists()
    for f in metadata.files:
        data = repos["files"][f.path]
        assert (f.size, f.sha256) == (len(data), sha256(data))
        assert (out / f.path).read_bytes() == data
        source = f.source
        assert source["type"] == "hub" and source["endpoint"] == server.url and source["repo"] == MODEL
        assert source["commit"] == repos["model"] and HEX40.match(source["commit"]) and source["path"] == f.path
        if f.path == "model.safetensors":
            assert source["lfs_sha256"] == sha256(data) and "git_blob_id" not in source
        else:
            assert source["git_blob_id"] == git_blob_id(data) and "lfs_sha256" not in source
    weights = metadata.file("model.safetensors")
    assert (weights.role, weights.format, weights.details["tensor_count"]) == ("weights", "safetensors", 2)
    assert metadata.sources == [
        {
            "type": "hub",
            "endpoint": server.url,
            "repo": MODEL,
            "revision": "main",
            "commit": repos["model"],
            "role": "model",
            "include": [],
            "exclude": [],
        }
    ]
    assert f"commit {repos['model']}" in result.out and f"sovpack sign {out}" in result.out

    assert cli("sign", out, "--key", keys / "alice.key").code == 0
    verified = cli("verify", out, "--trust", keys / "alice.pub")
    assert verified.code == 0, verified.out


def test_revision_tag_and_commit_are_resolved_once_and_downloads_are_pinned(cli, server, repos, tmp_path):
    server.add_repo(MODEL, {**repos["files"], "config.json": b'{"moved": true}'})  # main moves on
    server.clear_requests()

    assert run_fetch(cli, server, f"{MODEL}@v1", "--out", tmp_path / "tag").code == 0
    metadata = read_metadata(tmp_path / "tag")
    assert metadata.sources[0]["revision"] == "v1" and metadata.sources[0]["commit"] == repos["model"]
    assert (tmp_path / "tag" / "config.json").read_bytes() == repos["files"]["config.json"]
    assert {r.path.split("/resolve/")[1].split("/")[0] for r in resolve_gets(server)} == {repos["model"]}

    assert run_fetch(cli, server, f"{MODEL}@{repos['model']}", "--out", tmp_path / "commit").code == 0
    assert read_metadata(tmp_path / "commit").sources[0]["commit"] == repos["model"]


def test_include_replaces_and_exclude_trims_the_default_selection(cli, server, repos, tmp_path):
    out = tmp_path / "b"
    result = run_fetch(
        cli, server, MODEL, "--out", out, "--include", "*.json", "--include", "model.safetensors", "--exclude", "generation_*"
    )
    assert result.code == 0, result.err
    assert {f.path for f in read_metadata(out).files} == {
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "model.safetensors",
    }
    assert read_metadata(out).sources[0]["include"] == ["*.json", "model.safetensors"]

    folder = run_fetch(cli, server, MODEL, "--out", tmp_path / "onnx", "--include", "onnx/", "--include", "config.json")
    assert folder.code == 0, folder.err
    assert {f.path for f in read_metadata(tmp_path / "onnx").files} == {"onnx/model.onnx", "config.json"}


def test_gguf_builds_from_another_repo_with_split_files_kept_together(cli, server, repos, tmp_path):
    out = tmp_path / "b"
    result = run_fetch(
        cli, server, MODEL, "--out", out, "--gguf", f"{GGUF}:*q4_k_m*.gguf", "--gguf", f"{GGUF}@main:*F16-00001-of-00002.gguf"
    )
    assert result.code == 0, result.err
    metadata = read_metadata(out)
    ggufs = {f.path: f for f in metadata.files if f.format == "gguf"}
    assert set(ggufs) == {"tiny-Q4_K_M.gguf", "tiny-F16-00001-of-00002.gguf", "tiny-F16-00002-of-00002.gguf"}
    for f in ggufs.values():
        assert f.source["repo"] == GGUF and f.source["commit"] == repos["gguf"] and f.source["lfs_sha256"] == f.sha256
        assert f.details["chat_template_sha256"]
    assert [(s["repo"], s["revision"], s["commit"], s["role"]) for s in metadata.sources] == [
        (MODEL, "main", repos["model"], "model"),
        (GGUF, "main", repos["gguf"], "gguf"),
        (GGUF, "main", repos["gguf"], "gguf"),
    ]
    assert "README.md" in {f.path for f in metadata.files}
    assert metadata.file("README.md").source["repo"] == MODEL  # only .gguf files come from --gguf


def test_same_path_from_two_repos_is_a_usage_error_naming_both(cli, server, repos, tmp_path):
    server.add_repo(
        "other/tiny-GGUF", {"model.safetensors.gguf": b"x", "tiny-Q4_K_M.gguf": gguf_files(tmp_path)["tiny-Q4_K_M.gguf"]}
    )
    server.clear_requests()
    result = run_fetch(
        cli, server, MODEL, "--out", tmp_path / "b", "--gguf", f"{GGUF}:*Q4_K_M.gguf", "--gguf", "other/tiny-GGUF:*Q4_K_M.gguf"
    )
    assert result.code == 2
    assert "tiny-Q4_K_M.gguf" in result.err and GGUF in result.err and "other/tiny-GGUF" in result.err
    assert not resolve_gets(server) and not (tmp_path / "b").exists() and not staging_dir(tmp_path / "b").exists()


def test_repo_with_only_pickle_weights_is_refused_before_any_download(cli, server, tmp_path):
    server.add_repo("org/old", {"pytorch_model.bin": pickle.dumps({"w": 1}), "config.json": b"{}", "README.md": b"# old\n"})
    server.clear_requests()
    result = run_fetch(cli, server, "org/old", "--out", tmp_path / "b")
    assert result.code == 1
    assert "pickle" in result.err and "pytorch_model.bin" in result.err and "Nothing was downloaded" in result.err
    assert not [r for r in server.requests if "/resolve/" in r.path]
    assert not (tmp_path / "b").exists() and not staging_dir(tmp_path / "b").exists()


def test_pickle_only_repo_with_a_gguf_build_takes_config_and_gguf(cli, server, repos, tmp_path):
    server.add_repo("org/old", {"pytorch_model.bin": pickle.dumps({"w": 1}), "config.json": b"{}"})
    result = run_fetch(cli, server, "org/old", "--out", tmp_path / "b", "--gguf", f"{GGUF}:tiny-Q8_0.gguf")
    assert result.code == 0, result.err
    assert {f.path for f in read_metadata(tmp_path / "b").files} == {"config.json", "tiny-Q8_0.gguf"}


def test_pickle_files_matched_by_include_are_skipped_and_said_so(cli, server, repos, tmp_path):
    result = run_fetch(cli, server, MODEL, "--out", tmp_path / "b", "--include", "*")
    assert result.code == 0, result.err
    paths = {f.path for f in read_metadata(tmp_path / "b").files}
    assert "pytorch_model.bin" not in paths and "onnx/model.onnx" in paths
    assert "skipped org/tiny:pytorch_model.bin (pickle-based file, never fetched)" in result.out


def test_a_pickle_disguised_as_safetensors_is_refused(cli, server, tmp_path):
    server.add_repo("org/sneaky", {"model.safetensors": pickle.dumps({"w": 1}, protocol=4), "config.json": b"{}"})
    result = run_fetch(cli, server, "org/sneaky", "--out", tmp_path / "b")
    assert result.code == 1 and "pickle" in result.err and "model.safetensors" in result.err
    assert not (tmp_path / "b").exists()


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "args, message",
    [
        (("org/missing",), "repository org/missing was not found"),
        ((f"{MODEL}@no-such-branch",), "revision 'no-such-branch' was not found in org/tiny"),
        ((f"{MODEL}@{'0' * 40}",), f"revision '{'0' * 40}' was not found"),
        ((MODEL, "--include", "*.gguf"), "--include '*.gguf' matches no file in org/tiny@main"),
        ((MODEL, "--gguf", f"{GGUF}:*Q2_K*"), "matches no GGUF file in quant/tiny-GGUF@main"),
        ((MODEL, "--gguf", "quant/missing:*.gguf"), "repository quant/missing was not found"),
        ((MODEL, "--include", "[abc"), "unbalanced '['"),
        ((MODEL, "--include", "/abs/*"), "relative paths"),
        ((MODEL, "--gguf", f"{GGUF}"), "write REPO[@REV]:GLOB"),
        (("not a repo",), "is not a Hugging Face repository id"),
        ((f"{MODEL}@",), "nothing after '@'"),
        ((MODEL, "--name", "bad name!"), "choose one with --name"),
        ((MODEL, "--expires", "someday"), "--expires 'someday'"),
        ((MODEL, "--version", "0"), "--version must be 1 or more"),
    ],
)
def test_bad_input_is_a_usage_error_and_creates_nothing(cli, server, repos, tmp_path, args, message):
    server.clear_requests()
    result = run_fetch(cli, server, *args, "--out", tmp_path / "b")
    assert result.code == 2, (result.out, result.err)
    assert message in " ".join(result.err.split()), result.err
    assert not resolve_gets(server)
    assert not (tmp_path / "b").exists() and not staging_dir(tmp_path / "b").exists()


def test_command_line_misuse(cli, server, repos, tmp_path):
    assert cli("fetch", "--out", tmp_path / "b").code == 2  # no REPO, no --spec
    assert "--out is required" in cli("fetch", MODEL, "--endpoint", server.url).err
    both = cli("fetch", MODEL, "--spec", tmp_path / "x.toml", "--out", tmp_path / "b")
    assert both.code == 2 and "not both" in both.err
    bad_endpoint = cli("fetch", MODEL, "--endpoint", "ftp://mirror", "--out", tmp_path / "b")
    assert bad_endpoint.code == 2 and "http://" in bad_endpoint.err
    (tmp_path / "exists").mkdir()
    exists = run_fetch(cli, server, MODEL, "--out", tmp_path / "exists")
    assert exists.code == 2 and "already exists" in exists.err


def test_unreachable_endpoint_is_a_failure(cli, repos, tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the block ends: connections are refused
    result = cli("fetch", MODEL, "--out", tmp_path / "b", "--endpoint", f"http://127.0.0.1:{port}")
    assert result.code == 3 and f"cannot reach http://127.0.0.1:{port}" in result.err


# --------------------------------------------------------------------------- access


def test_gated_repo_needs_a_token_with_access(cli, server, tmp_path, monkeypatch):
    server.add_repo("org/gated", model_files(tmp_path), gated_token="hf_secret")
    server.clear_requests()

    anonymous = run_fetch(cli, server, "org/gated", "--out", tmp_path / "b")
    assert anonymous.code == 3
    assert (
        "org/gated" in anonymous.err and "HTTP 401" in anonymous.err and "HF_TOKEN" in anonymous.err and "token" in anonymous.err
    )
    assert not resolve_gets(server) and not staging_dir(tmp_path / "b").exists()  # found out by one HEAD

    monkeypatch.setenv("HF_TOKEN", "hf_wrong")
    wrong = run_fetch(cli, server, "org/gated", "--out", tmp_path / "b")
    assert wrong.code == 3 and "HTTP 403" in wrong.err and "org/gated" in wrong.err

    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    assert run_fetch(cli, server, "org/gated", "--out", tmp_path / "b").code == 0


def test_cdn_redirects_are_followed_and_the_commit_header_of_the_redirect_is_checked(cli, tmp_path, monkeypatch):
    with HubServer(cdn_redirects=True) as hub:
        files = model_files(tmp_path, weights_mib=1)
        commit = hub.add_repo(MODEL, files, gated_token="hf_secret")
        monkeypatch.setenv("HF_TOKEN", "hf_secret")
        result = cli("fetch", MODEL, "--out", tmp_path / "b", "--endpoint", hub.url)
        assert result.code == 0, result.err
        assert (tmp_path / "b" / "model.safetensors").read_bytes() == files["model.safetensors"]
        assert any(r.path.startswith("/cdn-lfs/") and r.method == "GET" for r in hub.requests)
        assert read_metadata(tmp_path / "b").file("model.safetensors").source["commit"] == commit


def test_hf_endpoint_setting_is_honoured(cli, server, repos, tmp_path, monkeypatch):
    monkeypatch.setattr(constants, "ENDPOINT", server.url)  # what HF_ENDPOINT sets at import
    result = cli("fetch", MODEL, "--out", tmp_path / "b")
    assert result.code == 0, result.err
    assert read_metadata(tmp_path / "b").sources[0]["endpoint"] == server.url


def test_credentials_in_the_endpoint_url_are_not_recorded():
    assert (
        sovpack.fetch.hub.public_endpoint("https://user:secret@mirror.example:8443/hf/?x=1") == "https://mirror.example:8443/hf"
    )


# --------------------------------------------------------------------------- integrity


@pytest.mark.parametrize("name, algorithm", [("model.safetensors", "sha256"), ("config.json", "git-blob-sha1")])
def test_corrupted_file_is_refused_naming_file_expected_and_actual(cli, server, repos, tmp_path, name, algorithm):
    server.corrupt(MODEL, name)
    out = tmp_path / "b"
    result = run_fetch(cli, server, MODEL, "--out", out)
    assert result.code == 1
    data = repos["files"][name]
    expected = sha256(data) if algorithm == "sha256" else git_blob_id(data)
    served = bytearray(data)
    served[len(data) // 2] ^= 0xFF
    actual = sha256(bytes(served)) if algorithm == "sha256" else git_blob_id(bytes(served))
    err = " ".join(result.err.split())
    assert f"{MODEL}@{repos['model'][:12]}:{name}" in err
    assert f"expected {algorithm} {expected}" in err and f"got {actual}" in err
    assert not out.exists()
    assert not (staging_dir(out) / ".sovpack-fetch" / "partial" / name).exists()  # the bad bytes are gone

    server.clear_faults()
    assert run_fetch(cli, server, MODEL, "--out", out).code == 0
    assert (out / name).read_bytes() == data


def test_server_reporting_another_commit_is_refused(cli, server, repos, tmp_path):
    server.lie_about_commit(MODEL, "f" * 40)
    server.clear_requests()
    result = run_fetch(cli, server, MODEL, "--out", tmp_path / "b")
    assert result.code == 1
    assert "f" * 40 in result.err and repos["model"] in result.err
    assert not resolve_gets(server) and not (tmp_path / "b").exists()


def test_download_checks_the_commit_of_every_answer(server, repos, tmp_path):
    """The HEAD at planning time is not the only check: each GET's X-Repo-Commit is checked too."""
    hub = Hub(server.url)
    f = hub.snapshot(MODEL, "main").files["config.json"]
    server.lie_about_commit(MODEL, "e" * 40)
    with pytest.raises(Refused, match="e" * 40):
        hub.download(f, tmp_path / "config.json.partial")
    assert not (tmp_path / "config.json.partial").read_bytes()  # nothing was written


def test_server_sending_more_bytes_than_listed_is_refused(server, repos, tmp_path):
    hub = Hub(server.url)
    f = hub.snapshot(MODEL, "main").files["model.safetensors"]
    short = RemoteFile(f.repo, f.commit, f.path, f.size - 10, f.git_blob_id, f.lfs_sha256)
    with pytest.raises(Refused, match="more than the"):
        hub.download(short, tmp_path / "w.partial")


def test_hub_answering_another_commit_than_the_one_asked_is_refused(cli, server, repos, tmp_path):
    server.resolve_as(MODEL, "e" * 40)
    server.clear_requests()
    result = run_fetch(cli, server, f"{MODEL}@{repos['model']}", "--out", tmp_path / "b")
    assert result.code == 1
    err = " ".join(result.err.split())
    assert f"answered commit {'e' * 40} when asked for {MODEL} at commit {repos['model']}" in err
    assert not resolve_gets(server) and not staging_dir(tmp_path / "b").exists()


@pytest.mark.parametrize(
    "path, message",
    [
        ("notes:v2.txt", "notes:v2.txt cannot go into a bundle: unsafe path"),
        ("sovpack.json", "sovpack.json cannot go into a bundle: sovpack.json is a name reserved"),
        ("signatures/evil.sig", "signatures/evil.sig cannot go into a bundle: signatures is a name reserved"),
        ("MODEL.safetensors", "differ only by case and cannot both go into a bundle"),
    ],
)
def test_repository_paths_a_bundle_cannot_hold_are_refused_before_any_download(cli, server, tmp_path, path, message):
    files = model_files(tmp_path)
    commit = server.add_repo("org/odd", {**files, path: files["model.safetensors"] if path.endswith(".safetensors") else b"x"})
    server.clear_requests()
    result = run_fetch(cli, server, "org/odd", "--out", tmp_path / "b", "--include", "*")
    assert result.code == 1
    err = " ".join(result.err.split())
    assert message in err and f"org/odd@{commit[:12]}:{path}" in err
    assert not resolve_gets(server) and not staging_dir(tmp_path / "b").exists()


def test_default_selection_without_safetensors_names_the_gguf_files_to_include(cli, server, tmp_path):
    ggufs = gguf_files(tmp_path)
    server.add_repo("org/gguf-only", {"config.json": b"{}", "tiny-Q8_0.gguf": ggufs["tiny-Q8_0.gguf"]})
    result = run_fetch(cli, server, "org/gguf-only", "--out", tmp_path / "b")
    assert result.code == 2
    err = " ".join(result.err.split())
    assert "finds no safetensors weights at the top of org/gguf-only@" in err
    assert "It holds GGUF files (tiny-Q8_0.gguf): choose them with --include GLOB" in err
    assert not staging_dir(tmp_path / "b").exists()
    taken = run_fetch(cli, server, "org/gguf-only", "--out", tmp_path / "b", "--include", "*.gguf")
    assert taken.code == 0, taken.err


# --------------------------------------------------------------------------- server faults


def test_server_errors_are_retried(cli, server, tmp_path):
    files = model_files(tmp_path, weights_mib=1)
    server.add_repo(MODEL, files)
    server.fail_gets(MODEL, "model.safetensors", 503, times=2)
    server.clear_requests()
    result = run_fetch(cli, server, MODEL, "--out", tmp_path / "b")
    assert result.code == 0, result.err
    assert (tmp_path / "b" / "model.safetensors").read_bytes() == files["model.safetensors"]
    assert len(resolve_gets(server, "/model.safetensors")) == 3


def test_a_server_error_that_persists_is_a_failure_naming_the_file(cli, server, repos, tmp_path):
    server.fail_gets(MODEL, "model.safetensors", 502, times=sovpack.fetch.hub.MAX_ATTEMPTS)
    result = run_fetch(cli, server, MODEL, "--out", tmp_path / "b")
    assert result.code == 3
    err = " ".join(result.err.split())
    where = f"{MODEL}@{repos['model'][:12]}:model.safetensors"
    assert f"downloading {where} from {server.url} failed {sovpack.fetch.hub.MAX_ATTEMPTS} times in a row" in err
    assert "HTTP 502" in err and "re-run the same command to continue" in err
    assert not (tmp_path / "b").exists()


def test_server_ignoring_the_range_restarts_the_file_from_byte_0(cli, server, tmp_path):
    files = model_files(tmp_path, weights_mib=3)
    server.add_repo(MODEL, files)
    server.drop_after(MODEL, "model.safetensors", MIB + 5)
    server.ignore_range(MODEL, "model.safetensors")
    server.clear_requests()
    result = run_fetch(cli, server, MODEL, "--out", tmp_path / "b")
    assert result.code == 0, result.err
    assert (tmp_path / "b" / "model.safetensors").read_bytes() == files["model.safetensors"]
    assert [r.range for r in resolve_gets(server, "/model.safetensors")] == [None, f"bytes={MIB + 5}-"]


def test_a_wrong_content_range_is_a_failure_naming_the_file_and_the_range(cli, server, tmp_path):
    files = model_files(tmp_path, weights_mib=3)
    commit = server.add_repo(MODEL, files)
    server.drop_after(MODEL, "model.safetensors", MIB)
    server.wrong_content_range(MODEL, "model.safetensors", "bytes 0-99/100")
    out = tmp_path / "b"
    result = run_fetch(cli, server, MODEL, "--out", out)
    assert result.code == 3
    err = " ".join(result.err.split())
    where = f"{MODEL}@{commit[:12]}:model.safetensors"
    assert f"{where}: asked for bytes from {MIB}, the server answered the range 'bytes 0-99/100'" in err
    assert not out.exists()
    server.clear_faults()
    assert run_fetch(cli, server, MODEL, "--out", out).code == 0  # the bytes kept were right: the re-run continues
    assert (out / "model.safetensors").read_bytes() == files["model.safetensors"]


def test_a_second_fetch_into_the_same_out_is_refused_by_the_lock(cli, server, repos, tmp_path):
    import fcntl

    out = tmp_path / "b"
    work = staging_dir(out) / ".sovpack-fetch"
    work.mkdir(parents=True)
    with open(work / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # what a running fetch holds
        server.clear_requests()
        result = run_fetch(cli, server, MODEL, "--out", out)
    assert result.code == 3
    assert f"another sovpack fetch is writing {staging_dir(out)}" in " ".join(result.err.split())
    assert not resolve_gets(server) and not out.exists()
    assert run_fetch(cli, server, MODEL, "--out", out).code == 0


# --------------------------------------------------------------------------- interruptions and resume


def test_connection_dropped_mid_file_is_continued_from_the_exact_byte(cli, server, tmp_path):
    files = model_files(tmp_path, weights_mib=3)
    server.add_repo(MODEL, files)
    server.drop_after(MODEL, "model.safetensors", MIB + 12345)  # clean close after that many body bytes
    server.clear_requests()

    result = run_fetch(cli, server, MODEL, "--out", tmp_path / "b")
    assert result.code == 0, result.err
    assert (tmp_path / "b" / "model.safetensors").read_bytes() == files["model.safetensors"]
    assert [r.range for r in resolve_gets(server, "/model.safetensors")] == [None, f"bytes={MIB + 12345}-"]


def test_failed_fetch_leaves_no_bundle_and_a_rerun_continues_where_it_stopped(cli, server, tmp_path, monkeypatch):
    files = model_files(tmp_path, weights_mib=4)
    server.add_repo(MODEL, files)
    server.drop_after(MODEL, "model.safetensors", 2 * MIB, abort=True)  # TCP reset mid-file
    monkeypatch.setattr(sovpack.fetch.hub, "MAX_ATTEMPTS", 1)  # give up at the first failure
    out = tmp_path / "b"

    first = run_fetch(cli, server, MODEL, "--out", out)
    assert first.code == 3
    assert "model.safetensors" in first.err and "re-run the same command to continue" in first.err
    assert not out.exists()
    work = staging_dir(out) / ".sovpack-fetch"
    kept = (work / "partial" / "model.safetensors").stat().st_size
    assert 0 < kept <= 2 * MIB
    completed = set(json.loads((work / "state.json").read_bytes())["complete"])

    dry = run_fetch(cli, server, MODEL, "--out", out, "--dry-run")
    assert dry.code == 0 and "kept" in dry.out

    monkeypatch.setattr(sovpack.fetch.hub, "MAX_ATTEMPTS", 6)
    server.clear_requests()
    second = run_fetch(cli, server, MODEL, "--out", out)
    assert second.code == 0, second.err
    assert (out / "model.safetensors").read_bytes() == files["model.safetensors"]
    assert [r.range for r in resolve_gets(server, "/model.safetensors")] == [f"bytes={kept}-"]
    fetched_again = {r.path.rsplit("/", 1)[-1] for r in resolve_gets(server)}
    assert not fetched_again & completed  # complete, checked files are not downloaded again
    metadata = read_metadata(out)
    assert metadata.file("model.safetensors").sha256 == sha256(files["model.safetensors"])
    assert set(scan_tree(out).files) == {f.path for f in metadata.files} | {"sovpack.json"}


def test_rerun_discards_a_tampered_partial_file_via_the_digest(cli, server, tmp_path, monkeypatch):
    files = model_files(tmp_path, weights_mib=3)
    server.add_repo(MODEL, files)
    server.drop_after(MODEL, "model.safetensors", MIB, abort=True)
    monkeypatch.setattr(sovpack.fetch.hub, "MAX_ATTEMPTS", 1)
    out = tmp_path / "b"
    assert run_fetch(cli, server, MODEL, "--out", out).code == 3
    partial = staging_dir(out) / ".sovpack-fetch" / "partial" / "model.safetensors"
    data = bytearray(partial.read_bytes())
    data[100] ^= 0xFF  # someone changed a kept byte
    partial.write_bytes(bytes(data))

    monkeypatch.setattr(sovpack.fetch.hub, "MAX_ATTEMPTS", 6)
    second = run_fetch(cli, server, MODEL, "--out", out)
    assert second.code == 1 and "does not match what the Hub published" in second.err  # the prefix is re-hashed
    third = run_fetch(cli, server, MODEL, "--out", out)  # the bad partial was deleted: a clean download
    assert third.code == 0 and (out / "model.safetensors").read_bytes() == files["model.safetensors"]


def test_a_state_whose_checked_digest_is_not_the_published_one_counts_as_no_state(tmp_path):
    from sovpack.fetch.download import STATE_FORMAT, STATE_VERSION, _State

    entry = {
        "repo": MODEL,
        "commit": "c" * 40,
        "expected": ["sha256", "a" * 64],
        "size": 3,
        "sha256": "a" * 64,
        "shards": ["b" * 64],
        "mtime_ns": 1,
    }
    state = {"format": STATE_FORMAT, "version": STATE_VERSION, "complete": {"w.safetensors": entry}, "partial": {}}
    (tmp_path / "state.json").write_text(json.dumps(state))
    assert set(_State.read(tmp_path / "state.json").complete) == {"w.safetensors"}
    entry["sha256"] = "d" * 64  # what was written is not what was published: nothing of it can be trusted
    (tmp_path / "state.json").write_text(json.dumps(state))
    assert _State.read(tmp_path / "state.json").complete == {}


def test_staging_keeps_only_what_the_state_vouches_for(cli, server, repos, tmp_path):
    out = tmp_path / "b"
    stray = staging_dir(out) / "stray.safetensors"  # e.g. left by a crashed `sovpack pack` to the same --out
    stray.parent.mkdir(parents=True)
    stray.write_bytes(b"not from the hub")
    assert run_fetch(cli, server, MODEL, "--out", out).code == 0
    assert not (out / "stray.safetensors").exists()


# --------------------------------------------------------------------------- disk space


def test_not_enough_free_space_is_found_before_downloading(cli, server, repos, tmp_path, monkeypatch):
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda path: real(path)._replace(free=1000))
    server.clear_requests()
    result = run_fetch(cli, server, MODEL, "--out", tmp_path / "b")
    assert result.code == 3 and "not enough free space" in result.err and "nothing was downloaded" in result.err
    assert not resolve_gets(server) and not staging_dir(tmp_path / "b").exists()


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MiB tmpfs (needs mount privileges; skipped otherwise)."""
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], check=False, capture_output=True)
    if done.returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_disk_full_mid_download_is_a_clear_failure_and_resumable(cli, server, tmp_path, small_disk, monkeypatch):
    files = model_files(tmp_path, weights_mib=3)
    server.add_repo(MODEL, files)
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda path: real(path)._replace(free=1 << 40))  # the pre-check is fooled
    out = small_disk / "b"
    result = run_fetch(cli, server, MODEL, "--out", out)
    assert result.code == 3 and "disk full while writing" in result.err and "re-run the same command" in result.err
    assert not out.exists()

    subprocess.run(["mount", "-o", "remount,size=16m", str(small_disk)], check=True)
    server.clear_requests()
    assert run_fetch(cli, server, MODEL, "--out", out).code == 0
    assert (out / "model.safetensors").read_bytes() == files["model.safetensors"]
    ranges = [r.range for r in resolve_gets(server, "/model.safetensors")]
    assert len(ranges) == 1 and ranges[0] and ranges[0].startswith("bytes=")  # continued, not restarted


# --------------------------------------------------------------------------- dry run, output


def test_dry_run_lists_commits_files_and_sizes_and_downloads_nothing(cli, server, repos, tmp_path):
    server.clear_requests()
    result = run_fetch(cli, server, MODEL, "--out", tmp_path / "b", "--gguf", f"{GGUF}:*Q8_0.gguf", "--dry-run")
    assert result.code == 0, result.err
    assert f"org/tiny@main -> commit {repos['model']}" in result.out
    assert f"quant/tiny-GGUF@main -> commit {repos['gguf']}" in result.out
    for path in (*DEFAULT_SELECTED, "tiny-Q8_0.gguf"):
        assert path in result.out
    total = sum(len(repos["files"][p]) for p in DEFAULT_SELECTED) + len(gguf_files(tmp_path)["tiny-Q8_0.gguf"])
    assert f"total: 8 files, {human_size(total)}" in result.out and "nothing was downloaded" in result.out
    assert not resolve_gets(server)
    assert not (tmp_path / "b").exists() and not staging_dir(tmp_path / "b").exists()


def test_quiet_prints_nothing_and_plain_output_lists_each_checked_file(cli, server, repos, tmp_path):
    quiet = run_fetch(cli, server, MODEL, "--out", tmp_path / "q", "--quiet")
    assert quiet.code == 0 and quiet.out == ""
    plain = run_fetch(cli, server, MODEL, "--out", tmp_path / "p")
    assert "ok model.safetensors" in plain.out and "fetched tiny v1: 7 files" in plain.out


# --------------------------------------------------------------------------- specs


def write_spec(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_spec_fetch_against_the_loopback_hub(cli, server, repos, tmp_path):
    spec = write_spec(
        tmp_path / "tiny.toml",
        f"""
spec_version = 1

[bundle]
name = "tiny-approved"
version = 4
expires = "2031-06-30"

[model]
repo = "{MODEL}"
revision = "{repos["model"]}"
exclude = ["README.md"]

[[gguf]]
repo = "{GGUF}"
revision = "{repos["gguf"]}"
files = ["*Q4_K_M.gguf", "*F16-00002-of-00002.gguf"]
""",
    )
    server.clear_requests()
    dry = run_fetch(cli, server, "--spec", spec, "--dry-run")
    assert dry.code == 0, dry.err
    assert "tiny-F16-00001-of-00002.gguf" in dry.out and not resolve_gets(server)

    result = run_fetch(cli, server, "--spec", spec, "--out", tmp_path / "b", "--version", "5")
    assert result.code == 0, result.err
    metadata = read_metadata(tmp_path / "b")
    assert (metadata.name, metadata.version, metadata.expires.year) == ("tiny-approved", 5, 2031)
    paths = {f.path for f in metadata.files}
    assert "README.md" not in paths and {"tiny-Q4_K_M.gguf", "tiny-F16-00001-of-00002.gguf"} <= paths
    assert [s["revision"] for s in metadata.sources] == [repos["model"], repos["gguf"]]


@pytest.mark.parametrize(
    "text, message",
    [
        ("spec_version = 1\n[bundle]\nname='x'\n[model]\nrepo='org/tiny'\nrevision='main'\n", "not a full 40-hex commit"),
        (
            "spec_version = 1\n[bundle]\nname='x'\nsize=3\n[model]\nrepo='org/tiny'\nrevision='" + "a" * 40 + "'\n",
            "unknown key(s) size",
        ),
        ("spec_version = 2\n", "spec_version 2 is not supported"),
        ("spec_version = 1\n[bundle]\nname='x'\n", "needs 'model'"),
        ("spec_version = 1\n[bundle\n", "not valid TOML"),
        (
            "spec_version = 1\n[bundle]\nname='x'\n[model]\nrepo='org/tiny'\nrevision='"
            + "a" * 40
            + "'\n[[gguf]]\nrepo='a/b'\nrevision='"
            + "b" * 40
            + "'\n",
            "needs files",
        ),
        (
            "spec_version = 1\n[bundle]\nname='x'\nversion='1'\n[model]\nrepo='org/tiny'\nrevision='" + "a" * 40 + "'\n",
            "[bundle].version must be a int",
        ),
        (
            "spec_version = 1\n[bundle]\nname='bad name!'\n[model]\nrepo='org/tiny'\nrevision='" + "a" * 40 + "'\n",
            "[bundle].name: bundle name 'bad name!' is not allowed",
        ),
        (
            "spec_version = 1\n[bundle]\nname='x'\nexpires='soon'\n[model]\nrepo='org/tiny'\nrevision='" + "a" * 40 + "'\n",
            "[bundle].expires 'soon': give a number of days like 90d",
        ),
    ],
)
def test_bad_spec_is_a_usage_error_naming_the_file(cli, server, tmp_path, text, message):
    spec = write_spec(tmp_path / "bad.toml", text)
    result = run_fetch(cli, server, "--spec", spec, "--out", tmp_path / "b")
    assert result.code == 2
    assert str(spec) in result.err and message in " ".join(result.err.split())
    assert not server.requests


SHIPPED = sorted((ROOT / "manifests").glob("*.toml"))


def test_manifests_are_shipped():
    assert len(SHIPPED) >= 3


@pytest.mark.parametrize("spec", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_spec_parses_and_is_pinned(spec):
    request = load_spec(spec)
    assert bundle_name(request) == request.name
    for sel in request.selections:
        assert HEX40.match(sel.revision), sel
    assert "commit" in spec.read_text() and "found" in spec.read_text().lower()  # each says where its commits come from


# --------------------------------------------------------------------------- selection rules (pure)


def test_default_selection_rules():
    paths = [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "model.safetensors.index.json",
        "consolidated.safetensors",
        "params.json",
        "tekken.json",
        "tokenizer.model.v3",
        "config.json",
        "chat_template.jinja",
        "LICENSE.md",
        "NOTICE",
        "README.md",
        "USE_POLICY.md",
        ".gitattributes",
        "original/consolidated.00.pth",
        "pytorch_model.bin",
        "onnx/model.onnx",
        "figures/bench.png",
        "model.gguf",
    ]
    selection = select_model_files("m/x", paths, (), ())
    assert selection.paths == sorted(
        [
            "model-00001-of-00002.safetensors",
            "model-00002-of-00002.safetensors",
            "model.safetensors.index.json",
            "params.json",
            "tekken.json",
            "tokenizer.model.v3",
            "config.json",
            "chat_template.jinja",
            "LICENSE.md",
            "NOTICE",
            "README.md",
            "USE_POLICY.md",
        ]
    )
    assert [(s.path, s.reason.split()[0]) for s in selection.skipped] == [("consolidated.safetensors", "Mistral")]
    only_native = select_model_files("m/x", ["consolidated.safetensors", "params.json"], (), ())
    assert only_native.paths == ["consolidated.safetensors", "params.json"]


def test_globs_are_case_insensitive_whole_path_and_folder_aware():
    assert matches("sub/Model-Q4_K_M.gguf", "*q4_k_m*")
    assert matches("onnx/model.onnx", "onnx/") and not matches("onnxruntime/x", "onnx/")
    assert not matches("a/config.json", "config.json")


def test_split_gguf_is_completed_and_an_incomplete_one_refused():
    paths = ["x-Q8_0-00001-of-00003.gguf", "x-Q8_0-00002-of-00003.gguf", "x-Q8_0-00003-of-00003.gguf", "x-Q4_0.gguf"]
    assert select_gguf_files("q/x", paths, ("*00002-of-00003*",)).paths == paths[:3]
    with pytest.raises(Refused, match="incomplete: x-Q8_0-00003-of-00003.gguf missing"):
        select_gguf_files("q/x", paths[:2], ("*Q8_0*",))
    upper = ["X-00001-of-00002.GGUF", "X-00002-of-00002.GGUF"]  # names as llama.cpp's gguf-split writes them, but upper case
    assert select_gguf_files("q/x", upper, ("*00001*",)).paths == upper
    # only gguf-split's 5-digit names are splits (llama.cpp finds the other parts by that name)
    assert select_gguf_files("q/x", ["y-1-of-2.gguf", "y-2-of-2.gguf"], ("y-1-*",)).paths == ["y-1-of-2.gguf"]


def test_repo_references_parse():
    assert parse_repo_ref("org/x", "REPO") == ("org/x", "main")
    assert parse_repo_ref("org/x@refs/pr/1", "REPO") == ("org/x", "refs/pr/1")
    sel = parse_gguf_option("q/x-GGUF@v2:*Q4_K_M*.gguf")
    assert (sel.repo, sel.revision, sel.include, sel.role) == ("q/x-GGUF", "v2", ("*Q4_K_M*.gguf",), "gguf")
    for bad in ("org/../x", "org/x/y", "-org/x"):
        with pytest.raises(UsageError):
            parse_repo_ref(bad, "REPO")
