"""sources/align.py: positions of two tokenisations of one text pair exactly where both have read
the same text (checked against a brute-force pairing by character offsets), and the DFC paper's
two-pointer algorithm gives the same pairs from decoded pieces alone."""
import random

import torch

from crossdiff.pairs.toy import make_tokenizer, plain_text
from crossdiff.sources.align import align_offsets, align_text, aligned_fraction, content_ends, two_pointer


def char_tokenizer(text):
    """A fast character-level tokenizer (offline) for the characters of text."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = sorted(set(text) - {" "})
    tk = Tokenizer(models.WordLevel(vocab={c: i for i, c in enumerate(["<unk>", *chars])}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                pre_tokenizers.Split(Regex("."), "isolated")])
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>")


def brute_force(text, spans_a, spans_b):
    """Every (i, j) whose tokens' last non-space characters are the same character of text, the
    last such token of each model where several are (checked pair by pair)."""
    def end(span):
        piece = text[span[0]:span[1]]
        return span[0] + len(piece.rstrip()) if piece.strip() else None

    pairs = {}
    for i, a in enumerate(spans_a):
        for j, b in enumerate(spans_b):
            if end(a) is not None and end(a) == end(b):
                pairs[end(a)] = (i, j)  # later i and j overwrite: the last token at that character
    return sorted(pairs.values())


def test_word_and_character_tokenizers_align_as_a_brute_force_pairing():
    rng = random.Random(0)
    text = " ".join(plain_text(rng, 60))
    words, chars = make_tokenizer(), char_tokenizer(text)
    ids, pairs = align_text(text, [words, chars])
    spans = [[tuple(s) for s in t(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]]
             for t in (words, chars)]
    assert pairs.tolist() == [list(p) for p in brute_force(text, *spans)]
    # each word pairs with its own last character, and every word is aligned
    assert len(pairs) == len(ids[0]) == len(text.split())
    assert [chars.convert_ids_to_tokens(ids[1][j]) for j in pairs[:, 1]] == [w[-1] for w in text.split()]
    assert aligned_fraction(pairs, [[True] * len(ids[0]), [True] * len(ids[1])])[0] == 1.0


def random_split(rng, text, specials=()):
    """Spans covering text: random cuts, whitespace runs sometimes their own tokens, and each
    special marker one token (flagged) or left to the cuts (not flagged)."""
    cuts = {0, len(text)} | {i for i in range(1, len(text)) if rng.random() < 0.35}
    whole = []
    for marker in specials:
        at = text.find(marker)
        while at >= 0:
            if rng.random() < 0.5:  # this tokenizer has the marker as one special token
                cuts = {c for c in cuts if not at < c < at + len(marker)} | {at, at + len(marker)}
                whole.append((at, at + len(marker)))
            at = text.find(marker, at + 1)
    cuts = sorted(cuts)
    spans = list(zip(cuts[:-1], cuts[1:]))
    return spans, [s in whole for s in spans]


def test_two_pointer_gives_the_offset_pairs_from_pieces_alone():
    rng = random.Random(1)
    for trial in range(200):
        words = [rng.choice(["the", "cat", "1989", "<sep>", "é", "a", "sat"]) for _ in range(rng.randint(1, 12))]
        text = "".join(w + rng.choice([" ", "", "  ", "\n"]) for w in words)
        (sa, spa), (sb, spb) = random_split(rng, text, ["<sep>"]), random_split(rng, text, ["<sep>"])
        by_offsets = align_offsets(text, [sa, sb], [spa, spb])
        pieces_a, pieces_b = [text[a:b] for a, b in sa], [text[a:b] for a, b in sb]
        content_a = [e is not None for e in content_ends(text, sa, spa)]
        content_b = [e is not None for e in content_ends(text, sb, spb)]
        assert two_pointer(pieces_a, pieces_b, content_a, content_b).tolist() == by_offsets.tolist(), (trial, text)


def test_the_papers_example_and_where_two_pointer_stops():
    # ['1989'] against ['198', '9'] pairs '1989' with '9' (the DFC paper, App. B.1.6)
    assert two_pointer(["1989"], ["198", "9"], [True], [True, True]).tolist() == [[0, 1]]
    # a piece that is not the text (a byte piece decoded to U+FFFD) ends the pairing there;
    # character offsets carry on past it
    a, b = ["a", " b", "\ufffd", " c"], ["a", " b", "x", " c"]
    assert two_pointer(a, b, [True] * 4, [True] * 4).tolist() == [[0, 0], [1, 1]]


def test_one_tokenizer_aligns_every_content_position():
    text = "<start_of_turn> the cat sat <end_of_turn> the"
    tok = make_tokenizer()
    ids, pairs = align_text(text, [tok, tok, tok])
    special = set(tok.all_special_ids)
    content = [n for n, t in enumerate(ids[0]) if t not in special]
    assert pairs.tolist() == [[n, n, n] for n in content]


def test_byte_pieces_of_one_character_pair_by_the_last():
    text = "a é"
    spans_a = [(0, 1), (1, 3)]  # "a", " é"
    spans_b = [(0, 1), (2, 3), (2, 3)]  # "a", then two byte pieces of "é", each given the character's span
    assert align_offsets(text, [spans_a, spans_b]).tolist() == [[0, 0], [1, 2]]
    assert align_offsets(text, [spans_a, spans_b]).dtype == torch.long


class SlowView:
    """A fast tokenizer seen as a slow one: the same tokens and decoding, no character offsets."""

    is_fast = False

    def __init__(self, fast):
        self._fast = fast

    def __getattr__(self, name):
        return getattr(self._fast, name)

    def __call__(self, text, **kw):
        kw.pop("return_offsets_mapping", None)
        return {"input_ids": self._fast(text, **kw)["input_ids"]}


def byte_level_tokenizer():
    """A small byte-level BPE (offline), whose accented letters and emoji are several byte tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    corpus = ["the cat sat on the mat", "a café for the cat", "hello world"] * 20
    tk.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tk)


def test_a_tokenizer_without_offsets_pairs_as_two_pointer_and_as_its_offsets_would():
    """spans_from_pieces over the pieces of 200 random tokenisations pairs exactly as their true
    spans do (and so as two_pointer); a byte-level tokenizer read without offsets, its pieces
    decoded as a stream (an emoji and accented letters in several byte tokens), pairs with a
    character tokenizer exactly as its offsets do."""
    from crossdiff.sources.align import decoded_pieces, spans_from_pieces

    rng = random.Random(2)
    for trial in range(200):
        words = [rng.choice(["the", "cat", "1989", "<sep>", "é", "a", "sat"]) for _ in range(rng.randint(1, 12))]
        text = "".join(w + rng.choice([" ", "", "  ", "\n"]) for w in words)
        (sa, spa), (sb, spb) = random_split(rng, text, ["<sep>"]), random_split(rng, text, ["<sep>"])
        recovered = [spans_from_pieces(text, [text[a:b] for a, b in spans]) for spans in (sa, sb)]
        assert not any(u for _, unmatched in recovered for u in unmatched)
        got = align_offsets(text, [r[0] for r in recovered], [spa, spb])
        assert got.tolist() == align_offsets(text, [sa, sb], [spa, spb]).tolist(), (trial, text)
    byte_level = byte_level_tokenizer()
    text = "the café 🎉 sat on the mat, naïve cat"
    ids = byte_level(text, add_special_tokens=False)["input_ids"]
    pieces = decoded_pieces(byte_level, ids)
    assert "".join(pieces) == text and len(ids) > len(text.split()) and "" in pieces  # byte pieces add ""
    chars = char_tokenizer(text)
    assert align_text(text, [SlowView(byte_level), chars])[1].tolist() == align_text(text, [byte_level, chars])[1].tolist()


def test_a_piece_that_is_not_the_text_never_pairs_and_the_next_one_resyncs():
    from crossdiff.sources.align import spans_from_pieces

    text = "the cat sat"
    spans, unmatched = spans_from_pieces(text, ["the", " <unk>", " sat"])
    assert spans == [(0, 3), (3, 7), (8, 11)] and unmatched == [False, True, False]  # " cat", read as <unk>
    spans, unmatched = spans_from_pieces(text, ["the", " dog"])  # nothing after it to resync on
    assert spans == [(0, 3), (3, 11)] and unmatched == [False, True]


def test_an_added_token_marked_special_is_special_though_not_a_named_one():
    """A chat marker a GGUF's tokenizer adds as special without naming it (Qwen's <|im_start|>)
    has no content: it pairs with nothing, while the same text split in pieces by another
    tokenizer is content that pairs with nothing either."""
    from tokenizers import AddedToken

    from crossdiff.sources.align import special_ids, tokens_of

    text = "<|im_start|>user the cat"
    marked = char_tokenizer(text)
    marked.add_tokens([AddedToken("<|im_start|>", special=True)])
    marker = marked.convert_tokens_to_ids("<|im_start|>")
    assert marker not in marked.all_special_ids and marker in special_ids(marked)
    ids, _, special = tokens_of(marked, text)
    assert ids[0] == marker and special[0] and not any(special[1:])
    assert 0 not in align_text(text, [marked, char_tokenizer(text)])[1][:, 0].tolist()
