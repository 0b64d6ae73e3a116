"""Make the repository's flat modules importable from tests/ (run: python -m pytest -q tests)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
