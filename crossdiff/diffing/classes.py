"""Which latents are base-only, shared or chat-only: the reference's classes of the relative
decoder norm, by block for a partitioned dictionary, and for more than two models each model's share
of the norm (docs/design.md argues the generalisation); what an all-shared result means.

Shape legend: F latents, M models.
"""
import torch

from crossdiff.arch.partition import DESIGNATED, FREE

# Relative decoder norm classes (norm_chat / (norm_base + norm_chat)). The reference named the
# clusters near 0 and 1 without thresholds, and used 0.3-0.7 for shared latents.
BASE_ONLY_MAX = 0.1
CHAT_ONLY_MIN = 0.9
SHARED_RANGE = (0.3, 0.7)


def classify_latents(rel_norm_F, owner_F=None):
    """Boolean masks [F] for the reference's latent classes, from relative decoder norms. owner_F
    (CrossCoder.latent_owner) of a partitioned dictionary: with exclusive blocks, the model-only
    classes are those blocks, exclusive by construction (a free latent near 0 or 1 counts as
    other); designated shared latents are shared; the other free latents by their norm
    (Anthropic classify exclusives only among the non-designated latents)."""
    base_only = rel_norm_F < BASE_ONLY_MAX
    chat_only = rel_norm_F > CHAT_ONLY_MIN
    shared = (rel_norm_F > SHARED_RANGE[0]) & (rel_norm_F < SHARED_RANGE[1])
    if owner_F is not None and (owner_F != FREE).any():
        free = owner_F == FREE
        if (owner_F >= 0).any():  # exclusive blocks
            base_only, chat_only = owner_F == 0, owner_F == 1
        else:
            base_only, chat_only = base_only & free, chat_only & free
        shared = (shared & free) | (owner_F == DESIGNATED)
    other = ~(base_only | chat_only | shared)
    return {"base_only": base_only, "chat_only": chat_only, "shared": shared, "other": other}


def separation_note(classes, rel_norm_F, kl_gap=None, min_gap=1e-4, one_vocabulary=True):
    """None when some latent is one model's alone (base-only, chat-only); otherwise what an
    all-shared result means, said rather than shown as a finding: with the models' mean
    KL(P_chat || P_base) a token (kl_gap, analysis.py's), a null result (they agree) or norms not
    separated yet (they differ). one_vocabulary False (models of different tokenizers): no KL test
    applies. rel_norm_F: the relative norms, or for more than two models the norm shares [F, M]."""
    if any(bool(classes[name].any()) for name in classes if name.endswith("_only")):
        return None
    finite = rel_norm_F[torch.isfinite(rel_norm_F).all(-1)] if rel_norm_F.ndim == 2 else rel_norm_F[torch.isfinite(rel_norm_F)]
    spread = float(finite.std(0).mean()) if rel_norm_F.ndim == 2 else float(finite.std())
    alone = "base-only or chat-only" if rel_norm_F.ndim == 1 else "any one model's alone"
    head = f"no latent is {alone} ({'relative norms' if rel_norm_F.ndim == 1 else 'norm shares'} spread {spread:.3f})"
    if not one_vocabulary:
        return (f"{head}: the crosscoder explains {'both models' if rel_norm_F.ndim == 1 else 'every model'} with "
                "shared latents at this budget; the models share no vocabulary, so no KL test applies (exclusive "
                "blocks, --exclusive_fraction, give each model latents of its own by construction)")
    if kl_gap is None:
        return (f"{head}: the norms have not separated the models yet, or the models do not differ at this hook; "
                "analysis.py's KL test says which")
    if kl_gap < min_gap:
        return f"{head}, and the models agree here (KL {kl_gap:.2g} nats a token): a null result"
    return (f"{head}, though the models differ here (KL {kl_gap:.3g} nats a token): the norms have not separated "
            "them yet. Train longer (--num_tokens, or several epochs over one harvest: --store_dir with "
            "--wrap_tokens true), or read the KL test's sets, which do not rely on the norms")


def only_name(m, n_models):
    """The class of latents model m holds alone: the reference's base_only and chat_only for two
    models, model_<m>_only for more."""
    return ("base_only", "chat_only")[m] if n_models == 2 else f"model_{m}_only"


def norm_shares(norms_FM):
    """[F, M]: each model's share of a latent's decoder norm, |d_m| / sum over models of |d_m'|
    (NaN for a latent whose decoders are all zero). With two models, column 1 is the relative norm."""
    return norms_FM / norms_FM.sum(-1, keepdim=True)


def classify_shares(share_FM, owner_F=None):
    """Boolean masks [F] per class for M models, from norm shares [F, M]: model m's alone
    (model_<m>_only) where its share exceeds CHAT_ONLY_MIN; shared where every model's share
    exceeds SHARED_RANGE[0] * 2 / M, each model holding at least 60% of an even split. With two
    models these are the reference's classes of the relative norm (classify_latents), which
    docs/design.md argues. owner_F (CrossCoder.latent_owner) as in classify_latents."""
    M = share_FM.shape[-1]
    only = {only_name(m, M): share_FM[:, m] > CHAT_ONLY_MIN for m in range(M)}
    shared = (share_FM > SHARED_RANGE[0] * 2 / M).all(-1)
    if owner_F is not None and (owner_F != FREE).any():
        free = owner_F == FREE
        if (owner_F >= 0).any():  # exclusive blocks
            only = {only_name(m, M): owner_F == m for m in range(M)}
        else:
            only = {name: mask & free for name, mask in only.items()}
        shared = (shared & free) | (owner_F == DESIGNATED)
    other = ~(shared | torch.stack(list(only.values())).any(0))
    return {**only, "shared": shared, "other": other}


def relative_norms(crosscoder):
    """(CPU) [F] the relative decoder norm for two models, [F, M] the norm shares for more."""
    norms_FM = crosscoder.decoder_norms().detach().float().cpu()
    return norm_shares(norms_FM)[:, 1] if norms_FM.shape[1] == 2 else norm_shares(norms_FM)


def latent_classes(crosscoder):
    """The latent classes of a crosscoder's weights (CPU masks), by block where partitioned: for
    two models classify_latents of the relative norm, for more classify_shares of the norm shares."""
    rel = relative_norms(crosscoder)
    return (classify_latents if rel.ndim == 1 else classify_shares)(rel, crosscoder.latent_owner())
