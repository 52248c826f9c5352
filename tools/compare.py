"""Match the latents of two crosscoders trained on the same model pair: for chosen latents of a
reference crosscoder, the latent of the other whose decoder in one model points the same way, and
what the other makes of it (its relative norm, its two decoders' norms and cosine, where it fires).

    python -m tools.compare --reference checkpoints/version_3 --other checkpoints/version_2

takes the reference's chat-only latents that pass Latent Scaling's test (diffing.is_model_specific)
on the toy pair's held-out text (crossdiff/pairs/toy.py's report tokens) and prints, for each, its best match in
the other crosscoder by chat-decoder cosine. It answers "did BatchTopK learn the direction the L1
crosscoder calls chat-specific, and why is it not chat-only there?".

Shape legend: N sequences, S positions, M models, D d_in, F latents, J chosen latents.
"""
import sys

import torch

from crosscoder import CrossCoder
from crossdiff.config.cli import format_help, parse_overrides
from crossdiff.config.schema import ConfigError, complete_cfg
from crossdiff.diffing.classes import latent_classes
from crossdiff.diffing.measures import (
    BATCH_TOKENS,
    HELDOUT_TOKENS,
    is_model_specific,
    iter_paired_activations,
    latent_scaling,
)
from crossdiff.pairs.toy import build_toy_pair, heldout_tokens


def match_decoders(reference, other, latents_J, model=1):
    """(index [J], cosine [J]): for each chosen reference latent, the other crosscoder's latent
    whose decoder in `model` has the largest cosine with the reference's decoder in that model."""
    ref_JD = torch.nn.functional.normalize(reference.W_dec[latents_J, model].float(), dim=-1)
    other_FD = torch.nn.functional.normalize(other.W_dec[:, model].float(), dim=-1)
    cos_JF = ref_JD @ other_FD.T
    best = cos_JF.max(-1)
    return best.indices, best.values


def firing(acts_NSF, is_chat_N, latent):
    """(share of the latent's activation mass inside chat transcripts, fraction of transcript
    tokens it fires on, fraction of plain-text tokens it fires on)."""
    a_NS = acts_NSF[..., latent]
    return (float(a_NS[is_chat_N].sum() / a_NS.sum().clamp(min=1e-12)), float((a_NS[is_chat_N] > 0).float().mean()),
            float((a_NS[~is_chat_N] > 0).float().mean()))


@torch.no_grad()
def main(argv):
    flags = {"reference": "the crosscoder whose genuine chat-only latents are matched (an L1 toy run)",
             "other": "the crosscoder searched for them (e.g. a BatchTopK toy run)"}
    _, opts = parse_overrides(argv, {}, flags=tuple(flags))
    if opts.get("help") or not {"reference", "other"} <= set(opts):
        print(format_help("usage: python -m tools.compare --reference DIR --other DIR", {}, flags))
        return 0 if opts.get("help") else 2
    reference, other = CrossCoder.load(opts["reference"]), CrossCoder.load(opts["other"])
    cfg = complete_cfg(dict(reference.cfg), validate=False)
    if cfg.get("preset") != "toy" or other.cfg.get("preset") != "toy":
        raise ConfigError("compare.py reads the toy pair's held-out text: both checkpoints must be toy-preset runs")
    base, chat = build_toy_pair(cfg)[:2]  # on cfg["device"], the crosscoders' (CrossCoder.load's default)
    positions = cfg["seq_len"] - 1
    tokens, is_chat = heldout_tokens(cfg, -(-HELDOUT_TOKENS // positions))  # the toy report's and analysis.py's
    batch = max(1, BATCH_TOKENS // positions)
    x_NSMD = torch.cat([x for _, x in iter_paired_activations([base, chat], tokens, cfg["hook_point"], batch)])
    acts = {}
    for name, cc in (("reference", reference), ("other", other)):
        device = cc.W_enc.device
        x_BMD = x_NSMD.flatten(0, 1).to(device) * torch.tensor(cc.cfg["normalisation_factor"], device=device)[:, None]
        acts[name] = (x_BMD, cc.encode(x_BMD).float().view(*x_NSMD.shape[:2], -1).cpu())
    x_BMD, ref_acts = acts["reference"]
    alive = ref_acts.sum((0, 1)) > 0
    chat_only = torch.nonzero(latent_classes(reference)["chat_only"] & alive).flatten()
    ls = latent_scaling(reference, [x_BMD], chat_only)
    genuine = chat_only[is_model_specific(ls["nu_error"], ls["nu_reconstruction"]).cpu()]
    print(f"reference {opts['reference']}: {len(genuine)} genuine chat-only latents {genuine.tolist()}")
    index, cosine = match_decoders(reference, other, genuine)
    rel, norms, W = other.relative_decoder_norm(), other.decoder_norms(), other.W_dec.float()
    print(f"{'ref':>5} {'in chat':>8} {'other':>6} {'cos chat':>8} {'rel norm':>8} {'|d_base|':>8} {'|d_chat|':>8} "
          f"{'cos b/c':>7} {'in chat':>8} {'fires: chat':>11} {'plain':>7}")
    for j, o, c in zip(genuine.tolist(), index.tolist(), cosine.tolist()):
        ref_mass = firing(ref_acts, is_chat, j)[0]
        mass, on_chat, on_plain = firing(acts["other"][1], is_chat, o)
        cos_bc = float(torch.nn.functional.cosine_similarity(W[o, 0], W[o, 1], dim=0))
        print(f"{j:>5} {ref_mass:>8.1%} {o:>6} {c:>8.3f} {float(rel[o]):>8.3f} {float(norms[o, 0]):>8.3f} "
              f"{float(norms[o, 1]):>8.3f} {cos_bc:>7.3f} {mass:>8.1%} {on_chat:>11.2%} {on_plain:>7.2%}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except ConfigError as e:
        sys.exit(f"error: {e}")
