"""What ``pip install .`` installs: the library only (no demo, data generator or test
references), and every module it imports is declared in pyproject.toml (detectron2 aside: it
is not on PyPI and is installed as the README says)."""

import ast
import os
import re
import shutil
import subprocess
import sys
import zipfile

import pytest
from tiny import ROOT

# Import name -> distribution name, where they differ.
DISTRIBUTIONS = {"yaml": "pyyaml", "cv2": "opencv-python-headless", "PIL": "pillow"}
NOT_ON_PYPI = {"detectron2"}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """The wheel pip builds from a copy of the project's packaging files (the checkout stays
    clean); offline, with the environment's setuptools."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(os.path.join(ROOT, name), src / name)
    shutil.copytree(
        os.path.join(ROOT, "projects"), src / "projects", ignore=shutil.ignore_patterns("*.pyc")
    )
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index"]
        + ["-w", str(tmp / "dist"), str(src)],
        check=True,
        capture_output=True,
    )
    (path,) = (tmp / "dist").glob("*.whl")
    return path


def _declared():
    with open(os.path.join(ROOT, "pyproject.toml")) as f:
        text = f.read()
    deps = re.search(r"^dependencies = \[(.*?)\]", text, re.M | re.S).group(1)
    return {re.split(r"[<>=!~ ;\[]", d.strip().strip('"'))[0].lower() for d in deps.split(",")}


def test_the_wheel_holds_the_library_only(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    modules = sorted(n for n in names if n.endswith(".py"))
    assert modules and all(n.startswith("maskd/") for n in modules), modules
    assert "maskd/head_kd/roi_regression.py" in modules  # subpackages are included
    for gone in ("demo", "synthetic", "shapes", "naive", "run_demo", "report"):
        assert not any(os.path.basename(n) == f"{gone}.py" for n in modules), gone
    # the package tree in the checkout is exactly what the wheel holds
    here = os.path.join(ROOT, "projects", "MasKD")
    tree = sorted(
        os.path.relpath(os.path.join(d, f), here).replace(os.sep, "/")
        for d, _, files in os.walk(os.path.join(here, "maskd"))
        for f in files
        if f.endswith(".py")
    )
    assert modules == tree


def test_every_import_of_the_package_is_declared(wheel):
    imported = set()
    with zipfile.ZipFile(wheel) as z:
        for name in z.namelist():
            if not name.endswith(".py"):
                continue
            for node in ast.walk(ast.parse(z.read(name))):
                if isinstance(node, ast.Import):
                    imported |= {a.name.split(".")[0] for a in node.names}
                elif isinstance(node, ast.ImportFrom) and node.level == 0:
                    imported.add(node.module.split(".")[0])
    third_party = imported - set(sys.stdlib_module_names) - {"maskd"}
    assert "cv2" not in third_party  # the shapes generator left with the demo
    needed = {DISTRIBUTIONS.get(m, m).lower() for m in third_party - NOT_ON_PYPI}
    assert needed <= _declared(), needed - _declared()
    assert third_party & NOT_ON_PYPI == {"detectron2"}
