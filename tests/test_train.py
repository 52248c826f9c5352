"""train.py as users run it: a subprocess, a clean environment, no hub."""
import json

import pytest

from config import ConfigError
from conftest import run_script
from train import build_cfg, default_cfg


def run_train(*args, timeout=300):
    return run_script("train.py", *args, timeout=timeout)


def test_toy_preset_trains_and_saves_a_loadable_checkpoint(toy_run):
    out, checkpoints, _ = toy_run
    assert f"checkpoints in {checkpoints / 'version_0'}" in out.stdout
    assert "chat_only" in out.stdout  # the toy report is printed
    cfg = json.loads((checkpoints / "version_0" / "0_cfg.json").read_text())
    assert cfg["preset"] == "toy" and len(cfg["normalisation_factor"]) == 2
    from crosscoder import CrossCoder

    assert CrossCoder.load(checkpoints / "version_0").cfg["dict_size"] == cfg["dict_size"]


def test_gemma_without_gpu_fails_fast_and_points_to_the_toy_preset():
    out = run_train(timeout=120)
    assert out.returncode != 0
    assert "CUDA GPU" in out.stderr and "--preset toy" in out.stderr
    assert "Traceback" not in out.stderr


def test_unknown_key_on_the_command_line_exits_with_a_message():
    out = run_train("--dict_sise", "5", timeout=120)
    assert out.returncode != 0 and "unknown config key 'dict_sise'" in out.stderr and "dict_size" in out.stderr
    assert "Traceback" not in out.stderr


def test_presets_and_overrides_stack():
    cfg, extras = build_cfg(["--preset", "toy", "--dict_size", "128"])
    assert cfg["preset"] == "toy" and cfg["dict_size"] == 128 and extras == {"preset": "toy"}
    assert cfg["d_in"] != default_cfg["d_in"]  # the toy preset changed it
    cfg, _ = build_cfg([])
    assert cfg["preset"] == "gemma" and cfg["dict_size"] == 2**14
    with pytest.raises(ConfigError, match="preset"):
        build_cfg(["--preset", "llama"])


def test_resume_refuses_to_change_the_maths(toy_run):
    _, checkpoints, _ = toy_run
    with pytest.raises(ConfigError, match="dict_size"):
        build_cfg(["--resume", str(checkpoints / "version_0"), "--dict_size", "7"])
    cfg, extras = build_cfg(["--resume", str(checkpoints / "version_0"), "--log_every", "7"])
    resume = extras["resume"]
    assert cfg["log_every"] == 7 and cfg["preset"] == "toy" and resume == str(checkpoints / "version_0")


def test_help_prints_every_key_and_exits_0():
    out = run_train("--help", timeout=120)
    assert out.returncode == 0, out.stderr
    for key in default_cfg:
        assert f"--{key} " in out.stdout
    assert "(toy: 1024)" in out.stdout and "Traceback" not in out.stderr


def test_a_bad_value_is_refused_before_any_model_code_is_imported():
    """`--preset toy --lr -1` fails in the config check: neither toy.py (which builds models) nor
    TransformerLens is imported first, so the error comes in about a second, not after a build."""
    import subprocess
    import sys

    from conftest import REPO

    probe = ("import sys, train\n"
             "try:\n    train.cli(['--preset', 'toy', '--lr', '-1'])\n"
             "except SystemExit as e:\n    print('exit:', e.code)\n"
             "print('imported:', sorted(m for m in ('toy', 'transformer_lens') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert "exit: config error: config key 'lr' must be a positive number" in out.stdout, out.stdout + out.stderr
    assert "imported: []" in out.stdout


def test_the_gemma_path_trains_offline_on_local_model_copies(tmp_path, tiny_gemma_dirs):
    """`python train.py` (the Gemma preset, not the toy) on local copies of a tiny Gemma-2 pair and
    a .pt token tensor: the real loading path (only the blocks before the hook, no unembedding),
    the buffer and the trainer, ending in a loadable checkpoint."""
    import torch

    from conftest import random_tokens
    from crosscoder import CrossCoder

    paths, _ = tiny_gemma_dirs
    torch.save(random_tokens(64, 10, d_vocab=1000, bos=2), tmp_path / "tokens.pt")
    out = run_train("--model_names", ",".join(paths), "--device", "cpu", "--dataset", str(tmp_path / "tokens.pt"),
                    "--hook_point", "blocks.1.hook_resid_pre", "--seq_len", "10", "--dict_size", "64",
                    "--batch_size", "36", "--buffer_mult", "8", "--model_batch_size", "4", "--num_tokens", "360",
                    "--norm_estimate_batches", "2", "--checkpoint_dir", str(tmp_path / "ckpt"),
                    "--wandb_mode", "disabled", "--progress", "false", timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    cc = CrossCoder.load(tmp_path / "ckpt" / "version_0")
    assert cc.W_dec.shape == (64, 2, 2304) and len(cc.cfg["normalisation_factor"]) == 2


def test_complete_cfg_fills_a_saved_config_from_the_defaults_and_its_preset():
    """An old toy checkpoint's config without the keys added since: they take the toy preset's
    values where it has them, else default_cfg's; its own values win."""
    from train import TOY_CFG, complete_cfg

    old = {"preset": "toy", "dict_size": 256, "d_in": 64}
    cfg = complete_cfg(old)
    assert set(cfg) == set(default_cfg) | {"preset"}
    assert cfg["dict_size"] == 256 and cfg["batch_size"] == TOY_CFG["batch_size"]
    assert cfg["step_dtype"] == default_cfg["step_dtype"] and cfg["preset"] == "toy"
    assert complete_cfg({"dict_size": 8})["preset"] == "gemma"
