"""The demo's results and report: read from the runs' ``metrics.json`` (and the released
students' evaluation), written to ``<output>/report.md``."""

import functools
import json
import math
import os
import statistics
from typing import Dict, List, Sequence, Tuple

from shapes import COCO_PUBLISHED  # demo/shapes.py, beside this module

from maskd.modeling.diagnostics import STAT_NAMES
from maskd.utils.files import atomic_write, write_text

# Sizes of a run: dataset, iterations of each stage, seeds of the students.
# Every reported number is evaluated on the test split, on which no choice was made.
DEFAULT = dict(
    n_train=800, n_val=200, n_test=400, teacher_iter=1000, tokens_iter=100, student_iter=700
)
QUICK = dict(n_train=48, n_val=16, n_test=16, teacher_iter=40, tokens_iter=10, student_iter=30)
METRICS = ("AP", "AP50", "AP75")


def schedule(iters: int) -> List[str]:
    """Solver overrides for a shortened run: steps at 75% and 92%, warm-up within it."""
    steps = f"({int(iters * 0.75)}, {int(iters * 0.92)})"
    return [
        "SOLVER.MAX_ITER",
        str(iters),
        "SOLVER.STEPS",
        steps,
        "SOLVER.WARMUP_ITERS",
        str(min(100, iters // 4)),
    ]


def records(out_dir: str) -> List[dict]:
    """The records of a run's metrics.json (one dict per logged iteration or evaluation)."""
    with open(os.path.join(out_dir, "metrics.json")) as f:
        return [json.loads(line) for line in f]


def final_metrics(
    out_dir: str, dataset: str = "", task: str = "bbox", metrics: Sequence[str] = METRICS
) -> Dict[str, float]:
    """The last evaluation in a run's metrics.json: {"AP": ..., "AP50": ..., "AP75": ...} (or
    the ``metrics`` of another ``task``, e.g. "sem_seg" and its "mIoU"); of ``dataset`` where
    the run evaluated several (detectron2 then prefixes the dataset's name)."""
    prefix = f"{dataset}/{task}/" if dataset else f"{task}/"
    evals = [rec for rec in records(out_dir) if f"{prefix}{metrics[0]}" in rec]
    if not evals:
        raise RuntimeError(
            f"no {task} evaluation{f' of {dataset}' if dataset else ''} in "
            f"{os.path.join(out_dir, 'metrics.json')}"
        )
    return {m: evals[-1][f"{prefix}{m}"] for m in metrics}


def evaluated_metrics(results: dict, dataset: str = "") -> Dict[str, float]:
    """{"AP", "AP50", "AP75"} of an evaluation's results (``train_net.py --eval-only`` writes
    them to ``results.json``; NaN for a model without detections); of ``dataset`` where it
    evaluated several (detectron2 then keys the results by the dataset's name)."""
    if dataset and dataset in results:
        results = results[dataset]
    if "bbox" not in results:
        raise RuntimeError(f"no bbox results in {sorted(results)}")
    return {m: math.nan if results["bbox"][m] is None else results["bbox"][m] for m in METRICS}


def loss_keys(out_dir: str) -> set:
    """Names of the losses a run logged in its metrics.json (``loss_*``)."""
    return {k for rec in records(out_dir) for k in rec if k.startswith("loss_")}


def curve(out_dir: str, key: str):
    """(iterations, values) of one logged scalar."""
    recs = [rec for rec in records(out_dir) if key in rec]
    return [rec["iteration"] for rec in recs], [rec[key] for rec in recs]


def num(x: float, signed: bool = False) -> str:
    """A metric for the report; NaN (COCOEvaluator's value for a model without detections) -> n/a."""
    if math.isnan(x):
        return "n/a"
    return f"{x:+.2f}" if signed else f"{x:.2f}"


def json_safe(obj):
    """``obj`` with NaN floats replaced by None, so results.json is strict JSON."""
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [json_safe(v) for v in obj]
    if isinstance(obj, float) and math.isnan(obj):
        return None
    return obj


def goal(name: str, threshold: float, better: Tuple[str, float], base: Tuple[str, float]) -> str:
    """One goal line: is ``better`` AP - ``base`` AP >= threshold; each is (model name, AP)."""
    missing = [model for model, ap in (better, base) if math.isnan(ap)]
    if missing:
        return f"{name}: NOT reached (undefined: no detections from the {' and '.join(missing)})"
    value = better[1] - base[1]
    return f"{name}: {'reached' if value >= threshold else 'NOT reached'} ({value:+.2f})"


def retention_of(out_dir: str, metric: str = "bbox/AP") -> float:
    """The retention (masked teacher / teacher ``metric``, e.g. "sem_seg/mIoU") of a stage-1
    run's last evaluation."""
    evals = [rec for rec in records(out_dir) if f"retention/{metric}" in rec]
    if not evals:
        raise RuntimeError(f"no retention in {os.path.join(out_dir, 'metrics.json')}")
    value = evals[-1][f"retention/{metric}"]
    return math.nan if value is None else float(value)


def token_statistics_of(out_dir: str) -> Dict[str, Dict[str, float]]:
    """level -> token statistics, as the last training record of a run logged them (each the
    median of the metric printer's window of 20 iterations)."""
    prefix = "[metric]tokens/"
    recs = [rec for rec in records(out_dir) if any(k.startswith(prefix) for k in rec)]
    if not recs:
        raise RuntimeError(f"no token statistics in {os.path.join(out_dir, 'metrics.json')}")
    out: Dict[str, Dict[str, float]] = {}
    for key, value in recs[-1].items():
        if key.startswith(prefix):
            level, stat = key[len(prefix) :].split("/")
            out.setdefault(level, {})[stat] = value
    return out


def mean(values) -> float:
    values = list(values)
    return statistics.mean(values) if values else math.nan


@functools.lru_cache(maxsize=None)
def t_quantile(q: float, df: int) -> float:
    """The q-quantile (q in (0.5, 1)) of Student's t distribution with ``df`` degrees of
    freedom: its density integrated by Simpson's rule from 0, inverted by bisection (accurate
    to about 1e-6; no scipy needed)."""
    if not 0.5 < q < 1 or df < 1:
        raise ValueError(f"t_quantile needs 0.5 < q < 1 and df >= 1, got q={q}, df={df}")
    log_c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)

    def cdf(x: float, steps: int = 2000) -> float:  # P(T <= x) for x >= 0
        h = x / steps
        total = 0.0
        for i in range(steps + 1):
            y = math.exp(log_c - (df + 1) / 2 * math.log1p((i * h) ** 2 / df))
            total += y * (1 if i in (0, steps) else 4 if i % 2 else 2)
        return 0.5 + total * h / 3

    lo, hi = 0.0, 1.0
    while cdf(hi) < q:
        lo, hi = hi, hi * 2
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cdf(mid) < q else (lo, mid)
    return (lo + hi) / 2


def paired(a: List[float], b: List[float]) -> Dict[str, float]:
    """A minus B paired by seed: {"mean", "sd" (sample), "n", "low", "high"} with the 95%
    t-interval of the mean difference (mean ± t_{0.975, n-1} sd / sqrt(n)), and "seeds
    needed": the fewest seeds whose 95% interval would exclude zero for a difference of this
    mean and spread (inf for a zero mean; NaN with fewer than two seeds or undefined APs)."""
    d = [x - y for x, y in zip(a, b)]
    n = len(d)
    if n < 2 or any(math.isnan(x) for x in d):
        m = statistics.mean(d) if d else math.nan
        nan = math.nan
        return {
            "mean": m,
            "sd": nan,
            "n": n,
            "low": nan,
            "high": nan,
            "seeds needed": nan,
            "per seed": d,
        }
    m, sd = statistics.mean(d), statistics.stdev(d)
    half = t_quantile(0.975, n - 1) * sd / math.sqrt(n)
    return {
        "mean": m,
        "sd": sd,
        "n": n,
        "low": m - half,
        "high": m + half,
        "seeds needed": seeds_needed(m, sd),
        "per seed": d,
    }


def seeds_needed(mean_diff: float, sd: float, most: int = 1000) -> float:
    """The fewest seeds n >= 2 whose 95% t-interval, t_{0.975, n-1} sd / sqrt(n), is narrower
    than |mean_diff|: inf for a zero difference or beyond ``most``; 2 for a zero spread."""
    if mean_diff == 0:
        return math.inf
    if sd == 0:
        return 2
    # the normal quantile bounds the t quantile from below: start the search where it can hold
    n = max(2, int((1.959964 * sd / abs(mean_diff)) ** 2))
    while n <= most:
        if t_quantile(0.975, n - 1) * sd / math.sqrt(n) < abs(mean_diff):
            return n
        n += 1
    return math.inf


def interval(p: Dict[str, float]) -> str:
    """A paired difference as the report writes it: mean [95% interval], n seeds."""
    if math.isnan(p["low"]):
        return f"{num(p['mean'], signed=True)} (n={p['n']}, no interval)"
    return f"{p['mean']:+.2f} [{p['low']:+.2f}, {p['high']:+.2f}] (n={p['n']})"


def seeds_to_resolve(p: Dict[str, float]) -> str:
    """The seeds a :func:`paired` difference of its size and spread needs, as the report says it."""
    need = p["seeds needed"]
    return "n/a" if math.isnan(need) else "more than 1000" if math.isinf(need) else str(int(need))


def spread(values: List[float]) -> str:
    """mean, sample standard deviation and range of a list of numbers, for the report."""
    if any(math.isnan(v) for v in values):
        return "n/a"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):+.2f} ± {sd:.2f} ({min(values):+.2f} .. {max(values):+.2f})"


def write_report(output, results, times, data_time, total, quick, size) -> str:
    teachers = results["teachers"]
    base_runs = results["baseline"]
    seeds = list(base_runs)
    base = {m: mean(base_runs[s][m] for s in seeds) for m in METRICS}

    def maskd_mean(t, m):
        return mean(teachers[t]["maskd"][s][m] for s in seeds)

    rows = []
    for t, tr in teachers.items():
        tag = f", teacher seed {t}" if len(teachers) > 1 else ""
        rows.append((f"teacher (R34-FPN){tag}", tr["teacher"]))
        rows.append((f"masked teacher (stage 1){tag}", tr["tokens"][0]["masked teacher"]))
    rows.append(("baseline student (R18-FPN)", base))
    for t in teachers:
        tag = f", teacher seed {t}" if len(teachers) > 1 else ""
        rows.append((f"MasKD student (R18-FPN){tag}", {m: maskd_mean(t, m) for m in METRICS}))
    lines = [
        "# MasKD demo report",
        "",
        f"Mode: {'QUICK (pipeline check only; the numbers mean nothing)' if quick else 'default'}."
        f" Dataset: procedural shapes, {size['n_train']} train / {size['n_val']} val /"
        f" {size['n_test']} test images."
        f" {len(teachers)} teacher seed(s) x {len(seeds)} student seed(s); student rows are"
        " means over the student seeds.",
        "",
    ]
    lines += data_lines(results.get("data"))
    lines += [
        "| model | AP | AP50 | AP75 | AP vs baseline student |",
        "|---|---|---|---|---|",
    ]
    for name, r in rows:
        cells = [num(r[m]) for m in METRICS] + [num(r["AP"] - base["AP"], signed=True)]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if any(math.isnan(r[m]) for _, r in rows for m in METRICS):
        lines += [
            "",
            "n/a: no detections above the test score threshold on val, so COCO AP is undefined"
            " (detectron2's COCOEvaluator reports NaN; results.json has null).",
        ]
    overrides = " ".join(results["maskd overrides"]) or "none"
    lines += [
        "",
        "MasKD student: the baseline's losses plus "
        + ", ".join(f"`{k}`" for k in results["distillation losses"])
        + f" (configs/Demo/maskd_shapes_R34-R18_2x.yaml; extra overrides: {overrides})."
        " Its AP is that of the released student (distill_net.py's export) evaluated by plain"
        " detectron2; " + released_vs_training(teachers) + ".",
        "",
        "## MasKD student minus baseline student, per teacher",
        "",
        "| teacher seed | teacher AP | baseline AP | MasKD AP | delta: mean ± sd (min .. max) |"
        " delta per student seed |",
        "|---|---|---|---|---|---|",
    ]
    deltas = {}
    for t, tr in teachers.items():
        deltas[t] = [tr["maskd"][s]["AP"] - base_runs[s]["AP"] for s in seeds]
        lines.append(
            f"| {t} | {num(tr['teacher']['AP'])} | {num(base['AP'])} | {num(maskd_mean(t, 'AP'))}"
            f" | {spread(deltas[t])} | " + ", ".join(num(d, signed=True) for d in deltas[t]) + " |"
        )
    lines += [
        "",
        "Per student seed (AP): "
        + "; ".join(
            f"seed {s}: baseline {num(base_runs[s]['AP'])}, "
            + ", ".join(
                f"MasKD{f' (teacher {t})' if len(teachers) > 1 else ''}"
                f" {num(tr['maskd'][s]['AP'])}"
                f" ({num(tr['maskd'][s]['AP'] - base_runs[s]['AP'], signed=True)})"
                for t, tr in teachers.items()
            )
            for s in seeds
        ),
        "",
        "## Stage 1: retention and token statistics",
        "",
        "Retention = masked teacher AP / teacher AP (the stage-1 run evaluates both).",
        "",
        "| teacher seed | stage-1 seed | teacher AP | masked teacher AP | retention |",
        "|---|---|---|---|---|",
    ]
    for t, tr in teachers.items():
        for k, tok in tr["tokens"].items():
            lines.append(
                f"| {t} | {k} | {num(tr['teacher']['AP'])} | {num(tok['masked teacher']['AP'])}"
                f" | {ratio(tok['retention'])} |"
            )
    lines += [
        "",
        "Token statistics of the tokens the students use (stage-1 seed 0), per level, from the"
        " last iterations of stage 1 (maskd.modeling.diagnostics: coverage = mean mask value; constant ="
        " share of masks with spatial std < 0.05; dice = mean Dice overlap between tokens;"
        " weight_entropy = token-weight entropy / log T; combined = mean of sum_t w_t M_t, the"
        " share of the features the teacher's heads see in stage 1; tokens_eff = effective"
        " number of weighted tokens 1 / sum_t w_t^2; weighted_dice = overlap of the weighted"
        " tokens' masks; gt_share = share of stage 2's per-cell loss weight on the ground-truth"
        " boxes' cells, gt_share_uniform = the same under whole-map mimicking; re-weighting ="
        " their ratio).",
        "",
    ]
    for t, tr in teachers.items():
        lines += [f"Teacher seed {t}:", ""] + statistics_table(tr["tokens"][0]["token statistics"])
        lines.append("")
    lines += ablation_lines(results, seeds)
    lines += paired_lines(results, seeds)
    lines += ["## Goals", ""]
    for t, tr in teachers.items():
        tag = f"teacher seed {t}: " if len(teachers) > 1 else ""
        lines.append(
            "- "
            + tag
            + goal(
                "teacher - baseline student >= 5 AP",
                5.0,
                ("teacher", tr["teacher"]["AP"]),
                ("baseline student", base["AP"]),
            )
        )
        lines.append(
            "- "
            + tag
            + goal(
                "MasKD - baseline student >= +1.0 AP (mean over student seeds)",
                1.0,
                ("MasKD student", maskd_mean(t, "AP")),
                ("baseline student", base["AP"]),
            )
        )
        if any(math.isnan(d) for d in deltas[t]):
            lines.append(f"- {tag}MasKD > baseline on every seed: NOT reached (undefined AP)")
        else:
            ok = all(d > 0 for d in deltas[t])
            lines.append(
                f"- {tag}MasKD > baseline on every seed: {'reached' if ok else 'NOT reached'}"
                f" (smallest {min(deltas[t]):+.2f})"
            )
        ret = [tok["retention"] for tok in tr["tokens"].values()]
        ok = all(r >= 0.95 for r in ret)  # NaN fails
        lines.append(
            f"- {tag}retention >= 0.95 for every stage-1 seed: "
            f"{'reached' if ok else 'NOT reached'} ({', '.join(ratio(r) for r in ret)})"
        )
    lines += ablation_goals(results, seeds)
    lines += full_goals(results, seeds)
    lines += [
        "",
        "| stage | wall time (s) |",
        "|---|---|",
        f"| data generation / cache | {data_time:.0f} |",
    ]
    lines += [f"| {name} | {t:.0f} |" for name, t in times.items()]
    lines += [
        f"| total | {total:.0f} |",
        "",
        "Receptive masks of the learned tokens (teacher seed 0, stage-1 seed 0), with their"
        " statistics per level: `masks/`. Loss curves: `loss_curves.png`.",
        "",
    ]
    path = os.path.join(output, "report.md")
    atomic_write(path, lambda tmp: write_text(tmp, "\n".join(lines)), overwrite=True)
    return path


def data_lines(data) -> List[str]:
    """The data variant and how much of its val split is object (none if not recorded)."""
    if not data:
        return []
    stats = data["val"]
    levels = [k for k in stats if k.startswith("cells in boxes, ")]
    return [
        f"Data: variant `{data['variant']}`; val split: {stats['objects per image']:.1f} objects"
        f" per image, median box side {stats['median box side']:.0f} px, each box"
        f" {100 * stats['box area / image area']:.1f}% of the image on average; share of the cells"
        " inside boxes per level: "
        + ", ".join(f"{k.split(', ')[1]} {stats[k]:.2f}" for k in levels)
        + "."
        + size_classes(stats),
        "",
    ]


def size_classes(stats) -> str:
    """The objects' sizes by COCO's classes (thresholds scaled to the image) and the occluded
    share, beside COCO's published figures; empty for statistics recorded without them."""
    if "small" not in stats:
        return ""
    shares = " / ".join(f"{100 * stats[k]:.0f}%" for k in ("small", "medium", "large"))
    coco = " / ".join(f"{100 * COCO_PUBLISHED[k]:.0f}%" for k in ("small", "medium", "large"))
    occluded = (
        f"; {100 * stats['occluded']:.0f}% of the objects less than 90% visible"
        if "occluded" in stats
        else ""
    )
    return (
        f" Objects small / medium / large by COCO's area thresholds scaled to the image: {shares}"
        f" (COCO: {coco}, {COCO_PUBLISHED['objects per image']} objects per image){occluded}."
    )


# the token statistics in the order maskd.modeling.diagnostics gives them
STAT_COLUMNS = STAT_NAMES


def statistics_table(stats: Dict[str, Dict[str, float]]) -> List[str]:
    """A markdown table of one stage-1 run's token statistics, one row per level."""
    lines = [
        "| level | " + " | ".join(STAT_COLUMNS) + " | re-weighting |",
        "|---" * (len(STAT_COLUMNS) + 2) + "|",
    ]
    for level, st in stats.items():
        cells = [f"{st[k]:.3f}" if k in st else "-" for k in STAT_COLUMNS]
        lines.append(f"| {level} | " + " | ".join(cells) + f" | {reweighting(st)} |")
    return lines


def reweighting(st: Dict[str, float]) -> str:
    """gt_share / gt_share_uniform: how much more of the loss the boxes get than their share of
    the cells (1: whole-map mimicking)."""
    if "gt_share" not in st or not st.get("gt_share_uniform"):
        return "-"
    return f"{st['gt_share'] / st['gt_share_uniform']:.2f}"


SOURCE_NAMES = {
    "tokens": "learned tokens (the paper's stage 1)",
    "tokens_variant": "learned tokens, the variant's stage 1",
    "uniform": "uniform (whole-map mimicking)",
    "gt_boxes": "oracle: ground-truth boxes",
    "gt_partition": "oracle: boxes and background, 1/2 each",
    "gt_instances": "oracle: each box and background",
    "random_tokens": "untrained tokens",
}
ORACLES = ("gt_boxes", "gt_partition", "gt_instances")
# the goals of the ablation (feature loss only, AP on the test split)
HEADROOM = 0.5  # an oracle beats uniform by this much: the data rewards re-weighting regions
MIN_TOKENS_EFF = 2.0  # weighted tokens on a level, for a partition
MIN_LEVELS = 3


def differences(a: Dict, b: Dict, seeds) -> Tuple[float, List[float]]:
    """Mean and per-seed AP differences of two sets of runs (seed -> metrics)."""
    d = [a[s]["AP"] - b[s]["AP"] for s in seeds]
    return mean(d), d


def signed_list(values: List[float]) -> str:
    return ", ".join(num(x, signed=True) for x in values)


def partition_levels(stats: Dict[str, Dict[str, float]]) -> List[str]:
    """Levels whose loss is shared by several weighted tokens (``tokens_eff`` >= 2)."""
    return [lv for lv, st in stats.items() if st.get("tokens_eff", 0.0) >= MIN_TOKENS_EFF]


def ablation_lines(results, seeds) -> List[str]:
    """The mask-source ablation's tables (none without an ablation)."""
    teachers = results["teachers"]
    if not any(tr.get("ablation") for tr in teachers.values()):
        return []
    base = results["baseline"]
    lines = [
        "## Mask sources: feature loss only",
        "",
        "Students that distil features only (RoI box-regression KD off), each with another"
        " source of the masks of loss_maskd (MODEL.MASKD.MASK_SOURCE); same schedule, seeds and"
        " loss weight. Sources without student-customised masks (uniform, the oracles) run"
        " without them. The oracles split each image by its ground truth: the boxes' cells"
        " (gt_boxes), boxes and background as two masks of weight 1/2 (gt_partition), each box"
        " and the background (gt_instances). AP on the test split; differences per student"
        " seed.",
        "",
    ]
    for t, tr in teachers.items():
        abl = tr["ablation"]
        lines += [
            f"Teacher seed {t}:",
            "",
            "| mask source | AP: mean ± sd | AP per student seed | vs baseline: mean |"
            " minus uniform: mean (per seed) | learned tokens minus this: mean (per seed) |",
            "|---|---|---|---|---|---|",
        ]
        for src, runs in abl.items():
            aps = [runs[s]["AP"] for s in seeds]
            vs_base = mean(aps[i] - base[s]["AP"] for i, s in enumerate(seeds))
            cols = []
            for a, b, other in (
                (runs, abl.get("uniform"), "uniform"),
                (abl.get("tokens"), runs, "tokens"),
            ):
                if other in abl and src != other:
                    m, d = differences(a, b, seeds)
                    cols.append(f"{m:+.2f} ({signed_list(d)})")
                else:
                    cols.append("-")
            sd = statistics.stdev(aps) if len(aps) > 1 else 0.0
            lines.append(
                f"| {SOURCE_NAMES.get(src, src)} | {mean(aps):.2f} ± {sd:.2f} | "
                + ", ".join(num(a) for a in aps)
                + f" | {num(vs_base, signed=True)} | {cols[0]} | {cols[1]} |"
            )
        lines.append("")
        val = tr.get("ablation val", {})
        if "uniform" in val and len(val) > 1:
            lines += [
                "On the val split (where choices are made), minus uniform: "
                + "; ".join(
                    f"{SOURCE_NAMES.get(src, src)} {differences(runs, val['uniform'], seeds)[0]:+.2f}"
                    f" ({signed_list(differences(runs, val['uniform'], seeds)[1])})"
                    for src, runs in val.items()
                    if src != "uniform"
                )
                + ".",
                "",
            ]
        for k, st in tr.get("tokens_variant", {}).items():
            lines += [
                f"The variant's tokens (stage 1 with `{' '.join(results['variant overrides'])}`),"
                f" stage-1 seed {k}: retention {ratio(st['retention'])}; token statistics:",
                "",
            ]
            lines += statistics_table(st["token statistics"]) + [""]
    return lines


def comparisons(results, t) -> List[Tuple[str, Dict, Dict, Dict, Dict]]:
    """The paired comparisons of teacher t's students: (label, A test, B test, A val, B val),
    each seed -> metrics ({} where a split was not evaluated)."""
    tr = results["teachers"][t]
    base = results["baseline"]
    full = {"tokens": tr["maskd"], **tr.get("full", {})}
    full_val = {"tokens": tr.get("maskd val", {}), **tr.get("full val", {})}
    abl, abl_val = tr.get("ablation", {}), tr.get("ablation val", {})
    out = []
    for src in full:
        name = SOURCE_NAMES.get(src, src)
        out.append((f"full recipe, {name} - baseline", full[src], base, {}, {}))
    for a, b in (
        ("tokens_variant", "tokens"),
        ("tokens_variant", "uniform"),
        ("tokens", "uniform"),
    ):
        if a in full and b in full:
            label = f"full recipe, {SOURCE_NAMES[a]} - {SOURCE_NAMES[b]}"
            out.append((label, full[a], full[b], full_val.get(a, {}), full_val.get(b, {})))
    for src in abl:
        if src != "uniform" and "uniform" in abl:
            label = f"features only, {SOURCE_NAMES.get(src, src)} - {SOURCE_NAMES['uniform']}"
            out.append((label, abl[src], abl["uniform"], abl_val.get(src, {}), abl_val["uniform"]))
    if "tokens_variant" in abl and "tokens" in abl:
        label = f"features only, {SOURCE_NAMES['tokens_variant']} - {SOURCE_NAMES['tokens']}"
        out.append(
            (
                label,
                abl["tokens_variant"],
                abl["tokens"],
                abl_val["tokens_variant"],
                abl_val["tokens"],
            )
        )
    return out


def paired_of(a: Dict, b: Dict, seeds) -> Dict[str, float]:
    """:func:`paired` AP differences of two sets of runs (seed -> metrics) over ``seeds``."""
    return paired([a[s]["AP"] for s in seeds], [b[s]["AP"] for s in seeds])


def paired_lines(results, seeds) -> List[str]:
    """Every A minus B of the report, paired by student seed (same seed, same data order), with
    its 95% t-interval and the seeds a difference of its size and spread would need."""
    lines = [
        "## Paired differences",
        "",
        "Every difference is A minus B computed per student seed (both students trained with the"
        " same seed, hence the same initialisation and data order), then averaged; the interval"
        " is the 95% t-interval of that mean over the seeds (mean ± t_{0.975, n-1} sd / sqrt(n)),"
        " n the number of seeds. 'Seeds to resolve' is the fewest seeds whose interval would"
        " exclude zero for a difference of this mean and spread. Test split (reported); val split"
        " (where choices are made) where both were evaluated there.",
        "",
    ]
    for t in results["teachers"]:
        lines += [
            f"Teacher seed {t}:",
            "",
            "| A - B | test: mean [95% interval] (n) | per seed | seeds to resolve |"
            " val: mean [95% interval] (n) |",
            "|---|---|---|---|---|",
        ]
        for label, a, b, a_val, b_val in comparisons(results, t):
            p = paired_of(a, b, seeds)
            val = interval(paired_of(a_val, b_val, seeds)) if a_val and b_val else "-"
            need = seeds_to_resolve(p)
            lines.append(
                f"| {label} | {interval(p)} | {signed_list(p['per seed'])} | {need} | {val} |"
            )
        lines.append("")
    return lines


MIN_REWEIGHTING = 1.3  # the boxes' share of stage 2's loss on p2 against whole-map mimicking
MIN_GAIN_OVER_PAPER = 0.3  # the variant's full recipe minus the paper's


def full_goals(results, seeds) -> List[str]:
    """Goal lines of the full recipe through the variant's tokens (none without them): its
    gain over the paper's tokens (>= +0.3 AP with the 95% interval above zero) and over the
    baseline (>= +1.0 AP), and the variant's stage 1 re-weighting the boxes at p2."""
    lines = []
    for t, tr in results["teachers"].items():
        tag = f"teacher seed {t}: "
        full = tr.get("full", {})
        if "tokens_variant" in full:
            p = paired_of(full["tokens_variant"], tr["maskd"], seeds)
            ok = p["mean"] >= MIN_GAIN_OVER_PAPER and p["low"] > 0  # NaN fails
            lines.append(
                f"- {tag}full recipe, the variant's tokens - the paper's >= +{MIN_GAIN_OVER_PAPER}"
                f" AP with the 95% interval above zero: {'reached' if ok else 'NOT reached'}"
                f" ({interval(p)})"
            )
            p = paired_of(full["tokens_variant"], results["baseline"], seeds)
            ok = p["mean"] >= 1.0  # NaN fails
            lines.append(
                f"- {tag}full recipe, the variant's tokens - baseline student >= +1.0 AP:"
                f" {'reached' if ok else 'NOT reached'} ({interval(p)})"
            )
        kinds = [("learned tokens", tr["tokens"])]
        if "tokens_variant" in tr:
            kinds.append(("the variant's tokens", tr["tokens_variant"]))
        for what, runs in kinds:
            p2 = {k: r["token statistics"].get("p2", {}) for k, r in runs.items()}
            values = {k: reweighting(st) for k, st in p2.items()}
            ok = all(v != "-" and float(v) >= MIN_REWEIGHTING for v in values.values())
            lines.append(
                f"- {tag}{what}: re-weighting of the boxes at p2 >= {MIN_REWEIGHTING}, every"
                f" stage-1 seed: {'reached' if ok else 'NOT reached'} ("
                + ", ".join(f"seed {k}: {v}" for k, v in values.items())
                + ")"
            )
    return lines


def ablation_goals(results, seeds) -> List[str]:
    """Goal lines of the ablation (none without one): the headroom of the oracles over
    whole-map mimicking, the learned tokens' share of it, and whether their weight is spread
    over several tokens."""
    lines = []
    for t, tr in results["teachers"].items():
        abl, val = tr.get("ablation", {}), tr.get("ablation val", {})
        if not abl:
            continue
        tag = f"teacher seed {t}: "
        best = None  # the oracle with the largest gain over uniform on test
        for oracle in ORACLES:
            if oracle not in abl or "uniform" not in abl:
                continue
            d_test = differences(abl[oracle], abl["uniform"], seeds)
            d_val = differences(val[oracle], val["uniform"], seeds) if oracle in val else None
            if best is None or d_test[0] > best[1]:
                best = (oracle, d_test[0])
            lines.append(
                f"- {tag}headroom, {oracle} - uniform >= +{HEADROOM} AP (mean): test "
                f"{'reached' if d_test[0] >= HEADROOM else 'NOT reached'} ({d_test[0]:+.2f}; "
                f"per seed {signed_list(d_test[1])})"
                + (
                    f"; val {'reached' if d_val[0] >= HEADROOM else 'NOT reached'}"
                    f" ({d_val[0]:+.2f}; per seed {signed_list(d_val[1])})"
                    if d_val
                    else ""
                )
            )
        kinds = [("learned tokens", "tokens", tr["tokens"])]
        if "tokens_variant" in tr:
            kinds.append(("the variant's tokens", "tokens_variant", tr["tokens_variant"]))
        for what, src, runs in kinds:
            if src in abl and "uniform" in abl and best is not None:
                gain = differences(abl[src], abl["uniform"], seeds)[0]
                if best[1] >= HEADROOM:
                    ok = gain >= best[1] / 2
                    lines.append(
                        f"- {tag}{what} - uniform >= half of {best[0]} - uniform "
                        f"(>= {best[1] / 2:+.2f}): {'reached' if ok else 'NOT reached'}"
                        f" ({gain:+.2f})"
                    )
                else:
                    lines.append(
                        f"- {tag}{what} - uniform: {gain:+.2f}; no oracle beats uniform by"
                        f" +{HEADROOM} on test (best {best[0]} {best[1]:+.2f}), so this data"
                        " cannot show what learned regions add"
                    )
            levels = {k: partition_levels(r["token statistics"]) for k, r in runs.items()}
            ok = all(len(v) >= MIN_LEVELS for v in levels.values())
            ok = ok and all(r["retention"] >= 0.95 for r in runs.values())  # NaN fails
            lines.append(
                f"- {tag}{what}: effective number of weighted tokens >= {MIN_TOKENS_EFF:g} on"
                f" >= {MIN_LEVELS} levels with retention >= 0.95, every stage-1 seed: "
                f"{'reached' if ok else 'NOT reached'} ("
                + "; ".join(
                    f"seed {k}: {', '.join(v) or 'no level'}, retention"
                    f" {ratio(runs[k]['retention'])}"
                    for k, v in levels.items()
                )
                + ")"
            )
    return lines


def released_vs_training(teachers) -> str:
    """Whether each released student's AP equals the final evaluation of its stage-2 run."""
    pairs = [
        (tr["maskd"][s]["AP"], tr["maskd in training"][s]["AP"])
        for tr in teachers.values()
        if "maskd in training" in tr
        for s in tr["maskd"]
    ]
    same = [a == b or (math.isnan(a) and math.isnan(b)) for a, b in pairs]
    if not pairs:
        return "the stage-2 runs' own evaluations are not in the results"
    if all(same):
        n = len(pairs)
        return f"equal to the stage-2 run's final evaluation in {n} of {n} run(s)"
    return f"DIFFERENT from the stage-2 runs' final evaluation in {same.count(False)} run(s)"


def ratio(x: float) -> str:
    return "n/a" if math.isnan(x) else f"{x:.3f}"
