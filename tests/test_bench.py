from conftest import run_script


def test_bench_runs_at_the_toy_shape_and_checks_activation_equality():
    """A smoke run (timings are reported, never asserted)."""
    out = run_script("bench.py", "--shape", "toy", "--steps", "5", timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "activations equal: True" in out.stdout
    for line in ("harvest, ours", "harvest, reference", "crosscoder step", "end to end, ours", "end to end, reference",
                 "of peak", "peak process memory", "activation store"):
        assert line in out.stdout
