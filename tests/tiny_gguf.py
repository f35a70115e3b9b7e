"""Tiny real-architecture GGUF models with random weights, for exactness tests of model families.

No small recurrent or hybrid GGUF is on PyPI, so these are written with the ``gguf`` package:
a 2-layer LLaMA (range KV), a 2-layer Mamba-2 (recurrent) and a 4-layer Granite hybrid (Mamba-2
and attention layers). They load and run in llama.cpp like any model; their text is noise, so
tests compare logits and token ids with a cold run, not text quality. Shapes are given in
numpy's order (the reverse of llama.cpp's).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from gguf import GGUFWriter, LlamaFileType, TokenType

N_EMBD = 64
N_HEAD = 4
N_FF = 128
N_CTX_TRAIN = 4096
# Mamba-2: d_inner = 2 * n_embd, one group, 4 heads (time_step_rank), state size 16.
D_INNER = 2 * N_EMBD
D_STATE = 16
N_GROUPS = 1
SSM_HEADS = 4
D_CONV = 4

ARCHS = ("llama", "mamba2", "granitehybrid")


def _byte_chars() -> list[str]:
    """GPT-2's printable stand-ins for the 256 byte values."""
    bs = list(range(ord("!"), ord("~") + 1))
    bs += list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    table = dict(zip(bs, cs, strict=True))
    return [chr(table[b]) for b in range(256)]


def _tokenizer(w: GGUFWriter) -> int:
    """A byte-level BPE vocabulary: the 256 bytes, a few merges, BOS and EOS."""
    tokens = _byte_chars()
    merges = ["Ġ t", "h e", "Ġt he", "Ġ a", "i n"]
    tokens += [m.replace(" ", "") for m in merges]
    types = [TokenType.NORMAL] * len(tokens)
    bos, eos = len(tokens), len(tokens) + 1
    tokens += ["<|bos|>", "<|eos|>"]
    types += [TokenType.CONTROL, TokenType.CONTROL]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(bos)
    w.add_eos_token_id(eos)
    w.add_add_bos_token(False)
    return len(tokens)


def _ssm_block(w: GGUFWriter, rng: np.random.Generator, i: int) -> None:
    def t(name: str, *shape: int, scale: float = 0.1) -> None:
        w.add_tensor(f"blk.{i}.{name}", (rng.standard_normal(shape) * scale).astype(np.float32))

    conv_dim = D_INNER + 2 * N_GROUPS * D_STATE
    t("ssm_in.weight", 2 * D_INNER + 2 * N_GROUPS * D_STATE + SSM_HEADS, N_EMBD)
    t("ssm_conv1d.weight", conv_dim, D_CONV)
    t("ssm_conv1d.bias", conv_dim)
    t("ssm_dt.bias", SSM_HEADS)
    a = -np.exp(rng.standard_normal((SSM_HEADS, 1)) * 0.5).astype(np.float32)
    w.add_tensor(f"blk.{i}.ssm_a", a)  # no ".weight": llama.cpp's name; must be negative
    t("ssm_d", SSM_HEADS, 1)
    w.add_tensor(f"blk.{i}.ssm_norm.weight", np.ones((N_GROUPS, D_INNER), np.float32))
    t("ssm_out.weight", N_EMBD, D_INNER)


def _attention_block(w: GGUFWriter, rng: np.random.Generator, i: int) -> None:
    for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
        data = (rng.standard_normal((N_EMBD, N_EMBD)) * 0.1).astype(np.float32)
        w.add_tensor(f"blk.{i}.{name}.weight", data)


def _ffn_block(w: GGUFWriter, rng: np.random.Generator, i: int) -> None:
    w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(N_EMBD, np.float32))
    for name, shape in (
        ("ffn_gate", (N_FF, N_EMBD)),
        ("ffn_up", (N_FF, N_EMBD)),
        ("ffn_down", (N_EMBD, N_FF)),
    ):
        data = (rng.standard_normal(shape) * 0.1).astype(np.float32)
        w.add_tensor(f"blk.{i}.{name}.weight", data)


def write(arch: str, path: str | Path, seed: int = 0) -> Path:
    """Write a tiny ``arch`` model (one of :data:`ARCHS`) with random weights to ``path``."""
    if arch not in ARCHS:
        raise ValueError(f"unknown tiny arch {arch!r}; one of {', '.join(ARCHS)}")
    path = Path(path)
    rng = np.random.default_rng(seed)
    w = GGUFWriter(str(path), arch)
    w.add_name(f"tiny-{arch}")
    w.add_file_type(LlamaFileType.ALL_F32)
    n_vocab = _tokenizer(w)
    layers = {"llama": "AA", "mamba2": "SS", "granitehybrid": "SASA"}[arch]
    w.add_context_length(N_CTX_TRAIN)
    w.add_embedding_length(N_EMBD)
    w.add_block_count(len(layers))
    w.add_layer_norm_rms_eps(1e-5)
    if arch != "mamba2":
        w.add_feed_forward_length(N_FF)
        w.add_head_count(N_HEAD)
        w.add_rope_dimension_count(N_EMBD // N_HEAD)
        kv_heads: int | list[int] = (
            N_HEAD if arch == "llama" else [0 if kind == "S" else N_HEAD for kind in layers]
        )
        w.add_head_count_kv(kv_heads)
    if arch != "llama":
        w.add_ssm_conv_kernel(D_CONV)
        w.add_ssm_inner_size(D_INNER)
        w.add_ssm_state_size(D_STATE)
        w.add_ssm_time_step_rank(SSM_HEADS)
        w.add_ssm_group_count(N_GROUPS)
    scale = 0.1
    w.add_tensor("token_embd.weight", (rng.standard_normal((n_vocab, N_EMBD)) * scale).astype("f4"))
    w.add_tensor("output_norm.weight", np.ones(N_EMBD, np.float32))
    w.add_tensor("output.weight", (rng.standard_normal((n_vocab, N_EMBD)) * scale).astype("f4"))
    for i, kind in enumerate(layers):
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(N_EMBD, np.float32))
        if kind == "S":
            _ssm_block(w, rng, i)
        else:
            _attention_block(w, rng, i)
        if arch != "mamba2":
            _ffn_block(w, rng, i)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


__all__ = ["ARCHS", "write"]
