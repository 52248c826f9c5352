# %% [markdown]
# # Model diffing with a trained crosscoder
# Open as a notebook (each `# %%` is a cell) or run `python analysis.py [--checkpoint PATH_OR_REPO]`
# (`--help` lists the options). As a script it writes every figure as a PNG, an HTML page of
# examples, the latent dashboard (dashboard.html) and summary.txt into `<checkpoint dir>/analysis/`,
# and prints where.

# %%
# Which crosscoder: None = the newest local checkpoint; "checkpoints/version_N" (newest save in
# it) or a directory in the published layout (<hook>/cfg.json + cc_weights.pt) or in
# dictionary_learning's (config.json + model.safetensors: the science-of-finetuning crosscoders,
# e.g. "science-of-finetuning/gemma-2-2b-L13-k100-lr1e-04-local-shuffling-CCLoss"); "hf" = the
# published Gemma-2-2b crosscoder via CrossCoder.load_from_hf(); any other string that is not a
# local path = a Hugging Face repo id in either layout.
CHECKPOINT = None
FACTORS = None  # [base, chat] normalisation factors; None: the checkpoint's (see "Normalisation" below)
MODEL_NAMES = None  # None: the checkpoint's; hub names or local directories named after the model
DATASET = None  # held-out tokens; None: the checkpoint's dataset (its last sequences)
# Sizes in sequences; None: from the token counts below and the checkpoint's seq_len.
N_HELDOUT_SEQS = None  # held-out sequences for the analyses over tokens (2**18 tokens: 257 of Gemma's)
BATCH_SIZE = None  # sequences per forward that stops at the hook (2**14 tokens: 16 of Gemma's)
SPLICE_BATCH_SIZE = None  # sequences per full forward with logits (2**11 tokens: 2 of Gemma's 256k-vocabulary)
SPLICE_BATCH_TOKENS = 2**11
TOP_K_EXAMPLES = 10
N_EXAMPLE_LATENTS = 12  # chat-only latents shown with their top examples
# Latent Scaling runs on the chat-only class (relative norm > 0.9), or with a number here on the N
# most chat-leaning latents whatever their relative norm: the authors' "effective chat-only"
# latents, how they compare a BatchTopK crosscoder with an L1 one's chat-only set of that size.
EFFECTIVE_CHAT_ONLY = None
# The splice-in loss runs every model to its logits three times: most of the analysis' time on a
# CPU (12 of 14 minutes on the offline Gemma-3 pair). False skips it.
SPLICE_IN = True
# The KL test (crossdiff/diffing/causal.py): on how many held-out sequences (None: all), which
# extra latents to test as a set ("given"), and how many first tokens of a turn form "first_k".
KL_TEST, KL_SEQS, LATENTS, FIRST_K = True, 256, None, 9
# Also the 2 % of the dictionary that closes the most of the assistant (else all) gap one latent
# at a time, chosen on the next KL_SEQS held-out rows: one forward per latent (None: toy only).
RANKED = None
# Steering: 3 latents x 3 prompts x 5 continuations of 12 greedy tokens, full forwards (None: the
# toy preset only; minutes on a CPU for a real pair); which latents (None: up to 3 chat-specific,
# else chat-only, ones).
STEER, LATENTS_TO_STEER = None, None

# %%
import json
import sys
from pathlib import Path

import torch

from crosscoder import CrossCoder
from crossdiff.config.cli import format_help, in_notebook, parse_overrides
from crossdiff.config.plan import hooks_of, norm_width, positions
from crossdiff.config.schema import ConfigError, complete_cfg, effective
from crossdiff.diffing.aligned import aligned_reconstruction, aligned_splice_in, aligned_top_examples, shares_one_space
from crossdiff.diffing.causal import (
    diff_report,
    diffing_sets,
    informative_sets,
    gap_where_firing,
    ranked_sets,
    role_groups,
    source_groups,
    words,
)
from crossdiff.diffing.classes import CHAT_ONLY_MIN, latent_classes, relative_norms, separation_note
from crossdiff.diffing.steering import steer, steering_prompts
from crossdiff.diffing.dashboard import write_dashboard
from crossdiff.diffing.figures import (
    examples_html,
    format_scaling,
    plot_cosine_histogram,
    plot_latent_scaling,
    plot_norm_share_histogram,
    plot_relative_norm_histogram,
)
from crossdiff.diffing.measures import (
    BATCH_TOKENS,
    HELDOUT_TOKENS,
    ActivationCache,
    class_chat_mass,
    class_role_mass,
    effective_chat_only,
    is_model_specific,
    latent_scaling,
    per_model,
    reconstruction_stats,
    scaling_summary,
    share_in_transcripts,
    splice_in_loss,
    top_activating_examples,
)
from crossdiff.io.checkpoint import latest_version_dir, sequences_read, staging_dir, swap_in
from crossdiff.io.hub import (
    HF_REPO_ID,
    PUBLISHED_FACTORS,
    PUBLISHED_MODEL_NAMES,
    is_dictionary_learning_dir,
    published_hook_dir,
)
from crossdiff.pairs.toy import build_toy_pair, heldout_tokens, token_groups, user_turns
from crossdiff.sources.activations import estimate_norm_factors, high_norm_note
from crossdiff.sources.aligned_mix import check_aligned_tokenizers, is_aligned, load_aligned_rows
from crossdiff.sources.mix import (
    ROLES,
    DataError,
    chat_mask,
    check_mix_tokenizer,
    is_mix,
    load_mix,
    load_roles,
    read_mix_meta,
    split_rows,
)
from crossdiff.sources.models import SetupError
from crossdiff.sources.tokenmask import PositionFilter
from utils import check_heldout, load_gemma_pair, load_tokens

# A notebook that also runs as a script: each cell does its work where it stands, so importing
# this file would run the whole analysis. Its maths live in crossdiff/diffing/, to import from there.
if __name__ != "__main__":
    raise ImportError("analysis.py is a notebook and a script: run it (python analysis.py, or its cells in a "
                      "notebook); import the maths it calls from crossdiff.diffing instead")

ANALYSIS_FILES = r"[\w.-]+\.(png|html|txt|json)"  # what analysis/ holds (another file there: refused)
OPTIONS = {"checkpoint": "a version_N dir, a published-layout or dictionary_learning dir, hf, or a hub repo id "
                         "(default: newest local)",
           "factors": "base,chat normalisation factors (default: the checkpoint's, see the notebook)",
           "model_names": "base,chat models: hub names or local dirs (default: the checkpoint's)",
           "dataset": "held-out tokens: hub id, datasets dir or .pt tensor (default: the checkpoint's)",
           "n_heldout": f"held-out sequences (default: {HELDOUT_TOKENS:,} tokens' worth)",
           "batch_size": f"sequences per forward that stops at the hook (default: {BATCH_TOKENS:,} tokens' worth)",
           "splice_batch_size": f"sequences per full forward with logits (default: {SPLICE_BATCH_TOKENS:,} tokens' worth)",
           "effective_chat_only": "N: Latent Scaling on the N most chat-leaning latents (default: the chat-only class)",
           "splice_in": "true / false: measure the splice-in loss (default true; most of the time on a CPU)",
           "kl_test": "true / false: the KL gap each latent set closes (default true)",
           "latents": "I,J,...: a latent set of your own for the KL test",
           "ranked": "true / false: the KL test's ranked sets, a forward per latent (default: the toy preset)",
           "steer": "true / false: steer the base model with chat-specific latents (default: the toy preset)",
           "steer_latents": "I,J,...: steer with these latents instead (implies --steer true)",
           "help": "print this and exit"}


def apply_argv(argv):
    """The script's options (the same --key value parser as train.py) into the settings above."""
    global CHECKPOINT, FACTORS, MODEL_NAMES, DATASET, N_HELDOUT_SEQS, BATCH_SIZE, SPLICE_BATCH_SIZE, EFFECTIVE_CHAT_ONLY, SPLICE_IN
    global KL_TEST, LATENTS, RANKED, STEER, LATENTS_TO_STEER
    _, opts = parse_overrides(argv, {}, flags=tuple(OPTIONS))
    if opts.get("help"):
        print(format_help("usage: python analysis.py [--checkpoint PATH_OR_REPO] [--option value ...]", {}, OPTIONS))
        sys.exit(0)
    try:
        CHECKPOINT = opts.get("checkpoint", CHECKPOINT)
        FACTORS = [float(v) for v in opts["factors"].split(",")] if "factors" in opts else FACTORS
        MODEL_NAMES = opts["model_names"].split(",") if "model_names" in opts else MODEL_NAMES
        DATASET = opts.get("dataset", DATASET)
        N_HELDOUT_SEQS = int(opts["n_heldout"]) if "n_heldout" in opts else N_HELDOUT_SEQS
        BATCH_SIZE = int(opts["batch_size"]) if "batch_size" in opts else BATCH_SIZE
        SPLICE_BATCH_SIZE = int(opts["splice_batch_size"]) if "splice_batch_size" in opts else SPLICE_BATCH_SIZE
        EFFECTIVE_CHAT_ONLY = int(opts["effective_chat_only"]) if "effective_chat_only" in opts else EFFECTIVE_CHAT_ONLY
        for key in ("splice_in", "kl_test", "ranked", "steer"):
            if key in opts and opts[key].lower() not in ("true", "false"):
                raise ValueError(f"{key} must be true or false, not {opts[key]!r}")
        SPLICE_IN = opts["splice_in"].lower() == "true" if "splice_in" in opts else SPLICE_IN
        KL_TEST = opts["kl_test"].lower() == "true" if "kl_test" in opts else KL_TEST
        RANKED = opts["ranked"].lower() == "true" if "ranked" in opts else RANKED
        STEER = opts["steer"].lower() == "true" if "steer" in opts else STEER
        LATENTS = [int(v) for v in opts["latents"].split(",")] if "latents" in opts else LATENTS
        if "steer_latents" in opts:
            LATENTS_TO_STEER, STEER = [int(v) for v in opts["steer_latents"].split(",")], True
    except ValueError as e:
        raise ConfigError(f"bad option value: {e}") from None


def load_crosscoder(checkpoint, device=None):
    """(crosscoder, output directory, origin: the hub repo id, or "local") for a CHECKPOINT setting."""
    if checkpoint is None:
        checkpoint = latest_version_dir()
    if checkpoint == "hf":
        return CrossCoder.load_from_hf(device=device), Path("analysis_hf"), HF_REPO_ID
    path = Path(str(checkpoint))
    if path.exists():
        hook_dir = published_hook_dir(path)
        if hook_dir is not None:  # a local copy of the published layout, or one like it
            return CrossCoder.load_from_hf(str(path), path=hook_dir, device=device), path / "analysis", "local"
        if is_dictionary_learning_dir(path):  # the science-of-finetuning crosscoders' format
            return CrossCoder.load_from_hf(str(path), device=device), path / "analysis", "local"
        cc = CrossCoder.load(path, device=device)
        return cc, cc.save_dir / "analysis", "local"
    out_dir = Path("analysis_" + str(checkpoint).replace("/", "__"))
    return CrossCoder.load_from_hf(str(checkpoint), device=device), out_dir, str(checkpoint)


if not in_notebook():
    try:
        apply_argv(sys.argv[1:])
    except ConfigError as e:
        sys.exit(f"error: {e}")
cc, out_dir, origin = load_crosscoder(CHECKPOINT)
if "model_names" not in cc.cfg and MODEL_NAMES is None:  # the reference's configs name only model A
    print(f"the checkpoint names no model pair: using the published one, {list(PUBLISHED_MODEL_NAMES)}")
# Completed as train.py completes every config: keys the checkpoint predates take today's defaults
# (for the reference's configs: the published pair, its dataset, 400 sequences for the factors).
cfg = cc.cfg = complete_cfg(dict(cc.cfg, model_names=list(MODEL_NAMES or cc.cfg.get("model_names") or PUBLISHED_MODEL_NAMES)),
                             validate=False)
# Every output names what it analysed: the checkpoint, its file and its training step.
checkpoint_index = getattr(cc, "save_version", 1) - 1 if origin == "local" and getattr(cc, "save_dir", None) else None
summary = {"checkpoint": str(CHECKPOINT or out_dir.parent), "checkpoint_index": checkpoint_index,
           "step": cfg.get("step"), "dict_size": cfg["dict_size"], "hook_point": cfg["hook_point"]}
label = (f"{Path(summary['checkpoint']).name}" + (f" #{checkpoint_index}" if checkpoint_index is not None else "")
         + (f", step {summary['step']}" if summary["step"] is not None else ""))
# Written into a folder beside the output folder and swapped in at the end: an analysis stopped
# half-way leaves the previous one whole, never a mix of two checkpoints' files.
final_dir, out_dir = out_dir, staging_dir(out_dir, ANALYSIS_FILES)
print(f"crosscoder {label}: dict_size {cfg['dict_size']}, d_in {cfg['d_in']}{' (widths ' + str(cfg['model_widths']) + ')' if cfg.get('model_widths') else ''}, hook {', '.join(dict.fromkeys(hooks_of(cfg)))}; writing to "
      f"{final_dir} (at the end)")
n_positions = positions(cfg)  # seq_len - ignore_first_n (the BOS dropped)
N_HELDOUT_SEQS = N_HELDOUT_SEQS or -(-HELDOUT_TOKENS // n_positions)
BATCH_SIZE = BATCH_SIZE or max(1, BATCH_TOKENS // n_positions)
SPLICE_BATCH_SIZE = SPLICE_BATCH_SIZE or max(1, SPLICE_BATCH_TOKENS // n_positions)

# %% [markdown]
# ## Which latents are shared, base-only or chat-only?
# Relative decoder norm |d_chat| / (|d_base| + |d_chat|), read from the weights as trained (in
# normalised space, as the reference did). For more than two models, each model's share of the
# norm |d_m| / sum |d_m'|: a latent is model m's alone above 0.9, shared where every model holds
# at least 60% of an even split (with two models, the same classes).

# %%
rel = relative_norms(cc)  # [F], or [F, M] norm shares for more than two models
classes = latent_classes(cc)
summary["latent_counts"] = {name: int(mask.sum()) for name, mask in classes.items()}
by = ", ".join(["model-only latents by block (exclusive by construction)"] * bool(cc.partition.exclusive)
               + ["designated shared latents by block"] * bool(cc.partition.shared)
               + ["the others by " + ("relative decoder norm" if rel.ndim == 1 else "each model's share of the norm")])
summary["classified"] = by
print(f"latents per class (all latents, {by}):",
      ", ".join(f"{name} {n}" for name, n in summary["latent_counts"].items()))
if rel.ndim == 1:
    plot_relative_norm_histogram(rel, out_dir / "relative_norm_histogram.png", title=f"Base vs chat model diff ({label})")
else:
    plot_norm_share_histogram(rel, out_dir / "norm_share_histogram.png", title=f"{rel.shape[1]} models' diff ({label})",
                              names=[Path(str(n)).name for n in cfg["model_names"]])

# %% [markdown]
# ## Do shared latents point the same way in both models?

# %%
if shares_one_space(dict(cfg, dataset=DATASET or cfg["dataset"])):
    cos = cc.decoder_cosine_similarity().detach().cpu()
    shared_cos = cos[classes["shared"]]
    summary["shared_cosine_median"] = float(shared_cos.median()) if len(shared_cos) else None
    plot_cosine_histogram(shared_cos, out_dir / "shared_cosine_histogram.png",
                          title=f"Cosine similarity of shared latents' decoders ({label}"
                                + (", models 0 and 1)" if cfg["n_models"] > 2 else ")"))
else:  # two families: their residuals are two spaces, whose coordinates do not correspond
    print("decoder cosines: not compared, the models' residuals are two spaces (different widths or tokenizers)")
    summary["shared_cosine_median"] = None

# %% [markdown]
# ## Models and held-out tokens
# The toy preset rebuilds its pair from the cache (held-out text from a fresh seed); the Gemma
# crosscoder needs both Gemma models (a GPU) and uses the last sequences of the dataset, which
# training (reading from the start) does not reach. Only a missing setup (no GPU, no hub, no
# data) skips the analyses over tokens; any other error stops the script.

# %%
models, tokens, is_chat, roles = None, None, None, None
try:
    if cfg["preset"] == "toy":
        base, chat, _, _ = build_toy_pair(dict(cfg, num_tokens=cfg["batch_size"]))
        models = [base, chat]
        tokens, is_chat = heldout_tokens(cfg, N_HELDOUT_SEQS)  # text of its own seed (train.py's toy report reads it too)
        all_tokens = tokens
    else:
        gemma_cfg = dict(cfg, device="cuda" if torch.cuda.is_available() else "cpu")
        dataset = DATASET or cfg["dataset"]
        if is_aligned(dataset):  # a mix for models of different tokenizers: aligned rows [N, S, 2M]
            check_aligned_tokenizers(dataset, cfg["model_names"], cfg["min_aligned_fraction"])
            meta = read_mix_meta(dataset)
            all_tokens = load_aligned_rows(dataset, "train")[:, : cfg["seq_len"]]
            tokens = load_aligned_rows(dataset, "heldout")[:N_HELDOUT_SEQS, : cfg["seq_len"]]
            source = load_mix(dataset, "heldout")[1][:N_HELDOUT_SEQS, 0].long()  # a row is one source's
            roles = load_roles(dataset, "heldout")[:N_HELDOUT_SEQS, : cfg["seq_len"]]  # model 0's tokens'
        elif is_mix(dataset):  # data.py's mix declares its held-out rows, and each token's source
            check_mix_tokenizer(dataset, cfg["model_names"])
            mix, source, meta = load_mix(dataset)  # read once: the train rows estimate factors
            train, heldout = split_rows(meta, "train"), split_rows(meta, "heldout")
            all_tokens = mix[train, : cfg["seq_len"]]
            tokens = mix[heldout][:N_HELDOUT_SEQS, : cfg["seq_len"]]
            is_chat = chat_mask(source[heldout], meta)[:N_HELDOUT_SEQS, 0]  # a row is one source's
            roles = load_roles(dataset, "heldout")  # each token's role in a conversation (None: an older mix)
            roles = None if roles is None else roles[:N_HELDOUT_SEQS, : cfg["seq_len"]]
        else:
            all_tokens = load_tokens(dataset, cfg)[:, : cfg["seq_len"]]
            if DATASET is None or DATASET == cfg["dataset"]:  # held out only if training never read them
                check_heldout(len(all_tokens), N_HELDOUT_SEQS, sequences_read(cc.save_dir) if origin == "local" else None)
            tokens = all_tokens[-N_HELDOUT_SEQS:]
        models = load_gemma_pair(gemma_cfg, full=True)
except (SetupError, DataError, OSError) as e:  # the weight-only analyses above still stand
    print(f"skipping the analyses over tokens (the ones over the weights above stand): {e}")
    summary["skipped"] = str(e)[:300]

# %% [markdown]
# ## Normalisation
# The crosscoder was trained on activations scaled per model to mean norm sqrt(d_in). Our
# checkpoints store the factors. The reference's did not: for the published crosscoder (from the
# hub) we take the factors its authors' notebook used (hub.PUBLISHED_FACTORS); for any
# other checkpoint without them we estimate them as the reference's run did (its first 400
# sequences, BOS included). FACTORS / --factors overrides all of these.

# %%
if FACTORS is not None:
    cfg["normalisation_factor"], factor_source = list(FACTORS), "given (--factors)"
elif cfg.get("normalisation_factor") is not None:
    factor_source = "saved in the checkpoint"
elif origin == HF_REPO_ID:
    cfg["normalisation_factor"] = list(PUBLISHED_FACTORS)
    factor_source = "the published crosscoder's, from its authors' notebook"
elif models is not None:
    mbs = cfg["model_batch_size"]
    n_est = cfg["norm_estimate_batches"] * mbs
    cfg["normalisation_factor"] = estimate_norm_factors(models, all_tokens, hooks_of(cfg), n_est, mbs,
                                                        drop_bos=False, target_width=norm_width(cfg),
                                                        norm_scale=effective(cfg, "norm_scale")).tolist()
    factor_source = f"estimated here as the reference's run did (first {min(n_est, len(all_tokens))} sequences, BOS included)"
else:
    factor_source = "none (the checkpoint has none and no models to estimate them)"
summary["normalisation_factor"], summary["normalisation_factor_source"] = cfg.get("normalisation_factor"), factor_source
print(f"normalisation factors {cfg.get('normalisation_factor')}: {factor_source}")

# %% [markdown]
# ## Models of different tokenizers
# Such a crosscoder is read at the aligned positions only, each model at its own width
# (crossdiff/diffing/aligned.py). The KL test, Latent Scaling and steering compare the models over
# one vocabulary, which these models do not share: the cells below leave them out for such a
# pair. The dashboard shows each latent's top aligned positions, each model on its own tokens.

# %%
aligned_top = None  # (values, rows, each model's positions, counts, positions counted): the dashboard's contexts
if models is not None and tokens.ndim == 3:
    first = PositionFilter(cfg, models).first
    summary["alignment"] = meta["alignment"]
    print("content positions aligned per source (of each model's; sources/aligned_mix.py): " + "; ".join(
        f"{Path(a['source']).stem} " + ", ".join(f"{f:.1%}" for f in a["aligned_fraction"]) for a in meta["alignment"]))
    names = {i: Path(s["path"]).stem for i, s in enumerate(meta["sources"])}
    r = summary["reconstruction"] = aligned_reconstruction(cc, models, tokens, source, roles, classes,
                                                           [m.tokenizer for m in models], BATCH_SIZE, first, names)
    print(f"reconstruction on {r['positions']:,} aligned held-out positions: explained variance per model "
          f"{per_model(r['explained_variance_per_model'])}; L0 {r['l0']:.1f}; {r['dead']} latents never active; by source: "
          + "; ".join(f"{k} {per_model(v['explained_variance_per_model'])}" for k, v in r["by_source"].items()))
    print("share of each model's squared norm that varies about its mean (the rest is one constant vector, which "
          f"b_dec holds; a small share leaves that model's decoder vectors short): {per_model(r['varying_share_per_model'])}")
    shown = [ROLES[i] for i in r["roles_present"]]
    print(f"share of each class's activation mass by model 0's token role ({', '.join(shown)}; the positions' own: "
          f"{', '.join(f'{v:.1%}' for v in r['role_tokens_share'])}):")
    for name, shares in r["class_role_mass"].items():
        print(f"  {name:<10} " + ", ".join(f"{v:.1%}" for v in shares))
        for m, top in enumerate(r["class_top_tokens"][name]):
            print(f"    model {m} reads, where it fires most: " + " ".join(repr(t) for t, _ in top))
    if SPLICE_IN:
        summary["splice_in"] = aligned_splice_in(cc, models, tokens, SPLICE_BATCH_SIZE, first)
        for m, v in summary["splice_in"].items():
            print(f"splice-in at its aligned positions, model {m}: loss clean {v['clean']:.3f}, spliced "
                  f"{v['spliced']:.3f}, zero-ablated {v['zero_ablation']:.3f}: {v['loss_recovered']:.1%} recovered; "
                  f"KL(clean || spliced) {v['kl_spliced']:.4f} nats a token")
    aligned_top, aligned_models = aligned_top_examples(cc, models, tokens, TOP_K_EXAMPLES, BATCH_SIZE, first), models
    models = None  # the cells below compare the models over one vocabulary (the dashboard shows each model's tokens)

# %% [markdown]
# ## How well does it reconstruct held-out activations, and what does splicing it in cost?
# Splicing uses the crosscoder with the normalisation folded into its weights
# (`CrossCoder.fold_normalisation`), so it reads and writes raw activations. Each model's
# reconstruction is encoded from both models' residuals, so information from the other model
# can reach it: the loss recovered may exceed 100%.

# %%
if models is not None:
    keep = PositionFilter(cfg, models)
    note = None if keep.active else high_norm_note(models, tokens[:8], cfg["hook_point"], keep.first)
    if note:  # (as training warns: an attention sink)
        print(note)
    # Every pass over the held-out tokens below replays one harvest where it fits in memory.
    harvest = ActivationCache()
    r = summary["reconstruction"] = reconstruction_stats(cc, models, tokens, BATCH_SIZE, harvest=harvest,
                                                         is_chat_N=is_chat, roles_NS=roles, n_roles=len(ROLES))
    mass_F, chat_mass_F = r.pop("mass_F", None), r.pop("chat_mass_F", None)  # per latent: for the by-source cell
    role_mass = r.pop("role_mass_RF", None), r.pop("role_tokens_R", None)
    print(f"reconstruction on {r['tokens']:,} held-out tokens: explained variance {r['explained_variance']:.3f} "
          f"(the reference's mean over tokens, as training logs it; per model, pooled 1 - sum err^2 / sum var: "
          f"{per_model(r['explained_variance_per_model'])}; of {cc.reconstructs}), L0 {r['l0']:.1f}; "
          f"{r['dead']} latents ({r['dead_fraction']:.1%}) never active on these tokens")
if models is not None and SPLICE_IN and cc.reconstructs != "each model":
    print("splice-in: not measured, this architecture reconstructs no model's activation (the KL test's "
          "all+bias set patches h_base + its reconstruction into the chat model)")
elif models is not None and SPLICE_IN:
    summary["splice_in"] = splice_in_loss(cc, models, tokens, SPLICE_BATCH_SIZE, is_chat_N=is_chat)
    for m, r in summary["splice_in"].items():
        print(f"model {m}: CE clean {r['clean']:.3f}, spliced {r['spliced']:.3f}, zero-ablated "
              f"{r['zero_ablation']:.3f}, loss recovered {r['loss_recovered']:.1%}")

# %% [markdown]
# ## Are the chat-only latents really chat-only? (Latent Scaling)
# nu near 0: the base model lacks the latent's direction. High nu_error: Complete Shrinkage (the
# base activation has it; L1 shrank the base decoder). High nu_reconstruction: Latent Decoupling
# (other latents reconstruct it in the base model). Chat-specific, as the paper's authors select
# them: |nu_error| < 0.2 and |nu_reconstruction| < 0.5; ranked by the sum of the two ranks. The
# mirror image probes the base-only latents along their base decoder (nu: chat / base).

# %%
if models is not None and len(models) > 2:  # the cells below read a base (model 0) against its chat model (1)
    print(f"the cells below compare a base model with its chat model; this crosscoder reads {len(models)} models, "
          "so they are left out (the classes above, reconstruction and splice-in are each model's)")
    models = None
no_class = torch.zeros(cfg["dict_size"], dtype=torch.bool)  # (more than two models: no base-only, chat-only class)
chat_only = torch.nonzero(classes.get("chat_only", no_class)).flatten()
probed = effective_chat_only(cc, EFFECTIVE_CHAT_ONLY).cpu() if EFFECTIVE_CHAT_ONLY else chat_only
base_only = torch.nonzero(classes.get("base_only", no_class)).flatten()


def scaled_batches():
    """The held-out positions training read, normalised (the batches Latent Scaling fits on)."""
    s_M, keep = torch.tensor(cfg["normalisation_factor"], device="cpu"), PositionFilter(cfg, models)
    for t, x in harvest(models, tokens, cfg["hook_point"], BATCH_SIZE, "latent scaling", first=keep.first):
        x_BMD = x.flatten(0, 1) * s_M.to(x.device)[:, None]
        yield x_BMD[keep.keep(t, x).flatten()] if keep.active else x_BMD


ls = ls_base = None  # Latent Scaling's results, when it runs
if models is not None and len(probed):
    ls = latent_scaling(cc, scaled_batches(), probed)
    summary["latent_scaling"], ok = scaling_summary(ls, probed)
    summary["latent_scaling"]["selection"] = (f"the {EFFECTIVE_CHAT_ONLY} most chat-leaning latents" if EFFECTIVE_CHAT_ONLY
                                              else "the chat-only latents (the chat model's exclusive block)"
                                              if cc.partition.exclusive
                                              else f"the chat-only latents (relative norm > {CHAT_ONLY_MIN})")
    print(f"latent scaling of {summary['latent_scaling']['selection']}: "
          + format_scaling(summary["latent_scaling"]))
    plot_latent_scaling(ls["nu_error"][ok].cpu(), ls["nu_reconstruction"][ok].cpu(), out_dir / "latent_scaling.png",
                        title=f"Latent Scaling of chat-only latents ({label})")
if models is not None and len(base_only):
    ls_base = latent_scaling(cc, scaled_batches(), base_only, direction_model=0)
    summary["latent_scaling_base_only"], _ = scaling_summary(ls_base, base_only)
    print("latent scaling of the base-only latents (along their base decoder): "
          + format_scaling(summary["latent_scaling_base_only"]))

# %% [markdown]
# ## Does a latent set explain the difference? The KL test
# The chat model runs its layers after the hook from the base model's residual patched with a
# latent set (crossdiff/diffing/causal.py; Minder, Dumas et al. 2025): the share of the base -> chat
# KL gap each set closes per group of positions, beside random sets of the same size. "all"
# leaves out the decoder-bias difference, "all+bias" adds it. Every row: kl_gap.json.

# %%
gap_alone, steering = {}, {}  # per latent, for the dashboard
if models is not None and KL_TEST:
    n_kl = len(tokens) if KL_SEQS is None else min(KL_SEQS, len(tokens))
    groups = (token_groups(tokens, is_chat, FIRST_K) if cfg["preset"] == "toy" else
              role_groups(roles, FIRST_K) if roles is not None else source_groups(tokens, is_chat))
    text_rows = tokens if is_chat is None else tokens[~is_chat.bool()]  # pretraining-like rows, for the ADL
    kl_sets = diffing_sets(chat_only, probed, ls, LATENTS)
    kl_sets, note = informative_sets(kl_sets, cfg["dict_size"])
    if note:
        print(note)
    per_latent = cfg["preset"] == "toy" if RANKED is None else RANKED  # one chat forward per latent and batch
    if per_latent and len(tokens) > n_kl:  # chosen on other rows
        picked = "assistant" if "assistant" in groups else "all"
        kl_sets |= ranked_sets(cc, models, tokens[n_kl:2 * n_kl], groups[picked][n_kl:2 * n_kl],
                               batch_size=SPLICE_BATCH_SIZE)
    summary["kl_sets"] = {name: list(getattr(v, "latents", v)) for name, v in kl_sets.items() if not isinstance(v, str)}
    if per_latent:  # for the dashboard: each probed latent alone, where it fires
        gap_alone = summary["kl_gap_alone"] = gap_where_firing(cc, models, tokens[:n_kl], probed.tolist(),
                                                               batch_size=SPLICE_BATCH_SIZE)
    kl_rows, kl_summary, kl_text = diff_report(cc, models, tokens[:n_kl], {g: m[:n_kl] for g, m in groups.items()},
                                               kl_sets, text_rows[:n_kl], SPLICE_BATCH_SIZE, BATCH_SIZE)
    (out_dir / "kl_gap.json").write_text(json.dumps(kl_rows, indent=1))
    summary.update(kl_summary)
    print(kl_text)

# %% [markdown]
# ## Chat tokens against the rest (the toy pair, or a token mix with chat sources)
# Each source's explained variance and loss recovered, and the share of each class's activation
# mass that falls in chat rows, beside the share of chat rows itself: a class of chat-specific
# latents should put its mass in chat well above that share. "chat_specific": the probed latents
# that pass Latent Scaling.

# %%
if models is not None and is_chat is not None:
    by_source = summary["reconstruction"].pop("by_source", summary.get("by_source"))  # (a cell run again)
    shown = dict(classes)
    if ls is not None:
        shown["chat_specific"] = torch.zeros_like(classes["chat_only"])
        shown["chat_specific"][probed] = is_model_specific(ls["nu_error"], ls["nu_reconstruction"]).cpu()
    summary["by_source"] = {"chat_row_fraction": float(is_chat.float().mean()),
                            **{k: by_source[k] for k in ("chat", "text") if k in by_source},
                            "classes": class_chat_mass(shown, mass_F, chat_mass_F)}
    for k in ("chat", "text"):
        if k in by_source:
            print(f"{k} rows: explained variance per model {per_model(by_source[k]['explained_variance_per_model'])} "
                  f"on {by_source[k]['tokens']:,} tokens")
    for m, r in summary.get("splice_in", {}).items():
        print(f"model {m}: loss recovered " + ", ".join(f"{k} rows {v['loss_recovered']:.1%} (CE clean {v['clean']:.3f})"
                                                        for k, v in r["by_source"].items()))
    print(f"{'class':<15} {'latents':>7} {'active':>6} {'mass in chat':>12}  (chat rows: "
          f"{summary['by_source']['chat_row_fraction']:.0%} of the held-out rows)")
    for name, r in summary["by_source"]["classes"].items():
        print(f"{name:<15} {r['latents']:>7} {r['active']:>6} {r['chat_mass_fraction']:>12.1%}")
    if role_mass[0] is not None:  # a mix with roles: where in a conversation each class's mass falls
        by_role = summary["by_role"] = class_role_mass(shown, *role_mass, ROLES)
        print("share of each class's activation mass by token role (first row: the tokens' own shares):")
        print(f"{'':<15} " + " ".join(f"{n:>9}" for n in by_role["tokens"]))
        for name, shares in by_role.items():
            print(f"{name:<15} " + " ".join(f"{v:>9.1%}" for v in shares.values()))

# %% [markdown]
# ## What do the chat-only latents fire on?

# %%
top_all = fire_counts = n_counted = None  # every latent's top examples and firing count (the dashboard shows them all)
if models is not None:
    *top_all, fire_counts, n_counted = top_activating_examples(cc, models, tokens, torch.arange(cfg["dict_size"], device="cpu"), TOP_K_EXAMPLES,
                                                    BATCH_SIZE, return_counts=True, harvest=harvest)
if models is not None and len(probed):  # the chat-only class, or the effective chat-only latents
    shown = probed[rel[probed].argsort(descending=True)][:N_EXAMPLE_LATENTS]
    values, seqs, positions = (t[shown] for t in top_all)
    page = examples_html(models[1].to_str_tokens, tokens, shown.tolist(), values, seqs, positions,
                         title=f"Top activations of {summary['latent_scaling']['selection']} latents ({label})")
    (out_dir / "chat_only_examples.html").write_text(page)
    if is_chat is not None:  # the toy pair, a mix: which of those top contexts are chat transcripts?
        share = summary["top_examples_in_transcripts"] = share_in_transcripts(is_chat, values, seqs)
        print(f"top examples of {summary['latent_scaling']['selection']} inside chat transcripts: "
              + ("none (no latent shown fired)" if share is None else f"{share:.1%}"))
    if in_notebook():
        from IPython.display import HTML, display

        display(HTML(page))

# %% [markdown]
# ## Steering: the base model with a chat-specific latent's direction added
# Greedy continuations of a few held-out prompts (on the toy pair, user turns up to the model's
# turn) with factor x max activation x the latent's chat decoder direction added at the hook,
# beside both models' own (crossdiff/diffing/steering.py). Every continuation: steering.json.

# %%
if models is not None and (cfg["preset"] == "toy" if STEER is None else STEER) and top_all is not None:
    specific = diffing_sets(chat_only, probed, ls).get("chat_specific") if ls is not None else None
    steered_latents = (LATENTS_TO_STEER or specific or chat_only.tolist())[:3]
    prompts = user_turns(tokens, is_chat) if cfg["preset"] == "toy" else steering_prompts(tokens, roles_NS=roles)
    silent = [j for j in steered_latents if not float(top_all[0][j, 0]) > 0]
    if silent:
        print(f"not steering latents {silent}: they never fired on the held-out tokens (no activation to scale by)")
    steering = {j: steer(cc, models, prompts, j, float(top_all[0][j, 0])) for j in steered_latents if j not in silent}
    (out_dir / "steering.json").write_text(json.dumps(steering, indent=1))
    for j, runs in steering.items():
        r = runs[0]
        print(f"steering latent {j} on [{words(models[1].to_str_tokens(torch.tensor(r['prompt'][-6:])))}]: base "
              f"[{words(models[1].to_str_tokens(torch.tensor(r['base'])))}], chat "
              f"[{words(models[1].to_str_tokens(torch.tensor(r['chat'])))}], "
              + ", ".join(f"x{f} [{words(models[1].to_str_tokens(torch.tensor(t)))}]" for f, t in r["steered"].items()))

# %% [markdown]
# ## The dashboard
# Every latent that fired on the held-out tokens (every latent, without the models) in one HTML
# file that opens from disk: a table that sorts and filters, and each latent's top contexts in
# both models (crossdiff/diffing/dashboard.py).

# %%
scaling = {}  # latent -> (nu_error, nu_reconstruction, direction, passes), for the table
for name, result, latents_J in (("base", ls_base, base_only), ("chat", ls, probed)):
    if result is not None:
        nu_e, nu_r = result["nu_error"], result["nu_reconstruction"]
        for j, e, r, ok in zip(latents_J.tolist(), nu_e.tolist(), nu_r.tolist(), is_model_specific(nu_e, nu_r).tolist()):
            scaling[j] = (e, r, name, ok)
info = {"checkpoint": label, "models": cfg["model_names"], "hook_point": cfg["hook_point"], "gap_alone": gap_alone}
if steering:  # its continuations as text
    info["steering"] = {j: [{"prompt": words(models[1].to_str_tokens(torch.tensor(r["prompt"][-8:]))),
                             **{k: words(models[1].to_str_tokens(torch.tensor(r[k]))) for k in ("base", "chat")},
                             "steered": {f: words(models[1].to_str_tokens(torch.tensor(t))) for f, t in r["steered"].items()}}
                            for r in runs] for j, runs in steering.items()}
if models is not None:
    write_dashboard(out_dir / "dashboard.html", cc, models, tokens, top_all, fire_counts, scaling, info, BATCH_SIZE,
                    harvest=harvest, n_tokens=n_counted)
elif aligned_top is not None:  # each model's own tokens around its own aligned position
    *top_all, fire_counts, n_counted = aligned_top
    write_dashboard(out_dir / "dashboard.html", cc, aligned_models, tokens, top_all, fire_counts, scaling, info,
                    BATCH_SIZE, n_tokens=n_counted)
else:
    write_dashboard(out_dir / "dashboard.html", cc, scaling=scaling, info=info)
print(f"dashboard: open {final_dir / 'dashboard.html'} in a browser")

# %%
kl_all = summary.get("models_kl", {}).get("by_group", {}).get("all", {}).get("kl")  # the models' own, when measured
summary["separation_note"] = separation_note(classes, rel, kl_all, one_vocabulary=tokens is None or tokens.ndim == 2)
if summary["separation_note"]:  # an all-shared result is no finding by itself
    print(f"note: {summary['separation_note']}")
(out_dir / "summary.txt").write_text(json.dumps(summary, indent=2, default=str))
swap_in(out_dir, final_dir)  # the whole analysis at once
print(f"analysis of {label} written to {final_dir}: " + ", ".join(sorted(p.name for p in final_dir.iterdir())))
