"""steering.py: greedy continuations with a latent's chat direction added at the hook."""
import pytest
import torch

from conftest import random_tokens, tiny_cfg, tiny_model
from crosscoder import CrossCoder
from crossdiff.diffing.steering import greedy, steer

HOOK = "blocks.1.hook_resid_pre"


@torch.no_grad()
def test_steering_adds_the_latents_raw_chat_direction_and_decodes_greedily():
    """With factor f the base model continues as TransformerLens's own greedy generate does with
    f x max activation x (W_dec[j, chat] / s_chat) added at the hook; factor 0 is the base model's
    own continuation; the chat model's is its own generate; a latent that never fired is refused."""
    models = [tiny_model(1, n_ctx=32), tiny_model(2, n_ctx=32)]
    cc = CrossCoder(tiny_cfg(d_in=32, dict_size=16, normalisation_factor=[0.7, 1.3], hook_point=HOOK)).eval()
    with torch.no_grad():
        cc.W_dec.mul_(20.0)
    prompt = random_tokens(1, 6)[0]
    got = steer(cc, models, [prompt], latent=3, max_activation=2.0, factors=(0.0, 1.0), max_new_tokens=5)[0]

    def generate(model, add=None):
        hooks = [] if add is None else [(HOOK, lambda act, hook: act + add)]
        with model.hooks(fwd_hooks=hooks):
            out = model.generate(prompt[None], max_new_tokens=5, do_sample=False, use_past_kv_cache=False, verbose=False,
                                 stop_at_eos=False)
        return out[0, 6:].tolist()

    assert got["base"] == got["steered"][0.0] == generate(models[0])
    assert got["chat"] == generate(models[1])
    assert got["steered"][1.0] == generate(models[0], 2.0 * cc.W_dec[3, 1] / 1.3)
    assert got["steered"][1.0] != got["base"]  # the direction moves it
    assert greedy(models[0], prompt, 0).tolist() == prompt.tolist()
    with pytest.raises(ValueError, match="latent 3 never fired"):
        steer(cc, models, [prompt], latent=3, max_activation=0.0)


def test_with_roles_the_prompts_end_where_an_assistant_turn_begins():
    """A mix's roles: each prompt is a row up to its first assistant token (the model's turn is
    next); a row whose answer starts too early, or that has none, is passed over."""
    from crossdiff.diffing.steering import steering_prompts

    tokens = torch.arange(60).view(3, 20)
    roles = torch.zeros(3, 20, dtype=torch.uint8)
    roles[0, 2:5] = 3  # an answer at position 2: too early
    roles[1, 14:18] = 3
    roles[2, 12:] = 3
    got = steering_prompts(tokens, n=2, length=12, roles_NS=roles)
    assert [p.tolist() for p in got] == [list(range(20, 34)), list(range(40, 52))]
    assert len(steering_prompts(tokens, n=3, length=12)) == 3  # without roles: the rows' first tokens
