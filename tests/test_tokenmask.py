import json

import pytest
import torch

from buffer import Buffer
from conftest import assert_buffer_resumes_identically, random_tokens, tiny_cfg
from crossdiff.config.schema import ConfigError, complete_cfg, effective
from crossdiff.sources.activations import extract_activations
from crossdiff.sources.tokenmask import PositionFilter, excluded_ids, keep_mask


def kept_rows(models, tokens, cfg, first, excluded=()):
    """The rows a buffer should hold, computed position by position: each sequence's positions
    from `first` on whose token is not excluded, in order."""
    rows = []
    acts = [extract_activations(m, tokens[:, : cfg["seq_len"]], cfg["hook_point"]) for m in models]
    for n in range(len(tokens)):
        for p in range(first, cfg["seq_len"]):
            if int(tokens[n, p]) not in excluded:
                rows.append(torch.stack([a[n, p] for a in acts]))
    return torch.stack(rows)


def same_rows(a, b):
    """a and b hold the same rows, in any order (the buffer shuffles; a row may repeat: short
    contexts repeat), equal within bf16's rounding: sorted by a random projection, they align."""
    a, b = a.flatten(1).double(), b.flatten(1).double()
    assert a.shape == b.shape
    v = torch.randn(a.shape[1], generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    torch.testing.assert_close(a[(a @ v).argsort()], b[(b @ v).argsort()], rtol=2e-2, atol=2e-2)


def test_keep_mask_leaves_out_the_excluded_tokens_and_the_outlier_norms():
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 6, (4, 9), generator=g)
    acts = torch.randn(4, 9, 2, 8, generator=g)
    acts[1, 3, 1] *= 40  # an outlier in model 1 only
    keep = keep_mask(tokens, acts, torch.tensor([2, 5]), outlier_multiple=3.0)
    norms = acts.norm(dim=-1)
    median = [sorted(norms[..., m].flatten().tolist())[(norms[..., m].numel() - 1) // 2] for m in range(2)]
    for n in range(4):
        for p in range(9):
            want = int(tokens[n, p]) not in (2, 5) and all(norms[n, p, m] <= 3.0 * median[m] for m in range(2))
            assert bool(keep[n, p]) == want
    assert not keep[1, 3]


def test_exclude_tokens_takes_ids_and_token_strings_read_with_the_tokenizer():
    from crossdiff.pairs.toy import make_tokenizer

    tok = make_tokenizer()
    ids = excluded_ids({"exclude_tokens": ["<start_of_turn>", "7", "<end_of_turn>"]}, tok)
    want = sorted({tok.convert_tokens_to_ids("<start_of_turn>"), 7, tok.convert_tokens_to_ids("<end_of_turn>")})
    assert ids.tolist() == want
    with pytest.raises(ConfigError, match="no token 'nonsense-token'"):
        excluded_ids({"exclude_tokens": ["nonsense-token"]}, tok)
    with pytest.raises(ConfigError, match="no tokenizer"):
        excluded_ids({"exclude_tokens": ["<start_of_turn>"]}, None)


@pytest.mark.parametrize("bos, want", [(2, 1), (None, 0)])
def test_ignore_first_n_defaults_to_dropping_the_bos_only_when_the_mix_rows_start_with_one(tmp_path, bos, want):
    (tmp_path / "meta.json").write_text(json.dumps({"bos_token_id": bos}))
    assert effective(complete_cfg({"dataset": str(tmp_path)}), "ignore_first_n") == want
    assert effective(complete_cfg({}), "ignore_first_n") == 1  # the reference's dataset: its BOS dropped
    assert effective(complete_cfg({"dataset": str(tmp_path), "ignore_first_n": 4}), "ignore_first_n") == 4


def test_ignore_first_n_drops_that_many_positions_of_every_row(models):
    cfg = tiny_cfg(ignore_first_n=3)
    tokens = random_tokens(200, cfg["seq_len"])
    buf = Buffer(cfg, models[0], models[1], tokens)
    n = buf.buffer_batches
    assert buf.buffer_size == n * (cfg["seq_len"] - 3)
    same_rows(buf.buffer, kept_rows(models, tokens[:n], cfg, first=3).bfloat16())


def test_excluded_tokens_never_reach_the_buffer_and_the_fill_reads_on_to_fill_it(models):
    cfg = tiny_cfg(exclude_tokens=["3", "4", "5"])
    tokens = random_tokens(200, cfg["seq_len"], d_vocab=8)  # ids 1..7: ~40% of the positions excluded
    buf = Buffer(cfg, models[0], models[1], tokens)
    assert buf.token_pointer > buf.buffer_batches  # more sequences than a full buffer's worth
    expected = kept_rows(models, tokens[: buf.token_pointer], cfg, first=1, excluded=(3, 4, 5)).bfloat16()
    same_rows(torch.cat([buf.buffer, buf.pending]), expected)  # what overflowed waits for the next refresh


def test_normalisation_factors_are_measured_on_the_kept_positions_only(models):
    cfg = tiny_cfg(exclude_tokens=["3", "4", "5"], norm_estimate_batches=2)
    tokens = random_tokens(200, cfg["seq_len"], d_vocab=8)
    buf = Buffer(cfg, models[0], models[1], tokens)
    rows = kept_rows(models, tokens[: 2 * cfg["model_batch_size"]], cfg, first=1, excluded=(3, 4, 5))
    torch.testing.assert_close(buf.normalisation_factor, cfg["d_in"] ** 0.5 / rows.norm(dim=-1).mean(0))


def test_a_buffer_with_excluded_positions_resumes_identically(models):
    cfg = tiny_cfg(exclude_tokens=["3", "4"], outlier_norm_multiple=1.5, buffer_mult=4)
    assert_buffer_resumes_identically(cfg, models, random_tokens(600, cfg["seq_len"], d_vocab=8))


def test_an_activation_store_refuses_exclusions_and_ignore_first_n_too_large_is_refused(models, tmp_path):
    """A store keeps every position: a harvest, and a run opening a finished store, with
    exclude_tokens or outlier_norm_multiple set are refused (each call site, not just the check)."""
    from buffer import ActivationStore
    from crossdiff.sources.store import harvest

    for excluding in ({"exclude_tokens": ["3"]}, {"outlier_norm_multiple": 2.0}):
        with pytest.raises(ConfigError, match="store keeps every position"):
            harvest(tiny_cfg(**excluding), list(models), random_tokens(20, 9), tmp_path / "refused", 20)
        assert not (tmp_path / "refused").exists()
    cfg = dict(tiny_cfg(), wrap_tokens=True)
    harvest(cfg, list(models), random_tokens(20, 9), tmp_path / "store", 20)
    ActivationStore(cfg, tmp_path / "store")
    with pytest.raises(ConfigError, match="store keeps every position"):
        ActivationStore(dict(cfg, exclude_tokens=["3"]), tmp_path / "store")
    with pytest.raises(ConfigError, match="leaves no position"):
        PositionFilter(tiny_cfg(ignore_first_n=9, seq_len=9))
