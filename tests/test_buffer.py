import pytest
import torch

from buffer import ActivationStore, Buffer, make_batch_source
from conftest import assert_buffer_resumes_identically, random_tokens, tiny_cfg, tiny_model
from crossdiff.config.plan import TokensExhausted, sequences_needed
from crossdiff.sources.activations import extract_activations
from crossdiff.sources.store import harvest
from trainer import Trainer


def make_buffer(models, n_seqs=200, d_vocab=50, **kw):
    cfg = tiny_cfg(**kw)
    tokens = random_tokens(n_seqs, cfg["seq_len"], d_vocab=d_vocab)
    return Buffer(cfg, models[0], models[1], tokens), cfg, tokens


def test_batches_are_float32_with_the_right_shape(models):
    buf, cfg, _ = make_buffer(models)
    x = buf.next()
    assert x.shape == (cfg["batch_size"], 2, cfg["d_in"]) and x.dtype == torch.float32
    assert x.device.type == "cpu" and buf.buffer.dtype == torch.bfloat16


def test_mean_norm_after_normalisation_is_sqrt_d_in(models):
    buf, cfg, _ = make_buffer(models, norm_estimate_batches=10)
    rows = torch.cat([buf.next() for _ in range(20)])
    mean_norms = rows.norm(dim=-1).mean(0)
    assert torch.allclose(mean_norms, torch.full((2,), cfg["d_in"] ** 0.5), rtol=0.03)


def test_normalisation_factor_excludes_bos(models):
    buf, cfg, tokens = make_buffer(models, norm_estimate_batches=3)
    n = 3 * cfg["model_batch_size"]
    for m, model in enumerate(models):
        acts = extract_activations(model, tokens[:n], cfg["hook_point"])[:, 1:]
        expected = cfg["d_in"] ** 0.5 / acts.norm(dim=-1).mean()
        assert buf.normalisation_factor[m].item() == pytest.approx(expected.item(), rel=1e-5)


def test_bos_position_is_never_served(models):
    buf, cfg, tokens = make_buffer(models)
    bos_act = extract_activations(models[0], tokens[:1], cfg["hook_point"])[0, 0]
    bos_row = (bos_act.bfloat16().float() * buf.normalisation_factor[0])
    rows = torch.cat([buf.next() for _ in range(30)])[:, 0]
    assert (rows - bos_row).norm(dim=-1).min() > 1e-3
    # position 0 is where the BOS activation lives: check it really is distinctive
    other = extract_activations(models[0], tokens[:1], cfg["hook_point"])[0, 1]
    assert (bos_act - other).norm() > 1e-2


def test_every_refresh_reads_fresh_tokens():
    """The reference's bug: after the first fill every refresh read an empty slice, so
    training cycled over the first fill. Here distinct rows served ~= rows served."""
    models = tiny_model(1, d_vocab=1000, n_ctx=32), tiny_model(2, d_vocab=1000, n_ctx=32)
    buf, cfg, tokens = make_buffer(models, n_seqs=400, d_vocab=1000, seq_len=17, buffer_mult=4)
    n_batches = 60
    rows = torch.cat([buf.next() for _ in range(n_batches)])
    first_fill = buf.buffer_batches
    assert buf.token_pointer > 3 * first_fill  # several refreshes happened
    distinct = torch.unique(rows.flatten(1), dim=0).shape[0]
    assert distinct / rows.shape[0] >= 0.99
    # the token pointer matches the sequences actually run, and the formula used to check data size
    assert buf.token_pointer == buf.sequences_run == sequences_needed(cfg, n_batches)


def test_refresh_runs_the_next_sequences_in_order(models, monkeypatch):
    import buffer

    buf, cfg, tokens = make_buffer(models, n_seqs=400, buffer_mult=4)
    seen = []
    original = buffer.run_models
    monkeypatch.setattr(buffer, "run_models", lambda m, t, h, *a: (seen.append(t.clone()), original(m, t, h, *a))[1])
    start = buf.token_pointer
    buf.refresh()
    run = torch.cat(seen)
    assert torch.equal(run, tokens[start : start + buf.buffer_batches // 2])


def test_running_out_of_tokens_is_an_error_unless_wrapping(models):
    buf, cfg, tokens = make_buffer(models, n_seqs=40, buffer_mult=4)
    with pytest.raises(TokensExhausted, match="ran out of tokens"):
        for _ in range(100):
            buf.next()
    wrapping, _, _ = make_buffer(models, n_seqs=40, buffer_mult=4, wrap_tokens=True)
    for _ in range(100):
        assert torch.isfinite(wrapping.next()).all()
    assert wrapping.sequences_run > 40


def test_mismatched_d_in_is_a_clear_error():
    cfg = tiny_cfg()
    with pytest.raises(ValueError, match="disagree on d_in"):
        Buffer(cfg, tiny_model(0, d_model=32), tiny_model(1, d_model=16), random_tokens(50, 9))


def test_missing_hook_point_is_a_clear_error(models):
    cfg = tiny_cfg(hook_point="blocks.7.hook_resid_pre")
    with pytest.raises(ValueError, match=r"blocks.7.hook_resid_pre.*does not exist"):
        Buffer(cfg, models[0], models[1], random_tokens(50, 9))


def test_short_sequences_are_a_clear_error(models):
    with pytest.raises(ValueError, match="seq_len"):
        Buffer(tiny_cfg(seq_len=12), models[0], models[1], random_tokens(50, 9))


def test_three_models(models):
    cfg = tiny_cfg(n_models=3, model_names=["a", "b", "c"])
    buf = Buffer(cfg, [*models, tiny_model(3)], random_tokens(100, 9))
    assert buf.next().shape == (cfg["batch_size"], 3, cfg["d_in"])


def test_state_round_trip_continues_identically(models):
    cfg = tiny_cfg(buffer_mult=4)
    assert_buffer_resumes_identically(cfg, models, random_tokens(400, cfg["seq_len"]))


@pytest.mark.slow
def test_real_gemma2_conversion_path_through_the_buffer(tmp_path):
    """Gemma-2-2b width, 3 random layers, converted by TransformerLens's real Gemma-2 path."""
    import copy

    from conftest import gemma2_tiny_vocab

    hf, base = gemma2_tiny_vocab(tmp_path)
    assert base.cfg.d_model == 2304 and base.cfg.n_layers == 3
    tokens = random_tokens(24, 12, d_vocab=1000, bos=2)
    # resid_pre of block 2 is the HF hidden state after two layers
    with torch.no_grad():
        hf_hidden = hf(tokens[:2], output_hidden_states=True).hidden_states[2]
    assert torch.allclose(extract_activations(base, tokens[:2], "blocks.2.hook_resid_pre"), hf_hidden, atol=1e-4)
    chat = copy.deepcopy(base)
    with torch.no_grad():
        chat.blocks[1].mlp.W_out.mul_(1.5)
    cfg = tiny_cfg(d_in=2304, seq_len=12, batch_size=32, buffer_mult=8, model_batch_size=2,
                   hook_point="blocks.2.hook_resid_pre", norm_estimate_batches=2)
    buf = Buffer(cfg, base, chat, tokens)
    x = buf.next()
    assert x.shape == (32, 2, 2304) and torch.isfinite(x).all()
    assert not torch.allclose(x[:, 0], x[:, 1])
    assert torch.allclose(x.norm(dim=-1).mean(0), torch.full((2,), 2304 ** 0.5), rtol=0.1)


def test_saved_shuffling_state_is_a_cpu_generators_and_resumes_on_any_device(models, capsys):
    """The buffer shuffles with a CPU generator whatever the device, so a state saved on a GPU
    loads on a CPU (and back). A state from an earlier version, saved by a CUDA generator (16
    bytes: seed and offset), cannot be loaded into a CPU generator: the buffer reseeds and says
    so instead of crashing."""
    buf, cfg, tokens = make_buffer(models, n_seqs=400, buffer_mult=4)
    state = buf.state_dict()
    assert buf.generator.device.type == "cpu"
    assert state["generator"].shape == torch.Generator().get_state().shape
    fake_cuda = dict(state, generator=torch.zeros(16, dtype=torch.uint8))
    restored = Buffer(cfg, models[0], models[1], tokens, state=fake_cuda)
    assert "reseeding" in capsys.readouterr().out
    first = restored.next()
    torch.testing.assert_close(first, buf.next())  # the rows already shuffled are served as saved
    for _ in range(20):  # through a refresh with the new seed
        assert torch.isfinite(restored.next()).all()


def test_the_references_own_config_and_call_form_build_a_buffer(models):
    """Buffer(cfg, model_A, model_B, all_tokens) with exactly the reference's keys (the other keys
    take their defaults): it serves the batches a buffer over the completed config serves."""
    from conftest import reference_cfg
    from crossdiff.config.schema import complete_cfg

    cfg = reference_cfg()
    tokens = random_tokens(64, 9)
    want = Buffer(complete_cfg(cfg), models[0], models[1], tokens)
    got = Buffer(cfg, models[0], models[1], tokens)
    for _ in range(3):
        torch.testing.assert_close(got.next(), want.next())


def test_cpu_memory_available_is_memavailable_not_memfree():
    """MemAvailable (free memory plus the page cache the kernel can drop) is what an allocation can
    have; MemFree leaves the cache out. The parser reads MemAvailable from /proc/meminfo's text,
    and available_bytes('cpu') equals the value the kernel reports (read here independently)."""
    from crossdiff.config.plan import available_bytes, meminfo_available

    text = "MemTotal:       24000000 kB\nMemFree:         1000000 kB\nMemAvailable:   20000000 kB\n"
    assert meminfo_available(text) == 20_000_000 * 1024
    assert meminfo_available("MemTotal: 1 kB\n") is None
    with open("/proc/meminfo") as f:
        kernel = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    assert abs(available_bytes("cpu") - kernel) < 0.05 * kernel  # (memory moves a little between the reads)


# ---------------------------------------------------------------- sources.make_batch_source: a live buffer or a store, checked for enough sequences first
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


# ---------------------------------------------------------------- ActivationStore: a harvested store read back as the live buffer would serve it
def test_store_gives_back_exactly_the_harvested_rows(tmp_path, models):
    cfg = tiny_cfg(tmp_path)
    tokens = random_tokens(40, cfg["seq_len"])
    harvest(cfg, list(models), tokens, tmp_path / "store", 40)
    store = ActivationStore(cfg, tmp_path / "store")
    live = Buffer(cfg, models[0], models[1], tokens)
    x = torch.stack([extract_activations(m, tokens[:30], cfg["hook_point"])[:, 1:] for m in models], 2)
    expected = (x.flatten(0, 1) * live.normalisation_factor[:, None]).to(torch.bfloat16)
    assert torch.equal(store.rows(0, 30), expected)
    assert torch.equal(store.rows(7, 3), expected[7 * 8 : 10 * 8])
    assert store.normalisation_factor.tolist() == pytest.approx(live.normalisation_factor.tolist())
    assert torch.equal(torch.load(tmp_path / "store" / "tokens.pt"), tokens[:40])  # provenance


def test_a_store_for_another_config_is_refused(tmp_path, models):
    cfg = tiny_cfg(tmp_path)
    harvest(cfg, list(models), random_tokens(20, cfg["seq_len"]), tmp_path / "store", 20)
    with pytest.raises(ValueError, match="hook_point"):
        ActivationStore(tiny_cfg(tmp_path, hook_point="blocks.0.hook_resid_pre"), tmp_path / "store")
    with pytest.raises(FileNotFoundError, match="meta.json"):
        ActivationStore(cfg, tmp_path / "nowhere")


@pytest.mark.parametrize("key, value", [("model_names", ["c", "d"]), ("dataset", "another/dataset")])
def test_a_store_harvested_from_other_models_or_data_is_refused(tmp_path, models, key, value):
    """The store records which models and which data it was harvested from; a run of other models
    or data (same shapes and hook: nothing else would tell) is refused, naming the key."""
    from crossdiff.config.schema import ConfigError

    cfg = tiny_cfg(tmp_path)
    harvest(cfg, list(models), random_tokens(40, cfg["seq_len"]), tmp_path / "store", 40)
    ActivationStore(cfg, tmp_path / "store")  # the same config reads it
    with pytest.raises(ConfigError, match=f"config {key}=.* but the store at .* was harvested with"):
        ActivationStore(tiny_cfg(tmp_path, **{key: value}), tmp_path / "store")


def test_a_strided_reader_serves_the_rows_of_its_share_of_the_sequences(tmp_path, models):
    """ActivationStore(first_sequence=r, stride=w) -- data-parallel rank r of w -- serves, as its
    sequences 0, 1, 2, ..., the store's sequences r, r + w, r + 2w, ..., across shard boundaries."""
    cfg = tiny_cfg(tmp_path, batch_size=8)  # a buffer of 8 sequences: the share of 10 fills it
    harvest(cfg, list(models), random_tokens(30, cfg["seq_len"]), tmp_path / "store", 30, shard_sequences=4)
    whole = ActivationStore(cfg, tmp_path / "store")
    share = ActivationStore(cfg, tmp_path / "store", first_sequence=1, stride=3)
    assert share.n_sequences == 10  # sequences 1, 4, ..., 28
    R = cfg["seq_len"] - 1
    want = torch.cat([whole.rows(s, 1) for s in range(1, 30, 3)][2:7])
    assert torch.equal(share.rows(2, 5), want) and len(want) == 5 * R


def test_rebase_state_keeps_an_exact_one_process_resume_and_restarts_other_world_sizes_after_the_data_read():
    """Ranks read strided sequences, so a w-rank run at pointer p has used the first w * p of them
    (after any earlier offset): a resume with another world size, or without every rank's saved
    state, starts fresh buffers right there; the same world size with every state is exact."""
    from buffer import rebase_state

    buffer_state = {"buffer": torch.zeros(4), "token_pointer": 30, "sequences_run": 30, "pointer": 3}
    single = {"step": 9, "buffer": dict(buffer_state)}
    assert rebase_state(single, 1) == (single, 0)  # untouched: the exact resume
    double = dict(single, world_size=2, sequence_offset=8)
    assert rebase_state(double, 2) == (double, 8)  # every rank has its own state: exact too
    assert rebase_state(None, 2) == (None, 0)
    state, offset = rebase_state(dict(single, world_size=2, sequence_offset=8), 1)
    assert offset == 8 + 2 * 30 and "buffer" not in state["buffer"]
    assert state["buffer"]["token_pointer"] == 0 and state["buffer"]["pointer"] == 3 and state["step"] == 9
    state, offset = rebase_state(single, 2)  # a one-process run resumed by two
    assert offset == 30 and "buffer" not in state["buffer"]
    state, offset = rebase_state(double, 2, every_rank_saved=False)  # a rank's state is missing
    assert offset == 8 + 2 * 30 and "buffer" not in state["buffer"]


def test_models_of_different_tokenizers_widths_and_depths_train_from_aligned_rows(tmp_path):
    """A word-level model of width 32 and a character-level one of width 24, one layer deeper:
    the buffer serves their aligned positions, each model's mean norm scaled to sqrt of the mean
    width (28) and the narrower padded with zeros; a crosscoder trains on them and loads with
    its padding exactly zero."""
    from crosscoder import CrossCoder
    from test_activations import aligned_pair

    models, rows = aligned_pair(tmp_path)
    cfg = tiny_cfg(tmp_path, d_in=32, model_widths=[32, 24], pad_widths=True, seq_len=24, batch_size=32,
                   hook_point="blocks.1.hook_resid_pre", hook_points=["blocks.1.hook_resid_pre", "blocks.2.hook_resid_pre"],
                   norm_estimate_batches=8, num_tokens=32 * 30, buffer_mult=8, wrap_tokens=True)
    buf = Buffer(cfg, models, rows)
    served = torch.cat([buf.next() for _ in range(6)])
    assert served.shape[1:] == (2, 32) and served[:, 1, 24:].abs().max() == 0
    torch.testing.assert_close(served.norm(dim=-1).mean(0), torch.full((2,), 28 ** 0.5), rtol=0.1, atol=0)
    trainer = Trainer(cfg, buffer=Buffer(cfg, models, rows))
    losses = [float(trainer.step()["loss"]) for _ in range(30)]
    assert losses[-1] < losses[0]
    trainer.save()
    loaded = CrossCoder.load(trainer.crosscoder.save_dir)
    assert loaded.cfg["model_widths"] == [32, 24] and loaded.cfg["hook_points"][1] == "blocks.2.hook_resid_pre"
    assert loaded.W_dec[:, 1, 24:].abs().max() == 0 and loaded.W_enc[1, 24:].abs().max() == 0
