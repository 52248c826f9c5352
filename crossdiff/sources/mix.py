"""Token mixes for any model pair: pretraining text and chat conversations (each rendered through
the tokenizer's chat template), packed into rows of seq_len tokens and saved with a record of the
tokenizer and of each token's source, so that a mix built for one tokenizer is never read by
models of another.

    python data.py --tokenizer google/gemma-3-270m-it --text docs/ --chat chats.jsonl \
        --chat_fraction 0.5 --seq_len 1024 --num_tokens 20000000 --out data/mix

Inputs: a hub dataset id, a datasets save_to_disk directory, a .jsonl or .parquet file (a text or
messages column), a text file (one document), or a directory of text files (one each). A
conversation is a list of {"role", "content"} messages.

Packing: each source's documents are concatenated, each followed by the EOS token when the
tokenizer has one (the document separator), and cut into rows; a row starts with BOS when the
tokenizer has one (bos "auto"; "always" or "never" to choose), so that position 0 is BOS only then.
A row holds one source's tokens; rows of the sources are interleaved in a seeded order.

Output, in the --out directory: tokens.pt (int32 [N, seq_len]), source.pt (uint8 [N, seq_len]:
each token's source, an index into meta["sources"]), role.pt (uint8 [N, seq_len]: each token's
role, an index into meta["roles"]: text, or within a conversation the template's own tokens, a
user's, an assistant's or a system message's words) and meta.json: the tokenizer's name, its
vocabulary size and hash, BOS and EOS ids, the sources (kind, path, column, rows and tokens), the
fractions asked and got, seq_len, and the splits: rows [0, heldout_start) for training, the rest
held out for analysis.
"""
import hashlib
import json
from pathlib import Path

import torch

from crossdiff.sources.models import tokenizer_of
from crossdiff.io.checkpoint import load_mapped, staging_dir, swap_in

TOKENS, SOURCE, ROLE, META = "tokens.pt", "source.pt", "role.pt", "meta.json"
MIX_FILES = r"tokens\.pt|source\.pt|role\.pt|meta\.json"  # what a mix directory holds
# A token's role (role.pt): "unknown" for a chat token a tokenizer without character offsets
# cannot place (a slow tokenizer).
ROLES = ("text", "template", "user", "assistant", "system", "unknown")
TEXT, TEMPLATE, USER, ASSISTANT, SYSTEM, UNKNOWN = range(len(ROLES))
TEXT_SUFFIXES = (".txt", ".rst", ".md", ".text")
BOS_POLICIES = ("auto", "always", "never")


class DataError(ValueError):
    """Training tokens that are missing, malformed or do not fit the models."""


# ---------------------------------------------------------------- the tokenizer's identity
def vocab_hash(tokenizer):
    """sha256 of the tokenizer's vocabulary (token -> id, sorted): equal for the base and chat
    tokenizers of one family, different across families."""
    items = sorted(tokenizer.get_vocab().items())
    return hashlib.sha256(json.dumps(items, ensure_ascii=False).encode()).hexdigest()


def tokenizer_record(tokenizer):
    return {"name": getattr(tokenizer, "name_or_path", None), "vocab_size": len(tokenizer.get_vocab()),
            "vocab_hash": vocab_hash(tokenizer), "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id}


def check_tokenizer(meta, tokenizer, where="the token mix"):
    """A DataError when the mix was built with another vocabulary than tokenizer's."""
    built, here = meta["tokenizer"], tokenizer_record(tokenizer)
    if built["vocab_hash"] != here["vocab_hash"]:
        raise DataError(f"{where} was built with the tokenizer {built['name']!r} ({built['vocab_size']:,} tokens), "
                        f"but the models' tokenizer is {here['name']!r} ({here['vocab_size']:,} tokens): their "
                        f"vocabularies differ. Build a mix for these models: python data.py --tokenizer {here['name']} ...")


# ---------------------------------------------------------------- reading sources
def read_documents(path, kind, column=None, split="train"):
    """The documents of one source: strings (kind "text") or message lists (kind "chat")."""
    column = column or ("text" if kind == "text" else "messages")
    p = Path(str(path))
    if p.is_file() and p.suffix in TEXT_SUFFIXES or p.is_dir() and not _is_dataset_dir(p):
        if kind == "chat":
            raise DataError(f"{path}: chat data needs a {column!r} column (jsonl, parquet or a dataset), not plain text")
        files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in TEXT_SUFFIXES)
        if not files:
            raise DataError(f"{path}: no text files ({', '.join(TEXT_SUFFIXES)})")
        return [f.read_text(encoding="utf-8", errors="replace") for f in files]
    if p.is_file() and p.suffix == ".jsonl":
        rows, lines = _jsonl_rows(p)
        where = lambda i: f"{path}:{lines[i]}"  # noqa: E731 (a row's line)
        columns = set().union(*rows)
    else:
        import datasets

        if p.is_file() and p.suffix == ".parquet":
            rows = datasets.Dataset.from_parquet(str(p))
        elif p.is_dir():
            rows = datasets.load_from_disk(str(p))
        else:
            rows = datasets.load_dataset(str(path), split=split)
        if isinstance(rows, datasets.DatasetDict):
            rows = rows[split]
        columns, where = set(rows.column_names), lambda i: f"{path}, row {i}"
    hint = "chat data is a list of {role, content} messages" if kind == "chat" else "give --text_column"
    if column not in columns:
        raise DataError(f"{path}: no {column!r} column (columns: {sorted(columns)}); {hint}")
    docs = []
    for i, r in enumerate(rows):
        if column not in r:
            raise DataError(f"{where(i)}: no {column!r} (this row has {sorted(r)}); {hint}")
        d = r[column]
        if kind == "text" and not isinstance(d, str) or kind == "chat" and not _is_conversation(d):
            want = "strings" if kind == "text" else "lists of {role, content} messages (each content a string)"
            raise DataError(f"{where(i)}: column {column!r} must hold {want}, found {str(d)[:80]}")
        docs.append(d)
    return docs


def _jsonl_rows(p):
    """(the objects of a jsonl file, one a line, their line numbers): blank lines are skipped, a
    line that is not a JSON object is a DataError naming it."""
    rows, lines = [], []
    with open(p, encoding="utf-8") as f:
        for i, line in enumerate(f):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{p}:{i + 1}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(row, dict):
                raise DataError(f"{p}:{i + 1}: expected a JSON object, found {type(row).__name__}")
            rows.append(row)
            lines.append(i + 1)
    return rows, lines


def _is_conversation(d):
    return isinstance(d, list) and all(isinstance(m, dict) and {"role", "content"} <= set(m)
                                       and isinstance(m["content"], str) for m in d)


def _is_dataset_dir(p):
    return (p / "dataset_info.json").is_file() or (p / "dataset_dict.json").is_file() or (p / "state.json").is_file()


def alternate(turns):
    """[user, assistant, user, ...] messages from a list of utterances."""
    return [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(turns)]


# ---------------------------------------------------------------- tokenising and packing
def message_roles(text, messages, offsets):
    """Each token's role (ROLES index) in a conversation rendered as text through its template: a
    token that starts inside a message's content (found in order, stripped, as templates trim it)
    takes that message's role; the template's own tokens (markers, role names, separators) are
    TEMPLATE. offsets: each token's (start, end) characters in text."""
    spans, cursor = [], 0
    for m in messages:
        content = str(m.get("content") or "").strip()
        at = text.find(content, cursor) if content else -1
        if at >= 0:
            role = {"user": USER, "assistant": ASSISTANT, "model": ASSISTANT, "system": SYSTEM}.get(m.get("role"), UNKNOWN)
            spans.append((at, at + len(content), role))
            cursor = at + len(content)
    roles, i = [], 0
    for start, end in offsets:
        while i < len(spans) and spans[i][1] <= start:
            i += 1
        inside = i < len(spans) and spans[i][0] <= start < spans[i][1] and end > start
        roles.append(spans[i][2] if inside else TEMPLATE)
    return roles


def encode_documents(tokenizer, docs, kind, batch=1024, with_roles=False, bos_id="tokenizer"):
    """Token ids of each document, an iterator that tokenises `batch` documents at a time (the
    ids of a whole corpus as Python lists cost ~36 bytes a token): text as it is, conversations
    through the chat template. The BOS a template writes is dropped (the packer puts one at the
    start of each row: bos_id, by default the tokenizer's), unless the template writes that token
    again in the conversation: then it is a turn marker (SmolLM2's <|im_start|>) and stays. with_roles: (ids, roles) pairs, roles each token's ROLES index (None for
    text: all TEXT; UNKNOWN where the tokenizer gives no character offsets)."""
    if kind == "chat" and not getattr(tokenizer, "chat_template", None):
        raise DataError(f"the tokenizer {tokenizer.name_or_path!r} has no chat template: chat data cannot be "
                        "rendered (use the chat model's tokenizer, e.g. the -it / -Instruct one)")
    bos = tokenizer.bos_token_id if bos_id == "tokenizer" else bos_id

    def ids():
        for start in range(0, len(docs), batch):
            part = docs[start:start + batch]
            texts = [tokenizer.apply_chat_template(d, tokenize=False) for d in part] if kind == "chat" else part
            offsets = with_roles and kind == "chat" and getattr(tokenizer, "is_fast", False)
            enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=offsets)
            for n, x in enumerate(enc["input_ids"]):
                first = int(bos is not None and x[:1] == [bos] and x.count(bos) == 1)
                if bos is not None and x.count(bos) > 1 and bos_id != "tokenizer":
                    raise DataError(f"the tokenizer {tokenizer.name_or_path!r}'s BOS {tokenizer.bos_token!r} is its chat "
                                    "template's turn marker: rows starting with it would double a conversation's "
                                    "(use --bos auto, which gives such rows none)")
                if not with_roles:
                    yield x[first:]
                elif kind != "chat":
                    yield x[first:], None
                else:
                    roles = message_roles(texts[n], part[n], enc["offset_mapping"][n]) if offsets else [UNKNOWN] * len(x)
                    yield x[first:], roles[first:]
    return ids()


def pack(docs_ids, seq_len, bos_id=None, eos_id=None, max_rows=None, chunk_tokens=1 << 20):
    """Rows [n, seq_len] of one source: the documents concatenated, each followed by eos_id (when
    given), cut into rows that each start with bos_id (when given). The tail that does not fill
    a row is dropped. The stream is kept as int32 chunks of chunk_tokens, and reading stops once
    max_rows are filled: memory is ~4 bytes a token kept."""
    return pack_roles(((ids, None) for ids in docs_ids), seq_len, bos_id, eos_id, max_rows, chunk_tokens)[0]


def pack_roles(docs, seq_len, bos_id=None, eos_id=None, max_rows=None, chunk_tokens=1 << 20, bos_role=TEXT):
    """pack, with each token's role packed beside it: docs yields (ids, roles), roles a list of
    ROLES indices or None (text: TEXT). A conversation's EOS is TEMPLATE, a text's TEXT; each
    row's BOS is bos_role. Returns (rows int32 [n, seq_len], roles uint8 [n, seq_len])."""
    body = seq_len - (bos_id is not None)
    limit = None if max_rows is None else max_rows * body
    chunks, role_chunks, pending, pending_roles, n_tokens = [], [], [], [], 0
    for ids, roles in docs:
        pending.extend(ids)
        pending_roles.extend([TEXT] * len(ids) if roles is None else roles)
        if eos_id is not None:
            pending.append(eos_id)
            pending_roles.append(TEXT if roles is None else TEMPLATE)
        if len(pending) >= chunk_tokens or limit is not None and n_tokens + len(pending) >= limit:
            chunks.append(torch.tensor(pending, dtype=torch.int32))
            role_chunks.append(torch.tensor(pending_roles, dtype=torch.uint8))
            n_tokens += len(pending)
            pending, pending_roles = [], []
            if limit is not None and n_tokens >= limit:
                break
    chunks.append(torch.tensor(pending, dtype=torch.int32))
    role_chunks.append(torch.tensor(pending_roles, dtype=torch.uint8))
    stream, role_stream = torch.cat(chunks), torch.cat(role_chunks)
    n = len(stream) // body if limit is None else min(len(stream) // body, max_rows)
    rows, roles = stream[: n * body].view(n, body), role_stream[: n * body].view(n, body)
    if bos_id is not None:
        rows = torch.cat([torch.full((n, 1), bos_id, dtype=torch.int32), rows], dim=1)
        roles = torch.cat([torch.full((n, 1), bos_role, dtype=torch.uint8), roles], dim=1)
    return rows, roles


def bos_for(tokenizer, policy="auto"):
    """The BOS id each row starts with, or None. "auto": the tokenizer's BOS when it puts one
    before text itself (Gemma's <bos>), none when it has a BOS token it never adds (SmolLM2's
    <|im_start|>, a turn marker: rows starting with it would double the template's)."""
    if policy not in BOS_POLICIES:
        raise DataError(f"bos must be one of {list(BOS_POLICIES)}, got {policy!r}")
    if policy == "never":
        return None
    if tokenizer.bos_token_id is None:
        if policy == "always":
            raise DataError(f"the tokenizer {tokenizer.name_or_path!r} has no BOS token (bos 'always')")
        return None
    if policy == "auto" and tokenizer("a", add_special_tokens=True)["input_ids"][:1] != [tokenizer.bos_token_id]:
        return None
    return tokenizer.bos_token_id


def build_mix(tokenizer, sources, seq_len, num_tokens, out_dir, bos="auto", heldout_fraction=0.05, seed=0):
    """Build and save a mix. sources: dicts {kind: "text" | "chat", path, column (optional),
    fraction}; the fractions (of rows) sum to 1. Returns (tokens [N, S], source [N, S], meta)."""
    total = sum(s["fraction"] for s in sources)
    if not sources or abs(total - 1) > 1e-6 or any(s["fraction"] < 0 for s in sources):
        raise DataError(f"the sources' fractions must be >= 0 and sum to 1, got {[s['fraction'] for s in sources]}")
    if seq_len < 2:
        raise DataError(f"seq_len must be >= 2, got {seq_len}")
    bos_id, n_rows = bos_for(tokenizer, bos), -(-num_tokens // seq_len)
    parts, role_parts, records = [], [], []
    # Every source is read and checked before any is tokenised (as it is packed).
    documents = [read_documents(s["path"], s["kind"], s.get("column")) for s in sources]
    for s, docs in zip(sources, documents):
        want = round(s["fraction"] * n_rows)
        ids = encode_documents(tokenizer, docs, s["kind"], with_roles=True, bos_id=bos_id)
        rows, roles = pack_roles(ids, seq_len, bos_id, tokenizer.eos_token_id, want,
                                 bos_role=TEMPLATE if s["kind"] == "chat" else TEXT)
        if len(rows) < want:
            raise DataError(f"{s['path']}: {len(docs):,} documents give {len(rows):,} rows of {seq_len} tokens, "
                            f"{want:,} asked ({s['fraction']:.0%} of {num_tokens:,} tokens): add data or ask for fewer tokens")
        parts.append(rows)
        role_parts.append(roles)
        records.append({"kind": s["kind"], "path": str(s["path"]), "column": s.get("column"), "fraction": s["fraction"],
                        "documents": len(docs), "rows": len(rows), "tokens": rows.numel()})
    tokens = torch.cat(parts)
    source = torch.cat([torch.full_like(p, i, dtype=torch.uint8) for i, p in enumerate(parts)])
    order = torch.randperm(len(tokens), generator=torch.Generator().manual_seed(seed))
    tokens, source, role = tokens[order], source[order], torch.cat(role_parts)[order]
    heldout_start = len(tokens) - max(1, round(heldout_fraction * len(tokens))) if heldout_fraction > 0 else len(tokens)
    meta = {"format": "crosscoder token mix 1", "tokenizer": tokenizer_record(tokenizer), "seq_len": seq_len,
            "bos": bos, "bos_token_id": bos_id, "separator": "eos" if tokenizer.eos_token_id is not None else None,
            "sources": records, "rows": len(tokens), "roles": list(ROLES),
            "role_tokens": {name: int((role == i).sum()) for i, name in enumerate(ROLES)},
            "splits": {"train": [0, heldout_start], "heldout": [heldout_start, len(tokens)]}, "seed": seed}
    # Written beside out_dir and swapped in whole: a killed rebuild leaves the previous mix as it was.
    work = staging_dir(out_dir, MIX_FILES)
    torch.save(tokens, work / TOKENS)
    torch.save(source, work / SOURCE)
    torch.save(role, work / ROLE)
    (work / META).write_text(json.dumps(meta, indent=2))  # last: its presence marks the mix complete
    swap_in(work, out_dir)
    return tokens, source, meta


# ---------------------------------------------------------------- reading a mix
def is_mix(path):
    return (Path(str(path)) / META).is_file()


def read_mix_meta(path):
    """A mix's meta.json, or a DataError naming the file."""
    file = Path(str(path)) / META
    try:
        return json.loads(file.read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"{file}: cannot read the mix's record ({type(e).__name__}: {e})") from None


def _load_tensor(file):
    try:
        return load_mapped(file)
    except Exception as e:  # torch raises EOFError, RuntimeError, pickle's errors on a damaged file
        raise DataError(f"{file}: cannot read it ({type(e).__name__}: {e}); build the mix again (data.py)") from None


def load_mix(path, split=None):
    """(tokens [N, S] int32, source [N, S] uint8, meta) of a mix; split "train" or "heldout":
    only its rows."""
    path = Path(str(path))
    meta = read_mix_meta(path)
    tokens, source = _load_tensor(path / TOKENS), _load_tensor(path / SOURCE)
    if split is not None:
        rows = split_rows(meta, split)
        tokens, source = tokens[rows], source[rows]
    return tokens, source, meta


def load_roles(path, split=None):
    """Each token's role [N, S] (uint8, indices into ROLES) of a mix, or None for a mix built
    before roles were recorded; split: only its rows."""
    path = Path(str(path))
    if not (path / ROLE).is_file():
        return None
    role = _load_tensor(path / ROLE)
    return role if split is None else role[split_rows(read_mix_meta(path), split)]


def split_rows(meta, split):
    """The rows of a split ("train" or "heldout") as a slice."""
    return slice(*meta["splits"][split])


def chat_mask(source, meta):
    """[N, S] bool: the tokens that come from chat sources."""
    chat = torch.tensor([s["kind"] == "chat" for s in meta["sources"]])
    return chat[source.long()]


def check_mix_tokenizer(mix_dir, model_names, records=None):
    """A DataError, before any model loads, when data.py's mix was built with another vocabulary
    than each model's tokenizer (read alone: seconds, not the model's minutes). records: one
    tokenizer record per model (an aligned mix's), else the mix's one for every model."""
    meta = read_mix_meta(mix_dir)
    for m, name in enumerate(model_names):
        try:
            tokenizer = tokenizer_of(name)
        except (OSError, ValueError) as e:  # no hub access: the model cannot load either, and says why
            print(f"note: the tokenizer of {name} could not be read to check the mix against it ({type(e).__name__})")
            continue
        built = meta if records is None else {"tokenizer": records[m]}
        check_tokenizer(built, tokenizer, where=f"the token mix {mix_dir}" + f" (model {m})" * (records is not None))
