"""costs.py's formulas against torch's own counters: FlopCounterMode for the FLOPs of a training
step and of a harvest, MemTracker for the peak memory of a training step."""
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from conftest import tiny_cfg
from crosscoder import ARCHITECTURES, CrossCoder
from crossdiff.scale.costs import crosscoder_flops_per_token, harvest_flops_per_token, memory_per_rank
from trainer import Trainer


def test_flop_formula_equals_torch_flop_counter_on_a_training_step():
    """costs.py's 10·M·D·F per token = the matmul FLOPs torch counts in a forward + backward."""
    for n_models in (2, 3):
        cfg = tiny_cfg(d_in=24, dict_size=40, n_models=n_models)
        cc = CrossCoder(cfg)
        x = torch.randn(16, n_models, 24)
        with FlopCounterMode(display=False) as counter:
            losses = cc.get_losses(x)
            (losses.l2_loss + losses.l1_loss).backward()
        assert counter.get_total_flops() == 16 * crosscoder_flops_per_token(cfg)


def test_harvest_flop_formula_equals_torch_flop_counter_on_a_gemma_like_forward():
    """costs.py's per-token harvest FLOPs (grouped K/V heads, gated MLP, full-square
    attention) = what torch counts when activations are extracted at blocks.2.hook_resid_pre."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    from crossdiff.sources.activations import extract_activations

    cfg = HookedTransformerConfig(n_layers=3, d_model=32, d_head=8, n_heads=4, n_key_value_heads=2, d_mlp=48,
                                  gated_mlp=True, act_fn="gelu", d_vocab=50, n_ctx=16, normalization_type="RMS", seed=0)
    model = HookedTransformer(cfg).eval()
    tokens = torch.randint(0, 50, (3, 12))
    with FlopCounterMode(display=False) as counter:
        extract_activations(model, tokens, "blocks.2.hook_resid_pre")
    assert counter.get_total_flops() == 3 * 12 * harvest_flops_per_token(cfg, n_layers=2, seq_len=12)


@pytest.mark.parametrize("architecture", ["l1", "batchtopk"])
def test_the_memory_formula_matches_what_a_training_step_allocates(architecture):
    """memory_per_rank against torch's MemTracker peak over one training step (weights,
    gradients, Adam state and temporaries), from rows < M x d_in to rows >> M x d_in, where the
    peak moves from the backward pass to the forward: within -5% / +25% (it rounds up)."""
    from torch.distributed._tools.mem_tracker import MemTracker

    for rows, d_in, latents in ((192, 96, 3072), (384, 48, 8192), (2048, 32, 2048)):
        cfg = tiny_cfg(d_in=d_in, dict_size=latents, batch_size=rows, num_tokens=rows * 10, architecture=architecture,
                       k=8, aux_k=64)
        x = torch.randn(rows, 2, d_in)
        trainer = Trainer(cfg, buffer=type("Fixed", (), {"next": lambda self: x})())
        trainer.step()  # Adam's state exists from here on
        tracker = MemTracker()
        tracker.track_external(trainer.crosscoder, trainer.optimizer, x)
        with tracker:
            trainer.step()
        measured = sum(v.get("Total", 0) for v in tracker.get_tracker_snapshot("peak").values())
        predicted = memory_per_rank(d_in, latents, ARCHITECTURES[architecture].STEP_PHASES, 1, rows)
        assert 0.95 < predicted / measured < 1.25, (rows, d_in, latents, predicted / measured)
