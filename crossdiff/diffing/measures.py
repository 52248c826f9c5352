"""The model-diffing maths: how well the crosscoder reconstructs held-out activations, what
splicing it into each model costs, Latent Scaling of model-specific latents and their top
activating contexts (figures.py shows them; classes.py says which latents are base-only, shared or
chat-only). analysis.py is the notebook over these functions; each is tested against a hand-built case.

Shape legend: N sequences, S positions, B tokens (rows), M models, D d_in, F latents, J selected latents.
"""

import torch
from tqdm.auto import tqdm

from crossdiff.config.plan import hook_layer
from crossdiff.sources.activations import autocast_context, extract_activations
from crossdiff.sources.tokenmask import PositionFilter

# Held-out analyses (analysis.py, the toy report): tokens in all, and per forward that stops at the hook.
HELDOUT_TOKENS, BATCH_TOKENS = 2**18, 2**14
ENCODE_BYTES = 2**28  # the largest [rows, F] fp32 block the top-examples pass encodes at once (64 rows at 2^20 latents)


def iter_paired_activations(models, tokens_NS, hook_point, batch_size=8, desc="activations", progress=True, first=1):
    """Yields (tokens [n, S], raw activations [n, S-first, M, D]) batch by batch, the first
    positions of each row dropped (the BOS; tokenmask.first_n of the crosscoder's config), so
    that analyses over many tokens never hold them all in memory. progress: show a bar."""
    device = next(models[0].parameters()).device
    for start in tqdm(range(0, len(tokens_NS), batch_size), desc=desc, leave=False, disable=not progress):
        t = tokens_NS[start : start + batch_size].to(device, torch.long)
        with torch.no_grad(), autocast_context(device):
            acts = [extract_activations(m, t, hook_point)[:, first:].float() for m in models]
        yield t, torch.stack(acts, dim=2)


class ActivationCache:
    """iter_paired_activations that runs the models once: called like it, it keeps the batches of
    a pass that fits in max_bytes, and a later call with the same models, tokens, hook and batch
    size replays them. analysis.py passes one as `harvest` to every analysis over the held-out
    tokens (five passes: reconstruction, Latent Scaling twice, top examples, the dashboard), so
    the models run once where the activations fit; past max_bytes (Gemma's 2**18 held-out tokens
    are 4.8 GB in fp32) each pass harvests again, as before."""

    def __init__(self, max_bytes=2**30):
        self.max_bytes, self.key, self.batches = max_bytes, None, None

    def __call__(self, models, tokens_NS, hook_point, batch_size=8, desc="activations", progress=True, first=1):
        key = (tuple(id(m) for m in models), id(tokens_NS), tuple(tokens_NS.shape), hook_point, batch_size, first)
        if key == self.key:
            yield from self.batches
            return
        d_model = models[0].cfg.d_model
        fits = tokens_NS.shape[0] * (tokens_NS.shape[1] - first) * len(models) * d_model * 4 <= self.max_bytes
        kept = []
        for t, x in iter_paired_activations(models, tokens_NS, hook_point, batch_size, desc, progress, first):
            if fits:
                kept.append((t, x))
            yield t, x
        if fits:  # a whole pass: a consumer that stopped early leaves nothing half-kept
            self.key, self.batches = key, kept


def normalisation_factors(crosscoder):
    """[M] factors that take raw activations into the space the crosscoder was trained in (ones
    for a crosscoder whose weights were folded to read raw activations). A clear error when the
    checkpoint has none: never a guess."""
    cfg, device = crosscoder.cfg, crosscoder.W_enc.device
    if cfg.get("normalisation_factor") is not None:
        return torch.as_tensor(cfg["normalisation_factor"], dtype=torch.float32, device=device)
    if cfg.get("folded_normalisation_factor") is not None:
        return torch.ones(crosscoder.n_models, device=device)
    raise ValueError(
        "this crosscoder has no normalisation factors (checkpoints of the reference's training, the "
        "published one included, did not save them). Give them (analysis.py --factors a,b, or "
        "cc.cfg['normalisation_factor'] = [a, b]) or estimate them with buffer.estimate_norm_factors")


def finite_or_none(value):
    """value, or None where it is NaN (0/0: an explained variance of a constant target)."""
    return None if value != value else value


def per_model(values):
    """'0.970, 0.958' ('-' for None: a constant target's)."""
    return ", ".join("-" if v is None else f"{v:.3f}" for v in values)


@torch.no_grad()
def reconstruction_stats(crosscoder, models, tokens_NS, batch_size=8, harvest=iter_paired_activations,
                         is_chat_N=None, roles_NS=None, n_roles=None):
    """Held-out reconstruction quality in the training (normalised) space: explained variance
    of all models as logged in training, per model as the pooled ratio 1 - sum err^2 / sum var
    (for any number of models; None for a target that is constant, the diff-SAE's base), mean L0,
    and the latents never active. Of what the architecture reconstructs (crosscoder.target).

    Over the positions training read (tokenmask: ignore_first_n, exclude_tokens, outlier norms).
    is_chat_N [N] (optional), per source (chat rows, the other rows): "by_source" holds each
    model's explained variance pooled over the source's tokens (1 - sum err^2 / sum |x - mean|^2,
    the mean the source's own), and "mass_F", "chat_mass_F" each latent's activation mass in all
    rows and in chat rows (class_chat_mass reads them). roles_NS [N, S] (optional, a mix's role.pt:
    indices below n_roles): "role_mass_RF" each latent's activation mass on each role's tokens and
    "role_tokens_R" the tokens of each role, over the same positions (class_role_mass reads them)."""
    s_M = normalisation_factors(crosscoder)
    device, F = s_M.device, crosscoder.cfg["dict_size"]
    keep = PositionFilter(crosscoder.cfg, models)  # the positions training read
    sums, n_rows, first = None, 0, 0
    fired_F = torch.zeros(F, dtype=torch.bool, device=device)
    mass_F, chat_mass_F = (torch.zeros(F, dtype=torch.float64, device=device) for _ in range(2))
    source_sums = {}  # source -> [err^2 [M], x [M, D], x^2 [M], tokens]
    if roles_NS is not None:
        role_mass_RF = torch.zeros(n_roles, F, dtype=torch.float64, device=device)
        role_tokens_R = torch.zeros(n_roles, dtype=torch.float64, device=device)
    for t, x in harvest(models, tokens_NS, crosscoder.cfg["hook_point"], batch_size, "reconstruction",
                        first=keep.first):
        N, S1 = x.shape[:2]
        kept_B = keep.keep(t, x).flatten().to(device) if keep.active else slice(None)
        x_BMD = crosscoder.target(x.flatten(0, 1).to(device)[kept_B] * s_M[:, None])  # (the diff-SAE: [0, chat - base])
        losses, acts_BF, _ = crosscoder.losses_and_acts(x_BMD)
        fired_F |= (acts_BF > 0).any(0)
        if roles_NS is not None:
            role_B = roles_NS[first : first + N, tokens_NS.shape[1] - S1:].flatten().to(device).long()[kept_B]
            role_mass_RF.index_add_(0, role_B, acts_BF.double())
            role_tokens_R += torch.bincount(role_B, minlength=n_roles).double()
        x_hat_BMD = crosscoder.decode(acts_BF).float()
        ev_M = [1 - (x_hat_BMD[:, m] - x_BMD[:, m]).pow(2).sum(-1).mean()
                / (x_BMD[:, m] - x_BMD[:, m].mean(0)).pow(2).sum(-1).mean() for m in range(x_BMD.shape[1])]
        batch = torch.stack([losses.explained_variance, losses.l0_loss, *ev_M]) * len(x_BMD)
        sums = batch if sums is None else sums + batch
        n_rows += len(x_BMD)
        if is_chat_N is not None:
            chat_B = is_chat_N[first : first + N].to(device).repeat_interleave(S1)[kept_B]
            mass_F += acts_BF.sum(0).double()
            chat_mass_F += acts_BF[chat_B].sum(0).double()
            err2_BM = (x_hat_BMD - x_BMD).pow(2).sum(-1)
            for source, rows in (("chat", chat_B), ("text", ~chat_B)):
                if rows.any():
                    part = [err2_BM[rows].sum(0), x_BMD[rows].sum(0), x_BMD[rows].pow(2).sum((0, 2)), int(rows.sum())]
                    old = source_sums.get(source)
                    source_sums[source] = part if old is None else [a + b for a, b in zip(old, part)]
        first += N
    means = (sums / n_rows).tolist()
    out = {"explained_variance": means[0], "l0": means[1],
           "explained_variance_per_model": [finite_or_none(v) for v in means[2:]], "dead_fraction": float((~fired_F).float().mean()),
           "dead": int((~fired_F).sum()), "tokens": n_rows}
    if is_chat_N is not None:
        out["by_source"] = {}
        for source, (err2_M, x_MD, x2_M, n) in source_sums.items():
            var_M = x2_M.double() - x_MD.double().pow(2).sum(-1) / n  # sum |x - mean|^2
            out["by_source"][source] = {"tokens": n, "explained_variance_per_model":
                                        [finite_or_none(v) for v in (1 - err2_M.double() / var_M).tolist()]}
        out["mass_F"], out["chat_mass_F"] = mass_F.float().cpu(), chat_mass_F.float().cpu()
    if roles_NS is not None:
        out["role_mass_RF"], out["role_tokens_R"] = role_mass_RF.cpu(), role_tokens_R.cpu()
    return out


def class_chat_mass(classes, mass_F, chat_mass_F):
    """{class: latents, active (mass > 0), and the share of the class's activation mass that falls
    in chat rows}."""
    alive = mass_F > 0
    return {name: {"latents": int(mask.sum()), "active": int((mask & alive).sum()),
                   "chat_mass_fraction": float(chat_mass_F[mask].sum() / mass_F[mask].sum().clamp(min=1e-12))}
            for name, mask in classes.items()}


def class_role_mass(classes, role_mass_RF, role_tokens_R, role_names):
    """{"tokens": each role's share of the positions, class: each role's share of the class's
    activation mass} (roles with no position left out). A latent class that follows what a
    recipe changed puts its mass on that role's tokens well above the role's share of tokens."""
    present = role_tokens_R > 0
    names = [n for n, p in zip(role_names, present.tolist()) if p]
    out = {"tokens": dict(zip(names, (role_tokens_R[present] / role_tokens_R.sum()).tolist()))}
    for name, mask in classes.items():
        mass_R = role_mass_RF[:, mask].sum(1)[present]
        out[name] = dict(zip(names, (mass_R / mass_R.sum().clamp(min=1e-12)).tolist()))
    return out


@torch.no_grad()
def splice_in_loss(crosscoder, models, tokens_NS, batch_size=2, progress=True, is_chat_N=None):
    """Next-token cross-entropy of each model clean, with its residual at the hook replaced by
    the crosscoder's reconstruction at the positions training read (from ignore_first_n on, and
    not excluded by exclude_tokens or outlier_norm_multiple: the others keep their clean residual,
    the BOS among them), and zero-ablated (all positions, as the authors' notebook). loss_recovered = 1 - (spliced - clean) / (zero - clean).
    is_chat_N [N] (optional): the same per source too, under "by_source" ("chat", "text").

    At blocks.L.hook_resid_pre the three forwards share the blocks before L: they are run once,
    and each forward starts at block L from its residual (the reference ran all three from the
    tokens, with hooks; the losses are the same). Other hook points run the three in full.
    The models run under the buffer's bf16 autocast (CUDA), so the [batch, seq, vocab] logits
    are bf16 (log-softmax in fp32): with Gemma's 256k vocabulary each sequence of 1024 costs
    about 3 GB at the peak, hence the small default batch.
    The reconstruction of model m is encoded from every model's residual, so the chat model's
    information can reach the base model's splice: loss_recovered may exceed 1."""
    folded = crosscoder.fold_normalisation(normalisation_factors(crosscoder))
    keep = PositionFilter(crosscoder.cfg, models)
    hook_point, first = crosscoder.cfg["hook_point"], keep.first
    layer = hook_layer(hook_point)
    from_hook = (layer is not None and hook_point == f"blocks.{layer}.hook_resid_pre"
                 and all(m.cfg.positional_embedding_type != "shortformer" for m in models))
    device = next(models[0].parameters()).device
    groups = ("all",) if is_chat_N is None else ("all", "chat", "text")
    totals = {g: torch.zeros(len(models), 3, dtype=torch.float64, device="cpu") for g in groups}  # summed per-row mean losses
    rows = dict.fromkeys(groups, 0)
    for start in tqdm(range(0, len(tokens_NS), batch_size), desc="splice-in loss", leave=False, disable=not progress):
        t = tokens_NS[start : start + batch_size].to(device, torch.long)
        with autocast_context(device):
            resid = [extract_activations(m, t, hook_point) for m in models]  # [N, S, D], BOS included
        x = torch.stack([r[:, first:].float() for r in resid], dim=2)
        N, S1, M, D = x.shape
        x_hat = folded(x.flatten(0, 1).to(folded.W_enc.device)).float().view(N, S1, M, D).to(device)
        if keep.active:
            x_hat = torch.where(keep.keep(t, x).to(device)[..., None, None], x_hat, x)
        chat = None if is_chat_N is None else is_chat_N[start : start + N].bool().cpu()
        select = {"all": torch.ones(N, dtype=torch.bool, device="cpu"), **({} if chat is None else {"chat": chat, "text": ~chat})}
        for m, model in enumerate(models):
            spliced_in = resid[m].clone()
            spliced_in[:, first:] = x_hat[:, :, m].to(spliced_in.dtype)
            with autocast_context(device):
                if from_hook:
                    losses = [model(r, start_at_layer=layer, tokens=t, return_type="loss", loss_per_token=True)
                              for r in (resid[m], spliced_in, torch.zeros_like(resid[m]))]
                else:
                    losses = [model(t, return_type="loss", loss_per_token=True)]
                    losses += [model.run_with_hooks(t, return_type="loss", loss_per_token=True,
                                                    fwd_hooks=[(hook_point, lambda act, hook, r=r: r)])
                               for r in (spliced_in, torch.zeros_like(resid[m]))]
            per_row_3N = torch.stack([loss.float().mean(-1).double().cpu() for loss in losses])
            for g in groups:
                totals[g][m] += per_row_3N[:, select[g]].sum(-1)
        for g in groups:
            rows[g] += int(select[g].sum())

    def recovered(total_3, n):
        clean, spliced, zero = (total_3 / max(n, 1)).tolist()
        return {"clean": clean, "spliced": spliced, "zero_ablation": zero,
                "loss_recovered": 1 - (spliced - clean) / (zero - clean) if zero != clean else float("nan")}

    out = {}
    for m in range(len(models)):
        out[m] = recovered(totals["all"][m], rows["all"])
        if is_chat_N is not None:
            out[m]["by_source"] = {g: recovered(totals[g][m], rows[g]) for g in ("chat", "text") if rows[g]}
    return out


# Latent Scaling's selection as the paper's authors apply it (sparsity-artifacts-crosscoders,
# notebooks/art.py: thres_error = 0.2, thres_reconstruction = 0.5, on |nu|): a latent is specific
# to its direction model when |nu_error| < NU_ERROR_MAX and |nu_reconstruction| < NU_RECONSTRUCTION_MAX.
# Deviation removed: we used max(nu) <= 0.2 for both, chosen by looking at the toy distribution.
NU_ERROR_MAX = 0.2
NU_RECONSTRUCTION_MAX = 0.5


def is_model_specific(nu_error_J, nu_reconstruction_J):
    """[J] bool: the paper's rule (both ratios small: the other model lacks the direction and no
    other latents carry it there). NaN ratios count as not specific."""
    return (nu_error_J.abs() < NU_ERROR_MAX) & (nu_reconstruction_J.abs() < NU_RECONSTRUCTION_MAX)


def rank_sum_order(nu_error_J, nu_reconstruction_J):
    """[J] positions into the latents, most specific first: by the sum of each latent's rank in
    nu_error and in nu_reconstruction (ascending; ordinal ranks, ties by position), as the
    authors rank them (autointerp/plot.py: rank_sum)."""
    def ranks(v):
        return v.argsort(stable=True).argsort()

    return (ranks(nu_error_J) + ranks(nu_reconstruction_J)).argsort(stable=True)


def norm_difference(crosscoder, model=0, other=1):
    """[F] the authors' dec_norm_diff: (|d_model| - |d_other|) / max(|d_model|, |d_other|) / 2 + 1/2,
    so with model 0 (base): 0 = chat-only, 0.5 = equal norms, 1 = base-only."""
    norms_FM = crosscoder.decoder_norms().detach().float()
    a, b = norms_FM[:, model], norms_FM[:, other]
    return 0.5 * ((a - b) / torch.maximum(a, b) + 1)


def effective_chat_only(crosscoder, n):
    """The n latents with the lowest norm_difference (most chat-leaning), whatever their relative
    norm: the authors' "effective chat-only latents" (crosscoder_analysis_pipeline.py,
    num_effective_chat_only_latents), how they compare a BatchTopK crosscoder, whose relative
    norms rarely pass the 0.9 cut, with an L1 one's chat-only set of the same size."""
    return norm_difference(crosscoder).argsort(stable=True)[:n]


@torch.no_grad()
def latent_scaling(crosscoder, batches, latents_J, direction_model=1):
    """Latent Scaling (Minder, Dumas et al. 2025, "Overcoming Sparsity Artifacts in Crosscoders
    to Interpret Chat-Tuning"). For each latent j, with direction d_j (its decoder in
    direction_model, the chat model) and activation f_j, least squares gives, per model m,
        beta = sum_x f_j(x) <d_j, y_m(x)> / (|d_j|^2 sum_x f_j(x)^2)
    for two targets: the reconstruction error with j's own contribution put back,
    y_m = x_m - x_hat_m + f_j d_j^m (how much of j's direction model m's activation holds), and the
    reconstruction by the crosscoder's latents y_m = x_hat_m - b_dec_m (how much the other latents
    carry it; the decoder bias is left out, see docs/design.md, "Latent Scaling").
    Returns beta_error, beta_reconstruction [M, J] and their ratios base / chat, nu_error and
    nu_reconstruction [J]: for a truly chat-only latent both are ~0; a high nu_error means
    Complete Shrinkage, a high nu_reconstruction means Latent Decoupling.
    batches: an iterable of normalised activations [B, M, D] (training space)."""
    latents_J = torch.as_tensor(latents_J, device=crosscoder.W_enc.device)
    W_JMD = crosscoder.W_dec[latents_J].float()
    d_JD = W_JMD[:, direction_model]
    self_dot_JM = torch.einsum("jmd,jd->jm", W_JMD, d_JD)  # <d_j^m, d_j>
    M = W_JMD.shape[1]
    b_dec_MD = crosscoder.b_dec.float()
    num_err = torch.zeros(M, len(latents_J), dtype=torch.float64, device=d_JD.device)
    num_rec, den = torch.zeros_like(num_err), torch.zeros(len(latents_J), dtype=torch.float64, device=d_JD.device)
    for x_BMD in batches:
        x_BMD = x_BMD.to(d_JD.device).float()
        acts_BF = crosscoder.encode(x_BMD)
        f_BJ = acts_BF[:, latents_J].float()
        x_hat_BMD = crosscoder.decode(acts_BF).float()
        for m in range(M):
            err_proj_BJ = (x_BMD[:, m] - x_hat_BMD[:, m]) @ d_JD.T
            num_err[m] += (f_BJ * err_proj_BJ).sum(0).double() + (f_BJ.pow(2).sum(0) * self_dot_JM[:, m]).double()
            # Deviation: the authors' target is decode(f), b_dec included. A constant c in the target
            # adds <c, d_j> sum f / (|d_j|^2 sum f^2) to beta in both models; where b_dec carries a
            # residual's common vector (Gemma-3-270m: norm 24.2 of 25.3) that term swamps both betas
            # and pulls nu_reconstruction to ~1 whatever the latent does.
            latents_BD = x_hat_BMD[:, m] - b_dec_MD[m]
            num_rec[m] += (f_BJ * (latents_BD @ d_JD.T)).sum(0).double()
        den += (f_BJ.pow(2).sum(0) * d_JD.pow(2).sum(-1)).double()
    beta_err, beta_rec = (num_err / den).float(), (num_rec / den).float()
    base = 1 - direction_model if M == 2 else 0
    return {"beta_error": beta_err, "beta_reconstruction": beta_rec,
            "nu_error": beta_err[base] / beta_err[direction_model],
            "nu_reconstruction": beta_rec[base] / beta_rec[direction_model]}


@torch.no_grad()
def top_activating_examples(crosscoder, models, tokens_NS, latents_J, k=10, batch_size=8, return_counts=False,
                            harvest=iter_paired_activations):
    """For each latent: its k highest activations on tokens_NS with their (sequence, position).
    A running top-k merged batch by batch. Returns values, seq, pos [J, k] (value 0: fewer hits),
    and with return_counts the number of tokens each latent fired on [J] and the number of
    positions counted (those training reads: after ignore_first_n, without excluded positions)."""
    latents_J = torch.as_tensor(latents_J, device=crosscoder.W_enc.device)
    J = len(latents_J)
    s_M = normalisation_factors(crosscoder)
    best_v = torch.zeros(J, k, device=latents_J.device)
    best_i = torch.zeros(J, k, dtype=torch.long, device=latents_J.device)
    counts_J = torch.zeros(J, dtype=torch.long, device=latents_J.device)
    offset = n_positions = 0
    keep = PositionFilter(crosscoder.cfg, models)
    first = keep.first
    rows = max(1, ENCODE_BYTES // (4 * crosscoder.W_enc.shape[-1]))  # encoded at a time: [rows, F] in fp32
    for t, x in harvest(models, tokens_NS, crosscoder.cfg["hook_point"], batch_size, "top activations", first=first):
        N, S1 = x.shape[:2]
        x_BMD = x.flatten(0, 1).to(s_M.device) * s_M[:, None]
        kept_B = keep.keep(t, x).flatten().to(s_M.device) if keep.active else None
        n_positions += int(kept_B.sum()) if keep.active else N * S1
        for lo in range(0, len(x_BMD), rows):
            f_BJ = crosscoder.encode(x_BMD[lo : lo + rows])[:, latents_J].float()
            if keep.active:  # a position training never read is no example
                f_BJ *= kept_B[lo : lo + rows, None]
            counts_J += (f_BJ > 0).sum(0)
            idx_B = offset + lo + torch.arange(len(f_BJ), device=s_M.device)  # flat index over (sequence, position first..)
            v, i = f_BJ.topk(min(k, len(f_BJ)), dim=0)
            cand_v, cand_i = torch.cat([best_v, v.T], 1), torch.cat([best_i, idx_B[i].T], 1)
            best_v, sel = cand_v.topk(k, dim=1)
            best_i = cand_i.gather(1, sel)
        offset += N * S1
    S1 = tokens_NS.shape[1] - first
    out = best_v.cpu(), (best_i // S1).cpu(), (best_i % S1 + first).cpu()  # position in the full sequence
    return (*out, counts_J.cpu(), n_positions) if return_counts else out


def share_in_transcripts(is_chat_N, values_JK, seqs_JK):
    """Of the top examples that fired (value > 0; top_activating_examples pads with zeros), the
    share whose sequence is a chat transcript; None when no example fired."""
    hit = values_JK > 0
    return float(is_chat_N[seqs_JK][hit].float().mean()) if hit.any() else None


def scaling_summary(ls, latents_J):
    """latent_scaling's result ls over latents_J as the summary's numbers: how many have finite
    ratios, how many pass the chat-specific test, the medians, the ten most specific by rank sum;
    and the finite mask."""
    ok = torch.isfinite(ls["nu_error"]) & torch.isfinite(ls["nu_reconstruction"])
    specific = ok & is_model_specific(ls["nu_error"], ls["nu_reconstruction"])
    order = rank_sum_order(ls["nu_error"].nan_to_num(float("inf")), ls["nu_reconstruction"].nan_to_num(float("inf")))
    return {"latents": len(latents_J), "finite": int(ok.sum()),
            f"specific (|nu_error| < {NU_ERROR_MAX}, |nu_reconstruction| < {NU_RECONSTRUCTION_MAX})": int(specific.sum()),
            "median_nu_error": float(ls["nu_error"][ok].median()) if ok.any() else None,
            "median_nu_reconstruction": float(ls["nu_reconstruction"][ok].median()) if ok.any() else None,
            "most_specific_by_rank_sum": latents_J[order[:10].cpu()].tolist()}, ok
