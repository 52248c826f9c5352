import pytest
import torch

from activations import estimate_norm_factors, extract_activations
from conftest import random_tokens, tiny_model


@pytest.mark.parametrize("hook_point", ["blocks.1.hook_resid_pre", "blocks.0.hook_resid_pre",
                                        "blocks.1.hook_resid_mid", "blocks.1.hook_resid_post",
                                        "blocks.0.hook_resid_post", "hook_embed", "ln_final.hook_normalized"])
def test_extraction_equals_run_with_cache(hook_point):
    model = tiny_model(0, n_layers=3)
    tokens = random_tokens(3, 10)
    _, cache = model.run_with_cache(tokens, names_filter=hook_point)
    got = extract_activations(model, tokens, hook_point)
    assert torch.equal(got, cache[hook_point])


def test_early_stop_skips_later_layers():
    model = tiny_model(0, n_layers=3)
    ran = []
    for i, block in enumerate(model.blocks):
        block.register_forward_hook(lambda *a, i=i: ran.append(i))
    extract_activations(model, random_tokens(2, 6), "blocks.1.hook_resid_pre")
    assert ran == [0]


def test_norm_estimate_with_bos_matches_a_direct_computation(models):
    """estimate_norm_factors(drop_bos=False) is the reference's estimate (the published
    crosscoder's factors): sqrt(d_in) / mean norm over every position, BOS included."""
    tokens = random_tokens(10, 9)
    got = estimate_norm_factors(list(models), tokens, "blocks.1.hook_resid_pre", 8, 3, drop_bos=False, progress=False)
    for m, model in enumerate(models):
        acts = extract_activations(model, tokens[:8], "blocks.1.hook_resid_pre")
        torch.testing.assert_close(got[m], 32 ** 0.5 / acts.norm(dim=-1).mean())
    no_bos = estimate_norm_factors(list(models), tokens, "blocks.1.hook_resid_pre", 8, 3, progress=False)
    torch.testing.assert_close(no_bos[0], 32 ** 0.5 / extract_activations(models[0], tokens[:8], "blocks.1.hook_resid_pre")[:, 1:].norm(dim=-1).mean())
