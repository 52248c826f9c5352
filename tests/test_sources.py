"""sources.make_batch_source: a live buffer or a store, checked for enough sequences first."""
import pytest

from buffer import TokensExhausted, sequences_needed
from conftest import random_tokens, tiny_cfg
from sources import make_batch_source
from store import harvest
from trainer import Trainer


def test_too_few_tokens_is_an_error_before_training(tmp_path, models):
    cfg = tiny_cfg(tmp_path, num_tokens=32 * 1000)
    with pytest.raises(TokensExhausted, match="needs .* but the dataset has 100"):
        Trainer(cfg, models[0], models[1], random_tokens(100, 9))


def test_a_store_too_small_for_the_run_is_an_error_naming_it_before_any_row_is_read(tmp_path, models):
    """The check counts what the run reads (a fill, then half a buffer per refresh) against the
    store's sequences, and names the store; with enough sequences the store is what serves."""
    cfg = tiny_cfg(tmp_path, num_tokens=32 * 30, store_dir=str(tmp_path / "store"))
    need = sequences_needed(cfg, 30)
    harvest(cfg, list(models), random_tokens(need, 9), tmp_path / "store", need - 1)
    with pytest.raises(TokensExhausted, match=f"needs {need:,} .* the store at .*store has {need - 1:,}"):
        make_batch_source(cfg, cfg, None, None, None, 0, 30)
    harvest(cfg, list(models), random_tokens(need, 9), tmp_path / "store", need)
    source = make_batch_source(cfg, cfg, None, None, None, 0, 30)
    assert type(source).__name__ == "ActivationStore" and source.n_sequences == need
