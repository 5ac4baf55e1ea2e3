"""Reading a llama.cpp GGUF file back as the Hugging Face model it came from (Llama architecture).

Tensor names go back from llama.cpp's (blk.N.attn_q) to transformers' (model.layers.N.self_attn.q_proj) through
the `gguf` package's own name table, q/k rows are un-permuted (the inverse of convert_hf_to_gguf.py's
permute), blocks are dequantized with `gguf.quants.dequantize` (every type it knows: Q4_0..Q8_0, K-quants,
IQ-quants), and config.json is rebuilt from the `llama.*` metadata. `kbit decode model.gguf OUT` therefore gives
a dense transformers folder (weights, config.json and the tokenizer transformers builds from the GGUF).
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch

from kbitcli.errors import bad_input
from kbitcli.formats.gguf_format import ARCHS, gguf

DENSE = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's rotary row order -> HF's (inverse of gguf_format.permute)."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


class GgufCheckpoint:
    format = "gguf"

    def __init__(self, path: str):
        g = gguf()
        self.path = path
        self.is_folder = True  # decodes to a transformers folder: weights + config.json + tokenizer
        self.files = [path]
        try:
            self.reader = g.GGUFReader(path)
        except Exception as e:  # the gguf package raises ValueError/struct.error/... on damaged files
            raise bad_input(f"{path}: not a readable GGUF file ({str(e).splitlines()[0][:200]})") from None
        arch = self.field("general.architecture")
        if arch != "llama":
            raise bad_input(f"{path}: GGUF architecture {arch!r}; kbit reads Llama-architecture GGUF files "
                            "(use transformers' from_pretrained(..., gguf_file=...) for others)")
        self.meta = {f: self.field(f) for f in self.reader.fields}
        n_layers = int(self.meta["llama.block_count"])
        self.n_head = int(self.meta["llama.attention.head_count"])
        self.n_head_kv = int(self.meta.get("llama.attention.head_count_kv", self.n_head))
        names = self.hf_names(n_layers)
        self.tensors = {}  # HF name -> ReaderTensor
        self.names = []
        for t in self.reader.tensors:
            hf = names.get(t.name)
            if hf is None:
                if t.name == "rope_freqs.weight":
                    raise bad_input(f"{path}: rope_freqs (Llama 3 rope scaling) has no transformers weight; kbit "
                                    "reads GGUF files without it")
                raise bad_input(f"{path}: tensor {t.name!r} has no transformers Llama name")
            self.tensors[hf] = t
            self.names.append(hf)
        self.config = self.hf_config()

    def field(self, key: str):
        f = self.reader.fields.get(key)
        if f is None:
            return None
        try:
            return f.contents()
        except Exception:  # noqa: BLE001 (arrays of unusual types: not needed here)
            return None

    def hf_names(self, n_layers: int) -> dict[str, str]:
        """GGUF name -> HF name, by running the gguf package's HF->GGUF table over every Llama weight name."""
        g = gguf()
        tmap = g.get_tensor_name_map(g.MODEL_ARCH.LLAMA, n_layers)
        hf = ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"]
        for i in range(n_layers):
            for part in ("input_layernorm", "post_attention_layernorm"):
                hf.append(f"model.layers.{i}.{part}.weight")
            for part in ("q_proj", "k_proj", "v_proj", "o_proj"):
                hf += [f"model.layers.{i}.self_attn.{part}.weight", f"model.layers.{i}.self_attn.{part}.bias"]
            for part in ("gate_proj", "up_proj", "down_proj"):
                hf += [f"model.layers.{i}.mlp.{part}.weight", f"model.layers.{i}.mlp.{part}.bias"]
        out = {}
        for n in hf:
            name = tmap.get_name(n, try_suffixes=(".weight", ".bias"))
            if name is not None:
                out[name] = n
        return out

    def hf_config(self) -> dict:
        m = self.meta
        hidden = int(m["llama.embedding_length"])
        head_dim = int(m.get("llama.attention.key_length") or m.get("llama.rope.dimension_count")
                       or hidden // self.n_head)
        tokens = m.get("tokenizer.ggml.tokens")
        vocab = m.get("llama.vocab_size") or (len(tokens) if tokens else self.shape("model.embed_tokens.weight")[0])
        cfg = {"architectures": [ARCHS["llama"]], "model_type": "llama", "hidden_size": hidden,
               "intermediate_size": int(m["llama.feed_forward_length"]),
               "num_hidden_layers": int(m["llama.block_count"]),
               "num_attention_heads": self.n_head, "num_key_value_heads": self.n_head_kv, "head_dim": head_dim,
               "vocab_size": int(vocab), "max_position_embeddings": int(m.get("llama.context_length") or 2048),
               "rms_norm_eps": float(m.get("llama.attention.layer_norm_rms_epsilon") or 1e-5),
               "rope_theta": float(m.get("llama.rope.freq_base") or 10000.0), "hidden_act": "silu",
               "attention_bias": "model.layers.0.self_attn.q_proj.bias" in self.tensors, "mlp_bias": False,
               "tie_word_embeddings": "lm_head.weight" not in self.tensors, "torch_dtype": "float32"}
        if m.get("llama.rope.scaling.type") == "linear":
            cfg["rope_scaling"] = {"rope_type": "linear", "factor": float(m["llama.rope.scaling.factor"])}
        for key in ("bos", "eos", "pad"):
            tid = m.get(f"tokenizer.ggml.{key}_token_id")
            if tid is not None:
                cfg[f"{key}_token_id"] = int(tid)
        return cfg

    def is_quantized(self, name: str) -> bool:
        return self.tensors[name].tensor_type.name not in DENSE

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(int(d) for d in reversed(self.tensors[name].shape.tolist()))  # ggml ne0 first -> torch order

    def orig_dtype(self, name: str) -> torch.dtype:
        return DENSE.get(self.tensors[name].tensor_type.name, torch.float32)

    def dense(self, name: str) -> torch.Tensor:
        return self.tensor(name)

    def tensor(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        g = gguf()
        t = self.tensors[name]
        kind = t.tensor_type.name
        if kind == "BF16":
            w = torch.from_numpy(np.ascontiguousarray(t.data).view(np.int16).astype(np.int32) << 16).view(torch.float32)
        elif kind in ("F32", "F16"):
            w = torch.from_numpy(np.array(t.data)).float()
        else:
            w = torch.from_numpy(np.ascontiguousarray(g.quants.dequantize(t.data, t.tensor_type)))
        w = w.reshape(self.shape(name))
        if name.endswith("self_attn.q_proj.weight") or name.endswith("self_attn.q_proj.bias"):
            w = unpermute(w, self.n_head)
        elif name.endswith("self_attn.k_proj.weight") or name.endswith("self_attn.k_proj.bias"):
            w = unpermute(w, self.n_head_kv)
        return w.to(dtype or self.orig_dtype(name))

    def describe(self, name: str) -> dict:
        t = self.tensors[name]
        n = math.prod(self.shape(name))
        kind = t.tensor_type.name
        info = {"bytes": int(t.n_bytes), "data_type": kind}
        if kind not in DENSE:
            block, _ = gguf().GGML_QUANT_SIZES[t.tensor_type]
            digits = [c for c in kind if c.isdigit()]
            info.update(bits=int(digits[0]) if digits else None, block_size=block, numel=n)
        return info

    def write_side_files(self, folder: str) -> list[str]:
        """The tokenizer transformers builds from the GGUF's tokenizer.ggml.* metadata, saved into folder."""
        if not self.meta.get("tokenizer.ggml.tokens"):
            return []
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(os.path.dirname(os.path.abspath(self.path)),
                                            gguf_file=os.path.basename(self.path))
        return list(tok.save_pretrained(folder))
