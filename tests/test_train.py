"""train.py as users run it: a subprocess, a clean environment, no hub."""
import json

import pytest
import torch

from conftest import run_script, tiny_cfg
from crossdiff.config.schema import ConfigError
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
    """`--preset toy --lr -1` fails in the config check: neither TransformerLens nor transformers
    (the model code) is imported first, so the error comes in seconds, not after a build."""
    import subprocess
    import sys

    from conftest import REPO

    probe = ("import sys, train\n"
             "try:\n    train.cli(['--preset', 'toy', '--lr', '-1'])\n"
             "except SystemExit as e:\n    print('exit:', e.code)\n"
             "print('imported:', sorted(m for m in ('transformer_lens', 'transformers') if m in sys.modules))\n")
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


def test_resume_overrides_are_compared_with_the_saved_config_not_the_defaults(tmp_path):
    """A key typed with --resume is compared with the run's saved value: `--wrap_tokens false`
    undoes a saved true, and a key the run was trained with cannot be changed by typing the default
    (--dict_size 16384 on a 64-latent run is refused, not silently ignored)."""
    from crosscoder import CrossCoder

    cc = CrossCoder(tiny_cfg(tmp_path, preset="toy", wrap_tokens=True, dict_size=64))
    cc.save()
    version = str(cc.save_dir)
    cfg, extras = build_cfg(["--resume", version, "--wrap_tokens", "false"])
    assert cfg["wrap_tokens"] is False and extras["resume_overrides"] == {"wrap_tokens": False}
    assert build_cfg(["--resume", version])[0]["wrap_tokens"] is True
    with pytest.raises(ConfigError, match=r"cannot change dict_size \(64 -> 16384\)"):
        build_cfg(["--resume", version, "--dict_size", "16384"])
    assert build_cfg(["--resume", version, "--dict_size", "64"])[0]["dict_size"] == 64  # its own value: no change


def test_a_dataset_too_small_for_the_run_is_refused_before_any_model_loads(tmp_path, monkeypatch):
    """At the default 400M tokens a 50-sequence dataset is refused right after the tokens are read:
    the models (a download, on a real run) are never loaded."""
    import utils
    from crossdiff.config.plan import TokensExhausted

    def no_models(cfg):
        raise AssertionError("models loaded before the data check")

    monkeypatch.setattr(utils, "load_gemma_pair", no_models)
    torch.save(torch.randint(0, 1000, (50, 1024)), tmp_path / "tokens.pt")
    cfg, _ = build_cfg(["--dataset", str(tmp_path / "tokens.pt"), "--device", "cpu"])
    with pytest.raises(TokensExhausted, match=r"needs [\d,]+ sequences of 1024 tokens but the dataset has 50: the "
                                              r"buffer's first fill takes [\d,]+ \(batch_size 4096 x buffer_mult 128 "
                                              r"rows.*lower buffer_mult or num_tokens"):
        utils.load_models_and_tokens(cfg)


def test_an_unwritable_checkpoint_dir_is_refused_before_the_pair_is_built(tmp_path, monkeypatch):
    """--checkpoint_dir under a file (or any directory that takes no file) stops the run at once,
    naming the key and the reason, before the toy pair is built; a writable one is made."""
    import crossdiff.pairs.toy as toy
    import train

    def no_pair(*args, **kwargs):
        raise AssertionError("the pair was built before the checkpoint directory was checked")

    monkeypatch.setattr(toy, "build_toy_pair", no_pair)
    monkeypatch.setattr(train, "toy_report", no_pair)
    (tmp_path / "a_file").write_text("")
    with pytest.raises(SystemExit, match=r"config key 'checkpoint_dir': cannot write checkpoints into .*a_file/ckpt "
                                         r"\(NotADirectoryError"):
        train.cli(["--preset", "toy", "--checkpoint_dir", str(tmp_path / "a_file" / "ckpt"), "--progress", "false"])
    from crossdiff.io.checkpoint import check_checkpoint_dir

    assert check_checkpoint_dir({"checkpoint_dir": str(tmp_path / "new" / "dir")}).is_dir()


def test_nothing_the_pipeline_makes_lands_on_torchs_default_device(tmp_path):
    """Placement: the toy pair, the buffer, the crosscoder, the training step and the reports go
    to cfg["device"] (or to the CPU on purpose), never to torch's default device. The default is
    set to "meta" here (a tensor without data: any use of one with real tensors fails), so a
    missing device= anywhere in the toy run, a partitioned sparse BatchTopK run, the toy report and
    the analysis' measurements raises, as it would put a tensor on the CPU of a GPU run."""
    from crossdiff.config.cli import build_cfg
    from crossdiff.config.schema import DEFAULTS
    from crossdiff.diffing.dashboard import window_contributions
    from crossdiff.diffing.measures import latent_scaling, reconstruction_stats, splice_in_loss, top_activating_examples
    from crossdiff.pairs.toy import format_report, heldout_tokens, toy_report
    from trainer import Trainer
    from utils import load_models_and_tokens, prepare_models

    cfg, _ = build_cfg(["--preset", "toy", "--num_tokens", str(512 * 24), "--architecture", "batchtopk",
                        "--threshold_start_step", "8", "--exclusive_fraction", "0.05", "--sparse_step", "true",
                        "--checkpoint_dir", str(tmp_path / "ckpt"), "--data_dir", str(tmp_path / "data"),
                        "--progress", "false", "--wandb_mode", "disabled", "--device", "cpu"], dict(DEFAULTS))
    with torch.device("meta"):
        prepare_models(cfg)
        models, tokens = load_models_and_tokens(cfg)
        trainer = Trainer(cfg, models=models, tokens=tokens)
        log = trainer.train()
        cc = trainer.crosscoder.eval()
        report = format_report(toy_report(cc, models[0], models[1], cfg, n_seqs=64))
        held, is_chat = heldout_tokens(cfg, 16)
        stats = reconstruction_stats(cc, models, held, is_chat_N=is_chat)
        ce = splice_in_loss(cc, models, held[:4], progress=False)
        x_BMD = trainer.buffer.next()
        nu = latent_scaling(cc, [x_BMD], torch.arange(8, device="cpu"))
        values, seqs, positions = top_activating_examples(cc, models, held, torch.arange(8, device="cpu"), k=2)
        shares = window_contributions(cc, models, held, torch.arange(4, device="cpu"), seqs[:4, 0], positions[:4, 0])
    on = {t.device.type for m in models for t in m.state_dict().values()}
    on |= {t.device.type for t in cc.state_dict().values()} | {x_BMD.device.type, trainer.buffer.buffer.device.type}
    assert on == {"cpu"}
    assert torch.isfinite(torch.tensor([log["loss"], stats["explained_variance"], nu["nu_error"].nansum()])).all()
    assert "chat_only" in report and ce and shares.shape[0] == 4 and torch.isfinite(shares).all()
