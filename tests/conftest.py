import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
# tests/tiny.py and friends are helpers, importable by the test modules; and the tests always
# exercise this checkout's package, whichever clone the shared environment was installed from.
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(ROOT, "projects", "MasKD"))
# The demo (demo/shapes.py, demo/report.py) lives outside the package, as detectron2 keeps its
# demo/ and tools/ outside detectron2/; train_net.py and distill_net.py are thin scripts at the
# root over maskd.cli.
sys.path.insert(0, os.path.join(ROOT, "demo"))
sys.path.insert(0, ROOT)
