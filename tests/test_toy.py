import torch

from toy import PARTNER, VOCAB, make_tokenizer, make_tokens

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
    from toy import build_toy_pair, organism_report, toy_report

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
    genuine, artefact = report["chat_only_genuine"], report["chat_only_artefact"]
    assert genuine["count"] >= 3
    assert genuine["chat_mass_fraction"] >= 0.9
    assert artefact["chat_mass_fraction"] < 0.6
