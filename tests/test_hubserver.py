"""The real `huggingface_hub` client against tests/hubserver.py, over a loopback socket."""

import hashlib
import http.client
import os
import re
import shutil
import socket
import struct
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import httpx2
import pytest
from hubserver import HubServer, git_blob_id, lfs_pointer
from huggingface_hub import (
    HfApi,
    constants,
    get_hf_file_metadata,
    hf_hub_download,
    hf_hub_url,
    snapshot_download,
)
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.hf_api import RepoFile, RepoFolder

REPO = "org/model"
MIB = 1 << 20
CLIENT_CHUNK = constants.DOWNLOAD_CHUNK_SIZE  # the client writes (and so resumes) at 10 MiB granularity


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


pytestmark = pytest.mark.usefixtures("hf_home")  # an isolated huggingface_hub home (conftest)


@pytest.fixture
def server():
    with HubServer() as hub:
        yield hub


@pytest.fixture
def files():
    return {
        "config.json": b'{"architectures": ["Tiny"]}',  # small: a regular git file
        "model.safetensors": os.urandom(4096),  # LFS by extension
        "data.raw": os.urandom(3000),  # LFS by size (> 1 KiB)
        "tokenizer/vocab.txt": b"a\nb\nc\n",
        "tokenizer/merges/merges.txt": b"a b\n",
    }


@pytest.fixture
def api(server):
    return HfApi(endpoint=server.url, token=False)


def requests_for(server, path_suffix, method="GET"):
    return [r for r in server.requests if r.method == method and r.path.endswith(path_suffix)]


# --------------------------------------------------------------------------- metadata


def test_model_info_resolves_branch_tag_and_commit(server, api, files):
    first = server.add_repo(REPO, files, tags=["v1"])
    second = server.add_repo(REPO, {**files, "config.json": b"{}"})

    assert api.model_info(REPO).sha == second
    assert api.model_info(REPO, revision="main").sha == second
    assert api.model_info(REPO, revision="v1").sha == first
    assert api.model_info(REPO, revision=first).sha == first
    assert first != second and re.fullmatch(r"[0-9a-f]{40}", first)
    only_sha = api.model_info(REPO, expand=["sha"])
    assert only_sha.sha == second and only_sha.siblings is None


def test_model_info_siblings_carry_blob_metadata_on_request(server, api, files):
    server.add_repo(REPO, files)

    plain = {s.rfilename: s for s in api.model_info(REPO).siblings}
    assert set(plain) == set(files)
    assert plain["model.safetensors"].size is None  # only with files_metadata

    siblings = {s.rfilename: s for s in api.model_info(REPO, files_metadata=True).siblings}
    weights = siblings["model.safetensors"]
    assert weights.lfs.sha256 == sha256(files["model.safetensors"])
    assert weights.lfs.size == weights.size == 4096
    assert weights.lfs.pointer_size == len(lfs_pointer(weights.lfs.sha256, 4096))
    assert siblings["data.raw"].lfs.sha256 == sha256(files["data.raw"])
    config = siblings["config.json"]
    assert config.lfs is None
    assert config.blob_id == git_blob_id(files["config.json"])
    assert config.size == len(files["config.json"])


def test_list_repo_tree_recursive_and_not(server, api, files):
    server.add_repo(REPO, files)

    entries = {e.path: e for e in api.list_repo_tree(REPO, recursive=True)}
    assert set(entries) == set(files) | {"tokenizer", "tokenizer/merges"}
    assert isinstance(entries["tokenizer"], RepoFolder)
    weights = entries["model.safetensors"]
    assert isinstance(weights, RepoFile)
    assert weights.size == 4096
    assert weights.lfs.sha256 == sha256(files["model.safetensors"])
    assert weights.blob_id == git_blob_id(lfs_pointer(weights.lfs.sha256, 4096))  # git stores the pointer
    assert entries["tokenizer/vocab.txt"].blob_id == git_blob_id(files["tokenizer/vocab.txt"])
    assert entries["tokenizer/vocab.txt"].lfs is None

    top = [e.path for e in api.list_repo_tree(REPO)]
    assert sorted(top) == ["config.json", "data.raw", "model.safetensors", "tokenizer"]
    sub = [e.path for e in api.list_repo_tree(REPO, "tokenizer")]
    assert sorted(sub) == ["tokenizer/merges", "tokenizer/vocab.txt"]


def test_list_repo_tree_follows_link_pagination(files):
    with HubServer(tree_page_size=2) as hub:
        hub.add_repo(REPO, files)
        paths = [e.path for e in HfApi(endpoint=hub.url, token=False).list_repo_tree(REPO, recursive=True)]
        assert sorted(paths) == sorted([*files, "tokenizer", "tokenizer/merges"])
        assert len(requests_for(hub, "/tree/main")) == 4  # 7 entries, 2 per page


def test_get_paths_info_and_expanded_last_commit(server, api, files):
    first = server.add_repo(REPO, files)
    second = server.add_repo(REPO, {**files, "config.json": b"{}"})

    infos = {e.path: e for e in api.get_paths_info(REPO, ["config.json", "tokenizer", "missing.txt", "data.raw"])}
    assert set(infos) == {"config.json", "tokenizer", "data.raw"}  # unknown paths are skipped, like the Hub
    assert infos["config.json"].blob_id == git_blob_id(b"{}")
    assert infos["data.raw"].lfs.sha256 == sha256(files["data.raw"])
    assert isinstance(infos["tokenizer"], RepoFolder)

    expanded = {e.path: e for e in api.get_paths_info(REPO, ["config.json", "data.raw"], expand=True)}
    assert expanded["config.json"].last_commit.oid == second
    assert expanded["data.raw"].last_commit.oid == first  # unchanged since the first commit


@pytest.mark.skipif(shutil.which("git") is None, reason="git not installed")
def test_blob_and_tree_ids_are_real_git_ids(server, api, files, tmp_path):
    server.add_repo(REPO, files)
    work = tmp_path / "git"
    for path, data in files.items():
        target = work / path
        target.parent.mkdir(parents=True, exist_ok=True)
        is_lfs = path.endswith(".safetensors") or len(data) > 1024
        target.write_bytes(lfs_pointer(sha256(data), len(data)) if is_lfs else data)

    def git(*args):
        return subprocess.run(["git", *args], cwd=work, check=True, capture_output=True, text=True).stdout.strip()

    git("init", "-q")
    git("add", "-A")
    root = git("write-tree")
    for entry in api.list_repo_tree(REPO, recursive=True):
        expected = git("rev-parse", f"{root}:{entry.path}")
        assert (entry.tree_id if isinstance(entry, RepoFolder) else entry.blob_id) == expected, entry.path


def test_list_repo_refs(server, api, files):
    first = server.add_repo(REPO, files, tags=["v1"])
    dev = server.add_repo(REPO, {"config.json": b"{}"}, branch="dev")

    refs = api.list_repo_refs(REPO)
    assert {(b.name, b.ref, b.target_commit) for b in refs.branches} == {
        ("main", "refs/heads/main", first),
        ("dev", "refs/heads/dev", dev),
    }
    assert [(t.name, t.target_commit) for t in refs.tags] == [("v1", first)]


def test_file_metadata_headers(server, files):
    commit = server.add_repo(REPO, files)

    lfs = get_hf_file_metadata(hf_hub_url(REPO, "model.safetensors", endpoint=server.url), token=False)
    assert (lfs.commit_hash, lfs.etag, lfs.size) == (commit, sha256(files["model.safetensors"]), 4096)
    assert lfs.xet_file_data is None
    small = get_hf_file_metadata(hf_hub_url(REPO, "config.json", endpoint=server.url), token=False)
    assert small.etag == git_blob_id(files["config.json"])
    assert small.size == len(files["config.json"])


# --------------------------------------------------------------------------- downloads


def test_hf_hub_download_to_local_dir_gives_identical_bytes(server, files, tmp_path):
    server.add_repo(REPO, files)

    for name in ("model.safetensors", "config.json", "tokenizer/vocab.txt"):
        path = hf_hub_download(REPO, name, endpoint=server.url, local_dir=tmp_path / "out", token=False)
        assert Path(path) == tmp_path / "out" / name
        assert Path(path).read_bytes() == files[name]


def test_hf_hub_download_to_cache_uses_etag_as_blob_name(server, files, hf_home):
    commit = server.add_repo(REPO, files)

    path = Path(hf_hub_download(REPO, "model.safetensors", endpoint=server.url, token=False))
    assert path.read_bytes() == files["model.safetensors"]
    assert path.is_relative_to(hf_home / "hub")  # the user's cache is left alone
    assert path.parent.name == commit
    assert path.resolve().name == sha256(files["model.safetensors"])


def test_snapshot_download_at_pinned_commit_after_main_moved(server, files, tmp_path):
    old = server.add_repo(REPO, files)
    new_files = {"config.json": b"{}", "model.safetensors": os.urandom(2048)}
    new = server.add_repo(REPO, new_files)

    pinned = Path(snapshot_download(REPO, revision=old, endpoint=server.url, local_dir=tmp_path / "old", token=False))
    latest = Path(snapshot_download(REPO, endpoint=server.url, cache_dir=tmp_path / "cache", token=False))

    for name, data in files.items():
        assert (pinned / name).read_bytes() == data
    assert latest.name == new
    assert sorted(p.name for p in latest.iterdir()) == sorted(new_files)
    assert (latest / "model.safetensors").read_bytes() == new_files["model.safetensors"]


def test_files_given_as_paths_are_streamed_from_disk(server, tmp_path):
    weights, notes = tmp_path / "weights.gguf", tmp_path / "notes.txt"
    weights.write_bytes(os.urandom(3 * MIB + 7))
    notes.write_bytes(b"small file kept on disk\n")
    server.add_repo(REPO, {"model.gguf": weights, "notes.txt": notes})

    for name, source in (("model.gguf", weights), ("notes.txt", notes)):
        path = hf_hub_download(REPO, name, endpoint=server.url, local_dir=tmp_path / "out", token=False)
        assert Path(path).read_bytes() == source.read_bytes()
    siblings = {s.rfilename: s for s in HfApi(endpoint=server.url, token=False).model_info(REPO, files_metadata=True).siblings}
    assert siblings["model.gguf"].lfs.sha256 == sha256(weights.read_bytes())
    assert siblings["notes.txt"].blob_id == git_blob_id(notes.read_bytes())


def test_range_requests_over_raw_http(server, files):
    server.add_repo(REPO, files)
    url = f"{server.url}/{REPO}/resolve/main/model.safetensors"
    data = files["model.safetensors"]

    with urllib.request.urlopen(urllib.request.Request(url, headers={"Range": "bytes=100-"})) as response:
        assert response.status == 206
        assert response.headers["Content-Range"] == "bytes 100-4095/4096"
        assert response.read() == data[100:]
    with urllib.request.urlopen(urllib.request.Request(url, headers={"Range": "bytes=-10"})) as response:
        assert response.read() == data[-10:]
    with pytest.raises(urllib.error.HTTPError) as error:
        urllib.request.urlopen(urllib.request.Request(url, headers={"Range": "bytes=4096-"}))
    assert error.value.code == 416
    assert error.value.headers["Content-Range"] == "bytes */4096"


# --------------------------------------------------------------------------- errors and gating


@pytest.mark.parametrize(
    "call, error",
    [
        (lambda api, url: api.model_info("org/missing"), RepositoryNotFoundError),
        (lambda api, url: hf_hub_download("org/missing", "config.json", endpoint=url), RepositoryNotFoundError),
        (lambda api, url: api.model_info(REPO, revision="no-such-branch"), RevisionNotFoundError),
        (lambda api, url: hf_hub_download(REPO, "config.json", revision="0" * 40, endpoint=url), RevisionNotFoundError),
        (lambda api, url: list(api.list_repo_tree(REPO, revision="nope")), RevisionNotFoundError),
        (lambda api, url: hf_hub_download(REPO, "missing.bin", endpoint=url), EntryNotFoundError),
        (lambda api, url: list(api.list_repo_tree(REPO, "missing-dir")), EntryNotFoundError),
    ],
)
def test_errors_map_to_client_exceptions(server, api, files, call, error):
    server.add_repo(REPO, files)
    with pytest.raises(error) as raised:
        call(api, server.url)
    assert raised.value.response.status_code == 404
    assert type(raised.value) is not GatedRepoError


def test_gated_repo_requires_the_configured_token(server, api, files, tmp_path):
    server.add_repo(REPO, files, gated_token="hf_secret")

    assert api.model_info(REPO).gated == "auto"  # metadata stays public, like on the Hub
    with pytest.raises(GatedRepoError) as anonymous:
        hf_hub_download(REPO, "config.json", endpoint=server.url, token=False)
    assert anonymous.value.response.status_code == 401
    with pytest.raises(GatedRepoError) as wrong:
        hf_hub_download(REPO, "config.json", endpoint=server.url, token="hf_wrong")
    assert wrong.value.response.status_code == 403
    with pytest.raises(GatedRepoError):
        snapshot_download(REPO, endpoint=server.url, local_dir=tmp_path / "denied", token=False)

    path = hf_hub_download(REPO, "model.safetensors", endpoint=server.url, token="hf_secret")
    assert Path(path).read_bytes() == files["model.safetensors"]


def test_cdn_redirects_for_lfs_files(files, tmp_path):
    with HubServer(cdn_redirects=True) as hub:
        commit = hub.add_repo(REPO, files, gated_token="hf_secret")

        url = hf_hub_url(REPO, "model.safetensors", endpoint=hub.url)
        meta = get_hf_file_metadata(url, token="hf_secret")
        assert meta.location.startswith(f"http://localhost:{hub.port}/cdn-lfs/")  # another origin: not followed
        assert (meta.commit_hash, meta.etag, meta.size) == (commit, sha256(files["model.safetensors"]), 4096)

        out = Path(snapshot_download(REPO, endpoint=hub.url, local_dir=tmp_path / "out", token="hf_secret"))
        assert all((out / name).read_bytes() == data for name, data in files.items())
        cdn_paths = {r.path for r in hub.requests if r.path.startswith("/cdn-lfs/")}
        assert cdn_paths == {f"/cdn-lfs/{sha256(files[n])}" for n in ("model.safetensors", "data.raw")}


# --------------------------------------------------------------------------- fault injection


def test_drop_after_is_resumed_by_the_client_with_a_range_request(server, tmp_path):
    weights = tmp_path / "weights.safetensors"
    weights.write_bytes(os.urandom(CLIENT_CHUNK + 2 * MIB))
    server.add_repo(REPO, {"model.safetensors": weights})
    server.drop_after(REPO, "model.safetensors", CLIENT_CHUNK + MIB)

    path = hf_hub_download(REPO, "model.safetensors", endpoint=server.url, local_dir=tmp_path / "out", token=False)

    assert Path(path).read_bytes() == weights.read_bytes()
    gets = requests_for(server, "/model.safetensors")
    # The client keeps whole 10 MiB chunks only, so it resumes from the last chunk boundary.
    assert [r.range for r in gets] == [None, f"bytes={CLIENT_CHUNK}-"]


def test_aborted_snapshot_reruns_only_the_unfinished_file(server, files, tmp_path):
    big = os.urandom(3 * MIB)
    server.add_repo(REPO, {**files, "model.safetensors": big})
    server.drop_after(REPO, "model.safetensors", MIB, abort=True)  # a TCP reset: the client gives up

    with pytest.raises(httpx2.TransportError):
        snapshot_download(REPO, endpoint=server.url, local_dir=tmp_path / "out", token=False)
    assert not (tmp_path / "out" / "model.safetensors").exists()
    assert (tmp_path / "out" / "config.json").read_bytes() == files["config.json"]

    server.clear_requests()
    out = Path(snapshot_download(REPO, endpoint=server.url, local_dir=tmp_path / "out", token=False))

    assert (out / "model.safetensors").read_bytes() == big
    resolved = {r.path.rsplit("/", 1)[-1] for r in server.requests if "/resolve/" in r.path and r.method == "GET"}
    assert resolved == {"model.safetensors"}  # finished files are not fetched again
    # huggingface_hub deletes its partial file on failure, so the re-run starts that file from byte 0.
    assert [r.range for r in requests_for(server, "/model.safetensors")] == [None]


@pytest.mark.parametrize("name, algorithm", [("model.safetensors", "sha256"), ("config.json", "git-sha1")])
def test_corrupt_serves_bytes_that_do_not_match_the_advertised_digest(server, api, files, tmp_path, name, algorithm):
    server.add_repo(REPO, files)
    server.corrupt(REPO, name)

    path = Path(hf_hub_download(REPO, name, endpoint=server.url, local_dir=tmp_path / "out", token=False))

    served = path.read_bytes()
    assert len(served) == len(files[name]) and served != files[name]  # the client does not notice by itself
    remote = next(iter(api.get_paths_info(REPO, [name])))
    advertised = remote.lfs.sha256 if remote.lfs else remote.blob_id
    assert advertised != (sha256(served) if remote.lfs else git_blob_id(served))
    report = api.verify_repo_checksums(REPO, local_dir=tmp_path / "out")
    assert [(m["path"], m["algorithm"]) for m in report.mismatches] == [(name, algorithm)]

    server.clear_faults()
    path = hf_hub_download(REPO, name, endpoint=server.url, local_dir=tmp_path / "out", force_download=True)
    assert Path(path).read_bytes() == files[name]


def test_lie_about_commit_shows_in_file_metadata(server, files):
    real = server.add_repo(REPO, files)
    fake = "f" * 40
    url = hf_hub_url(REPO, "config.json", endpoint=server.url)

    server.lie_about_commit(REPO, fake)
    assert get_hf_file_metadata(url, token=False).commit_hash == fake
    assert HfApi(endpoint=server.url, token=False).model_info(REPO).sha == real  # only /resolve lies

    server.clear_faults()
    assert get_hf_file_metadata(url, token=False).commit_hash == real


def test_drop_after_times_then_behaves_normally(server, files, tmp_path):
    server.add_repo(REPO, files)
    server.drop_after(REPO, "data.raw", 100, times=2, abort=True)

    for _ in range(2):
        with pytest.raises(httpx2.TransportError):
            hf_hub_download(REPO, "data.raw", endpoint=server.url, local_dir=tmp_path / "out", token=False)
    path = hf_hub_download(REPO, "data.raw", endpoint=server.url, local_dir=tmp_path / "out", token=False)
    assert Path(path).read_bytes() == files["data.raw"]
    assert len(requests_for(server, "/data.raw")) == 3


def test_client_hanging_up_mid_body_is_ignored_quietly(server, capfd):
    big = os.urandom(64 * MIB)
    server.add_repo(REPO, {"model.safetensors": big, "config.json": b"{}"})
    connection = http.client.HTTPConnection("127.0.0.1", server.port)
    connection.request("GET", f"/{REPO}/resolve/main/model.safetensors")
    assert connection.getresponse().read(1024) == big[:1024]
    connection.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    connection.close()  # reset: the server's next write fails

    time.sleep(0.2)  # let the abandoned handler thread hit its broken pipe
    with urllib.request.urlopen(f"{server.url}/{REPO}/resolve/main/config.json") as response:
        assert response.read() == b"{}"  # still serving
    assert capfd.readouterr().err == ""


def test_resolve_as_changes_only_the_model_info_sha(server, api, files):
    real = server.add_repo(REPO, files)
    server.resolve_as(REPO, "f" * 40)
    assert api.model_info(REPO, revision=real).sha == "f" * 40
    assert get_hf_file_metadata(hf_hub_url(REPO, "config.json", endpoint=server.url), token=False).commit_hash == real
    server.clear_faults()
    assert api.model_info(REPO, revision=real).sha == real


def test_fail_gets_answers_the_status_then_serves(server, files):
    server.add_repo(REPO, files)
    url = f"{server.url}/{REPO}/resolve/main/config.json"
    server.fail_gets(REPO, "config.json", 503, times=2)
    assert get_hf_file_metadata(url, token=False).size == len(files["config.json"])  # HEAD is not affected
    for _ in range(2):
        with pytest.raises(urllib.error.HTTPError) as error:
            urllib.request.urlopen(url)
        assert error.value.code == 503 and error.value.headers["X-Error-Message"] == "injected HTTP 503"
    with urllib.request.urlopen(url) as response:
        assert response.read() == files["config.json"]


def test_ignore_range_and_wrong_content_range(server, files):
    server.add_repo(REPO, files)
    url = f"{server.url}/{REPO}/resolve/main/model.safetensors"
    data = files["model.safetensors"]
    server.ignore_range(REPO, "model.safetensors")
    with urllib.request.urlopen(urllib.request.Request(url, headers={"Range": "bytes=100-"})) as response:
        assert response.status == 200 and "Content-Range" not in response.headers and response.read() == data

    server.clear_faults()
    server.wrong_content_range(REPO, "model.safetensors", "bytes 0-4095/4096")
    with urllib.request.urlopen(urllib.request.Request(url, headers={"Range": "bytes=100-"})) as response:
        assert response.status == 206 and response.headers["Content-Range"] == "bytes 0-4095/4096"
        assert response.read() == data[100:]  # the bytes asked for, described wrongly
    with urllib.request.urlopen(url) as response:  # no Range asked: a plain answer
        assert response.status == 200 and response.read() == data
