"""footprint.py: the models' memory as training loads them, read from their files without loading
them, and the pre-flight check that counts it beside the buffer."""
import pytest
import torch

from crossdiff.config.plan import buffer_bytes
from crossdiff.config.schema import ConfigError, complete_cfg
from crossdiff.sources.footprint import pair_bytes, tl_weight_count, weight_count


@pytest.mark.parametrize("norm, positions, gated, kv_heads, both", [
    ("LN", "standard", False, None, False),  # GPT-2's layout
    ("RMS", "rotary", True, 2, True),  # Gemma-2's: grouped keys, norms before and after
    ("LNPre", "standard", False, None, False),
])
def test_the_count_from_a_config_equals_the_parameters_transformer_lens_builds(norm, positions, gated, kv_heads, both):
    """For three layouts, the first 3 of 5 blocks and the embedding, without the unembedding:
    the count equals the parameters of the HookedTransformer built from the same config."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig(d_model=64, d_head=16, n_heads=4, n_key_value_heads=kv_heads, d_mlp=96, d_vocab=300,
                                  n_layers=5, n_ctx=32, act_fn="gelu", normalization_type=norm,
                                  positional_embedding_type=positions, gated_mlp=gated,
                                  use_normalization_before_and_after=both, device="cpu")
    model = HookedTransformer(cfg)
    want = sum(p.numel() for name, p in model.named_parameters()
               if not name.startswith("unembed") and not (name.startswith("blocks.") and int(name.split(".")[1]) >= 3))
    assert tl_weight_count(cfg, 3) == want


def llama_dir(path, n_layers=4):
    from transformers import LlamaConfig, LlamaForCausalLM

    from crossdiff.pairs.toy import make_tokenizer

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(hidden_size=64, num_hidden_layers=n_layers, num_attention_heads=4, num_key_value_heads=2,
                                 intermediate_size=128, vocab_size=len(make_tokenizer()),
                                 max_position_embeddings=64)).save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return str(path)


def test_a_directory_counts_what_training_loads_of_it(tmp_path):
    """A transformers directory, hook blocks.2.hook_resid_pre: the count from its safetensors'
    headers is within 1 % of the parameters of the model load_pair builds for training (2 blocks,
    the embedding, no unembedding; TransformerLens adds zero biases the file does not hold)."""
    from crossdiff.sources.models import load_pair

    path = llama_dir(tmp_path / "m")
    (model,) = load_pair({"model_names": [path], "hook_point": "blocks.2.hook_resid_pre", "device": "cpu"})
    loaded = sum(p.numel() for p in model.parameters())
    assert abs(weight_count(path, 2) - loaded) < 0.01 * loaded
    assert weight_count(path, 4) > weight_count(path, 2)


def test_the_buffer_check_counts_the_models_the_run_will_load(tmp_path, monkeypatch):
    """With free memory enough for the buffer but not for the buffer and the pair's fp32 weights,
    train.py's pre-flight check refuses the run naming the models' share (it checked the buffer
    alone, before the models were on the device); from a store, which loads no models, it passes."""
    import train

    path, other = llama_dir(tmp_path / "m"), llama_dir(tmp_path / "n")
    cfg = complete_cfg({"model_names": [path, other], "hook_point": "blocks.2.hook_resid_pre", "d_in": 64,
                        "device": "cpu", "batch_size": 64, "buffer_mult": 4, "seq_len": 16})
    models = pair_bytes(cfg)
    assert models == 2 * 4 * weight_count(path, 2)
    assert pair_bytes(dict(cfg, model_names=[path, path])) == 4 * weight_count(path, 2)  # the null pair: loaded once
    assert pair_bytes(dict(cfg, model_dtype="bf16")) == 2 * 2 * weight_count(path, 2)
    monkeypatch.setattr("crossdiff.config.plan.available_bytes", lambda device: buffer_bytes(cfg) + models // 2)
    with pytest.raises(ConfigError, match=f"beside the models' {models / 2**30:.1f} GiB"):
        train.check_memory(cfg, None, None, 1)
    train.check_memory(dict(cfg, store_dir=str(tmp_path / "store")), None, None, 1)
