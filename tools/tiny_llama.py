#!/usr/bin/env python3
"""Write tiny llama-architecture GGUF models with seeded random weights around a vocabulary file.

The real-engine tests, the demo on real engines and bench/cache_routing.py need a model llama-server
can load in well under a second: 2 blocks, 64 wide, f32 weights drawn from numpy's legacy
RandomState (its streams are frozen across numpy versions, so every machine writes the same bytes),
with the tokenizer of a vocabulary-only GGUF file copied in unchanged. The answers are nonsense;
tokenization, streaming, the KV cache and usage accounting are real.

    python tools/tiny_llama.py --vocab ggml-vocab-llama-spm.gguf --out-dir models

With --width/--blocks it writes one model of that size instead (the cache-routing benchmark uses
256 wide x 4 blocks, big enough that prefill costs real time on one thread):

    python tools/tiny_llama.py --vocab ... --out-dir models --width 256 --blocks 4 --name bench-llama
"""
from __future__ import annotations

import argparse
import hashlib
import os
import sys
from pathlib import Path

import numpy as np

try:
    import gguf
except ImportError:  # pragma: no cover - a clear message instead of a traceback
    sys.exit("tiny_llama.py needs the gguf package: pip install 'gguf>=0.17'")

# name -> seed; model-1 and model-2 of the demo, and the bench's model, are these files.
MODELS = {"tiny-llama-s1": 1, "tiny-llama-s2": 2}
N_EMBD, N_LAYER, N_HEAD, N_FF, N_CTX = 64, 2, 4, 128, 4096


def tokenizer_fields(vocab: Path) -> list[tuple[str, object, object, object]]:
    """(key, value, type, sub_type) of every tokenizer.* key of the vocabulary file."""
    reader = gguf.GGUFReader(vocab)
    out = []
    for field in reader.fields.values():
        if not field.name.startswith("tokenizer."):
            continue
        main = field.types[0]
        sub = field.types[-1] if main == gguf.GGUFValueType.ARRAY else None
        value = field.contents()
        out.append((field.name, value, main, sub))
    if not any(k == "tokenizer.ggml.tokens" for k, *_ in out):
        raise SystemExit(f"{vocab}: no tokenizer.ggml.tokens: not a vocabulary GGUF file")
    return out


class Shape:
    """The size of a model: width, blocks, heads and feed-forward width."""

    def __init__(self, embd: int = N_EMBD, layers: int = N_LAYER, heads: int = N_HEAD, ff: int = N_FF) -> None:
        if embd < 8 or layers < 1 or heads < 1 or ff < 1 or embd % heads:
            raise SystemExit(f"bad model shape: width {embd}, blocks {layers}, heads {heads}, feed-forward {ff} "
                             "(the width must be a multiple of the heads)")
        self.embd, self.layers, self.heads, self.ff = embd, layers, heads, ff


def write_model(path: Path, seed: int, vocab: Path, shape: Shape | None = None) -> None:
    shape = shape or Shape()
    n_embd, n_layer, n_head, n_ff = shape.embd, shape.layers, shape.heads, shape.ff
    fields = tokenizer_fields(vocab)
    n_vocab = next(len(v) for k, v, *_ in fields if k == "tokenizer.ggml.tokens")
    rng = np.random.RandomState(seed)

    def weights(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.02).astype(np.float32)

    def ones(n: int) -> np.ndarray:
        return np.ones(n, dtype=np.float32)

    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    w = gguf.GGUFWriter(str(tmp), "llama")
    w.add_name(path.stem)
    w.add_context_length(N_CTX)
    w.add_embedding_length(n_embd)
    w.add_block_count(n_layer)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head)
    w.add_rope_dimension_count(n_embd // n_head)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    for key, value, vtype, sub in fields:
        w.add_key_value(key, value, vtype, sub_type=sub)
    # numpy shapes are (rows, columns) = (out, in); GGUF stores the reverse.
    w.add_tensor("token_embd.weight", weights(n_vocab, n_embd))
    for i in range(n_layer):
        w.add_tensor(f"blk.{i}.attn_norm.weight", ones(n_embd))
        for t in ("attn_q", "attn_k", "attn_v", "attn_output"):
            w.add_tensor(f"blk.{i}.{t}.weight", weights(n_embd, n_embd))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", ones(n_embd))
        w.add_tensor(f"blk.{i}.ffn_gate.weight", weights(n_ff, n_embd))
        w.add_tensor(f"blk.{i}.ffn_up.weight", weights(n_ff, n_embd))
        w.add_tensor(f"blk.{i}.ffn_down.weight", weights(n_embd, n_ff))
    w.add_tensor("output_norm.weight", ones(n_embd))
    w.add_tensor("output.weight", weights(n_vocab, n_embd))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    os.replace(tmp, path)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--vocab", required=True, type=Path, help="a vocabulary-only GGUF file")
    ap.add_argument("--out-dir", required=True, type=Path)
    ap.add_argument("--force", action="store_true", help="write the models even if they exist")
    ap.add_argument("--width", type=int, help="write one model this wide (with --blocks) instead of the test models")
    ap.add_argument("--blocks", type=int, default=N_LAYER, help=f"its blocks (default {N_LAYER})")
    ap.add_argument("--heads", type=int, help="its attention heads (default: one per 64 of width, at least 4)")
    ap.add_argument("--ff", type=int, help="its feed-forward width (default: 4 x width)")
    ap.add_argument("--seed", type=int, default=1, help="its weights' seed (default 1)")
    ap.add_argument("--name", help="its file name without .gguf (default: tiny-llama-<width>x<blocks>-s<seed>)")
    args = ap.parse_args(argv)
    if not args.vocab.is_file():
        ap.error(f"vocabulary file not found: {args.vocab}")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    todo: dict[str, tuple[int, Shape | None]] = {name: (seed, None) for name, seed in MODELS.items()}
    if args.width is not None:
        shape = Shape(args.width, args.blocks, args.heads or max(4, args.width // 64), args.ff or 4 * args.width)
        todo = {args.name or f"tiny-llama-{args.width}x{args.blocks}-s{args.seed}": (args.seed, shape)}
    for name, (seed, size) in todo.items():
        path = args.out_dir / f"{name}.gguf"
        if args.force or not path.exists():
            write_model(path, seed, args.vocab, size)
        print(f"tiny_llama.py: {path} ({path.stat().st_size / 1e6:.1f} MB, seed {seed}, sha256 {sha256(path)[:16]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
