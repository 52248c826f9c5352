import pytest
import torch

from conftest import random_tokens, run_script, tiny_cfg, tiny_model
from crosscoder import CrossCoder
from crossdiff.diffing.classes import classify_latents
from crossdiff.diffing.figures import examples_html
from crossdiff.diffing.measures import latent_scaling, reconstruction_stats, splice_in_loss, top_activating_examples


def test_latent_classes_follow_the_reference_thresholds():
    rel = torch.tensor([0.0, 0.05, 0.1, 0.2, 0.31, 0.5, 0.69, 0.8, 0.9, 0.95, 1.0])
    c = classify_latents(rel)
    assert c["base_only"].tolist() == [True, True] + [False] * 9
    assert c["chat_only"].tolist() == [False] * 9 + [True, True]
    assert c["shared"].tolist() == [False] * 4 + [True, True, True] + [False] * 4
    assert (c["base_only"].int() + c["chat_only"].int() + c["shared"].int() + c["other"].int() == 1).all()


def exact_crosscoder(d_in, factors):
    """A crosscoder that reconstructs any input exactly: for each model and coordinate, one
    latent for the positive part and one for the negative part."""
    cc = CrossCoder(tiny_cfg(d_in=d_in, dict_size=4 * d_in, normalisation_factor=list(factors)))
    with torch.no_grad():
        cc.W_enc.zero_(), cc.W_dec.zero_()
        eye = torch.eye(d_in)
        for m in range(2):
            for sign, block in ((1, 0), (-1, 1)):
                cols = slice((2 * m + block) * d_in, (2 * m + block + 1) * d_in)
                cc.W_enc[m][:, cols] = sign * eye
                cc.W_dec[cols, m] = sign * eye
    return cc


def test_splice_in_of_an_exact_reconstruction_equals_the_clean_loss():
    models = [tiny_model(1, n_ctx=16), tiny_model(2, n_ctx=16)]
    cc = exact_crosscoder(32, factors=(0.5, 2.0))
    tokens = random_tokens(6, 12)
    out = splice_in_loss(cc, models, tokens, batch_size=4)
    for m, model in enumerate(models):
        assert abs(out[m]["spliced"] - out[m]["clean"]) < 1e-4
        assert abs(out[m]["clean"] - float(model(tokens, return_type="loss").detach())) < 1e-4
        assert abs(out[m]["loss_recovered"] - 1.0) < 1e-3  # zero-ablation differs from clean here


def scaling_case(alpha, decoupled):
    """One chat-only latent on direction e0. The base activation holds alpha times it. With
    decoupled=True a base-only latent reconstructs that part (Latent Decoupling: nu_reconstruction
    = alpha, nu_error = 0); without, it stays in the base error (Complete Shrinkage: nu_error =
    alpha, nu_reconstruction = 0)."""
    cc = CrossCoder(tiny_cfg(d_in=4, dict_size=2))
    e0 = torch.tensor([1.0, 0, 0, 0])
    with torch.no_grad():
        cc.W_enc.zero_(), cc.W_dec.zero_()
        cc.W_enc[1][:, 0] = e0
        cc.W_dec[0, 1] = 2 * e0  # the decoder's scale must not matter
        cc.W_enc[1][:, 0] /= 2
        if decoupled:
            cc.W_enc[0][:, 1] = e0
            cc.W_dec[1, 0] = e0
    a = torch.rand(500, generator=torch.Generator().manual_seed(0)) + 0.1
    x = torch.zeros(500, 2, 4)
    x[:, 1, 0] = a
    x[:, 0, 0] = alpha * a
    x[:, 0, 2] = torch.randn(500, generator=torch.Generator().manual_seed(1))  # noise orthogonal to e0
    return cc, [x[:250], x[250:]]


def test_latent_scaling_recovers_known_ratios():
    cc, batches = scaling_case(alpha=0.7, decoupled=False)
    ls = latent_scaling(cc, batches, [0])
    assert torch.allclose(ls["nu_error"], torch.tensor([0.7]), atol=1e-5)
    assert torch.allclose(ls["nu_reconstruction"], torch.tensor([0.0]), atol=1e-5)
    assert torch.allclose(ls["beta_error"][1], torch.tensor([1.0]), atol=1e-5)
    cc, batches = scaling_case(alpha=0.4, decoupled=True)
    ls = latent_scaling(cc, batches, [0])
    assert torch.allclose(ls["nu_reconstruction"], torch.tensor([0.4]), atol=1e-5)
    assert torch.allclose(ls["nu_error"], torch.tensor([0.0]), atol=1e-5)
    cc, batches = scaling_case(alpha=0.0, decoupled=False)  # truly chat-only: both ratios 0
    ls = latent_scaling(cc, batches, [0])
    assert ls["nu_error"].abs().item() < 1e-6 and ls["nu_reconstruction"].abs().item() < 1e-6


@pytest.mark.parametrize("encode_rows", [None, 4])
def test_firing_counts_and_their_denominator_cover_only_the_positions_training_reads(encode_rows, monkeypatch):
    """With ignore_first_n 3 and one token id excluded, top_activating_examples counts each
    latent's firings and the positions over those positions only (computed here from the
    activations and the tokens), and the dashboard's frequency is one over the other (it divided
    by N x (S - 1), every position after the first); the same when it encodes 4 rows at a time."""
    if encode_rows:
        monkeypatch.setattr("crossdiff.diffing.measures.ENCODE_BYTES", encode_rows * 4 * 16)
    from crossdiff.diffing.dashboard import latent_table
    from crossdiff.sources.activations import extract_activations

    models = [tiny_model(1), tiny_model(2)]
    tokens = random_tokens(10, 9)
    excluded = int(tokens[:, 3:].flatten().mode().values)
    cc = CrossCoder(tiny_cfg(d_in=32, dict_size=16, normalisation_factor=[0.7, 1.3], ignore_first_n=3,
                             exclude_tokens=[str(excluded)]))
    values, _, _, counts, n = top_activating_examples(cc, models, tokens, list(range(16)), k=3, batch_size=3,
                                                      return_counts=True)
    x = torch.stack([extract_activations(m, tokens, "blocks.1.hook_resid_pre")[:, 3:] for m in models], 2)
    kept = tokens[:, 3:] != excluded
    f = cc.encode((x * torch.tensor([0.7, 1.3])[:, None]).flatten(0, 1)).view(10, 6, 16)[kept]
    assert n == int(kept.sum()) < 10 * 6 and torch.equal(counts, (f > 0).sum(0))
    table, _ = latent_table(cc, counts, n, values[:, 0])
    for j, freq in zip(table["latent"], table["freq"]):
        assert abs(freq - counts[j].item() / n) < 1e-3 * freq


@pytest.mark.parametrize("encode_rows", [None, 5])
def test_top_activating_examples_match_brute_force(encode_rows, monkeypatch):
    """The running top-k equals the top-k over every activation, also encoding 5 rows at a time
    (which splits the batches' rows unevenly)."""
    if encode_rows:
        monkeypatch.setattr("crossdiff.diffing.measures.ENCODE_BYTES", encode_rows * 4 * 16)
    models = [tiny_model(1), tiny_model(2)]
    cc = CrossCoder(tiny_cfg(d_in=32, dict_size=16, normalisation_factor=[0.7, 1.3]))
    tokens = random_tokens(10, 9)
    latents = [0, 3, 7]
    values, seqs, pos = top_activating_examples(cc, models, tokens, latents, k=5, batch_size=3)
    from crossdiff.sources.activations import extract_activations

    x = torch.stack([extract_activations(m, tokens, "blocks.1.hook_resid_pre")[:, 1:] for m in models], 2)
    N, S1 = x.shape[:2]
    f = cc.encode((x * torch.tensor([0.7, 1.3])[:, None]).flatten(0, 1)).view(N, S1, -1)[..., latents]
    for j in range(3):
        flat = f[..., j].flatten()
        want = flat.topk(5).values
        assert torch.allclose(values[j], want, atol=1e-5)
        for v, n, p in zip(values[j], seqs[j], pos[j]):
            assert abs(f[n, p - 1, j].item() - v.item()) < 1e-5
    page = examples_html(lambda t: [f"w{i}" for i in t.tolist()], tokens, latents, values, seqs, pos, title="t")
    assert page.count("<b style") == int((values > 0).sum())


def test_analysis_script_runs_end_to_end_on_a_toy_checkpoint(toy_run, toy_analysis):
    """analysis.py on the toy run: every file written, numbers in the ranges a working crosscoder
    gives (on the default toy run: explained variance ~0.96, CE recovered ~100%), and the report
    train.py printed agrees with it on the same checkpoint: the same held-out tokens, latents never
    active, latents per class, chat-only latents that pass Latent Scaling and their mass in chat."""
    import json
    import re

    out, analysis_dir = toy_analysis
    written = {p.name for p in analysis_dir.iterdir()}
    assert {"relative_norm_histogram.png", "shared_cosine_histogram.png", "latent_scaling.png",
            "chat_only_examples.html", "dashboard.html", "summary.txt"} <= written
    assert "loss recovered" in out.stdout and re.search(r"analysis of version_0 #\d+, step \d+ written to", out.stdout)
    summary = json.loads((analysis_dir / "summary.txt").read_text())
    r = summary["reconstruction"]
    assert 0.8 < r["explained_variance"] <= 1 and 10 < r["l0"] < 300 and r["tokens"] == 8457 * 31
    for model in ("0", "1"):
        assert 0.9 < summary["splice_in"][model]["loss_recovered"] < 1.1
    counts = summary["latent_counts"]
    assert sum(counts.values()) == 1024 and counts["shared"] > counts["chat_only"] > 10 and counts["base_only"] > 10
    train_out = toy_run[0].stdout
    dead, tokens = re.search(r"latents: 1024, (\d+) never active on the ([\d,]+) held-out tokens", train_out).groups()
    assert int(dead) == r["dead"] and int(tokens.replace(",", "")) == r["tokens"]
    for name, n in counts.items():
        assert re.search(rf"^{name} +{n} ", train_out, re.M), (name, n)
    genuine = int(re.search(r"^chat_specific +(\d+) ", train_out, re.M).group(1))
    specific = next(v for k, v in summary["latent_scaling"].items() if k.startswith("specific"))
    assert genuine == specific
    # by source: the chat-specific latents' mass sits in transcripts, as the toy report says
    by_source = summary["by_source"]
    mass = float(re.search(r"^chat_specific +\d+ +\d+ +([\d.]+)%", train_out, re.M).group(1)) / 100
    assert by_source["classes"]["chat_specific"]["latents"] == genuine
    assert abs(by_source["classes"]["chat_specific"]["chat_mass_fraction"] - mass) < 1e-3
    assert by_source["chat"]["tokens"] + by_source["text"]["tokens"] == r["tokens"]
    assert all(0.8 < v <= 1 for k in ("chat", "text") for v in by_source[k]["explained_variance_per_model"])
    assert all(0.8 < summary["splice_in"][m]["by_source"][k]["loss_recovered"] < 1.2 for m in ("0", "1")
               for k in ("chat", "text"))
    # the KL test's rows: every set in every toy group, each fraction 1 - KL_S / KL_gap, the sets
    # of given sizes with their random control, the chat-only set the size of its class
    rows = json.loads((analysis_dir / "kl_gap.json").read_text())
    fields = {"method", "set", "group", "n_latents", "n_positions", "kl_gap", "kl_patched", "fraction_closed",
              "random_mean", "random_std"}
    assert all(set(row) == fields for row in rows)
    assert {row["group"] for row in rows} == {"all", "assistant", "first_k", "template", "user", "text"}
    adl = [row for row in rows if row["method"] == "adl"]  # the baseline with no training, its own control
    assert {row["set"] for row in adl} == {"adl"} and len(adl) == 6 and len(summary["adl_logit_lens"]) == 10
    sets = {row["set"] for row in rows}  # (--ranked false: the ranked sets, a forward per latent, are left out)
    assert {"all", "all+bias", "chat_only", "chat_specific", "ls_top_half", "ls_bottom_half"} <= sets
    assert not any(name.startswith("ranked") for name in sets)
    for row in rows:
        if row["fraction_closed"] is not None:
            assert abs(row["fraction_closed"] - (1 - row["kl_patched"] / row["kl_gap"])) < 1e-9
            # a control beside every set of chosen latents (none beside every latent)
            assert (row["random_mean"] is None) == (row["set"] in ("all", "all+bias"))
    chat_only = next(row for row in rows if row["set"] == "chat_only" and row["group"] == "assistant")
    assert chat_only["n_latents"] == counts["chat_only"] and "l1:chat_only/assistant" in summary["kl_gap"]
    steering = json.loads((analysis_dir / "steering.json").read_text())  # up to 3 latents, 3 prompts each
    assert 1 <= len(steering) <= 3 and all(len(runs) == 3 and set(runs[0]) == {"prompt", "base", "chat", "steered"}
                                           for runs in steering.values())
    differ = summary["models_kl"]  # where the models differ: per group, and the largest places in order
    assert set(differ["by_group"]) == {"all", "assistant", "first_k", "template", "user", "text"}
    kls = [t["kl"] for t in differ["top"]]
    assert len(kls) == 10 and kls == sorted(kls, reverse=True) and all(t["context"] for t in differ["top"])


def test_analysis_of_a_gemma_checkpoint_without_models_keeps_the_weight_analyses(tmp_path):
    """No GPU and no hub here: the model-based sections are skipped with a message, the figures
    that need only the weights are still written."""
    cc = CrossCoder(tiny_cfg(tmp_path, preset="gemma", normalisation_factor=[0.3, 0.25]))
    cc.save()
    out = run_script("analysis.py", "--checkpoint", str(tmp_path / "checkpoints" / "version_0"), timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "skipping the analyses over tokens" in out.stdout
    written = {p.name for p in (tmp_path / "checkpoints" / "version_0" / "analysis").iterdir()}
    assert {"relative_norm_histogram.png", "shared_cosine_histogram.png", "dashboard.html", "summary.txt"} <= written
    page = (tmp_path / "checkpoints" / "version_0" / "analysis" / "dashboard.html").read_text()
    import base64
    import gzip
    import json
    import re

    table = json.loads(gzip.decompress(base64.b64decode(re.search(r'id="table-blob"[^>]*>([^<]*)<', page).group(1))))
    assert table["latent"] == list(range(64)) and '"arrays":null' in page  # every latent, weights only, no contexts


def test_analysis_of_three_models_classes_latents_by_each_models_share_of_the_norm(tmp_path):
    """A crosscoder of three models (none loadable here): the latent counts, the figure and the
    dashboard's classes are by each model's share of the decoder norm, computed here from the
    saved weights; no cell assumes two models."""
    import base64
    import gzip
    import json
    import re

    cc = CrossCoder(tiny_cfg(tmp_path, preset="gemma", n_models=3, model_names=["a", "b", "c"],
                             normalisation_factor=[0.3, 0.25, 0.2]))
    with torch.no_grad():  # latents 0-9 model 2's alone, 10-14 model 0's
        cc.W_dec[:10, :2] *= 0.01
        cc.W_dec[10:15, 1:] *= 0.01
    cc.save()
    out = run_script("analysis.py", "--checkpoint", str(tmp_path / "checkpoints" / "version_0"), timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    analysis_dir = tmp_path / "checkpoints" / "version_0" / "analysis"
    written = {p.name for p in analysis_dir.iterdir()}
    assert "norm_share_histogram.png" in written and "relative_norm_histogram.png" not in written
    norms = cc.W_dec.detach().norm(dim=-1)
    share = norms / norms.sum(-1, keepdim=True)
    want = {f"model_{m}_only": int((share[:, m] > 0.9).sum()) for m in range(3)}
    want["shared"] = int((share > 0.2).all(-1).sum())
    want["other"] = 64 - sum(want.values())
    summary = json.loads((analysis_dir / "summary.txt").read_text())
    assert summary["latent_counts"] == want and want["model_2_only"] == 10 and want["model_0_only"] == 5
    page = (analysis_dir / "dashboard.html").read_text()
    table = json.loads(gzip.decompress(base64.b64decode(re.search(r'id="table-blob"[^>]*>([^<]*)<', page).group(1))))
    assert table["class"][:15] == ["model_2_only"] * 10 + ["model_0_only"] * 5
    assert [[round(float(v), 4) for v in norms[:, m]] for m in range(3)] == table["norm_models"]


def test_factors_given_on_the_command_line_override_the_checkpoints(tmp_path):
    import json

    cc = CrossCoder(tiny_cfg(tmp_path, preset="gemma", normalisation_factor=[0.3, 0.25]))
    cc.save()
    version = tmp_path / "checkpoints" / "version_0"
    out = run_script("analysis.py", "--checkpoint", str(version), "--factors", "0.5,0.125", timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads((version / "analysis" / "summary.txt").read_text())
    assert summary["normalisation_factor"] == [0.5, 0.125] and summary["normalisation_factor_source"] == "given (--factors)"
    bad = run_script("analysis.py", "--checkpoint", str(version), "--factors", "half,1", timeout=300)
    assert bad.returncode != 0 and "bad option value" in bad.stderr and "Traceback" not in bad.stderr
    bad = run_script("analysis.py", "--checkpoint", str(version), "--splice_in", "maybe", timeout=300)
    assert bad.returncode != 0 and "splice_in must be true or false" in bad.stderr and "Traceback" not in bad.stderr


REFERENCE_CFG_KEYS = dict(  # the reference's training config, as its published cfg.json holds it (no d_in)
    seed=49, batch_size=4096, buffer_mult=128, lr=5e-5, num_tokens=400_000_000, l1_coeff=2, beta1=0.9,
    beta2=0.999, dict_size=2**14, seq_len=1024, enc_dtype="fp32", model_name="gemma-2-2b", site="resid_pre",
    device="cuda:0", model_batch_size=4, log_every=100, save_every=30000, dec_init_norm=0.08,
    hook_point="blocks.14.hook_resid_pre", wandb_project="YOUR_PROJECT", wandb_entity="YOUR_ENTITY")


def test_a_checkpoint_in_the_published_layout_is_analysed_over_tokens(tmp_path, tiny_gemma_dirs):
    """The published crosscoder's files (<hook>/cfg.json without model_names, d_in or factors,
    and cc_weights.pt) around a tiny Gemma-2 pair stored locally: analysis.py runs every analysis
    over tokens, with the factors estimated as the reference's run did (BOS included, first
    sequences), which match a direct computation on the HF models."""
    import json

    paths, hf_models = tiny_gemma_dirs
    hook = "blocks.1.hook_resid_pre"
    cc = CrossCoder(tiny_cfg(d_in=2304, dict_size=64))
    with torch.no_grad():
        cc.W_dec[:4, 0] = 0  # four chat-only latents, for Latent Scaling and the examples page
    published = tmp_path / "published"
    (published / hook).mkdir(parents=True)
    (published / hook / "cfg.json").write_text(json.dumps(dict(REFERENCE_CFG_KEYS, dict_size=64, hook_point=hook)))
    torch.save({k: v.detach() for k, v in cc.state_dict().items()}, published / hook / "cc_weights.pt")
    tokens = random_tokens(24, 10, d_vocab=1000, bos=2)
    torch.save(tokens, tmp_path / "tokens.pt")
    out = run_script("analysis.py", "--checkpoint", str(published), "--model_names", ",".join(paths),
                     "--dataset", str(tmp_path / "tokens.pt"), "--n_heldout", "6", "--batch_size", "3", timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    assert "skipping the analyses over tokens" not in out.stdout
    assert "estimated here as the reference's run did (first 24 sequences, BOS included)" in out.stdout
    summary = json.loads((published / "analysis" / "summary.txt").read_text())
    assert {"reconstruction", "splice_in", "latent_scaling"} <= set(summary) and "skipped" not in summary
    assert summary["reconstruction"]["tokens"] == 6 * 9
    assert (published / "analysis" / "chat_only_examples.html").is_file()
    with torch.no_grad():  # sqrt(d_in) / mean norm over the first 400 sequences (here all 24), BOS included
        want = [2304 ** 0.5 / hf(tokens, output_hidden_states=True).hidden_states[1].norm(dim=-1).mean()
                for hf in hf_models]
    torch.testing.assert_close(torch.tensor(summary["normalisation_factor"]), torch.stack(want), rtol=1e-4, atol=0)


def test_functions_that_need_factors_refuse_a_crosscoder_without_them():
    models = [tiny_model(1), tiny_model(2)]
    cc = CrossCoder(tiny_cfg(d_in=32, dict_size=16))
    assert cc.cfg.get("normalisation_factor") is None
    tokens = random_tokens(4, 9)
    for fn in (splice_in_loss, reconstruction_stats):
        with pytest.raises(ValueError, match="no normalisation factors"):
            fn(cc, models, tokens)
    with pytest.raises(ValueError, match="no normalisation factors"):
        top_activating_examples(cc, models, tokens, [0])


def test_a_published_layout_checkpoint_without_model_names_gets_the_published_pair(tmp_path):
    """The reference's cfg.json names only model A: the analysis takes the published pair and,
    offline here, says the models cannot be had (a setup problem, not a bug) and keeps the
    weight-only figures."""
    import json

    hook = "blocks.14.hook_resid_pre"
    cc = CrossCoder(tiny_cfg(d_in=32, dict_size=16))
    (tmp_path / "pub" / hook).mkdir(parents=True)
    (tmp_path / "pub" / hook / "cfg.json").write_text(json.dumps(dict(REFERENCE_CFG_KEYS, dict_size=16)))
    torch.save({k: v.detach() for k, v in cc.state_dict().items()}, tmp_path / "pub" / hook / "cc_weights.pt")
    torch.save(random_tokens(8, 9), tmp_path / "tokens.pt")
    out = run_script("analysis.py", "--checkpoint", str(tmp_path / "pub"), "--dataset", str(tmp_path / "tokens.pt"),
                     timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "using the published one, ['gemma-2-2b', 'gemma-2-2b-it']" in out.stdout
    assert "skipping the analyses over tokens" in out.stdout and "could not load gemma-2-2b" in out.stdout
    assert (tmp_path / "pub" / "analysis" / "relative_norm_histogram.png").is_file()


def test_splice_in_runs_the_models_under_the_buffers_autocast(monkeypatch):
    """Every full forward of the splice-in loss (the only place logits are computed) runs inside
    the buffer's autocast_context, which is bf16 on a GPU: Gemma's [batch, seq, 256k] logits then cost
    half, and the fp32 copies of the reference's notebook never exist."""
    from contextlib import contextmanager

    from crossdiff.diffing import measures as diffing

    depth, outside = [0], []

    @contextmanager
    def recording(device):
        depth[0] += 1
        yield
        depth[0] -= 1

    monkeypatch.setattr(diffing, "autocast_context", recording)
    models = [tiny_model(1), tiny_model(2)]
    for model in models:
        model.unembed.register_forward_hook(lambda *a: outside.append(depth[0] == 0))
    cc = CrossCoder(tiny_cfg(d_in=32, dict_size=16, normalisation_factor=[1.0, 1.0]))
    splice_in_loss(cc, models, random_tokens(4, 9), batch_size=2)
    assert len(outside) == 2 * 2 * 3 and not any(outside)  # 2 batches x 2 models x clean/spliced/zero


def test_held_out_text_that_training_read_is_refused_before_the_models_load(tmp_path):
    """A checkpoint whose run read 40 of its dataset's 50 sequences: the default 257 held-out
    sequences would overlap them, so analysis.py says so (before any model loads) and keeps the
    weight-only analyses; with --n_heldout 10 the last 10 are held out and the check passes (the
    models, unavailable offline, are then what stops the analyses over tokens)."""
    torch.save(random_tokens(50, 1024, d_vocab=1000), tmp_path / "tokens.pt")
    cc = CrossCoder(tiny_cfg(tmp_path, preset="gemma", dataset=str(tmp_path / "tokens.pt"), seq_len=1024,
                             normalisation_factor=[0.3, 0.25], sequences_read=40))
    cc.save()
    version = str(tmp_path / "checkpoints" / "version_0")
    out = run_script("analysis.py", "--checkpoint", version, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "the last 257 sequences of the dataset's 50 are not held out: training read 40" in out.stdout
    assert "at most 10 here" in out.stdout
    ok = run_script("analysis.py", "--checkpoint", version, "--n_heldout", "10", timeout=300)
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert "not held out" not in ok.stdout and "could not load" in ok.stdout


def test_importing_the_notebook_refuses_instead_of_running_the_analysis(tmp_path):
    """`import analysis` raises ImportError naming where its maths live, before any cell's work
    (no checkpoint searched for, nothing written); run as a script it analyses (the tests above)."""
    import subprocess
    import sys

    from conftest import REPO

    probe = f"import sys; sys.path.insert(0, {str(REPO)!r}); import analysis"
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "ImportError: analysis.py is a notebook and a script" in out.stderr, out.stderr
    assert "crossdiff.diffing" in out.stderr and list(tmp_path.iterdir()) == []


def test_a_stopped_analysis_leaves_the_previous_one_whole_and_every_output_names_its_checkpoint(tmp_path):
    """analysis.py writes beside analysis/ and swaps the folder in at the end: a second analysis
    that fails before its dashboard (here: write_dashboard raises) changes no file of the first
    one's. summary.txt names the checkpoint, its file index and its step; so does the dashboard."""
    import json
    import subprocess
    import sys

    from conftest import REPO

    cc = CrossCoder(tiny_cfg(tmp_path, preset="gemma", normalisation_factor=[0.3, 0.25]))
    cc.save(step=7)
    version = tmp_path / "checkpoints" / "version_0"
    assert run_script("analysis.py", "--checkpoint", str(version), timeout=300).returncode == 0
    analysis = version / "analysis"
    summary = json.loads((analysis / "summary.txt").read_text())
    assert (summary["checkpoint"], summary["checkpoint_index"], summary["step"]) == (str(version), 0, 7)
    assert "version_0 #0, step 7" in (analysis / "dashboard.html").read_text()
    before = {p.name: p.stat().st_mtime_ns for p in analysis.iterdir()}
    cc.save(step=9)  # checkpoint 1
    probe = ("import runpy, sys; import crossdiff.diffing.dashboard as d\n"
             "def fail(*a, **k): raise RuntimeError('stopped')\n"
             f"d.write_dashboard = fail; sys.argv = ['analysis.py', '--checkpoint', {str(version)!r}]\n"
             "runpy.run_path('analysis.py', run_name='__main__')\n")
    out = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode != 0 and "RuntimeError: stopped" in out.stderr
    assert {p.name: p.stat().st_mtime_ns for p in analysis.iterdir()} == before
    assert run_script("analysis.py", "--checkpoint", str(version), timeout=300).returncode == 0
    assert json.loads((analysis / "summary.txt").read_text())["checkpoint_index"] == 1
