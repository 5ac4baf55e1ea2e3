"""Where the bundled assets live (inside the package, so an installed kbit has its embedded default)."""

from __future__ import annotations

import os

ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")
STORIES260K = os.path.join(ASSETS, "stories260K")
TINYSTORIES_TEXT = os.path.join(ASSETS, "text", "tinystories_v2_valid_first48k.txt")
