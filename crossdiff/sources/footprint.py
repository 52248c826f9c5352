"""What the models of a pair take on their device as training loads them, read without loading
them: fp32 weights (TransformerLens's default, and what models.load_one asks transformers for)
of the embedding and the blocks before the hook, no unembedding (models.drop_unembedding).

A GGUF file and a directory of safetensors give their tensors' shapes exactly from their headers;
a TransformerLens / hub name gives its config, counted as TransformerLens builds the weights
(biases and norms included). Another directory (a pytorch_model.bin) is not counted: None.
"""
import math
import re
from pathlib import Path

import torch

from crossdiff.config.plan import layers_needed
from crossdiff.sources.models import gguf_header, is_gguf, is_local, model_dtype

FP32 = 4
_BLOCK = re.compile(r"(?:^|\.)(?:layers|blk|h)\.(\d+)\.")  # transformers' and GGUF's block names
_UNEMBEDDING = ("lm_head.weight", "output.weight")


def kept(name, n_layers):
    """Whether training keeps the tensor `name`: not the unembedding, not a block from n_layers on."""
    if name in _UNEMBEDDING:
        return False
    block = _BLOCK.search(name)
    return block is None or n_layers is None or int(block.group(1)) < n_layers


def tl_weight_count(tl_cfg, n_layers):
    """Elements TransformerLens holds for a model of this config (HookedTransformerConfig) with
    its first n_layers blocks and no unembedding."""
    d, h, dh, m = tl_cfg.d_model, tl_cfg.n_heads, tl_cfg.d_head, tl_cfg.d_mlp
    kv = tl_cfg.n_key_value_heads or h
    attention = 2 * d * h * dh + 2 * d * kv * dh + h * dh + 2 * kv * dh + d  # W_Q, W_O, W_K, W_V and biases
    mlp = (3 if tl_cfg.gated_mlp else 2) * d * m + m + d
    norm = {"LN": 2 * d, "RMS": d}.get(tl_cfg.normalization_type, 0)  # LN has a bias; LNPre and RMSPre nothing
    norms = (4 if tl_cfg.use_normalization_before_and_after else 2) * norm
    embedding = tl_cfg.d_vocab * d + (tl_cfg.n_ctx * d if tl_cfg.positional_embedding_type == "standard" else 0)
    blocks = tl_cfg.n_layers if n_layers is None else min(n_layers, tl_cfg.n_layers)
    return embedding + blocks * (attention + mlp + norms) + norm  # + the final norm


def weight_count(name, n_layers, arch=None):
    """Elements of model `name` that training keeps (its first n_layers blocks, the embedding), or
    None when its files do not say."""
    if is_gguf(name):
        from gguf import GGUFReader

        gguf_header(name)  # a clear error for a file it cannot read
        return sum(int(t.n_elements) for t in GGUFReader(str(name)).tensors if kept(t.name, n_layers))
    if is_local(name):
        files = sorted(Path(str(name)).glob("*.safetensors"))
        if not files:
            return None
        from safetensors import safe_open

        total = 0
        for file in files:
            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():
                    if kept(key, n_layers):
                        total += math.prod(f.get_slice(key).get_shape())
        return total
    from transformer_lens.loading_from_pretrained import get_pretrained_model_config

    return tl_weight_count(get_pretrained_model_config(arch or name), n_layers)


def pair_bytes(cfg):
    """Bytes the pair of cfg's models takes on cfg's device for training, in its model_dtype (a
    model listed twice, the null pair, is loaded once; None: not known)."""
    archs = list(cfg.get("model_archs") or [])
    n_layers = layers_needed(cfg["hook_point"])
    models = dict.fromkeys((name, archs[i] if i < len(archs) else None) for i, name in enumerate(cfg["model_names"]))
    counts = [weight_count(name, n_layers, arch) for name, arch in models]
    return None if None in counts else (2 if model_dtype(cfg) == torch.bfloat16 else FP32) * sum(counts)
