from pathlib import Path

import datasets
import pytest
import torch

from utils import PILE_LMSYS_DATASET, DataError, check_tokens, load_tokens


def save_dataset(path, rows, column="input_ids"):
    datasets.Dataset.from_dict({column: rows}).save_to_disk(str(path))
    return path


def test_local_dataset_in_the_reference_column_layout(tmp_path):
    rows = [[2, 5, 6, 7], [2, 8, 9, 10], [2, 11, 12, 13]]
    tokens = load_tokens(save_dataset(tmp_path / "ds", rows))
    assert tokens.dtype == torch.int32 and torch.equal(tokens, torch.tensor(rows, dtype=torch.int32))


def test_dataset_dict_uses_the_train_split(tmp_path):
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"input_ids": [[1, 2], [3, 4]]})})
    dd.save_to_disk(str(tmp_path / "dd"))
    assert load_tokens(tmp_path / "dd").shape == (2, 2)


def test_tensor_and_pt_file(tmp_path):
    t = torch.randint(0, 100, (5, 7))
    torch.save(t, tmp_path / "t.pt")
    assert torch.equal(load_tokens(t), t.int()) and torch.equal(load_tokens(tmp_path / "t.pt"), t.int())


def test_hub_dataset_is_read_from_its_cache_under_data_dir_without_network(tmp_path):
    t = torch.randint(0, 100, (4, 6), dtype=torch.int32)
    torch.save(t, tmp_path / (PILE_LMSYS_DATASET.replace("/", "__") + ".pt"))
    assert torch.equal(load_tokens(PILE_LMSYS_DATASET, {"data_dir": str(tmp_path)}), t)


def test_missing_column_is_named(tmp_path):
    with pytest.raises(DataError, match=r"no column 'input_ids'.*text"):
        load_tokens(save_dataset(tmp_path / "ds", [[1, 2]], column="text"))


def test_empty_dataset_is_an_error(tmp_path):
    with pytest.raises(DataError, match="empty"):
        load_tokens(save_dataset(tmp_path / "ds", []))


def test_ragged_rows_are_an_error(tmp_path):
    with pytest.raises(DataError, match="different lengths"):
        load_tokens(save_dataset(tmp_path / "ds", [[1, 2, 3], [1, 2]]))


def test_float_tokens_are_an_error():
    with pytest.raises(DataError, match="integers"):
        load_tokens(torch.rand(3, 4))


def test_check_tokens_vocab_and_length():
    t = torch.randint(0, 50, (4, 10))
    check_tokens(t, 10, 50)
    with pytest.raises(DataError, match="shorter than seq_len=12"):
        check_tokens(t, 12, 50)
    t[1, 3] = 50
    with pytest.raises(DataError, match=r"\[0, 50\).*50\]"):
        check_tokens(t, 10, 50)
    with pytest.raises(DataError, match="non-empty"):
        check_tokens(t[:0], 10, 50)


def test_keep_freed_memory_keeps_a_freed_large_block_resident(tmp_path):
    """Without it glibc unmaps a freed 256 MB tensor at once (resident memory drops back); with
    it the block stays in the heap for the next step to reuse without page faults."""
    import subprocess
    import sys

    probe = (
        "import sys, torch\n"
        "from utils import keep_freed_memory\n"
        "if sys.argv[1] == '1': assert keep_freed_memory()\n"
        "rss = lambda: int(open('/proc/self/statm').read().split()[1]) * 4096 / 2**20\n"
        "before = rss(); t = torch.ones(64 * 2**20); during = rss(); del t; after = rss()\n"
        "print(during - before, after - before)\n")
    grown = {}
    for flag in ("0", "1"):
        out = subprocess.run([sys.executable, "-c", probe, flag], capture_output=True, text=True,
                             cwd=Path(__file__).resolve().parents[1], timeout=120)
        assert out.returncode == 0, out.stderr
        grown[flag] = [float(v) for v in out.stdout.split()]
    assert grown["0"][0] > 200 and grown["0"][1] < 50  # default: returned to the OS
    assert grown["1"][0] > 200 and grown["1"][1] > 200  # kept
