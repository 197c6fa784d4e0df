"""`make demo QUICK=1`: the whole demo (data, teachers, distill_net.py pipelines, baseline
students, report) runs; the test checks that every number of the report is the one its runs
produced (not accuracy). The report's arithmetic (deltas, spread, goals, retention) is checked
on made-up results, and the demo's configs against the shipped ones."""

import json
import math
import os
import re
import sys

import pytest
from tiny import ROOT, run

from maskd.config import get_maskd_cfg

STATS = {"coverage", "constant", "dice", "weight_entropy", "combined", "tokens_eff"}
STATS |= {"weighted_dice", "gt_share", "gt_share_uniform"}  # every demo image has boxes
SOURCES = ["tokens", "uniform", "gt_partition"]
LEVELS = {"p2", "p3", "p4", "p5", "p6"}


def _cell(value, signed=False):
    """How the report writes a number of results.json (None: undefined AP)."""
    if value is None:
        return "n/a"
    return f"{value:+.2f}" if signed else f"{value:.2f}"


def _row(report, name):
    """The cells of the report's table row whose first cell is ``name``."""
    line = next(ln for ln in report.splitlines() if ln.startswith(f"| {name} |"))
    return [c.strip() for c in line.strip("|").split("|")][1:]


@pytest.mark.slow
def test_quick_demo_writes_the_report(tmp_path):
    out = tmp_path / "demo"
    run(
        [os.path.join(ROOT, "demo", "run_demo.py"), "--quick", "--output", str(out)]
        + ["--data-root", str(tmp_path / "data"), "--teacher-seeds", "2", "--token-seeds", "2"]
        + ["--sources", *SOURCES, "--full-sources", "uniform", "--jobs", "2"],
        tmp_path,
        timeout=1800,  # the whole quick demo: 2 teachers, 2 stage-1 seeds, the ablation
    )
    report = (out / "report.md").read_text()
    summary = json.loads((out / "results.json").read_text())
    results, times = summary["results"], summary["times"]
    runs = {"student_seed0", "teacher_t0", "tokens_t0_seed0", "tokens_t0_seed1", "maskd_t0_seed0"}
    runs |= {"teacher_t1", "tokens_t1_seed0", "tokens_t1_seed1", "maskd_t1_seed0"}
    runs |= {f"maskd_t{t}_seed0 {stage}" for t in (0, 1) for stage in ("export", "evaluate")}
    runs |= {f"ablation_t{t}_{src}_seed0" for t in (0, 1) for src in SOURCES}
    runs |= {f"full_t{t}_uniform_seed0" for t in (0, 1)}
    assert set(times) == runs and all(v > 0 for v in times.values())
    # the full recipe through uniform masks: both distillation losses, val and test
    for t in (0, 1):
        folder = out / f"full_t{t}_uniform_seed0" / "student"
        assert "MASK_SOURCE: uniform" in (folder / "config.yaml").read_text()
        keys = {k for line in open(folder / "metrics.json") for k in json.loads(line)}
        assert {"loss_maskd", "loss_roi_reg_kd", "maskd_shapes_val/bbox/AP"} <= keys
        tr = results["teachers"][str(t)]
        assert set(tr["full"]) == set(tr["full val"]) == {"uniform"}
        assert set(tr["maskd val"]) == {"0"}
    assert "## Paired differences" in report
    assert "| full recipe, uniform (whole-map mimicking) - baseline | " in report
    # the ablation's students: features only, with their mask source, evaluated on val and test
    for t in (0, 1):
        for src in SOURCES:
            folder = out / f"ablation_t{t}_{src}_seed0" / "student"
            config = (folder / "config.yaml").read_text()
            assert f"MASK_SOURCE: {src}" in config
            assert "- maskd_shapes_val\n  - maskd_shapes_test" in config
            keys = {k for line in open(folder / "metrics.json") for k in json.loads(line)}
            assert "loss_maskd" in keys and "loss_roi_reg_kd" not in keys
            assert {"maskd_shapes_val/bbox/AP", "maskd_shapes_test/bbox/AP"} <= keys
        tr = results["teachers"][str(t)]
        assert set(tr["ablation"]) == set(tr["ablation val"]) == set(SOURCES)
        aps = {src: tr["ablation"][src]["0"]["AP"] for src in SOURCES}
        section = report[report.index("## Mask sources") : report.index("## Goals")]
        block = section[section.index(f"Teacher seed {t}:") :]
        cells = _row(block, "uniform (whole-map mimicking)")
        assert cells[1] == _cell(aps["uniform"])
        cells = _row(block, "oracle: boxes and background, 1/2 each")
        if None not in aps.values():
            assert cells[3].startswith(_cell(aps["gt_partition"] - aps["uniform"], signed=True))
            assert cells[4].startswith(_cell(aps["tokens"] - aps["gt_partition"], signed=True))
        assert f"teacher seed {t}: headroom, gt_partition - uniform >= +0.5 AP" in report
    # each MasKD student went through distill_net.py's four stages
    for t in (0, 1):
        pipeline = json.loads((out / f"maskd_t{t}_seed0" / "pipeline.json").read_text())
        assert list(pipeline["stages"]) == ["tokens", "student", "export", "evaluate"]
    # the data's foreground statistics, of the val split
    assert results["data"]["variant"] == "default"
    share = results["data"]["val"]["cells in boxes, p2"]
    assert f"Data: variant `default`" in report and f"p2 {share:.2f}, p3" in report
    # the shipped recipe: masked feature loss plus RoI box-regression KD, named in the report
    assert results["distillation losses"] == ["loss_maskd", "loss_roi_reg_kd"]
    assert "`loss_maskd`, `loss_roi_reg_kd`" in report
    assert set(results["teachers"]) == {"0", "1"}
    base = results["baseline"]["0"]
    assert _row(report, "baseline student (R18-FPN)")[:3] == [
        _cell(base[m]) for m in ("AP", "AP50", "AP75")
    ]
    for t, tr in results["teachers"].items():
        # The teachers train for 40 iterations: they detect something, so AP is a number.
        assert isinstance(tr["teacher"]["AP"], float), t
        cells = _row(report, f"teacher (R34-FPN), teacher seed {t}")
        assert cells[:3] == [_cell(tr["teacher"][m]) for m in ("AP", "AP50", "AP75")]
        # the released student scores what stage 2's last evaluation scored
        assert tr["maskd"]["0"] == tr["maskd in training"]["0"], t
        cells = _row(report, f"MasKD student (R18-FPN), teacher seed {t}")
        assert cells[:3] == [_cell(tr["maskd"]["0"][m]) for m in ("AP", "AP50", "AP75")]
        if tr["maskd"]["0"]["AP"] is not None and base["AP"] is not None:
            assert cells[3] == _cell(tr["maskd"]["0"]["AP"] - base["AP"], signed=True)
        else:
            assert cells[3] == "n/a"
        assert set(tr["tokens"]) == {"0", "1"}
        for k, tok in tr["tokens"].items():
            masked = tok["masked teacher"]["AP"]
            if masked is None:
                assert tok["retention"] is None
            else:
                assert tok["retention"] == pytest.approx(masked / tr["teacher"]["AP"], rel=1e-6)
            retention = "n/a" if tok["retention"] is None else f"{tok['retention']:.3f}"
            row = f"| {t} | {k} | {_cell(tr['teacher']['AP'])} | {_cell(masked)} | {retention} |"
            assert row in report
            assert set(tok["token statistics"]) == LEVELS
            for level, st in tok["token statistics"].items():
                assert set(st) == STATS, level
                assert all(0.0 <= st[s] <= 1.0 for s in STATS - {"combined", "tokens_eff"}), st
                assert 1.0 <= st["tokens_eff"] <= 6.0 + 1e-6, st
        assert set(tr["maskd"]) == {"0"}
    assert "equal to the stage-2 run's final evaluation in 2 of 2 run(s)" in report
    for level in LEVELS:  # nine statistics and the re-weighting
        assert re.search(rf"^\| {level} \|( \d\.\d\d\d \|){{9}} \d+\.\d\d \|$", report, re.M)
    assert "## Goals" in report and "| total |" in report
    assert report.count("retention >= 0.95 for every stage-1 seed") == 2
    assert (out / "loss_curves.png").stat().st_size > 0
    masks = os.listdir(out / "masks")
    assert len([f for f in masks if f.endswith(".png")]) == 2 and "token_statistics.json" in masks

    # Again: every stage is kept (the pipeline's markers), the report is written again.
    again = run(
        [os.path.join(ROOT, "demo", "run_demo.py"), "--quick", "--output", str(out)]
        + ["--data-root", str(tmp_path / "data"), "--teacher-seeds", "2", "--token-seeds", "2"]
        + ["--sources", *SOURCES, "--full-sources", "uniform", "--jobs", "2"],
        tmp_path,
    )
    # 1 baseline; per teacher: the teacher, 4 pipeline stages, 1 extra stage-1 run, 3 ablation
    # students, 1 full-recipe student through uniform masks
    assert (again.stdout + again.stderr).count("finished before, kept") == 21
    assert json.loads((out / "results.json").read_text())["results"] == results


def test_report_reads_the_last_evaluation_and_names_missing_ones(tmp_path):
    import report as demo

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    records = [
        {"iteration": 0, "total_loss": 2.0, "loss_cls": 1.5, "loss_maskd": 0.5},
        {"iteration": 9, "bbox/AP": 1.0, "bbox/AP50": 2.0, "bbox/AP75": 0.5},
        {"iteration": 19, "total_loss": 1.0, "loss_cls": 0.7, "loss_roi_reg_kd": 0.3},
        {"iteration": 19, "bbox/AP": 3.0, "bbox/AP50": 6.0, "bbox/AP75": 1.5},
    ]
    (run_dir / "metrics.json").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    assert demo.final_metrics(str(run_dir)) == {"AP": 3.0, "AP50": 6.0, "AP75": 1.5}
    assert demo.loss_keys(str(run_dir)) == {"loss_cls", "loss_maskd", "loss_roi_reg_kd"}
    assert demo.curve(str(run_dir), "total_loss") == ([0, 19], [2.0, 1.0])
    with pytest.raises(RuntimeError, match=r"no retention in .*metrics\.json"):
        demo.retention_of(str(run_dir))
    with pytest.raises(RuntimeError, match=r"no token statistics in .*metrics\.json"):
        demo.token_statistics_of(str(run_dir))

    (run_dir / "metrics.json").write_text(json.dumps(records[0]) + "\n")
    with pytest.raises(RuntimeError, match=r"no bbox evaluation in .*metrics\.json"):
        demo.final_metrics(str(run_dir))


def test_report_reads_retention_and_token_statistics_of_stage1(tmp_path):
    import report as demo

    records = [
        {"iteration": 9, "[metric]tokens/p2/coverage": 0.1, "[metric]tokens/p2/constant": 0.5},
        {"iteration": 9, "bbox/AP": 6.0, "teacher/bbox/AP": 8.0, "retention/bbox/AP": 0.2},
        {"iteration": 19, "[metric]tokens/p2/coverage": 0.3, "[metric]tokens/p3/dice": 0.7},
        {"iteration": 19, "bbox/AP": 6.0, "teacher/bbox/AP": 8.0, "retention/bbox/AP": 0.75},
    ]
    (tmp_path / "metrics.json").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    assert demo.retention_of(str(tmp_path)) == 0.75
    assert demo.token_statistics_of(str(tmp_path)) == {"p2": {"coverage": 0.3}, "p3": {"dice": 0.7}}


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
    import report as demo

    results = _results(
        teacher_aps=[10.0, 12.0],
        baseline=[3.0, 4.0, 5.0],
        maskd=[[5.0, 6.0, 6.5], [3.5, 3.0, 7.0]],  # teacher 1: mean +0.5, one seed -1.0
        retentions=[[1.0, 0.96, 0.99], [0.99, 0.94, 1.0]],
    )
    report = open(
        demo.write_report(str(tmp_path), results, {}, 0.0, 1.0, False, demo.DEFAULT)
    ).read()
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
    import report as demo

    nan = float("nan")
    results = _results([8.0], [nan], [[2.0]], [[nan]])
    path = demo.write_report(str(tmp_path), results, {"teacher": 1.0}, 0.0, 1.0, True, demo.QUICK)
    report = open(path).read()
    assert not re.search(r"\bnan\b", report)  # Python's rendering of NaN
    assert "| baseline student (R18-FPN) | n/a | n/a | n/a | n/a |" in report
    assert "| teacher (R34-FPN) | 8.00 | 16.00 | 4.00 | n/a |" in report
    assert "n/a: no detections above the test score threshold" in report
    assert "seed 0: baseline n/a, MasKD 2.00 (n/a)" in report
    assert report.count("NOT reached (undefined: no detections from the baseline student)") == 2
    assert "retention >= 0.95 for every stage-1 seed: NOT reached (n/a)" in report

    safe = demo.json_safe({"results": results, "times": [1.5]})
    assert safe["results"]["baseline"][0] == {"AP": None, "AP50": None, "AP75": None}
    assert safe["results"]["teachers"][0]["teacher"]["AP"] == 8.0 and safe["times"] == [1.5]
    json.dumps(safe, allow_nan=False)  # raises ValueError if any NaN is left
    assert math.isnan(results["teachers"][0]["tokens"][0]["retention"])


def test_report_of_the_mask_source_ablation(tmp_path):
    import report as demo

    results = _results([10.0], [3.0, 4.0, 5.0], [[5.0, 6.0, 6.5]], [[1.0, 0.99, 0.98]])
    tr = results["teachers"][0]

    def m(ap):
        return {"AP": ap, "AP50": 2 * ap, "AP75": ap / 2}

    def runs(aps):
        return {s: m(ap) for s, ap in enumerate(aps)}

    tr["ablation"] = {
        "tokens": runs([4.0, 5.0, 6.0]),
        "uniform": runs([3.0, 5.0, 5.5]),  # tokens: +1, 0, +0.5
        "gt_boxes": runs([4.5, 5.0, 6.0]),  # minus uniform: +1.5, 0, +0.5 -> +0.67
        "gt_partition": runs([5.0, 6.0, 6.5]),  # minus uniform: +2, +1, +1 -> +1.33
    }
    tr["ablation val"] = {
        "uniform": runs([3.0, 3.0, 3.0]),
        "gt_partition": runs([3.5, 3.0, 3.1]),  # +0.2 on val
        "tokens": runs([3.0, 3.0, 3.0]),
    }
    spread = {"tokens_eff": 2.5, "gt_share": 0.6, "gt_share_uniform": 0.3}
    tr["tokens"][0]["token statistics"] = {
        "p2": spread,
        "p3": spread,
        "p4": {"tokens_eff": 1.2},  # one token carries the weight
        "p5": spread,
    }
    for k in (1, 2):  # the other stage-1 seeds: two levels only
        tr["tokens"][k]["token statistics"] = {"p2": spread, "p3": spread, "p4": {}}
    results["data"] = {
        "variant": "small",
        "val": {
            "objects per image": 6.5,
            "median box side": 14.2,
            "small boxes": 1.0,
            "box area / image area": 0.013,
            "cells in boxes, p2": 0.117,
            "cells in boxes, p6": 0.824,
        },
    }
    report = open(
        demo.write_report(str(tmp_path), results, {}, 0.0, 1.0, False, demo.DEFAULT)
    ).read()
    assert (
        "Data: variant `small`; val split: 6.5 objects per image, median box side 14 px, each box"
        " 1.3% of the image on average; share of the cells inside boxes per level: p2 0.12,"
        " p6 0.82." in report
    )
    assert (
        "| uniform (whole-map mimicking) | 4.50 ± 1.32 | 3.00, 5.00, 5.50 | +0.50 | - |"
        " +0.50 (+1.00, +0.00, +0.50) |" in report
    )
    assert (
        "| oracle: boxes and background, 1/2 each | 5.83 ± 0.76 | 5.00, 6.00, 6.50 | +1.83 |"
        " +1.33 (+2.00, +1.00, +1.00) | -0.83 (-1.00, -1.00, -0.50) |" in report
    )
    assert (
        "| learned tokens (the paper's stage 1) | 5.00 ± 1.00 | 4.00, 5.00, 6.00 | +1.00 |"
        " +0.50 (+1.00, +0.00, +0.50) | - |" in report
    )
    assert "oracle: boxes and background, 1/2 each +0.20 (+0.50, +0.00, +0.10)" in report
    # the re-weighting column: gt_share / gt_share_uniform
    assert re.search(r"^\| p2 \|.* 2\.500 \|.* 0\.600 \| 0\.300 \| 2\.00 \|$", report, re.M)
    goals = report[report.index("## Goals") :]
    assert (
        "headroom, gt_partition - uniform >= +0.5 AP (mean): test reached (+1.33; per seed"
        " +2.00, +1.00, +1.00); val NOT reached (+0.20; per seed +0.50, +0.00, +0.10)" in goals
    )
    assert "headroom, gt_boxes - uniform >= +0.5 AP (mean): test reached (+0.67;" in goals
    # the learned tokens need half of the best oracle's gain: +0.67; they have +0.50
    assert (
        "learned tokens - uniform >= half of gt_partition - uniform (>= +0.67): NOT reached"
        in goals
    )
    assert (
        "learned tokens: effective number of weighted tokens >= 2 on >= 3 levels with retention"
        " >= 0.95, every stage-1 seed: NOT reached (seed 0: p2, p3, p5, retention 1.000;"
        " seed 1: p2, p3, retention 0.990" in goals
    )
    assert demo.partition_levels(tr["tokens"][0]["token statistics"]) == ["p2", "p3", "p5"]

    # no oracle with headroom: the learned tokens' share of it is not asked
    tr["ablation"]["gt_partition"] = runs([3.0, 5.0, 5.9])  # +0.13
    tr["ablation"]["gt_boxes"] = runs([3.0, 5.0, 5.5])
    report = open(
        demo.write_report(str(tmp_path), results, {}, 0.0, 1.0, False, demo.DEFAULT)
    ).read()
    assert (
        "learned tokens - uniform: +0.50; no oracle beats uniform by +0.5 on test (best"
        " gt_partition +0.13)" in report
    )


def test_the_demo_configs_hold_the_demos_schedule():
    """The demo overrides the schedule of its configs (shortened for QUICK); at full size the
    overrides equal what the configs hold, so a config run by hand is the demo's run."""
    import report as rep
    import seg_demo

    from maskd.config import load_config

    demo = os.path.join(ROOT, "configs", "Demo")
    for name, iters in (
        ("shapes_teacher_R34.yaml", rep.DEFAULT["teacher_iter"]),
        ("shapes_student_R18.yaml", rep.DEFAULT["student_iter"]),
        ("maskd_shapes_R34-R18_2x.yaml", rep.DEFAULT["student_iter"]),
        ("shapes_seg_teacher_R34.yaml", seg_demo.DEFAULT["teacher_iter"]),
        ("shapes_seg_student_R18.yaml", seg_demo.DEFAULT["student_iter"]),
        ("maskd_shapes_seg_R34-R18.yaml", seg_demo.DEFAULT["student_iter"]),
    ):
        cfg = load_config(os.path.join(demo, name))
        opts = rep.schedule(iters)
        expected = dict(zip(opts[::2], opts[1::2]))
        assert str(cfg.SOLVER.MAX_ITER) == expected["SOLVER.MAX_ITER"], name
        assert str(tuple(cfg.SOLVER.STEPS)) == expected["SOLVER.STEPS"], name
        assert str(cfg.SOLVER.WARMUP_ITERS) == expected["SOLVER.WARMUP_ITERS"], name
    stage2 = load_config(os.path.join(demo, "maskd_shapes_R34-R18_2x.yaml"))
    assert stage2.MODEL.MASKD.CUSTOM_MASK_WARMUP == rep.DEFAULT["student_iter"] // 2
    tokens = load_config(os.path.join(demo, "maskd_shapes_R34-R18_tokens.yaml"))
    assert tokens.SOLVER.MAX_ITER == rep.DEFAULT["tokens_iter"]
    tokens = load_config(os.path.join(demo, "maskd_shapes_seg_R34-R18_tokens.yaml"))
    assert tokens.SOLVER.MAX_ITER == seg_demo.DEFAULT["tokens_iter"]


def test_the_demo_partition_configs_are_the_shipped_pair_plus_the_levers():
    """configs/Demo/*_partition.yaml: the stage-1 schedule and student of the shipped demo pair,
    with the partition objective; stage 1 and stage 2 agree on the tokens' form."""
    demo = os.path.join(ROOT, "configs", "Demo")
    pairs = {}
    for stage in ("tokens", "2x"):
        for suffix in ("", "_partition"):
            cfg = get_maskd_cfg()
            cfg.merge_from_file(os.path.join(demo, f"maskd_shapes_R34-R18_{stage}{suffix}.yaml"))
            pairs[stage, suffix] = cfg
    levers = {"WEIGHT_GATE": "union", "SALIENCY_WEIGHT": 1.0, "MIN_TOKEN_AREA": 0.08}
    for stage in ("tokens", "2x"):
        shipped, partition = pairs[stage, ""], pairs[stage, "_partition"]
        assert {k: partition.MODEL.MASKD[k] for k in levers} == levers
        assert shipped.MODEL.MASKD.WEIGHT_GATE == "absolute"
        assert shipped.MODEL.MASKD.SALIENCY_WEIGHT == 0.0
        # everything else is the shipped recipe
        for k in levers:
            partition.MODEL.MASKD[k] = shipped.MODEL.MASKD[k]
        partition.OUTPUT_DIR = shipped.OUTPUT_DIR
        assert partition == shipped, stage


def test_student_t_quantiles_and_the_seeds_a_difference_needs():
    import report as demo

    # Student's t table, 0.975 quantiles
    for df, want in ((1, 12.706), (2, 4.303), (5, 2.571), (10, 2.228), (30, 2.042)):
        assert demo.t_quantile(0.975, df) == pytest.approx(want, abs=5e-4)
    assert demo.t_quantile(0.95, 4) == pytest.approx(2.132, abs=5e-4)
    with pytest.raises(ValueError, match="0.5 < q < 1"):
        demo.t_quantile(0.3, 4)
    # n = 3: 4.303 * 0.1414 / sqrt(3) = 0.351 < 0.4, n = 2: 1.27 is not
    assert demo.seeds_needed(0.4, 0.02**0.5) == 3
    assert demo.seeds_needed(-0.4, 0.02**0.5) == 3  # the sign does not matter
    assert demo.seeds_needed(0.0, 1.0) == math.inf
    assert demo.seeds_needed(1e-4, 10.0) == math.inf  # beyond 1000 seeds
    assert demo.seeds_needed(0.3, 0.0) == 2
    p = demo.paired([1.0, 2.0], [1.0, float("nan")])
    assert math.isnan(p["low"]) and p["n"] == 2
    assert demo.interval(p).endswith("(n=2, no interval)")


def test_report_paired_differences_of_the_full_recipe_and_their_goals(tmp_path):
    import report as demo

    baseline = [3.0, 4.0, 5.0, 4.0, 3.5, 4.5]
    paper = [5.0, 6.0, 6.5, 5.0, 5.5, 6.0]
    results = _results([10.0, 10.0], baseline, [paper, paper], [[1.0], [1.0]])

    def runs(aps):
        return {s: {"AP": ap, "AP50": 2 * ap, "AP75": ap / 2} for s, ap in enumerate(aps)}

    gain = [0.5, 0.3, 0.6, 0.4, 0.2, 0.4]  # mean 0.4, sd sqrt(0.02)
    for t, tr in results["teachers"].items():
        shift = 0.0 if t == 0 else -0.6  # teacher 1: the variant loses 0.2 on the mean
        variant = [a + g + shift for a, g in zip(paper, gain)]
        tr["full"] = {"uniform": runs([a - 0.1 for a in paper]), "tokens_variant": runs(variant)}
        tr["full val"] = {"uniform": runs(paper), "tokens_variant": runs(paper)}
        tr["maskd val"] = runs(paper)
        stats = {"p2": {"gt_share": 0.5, "gt_share_uniform": 0.25}}  # 2.00
        tr["tokens_variant"] = {0: {"retention": 1.0, "token statistics": stats}}
    report = open(
        demo.write_report(str(tmp_path), results, {}, 0.0, 1.0, False, demo.DEFAULT)
    ).read()
    section = report[report.index("## Paired differences") : report.index("## Goals")]
    block0 = section[section.index("Teacher seed 0:") : section.index("Teacher seed 1:")]
    # 0.4 +- 2.5706 * 0.14142 / sqrt(6) = [0.2516, 0.5484]
    assert (
        "| full recipe, learned tokens, the variant's stage 1 - learned tokens (the paper's"
        " stage 1) | +0.40 [+0.25, +0.55] (n=6) | +0.50, +0.30, +0.60, +0.40, +0.20, +0.40 | 3 |"
        " +0.00 [+0.00, +0.00] (n=6) |" in block0
    )
    assert (
        "| full recipe, learned tokens (the paper's stage 1) - baseline | +1.67 [+1.24, +2.10]"
        " (n=6) |" in block0
    )
    assert "| full recipe, uniform (whole-map mimicking) - baseline | +1.57 " in block0
    goals = report[report.index("## Goals") :]
    assert (
        "- teacher seed 0: full recipe, the variant's tokens - the paper's >= +0.3 AP with the 95%"
        " interval above zero: reached (+0.40 [+0.25, +0.55] (n=6))" in goals
    )
    assert (
        "- teacher seed 1: full recipe, the variant's tokens - the paper's >= +0.3 AP with the 95%"
        " interval above zero: NOT reached (-0.20 [-0.35, -0.05] (n=6))" in goals
    )
    assert (
        "- teacher seed 0: full recipe, the variant's tokens - baseline student >= +1.0 AP:"
        " reached (+2.07 " in goals
    )
    assert (
        "- teacher seed 0: the variant's tokens: re-weighting of the boxes at p2 >= 1.3, every"
        " stage-1 seed: reached (seed 0: 2.00)" in goals
    )
    assert (
        "- teacher seed 0: learned tokens: re-weighting of the boxes at p2 >= 1.3, every"
        " stage-1 seed: NOT reached (seed 0: 1.00)" in goals
    )


@pytest.mark.slow
def test_quick_segmentation_demo_distils_the_logits_and_writes_the_report(tmp_path):
    """demo/seg_demo.py --quick: a semantic FPN teacher, tokens on its logits, students with and
    without distillation on the shapes label maps (registered through --import), the report."""
    out = tmp_path / "seg"
    run(
        [os.path.join(ROOT, "demo", "seg_demo.py"), "--quick", "--output", str(out)]
        + ["--data-root", str(tmp_path / "data"), "--seeds", "2", "--jobs", "2"],
        tmp_path,
        timeout=1200,
    )
    report = (out / "report.md").read_text()
    results = json.loads((out / "results.json").read_text())["results"]
    tokens = out / "maskd_seed0" / "tokens"
    assert "IN_FEATURES:\n    - logits" in (tokens / "config.yaml").read_text()
    for s in ("0", "1"):
        student = out / f"maskd_seed{s}" / "student"
        records = [json.loads(line) for line in open(student / "metrics.json")]
        keys = {k for r in records for k in r}
        # the logits are the one distilled level; no align conv is built
        assert {"loss_maskd", "maskd/loss_logits", "loss_sem_seg"} <= keys
        assert not any(k.startswith("maskd/loss_p") for k in keys)
        assert "ALIGN: false" in (student / "config.yaml").read_text()
        test = [r for r in records if "maskd_shapes_seg_test/sem_seg/mIoU" in r][-1]
        assert results["maskd test"][s]["mIoU"] == test["maskd_shapes_seg_test/sem_seg/mIoU"]
        # the released student, evaluated by plain detectron2, predicts as it did in training
        released = results["maskd released test"][s]
        assert released == pytest.approx(results["maskd test"][s]["mIoU"], abs=1e-6)
        baseline = [json.loads(line) for line in open(out / f"student_seed{s}" / "metrics.json")]
        assert not any("loss_maskd" in r for r in baseline)
    assert 0 < results["masked teacher retention"] < 2
    for split in ("val", "test"):
        d = [
            results[f"maskd {split}"][s]["mIoU"] - results[f"baseline {split}"][s]["mIoU"]
            for s in ("0", "1")
        ]
        line = next(ln for ln in report.splitlines() if ln.startswith(f"- {split}: "))
        assert line.startswith(f"- {split}: {sum(d) / 2:+.2f} [")
        assert f"per seed {d[0]:+.2f}, {d[1]:+.2f};" in line


def test_segmentation_demo_configs_are_the_papers_logits_recipe():
    """The demo's segmentation pair distils what the paper's segmentation row distils: the
    logits, 8 tokens, no weight head, no align conv, 0.5; stage 1 with Adam 0.01 and cosine."""
    from maskd.config import load_config

    configs = os.path.join(ROOT, "configs", "Demo")
    student = load_config(os.path.join(configs, "maskd_shapes_seg_R34-R18.yaml"))
    tokens = load_config(os.path.join(configs, "maskd_shapes_seg_R34-R18_tokens.yaml"))
    for cfg in (student, tokens):
        m = cfg.MODEL.MASKD
        assert list(m.IN_FEATURES) == ["logits"] and m.NUM_TOKENS == 8
        assert (m.WEIGHTED, m.ALIGN, m.LOSS_WEIGHT) == (False, False, 0.5)
        assert m.STUDENT_META_ARCHITECTURE == "SemanticSegmentor"
    assert student.MODEL.META_ARCHITECTURE == "MasKD"
    assert tokens.MODEL.META_ARCHITECTURE == "MasKDTokenLearner"
    assert (tokens.SOLVER.OPTIMIZER, tokens.SOLVER.BASE_LR) == ("ADAM", 0.01)
    assert tokens.SOLVER.LR_SCHEDULER_NAME == "WarmupCosineLR"
    # the student config's schedule is the baseline's, which the demo runs
    baseline = load_config(os.path.join(configs, "shapes_seg_student_R18.yaml"))
    assert student.SOLVER.MAX_ITER == baseline.SOLVER.MAX_ITER


def test_segmentation_demo_data_is_registered_from_the_environment(tmp_path, monkeypatch):
    """demo/seg_data.py (the segmentation runs' --import) registers the splits the demo names in
    its environment variable, and names what is missing: the variable, a split's folder."""
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from PIL import Image
    from seg_demo import SEG_DATA, SEG_DATA_ENV

    from maskd.utils.extensions import import_modules

    folder = tmp_path / "split"
    for sub in ("images", "sem_seg"):
        (folder / sub).mkdir(parents=True)
        Image.new("L" if sub == "sem_seg" else "RGB", (8, 8)).save(folder / sub / "000000.png")
    monkeypatch.delenv(SEG_DATA_ENV, raising=False)
    with pytest.raises(RuntimeError, match=f"{SEG_DATA_ENV} is not set"):
        import_modules([SEG_DATA])
    name = "test_seg_demo_split"
    spec = {"classes": ["a", "b"], "ignore_label": 255, "splits": {name: str(folder)}}
    monkeypatch.setenv(SEG_DATA_ENV, json.dumps(spec))
    module = None
    try:
        (module,) = import_modules([SEG_DATA])
        (record,) = DatasetCatalog.get(name)
        assert record["sem_seg_file_name"] == str(folder / "sem_seg" / "000000.png")
        meta = MetadataCatalog.get(name)
        assert (meta.stuff_classes, meta.ignore_label, meta.evaluator_type) == (
            ["a", "b"],
            255,
            "sem_seg",
        )
        spec["splits"] = {name: str(tmp_path / "nowhere")}
        monkeypatch.setenv(SEG_DATA_ENV, json.dumps(spec))
        with pytest.raises(FileNotFoundError, match=f"'{name}': no folder .*nowhere"):
            module.register_from_environment()
    finally:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
        if module is not None:
            sys.modules.pop(module.__name__, None)
