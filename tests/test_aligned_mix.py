"""sources/aligned_mix.py: a mix for models of different tokenizers holds every model's tokens of
the same text and the positions where both have read exactly that text."""
import json

import pytest
import torch

from crossdiff.sources.aligned_mix import PAIRS, build_aligned_mix, cut_rows
from crossdiff.sources.mix import ASSISTANT, ROLE, TEMPLATE, TOKENS, USER, DataError
from test_data import word_tokenizer, write_sources

WORDS = ("hello", "world", "how", "are", "you", "fine", "the", "cat", "sat")


def char_tokenizer(template=None):
    """A fast character-level tokenizer of the words' letters and the template's marker characters,
    with an EOS and no BOS (as SmolLM2's: it adds none)."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = sorted(set("".join(WORDS)) | set("<start_of_turn>end_of_turn>usermodel"))
    vocab = {c: i for i, c in enumerate(["<unk>", "<|end|>", *chars])}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                pre_tokenizers.Split(Regex("."), "isolated")])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", eos_token="<|end|>", name_or_path="chars")
    if template:
        tok.chat_template = template
    return tok


@pytest.fixture
def built(tmp_path):
    words, chars = word_tokenizer(), char_tokenizer()
    text, chat = write_sources(tmp_path)
    pairs, meta = build_aligned_mix([words, chars], [{"kind": "text", "path": text, "fraction": 0.5},
                                                     {"kind": "chat", "path": chat, "fraction": 0.5}],
                                    seq_len=24, num_tokens=24 * 12, out_dir=tmp_path / "mix", heldout_fraction=0.25)
    return words, chars, pairs, meta, tmp_path / "mix"


def test_every_aligned_pair_reads_the_same_word_in_both_models(built):
    words, chars, pairs, meta, mix = built
    tokens0, tokens1 = torch.load(mix / TOKENS), torch.load(mix / "tokens.1.pt")
    assert torch.equal(torch.load(mix / PAIRS), pairs) and pairs.shape == (12, 24, 2)
    checked = 0
    for r in range(len(pairs)):
        for i, j in pairs[r][pairs[r, :, 0] >= 0].tolist():
            word = words.convert_ids_to_tokens(int(tokens0[r, i]))
            spelled = "".join(chars.convert_ids_to_tokens(tokens1[r, j - len(word) + 1:j + 1].tolist()))
            assert spelled == word, (r, i, j)
            checked += 1
        # in text order, each position once
        kept = pairs[r][pairs[r, :, 0] >= 0]
        assert (kept[1:] > kept[:-1]).all()
    assert checked > 30


def test_the_template_markers_are_special_in_one_model_and_never_aligned(built):
    words, chars, pairs, meta, mix = built
    tokens0 = torch.load(mix / TOKENS)
    role = torch.load(mix / ROLE)
    marker = words.convert_tokens_to_ids("<start_of_turn>")
    aligned0 = torch.zeros_like(tokens0, dtype=torch.bool)
    for r in range(len(pairs)):
        aligned0[r, pairs[r][pairs[r, :, 0] >= 0][:, 0].long()] = True
    assert (tokens0 == marker).any() and not aligned0[tokens0 == marker].any()
    assert not aligned0[:, 0].any()  # the BOS aligns with nothing
    # roles are model 0's: its chat words in turns, the markers the template's
    assert (role[tokens0 == marker] == TEMPLATE).all()
    assert {USER, ASSISTANT} <= set(role[aligned0].tolist())
    assert meta["template"] == {"model": 0, "tokenizer": "tiny"}
    assert [m["file"] for m in meta["models"]] == [TOKENS, "tokens.1.pt"]
    assert meta["models"][1]["bos_token_id"] is None
    assert json.loads((mix / "meta.json").read_text())["alignment"] == meta["alignment"]


def test_the_alignment_rate_is_the_share_of_each_models_content_positions_paired(built):
    words, chars, pairs, meta, mix = built
    tokens = [torch.load(mix / TOKENS), torch.load(mix / "tokens.1.pt")]
    source = torch.load(mix / "source.pt")[:, 0]
    for index, record in enumerate(meta["alignment"]):
        rows = source == index
        n_pairs = int((pairs[rows][..., 0] >= 0).sum())
        for m, tok in enumerate((words, chars)):
            special = torch.tensor([t in tok.all_special_ids for t in range(len(tok))])
            content = int((~special[tokens[m][rows].long()]).sum())  # words (markers, BOS, EOS, padding: special)
            assert record["in_rows"][m] == pytest.approx(n_pairs / content)
    # a row of 23 words needs ~100 characters and the character model's row holds 24: most words
    # of model 0 find their characters cut off, and only a word's last character can align
    in0, in1 = meta["alignment"][0]["in_rows"]
    assert 0 < in0 < 0.5 and 0 < in1 < 0.5
    # over the whole text every word aligns (with its last character), and the characters that
    # fail are those inside words: one character per word aligns
    text = " ".join(json.loads(line)["text"] for line in (mix.parent / "text.jsonl").read_text().splitlines())
    words_all = text.split()
    assert meta["alignment"][0]["aligned_fraction"] == pytest.approx([1.0, len(words_all) / len("".join(words_all))])
    assert meta["alignment"][0]["unaligned_most"][0] == []  # no word of model 0 fails


def test_a_tokenizer_without_offsets_builds_the_same_mix_from_its_decoded_pieces(built, tmp_path):
    """The character tokenizer seen as a slow one (no offsets: its spans from its decoded pieces)
    builds the mix the fast one built: the same tokens, aligned positions and alignment record."""
    from test_align import SlowView

    words, chars, pairs, meta, mix = built
    text, chat = tmp_path / "text.jsonl", tmp_path / "chat.jsonl"
    slow_pairs, slow_meta = build_aligned_mix([words, SlowView(chars)], [{"kind": "text", "path": text, "fraction": 0.5},
                                                                         {"kind": "chat", "path": chat, "fraction": 0.5}],
                                              seq_len=24, num_tokens=24 * 12, out_dir=tmp_path / "slow", heldout_fraction=0.25)
    assert torch.equal(slow_pairs, pairs) and slow_meta["alignment"] == meta["alignment"]
    for name in (TOKENS, "tokens.1.pt"):
        assert torch.equal(torch.load(tmp_path / "slow" / name), torch.load(mix / name))


def test_rows_cut_every_other_model_at_the_text_model_0_covers():
    # model 0: tokens ending at characters 2, 4, 6, 8; model 1: 1, 2, ..., 8 (rows of body 2, no BOS)
    spans0 = [(0, 2), (2, 4), (4, 6), (6, 8)]
    spans1 = [(i, i + 1) for i in range(8)]
    assert cut_rows([spans0, spans1], 2, [None, None], None) == [[(0, 2), (0, 2)], [(2, 4), (4, 6)]]
    # with a BOS model 0's body is 1 token: rows end at characters 2, 4, 6, 8
    assert cut_rows([spans0, spans1], 2, [1, None], 2) == [[(0, 1), (0, 2)], [(1, 2), (2, 4)]]


def test_fractions_that_do_not_sum_to_one_are_refused(tmp_path):
    text, chat = write_sources(tmp_path)
    with pytest.raises(DataError, match="sum to 1"):
        build_aligned_mix([word_tokenizer(), char_tokenizer()], [{"kind": "text", "path": text, "fraction": 0.5}],
                          8, 80, tmp_path / "m")


def test_data_py_aligns_tokenizers_that_differ_and_packs_as_before_when_they_share_a_vocabulary(tmp_path, capsys):
    from data import main

    words, chars = word_tokenizer(), char_tokenizer()
    words.save_pretrained(tmp_path / "words")
    chars.save_pretrained(tmp_path / "chars")
    text, chat = write_sources(tmp_path)
    args = ["--text", str(text), "--chat", str(chat), "--seq_len", "24", "--num_tokens", str(24 * 12)]
    main(["--tokenizer", f"{tmp_path / 'words'},{tmp_path / 'chars'}", *args, "--out", str(tmp_path / "two")])
    assert "content positions aligned" in capsys.readouterr().out
    assert (tmp_path / "two" / PAIRS).is_file() and (tmp_path / "two" / "tokens.1.pt").is_file()
    main(["--tokenizer", f"{tmp_path / 'words'},{tmp_path / 'words'}", *args, "--out", str(tmp_path / "one")])
    assert not (tmp_path / "one" / PAIRS).exists()
    main(["--tokenizer", str(tmp_path / "words"), *args, "--out", str(tmp_path / "plain")])
    assert torch.equal(torch.load(tmp_path / "one" / TOKENS), torch.load(tmp_path / "plain" / TOKENS))


def test_a_mix_for_other_tokenizers_or_one_that_aligns_too_little_is_refused_before_models_load(built, tmp_path):
    from crossdiff.sources.aligned_mix import check_aligned_tokenizers

    words, chars, pairs, meta, mix = built
    words.save_pretrained(tmp_path / "words")
    chars.save_pretrained(tmp_path / "chars")
    ordered = [str(tmp_path / "words"), str(tmp_path / "chars")]
    check_aligned_tokenizers(mix, ordered, min_aligned=0.0)
    with pytest.raises(DataError, match=r"model 0\).*vocabularies differ"):
        check_aligned_tokenizers(mix, ordered[::-1])
    with pytest.raises(DataError, match="built for 2 tokenizers, but 3 models"):
        check_aligned_tokenizers(mix, ordered + ordered[:1])
    # a word's inner characters never align: the character model's rate is its words per character
    with pytest.raises(DataError, match=r"min_aligned_fraction 0.5\): (chat|text)\.jsonl: model 1 \d+\.\d%"):
        check_aligned_tokenizers(mix, ordered, min_aligned=0.5)
