import math

import pytest

from conftest import REPO
from crossdiff.config.plan import check_against_model
from crossdiff.config.schema import DEFAULTS as default_cfg
from crossdiff.config.schema import SCHEMA, ConfigError, validate_cfg


def test_default_config_is_valid_and_fully_described_by_the_schema():
    validate_cfg(default_cfg)
    assert set(default_cfg) == set(SCHEMA)


def test_reference_defaults():
    """The reference's default_cfg; d_in and hook_point are none until read from the default pair's
    config, which gives the reference's values."""
    from crossdiff.sources.models import resolve_model_keys

    expected = dict(seed=49, batch_size=4096, buffer_mult=128, lr=5e-5, num_tokens=400_000_000, l1_coeff=2,
                    beta1=0.9, beta2=0.999, d_in=2304, dict_size=2**14, seq_len=1024, enc_dtype="fp32",
                    model_batch_size=4, log_every=100, save_every=30000, dec_init_norm=0.08,
                    hook_point="blocks.14.hook_resid_pre")
    assert default_cfg["d_in"] is None and default_cfg["hook_point"] is None
    resolved = resolve_model_keys(dict(default_cfg, preset="gemma"))
    assert {k: resolved[k] for k in expected} == expected
    assert default_cfg["model_names"] == ["gemma-2-2b", "gemma-2-2b-it"]
    assert default_cfg["num_tokens"] // default_cfg["batch_size"] == 97_656


@pytest.mark.parametrize("key,value", [("dict_size", 0), ("batch_size", -4), ("lr", math.nan), ("lr", 0.0),
                                       ("enc_dtype", "fp8"), ("architecture", "topk"), ("seq_len", 1),
                                       ("beta2", 1.0), ("wandb_mode", "sometimes"), ("dict_size", 16.0),
                                       ("wrap_tokens", "yes"), ("n_models", 1), ("aux_k", 0), ("k_max", 2.5),
                                       ("b_dec_init", "median"), ("b_enc_init", "median"), ("recon_loss", "l2"), ("threshold_beta", 1.0)])
def test_invalid_values_name_the_key(key, value):
    with pytest.raises(ConfigError, match=f"'{key}'"):
        validate_cfg(dict(default_cfg, **{key: value}))


def test_a_batchtopk_run_too_short_to_estimate_its_threshold_is_an_error():
    """The authors start the threshold at step 1000: a 100-step run would end without one."""
    short = dict(default_cfg, architecture="batchtopk", num_tokens=100 * default_cfg["batch_size"])
    with pytest.raises(ConfigError, match="threshold_start_step=1000"):
        validate_cfg(short)
    validate_cfg(dict(short, threshold_start_step=50))


def test_data_read_more_than_once_needs_wrap_tokens_and_at_most_num_tokens():
    """data_tokens sizes the data below num_tokens only when training may wrap around it."""
    cfg = dict(default_cfg, num_tokens=1000, data_tokens=250)
    with pytest.raises(ConfigError, match="--wrap_tokens true"):
        validate_cfg(cfg)
    validate_cfg(dict(cfg, wrap_tokens=True))
    validate_cfg(dict(cfg, data_tokens=1000))  # the same size: nothing is read twice
    with pytest.raises(ConfigError, match="at most num_tokens"):
        validate_cfg(dict(cfg, data_tokens=2000, wrap_tokens=True))
    with pytest.raises(ConfigError, match="'data_tokens'"):
        validate_cfg(dict(cfg, data_tokens=2.5))


def test_model_names_must_match_n_models():
    with pytest.raises(ConfigError, match="model_names"):
        validate_cfg(dict(default_cfg, n_models=3))


def test_architecture_checks_use_the_models_config():
    from transformer_lens.loading_from_pretrained import get_pretrained_model_config

    gemma = get_pretrained_model_config("gemma-2-2b")  # known offline
    cfg = dict(default_cfg, d_in=2304, hook_point="blocks.14.hook_resid_pre")
    check_against_model(cfg, gemma)
    with pytest.raises(ConfigError, match="seq_len"):
        check_against_model(dict(cfg, seq_len=10_000), gemma)
    with pytest.raises(ConfigError, match="hook_point"):
        check_against_model(dict(cfg, hook_point="blocks.30.hook_resid_pre"), gemma)
    with pytest.raises(ConfigError, match="d_in"):
        check_against_model(dict(cfg, d_in=2048), gemma)


def test_config_table_imports_neither_torch_nor_the_repo_beyond_its_presets():
    import subprocess
    import sys

    probe = ("import sys, crossdiff.config.schema; print(sorted(m for m in sys.modules if m in ('torch', 'crosscoder', "
             "'buffer', 'utils') or m.startswith('crossdiff.') and m not in ('crossdiff.config', 'crossdiff.config.schema', 'crossdiff.config.presets')))")
    out = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr


def test_complete_cfg_fills_a_saved_config_from_the_defaults_and_its_preset():
    """An old toy checkpoint's config without the keys added since: they take the toy preset's
    values where it has them, else DEFAULTS'; its own values win. A toy run saved before toy_seed
    existed built its pair from its seed, so as a saved config (validate=False) it keeps that pair."""
    from crossdiff.config.presets import TOY_CFG
    from crossdiff.config.schema import DEFAULTS, complete_cfg

    old = {"preset": "toy", "dict_size": 256, "d_in": 64, "seed": 3}
    cfg = complete_cfg(old, validate=False)
    assert set(cfg) == set(DEFAULTS) | {"preset"}
    assert cfg["dict_size"] == 256 and cfg["batch_size"] == TOY_CFG["batch_size"]
    assert cfg["step_dtype"] == DEFAULTS["step_dtype"] and cfg["preset"] == "toy" and cfg["toy_seed"] == 3
    assert complete_cfg(dict(old, toy_seed=5), validate=False)["toy_seed"] == 5
    assert complete_cfg({"preset": "toy", "seed": 3})["toy_seed"] == DEFAULTS["toy_seed"]  # a new config
    assert complete_cfg({"dict_size": 8})["preset"] == "gemma"
    with pytest.raises(ConfigError, match="did you mean 'dict_size'"):
        complete_cfg({"dict_sise": 8})


def test_a_config_checked_at_the_entry_is_not_checked_again_by_the_constructors(monkeypatch, tmp_path):
    """complete_cfg (the entry) returns a Config; Trainer, its CrossCoder and its buffer take it as
    it is (no key is validated again), while a plain dict with the same bad value is refused by
    the same constructor: the check happens once, where the config enters."""
    import torch

    from conftest import tiny_cfg
    from crossdiff.config import schema
    from crossdiff.config.schema import Config, complete_cfg, completed
    from trainer import Trainer

    cfg = complete_cfg(tiny_cfg(tmp_path))
    assert isinstance(cfg, Config) and completed(cfg) is cfg
    calls = []
    real = schema.validate_cfg
    monkeypatch.setattr(schema, "validate_cfg", lambda *a, **k: calls.append(a) or real(*a, **k))

    class Batches:
        def next(self):
            return torch.randn(cfg["batch_size"], 2, cfg["d_in"])

    Trainer(cfg, buffer=Batches())
    assert calls == []
    plain = dict(cfg, lr=-1.0)
    with pytest.raises(ConfigError, match="'lr' must be a positive number"):
        Trainer(plain, buffer=Batches())
    assert len(calls) == 1
