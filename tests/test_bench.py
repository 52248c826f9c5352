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


def test_harvest_flop_formula_equals_torch_flop_counter_on_a_gemma_like_forward():
    """bench_parallel's per-token harvest FLOPs (grouped K/V heads, gated MLP, full-square
    attention) = what torch counts when activations are extracted at blocks.2.hook_resid_pre."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    from activations import extract_activations
    from bench import harvest_flops_per_token

    cfg = HookedTransformerConfig(n_layers=3, d_model=32, d_head=8, n_heads=4, n_key_value_heads=2, d_mlp=48,
                                  gated_mlp=True, act_fn="gelu", d_vocab=50, n_ctx=16, normalization_type="RMS", seed=0)
    model = HookedTransformer(cfg).eval()
    tokens = torch.randint(0, 50, (3, 12))
    with FlopCounterMode(display=False) as counter:
        extract_activations(model, tokens, "blocks.2.hook_resid_pre")
    assert counter.get_total_flops() == 3 * 12 * harvest_flops_per_token(cfg, n_layers=2, seq_len=12)


@pytest.mark.slow
def test_bench_nproc_times_one_and_two_processes_and_prints_the_paper_estimate():
    """A smoke run of `bench.py --nproc 2` (timings are reported, never asserted)."""
    out = run_script("bench.py", "--nproc", "2", "--cycles", "1", timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [line.split() for line in out.stdout.splitlines() if line[:1] in ("1", "2") and "x" in line]
    assert [r[0] for r in rows] == ["1", "2"] and rows[0][2] == "1.00x"
    assert "8 H100 SXM" in out.stdout and "all-reduce of 604 MB" in out.stdout


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


@pytest.mark.slow
def test_bench_sweep_times_one_crosscoder_and_a_sweep_on_one_harvest():
    """The sweep trains each member on every harvested row (the refresh count is asserted inside
    end_to_end), and the report states the speed-up over separate runs."""
    out = run_script("bench.py", "--sweep", "2", "--cycles", "2", timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "end to end, one crosscoder" in out.stdout and "end to end, sweep of 2 (each)" in out.stdout
    assert "2 crosscoders on 1M tokens each" in out.stdout and "x faster" in out.stdout
