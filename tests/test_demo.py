"""`make demo QUICK=1`: the whole pipeline (data, teachers, tokens, baseline and MasKD students,
evaluation, report) runs; the test checks that the files and numbers exist, not accuracy. The
report's arithmetic (deltas, spread, goals, retention) is checked on made-up results."""

import json
import math
import os
import re

import pytest
from tiny import ROOT, run

STATS = {"coverage", "constant", "dice", "weight_entropy", "combined"}
LEVELS = {"p2", "p3", "p4", "p5", "p6"}


def test_quick_demo_writes_the_report(tmp_path):
    out = tmp_path / "demo"
    run(
        [os.path.join(ROOT, "tools", "demo.py"), "--quick", "--output", str(out)]
        + ["--data-root", str(tmp_path / "data"), "--teacher-seeds", "2", "--token-seeds", "2"],
        tmp_path,
    )
    report = (out / "report.md").read_text()
    results = json.loads((out / "results.json").read_text())["results"]
    times = json.loads((out / "results.json").read_text())["times"]
    assert set(times) == {
        "student_seed0",
        "teacher_t0",
        "tokens_t0_seed0",
        "tokens_t0_seed1",
        "maskd_t0_seed0",
        "teacher_t1",
        "tokens_t1_seed0",
        "tokens_t1_seed1",
        "maskd_t1_seed0",
    }
    # the shipped recipe: masked feature loss plus RoI box-regression KD, named in the report
    assert results["distillation losses"] == ["loss_maskd", "loss_roi_reg_kd"]
    assert "`loss_maskd`, `loss_roi_reg_kd`" in report
    assert set(results["teachers"]) == {"0", "1"}
    for t, tr in results["teachers"].items():
        # The teachers train for 40 iterations: they detect something, so AP is a number.
        assert isinstance(tr["teacher"]["AP"], float), t
        line = next(
            ln
            for ln in report.splitlines()
            if ln.startswith(f"| teacher (R34-FPN), teacher seed {t} |")
        )
        assert re.fullmatch(r"\d+\.\d\d", line.split("|")[2].strip()), line
        assert set(tr["tokens"]) == {"0", "1"}
        for k, tok in tr["tokens"].items():
            masked = tok["masked teacher"]["AP"]
            if masked is not None and tr["teacher"]["AP"]:
                assert tok["retention"] == pytest.approx(masked / tr["teacher"]["AP"], rel=1e-6)
            retention_cell = "n/a" if tok["retention"] is None else f"{tok['retention']:.3f}"
            assert f"| {t} | {k} | {tr['teacher']['AP']:.2f} |" in report
            assert report.count(f" | {retention_cell} |") >= 1
            assert set(tok["token statistics"]) == LEVELS
            for level, st in tok["token statistics"].items():
                assert set(st) == STATS, level
                assert all(0.0 <= st[s] <= 1.0 for s in STATS - {"combined"}), st
        assert set(tr["maskd"]) == {"0"}
    for level in LEVELS:
        assert re.search(rf"^\| {level} \|( \d\.\d\d\d \|){{5}}$", report, re.M), level
    assert "## Goals" in report and "| total |" in report
    assert report.count("retention >= 0.95 for every stage-1 seed") == 2
    assert (out / "loss_curves.png").stat().st_size > 0
    masks = os.listdir(out / "masks")
    assert len([f for f in masks if f.endswith(".png")]) == 2 and "token_statistics.json" in masks


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
    with pytest.raises(RuntimeError, match=r"no retention in .*metrics\.json"):
        demo._retention(str(run_dir))
    with pytest.raises(RuntimeError, match=r"no token statistics in .*metrics\.json"):
        demo._token_statistics(str(run_dir))

    (run_dir / "metrics.json").write_text(json.dumps(records[0]) + "\n")
    with pytest.raises(RuntimeError, match=r"no bbox evaluation in .*metrics\.json"):
        demo._final_metrics(str(run_dir))


def test_report_reads_retention_and_token_statistics_of_stage1(tmp_path):
    from maskd import demo

    records = [
        {"iteration": 9, "[metric]tokens/p2/coverage": 0.1, "[metric]tokens/p2/constant": 0.5},
        {"iteration": 9, "bbox/AP": 6.0, "teacher/bbox/AP": 8.0, "retention/bbox/AP": 0.2},
        {"iteration": 19, "[metric]tokens/p2/coverage": 0.3, "[metric]tokens/p3/dice": 0.7},
        {"iteration": 19, "bbox/AP": 6.0, "teacher/bbox/AP": 8.0, "retention/bbox/AP": 0.75},
    ]
    (tmp_path / "metrics.json").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    assert demo._retention(str(tmp_path)) == 0.75
    assert demo._token_statistics(str(tmp_path)) == {"p2": {"coverage": 0.3}, "p3": {"dice": 0.7}}


def _results(teacher_aps, baseline, maskd, retentions):
    """Made-up demo results: teacher_aps[t], baseline[s], maskd[t][s], retentions[t][k]."""

    def m(ap):
        return {"AP": ap, "AP50": 2 * ap, "AP75": ap / 2}

    stats = {"p2": {k: 0.5 for k in STATS}}
    return {
        "distillation losses": ["loss_maskd"],
        "maskd overrides": [],
        "baseline": {s: m(ap) for s, ap in enumerate(baseline)},
        "teachers": {
            t: {
                "teacher": m(teacher_aps[t]),
                "tokens": {
                    k: {
                        "masked teacher": m(r * teacher_aps[t]),
                        "retention": r,
                        "token statistics": stats,
                    }
                    for k, r in enumerate(retentions[t])
                },
                "maskd": {s: m(ap) for s, ap in enumerate(maskd[t])},
            }
            for t in range(len(teacher_aps))
        },
    }


def test_report_deltas_spread_and_goals(tmp_path):
    from maskd import demo

    results = _results(
        teacher_aps=[10.0, 12.0],
        baseline=[3.0, 4.0, 5.0],
        maskd=[[5.0, 6.0, 6.5], [3.5, 3.0, 7.0]],  # teacher 1: mean +0.5, one seed -1.0
        retentions=[[1.0, 0.96, 0.99], [0.99, 0.94, 1.0]],
    )
    report = open(demo._report(str(tmp_path), results, {}, 0.0, 1.0, False, demo.DEFAULT)).read()
    # teacher 0: deltas +2.0, +2.0, +1.5 -> mean 1.833, sample sd 0.289
    assert (
        "| 0 | 10.00 | 4.00 | 5.83 | +1.83 ± 0.29 (+1.50 .. +2.00) | +2.00, +2.00, +1.50 |"
        in report
    )
    assert (
        "| 1 | 12.00 | 4.00 | 4.50 | +0.50 ± 1.50 (-1.00 .. +2.00) | +0.50, -1.00, +2.00 |"
        in report
    )
    goals = report[report.index("## Goals") :]
    assert (
        "teacher seed 0: MasKD - baseline student >= +1.0 AP (mean over student seeds): reached (+1.83)"
        in goals
    )
    assert (
        "teacher seed 1: MasKD - baseline student >= +1.0 AP (mean over student seeds): NOT reached (+0.50)"
        in goals
    )
    assert "teacher seed 0: MasKD > baseline on every seed: reached (smallest +1.50)" in goals
    assert "teacher seed 1: MasKD > baseline on every seed: NOT reached (smallest -1.00)" in goals
    assert "teacher seed 0: teacher - baseline student >= 5 AP: reached (+6.00)" in goals
    assert (
        "teacher seed 0: retention >= 0.95 for every stage-1 seed: reached (1.000, 0.960, 0.990)"
        in goals
    )
    assert (
        "teacher seed 1: retention >= 0.95 for every stage-1 seed: NOT reached (0.990, 0.940, 1.000)"
        in goals
    )
    assert "| 1 | 1 | 12.00 | 11.28 | 0.940 |" in report
    assert (
        "seed 1: baseline 4.00, MasKD (teacher 0) 6.00 (+2.00), MasKD (teacher 1) 3.00 (-1.00)"
        in report
    )


def test_report_marks_a_model_without_detections_and_writes_strict_json(tmp_path):
    from maskd import demo

    nan = float("nan")
    results = _results([8.0], [nan], [[2.0]], [[nan]])
    path = demo._report(str(tmp_path), results, {"teacher": 1.0}, 0.0, 1.0, True, demo.QUICK)
    report = open(path).read()
    assert not re.search(r"\bnan\b", report)  # Python's rendering of NaN
    assert "| baseline student (R18-FPN) | n/a | n/a | n/a | n/a |" in report
    assert "| teacher (R34-FPN) | 8.00 | 16.00 | 4.00 | n/a |" in report
    assert "n/a: no detections above the test score threshold" in report
    assert "seed 0: baseline n/a, MasKD 2.00 (n/a)" in report
    assert report.count("NOT reached (undefined: no detections from the baseline student)") == 2
    assert "retention >= 0.95 for every stage-1 seed: NOT reached (n/a)" in report

    safe = demo._json_safe({"results": results, "times": [1.5]})
    assert safe["results"]["baseline"][0] == {"AP": None, "AP50": None, "AP75": None}
    assert safe["results"]["teachers"][0]["teacher"]["AP"] == 8.0 and safe["times"] == [1.5]
    json.dumps(safe, allow_nan=False)  # raises ValueError if any NaN is left
    assert math.isnan(results["teachers"][0]["tokens"][0]["retention"])
