"""Small real model files for tests, written with the formats' own libraries."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import zipfile
from pathlib import Path

import numpy as np


def write_safetensors(path: Path, tensors: dict[str, np.ndarray] | None = None) -> Path:
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    tensors = tensors or {
        "model.embed_tokens.weight": rng.standard_normal((32, 16)).astype(np.float32),
        "model.norm.weight": np.ones(16, dtype=np.float16),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"format": "pt"})
    return path


def write_gguf(path: Path, *, chat_template: str | None = "{{ messages }}", n_tensors: int = 2) -> Path:
    import gguf

    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(128)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    if chat_template is not None:
        writer.add_chat_template(chat_template)
    writer.add_token_list(["<s>", "</s>", "a", "b"])
    for i in range(n_tensors):
        writer.add_tensor(f"blk.{i}.weight", np.full((4, 32), i, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def write_sparse_gguf(path: Path, size: int) -> Path:
    """A well-formed GGUF whose one F32 tensor of `size` bytes is a hole in the file: large to hash, nothing on disk."""
    import gguf

    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(128)
    writer.add_token_list(["<s>", "</s>", "a", "b"])
    writer.add_tensor_info("blk.0.weight", (size // 4 // 1024, 1024), np.dtype(np.float32), size)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    writer.close()
    with open(path, "r+b") as f:
        f.truncate(-(-f.seek(0, 2) // writer.data_alignment) * writer.data_alignment + size)
    return path


def write_model_dir(root: Path, *, gguf: bool = False) -> Path:
    """A small model directory as a fine-tune team would hand it over."""
    root.mkdir(parents=True, exist_ok=True)
    write_safetensors(root / "model.safetensors")
    (root / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "hidden_size": 16}))
    (root / "tokenizer.json").write_text(json.dumps({"version": "1.0", "model": {"type": "BPE"}}))
    (root / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ messages }}"}))
    (root / "README.md").write_text("# tiny test model\n")
    (root / "LICENSE").write_text("Apache-2.0\n")
    if gguf:
        write_gguf(root / "gguf" / "tiny-F32.gguf")
    return root


def write_llama_gguf(
    path: Path,
    *,
    n_embd: int = 256,
    n_ff: int = 512,
    n_layer: int = 2,
    n_head: int = 4,
    n_head_kv: int = 2,
    file_type: str = "F32",
    split_max_tensors: int = 0,
    seed: int = 0,
) -> Path:
    """A tiny llama-architecture GGUF that llama.cpp loads, quantizes and runs (random weights).

    Row widths are multiples of 256 so K-quants apply for real. `file_type` is F32 or F16
    (matrices in F16, norms in F32, as convert_hf_to_gguf writes them). With
    `split_max_tensors`, the model is split the way llama.cpp names splits; the first part's
    path is returned.
    """
    import gguf

    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + ["\u2581" + c for c in letters] + list(letters)
    token_types = [2, 3, 3] + [6] * 256 + [1] * 2 * len(letters)  # unknown, control, byte, normal
    scores = [0.0] * 259 + [-float(i) for i in range(2 * len(letters))]
    matrix_dtype = {"F32": np.float32, "F16": np.float16}[file_type]

    writer = gguf.GGUFWriter(path, "llama", split_max_tensors=split_max_tensors)
    writer.add_name("tiny-llama")
    writer.add_context_length(256)
    writer.add_embedding_length(n_embd)
    writer.add_block_count(n_layer)
    writer.add_feed_forward_length(n_ff)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_head_kv)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(n_embd // n_head)
    writer.add_rope_freq_base(10000.0)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32 if file_type == "F32" else gguf.LlamaFileType.MOSTLY_F16)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(token_types)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_chat_template("{% for m in messages %}{{ m['content'] }}{% endfor %}")

    def matrix(name: str, rows: int, cols: int) -> None:
        writer.add_tensor(name, (rng.standard_normal((rows, cols), dtype=np.float32) * 0.02).astype(matrix_dtype))

    def norm(name: str) -> None:
        writer.add_tensor(name, np.ones(n_embd, dtype=np.float32))

    kv_width = n_embd // n_head * n_head_kv
    matrix("token_embd.weight", len(tokens), n_embd)
    for i in range(n_layer):
        norm(f"blk.{i}.attn_norm.weight")
        matrix(f"blk.{i}.attn_q.weight", n_embd, n_embd)
        matrix(f"blk.{i}.attn_k.weight", kv_width, n_embd)
        matrix(f"blk.{i}.attn_v.weight", kv_width, n_embd)
        matrix(f"blk.{i}.attn_output.weight", n_embd, n_embd)
        norm(f"blk.{i}.ffn_norm.weight")
        matrix(f"blk.{i}.ffn_gate.weight", n_ff, n_embd)
        matrix(f"blk.{i}.ffn_up.weight", n_ff, n_embd)
        matrix(f"blk.{i}.ffn_down.weight", n_embd, n_ff)
    norm("output_norm.weight")
    matrix("output.weight", len(tokens), n_embd)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return writer.format_shard_names(path)[0] if split_max_tensors else path


def sentencepiece_model() -> bytes:
    """A real SentencePiece tokenizer.model (a protobuf ModelProto of 120 pieces), trained by the library itself."""
    import io
    import random

    import sentencepiece

    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghij") for _ in range(rng.randint(2, 7))) for _ in range(400)]
    lines = [" ".join(rng.choice(words) for _ in range(10)) for _ in range(400)]
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=model, vocab_size=120, minloglevel=2)
    return model.getvalue()


def card_images(size: tuple[int, int] = (16, 8)) -> dict[str, bytes]:
    """The same picture as PNG, JPEG, GIF and WebP, written by Pillow, keyed by card/figure.EXT."""
    import io

    from PIL import Image

    picture = Image.new("RGB", size, (200, 30, 30))
    out = {}
    for kind in ("PNG", "JPEG", "GIF", "WEBP"):
        buffer = io.BytesIO()
        picture.save(buffer, kind)
        out[f"card/figure.{kind.lower()}"] = buffer.getvalue()
    return out


WHEEL_FILE = "Wheel-Version: 1.0\nGenerator: sovpack-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n"


def python_wheel(
    members: dict[str, bytes] | None = None,
    *,
    dist_info: str = "demo-1.0.dist-info",
    wheel: str | None = WHEEL_FILE,
    record: bool = True,
    listed: tuple[str, ...] = ("WHEEL", "RECORD"),
) -> bytes:
    """A wheel as the `wheel` package builds one (PEP 427): the package's files, then NAME-VERSION.dist-info/ with
    WHEEL and RECORD (each file's urlsafe-base64 SHA-256 and size). `wheel`, `record` and `listed` spoil it."""
    files = {"demo/__init__.py": b"VALUE = 1\n", **(members or {})}
    if wheel is not None:
        files[f"{dist_info}/WHEEL"] = wheel.encode()
    if record:
        rows = []
        for path, data in files.items():
            if path.startswith(f"{dist_info}/") and path.rsplit("/", 1)[1] not in listed:
                continue
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            rows.append(f"{path},sha256={digest},{len(data)}")
        if "RECORD" in listed:
            rows.append(f"{dist_info}/RECORD,,")
        files[f"{dist_info}/RECORD"] = ("\n".join(rows) + "\n").encode()
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    return buffer.getvalue()
