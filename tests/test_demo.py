"""`make demo QUICK=1`: the whole pipeline (data, teacher, tokens, baseline and MasKD students,
evaluation, report) runs; the test checks that the files and numbers exist, not accuracy."""

import json
import os
import re

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
        assert all(re.fullmatch(r"\d+\.\d\d|nan", c) for c in cells), line
    assert "Goals:" in report and "| total |" in report
    results = json.loads((out / "results.json").read_text())
    # the shipped recipe: masked feature loss plus RoI box-regression KD, named in the report
    assert results["results"]["distillation losses"] == ["loss_maskd", "loss_roi_reg_kd"]
    assert "`loss_maskd`, `loss_roi_reg_kd`" in report
    assert set(results["times"]) == {"teacher", "tokens", "student_seed0", "maskd_seed0"}
    for key in ("teacher", "masked teacher"):
        assert set(results["results"][key]) == {"AP", "AP50", "AP75"}
        assert all(isinstance(v, float) for v in results["results"][key].values())
    assert (out / "loss_curves.png").stat().st_size > 0
    assert len(os.listdir(out / "masks")) == 2
