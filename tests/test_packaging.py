"""What ``pip install .`` installs: the library only (no demo, data generator or test
references), and every module it imports is declared in pyproject.toml (detectron2 aside: it
is not on PyPI and is installed as the README says). The install goes into an empty target
folder, offline, with the environment's setuptools. And the docs cite only tests that exist."""

import ast
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
from tiny import ROOT

# Import name -> distribution name, where they differ.
DISTRIBUTIONS = {"yaml": "pyyaml", "cv2": "opencv-python-headless", "PIL": "pillow"}
NOT_ON_PYPI = {"detectron2"}
# the shipped configs (package data of maskd.model_zoo, .py LazyConfigs among them)
CONFIGS_IN_PACKAGE = "maskd/model_zoo/configs/"


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """{relative path: text} of the .py files ``pip install .`` puts into an empty folder,
    from a copy of the project's packaging files (the checkout stays clean), and the folder."""
    tmp = tmp_path_factory.mktemp("install")
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(os.path.join(ROOT, name), src / name)
    for folder in ("projects", "demo", "tests", "tools"):  # all there, only the package goes in
        shutil.copytree(
            os.path.join(ROOT, folder), src / folder, ignore=shutil.ignore_patterns("*.pyc")
        )
    target = tmp / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation"]
        + ["--no-index", "--no-compile", "--target", str(target), str(src)],
        check=True,
        capture_output=True,
    )
    files = {}
    for folder, _, names in os.walk(target):
        for name in names:
            path = os.path.relpath(os.path.join(folder, name), target).replace(os.sep, "/")
            if path.endswith(".py") and not path.startswith(CONFIGS_IN_PACKAGE):
                with open(os.path.join(folder, name)) as f:
                    files[path] = f.read()
    return files, target


def _declared():
    with open(os.path.join(ROOT, "pyproject.toml")) as f:
        text = f.read()
    deps = re.search(r"^dependencies = \[(.*?)\]", text, re.M | re.S).group(1)
    return {re.split(r"[<>=!~ ;\[]", d.strip().strip('"'))[0].lower() for d in deps.split(",")}


def test_the_install_holds_the_library_only(installed):
    files, target = installed
    top = sorted(p for p in os.listdir(target) if not p.endswith(".dist-info"))
    assert top == ["maskd"], top  # no demo/, tests/ or tools/ package beside it
    modules = sorted(files)
    assert "maskd/modeling/head_kd/roi_regression.py" in modules  # subpackages are included
    for gone in ("demo", "synthetic", "shapes", "run_demo", "report"):
        assert not any(os.path.basename(n) == f"{gone}.py" for n in modules), gone
    # the package tree in the checkout is exactly what is installed
    here = os.path.join(ROOT, "projects", "MasKD")
    tree = sorted(
        os.path.relpath(os.path.join(d, f), here).replace(os.sep, "/")
        for d, _, names in os.walk(os.path.join(here, "maskd"))  # not into the configs link
        for f in names
        if f.endswith(".py")
    )
    assert modules == tree


def _shipped_configs():
    root = os.path.join(ROOT, "configs")
    return sorted(
        os.path.relpath(os.path.join(d, f), root).replace(os.sep, "/")
        for d, _, names in os.walk(root)
        for f in names
        if f.endswith((".yaml", ".py"))
    )


INSTALLED_ZOO = """
import json, sys
import maskd
from maskd import model_zoo
from detectron2.modeling import build_model

site = sys.argv[1]
assert maskd.__file__.startswith(site), maskd.__file__  # the installed package, not the checkout
names = model_zoo.list_configs()
assert all(model_zoo.get_config_file(n).startswith(site) for n in names)
name = "COCO-Detection/maskd_faster_rcnn_R_101-faster_rcnn_R_50_FPN_2x_coco"
off = ["MODEL.DEVICE", "cpu", "MODEL.MASKD.TEACHER.WEIGHTS", "", "MODEL.MASKD.TOKENS_WEIGHTS", ""]
off += ["MODEL.MASKD.TEACHER.ALLOW_RANDOM_INIT", "True", "MODEL.MASKD.ALLOW_RANDOM_TOKENS", "True"]
model = build_model(model_zoo.get_config(name + ".yaml", off))
lazy = model_zoo.get_config(name + ".py")
try:
    model_zoo.get_config_file("COCO-Detection/no_such_config.yaml")
    missing = None
except RuntimeError as e:
    missing = str(e)
print(json.dumps({"names": names, "model": type(model).__name__, "lazy": lazy.model._target_.__name__,
                  "teacher": type(model.teacher).__name__, "missing": missing}))
"""


def test_configs_by_name_from_the_installed_package(installed, tmp_path):
    _, target = installed
    out = subprocess.run(
        [sys.executable, "-c", INSTALLED_ZOO, str(target)],
        cwd=tmp_path,  # no repository around
        env=dict(os.environ, PYTHONPATH=str(target)),
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    found = json.loads(out.stdout.strip().splitlines()[-1])
    assert found["names"] == _shipped_configs()  # every config of configs/, by its name
    assert found["model"] == "MasKD" and found["teacher"] == "GeneralizedRCNN"
    assert found["lazy"] == "MasKD"
    assert "no_such_config.yaml" in found["missing"]


def test_every_import_of_the_package_is_declared(installed):
    files, _ = installed
    imported = set()
    for text in files.values():
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.Import):
                imported |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                imported.add(node.module.split(".")[0])
    third_party = imported - set(sys.stdlib_module_names) - {"maskd"}
    assert "cv2" not in third_party  # the shapes generator left with the demo
    needed = {DISTRIBUTIONS.get(m, m).lower() for m in third_party - NOT_ON_PYPI}
    assert needed <= _declared(), needed - _declared()
    assert third_party & NOT_ON_PYPI == {"detectron2"}


def test_every_test_the_docs_cite_exists():
    """A guarantee in the docs cites the tests that hold it: each cited test (a name, a
    ``tests/test_x.py::name`` or a ``test_*_errors`` pattern) and test file must exist."""
    import fnmatch

    files, by_file = set(os.listdir(os.path.join(ROOT, "tests"))), {}
    for name in files:
        if name.endswith(".py"):
            with open(os.path.join(ROOT, "tests", name)) as f:
                tree = ast.parse(f.read())
            by_file[name] = {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}
    defined = set().union(*by_file.values())
    docs = [os.path.join(ROOT, "docs", n) for n in os.listdir(os.path.join(ROOT, "docs"))]
    cited = 0
    for path in docs + [os.path.join(ROOT, "README.md"), os.path.join(ROOT, "MODEL_ZOO.md")]:
        if not path.endswith(".md"):
            continue
        with open(path) as f:
            text = f.read()
        for file in re.findall(r"tests/(test_[a-z0-9_]+\.py)", text):
            assert file in files, f"{os.path.basename(path)} cites tests/{file}, which is not there"
        for file, name in re.findall(r"tests/(test_[a-z0-9_]+\.py)::(test_[a-z0-9_*]+)", text):
            where = f"{os.path.basename(path)} cites tests/{file}::{name}"
            assert fnmatch.filter(by_file[file], name), where
        for name in re.findall(r"(?<![a-z0-9_/.])(test_[a-z0-9_*]+)(?![a-z0-9_*.])", text):
            cited += 1
            assert fnmatch.filter(defined, name), f"{os.path.basename(path)} cites {name}"
    assert cited > 20  # the guarantees table cites its tests
