"""The embedded CPU default: a small base/chat model pair and its training tokens.

Interim version: two random tiny HookedTransformers (the chat model a perturbed copy of the
base) and random tokens, enough to run the whole pipeline on a CPU.
"""
import copy

import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

# Overrides applied to train.py's default_cfg by `--preset toy`.
TOY_CFG = {
    "d_in": 64, "dict_size": 512, "seq_len": 33, "batch_size": 256, "buffer_mult": 16,
    "num_tokens": 256 * 400, "lr": 1e-3, "l1_coeff": 2.0, "model_batch_size": 32,
    "log_every": 20, "save_every": 200, "hook_point": "blocks.1.hook_resid_pre",
    "model_names": ["toy-base", "toy-chat"], "model_name": "toy-base", "norm_estimate_batches": 4,
    "device": "cpu",
}


def tiny_model_cfg(seed=0, d_model=64, n_layers=2, d_vocab=100, n_ctx=64):
    return HookedTransformerConfig(
        n_layers=n_layers, d_model=d_model, d_head=16, n_heads=d_model // 16, d_mlp=4 * d_model,
        n_ctx=n_ctx, d_vocab=d_vocab, act_fn="gelu", normalization_type="LN", seed=seed)


def build_toy_pair(cfg):
    """(base, chat, tokens): random tiny models and random tokens with a BOS of id 0."""
    torch.manual_seed(cfg["seed"])
    base = HookedTransformer(tiny_model_cfg(seed=cfg["seed"], d_model=cfg["d_in"]))
    chat = copy.deepcopy(base)
    with torch.no_grad():
        for p in chat.parameters():
            p.add_(0.1 * torch.randn_like(p) * p.std())
    n_seqs = 4096
    tokens = torch.randint(1, base.cfg.d_vocab, (n_seqs, cfg["seq_len"]))
    tokens[:, 0] = 0
    return base.eval(), chat.eval(), tokens
