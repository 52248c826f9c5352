import pytest

from conftest import run_script


@pytest.mark.slow
def test_bench_nproc_times_one_and_two_processes_and_prints_the_paper_estimate():
    """A smoke run of `tools/bench.py --nproc 2` (timings are reported, never asserted)."""
    out = run_script("tools/bench.py", "--nproc", "2", "--cycles", "1", timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [line.split() for line in out.stdout.splitlines() if line[:1] in ("1", "2") and "x" in line]
    assert [r[0] for r in rows] == ["1", "2"] and rows[0][2] == "1.00x"
    assert "8 H100 SXM" in out.stdout and "all-reduce of 604 MB" in out.stdout


@pytest.mark.slow
def test_bench_runs_at_the_toy_shape_and_checks_activation_equality():
    """A smoke run (timings are reported, never asserted)."""
    out = run_script("tools/bench.py", "--shape", "toy", "--steps", "5", "--cycles", "1", timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "activations equal: True" in out.stdout
    for line in ("harvest, ours", "harvest, reference", "crosscoder step, fp32", "crosscoder step, bf16",
                 "end to end, ours", "end to end, reference (refresh bug fixed)", "end to end, reference as shipped",
                 "ours / reference as shipped", "of the fp32 peak", "of the bf16 peak",
                 "peak process RSS", "activation store", "largest relative loss difference", "400M tokens"):
        assert line in out.stdout


@pytest.mark.slow
def test_bench_sweep_times_one_crosscoder_and_a_sweep_on_one_harvest():
    """The sweep trains each member on every harvested row (the refresh count is asserted inside
    end_to_end), and the report states the speed-up over separate runs."""
    out = run_script("tools/bench.py", "--sweep", "2", "--cycles", "2", timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "end to end, one crosscoder" in out.stdout and "end to end, sweep of 2 (each)" in out.stdout
    assert "2 crosscoders on 1M tokens each" in out.stdout and "x faster" in out.stdout


def test_bench_times_the_sparse_batchtopk_step_against_the_dense_one():
    """`tools/bench.py --architecture batchtopk --step_only`: the dense steps, the sparse one and the
    speed-up line (timings reported, never asserted)."""
    import re

    out = run_script("tools/bench.py", "--shape", "toy", "--architecture", "batchtopk", "--k", "8", "--step_only",
                     "--steps", "3", timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "batchtopk k 8" in out.stdout and "crosscoder step, fp32, sparse" in out.stdout
    assert re.search(r"sparse/dense BatchTopK step speed-up: \d+\.\d\dx", out.stdout)
