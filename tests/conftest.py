"""Makes the repository root importable however pytest is invoked (``pytest tests`` or
``python -m pytest``), so tests import ``specjax`` / ``models`` from this checkout."""

import os
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)
