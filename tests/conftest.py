import os
import sys

# tests/tiny.py and friends are helpers, importable by the test modules.
sys.path.insert(0, os.path.dirname(__file__))
