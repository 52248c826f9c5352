"""Token mixes for models that share no tokenizer: every document is rendered to text once, each
model's tokenizer reads that text, and each row records, beside every model's tokens, the positions
that align across the models (sources/align.py: the same text read through both).

    python data.py --tokenizer gemma.gguf,smollm2.gguf --text bible --chat chitchat ...

Conversations are rendered through one chat template, the chat model's (the last tokenizer that
has one; meta["template"] names it): a model whose tokenizer has the template's markers as
special tokens reads them as such, the others read them as plain text.

Rows are cut from model 0's token stream as in a one-tokenizer mix (sources/mix.py: documents
concatenated with EOS, each row starting with BOS where the tokenizer puts one). Row r covers
the text up to the end of model 0's last token in it; every other model's row holds its tokens
that end within that text, after the previous row's, cut at seq_len (what does not fit is dropped
and aligns nowhere) and padded with its EOS after. Only aligned positions are ever read.

Files, in the mix directory: tokens.pt, source.pt, role.pt and meta.json as a one-tokenizer mix
(model 0's tokens), tokens.<m>.pt for each other model m, and pairs.pt (int16 [N, S, M]: row r's
aligned positions, one per model, in text order, -1 after the last). meta["models"] holds every
tokenizer's record and BOS, meta["alignment"] each source's aligned fraction per model and the
tokens that most often fail to align.

Shape legend: N rows, S seq_len, M models, P aligned positions.
"""
import json
from collections import Counter
from pathlib import Path

import torch

from crossdiff.io.checkpoint import staging_dir, swap_in
from crossdiff.sources.align import align_ends, content_ends, special_ids, tokens_of
from crossdiff.sources.mix import (
    META,
    ROLE,
    ROLES,
    SOURCE,
    TEMPLATE,
    TEXT,
    TOKENS,
    DataError,
    _load_tensor,
    bos_for,
    check_mix_tokenizer,
    message_roles,
    read_documents,
    read_mix_meta,
    split_rows,
    tokenizer_record,
)

PAIRS = "pairs.pt"
ALIGNED_FILES = r"tokens(\.\d+)?\.pt|source\.pt|role\.pt|pairs\.pt|meta\.json"
WORST = 10  # unaligned token strings recorded per source and model


def model_tokens_file(m):
    return TOKENS if m == 0 else f"tokens.{m}.pt"


# ---------------------------------------------------------------- reading
def is_aligned(path):
    """A mix directory built for several tokenizers (meta.json lists its models)."""
    return (Path(str(path)) / META).is_file() and "models" in read_mix_meta(path)


def load_aligned_rows(path, split=None):
    """int32 [N, S, 2M]: row n's tokens of each model at [n, :, :M], its aligned positions at
    [n, :, M:] (-1 past the last): the one tensor training slices by rows as it slices tokens."""
    path = Path(str(path))
    meta = read_mix_meta(path)
    tokens = [_load_tensor(path / m["file"]) for m in meta["models"]]
    rows = torch.cat([torch.stack(tokens, -1), _load_tensor(path / PAIRS).to(torch.int32)], -1)
    return rows if split is None else rows[split_rows(meta, split)]


def split_aligned(rows_NSK, n_models):
    """(tokens [N, S, M], aligned positions [N, S, M]) of aligned rows."""
    return rows_NSK[..., :n_models], rows_NSK[..., n_models:]


def kept_tuples(pairs_NSM, first):
    """[N, S] bool: the aligned tuples training reads, those whose every position is >= first
    (ignore_first_n; -1 pads the rest)."""
    return (pairs_NSM >= first).all(-1)


def check_aligned_tokenizers(mix_dir, model_names, min_aligned=0.0):
    """A DataError, before any model loads, when a model's tokenizer is not the one the aligned
    mix holds its tokens for (its place in model_names), or when some source aligns less than
    min_aligned of a model's content positions (the message names the worst sources and the
    tokens that fail most there)."""
    meta = read_mix_meta(mix_dir)
    if len(meta["models"]) != len(model_names):
        raise DataError(f"the token mix {mix_dir} was built for {len(meta['models'])} tokenizers, but "
                        f"{len(model_names)} models are named")
    low = sorted((f, Path(a["source"]).name, m, a["unaligned_most"][m][:3]) for a in meta["alignment"]
                 for m, f in enumerate(a["aligned_fraction"]) if f < min_aligned)
    if low:
        worst = "; ".join(f"{source}: model {m} {f:.1%} (failing most: {', '.join(repr(p) for p, _ in top)})"
                          for f, source, m, top in low[:3])
        raise DataError(f"the token mix {mix_dir} aligns too few positions (min_aligned_fraction "
                        f"{min_aligned:g}): {worst}. Check that the tokenizers read the same text (the template "
                        "that rendered the conversations is meta.json's 'template'), or lower --min_aligned_fraction")
    check_mix_tokenizer(mix_dir, model_names, meta["models"])


def template_model(tokenizers):
    """The index of the tokenizer whose chat template renders the conversations: the last that has one."""
    with_template = [m for m, t in enumerate(tokenizers) if getattr(t, "chat_template", None)]
    return with_template[-1] if with_template else None


def render(doc, kind, tokenizer):
    """A document as the text every model reads: a text as it is, a conversation through
    tokenizer's chat template (without a BOS the template writes first: rows get their own)."""
    if kind == "text":
        return doc
    text = tokenizer.apply_chat_template(doc, tokenize=False)
    bos = tokenizer.bos_token
    return text[len(bos):] if bos and text.startswith(bos) and text.count(bos) == 1 else text


def token_stream(tokenizer, texts, starts):
    """One model's tokens of documents laid end to end (texts[i] at character starts[i] of their
    concatenation): (ids, spans in the concatenation, special, tokens per document), an EOS after
    each document (an empty span at its end, special) when the tokenizer has one. Spans are a fast
    tokenizer's offsets, else recovered from its decoded pieces (align.tokens_of)."""
    eos, special = tokenizer.eos_token_id, special_ids(tokenizer)
    if getattr(tokenizer, "is_fast", False):  # one batched call
        enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
        read = [(t, o, [i in special for i in t]) for t, o in zip(enc["input_ids"], enc["offset_mapping"])]
    else:
        read = [tokens_of(tokenizer, text) for text in texts]
    ids, spans, special, counts = [], [], [], []
    for start, text, (text_ids, offsets, text_special) in zip(starts, texts, read):
        ids.extend(text_ids)
        spans.extend((start + a, start + b) for a, b in offsets)
        special.extend(text_special)
        if eos is not None:
            ids.append(eos)
            spans.append((start + len(text), start + len(text)))
            special.append(True)
        counts.append(len(text_ids) + (eos is not None))
    return ids, spans, special, counts


def cut_rows(spans_per_model, seq_len, bos_ids, max_rows):
    """[(start, stop) token range per model] per row: model 0's stream cut into rows of its body,
    every other model's tokens that end within the text model 0's row covers (after the previous
    row's), at most its body. A tail that does not fill model 0's row is dropped."""
    bodies = [seq_len - (b is not None) for b in bos_ids]
    pointers, rows = [0] * len(spans_per_model), []
    n0 = len(spans_per_model[0])
    while pointers[0] + bodies[0] <= n0 and (max_rows is None or len(rows) < max_rows):
        row, stop0 = [(pointers[0], pointers[0] + bodies[0])], pointers[0] + bodies[0]
        covered = spans_per_model[0][stop0 - 1][1]  # the character model 0's row reads up to
        pointers[0] = stop0
        for m in range(1, len(spans_per_model)):
            spans, p = spans_per_model[m], pointers[m]
            q = p
            while q < len(spans) and spans[q][1] <= covered:
                q += 1
            row.append((p, min(q, p + bodies[m])))
            pointers[m] = q
        rows.append(row)
    return rows


def build_aligned_mix(tokenizers, sources, seq_len, num_tokens, out_dir, bos="auto", heldout_fraction=0.05, seed=0):
    """build_mix for models of different tokenizers (model 0's rows, every model's tokens, the
    aligned positions). Returns (pairs [N, S, M], meta)."""
    total = sum(s["fraction"] for s in sources)
    if not sources or abs(total - 1) > 1e-6 or any(s["fraction"] < 0 for s in sources):
        raise DataError(f"the sources' fractions must be >= 0 and sum to 1, got {[s['fraction'] for s in sources]}")
    M, n_rows = len(tokenizers), -(-num_tokens // seq_len)
    bos_ids = [bos_for(t, bos) for t in tokenizers]
    pads = [t.eos_token_id if t.eos_token_id is not None else (t.pad_token_id or 0) for t in tokenizers]
    chat_by = template_model(tokenizers)
    documents = [read_documents(s["path"], s["kind"], s.get("column")) for s in sources]
    if chat_by is None and any(s["kind"] == "chat" for s in sources):
        raise DataError("no tokenizer of these models has a chat template: chat data cannot be rendered")
    tokens = [[] for _ in range(M)]
    pairs_parts, source_parts, role_parts, records, alignment = [], [], [], [], []
    for index, (s, docs) in enumerate(zip(sources, documents)):
        want = round(s["fraction"] * n_rows)
        rows, record = aligned_source(tokenizers, docs, s["kind"], chat_by, seq_len, bos_ids, pads, want)
        if len(rows[0]) < want:
            raise DataError(f"{s['path']}: {len(docs):,} documents give {len(rows[0]):,} rows of {seq_len} tokens, "
                            f"{want:,} asked ({s['fraction']:.0%} of {num_tokens:,} tokens): add data or ask for fewer tokens")
        for m in range(M):
            tokens[m].append(rows[m])
        pairs_parts.append(rows[M])
        role_parts.append(rows[M + 1])
        source_parts.append(torch.full_like(rows[0], index, dtype=torch.uint8))
        records.append({"kind": s["kind"], "path": str(s["path"]), "column": s.get("column"), "fraction": s["fraction"],
                        "documents": len(docs), "rows": len(rows[0]), "tokens": rows[0].numel()})
        alignment.append({"source": str(s["path"]), **record})
    order = torch.randperm(sum(len(p) for p in pairs_parts), generator=torch.Generator().manual_seed(seed), device="cpu")
    tokens = [torch.cat(t)[order] for t in tokens]
    pairs, source, role = torch.cat(pairs_parts)[order], torch.cat(source_parts)[order], torch.cat(role_parts)[order]
    n = len(pairs)
    heldout_start = n - max(1, round(heldout_fraction * n)) if heldout_fraction > 0 else n
    records_t = [tokenizer_record(t) for t in tokenizers]
    meta = {"format": "crosscoder token mix 1", "tokenizer": records_t[0], "seq_len": seq_len, "bos": bos,
            "bos_token_id": bos_ids[0], "separator": "eos" if tokenizers[0].eos_token_id is not None else None,
            "sources": records, "rows": n, "roles": list(ROLES),
            "role_tokens": {name: int((role == i).sum()) for i, name in enumerate(ROLES)},
            "splits": {"train": [0, heldout_start], "heldout": [heldout_start, n]}, "seed": seed,
            "models": [dict(r, bos_token_id=b, pad_token_id=p, file=model_tokens_file(m))
                       for m, (r, b, p) in enumerate(zip(records_t, bos_ids, pads))],
            "template": None if chat_by is None else {"model": chat_by, "tokenizer": records_t[chat_by]["name"]},
            "alignment": alignment}
    work = staging_dir(out_dir, ALIGNED_FILES)
    for m in range(M):
        torch.save(tokens[m], work / model_tokens_file(m))
    torch.save(pairs, work / PAIRS)
    torch.save(source, work / SOURCE)
    torch.save(role, work / ROLE)
    (work / META).write_text(json.dumps(meta, indent=2))  # last: its presence marks the mix complete
    swap_in(work, out_dir)
    return pairs, meta


def aligned_source(tokenizers, docs, kind, chat_by, seq_len, bos_ids, pads, want):
    """One source's rows: ([tokens [n, S] per model, pairs [n, S, M], model 0's roles [n, S]],
    its alignment record, per model: the fraction of content positions that align over the whole
    text, the token strings that most often fail, and the fraction aligned within the rows (lower:
    a finer tokenizer's row cannot hold all the text model 0's row covers))."""
    M = len(tokenizers)
    docs = enough_documents(tokenizers[0], docs, kind, tokenizers[chat_by] if kind == "chat" else None,
                            want * (seq_len - (bos_ids[0] is not None)))
    texts = [render(d, kind, tokenizers[chat_by] if kind == "chat" else None) for d in docs]
    starts, at = [], 0
    for t in texts:
        starts.append(at)
        at += len(t)
    text = "".join(texts)
    streams = [token_stream(t, texts, starts) for t in tokenizers]
    ends = [content_ends(text, spans, special) for _, spans, special, _ in streams]
    aligned_PM = align_ends(ends)
    rows = cut_rows([spans for _, spans, _, _ in streams], seq_len, bos_ids, want)
    roles0 = stream_roles(kind, docs, texts, starts, streams[0][1], streams[0][3])
    n = len(rows)
    out = [torch.full((n, seq_len), pads[m], dtype=torch.int32, device="cpu") for m in range(M)]
    pairs = torch.full((n, seq_len, M), -1, dtype=torch.int16, device="cpu")
    role = torch.full((n, seq_len), TEMPLATE if kind == "chat" else TEXT, dtype=torch.uint8, device="cpu")
    first = [int(b is not None) for b in bos_ids]
    row_of = torch.full((len(streams[0][0]),), -1, dtype=torch.long, device="cpu")
    for r, row in enumerate(rows):
        for m, (p, q) in enumerate(row):
            if first[m]:
                out[m][r, 0] = bos_ids[m]
            out[m][r, first[m]:first[m] + q - p] = torch.tensor(streams[m][0][p:q], dtype=torch.int32, device="cpu")
        p0, q0 = row[0]
        role[r, first[0]:first[0] + q0 - p0] = torch.tensor(roles0[p0:q0], dtype=torch.uint8, device="cpu")
        row_of[p0:q0] = r
    # an aligned tuple belongs to model 0's row when every model's position lies in its part of that row
    counts = torch.zeros(n, dtype=torch.long, device="cpu")
    aligned_set = [set() for _ in range(M)]
    for tuple_M in aligned_PM.tolist():
        r = int(row_of[tuple_M[0]])
        if r < 0 or any(not rows[r][m][0] <= tuple_M[m] < rows[r][m][1] for m in range(M)):
            continue
        pairs[r, counts[r]] = torch.tensor([tuple_M[m] - rows[r][m][0] + first[m] for m in range(M)], dtype=torch.int16, device="cpu")
        counts[r] += 1
        for m in range(M):
            aligned_set[m].add(tuple_M[m])
    aligned_all = [set(aligned_PM[:, m].tolist()) for m in range(M)]
    record = {"aligned_fraction": [], "unaligned_most": [], "in_rows": []}
    for m, (_, spans, _, _) in enumerate(streams):
        content = [i for i in range(len(spans)) if ends[m][i] is not None]
        failed = Counter(text[spans[i][0]:spans[i][1]] for i in content if i not in aligned_all[m])
        in_rows = [i for r in rows for i in range(*r[m]) if ends[m][i] is not None]
        record["aligned_fraction"].append(len(aligned_all[m]) / max(1, len(content)))
        record["unaligned_most"].append([[piece, count] for piece, count in failed.most_common(WORST)])
        record["in_rows"].append(len(aligned_set[m]) / max(1, len(in_rows)))
    return out + [pairs, role], record


def enough_documents(tokenizer, docs, kind, template, tokens, batch=1024):
    """The first documents whose tokens (model 0's, an EOS each) fill `tokens`, a batch more for
    the other models' rows: the rest of a large source is never tokenised."""
    have = 0
    for start in range(0, len(docs), batch):
        texts = [render(d, kind, template) for d in docs[start:start + batch]]
        have += sum(len(ids) + 1 for ids in tokenizer(texts, add_special_tokens=False)["input_ids"])
        if have >= tokens:
            return docs[:start + 2 * batch]
    return docs


def stream_roles(kind, docs, texts, starts, spans, counts):
    """Each of model 0's tokens' role (ROLES index): TEXT in a text source; in a conversation,
    the message's whose content holds it (sources/mix.message_roles), else TEMPLATE (EOS too)."""
    if kind == "text":
        return [TEXT] * len(spans)
    roles, i = [], 0
    for doc, text, start, count in zip(docs, texts, starts, counts):
        roles.extend(message_roles(text, doc, [(a - start, b - start) for a, b in spans[i:i + count]]))
        i += count
    return roles


def format_alignment(meta, names=None):
    """What data.py prints of an aligned mix: per source and model (names: the models', else the
    tokenizers'), the share of content positions aligned, and the tokens that most often fail."""
    names = names or [m["name"] for m in meta["models"]]
    lines = [f"wrote an aligned mix of {meta['rows']:,} rows of {meta['seq_len']} tokens for {len(names)} tokenizers; "
             f"conversations rendered through {names[meta['template']['model']] if meta['template'] else 'no'} chat template",
             "content positions aligned over the text (in the rows), and the tokens that fail most:"]
    for record in meta["alignment"]:
        lines.append(f"  {record['source']}")
        for name, fraction, in_rows, worst in zip(names, record["aligned_fraction"], record["in_rows"],
                                                  record["unaligned_most"]):
            shown = ", ".join(f"{piece!r} x{count}" for piece, count in worst[:5])
            lines.append(f"    {name}: {fraction:.1%} ({in_rows:.1%}); unaligned most often: {shown or '-'}")
    return "\n".join(lines)
