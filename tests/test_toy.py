import torch

from crossdiff.pairs.toy import PARTNER, VOCAB, make_tokenizer, make_tokens

IDS = {w: i for i, w in enumerate(VOCAB)}


def words(row):
    return [VOCAB[i] for i in row.tolist()]


def test_token_rows_start_with_bos_and_only_chat_rows_use_the_template():
    tokens, is_chat = make_tokens(200, 32, chat_fraction=0.5, seed=0)
    assert tokens.shape == (200, 32) and (tokens[:, 0] == IDS["<bos>"]).all()
    has_template = (tokens == IDS["<start_of_turn>"]).any(1)
    assert torch.equal(has_template, is_chat) and 60 < int(is_chat.sum()) < 140


def test_assistant_turn_is_the_user_turn_with_every_word_swapped_for_its_partner():
    tokens, is_chat = make_tokens(50, 64, chat_fraction=1.0, seed=1)
    checked = 0
    for row in tokens:
        w = words(row)[1:]
        starts = [i for i, x in enumerate(w) if x == "<start_of_turn>"]
        for s_user, s_model in zip(starts[0::2], starts[1::2]):
            user = w[s_user + 2 : w.index("<end_of_turn>", s_user)]
            if "<end_of_turn>" not in w[s_model:]:
                continue  # the last turn may be cut by seq_len
            answer = w[s_model + 2 : w.index("<end_of_turn>", s_model)]
            assert w[s_user + 1] == "user" and w[s_model + 1] == "model"
            assert answer == [PARTNER.get(x, x) for x in user]
            checked += 1
    assert checked > 20
    assert all(PARTNER[PARTNER[x]] == x and PARTNER[x] != x for x in PARTNER)


def test_generation_is_deterministic_from_the_seed():
    a, _ = make_tokens(20, 16, 0.5, seed=3)
    b, _ = make_tokens(20, 16, 0.5, seed=3)
    c, _ = make_tokens(20, 16, 0.5, seed=4)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_tokenizer_round_trips_words_and_template_tokens(tmp_path):
    make_tokenizer().save_pretrained(tmp_path)
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast.from_pretrained(tmp_path)
    text = "<start_of_turn> user the big dog runs . <end_of_turn>"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids == [IDS[w] for w in text.split()]
    assert tok.convert_ids_to_tokens(ids) == text.split()


def test_toy_pair_differs_in_transcripts_and_the_crosscoder_finds_model_specific_modes(toy_run):
    """On the default toy run (fixed seed): the chat model keeps the base model's representation
    of plain text but not of transcripts, has learned the assistant behaviour, and the relative
    decoder norm histogram has a base-only and a chat-only mode."""
    import torch

    from crosscoder import CrossCoder
    from crossdiff.pairs.toy import build_toy_pair, organism_report, toy_report

    _, checkpoints, data = toy_run
    cc = CrossCoder.load(checkpoints / "version_0")
    base, chat, _, _ = build_toy_pair(dict(cc.cfg, data_dir=str(data)))
    organism = organism_report(base, chat, cc.cfg)
    assert organism["residual_difference_plain"] < 0.03
    assert organism["residual_difference_chat"] > 10 * organism["residual_difference_plain"]
    assert organism["answer_accuracy_chat"] > organism["answer_accuracy_base"] + 0.05
    report = toy_report(cc, base, chat, cc.cfg)
    hist = report["relative_norm_histogram"]
    assert hist[9] > 2 * hist[8] and hist[0] > 2 * hist[1]  # modes at 1 (chat-only) and 0 (base-only)
    assert report["chat_only"]["count"] >= 30 and report["shared"]["count"] > report["chat_only"]["count"]
    # base-only latents (the base model's response to a template it never saw) sit in transcripts
    assert report["base_only"]["chat_mass_fraction"] > report["shared"]["chat_mass_fraction"] + 0.05
    assert torch.isfinite(cc.relative_decoder_norm()).all()
    # Latent Scaling splits the chat-only latents: those the base model lacks fire almost only in
    # transcripts; the rest (the base model has their direction: L1 artefacts) do not. Measured at
    # this seed: 7 genuine at 99.8% of their mass in transcripts, 63 artefacts at 29.1%.
    genuine, artefact = report["chat_specific"], report["chat_only_artefact"]
    assert genuine["count"] >= 3
    assert genuine["chat_mass_fraction"] >= 0.9
    assert artefact["chat_mass_fraction"] < 0.6


def fake_toy_cache(cfg):
    """A toy pair cache for cfg with untrained weights (the real build trains for minutes): what
    build_toy_pair finds once the pair was built, by this host or another."""
    from transformer_lens import HookedTransformer

    from crossdiff.pairs.toy import cache_dir, toy_model_cfg

    d = cache_dir(cfg)
    d.mkdir(parents=True)
    make_tokenizer().save_pretrained(d / "tokenizer")
    for i, name in enumerate(("base", "chat")):
        model = HookedTransformer(toy_model_cfg(i, cfg["d_in"], cfg["seq_len"], device="cpu"))
        torch.save(model.state_dict(), d / f"{name}.pt")
    return d


def test_the_toy_pair_and_its_reports_follow_the_configured_device_on_a_gpu_host(tmp_path, monkeypatch):
    """On a host with a GPU, a toy run configured for the CPU keeps everything there: the pair's
    models are built on cfg["device"] (TransformerLens would put them on the GPU), and the
    organism and toy reports run on it. The GPU host is simulated by making
    torch.cuda.is_available() answer True: anything that still chose "cuda" would fail."""
    from crosscoder import CrossCoder
    from crossdiff.config.schema import complete_cfg
    from crossdiff.pairs.toy import build_toy_pair, organism_report, toy_report

    cfg = complete_cfg({"preset": "toy", "data_dir": str(tmp_path), "d_in": 32, "dict_size": 64, "seq_len": 12,
                        "num_tokens": 512 * 4})
    fake_toy_cache(cfg)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    base, chat, tokens, _ = build_toy_pair(cfg)
    for model in (base, chat):
        assert model.cfg.device == "cpu" and {p.device.type for p in model.parameters()} == {"cpu"}
    assert organism_report(base, chat, cfg, n_seqs=8)["answer_accuracy_base"] >= 0
    cc = CrossCoder(dict(cfg, normalisation_factor=[1.0, 1.0]))
    report = toy_report(cc, base, chat, dict(cfg, normalisation_factor=[1.0, 1.0]), n_seqs=16)
    assert report["tokens"] == 16 * 11 and sum(report["relative_norm_histogram"]) == 64


def test_the_toy_report_reads_the_crosscoder_in_eval_mode_and_leaves_its_mode(tmp_path):
    """BatchTopK: the report selects latents by the inference threshold (as analysis.py does after
    loading), not by the batch's top k (which under torchrun is a collective of every rank): the
    latents it counts dead are those that never pass the threshold on the held-out tokens,
    computed here independently. A crosscoder in training mode is put back in training mode."""
    from crosscoder import CrossCoder
    from crossdiff.config.schema import complete_cfg
    from crossdiff.diffing.measures import iter_paired_activations
    from crossdiff.pairs.toy import build_toy_pair, heldout_tokens, toy_report

    cfg = complete_cfg({"preset": "toy", "data_dir": str(tmp_path), "d_in": 32, "dict_size": 64, "seq_len": 12,
                        "num_tokens": 512 * 4, "architecture": "batchtopk", "k": 4, "threshold_start_step": 0},
                       validate=False)
    cfg["normalisation_factor"] = [1.0, 1.0]
    fake_toy_cache(cfg)
    base, chat, _, _ = build_toy_pair(cfg)
    cc = CrossCoder(cfg).train()
    tokens, _ = heldout_tokens(cfg, 16)
    x_BMD = torch.cat([x.flatten(0, 1) for _, x in iter_paired_activations([base, chat], tokens, cfg["hook_point"], 16)])
    with torch.no_grad():
        scores_BF = torch.relu(cc.encode(x_BMD, apply_relu=False)) * cc.decoder_norms().sum(-1)
        cc.threshold.fill_(float(scores_BF.quantile(0.995)))  # far fewer pass than k per token
        never_pass = int((~(scores_BF > cc.threshold).any(0)).sum())
        never_in_top_k = int((~(cc.encode(x_BMD) > 0).any(0)).sum())  # training mode: the batch's top k
    assert never_pass != never_in_top_k  # the two selections differ here
    report = toy_report(cc, base, chat, cfg, n_seqs=16)
    assert report["dead"] == never_pass
    assert cc.training


def test_the_toy_pair_has_its_own_seed():
    """The crosscoder's seed does not choose the pair (a seed sweep keeps the models); toy_seed,
    d_in and seq_len do."""
    from crossdiff.config.schema import complete_cfg
    from crossdiff.pairs.toy import cache_dir

    cfg = complete_cfg({"preset": "toy"})
    assert cache_dir(dict(cfg, seed=1)) == cache_dir(cfg)
    for key, value in (("toy_seed", 1), ("d_in", 32), ("seq_len", 16)):
        assert cache_dir(dict(cfg, **{key: value})) != cache_dir(cfg)


def test_the_default_pair_ships_with_the_repo_and_loads_without_training(tmp_path, monkeypatch):
    """--preset toy on an empty cache takes the pair in toy_pair/ (the same weights on every
    machine, no minutes of building): nothing is trained, and the models hold the shipped weights."""
    from crossdiff.config.schema import complete_cfg
    from crossdiff.pairs import toy

    def no_training(*args, **kwargs):
        raise AssertionError("the shipped pair was not used")

    monkeypatch.setattr(toy, "train_lm", no_training)
    cfg = complete_cfg({"preset": "toy", "data_dir": str(tmp_path), "num_tokens": 512 * 4})
    base, chat, _, _ = toy.build_toy_pair(cfg)
    shipped = toy.SHIPPED_DIR / toy.cache_dir(cfg).name
    for model, name in ((base, "base"), (chat, "chat")):
        for key, want in torch.load(shipped / f"{name}.pt", weights_only=True).items():
            torch.testing.assert_close(model.state_dict()[key], want, atol=0, rtol=0)


def test_without_a_shipped_pair_the_pair_is_built_from_the_base_and_cached(tmp_path, monkeypatch):
    """toy_prebuilt false builds the pair here (few steps in this test): the chat model starts as
    the base and is fine-tuned away from it; the cache then serves the same pair without training."""
    from crossdiff.config.schema import complete_cfg
    from crossdiff.pairs import toy

    monkeypatch.setattr(toy, "BASE_STEPS", 3)
    monkeypatch.setattr(toy, "CHAT_STEPS", 3)
    cfg = complete_cfg({"preset": "toy", "data_dir": str(tmp_path), "num_tokens": 512 * 4, "toy_prebuilt": False})
    base, chat, _, _ = toy.build_toy_pair(cfg)
    assert (toy.cache_dir(cfg) / "chat.pt").is_file()
    shipped = torch.load(toy.SHIPPED_DIR / toy.cache_dir(cfg).name / "base.pt", weights_only=True)
    assert not torch.equal(base.state_dict()["blocks.0.attn.W_Q"], shipped["blocks.0.attn.W_Q"])  # built here
    assert not torch.equal(base.state_dict()["blocks.0.attn.W_Q"], chat.state_dict()["blocks.0.attn.W_Q"])
    monkeypatch.setattr(toy, "train_lm", lambda *a, **k: (_ for _ in ()).throw(AssertionError("rebuilt")))
    again, _, _, _ = toy.build_toy_pair(cfg)
    torch.testing.assert_close(again.state_dict()["blocks.0.attn.W_Q"], base.state_dict()["blocks.0.attn.W_Q"])
