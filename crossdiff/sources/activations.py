"""Running the models: the activations at a hook point, computing no more of a model than needed,
for every model on the same tokens, and the per-model normalisation factors.

Shape legend: N sequences, S seq_len (positions), M models, D d_in.
"""
import torch
from einops import rearrange
from tqdm.auto import tqdm

from crossdiff.config.plan import hook_layer, hooks_of, layers_needed, norm_width
from crossdiff.config.schema import effective
from crossdiff.sources.aligned_mix import kept_tuples, split_aligned
from crossdiff.sources.tokenmask import PositionFilter


def has_hook(model, hook_point):
    """True when extract_activations can read hook_point from model (a model truncated to the
    blocks before blocks.L.hook_resid_pre still gives it: it is their output)."""
    layer = hook_layer(hook_point)
    if hook_point in model.hook_dict:
        return True
    return hook_point == f"blocks.{layer}.hook_resid_pre" and model.cfg.n_layers == layer


@torch.no_grad()
def extract_activations(model, tokens_NS, hook_point):
    """Residual activations [N, S, D] at hook_point, computing no more of the model than needed.

    The reference ran run_with_cache over all layers and the unembedding; for
    blocks.L.hook_resid_pre, model(tokens, stop_at_layer=L) returns exactly that tensor and
    skips every later layer and the logits. Other hook points are captured by a hook, with the
    forward stopped after the block that holds them.
    """
    layer = hook_layer(hook_point)
    if layer is not None and hook_point == f"blocks.{layer}.hook_resid_pre":
        return model(tokens_NS, stop_at_layer=layer)
    captured = {}

    def capture(act, hook):
        captured["act"] = act

    stop = layers_needed(hook_point)
    model.run_with_hooks(tokens_NS, stop_at_layer=stop, fwd_hooks=[(hook_point, capture)],
                         return_type=None if stop is None else "logits")
    return captured["act"]


def each_hook(models, hook_point):
    """[M] the hook of each model: hook_point a name (every model's) or a list (config.hooks_of)."""
    return list(hook_point) if isinstance(hook_point, (list, tuple)) else [hook_point] * len(models)


def check_models(models, hook_point, d_in=None, widths=None):
    """Clear errors, before any work, for models that cannot be diffed at hook_point (a name, or
    one per model). widths: each model's d_model when they differ (the config's model_widths)."""
    for i, (model, hook) in enumerate(zip(models, each_hook(models, hook_point))):
        if not has_hook(model, hook):
            raise ValueError(f"hook_point {hook!r} does not exist in model {i} "
                             f"({model.cfg.model_name}, {model.cfg.n_layers} layers)")
    have = [model.cfg.d_model for model in models]
    if widths:
        if have != list(widths):
            raise ValueError(f"the models' widths are {have} but the config's model_widths are {list(widths)}")
        return
    if len(set(have)) != 1:
        raise ValueError(f"models disagree on d_in (d_model): {have} (--pad_widths true lets them share a crosscoder)")
    if d_in is not None and d_in != have[0]:
        raise ValueError(f"cfg d_in={d_in} but the models' d_model is {have[0]}")


@torch.no_grad()
def run_aligned(models, rows_NSK, hook_point, first=1, d_in=None):
    """Activations [P, M, D] at the aligned positions of aligned rows (sources/aligned_mix.py: each
    model runs on its own tokens), a tuple kept when every model's position is >= first; each
    model's activations zero-padded to d_in (none: the widest model's width)."""
    device = next(models[0].parameters()).device
    tokens_NSM, pairs_NSM = split_aligned(rows_NSK.to(device, torch.long), len(models))
    acts = [extract_activations(model, tokens_NSM[..., m], hook)
            for m, (model, hook) in enumerate(zip(models, each_hook(models, hook_point)))]
    return at_aligned(acts, pairs_NSM, first, d_in)[2]


def at_aligned(acts_per_model, pairs_NSM, first=1, d_in=None):
    """(n_P, s_P, [P, M, D]): the rows and tuple indices of the aligned tuples whose every position
    is >= first, and each model's activations [N, S, D_m] there, zero-padded to d_in (none: the
    widest model's width)."""
    n_P, s_P = torch.nonzero(kept_tuples(pairs_NSM, first), as_tuple=True)
    parts = [a[n_P, pairs_NSM[n_P, s_P, m]] for m, a in enumerate(acts_per_model)]
    d_in = d_in or max(p.shape[-1] for p in parts)
    return n_P, s_P, torch.stack([torch.nn.functional.pad(p, (0, d_in - p.shape[-1])) for p in parts], dim=1)


@torch.no_grad()
def run_models(models, tokens_NS, hook_point, first=1, keep=None, d_in=None):
    """Activations [N * (S-first), M, D] of every model on the same tokens, the first positions of
    each row dropped (the BOS), under the reference's bf16 autocast where the device has it.
    keep (a tokenmask.PositionFilter): only the positions it keeps, so fewer rows. Aligned rows
    ([N, S, 2M], models of different tokenizers): run_aligned's rows, padded to d_in."""
    device = next(models[0].parameters()).device
    if tokens_NS.ndim == 3:
        with autocast_context(device):
            return run_aligned(models, tokens_NS, hook_point, first, d_in)
    tokens_NS = tokens_NS.to(device, torch.long)
    with autocast_context(device):
        acts = {}  # each model object once: a model listed twice (the null pair) runs once
        for m, hook in zip(models, each_hook(models, hook_point)):
            if (id(m), hook) not in acts:
                acts[id(m), hook] = extract_activations(m, tokens_NS, hook)[:, first:]
        acts_NPMD = torch.stack([acts[id(m), hook] for m, hook in zip(models, each_hook(models, hook_point))], dim=2)
    if keep is not None and keep.active:
        return acts_NPMD[keep.keep(tokens_NS, acts_NPMD)]
    return rearrange(acts_NPMD, "seq pos model d_in -> (seq pos) model d_in")


@torch.no_grad()
def estimate_norm_factors(models, tokens_NS, hook_point, n_seqs, model_batch_size, drop_bos=True, progress=True,
                          first=None, keep=None, difference=False, target_width=None, norm_scale=None):
    """[M] float32 on the CPU: sqrt(d_in) / the mean activation norm of each model over the first
    n_seqs sequences, run model_batch_size at a time, in fp32 (the harvest runs under bf16 autocast
    on a GPU; the reference estimated the factors without it), over the positions training reads:
    the first `first` of each row dropped (none: 1 if drop_bos), and only those keep (a
    tokenmask.PositionFilter) keeps. drop_bos=False includes position 0, as the reference's run did
    (and so the published crosscoder's factors). norm_scale (config key; difference=True is
    "difference"): "difference", the diff-SAE's, one factor for every model, sqrt(d_in) / the mean
    norm of chat - base (models 1 and 0), so the difference a diff-SAE reads has mean norm
    sqrt(d_in) and stays the scaled difference of the raw activations; "centred", sqrt(d_in) / the
    root-mean-square norm of each model's activations about their mean. target_width: the width
    whose square root the norms are scaled to (none: d_in; models of different widths: their
    mean, the DFC paper's). Aligned rows ([N, S, 2M]): over their aligned positions."""
    norm_scale = norm_scale or ("difference" if difference else "per_model")
    first = int(drop_bos) if first is None else first
    device = next(models[0].parameters()).device
    n_seqs = min(n_seqs, len(tokens_NS))
    if tokens_NS.ndim == 3:  # aligned rows: the aligned positions, each model at its own width
        rows = [run_aligned(models, tokens_NS[s : min(s + model_batch_size, n_seqs)], hook_point, first).float()
                for s in tqdm(range(0, n_seqs, model_batch_size), desc="estimating norms", leave=False,
                              disable=not progress)]
        return factors_from_rows(torch.cat(rows), norm_scale, target_width)
    hooks = each_hook(models, hook_point)
    norm_sums, sum_MD, count = torch.zeros(len(models), dtype=torch.float64, device="cpu"), 0, 0
    for start in tqdm(range(0, n_seqs, model_batch_size), desc="estimating norms", leave=False, disable=not progress):
        tokens = tokens_NS[start : min(start + model_batch_size, n_seqs)].to(device, torch.long)
        # In the models' own dtype (model_dtype), as the reference estimated: no bf16 autocast here.
        acts_MnPD = torch.stack([extract_activations(m, tokens, h)[:, first:] for m, h in zip(models, hooks)]).float()
        kept_nP = (keep.keep(tokens, rearrange(acts_MnPD, "model n pos d -> n pos model d"))
                   if keep is not None and keep.active else
                   torch.ones(acts_MnPD.shape[1:3], dtype=torch.bool, device=acts_MnPD.device))
        x_MPD = acts_MnPD[:, kept_nP.to(acts_MnPD.device)]
        if norm_scale == "difference":
            norm_sums += (x_MPD[1] - x_MPD[0]).norm(dim=-1).sum().double().cpu()
        elif norm_scale == "centred":  # sums of squares and of the vectors: the centred norm at the end
            norm_sums += x_MPD.pow(2).sum((1, 2)).double().cpu()
            sum_MD = sum_MD + x_MPD.sum(1).double().cpu()
        else:
            norm_sums += x_MPD.norm(dim=-1).sum(1).double().cpu()
        count += x_MPD.shape[1]
    d_in = target_width or acts_MnPD.shape[-1]
    if norm_scale == "centred":
        return (d_in ** 0.5 / (norm_sums / count - (sum_MD / count).pow(2).sum(-1)).sqrt()).float()
    return (d_in ** 0.5 / (norm_sums / count)).float()


HIGH_NORM = 10.0  # a position whose median norm is this multiple of the others' is named


def high_norm_positions(tokens_NS, norms_NP, first=0, multiple=HIGH_NORM):
    """The positions (in the full row) whose median activation norm over the rows is above
    multiple x the median over every position: [(position, its median, the others' median, the
    token most often there, the share of rows it is)] (an attention sink: a position that holds
    activations far above the rest dominates the squared loss)."""
    med_P = norms_NP.float().median(0).values
    overall = float(norms_NP.float().median())
    out = []
    for p in torch.nonzero(med_P > multiple * overall).flatten().tolist():
        ids, counts = tokens_NS[:, first + p].unique(return_counts=True)
        top = int(counts.argmax())
        out.append((first + p, float(med_P[p]), overall, int(ids[top]), float(counts[top]) / len(tokens_NS)))
    return out


def high_norm_note(models, tokens_NS, hook_point, first, multiple=HIGH_NORM):
    """One line naming the high-norm positions of the first rows (any model's norm), the token
    there and the options that leave them out, or None."""
    with torch.no_grad():
        norms_NP = torch.stack([extract_activations(m, tokens_NS.to(next(m.parameters()).device, torch.long),
                                                    hook)[:, first:].float().norm(dim=-1).cpu()
                                for m, hook in zip(models, each_hook(models, hook_point))]).amax(0)
    found = high_norm_positions(tokens_NS.cpu(), norms_NP, first, multiple)
    if not found:
        return None
    tok = models[0].tokenizer
    parts = [f"position {p} (median norm {m:.3g} against {o:.3g} elsewhere; token "
             f"{tok.convert_ids_to_tokens(t) if tok is not None else t!r} in {share:.0%} of rows)"
             for p, m, o, t, share in found]
    return (f"note: {'; '.join(parts)} holds activations far above the rest and will dominate the loss; leave it "
            f"out with --ignore_first_n {max(p for p, *_ in found) + 1} or --outlier_norm_multiple {multiple:g}")


def factors_from_rows(raw_RMD, norm_scale, target_width=None):
    """[M] float32: sqrt(d_in) / the mean norm of each model's raw rows ("per_model"), or for every
    model of models 1 - 0 ("difference"), or the root-mean-square norm of each model's rows about
    their mean ("centred"); estimate_norm_factors's figures, from rows in hand (a store's, read
    back at another scaling). target_width: as estimate_norm_factors's."""
    raw_RMD = raw_RMD.float()
    if norm_scale == "difference":
        mean = (raw_RMD[:, 1] - raw_RMD[:, 0]).norm(dim=-1).double().mean().expand(raw_RMD.shape[1])
    elif norm_scale == "centred":
        mean = (raw_RMD.double() - raw_RMD.double().mean(0)).pow(2).sum(-1).mean(0).sqrt()
    else:
        mean = raw_RMD.norm(dim=-1).double().mean(0)
    return ((target_width or raw_RMD.shape[-1]) ** 0.5 / mean).float()


def autocast_context(device):
    """bf16 autocast where the device supports it (CUDA), as the reference; plain fp32 elsewhere."""
    device = torch.device(device)
    enabled = device.type == "cuda" and torch.cuda.is_bf16_supported()
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


def norm_factors(cfg, models, tokens_NS):
    """The factors a buffer with this config measures: over the first norm_estimate_batches model
    batches of tokens_NS, at the positions training reads (Buffer.estimate_norm_scaling_factors;
    store.harvest)."""
    mbs, keep, hooks = cfg["model_batch_size"], PositionFilter(cfg, models), hooks_of(cfg)
    if not keep.active and tokens_NS.ndim == 2:  # (positions already filtered are the user's choice)
        note = high_norm_note(models, tokens_NS[:mbs, : cfg["seq_len"]], hooks, keep.first)
        if note:
            print(note)
    return estimate_norm_factors(models, tokens_NS[:, : cfg["seq_len"]], hooks,
                                 cfg["norm_estimate_batches"] * mbs, mbs, progress=cfg["progress"],
                                 first=keep.first, keep=keep, norm_scale=effective(cfg, "norm_scale"),
                                 target_width=norm_width(cfg))
