"""The tokenizer a GGUF file carries (`tokenizer.ggml.*`), written as llama.cpp's convert_hf_to_gguf.py writes it,
from the model folder's tokenizer.json.

Two kinds of tokenizer.json are written:
- SentencePiece-style BPE (`byte_fallback`: Llama 2, Mistral, stories260K): `tokenizer.ggml.model = "llama"`,
  tokens, scores and token types (normal / unknown / control / byte / unused).
- byte-level BPE (GPT-2's byte alphabet: SmolLM, Llama 3, Qwen2, GPT-2): `"gpt2"`, tokens, token types (added
  special tokens control, other added tokens user-defined), the merges, and `tokenizer.ggml.pre`, the name of the
  pre-tokenizer (the regexes that split text before the merges) llama.cpp must run. tokenizer.json's regexes are
  not read by llama.cpp; it knows its pre-tokenizers by name, and convert_hf_to_gguf.py names one by the sha256
  of the token ids the tokenizer gives for a fixed probe text (PROBE, PRE_TOKENIZERS below). A tokenizer whose
  hash is not in the table is refused: any name kbit guessed would make llama.cpp split text differently from
  transformers, silently (convert_hf_to_gguf.py refuses it too).
Both get the special token ids, add_bos_token / add_eos_token, add_space_prefix (when tokenizer_config.json has
add_prefix_space) and the chat template. Anything else (no
tokenizer.json, WordPiece, Unigram) is not embedded; the export says so in its notes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os

from kbitcli.errors import bad_input
from kbitcli.io.folder import read_json

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6  # gguf.TokenType

# convert_hf_to_gguf.py's probe text (get_vocab_base_pre's chktxt), character for character: blank runs, emoji
# with joiners, digit runs, Khmer, Chinese, Cyrillic, punctuation runs and English contractions in odd cases.
PROBE = ("\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n\U0001f680 (normal) \U0001f636\u200d\U0001f32b\ufe0f "
         "(multiple emojis concatenated) \u2705 \U0001f999\U0001f999 3 33 333 3333 33333 333333 3333333 33333333 "
         "3.3 3..3 3...3 \u1780\u17b6\u1793\u17cb\u178f\u17c2\u1796\u17b7\u179f\u17c1\u179f\u17a2\u17b6\u1785"
         "\U0001f601 ?\u6211\u60f3\u5728apple\u5de5\u4f5c1314151\u5929\uff5e ------======= "
         "\u043d\u0435\u0449\u043e \u043d\u0430 \u0411\u044a\u043b\u0433\u0430\u0440\u0441\u043a\u0438 "
         "''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you sure? 'M not sure I'll make "
         "it, 'D you like some tea? We'Ve a'lL")

# sha256(str(tokenizer.encode(PROBE))) -> llama.cpp's pre-tokenizer name (the reference model it was measured on),
# from convert_hf_to_gguf.py's table: the byte-level tokenizers of models people run as Llama-architecture GGUFs.
PRE_TOKENIZERS = {
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # SmolLM-135M (SmolLM2 too)
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Meta-Llama-3-8B
    "c136ed14d01c2745d4f60a9596ae66800e2b61fa45643e72436041855ad4089d": "smaug-bpe",  # Smaug-Llama-3-70B
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",  # openai-community/gpt2
    "0fe1cf6eda062318a1af7270f3331a85c539a01778ff948e24388e949c5282f4": "gpt-2",  # ruGPT3XL
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",  # Qwen1.5-7B
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",  # Qwen3-Embedding-0.6B
    "b3f499bb4255f8ca19fccd664443283318f2fd2414d5e0b040fbdd0cc195d6c5": "deepseek-r1-qwen",  # R1-Distill-Qwen
    "049ecf7629871e3041641907f3de7c733e4dbfdc736f57d882ba0b0845599754": "deepseek-llm",  # deepseek-llm-7b-base
    "347715f544604f9118bb75ed199f68779f423cabb20db6de6f31b908d04d7821": "deepseek-coder",  # deepseek-coder-6.7b
    "9d032fcbd5501f4a38150912590928bfb36091efb5df11b8e2124b0390e3fb1e": "falcon3",  # Falcon3-7B-Base
    "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": "tekken",  # Mistral-Nemo-Base-2407
    "d4c8f286ea6b520b3d495c4455483cfa2302c0cfcd4be05d781b6a8a0a7cdaf1": "megrez",  # Megrez-3B-Instruct
    "1994ffd01900cfb37395608534236ecd63f2bd5995d6cb1004dda1af50240f15": "trillion",  # Trillion-7B-preview
    "d5f1dd6f980fec569fb218a81a7658ac45fc56b38c5a0adeb1c232fbe04ef5ec": "seed-coder",  # Seed-Coder-8B-Base
    "f6791d196f87ce6b56a7d234be618e0d58f8cda3549416635b2bebcd22cd95c4": "midm-2.0",  # Midm-2.0-Base-Instruct
    "ccc2ef013c104be7bae2965776d611e1d7a8a2a9c547dd93a682c9a9fc80352e": "gpt-4o",  # Xenova/gpt-4o
}


def special_vocab(folder: str, **kw):
    """gguf.SpecialVocab, its log quiet: it warns through `logging` about post-processor templates it half
    understands (stories260K's pair template), which is noise in kbit's output; what it found is in the notes."""
    import gguf  # a runtime dependency; imported late (slow to import)

    log = logging.getLogger("gguf.vocab")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        return gguf.SpecialVocab(folder, **kw)
    finally:
        log.setLevel(level)


def kind(tj: dict) -> str | None:
    """'llama' (SentencePiece-style BPE with byte fallback), 'gpt2' (byte-level BPE) or None (not written)."""
    model = tj.get("model") or {}
    if model.get("type") != "BPE":
        return None
    if model.get("byte_fallback"):
        return "llama"
    parts = [tj.get("pre_tokenizer") or {}, tj.get("decoder") or {}]
    parts += [p for part in list(parts) for p in part.get("pretokenizers", part.get("decoders", [])) or []]
    return "gpt2" if any(p.get("type") == "ByteLevel" for p in parts) else None


def load_tokenizer(folder: str, where: str, fix: str):
    """transformers' tokenizer of folder; one it cannot load is a one-line bad input naming `where` and `fix`."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder)
    except Exception as e:  # noqa: BLE001 (transformers/tokenizers raise many types on a damaged file)
        why = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
        raise bad_input(f"{where}: transformers cannot load this tokenizer ({why}); {fix}") from None


def token_list(tok, n_vocab: int, where: str) -> tuple[list[str], list[int]]:
    """(tokens, token types) by id, as llama.cpp's converter lists them: unused ids padded `[PADi]`, added tokens
    CONTROL (special) or USER_DEFINED (normalized as llama.cpp matches them), the rest NORMAL."""
    by_id = {i: t for t, i in tok.get_vocab().items()}
    if max(by_id) >= n_vocab:
        raise bad_input(f"{where}: token id {max(by_id)} is past the model's vocab_size {n_vocab} (config.json); the "
                        "tokenizer does not belong to this model")
    added, decoder = tok.get_added_vocab(), tok.added_tokens_decoder
    tokens, types = [], []
    for i in range(n_vocab):
        token = by_id.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(UNUSED)
            continue
        t = NORMAL
        if token in added:
            if not decoder[i].normalized:  # llama.cpp matches added tokens on normalized text
                token = tok.decode(tok.encode(token, add_special_tokens=False))
            if decoder[i].special or looks_special(token):
                t = CONTROL
            else:
                t, token = USER_DEFINED, token.replace("\u2581", " ")
        tokens.append(token)
        types.append(t)
    return tokens, types


def vocab(folder: str, config: dict, n_vocab: int) -> dict | None:
    """What write() puts in the file, or None when the folder has no tokenizer kbit writes (see the docstring)."""
    path = os.path.join(folder, "tokenizer.json")
    tj = read_json(path, what="a tokenizer.json object")
    if tj is None:
        return None
    what = kind(tj)
    if what is None:
        return None
    # read (and checked) before SpecialVocab and transformers read it too, with no error a user could act on
    tc = read_json(os.path.join(folder, "tokenizer_config.json")) or {}
    voc = sentencepiece(tj, config, n_vocab) if what == "llama" else byte_level(folder, path, n_vocab)
    voc["chat_template"] = special_vocab(folder).chat_template  # tokenizer_config.json or chat_template.jinja
    voc["add_space_prefix"] = tc.get("add_prefix_space") if isinstance(tc.get("add_prefix_space"), bool) else None
    return voc


def sentencepiece(tj: dict, config: dict, n_vocab: int) -> dict:
    """tokens / scores / types as llama.cpp's 'llama' tokenizer wants them. SentencePiece lists pieces in score
    order, so a normal piece's score is minus its rank among normal pieces (what tokenizer.model stores);
    control/byte/unknown pieces score 0. Rows of the embedding past the tokenizer's end get [PADn] tokens of type
    UNUSED, as convert_hf_to_gguf.py writes them."""
    model = tj["model"]
    by_id = {i: t for t, i in model["vocab"].items()}
    for a in tj.get("added_tokens", []):
        by_id[a["id"]] = a["content"]
    special = {a["id"] for a in tj.get("added_tokens", []) if a.get("special")}
    n = max(max(by_id) + 1, n_vocab)
    tokens, scores, types, rank = [], [], [], 0
    for i in range(n):
        tok = by_id.get(i, f"[PAD{i}]")
        if i not in by_id:
            t, score = UNUSED, 0.0
        elif tok == model.get("unk_token"):
            t, score = UNKNOWN, 0.0
        elif i in special:
            t, score = CONTROL, 0.0
        elif len(tok) == 6 and tok.startswith("<0x") and tok.endswith(">"):
            t, score = BYTE, 0.0
        else:
            t, score, rank = NORMAL, -float(rank), rank + 1
        tokens.append(tok)
        scores.append(score)
        types.append(t)
    post = json.dumps(tj.get("post_processor") or {})
    ids = {k: config.get(f"{k}_token_id") for k in ("bos", "eos", "pad")}
    ids = {k: (v[0] if isinstance(v, list) and v else v) for k, v in ids.items()}  # some configs list several eos
    ids["unk"] = model["vocab"].get(model.get("unk_token")) if model.get("unk_token") else None
    add_bos = ids["bos"] is not None and by_id.get(ids["bos"], "\0") in post
    return {"model": "llama", "pre": "default", "tokens": tokens, "scores": scores, "types": types, "merges": None,
            "ids": {k: v for k, v in ids.items() if v is not None}, "add_bos": add_bos, "add_eos": False}


def probe_hash(tok) -> str:
    return hashlib.sha256(str(tok.encode(PROBE)).encode()).hexdigest()


def looks_special(token: str) -> bool:
    """Added tokens convert_hf_to_gguf.py marks control even when tokenizer.json does not say special."""
    return (token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]") or (token.startswith("<|") and token.endswith("|>"))
            or (token.startswith("<\uff5c") and token.endswith("\uff5c>"))
            or (token.startswith("<unused") and token.endswith(">")))


def byte_level(folder: str, path: str, n_vocab: int) -> dict:
    """tokens, types and merges of a byte-level BPE tokenizer, with its llama.cpp pre-tokenizer name; special ids,
    merges and the add_bos/add_eos flags through the gguf package's SpecialVocab (what convert_hf_to_gguf.py
    uses), the flags then set to what the tokenizer does (it is asked), so llama.cpp adds what transformers adds."""
    tok = load_tokenizer(folder, path, "fix tokenizer.json / tokenizer_config.json or remove them")
    digest = probe_hash(tok)
    pre = PRE_TOKENIZERS.get(digest)
    if pre is None:
        known = ", ".join(sorted(set(PRE_TOKENIZERS.values())))
        raise bad_input(f"{path}: a byte-level BPE tokenizer whose pre-tokenizer llama.cpp's converter does not "
                        f"know (probe sha256 {digest[:16]}...; kbit knows {known}), and a guessed name could make "
                        "llama.cpp split text unlike transformers; convert this model with llama.cpp's "
                        "convert_hf_to_gguf.py (after adding its tokenizer to convert_hf_to_gguf_update.py), or use "
                        "--format bnb or compressed-tensors")
    tokens, types = token_list(tok, n_vocab, path)
    special = special_vocab(folder, load_merges=True, n_vocab=n_vocab)
    if not special.merges:
        raise bad_input(f"{path}: a byte-level BPE tokenizer without merges; re-save it with transformers")
    ids = dict(special.special_token_ids)
    with_special, plain = tok.encode("a b"), tok.encode("a b", add_special_tokens=False)
    add_bos = "bos" in ids and with_special[:1] == [ids["bos"]] and plain[:1] != [ids["bos"]]
    add_eos = "eos" in ids and with_special[-1:] == [ids["eos"]] and plain[-1:] != [ids["eos"]]
    return {"model": "gpt2", "pre": pre, "tokens": tokens, "scores": None, "types": types, "merges": special.merges,
            "ids": ids, "add_bos": add_bos, "add_eos": add_eos, "probe_sha256": digest}


def describe(voc: dict | None) -> str:
    """One line for the export's notes."""
    if voc is None:
        return ("no SentencePiece-style or byte-level BPE tokenizer.json found: the GGUF carries no tokenizer, "
                "which llama.cpp needs to load it (kbit and transformers read the weights without one)")
    n_control = voc["types"].count(CONTROL)
    merges = f", {len(voc['merges'])} merges" if voc["merges"] else ""
    pre = ""
    if voc["model"] == "gpt2":
        pre = f", pre-tokenizer {voc['pre']!r} (probe sha256 {voc['probe_sha256'][:12]}...)"
    template = ", chat template" if voc["chat_template"] else ""
    return (f"tokenizer: {voc['model']!r}{pre}, {len(voc['tokens'])} tokens ({n_control} control){merges}, "
            f"add_bos {str(voc['add_bos']).lower()}{template}")


def write(w, voc: dict) -> None:
    """voc's tokenizer.ggml.* keys into a GGUFWriter."""
    w.add_tokenizer_model(voc["model"])
    w.add_tokenizer_pre(voc["pre"])
    w.add_token_list(voc["tokens"])
    if voc["scores"] is not None:
        w.add_token_scores(voc["scores"])
    w.add_token_types(voc["types"])
    if voc["merges"]:
        w.add_token_merges(voc["merges"])
    for key, tid in voc["ids"].items():
        add = getattr(w, f"add_{key}_token_id", None)  # SpecialVocab may also find sep/cls/mask
        if add is not None:
            add(int(tid))
    w.add_add_bos_token(voc["add_bos"])
    w.add_add_eos_token(voc["add_eos"])
    if voc["add_space_prefix"] is not None:  # written only when tokenizer_config.json says, as the converter does
        w.add_add_space_prefix(voc["add_space_prefix"])
    if voc["chat_template"]:
        w.add_chat_template(voc["chat_template"])
