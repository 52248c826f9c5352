"""crossdiff/diffing/aligned.py: the analysis of a crosscoder of models with different tokenizers,
each figure checked against a direct computation over the aligned positions."""
import torch

from conftest import tiny_cfg
from crosscoder import CrossCoder
from crossdiff.diffing.aligned import aligned_reconstruction, aligned_splice_in
from crossdiff.sources.activations import run_models
from test_activations import aligned_pair

HOOKS = ["blocks.1.hook_resid_pre", "blocks.2.hook_resid_pre"]


def crosscoder_for(tmp_path):
    models, rows = aligned_pair(tmp_path)
    cfg = tiny_cfg(tmp_path, d_in=32, model_widths=[32, 24], pad_widths=True, seq_len=24, hook_point=HOOKS[0],
                   hook_points=HOOKS, dict_size=64, normalisation_factor=[0.5, 2.0])
    torch.manual_seed(0)
    cc = CrossCoder(cfg)
    with torch.no_grad():
        cc.b_enc.fill_(0.05)  # some latents fire on these random models' activations
    return cc, models, rows


def test_explained_variance_per_model_is_the_pooled_ratio_over_the_aligned_positions(tmp_path):
    cc, models, rows = crosscoder_for(tmp_path)
    rows = rows[:8]
    source = torch.tensor([0, 1] * 4)
    roles = torch.zeros(8, 24, dtype=torch.long)
    classes = {"all": torch.ones(64, dtype=torch.bool)}
    got = aligned_reconstruction(cc, models, rows, source, roles, classes, _Tokens(), batch_size=3)
    x = run_models(models, rows, HOOKS, first=1, d_in=32) * torch.tensor([0.5, 2.0])[:, None]
    x_hat = cc.decode(cc.encode(x)).detach()
    for m, width in enumerate((32, 24)):
        err = (x_hat[:, m, :width] - x[:, m, :width]).pow(2).sum()
        var = (x[:, m, :width] - x[:, m, :width].mean(0)).pow(2).sum()
        assert abs(got["explained_variance_per_model"][m] - float(1 - err / var)) < 1e-4
        assert abs(got["varying_share_per_model"][m] - float(var / x[:, m].pow(2).sum())) < 1e-4
    assert got["positions"] == len(x)
    assert sum(s["positions"] for s in got["by_source"].values()) == len(x)


class _Tokens:
    def __getitem__(self, m):
        return self

    def convert_ids_to_tokens(self, i):
        return str(i)


def test_splicing_replaces_each_model_at_its_own_aligned_positions_only(tmp_path):
    """aligned_splice_in (from the hook's layer on) against a hook on the full forward that splices
    each model at its own aligned positions: the clean and spliced losses and KL(P_clean ||
    P_spliced), each over the positions up to the row's last aligned one."""
    cc, models, rows = crosscoder_for(tmp_path)
    rows = rows[:2]
    got = aligned_splice_in(cc, models, rows, batch_size=2, progress=False)
    folded = cc.fold_normalisation()
    x = run_models(models, rows, HOOKS, first=1, d_in=32)
    x_hat = folded(x).detach()
    tokens, pairs = rows[..., :2].long(), rows[..., 2:].long()
    valid = (pairs >= 1).all(-1)
    for m, (model, hook, width) in enumerate(zip(models, HOOKS, (32, 24))):
        n_P, s_P = torch.nonzero(valid, as_tuple=True)
        pos = pairs[n_P, s_P, m]

        def splice(act, hook):  # through a hook on the full forward: another path than start_at_layer
            act = act.clone()
            act[n_P, pos] = x_hat[:, m, :width]
            return act

        spliced = model.run_with_hooks(tokens[..., m], return_type="loss", loss_per_token=True, fwd_hooks=[(hook, splice)])
        clean = model(tokens[..., m], return_type="loss", loss_per_token=True)
        p_clean = model(tokens[..., m]).log_softmax(-1)[:, :-1]
        p_spliced = model.run_with_hooks(tokens[..., m], fwd_hooks=[(hook, splice)]).log_softmax(-1)[:, :-1]
        kl = torch.nn.functional.kl_div(p_spliced, p_clean, log_target=True, reduction="none").sum(-1)
        last = torch.stack([pos[n_P == n].max() for n in range(2)])
        within = torch.arange(23)[None] < last[:, None]
        assert abs(got[m]["spliced"] - float(spliced[within].mean())) < 1e-4
        assert abs(got[m]["clean"] - float(clean[within].mean())) < 1e-4
        assert got[m]["tokens"] == int(within.sum()) and got[m]["spliced"] != got[m]["clean"]
        assert abs(got[m]["kl_spliced"] - float(kl[within].mean())) < 1e-4 and got[m]["kl_spliced"] > 0


def test_the_top_examples_are_each_latents_highest_activations_at_the_aligned_positions(tmp_path):
    """aligned_top_examples over batches of 3 rows: each latent's k values are its k largest
    activations over every aligned position (computed at once), its firing count theirs, and each
    example's row and models' positions name an aligned tuple where the latent takes that value."""
    from crossdiff.diffing.aligned import aligned_top_examples

    cc, models, rows = crosscoder_for(tmp_path)
    rows = rows[:7]
    values, seqs, pos, counts, n = aligned_top_examples(cc, models, rows, k=4, batch_size=3, progress=False)
    x = run_models(models, rows, HOOKS, first=1, d_in=32) * torch.tensor([0.5, 2.0])[:, None]
    acts = cc.encode(x).detach()  # [P, F], in at_aligned's order: row by row, tuple by tuple
    n_P, s_P = torch.nonzero((rows[..., 2:] >= 1).all(-1), as_tuple=True)
    assert n == len(acts) and torch.equal(counts, (acts > 0).sum(0))
    want_v = acts.topk(4, dim=0).values
    torch.testing.assert_close(values, want_v.T.clamp(min=0), atol=1e-5, rtol=1e-5)
    fired = torch.nonzero(values[:, 0] > 0).flatten()
    assert len(fired) > 5
    place = {(int(a), *rows[a, b, 2:].tolist()): i for i, (a, b) in enumerate(zip(n_P, s_P))}
    for j in fired.tolist():
        for i in range(4):
            if values[j, i] > 0:
                p = place[(int(seqs[j, i]), *pos[j, i].tolist())]
                assert abs(float(acts[p, j]) - float(values[j, i])) < 1e-5


def test_each_models_window_share_is_its_own_tokens_projection_and_they_sum_to_the_pre_activation(tmp_path):
    """aligned_window_contributions: model m's share at each window token is s_m <x_m, W_enc[m, :D_m, j]>
    on model m's own residual around its own position (0 before position 1 and past the row), and
    at the example's position the models' shares plus b_enc[j] are the pre-activation."""
    from crossdiff.diffing.aligned import aligned_window_contributions

    cc, models, rows = crosscoder_for(tmp_path)
    n_P, s_P = torch.nonzero((rows[:6, :, 2:] >= 1).all(-1), as_tuple=True)
    picks = [0, len(n_P) // 2, len(n_P) - 1]
    latents, rows_E = [3, 10, 63], [int(n_P[p]) for p in picks]
    pos = [rows[n_P[p], s_P[p], 2:].tolist() for p in picks]
    shares = aligned_window_contributions(cc, models, rows, latents, rows_E, pos, before=2, after=1, batch_size=2)
    assert shares.shape == (3, 4, 2)
    s_M = torch.tensor([0.5, 2.0])
    for e, (j, n, p_M) in enumerate(zip(latents, rows_E, pos)):
        resid = [m.run_with_cache(rows[n:n + 1, :, i].long())[1][h][0] for i, (m, h) in enumerate(zip(models, HOOKS))]
        for m, width in enumerate((32, 24)):
            for w, offset in enumerate(range(-2, 2)):
                q = p_M[m] + offset
                want = (s_M[m] * resid[m][q] @ cc.W_enc[m, :width, j]) if 1 <= q < 24 else torch.tensor(0.0)
                torch.testing.assert_close(shares[e, w, m], want.detach(), atol=1e-4, rtol=1e-4)
        x = torch.stack([torch.nn.functional.pad(resid[m][p_M[m]], (0, 32 - resid[m].shape[-1])) for m in range(2)])
        pre = cc.encode((x * s_M[:, None])[None], apply_relu=False)[0, j]
        torch.testing.assert_close(shares[e, 2].sum(), (pre - cc.b_enc[j]).detach(), atol=1e-4, rtol=1e-4)


def test_decoder_cosines_are_compared_only_within_one_residual_space(tmp_path):
    """Two widths, or two tokenizers (an aligned mix) at one width: the residuals are two spaces,
    so the dashboard's table has no cosine (null) for any latent; a base and its fine-tune have one."""
    from crossdiff.diffing.aligned import shares_one_space
    from crossdiff.diffing.dashboard import latent_table

    cc, _, _ = crosscoder_for(tmp_path)
    assert not shares_one_space(cc.cfg) and not shares_one_space({"dataset": str(tmp_path / "mix")})
    assert shares_one_space({"model_widths": [32, 32], "dataset": "toy"}) and shares_one_space({"dataset": "toy"})
    assert all(c is None for c in latent_table(cc)[0]["cos"])
    one = CrossCoder(tiny_cfg(tmp_path))
    assert all(c is not None for c in latent_table(one)[0]["cos"])
