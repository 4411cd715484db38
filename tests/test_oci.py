"""push and pull through a real OCI registry (Debian's CNCF distribution registry), read back by skopeo."""

from __future__ import annotations

import json
import re
import shutil

import pytest
from helpers import audit_records, flip_byte, new_version, store_snapshot
from registry import CuttingProxy, Registry, TestCA, sha256_digest, skopeo

from sovpack.bundle.directory import read_metadata

USERS = {"alice": "s3cret-Pa55"}


def _nothing_staged(store) -> bool:
    return not (store / "tmp").exists() or list((store / "tmp").iterdir()) == []


@pytest.fixture
def registry(tmp_path):
    """A registry with htpasswd basic auth, plain HTTP on loopback."""
    with Registry(tmp_path / "registry", users=USERS) as r:
        yield r


@pytest.fixture
def password_file(tmp_path):
    path = tmp_path / "registry-password"
    path.write_text(USERS["alice"] + "\n")
    return path


@pytest.fixture
def login(password_file):
    return ("--username", "alice", "--password-file", password_file)


@pytest.fixture
def pushed(cli, signed_bundle, registry, login):
    """tiny v3 pushed to REGISTRY/models/tiny:3; returns the reference printed."""
    result = cli("push", signed_bundle, f"{registry.host}/models/tiny", *login)
    assert result.code == 0, result.err
    return f"{registry.host}/models/tiny:3"


def test_push_then_pull_installs_the_verified_bundle(cli, signed_bundle, registry, login, pushed, store, tmp_path):
    result = cli("pull", pushed, "--store", store, *login)
    assert result.code == 0, result.err
    assert "INSTALLED tiny v3" in result.out and "accepted by alice" in result.out
    installed = store / "bundles" / "tiny" / "3"
    for p in signed_bundle.rglob("*"):
        if p.is_file():
            assert (installed / p.relative_to(signed_bundle)).read_bytes() == p.read_bytes()
    record = json.loads((store / "records" / "tiny" / "3.json").read_text())
    assert record["source"]["kind"] == "registry" and record["source"]["ref"] == pushed
    assert record["source"]["manifest_digest"].startswith("sha256:")
    pulls = [r for r in audit_records(store) if r["event"] == "pull"]
    assert [r["outcome"] for r in pulls] == ["accepted"] and pulls[0]["name"] == "tiny" and pulls[0]["version"] == 3
    assert _nothing_staged(store)
    assert cli("verify", "tiny", "--store", store).code == 0


def test_push_from_the_store_is_audited_and_skopeo_reads_the_modelpack_artifact(
    cli, signed_bundle, registry, login, tmp_path, keys
):
    source = tmp_path / "source-store"
    assert cli("trust", "add", keys / "alice.pub", "--store", source).code == 0
    assert cli("import", _exported(cli, signed_bundle, tmp_path), "--store", source).code == 0
    result = cli("push", "tiny@3", f"{registry.host}/models/tiny:approved", "--store", source, *login)
    assert result.code == 0, result.err
    assert f"PUSHED tiny v3 -> {registry.host}/models/tiny:approved@sha256:" in result.out
    push = [r for r in audit_records(source) if r["event"] == "push"]
    assert len(push) == 1 and push[0]["outcome"] == "pushed" and push[0]["name"] == "tiny" and push[0]["version"] == 3
    assert push[0]["manifest_digest"] in result.out

    creds = f"alice:{USERS['alice']}"
    ref = f"docker://{registry.host}/models/tiny:approved"
    manifest = json.loads(skopeo("inspect", "--raw", "--tls-verify=false", "--creds", creds, ref).stdout)
    assert manifest["artifactType"] == "application/vnd.cncf.model.manifest.v1+json"
    assert manifest["config"]["mediaType"] == "application/vnd.cncf.model.config.v1+json"
    layers = {layer["annotations"]["org.cncf.model.filepath"]: layer for layer in manifest["layers"]}
    metadata = read_metadata(signed_bundle)
    assert set(layers) == {f.path for f in metadata.files} | {"sovpack.json", "signatures/" + _sig(signed_bundle)}
    assert layers["sovpack.json"]["mediaType"] == "application/vnd.sovpack.bundle.metadata.v1+json"
    assert layers["signatures/" + _sig(signed_bundle)]["mediaType"] == "application/vnd.dev.sigstore.bundle.v0.3+json"
    for f in metadata.files:
        expected_type = "application/vnd.cncf.model.weight.v1.raw" if f.role == "weights" else None
        assert layers[f.path]["digest"] == f"sha256:{f.sha256}" and layers[f.path]["size"] == f.size
        if expected_type:
            assert layers[f.path]["mediaType"] == expected_type

    copy = tmp_path / "skopeo-copy"
    skopeo("copy", "--src-tls-verify=false", "--src-creds", creds, ref, f"dir:{copy}")
    for f in metadata.files:  # the blobs the independent client copied are the files under their signed digests
        assert sha256_digest(copy / f.sha256) == f"sha256:{f.sha256}"
        assert (copy / f.sha256).read_bytes() == (signed_bundle / f.path).read_bytes()
    config = json.loads((copy / manifest["config"]["digest"].removeprefix("sha256:")).read_text())
    assert config["descriptor"]["name"] == "tiny" and config["descriptor"]["version"] == "3"
    assert config["modelfs"]["diffIds"] == [layer["digest"] for layer in manifest["layers"]]


def _exported(cli, bundle, tmp_path):
    out = tmp_path / "volumes"
    assert cli("export", bundle, "--to", out).code == 0
    return out


def _sig(bundle):
    return next((bundle / "signatures").iterdir()).name


def test_only_missing_blobs_move_on_push_and_pull(cli, signed_bundle, registry, login, pushed, store, tmp_path, model_dir, keys):
    again = cli("push", signed_bundle, f"{registry.host}/models/tiny", *login)
    assert again.code == 0 and "(0 file(s), 0 B sent" in again.out
    assert cli("pull", pushed, "--store", store, *login).code == 0
    v4 = new_version(cli, tmp_path, model_dir, keys, 4)  # tiny v3's files plus one more GGUF
    result = cli("push", v4, f"{registry.host}/models/tiny", *login)
    assert result.code == 0, result.err
    # the new GGUF, the new sovpack.json and the new signature; every other file is already there
    assert "(3 file(s)" in result.out, result.out
    result = cli("pull", f"{registry.host}/models/tiny:4", "--store", store, *login)
    assert result.code == 0, result.err
    assert "1 file(s)" in result.out and f"{len(read_metadata(v4).files) - 1} already held by the store" in result.out
    assert cli("verify", "tiny@4", "--store", store).code == 0
    result = cli("pull", f"{registry.host}/models/tiny:4", "--store", store, *login)
    assert result.code == 0 and "tiny v4 is already installed" in result.out


def test_pull_by_digest_pins_the_manifest(cli, signed_bundle, registry, login, store):
    pushed = cli("push", signed_bundle, f"{registry.host}/models/tiny", *login)
    by_digest = pushed.out.split(" -> ")[1].split()[0].replace(":3@", "@")
    result = cli("pull", by_digest, "--store", store, *login)
    assert result.code == 0, result.err
    other = by_digest[:-64] + "0" * 64
    before = store_snapshot(store)
    result = cli("pull", other, "--store", store, *login)
    assert result.code == 2 and "is not in the registry" in result.err and "MANIFEST_UNKNOWN" in result.err
    assert store_snapshot(store) == before


def test_a_blob_altered_in_the_registry_is_refused_and_the_store_is_unchanged(cli, signed_bundle, registry, login, pushed, store):
    gguf = next(f for f in read_metadata(signed_bundle).files if f.format == "gguf")
    flip_byte(registry.blob_path(f"sha256:{gguf.sha256}"), gguf.size // 2)
    before = store_snapshot(store)
    result = cli("pull", pushed, "--store", store, *login)
    assert result.code == 1
    assert f"{gguf.path}: the registry served blob sha256:{gguf.sha256}" in result.err and "altered" in result.err
    assert store_snapshot(store) == before and _nothing_staged(store)
    refused = [r for r in audit_records(store) if r["event"] == "pull"]
    assert refused[-1]["outcome"] == "refused" and gguf.path in refused[-1]["reason"]


def test_an_altered_sovpack_json_in_the_registry_is_refused(cli, signed_bundle, registry, login, pushed, store):
    raw = (signed_bundle / "sovpack.json").read_bytes()
    flip_byte(registry.blob_path(sha256_digest(signed_bundle / "sovpack.json")), len(raw) // 2)
    before = store_snapshot(store)
    result = cli("pull", pushed, "--store", store, *login)
    assert result.code == 1 and "sovpack.json: the registry served blob" in result.err
    assert store_snapshot(store) == before


def test_a_manifest_pointing_at_a_missing_blob_is_refused(cli, signed_bundle, registry, login, pushed, store):
    gguf = next(f for f in read_metadata(signed_bundle).files if f.format == "gguf")
    shutil.rmtree(registry.blob_path(f"sha256:{gguf.sha256}").parent)
    before = store_snapshot(store)
    result = cli("pull", pushed, "--store", store, *login)
    assert result.code == 1
    assert f"lists {gguf.path} as blob sha256:{gguf.sha256}" in result.err and "does not hold that blob" in result.err
    assert store_snapshot(store) == before and _nothing_staged(store)


def test_wrong_or_missing_credentials_are_refused(cli, signed_bundle, registry, pushed, store, tmp_path):
    wrong = tmp_path / "wrong"
    wrong.write_text("not-the-password\n")
    before = store_snapshot(store)
    result = cli("pull", pushed, "--store", store, "--username", "alice", "--password-file", wrong)
    assert result.code == 3
    assert (
        f"the registry {registry.host} refused the credentials of alice (from --username alice with --password-file" in result.err
    )
    result = cli("pull", pushed, "--store", store)
    assert result.code == 3 and "requires credentials and none were found" in result.err
    result = cli("push", signed_bundle, f"{registry.host}/models/tiny", "--username", "alice", "--password-file", wrong)
    assert result.code == 3 and "refused the credentials of alice" in result.err
    assert store_snapshot(store) == before
    failed = [r for r in audit_records(store) if r["event"] == "pull"]
    assert [r["outcome"] for r in failed] == ["failed", "failed"] and all(r["exit_code"] == 3 for r in failed)


def test_credentials_from_the_container_auth_file(cli, registry, pushed, store, tmp_path, monkeypatch):
    import base64

    auth = tmp_path / "auth.json"
    token = base64.b64encode(f"alice:{USERS['alice']}".encode()).decode()
    auth.write_text(json.dumps({"auths": {registry.host: {"auth": token}}}))
    monkeypatch.setenv("REGISTRY_AUTH_FILE", str(auth))
    result = cli("pull", pushed, "--store", store)
    assert result.code == 0, result.err


def test_tls_with_the_in_network_ca_and_a_certificate_from_another_ca(cli, signed_bundle, store, tmp_path, password_file):
    ca, other = TestCA(tmp_path / "ca"), TestCA(tmp_path / "other-ca", "another CA")
    login = ("--username", "alice", "--password-file", password_file)
    with Registry(tmp_path / "tls-registry", users=USERS, tls=ca) as registry:
        ref = f"{registry.host}/models/tiny:3"
        result = cli("push", signed_bundle, ref, "--ca-file", ca.cert_file, *login)
        assert result.code == 0, result.err
        before = store_snapshot(store)
        for extra in (("--ca-file", other.cert_file), ()):  # another CA; the system's CAs
            result = cli("pull", ref, "--store", store, *extra, *login)
            assert result.code == 3
            assert f"the TLS certificate of the registry {registry.host} is not trusted" in result.err
            assert "--ca-file" in result.err
        assert store_snapshot(store) == before
        result = cli("pull", ref, "--store", store, "--ca-file", ca.cert_file, *login)
        assert result.code == 0, result.err
        creds = f"alice:{USERS['alice']}"
        manifest = skopeo("inspect", "--raw", "--cert-dir", _cert_dir(ca, tmp_path), "--creds", creds, f"docker://{ref}")
        assert json.loads(manifest.stdout)["artifactType"] == "application/vnd.cncf.model.manifest.v1+json"


def _cert_dir(ca, tmp_path):
    directory = tmp_path / "skopeo-certs"
    directory.mkdir(exist_ok=True)
    shutil.copy(ca.cert_file, directory / "ca.crt")
    return directory


def test_bearer_token_flow(cli, signed_bundle, store, tmp_path, password_file):
    login = ("--username", "alice", "--password-file", password_file)
    with Registry(tmp_path / "token-registry", users=USERS, token=True) as registry:
        ref = f"{registry.host}/models/tiny:3"
        result = cli("push", signed_bundle, ref, *login)
        assert result.code == 0, result.err
        result = cli("pull", ref, "--store", store, *login)
        assert result.code == 0, result.err
        scopes = [s for r in registry.token_service.requests if r["user"] == "alice" for s in r["scope"]]
        assert "repository:models/tiny:pull,push" in scopes and "repository:models/tiny:pull" in scopes
        wrong = tmp_path / "wrong"
        wrong.write_text("nope\n")
        result = cli(
            "pull",
            ref,
            "--store",
            tmp_path / "other-store",
            "--trust",
            tmp_path / "keys" / "alice.pub",
            "--username",
            "alice",
            "--password-file",
            wrong,
        )
        assert result.code == 3 and "the token service" in result.err and "refused the credentials of alice" in result.err


def test_a_rollback_to_an_older_tag_is_refused_before_anything_is_fetched(
    cli, signed_bundle, registry, login, pushed, store, tmp_path, model_dir, keys
):
    v4 = new_version(cli, tmp_path, model_dir, keys, 4)
    assert cli("push", v4, f"{registry.host}/models/tiny", *login).code == 0
    assert cli("pull", f"{registry.host}/models/tiny:4", "--store", store, *login).code == 0
    before = store_snapshot(store)
    result = cli("pull", pushed, "--store", store, *login)
    assert result.code == 1
    assert "tiny v3 (as its index says)" not in result.err
    assert "tiny v3 is not newer than v4, the highest version of tiny ever installed" in result.err and "rollback" in result.err
    assert store_snapshot(store) == before and _nothing_staged(store)
    assert audit_records(store)[-1]["outcome"] == "refused"


def test_a_bundle_signed_by_an_untrusted_key_is_refused(cli, model_dir, registry, login, store, tmp_path, keys):
    bundle = tmp_path / "mallory-bundle"
    assert cli("pack", model_dir, "--out", bundle, "--name", "tiny", "--version", "3").code == 0
    assert cli("sign", bundle, "--key", keys / "mallory.key").code == 0
    assert cli("push", bundle, f"{registry.host}/models/tiny", *login).code == 0
    before = store_snapshot(store)
    result = cli("pull", f"{registry.host}/models/tiny:3", "--store", store, *login)
    assert result.code == 1 and "tiny v3 failed verification" in result.err
    assert store_snapshot(store) == before and _nothing_staged(store)


def test_push_refuses_an_unsigned_bundle_and_a_file_changed_after_signing(
    cli, model_dir, signed_bundle, registry, login, tmp_path
):
    unsigned = tmp_path / "unsigned"
    assert cli("pack", model_dir, "--out", unsigned, "--name", "tiny", "--version", "3").code == 0
    result = cli("push", unsigned, f"{registry.host}/models/tiny", *login)
    assert result.code == 1 and "it has no signature" in result.err
    gguf = next(f for f in read_metadata(signed_bundle).files if f.format == "gguf")
    flip_byte(signed_bundle / gguf.path, gguf.size // 2)
    result = cli("push", signed_bundle, f"{registry.host}/models/tiny", *login)
    assert result.code == 1
    assert gguf.path in result.err and f"do not hash to sha256:{gguf.sha256}" in result.err
    assert (
        skopeo(
            "inspect",
            "--raw",
            "--tls-verify=false",
            "--creds",
            f"alice:{USERS['alice']}",
            f"docker://{registry.host}/models/tiny:3",
            check=False,
        ).returncode
        != 0
    )


MiB = 1 << 20


@pytest.fixture
def big_bundle(cli, model_dir, tmp_path, keys):
    """tiny v5 with a 6 MiB safetensors file, for transfers cut part-way."""
    from helpers import bundle_with_big_file

    return bundle_with_big_file(cli, model_dir, tmp_path, keys, 6 * MiB)


def test_a_pull_cut_mid_blob_resumes_in_the_same_run(cli, big_bundle, registry, login, store):
    assert cli("push", big_bundle, f"{registry.host}/models/tiny", *login).code == 0
    proxy = CuttingProxy(registry.port)
    try:
        proxy.arm(b"GET /v2/models/tiny/blobs/sha256:" + _big_sha(big_bundle).encode(), [2 * MiB])
        result = cli("pull", f"{proxy.host}/models/tiny:5", "--store", store, *login)
        assert result.code == 0, result.err
        assert proxy.cuts == 1 and b"Range: bytes=" in proxy.sent
        assert "1 continued from an earlier attempt" in result.out
    finally:
        proxy.close()
    assert cli("verify", "tiny@5", "--store", store).code == 0


def test_a_pull_that_keeps_failing_keeps_its_bytes_and_the_next_pull_continues(cli, big_bundle, registry, login, store):
    assert cli("push", big_bundle, f"{registry.host}/models/tiny", *login).code == 0
    proxy = CuttingProxy(registry.port)
    try:
        proxy.arm(b"GET /v2/models/tiny/blobs/sha256:" + _big_sha(big_bundle).encode(), [MiB, 0, 0])
        before = store_snapshot(store)
        result = cli("pull", f"{proxy.host}/models/tiny:5", "--store", store, *login)
        assert result.code == 3
        assert "downloading weights-2.safetensors" in result.err and "run the same pull again" in result.err
        assert store_snapshot(store) == before
        partial = list((store / "tmp").glob("pull-*/partial/*"))
        assert len(partial) == 1 and partial[0].stat().st_size > MiB // 2
        assert audit_records(store)[-1]["outcome"] == "failed"
        proxy.sent.clear()
        result = cli("pull", f"{proxy.host}/models/tiny:5", "--store", store, *login)
        assert result.code == 0, result.err
        assert b"Range: bytes=" in proxy.sent and "1 continued from an earlier attempt" in result.out
    finally:
        proxy.close()
    assert _nothing_staged(store)
    assert cli("verify", "tiny@5", "--store", store).code == 0


def test_a_push_cut_mid_chunk_resumes_in_the_same_run_and_in_the_next(cli, big_bundle, registry, login, store):
    proxy = CuttingProxy(registry.port)
    ref = f"{proxy.host}/models/tiny"
    try:
        proxy.arm(b"Content-Range: 1048576-", [MiB // 2], downstream=False)  # the big file's second chunk
        result = cli("push", big_bundle, ref, "--chunk-size", "1MiB", *login)
        assert result.code == 0, result.err
        assert proxy.cuts == 1
        assert cli("pull", f"{registry.host}/models/tiny:5", "--store", store, *login).code == 0

        proxy.arm(b"Content-Range: 2097152-", [0, 0, 0], downstream=False)  # its third chunk, three times
        result = cli("push", big_bundle, f"{proxy.host}/models/other", "--chunk-size", "1MiB", *login)
        assert result.code == 3 and "run the same push again" in result.err
        assert [r["outcome"] for r in audit_records_of_default_push()][-1] == "failed"
        result = cli("push", big_bundle, f"{proxy.host}/models/other", "--chunk-size", "1MiB", *login)
        assert result.code == 0, result.err
        assert "1 continued from an earlier attempt" in result.out
    finally:
        proxy.close()
    other = store.parent / "other-store"
    assert cli("trust", "add", store.parent / "keys" / "alice.pub", "--store", other).code == 0
    assert cli("pull", f"{registry.host}/models/other:5", "--store", other, *login).code == 0


def audit_records_of_default_push():
    import os
    from pathlib import Path

    return [r for r in audit_records(Path(os.environ["SOVPACK_HOME"])) if r["event"] == "push"]


def _big_sha(bundle) -> str:
    return next(f.sha256 for f in read_metadata(bundle).files if f.path == "weights-2.safetensors")


def _put_manifest(registry, tag: str, manifest: dict) -> None:
    import httpx2

    response = httpx2.put(
        f"http://{registry.host}/v2/models/tiny/manifests/{tag}",
        content=json.dumps(manifest).encode(),
        headers={"Content-Type": "application/vnd.oci.image.manifest.v1+json"},
        auth=("alice", USERS["alice"]),
    )
    assert response.status_code == 201, response.text


def _pushed_manifest(registry, tag: str) -> dict:
    import httpx2

    response = httpx2.get(
        f"http://{registry.host}/v2/models/tiny/manifests/{tag}",
        headers={"Accept": "application/vnd.oci.image.manifest.v1+json"},
        auth=("alice", USERS["alice"]),
    )
    return response.json()


@pytest.mark.parametrize(
    "tamper, message",
    [
        (lambda layers: layers.pop(0), "has no layer for"),
        (lambda layers: layers[0]["annotations"].update({"org.cncf.model.filepath": "../../etc/evil"}), "unsafe file path"),
        (lambda layers: layers[0].update({"size": layers[0]["size"] + 1}), "but the signed sovpack.json says"),
        (
            lambda layers: layers.append(dict(layers[0], annotations={"org.cncf.model.filepath": "extra.gguf"})),
            "does not list: extra.gguf",
        ),
    ],
    ids=["missing-layer", "unsafe-path", "other-size", "extra-layer"],
)
def test_a_manifest_that_disagrees_with_the_signed_metadata_is_refused(cli, registry, login, pushed, store, tamper, message):
    manifest = _pushed_manifest(registry, "3")
    tamper(manifest["layers"])
    _put_manifest(registry, "tampered", manifest)
    before = store_snapshot(store)
    result = cli("pull", f"{registry.host}/models/tiny:tampered", "--store", store, *login)
    assert result.code == 1 and message in result.err, result.err
    assert store_snapshot(store) == before and _nothing_staged(store)
    assert audit_records(store)[-1]["outcome"] == "refused"


def test_an_artifact_that_is_not_a_sovpack_bundle_is_refused(cli, registry, login, pushed, store):
    manifest = _pushed_manifest(registry, "3")
    manifest["layers"] = [
        layer for layer in manifest["layers"] if layer["annotations"]["org.cncf.model.filepath"] != "sovpack.json"
    ]
    _put_manifest(registry, "no-metadata", manifest)
    result = cli("pull", f"{registry.host}/models/tiny:no-metadata", "--store", store, *login)
    assert result.code == 1 and "has no sovpack.json layer: it is not a sovpack bundle" in result.err
    manifest["artifactType"] = "application/vnd.example.other"
    manifest["config"]["mediaType"] = "application/vnd.example.config"
    _put_manifest(registry, "other", manifest)
    result = cli("pull", f"{registry.host}/models/tiny:other", "--store", store, *login)
    assert result.code == 1 and "is not a ModelPack model artifact" in result.err


def test_usage_errors(cli, store, signed_bundle):
    result = cli("pull", "127.0.0.1:5000/models/tiny", "--store", store)
    assert result.code == 2 and "names no tag or digest" in result.err
    result = cli("pull", "tiny:3", "--store", store)
    assert result.code == 2 and "names no repository" in result.err
    result = cli("push", signed_bundle, "127.0.0.1:5000/Models/tiny")
    assert result.code == 2 and "is not a repository name" in result.err
    result = cli("push", signed_bundle, "127.0.0.1:5000/models/tiny", "--username", "alice")
    assert result.code == 2 and "give --username and --password-file together" in result.err


def test_pull_creates_a_store_as_import_does_and_says_so(cli, pushed, login, keys, tmp_path):
    new = tmp_path / "new-host"
    untagged = cli("pull", pushed.rsplit(":", 1)[0], "--trust", keys / "alice.pub", "--store", new, *login)
    assert untagged.code == 2 and "names no tag or digest" in untagged.err and not new.exists()
    result = cli("pull", pushed, "--trust", keys / "alice.pub", "--store", new, *login)
    assert result.code == 0, result.err
    assert f"created a new store at {new}" in result.err and (new / "bundles" / "tiny" / "3").is_dir()
    again = cli("pull", pushed, "--trust", keys / "alice.pub", "--store", new, *login)
    assert again.code == 0 and "already installed" in again.out and "created" not in again.err


def test_pull_without_trust_and_push_need_an_existing_store(cli, pushed, login, signed_bundle, tmp_path):
    missing = tmp_path / "typo"
    for args in (["pull", pushed], ["push", "tiny", pushed], ["push", signed_bundle, pushed]):
        result = cli(*args, "--store", missing, *login)
        assert result.code == 2 and f"no store exists at {missing} (--store)" in result.err, (args, result.err)
    assert not missing.exists()


def test_a_cut_chunk_that_reaches_the_registry_late_does_not_fail_the_push(cli, big_bundle, registry, login, store):
    """The distribution registry keeps the part of a cut PATCH it read, and cancels an upload whose size is not the offset
    the client's upload location records (BLOB_UPLOAD_INVALID, HTTP 404). When the cut request lands after the client
    asked where the upload stands, the client's next chunk is refused that way: push starts the blob afresh."""
    proxy = CuttingProxy(registry.port)
    try:
        proxy.arm(b"Content-Range: 1048576-", [MiB // 2], downstream=False, late=True)
        result = cli("push", big_bundle, f"{proxy.host}/models/tiny", "--chunk-size", "1MiB", *login)
        assert result.code == 0, result.err
        assert proxy.cuts == 1 and proxy.held is None  # the late request was delivered before the next chunk
    finally:
        proxy.close()
    # the registry cancelled the upload when the next chunk came (sic: its spelling), and the push went on afresh
    assert re.search(r"upload resumed at wrong offest: \d+ != 1048576", registry.log.read_text())
    assert cli("pull", f"{registry.host}/models/tiny:5", "--store", store, *login).code == 0
    assert cli("verify", "tiny@5", "--store", store).code == 0


def test_bytes_damaged_on_the_way_are_sent_again_and_a_path_that_keeps_damaging_them_fails(
    cli, big_bundle, registry, login, store
):
    """The registry refuses the blob (DIGEST_INVALID); the file itself still hashes to its signed digest, so push sends it
    once more in a new upload — and names the registry when the second try is damaged too, instead of blaming the file."""
    proxy = CuttingProxy(registry.port)
    try:
        proxy.arm(b"Content-Range: 1048576-", [MiB // 2], downstream=False, flip=True)
        result = cli("push", big_bundle, f"{proxy.host}/models/tiny", "--chunk-size", "1MiB", *login)
        assert result.code == 0, result.err
        assert proxy.flips == 1 and proxy.cuts == 0

        proxy.arm(b"Content-Range: 1048576-", [MiB // 2, MiB // 2], downstream=False, flip=True)
        result = cli("push", big_bundle, f"{proxy.host}/models/other", "--chunk-size", "1MiB", *login)
        assert result.code == 3 and proxy.flips == 3
        assert f"the registry {proxy.host} twice found that the bytes sent of" in result.err
        assert "weights-2.safetensors" in result.err and "although the file does" in result.err
    finally:
        proxy.close()
    assert cli("pull", f"{registry.host}/models/tiny:5", "--store", store, *login).code == 0
    assert cli("verify", "tiny@5", "--store", store).code == 0
