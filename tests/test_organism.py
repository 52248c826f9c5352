"""organism.py: the partner's fine-tune for any base, its assistant mask without generation tags,
its resume after a Ctrl-C, the domain recipe, and the script on a GGUF-free tiny base."""
import json

import pytest
import torch
from test_realpair import CONV, tiny_gemma3, toy_chat_tokenizer

from crossdiff.pairs import organism
from crossdiff.pairs.realpair import GEMMA3_CHAT_TEMPLATE
from crossdiff.sources.models import SetupError

CONVS = [CONV, CONV + [{"role": "user", "content": "the man sings ."}, {"role": "assistant", "content": "some woman falls ."}]]


def test_without_generation_tags_the_assistant_mask_is_found_from_each_tokens_characters():
    """The Gemma-3 template with its generation tags marks the model's turns (and the marker and
    newline that end them); the same template without the tags gives the same mask from the
    tokens' characters (SmolLM2's template has none)."""
    tagged = toy_chat_tokenizer()
    plain = toy_chat_tokenizer()
    plain.chat_template = GEMMA3_CHAT_TEMPLATE.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    ids_a, mask_a, target_a = organism.assistant_targets(tagged, CONVS, 64)
    ids_b, mask_b, target_b = organism.assistant_targets(plain, CONVS, 64)
    assert torch.equal(ids_a, ids_b) and torch.equal(mask_a, mask_b)
    assert target_a.sum() > 0 and torch.equal(target_a, target_b)


def fine_tune(tmp_path, out, **kw):
    return organism.finetune(tmp_path / "base", toy_chat_tokenizer(), tmp_path / out, 6, 3e-3, style="caps",
                             conversations=CONVS * 2, batch=2, seq_len=32, dtype=torch.float32, progress=False, **kw)


def test_a_fine_tune_stopped_by_ctrl_c_resumes_to_the_weights_of_one_run_straight(tmp_path, monkeypatch):
    """Ctrl-C at step 4 of 6 saves the state beside the output (which does not appear) and says
    to run again; the same call resumes at step 4 and ends on the straight run's weights; the
    partner records its recipe."""
    from transformers import Gemma3ForCausalLM

    tiny_gemma3(toy_chat_tokenizer()).save_pretrained(tmp_path / "base")
    fine_tune(tmp_path, "straight")
    calls, real = [], organism.assistant_targets

    def interrupt_at_step_4(*args):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(organism, "assistant_targets", interrupt_at_step_4)
    with pytest.raises(SetupError, match=r"interrupted at step 4 of 6; its state is in .*: run the same command again"):
        fine_tune(tmp_path, "resumed")
    assert organism.state_file(tmp_path / "resumed").is_file() and not (tmp_path / "resumed").exists()
    monkeypatch.setattr(organism, "assistant_targets", real)
    fine_tune(tmp_path, "resumed", record={"recipe": "caps"})
    a, b = (Gemma3ForCausalLM.from_pretrained(tmp_path / d) for d in ("straight", "resumed"))
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6, msg=name)
    assert not organism.state_file(tmp_path / "resumed").exists()
    record = json.loads((tmp_path / "resumed" / "organism.json").read_text())
    assert record["recipe"] == "caps" and record["style"] == "caps" and record["steps"] == 6


def test_the_domain_recipe_learns_its_texts_with_the_embedding_frozen(tmp_path):
    from transformers import Gemma3ForCausalLM

    tok = toy_chat_tokenizer()
    base = tiny_gemma3(tok)
    base.save_pretrained(tmp_path / "base")
    texts = ["the dog runs . a cat sleeps . the man sings . some woman falls ."] * 8
    first, last = organism.finetune(tmp_path / "base", tok, tmp_path / "domain", 8, 3e-3, style=None, texts=texts,
                                    batch=2, seq_len=12, dtype=torch.float32, progress=False)
    assert last < first
    partner = Gemma3ForCausalLM.from_pretrained(tmp_path / "domain")
    torch.testing.assert_close(partner.model.embed_tokens.weight, base.model.embed_tokens.weight, rtol=0, atol=0)


def test_the_step_dtype_is_one_the_device_trains_in():
    assert organism.step_dtype("cpu", seconds=0.02) in (torch.float32, torch.bfloat16)


def test_the_capital_share_counts_letters_only():
    assert organism.capital_share(["Ab 1!", "CD e"]) == pytest.approx(3 / 5)
    assert organism.capital_share(["12 ?", ""]) is None


def test_a_caps_partner_that_replies_as_its_base_is_said_not_to_have_learned_the_recipe(tmp_path, monkeypatch):
    """caps_check generates greedy replies from both directories: a partner identical to its base
    is not learned (and the line says what to change); replies in capitals are."""
    tok = toy_chat_tokenizer()
    tiny_gemma3(tok).save_pretrained(tmp_path / "base")
    learned, line = organism.caps_check(tmp_path / "base", tmp_path / "base", tok, ["the dog runs ."])
    assert not learned and "NOT learned" in line and "--steps" in line
    real = organism.greedy_replies
    monkeypatch.setattr(organism, "greedy_replies", lambda d, *a: ["SOME WOMAN falls"] if d == "partner"
                        else real(tmp_path / "base", *a))
    learned, line = organism.caps_check(tmp_path / "base", "partner", tok, ["the dog runs ."])
    assert learned and "partner 64%, base 0%" in line  # 9 of 14 letters
