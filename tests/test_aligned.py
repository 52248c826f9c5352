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
        last = torch.stack([pos[n_P == n].max() for n in range(2)])
        within = torch.arange(23)[None] < last[:, None]
        assert abs(got[m]["spliced"] - float(spliced[within].mean())) < 1e-4
        assert abs(got[m]["clean"] - float(clean[within].mean())) < 1e-4
        assert got[m]["tokens"] == int(within.sum()) and got[m]["spliced"] != got[m]["clean"]
