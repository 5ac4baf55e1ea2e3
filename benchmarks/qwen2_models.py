"""Qwen2 folders for benchmarks/engines_check.py (no real Qwen2 checkpoint is reachable offline), and the vocabulary
graft it needs for one of them.

    .venv/bin/python benchmarks/qwen2_models.py random OUT --tokenizer DIR [--untied] [--layers 4] [--hidden 128]
    .venv/bin/python benchmarks/qwen2_models.py from-llama LLAMA_FOLDER OUT

`random`: a random-init Qwen2ForCausalLM from a transformers Qwen2Config (shapes only; q/k/v biases drawn nonzero,
since a fresh Qwen2's are zero and would hide a lost bias), vocab_size = the tokenizer's, saved with that tokenizer.
transformers loads every qwen2 folder's tokenizer as its own Qwen2Tokenizer (Qwen2's pre-tokenizer regex whatever
tokenizer.json says), so DIR should hold Qwen's real vocabulary: llama.cpp then knows the pre-tokenizer ('qwen2').

`from-llama`: a Llama's weights (e.g. SmolLM2-135M, /work/smollm2-dense) in a Qwen2Config of the same shapes: the
same tensor names, zero q/k/v biases, rope theta / norm epsilon / tying from the Llama's config. The same function
as the Llama (Qwen2 = Llama + q/k/v biases), so a real model to run in llama.cpp's qwen2 graph. Saved without a
tokenizer (in a qwen2 folder transformers would run SmolLM2's vocabulary through Qwen2's regex, which no llama.cpp
pre-tokenizer stands for): engines_check.py --tokenizer LLAMA_FOLDER compares with the Llama's own tokenizer and
grafts its vocabulary into the GGUF kbit wrote (graft_vocab below).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def random_qwen2(out: str, tokenizer: str, tie: bool, layers: int, hidden: int) -> str:
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer)
    torch.manual_seed(0)
    heads = hidden // 32
    cfg = Qwen2Config(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=max(1, heads // 2), vocab_size=len(tok),
                      max_position_embeddings=4096, rope_theta=1000000.0, tie_word_embeddings=tie,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, initializer_range=0.1)
    model = Qwen2ForCausalLM(cfg)
    with torch.no_grad():
        for layer in model.model.layers:
            for p in ("q_proj", "k_proj", "v_proj"):
                getattr(layer.self_attn, p).bias.normal_(0, 0.5)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def from_llama(llama: str, out: str) -> str:
    import torch
    from transformers import LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    with open(os.path.join(llama, "config.json"), encoding="utf-8") as fh:
        lc = json.load(fh)
    head_dim = lc.get("head_dim") or lc["hidden_size"] // lc["num_attention_heads"]
    if head_dim != lc["hidden_size"] // lc["num_attention_heads"] or lc.get("attention_bias") or lc.get("mlp_bias"):
        sys.exit(f"{llama}: Qwen2's head_dim is hidden_size / num_attention_heads and it has no o_proj/MLP biases")
    rope = lc.get("rope_parameters") or {"rope_theta": lc.get("rope_theta", 10000.0), "rope_type": "default"}
    if rope.get("rope_type", "default") != "default":
        sys.exit(f"{llama}: rope type {rope['rope_type']!r}: only the default rope is copied")
    cfg = Qwen2Config(hidden_size=lc["hidden_size"], intermediate_size=lc["intermediate_size"],
                      num_hidden_layers=lc["num_hidden_layers"], num_attention_heads=lc["num_attention_heads"],
                      num_key_value_heads=lc["num_key_value_heads"], vocab_size=lc["vocab_size"],
                      max_position_embeddings=lc["max_position_embeddings"], rms_norm_eps=lc["rms_norm_eps"],
                      rope_theta=rope["rope_theta"], tie_word_embeddings=lc.get("tie_word_embeddings", False),
                      bos_token_id=lc.get("bos_token_id"), eos_token_id=lc.get("eos_token_id"),
                      pad_token_id=lc.get("pad_token_id"), hidden_act=lc.get("hidden_act", "silu"))
    src = LlamaForCausalLM.from_pretrained(llama, dtype=torch.float32)
    model = Qwen2ForCausalLM(cfg).to(torch.float32)
    state = src.state_dict()
    for i in range(cfg.num_hidden_layers):  # the biases Llama does not have: zero, the same function
        for p in ("q_proj", "k_proj", "v_proj"):
            state[f"model.layers.{i}.self_attn.{p}.bias"] = torch.zeros(model.get_parameter(
                f"model.layers.{i}.self_attn.{p}.bias").shape)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:
        sys.exit(f"weights do not map: missing {missing[:3]}, unexpected {unexpected[:3]}")
    model.tie_weights()
    model.save_pretrained(out)
    return out


def graft_vocab(gguf_path: str, tokenizer: str) -> str:
    """Rewrite gguf_path with the vocabulary kbit writes for the tokenizer folder (formats/gguf_vocab.py), for a
    model folder saved without one (from-llama). The tensors are copied byte for byte."""
    import gguf
    import numpy as np

    sys.path.insert(0, os.path.join(HERE, ".."))
    from kbitcli.formats import gguf_vocab

    with open(os.path.join(tokenizer, "config.json"), encoding="utf-8") as fh:
        config = json.load(fh)
    r = gguf.GGUFReader(gguf_path)
    arch = r.fields["general.architecture"].contents()
    voc = gguf_vocab.vocab(tokenizer, config, int(r.fields[f"{arch}.vocab_size"].contents()))
    tmp = gguf_path + ".graft"
    w = gguf.GGUFWriter(tmp, arch)
    for key, f in r.fields.items():
        if key.startswith(("GGUF.", "tokenizer.")) or key == "general.architecture":
            continue
        w.add_key_value(key, f.contents(), f.types[0], f.types[-1] if len(f.types) > 1 else None)
    gguf_vocab.write(w, voc)
    for t in r.tensors:
        dense = t.tensor_type.name in ("F32", "F16")
        w.add_tensor(t.name, np.array(t.data), raw_dtype=None if dense else t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    os.replace(tmp, gguf_path)
    return gguf_path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("random")
    r.add_argument("out")
    r.add_argument("--tokenizer", required=True)
    r.add_argument("--untied", action="store_true")
    r.add_argument("--layers", type=int, default=4)
    r.add_argument("--hidden", type=int, default=128)
    f = sub.add_parser("from-llama")
    f.add_argument("llama")
    f.add_argument("out")
    args = ap.parse_args()
    if args.cmd == "random":
        print(random_qwen2(args.out, args.tokenizer, not args.untied, args.layers, args.hidden))
    else:
        print(from_llama(args.llama, args.out))


if __name__ == "__main__":
    main()
