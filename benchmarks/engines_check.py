"""Does llama.cpp run the GGUF files kbit writes? An interop check against the engine itself (outside `make test`:
it needs llama-cpp-python, a long source build).

    .venv/bin/python benchmarks/engines_check.py [MODEL[:TYPE] ...] [--llama-python /tmp/llvenv/bin/python]
        [--tokens 256] [--threads 2] [--out DIR] [--tokenizer DIR] [--json]

MODEL is a dense Llama, Qwen2 or BERT folder (default: the bundled stories260K), TYPE a GGUF type (default Q4_0; stories260K's
FFN rows of 172 are kept F32 by an --override, as llama.cpp needs rows that are multiples of 32). For each:
  1. `kbit encode MODEL OUT/NAME-TYPE.gguf --format gguf --gguf-type TYPE` (kbit's Python API);
  2. llama.cpp (llama-cpp-python) loads the file (yes/no; its error line when no), tokenizes the bundled texts
     (kbitcli/assets/text/*.txt, outer whitespace stripped: stories260K's tokenizer.json strips it and llama.cpp's
     SentencePiece tokenizer does not) with the file's own add_bos and special-token parsing, and returns its
     logits for the first --tokens tokens of TinyStories;
  3. the same file decoded by kbit (`kbit.load_model(OUT/NAME-TYPE.gguf)`: kbit's GGUF reader's weights in
     transformers) and the original tokenizer (transformers, MODEL's tokenizer.json) give the reference.
Printed per model: loads, tokenization equal per text (token counts; first differing position when not), max
|logit difference| (and the largest |logit|, for scale), top-1 agreement, and the mean next-token NLL (nats) in
llama.cpp and in kbit. llama.cpp quantizes activations to 8 bits for its Q4_0/Q8_0 dot products, so logits are
close, not equal.

A BERT encoder folder (model_type bert, e.g. sentence-transformers' all-MiniLM-L6-v2) is checked as llama.cpp serves
it, for sentence embeddings: llama.cpp loads the GGUF with embedding=True and the file's pooling (MEAN for MiniLM),
tokenizes every non-empty line of the bundled texts (compared with MODEL's transformers tokenizer, [CLS]/[SEP]
included) and embeds each line; the reference is kbit's decode of the same file (kbit's GGUF reader's weights in
transformers' BertModel) on the transformers tokenization, mean-pooled over the attention mask. Printed: loads,
lines tokenized equally, the cosine of llama.cpp's pooled embedding vs kbit's (min / mean over lines), and, for
scale, the cosine of each vs the dense model's (what the quantization itself costs). Tensors the plan wrote F16
(rows not a multiple of 32) are counted in the first line.

--tokenizer DIR: for a decoder folder saved without a tokenizer (benchmarks/qwen2_models.py from-llama: SmolLM2's
weights as a Qwen2), the tokenizer to compare with; its vocabulary, as kbit writes it, is grafted into the GGUF after
the export (qwen2_models.graft_vocab), so llama.cpp can load the file.

llama-cpp-python may live in another virtual environment (it needs only numpy): --llama-python names its
interpreter, and this script runs its llama.cpp half there (`--worker JOB`), exchanging JSON and .npy files.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))


# ---- the llama.cpp half: stdlib + numpy + llama_cpp only ------------------------------------------------------

def worker(job_path: str) -> None:
    import numpy as np
    from llama_cpp import Llama

    with open(job_path, encoding="utf-8") as fh:
        job = json.load(fh)
    if job.get("embed"):
        return embed_worker(job)
    llm = Llama(model_path=job["gguf"], n_ctx=job["n_ctx"], n_batch=job["n_ctx"], logits_all=True,
                n_threads=job["threads"], verbose=True)  # its load log goes to stderr: the parent keeps errors
    texts = [llm.tokenize(t.encode("utf-8"), add_bos=True, special=True) for t in job["texts"]]
    llm.eval(job["ids"])
    np.save(job["logits"], np.asarray(llm.scores[: len(job["ids"])], dtype=np.float32))
    with open(job["result"], "w", encoding="utf-8") as fh:
        json.dump({"texts": texts, "n_vocab": llm.n_vocab()}, fh)


def embed_worker(job: dict) -> None:
    """A BERT GGUF: per line, llama.cpp's token ids and its pooled embedding (the file's pooling type)."""
    import numpy as np
    from llama_cpp import Llama

    llm = Llama(model_path=job["gguf"], embedding=True, n_ctx=job["n_ctx"], n_batch=job["n_ctx"],
                n_ubatch=job["n_ctx"], n_threads=job["threads"], verbose=True)
    texts = [llm.tokenize(t.encode("utf-8"), add_bos=True, special=True) for t in job["texts"]]
    emb = np.asarray(llm.embed(job["texts"], normalize=False, truncate=True), dtype=np.float32)
    np.save(job["embeddings"], emb)
    with open(job["result"], "w", encoding="utf-8") as fh:
        json.dump({"texts": texts, "pooling_type": int(llm.pooling_type())}, fh)


# ---- the kbit half ------------------------------------------------------------------------------------------------

def export(model: str, gguf_type: str, out: str) -> tuple[str, dict]:
    from kbitcli.encode import encode
    from kbitcli.recipes import Recipe, parse_override

    with open(os.path.join(model, "config.json"), encoding="utf-8") as fh:
        cfg = json.load(fh)
    skip = [parse_override("model.layers.*.mlp.down_proj=skip")] if cfg["intermediate_size"] % 32 else []
    name = os.path.basename(os.path.normpath(model))
    dst = os.path.join(out, f"{name}-{gguf_type}.gguf")
    if os.path.exists(dst):
        os.remove(dst)
        if os.path.exists(dst + ".manifest.json"):
            os.remove(dst + ".manifest.json")
    result = encode(model, dst, Recipe(bits=int(gguf_type[1]), block_size=32, dtype="int", scale_search=1,
                                       overrides=skip), fmt="gguf", gguf_type=gguf_type)
    return dst, result


def first_difference(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def nll(logits, ids) -> float:
    import torch

    lp = torch.log_softmax(torch.as_tensor(logits[:-1]).double(), dim=-1)
    return -lp.gather(1, torch.as_tensor(ids[1:]).view(-1, 1)).mean().item()


def run_llama(job: dict, out: str, llama_python: str, row: dict) -> dict | None:
    """Run the llama.cpp half (`--worker`) on job; row["loads"] (and row["error"]) say how it went. Its result,
    or None when llama.cpp did not load the file."""
    job_path = os.path.join(out, "job.json")
    with open(job_path, "w", encoding="utf-8") as fh:
        json.dump(job, fh)
    run = subprocess.run([llama_python, os.path.abspath(__file__), "--worker", job_path], capture_output=True,
                         text=True)
    row["loads"] = run.returncode == 0
    if not row["loads"]:
        errors = [ln for ln in (run.stderr + run.stdout).splitlines() if "error" in ln.lower()]
        row["error"] = (errors or (run.stderr.strip().splitlines() or ["(no output)"]))[-1][:300]
        return None
    with open(job["result"], encoding="utf-8") as fh:
        return json.load(fh)


def check(model: str, gguf_type: str, out: str, llama_python: str, n_tokens: int, threads: int,
          tokenizer: str | None = None) -> dict:
    import numpy as np
    import torch
    from transformers import AutoTokenizer

    from kbitcli.models.load import load_model

    dst, _ = export(model, gguf_type, out)
    if tokenizer:
        from qwen2_models import graft_vocab

        graft_vocab(dst, tokenizer)
    texts = {os.path.basename(p): open(p, encoding="utf-8").read().strip()
             for p in sorted(glob.glob(os.path.join(HERE, "..", "kbitcli", "assets", "text", "*.txt")))}
    tok = AutoTokenizer.from_pretrained(tokenizer or model)
    ids = tok(texts["tinystories_v2_valid_first48k.txt"]).input_ids[:n_tokens]
    row = {"model": model, "type": gguf_type, "gguf": dst, "bytes": os.path.getsize(dst), "tokens": len(ids)}
    job = {"gguf": dst, "n_ctx": max(64, len(ids)), "threads": threads, "texts": list(texts.values()), "ids": ids,
           "logits": os.path.join(out, "llama_logits.npy"), "result": os.path.join(out, "llama_result.json")}
    res = run_llama(job, out, llama_python, row)
    if res is None:
        return row
    row["tokenization"] = {}
    for (name, text), theirs in zip(texts.items(), res["texts"]):
        ours = tok(text).input_ids
        row["tokenization"][name] = {"equal": ours == theirs, "transformers": len(ours), "llama.cpp": len(theirs),
                                     "first_difference": None if ours == theirs else first_difference(ours, theirs)}
    theirs = np.load(job["logits"])
    kbit_model, _ = load_model(dst, tokenizer=False)
    with torch.no_grad():
        ours = kbit_model(torch.tensor([ids])).logits[0].float().numpy()
    theirs = theirs[:, : ours.shape[1]]
    diff = np.abs(ours - theirs)
    row.update(max_abs_logit_diff=float(diff.max()), mean_abs_logit_diff=float(diff.mean()),
               max_abs_logit=float(np.abs(ours).max()),
               top1_agreement=float((ours.argmax(-1) == theirs.argmax(-1)).mean()),
               nll_llamacpp=nll(theirs, ids), nll_kbit=nll(ours, ids))
    return row


def mean_pooled(model, tok, texts: list[str], batch: int = 32):
    """Mean over the attention mask of the last hidden states (sentence-transformers' mean pooling), per text."""
    import torch

    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out = [None] * len(texts)
    for b in range(0, len(order), batch):
        idx = order[b: b + batch]
        enc = tok([texts[i] for i in idx], padding=True, truncation=True, max_length=512, return_tensors="pt")
        with torch.no_grad():
            h = model(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).float()
        for i, v in zip(idx, (h * mask).sum(1) / mask.sum(1)):
            out[i] = v
    return torch.stack(out)


def check_embeddings(model: str, gguf_type: str, out: str, llama_python: str, threads: int) -> dict:
    import numpy as np
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    from transformers.utils import logging as hf_logging

    from kbitcli.formats.registry import open_reader

    hf_logging.set_verbosity_error()  # the dense load reports the pooler it leaves out, as intended: not news
    hf_logging.disable_progress_bar()
    dst, result = export(model, gguf_type, out)
    lines = []
    for p in sorted(glob.glob(os.path.join(HERE, "..", "kbitcli", "assets", "text", "*.txt"))):
        lines += [ln for ln in open(p, encoding="utf-8").read().splitlines() if ln.strip()]
    f16 = [t["name"] for t in result["plan"] if str(t.get("rule", "")).startswith("F16")]
    row = {"model": model, "type": gguf_type, "gguf": dst, "bytes": os.path.getsize(dst), "embed": True,
           "lines": len(lines), "f16_tensors": len(f16)}
    job = {"gguf": dst, "embed": True, "n_ctx": 512, "threads": threads, "texts": lines,
           "embeddings": os.path.join(out, "llama_embeddings.npy"), "result": os.path.join(out, "llama_result.json")}
    res = run_llama(job, out, llama_python, row)
    if res is None:
        return row
    tok = AutoTokenizer.from_pretrained(model)
    ours = [tok(t).input_ids for t in lines]
    same = [a == b for a, b in zip(ours, res["texts"])]
    row.update(pooling_type=res["pooling_type"], tokenization_equal=sum(same),
               first_differing_line=None if all(same) else same.index(False))
    reader = open_reader(dst)
    kbit_model = BertModel(BertConfig(**reader.config), add_pooling_layer=False).eval()
    kbit_model.load_state_dict({n: reader.tensor(n, torch.float32) for n in reader.names}, strict=True)
    dense = BertModel.from_pretrained(model, add_pooling_layer=False).eval()
    theirs = torch.from_numpy(np.load(job["embeddings"]))
    kbit_emb, dense_emb = mean_pooled(kbit_model, tok, lines), mean_pooled(dense, tok, lines)
    cos = torch.nn.functional.cosine_similarity
    for key, a, b in (("cos_llamacpp_kbit", theirs, kbit_emb), ("cos_kbit_dense", kbit_emb, dense_emb),
                      ("cos_llamacpp_dense", theirs, dense_emb)):
        c = cos(a, b)
        row[key] = {"min": float(c.min()), "mean": float(c.mean())}
    return row


def is_bert(model: str) -> bool:
    with open(os.path.join(model, "config.json"), encoding="utf-8") as fh:
        return json.load(fh).get("model_type") == "bert"


def show_embeddings(row: dict) -> None:
    print(f"{os.path.basename(os.path.normpath(row['model']))} {row['type']} ({row['bytes'] / 1e6:.1f} MB, "
          f"{row['f16_tensors']} tensors F16 by the plan): llama.cpp loads: {'yes' if row['loads'] else 'no'}")
    if not row["loads"]:
        print(f"  {row['error']}")
        return
    first = "" if row["first_differing_line"] is None else f" (first differing line {row['first_differing_line']})"
    print(f"  pooling type {row['pooling_type']}; tokenization equal on {row['tokenization_equal']}/{row['lines']} "
          f"lines{first}")
    for key, label in (("cos_llamacpp_kbit", "llama.cpp vs kbit decode"), ("cos_kbit_dense", "kbit decode vs dense"),
                       ("cos_llamacpp_dense", "llama.cpp vs dense")):
        print(f"  cosine {label}: min {row[key]['min']:.6f} mean {row[key]['mean']:.6f}")


def show(row: dict) -> None:
    if row.get("embed"):
        return show_embeddings(row)
    print(f"{os.path.basename(os.path.normpath(row['model']))} {row['type']} ({row['bytes'] / 1e6:.1f} MB): "
          f"llama.cpp loads: {'yes' if row['loads'] else 'no'}")
    if not row["loads"]:
        print(f"  {row['error']}")
        return
    for name, t in row["tokenization"].items():
        state = "equal" if t["equal"] else f"DIFFER from token {t['first_difference']}"
        print(f"  tokenization {name}: {state} ({t['transformers']} tokens transformers, {t['llama.cpp']} llama.cpp)")
    print(f"  {row['tokens']} tokens of TinyStories: |logit diff| max {row['max_abs_logit_diff']:.4f} mean "
          f"{row['mean_abs_logit_diff']:.4f} (max |logit| {row['max_abs_logit']:.2f}), top-1 agreement "
          f"{row['top1_agreement']:.4f}, NLL llama.cpp "
          f"{row['nll_llamacpp']:.4f} vs kbit {row['nll_kbit']:.4f} nats/token")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="*", help="MODEL[:TYPE] (default: the bundled stories260K:Q8_0)")
    ap.add_argument("--llama-python", default=sys.executable, help="interpreter that has llama_cpp (default: this)")
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", help="where the GGUF files go (default: a temporary folder)")
    ap.add_argument("--tokenizer", help="tokenizer folder for decoder MODELs saved without one (grafted into the GGUF)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args.worker)
    sys.path.insert(0, os.path.join(HERE, ".."))
    os.environ.setdefault("KBIT_PROGRESS", "0")
    from kbitcli.paths import STORIES260K

    specs = args.models or [f"{STORIES260K}:Q8_0"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or tmp
        os.makedirs(out, exist_ok=True)
        for spec in specs:
            model, _, gguf_type = spec.rpartition(":") if ":" in spec else (spec, "", "Q4_0")
            if is_bert(model):
                rows.append(check_embeddings(model, gguf_type.upper(), out, args.llama_python, args.threads))
            else:
                rows.append(check(model, gguf_type.upper(), out, args.llama_python, args.tokens, args.threads,
                                  args.tokenizer))
            if not args.json:
                show(rows[-1])
    if args.json:
        print(json.dumps(rows))


if __name__ == "__main__":
    main()
