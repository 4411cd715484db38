"""Format inspectors on real files written by the formats' own libraries, and on hostile ones."""

from __future__ import annotations

import json
import pickle
import struct
import zipfile

import numpy as np
import pytest
from builders import write_gguf, write_safetensors

from sovpack.errors import FormatError
from sovpack.formats import examine, role_of
from sovpack.formats.gguf import inspect_gguf, read_chat_template
from sovpack.formats.safetensors import inspect_safetensors


def raw_safetensors(path, header: bytes | str, data: bytes = b"", declared_len: int | None = None):
    header = header.encode() if isinstance(header, str) else header
    path.write_bytes(struct.pack("<Q", len(header) if declared_len is None else declared_len) + header + data)
    return path


def test_safetensors_header_is_summarised(tmp_path):
    details = inspect_safetensors(write_safetensors(tmp_path / "m.safetensors"))
    assert details == {"tensor_count": 2, "dtypes": {"F16": 1, "F32": 1}, "parameter_count": 32 * 16 + 16}


@pytest.mark.parametrize(
    "header, data, declared, message",
    [
        ("[]", b"", None, "must be a JSON object"),
        ("{not json", b"", None, "not valid JSON"),
        (
            '{"a": {"dtype": "F32", '
            '"shape": [1], "data_offsets": [0, 4]}, "a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}',
            b"\0" * 4,
            None,
            "the key 'a' appears twice",
        ),
        ('{"a": {"dtype": "F33", "shape": [1], "data_offsets": [0, 4]}}', b"\0" * 4, None, "unknown dtype 'F33'"),
        (
            '{"a": {"dtype": "F32", '
            '"shape": [2], "data_offsets": [0, 8]}, "b": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}',
            b"\0" * 8,
            None,
            "overlaps",
        ),
        ('{"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}', b"\0" * 8, None, "leaving a gap"),
        ('{"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}', b"\0" * 8, None, "file length"),
        ('{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}', b"\0" * 12, None, "file length"),
        ('{"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 4]}}', b"\0" * 4, None, "needs 12"),
        ("{}", b"", 10**12, "over the"),
        ("{}", b"", 4096, "has only"),
    ],
)
def test_malformed_safetensors_is_refused(tmp_path, header, data, declared, message):
    path = raw_safetensors(tmp_path / "bad.safetensors", header, data, declared)
    with pytest.raises(FormatError, match=message):
        inspect_safetensors(path)


def test_gguf_metadata_is_read_and_template_hashed(tmp_path):
    path = write_gguf(tmp_path / "t.gguf", chat_template="{{ hello }}")
    details = inspect_gguf(path)
    assert details["architecture"] == "llama"
    assert details["file_type"] == "F32"
    assert details["context_length"] == 128
    assert details["tensor_count"] == 2 and details["tensor_types"] == {"F32": 2}
    assert details["vocab_size"] == 4
    import hashlib

    assert details["chat_template_sha256"] == hashlib.sha256(b"{{ hello }}").hexdigest()
    assert read_chat_template(path) == "{{ hello }}"


def test_real_smollm2_gguf(smollm_gguf):
    details = inspect_gguf(smollm_gguf)
    assert details["architecture"] == "llama"
    assert details["file_type"] == "Q4_1"
    assert details["context_length"] == 8192
    assert details["vocab_size"] == 49152
    assert details["tensor_count"] == 272
    assert details["chat_template_sha256"] == "872be49dbb638044ad01b60388f48d469ff2980e5f0dccdc22ec907db54d0788"


def _mutate(path, offset: int, data: bytes):
    raw = bytearray(path.read_bytes())
    raw[offset : offset + len(data)] = data
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize(
    "mutation, message",
    [
        (lambda p: _mutate(p, 0, b"GGUX"), "not a GGUF file"),
        (lambda p: _mutate(p, 4, struct.pack("<I", 99)), "version 99"),
        (lambda p: _mutate(p, 8, struct.pack("<Q", 2**40)), "implausible counts"),
        (lambda p: _mutate(p, 16, struct.pack("<Q", 2**40)), "implausible counts"),
        (lambda p: p.write_bytes(p.read_bytes()[:200]), "runs past the end|truncated"),
        (lambda p: p.write_bytes(p.read_bytes()[:-64]), "truncated"),
        (lambda p: p.write_bytes(p.read_bytes() + b"\0" * 4096), "unexplained bytes"),
        (lambda p: p.write_bytes(b"GGUF"), "too short"),
    ],
)
def test_malformed_gguf_is_refused_without_hanging(tmp_path, mutation, message):
    path = write_gguf(tmp_path / "bad.gguf")
    mutation(path)
    with pytest.raises(FormatError, match=message):
        inspect_gguf(path)


def _first_token_length_at(path) -> int:
    return path.read_bytes().index(b"<s>") - 8  # the u64 length before the vocabulary's first string


@pytest.mark.parametrize(
    "mutation, message",
    [
        (
            lambda p: _mutate(p, _first_token_length_at(p), struct.pack("<Q", 2**62)),
            "'tokenizer.ggml.tokens' holds a string of .* exceeds the",
        ),
        (lambda p: p.write_bytes(p.read_bytes()[: p.read_bytes().index(b"</s>")]), "runs past the end|truncated"),
    ],
)
def test_a_bad_vocabulary_string_is_refused(tmp_path, mutation, message):
    path = write_gguf(tmp_path / "vocab.gguf")
    mutation(path)
    with pytest.raises(FormatError, match=message):
        inspect_gguf(path)


def test_gguf_key_length_bomb_is_bounded(tmp_path):
    path = write_gguf(tmp_path / "bomb.gguf")
    _mutate(path, 24, struct.pack("<Q", 2**62))  # length of the first key
    with pytest.raises(FormatError, match="exceeds"):
        inspect_gguf(path)


def test_gguf_tensor_offset_overlap_is_refused(tmp_path):
    path = write_gguf(tmp_path / "t.gguf")
    name = b"blk.1.weight"
    # tensor info: name, n_dims (u32), 2 dims (u64 each), type (u32), then the u64 data offset
    offset_field_position = path.read_bytes().index(name) + len(name) + 4 + 2 * 8 + 4
    _mutate(path, offset_field_position, struct.pack("<Q", 0))
    with pytest.raises(FormatError, match="blk.1.weight.*offset 0"):
        inspect_gguf(path)


@pytest.mark.parametrize(
    "name, content, reason",
    [
        ("pytorch_model.bin", b"anything", "extension .bin"),
        ("model.ckpt", b"x", "extension .ckpt"),
        ("weights.data", pickle.dumps({"a": 1}, protocol=4), "a pickle of protocol 4"),
    ],
)
def test_pickles_are_recognised(tmp_path, name, content, reason):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(FormatError, match=f"{name}: refused as pickle-based weights: .*{reason}.*safetensors"):
        examine(path, name)


def test_torch_zip_archive_is_a_pickle(tmp_path):
    path = tmp_path / "model.weights"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", pickle.dumps([1]))
    with pytest.raises(FormatError, match="a zip archive holding a pickle of protocol 4 .member 'archive/data.pkl'"):
        examine(path, "model.weights", ["*"])


def test_plain_files_are_not_pickles(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"a": 1}))
    assert examine(tmp_path / "config.json", "config.json").format == "json"
    st = write_safetensors(tmp_path / "m.safetensors", {"x": np.zeros(2, np.float32)})
    assert examine(st, "m.safetensors").format == "safetensors"


@pytest.mark.parametrize(
    "path, fmt, role",
    [
        ("model-00001-of-00002.safetensors", "safetensors", "weights"),
        ("weights.dat", "safetensors", "weights"),
        ("model.safetensors.index.json", "json", "weights-index"),
        ("gguf/x-Q4_K_M.gguf", "gguf", "weights"),
        ("config.json", "json", "config"),
        ("generation_config.json", "json", "config"),
        ("tokenizer.json", "json", "tokenizer"),
        ("tokenizer.model", "sentencepiece", "tokenizer"),
        ("chat_template.jinja", "jinja", "chat-template"),
        ("LICENSE", "text", "license"),
        ("README.md", "text", "documentation"),
        ("notes.bin.txt", "text", "documentation"),
        ("images/logo.png", "image", "other"),
    ],
)
def test_roles_and_formats(path, fmt, role):
    assert role_of(path, fmt) == role


def test_a_safetensors_file_whose_first_bytes_read_as_pickle_opcodes_is_not_a_pickle(tmp_path):
    """Header lengths 76 ('L': a protocol 0 opcode reading a line of zeros) and 0x0280 (0x80 0x02: a protocol 2 header)."""
    from helpers import write_big_safetensors

    big = write_big_safetensors(tmp_path / "big.safetensors", 128 << 20)  # sparse: its header is 76 bytes
    assert big.read_bytes()[:1] == b"L" and examine(big, "big.safetensors").format == "safetensors"
    header = json.dumps({"w": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]}}).encode().ljust(0x0280)
    path = raw_safetensors(tmp_path / "p.safetensors", header, b"\0" * 4)
    assert path.read_bytes()[:2] == b"\x80\x02" and examine(path, "p.safetensors").format == "safetensors"
