"""The latent dashboard: one self-contained HTML file that analysis.py writes as
<checkpoint>/analysis/dashboard.html. No server and no network: it opens from disk in a browser.

It lists every latent that fired on the held-out tokens (every latent when no tokens were run)
in a table that sorts and filters; selecting one shows its decoder norm per model, where it sits
on the relative-norm histogram and its top activating contexts, the base and the chat model side
by side: each token coloured by that model's share of the latent's pre-activation,
<x_m, W_enc[m, :, j]> in the training space (the two shares plus b_enc[j] are the pre-activation).
Models of different tokenizers each show their own tokens around their own aligned position.

Size: the table is gzip-compressed JSON; the examples are one gzip-compressed binary blob in the
same file (the held-out tokens once; per example its place, its activation and the shares,
quantised per latent), decoded by the browser the first time a latent is selected. 16,384 latents
with 10 examples of 11 tokens each come to under 5 MB (tests/test_dashboard.py).

Shape legend: N sequences, S positions, M models, D d_in, F latents, J latents shown,
K examples per latent, E examples in all, W window tokens.
"""
import base64
import gzip
import json
from pathlib import Path

import numpy as np
import torch

from crossdiff.config.plan import first_n
from crossdiff.diffing.aligned import aligned_window_contributions, shares_one_space
from crossdiff.diffing.classes import latent_classes
from crossdiff.diffing.measures import iter_paired_activations, normalisation_factors
from crossdiff.sources.aligned_mix import split_aligned

BEFORE, AFTER = 8, 2  # tokens shown before and after each example's activating token
HISTOGRAM_BINS = 50
TEMPLATE = Path(__file__).with_name("dashboard_template.html")


@torch.no_grad()
def window_contributions(crosscoder, models, tokens_NS, latents_E, seqs_E, positions_E, before=BEFORE, after=AFTER,
                         batch_size=8, chunk=1024, harvest=iter_paired_activations):
    """[E, W, M] each model's share <x_m, W_enc[m, :, j]> of latent j's pre-activation (training
    space) on the W = before + 1 + after tokens around each example (latent j = latents_E[e], at
    tokens_NS[seqs_E[e], positions_E[e]]); 0 outside the sequence and at the first ignore_first_n
    positions (the BOS), which the crosscoder never reads. One pass over the held-out tokens, in the batches of iter_paired_activations."""
    device = crosscoder.W_enc.device
    s_M = normalisation_factors(crosscoder)
    latents_E, seqs_E, positions_E = (torch.as_tensor(v, dtype=torch.long, device="cpu") for v in (latents_E, seqs_E, positions_E))
    offsets_W = torch.arange(-before, after + 1, device="cpu")
    out_EWM = torch.zeros(len(latents_E), len(offsets_W), crosscoder.n_models, device="cpu")
    start = 0
    first = first_n(crosscoder.cfg)
    for _, x_nSMD in harvest(models, tokens_NS, crosscoder.cfg["hook_point"], batch_size, "dashboard", first=first):
        n, S1 = x_nSMD.shape[:2]
        here = torch.nonzero((seqs_E >= start) & (seqs_E < start + n)).flatten()
        for part in here.split(chunk):
            pos_PW = positions_E[part, None] + offsets_W  # position in the full sequence (BOS = 0)
            valid_PW = (pos_PW >= first) & (pos_PW < first + S1)
            x_PWMD = x_nSMD[(seqs_E[part] - start)[:, None], (pos_PW.clamp(first, first + S1 - 1) - first)].to(device).float()
            enc_MDP = crosscoder.W_enc[:, :, latents_E[part].to(device)].float()
            c_PWM = torch.einsum("pwmd,mdp->pwm", x_PWMD * s_M[:, None], enc_MDP)
            out_EWM[part] = (c_PWM.cpu() * valid_PW[..., None]).float()
        start += n
    return out_EWM


ONE_SIDED = 1e-4  # a decoder this small beside the other model's: the latent has no direction there


def latent_table(crosscoder, fire_counts_F=None, n_tokens=None, max_act_F=None, scaling=None):
    """The table's columns as lists, one entry per latent shown: every latent that fired
    (fire_counts_F > 0), or every latent without counts. scaling: {latent: (nu_error,
    nu_reconstruction, direction model name, passes the paper's test)} for the latents Latent
    Scaling probed; the other latents have none (null)."""
    rel_F = crosscoder.relative_decoder_norm().detach().float().cpu()
    cos_F = crosscoder.decoder_cosine_similarity().detach().float().cpu()
    norms_FM = crosscoder.decoder_norms().detach().float().cpu()
    # A one-sided latent (a decoder of norm ~0) has no cosine: null, not a meaningless "-0.000";
    # nor has any latent of models whose residuals are two spaces (two families).
    cos_F[norms_FM.min(-1).values <= ONE_SIDED * norms_FM.max(-1).values] = float("nan")
    if not shares_one_space(crosscoder.cfg):
        cos_F[:] = float("nan")
    class_F = np.full(len(rel_F), "other", dtype=object)
    for name, mask in latent_classes(crosscoder).items():  # (more than two models: model_<m>_only by norm share)
        class_F[mask.numpy()] = name
    shown = (torch.nonzero(fire_counts_F.cpu() > 0).flatten() if fire_counts_F is not None
             else torch.arange(len(rel_F))).tolist()
    scaling = scaling or {}

    def rounded(values, digits=4):
        return [None if not np.isfinite(v) else round(float(v), digits) for v in values]

    table = {"latent": shown, "class": [class_F[j] for j in shown],
             "rel": rounded(rel_F[shown].tolist()), "cos": rounded(cos_F[shown].tolist()),
             "norm_base": rounded(norms_FM[shown, 0].tolist()), "norm_chat": rounded(norms_FM[shown, 1].tolist()),
             "nu_error": rounded([scaling[j][0] if j in scaling else float("nan") for j in shown]),
             "nu_reconstruction": rounded([scaling[j][1] if j in scaling else float("nan") for j in shown]),
             "ls_direction": [scaling[j][2] if j in scaling else None for j in shown],
             "specific": [bool(scaling[j][3]) if j in scaling else False for j in shown]}
    if norms_FM.shape[1] > 2:  # every model's decoder norm (the page draws one bar each)
        table["norm_models"] = [rounded(norms_FM[shown, m].tolist()) for m in range(norms_FM.shape[1])]
    if fire_counts_F is not None:
        table["freq"] = [float(f"{c / n_tokens:.4g}") for c in fire_counts_F.cpu()[shown].tolist()]
        table["max_act"] = rounded(max_act_F.cpu()[shown].tolist())
    finite = rel_F[torch.isfinite(rel_F)]
    histogram = torch.histc(finite, bins=HISTOGRAM_BINS, min=0, max=1).long().tolist()
    return table, histogram


SHARE_LEVELS = 7  # shares quantised to -7..7 of each latent's largest |share|: colour, not precision
ACT_LEVELS = 65535  # activations as uint16 fractions of each latent's largest


def _smallest_uint(max_value):
    return np.uint16 if max_value < 2**16 else np.uint32


def spaced(strings):
    """Token strings as shown: a word-level vocabulary (no token starts or ends with a space, as the
    toy pair's) gets a space after each token; a subword one (Gemma's: " the") is shown as is."""
    if any(t[:1].isspace() or t[-1:].isspace() for t in strings):
        return strings
    return [t + " " for t in strings]


def pack_examples(str_tokens, tokens_NS, values_JK, seqs_JK, positions_JK, contributions_JKWM, before=BEFORE,
                  after=AFTER):
    """(meta, base64 of the gzip-compressed blob). The blob holds the arrays meta["arrays"] names
    ({name: [numpy dtype, byte offset, length]}, widest first so that each is aligned):
    offsets uint32 [J+1] (row j's examples are offsets[j]:offsets[j+1], those with a positive
    value), act_scale and share_scale float32 [J], act [E] (x act_scale: uint16), seq and pos [E],
    tokens [N, S] (the held-out tokens, as indices into meta["tokens"], their strings) and share
    int8 [E, W, M] (x share_scale). str_tokens(ids) -> their strings.

    Models of different tokenizers (aligned rows): tokens_NS [N, S, M] each model's own tokens,
    positions_JK [J, K, M] each model's own position, str_tokens a list of one function per model;
    then tokens is [M, N, S], pos [E, M], and meta["per_model"] says so."""
    keep_JK = values_JK > 0
    counts_J = keep_JK.sum(1)
    N, S = tokens_NS.shape[:2]
    per_model = tokens_NS.ndim == 3
    if per_model:  # one string table: each model's strings after the previous model's
        strings, parts = [], []
        for m, fn in enumerate(str_tokens):
            vocab_m, index_m = torch.unique(tokens_NS[..., m], return_inverse=True)
            parts.append(index_m + len(strings))
            strings += spaced(list(fn(vocab_m)))
        index_NS = torch.stack(parts)  # [M, N, S]
    else:
        vocab, index_NS = torch.unique(tokens_NS, return_inverse=True)
        strings = spaced(list(str_tokens(vocab)))
    act_scale_J = values_JK.float().amax(1).clamp(min=1e-12) / ACT_LEVELS
    share_scale_J = contributions_JKWM.abs().flatten(1).amax(1).clamp(min=1e-12) / SHARE_LEVELS
    row_E = torch.repeat_interleave(torch.arange(len(counts_J), device="cpu"), counts_J)
    arrays = {
        "offsets": np.concatenate([[0], torch.cumsum(counts_J, 0).numpy()]).astype(np.uint32),
        "act_scale": act_scale_J.numpy().astype(np.float32), "share_scale": share_scale_J.numpy().astype(np.float32),
        "act": (values_JK[keep_JK].float() / act_scale_J[row_E]).round().clamp(0, ACT_LEVELS).numpy().astype(np.uint16),
        "seq": seqs_JK[keep_JK].numpy().astype(_smallest_uint(N)),
        "pos": positions_JK[keep_JK].numpy().astype(_smallest_uint(S)),
        "tokens": index_NS.numpy().astype(_smallest_uint(len(strings))),
        "share": (contributions_JKWM[keep_JK].float() / share_scale_J[row_E][:, None, None]).round()
        .clamp(-SHARE_LEVELS, SHARE_LEVELS).numpy().astype(np.int8)}
    layout, parts, at = {}, [], 0
    for name, a in sorted(arrays.items(), key=lambda kv: -kv[1].dtype.itemsize):
        layout[name] = [a.dtype.name, at, int(a.size)]
        parts.append(a.tobytes())
        at += a.nbytes
    meta = {"arrays": layout, "window": before + 1 + after, "before": before, "seq_len": S,
            "n_models": contributions_JKWM.shape[-1], "n_examples": int(counts_J.sum()),
            "per_model": per_model, "n_seqs": N, "tokens": strings}
    return meta, _gzip_base64(b"".join(parts))


def _script_json(value):
    """JSON safe inside a <script> element (no "</" to end it early)."""
    return json.dumps(value, separators=(",", ":")).replace("</", "<\\/")


def _gzip_base64(data):
    return base64.b64encode(gzip.compress(data, compresslevel=9, mtime=0)).decode("ascii")


def dashboard_html(table, histogram, info, examples=None):
    """The page: the template with the data in <script> elements (the table as gzip-compressed
    JSON). examples: pack_examples's (meta, blob), or None (weights only: no contexts)."""
    meta, blob = examples if examples is not None else ({"arrays": None}, "")
    page = TEMPLATE.read_text()
    for name, value in (("HISTOGRAM", histogram), ("INFO", info), ("EXAMPLES_META", meta)):
        page = page.replace(f"/*{name}*/null", _script_json(value))
    table_blob = _gzip_base64(json.dumps(table, separators=(",", ":")).encode())
    return page.replace("<!--TABLE_BLOB-->", table_blob).replace("<!--EXAMPLES_BLOB-->", blob)


def write_dashboard(path, crosscoder, models=None, tokens_NS=None, top=None, fire_counts_F=None, scaling=None,
                    info=None, batch_size=8, harvest=iter_paired_activations, n_tokens=None):
    """Write the dashboard. With models and tokens: top = (values, seqs, positions) [F, K] from
    diffing.top_activating_examples over every latent (aligned rows [N, S, 2M] of models of
    different tokenizers: aligned.aligned_top_examples's, positions [F, K, M]), fire_counts_F and
    n_tokens its counts (of each latent's firings, of the positions counted: the firing
    frequencies' denominator); the contexts are read in one more pass over the tokens (harvest: as
    diffing's analyses). Returns the path."""
    if fire_counts_F is not None and n_tokens is None:
        raise ValueError("fire_counts_F needs n_tokens, the positions they were counted over")
    max_act_F = top[0][:, 0] if top is not None else None
    table, histogram = latent_table(crosscoder, fire_counts_F, n_tokens, max_act_F, scaling)
    info = dict(info or {}, dict_size=int(crosscoder.b_enc.shape[0]), n_tokens=n_tokens, shown=len(table["latent"]),
                one_space=shares_one_space(crosscoder.cfg))
    examples = None
    if top is not None:
        rows = torch.as_tensor(table["latent"], dtype=torch.long, device="cpu")
        values, seqs, positions = (t[rows] for t in top)
        keep = values > 0
        latents_E = rows[:, None].expand_as(values)[keep]
        if tokens_NS.ndim == 3:  # aligned rows: each model at its own position, on its own tokens
            shares = aligned_window_contributions(crosscoder, models, tokens_NS, latents_E, seqs[keep], positions[keep],
                                                  BEFORE, AFTER, batch_size, first=first_n(crosscoder.cfg))
            tokens_NS, str_tokens = split_aligned(tokens_NS, len(models))[0], [m.to_str_tokens for m in models]
        else:
            shares = window_contributions(crosscoder, models, tokens_NS, latents_E, seqs[keep], positions[keep],
                                          batch_size=batch_size, harvest=harvest)
            str_tokens = models[1].to_str_tokens
        full = torch.zeros(*values.shape, shares.shape[1], shares.shape[2], device="cpu")
        full[keep] = shares
        examples = pack_examples(str_tokens, tokens_NS, values, seqs, positions, full)
    Path(path).write_text(dashboard_html(table, histogram, info, examples), encoding="utf-8")
    return Path(path)
