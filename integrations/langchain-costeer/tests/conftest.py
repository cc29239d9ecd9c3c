from __future__ import annotations

import sys
from pathlib import Path

# The SDK's own test helpers (a tiny trained tokenizer and random models).
sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "tests"))
