"""sovpack quantize: real llama.cpp (llama-cpp-python) on tiny llama GGUFs written by the tests."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from builders import write_gguf, write_llama_gguf

from sovpack.bundle.metadata import METADATA_FILE

ROOT = Path(__file__).resolve().parent.parent


def _pack(cli, model_dir: Path, bundle: Path, version: int = 1) -> Path:
    (model_dir / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
    result = cli("pack", model_dir, "--out", bundle, "--name", "tiny", "--version", str(version))
    assert result.code == 0, result.err
    return bundle


@pytest.fixture
def bundle(tmp_path, cli) -> Path:
    """An unsigned bundle holding a tiny F32 llama GGUF and a config."""
    write_llama_gguf(tmp_path / "model" / "gguf" / "tiny-F32.gguf")
    return _pack(cli, tmp_path / "model", tmp_path / "bundle")


@pytest.fixture(scope="module")
def big_model(tmp_path_factory) -> Path:
    """A 110 MiB F32 model: Q4_K_M on one thread takes about 1.5 s, time enough to interrupt it."""
    return write_llama_gguf(tmp_path_factory.mktemp("big") / "big-F32.gguf", n_embd=1024, n_ff=2048, n_layer=3)


def _entry(bundle: Path, path: str) -> dict:
    files = json.loads((bundle / METADATA_FILE).read_text())["files"]
    return next(f for f in files if f["path"] == path)


def _snapshot(bundle: Path) -> dict[str, bytes | int]:
    """Every file under the bundle, with sovpack.json's bytes and the others' sizes."""
    return {
        str(p.relative_to(bundle)): p.read_bytes() if p.name == METADATA_FILE else p.stat().st_size
        for p in sorted(bundle.rglob("*"))
        if p.is_file()
    }


def _work_dir(bundle: Path) -> Path:
    return bundle.parent / f".{bundle.name}.sovpack-quantize"


def _sovpack(*args, **popen) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "sovpack", *map(str, args)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **popen,
    )


def _wait_for_partial(bundle: Path, process: subprocess.Popen, timeout: float = 30) -> Path:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        partials = list(_work_dir(bundle).glob("*.partial")) if _work_dir(bundle).is_dir() else []
        if partials and partials[0].stat().st_size > 0:
            return partials[0]
        assert process.poll() is None, process.communicate()
        time.sleep(0.005)
    raise AssertionError("quantize never started writing its output")


def _quantizer_children(parent_pid: int) -> list[int]:
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and f'"parent_pid": {parent_pid}' in (proc / "cmdline").read_bytes().decode(errors="replace"):
                found.append(int(proc.name))
        except OSError:
            pass
    return found


# --- the happy path ----------------------------------------------------------------------


def test_quantize_to_q8_0_and_q4_k_m_records_provenance_and_llama_cpp_loads_the_result(cli, bundle):
    import gguf

    source = _entry(bundle, "gguf/tiny-F32.gguf")
    result = cli("quantize", bundle, "--type", "q8_0", "--type", "Q4_K_M")
    assert result.code == 0, result.err
    assert "gguf/tiny-Q8_0.gguf" in result.out and "gguf/tiny-Q4_K_M.gguf" in result.out

    q8 = {t.name: t.tensor_type.name for t in gguf.GGUFReader(bundle / "gguf" / "tiny-Q8_0.gguf").tensors}
    assert all(kind == "Q8_0" for name, kind in q8.items() if not name.endswith("norm.weight"))
    assert {kind for name, kind in q8.items() if name.endswith("norm.weight")} == {"F32"}
    q4 = {t.name: t.tensor_type.name for t in gguf.GGUFReader(bundle / "gguf" / "tiny-Q4_K_M.gguf").tensors}
    matrices = {kind for name, kind in q4.items() if not name.endswith("norm.weight")}
    assert matrices == {"Q4_K", "Q6_K"}  # the K-quant mix: output and some ffn_down/attn_v in Q6_K
    assert q4["output.weight"] == "Q6_K" and q4["blk.0.attn_q.weight"] == "Q4_K"

    entry = _entry(bundle, "gguf/tiny-Q4_K_M.gguf")
    data = (bundle / "gguf" / "tiny-Q4_K_M.gguf").read_bytes()
    assert entry["sha256"] == hashlib.sha256(data).hexdigest() and entry["size"] == len(data)
    assert entry["role"] == "weights" and entry["format"] == "gguf" and entry["details"]["file_type"] == "Q4_K_M"
    provenance = entry["source"]
    assert provenance["type"] == "quantized" and provenance["quantization"] == "Q4_K_M"
    assert provenance["input"] == "gguf/tiny-F32.gguf" and provenance["input_sha256"] == source["sha256"]
    assert provenance["input_file_type"] == "F32" and provenance["input_source"] == {"type": "local"}
    import llama_cpp

    assert provenance["llama_cpp_python_version"] == llama_cpp.__version__
    assert provenance["llama_cpp_version"] == llama_cpp.llama_version().decode()
    assert provenance["llama_cpp_commit"]
    assert any(name.startswith("libllama") for name in provenance["llama_cpp_libraries"])
    options = provenance["options"]
    assert options["ftype"] == llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M and options["allow_requantize"] is False
    assert options["nthread"] >= 1 and options["imatrix"] is None and options["pure"] is False
    assert _entry(bundle, "gguf/tiny-Q8_0.gguf")["source"]["options"]["ftype"] == llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0
    assert not _work_dir(bundle).exists()

    model = llama_cpp.Llama(model_path=str(bundle / "gguf" / "tiny-Q4_K_M.gguf"), vocab_only=False, n_ctx=64, verbose=False)
    try:
        assert model.n_vocab() == 311
        completion = model.create_completion("ab", max_tokens=2, temperature=0.0)
        assert completion["usage"]["prompt_tokens"] >= 1 and completion["usage"]["completion_tokens"] >= 1
    finally:
        model.close()


def test_signed_bundle_signatures_become_stale_then_sign_and_verify_pass(cli, bundle, keys):
    assert cli("sign", bundle, "--key", keys / "alice.key").code == 0
    signature = next(p.relative_to(bundle).as_posix() for p in (bundle / "signatures").iterdir())

    result = cli("quantize", bundle, "--type", "Q4_0")
    assert result.code == 0, result.err
    assert f"{signature} no longer covers this bundle" in result.out
    assert "tiny v1 -> v2" in result.out and "pass --version 1 to keep it" in result.out
    metadata = json.loads((bundle / METADATA_FILE).read_text())
    assert metadata["version"] == 2

    inspected = cli("inspect", bundle, "--json")
    assert [s["covers_metadata"] for s in json.loads(inspected.out)["signatures"]] == [False]
    stale = cli("verify", bundle, "--trust", keys / "alice.pub")
    assert stale.code == 1 and "REFUSED" in stale.err and signature in " ".join(stale.err.split())

    assert cli("sign", bundle, "--key", keys / "alice.key").code == 0
    verified = cli("verify", bundle, "--trust", keys / "alice.pub")
    assert verified.code == 0, verified.out
    assert "VERIFIED" in verified.out


def test_inspect_shows_the_type_mix_and_where_a_quantized_file_came_from(cli, bundle):
    assert cli("quantize", bundle, "--type", "Q8_0").code == 0
    shown = cli("inspect", bundle).out
    assert "llama F32 (21 F32)" in shown
    assert "llama Q8_0 (16 Q8_0, 5 F32)" in shown
    assert "quantized to Q8_0 from gguf/tiny-F32.gguf" in shown and "by llama.cpp" in shown


def test_version_option_sets_the_new_version_and_refuses_to_go_down(cli, bundle):
    lower = cli("quantize", bundle, "--type", "Q8_0", "--version", "0")
    assert lower.code == 2 and "--version 0 is lower than the bundle's current version 1" in lower.err
    result = cli("quantize", bundle, "--type", "Q8_0", "--version", "7")
    assert result.code == 0 and "tiny v1 -> v7" in result.out
    assert json.loads((bundle / METADATA_FILE).read_text())["version"] == 7


def test_output_is_identical_whatever_the_thread_count(tmp_path, cli):
    digests = []
    for threads in ("1", "2"):
        write_llama_gguf(tmp_path / f"m{threads}" / "tiny-F32.gguf")
        bundle = _pack(cli, tmp_path / f"m{threads}", tmp_path / f"b{threads}")
        assert cli("quantize", bundle, "--type", "Q5_K_M", "--threads", threads).code == 0
        entry = _entry(bundle, "tiny-Q5_K_M.gguf")
        assert entry["source"]["options"]["nthread"] == int(threads)
        digests.append(entry["sha256"])
    assert digests[0] == digests[1]


def test_f16_split_source_is_found_checked_and_recorded_part_by_part(tmp_path, cli):
    import gguf

    first = write_llama_gguf(tmp_path / "model" / "tiny-F16.gguf", file_type="F16", split_max_tensors=8)
    assert first.name == "tiny-F16-00001-of-00003.gguf"
    bundle = _pack(cli, tmp_path / "model", tmp_path / "bundle")
    result = cli("quantize", bundle, "--type", "Q6_K")
    assert result.code == 0, result.err
    provenance = _entry(bundle, "tiny-Q6_K.gguf")["source"]
    assert provenance["input"] == first.name and provenance["input_file_type"] == "F16"
    assert [p["path"] for p in provenance["input_parts"]] == [f"tiny-F16-0000{i}-of-00003.gguf" for i in (1, 2, 3)]
    assert {t.tensor_type.name for t in gguf.GGUFReader(bundle / "tiny-Q6_K.gguf").tensors} == {"Q6_K", "F32"}

    second = cli("quantize", bundle, "--type", "Q8_0", "--source", "tiny-F16-00002-of-00003.gguf")
    assert second.code == 2 and "part 2 of a GGUF split into 3 files; give its first part" in second.err


def test_split_source_whose_parts_are_misnamed_or_missing_is_refused_naming_them(tmp_path, cli):
    first = write_llama_gguf(tmp_path / "renamed" / "tiny-F16.gguf", file_type="F16", split_max_tensors=8)
    for part in sorted(first.parent.glob("tiny-F16-*.gguf")):  # llama.cpp finds the parts by these names
        part.rename(part.with_name(part.name.replace("-of-", "-from-")))
    bundle = _pack(cli, tmp_path / "renamed", tmp_path / "b1")
    misnamed = cli("quantize", bundle, "--type", "Q8_0")
    assert misnamed.code == 1
    assert (
        "tiny-F16-00001-from-00003.gguf is the first of 3 split GGUF parts, but its name does not end in -00001-of-00003.gguf"
    ) in " ".join(misnamed.err.split())

    first = write_llama_gguf(tmp_path / "short" / "tiny-F16.gguf", file_type="F16", split_max_tensors=8)
    (first.parent / "tiny-F16-00003-of-00003.gguf").unlink()
    bundle = _pack(cli, tmp_path / "short", tmp_path / "b2")
    before = _snapshot(bundle)
    missing = cli("quantize", bundle, "--type", "Q8_0")
    assert missing.code == 1
    assert (
        "tiny-F16-00001-of-00003.gguf is split into 3 parts, but the bundle's inventory lacks tiny-F16-00003-of-00003.gguf"
    ) in " ".join(missing.err.split())
    assert _snapshot(bundle) == before and not _work_dir(bundle).exists()


def test_help_lists_exactly_the_offered_types_and_stays_free_of_heavy_imports():
    from sovpack.cli.quantize_commands import TYPES_HELP
    from sovpack.quantize.build import QUANT_TYPES

    assert TYPES_HELP.split(", ") == list(QUANT_TYPES)
    probe = "import sys, sovpack.cli; print('sovpack.quantize.build' in sys.modules, 'llama_cpp' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True).stdout.split() == [
        "False",
        "False",
    ]


# --- bad input ---------------------------------------------------------------------------


def test_unknown_type_is_a_usage_error_listing_the_valid_types(cli, bundle):
    before = _snapshot(bundle)
    result = cli("quantize", bundle, "--type", "Q4_K_X")
    assert result.code == 2
    assert "--type 'Q4_K_X' is not a quantization type" in result.err and "Q8_0, Q6_K, Q5_K_M" in result.err
    assert "Q4_K_M" in result.err and "Q4_0" in result.err
    iq = cli("quantize", bundle, "--type", "iq2_xxs")
    assert iq.code == 2 and "importance matrix" in iq.err
    assert _snapshot(bundle) == before


def test_missing_source_names_the_file_and_the_gguf_files_there_are(cli, bundle):
    result = cli("quantize", bundle, "--type", "Q8_0", "--source", "gguf/nothere-F16.gguf")
    assert result.code == 2
    assert "--source gguf/nothere-F16.gguf: no such file in the bundle's inventory" in result.err
    assert "gguf/tiny-F32.gguf (F32)" in result.err


def test_bundle_without_gguf_says_so(tmp_path, cli):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "README.md").write_text("# no weights\n")
    bundle = _pack(cli, tmp_path / "model", tmp_path / "bundle")
    result = cli("quantize", bundle, "--type", "Q8_0")
    assert result.code == 2 and "holds no GGUF file to quantize" in result.err


def test_two_unquantized_ggufs_are_ambiguous_without_source(tmp_path, cli):
    write_llama_gguf(tmp_path / "model" / "a-F32.gguf")
    write_llama_gguf(tmp_path / "model" / "b-F32.gguf", seed=1)
    bundle = _pack(cli, tmp_path / "model", tmp_path / "bundle")
    result = cli("quantize", bundle, "--type", "Q8_0")
    assert result.code == 2
    assert "2 F32/F16/BF16 GGUF files (a-F32.gguf (F32), b-F32.gguf (F32)); choose one with --source" in result.err
    chosen = cli("quantize", bundle, "--type", "Q8_0", "--source", "b-F32.gguf")
    assert chosen.code == 0 and _entry(bundle, "b-Q8_0.gguf")["source"]["input"] == "b-F32.gguf"


def test_source_that_is_not_gguf_is_a_usage_error(cli, bundle):
    result = cli("quantize", bundle, "--type", "Q8_0", "--source", "config.json")
    assert result.code == 2
    assert "--source config.json is not a GGUF file (the inventory records its format as json)" in result.err


def test_malformed_gguf_listed_with_matching_digests_is_refused_before_llama_cpp(cli, bundle):
    """A producer wrote digests for a truncated GGUF: the inventory matches, the header does not."""
    from sovpack.bundle.directory import read_metadata, write_metadata
    from sovpack.common.hashing import digest_file

    path = bundle / "gguf" / "tiny-F32.gguf"
    path.write_bytes(path.read_bytes()[:100_000])
    metadata = read_metadata(bundle)
    entry = metadata.file("gguf/tiny-F32.gguf")
    digest = digest_file(path, metadata.shard_size)
    entry.size, entry.sha256, entry.shards = digest.size, digest.sha256, digest.shards
    write_metadata(bundle, metadata)
    before = _snapshot(bundle)

    result = cli("quantize", bundle, "--type", "Q8_0")
    assert result.code == 1
    assert "gguf/tiny-F32.gguf: malformed GGUF" in result.err
    assert _snapshot(bundle) == before


def test_gguf_llama_cpp_cannot_load_is_refused_with_its_reason(tmp_path, cli):
    write_gguf(tmp_path / "model" / "broken-F32.gguf")  # valid GGUF, but no llama hyperparameters
    bundle = _pack(cli, tmp_path / "model", tmp_path / "bundle")
    before = _snapshot(bundle)
    result = cli("quantize", bundle, "--type", "Q8_0")
    assert result.code == 1
    assert "llama.cpp refused to quantize broken-F32.gguf to Q8_0" in result.err and "llama.embedding_length" in result.err
    assert _snapshot(bundle) == before and not _work_dir(bundle).exists()


def test_a_plain_refusal_by_llama_cpp_is_not_probed_as_a_write_failure(tmp_path, cli, monkeypatch):
    import sovpack.quantize.llama

    probed = []
    monkeypatch.setattr(sovpack.quantize.llama, "_write_error", lambda partial: probed.append(partial))
    write_gguf(tmp_path / "model" / "broken-F32.gguf")  # llama.cpp refuses it: no I/O went wrong
    bundle = _pack(cli, tmp_path / "model", tmp_path / "bundle")
    assert cli("quantize", bundle, "--type", "Q8_0").code == 1
    assert probed == []


def test_the_llama_cpp_libraries_are_hashed_once_per_run(cli, bundle, monkeypatch):
    import sovpack.quantize.llama

    hashed = []
    real = sovpack.quantize.llama.sha256_file
    monkeypatch.setattr(sovpack.quantize.llama, "_library_digests", {})
    monkeypatch.setattr(sovpack.quantize.llama, "sha256_file", lambda path: hashed.append(path) or real(path))
    assert cli("quantize", bundle, "--type", "Q8_0", "--type", "Q4_0").code == 0
    libraries = _entry(bundle, "gguf/tiny-Q8_0.gguf")["source"]["llama_cpp_libraries"]
    assert libraries == _entry(bundle, "gguf/tiny-Q4_0.gguf")["source"]["llama_cpp_libraries"]
    assert any(name.startswith("libllama") for name in libraries)
    assert sorted(p.name for p in hashed) == sorted(libraries)  # two children, each library hashed once
    assert all(libraries[p.name] == real(p) for p in hashed)


def test_a_source_changed_while_it_is_quantized_is_refused_and_the_bundle_stays(cli, bundle, monkeypatch):
    import sovpack.quantize.build

    source = bundle / "gguf" / "tiny-F32.gguf"
    real = sovpack.quantize.build.run_llama_quantize

    def quantize_then_touch(*args, **kwargs):
        run = real(*args, **kwargs)
        os.utime(source, ns=(source.stat().st_atime_ns, source.stat().st_mtime_ns + 1_000_000_000))
        return run

    monkeypatch.setattr(sovpack.quantize.build, "run_llama_quantize", quantize_then_touch)
    before = (bundle / METADATA_FILE).read_bytes()
    result = cli("quantize", bundle, "--type", "Q8_0")
    assert result.code == 1 and "gguf/tiny-F32.gguf changed on disk while it was being quantized" in result.err, result.err
    assert (bundle / METADATA_FILE).read_bytes() == before and not (bundle / "gguf" / "tiny-Q8_0.gguf").exists()


def test_already_quantized_source_is_refused_unless_requantizing_is_allowed(cli, bundle):
    assert cli("quantize", bundle, "--type", "Q8_0").code == 0
    shutil.move(bundle / "gguf" / "tiny-F32.gguf", bundle.parent / "moved-away.gguf")
    metadata = json.loads((bundle / METADATA_FILE).read_text())
    metadata["files"] = [f for f in metadata["files"] if f["path"] != "gguf/tiny-F32.gguf"]
    (bundle / METADATA_FILE).write_text(json.dumps(metadata))

    implicit = cli("quantize", bundle, "--type", "Q4_0")
    assert implicit.code == 2 and "no F32, F16 or BF16 GGUF" in implicit.err and "gguf/tiny-Q8_0.gguf (Q8_0)" in implicit.err
    refused = cli("quantize", bundle, "--type", "Q4_0", "--source", "gguf/tiny-Q8_0.gguf")
    assert refused.code == 1
    assert "gguf/tiny-Q8_0.gguf is already quantized (Q8_0)" in refused.err and "--allow-requantize" in refused.err
    assert "errors of both steps add up" in refused.err

    allowed = cli("quantize", bundle, "--type", "Q4_0", "--source", "gguf/tiny-Q8_0.gguf", "--allow-requantize")
    assert allowed.code == 0, allowed.err
    provenance = _entry(bundle, "gguf/tiny-Q4_0.gguf")["source"]
    assert provenance["input_file_type"] == "Q8_0" and provenance["options"]["allow_requantize"] is True


def test_source_bytes_that_differ_from_the_inventory_are_refused(cli, bundle):
    path = bundle / "gguf" / "tiny-F32.gguf"
    data = bytearray(path.read_bytes())
    data[-10] ^= 0x01
    path.write_bytes(bytes(data))
    before = _snapshot(bundle)
    result = cli("quantize", bundle, "--type", "Q8_0")
    assert result.code == 1
    assert "refusing to quantize: gguf/tiny-F32.gguf does not match its digest in sovpack.json" in result.err
    assert "only bytes that match the bundle's inventory" in result.err
    assert _snapshot(bundle) == before


def test_unlisted_file_in_the_bundle_is_refused_before_anything_runs(cli, bundle):
    (bundle / "notes.txt").write_text("stray")
    result = cli("quantize", bundle, "--type", "Q8_0")
    assert result.code == 1 and "refusing to quantize: notes.txt not listed in the inventory (sovpack.json)" in result.err


def test_existing_output_is_not_replaced(cli, bundle):
    assert cli("quantize", bundle, "--type", "Q8_0").code == 0
    before = _snapshot(bundle)
    again = cli("quantize", bundle, "--type", "Q4_0", "--type", "Q8_0")
    assert again.code == 2 and "gguf/tiny-Q8_0.gguf is already in the bundle" in again.err
    assert _snapshot(bundle) == before


def test_a_directory_where_the_output_would_go_is_found_before_llama_cpp_runs(cli, bundle):
    (bundle / "gguf" / "tiny-Q8_0.gguf").mkdir()  # an empty directory: refused by the inventory check (issue 13)
    result = cli("quantize", bundle, "--type", "Q8_0")
    assert result.code == 1 and "gguf/tiny-Q8_0.gguf/ is an empty directory" in result.err
    assert not _work_dir(bundle).exists()


def test_bad_threads_and_missing_bundle_are_usage_errors(cli, bundle, tmp_path):
    assert cli("quantize", bundle, "--type", "Q8_0", "--threads", "0").code == 2
    missing = cli("quantize", tmp_path / "nothere", "--type", "Q8_0")
    assert missing.code == 2 and "is not a bundle directory" in missing.err


def test_missing_llama_cpp_is_exit_3_with_the_install_hint(cli, bundle, monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # what `import llama_cpp` sees when it is not installed
    result = cli("quantize", bundle, "--type", "Q8_0")
    assert result.code == 3 and "llama-cpp-python, which is not installed" in result.err and "sovpack[llama]" in result.err


def test_a_second_run_on_the_same_bundle_waits_for_none_and_says_why(cli, bundle):
    work = _work_dir(bundle)
    work.mkdir()
    with open(work / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        result = cli("quantize", bundle, "--type", "Q8_0")
    assert result.code == 3 and "another sovpack quantize is running" in result.err
    assert cli("quantize", bundle, "--type", "Q8_0").code == 0
    assert not work.exists()


# --- interruptions and full disks --------------------------------------------------------


def test_sigkill_mid_quantization_leaves_the_bundle_untouched_and_a_rerun_succeeds(tmp_path, cli, big_model):
    shutil.copy(big_model, tmp_path / "big-F32.gguf")
    bundle = _pack(cli, _move_into_dir(tmp_path / "big-F32.gguf"), tmp_path / "bundle")
    before = _snapshot(bundle)
    process = _sovpack("quantize", bundle, "--type", "Q4_K_M", "--threads", "1")
    partial = _wait_for_partial(bundle, process)
    process.kill()
    process.wait()

    assert _snapshot(bundle) == before
    assert partial.exists()  # the stale work file lives beside the bundle, never inside it
    deadline = time.monotonic() + 5
    while _quantizer_children(process.pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert _quantizer_children(process.pid) == []  # the llama.cpp child died with its parent

    rerun = cli("quantize", bundle, "--type", "Q4_K_M")
    assert rerun.code == 0, rerun.err
    assert not _work_dir(bundle).exists()
    assert set(_snapshot(bundle)) == set(before) | {"big-Q4_K_M.gguf"}


def test_ctrl_c_mid_quantization_exits_130_and_cleans_up(tmp_path, cli, big_model):
    shutil.copy(big_model, tmp_path / "big-F32.gguf")
    bundle = _pack(cli, _move_into_dir(tmp_path / "big-F32.gguf"), tmp_path / "bundle")
    before = _snapshot(bundle)
    process = _sovpack("quantize", bundle, "--type", "Q4_K_M", "--threads", "1", start_new_session=True)
    _wait_for_partial(bundle, process)
    started = time.monotonic()
    os.killpg(process.pid, signal.SIGINT)  # what a terminal sends to the whole foreground group
    _, err = process.communicate(timeout=30)
    assert time.monotonic() - started < 1.0  # llama.cpp is stopped, not waited for
    assert process.returncode == 130 and "interrupted" in err
    assert _snapshot(bundle) == before and not _work_dir(bundle).exists()


def test_file_size_limit_during_writing_is_a_clear_failure_with_nothing_half_written(cli, bundle):
    before = _snapshot(bundle)

    def limit_file_size() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (256 * 1024, 256 * 1024))

    process = _sovpack("quantize", bundle, "--type", "Q8_0", preexec_fn=limit_file_size)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 3, err
    assert "the Q8_0 output of gguf/tiny-F32.gguf grew past a file-size limit (File too large" in err
    assert "nothing was added to the bundle" in err
    assert _snapshot(bundle) == before and not _work_dir(bundle).exists()


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 48 MiB tmpfs holding an 18.6 MiB F32 model, when this process may mount one (root)."""
    mount_point = tmp_path / "tmpfs"
    mount_point.mkdir()
    if (
        os.geteuid() != 0
        or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48m", "tmpfs", str(mount_point)], capture_output=True).returncode
        != 0
    ):
        pytest.skip("mounting a small tmpfs needs root")
    try:
        write_llama_gguf(mount_point / "model" / "tiny-F32.gguf", n_embd=512, n_ff=1024, n_layer=2)
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def test_not_enough_free_space_is_refused_before_starting(small_tmpfs, cli):
    bundle = _pack(cli, small_tmpfs / "model", small_tmpfs / "bundle")  # hard links: about 29 MiB stay free
    before = _snapshot(bundle)
    result = cli("quantize", bundle, "--type", "Q8_0", "--type", "Q6_K")  # each output may need up to the input's size
    assert result.code == 3
    need = 2 * (bundle / "tiny-F32.gguf").stat().st_size / 2**20
    assert f"not enough free disk space to quantize tiny-F32.gguf: the output(s) may need up to {need:.1f} MiB" in result.err
    assert "MiB free; nothing was changed" in result.err
    assert _snapshot(bundle) == before and not _work_dir(bundle).exists()


def test_disk_filling_up_mid_write_is_a_clear_failure_with_nothing_half_written(small_tmpfs, cli):
    bundle = _pack(cli, small_tmpfs / "model", small_tmpfs / "bundle")
    before = _snapshot(bundle)
    process = _sovpack("quantize", bundle, "--type", "Q4_K_M", "--threads", "1")
    _wait_for_partial(bundle, process)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # another process fills the disk: shrink the tmpfs to what is in use now
        st = os.statvfs(small_tmpfs)
        used_kib = (st.f_blocks - st.f_bfree) * st.f_frsize // 1024 + 8
        if subprocess.run(["mount", "-o", f"remount,size={used_kib}k", str(small_tmpfs)], capture_output=True).returncode == 0:
            break
    _, err = process.communicate(timeout=60)
    assert process.returncode == 3, err
    assert "the disk filled up while writing the Q4_K_M output of tiny-F32.gguf (No space left on device" in err
    assert "nothing was added to the bundle" in err
    assert _snapshot(bundle) == before and not _work_dir(bundle).exists()


def test_a_commit_cut_short_is_rolled_back_by_the_next_run(cli, bundle, keys):
    """The state a SIGKILL between moving an output in and rewriting sovpack.json leaves behind."""
    assert cli("quantize", bundle, "--type", "Q8_0").code == 0
    output = bundle / "gguf" / "tiny-Q8_0.gguf"
    stray = output.read_bytes()
    metadata = json.loads((bundle / METADATA_FILE).read_text())
    metadata["files"] = [f for f in metadata["files"] if f["path"] != "gguf/tiny-Q8_0.gguf"]
    (bundle / METADATA_FILE).write_text(json.dumps(metadata))  # sovpack.json as it was before that commit
    work = _work_dir(bundle)
    work.mkdir()
    (work / "commit.json").write_text(
        json.dumps(
            {"outputs": [{"path": "gguf/tiny-Q8_0.gguf", "size": len(stray), "sha256": hashlib.sha256(stray).hexdigest()}]}
        )
    )
    unsignable = cli("sign", bundle, "--key", keys / "alice.key")
    assert unsignable.code == 1 and "gguf/tiny-Q8_0.gguf not listed" in unsignable.err

    result = cli("quantize", bundle, "--type", "Q4_0")
    assert result.code == 0, result.err
    assert not output.exists() and (bundle / "gguf" / "tiny-Q4_0.gguf").exists() and not work.exists()


def _move_into_dir(gguf_file: Path) -> Path:
    directory = gguf_file.parent / "model"
    directory.mkdir(exist_ok=True)
    shutil.move(gguf_file, directory / gguf_file.name)
    return directory


@pytest.mark.parametrize(
    ("source", "output"),
    [
        ("gguf/Model-F16.gguf", "gguf/Model-Q4_K_M.gguf"),
        ("Model-bf16.gguf", "Model-Q4_K_M.gguf"),
        ("Model.fp32.gguf", "Model-Q4_K_M.gguf"),
        ("Model_F32.GGUF", "Model-Q4_K_M.gguf"),
        ("Model-F16-00001-of-00003.gguf", "Model-Q4_K_M.gguf"),
        ("gguf/Model-BF16-00001-of-00002.GGUF", "gguf/Model-Q4_K_M.gguf"),
        ("Model-Q8_0.gguf", "Model-Q4_K_M.gguf"),
        ("weights.gguf", "weights-Q4_K_M.gguf"),
        ("F16.gguf", "F16-Q4_K_M.gguf"),
    ],
)
def test_output_is_named_after_the_source_with_its_type_replaced(source, output):
    from sovpack.quantize.build import output_path_for

    assert output_path_for(source, "Q4_K_M") == output


def test_quantize_reports_its_steps_through_the_progress_protocol(bundle):
    from sovpack.common.progress import Progress
    from sovpack.quantize.build import quantize_bundle

    class Recorder(Progress):
        def __init__(self):
            self.phases: list[list] = []

        def phase(self, name, total=None, unit="bytes"):
            self.phases.append([name, unit, total, 0])

        def set_total(self, total):
            self.phases[-1][2] = total

        def advance(self, n):
            self.phases[-1][3] += n

    progress = Recorder()
    result = quantize_bundle(bundle, ["Q8_0"], progress=progress)
    (checking, quantizing, hashing) = progress.phases
    assert checking == [
        f"checking {result.source.entry.path} against the inventory",
        "bytes",
        result.source.size,
        result.source.size,
    ]
    name, unit, tensors, done = quantizing
    assert name == f"quantizing {result.outputs[0].path}" and unit == "tensors" and tensors > 0 and done == tensors
    assert hashing[0] == f"hashing {result.outputs[0].path}"
