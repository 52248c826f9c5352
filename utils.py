"""Token data, model loading, the analysis maths, and process settings (notebook, malloc).

Shape legend: N sequences, S seq_len.
"""
import json
import os
from pathlib import Path

import numpy as np
import torch

from config import layers_needed

REPO_DIR = Path(__file__).resolve().parent
DEFAULT_DATA_DIR = REPO_DIR / "data"
PILE_LMSYS_DATASET = "ckkissane/pile-lmsys-mix-1m-tokenized-gemma-2"


class DataError(ValueError):
    """Training tokens that are missing, malformed or do not fit the models."""


class SetupError(RuntimeError):
    """The environment cannot run the requested job (no GPU, no hub access)."""


def data_dir(cfg=None):
    d = (cfg or {}).get("data_dir")
    return Path(d) if d else DEFAULT_DATA_DIR


def _dataset_to_tokens(dataset, column, origin, chunk_rows=4096):
    """The column as an int32 [N, S] tensor, converted chunk_rows at a time: the peak is the int32
    result plus one chunk, never the whole column as int64 (8 GB for the reference's dataset)."""
    if column not in dataset.column_names:
        raise DataError(f"{origin}: dataset has no column {column!r} (columns: {dataset.column_names})")
    if len(dataset) == 0:
        raise DataError(f"{origin}: dataset is empty")
    dataset = dataset.with_format("numpy", columns=[column])
    tokens_NS = None
    for start in range(0, len(dataset), chunk_rows):
        block = dataset[start : start + chunk_rows][column]
        if block.dtype == object or block.ndim != 2:  # ragged rows come back as an array of arrays
            lengths = sorted({len(row) for row in block})
            raise DataError(f"{origin}: rows of column {column!r} have different lengths {lengths[:5]}...")
        if tokens_NS is None:
            tokens_NS = torch.empty(len(dataset), block.shape[1], dtype=torch.int32)
        elif block.shape[1] != tokens_NS.shape[1]:
            raise DataError(f"{origin}: rows of column {column!r} have different lengths "
                            f"{sorted({tokens_NS.shape[1], block.shape[1]})}...")
        if block.dtype.kind not in "iu":
            raise DataError(f"{origin}: token ids must be integers, got {block.dtype}")
        tokens_NS[start : start + len(block)] = torch.from_numpy(block.astype(np.int32, copy=False))
    return tokens_NS


def load_tokens(source=PILE_LMSYS_DATASET, cfg=None, column="input_ids", split="train"):
    """All training tokens as an int32 [N, S] tensor.

    source: a tensor; a .pt file holding one; a directory written by datasets' save_to_disk;
    or a Hugging Face dataset id (the reference's pile + lmsys mix by default), downloaded once
    and cached as a .pt file under cfg["data_dir"] (default data/ beside the code).
    int32 halves the reference's int64 tensor (7.9 GB -> 3.9 GB): every vocabulary fits.
    """
    if isinstance(source, torch.Tensor):
        tokens = source
    elif Path(str(source)).is_file():
        tokens = torch.load(source, map_location="cpu", weights_only=True)
        if not isinstance(tokens, torch.Tensor):
            raise DataError(f"{source}: expected a token tensor, found {type(tokens).__name__}")
    elif Path(str(source)).is_dir():
        import datasets

        state = Path(str(source)) / "state.json"
        if state.is_file() and json.loads(state.read_text()).get("_data_files") == []:
            raise DataError(f"{source}: dataset is empty")  # datasets cannot even load a 0-shard dataset
        try:
            dataset = datasets.load_from_disk(str(source))
        except Exception as e:
            raise DataError(f"{source}: cannot read the dataset ({type(e).__name__}: {e})") from None
        if isinstance(dataset, datasets.DatasetDict):
            dataset = dataset[split]
        tokens = _dataset_to_tokens(dataset, column, source)
    else:
        cache = data_dir(cfg) / (str(source).replace("/", "__") + ".pt")
        if cache.is_file():
            return load_tokens(cache, cfg, column, split)
        import datasets

        try:
            dataset = datasets.load_dataset(str(source), split=split)
        except (OSError, ValueError) as e:  # offline, unknown id, no access
            raise SetupError(f"could not download the dataset {source} ({type(e).__name__}: {e}); give a local "
                             "copy with --dataset (a datasets directory or a .pt token tensor)") from None
        tokens = _dataset_to_tokens(dataset, column, source)
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(".pt.tmp")
        torch.save(tokens, tmp)
        os.replace(tmp, cache)
    if tokens.ndim != 2 or tokens.shape[0] == 0:
        raise DataError(f"{source}: tokens must be a non-empty [n_sequences, seq_len] tensor, got shape {tuple(tokens.shape)}")
    if tokens.dtype.is_floating_point or tokens.dtype == torch.bool:
        raise DataError(f"{source}: token ids must be integers, got {tokens.dtype}")
    return tokens.to(torch.int32)


def check_tokens(tokens_NS, seq_len, vocab_size):
    """Clear errors for tokens the models cannot run on."""
    if tokens_NS.ndim != 2 or tokens_NS.shape[0] == 0:
        raise DataError(f"tokens must be a non-empty [n_sequences, seq_len] tensor, got shape {tuple(tokens_NS.shape)}")
    if tokens_NS.shape[1] < seq_len:
        raise DataError(f"token sequences have length {tokens_NS.shape[1]}, shorter than seq_len={seq_len}")
    lo, hi = int(tokens_NS.min()), int(tokens_NS.max())
    if lo < 0 or hi >= vocab_size:
        raise DataError(f"token ids must lie in [0, {vocab_size}) for the models' vocabulary; found ids in [{lo}, {hi}]")


def load_gemma_pair(cfg, full=False):
    """The models of cfg["model_names"] (the reference's: Gemma-2-2b base, index 0, and
    Gemma-2-2b-it chat, index 1) as HookedTransformers on cfg["device"], in eval mode.

    A name is a TransformerLens / hub name, or a local directory saved by transformers'
    save_pretrained (weights, config and tokenizer; no network), named after the TransformerLens
    model it holds (".../gemma-2-2b-it"). For training (full=False) only what the hook needs is
    kept: the blocks before it (layers_needed: 14 of Gemma-2-2b's 26 for blocks.14.hook_resid_pre)
    and the embedding; the unembedding TransformerLens builds (a 256k x 2304 matrix, 2.4 GB in
    fp32 per model) is freed, so such a model can only be run with stop_at_layer. full=True (the
    analysis: the splice-in loss needs logits) loads every block and the unembedding.
    Fails with a message that says what is needed when the hub is unreachable.
    """
    from transformer_lens import HookedTransformer

    n_layers = None if full else layers_needed(cfg["hook_point"])
    models = []
    for name in cfg["model_names"]:
        try:
            kwargs = _local_model(name)
            if kwargs:
                name, local_layers = kwargs.pop("tl_name"), kwargs.pop("n_layers")
                kwargs["first_n_layers"] = local_layers if n_layers is None else min(n_layers, local_layers)
            else:
                kwargs["first_n_layers"] = n_layers
            model = HookedTransformer.from_pretrained(name, device=cfg["device"], **kwargs)
        except (OSError, ValueError, RuntimeError, ImportError) as e:
            raise SetupError(
                f"could not load {name} ({type(e).__name__}: {e}).\n"
                "The Gemma replication needs network access to the Hugging Face hub, an accepted Gemma "
                "licence and `huggingface-cli login` (or local copies: --model_names DIR_A,DIR_B), and a "
                "CUDA GPU. To see the whole pipeline on a CPU instead, run: python train.py --preset toy") from None
        if not full and n_layers is not None:
            drop_unembedding(model)
        models.append(model.eval())
    return models


def _local_model(name):
    """from_pretrained arguments for a local transformers directory; {} for a hub name."""
    path = Path(name)
    if not (path / "config.json").is_file():
        return {}
    from transformer_lens.loading_from_pretrained import get_official_model_name
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    try:
        get_official_model_name(path.name)
    except ValueError:
        raise SetupError(f"{path}: name a local model directory after the TransformerLens model it holds "
                         "(for example .../gemma-2-2b-it), so that its architecture is known") from None
    hf_cfg = AutoConfig.from_pretrained(path)
    return {"tl_name": path.name, "n_layers": hf_cfg.num_hidden_layers,
            "hf_model": AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32),
            "tokenizer": AutoTokenizer.from_pretrained(path)}


def drop_unembedding(model):
    """Free the unembedding of a model that is only run up to a hook (stop_at_layer)."""
    d_model = model.cfg.d_model
    model.unembed.W_U = torch.nn.Parameter(torch.empty(d_model, 0, device=model.unembed.W_U.device), requires_grad=False)
    model.unembed.b_U = torch.nn.Parameter(torch.empty(0, device=model.unembed.b_U.device), requires_grad=False)
    return model


# ---------------------------------------------------------------------------- analysis maths
# Shape legend here: N sequences, S positions, B tokens (rows), M models, D d_in, F latents, J selected latents.
def iter_paired_activations(models, tokens_NS, hook_point, batch_size=8, desc="activations"):
    """Yields (tokens [n, S], raw activations [n, S-1, M, D]) batch by batch, BOS dropped,
    so that analyses over many tokens never hold them all in memory."""
    from tqdm.auto import tqdm

    from buffer import autocast_context, extract_activations

    device = next(models[0].parameters()).device
    for start in tqdm(range(0, len(tokens_NS), batch_size), desc=desc, leave=False):
        t = tokens_NS[start : start + batch_size].to(device, torch.long)
        with torch.no_grad(), autocast_context(device):
            acts = [extract_activations(m, t, hook_point)[:, 1:].float() for m in models]
        yield t, torch.stack(acts, dim=2)


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


@torch.no_grad()
def reconstruction_stats(crosscoder, models, tokens_NS, batch_size=8):
    """Held-out reconstruction quality in the training (normalised) space: explained variance
    of all models as logged in training, per model as the pooled ratio 1 - sum err^2 / sum var
    (for any number of models), mean L0, and the latents never active."""
    s_M = normalisation_factors(crosscoder)
    sums, n_rows = None, 0
    fired_F = torch.zeros(crosscoder.cfg["dict_size"], dtype=torch.bool, device=crosscoder.W_enc.device)
    for _, x in iter_paired_activations(models, tokens_NS, crosscoder.cfg["hook_point"], batch_size, "reconstruction"):
        x_BMD = x.flatten(0, 1).to(s_M.device) * s_M[:, None]
        losses, acts_BF, _ = crosscoder.losses_and_acts(x_BMD)
        fired_F |= (acts_BF > 0).any(0)
        x_hat_BMD = crosscoder.decode(acts_BF).float()
        ev_M = [1 - (x_hat_BMD[:, m] - x_BMD[:, m]).pow(2).sum(-1).mean()
                / (x_BMD[:, m] - x_BMD[:, m].mean(0)).pow(2).sum(-1).mean() for m in range(x_BMD.shape[1])]
        batch = torch.stack([losses.explained_variance, losses.l0_loss, *ev_M]) * len(x_BMD)
        sums = batch if sums is None else sums + batch
        n_rows += len(x_BMD)
    means = (sums / n_rows).tolist()
    return {"explained_variance": means[0], "l0": means[1],
            "explained_variance_per_model": means[2:], "dead_fraction": float((~fired_F).float().mean()),
            "dead": int((~fired_F).sum()), "tokens": n_rows}


@torch.no_grad()
def splice_in_loss(crosscoder, models, tokens_NS, batch_size=2):
    """Next-token cross-entropy of each model clean, with its residual at the hook replaced by
    the crosscoder's reconstruction (positions 1..; BOS kept clean), and zero-ablated (all
    positions, as the authors' notebook). loss_recovered = 1 - (spliced - clean) / (zero - clean).

    The models run under the buffer's bf16 autocast (CUDA), so the [batch, seq, vocab] logits
    are bf16 (log-softmax in fp32): with Gemma's 256k vocabulary each sequence of 1024 costs
    about 3 GB at the peak, hence the small default batch.
    The reconstruction of model m is encoded from every model's residual, so the chat model's
    information can reach the base model's splice: loss_recovered may exceed 1."""
    from buffer import autocast_context

    folded = crosscoder.fold_normalisation(normalisation_factors(crosscoder))
    hook_point = crosscoder.cfg["hook_point"]
    totals = torch.zeros(len(models), 3, dtype=torch.float64)
    n = 0
    for t, x in iter_paired_activations(models, tokens_NS, hook_point, batch_size, "splice-in loss"):
        N, S1, M, D = x.shape
        x_hat = folded(x.flatten(0, 1).to(folded.W_enc.device)).float().view(N, S1, M, D)
        for m, model in enumerate(models):
            def splice(act, hook, m=m):
                act = act.clone()
                act[:, 1:] = x_hat[:, :, m].to(act.dtype)
                return act

            with autocast_context(t.device):
                clean = model(t, return_type="loss")
                spliced = model.run_with_hooks(t, return_type="loss", fwd_hooks=[(hook_point, splice)])
                zero = model.run_with_hooks(t, return_type="loss",
                                            fwd_hooks=[(hook_point, lambda act, hook: torch.zeros_like(act))])
            totals[m] += torch.tensor([float(clean), float(spliced), float(zero)], dtype=torch.float64) * N
        n += N
    out = {}
    for m in range(len(models)):
        clean, spliced, zero = (totals[m] / n).tolist()
        out[m] = {"clean": clean, "spliced": spliced, "zero_ablation": zero,
                  "loss_recovered": 1 - (spliced - clean) / (zero - clean)}
    return out


# A chat-only latent counts as genuine when both Latent Scaling ratios are at most this. On the
# toy pair the chat-only latents' max(nu) falls either below 0.2 or above 0.5 (none between).
GENUINE_NU_MAX = 0.2


@torch.no_grad()
def latent_scaling(crosscoder, batches, latents_J, direction_model=1):
    """Latent Scaling (Minder, Dumas et al. 2025, "Overcoming Sparsity Artifacts in Crosscoders
    to Interpret Chat-Tuning"). For each latent j, with direction d_j (its decoder in
    direction_model, the chat model) and activation f_j, least squares gives, per model m,
        beta = sum_x f_j(x) <d_j, y_m(x)> / (|d_j|^2 sum_x f_j(x)^2)
    for two targets: the reconstruction error with j's own contribution put back,
    y_m = x_m - x_hat_m + f_j d_j^m (how much of j's direction model m's activation holds), and the
    reconstruction by the crosscoder y_m = x_hat_m (how much the other latents carry it).
    Returns beta_error, beta_reconstruction [M, J] and their ratios base / chat, nu_error and
    nu_reconstruction [J]: for a truly chat-only latent both are ~0; a high nu_error means
    Complete Shrinkage, a high nu_reconstruction means Latent Decoupling.
    batches: an iterable of normalised activations [B, M, D] (training space)."""
    latents_J = torch.as_tensor(latents_J, device=crosscoder.W_enc.device)
    W_JMD = crosscoder.W_dec[latents_J].float()
    d_JD = W_JMD[:, direction_model]
    self_dot_JM = torch.einsum("jmd,jd->jm", W_JMD, d_JD)  # <d_j^m, d_j>
    M = W_JMD.shape[1]
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
            num_rec[m] += (f_BJ * (x_hat_BMD[:, m] @ d_JD.T)).sum(0).double()
        den += (f_BJ.pow(2).sum(0) * d_JD.pow(2).sum(-1)).double()
    beta_err, beta_rec = (num_err / den).float(), (num_rec / den).float()
    base = 1 - direction_model if M == 2 else 0
    return {"beta_error": beta_err, "beta_reconstruction": beta_rec,
            "nu_error": beta_err[base] / beta_err[direction_model],
            "nu_reconstruction": beta_rec[base] / beta_rec[direction_model]}


@torch.no_grad()
def top_activating_examples(crosscoder, models, tokens_NS, latents_J, k=10, batch_size=8):
    """For each latent: its k highest activations on tokens_NS with their (sequence, position).
    A running top-k merged batch by batch. Returns values, seq, pos [J, k] (value 0: fewer hits)."""
    latents_J = torch.as_tensor(latents_J, device=crosscoder.W_enc.device)
    J = len(latents_J)
    s_M = normalisation_factors(crosscoder)
    best_v = torch.zeros(J, k, device=latents_J.device)
    best_i = torch.zeros(J, k, dtype=torch.long, device=latents_J.device)
    offset = 0
    for t, x in iter_paired_activations(models, tokens_NS, crosscoder.cfg["hook_point"], batch_size, "top activations"):
        N, S1 = x.shape[:2]
        f_BJ = crosscoder.encode(x.flatten(0, 1).to(s_M.device) * s_M[:, None])[:, latents_J].float()
        idx_B = offset + torch.arange(N * S1, device=s_M.device)  # flat index over (sequence, position 1..)
        kk = min(k, len(f_BJ))
        v, i = f_BJ.topk(kk, dim=0)
        cand_v, cand_i = torch.cat([best_v, v.T], 1), torch.cat([best_i, idx_B[i].T], 1)
        best_v, sel = cand_v.topk(k, dim=1)
        best_i = cand_i.gather(1, sel)
        offset += N * S1
    S1 = tokens_NS.shape[1] - 1
    return best_v.cpu(), (best_i // S1).cpu(), (best_i % S1 + 1).cpu()  # position in the full sequence


def examples_html(str_tokens_fn, tokens_NS, latents_J, values, seqs, positions, window=12, title=""):
    """An HTML page: for each latent, its top contexts with the activating token highlighted."""
    import html

    parts = [f"<html><head><meta charset='utf-8'><title>{html.escape(title)}</title></head><body>",
             f"<h2>{html.escape(title)}</h2>"]
    for j, latent in enumerate(latents_J):
        parts.append(f"<h3>latent {int(latent)}</h3><ol>")
        for v, n, p in zip(values[j].tolist(), seqs[j].tolist(), positions[j].tolist()):
            if v <= 0:
                continue
            words = str_tokens_fn(tokens_NS[n, max(0, p - window) : p + 1])
            ctx = "".join(html.escape(w) + " " for w in words[:-1])
            parts.append(f"<li>{v:.2f}: {ctx}<b style='background:#fd8'>{html.escape(words[-1])}</b></li>")
        parts.append("</ol>")
    return "\n".join(parts + ["</body></html>"])


# ---------------------------------------------------------------------------- environment
def in_notebook():
    """True inside IPython / Jupyter (figures shown, scripts' argv ignored)."""
    try:
        return get_ipython() is not None  # noqa: F821 (defined only inside IPython)
    except NameError:
        return False


def keep_freed_memory():
    """On Linux/glibc, stop malloc from handing large freed blocks back to the OS. By default
    every block over 32 MB is unmapped when freed, so each step's fresh [B, F] temporaries are
    page-faulted in again: 7-10% of a CPU step at the Gemma shape. Process-wide, so the scripts
    call it (train.py, bench.py on CPU), not the library. Returns False where it does not apply."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's mallopt parameter numbers
        return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1))
    except (OSError, AttributeError):  # not glibc
        return False
