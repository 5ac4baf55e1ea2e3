"""Training text -> fixed-length token blocks, and the batch every step sees.

Input: a plain text file (one document: the whole file) or JSON Lines (`.jsonl`: one JSON object per line,
its `text` field one document). Each document is tokenised with the model's own tokenizer as
[BOS] + tokens (+ EOS between JSONL documents), the documents are concatenated into one stream and the
stream is cut into blocks of `context` tokens; the remainder shorter than a block is dropped (as
transformers' run_clm example does).

Batches are a pure function of (seed, step): step s takes the next `batch_size` blocks of an endless
sequence of shuffled epochs, epoch e shuffled by a generator seeded with (seed, e). A resumed run therefore
sees exactly the batches the uninterrupted run would have seen, with no data-loader state to save.
"""

from __future__ import annotations

import json
import os

import torch

from kbitcli.errors import bad_input

CHUNK_CHARS = 1 << 20  # tokenise long text in ~1 MB pieces cut at line ends: bounded tokenizer memory


def read_documents(path: str) -> list[str]:
    if not os.path.isfile(path):
        raise bad_input(f"{path}: no such file; give a .txt file or a .jsonl file with a 'text' field")
    try:
        with open(path, encoding="utf-8") as fh:
            raw = fh.read()
    except UnicodeDecodeError as e:
        raise bad_input(f"{path}: not UTF-8 text (byte {e.start}); convert it to UTF-8") from None
    if not path.endswith(".jsonl"):
        return [raw] if raw.strip() else []
    docs = []
    for i, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError as e:
            raise bad_input(f"{path}:{i}: not valid JSON ({e}); each line must be an object with a 'text' field") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
            raise bad_input(f"{path}:{i}: expected an object with a string 'text' field")
        if obj["text"].strip():
            docs.append(obj["text"])
    return docs


def _pieces(text: str):
    start = 0
    while start < len(text):
        stop = start + CHUNK_CHARS
        if stop < len(text):
            nl = text.rfind("\n", start, stop)
            stop = nl + 1 if nl > start else stop
        yield text[start:stop]
        start = stop


def tokenize(docs: list[str], tokenizer) -> list[int]:
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    stream: list[int] = []
    for i, doc in enumerate(docs):
        if bos is not None:
            stream.append(bos)
        for piece in _pieces(doc):
            stream.extend(tokenizer(piece, add_special_tokens=False)["input_ids"])
        if eos is not None and i < len(docs) - 1:
            stream.append(eos)
    return stream


def load_blocks(path: str, tokenizer, context: int, what: str = "--data") -> torch.Tensor:
    """[n_blocks, context] int64 token ids of the file; refuses empty or too-short data (exit 2)."""
    docs = read_documents(path)
    if not docs:
        raise bad_input(f"{what} {path}: holds no text; give a non-empty .txt file or .jsonl with 'text' fields")
    stream = tokenize(docs, tokenizer)
    n = len(stream) // context
    if n == 0:
        raise bad_input(f"{what} {path}: {len(stream)} tokens, fewer than one block of --context {context}; "
                        "give more text or a smaller --context")
    return torch.tensor(stream[: n * context], dtype=torch.long).view(n, context)


def epoch_order(n_blocks: int, seed: int, epoch: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n_blocks, generator=gen)


def batch_indices(n_blocks: int, batch_size: int, seed: int, step: int) -> torch.Tensor:
    """Block indices of training step `step` (1-based)."""
    first = (step - 1) * batch_size
    out = []
    pos = first
    while len(out) < batch_size:
        epoch, offset = divmod(pos, n_blocks)
        order = epoch_order(n_blocks, seed, epoch)
        take = order[offset: offset + batch_size - len(out)]
        out.extend(take.tolist())
        pos += len(take)
    return torch.tensor(out, dtype=torch.long)

