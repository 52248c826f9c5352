"""gpu_check.py's bookkeeping on the CPU at toy sizes (the GPU figures come from a GPU run)."""
import json

import pytest
import torch

from conftest import run_script
from crossdiff.scale.costs import crosscoder_flops_per_token, sparse_step_flops_per_token
from tools.gpu_check import SHAPES


def test_the_gpu_check_runs_every_part_and_writes_its_table_and_json(tmp_path):
    out = run_script("tools/gpu_check.py", "--device", "cpu", "--shape", "tiny", "--out", str(tmp_path / "check.json"),
                     timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    report = json.loads((tmp_path / "check.json").read_text())
    kinds = [(r["step"], r["step_dtype"]) for r in report["steps"]]
    assert kinds == [(s, d) for d in ("fp32", "tf32", "bf16") for s in ("l1", "batchtopk dense", "batchtopk sparse")]
    # Each share is the step's matmul FLOPs (test_costs.py checks the formulas against torch's
    # counter) at its speed over the measured peak of its dtype, recomputed here; above 1 only if
    # the peak was measured low, and 1.5 leaves room for a second pytest worker on the CPU.
    shape = SHAPES["tiny"]
    for r in report["steps"]:
        cfg = {"n_models": 2, "d_in": shape["d_in"], "dict_size": shape["dict_size"], "k": shape["k"]}
        flops = (sparse_step_flops_per_token if r["step"].endswith("sparse") else crosscoder_flops_per_token)(cfg)
        share = r["tokens_per_s"] * flops / report["matmul_peak_flops"][r["step_dtype"]]
        assert r["tokens_per_s"] > 0 and r["peak_share"] == pytest.approx(share, rel=1e-9) and 0 < share < 1.5, r
    assert set(report["matmul_peak_flops"]) == {"fp32", "tf32", "bf16"}
    assert report["end_to_end"]["tokens_per_s"] > 0 and report["end_to_end"]["peak_memory_gib"] > 0
    assert report["toy"]["returncode"] == 0 and report["toy"]["final"].startswith("final: ")
    assert "batchtopk sparse" in out.stdout and "toy preset on the device: exit 0" in out.stdout
    assert report["sync"] is None and "host syncs in a dense step: not run (a CPU)" in out.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="a machine with a GPU has nothing to refuse")
def test_the_gpu_check_without_a_gpu_says_so_before_anything_runs():
    out = run_script("tools/gpu_check.py", timeout=120)
    assert out.returncode != 0 and "torch sees no CUDA device" in out.stderr and "Traceback" not in out.stderr
