"""The Python loop on a language model: encode (embeddings and a tied lm_head k-bit too) -> generate -> score ->
save -> load -> decode.

    .venv/bin/python examples/language_model.py [--model kbitcli/assets/stories260K] [--bits 4] [--embed-bits 8]

Any transformers causal LM folder works (e.g. the SmolLM2-135M folder benchmarks/smollm2_dense.py makes).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import kbitcli.api as kbit  # noqa: E402
from kbitcli.paths import STORIES260K, TINYSTORIES_TEXT  # noqa: E402


def nll(model, ids: torch.Tensor) -> float:
    with torch.no_grad():
        return model(ids, labels=ids).loss.item()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=STORIES260K)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--embed-bits", type=int, default=8, help="bits of the input embedding (and a tied lm_head)")
    ap.add_argument("--tokens", type=int, default=256, help="TinyStories tokens to score")
    args = ap.parse_args(argv)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    recipe = {"bits": args.bits, "block_size": 64, "dtype": "nf", "double_quant": True,
              "targets": ["re:.*(q|k|v|o|gate|up|down)_proj", "re:.*embed_tokens"],
              "overrides": [{"pattern": "re:.*embed_tokens", "bits": args.embed_bits, "dtype": "int"}]}
    q = kbit.encode(model, recipe=recipe)  # a k-bit copy; `model` stays dense

    with open(TINYSTORIES_TEXT, encoding="utf-8") as fh:
        ids = tok(fh.read(20000), return_tensors="pt").input_ids[:, : args.tokens]
    dense_mb, kbit_mb = kbit.memory(model)["total_bytes"] / 1e6, kbit.memory(q)["total_bytes"] / 1e6
    print(f"weights in memory: dense {dense_mb:.2f} MB, k-bit {kbit_mb:.2f} MB ({dense_mb / kbit_mb:.1f}x smaller)")
    print(f"nll on {ids.shape[1]} TinyStories tokens: dense {nll(model, ids):.4f}, k-bit {nll(q, ids):.4f}")
    prompt = tok("Once upon a time", return_tensors="pt").input_ids
    out = q.generate(prompt, max_new_tokens=30, do_sample=False)
    print("k-bit:", tok.decode(out[0], skip_special_tokens=True))

    with tempfile.TemporaryDirectory() as tmp:
        kbit.save(q, os.path.join(tmp, "lm"))  # the native format, readable by `kbit generate` too
        again = kbit.load(os.path.join(tmp, "lm"))  # no skeleton needed: config.json names the class
        assert torch.equal(again(prompt).logits, q(prompt).logits)
    restored = kbit.decode(q)  # dense again, lm_head tied to the embedding as before
    print(f"decoded nll {nll(restored, ids):.4f} (the k-bit model's values, now dense)")


if __name__ == "__main__":
    main()
