"""Does a latent set explain how the chat model differs? The KL test of Minder, Dumas et al. 2025
("Overcoming Sparsity Artifacts in Crosscoders", arXiv 2504.02922; their code
science-of-finetuning/sparsity-artifacts-crosscoders, scripts/evaluate_interventions_effects.py).

Both models read the same tokens. At the crosscoder's hook the base model's residual is patched
with a latent set S, h_S = h_base + sum_{j in S} f_j (d_j^chat - d_j^base) (+ b_chat - b_base when
the decoder-bias difference is included: say which), and the chat model runs its remaining layers
from it. Per position, KL(P_chat || P_S); the gap is the same with the unpatched base residual, and
the fraction closed is 1 - KL_S / KL_gap over a group of positions. A zero gap (a model against
itself) closes nothing and divides by nothing: the fraction is None.

Shape legend: N sequences, S positions, P positions patched (S - first), D d_in, F latents, J a
set's latents, V vocabulary, M models.
"""
import itertools
from typing import NamedTuple

import torch
from tqdm.auto import tqdm

from crossdiff.config.plan import hook_layer
from crossdiff.diffing.measures import iter_paired_activations, is_model_specific, normalisation_factors, rank_sum_order
from crossdiff.sources.activations import autocast_context, extract_activations
from crossdiff.sources.mix import ASSISTANT, TEMPLATE, TEXT, USER
from crossdiff.sources.tokenmask import PositionFilter

ALL, ALL_BIAS = "all", "all+bias"  # the reconstruction difference without / with b_chat - b_base


class WithBias(NamedTuple):
    """A latent set patched together with the decoder-bias difference b_chat - b_base."""
    latents: list
MIN_GAP = 1e-4  # nats per token: a smaller gap has no fraction closed (fraction_closed)


def kl_per_position(logits_ref_NSV, logits_NSV, ref_is_log_probs=False):
    """KL(P_ref || P) at each position [..., S], from logits (log-softmax in fp32; ref broadcast
    to the other's leading dimensions). One row at a time: a row's temporaries are [S, V]
    (Gemma's 262k vocabulary: 0.7 GB at 128 positions, where a 16-row batch at once took 10 GB).
    ref_is_log_probs: the reference is given as log_probs, taken once for the many logits
    compared with it."""
    ref = logits_ref_NSV.expand_as(logits_NSV)
    out = torch.empty(logits_NSV.shape[:-1], dtype=torch.float32, device=logits_NSV.device)
    for idx in itertools.product(*(range(d) for d in logits_NSV.shape[:-2])):
        log_p = ref[idx] if ref_is_log_probs else torch.log_softmax(ref[idx].float(), dim=-1)
        log_q = torch.log_softmax(logits_NSV[idx].float(), dim=-1)
        out[idx] = (log_p.exp() * (log_p - log_q)).sum(-1)
    return out


def log_probs(logits_NSV):
    """The log-softmax of logits over the vocabulary in fp32, a row at a time (in place where the
    logits are fp32 already: their memory holds the result)."""
    out = logits_NSV if logits_NSV.dtype == torch.float32 else torch.empty_like(logits_NSV, dtype=torch.float32)
    for idx in itertools.product(*(range(d) for d in logits_NSV.shape[:-2])):
        out[idx] = torch.log_softmax(logits_NSV[idx].float(), dim=-1)
    return out


def patch(h_base_NPD, acts_NPF, W_dec_FMD, latents_J, b_dec_MD=None, base=0, chat=1):
    """h_base + sum over j in latents_J of f_j (d_j^chat - d_j^base), plus b_chat - b_base when
    b_dec_MD is given (raw-space weights: a folded crosscoder's)."""
    diff_JD = (W_dec_FMD[latents_J, chat] - W_dec_FMD[latents_J, base]).float()
    out_NPD = h_base_NPD.float() + acts_NPF[..., latents_J].float() @ diff_JD
    if b_dec_MD is not None:
        out_NPD = out_NPD + (b_dec_MD[chat] - b_dec_MD[base]).float()
    return out_NPD


def fraction_closed(kl_gap, kl_patched):
    """1 - KL_S / KL_gap, or None when there is no gap to close: below MIN_GAP nats a token the
    models agree (a model against itself; the toy pair on plain text, 2e-5) and any patch's own
    error, reported as kl_patched, would make the ratio a large meaningless number."""
    return None if kl_gap < MIN_GAP else 1 - kl_patched / kl_gap


def _chat_from(model, resid_NSD, tokens_NS, hook_point, from_hook, layer):
    """The chat model's logits with its residual at hook_point replaced by resid_NSD."""
    if from_hook:
        return model(resid_NSD, start_at_layer=layer, tokens=tokens_NS)
    return model.run_with_hooks(tokens_NS, fwd_hooks=[(hook_point, lambda act, hook: resid_NSD.to(act.dtype))])


@torch.no_grad()
def kl_gap_closed(crosscoder, models, tokens_NS, sets, groups, batch_size=4, base=0, chat=1, progress=True,
                  forward_rows=None):
    """The KL gap each latent set closes in each group of positions, over tokens_NS.

    sets: {name: latent indices, WithBias(latent indices) (patched with the decoder-bias
    difference too), ALL / ALL_BIAS (every latent, without / with it), or a float direction [D]
    added at every patched position}; groups: {name: bool [N, S]} (a position's logits, predicting the next token).
    Positions training never read (before ignore_first_n, excluded tokens) keep the base residual
    and count in no group. Returns {(set, group): {n_latents, n_positions, kl_gap, kl_patched,
    fraction_closed}} (the KLs are means over the group's positions). forward_rows: rows one chat
    forward may take (default: a batch), so that forward_rows // batch_size sets share a forward."""
    folded = crosscoder.fold_normalisation(normalisation_factors(crosscoder))
    W_dec_FMD, b_dec_MD = folded.decoder_weight().detach(), folded.b_dec.detach()
    keep = PositionFilter(crosscoder.cfg, models)
    hook_point, first = crosscoder.cfg["hook_point"], keep.first
    layer = hook_layer(hook_point)
    from_hook = layer is not None and hook_point == f"blocks.{layer}.hook_resid_pre"
    device = next(models[chat].parameters()).device
    F = W_dec_FMD.shape[0]
    vectors = {name: s.float() for name, s in sets.items() if torch.is_tensor(s) and s.is_floating_point()}
    with_bias = {name for name, s in sets.items() if isinstance(s, WithBias) or isinstance(s, str) and s == ALL_BIAS}
    latents = {name: torch.arange(F) if isinstance(s, str) else
               torch.as_tensor(s.latents if isinstance(s, WithBias) else s, dtype=torch.long).flatten()
               for name, s in sets.items() if name not in vectors}
    for name, s in sets.items():
        if name in vectors:
            if vectors[name].shape != W_dec_FMD.shape[-1:]:
                raise ValueError(f"set {name!r}: a direction must have d_in {W_dec_FMD.shape[-1]} entries, "
                                 f"got shape {tuple(vectors[name].shape)}")
            continue
        if isinstance(s, str) and s not in (ALL, ALL_BIAS):
            raise ValueError(f"set {name!r}: {s!r} is neither a list of latents nor {ALL!r} / {ALL_BIAS!r}")
        bad = latents[name][(latents[name] < 0) | (latents[name] >= F)]
        if len(bad):
            raise ValueError(f"set {name!r}: latent {int(bad[0])} is outside the dictionary (0..{F - 1})")
    names = list(sets)

    def patched(name, h_base_NSD, acts_NPF, kept_NP):  # the base residual with the set's patch
        h = h_base_NSD.clone()
        if name in vectors:  # a direction added at every position (the Activation Difference Lens)
            patched_NPD = h_base_NSD[:, first:] + vectors[name].to(device)
        else:
            patched_NPD = patch(h_base_NSD[:, first:], acts_NPF, W_dec_FMD.to(device), latents[name].to(device),
                                b_dec_MD.to(device) if name in with_bias else None, base, chat)
        h[:, first:] = torch.where(kept_NP[..., None], patched_NPD, h_base_NSD[:, first:])
        return h

    # summed KL per group (the gap) and per set and group (patched), and positions per group
    gap_sums, counts = torch.zeros(len(groups), dtype=torch.float64), torch.zeros(len(groups), dtype=torch.float64)
    patched_sums = torch.zeros(len(names), len(groups), dtype=torch.float64)
    for start in tqdm(range(0, len(tokens_NS), batch_size), desc="KL gap", leave=False, disable=not progress):
        t = tokens_NS[start:start + batch_size].to(device, torch.long)
        with autocast_context(device):
            resid = [extract_activations(m, t, hook_point).float() for m in models]
        x_NPMD = torch.stack([r[:, first:] for r in resid], dim=2)
        n, P, M, D = x_NPMD.shape
        acts_NPF = folded.encode(x_NPMD.flatten(0, 1).to(W_dec_FMD.device)).float().view(n, P, F).to(device)
        kept_NP = keep.keep(t, x_NPMD).to(device) if keep.active else torch.ones(n, P, dtype=torch.bool, device=device)
        masks_GNP = torch.stack([mask[start:start + n, first:].to(device) & kept_NP for mask in groups.values()]).double()
        with autocast_context(device):
            clean = log_probs(_chat_from(models[chat], resid[chat], t, hook_point, from_hook, layer))  # once a batch
            gap_NP = kl_per_position(clean, _chat_from(models[chat], resid[base], t, hook_point, from_hook, layer),
                                     ref_is_log_probs=True)[:, first:]
            gap_sums += torch.einsum("np,gnp->g", gap_NP.double(), masks_GNP).cpu()
            for i in range(0, len(names), max(1, (forward_rows or n) // n)):  # sets a forward
                chunk = names[i:i + max(1, (forward_rows or n) // n)]
                h = torch.cat([patched(name, resid[base], acts_NPF, kept_NP) for name in chunk])
                logits = _chat_from(models[chat], h, t.repeat(len(chunk), 1), hook_point, from_hook, layer)
                kl_CNP = kl_per_position(clean[None], logits.view(len(chunk), *clean.shape),
                                         ref_is_log_probs=True)[:, :, first:]
                patched_sums[i:i + len(chunk)] += torch.einsum("cnp,gnp->cg", kl_CNP.double(), masks_GNP).cpu()
        counts += masks_GNP.sum((1, 2)).cpu()
    out = {}
    for (k, name), (j, g) in itertools.product(enumerate(names), enumerate(groups)):
        n_pos = int(counts[j])
        kl_gap, kl_s = (gap_sums[j].item() / n_pos, patched_sums[k, j].item() / n_pos) if n_pos else (None, None)
        out[name, g] = {"n_latents": len(latents[name]) if name in latents else 0, "n_positions": n_pos, "kl_gap": kl_gap, "kl_patched": kl_s,
                        "fraction_closed": None if not n_pos else fraction_closed(kl_gap, kl_s)}
    return out


@torch.no_grad()
def adl_direction(models, tokens_NS, hook_point, n_positions=5, first=1, batch_size=8, base=0, chat=1):
    """The Activation Difference Lens (Minder et al. 2025, arXiv 2510.13900): the mean of
    h_chat - h_base at the hook over the first n_positions positions training reads (from `first`
    on: the BOS, identical input to both, is left out) of tokens_NS (pass pretraining-like rows)."""
    device = next(models[chat].parameters()).device
    total, count = None, 0
    for start in range(0, len(tokens_NS), batch_size):
        t = tokens_NS[start:start + batch_size].to(device, torch.long)
        with autocast_context(device):
            diff = (extract_activations(models[chat], t, hook_point).float()
                    - extract_activations(models[base], t, hook_point).float())[:, first:first + n_positions]
        total = diff.sum((0, 1)) if total is None else total + diff.sum((0, 1))
        count += diff.shape[0] * diff.shape[1]
    return total / count


@torch.no_grad()
def logit_lens(model, direction_D, top=10):
    """The `top` tokens a direction promotes, read through the model's final norm and unembedding:
    [(token, logit)]; none for a zero direction (the null pair's: every token ties)."""
    if not bool(direction_D.any()):
        return []
    logits_V = model.unembed(model.ln_final(direction_D.to(model.W_U.device)[None, None].float()))[0, 0]
    values, ids = logits_V.topk(top)
    return [(model.to_single_str_token(int(i)) if model.tokenizer is not None else str(int(i)), float(v))
            for v, i in zip(values, ids)]


def rank_by_gap_closed(crosscoder, models, tokens_NS, group_NS, candidates_J=None, **kw):
    """The candidate latents (default: all) in order of the gap each closes alone in a group of
    positions, most first, with those fractions: a selection to be measured on other rows (the
    selection rows' own figures are biased upward). One chat forward per latent and batch."""
    F = crosscoder.W_dec.shape[0]
    candidates = range(F) if candidates_J is None else [int(j) for j in candidates_J]
    single = kl_gap_closed(crosscoder, models, tokens_NS, {j: [j] for j in candidates}, {"group": group_NS}, **kw)
    closed = torch.tensor([single[j, "group"]["fraction_closed"] or 0.0 for j in candidates], dtype=torch.float64)
    order = closed.argsort(descending=True, stable=True)
    return torch.tensor(list(candidates))[order], closed[order]


@torch.no_grad()
def firing_positions(crosscoder, models, tokens_NS, latents_J, batch_size=8):
    """{latent: bool [N, S]}: the positions where each latent fires (of those training reads)."""
    s_M, keep = normalisation_factors(crosscoder), PositionFilter(crosscoder.cfg, models)
    latents = torch.as_tensor(list(latents_J), dtype=torch.long)
    fires_NSJ = torch.zeros(*tokens_NS.shape, len(latents), dtype=torch.bool)
    start = 0
    for t, x in iter_paired_activations(models, tokens_NS, crosscoder.cfg["hook_point"], batch_size, "firing",
                                        progress=False, first=keep.first):
        n, P = x.shape[:2]
        f_BJ = crosscoder.encode(x.flatten(0, 1).to(s_M.device) * s_M[:, None])[:, latents.to(s_M.device)]
        kept = keep.keep(t, x).flatten().to(f_BJ.device) if keep.active else True
        fires_NSJ[start:start + n, keep.first:] = ((f_BJ > 0) & kept[..., None] if keep.active else f_BJ > 0).view(
            n, P, -1).cpu()
        start += n
    return {int(j): fires_NSJ[..., i] for i, j in enumerate(latents)}


def gap_where_firing(crosscoder, models, tokens_NS, latents_J, **kw):
    """{latent: kl_gap_closed's row} for each latent patched alone, over the positions where it
    fires (the dashboard's per-latent figure). One chat forward per latent and batch."""
    if not len(latents_J):
        return {}
    fires = firing_positions(crosscoder, models, tokens_NS, latents_J, kw.get("batch_size", 4))
    rows = kl_gap_closed(crosscoder, models, tokens_NS, {j: [j] for j in fires}, fires, **kw)
    return {j: rows[j, j] for j in fires}


def ranked_sets(crosscoder, models, tokens_NS, group_NS, share=0.02, **kw):
    """The share of the dictionary that closes the most of a group's gap one latent at a time
    (rank_by_gap_closed on tokens_NS: pass rows the table does not evaluate on), alone and with
    the decoder-bias difference: {"ranked<k>": latents, "ranked<k>+bias": WithBias(latents)}."""
    order, _ = rank_by_gap_closed(crosscoder, models, tokens_NS, group_NS, **kw)
    k = max(1, round(share * crosscoder.W_dec.shape[0]))
    return {f"ranked{k}": order[:k].tolist(), f"ranked{k}+bias": WithBias(order[:k].tolist())}


def diffing_sets(chat_only_J, probed_J=None, ls=None, given=None):
    """The sets analysis.py tests: every latent without and with the decoder-bias difference, the
    chat-only class; with Latent Scaling's result ls over probed_J, the latents that pass it and
    the top and bottom halves of probed_J by its rank sum (the authors' comparison); given: a
    user's list."""
    sets = {"all": ALL, "all+bias": ALL_BIAS, "chat_only": chat_only_J.tolist()}
    if ls is not None:
        nu_e, nu_r = ls["nu_error"].cpu(), ls["nu_reconstruction"].cpu()
        sets["chat_specific"] = probed_J[is_model_specific(nu_e, nu_r)].tolist()
        ranked = probed_J[rank_sum_order(nu_e.nan_to_num(float("inf")), nu_r.nan_to_num(float("inf")))]
        sets["ls_top_half"], sets["ls_bottom_half"] = ranked[:len(ranked) // 2].tolist(), ranked[len(ranked) // 2:].tolist()
    if given:
        sets["given"] = list(given)
    return sets


def informative_sets(sets, dict_size):
    """(sets without those that say nothing, a note naming them or None): an empty list (nothing
    to patch: no row rather than a trivial 0 %) and a list of every latent (the "all" row again,
    with random sets equal to it: the diff-SAE's chat-only class)."""
    empty = [name for name, v in sets.items() if isinstance(v, list) and not v]
    whole = [name for name, v in sets.items() if isinstance(v, list) and len(set(v)) == dict_size]
    parts = ([f"no latent in {', '.join(empty)}"] * bool(empty)
             + [f"{', '.join(whole)} holds every latent (the all row)"] * bool(whole))
    kept = {name: v for name, v in sets.items() if name not in empty + whole}
    return kept, ("KL test: " + "; ".join(parts) + "; left out") if parts else None


def role_groups(role_NS, first_k=9):
    """The KL test's groups from each token's role (data.py's role.pt): "all", "assistant" (an
    assistant's words), "first_k" (the first first_k tokens of each assistant turn), "template"
    (the chat template's own tokens), "user" (a user's words) and "text" (plain-text rows). An
    empty group stays (its row reports no positions and no KL)."""
    role_NS = torch.as_tensor(role_NS).long()
    assistant = role_NS == ASSISTANT
    first = torch.zeros_like(assistant)
    run_N = torch.zeros(role_NS.shape[0], dtype=torch.long)
    for p in range(role_NS.shape[1]):
        run_N = torch.where(assistant[:, p], run_N + 1, 0)  # 1 at a turn's first assistant token
        first[:, p] = assistant[:, p] & (run_N <= first_k)
    return {"all": torch.ones_like(assistant), "assistant": assistant, "first_k": first,
            "template": role_NS == TEMPLATE, "user": role_NS == USER, "text": role_NS == TEXT}


def source_groups(tokens_NS, is_chat_N=None):
    """Groups of positions for data without roles: "all", and "text" (the plain-text rows) when
    the rows' sources are known."""
    groups = {"all": torch.ones(tokens_NS.shape, dtype=torch.bool)}
    if is_chat_N is not None:
        groups["text"] = ~is_chat_N.bool().cpu()[:, None].expand(tokens_NS.shape)
    return groups


def kl_table(crosscoder, models, tokens_NS, sets, groups, n_random=5, seed=0, method="crosscoder", **kw):
    """kl_gap_closed's rows for kl_gap.json, one per (set, group), each with its control: n_random
    random latent sets of the same size, or for a direction n_random random directions of its
    norm (seeded); the mean and spread of what they close (none for the sets of every latent)."""
    F, D = crosscoder.W_dec.shape[0], crosscoder.W_dec.shape[-1]
    g = torch.Generator().manual_seed(seed)
    vectors = {n: v for n, v in sets.items() if torch.is_tensor(v) and v.is_floating_point()}

    def control_name(v, n_latents, i):  # a random set of the same size, with the bias when it has it
        return f"random{n_latents}{'+bias' * isinstance(v, WithBias)}#{i}"

    sized = {(len(v.latents if isinstance(v, WithBias) else v), isinstance(v, WithBias))
             for n, v in sets.items() if not isinstance(v, str) and n not in vectors}
    controls = {}
    for J, bias in sorted(s for s in sized if s[0]):
        g_J = torch.Generator().manual_seed(seed + 7919 * J + bias)  # a size's draws whatever else is tested
        for i in range(n_random):
            picked = torch.randperm(F, generator=g_J)[:J]
            controls[control_name(WithBias(picked) if bias else picked, J, i)] = WithBias(picked) if bias else picked
    for n, v in vectors.items():
        for i in range(n_random):
            controls[f"{n}~random#{i}"] = torch.nn.functional.normalize(torch.randn(D, generator=g), dim=0) * v.float().norm()
    got = kl_gap_closed(crosscoder, models, tokens_NS, {**sets, **controls}, groups, **kw)
    rows = []
    for name, s in sets.items():
        for group in groups:
            r = got[name, group]
            prefix = f"{name}~random#" if name in vectors else control_name(s, r["n_latents"], "")
            closed = [got[c, group]["fraction_closed"] for c in controls if c.startswith(prefix)]
            closed = torch.tensor([c for c in closed if c is not None], dtype=torch.float64)
            spread = {"random_mean": float(closed.mean()) if len(closed) else None,
                      "random_std": float(closed.std()) if len(closed) > 1 else None}
            if isinstance(s, str):
                spread = {"random_mean": None, "random_std": None}
            rows.append({"method": method, "set": name, "group": group, **r, **spread})
    return rows


def format_kl_table(rows, groups=None):
    """The fraction closed per set (rows) and group (columns), with the random control beside it."""
    groups = groups or list(dict.fromkeys(r["group"] for r in rows))
    by = {(r["set"], r["group"]): r for r in rows}
    sets = list(dict.fromkeys(r["set"] for r in rows))

    def cell(r):
        if r["n_positions"] == 0:
            return "no positions"
        if r["fraction_closed"] is None:
            return f"no gap (KL_S {r['kl_patched']:.2g})"
        control = "" if r["random_mean"] is None else f" (random {r['random_mean']:.1%} ± {r['random_std'] or 0:.1%})"
        return f"{r['fraction_closed']:.1%}{control}"

    lines = [f"{'set':<22} {'latents':>7}  " + "  ".join(f"{g:<30}" for g in groups)]
    lines.append(f"{'(KL gap, positions)':<22} {'':>7}  " + "  ".join(
        f"{'none' if by[sets[0], g]['kl_gap'] is None else format(by[sets[0], g]['kl_gap'], '.3g')}, "
        f"{by[sets[0], g]['n_positions']:,}".ljust(30) for g in groups))
    for s in sets:
        n = by[s, groups[0]]["n_latents"]
        lines.append(f"{s:<22} {n or 'a dir.':>7}  " + "  ".join(f"{cell(by[s, g]):<30}" for g in groups))
    return "\n".join(lines)


@torch.no_grad()
def models_kl(models, tokens_NS, groups, batch_size=4, base=0, chat=1, first=1, top=10, progress=True):
    """Where the two models differ, with no dictionary: KL(P_chat || P_base) of their full
    forwards at each position from `first` on. Returns ({group: {n_positions, kl}} (the mean),
    [(kl, sequence, position)] for the `top` largest over all those positions)."""
    device = next(models[chat].parameters()).device
    sums, counts = dict.fromkeys(groups, 0.0), dict.fromkeys(groups, 0)
    best_v, best_i = torch.empty(0, dtype=torch.float64), torch.empty(0, dtype=torch.long)
    S = tokens_NS.shape[1]
    for start in tqdm(range(0, len(tokens_NS), batch_size), desc="KL between the models", leave=False,
                      disable=not progress):
        t = tokens_NS[start:start + batch_size].to(device, torch.long)
        with autocast_context(device):
            kl_NS = kl_per_position(models[chat](t), models[base](t)).double().cpu()
        kl_NS[:, :first] = float("nan")
        for g, mask in groups.items():
            m = mask[start:start + len(t)].cpu().clone()
            m[:, :first] = False
            sums[g] += float(kl_NS[m].sum())
            counts[g] += int(m.sum())
        flat = kl_NS.flatten().nan_to_num(-1.0)
        v, i = flat.topk(min(top, len(flat)))
        best_v, best_i = torch.cat([best_v, v]), torch.cat([best_i, i + start * S])
        keep = best_v.topk(min(top, len(best_v))).indices
        best_v, best_i = best_v[keep], best_i[keep]
    by_group = {g: {"n_positions": counts[g], "kl": sums[g] / counts[g] if counts[g] else None} for g in groups}
    return by_group, [(float(v), int(i) // S, int(i) % S) for v, i in zip(best_v, best_i)]


def words(tokens_str):
    """Tokens as text: a word-level vocabulary's carry no spaces, BPE's do (" x", "▁x", "Ġx")."""
    return ("" if any(t[:1] in (" ", "▁", "Ġ") for t in tokens_str) else " ").join(tokens_str)


def method_name(cfg):
    """kl_gap.json's method: the architecture, "dfc-" before it with exclusive blocks (the
    dedicated-feature crosscoder), "-shared" after it with a designated shared block."""
    return ("dfc-" if cfg.get("exclusive_fraction") else "") + cfg["architecture"] + \
        ("-shared" if cfg.get("shared_fraction") else "")


def diff_report(crosscoder, models, tokens_NS, groups, sets, text_rows_NS, batch_size=4, adl_batch_size=8, top=10):
    """What analysis.py's KL section reports on tokens_NS: where the models differ (models_kl, with
    each top place's context), the gap each set closes (kl_table), and the Activation Difference
    Lens on text_rows_NS (its logit lens and its gap closed). Returns (the rows of kl_gap.json,
    the summary's entries, the text printed)."""
    first = PositionFilter(crosscoder.cfg, models).first
    by_group, top_kl = models_kl(models, tokens_NS, groups, batch_size, first=first, top=top)
    places = [{"kl": v, "sequence": n, "position": p,
               "context": words(models[1].to_str_tokens(tokens_NS[n, max(0, p - 8):p + 2]))} for v, n, p in top_kl]
    rows = kl_table(crosscoder, models, tokens_NS, sets, groups, batch_size=batch_size, method=method_name(crosscoder.cfg))
    adl = adl_direction(models, text_rows_NS, crosscoder.cfg["hook_point"], first=first, batch_size=adl_batch_size)
    lens = logit_lens(models[1], adl)
    rows += kl_table(crosscoder, models, tokens_NS, {"adl": adl}, groups, method="adl", batch_size=batch_size)
    summary = {"models_kl": {"by_group": by_group, "top": places}, "adl_logit_lens": lens,
               "kl_gap": {f"{r['method']}:{r['set']}/{r['group']}": r["fraction_closed"] for r in rows}}
    text = "\n".join([
        "KL(P_chat || P_base) per token: " + ", ".join(f"{g} {r['kl']:.3g} ({r['n_positions']:,})"
                                                     for g, r in by_group.items() if r["kl"] is not None),
        "largest at: " + "; ".join(f"{t['kl']:.2f} [{t['context']}]" for t in places[:3]),
        "Activation Difference Lens (mean difference over the first 5 positions of text rows), top tokens: "
        + (", ".join(t for t, _ in lens) if lens else "none (the difference is 0: the models agree there)"),
        f"the share of the base -> chat KL gap each set closes ({len(tokens_NS)} held-out sequences):",
        format_kl_table(rows)])
    return rows, summary, text

