"""Running the models: the activations at a hook point, computing no more of a model than needed,
for every model on the same tokens, and the per-model normalisation factors.

Shape legend: N sequences, S seq_len (positions), M models, D d_in.
"""
import torch
from einops import rearrange
from tqdm.auto import tqdm

from config import hook_layer, layers_needed


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


def check_models(models, hook_point, d_in=None):
    """Clear errors, before any work, for models that cannot be diffed at hook_point."""
    for i, model in enumerate(models):
        if not has_hook(model, hook_point):
            raise ValueError(f"hook_point {hook_point!r} does not exist in model {i} "
                             f"({model.cfg.model_name}, {model.cfg.n_layers} layers)")
    widths = [model.cfg.d_model for model in models]
    if len(set(widths)) != 1:
        raise ValueError(f"models disagree on d_in (d_model): {widths}")
    if d_in is not None and d_in != widths[0]:
        raise ValueError(f"cfg d_in={d_in} but the models' d_model is {widths[0]}")


@torch.no_grad()
def run_models(models, tokens_NS, hook_point):
    """Activations [N * (S-1), M, D] of every model on the same tokens, BOS position dropped,
    under the reference's bf16 autocast where the device has it."""
    device = next(models[0].parameters()).device
    tokens_NS = tokens_NS.to(device, torch.long)
    with autocast_context(device):
        acts = [extract_activations(m, tokens_NS, hook_point)[:, 1:] for m in models]
    return rearrange(torch.stack(acts, dim=0), "model seq pos d_in -> (seq pos) model d_in")


@torch.no_grad()
def estimate_norm_factors(models, tokens_NS, hook_point, n_seqs, model_batch_size, drop_bos=True, progress=True):
    """[M] float32 on the CPU: sqrt(d_in) / the mean activation norm of each model over the first
    n_seqs sequences, run model_batch_size at a time, in fp32 (the harvest runs under bf16 autocast
    on a GPU; the reference estimated the factors without it). drop_bos=False includes position 0, as the
    reference's run did (and so the published crosscoder's factors)."""
    device = next(models[0].parameters()).device
    n_seqs = min(n_seqs, len(tokens_NS))
    norm_sums, count = torch.zeros(len(models), dtype=torch.float64), 0
    for start in tqdm(range(0, n_seqs, model_batch_size), desc="estimating norms", leave=False, disable=not progress):
        tokens = tokens_NS[start : min(start + model_batch_size, n_seqs)].to(device, torch.long)
        # In the models' own dtype (fp32), as the reference estimated: no bf16 autocast here.
        acts_MNSD = torch.stack([extract_activations(m, tokens, hook_point) for m in models])
        acts_MNSD = acts_MNSD[:, :, 1:] if drop_bos else acts_MNSD
        norm_sums += acts_MNSD.float().norm(dim=-1).flatten(1).sum(1).double().cpu()
        count += acts_MNSD[0, ..., 0].numel()
    d_in = acts_MNSD.shape[-1]
    return (d_in ** 0.5 / (norm_sums / count)).float()


def autocast_context(device):
    """bf16 autocast where the device supports it (CUDA), as the reference; plain fp32 elsewhere."""
    device = torch.device(device)
    enabled = device.type == "cuda" and torch.cuda.is_bf16_supported()
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)
