"""What analysis.py measures of a crosscoder of models that share no tokenizer (aligned rows,
sources/aligned_mix.py: each model reads its own tokens of the same text, and only the aligned
positions are paired). Each figure is taken at the aligned positions, each model at its own width:

  - reconstruction: explained variance per model (pooled), overall and per source, L0, dead latents,
    and the share of each model's squared norm that varies about its mean (a model whose residual
    is mostly one constant vector, as Gemma-3's, leaves its decoder vectors short: every latent's
    relative norm then leans to the other model);
  - each latent class's activation mass by token role (model 0's roles) and the tokens each
    model reads where the class fires most (what "base-only" and "chat-only" latents fire on);
  - the splice-in loss per model: its residual replaced at its own aligned positions by the
    crosscoder's reconstruction, every other position clean, the loss over the text the row shares;
  - every latent's top activating aligned positions, and each model's share of the pre-activation
    on its own tokens around its own position there (the dashboard's contexts).

The KL tests, Latent Scaling and steering compare two models' next-token distributions over one
vocabulary, which two tokenizers do not share: analysis.py leaves them out for such a pair.

Shape legend: N rows, S seq_len, M models, D d_in, P aligned positions, F latents, R roles, K examples per
latent, E examples, W window tokens.
"""
from collections import Counter

import torch
from tqdm.auto import tqdm

from crossdiff.config.plan import hook_layer, hooks_of
from crossdiff.diffing.measures import finite_or_none, normalisation_factors
from crossdiff.sources.activations import at_aligned, autocast_context, extract_activations
from crossdiff.sources.aligned_mix import is_aligned, split_aligned

TOP_TOKENS = 8  # tokens shown per class and model


def shares_one_space(cfg):
    """Whether the models' residuals share one space, so that a latent's decoder vectors in two
    models can be compared by their cosine (a base and its fine-tune): not for models of
    different widths, nor for models of different tokenizers (trained on an aligned mix)."""
    return len(set(cfg.get("model_widths") or [0])) == 1 and not is_aligned(cfg.get("dataset"))


def aligned_batches(models, rows_NSK, hooks, batch_size, first, desc="activations", progress=True):
    """Yields (tokens [n, S, M], pairs [n, S, M], n_P, s_P, raw activations [P, M, D] padded to the
    widest model, and each model's residual [n, S, D_m]) a batch of rows at a time: the aligned
    tuples whose every position is >= first."""
    device = next(models[0].parameters()).device
    for start in tqdm(range(0, len(rows_NSK), batch_size), desc=desc, leave=False, disable=not progress):
        tokens_nSM, pairs_nSM = split_aligned(rows_NSK[start:start + batch_size].to(device, torch.long), len(models))
        with torch.no_grad(), autocast_context(device):
            resid = [extract_activations(m, tokens_nSM[..., i], h) for i, (m, h) in enumerate(zip(models, hooks))]
        n_P, s_P, x_PMD = at_aligned(resid, pairs_nSM, first)
        yield start, tokens_nSM, pairs_nSM, n_P, s_P, x_PMD.float(), resid


@torch.no_grad()
def aligned_reconstruction(crosscoder, models, rows_NSK, source_N, roles_NS, classes, tokenizers, batch_size=8,
                           first=1, source_names=None):
    """Explained variance per model (pooled 1 - sum err^2 / sum |x - mean|^2, each at its own
    width: the padding is 0 in both), overall and per source; mean L0; dead latents; each
    class's activation mass by role (roles_NS: model 0's) and the tokens each model reads where
    the class fires most."""
    cfg, s_M = crosscoder.cfg, normalisation_factors(crosscoder)
    device, M, F = s_M.device, crosscoder.n_models, cfg["dict_size"]
    n_roles = int(roles_NS.max()) + 1
    role_mass_RF = torch.zeros(n_roles, F, dtype=torch.float64, device="cpu")
    role_tokens_R = torch.zeros(n_roles, dtype=torch.float64, device="cpu")
    fired_F, l0, n = torch.zeros(F, dtype=torch.bool, device="cpu"), 0.0, 0
    sums = {}  # source -> [err^2 [M], x [M, D], x^2 [M], positions]
    heavy = {name: [Counter() for _ in range(M)] for name in classes}
    for start, tokens_nSM, pairs_nSM, n_P, s_P, x_PMD, _ in aligned_batches(
            models, rows_NSK, hooks_of(cfg), batch_size, first, "reconstruction"):
        x_PMD = x_PMD.to(device) * s_M[:, None]
        acts_PF = crosscoder.encode(x_PMD)
        x_hat = crosscoder.decode(acts_PF).float()
        fired_F |= (acts_PF > 0).any(0).cpu()
        l0 += float((acts_PF > 0).sum())
        n += len(x_PMD)
        role_P = roles_NS[start + n_P.cpu(), pairs_nSM[n_P, s_P, 0].cpu()].long()
        role_mass_RF.index_add_(0, role_P, acts_PF.double().cpu())
        role_tokens_R += torch.bincount(role_P, minlength=n_roles).double()
        src_P = source_N[start + n_P.cpu()]
        err2_PM = (x_hat - x_PMD).pow(2).sum(-1).cpu()
        for s in ["all", *map(int, src_P.unique())]:
            rows = torch.ones_like(src_P, dtype=torch.bool) if s == "all" else src_P == s
            part = [err2_PM[rows].sum(0).double(), x_PMD.cpu()[rows].sum(0).double(),
                    x_PMD.cpu()[rows].pow(2).sum((0, 2)).double(), int(rows.sum())]
            sums[s] = part if s not in sums else [a + b for a, b in zip(sums[s], part)]
        for name, mask in classes.items():  # the tokens where the class's activation mass falls
            mass_P = acts_PF[:, mask.to(device)].sum(-1).cpu()
            for p in torch.nonzero(mass_P > 0).flatten().tolist():
                for m in range(M):
                    token = int(tokens_nSM[n_P[p], pairs_nSM[n_P[p], s_P[p], m], m])
                    heavy[name][m][tokenizers[m].convert_ids_to_tokens(token)] += float(mass_P[p])

    def ev(part):
        err2_M, x_MD, x2_M, count = part
        var_M = x2_M - x_MD.pow(2).sum(-1) / count
        return [finite_or_none(v) for v in (1 - err2_M / var_M).tolist()]

    names = source_names or {}
    present = role_tokens_R > 0
    role_share = {name: (role_mass_RF[:, mask].sum(1) / role_mass_RF[:, mask].sum().clamp(min=1e-12))[present].tolist()
                  for name, mask in classes.items()}
    err2_M, x_MD, x2_M, count = sums["all"]
    varying_M = (x2_M - x_MD.pow(2).sum(-1) / count) / x2_M  # a residual that is mostly one constant vector is small here
    return {"positions": n, "l0": l0 / max(n, 1), "dead": int((~fired_F).sum()),
            "explained_variance_per_model": ev(sums["all"]), "varying_share_per_model": varying_M.tolist(),
            "by_source": {names.get(s, str(s)): {"positions": part[3], "explained_variance_per_model": ev(part)}
                          for s, part in sums.items() if s != "all"},
            "roles_present": present.nonzero().flatten().tolist(),
            "role_tokens_share": (role_tokens_R[present] / role_tokens_R.sum()).tolist(),
            "class_role_mass": role_share,
            "class_top_tokens": {name: [[[tok, round(v, 3)] for tok, v in c.most_common(TOP_TOKENS)] for c in per_model]
                                 for name, per_model in heavy.items()}}


@torch.no_grad()
def aligned_splice_in(crosscoder, models, rows_NSK, batch_size=2, first=1, progress=True):
    """Per model: next-token loss clean, with its residual at the hook replaced by the
    crosscoder's reconstruction at its own aligned positions (the rest clean), and zero-ablated
    (every position, as the reference's notebook); loss_recovered = 1 - (spliced - clean) / (zero -
    clean); kl_spliced, the mean KL(P_clean || P_spliced) of its next-token distributions, each
    model over its own vocabulary (the one KL two tokenizers allow). Over each row's positions up
    to the model's last aligned one (the text the row shares)."""
    folded = crosscoder.fold_normalisation(normalisation_factors(crosscoder))
    hooks, widths = hooks_of(crosscoder.cfg), crosscoder.cfg.get("model_widths") or [crosscoder.cfg["d_in"]] * len(models)
    device = next(models[0].parameters()).device
    totals = torch.zeros(len(models), 4, dtype=torch.float64, device="cpu")  # clean, spliced, zero losses; KL
    counts = torch.zeros(len(models), device="cpu")
    for _, tokens_nSM, pairs_nSM, n_P, s_P, x_PMD, resid in aligned_batches(
            models, rows_NSK, hooks, batch_size, first, "splice-in loss", progress):
        x_hat = folded(x_PMD.to(folded.W_enc.device)).float().to(device)
        for m, model in enumerate(models):
            layer = hook_layer(hooks[m])
            spliced = resid[m].clone()
            pos_P = pairs_nSM[n_P, s_P, m]
            spliced[n_P, pos_P] = x_hat[:, m, :widths[m]].to(spliced.dtype)
            t = tokens_nSM[..., m]
            with autocast_context(device):
                logp = [model(r, start_at_layer=layer, tokens=t, return_type="logits")[:, :-1].float().log_softmax(-1)
                        for r in (resid[m], spliced, torch.zeros_like(resid[m]))]
            # position i's prediction of token i + 1, and the spliced distribution against the clean one
            losses = [-lp.gather(-1, t[:, 1:, None])[..., 0] for lp in logp]
            losses.append((logp[0].exp() * (logp[0] - logp[1])).sum(-1))
            del logp
            last_n = torch.full((len(t),), -1, device=device).scatter_reduce(0, n_P, pos_P, "amax")
            within_nS = torch.arange(t.shape[1] - 1, device=device)[None] < last_n[:, None]
            for i, loss in enumerate(losses):
                totals[m, i] += float(loss[within_nS].double().sum())
            counts[m] += float(within_nS.sum())
    out = {}
    for m in range(len(models)):
        clean, spliced, zero, kl = (totals[m] / counts[m].clamp(min=1)).tolist()
        out[m] = {"clean": clean, "spliced": spliced, "zero_ablation": zero, "kl_spliced": kl, "tokens": int(counts[m]),
                  "loss_recovered": 1 - (spliced - clean) / (zero - clean) if zero != clean else float("nan")}
    return out


@torch.no_grad()
def aligned_top_examples(crosscoder, models, rows_NSK, k=10, batch_size=8, first=1, progress=True):
    """Every latent's k highest activations at the aligned positions, a running top-k merged batch
    by batch: values [F, k] (0: fewer hits), their rows [F, k] and each model's position there
    [F, k, M]; the positions each latent fired on [F]; and the aligned positions counted."""
    s_M = normalisation_factors(crosscoder)
    device, F, M = s_M.device, crosscoder.cfg["dict_size"], crosscoder.n_models
    best_v = torch.zeros(F, k, device=device)
    best_n = torch.zeros(F, k, dtype=torch.long, device=device)
    best_pos = torch.zeros(F, k, M, dtype=torch.long, device=device)
    counts_F, n_positions = torch.zeros(F, dtype=torch.long, device=device), 0
    for start, _, pairs_nSM, n_P, s_P, x_PMD, _ in aligned_batches(
            models, rows_NSK, hooks_of(crosscoder.cfg), batch_size, first, "top activations", progress):
        acts_PF = crosscoder.encode(x_PMD.to(device) * s_M[:, None]).float()
        counts_F += (acts_PF > 0).sum(0)
        n_positions += len(acts_PF)
        v, i = acts_PF.topk(min(k, len(acts_PF)), dim=0)  # [k', F]
        cand_v = torch.cat([best_v, v.T], 1)
        cand_n = torch.cat([best_n, (start + n_P.to(device))[i].T], 1)
        cand_pos = torch.cat([best_pos, pairs_nSM[n_P, s_P].to(device)[i].transpose(0, 1)], 1)
        best_v, sel = cand_v.topk(k, dim=1)
        best_n = cand_n.gather(1, sel)
        best_pos = cand_pos.gather(1, sel[..., None].expand(-1, -1, M))
    return best_v.cpu(), best_n.cpu(), best_pos.cpu(), counts_F.cpu(), n_positions


@torch.no_grad()
def aligned_window_contributions(crosscoder, models, rows_NSK, latents_E, rows_E, pos_EM, before, after,
                                 batch_size=8, first=1):
    """[E, W, M] each model's share s_m <x_m, W_enc[m, :, j]> of latent j's pre-activation on its
    own W = before + 1 + after tokens around its own position of each example (latent
    latents_E[e] at row rows_E[e], model m at pos_EM[e, m]); 0 outside the row and before first.
    Runs the models on the examples' rows only."""
    s_M = normalisation_factors(crosscoder)
    device = crosscoder.W_enc.device
    latents_E, rows_E, pos_EM = (torch.as_tensor(v, dtype=torch.long, device="cpu") for v in (latents_E, rows_E, pos_EM))
    offsets_W = torch.arange(-before, after + 1, device="cpu")
    out_EWM = torch.zeros(len(latents_E), len(offsets_W), len(models), device="cpu")
    needed = rows_E.unique()
    for lo in range(0, len(needed), batch_size):
        batch = needed[lo:lo + batch_size]
        tokens_nSM, _ = split_aligned(rows_NSK[batch].to(next(models[0].parameters()).device, torch.long), len(models))
        with autocast_context(tokens_nSM.device):
            resid = [extract_activations(m, tokens_nSM[..., i], h)
                     for i, (m, h) in enumerate(zip(models, hooks_of(crosscoder.cfg)))]
        here = torch.nonzero(torch.isin(rows_E, batch)).flatten()
        n_E = torch.searchsorted(batch, rows_E[here])  # the example's row within the batch
        for m, r in enumerate(resid):
            S, D_m = r.shape[1:]
            pos_EW = pos_EM[here, m, None] + offsets_W
            valid_EW = (pos_EW >= first) & (pos_EW < S)
            x_EWD = r[n_E[:, None], pos_EW.clamp(0, S - 1)].float().to(device) * s_M[m]
            enc_DE = crosscoder.W_enc[m, :D_m, latents_E[here].to(device)].float()
            out_EWM[here, :, m] = torch.einsum("ewd,de->ew", x_EWD, enc_DE).cpu() * valid_EW
    return out_EWM
