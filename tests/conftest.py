"""Make the test helpers (tests/_fixtures.py, tests/_subprocess.py, ...) importable from every test folder."""

import sys
from pathlib import Path

TESTS = str(Path(__file__).parent)
if TESTS not in sys.path:
    sys.path.insert(0, TESTS)
