import json
import threading

import pytest

from crossdiff.io.checkpoint import (
    atomic_write_text,
    complete_checkpoints,
    jsonable,
    latest_checkpoint,
    latest_version_dir,
    next_version_dir,
    resolve_version_dir,
)


def make_checkpoint(version_dir, k, with_cfg=True):
    version_dir.mkdir(parents=True, exist_ok=True)
    (version_dir / f"{k}.pt").write_bytes(b"w")
    if with_cfg:
        (version_dir / f"{k}_cfg.json").write_text("{}")


def test_a_checkpoint_counts_only_with_both_weights_and_cfg(tmp_path):
    v = tmp_path / "version_0"
    make_checkpoint(v, 0)
    make_checkpoint(v, 2)
    make_checkpoint(v, 3, with_cfg=False)  # killed before its cfg was written
    (v / "7_cfg.json").write_text("{}")  # a cfg without weights
    assert complete_checkpoints(v) == [0, 2]
    assert latest_checkpoint(v) == 2


def test_latest_version_dir_is_the_highest_number_with_a_complete_checkpoint(tmp_path):
    make_checkpoint(tmp_path / "version_2", 0)
    make_checkpoint(tmp_path / "version_10", 0)  # numeric, not lexicographic, order
    make_checkpoint(tmp_path / "version_11", 0, with_cfg=False)
    (tmp_path / "version_x").mkdir()
    assert latest_version_dir(tmp_path) == tmp_path / "version_10"
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        latest_version_dir(tmp_path / "empty")


def test_concurrent_runs_never_share_a_version_dir(tmp_path):
    cfg, made = {"checkpoint_dir": str(tmp_path)}, []
    threads = [threading.Thread(target=lambda: made.append(next_version_dir(cfg))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(made)) == 8 and all(p.is_dir() for p in made)


def test_resolve_version_dir_accepts_a_path_and_names_a_missing_one(tmp_path):
    (tmp_path / "version_4").mkdir()
    assert resolve_version_dir(tmp_path / "version_4") == tmp_path / "version_4"
    with pytest.raises(FileNotFoundError, match="version_99"):
        resolve_version_dir(tmp_path / "version_99")


def test_atomic_text_write_replaces_whole_files_and_cfg_is_json_safe(tmp_path):
    import torch

    path = tmp_path / "0_cfg.json"
    atomic_write_text(path, json.dumps(jsonable({"f": torch.tensor([1.5, 2.0]), "p": tmp_path})))
    assert json.loads(path.read_text()) == {"f": [1.5, 2.0], "p": str(tmp_path)}
    assert [p.name for p in tmp_path.iterdir()] == ["0_cfg.json"]  # no temporary file left


def test_a_checkpoint_records_how_many_sequences_its_run_read(tmp_path, models):
    """The saved config's sequences_read is the buffer's count of sequences read (refreshes and
    wraps included), and sequences_read() finds it; for a checkpoint of a run that predates the
    record, it comes from the trainer state's pointers."""
    from conftest import random_tokens, tiny_cfg
    from crossdiff.io.checkpoint import checkpoint_files, read_cfg, sequences_read
    from trainer import Trainer

    cfg = tiny_cfg(tmp_path, num_tokens=32 * 40, wrap_tokens=True)
    trainer = Trainer(cfg, models=list(models), tokens=random_tokens(20, 9))  # 20 sequences: it wraps
    trainer.train()
    version = trainer.crosscoder.save_dir
    read = trainer.buffer.sequences_run
    assert read > 20 and read_cfg(version)["sequences_read"] == read == sequences_read(version)
    path = checkpoint_files(version, 0).cfg
    saved = json.loads(path.read_text())
    del saved["sequences_read"]
    path.write_text(json.dumps(saved))
    assert sequences_read(version) == read


def zero_bytes(path, offset, n=65536):
    """Zero n bytes of a file at offset (a damaged disk block), keeping its length."""
    data = bytearray(path.read_bytes())
    n = min(n, len(data) - offset)
    data[offset : offset + n] = bytes(n)
    path.write_bytes(bytes(data))


def test_a_checkpoint_with_zeroed_bytes_is_refused_on_load_and_resume_naming_the_file(tmp_path):
    """Each checkpoint records its files' sha256 ({k}.sha256, the format `sha256sum -c` reads);
    weights with a zeroed block are refused by CrossCoder.load and Trainer.resume, naming the
    file, instead of training on silently zero weights; an intact one loads."""
    import torch

    from conftest import tiny_cfg
    from crosscoder import CrossCoder
    from crossdiff.io.checkpoint import CheckpointError
    from trainer import Trainer

    class Batches:
        def next(self):
            return torch.randn(32, 2, 32)

    cfg = tiny_cfg(tmp_path, d_in=32, dict_size=2048, num_tokens=32 * 3)
    trainer = Trainer(cfg, buffer=Batches())
    trainer.train()
    version = trainer.crosscoder.save_dir
    sums = (version / "0.sha256").read_text().split("\n")
    assert sums[0].split() == [__import__("hashlib").sha256((version / "0.pt").read_bytes()).hexdigest(), "0.pt"]
    CrossCoder.load(version)
    zero_bytes(version / "0.pt", 4096)
    with pytest.raises(CheckpointError, match=f"{version / '0.pt'}: its sha256 differs from the one recorded"):
        CrossCoder.load(version)
    with pytest.raises(CheckpointError, match="0.pt: its sha256 differs"):
        Trainer.resume(version, cfg, buffer=Batches())
    CrossCoder.load(version, verify=False)  # a reader may skip the check

