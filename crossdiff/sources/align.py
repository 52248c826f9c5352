"""Pairing the token positions of models with different tokenizers over one text, so that a
crosscoder can read model A's activation at position i beside model B's at position j (the DFC
paper, Jiralerspong & Bricken 2026, arXiv 2602.11729, App. B.1.6, Algorithm 1).

Two positions pair when both models have read exactly the same text through them: their tokens'
content ends at the same character. A token's content is its characters less surrounding
whitespace; a token with none (whitespace, an added BOS with an empty span) or a special token
(a template marker one tokenizer has as a single token and another spells in pieces) is no
content and pairs with nothing, though its text still counts (it moves the other model on).

Two ways, one result (tests/test_align.py checks they agree):
  - `align_offsets`: from each token's character span (fast tokenizers' offsets), a position's
    content end; the positions whose content ends appear in every model pair. Byte-fallback
    tokens of one character share its span: the last of them (the one that completes it) pairs.
  - `two_pointer`: the DFC paper's Algorithm 1 for two models, from each token's decoded text:
    grow the window whose text (whitespace removed) is shorter until both are equal, then
    pair the windows' last tokens. It stops where the texts cannot be made equal (an invalid
    byte piece): the paper's reported failures (smart quotes, emoji).
A tokenizer without offsets (a slow one) gets its spans from its decoded pieces
(`decoded_pieces`, `spans_from_pieces`): one pointer over its pieces and one over the text, as
two_pointer walks two tokenisations, so that any number of models take one path (align_offsets),
and tests/test_align.py checks it pairs as two_pointer does. A byte piece completes its character
when decoded as a stream, as with offsets.

Shape legend: P aligned positions, M models.
"""
import re

import torch

_SPACE = re.compile(r"\s+", re.UNICODE)


def content_ends(text, spans, special=None):
    """For each token of text: the character index just past its last non-whitespace character,
    or None where it has no content (no non-whitespace character, or special). spans: (start,
    end) characters per token; special: a bool per token (a template marker)."""
    out = []
    for n, (start, end) in enumerate(spans):
        piece = text[start:end]
        stripped = piece.rstrip()
        if (special is not None and special[n]) or not stripped.strip():
            out.append(None)
        else:
            out.append(start + len(stripped))
    return out


def align_ends(ends_per_model):
    """[P, M] long: the positions, one per model, whose content ends coincide in every model, in
    text order. ends_per_model: for each model, content_ends' list. Where several of a model's
    tokens end at one character (byte pieces of one character), the last one stands."""
    last = []
    for ends in ends_per_model:
        where = {}
        for position, end in enumerate(ends):
            if end is not None:
                where[end] = position
        last.append(where)
    common = sorted(set.intersection(*(set(w) for w in last)))
    if not common:
        return torch.zeros(0, len(last), dtype=torch.long)
    return torch.tensor([[w[end] for w in last] for end in common], dtype=torch.long)


def align_offsets(text, spans_per_model, special_per_model=None):
    """align_ends of each model's spans over text (fast tokenizers' offset mappings)."""
    special_per_model = special_per_model or [None] * len(spans_per_model)
    return align_ends([content_ends(text, s, sp) for s, sp in zip(spans_per_model, special_per_model)])


def two_pointer(pieces_a, pieces_b, content_a, content_b):
    """[P, 2] long: the DFC paper's Algorithm 1 over two tokenisations of one text. pieces: each
    token's decoded text ("" for a token that is not in the text, such as an added BOS); content:
    a bool per token (false for whitespace and special tokens, which are never paired but whose
    text still counts)."""
    norm_a = [_SPACE.sub("", p) for p in pieces_a]
    norm_b = [_SPACE.sub("", p) for p in pieces_b]
    pairs, i, j, window_a, window_b = [], 0, 0, "", ""
    last_a = last_b = None
    while True:
        if window_a and window_a == window_b:
            if content_a[last_a] and content_b[last_b] and norm_a[last_a] and norm_b[last_b]:
                pairs.append((last_a, last_b))
            window_a = window_b = ""
        if len(window_a) <= len(window_b):  # grow the shorter window (a first on a tie)
            if i == len(norm_a):
                break
            window_a, last_a, i = window_a + norm_a[i], i, i + 1
        else:
            if j == len(norm_b):
                break
            window_b, last_b, j = window_b + norm_b[j], j, j + 1
        if not (window_a.startswith(window_b) or window_b.startswith(window_a)):
            break  # the texts differ: no growth can make them equal
    return torch.tensor(pairs, dtype=torch.long).reshape(-1, 2)


def aligned_fraction(pairs_PM, content_per_model):
    """Per model: the fraction of its content positions that are aligned (1.0 with no content)."""
    out = []
    for content in content_per_model:
        total = sum(bool(c) for c in content)
        out.append(len(pairs_PM) / total if total else 1.0)
    return out


# ---------------------------------------------------------------- tokenizers without offsets
RESYNC = 64  # characters searched for the next piece after one that is not the text


def decoded_pieces(tokenizer, ids, window=32):
    """The text each token adds when ids are decoded as a stream: a token that ends inside a
    character (a byte piece: the stream decodes to U+FFFD there) adds "", the one that completes
    the character adds it. Decoded a window of at most `window` tokens at a time."""
    pieces, start, done = [], 0, ""
    for k in range(len(ids)):
        text = tokenizer.decode(ids[start:k + 1])
        if text.endswith("\ufffd") and k + 1 < len(ids):
            pieces.append("")
            continue
        pieces.append(text[len(done):] if text.startswith(done) else text)
        done = text
        if k + 1 - start >= window:  # a character boundary: the next window starts clean
            start, done = k + 1, ""
    return pieces


def _match(text, at, norm):
    """(first, end) of norm's characters matched in order against text's non-whitespace ones from
    at (whitespace skipped), or None where they differ."""
    first, i = None, at
    for c in norm:
        while i < len(text) and text[i].isspace():
            i += 1
        if i == len(text) or text[i] != c:
            return None
        first = i if first is None else first
        i += 1
    return first, i


def spans_from_pieces(text, pieces):
    """(spans, unmatched): (start, end) characters per token of text from the text each token adds,
    each piece's non-whitespace characters matched in order against the text's (a span from its
    first to its last matched character). A token of whitespace only gets an empty span where the
    match stands (it has no content). A piece that is not the text (an unknown token, a byte piece
    decoded to U+FFFD: the DFC paper's failures) is flagged unmatched, so it never pairs, and
    covers the text up to where the next piece matches (within RESYNC characters); with no match
    there, it and the text's remaining tokens get empty spans at its end."""
    spans, unmatched, at = [], [], 0
    for k, piece in enumerate(pieces):
        norm = _SPACE.sub("", piece)
        hit = _match(text, at, norm) if norm else (at, at)
        if hit is not None:
            spans.append(hit)
            unmatched.append(False)
            at = hit[1]
            continue
        following = next((n for n in (_SPACE.sub("", p) for p in pieces[k + 1:]) if n), None)
        resync = None if following is None else next(
            (q for q in range(at + 1, min(len(text), at + RESYNC) + 1) if _match(text, q, following)), None)
        if resync is None:
            rest = len(pieces) - k
            return spans + [(at, len(text))] + [(len(text), len(text))] * (rest - 1), unmatched + [True] * rest
        spans.append((at, resync))
        unmatched.append(True)
        at = resync
    return spans, unmatched


# ---------------------------------------------------------------- real tokenizers
def special_ids(tokenizer):
    """The ids of a tokenizer's special tokens: its named ones and every added token marked special
    (a GGUF's chat markers, such as Qwen's <|im_start|>, are only the latter)."""
    added = getattr(tokenizer, "added_tokens_decoder", None) or {}
    return set(tokenizer.all_special_ids) | {i for i, token in added.items() if getattr(token, "special", False)}


def tokens_of(tokenizer, text):
    """(ids, spans, special) of text as tokenizer reads it, no special tokens added: spans the
    (start, end) characters per token (a fast tokenizer's offsets, else spans_from_pieces of its
    decoded pieces), special a bool per token (a special token, or a piece that is not the text)."""
    special = special_ids(tokenizer)
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, spans = list(enc["input_ids"]), [tuple(s) for s in enc["offset_mapping"]]
        return ids, spans, [t in special for t in ids]
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    spans, unmatched = spans_from_pieces(text, decoded_pieces(tokenizer, ids))
    return ids, spans, [t in special or u for t, u in zip(ids, unmatched)]


def align_text(text, tokenizers):
    """(ids per model, [P, M] aligned positions) of one text read by each tokenizer."""
    read = [tokens_of(t, text) for t in tokenizers]
    return [r[0] for r in read], align_offsets(text, [r[1] for r in read], [r[2] for r in read])
