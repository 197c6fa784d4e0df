"""`make mutation` (tools/mutation.py): the work copy mutmut runs in, how its results become the
score per module, and the equivalent mutants that docs/reliability.md lists. The mutation run
itself lives outside the suite (it runs the guard tests once per mutant)."""

import importlib.util
import os
import subprocess

import pytest
from tiny import ROOT

spec = importlib.util.spec_from_file_location(
    "mutation", os.path.join(ROOT, "tools", "mutation.py")
)
mutation = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mutation)

RESULTS = """\
    maskd.utils.files.x_open_regular__mutmut_1: killed
    maskd.utils.files.x_open_regular__mutmut_2: survived
    maskd.utils.files.x_open_regular__mutmut_3: timeout
    maskd.utils.files.x__kind__mutmut_1: no tests
    maskd.checkpoint.loading.x_read__mutmut_1: killed
    maskd.checkpoint.loading.x_read__mutmut_2: not checked
    maskd._compat.xǁSafeLoadingCheckpointerǁ_load_file__mutmut_1: survived
"""

DOC = """\
# Reliability

## Mutants judged equivalent

| mutant | why it behaves as the original |
|---|---|
| `maskd.utils.files.x_open_regular__mutmut_2` | the flag is set again two lines below |
| `maskd.utils.files.x_gone__mutmut_9` | a function since removed |

## Next section

| `maskd._compat.xǁSafeLoadingCheckpointerǁ_load_file__mutmut_1` | not in the section |
"""


def test_results_become_the_score_per_module_with_equivalents_left_out():
    results = mutation.parse_results(RESULTS)
    assert len(results) == 7
    assert results["maskd._compat.xǁSafeLoadingCheckpointerǁ_load_file__mutmut_1"] == "survived"
    equivalent = mutation.parse_equivalent(DOC)
    # only the rows of its own section
    assert set(equivalent) == {
        "maskd.utils.files.x_open_regular__mutmut_2",
        "maskd.utils.files.x_gone__mutmut_9",
    }
    modules = ["maskd.utils.files", "maskd.checkpoint.loading", "maskd._compat"]
    rows, total = mutation.summarise(results, equivalent, modules)
    files, loading, compat = rows
    # killed 1 + timeout 1; the equivalent survivor left out; "no tests" is a survivor
    assert (files["mutants"], files["killed"], files["equivalent"], files["no tests"]) == (
        4,
        2,
        1,
        1,
    )
    assert files["score"] == pytest.approx(2 / 3)
    assert (loading["killed"], loading["other"], loading["score"]) == (1, 1, 0.5)
    assert compat["survived"] == 1 and compat["score"] == 0
    assert total["mutants"] == 7 and total["score"] == pytest.approx(3 / 6)
    assert mutation.goals_met(rows, total) == [
        "maskd.utils.files: 66.7% < 85%",
        "maskd.checkpoint.loading: 50.0% < 85%",
        "maskd._compat: 0.0% < 85%",
        "total: 50.0% < 90%",
    ]
    text = mutation.table(rows, total)
    assert "| maskd.utils.files | 4 | 2 | 0 | 1 | 1 | 0 | 66.7% |" in text
    assert text.splitlines()[-1] == "| total | 7 | 3 | 1 | 1 | 1 | 1 | 50.0% |"


def test_the_goals_are_met_at_90_percent_overall_and_85_in_each_module():
    results = {f"maskd.utils.files.x_f__mutmut_{i}": "killed" for i in range(17)}
    results.update({f"maskd.utils.files.x_f__mutmut_{i}": "survived" for i in (17, 18, 19)})
    rows, total = mutation.summarise(results, {}, ["maskd.utils.files"])
    assert rows[0]["score"] == 0.85 and mutation.goals_met(rows, total) == ["total: 85.0% < 90%"]
    equivalent = {
        "maskd.utils.files.x_f__mutmut_19": "same",
        "maskd.utils.files.x_f__mutmut_18": "",
    }
    rows, total = mutation.summarise(results, equivalent, ["maskd.utils.files"])
    assert total["score"] == pytest.approx(17 / 18) and mutation.goals_met(rows, total) == []


def test_a_mutant_belongs_to_the_longest_module_that_names_it():
    modules = ["maskd.checkpoint", "maskd.checkpoint.loading"]
    assert mutation.module_of("maskd.checkpoint.loading.x_f__mutmut_1", modules) == modules[1]
    assert mutation.module_of("maskd.checkpoint.x_f__mutmut_1", modules) == modules[0]
    assert mutation.module_of("maskd.checkpoint_other.x_f__mutmut_1", modules) is None


def test_every_guard_module_and_test_file_exists():
    for module in mutation.MODULES:
        rel = mutation.module_file(module).replace("src", os.path.join("projects", "MasKD"), 1)
        assert os.path.isfile(os.path.join(ROOT, rel)), module
    for test in mutation.TESTS:
        assert os.path.isfile(os.path.join(ROOT, test)), test


def test_the_work_copy_holds_the_package_where_mutmut_imports_it(tmp_path):
    if subprocess.run(["git", "-C", ROOT, "rev-parse"], capture_output=True).returncode:
        pytest.skip("not a git checkout")
    work = tmp_path / "work"
    (work / "stale").mkdir(parents=True)  # an earlier run's copy is replaced
    mutation.stage(ROOT, str(work), ["maskd.utils.files"], mutation.TESTS[:1])
    assert not (work / "stale").exists()
    assert (work / "src" / "maskd" / "utils" / "files.py").is_file()
    assert not (work / "projects" / "MasKD" / "maskd").exists()
    # the model zoo's link to the configs points at the copy's configs
    zoo = work / "src" / "maskd" / "model_zoo" / "configs"
    assert zoo.is_symlink() and zoo.resolve() == (work / "configs").resolve()
    assert (work / "tests" / "conftest.py").is_file()
    text = (work / "pyproject.toml").read_text()
    settings = text.split("[tool.mutmut]", 1)[1]
    assert 'only_mutate = ["src/maskd/utils/files.py"]' in settings
    assert '"-m", "not slow", "tests/test_guards.py"]' in settings
    assert 'process_isolation = "forkserver"' in settings
    import tomllib

    assert tomllib.loads(text)["tool"]["mutmut"]["source_paths"] == ["src/maskd"]


def test_the_equivalent_mutants_of_the_docs_are_read_each_with_its_reason():
    with open(os.path.join(ROOT, "docs", "reliability.md")) as f:
        equivalent = mutation.parse_equivalent(f.read())
    assert equivalent, "docs/reliability.md lists no equivalent mutant"
    for name, reason in equivalent.items():
        assert mutation.module_of(name, mutation.MODULES), name
        assert len(reason) > 20, name
