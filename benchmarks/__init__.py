"""The benchmark of our chapter-7 code against Hugging Face transformers (see bench.py).

Importing this package puts the repository root and main/ on ``sys.path``, so that its
modules can import ``previous_chapters``, ``engine`` and the chapter's modules however the
benchmark is started (``python benchmarks/bench.py``, ``python -m benchmarks.bench``, pytest).
"""

import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
for _path in (str(REPO_ROOT / "main"), str(REPO_ROOT)):
    if _path not in sys.path:
        sys.path.insert(0, _path)
