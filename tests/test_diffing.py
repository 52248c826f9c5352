"""diffing.py's selection rules as the Latent Scaling paper's authors apply them, the splice-in
shortcut and the activation cache (the maths of latent_scaling, splice-in and reconstruction on
hand-built cases is tested in tests/test_analysis.py)."""
import pytest
import torch
from test_analysis import scaling_case

from conftest import random_tokens, tiny_cfg, tiny_model
from crosscoder import CrossCoder
from crossdiff.diffing.measures import (
    ActivationCache,
    effective_chat_only,
    is_model_specific,
    iter_paired_activations,
    latent_scaling,
    norm_difference,
    rank_sum_order,
    reconstruction_stats,
    share_in_transcripts,
    splice_in_loss,
)


def test_the_share_of_top_examples_in_transcripts_counts_only_examples_that_fired():
    """Sequences 0 and 2 are transcripts: of the examples that fired (value > 0) three of four
    sit in one; when none fired the share is None, which analysis.py says in words (formatting
    it as a percentage raised a TypeError there, after the expensive passes)."""
    is_chat = torch.tensor([True, False, True])
    values = torch.tensor([[3.0, 1.0, 0.0], [2.0, 0.5, 0.0]])
    seqs = torch.tensor([[0, 2, 1], [1, 0, 1]])
    assert share_in_transcripts(is_chat, values, seqs) == 0.75
    assert share_in_transcripts(is_chat, torch.zeros(2, 3), seqs) is None


def test_a_latent_is_model_specific_when_both_ratios_are_small_in_absolute_value():
    """|nu_error| < 0.2 and |nu_reconstruction| < 0.5, strict, negative ratios by their size."""
    nu_err = torch.tensor([0.0, 0.19, 0.2, 0.1, -0.15, -0.3, 0.1, float("nan")])
    nu_rec = torch.tensor([0.0, 0.49, 0.1, 0.5, -0.45, 0.0, 0.3, 0.0])
    want = [True, True, False, False, True, False, True, False]
    assert is_model_specific(nu_err, nu_rec).tolist() == want


def test_rank_sum_orders_latents_by_the_sum_of_their_two_ranks():
    nu_err = torch.tensor([0.5, 0.1, 0.3, 0.0])  # ranks 3, 1, 2, 0
    nu_rec = torch.tensor([0.0, 0.4, 0.1, 0.9])  # ranks 0, 2, 1, 3
    # sums: 3, 3, 3, 3 -> ties keep positions; change one to break them
    assert rank_sum_order(nu_err, nu_rec).tolist() == [0, 1, 2, 3]
    nu_rec = torch.tensor([0.0, 0.05, 0.1, 0.9])  # ranks 0, 1, 2, 3: sums 3, 2, 4, 3
    assert rank_sum_order(nu_err, nu_rec).tolist() == [1, 0, 3, 2]


def test_norm_difference_is_the_authors_dec_norm_diff_and_effective_chat_only_takes_the_lowest():
    """0.5 * ((|d_base| - |d_chat|) / max + 1): 0 for a chat-only decoder, 1 for a base-only one,
    0.5 for equal norms, 0.25 for a base decoder half the chat one."""
    cc = CrossCoder(tiny_cfg(d_in=4, dict_size=5))
    norms = torch.tensor([[0.0, 1.0], [1.0, 0.0], [2.0, 2.0], [1.0, 2.0], [3.0, 1.0]])  # [F, (base, chat)]
    with torch.no_grad():
        cc.W_dec.copy_(torch.nn.functional.normalize(torch.randn(5, 2, 4), dim=-1) * norms[..., None])
    torch.testing.assert_close(norm_difference(cc), torch.tensor([0.0, 1.0, 0.5, 0.25, 5 / 6]))
    assert effective_chat_only(cc, 2).tolist() == [0, 3]


def test_latent_scaling_along_the_base_decoder_mirrors_the_chat_probe():
    """The base-only mirror (direction_model=0, ratios chat / base) of a case built by swapping
    the models in tests/test_analysis.py's: the same known ratios come back."""
    cc, batches = scaling_case(alpha=0.7, decoupled=False)
    swapped = CrossCoder(tiny_cfg(d_in=4, dict_size=2))
    with torch.no_grad():
        swapped.W_enc.copy_(cc.W_enc.flip(0))
        swapped.W_dec.copy_(cc.W_dec.flip(1))
    ls = latent_scaling(swapped, [x.flip(1) for x in batches], [0], direction_model=0)
    torch.testing.assert_close(ls["nu_error"], torch.tensor([0.7]), atol=1e-5, rtol=0)
    torch.testing.assert_close(ls["nu_reconstruction"], torch.tensor([0.0]), atol=1e-5, rtol=0)


def test_a_common_vector_in_the_decoder_bias_leaves_latent_scaling_unchanged():
    """A vector c every token of both models holds, carried by b_dec (with b_enc cancelling it in
    the encoder), changes no latent's activation: the ratios stay the known ones (Latent
    Decoupling, alpha 0.4; a truly chat-only latent, 0 and 0), although c lies partly along the
    probed direction."""
    c = torch.tensor([3.0, 0.0, 0.0, 5.0])
    for alpha, decoupled, want_err, want_rec in ((0.4, True, 0.0, 0.4), (0.0, False, 0.0, 0.0)):
        cc, batches = scaling_case(alpha=alpha, decoupled=decoupled)
        f0 = cc.encode(batches[0]).detach()
        with torch.no_grad():
            cc.b_dec.copy_(c.expand(2, 4))
            cc.b_enc.copy_(-torch.einsum("md,mdf->f", cc.b_dec, cc.W_enc))
        shifted = [x + c for x in batches]
        torch.testing.assert_close(cc.encode(shifted[0]), f0, atol=1e-5, rtol=0)
        ls = latent_scaling(cc, shifted, [0])
        torch.testing.assert_close(ls["nu_error"], torch.tensor([want_err]), atol=1e-5, rtol=0)
        torch.testing.assert_close(ls["nu_reconstruction"], torch.tensor([want_rec]), atol=1e-5, rtol=0)


def hooked_losses(cc, models, tokens, hook_point, excluded=()):
    """The three losses of splice_in_loss, each a full forward with a hook at hook_point; the
    positions holding an excluded token keep their clean residual."""
    from crossdiff.diffing.measures import normalisation_factors

    folded = cc.fold_normalisation(normalisation_factors(cc))
    acts = []
    for model in models:
        _, cache = model.run_with_cache(tokens, names_filter=hook_point)
        acts.append(cache[hook_point])
    x = torch.stack([a[:, 1:] for a in acts], dim=2)
    x_hat = folded(x.flatten(0, 1)).view(x.shape)
    out = {}
    for m, model in enumerate(models):
        def splice(act, hook, m=m):
            act = act.clone()
            kept = ~torch.isin(tokens[:, 1:], torch.tensor(list(excluded), dtype=tokens.dtype))
            act[:, 1:][kept] = x_hat[:, :, m][kept]
            return act

        out[m] = [float(model(tokens, return_type="loss")),
                  float(model.run_with_hooks(tokens, return_type="loss", fwd_hooks=[(hook_point, splice)])),
                  float(model.run_with_hooks(tokens, return_type="loss",
                                             fwd_hooks=[(hook_point, lambda act, hook: torch.zeros_like(act))]))]
    return out


@pytest.mark.parametrize("hook_point", ["blocks.1.hook_resid_pre", "blocks.1.hook_resid_mid"])
def test_splice_in_losses_equal_full_forwards_with_the_residual_replaced_at_the_hook(hook_point):
    """At resid_pre the three forwards start at the hook's block from a shared prefix; elsewhere
    they run in full: either way the losses are those of full forwards with a hook, over all rows
    and over each source's rows."""
    torch.manual_seed(0)
    models = [tiny_model(1), tiny_model(2)]
    cc = CrossCoder(tiny_cfg(hook_point=hook_point, normalisation_factor=[0.5, 2.0]))
    tokens = random_tokens(5, 12)
    is_chat = torch.tensor([True, False, True, True, False])
    got = splice_in_loss(cc, models, tokens, batch_size=2, progress=False, is_chat_N=is_chat)
    want = hooked_losses(cc, models, tokens, hook_point)
    by_source = {name: hooked_losses(cc, models, tokens[rows], hook_point)
                 for name, rows in (("chat", is_chat), ("text", ~is_chat))}
    for m in range(2):
        for r, w in [(got[m], want[m])] + [(got[m]["by_source"][k], by_source[k][m]) for k in ("chat", "text")]:
            torch.testing.assert_close(torch.tensor([r["clean"], r["spliced"], r["zero_ablation"]], dtype=torch.float64),
                                       torch.tensor(w, dtype=torch.float64), rtol=1e-5, atol=1e-5)


def test_excluded_positions_keep_their_clean_residual_in_the_splice_in_loss():
    """exclude_tokens leaves those positions out of the splice: the losses are those of full
    forwards that replace only the other positions; excluding every token gives the clean loss."""
    torch.manual_seed(0)
    models = [tiny_model(1), tiny_model(2)]
    tokens = random_tokens(4, 12)
    some = sorted(set(tokens[:, 1::3].flatten().tolist()))
    for excluded in (some, sorted(set(tokens.flatten().tolist()))):
        cc = CrossCoder(tiny_cfg(normalisation_factor=[0.5, 2.0], exclude_tokens=[str(i) for i in excluded]))
        got = splice_in_loss(cc, models, tokens, batch_size=2, progress=False)
        want = hooked_losses(cc, models, tokens, "blocks.1.hook_resid_pre", excluded)
        for m in range(2):
            torch.testing.assert_close(torch.tensor([got[m]["clean"], got[m]["spliced"], got[m]["zero_ablation"]],
                                                    dtype=torch.float64), torch.tensor(want[m], dtype=torch.float64),
                                       rtol=1e-5, atol=1e-5)
    assert got[0]["spliced"] == got[0]["clean"] and got[1]["spliced"] == got[1]["clean"]


@pytest.mark.parametrize("max_bytes, forwards", [(2**30, 1), (0, 2)])
def test_the_activation_cache_replays_a_pass_that_fits_and_harvests_again_one_that_does_not(max_bytes, forwards):
    models = [tiny_model(1), tiny_model(2)]
    tokens = random_tokens(7, 9)
    calls = [0]

    def count(act, hook):
        calls[0] += 1

    for model in models:
        model.blocks[0].hook_resid_pre.add_hook(count)
    cache = ActivationCache(max_bytes)
    passes = [list(cache(models, tokens, "blocks.1.hook_resid_pre", 3, progress=False)) for _ in range(2)]
    assert calls[0] == forwards * 2 * 3  # models x batches per pass that ran the models
    want = list(iter_paired_activations(models, tokens, "blocks.1.hook_resid_pre", 3, progress=False))
    for got in passes:
        for (t, x), (t_want, x_want) in zip(got, want, strict=True):
            torch.testing.assert_close(t, t_want), torch.testing.assert_close(x, x_want)


def test_reconstruction_by_source_pools_each_sources_tokens_and_splits_each_latents_mass():
    """reconstruction_stats with is_chat_N: per source, explained variance over all its tokens
    around its own mean, and each latent's activation mass in chat rows and in all, against the
    same sums over the whole activations; the overall figures are those without is_chat_N."""
    from crossdiff.diffing.measures import class_chat_mass

    torch.manual_seed(0)
    models = [tiny_model(1), tiny_model(2)]
    cc = CrossCoder(tiny_cfg(normalisation_factor=[0.5, 2.0]))
    tokens = random_tokens(7, 9)
    is_chat = torch.tensor([True, False, False, True, True, False, True])
    got = reconstruction_stats(cc, models, tokens, batch_size=3, harvest=ActivationCache(), is_chat_N=is_chat)
    assert reconstruction_stats(cc, models, tokens, batch_size=3) == {
        k: v for k, v in got.items() if k not in ("by_source", "mass_F", "chat_mass_F")}
    x = torch.cat([x for _, x in iter_paired_activations(models, tokens, cc.cfg["hook_point"], 7, progress=False)])
    x = x * torch.tensor([0.5, 2.0])[None, None, :, None]  # [N, S-1, M, D] in the training space
    with torch.no_grad():
        f = cc.encode(x.flatten(0, 1)).view(*x.shape[:2], -1)
        x_hat = cc.decode(f.flatten(0, 1)).view(x.shape)
    for source, rows in (("chat", is_chat), ("text", ~is_chat)):
        xs, hs = x[rows].flatten(0, 1), x_hat[rows].flatten(0, 1)
        want = [1 - (hs[:, m] - xs[:, m]).pow(2).sum() / (xs[:, m] - xs[:, m].mean(0)).pow(2).sum() for m in range(2)]
        torch.testing.assert_close(torch.tensor(got["by_source"][source]["explained_variance_per_model"]),
                                   torch.stack(want), rtol=1e-4, atol=1e-5)
        assert got["by_source"][source]["tokens"] == xs.shape[0]
    torch.testing.assert_close(got["mass_F"], f.sum((0, 1)), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got["chat_mass_F"], f[is_chat].sum((0, 1)), rtol=1e-4, atol=1e-4)
    classes = {"all": torch.ones(64, dtype=torch.bool)}
    share = class_chat_mass(classes, got["mass_F"], got["chat_mass_F"])["all"]["chat_mass_fraction"]
    assert abs(share - float(f[is_chat].sum() / f.sum())) < 1e-5


def test_role_mass_sums_each_latents_activations_over_each_roles_tokens_after_the_dropped_first_positions():
    """reconstruction_stats with roles_NS: each role's activation mass and token count over the
    positions it reads (the first dropped), against sums over the whole activations by a role mask;
    class_role_mass's shares against the same sums, roles with no token left out."""
    from crossdiff.diffing.measures import class_role_mass

    torch.manual_seed(0)
    models = [tiny_model(1), tiny_model(2)]
    cc = CrossCoder(tiny_cfg(normalisation_factor=[0.5, 2.0]))
    tokens = random_tokens(7, 9)
    roles = torch.randint(0, 3, (7, 9), generator=torch.Generator().manual_seed(1)).to(torch.uint8)
    roles[:, 0] = 4  # a role only at the dropped position: never counted
    got = reconstruction_stats(cc, models, tokens, batch_size=3, roles_NS=roles, n_roles=6)
    x = torch.cat([x for _, x in iter_paired_activations(models, tokens, cc.cfg["hook_point"], 7, progress=False)])
    with torch.no_grad():
        f = cc.encode((x * torch.tensor([0.5, 2.0])[None, None, :, None]).flatten(0, 1)).view(*x.shape[:2], -1)
    for r in range(6):
        mask = roles[:, 1:] == r
        torch.testing.assert_close(got["role_mass_RF"][r].float(), f[mask].sum(0), rtol=1e-4, atol=1e-4)
        assert got["role_tokens_R"][r] == mask.sum()
    some = torch.zeros(64, dtype=torch.bool)
    some[:5] = True
    shares = class_role_mass({"some": some}, got["role_mass_RF"], got["role_tokens_R"],
                             ("a", "b", "c", "d", "e", "f"))
    assert list(shares["tokens"]) == ["a", "b", "c"]
    for r, name in enumerate("abc"):
        mask = roles[:, 1:] == r
        assert abs(shares["tokens"][name] - float(mask.float().mean())) < 1e-6
        assert abs(shares["some"][name] - float(f[mask][:, :5].sum() / f[:, :, :5].sum())) < 1e-5


def test_a_partitioned_dictionary_is_classified_by_its_blocks_and_the_free_latents_by_norm():
    """Exclusive blocks are base-only / chat-only whatever their norms; a free latent near 1 is
    then other; designated latents are shared; without exclusive blocks (designated only) the
    free latents keep the norm classes."""
    from crossdiff.arch.partition import DESIGNATED, FREE
    from crossdiff.diffing.classes import classify_latents

    rel = torch.tensor([0.5, 0.95, 0.02, 0.5, 0.95, 0.5, 0.05])
    owner = torch.tensor([0, 1, DESIGNATED, FREE, FREE, FREE, FREE])
    got = classify_latents(rel, owner)
    assert got["base_only"].tolist() == [True, False, False, False, False, False, False]
    assert got["chat_only"].tolist() == [False, True, False, False, False, False, False]
    assert got["shared"].tolist() == [False, False, True, True, False, True, False]
    assert got["other"].tolist() == [False, False, False, False, True, False, True]
    designated_only = classify_latents(rel[2:], owner[2:])
    assert designated_only["chat_only"].tolist() == [False, False, True, False, False]
    assert designated_only["base_only"].tolist() == [False, False, False, False, True]
    assert designated_only["shared"].tolist() == [True, True, False, True, False]
    plain = classify_latents(rel)
    assert plain["chat_only"].tolist() == [False, True, False, False, True, False, False]


def test_an_all_shared_result_is_said_to_be_null_or_not_separated_by_the_models_own_kl():
    """separation_note: nothing when a latent is model-specific; with none, a null result when the
    models agree (KL under 1e-4 nats a token), "not separated yet ... train longer" when they
    differ, and without the KL the two possibilities; the relative norms' spread is stated."""
    from crossdiff.diffing.classes import classify_latents, separation_note

    rel = torch.tensor([0.45, 0.5, 0.55, 0.5])
    classes = classify_latents(rel)
    assert separation_note(classify_latents(torch.tensor([0.5, 0.95])), torch.tensor([0.5, 0.95]), 1.0) is None
    spread = f"{float(rel.std()):.3f}"
    assert separation_note(classes, rel, 0.0).endswith(f"(relative norms spread {spread}), and the models agree here "
                                                       "(KL 0 nats a token): a null result")
    differ = separation_note(classes, rel, 0.5)
    assert "the models differ here (KL 0.5 nats a token): the norms have not separated them yet. Train longer" in differ
    assert "--store_dir with --wrap_tokens true" in differ
    assert "analysis.py's KL test says which" in separation_note(classes, rel)
    across = separation_note(classes, rel, one_vocabulary=False)  # two tokenizers: no KL test to point to
    assert "no KL test applies" in across and "KL test says which" not in across


def test_norm_share_classes_of_two_models_are_the_relative_norms_classes():
    """classify_shares on two models' norm shares gives classify_latents' masks of the relative
    norm (column 1 of the shares), partitioned or not."""
    from crossdiff.arch.partition import DESIGNATED, FREE
    from crossdiff.diffing.classes import classify_latents, classify_shares, norm_shares

    g = torch.Generator().manual_seed(0)
    norms_FM = torch.rand(2000, 2, generator=g) * torch.rand(2000, 1, generator=g).pow(3)  # shares spread over [0, 1]
    share = norm_shares(norms_FM)
    assert torch.allclose(share[:, 1], norms_FM[:, 1] / (norms_FM[:, 0] + norms_FM[:, 1]))
    owners = (None, torch.tensor([FREE] * 1000 + [DESIGNATED] * 500 + [FREE] * 500),
              torch.tensor([0] * 100 + [1] * 100 + [FREE] * 1800))
    for owner in owners:
        want, got = classify_latents(share[:, 1], owner), classify_shares(share, owner)
        assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
        assert sum(m.long() for m in got.values()).eq(1).all()  # each latent in one class


def test_three_models_are_classed_by_each_models_share_of_the_norm():
    """A latent is model m's alone when its share passes 0.9; shared when every model holds more
    than 0.2 (60% of an even third); otherwise other. Exclusive blocks are their owner's alone."""
    from crossdiff.arch.partition import FREE
    from crossdiff.diffing.classes import classify_shares, norm_shares, separation_note

    norms = torch.tensor([[19.0, 0.5, 0.5], [0.1, 0.1, 9.8], [1.0, 1.0, 1.0], [3.0, 3.5, 3.5], [1.0, 4.5, 4.5],
                          [0.0, 0.0, 0.0]])
    got = classify_shares(norm_shares(norms))
    assert list(got) == ["model_0_only", "model_1_only", "model_2_only", "shared", "other"]
    assert got["model_0_only"].tolist() == [True, False, False, False, False, False]
    assert got["model_2_only"].tolist() == [False, True, False, False, False, False]
    assert not got["model_1_only"].any()
    assert got["shared"].tolist() == [False, False, True, True, False, False]
    assert got["other"].tolist() == [False, False, False, False, True, True]  # (0.1 < 0.2; all-zero: NaN)
    blocks = classify_shares(norm_shares(norms), torch.tensor([1, 1, FREE, FREE, FREE, FREE]))
    assert blocks["model_1_only"].tolist() == [True, True, False, False, False, False]
    assert not blocks["model_0_only"].any() and not blocks["model_2_only"].any()
    assert separation_note(got, norm_shares(norms)) is None
    even = norm_shares(torch.ones(4, 3))
    assert "no latent is any one model's alone" in separation_note(classify_shares(even), even)
