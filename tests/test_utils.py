
import datasets
import pytest
import torch

from crossdiff.config.presets import PILE_LMSYS_DATASET
from crossdiff.sources.mix import DataError
from utils import check_tokens, load_tokens


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


def test_dataset_conversion_peaks_near_the_int32_size_not_int64(tmp_path):
    """A 200 MB (int32) token column held as int64 by Arrow: converting it must add about the
    int32 result to the process's peak memory, not an int64 copy of the whole column on top
    (the reference's 1M-sequence dataset: 7.9 GB as int64). The peak is read from the kernel
    (VmHWM, reset just before the conversion)."""
    import subprocess
    import sys

    from conftest import REPO

    probe = (
        "import numpy as np, pyarrow as pa, datasets, gc, re, torch\n"
        "from utils import _dataset_to_tokens\n"
        "N, S = 100_000, 512\n"
        "values = pa.array(np.arange(N * S, dtype=np.int64) % 50_000)\n"
        "offsets = pa.array(np.arange(0, N * S + 1, S, dtype=np.int32))\n"
        "ds = datasets.Dataset(pa.table({'input_ids': pa.ListArray.from_arrays(offsets, values)}))\n"
        "del values, offsets; gc.collect()\n"
        "def kb(field): return int(re.search(field + r':\\s+(\\d+)', open('/proc/self/status').read()).group(1))\n"
        "open('/proc/self/clear_refs', 'w').write('5')\n"
        "before = kb('VmRSS')\n"
        "t = _dataset_to_tokens(ds, 'input_ids', 'probe').to(torch.int32)  # as load_tokens\n"
        "assert t.dtype == torch.int32 and t.shape == (N, S) and int(t[-1, -1]) == (N * S - 1) % 50_000\n"
        "print((kb('VmHWM') - before) / 1024)\n")
    out = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    added_mb, int32_mb = float(out.stdout.split()[-1]), 100_000 * 512 * 4 / 2**20
    assert added_mb < 1.4 * int32_mb, f"conversion added {added_mb:.0f} MB at its peak; the result is {int32_mb:.0f} MB"


def test_a_pt_dataset_is_memory_mapped_and_an_old_format_one_read_whole(tmp_path):
    """load_tokens maps a .pt token file instead of reading it: loading 100 MB adds under 10 MB
    of private memory (a plain torch.load adds the 100 MB; every rank of a run would hold its own
    copy), and its rows are the saved ones; a file in torch's pre-zip format loads whole, the same."""
    def private_mb():  # resident pages not backed by a file
        fields = dict(line.split(":", 1) for line in open("/proc/self/status") if line.startswith("RssAnon"))
        return int(fields["RssAnon"].split()[0]) / 1024

    saved = torch.arange(25_000_000, dtype=torch.int32).view(25_000, 1_000) % 50_000
    torch.save(saved, tmp_path / "t.pt")
    torch.save(saved[:10], tmp_path / "old.pt", _use_new_zipfile_serialization=False)
    saved = saved[[0, -1]].clone()  # (the rest freed)
    before = private_mb()
    tokens = load_tokens(tmp_path / "t.pt")
    assert private_mb() - before < 10
    assert tokens.shape == (25_000, 1_000) and torch.equal(tokens[[0, -1]], saved)
    assert torch.equal(load_tokens(tmp_path / "old.pt")[0], saved[0])


def test_check_heldout_refuses_rows_training_read():
    """The last n_heldout of n sequences are held out only if the run read fewer than n - n_heldout
    from the start; a wrapped run read them all."""
    from utils import check_heldout

    check_heldout(100, 20, 80)  # read 0..79: 80..99 held out
    with pytest.raises(DataError, match="training read 81\\. .*at most 19 here"):
        check_heldout(100, 20, 81)
    with pytest.raises(DataError, match="wrapped around"):
        check_heldout(100, 20, 150)


def test_a_token_mix_trains_on_its_train_split_and_is_refused_by_models_of_another_tokenizer(tmp_path):
    """load_tokens reads data.py's mix without its held-out rows; check_mix_tokenizer compares the
    mix's vocabulary with each model's tokenizer (a local directory here) before any model loads."""
    from test_data import word_tokenizer, write_sources

    from crossdiff.sources.mix import build_mix, check_mix_tokenizer

    tok = word_tokenizer()
    text, _ = write_sources(tmp_path)
    tokens, _, meta = build_mix(tok, [{"kind": "text", "path": text, "fraction": 1.0}], 8, 80, tmp_path / "mix",
                                heldout_fraction=0.2)
    torch.testing.assert_close(load_tokens(str(tmp_path / "mix")), tokens[:8])
    tok.save_pretrained(tmp_path / "same")
    word_tokenizer(words=("a", "b")).save_pretrained(tmp_path / "other")
    check_mix_tokenizer(tmp_path / "mix", [str(tmp_path / "same")] * 2)
    with pytest.raises(DataError, match="vocabularies differ"):
        check_mix_tokenizer(tmp_path / "mix", [str(tmp_path / "same"), str(tmp_path / "other")])




def test_a_truncated_pt_dataset_is_an_error_naming_it(tmp_path):
    """A .pt token file cut short is a DataError naming it (torch.load's RuntimeError named no file)."""
    path = tmp_path / "t.pt"
    torch.save(torch.randint(0, 100, (50, 7)), path)
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(DataError, match=f"{path}: cannot read it as a token tensor"):
        load_tokens(path)
