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
  - `two_pointer`: the DFC paper's Algorithm 1, from each token's decoded text when no offsets
    exist: grow the window whose text (whitespace removed) is shorter until both are equal, then
    pair the windows' last tokens. It stops where the texts cannot be made equal (an invalid
    byte piece): the paper's reported failures (smart quotes, emoji).

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


# ---------------------------------------------------------------- real tokenizers
def tokens_of(tokenizer, text):
    """(ids, spans, special, pieces) of text as tokenizer reads it, no special tokens added:
    spans the (start, end) characters per token (None from a tokenizer without offsets), special
    a bool per token, pieces the text each token covers (decoded, without offsets)."""
    special_ids = set(tokenizer.all_special_ids)
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, spans = list(enc["input_ids"]), [tuple(s) for s in enc["offset_mapping"]]
        pieces = [text[a:b] for a, b in spans]
    else:
        ids, spans = list(tokenizer(text, add_special_tokens=False)["input_ids"]), None
        pieces = [tokenizer.decode([t]) for t in ids]
    return ids, spans, [t in special_ids for t in ids], pieces


def align_text(text, tokenizers):
    """(ids per model, [P, M] aligned positions) of one text read by each tokenizer: by offsets
    when every tokenizer gives them, else (two models) by the DFC two-pointer algorithm."""
    read = [tokens_of(t, text) for t in tokenizers]
    ids = [r[0] for r in read]
    if all(r[1] is not None for r in read):
        return ids, align_offsets(text, [r[1] for r in read], [r[2] for r in read])
    if len(read) != 2:
        raise ValueError("aligning more than two tokenizers needs character offsets from each (fast tokenizers)")
    content = [[not s and bool(p.strip()) for s, p in zip(r[2], r[3])] for r in read]
    return ids, two_pointer(read[0][3], read[1][3], *content)
