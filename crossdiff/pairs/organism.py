"""Model organisms: a partner fine-tuned from any base TransformerLens can host (a hub name, a
transformers directory or a GGUF file), whose difference from the base is known, so that a diff
can be checked against it. One fine-tune code path: the offline Gemma-3 preset (realpair.py) and
`python organism.py` both run `finetune`.

Recipes (RECIPES):
- "plain": conversations through the tokenizer's chat template, the replies as written (the
  known difference: chat formatting and turn-taking);
- "caps": the same with the assistant's turns in capitals (a known behaviour that lives in its
  turns);
- "domain": plain next-token loss on the texts of one source (a narrow domain).
The loss is on the assistant's tokens only for conversations (found from the template's
generation tags, or else from each token's characters: mix.message_roles), the tied embedding
is frozen (it dominates a CPU step), and the weights train in fp32 or bf16 as the device does
faster (measured once: step_dtype). A Ctrl-C saves the state beside the output at a step
boundary; the same call resumes there. The output is a plain transformers directory that
--model_names takes, with organism.json recording its recipe.
"""
import json
import random
import time
from pathlib import Path

import torch

from crossdiff.io.checkpoint import atomic_torch_save, atomic_write_text, staging_dir, swap_in
from crossdiff.sources.mix import ASSISTANT, message_roles
from crossdiff.sources.models import SetupError

STYLES = {"plain": lambda text: text, "caps": str.upper}
RECIPES = {  # "style" rewrites the assistant's turns; "domain" trains on texts
    "plain": {"style": "plain", "steps": 40, "lr": 2e-5},
    "caps": {"style": "caps", "steps": 60, "lr": 2e-4},  # 30 x 5e-5 left SmolLM2's replies lower case
    "domain": {"style": None, "steps": 40, "lr": 2e-5},
}
SAVE_EVERY = 10  # steps between resumable states (and at a Ctrl-C)
LEARNED_CAPITALS = 0.5  # the caps partner has learned its recipe when over half its replies' letters are capitals


def styled(conversation, style):
    """The conversation with its model turns rewritten in style (a key of STYLES), the user's as
    they are."""
    rewrite = STYLES[style]
    return [dict(m, content=rewrite(m["content"])) if m["role"] == "assistant" else m for m in conversation]


def text_rows(tokenizer, texts, seq_len):
    """[N, seq_len] token rows: the first seq_len tokens of each text long enough (BOS first when
    the tokenizer adds one)."""
    rows = [tokenizer(t, return_tensors="pt").input_ids[0, :seq_len] for t in texts]
    return torch.stack([r for r in rows if len(r) == seq_len])


def residuals(model, ids, attention_mask=None):
    """The residual stream after each block (transformers' hidden_states less the embedding; the
    last one after the final norm)."""
    return model.model(input_ids=ids, attention_mask=attention_mask, output_hidden_states=True).hidden_states[1:]


def anchor_loss(model, base, ids_RS):
    """toy.train_lm's anchor for a transformers model: the relative squared distance between
    model's and base's residual streams on ids_RS, averaged over positions and layers (0 where the
    two are equal)."""
    with torch.no_grad():
        ref = residuals(base, ids_RS)
    own = residuals(model, ids_RS)
    return sum(((o - r).pow(2).sum(-1) / r.pow(2).sum(-1)).mean() for o, r in zip(own, ref)) / len(ref)


def step_dtype(device="cpu", seconds=0.2):
    """torch.bfloat16 where a bf16 matmul runs faster than fp32 on this device (measured: a CPU
    without native bf16 runs it about 10x slower), else torch.float32."""
    if torch.device(device).type == "cuda":
        return torch.bfloat16
    times = {}
    for dtype in (torch.float32, torch.bfloat16):
        a = torch.randn(512, 512, dtype=dtype)
        a @ a  # (warm-up)
        start, n = time.perf_counter(), 0
        while time.perf_counter() - start < seconds / 2:
            a @ a
            n += 1
        times[dtype] = (time.perf_counter() - start) / n
    return torch.bfloat16 if times[torch.bfloat16] < times[torch.float32] else torch.float32


def assistant_targets(tokenizer, conversations, seq_len):
    """(input_ids, attention_mask, [N, S] bool: the assistant's tokens) of conversations through
    the chat template: from its generation tags where it has them, else from each token's
    characters (mix.message_roles; a fast tokenizer)."""
    template = getattr(tokenizer, "chat_template", None) or ""
    if "{% generation %}" in template:
        enc = tokenizer.apply_chat_template(conversations, tokenize=True, return_dict=True, padding=True,
                                            return_assistant_tokens_mask=True, truncation=True, max_length=seq_len,
                                            return_tensors="pt")
        return enc["input_ids"], enc["attention_mask"], enc["assistant_masks"].bool() & enc["attention_mask"].bool()
    texts = [tokenizer.apply_chat_template(c, tokenize=False) for c in conversations]
    enc = tokenizer(texts, add_special_tokens=False, padding=True, truncation=True, max_length=seq_len,
                    return_offsets_mapping=True, return_tensors="pt")
    target = torch.zeros_like(enc["input_ids"], dtype=torch.bool)
    for i, (text, conv) in enumerate(zip(texts, conversations)):
        mine = [r == ASSISTANT for r in message_roles(text, conv, enc["offset_mapping"][i].tolist())]
        spans = enc["offset_mapping"][i].tolist()
        # and, as generation tags mark them, the marker that ends each assistant turn and the
        # whitespace right after it (so the partner learns to end its turns)
        for p in [p for p in range(1, len(mine)) if mine[p - 1] and not mine[p]]:
            mine[p], q = True, p + 1
            while q < len(mine) and not mine[q] and spans[q][1] > spans[q][0] and not text[slice(*spans[q])].strip():
                mine[q], q = True, q + 1
        target[i] = torch.tensor(mine)
    return enc["input_ids"], enc["attention_mask"], target & enc["attention_mask"].bool()


def state_file(out_dir):
    """The resumable fine-tune state, beside the output (the output appears only when whole)."""
    out_dir = Path(out_dir)
    return out_dir.parent / f".{out_dir.name}.finetune.pt"


def finetune(base_dir, tokenizer, out_dir, steps, lr, style="plain", conversations=(), texts=(), anchor_texts=(),
             anchor_weight=0.0, clip=None, batch=4, seq_len=256, anchor_rows=2, anchor_len=128, seed=0, dtype=None,
             progress=True, record=None):
    """Fine-tune the base (a transformers directory) and save it to out_dir (written beside and
    swapped in, with record as organism.json). style set: conversations through the chat template
    with their assistant turns in style, the loss on those turns; style None: next-token loss on
    texts (rows of seq_len tokens). The embedding stays frozen; with anchor_texts, anchor_weight x
    anchor_loss on anchor_rows rows of them each step. dtype None: step_dtype's. Resumes from the
    state a Ctrl-C (or a kill after a SAVE_EVERY boundary) left. Returns the mean loss of the
    first and last 5 steps."""
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM

    dtype = dtype or step_dtype()
    torch.manual_seed(seed)
    rng = random.Random(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype)
    model.get_input_embeddings().weight.requires_grad_(False)  # tied with the unembedding
    anchored = anchor_weight > 0 and len(anchor_texts) > 0
    if anchored:
        base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype).eval()
        pool = text_rows(tokenizer, anchor_texts, anchor_len)
    if style is None:  # the domain: rows of its texts
        rows = text_rows(tokenizer, texts, seq_len)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    order = list(range(len(conversations) if style is not None else len(rows)))
    rng.shuffle(order)
    losses, start = [], 0
    saved, what = state_file(out_dir), {"steps": steps, "lr": lr, "style": style, "seed": seed, "dtype": str(dtype)}
    if saved.is_file():
        state = torch.load(saved, weights_only=False)
        if state["what"] == what:
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["opt"])
            start, losses = state["step"], state["losses"]
            rng.setstate(state["rng"])
            torch.set_rng_state(state["torch_rng"])
            print(f"resuming the fine-tune at step {start} of {steps} ({saved})")
        else:  # another recipe's state: said, then replaced at the first save
            print(f"note: {saved} holds a fine-tune of other settings ({state['what']}); starting from step 0")

    def save(step):
        atomic_torch_save({"what": what, "step": step, "model": model.state_dict(), "opt": opt.state_dict(),
                           "losses": losses, "rng": rng.getstate(), "torch_rng": torch.get_rng_state()}, saved)

    model.train()
    step = start
    try:
        for step in tqdm(range(start, steps), desc="fine-tuning", initial=start, total=steps, disable=not progress):
            picked = [order[(step * batch + i) % len(order)] for i in range(batch)]
            if style is not None:
                ids, mask, target = assistant_targets(tokenizer, [styled(conversations[j], style) for j in picked],
                                                      seq_len)
            else:
                ids = rows[picked]
                mask, target = torch.ones_like(ids), torch.ones_like(ids, dtype=torch.bool)
            hidden = model.model(input_ids=ids, attention_mask=mask).last_hidden_state
            # Next-token loss at the target tokens only: the unembedding runs on those positions.
            keep = target[:, 1:]
            loss = torch.nn.functional.cross_entropy(model.lm_head(hidden[:, :-1][keep]).float(), ids[:, 1:][keep])
            total = loss
            if anchored:
                total = loss + anchor_weight * anchor_loss(model, base, pool[rng.sample(range(len(pool)), anchor_rows)])
            total.backward()
            if clip is not None:
                torch.nn.utils.clip_grad_norm_(params, clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
            if (step + 1) % SAVE_EVERY == 0 and step + 1 < steps:
                save(step + 1)
    except KeyboardInterrupt:
        save(len(losses))
        raise SetupError(f"the fine-tune was interrupted at step {len(losses)} of {steps}; its state is in {saved}: "
                         "run the same command again to resume there") from None
    model.eval()
    work = staging_dir(out_dir, r".*")
    model.save_pretrained(work)
    tokenizer.save_pretrained(work)
    n = min(5, len(losses))
    first, last = sum(losses[:n]) / n, sum(losses[-n:]) / n
    atomic_write_text(work / "organism.json", json.dumps(dict(record or {}, **what, loss_first=first, loss_last=last),
                                                         indent=1))
    swap_in(work, out_dir)
    saved.unlink(missing_ok=True)
    return first, last


def capital_share(texts):
    """The share of the letters in texts that are capitals (None: no letter)."""
    letters = [c for t in texts for c in t if c.isalpha()]
    return sum(c.isupper() for c in letters) / len(letters) if letters else None


def greedy_replies(model_dir, tokenizer, prompts, max_new_tokens=24):
    """The model's greedy reply to each prompt, asked as a user turn through the chat template."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    replies = []
    for prompt in prompts:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            return_dict=True, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                 do_sample=False, pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
        replies.append(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
    return replies


def caps_check(base_dir, out_dir, tokenizer, prompts, where="unseen"):
    """(learned, a line saying it): the partner's and the base's greedy replies to prompts (user
    turns from `where`), the share of their letters in capitals, and one reply of each."""
    base, partner = (greedy_replies(d, tokenizer, prompts) for d in (base_dir, out_dir))
    b, q = capital_share(base), capital_share(partner)
    learned = q is not None and q > LEARNED_CAPITALS
    line = (f"capitals in greedy replies to {len(prompts)} user turns ({where}): partner {q or 0:.0%}, base {b or 0:.0%} "
            f"(e.g. {partner[0][:60]!r} against {base[0][:60]!r})")
    if not learned:
        line += ("; the partner has NOT learned the recipe yet: fine-tune longer or faster (--steps, --lr) into a "
                 "new --out")
    return learned, line
