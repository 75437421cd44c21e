"""Writes a tiny, deterministic llama GGUF that a real llama-server loads: for tests, offline.

    .venv/bin/python tools/make_tiny_model.py OUT.gguf [--vocab ggml-vocab-llama-spm.gguf] [--context 16384]

The weights are random (fixed seed), so the text is gibberish, but every engine code path runs for
real: tokenizer, slots, KV cache, slot save/restore. 2 layers of width 64 keep generation at thousands
of tokens per second on a laptop core. The tokenizer comes from the vocab-only GGUF that llama.cpp ships
(tools/build-llama-server.sh copies it beside the binary). The trained context is written large because
llama-server caps each slot at it, and tests need requests that run for a while.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

VOCAB_NAME = "ggml-vocab-llama-spm.gguf"
N_EMBD = 64
N_HEAD = 4
N_HEAD_KV = 2
N_LAYER = 2
N_FF = 128
RMS_EPS = 1e-5


def default_vocab() -> Path:
    """The vocab GGUF cached beside the llama-server build."""
    cache = Path(os.environ.get("SPOTGUARD_CACHE", Path.home() / ".cache" / "spotguard"))
    return cache / "llama-server-0.3.36" / VOCAB_NAME


def write_tiny_model(out: Path, vocab: Path, *, context_length: int = 16384, seed: int = 0) -> Path:
    """Write the model to ``out`` (atomically) and return it; same arguments give the same bytes."""
    import gguf  # test-only dependency; imported here so the module can be inspected without it

    reader = gguf.GGUFReader(str(vocab))
    n_vocab = len(reader.fields["tokenizer.ggml.tokens"].data)
    head_dim = N_EMBD // N_HEAD
    rng = np.random.default_rng(seed)

    def weight(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np.float16)

    def norm() -> np.ndarray:
        return np.ones(N_EMBD, dtype=np.float32)

    tmp = out.with_name(out.name + ".tmp")
    writer = gguf.GGUFWriter(str(tmp), "llama")
    writer.add_name("spotguard-tiny")
    writer.add_context_length(context_length)
    writer.add_embedding_length(N_EMBD)
    writer.add_block_count(N_LAYER)
    writer.add_feed_forward_length(N_FF)
    writer.add_head_count(N_HEAD)
    writer.add_head_count_kv(N_HEAD_KV)
    writer.add_layer_norm_rms_eps(RMS_EPS)
    writer.add_rope_dimension_count(head_dim)
    writer.add_vocab_size(n_vocab)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        main = field.types[0]
        if main == gguf.GGUFValueType.ARRAY:
            writer.add_key_value(key, field.contents(), main, sub_type=field.types[-1])
        else:
            writer.add_key_value(key, field.contents(), main)

    # numpy shapes are ggml's dimensions reversed: (rows = outputs, cols = inputs).
    writer.add_tensor("token_embd.weight", weight(n_vocab, N_EMBD))
    writer.add_tensor("output_norm.weight", norm())  # no output.weight: tied to token_embd
    for layer in range(N_LAYER):
        prefix = f"blk.{layer}"
        writer.add_tensor(f"{prefix}.attn_norm.weight", norm())
        writer.add_tensor(f"{prefix}.attn_q.weight", weight(N_HEAD * head_dim, N_EMBD))
        writer.add_tensor(f"{prefix}.attn_k.weight", weight(N_HEAD_KV * head_dim, N_EMBD))
        writer.add_tensor(f"{prefix}.attn_v.weight", weight(N_HEAD_KV * head_dim, N_EMBD))
        writer.add_tensor(f"{prefix}.attn_output.weight", weight(N_EMBD, N_HEAD * head_dim))
        writer.add_tensor(f"{prefix}.ffn_norm.weight", norm())
        writer.add_tensor(f"{prefix}.ffn_gate.weight", weight(N_FF, N_EMBD))
        writer.add_tensor(f"{prefix}.ffn_up.weight", weight(N_FF, N_EMBD))
        writer.add_tensor(f"{prefix}.ffn_down.weight", weight(N_EMBD, N_FF))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(tmp, out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("out", type=Path)
    parser.add_argument("--vocab", type=Path, default=None, help=f"vocab-only GGUF (default: cached {VOCAB_NAME})")
    parser.add_argument("--context", type=int, default=16384, help="trained context length written to the model")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    vocab = args.vocab or default_vocab()
    if not vocab.is_file():
        print(f"vocab GGUF not found at {vocab}; run tools/build-llama-server.sh first or pass --vocab",
              file=sys.stderr)
        return 2
    print(write_tiny_model(args.out, vocab, context_length=args.context, seed=args.seed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
