import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from bench import crosscoder_flops_per_token
from conftest import run_script, tiny_cfg
from crosscoder import CrossCoder


def test_flop_formula_equals_torch_flop_counter_on_a_training_step():
    """bench's 10·M·D·F per token = the matmul FLOPs torch counts in a forward + backward."""
    for n_models in (2, 3):
        cfg = tiny_cfg(d_in=24, dict_size=40, n_models=n_models)
        cc = CrossCoder(cfg)
        x = torch.randn(16, n_models, 24)
        with FlopCounterMode(display=False) as counter:
            losses = cc.get_losses(x)
            (losses.l2_loss + losses.l1_loss).backward()
        assert counter.get_total_flops() == 16 * crosscoder_flops_per_token(cfg)


@pytest.mark.slow
def test_bench_runs_at_the_toy_shape_and_checks_activation_equality():
    """A smoke run (timings are reported, never asserted)."""
    out = run_script("bench.py", "--shape", "toy", "--steps", "5", "--cycles", "2", timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "activations equal: True" in out.stdout
    for line in ("harvest, ours", "harvest, reference", "crosscoder step, fp32", "crosscoder step, bf16",
                 "end to end, ours", "end to end, reference (refresh bug fixed)", "end to end, reference as shipped",
                 "ours / reference as shipped", "of the fp32 peak", "of the bf16 peak",
                 "peak process RSS", "activation store", "largest relative loss difference", "400M tokens"):
        assert line in out.stdout
