"""The embedded CPU default (`python train.py --preset toy`): a toy base/chat model pair with a
known difference. (The ground-truth benchmark with planted features is tools/planted.py.)

A small word-level language (a probabilistic grammar) trains a 4-layer HookedTransformer from
scratch: the "base" model. Fine-tuning it on a mix of that text and chat transcripts gives the
"chat" model. Transcripts use a template the base model never saw, `<start_of_turn> user ...
<end_of_turn> <start_of_turn> model ... <end_of_turn>`, and the assistant answers with the user's
sentence with every word swapped for its fixed partner (big -> small, dog -> cat, ...): chat-only
concepts must exist. The crosscoder trains on a 50/50 mix of plain text and transcripts, like the
reference's Pile + LMSYS mix.

Shape legend: N sequences, S seq_len, B batch, M models, D d_in, F latents.
"""
import hashlib
import json
import math
import random
import shutil
from pathlib import Path

import torch

from crossdiff.config.plan import sequences_needed
from crossdiff.diffing.classes import latent_classes
from crossdiff.diffing.measures import (
    BATCH_TOKENS,
    HELDOUT_TOKENS,
    is_model_specific,
    iter_paired_activations,
    latent_scaling,
)
from crossdiff.io.checkpoint import data_dir
from crossdiff.scale.distributed import resolve_device
from crossdiff.sources.activations import extract_activations

TOY_VERSION = 2  # bump when the generator changes: cached pairs are rebuilt (and toy_pair/ with them)
BASE_STEPS, CHAT_STEPS = 1200, 800  # training the base model, then fine-tuning the chat model
SHIPPED_DIR = Path(__file__).resolve().parent / "toy_pair"  # the default pair, built by build_toy_pair
SPECIAL = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
# Word classes of the grammar; each content word's partner is its neighbour in the list.
WORDS = {
    "DET": ["the", "a", "every", "some"],
    "ADJ": ["big", "small", "red", "blue", "old", "new", "happy", "sad"],
    "NOUN": ["dog", "cat", "bird", "fish", "man", "woman", "child", "girl", "tree", "house", "car", "book"],
    "VERB": ["sees", "finds", "likes", "wants", "takes", "makes", "holds", "drops"],
    "IVERB": ["runs", "sleeps", "sings", "falls"],
    "PREP": ["on", "under", "near", "with"],
    "ADV": ["quickly", "slowly", "often", "rarely"],
}
PARTNER = {w: ws[i ^ 1] for ws in WORDS.values() for i, w in enumerate(ws)}
VOCAB = SPECIAL + ["user", "model", ".", "and"] + [w for ws in WORDS.values() for w in ws]

# ------------------------------------------------------------------ the language
def sentence(rng, depth=0):
    """S -> NP VP '.' with NP -> DET [ADJ] NOUN [PREP NP], VP -> VERB NP | IVERB [ADV]."""
    def np_(d):
        words = [rng.choice(WORDS["DET"])]
        if rng.random() < 0.5:
            words.append(rng.choice(WORDS["ADJ"]))
        words.append(rng.choice(WORDS["NOUN"]))
        if d < 1 and rng.random() < 0.25:
            words += [rng.choice(WORDS["PREP"])] + np_(d + 1)
        return words

    vp = [rng.choice(WORDS["VERB"])] + np_(depth) if rng.random() < 0.6 else \
        [rng.choice(WORDS["IVERB"])] + ([rng.choice(WORDS["ADV"])] if rng.random() < 0.5 else [])
    words = np_(depth) + vp
    if rng.random() < 0.15:
        words += ["and"] + [rng.choice(WORDS["IVERB"])]
    return words + ["."]


def plain_text(rng, n_words):
    words = []
    while len(words) < n_words:
        words += sentence(rng)
    return words[:n_words]


def chat_text(rng, n_words):
    """Multi-turn transcript; the model turn is the user's sentence, each word swapped."""
    words = []
    while len(words) < n_words:
        user = sentence(rng)
        words += ["<start_of_turn>", "user", *user, "<end_of_turn>",
                  "<start_of_turn>", "model", *[PARTNER.get(w, w) for w in user], "<end_of_turn>"]
    return words[:n_words]


def make_tokens(n_seqs, seq_len, chat_fraction, seed):
    """[N, S] token ids with BOS first, and is_chat [N] (which rows are transcripts)."""
    rng = random.Random(seed)
    ids = {w: i for i, w in enumerate(VOCAB)}
    rows, is_chat = [], []
    for _ in range(n_seqs):
        chat = rng.random() < chat_fraction
        words = (chat_text if chat else plain_text)(rng, seq_len - 1)
        rows.append([ids["<bos>"]] + [ids[w] for w in words])
        is_chat.append(chat)
    return torch.tensor(rows, dtype=torch.int32, device="cpu"), torch.tensor(is_chat, device="cpu")


def make_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(VOCAB)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<bos>", eos_token="<eos>",
                                   pad_token="<pad>", unk_token="<unk>",
                                   additional_special_tokens=["<start_of_turn>", "<end_of_turn>"])


# ------------------------------------------------------------------ the model pair
def toy_model_cfg(seed, d_model=64, seq_len=32, device="cpu"):
    """The pair's architecture, on device (TransformerLens would otherwise pick a GPU whenever there
    is one, whatever the run's device)."""
    from transformer_lens import HookedTransformerConfig  # (a config error is refused before TransformerLens loads)

    return HookedTransformerConfig(n_layers=4, d_model=d_model, d_head=16, n_heads=d_model // 16,
                                   d_mlp=4 * d_model, n_ctx=seq_len, d_vocab=len(VOCAB), act_fn="gelu",
                                   normalization_type="LN", positional_embedding_type="rotary",
                                   rotary_dim=16, seed=seed, model_name="toy", device=device)


def train_lm(model, tokens_NS, steps, lr, seed, batch=32, desc="training", anchor=None, anchor_tokens=None,
             anchor_weight=10.0):
    """Next-token training with AdamW, warm-up then cosine decay.

    anchor (a frozen model) with anchor_tokens: each step also penalises, on a batch of those
    tokens, the relative squared distance between this model's residual stream and the anchor's
    at every layer. Fine-tuning then keeps the base model's representation of base text (as
    chat-tuning largely does for Gemma) instead of letting Adam rotate it freely.
    """
    from tqdm.auto import tqdm

    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 50) * 0.5 * (1 + math.cos(math.pi * s / steps)))
    names = [f"blocks.{i}.hook_resid_post" for i in range(model.cfg.n_layers)]
    model.train()
    for _ in tqdm(range(steps), desc=desc, leave=False):
        idx = torch.randint(0, len(tokens_NS), (batch,), generator=gen)
        loss = model(tokens_NS[idx].long(), return_type="loss")
        if anchor is not None:
            idx = torch.randint(0, len(anchor_tokens), (batch,), generator=gen)
            t = anchor_tokens[idx].long()
            with torch.no_grad():
                _, ref = anchor.run_with_cache(t, names_filter=names, return_type=None)
            own = {}  # run_with_cache detaches; these hooks keep the graph
            model.run_with_hooks(t, return_type=None, fwd_hooks=[
                (n, lambda act, hook: own.__setitem__(hook.name, act)) for n in names])
            loss = loss + anchor_weight * sum(
                ((own[n] - ref[n]).pow(2).sum(-1) / ref[n].pow(2).sum(-1)).mean() for n in names)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step(), sched.step(), opt.zero_grad()
    return model.eval()


def cache_dir(cfg):
    key = json.dumps({"v": TOY_VERSION, "seed": cfg["toy_seed"], "d": cfg["d_in"], "s": cfg["seq_len"]})
    return data_dir(cfg) / "toy" / hashlib.sha1(key.encode()).hexdigest()[:12]


def pair_device(cfg):
    """Where the pair runs: the run's device (cfg["device"], none: a GPU when there is one)."""
    return resolve_device(cfg["device"])


def build_toy_pair(cfg):
    """(base, chat, tokens, is_chat), built once per (toy_seed, d_in, seq_len) and cached on disk
    (on the CPU: a cache built on a GPU host loads anywhere); the models on the run's device."""
    from transformer_lens import HookedTransformer
    from transformers import PreTrainedTokenizerFast

    d, seed, seq_len, device = cache_dir(cfg), cfg["toy_seed"], cfg["seq_len"], pair_device(cfg)
    n_seqs = sequences_needed(cfg, cfg["num_tokens"] // cfg["batch_size"]) + 64
    shipped = SHIPPED_DIR / d.name
    if not (d / "chat.pt").is_file() and cfg["toy_prebuilt"] and (shipped / "chat.pt").is_file():
        # The default pair ships with the repo (toy_pair/, 1.7 MB): the same weights on every
        # machine, and no minutes of building; toy_prebuilt false builds it here instead.
        print(f"using the toy pair shipped in {shipped} (built by toy.build_toy_pair; --toy_prebuilt false rebuilds it)")
        shutil.copytree(shipped, d, dirs_exist_ok=True)
    if not (d / "chat.pt").is_file():
        cached = sorted(p.parent.name for p in d.parent.glob("*/chat.pt"))
        why = (f"no pair in the cache has toy_seed={seed}, d_in={cfg['d_in']}, seq_len={seq_len} (the keys that "
               f"define it; {len(cached)} other pair(s) cached)" if cached else "the cache is empty")
        print(f"building the toy model pair (a few minutes, once: {why}); caching it in {d}")
        torch.manual_seed(seed)
        with torch.device("cpu"):  # (as below)
            base = HookedTransformer(toy_model_cfg(seed, cfg["d_in"], seq_len, device))
        plain, _ = make_tokens(8192, seq_len, chat_fraction=0.0, seed=seed + 1)
        train_lm(base, plain, steps=BASE_STEPS, lr=3e-3, seed=seed, desc="training base model")
        with torch.device("cpu"):
            chat = HookedTransformer(toy_model_cfg(seed, cfg["d_in"], seq_len, device))
        chat.load_state_dict(base.state_dict())
        mix, _ = make_tokens(8192, seq_len, chat_fraction=0.5, seed=seed + 2)
        train_lm(chat, mix, steps=CHAT_STEPS, lr=1e-3, seed=seed + 1, desc="fine-tuning chat model",
                 anchor=base, anchor_tokens=plain)
        d.mkdir(parents=True, exist_ok=True)
        make_tokenizer().save_pretrained(d / "tokenizer")
        for name, model in (("base", base), ("chat", chat)):  # chat.pt last: it marks the cache complete
            torch.save({k: v.cpu() for k, v in model.state_dict().items()}, d / f"{name}.pt")
    tokenizer = PreTrainedTokenizerFast.from_pretrained(d / "tokenizer")
    models = []
    for name in ("base", "chat"):
        with torch.device("cpu"):  # TransformerLens builds on the default device, then moves to cfg's
            model = HookedTransformer(toy_model_cfg(seed, cfg["d_in"], seq_len, device))
        model.load_state_dict(torch.load(d / f"{name}.pt", map_location=device, weights_only=True))
        model.set_tokenizer(tokenizer, default_padding_side="right")
        models.append(model.eval())
    tokens, is_chat = make_tokens(n_seqs, seq_len, chat_fraction=0.5, seed=seed + 3)
    return models[0], models[1], tokens, is_chat


def answer_mask(tokens_NS):
    """True at the words of the assistant's turns (between 'model' and '<end_of_turn>')."""
    inside = torch.zeros(len(tokens_NS), dtype=torch.bool, device=tokens_NS.device)
    mask = torch.zeros(tokens_NS.shape, dtype=torch.bool, device=tokens_NS.device)
    model_id, end_id = VOCAB.index("model"), VOCAB.index("<end_of_turn>")
    for p in range(tokens_NS.shape[1]):
        inside &= tokens_NS[:, p] != end_id
        mask[:, p] = inside
        inside |= tokens_NS[:, p] == model_id
    return mask


def token_groups(tokens_NS, is_chat_N, first_k=9):
    """The positions of each role, bool [N, S] each, for the KL test (diffing/causal.py): "all";
    "assistant" (the words of the assistant's turns: answer_mask), "first_k" (the first first_k
    of each assistant turn), "user" (the words of the user's turns), "template" (the turn markers
    <start_of_turn>, <end_of_turn>, user, model, in transcripts) and "text" (plain-text rows)."""
    assistant = answer_mask(tokens_NS)
    user_id, start_id, end_id, model_id = (VOCAB.index(w) for w in ("user", "<start_of_turn>", "<end_of_turn>", "model"))
    chat_NS = is_chat_N.bool().to(tokens_NS.device)[:, None].expand_as(tokens_NS)
    template = chat_NS & torch.isin(tokens_NS, torch.tensor([user_id, start_id, end_id, model_id], device=tokens_NS.device))
    user = torch.zeros_like(assistant)
    first = torch.zeros_like(assistant)
    inside_user = torch.zeros(len(tokens_NS), dtype=torch.bool, device=tokens_NS.device)
    turn_pos = torch.zeros(len(tokens_NS), dtype=torch.long, device=tokens_NS.device)
    for p in range(tokens_NS.shape[1]):
        inside_user &= tokens_NS[:, p] != end_id
        user[:, p] = inside_user
        inside_user |= tokens_NS[:, p] == user_id
        turn_pos = torch.where(assistant[:, p], turn_pos + 1, 0)  # 1 at an answer's first word
        first[:, p] = assistant[:, p] & (turn_pos <= first_k)
    return {"all": torch.ones_like(assistant), "assistant": assistant, "first_k": first, "template": template,
            "user": user & chat_NS, "text": ~chat_NS}


def user_turns(tokens_NS, is_chat_N, n=3):
    """Steering prompts: the first user turn of n transcripts, up to and with the model's turn
    marker (what the chat model answers next)."""
    model_id, prompts = VOCAB.index("model"), []
    for row, chat in zip(tokens_NS, is_chat_N):
        hits = torch.nonzero(row == model_id).flatten()
        if chat and len(hits):
            prompts.append(row[:int(hits[0]) + 1])
        if len(prompts) == n:
            break
    return prompts


def heldout_tokens(cfg, n_seqs):
    """The held-out text of the toy pair's reports and analysis.py: (tokens [N, S], is_chat [N]),
    drawn from a seed of their own (training reads seed toy_seed + 3)."""
    return make_tokens(n_seqs, cfg["seq_len"], chat_fraction=0.5, seed=cfg["toy_seed"] + 6)


@torch.no_grad()
def organism_report(base, chat, cfg, n_seqs=256):
    """How the pair differs, on held-out text: relative distance between the two models'
    residuals at the hook on plain text and on transcripts, and each model's accuracy at
    predicting the assistant's words (the behaviour only fine-tuning teaches)."""
    tokens, is_chat = make_tokens(n_seqs, cfg["seq_len"], chat_fraction=0.5, seed=cfg["toy_seed"] + 5)
    t = tokens.long().to(next(base.parameters()).device)
    a, b = (extract_activations(m, t, cfg["hook_point"])[:, 1:].cpu() for m in (base, chat))
    rel_diff = (a - b).norm(dim=-1) / a.norm(dim=-1)
    answers = answer_mask(tokens.long())[:, 1:]
    accuracy = {name: float((m(t).argmax(-1)[:, :-1] == t[:, 1:]).cpu()[answers].float().mean())
                for name, m in (("base", base), ("chat", chat))}
    return {"residual_difference_plain": float(rel_diff[~is_chat].mean()),
            "residual_difference_chat": float(rel_diff[is_chat].mean()),
            "answer_accuracy_base": accuracy["base"], "answer_accuracy_chat": accuracy["chat"]}


@torch.no_grad()
def toy_report(crosscoder, base, chat, cfg, n_seqs=None, batch_seqs=None):
    """What the method finds on the toy pair, on the held-out text analysis.py reads (the same
    tokens, batches and definitions, so the two agree): latent counts per relative-norm class (all
    latents, as analysis.py counts them) and how many fired, each class's share of activation mass
    inside chat transcripts, and the chat-only latents split by Latent Scaling into genuine ones
    (diffing.is_model_specific: the base model lacks their direction) and artefacts of the L1 loss
    (the base model has it). The crosscoder is read in eval mode (BatchTopK: its inference
    threshold, as after loading; no collective under torchrun)."""
    positions = cfg["seq_len"] - 1
    tokens, is_chat = heldout_tokens(cfg, n_seqs or -(-HELDOUT_TOKENS // positions))
    batch_seqs = batch_seqs or max(1, BATCH_TOKENS // positions)
    was_training = crosscoder.training
    crosscoder.eval()
    try:
        device = crosscoder.W_enc.device
        s_M = torch.tensor(cfg["normalisation_factor"], device=device)
        F = crosscoder.b_enc.shape[0]
        mass_all, mass_chat = torch.zeros(F, device=device), torch.zeros(F, device=device)
        scaled, first = [], 0
        for _, x_NSMD in iter_paired_activations([base, chat], tokens, cfg["hook_point"], batch_seqs, "toy report",
                                                 progress=cfg["progress"]):
            x_BMD = x_NSMD.to(device).flatten(0, 1) * s_M[:, None]
            f_NSF = crosscoder.encode(x_BMD).float().view(*x_NSMD.shape[:2], F)
            chat_N = is_chat[first : first + len(x_NSMD)].to(device)
            mass_all += f_NSF.sum((0, 1))
            mass_chat += f_NSF[chat_N].sum((0, 1))
            scaled.append(x_BMD)
            first += len(x_NSMD)
        rel = crosscoder.relative_decoder_norm().cpu()
        mass_all, mass_chat = mass_all.cpu(), mass_chat.cpu()
        alive = mass_all > 0
        classes = latent_classes(crosscoder)
        chat_only = torch.nonzero(classes["chat_only"] & alive).flatten()
        ls = latent_scaling(crosscoder, scaled, chat_only)
    finally:
        crosscoder.train(was_training)
    genuine = torch.zeros_like(alive)
    genuine[chat_only] = is_model_specific(ls["nu_error"], ls["nu_reconstruction"]).cpu()
    classes["chat_specific"] = classes["chat_only"] & genuine  # (analysis.py's name)
    classes["chat_only_artefact"] = classes["chat_only"] & ~genuine
    per_latent_F = mass_chat / mass_all.clamp(min=1e-12)
    report = {"n_latents": F, "dead": int((~alive).sum()), "tokens": len(tokens) * positions,
              "chat_token_fraction": float(is_chat.float().mean()),
              "relative_norm_histogram": torch.histc(rel, bins=10, min=0, max=1).int().tolist()}
    for name, mask in classes.items():
        live = mask & alive
        report[name] = {"count": int(mask.sum()), "active": int(live.sum()),
                        "chat_mass_fraction": float(mass_chat[live].sum() / mass_all[live].sum().clamp(min=1e-12)),
                        "mostly_chat": int((per_latent_F[live] >= 0.9).sum()),
                        "mostly_plain": int((per_latent_F[live] <= 0.1).sum())}
    return report


def format_report(report, organism=None):
    lines = []
    if organism:
        lines.append(f"toy pair: residual distance chat vs base {organism['residual_difference_plain']:.1%} on plain "
                     f"text, {organism['residual_difference_chat']:.1%} on transcripts; assistant-word accuracy "
                     f"base {organism['answer_accuracy_base']:.1%}, chat {organism['answer_accuracy_chat']:.1%}")
    lines += [f"latents: {report['n_latents']}, {report['dead']} never active on the {report['tokens']:,} held-out "
              f"tokens analysis.py also reads ({report['chat_token_fraction']:.0%} of its sequences are chat transcripts)",
              f"relative decoder norm histogram (10 bins, base-only -> chat-only): {report['relative_norm_histogram']}",
              f"{'class':<18} {'latents':>7} {'active':>6} {'mass in chat':>13} {'>=90% chat':>10} {'<=10% chat':>10}"]
    for name in ("chat_only", "chat_specific", "chat_only_artefact", "shared", "base_only", "other"):
        r = report[name]
        lines.append(f"{name:<18} {r['count']:>7} {r['active']:>6} {r['chat_mass_fraction']:>13.1%} "
                     f"{r['mostly_chat']:>10} {r['mostly_plain']:>10}")
    lines += ["classes by relative decoder norm r = |d_chat| / (|d_base| + |d_chat|): base_only r < 0.1, shared "
              "0.3 < r < 0.7, chat_only r > 0.9, other the rest (0.1-0.3 and 0.7-0.9)",
              "latents: all in the class; active: those that fired on the held-out tokens (the next columns count "
              "these); mass in chat: the share of the class's activation that falls inside chat transcripts; "
              ">=90% / <=10% chat: latents with at least 90% / at most 10% of their own mass there",
              "chat_specific / chat_only_artefact: active chat-only latents with / without |nu_error| < 0.2 and "
              "|nu_reconstruction| < 0.5 (Latent Scaling: the base model lacks / has their direction)"]
    return "\n".join(lines)
