"""The GPU check (make gpu-check) is ready where no GPU is: --dry-run runs its code paths on
CPU (both stages through MasKDTrainer, the teacher-unchanged and finite-loss checks, the step
benchmark with every case), and without CUDA the plain command says so with its own status."""

import os

import pytest
import torch
from tiny import ROOT, run

GPU_CHECK = os.path.join(ROOT, "tools", "gpu_check.py")


@pytest.mark.slow
def test_dry_run_runs_the_gpu_code_paths_on_cpu(tmp_path):
    out = run([GPU_CHECK, "--dry-run", "--output", str(tmp_path / "gc")], tmp_path)
    summary = out.stdout[out.stdout.index("MasKD GPU check on CPU (dry run)") :]
    for line in (
        "[ok] stage 1 (fp32): losses finite",
        "[ok] stage 1 (fp32): teacher unchanged",
        "[ok] stage 1 (fp32): trained parameters changed",
        "[ok] stage 2 (fp32): losses finite",
        "[ok] stage 2 (fp32): teacher unchanged",
        "[ok] stage 2 (fp32): trained parameters changed",
        "[ok] step benchmark: every case timed",
    ):
        assert line in summary, line
    assert "FAILED" not in summary
    for case in ("(a)", "(b)", "(c)", "(d)", "(e)", "(f)", "(g)"):
        assert f"\n{case} " in summary, case
    for ratio in ("c/(a+b)", "c/d", "e/f", "e/(b+3(g-b))"):
        assert f"\n{ratio} " in summary, ratio


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_without_cuda_the_check_says_so_and_exits_3(tmp_path):
    out = run([GPU_CHECK], tmp_path, check=False)
    assert out.returncode == 3
    assert "no CUDA device" in out.stderr and "--dry-run" in out.stderr
