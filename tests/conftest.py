import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
# tests/tiny.py and friends are helpers, importable by the test modules; and the tests always
# exercise this checkout's package, whichever clone the shared environment was installed from.
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "projects", "MasKD"))
