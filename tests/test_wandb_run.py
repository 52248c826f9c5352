"""A run's Weights & Biases log (crossdiff/io/wandb_run.py), offline: credentials, modes, fallbacks."""
import pytest

from conftest import tiny_cfg
from crossdiff.io import wandb_run


@pytest.fixture
def no_credentials(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # netrc reads ~/.netrc
    monkeypatch.delenv("NETRC", raising=False)
    return tmp_path


def test_credentials_come_from_the_environment_or_netrc(no_credentials, monkeypatch):
    assert not wandb_run.has_credentials()
    netrc_file = no_credentials / ".netrc"
    netrc_file.write_text("machine api.wandb.ai\n  login user\n  password abc\n")
    netrc_file.chmod(0o600)
    assert wandb_run.has_credentials()
    netrc_file.unlink()
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert wandb_run.has_credentials()


def test_disabled_mode_starts_nothing_and_writes_nothing(tmp_path):
    assert wandb_run.start_run(tiny_cfg(wandb_mode="disabled", checkpoint_dir=str(tmp_path / "ck"))) is None
    assert not (tmp_path / "ck").exists()
    wandb_run.finish_run(None)  # finishing no run is a no-op


def test_a_failed_online_start_falls_back_to_offline(no_credentials, monkeypatch, capsys):
    import wandb

    modes = []

    def fake_init(mode, **kwargs):
        modes.append(mode)
        if mode == "online":
            raise ConnectionError("no network")
        return "offline run"

    monkeypatch.setattr(wandb, "init", fake_init)
    run = wandb_run.start_run(tiny_cfg(wandb_mode="online", checkpoint_dir=str(no_credentials / "ck")))
    assert run == "offline run" and modes == ["online", "offline"]
    assert "logging offline (online start failed: ConnectionError: no network)" in capsys.readouterr().out


def test_a_failed_offline_fallback_disables_logging_instead_of_stopping_training(no_credentials, monkeypatch, capsys):
    """Online fails, then the offline fallback fails too: start_run returns None (training goes
    on without wandb) and says why, instead of raising."""
    import wandb

    def fake_init(mode, **kwargs):
        raise ConnectionError("no network") if mode == "online" else PermissionError("read-only disk")

    monkeypatch.setattr(wandb, "init", fake_init)
    assert wandb_run.start_run(tiny_cfg(wandb_mode="online", checkpoint_dir=str(no_credentials / "ck"))) is None
    out = capsys.readouterr().out
    assert "wandb: disabled" in out and "read-only disk" in out


def test_an_offline_run_says_one_line(no_credentials, monkeypatch, capfd):
    """A real offline run, started, logged to and finished: wandb's banner and sync hints are
    silenced; the one line printed says where the run is and how to upload it."""
    monkeypatch.delenv("WANDB_SILENT", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    run = wandb_run.start_run(tiny_cfg(wandb_mode=None, checkpoint_dir=str(no_credentials / "ck")))
    try:
        run.log({"loss": 1.0}, step=0)
    finally:
        wandb_run.finish_run(run)
    captured = capfd.readouterr()
    lines = [line for line in (captured.out + captured.err).splitlines() if "wandb" in line.lower()]
    assert len(lines) == 1, lines
    assert "offline" in lines[0] and f"wandb sync {no_credentials / 'ck'}" in lines[0]


def test_no_mode_and_no_credentials_logs_offline(no_credentials, monkeypatch):
    import wandb

    modes = []
    monkeypatch.setattr(wandb, "init", lambda mode, **kwargs: modes.append(mode) or "run")
    assert wandb_run.start_run(tiny_cfg(wandb_mode=None, checkpoint_dir=str(no_credentials / "ck"))) == "run"
    assert modes == ["offline"]


def test_sweep_members_get_their_own_runs_in_one_group(tmp_path, monkeypatch):
    """Two members of one sweep, from one process: two distinct offline runs, both in the group
    named after the sweep, each named by its values."""
    monkeypatch.setenv("WANDB_SILENT", "true")
    runs = []
    try:
        for lr in (1e-3, 1e-2):
            cfg = tiny_cfg(wandb_mode="offline", checkpoint_dir=str(tmp_path), sweep_id="sweep_0", sweep={"lr": lr})
            runs.append(wandb_run.start_run(cfg))
        assert runs[0].id != runs[1].id
        assert [r.group for r in runs] == ["sweep_0", "sweep_0"] and runs[1].name == "lr=0.01"
    finally:
        for run in runs:
            wandb_run.finish_run(run)
