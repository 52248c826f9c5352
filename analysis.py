# %% [markdown]
# # Model diffing with a trained crosscoder
# Open as a notebook (each `# %%` is a cell) or run `python analysis.py [--checkpoint PATH_OR_REPO]`.
# As a script it writes every figure as a PNG, an HTML page of examples and summary.txt into
# `<checkpoint dir>/analysis/`, and prints where.

# %%
# Which crosscoder: None = the newest local checkpoint; "checkpoints/version_N" (newest save in
# it) or a weights file's directory; "hf" = the published Gemma-2-2b crosscoder via
# CrossCoder.load_from_hf(); any other string that is not a local path = a Hugging Face repo id.
CHECKPOINT = None
N_HELDOUT_SEQS = 256  # held-out sequences for the analyses over tokens
BATCH_SIZE = 16  # sequences per model forward
TOP_K_EXAMPLES = 10
N_EXAMPLE_LATENTS = 12  # chat-only latents shown with their top examples

# %%
import json
import sys
from pathlib import Path

import torch

from checkpoint import latest_version_dir
from crosscoder import CHAT_ONLY_MIN, CrossCoder, classify_latents
from plots import plot_cosine_histogram, plot_latent_scaling, plot_relative_norm_histogram
from utils import (GENUINE_NU_MAX, examples_html, in_notebook, iter_paired_activations, latent_scaling,
                   reconstruction_stats, splice_in_loss, top_activating_examples)


def load_crosscoder(checkpoint, device=None):
    """(crosscoder, output directory) for a CHECKPOINT setting."""
    if checkpoint is None:
        checkpoint = latest_version_dir()
    if checkpoint == "hf":
        return CrossCoder.load_from_hf(device=device), Path("analysis_hf")
    path = Path(str(checkpoint))
    if path.exists():
        if (path / "blocks.14.hook_resid_pre" / "cfg.json").is_file():  # a local copy of the published layout
            return CrossCoder.load_from_hf(str(path), device=device), path / "analysis"
        cc = CrossCoder.load(path, device=device)
        return cc, cc.save_dir / "analysis"
    return CrossCoder.load_from_hf(str(checkpoint), device=device), Path("analysis_" + str(checkpoint).replace("/", "__"))


if not in_notebook() and "--checkpoint" in sys.argv:
    CHECKPOINT = sys.argv[sys.argv.index("--checkpoint") + 1]
cc, out_dir = load_crosscoder(CHECKPOINT)
cfg = cc.cfg
out_dir.mkdir(parents=True, exist_ok=True)
summary = {"checkpoint": str(CHECKPOINT or out_dir.parent), "dict_size": cfg["dict_size"], "hook_point": cfg.get("hook_point")}
print(f"crosscoder: dict_size {cfg['dict_size']}, d_in {cfg['d_in']}, hook {cfg.get('hook_point')}; writing to {out_dir}")

# %% [markdown]
# ## Which latents are shared, base-only or chat-only?
# Relative decoder norm |d_chat| / (|d_base| + |d_chat|), read from the weights as trained (in
# normalised space, as the reference did).

# %%
rel = cc.relative_decoder_norm().detach().cpu()
classes = classify_latents(rel)
summary["latent_counts"] = {name: int(mask.sum()) for name, mask in classes.items()}
print("latents per class:", summary["latent_counts"])
plot_relative_norm_histogram(rel, out_dir / "relative_norm_histogram.png")

# %% [markdown]
# ## Do shared latents point the same way in both models?

# %%
cos = cc.decoder_cosine_similarity().detach().cpu()
shared_cos = cos[classes["shared"]]
summary["shared_cosine_median"] = float(shared_cos.median()) if len(shared_cos) else None
plot_cosine_histogram(shared_cos, out_dir / "shared_cosine_histogram.png")

# %% [markdown]
# ## Models and held-out tokens
# The toy preset rebuilds its pair from the cache (held-out text from a fresh seed); the Gemma
# crosscoder needs both Gemma models (a GPU) and uses the last sequences of the dataset, which
# training (reading from the start) does not reach.

# %%
models, tokens, is_chat = None, None, None
try:
    if cfg.get("preset") == "toy":
        from toy import build_toy_pair, make_tokens

        base, chat, _, _ = build_toy_pair(dict(cfg, num_tokens=cfg["batch_size"]))
        models = [base, chat]
        tokens, is_chat = make_tokens(N_HELDOUT_SEQS, cfg["seq_len"], 0.5, seed=cfg["seed"] + 6)
    else:
        from utils import load_gemma_pair, load_tokens

        gemma_cfg = dict(cfg, device="cuda" if torch.cuda.is_available() else "cpu")
        models = load_gemma_pair(gemma_cfg, full=True)
        tokens = load_tokens(cfg.get("dataset", "ckkissane/pile-lmsys-mix-1m-tokenized-gemma-2"), cfg)[-N_HELDOUT_SEQS:]
except Exception as e:  # the weight-only analyses above still stand
    print(f"models unavailable, skipping the analyses over tokens: {e}")
    summary["skipped"] = str(e)[:300]

# %% [markdown]
# ## How well does it reconstruct held-out activations, and what does splicing it in cost?
# Splicing uses the crosscoder with the normalisation folded into its weights
# (`CrossCoder.fold_normalisation`), so it reads and writes raw activations.

# %%
if models is not None:
    summary["reconstruction"] = reconstruction_stats(cc, models, tokens, BATCH_SIZE)
    print("reconstruction:", summary["reconstruction"])
    summary["splice_in"] = splice_in_loss(cc, models, tokens, BATCH_SIZE)
    for m, r in summary["splice_in"].items():
        print(f"model {m}: CE clean {r['clean']:.3f}, spliced {r['spliced']:.3f}, zero-ablated "
              f"{r['zero_ablation']:.3f}, loss recovered {r['loss_recovered']:.1%}")

# %% [markdown]
# ## Are the chat-only latents really chat-only? (Latent Scaling)
# nu near 0: the base model lacks the latent's direction. High nu_error: Complete Shrinkage (the
# base activation has it; L1 shrank the base decoder). High nu_reconstruction: Latent Decoupling
# (other latents reconstruct it in the base model).

# %%
chat_only = torch.nonzero(classes["chat_only"]).flatten()
if models is not None and len(chat_only):
    s_M = torch.tensor(cfg["normalisation_factor"])
    batches = (x.flatten(0, 1) * s_M[:, None] for _, x in
               iter_paired_activations(models, tokens, cfg["hook_point"], BATCH_SIZE, "latent scaling"))
    ls = latent_scaling(cc, batches, chat_only)
    ok = torch.isfinite(ls["nu_error"]) & torch.isfinite(ls["nu_reconstruction"])
    genuine = ok & (torch.maximum(ls["nu_error"], ls["nu_reconstruction"]) <= GENUINE_NU_MAX)
    summary["latent_scaling"] = {
        "chat_only_latents": len(chat_only), "finite": int(ok.sum()),
        f"genuine (both nu <= {GENUINE_NU_MAX})": int(genuine.sum()),
        "median_nu_error": float(ls["nu_error"][ok].median()) if ok.any() else None,
        "median_nu_reconstruction": float(ls["nu_reconstruction"][ok].median()) if ok.any() else None}
    print("latent scaling:", summary["latent_scaling"])
    plot_latent_scaling(ls["nu_error"][ok].cpu(), ls["nu_reconstruction"][ok].cpu(), out_dir / "latent_scaling.png")

# %% [markdown]
# ## What do the chat-only latents fire on?

# %%
if models is not None and len(chat_only):
    shown = chat_only[rel[chat_only].argsort(descending=True)][:N_EXAMPLE_LATENTS]
    values, seqs, positions = top_activating_examples(cc, models, tokens, shown, TOP_K_EXAMPLES, BATCH_SIZE)
    page = examples_html(models[1].to_str_tokens, tokens, shown.tolist(), values, seqs, positions,
                         title=f"Top activations of chat-only latents (relative norm > {CHAT_ONLY_MIN})")
    (out_dir / "chat_only_examples.html").write_text(page)
    if is_chat is not None:  # toy pair: which of those top contexts are chat transcripts?
        hit = values > 0
        summary["top_examples_in_transcripts"] = float(is_chat[seqs][hit].float().mean()) if hit.any() else None
        print(f"top examples of chat-only latents inside chat transcripts: {summary['top_examples_in_transcripts']:.1%}")
    if in_notebook():
        from IPython.display import HTML, display

        display(HTML(page))

# %%
(out_dir / "summary.txt").write_text(json.dumps(summary, indent=2, default=str))
print(f"analysis written to {out_dir}: " + ", ".join(sorted(p.name for p in out_dir.iterdir())))
