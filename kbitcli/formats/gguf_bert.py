"""BERT encoders (sentence-transformers' all-MiniLM-L6-v2 and its kin) in GGUF, as llama.cpp's convert_hf_to_gguf.py
writes them (its BertModel class), and read back to transformers' BertModel names.

What llama.cpp needs, and where it comes from:
- `general.architecture = bert`; `bert.context_length` (max_position_embeddings), `.embedding_length`,
  `.feed_forward_length`, `.block_count`, `.attention.head_count`, `.attention.layer_norm_epsilon`,
  `.attention.causal = false` (an encoder sees both sides), and `.pooling_type` from a sentence-transformers
  folder's modules.json -> Pooling module config (MEAN / CLS / LAST: what llama.cpp pools; anything else is
  refused, as the converter refuses it, rather than serving embeddings pooled unlike the model's).
- tensors under llama.cpp's names (the `gguf` package's MODEL_ARCH.BERT table): token_embd, token_types,
  position_embd, token_embd_norm, blk.N.attn_q/k/v, attn_output, attn_output_norm, ffn_up, ffn_down,
  layer_output_norm. Not written, as the converter does not: embeddings.position_ids (an index buffer) and the
  pooler / MLM heads (llama.cpp pools by itself). No rotary rows to permute: BERT's positions are learned.
  position_embd and token_types stay F32 whatever the plan says (the converter's rule: llama.cpp reads them as
  F32 rows).
- the WordPiece vocabulary as `tokenizer.ggml.model = "bert"`: every token in llama.cpp's "phantom space" form
  (a word-initial piece gets a leading U+2581, a `##` continuation loses its prefix, control tokens stay as they
  are), token types (added special tokens control), `tokenizer.ggml.pre` (named by the probe-text hash like the
  byte-level ones; llama.cpp does not use it for WordPiece, so an unknown hash gets "default" instead of a
  refusal), the special ids and add_bos/add_eos/add_sep flags through the gguf package's SpecialVocab (cls and
  sep double as bos and eos), `tokenizer.ggml.token_type_count`, and the normalizer's lowercase / strip_accents
  (llama.cpp lowercases unless told otherwise: a cased BERT must say so).
"""

from __future__ import annotations

import json
import os

from kbitcli.errors import bad_input
from kbitcli.formats.gguf_vocab import CONTROL, NORMAL, UNUSED, load_tokenizer, probe_hash, special_vocab, token_list
from kbitcli.io.folder import read_json

MODEL_TYPE = "bert"
PHANTOM = "\u2581"  # llama.cpp's word-start marker
# probe sha256 -> name, from convert_hf_to_gguf.py's table (the WordPiece ones)
PRE_TOKENIZERS = {
    "0876d13b50744004aa9aeae05e7b0647eac9d801b5ba4668afc01e709c15e19f": "bert-bge",  # BAAI/bge-small-en-v1.5
    "8e62295832751ca1e8f92f2226f403dea30dc5165e448b5bfa05af5340c64ec7": "bert-bge-large",  # BAAI/bge-large-zh-v1.5
}
POOLING = {"mean": 1, "cls": 2, "lasttoken": 3}  # gguf.PoolingType: MEAN, CLS, LAST
POOLING_KEYS = {"pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls",
                "pooling_mode_lasttoken": "lasttoken"}
F32_ALWAYS = ("position_embd.weight", "token_types.weight")
# layer parts every block has (HF suffix under encoder.layer.N.)
LAYER = ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
         "attention.output.LayerNorm", "intermediate.dense", "output.dense", "output.LayerNorm")
EMBEDDINGS = ("embeddings.word_embeddings", "embeddings.position_embeddings", "embeddings.token_type_embeddings",
              "embeddings.LayerNorm")
FIX = "not a BERT GGUF as llama.cpp's convert_hf_to_gguf.py writes it; re-convert the model with convert_hf_to_gguf.py"


def gguf():
    import gguf as mod  # a runtime dependency; imported late (slow to import)

    return mod


def is_bert(config: dict | None) -> bool:
    return bool(config) and config.get("model_type") == MODEL_TYPE


def dropped(name: str) -> bool:
    """Source tensors llama.cpp's BERT has no place for (the converter drops them too)."""
    n = name.removeprefix("bert.")
    return n == "embeddings.position_ids" or n.startswith(("pooler.", "cls.predictions", "cls.seq_relationship"))


def check_config(cfg) -> None:
    """What llama.cpp's BERT graph computes: learned absolute positions, GELU, one LayerNorm epsilon."""
    kind = getattr(cfg, "position_embedding_type", "absolute") or "absolute"
    if kind != "absolute":
        raise bad_input(f"--format gguf: this BERT uses position_embedding_type {kind!r}; llama.cpp's BERT runs "
                        "learned absolute positions only. Use --format bnb or compressed-tensors for it")
    act = getattr(cfg, "hidden_act", "gelu")
    if act not in ("gelu", "gelu_new", "gelu_pytorch_tanh"):
        raise bad_input(f"--format gguf: this BERT's hidden_act is {act!r}; llama.cpp's BERT computes GELU. Use "
                        "--format bnb or compressed-tensors for it")


def tensor_names(src_names, n_layers: int) -> dict[str, str]:
    """HF name -> llama.cpp name, through the gguf package's BERT table (a `bert.` prefix is looked up without it)."""
    g = gguf()
    tmap = g.get_tensor_name_map(g.MODEL_ARCH.BERT, n_layers)
    out = {}
    for n in src_names:
        if dropped(n):
            continue
        name = tmap.get_name(n.removeprefix("bert."), try_suffixes=(".weight", ".bias"))
        if name is not None:
            out[n] = name
    return out


def pooling(folder: str) -> int | None:
    """gguf.PoolingType of a sentence-transformers folder (modules.json -> its Pooling module's config.json), or
    None for a plain transformers folder (llama.cpp then pools as its default)."""
    path = os.path.join(folder, "modules.json")
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as fh:
            modules = json.load(fh)
    except (ValueError, UnicodeDecodeError) as e:
        raise bad_input(f"{path}: not valid JSON ({str(e)[:120]}); restore it from the model's repository") from None
    if not isinstance(modules, list):
        raise bad_input(f"{path}: holds a JSON {type(modules).__name__}, not sentence-transformers' list of modules; "
                        "restore it from the model's repository")
    path = next((m.get("path") for m in modules if isinstance(m, dict) and str(m.get("type", "")).endswith("Pooling")),
                None)
    if path is None:
        return None
    cfg_path = os.path.join(folder, path, "config.json")
    cfg = read_json(cfg_path, what="a pooling config object")
    if not isinstance(cfg, dict):
        raise bad_input(f"{cfg_path}: modules.json names a Pooling module but its config.json is missing; restore it "
                        "from the model's repository")
    modes = [mode for key, mode in POOLING_KEYS.items() if cfg.get(key)]
    if not modes and cfg.get("pooling_mode") in POOLING:
        modes = [cfg["pooling_mode"]]
    others = sorted(k for k, v in cfg.items() if k.startswith("pooling_mode_") and v is True and k not in POOLING_KEYS)
    if len(modes) != 1 or others:
        asked = ", ".join(others + [k for k in POOLING_KEYS if cfg.get(k)]) or "none"
        raise bad_input(f"{cfg_path}: pooling {asked}; llama.cpp pools embeddings by exactly one of mean tokens, the "
                        "CLS token or the last token, so the GGUF would serve embeddings unlike the model's. Use "
                        "--format bnb or compressed-tensors for it")
    return POOLING[modes[0]]


def vocab(folder: str, config: dict) -> dict:
    """tokenizer.ggml.* for a WordPiece tokenizer, as convert_hf_to_gguf.py's BertModel.set_vocab writes them."""
    path = os.path.join(folder, "tokenizer.json")
    if not os.path.isfile(path) and not os.path.isfile(os.path.join(folder, "vocab.txt")):
        raise bad_input(f"{folder}: a BERT without its tokenizer (no tokenizer.json or vocab.txt); llama.cpp cannot "
                        "load a GGUF without one: copy the tokenizer files from the model's repository")
    tj = read_json(path, what="a tokenizer.json object") or {}
    model_type = (tj.get("model") or {}).get("type")
    if model_type not in (None, "WordPiece"):
        raise bad_input(f"{path}: a {model_type} tokenizer on a BERT; kbit writes WordPiece vocabularies for "
                        "llama.cpp's BERT. Use --format bnb or compressed-tensors for it")
    tok = load_tokenizer(folder, folder, "fix or restore the tokenizer files")
    n_vocab = int(config.get("vocab_size") or len(tok.get_vocab()))
    tokens, types = token_list(tok, n_vocab, folder)
    digest = probe_hash(tok)
    # WordPiece in llama.cpp: a word-start piece carries the phantom space, a continuation ('##x') is bare
    tokens = [tk if t in (CONTROL, UNUSED) else tk[2:] if tk.startswith("##") else PHANTOM + tk
              for tk, t in zip(tokens, types)]
    special = special_vocab(folder, n_vocab=n_vocab)
    norm = [tj.get("normalizer") or {}]
    norm += [n for n in norm[0].get("normalizers", []) or []]
    lower = next((n["lowercase"] for n in norm if n.get("type") == "BertNormalizer" and "lowercase" in n), None)
    strip = next((n["strip_accents"] for n in norm if n.get("type") == "BertNormalizer"
                  and isinstance(n.get("strip_accents"), bool)), None)
    if lower is None and any(n.get("type") == "Lowercase" for n in norm):
        lower = True
    if lower is None and isinstance(getattr(tok, "do_lower_case", None), bool):  # vocab.txt-only folders
        lower = tok.do_lower_case
    return {"model": "bert", "pre": PRE_TOKENIZERS.get(digest, "default"), "probe_sha256": digest,
            "known_pre": digest in PRE_TOKENIZERS, "tokens": tokens, "types": types,
            "ids": dict(special.special_token_ids), "add": dict(special.add_special_token),
            "token_type_count": int(config.get("type_vocab_size") or 1), "lowercase": lower, "strip_accents": strip}


def describe(voc: dict, pool: int | None) -> list[str]:
    """Lines for the export's notes."""
    pre = voc["pre"] if voc["known_pre"] else (
        f"'default' (probe sha256 {voc['probe_sha256'][:12]}... is not in convert_hf_to_gguf.py's table; llama.cpp "
        "ignores the name for WordPiece)")
    adds = ", ".join(f"add_{k} {str(v).lower()}" for k, v in voc["add"].items())
    names = {v: k.upper() for k, v in POOLING.items()}
    pooled = f"pooling {names[pool]} (1_Pooling)" if pool else "no sentence-transformers pooling: llama.cpp's default"
    return [f"tokenizer: 'bert' (WordPiece), pre-tokenizer {pre}, {len(voc['tokens'])} tokens "
            f"({voc['types'].count(CONTROL)} control), lowercase {str(voc['lowercase']).lower()}, {adds}",
            f"BERT encoder: {pooled}; embeddings.position_ids and the pooler/MLM heads are not written (llama.cpp "
            "pools by itself); position_embd and token_types stay F32"]


def write_header(w, cfg, voc: dict, pool: int | None) -> None:
    """bert.* hyperparameters and tokenizer.ggml.* into a GGUFWriter (arch "bert")."""
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_head_count(cfg.num_attention_heads)
    w.add_layer_norm_eps(cfg.layer_norm_eps)
    w.add_causal_attention(False)
    if pool is not None:
        w.add_pooling_type(gguf().PoolingType(pool))
    w.add_token_type_count(voc["token_type_count"])
    w.add_tokenizer_model(voc["model"])
    w.add_tokenizer_pre(voc["pre"])
    w.add_token_list(voc["tokens"])
    w.add_token_types(voc["types"])
    for key, tid in voc["ids"].items():
        add = getattr(w, f"add_{key}_token_id", None)  # cls has no key in gguf-py (bos is the CLS token), as in convert
        if add is not None:
            add(int(tid))
    for key, value in voc["add"].items():
        add = getattr(w, f"add_add_{key}_token", None)
        if add is not None:
            add(bool(value))
    if voc["lowercase"] is not None:  # the keys newer gguf-py's SpecialVocab writes from the BertNormalizer
        w.add_bool("tokenizer.ggml.normalizer.lowercase", bool(voc["lowercase"]))
    if voc["strip_accents"] is not None:
        w.add_bool("tokenizer.ggml.normalizer.strip_accents", bool(voc["strip_accents"]))


# ---- reading a BERT GGUF back ------------------------------------------------------------------------------

COUNTS = ("bert.block_count", "bert.embedding_length", "bert.feed_forward_length", "bert.attention.head_count")


def check_meta(path: str, m: dict) -> None:
    for key in COUNTS:
        v = m.get(key)
        if v is None:
            raise bad_input(f"{path}: the GGUF metadata has no {key}; {FIX}")
        if not (isinstance(v, int) and not isinstance(v, bool) and v >= 1):
            raise bad_input(f"{path}: the GGUF metadata's {key} is {v!r:.40}, not a positive integer; {FIX}")
    if m["bert.embedding_length"] % m["bert.attention.head_count"]:
        raise bad_input(f"{path}: the GGUF metadata's bert.embedding_length {m['bert.embedding_length']} is not a "
                        f"multiple of bert.attention.head_count {m['bert.attention.head_count']}; {FIX}")


def hf_names(n_layers: int) -> dict[str, str]:
    """llama.cpp name -> transformers BertModel name (the gguf package's table, run over every BERT weight)."""
    g = gguf()
    tmap = g.get_tensor_name_map(g.MODEL_ARCH.BERT, n_layers)
    hf = [*EMBEDDINGS] + [f"encoder.layer.{i}.{p}" for i in range(n_layers) for p in LAYER]
    out = {}
    for n in hf:
        for suffix in (".weight", ".bias"):
            name = tmap.get_name(n + suffix, try_suffixes=(".weight", ".bias"))
            if name is not None:
                out[name] = n + suffix
    return out


def wanted_shapes(m: dict) -> dict[str, tuple | None]:
    """Every weight the metadata implies, with the shape it implies (None: any)."""
    hidden, ff = m["bert.embedding_length"], m["bert.feed_forward_length"]
    want = {"embeddings.word_embeddings.weight": (None, hidden),
            "embeddings.position_embeddings.weight": (None, hidden), "embeddings.LayerNorm.weight": (hidden,)}
    shapes = {"attention.self.query": (hidden, hidden), "attention.self.key": (hidden, hidden),
              "attention.self.value": (hidden, hidden), "attention.output.dense": (hidden, hidden),
              "attention.output.LayerNorm": (hidden,), "intermediate.dense": (ff, hidden),
              "output.dense": (hidden, ff), "output.LayerNorm": (hidden,)}
    for i in range(m["bert.block_count"]):
        want.update({f"encoder.layer.{i}.{part}.weight": shape for part, shape in shapes.items()})
    return want


def hf_config(m: dict, shapes: dict[str, tuple]) -> dict:
    """config.json for transformers' BertModel from the bert.* metadata and the tensors' torch shapes (HF names)."""
    tokens = m.get("tokenizer.ggml.tokens")
    vocab = len(tokens) if tokens else shapes["embeddings.word_embeddings.weight"][0]
    types = shapes.get("embeddings.token_type_embeddings.weight", (m.get("tokenizer.ggml.token_type_count") or 1,))[0]
    cfg = {"architectures": ["BertModel"], "model_type": MODEL_TYPE, "hidden_size": m["bert.embedding_length"],
           "intermediate_size": m["bert.feed_forward_length"], "num_hidden_layers": m["bert.block_count"],
           "num_attention_heads": m["bert.attention.head_count"], "vocab_size": int(vocab),
           "max_position_embeddings": shapes["embeddings.position_embeddings.weight"][0], "type_vocab_size": int(types),
           "layer_norm_eps": float(f"{m.get('bert.attention.layer_norm_epsilon') or 1e-12:.7g}"), "hidden_act": "gelu",
           "position_embedding_type": "absolute", "torch_dtype": "float32"}
    pad = m.get("tokenizer.ggml.padding_token_id")
    if isinstance(pad, int):
        cfg["pad_token_id"] = pad
    return cfg


def unphantom(token: str, kind: int) -> str:
    """llama.cpp's phantom-space token -> the WordPiece vocab.txt entry it came from."""
    if kind == CONTROL:
        return token
    return token[1:] if token.startswith(PHANTOM) else "##" + token


def save_tokenizer(m: dict, folder: str) -> list[str]:
    """The tokenizer files of the BertTokenizer built from the GGUF's WordPiece vocabulary (transformers' own GGUF
    loader has no BERT tokenizer); [CLS] / [SEP] are the bos / eos ids when the file names no cls / separator."""
    from transformers import BertTokenizerFast

    tokens, kinds = m.get("tokenizer.ggml.tokens"), m.get("tokenizer.ggml.token_type")
    if not tokens or m.get("tokenizer.ggml.model") != "bert":
        return []
    kinds = kinds or [NORMAL] * len(tokens)
    vocab = {}
    for i, (t, k) in enumerate(zip(tokens, kinds)):
        vocab.setdefault(unphantom(t, k), i)
    ids = {k: m.get(f"tokenizer.ggml.{k}_token_id") for k in ("unknown", "seperator", "padding", "cls", "mask")}
    ids["cls"] = ids["cls"] if ids["cls"] is not None else m.get("tokenizer.ggml.bos_token_id")
    ids["seperator"] = ids["seperator"] if ids["seperator"] is not None else m.get("tokenizer.ggml.eos_token_id")
    named = {k: tokens[i] for k, i in ids.items() if isinstance(i, int) and 0 <= i < len(tokens)}
    keys = {"unknown": "unk_token", "seperator": "sep_token", "padding": "pad_token", "cls": "cls_token",
            "mask": "mask_token"}
    lower = m.get("tokenizer.ggml.normalizer.lowercase")
    tok = BertTokenizerFast(vocab=vocab, do_lower_case=True if lower is None else bool(lower),
                            strip_accents=m.get("tokenizer.ggml.normalizer.strip_accents"),
                            **{keys[k]: v for k, v in named.items()})
    return list(tok.save_pretrained(folder))

