"""The latent dashboard (crossdiff/diffing/dashboard.py): its numbers against direct computations, its size at
16K latents, and the toy checkpoint's page in headless Chromium."""
import base64
import gzip
import json
import re

import numpy as np
import pytest
import torch

from conftest import random_tokens, tiny_cfg
from crosscoder import CrossCoder
from crossdiff.diffing.dashboard import (
    SHARE_LEVELS,
    dashboard_html,
    latent_table,
    pack_examples,
    spaced,
    window_contributions,
)


def unpack(meta, blob):
    """pack_examples's blob read back as meta["arrays"] lays it out (numpy)."""
    raw = gzip.decompress(base64.b64decode(blob))
    return {name: np.frombuffer(raw, dtype, n, at) for name, (dtype, at, n) in meta["arrays"].items()}


def test_each_models_share_plus_b_enc_is_the_latents_pre_activation_around_each_example(models):
    """window_contributions over batches of 4 sequences: per example and window token, the shares
    summed over the models plus b_enc[j] equal the crosscoder's pre-activation of latent j on the
    residuals read directly from each model (scaled by the factors); 0 at BOS and past the end."""
    cc = CrossCoder(tiny_cfg(normalisation_factor=[0.5, 2.0]))
    tokens = random_tokens(10, 9)
    latents, seqs, positions = [3, 10, 10, 63], [0, 5, 9, 2], [1, 8, 4, 5]
    shares = window_contributions(cc, list(models), tokens, latents, seqs, positions, before=2, after=1, batch_size=4)
    assert shares.shape == (4, 4, 2)
    for e, (j, s, p) in enumerate(zip(latents, seqs, positions)):
        x_SMD = torch.stack([m.run_with_cache(tokens[s : s + 1])[1]["blocks.1.hook_resid_pre"][0] for m in models], 1)
        pre_S = cc.encode(x_SMD * torch.tensor([0.5, 2.0])[:, None], apply_relu=False)[:, j]
        for w, offset in enumerate(range(-2, 2)):
            q = p + offset
            want = pre_S[q] - cc.b_enc[j] if 1 <= q <= 8 else torch.tensor(0.0)
            torch.testing.assert_close(shares[e, w].sum(), want.detach(), atol=1e-4, rtol=1e-4)


def test_packed_examples_read_back_as_laid_out():
    """Two latents (2 and 1 positive examples; the zero values are dropped): offsets, values,
    sequences and positions, the held-out tokens' strings, and the quantised activations and
    shares, each within half a quantisation step of the floats. A word-level vocabulary's tokens
    are shown with a space after each; a subword one's as they are."""
    tokens = random_tokens(4, 6, d_vocab=30, seed=1)
    values = torch.tensor([[3.0, 2.0, 0.0], [1.5, 0.0, 0.0]])
    seqs, positions = torch.tensor([[1, 3, 0], [2, 0, 0]]), torch.tensor([[1, 5, 0], [3, 0, 0]])
    shares = torch.randn(2, 3, 4, 2, generator=torch.Generator().manual_seed(0))
    meta, blob = pack_examples(lambda ids: [f"t{i}" for i in ids.tolist()], tokens, values, seqs, positions, shares,
                               before=2, after=1)
    got = unpack(meta, blob)
    assert meta["window"] == 4 and meta["before"] == 2 and meta["seq_len"] == 6 and meta["n_examples"] == 3
    np.testing.assert_array_equal(got["offsets"], [0, 2, 3])
    np.testing.assert_array_equal(got["seq"], [1, 3, 2])
    np.testing.assert_array_equal(got["pos"], [1, 5, 3])
    words = np.array(meta["tokens"])[got["tokens"].reshape(4, 6)]
    assert words.tolist() == [[f"t{i} " for i in row] for row in tokens.tolist()]  # word-level: spaced
    assert spaced([" the", "cat"]) == [" the", "cat"] and spaced(["the", "cat"]) == ["the ", "cat "]
    row = np.array([0, 0, 1])
    act = got["act"] * got["act_scale"][row]
    assert np.abs(act - [3.0, 2.0, 1.5]).max() <= 0.5 * got["act_scale"].max() + 1e-6
    back = got["share"].reshape(3, 4, 2) * got["share_scale"][row][:, None, None]
    assert np.abs(back - shares[values > 0].numpy()).max() <= 0.5 * got["share_scale"].max() + 1e-6
    assert np.abs(got["share"]).max() == SHARE_LEVELS  # each latent's largest share uses the full range


def test_models_of_different_tokenizers_pack_their_own_tokens_and_positions():
    """Aligned rows: the blob holds each model's own tokens [M, N, S] (indices into one string
    table, model 1's strings after model 0's) and each example's position in each model [E, M]."""
    tokens = torch.stack([random_tokens(3, 5, d_vocab=9, seed=1), random_tokens(3, 5, d_vocab=30, seed=2)], -1)
    values = torch.tensor([[2.0, 1.0], [0.5, 0.0]])
    seqs = torch.tensor([[0, 2], [1, 0]])
    positions = torch.tensor([[[1, 3], [4, 2]], [[2, 4], [0, 0]]])  # [J, K, M]
    shares = torch.randn(2, 2, 3, 2, generator=torch.Generator().manual_seed(0))
    meta, blob = pack_examples([lambda ids: [f"w{i}" for i in ids.tolist()], lambda ids: [f"c{i}" for i in ids.tolist()]],
                               tokens, values, seqs, positions, shares, before=1, after=1)
    got = unpack(meta, blob)
    assert meta["per_model"] and meta["n_seqs"] == 3 and meta["n_examples"] == 3
    words = np.array(meta["tokens"])[got["tokens"].reshape(2, 3, 5)]
    for m, prefix in enumerate("wc"):
        assert words[m].tolist() == [[f"{prefix}{i} " for i in row] for row in tokens[..., m].tolist()]
    np.testing.assert_array_equal(got["pos"].reshape(3, 2), [[1, 3], [4, 2], [2, 4]])
    np.testing.assert_array_equal(got["seq"], [0, 2, 1])


def test_the_table_lists_the_latents_that_fired_with_their_norms_and_latent_scaling():
    cc = CrossCoder(tiny_cfg())
    with torch.no_grad():
        cc.W_dec[5, 0] *= 0.01  # latent 5: chat-only
    counts = torch.zeros(64, dtype=torch.long)
    counts[[2, 5, 9]] = torch.tensor([4, 1, 10])
    table, histogram = latent_table(cc, counts, 100, torch.arange(64.0), {5: (0.05, 0.3, "chat", True)})
    assert table["latent"] == [2, 5, 9] and table["freq"] == [0.04, 0.01, 0.1] and table["max_act"] == [2.0, 5.0, 9.0]
    rel = cc.relative_decoder_norm().detach()
    assert table["rel"] == [round(float(rel[j]), 4) for j in (2, 5, 9)] and table["class"][1] == "chat_only"
    assert table["nu_error"] == [None, 0.05, None] and table["specific"] == [False, True, False]
    assert sum(histogram) == 64


def test_a_partitioned_crosscoders_table_classifies_by_block():
    """Dedicated blocks of 8 latents each: 0-7 base-only, 8-15 chat-only, whatever their norms
    (all equal at init, relative norm 0.5 for the free ones, which are shared)."""
    cc = CrossCoder(tiny_cfg(exclusive_fraction=0.125))
    table, _ = latent_table(cc)
    assert table["class"] == ["base_only"] * 8 + ["chat_only"] * 8 + ["shared"] * 48
    assert table["cos"][:16] == [None] * 16  # one-sided by construction


def test_a_one_sided_latent_has_no_cosine_in_the_table():
    """A latent whose base decoder is zero has no direction there: its cosine is null (shown as a
    dash), not the "-0.000" cosine_similarity's epsilon makes; the others keep theirs."""
    cc = CrossCoder(tiny_cfg())
    with torch.no_grad():
        cc.W_dec[3, 0] = 0
    table, _ = latent_table(cc)
    cos = cc.decoder_cosine_similarity()
    assert table["cos"][3] is None
    assert [c for j, c in enumerate(table["cos"]) if j != 3] == [round(float(cos[j]), 4) for j in range(64) if j != 3]


def test_a_16k_latent_dashboard_stays_under_5_mb():
    """16,384 latents, each with 10 examples of 11 tokens from 257 x 1024 held-out tokens of a
    256k vocabulary (Zipf-distributed like text), shares Gaussian: the page is under 5 MB."""
    g = np.random.default_rng(0)
    F, K, S = 16384, 10, 1024
    cc = CrossCoder(tiny_cfg(d_in=8, dict_size=F))
    tokens = torch.from_numpy(np.minimum(g.zipf(1.2, size=(257, S)), 255_999)).long()
    values = torch.from_numpy(g.exponential(1.0, (F, K))).float().sort(1, descending=True).values
    seqs = torch.from_numpy(g.integers(0, 257, (F, K)))
    positions = torch.from_numpy(g.integers(1, S, (F, K)))
    shares = torch.from_numpy(g.normal(0, 1, (F, K, 11, 2))).float()
    table, histogram = latent_table(cc, torch.ones(F, dtype=torch.long), 257 * (S - 1), values[:, 0])
    examples = pack_examples(lambda ids: [f"tok{i}" for i in ids.tolist()], tokens, values, seqs, positions, shares)
    size = len(dashboard_html(table, histogram, {"checkpoint": "synthetic"}, examples).encode())
    print(f"16K-latent dashboard: {size / 1e6:.2f} MB")
    assert size < 5e6


def test_the_toy_dashboard_in_headless_chromium(toy_analysis, tmp_path):
    """The toy checkpoint's dashboard.html opened from disk: no JavaScript error; one row per latent
    that fired on the held-out tokens (dict_size minus the latents analysis.py counts dead on the
    same tokens); clicking the relative-norm header orders the rows by the checkpoint's relative
    norms, descending then ascending; clicking a row shows its contexts in both models and puts the
    latent in the URL fragment; a link with a fragment opens on that latent; the search box selects
    one. A screenshot is written for a person to look at."""
    from browser import INSTALL_HINT, Chromium, find_chromium

    if find_chromium() is None:
        pytest.fail(INSTALL_HINT)
    _, analysis_dir = toy_analysis
    summary = json.loads((analysis_dir / "summary.txt").read_text())
    cc = CrossCoder.load(analysis_dir.parent)
    rel = cc.relative_decoder_norm().detach()
    url = (analysis_dir / "dashboard.html").resolve().as_uri()
    rows = "[...document.querySelectorAll('#rows tr[data-latent]')].map(r => Number(r.dataset.latent))"
    with Chromium() as page:
        page.open(url)
        page.wait_for("document.querySelectorAll('#rows tr').length")  # the table is decoded after the load event
        shown = page.evaluate(rows)
        assert len(shown) == cc.cfg["dict_size"] - summary["reconstruction"]["dead"]
        page.evaluate("document.querySelector('th[data-key=latent]').click()")
        assert page.evaluate(rows) == sorted(shown)
        for descending in (True, False):
            page.evaluate("document.querySelector('th[data-key=rel]').click()")
            want = sorted(shown, key=lambda j: ((-1 if descending else 1) * round(float(rel[j]), 4), j))
            assert page.evaluate(rows) == want
        latent = want[-1]  # the most chat-leaning
        page.evaluate(f"document.querySelector('tr[data-latent=\"{latent}\"]').click()")
        n = page.wait_for("document.querySelectorAll('#detail .example').length")
        assert 1 <= n <= 10 and f"latent={latent}" in page.evaluate("location.hash")
        base, chat = page.evaluate("[...document.querySelectorAll('#detail .example')[0].querySelectorAll('.ctx')]"
                                   ".map(c => c.textContent)")
        assert base == chat and base.strip()  # the same context in both models' columns
        first = page.evaluate("document.querySelector('#detail .example .muted').textContent")
        assert float(re.search(r"activation ([0-9.e+-]+)", first).group(1)) > 0
        page.screenshot(tmp_path / "dashboard.png")
        page.open("about:blank")  # (the same page with another fragment would not load again)
        page.open(url + f"#latent={shown[0]}&sort=latent&desc=0")
        page.wait_for(f"document.querySelector('#detail h2')?.textContent.startsWith('latent {shown[0]} ')")
        assert page.evaluate(rows) == sorted(shown)
        page.evaluate("const s = document.getElementById('search'); s.value = String(%d);"
                      "s.dispatchEvent(new KeyboardEvent('keydown', {key: 'Enter'}))" % shown[1])
        page.wait_for(f"document.querySelector('#detail h2')?.textContent.startsWith('latent {shown[1]} ')")
        assert page.errors == [], page.errors
    print(f"screenshot: {tmp_path / 'dashboard.png'}")
    with Chromium(width=900, height=900) as page:  # a narrow window: the table above, no sideways scrolling
        page.open(url + f"#latent={shown[0]}")
        page.wait_for(f"document.querySelector('#detail h2')?.textContent.startsWith('latent {shown[0]} ')")
        assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
        assert page.evaluate("document.getElementById('list').scrollWidth <= document.getElementById('list').clientWidth")
        key = page.evaluate("document.getElementById('key').textContent")
        assert "bold" in key and "Latent Scaling" in key  # the bold rows are explained
        page.screenshot(tmp_path / "dashboard_narrow.png")
        assert page.errors == [], page.errors


def test_a_latents_page_shows_the_gap_it_closes_alone_and_its_steering_runs(tmp_path):
    """analysis.py hands the dashboard each probed latent's gap where it fires and the steering
    runs (info "gap_alone", "steering"): the latent's page states the share closed with its
    positions and the gap, and each prompt's continuations; a latent without them states none."""
    from browser import INSTALL_HINT, Chromium, find_chromium

    from crossdiff.diffing.dashboard import write_dashboard

    if find_chromium() is None:
        pytest.fail(INSTALL_HINT)
    cc = CrossCoder(tiny_cfg())
    info = {"checkpoint": "tiny", "gap_alone": {"5": {"n_positions": 1234, "kl_gap": 0.25, "kl_patched": 0.2,
                                                      "fraction_closed": 0.2, "n_latents": 1}},
            "steering": {"5": [{"prompt": "the cat sat", "base": "on <the> mat", "chat": "HELLO",
                                "steered": {"0.5": "on a mat", "1.5": "HELLO THERE"}}]}}
    path = write_dashboard(tmp_path / "dashboard.html", cc, info=info)
    with Chromium() as page:
        page.open(path.resolve().as_uri() + "#latent=5")
        page.wait_for("document.querySelector('#detail h2')?.textContent.startsWith('latent 5 ')")
        text = page.evaluate("document.getElementById('detail').textContent")
        assert "on the 1,234 positions where it fires: closes 20.0% of the base → chat KL gap (0.250 nats)" in text
        assert "base: on <the> mat" in text and "chat: HELLO" in text and "x1.5: HELLO THERE" in text
        page.open("about:blank")
        page.open(path.resolve().as_uri() + "#latent=6")
        page.wait_for("document.querySelector('#detail h2')?.textContent.startsWith('latent 6 ')")
        assert "closes" not in page.evaluate("document.getElementById('detail').textContent")
        assert page.errors == [], page.errors


def test_an_aligned_dashboard_shows_each_models_own_tokens_around_its_own_position(tmp_path):
    """Models of different tokenizers (a word and a character tokenizer): the page of a latent
    that fired shows, per example, one context per model, each the model's own tokens up to its
    own aligned position (outlined), as its tokens in the row say."""
    from browser import INSTALL_HINT, Chromium, find_chromium
    from test_aligned import crosscoder_for

    from crossdiff.diffing.aligned import aligned_top_examples
    from crossdiff.diffing.dashboard import BEFORE, write_dashboard

    if find_chromium() is None:
        pytest.fail(INSTALL_HINT)
    cc, models, rows = crosscoder_for(tmp_path)
    rows = rows[:6]
    for m, prefix in enumerate("wc"):  # (tiny models have no tokenizer)
        models[m].to_str_tokens = lambda ids, prefix=prefix: [f"{prefix}{i}" for i in torch.as_tensor(ids).tolist()]
    *top, counts, n = aligned_top_examples(cc, models, rows, k=3, batch_size=4, progress=False)
    path = write_dashboard(tmp_path / "dashboard.html", cc, models, rows, top, counts, info={"models": ["w", "c"]},
                           n_tokens=n)
    latent = int(torch.nonzero(top[0][:, 0] > 0).flatten()[0])
    row, pos = int(top[1][latent, 0]), top[2][latent, 0].tolist()
    with Chromium() as page:
        page.open(path.resolve().as_uri() + f"#latent={latent}")
        page.wait_for("document.querySelectorAll('#detail .example').length")
        ctx = page.evaluate("[...document.querySelectorAll('#detail .example')[0].querySelectorAll('.ctx')]"
                            ".map(c => [c.textContent, c.querySelector('.max').textContent])")
        assert len(ctx) == 2
        for m, (prefix, (text, outlined)) in enumerate(zip("wc", ctx)):
            ids = rows[row, :, m].tolist()
            want = [f"{prefix}{i} " for i in ids[max(0, pos[m] - BEFORE):pos[m] + 3]]
            assert text == "".join(want) and outlined == f"{prefix}{ids[pos[m]]} "
        assert f"positions {pos[0]} / {pos[1]}" in page.evaluate("document.querySelector('#detail .example .muted').textContent")
        assert "two spaces: not compared" in page.evaluate("document.getElementById('detail').textContent")
        assert page.errors == [], page.errors


def test_a_three_model_latents_page_draws_each_models_decoder_norm(tmp_path):
    from browser import INSTALL_HINT, Chromium, find_chromium

    from crossdiff.diffing.dashboard import write_dashboard

    if find_chromium() is None:
        pytest.fail(INSTALL_HINT)
    cc = CrossCoder(tiny_cfg(n_models=3, model_names=["a", "b", "c"]))
    path = write_dashboard(tmp_path / "dashboard.html", cc)
    norms = cc.decoder_norms().detach()[7]
    with Chromium() as page:
        page.open(path.resolve().as_uri() + "#latent=7")
        page.wait_for("document.querySelector('#detail h2')?.textContent.startsWith('latent 7 ')")
        bars = page.evaluate("[...document.querySelectorAll('#detail .bars > div')].map(d => d.textContent.trim())")
        assert bars == [f"model {m} {float(norms[m]):.3f}" for m in range(3)]
        assert page.errors == [], page.errors
