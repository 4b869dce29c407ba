import sys
from pathlib import Path

# Tests import their fixtures as `tests.fixtures...` and the package from src/ even when
# it is not installed (an installed copy takes precedence through site-packages order).
ROOT = Path(__file__).resolve().parent.parent
for path in (ROOT, ROOT / "src"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import tests.fixtures.oracle  # noqa: E402,F401  (puts the moshi oracle's .oracle/ on sys.path)
from tests.fixtures.engine import engine, tiny_folder  # noqa: E402,F401  (shared fixtures)
