"""`make demo QUICK=1`: the whole pipeline (data, teacher, tokens, baseline and MasKD students,
evaluation, report) runs; the test checks that the files and numbers exist, not accuracy."""

import json
import os
import re

import pytest
from tiny import ROOT, run


def test_quick_demo_writes_the_report(tmp_path):
    out = tmp_path / "demo"
    run(
        [os.path.join(ROOT, "tools", "demo.py"), "--quick", "--output", str(out)]
        + ["--data-root", str(tmp_path / "data")],
        tmp_path,
    )
    report = (out / "report.md").read_text()
    for row in ("teacher (R34-FPN)", "masked teacher", "baseline student", "MasKD student"):
        line = next(line for line in report.splitlines() if line.startswith(f"| {row}"))
        cells = [c.strip() for c in line.strip("|").split("|")][1:4]
        assert all(re.fullmatch(r"\d+\.\d\d|n/a", c) for c in cells), line
    assert "Goals:" in report and "| total |" in report
    results = json.loads((out / "results.json").read_text())
    # the shipped recipe: masked feature loss plus RoI box-regression KD, named in the report
    assert results["results"]["distillation losses"] == ["loss_maskd", "loss_roi_reg_kd"]
    assert "`loss_maskd`, `loss_roi_reg_kd`" in report
    assert set(results["times"]) == {"teacher", "tokens", "student_seed0", "maskd_seed0"}
    for key in ("teacher", "masked teacher"):
        assert set(results["results"][key]) == {"AP", "AP50", "AP75"}
        assert all(isinstance(v, float) for v in results["results"][key].values())
    for seed in results["results"]["seeds"].values():
        for kind in ("baseline", "maskd"):
            assert all(v is None or isinstance(v, float) for v in seed[kind].values())
    assert (out / "loss_curves.png").stat().st_size > 0
    assert len(os.listdir(out / "masks")) == 2


def test_report_reads_the_last_evaluation_and_names_missing_ones(tmp_path):
    from maskd import demo

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    records = [
        {"iteration": 0, "total_loss": 2.0, "loss_cls": 1.5, "loss_maskd": 0.5},
        {"iteration": 9, "bbox/AP": 1.0, "bbox/AP50": 2.0, "bbox/AP75": 0.5},
        {"iteration": 19, "total_loss": 1.0, "loss_cls": 0.7, "loss_roi_reg_kd": 0.3},
        {"iteration": 19, "bbox/AP": 3.0, "bbox/AP50": 6.0, "bbox/AP75": 1.5},
    ]
    (run_dir / "metrics.json").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    assert demo._final_metrics(str(run_dir)) == {"AP": 3.0, "AP50": 6.0, "AP75": 1.5}
    assert demo._loss_keys(str(run_dir)) == {"loss_cls", "loss_maskd", "loss_roi_reg_kd"}
    assert demo._curve(str(run_dir), "total_loss") == ([0, 19], [2.0, 1.0])

    (run_dir / "metrics.json").write_text(json.dumps(records[0]) + "\n")
    with pytest.raises(RuntimeError, match=r"no bbox evaluation in .*metrics\.json"):
        demo._final_metrics(str(run_dir))


def test_report_marks_a_model_without_detections_and_writes_strict_json(tmp_path):
    from maskd import demo

    nan = float("nan")
    results = {
        "distillation losses": ["loss_maskd"],
        "maskd overrides": [],
        "teacher": {"AP": 8.0, "AP50": 16.0, "AP75": 6.0},
        "masked teacher": {"AP": 7.5, "AP50": 15.0, "AP75": 5.5},
        "seeds": {
            0: {
                "baseline": {"AP": nan, "AP50": nan, "AP75": nan},
                "maskd": {"AP": 2.0, "AP50": 5.0, "AP75": 0.5},
            }
        },
    }
    path = demo._report(str(tmp_path), results, {"teacher": 1.0}, 0.0, 1.0, True, demo.QUICK)
    report = open(path).read()
    assert not re.search(r"\bnan\b", report)  # Python's rendering of NaN
    assert "| baseline student (R18-FPN) | n/a | n/a | n/a | n/a |" in report
    assert "| teacher (R34-FPN) | 8.00 | 16.00 | 6.00 | n/a |" in report
    assert "n/a: no detections above the test score threshold" in report
    assert "seed 0: baseline n/a, MasKD 2.00 (n/a)" in report
    assert report.count("NOT reached (undefined: no detections from the baseline student)") == 2

    safe = demo._json_safe({"results": results, "times": [1.5]})
    assert safe["results"]["seeds"][0]["baseline"] == {"AP": None, "AP50": None, "AP75": None}
    assert safe["results"]["teacher"]["AP"] == 8.0 and safe["times"] == [1.5]
    json.dumps(safe, allow_nan=False)  # raises ValueError if any NaN is left
