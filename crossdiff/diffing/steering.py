"""Steering: what the base model says with a latent's chat decoder direction added at the hook
(as diffing-toolkit's steering: factor x the latent's max activation x d_j^chat, at every
position, greedy decoding), beside the two models' own continuations.

Shape legend: S prompt positions, D d_in, F latents.
"""
import torch

from crossdiff.diffing.measures import normalisation_factors

FACTORS = (0.5, 1.0, 1.5)  # strengths, in units of the latent's max activation


@torch.no_grad()
def greedy(model, prompt_S, max_new_tokens, hook_point=None, add_D=None):
    """The prompt and max_new_tokens greedy tokens after it, with add_D added to the residual at
    hook_point at every position when given (prompt and generated tokens alike)."""
    device = next(model.parameters()).device
    tokens = prompt_S.to(device, torch.long)[None]
    hooks = [] if add_D is None else [(hook_point, lambda act, hook: act + add_D.to(act.device, act.dtype))]
    for _ in range(max_new_tokens):
        logits = model.run_with_hooks(tokens, fwd_hooks=hooks)
        tokens = torch.cat([tokens, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return tokens[0].cpu()


@torch.no_grad()
def steer(crosscoder, models, prompts, latent, max_activation, factors=FACTORS, max_new_tokens=12, base=0, chat=1):
    """For each prompt (a token tensor [S]): the base model's and the chat model's own greedy
    continuations, and the base model's with factor x max_activation x the latent's chat decoder
    direction (raw space) added at the hook, for each factor. max_activation: the latent's
    largest activation on held-out text (top_activating_examples); a latent that never fired
    there has nothing to scale by (a ValueError). Returns [{"prompt", "base", "chat",
    "steered": {factor: tokens}}] (new tokens only)."""
    if not max_activation > 0:
        raise ValueError(f"latent {latent} never fired on the held-out tokens: no activation to scale its "
                         "direction by; choose a latent that fires")
    folded = crosscoder.fold_normalisation(normalisation_factors(crosscoder))
    direction_D = folded.decoder_weight()[latent, chat].detach().float()
    hook_point = crosscoder.cfg["hook_point"]
    out = []
    for prompt in prompts:
        n = len(prompt)
        out.append({"prompt": prompt.tolist(),
                    "base": greedy(models[base], prompt, max_new_tokens)[n:].tolist(),
                    "chat": greedy(models[chat], prompt, max_new_tokens)[n:].tolist(),
                    "steered": {f: greedy(models[base], prompt, max_new_tokens, hook_point,
                                          f * max_activation * direction_D)[n:].tolist() for f in factors}})
    return out


def steering_prompts(tokens_NS, n=3, length=12, roles_NS=None, assistant=3):
    """A few held-out prompts: with each token's role (a mix's role.pt; assistant: its index), the
    rows up to their first assistant token, so the model's turn is next (rows that start inside
    an answer are passed over); else the first `length` tokens of n rows (the toy pair has its
    own, toy.user_turns)."""
    if roles_NS is None:
        return [row[:length] for row in tokens_NS[:n]]
    prompts = []
    for row, roles in zip(tokens_NS, roles_NS):
        at = torch.nonzero(roles == assistant).flatten()
        if len(at) and at[0] >= length:  # a turn with a question before it
            prompts.append(row[:int(at[0])])
        if len(prompts) == n:
            break
    return prompts
