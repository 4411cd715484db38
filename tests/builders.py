"""Small real model files for tests, written with the formats' own libraries."""

from __future__ import annotations

import json
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
