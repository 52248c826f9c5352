import pytest
import torch

from conftest import random_tokens, tiny_model
from crossdiff.sources.activations import estimate_norm_factors, extract_activations


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


def test_the_difference_scale_is_one_factor_that_gives_chat_minus_base_a_mean_norm_of_sqrt_d_in(models):
    """norm_scale "difference" (the diff-SAE's): both models get sqrt(d_in) / the mean norm of
    h_chat - h_base, so the scaled difference is the difference of the raw activations, scaled."""
    tokens = random_tokens(10, 9)
    got = estimate_norm_factors(list(models), tokens, "blocks.1.hook_resid_pre", 8, 3, progress=False, difference=True)
    h = [extract_activations(m, tokens[:8], "blocks.1.hook_resid_pre")[:, 1:] for m in models]
    want = 32 ** 0.5 / (h[1] - h[0]).norm(dim=-1).mean()
    torch.testing.assert_close(got, torch.stack([want, want]))


def test_the_centred_scale_gives_each_models_activations_about_their_mean_an_rms_norm_of_sqrt_d_in(models, tmp_path):
    """norm_scale "centred": a model whose residual is mostly one constant vector gets its varying
    part at the others' scale. The streaming estimate (sums, one pass) and the aligned rows' (rows
    in hand) each equal the direct computation."""
    tokens = random_tokens(10, 9)
    got = estimate_norm_factors(list(models), tokens, "blocks.1.hook_resid_pre", 8, 3, progress=False, norm_scale="centred")
    for m, model in enumerate(models):
        x = extract_activations(model, tokens[:8], "blocks.1.hook_resid_pre")[:, 1:].flatten(0, 1).double()
        torch.testing.assert_close(got[m], (32 ** 0.5 / (x - x.mean(0)).pow(2).sum(-1).mean().sqrt()).float())
    pair, rows = aligned_pair(tmp_path)
    hooks = ["blocks.1.hook_resid_pre", "blocks.2.hook_resid_pre"]
    got = estimate_norm_factors(pair, rows, hooks, 8, 3, progress=False, norm_scale="centred", target_width=28)
    from crossdiff.sources.activations import run_models

    x = run_models(pair, rows[:8], hooks, first=1, d_in=32).double()
    want = 28 ** 0.5 / (x - x.mean(0)).pow(2).sum(-1).mean(0).sqrt()
    torch.testing.assert_close(got, want.float())


def test_norm_factors_are_estimated_in_fp32_even_where_the_harvest_runs_under_bf16_autocast(models, monkeypatch):
    """On a GPU the models run under bf16 autocast for the harvest (activations.autocast_context);
    the factors are estimated without it, in fp32, as the reference did. Simulated on the CPU by
    making autocast_context a bf16 autocast: the estimate still equals the fp32 computation."""
    from crossdiff.sources import activations

    monkeypatch.setattr(activations, "autocast_context", lambda device: torch.autocast("cpu", dtype=torch.bfloat16))
    tokens = random_tokens(8, 9)
    got = estimate_norm_factors(list(models), tokens, "blocks.1.hook_resid_pre", 8, 4, progress=False)
    for m, model in enumerate(models):
        acts = extract_activations(model, tokens, "blocks.1.hook_resid_pre")[:, 1:]
        torch.testing.assert_close(got[m], 32 ** 0.5 / acts.norm(dim=-1).mean(), rtol=1e-6, atol=0)
    fp32 = extract_activations(models[0], tokens, "blocks.1.hook_resid_pre")
    with activations.autocast_context("cpu"):  # the simulated harvest does round: the test can tell
        bf16 = extract_activations(models[0], tokens, "blocks.1.hook_resid_pre").float()
    assert (bf16 - fp32).abs().max() > 1e-4


def test_a_model_listed_twice_runs_once_and_fills_both_columns(models):
    """run_models on [m, m] (the null pair): one forward, the same activations in both models'
    columns; [base, chat] still runs each."""
    from crossdiff.sources.activations import run_models

    base, chat = models
    calls = []
    handle = base.blocks[0].register_forward_hook(lambda *a: calls.append(1))
    tokens = random_tokens(3, 9)
    rows = run_models([base, base], tokens, "blocks.1.hook_resid_pre")
    handle.remove()
    assert len(calls) == 1 and torch.equal(rows[:, 0], rows[:, 1])
    want = extract_activations(base, tokens, "blocks.1.hook_resid_pre")[:, 1:].flatten(0, 1)
    torch.testing.assert_close(rows[:, 0], want)
    both = run_models([base, chat], tokens, "blocks.1.hook_resid_pre")
    assert not torch.equal(both[:, 0], both[:, 1])


def test_a_position_far_above_the_others_norm_is_named_with_its_token_and_the_options(models):
    """high_norm_positions: the positions whose median norm is over 10x the overall median, each
    with the token most often there; high_norm_note on a model whose position 2 is blown up 100x
    names it, its token, and --ignore_first_n 3 / --outlier_norm_multiple; an ordinary model
    gets no note."""
    from crossdiff.sources.activations import high_norm_note, high_norm_positions

    norms = torch.ones(6, 5)
    norms[:, 1] = 40.0
    tokens = torch.randint(0, 50, (6, 6))
    tokens[:4, 2] = 7  # position 1 after one dropped: the full row's 2
    (found,) = high_norm_positions(tokens, norms, first=1)
    assert found[:3] == (2, 40.0, 1.0) and found[3] == 7 and found[4] == pytest.approx(4 / 6)
    base, chat = models
    tokens = random_tokens(8, 9)
    assert high_norm_note([base, chat], tokens, "blocks.1.hook_resid_pre", 1) is None
    base.add_hook("blocks.0.hook_resid_post", lambda act, hook: act * torch.tensor([1, 1, 100, 1, 1, 1, 1, 1, 1.0])[
        None, : act.shape[1], None])
    try:
        note = high_norm_note([base, chat], tokens, "blocks.1.hook_resid_pre", 1)
    finally:
        base.reset_hooks()
    assert note.startswith("note: position 2 (median norm") and "--ignore_first_n 3 or --outlier_norm_multiple 10" in note


def aligned_pair(tmp_path):
    """Two tiny models of different widths, depths and tokenizers (words, characters), and the
    aligned rows of a mix built for them."""
    from crossdiff.sources.aligned_mix import build_aligned_mix, load_aligned_rows
    from test_aligned_mix import char_tokenizer
    from test_data import word_tokenizer, write_sources

    text, chat = write_sources(tmp_path, n_text=120, n_chat=120)
    build_aligned_mix([word_tokenizer(), char_tokenizer()], [{"kind": "text", "path": text, "fraction": 0.5},
                                                            {"kind": "chat", "path": chat, "fraction": 0.5}],
                      seq_len=24, num_tokens=24 * 40, out_dir=tmp_path / "mix", heldout_fraction=0.1)
    models = [tiny_model(0, d_model=32, n_layers=2, n_ctx=32), tiny_model(1, d_model=24, n_layers=3, n_ctx=32)]
    return models, load_aligned_rows(tmp_path / "mix", split="train")


def test_aligned_rows_give_each_models_activation_at_its_own_aligned_position_padded(tmp_path):
    from crossdiff.sources.activations import run_models

    models, rows = aligned_pair(tmp_path)
    hooks = ["blocks.1.hook_resid_pre", "blocks.2.hook_resid_pre"]
    x_PMD = run_models(models, rows[:3], hooks, first=1, d_in=32)
    expected = []  # row by row, tuple by tuple, from each model's own cache
    for n in range(3):
        caches = [m.run_with_cache(rows[n:n + 1, :, i].long())[1][h][0] for i, (m, h) in enumerate(zip(models, hooks))]
        for i, j in rows[n, :, 2:].tolist():
            if i >= 1 and j >= 1:
                expected.append(torch.stack([caches[0][i], torch.cat([caches[1][j], torch.zeros(8)])]))
    assert len(expected) > 10
    torch.testing.assert_close(x_PMD, torch.stack(expected), atol=1e-5, rtol=1e-5)
    assert x_PMD[:, 1, 24:].abs().max() == 0
