"""Reading a llama.cpp GGUF file back as the Hugging Face model it came from (Llama and Qwen2 architectures).

Tensor names go back from llama.cpp's (blk.N.attn_q) to transformers' (model.layers.N.self_attn.q_proj) through
the `gguf` package's own name table, q/k rows are un-permuted (the inverse of convert_hf_to_gguf.py's
permute), blocks are dequantized with `gguf.quants.dequantize` (every type it knows: Q4_0..Q8_0, K-quants,
IQ-quants), and config.json is rebuilt from the `llama.*` metadata. `kbit decode model.gguf OUT` therefore gives
a dense transformers folder (weights, config.json and the tokenizer transformers builds from the GGUF).
Qwen2 files (`general.architecture = qwen2`) are read the same way from their `qwen2.*` metadata, without the
un-permutation (llama.cpp rotates qwen2's rows in HF's order), and must hold q/k/v biases (Qwen2 always has them).
BERT files (`general.architecture = bert`, as kbit and convert_hf_to_gguf.py write them) read back to
transformers' BertModel names and config, with a WordPiece tokenizer rebuilt from the vocabulary
(formats/gguf_bert.py).
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch

from kbitcli.core.blockwise import finite
from kbitcli.errors import KbitError, bad_input
from kbitcli.formats import gguf_bert
from kbitcli.formats.gguf_format import ARCHS, gguf
from kbitcli.io.dtypes import from_safetensors

DENSE = ("F32", "F16", "BF16")  # GGUF's dense types, named as safetensors names them (io/dtypes.py)
# the ARCH.* metadata config.json is rebuilt from: key -> required (convert_hf_to_gguf.py writes every one of these)
COUNTS = {"block_count": True, "embedding_length": True, "feed_forward_length": True, "attention.head_count": True,
          "attention.head_count_kv": False, "context_length": False, "vocab_size": False,
          "attention.key_length": False, "rope.dimension_count": False}
REALS = ("rope.freq_base", "attention.layer_norm_rms_epsilon", "rope.scaling.factor")
DECODERS = {a[0]: (model_type, a[1], a[2]) for model_type, a in reversed(ARCHS.items())}  # llama -> LlamaForCausalLM
LAYER = ("input_layernorm", "post_attention_layernorm", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
         "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")  # the weights every block has
FIX = "not a {} GGUF as llama.cpp's convert_hf_to_gguf.py writes it; re-convert the model with convert_hf_to_gguf.py"


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
        if arch is None:
            raise bad_input(f"{path}: the GGUF metadata has no general.architecture; {FIX.format('Llama')}")
        if arch not in (*DECODERS, gguf_bert.MODEL_TYPE):
            raise bad_input(f"{path}: GGUF architecture {arch!r:.40}; kbit reads Llama-architecture (llama, qwen2) "
                            "and BERT GGUF files (use transformers' from_pretrained(..., gguf_file=...) for others)")
        self.arch = arch
        self.meta = {f: self.field(f) for f in self.reader.fields}
        if arch == gguf_bert.MODEL_TYPE:
            self.read_bert()
            return
        self.m = {k.removeprefix(arch + "."): v for k, v in self.meta.items()}  # this architecture's keys, unprefixed
        self.fix = FIX.format(DECODERS[arch][1].removesuffix("ForCausalLM"))  # "not a Qwen2 GGUF as ..."
        check_meta(path, self.m, arch, self.fix)
        n_layers = self.m["block_count"]
        self.n_head = self.m["attention.head_count"]
        self.n_head_kv = self.m.get("attention.head_count_kv") or self.n_head
        hidden = self.m["embedding_length"]
        self.head_dim = (self.m.get("attention.key_length") or self.m.get("rope.dimension_count")
                         or hidden // self.n_head)
        if self.head_dim % 2:  # rotary dimensions come in pairs (q and k rows are un-permuted pairwise)
            raise bad_input(f"{path}: the GGUF metadata implies an odd head dimension {self.head_dim}; {self.fix}")
        if n_layers * len(LAYER) > len(self.reader.tensors):  # before naming the weights of every block it claims
            raise bad_input(f"{path}: the GGUF metadata's {arch}.block_count {n_layers} needs at least "
                            f"{n_layers * len(LAYER)} tensors and the file has {len(self.reader.tensors)}; {self.fix}")
        names = self.hf_names(n_layers)
        if any(t.name == "rope_freqs.weight" for t in self.reader.tensors):
            raise bad_input(f"{path}: rope_freqs (Llama 3 rope scaling) has no transformers weight; kbit reads GGUF "
                            "files without it")
        self.map_names(names, arch, self.fix)
        self.check_tensors({hf: gg for gg, hf in names.items()}, n_layers, hidden)
        self.config = self.hf_config()

    def read_bert(self) -> None:
        """A BERT encoder: bert.* metadata checked, weights named and shaped as the metadata implies, BertModel's
        config rebuilt."""
        gguf_bert.check_meta(self.path, self.meta)
        n_layers = self.meta["bert.block_count"]
        need = n_layers * len(gguf_bert.LAYER) + len(gguf_bert.EMBEDDINGS)  # before naming every block it claims
        if need > len(self.reader.tensors):
            raise bad_input(f"{self.path}: the GGUF metadata's bert.block_count {n_layers} needs at least {need} "
                            f"tensors and the file has {len(self.reader.tensors)}; {gguf_bert.FIX}")
        names = gguf_bert.hf_names(n_layers)
        self.map_names(names, "bert", gguf_bert.FIX)
        shown = f"embedding_length {self.meta['bert.embedding_length']}, feed_forward_length " \
                f"{self.meta['bert.feed_forward_length']}"
        self.check_shapes(gguf_bert.wanted_shapes(self.meta), {hf: gg for gg, hf in names.items()}, "bert", shown)
        self.config = gguf_bert.hf_config(self.meta, {n: self.shape(n) for n in self.names})

    def map_names(self, names: dict[str, str], arch: str, fix: str) -> None:
        """self.tensors / self.names under transformers' names; a tensor the table does not name is refused."""
        self.tensors = {}  # HF name -> ReaderTensor
        self.names = []
        for t in self.reader.tensors:
            hf = names.get(t.name)
            if hf is None:
                raise bad_input(f"{self.path}: tensor {t.name!r} has no transformers name for architecture {arch} "
                                f"({arch}.block_count is {self.meta.get(f'{arch}.block_count')}); {fix}")
            self.tensors[hf] = t
            self.names.append(hf)

    def damaged(self, name: str, what: str) -> KbitError:
        """Exit 1, worded as KbitCheckpoint's: the tensors disagree with the metadata or hold NaN/Inf scales."""
        return KbitError(f"{self.path}: tensor {name!r} is damaged ({what}); run `kbit inspect {self.path} --verify` "
                         "to check the file against the manifest, then re-convert or restore it", exit_code=1)

    def check_tensors(self, gguf_names: dict[str, str], n_layers: int, hidden: int) -> None:
        """Every weight block_count implies is present, with the shapes the metadata implies (from the header, no
        data read): a truncated file or edited metadata is refused before config.json is rebuilt from it."""
        want = {"model.embed_tokens.weight": (None, hidden), "model.norm.weight": (hidden,)}
        for i in range(n_layers):
            want.update({f"model.layers.{i}.{p}.weight": None for p in LAYER})
            want[f"model.layers.{i}.self_attn.q_proj.weight"] = (self.n_head * self.head_dim, hidden)
            want[f"model.layers.{i}.self_attn.k_proj.weight"] = (self.n_head_kv * self.head_dim, hidden)
            want[f"model.layers.{i}.mlp.up_proj.weight"] = (self.m["feed_forward_length"], hidden)
            if self.arch == "qwen2":  # transformers' Qwen2 always has q/k/v biases
                for p, n in (("q", self.n_head), ("k", self.n_head_kv), ("v", self.n_head_kv)):
                    want[f"model.layers.{i}.self_attn.{p}_proj.bias"] = (n * self.head_dim,)
        self.check_shapes(want, gguf_names, self.arch, f"head_count {self.n_head}/{self.n_head_kv}, head dim "
                          f"{self.head_dim}")

    def check_shapes(self, want: dict, gguf_names: dict[str, str], arch: str, shown_meta: str) -> None:
        n_layers = self.meta[f"{arch}.block_count"]
        for hf, shape in want.items():
            if hf not in self.tensors:
                raise self.damaged(hf, f"the file has no {gguf_names.get(hf, hf)} though its {arch}.block_count is "
                                   f"{n_layers}")
            got = self.shape(hf)
            if shape and (len(got) != len(shape) or any(w not in (None, g) for w, g in zip(shape, got))):
                shown = [w if w is not None else "*" for w in shape]
                raise self.damaged(hf, f"it is {list(got)} where the {arch}.* metadata implies {shown} ({shown_meta})")

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
        tmap = g.get_tensor_name_map(g.MODEL_ARCH[self.arch.upper()], n_layers)
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
        m = self.m
        hidden, head_dim = m["embedding_length"], self.head_dim  # all checked by check_meta
        tokens = self.meta.get("tokenizer.ggml.tokens")
        vocab = m.get("vocab_size") or (len(tokens) if tokens else self.shape("model.embed_tokens.weight")[0])
        model_type, cls, _ = DECODERS[self.arch]
        cfg = {"architectures": [cls], "model_type": model_type, "hidden_size": hidden,
               "intermediate_size": int(m["feed_forward_length"]), "num_hidden_layers": int(m["block_count"]),
               "num_attention_heads": self.n_head, "num_key_value_heads": self.n_head_kv, "head_dim": head_dim,
               "vocab_size": int(vocab), "max_position_embeddings": int(m.get("context_length") or 2048),
               "rms_norm_eps": float(m.get("attention.layer_norm_rms_epsilon") or 1e-5),
               "rope_theta": float(m.get("rope.freq_base") or 10000.0), "hidden_act": "silu",
               "tie_word_embeddings": "lm_head.weight" not in self.tensors, "torch_dtype": "float32"}
        if model_type == "llama":  # Qwen2's q/k/v biases are part of its architecture
            cfg.update(attention_bias="model.layers.0.self_attn.q_proj.bias" in self.tensors, mlp_bias=False)
        if m.get("rope.scaling.type") == "linear":
            cfg["rope_scaling"] = {"rope_type": "linear", "factor": float(m["rope.scaling.factor"])}
        for key in ("bos", "eos", "pad"):
            tid = self.meta.get(f"tokenizer.ggml.{key}_token_id")
            if isinstance(tid, int):
                cfg[f"{key}_token_id"] = tid
        return cfg

    def is_quantized(self, name: str) -> bool:
        return self.tensors[name].tensor_type.name not in DENSE

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(int(d) for d in reversed(self.tensors[name].shape.tolist()))  # ggml ne0 first -> torch order

    def orig_dtype(self, name: str) -> torch.dtype:
        return from_safetensors(self.tensors[name].tensor_type.name) if self.tensors[name].tensor_type.name in DENSE else torch.float32

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
            # NaN / Inf block scales (finite ones cannot make a non-finite weight): one float64 sum detects them
            if not finite(w):
                raise self.damaged(name, f"NaN or Inf in its {kind} block scales")
        w = w.reshape(self.shape(name))
        if not DECODERS.get(self.arch, ("", "", False))[2]:  # rotary rows permuted in Llama files only
            return w.to(dtype or self.orig_dtype(name))
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
        if self.arch == gguf_bert.MODEL_TYPE:
            return gguf_bert.save_tokenizer(self.meta, folder)
        if not self.meta.get("tokenizer.ggml.tokens"):
            return []
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(os.path.dirname(os.path.abspath(self.path)),
                                            gguf_file=os.path.basename(self.path))
        return list(tok.save_pretrained(folder))


def check_meta(path: str, m: dict, arch: str, fix: str) -> None:
    """The ARCH.* metadata hf_config reads (m: its keys without the `ARCH.` prefix): present where required,
    positive integers / numbers (a missing or mistyped key was an internal error; it is bad input, exit 2, naming
    the key)."""
    for key, required in COUNTS.items():
        v = m.get(key)
        if v is None and required:
            raise bad_input(f"{path}: the GGUF metadata has no {arch}.{key}; {fix}")
        if v is not None and not (isinstance(v, int) and not isinstance(v, bool) and v >= 1):
            raise bad_input(f"{path}: the GGUF metadata's {arch}.{key} is {v!r:.40}, not a positive integer; {fix}")
    for key in REALS:
        v = m.get(key)
        if v is not None and not (isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < math.inf):
            raise bad_input(f"{path}: the GGUF metadata's {arch}.{key} is {v!r:.40}, not a positive number; {fix}")
    if m.get("rope.scaling.type") == "linear" and m.get("rope.scaling.factor") is None:
        raise bad_input(f"{path}: the GGUF metadata has {arch}.rope.scaling.type linear but no "
                        f"{arch}.rope.scaling.factor; {fix}")
    if m["attention.head_count"] % (m.get("attention.head_count_kv") or 1):
        raise bad_input(f"{path}: the GGUF metadata's {arch}.attention.head_count {m['attention.head_count']} is "
                        f"not a multiple of {arch}.attention.head_count_kv {m['attention.head_count_kv']}; {fix}")
