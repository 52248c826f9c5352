"""causal.py: the KL gap a latent set closes, against a brute-force computation (hooked forwards,
the patch summed latent by latent, KL summed by hand in float64), and its edge cases."""
import pytest
import torch

from conftest import random_tokens, tiny_cfg, tiny_model
from crosscoder import CrossCoder
from crossdiff.diffing.causal import ALL, ALL_BIAS, fraction_closed, kl_gap_closed

HOOK = "blocks.1.hook_resid_pre"


def crosscoder_with_firing_latents():
    cc = CrossCoder(tiny_cfg(d_in=32, dict_size=16, normalisation_factor=[0.7, 1.3], hook_point=HOOK))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        cc.b_enc.copy_(torch.rand(16, generator=g) * 0.5)
        cc.b_dec.copy_(torch.randn(2, 32, generator=g) * 0.3)
        cc.W_dec.mul_(5.0)
    return cc.eval()


def brute_force(cc, models, tokens, latents, with_bias, mask):
    """Mean KL(P_chat || P_S) and the gap over the positions of mask (position 0, the BOS, is
    never patched), each position's patch summed latent by latent in raw space."""
    s = cc.cfg["normalisation_factor"]
    base_cache = models[0].run_with_cache(tokens)[1][HOOK]
    chat_cache = models[1].run_with_cache(tokens)[1][HOOK]
    f = cc.encode(torch.stack([base_cache * s[0], chat_cache * s[1]], dim=2).flatten(0, 1)).view(*tokens.shape, -1)
    patched = base_cache.clone().double()
    for n in range(tokens.shape[0]):
        for p in range(1, tokens.shape[1]):
            for j in latents:
                patched[n, p] += f[n, p, j].double() * (cc.W_dec[j, 1].double() / s[1] - cc.W_dec[j, 0].double() / s[0])
            if with_bias:
                patched[n, p] += cc.b_dec[1].double() / s[1] - cc.b_dec[0].double() / s[0]

    def logits_with(resid):
        return models[1].run_with_hooks(tokens, fwd_hooks=[(HOOK, lambda act, hook: resid.to(act.dtype))]).double()

    clean = models[1](tokens).double()

    def mean_kl(other):
        total = 0.0
        for n, p in mask.nonzero().tolist():
            P, Q = torch.softmax(clean[n, p], -1), torch.softmax(other[n, p], -1)
            total += float((P * (P.log() - Q.log())).sum())
        return total / int(mask.sum())

    return mean_kl(logits_with(base_cache)), mean_kl(logits_with(patched))


@torch.no_grad()
def test_the_kl_gap_and_what_each_set_closes_equal_a_brute_force_computation():
    """Three sets (every latent without and with the decoder-bias difference, three latents) in
    two groups of positions: the gap and KL_S equal the brute force to 1e-5, and the fraction
    closed is 1 - KL_S / KL_gap."""
    models = [tiny_model(1), tiny_model(2)]
    cc = crosscoder_with_firing_latents()
    tokens = random_tokens(5, 9)
    odd = torch.zeros(5, 9, dtype=torch.bool)
    odd[:, 1::2] = True
    groups = {"all": torch.ones(5, 9, dtype=torch.bool), "odd": odd}
    sets = {"every": ALL, "every+bias": ALL_BIAS, "three": [1, 5, 7]}
    got = kl_gap_closed(cc, models, tokens, sets, groups, batch_size=2, progress=False)
    assert (cc.encode(torch.randn(64, 2, 32)) > 0).any(0).sum() > 8  # the sets do something
    for name, latents, bias in (("every", range(16), False), ("every+bias", range(16), True), ("three", [1, 5, 7], False)):
        for g, mask in groups.items():
            mask = mask.clone()
            mask[:, 0] = False  # the BOS position is never patched and counts in no group
            gap, patched = brute_force(cc, models, tokens, latents, bias, mask)
            row = got[name, g]
            assert row["n_positions"] == int(mask.sum()) and row["n_latents"] == len(latents)
            assert row["kl_gap"] == pytest.approx(gap, abs=1e-5) and row["kl_patched"] == pytest.approx(patched, abs=1e-5)
            assert row["fraction_closed"] == pytest.approx(1 - patched / gap, abs=1e-5)
    assert got["every", "all"]["kl_gap"] > 1e-3  # the two models differ
    shared = kl_gap_closed(cc, models, tokens, sets, groups, batch_size=2, progress=False, forward_rows=6)
    for key, row in got.items():  # three sets in one forward of 6 rows: the same figures
        assert shared[key]["kl_patched"] == pytest.approx(row["kl_patched"], abs=1e-6)


@torch.no_grad()
def test_a_model_against_itself_has_no_gap_and_bad_sets_are_named():
    """The null pair: a zero gap is reported as zero with no fraction (never a NaN); an empty
    group has no positions and no KL; a latent outside the dictionary is an error naming it."""
    models = [tiny_model(1), tiny_model(1)]
    cc = crosscoder_with_firing_latents()
    tokens = random_tokens(4, 9)
    groups = {"all": torch.ones(4, 9, dtype=torch.bool), "none": torch.zeros(4, 9, dtype=torch.bool)}
    got = kl_gap_closed(cc, models, tokens, {"every": ALL}, groups, progress=False)
    assert got["every", "all"]["kl_gap"] == pytest.approx(0.0, abs=1e-6) and got["every", "all"]["fraction_closed"] is None
    assert got["every", "none"] == {"n_latents": 16, "n_positions": 0, "kl_gap": None, "kl_patched": None,
                                    "fraction_closed": None}
    assert fraction_closed(0.0, 0.0) is None and fraction_closed(2.0, 0.5) == 0.75
    assert fraction_closed(5e-5, 1e-3) is None  # a gap under MIN_GAP: the models agree
    with pytest.raises(ValueError, match="latent 16 is outside the dictionary"):
        kl_gap_closed(cc, models, tokens, {"bad": [3, 16]}, groups, progress=False)


def test_the_standard_sets_split_the_probed_latents_by_latent_scalings_rank_sum():
    """Latents 10..15 probed: the ones passing the paper's rule are chat_specific, and the halves
    split them by the rank sum of the two ratios (smallest first, NaN last)."""
    from crossdiff.diffing.causal import diffing_sets

    probed = torch.arange(10, 16)
    ls = {"nu_error": torch.tensor([0.1, 0.9, 0.05, float("nan"), 0.5, 0.3]),
          "nu_reconstruction": torch.tensor([0.2, 0.8, 0.1, 0.1, 0.6, 0.4])}
    sets = diffing_sets(torch.tensor([3, 4]), probed, ls, given=[7])
    assert sets["all"] == ALL and sets["all+bias"] == ALL_BIAS and sets["chat_only"] == [3, 4] and sets["given"] == [7]
    assert sets["chat_specific"] == [10, 12]  # |nu_error| < 0.2 and |nu_reconstruction| < 0.5
    # rank sums (ascending ranks, NaN as +inf, ties by position): 12: 0+0, 10: 1+2, 15: 2+3,
    # 13: 5+1, 14: 3+4, 11: 4+5
    assert sets["ls_top_half"] == [12, 10, 15] and sets["ls_bottom_half"] == [13, 14, 11]


def test_the_toy_base_model_against_itself_comes_out_as_no_difference(tmp_path):
    """The null pair: a crosscoder trained 400 steps on the toy base model and an identical copy.
    Every latent is shared (relative norm within 0.4-0.6: no latent model-specific, a
    false-positive rate of 0 of 1024), and the KL test finds a gap of exactly 0 and reports no
    fraction for any set (never a NaN)."""
    import copy

    from crossdiff.config.schema import complete_cfg
    from crossdiff.diffing.classes import latent_classes
    from crossdiff.pairs.toy import build_toy_pair, heldout_tokens, token_groups
    from trainer import Trainer

    cfg = complete_cfg({"preset": "toy", "data_dir": str(tmp_path / "data"), "checkpoint_dir": str(tmp_path / "ckpt"),
                        "num_tokens": 512 * 400, "progress": False, "wandb_mode": "disabled"})
    base, _, tokens, _ = build_toy_pair(cfg)
    twin = copy.deepcopy(base)
    trainer = Trainer(cfg, models=[base, twin], tokens=tokens)
    trainer.train()
    cc = trainer.crosscoder.eval()
    rel = cc.relative_decoder_norm().detach()
    assert ((rel > 0.4) & (rel < 0.6)).all() and int(latent_classes(cc)["shared"].sum()) == 1024
    held, is_chat = heldout_tokens(cfg, 32)
    got = kl_gap_closed(cc, [base, twin], held, {"every": ALL, "every+bias": ALL_BIAS, "some": [0, 1, 2]},
                        token_groups(held, is_chat), progress=False)
    assert all(row["kl_gap"] == 0.0 and row["fraction_closed"] is None for row in got.values() if row["n_positions"])


@torch.no_grad()
def test_where_the_models_differ_is_their_kl_per_position_averaged_per_group_and_ranked():
    """models_kl against KL(P_chat || P_base) summed by hand in float64 at every position from 1
    on: each group's mean, and the 5 largest with their sequence and position."""
    from crossdiff.diffing.causal import models_kl

    models = [tiny_model(1), tiny_model(2)]
    tokens = random_tokens(5, 9)
    odd = torch.zeros(5, 9, dtype=torch.bool)
    odd[:, 1::2] = True
    by_group, top = models_kl(models, tokens, {"all": torch.ones(5, 9, dtype=torch.bool), "odd": odd}, batch_size=2,
                              top=5, progress=False)
    chat, base = models[1](tokens).double(), models[0](tokens).double()
    kl = {}
    for n in range(5):
        for p in range(1, 9):
            P, Q = torch.softmax(chat[n, p], -1), torch.softmax(base[n, p], -1)
            kl[n, p] = float((P * (P.log() - Q.log())).sum())
    assert by_group["all"]["n_positions"] == 40 and by_group["odd"]["n_positions"] == 20
    assert by_group["all"]["kl"] == pytest.approx(sum(kl.values()) / 40, abs=1e-6)
    assert by_group["odd"]["kl"] == pytest.approx(sum(v for (n, p), v in kl.items() if p % 2) / 20, abs=1e-6)
    want = sorted(kl.items(), key=lambda item: -item[1])[:5]
    assert [(n, p) for _, n, p in top] == [k for k, _ in want]
    assert [v for v, _, _ in top] == pytest.approx([v for _, v in want], abs=1e-6)


@torch.no_grad()
def test_the_activation_difference_lens_its_logit_lens_and_its_kl_gap_closed():
    """adl_direction is the mean of h_chat - h_base over positions 1..5 (computed from cached
    residuals); its logit lens is the model's final norm and unembedding of it; added at every
    position from 1 on, the KL it leaves equals a hooked forward with the KL summed by hand."""
    from crossdiff.diffing.causal import adl_direction, logit_lens

    models = [tiny_model(1), tiny_model(2)]
    tokens = random_tokens(6, 9)
    cache = [m.run_with_cache(tokens)[1][HOOK] for m in models]
    direction = adl_direction(models, tokens, HOOK, n_positions=5, batch_size=4)
    torch.testing.assert_close(direction, (cache[1] - cache[0])[:, 1:6].mean((0, 1)), atol=1e-6, rtol=1e-5)
    lens = logit_lens(models[1], direction, top=3)
    logits = models[1].unembed(models[1].ln_final(direction[None, None]))[0, 0]
    assert [int(t) for t, _ in lens] == logits.topk(3).indices.tolist()
    assert logit_lens(models[1], torch.zeros_like(direction)) == []  # the null pair's: no token is promoted

    cc = crosscoder_with_firing_latents()
    mask = torch.ones(6, 9, dtype=torch.bool)
    got = kl_gap_closed(cc, models, tokens, {"adl": direction}, {"all": mask}, progress=False)["adl", "all"]
    patched = cache[0].clone()
    patched[:, 1:] += direction
    clean = models[1](tokens).double()
    other = models[1].run_with_hooks(tokens, fwd_hooks=[(HOOK, lambda act, hook: patched)]).double()
    P, Q = torch.softmax(clean[:, 1:], -1), torch.softmax(other[:, 1:], -1)
    assert got["n_latents"] == 0 and got["n_positions"] == 6 * 8
    assert got["kl_patched"] == pytest.approx(float((P * (P.log() - Q.log())).sum(-1).mean()), abs=1e-5)


@torch.no_grad()
def test_ranking_latents_by_the_gap_each_closes_alone_orders_them_by_their_own_rows():
    """rank_by_gap_closed's order and fractions are those of each latent's own singleton row of
    kl_gap_closed, largest first."""
    from crossdiff.diffing.causal import rank_by_gap_closed

    models = [tiny_model(1), tiny_model(2)]
    cc = crosscoder_with_firing_latents()
    tokens = random_tokens(4, 9)
    mask = torch.ones(4, 9, dtype=torch.bool)
    order, closed = rank_by_gap_closed(cc, models, tokens, mask, candidates_J=[2, 5, 7, 11], progress=False)
    alone = {j: kl_gap_closed(cc, models, tokens, {"s": [j]}, {"g": mask}, progress=False)["s", "g"]["fraction_closed"]
             for j in (2, 5, 7, 11)}
    assert order.tolist() == sorted(alone, key=lambda j: -alone[j])
    assert closed.tolist() == pytest.approx(sorted(alone.values(), reverse=True), abs=1e-9)


@torch.no_grad()
def test_the_ranked_sets_take_the_top_share_of_the_ranking_alone_and_with_the_bias():
    """ranked_sets with share 0.25 of 16 latents: the first 4 of rank_by_gap_closed's order, as a
    plain set and as WithBias."""
    from crossdiff.diffing.causal import WithBias, rank_by_gap_closed, ranked_sets

    models = [tiny_model(1), tiny_model(2)]
    cc = crosscoder_with_firing_latents()
    tokens = random_tokens(4, 9)
    mask = torch.ones(4, 9, dtype=torch.bool)
    order, _ = rank_by_gap_closed(cc, models, tokens, mask, progress=False)
    sets = ranked_sets(cc, models, tokens, mask, share=0.25, progress=False)
    assert sets == {"ranked4": order[:4].tolist(), "ranked4+bias": WithBias(order[:4].tolist())}


@torch.no_grad()
def test_the_diff_sae_patches_the_base_residual_with_its_reconstruction_of_the_difference():
    """A diff-SAE's set S patches h_base + sum_{j in S} f_j d_j / s (f from the scaled
    difference s (h_chat - h_base), kept above the threshold; d_j its decoder): the KL test equals
    that patch run through the chat model's remaining layers, KL summed by hand."""
    models = [tiny_model(1), tiny_model(2)]
    cc = CrossCoder(tiny_cfg(d_in=32, dict_size=16, architecture="diff_sae", k=4, normalisation_factor=[0.9, 0.9],
                             hook_point=HOOK)).eval()
    with torch.no_grad():
        cc.b_enc.copy_(torch.rand(16, generator=torch.Generator().manual_seed(0)) * 0.5)
        cc.W_dec[:, 1].mul_(5.0)
        cc.threshold.fill_(0.2)
    tokens = random_tokens(4, 9)
    mask = torch.ones(4, 9, dtype=torch.bool)
    mask[:, 0] = False
    got = kl_gap_closed(cc, models, tokens, {"three": [2, 5, 11], "every+bias": ALL_BIAS}, {"all": mask},
                        batch_size=2, progress=False)
    h = [m.run_with_cache(tokens)[1][HOOK] for m in models]
    V = cc.W_dec[:, 1]
    pre = torch.relu(0.9 * (h[1] - h[0]) @ cc.W_enc[1] + cc.b_enc)
    f = pre * (pre * V.norm(dim=-1) > 0.2)
    assert (f[..., [2, 5, 11]] > 0).any()  # the set does something
    clean = models[1](tokens).double()
    for name, latents, bias in (("three", [2, 5, 11], False), ("every+bias", list(range(16)), True)):
        patched = h[0].clone().double()
        patched[:, 1:] += (f[:, 1:, latents].double() @ V[latents].double() + bias * cc.b_dec[1].double()) / 0.9
        logits = models[1].run_with_hooks(tokens, fwd_hooks=[(HOOK, lambda act, hook: patched.to(act.dtype))]).double()
        P, Q = torch.softmax(clean, -1), torch.softmax(logits, -1)
        kl = (P * (P.log() - Q.log())).sum(-1)[mask].mean()
        assert got[name, "all"]["kl_patched"] == pytest.approx(float(kl), abs=1e-5)


@torch.no_grad()
def test_each_latents_own_gap_is_measured_on_the_positions_where_it_fires():
    """gap_where_firing: latent j patched alone, over the positions where j fires (BOS never):
    equal to the brute force on that mask, computed from the latent's activations by hand."""
    from crossdiff.diffing.causal import gap_where_firing

    models = [tiny_model(1), tiny_model(2)]
    cc = crosscoder_with_firing_latents()
    tokens = random_tokens(4, 9)
    s = cc.cfg["normalisation_factor"]
    h = [m.run_with_cache(tokens)[1][HOOK] for m in models]
    f = cc.encode(torch.stack([h[0] * s[0], h[1] * s[1]], dim=2).flatten(0, 1)).view(4, 9, -1)
    fires = f[:, 1:] > 0
    picked = [j for j in range(16) if 0 < int(fires[..., j].sum()) < 32][:2]  # somewhere, not everywhere
    assert len(picked) == 2
    got = gap_where_firing(cc, models, tokens, picked, batch_size=2, progress=False)
    for j in picked:
        mask = f[..., j] > 0
        mask[:, 0] = False
        gap, patched = brute_force(cc, models, tokens, [j], False, mask)
        assert got[j]["n_positions"] == int(mask.sum())
        assert got[j]["kl_gap"] == pytest.approx(gap, abs=1e-5) and got[j]["kl_patched"] == pytest.approx(patched, abs=1e-5)
    assert gap_where_firing(cc, models, tokens, [], progress=False) == {}  # nothing probed (no chat-only latent)


def test_sets_that_say_nothing_are_left_out_and_named():
    """An empty set and one holding every latent (the diff-SAE's chat-only class: the "all" row
    again) are left out and named; the markers and proper sets stay."""
    from crossdiff.diffing.causal import informative_sets

    sets = {"all": ALL, "all+bias": ALL_BIAS, "chat_only": list(range(8)), "chat_specific": [], "given": [1, 2]}
    kept, note = informative_sets(sets, 8)
    assert kept == {"all": ALL, "all+bias": ALL_BIAS, "given": [1, 2]}
    assert note == "KL test: no latent in chat_specific; chat_only holds every latent (the all row); left out"
    assert informative_sets({"all": ALL, "given": [1]}, 8) == ({"all": ALL, "given": [1]}, None)


def test_the_kl_from_the_references_log_probs_taken_once_is_the_kl_from_its_logits():
    """kl_gap_closed takes the clean model's log-softmax once a batch (log_probs, in place on fp32
    logits) and compares every patched forward with it: the same KL, per position, as torch's
    kl_div from the two distributions, for fp32 and bf16 logits (bf16 ones are left as they are)."""
    from crossdiff.diffing.causal import kl_per_position, log_probs

    g = torch.Generator().manual_seed(0)
    ref, other = torch.randn(2, 3, 5, 50, generator=g) * 3
    want = torch.nn.functional.kl_div(torch.log_softmax(other, -1), torch.log_softmax(ref, -1), log_target=True,
                                      reduction="none").sum(-1)
    torch.testing.assert_close(kl_per_position(ref, other), want, atol=1e-6, rtol=1e-5)
    log_p = log_probs(ref.clone())
    torch.testing.assert_close(log_p, torch.log_softmax(ref, -1))
    torch.testing.assert_close(kl_per_position(log_p, other, ref_is_log_probs=True), want, atol=1e-6, rtol=1e-5)
    batch = torch.stack([other, ref])  # two patched forwards against one reference, broadcast
    got = kl_per_position(log_p[None], batch, ref_is_log_probs=True)
    torch.testing.assert_close(got[0], want, atol=1e-6, rtol=1e-5)
    assert float(got[1].abs().max()) < 1e-6  # the reference against itself
    half = ref.bfloat16()
    assert log_probs(half).dtype == torch.float32 and torch.equal(half, ref.bfloat16())
