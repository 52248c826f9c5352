"""hub.py: crosscoders in dictionary_learning's format (files written here as their code writes
them), read with their forward and normalisation, and analysed over tokens."""
import json

import pytest
import torch
from safetensors.torch import save_file

from conftest import random_tokens, run_script
from crosscoder import CrossCoder
from crossdiff.io.hub import FormatError, hook_point_of_layer, read_dictionary_learning

M, D, F = 2, 16, 48


def their_files(directory, batchtopk=True, normalised=True, code_normalization_id=1, layer=13, seed=0):
    """A crosscoder as dictionary_learning's BatchTopKCrossCoder / CrossCoder saves it with
    PyTorchModelHubMixin: init arguments in config.json, the state dict in model.safetensors."""
    g = torch.Generator().manual_seed(seed)
    state = {"encoder.weight": torch.randn(M, D, F, generator=g) * 0.3, "encoder.bias": torch.randn(F, generator=g) * 0.1,
             "decoder.weight": torch.randn(M, F, D, generator=g) * 0.3, "decoder.bias": torch.randn(M, D, generator=g),
             "code_normalization_id": torch.tensor(code_normalization_id), "target_rms": torch.tensor(1.0)}
    state["decoder.weight"][1, :5] *= 0.01  # five base-leaning latents, so that relative norms vary
    if normalised:
        state["activation_mean"] = torch.randn(M, D, generator=g) * 5
        state["activation_std"] = torch.rand(M, D, generator=g) * 3 + 0.5
        state["activation_global_scale"] = 1.0 / (state["activation_std"].pow(2).sum(-1) + 1e-8).sqrt()
    else:
        state["activation_mean"], state["activation_std"] = torch.full((M, D), float("nan")), torch.full((M, D), float("nan"))
        state["activation_global_scale"] = torch.ones(M)
    config = {"activation_dim": D, "dict_size": F, "num_layers": M, "code_normalization": "CROSSCODER"}
    if batchtopk:
        state["k"], state["threshold"] = torch.tensor(4, dtype=torch.int32), torch.tensor(0.8)
        config["k"] = 4
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(directory / "model.safetensors"))
    (directory / "config.json").write_text(json.dumps(config))
    (directory / "trainer_config.json").write_text(json.dumps({"trainer": {"layer": layer, "dict_class": "x"}}))
    return state


def their_forward(state, x_BMD, batchtopk):
    """dictionary_learning's forward on raw activations: normalise (keep_relative_variance),
    encode, threshold the decoder-norm-scaled activations (BatchTopK, eval), decode, denormalise."""
    g = state["activation_global_scale"][None, :, None]
    mean = state["activation_mean"]
    normalised = not mean.isnan().any()
    x = (x_BMD - mean) * g if normalised else x_BMD
    f = torch.relu(torch.einsum("bld,ldf->bf", x, state["encoder.weight"]) + state["encoder.bias"])
    if batchtopk:
        scaled = f * state["decoder.weight"].norm(dim=2).sum(0)[None]
        f = f * (scaled > state["threshold"])
    x_hat = torch.einsum("bf,lfd->bld", f, state["decoder.weight"]) + state["decoder.bias"]
    return (x_hat / (g + 1e-8) + mean if normalised else x_hat), f


@pytest.mark.parametrize("batchtopk,normalised", [(True, True), (False, True), (True, False), (False, False)])
def test_a_dictionary_learning_crosscoder_loads_with_its_forward_and_normalisation(tmp_path, batchtopk, normalised):
    """Read through load_from_hf from a local directory: our crosscoder, given raw activations
    scaled by the recorded factors as the analysis scales them, selects the same latents with the
    same values, and folded it reconstructs raw activations as theirs does."""
    state = their_files(tmp_path, batchtopk, normalised)
    cc = CrossCoder.load_from_hf(str(tmp_path))
    assert cc.architecture == ("batchtopk" if batchtopk else "l1") and not cc.training
    x = torch.randn(64, M, D) * 4 + 2
    want_x_hat, want_f = their_forward(state, x, batchtopk)
    s = torch.tensor(cc.cfg["normalisation_factor"])
    if batchtopk:
        assert 0 < int((want_f > 0).sum()) < want_f.numel()  # the threshold does select
    torch.testing.assert_close(cc.encode(x * s[:, None]), want_f, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(cc.fold_normalisation(s)(x), want_x_hat, rtol=1e-4, atol=1e-4)
    norms = state["decoder.weight"].norm(dim=2)  # [M, F]
    torch.testing.assert_close(cc.relative_decoder_norm(), norms[1] / norms.sum(0))
    if not normalised:
        assert cc.cfg["normalisation_factor"] == [1.0, 1.0]


def test_their_layer_is_the_output_of_that_decoder_layer_and_names_default_to_the_gemma_pair(tmp_path):
    their_files(tmp_path, layer=13)
    cfg, _ = read_dictionary_learning(tmp_path)
    assert cfg["hook_point"] == "blocks.14.hook_resid_pre" == hook_point_of_layer(13)
    assert cfg["model_names"] == ["gemma-2-2b", "gemma-2-2b-it"] and cfg["k"] == 4
    cfg, _ = read_dictionary_learning(tmp_path, model_names=["a", "b"], hook_point="blocks.3.hook_resid_pre")
    assert cfg["model_names"] == ["a", "b"] and cfg["hook_point"] == "blocks.3.hook_resid_pre"


def test_unsupported_variants_are_clear_errors(tmp_path):
    their_files(tmp_path / "sae", code_normalization_id=2)  # BatchTopK scored by the SAE norm
    with pytest.raises(FormatError, match="code_normalization SAE"):
        CrossCoder.load_from_hf(str(tmp_path / "sae"))
    their_files(tmp_path / "l1sae", batchtopk=False, code_normalization_id=2)  # the L1 forward ignores it
    assert CrossCoder.load_from_hf(str(tmp_path / "l1sae")).architecture == "l1"


def test_analysis_runs_on_a_dictionary_learning_directory_over_tokens(tmp_path, tiny_gemma_dirs):
    """analysis.py --checkpoint <their directory> around a tiny Gemma-2 pair, on a token mix of that
    pair's tokenizer: every analysis runs on the mix's held-out rows, with their normalisation as
    the factors, and its reconstruction there matches their forward; --splice_in false leaves out
    the splice-in loss alone (the published-layout test in test_analysis.py runs it)."""
    paths, hf_models = tiny_gemma_dirs
    g = torch.Generator().manual_seed(0)
    d, f = 2304, 32
    state = {"encoder.weight": torch.randn(2, d, f, generator=g) * 0.02, "encoder.bias": torch.zeros(f),
             "decoder.weight": torch.randn(2, f, d, generator=g) * 0.02, "decoder.bias": torch.zeros(2, d),
             "code_normalization_id": torch.tensor(1), "activation_mean": torch.randn(2, d, generator=g) * 0.1,
             "activation_std": torch.ones(2, d), "target_rms": torch.tensor(1.0),
             "k": torch.tensor(4), "threshold": torch.tensor(1e-3)}
    state["activation_global_scale"] = 1 / (state["activation_std"].pow(2).sum(-1) + 1e-8).sqrt()
    state["decoder.weight"][0, :4] = 0  # four chat-only latents, for Latent Scaling and the examples page
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    save_file(state, str(theirs / "model.safetensors"))
    (theirs / "config.json").write_text(json.dumps({"activation_dim": d, "dict_size": f, "num_layers": 2, "k": 4}))
    (theirs / "trainer_config.json").write_text(json.dumps({"trainer": {"layer": 0}}))  # -> blocks.1.hook_resid_pre
    # the text: a token mix (data.py) built with the pair's tokenizer, whose held-out split is analysed
    from transformers import AutoTokenizer

    from crossdiff.sources.mix import build_mix, load_mix

    words = random_tokens(30, 9, d_vocab=1000)[:, 1:].clamp(min=4)
    (tmp_path / "text.jsonl").write_text("\n".join(json.dumps({"text": " ".join(f"w{int(i)}" for i in row)})
                                                   for row in words))
    build_mix(AutoTokenizer.from_pretrained(paths[0]), [{"kind": "text", "path": tmp_path / "text.jsonl", "fraction": 1}],
              seq_len=10, num_tokens=240, out_dir=tmp_path / "mix", heldout_fraction=0.25)
    out = run_script("analysis.py", "--checkpoint", str(theirs), "--model_names", ",".join(paths),  # one batch:
                     "--dataset", str(tmp_path / "mix"), "--batch_size", "6", "--splice_in", "false", timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    summary = json.loads((theirs / "analysis" / "summary.txt").read_text())
    assert {"reconstruction", "latent_scaling", "by_source"} <= set(summary) and "skipped" not in summary
    assert "splice_in" not in summary and "CE clean" not in out.stdout
    assert summary["hook_point"] == "blocks.1.hook_resid_pre"
    torch.testing.assert_close(torch.tensor(summary["normalisation_factor"]), state["activation_global_scale"])
    held_out = load_mix(tmp_path / "mix", split="heldout")[0].long()
    assert held_out.shape == (6, 10) and summary["reconstruction"]["tokens"] == 6 * 9
    with torch.no_grad():  # their forward on the residual entering block 1 (BOS dropped), both models
        x = torch.stack([hf(held_out, output_hidden_states=True).hidden_states[1][:, 1:] for hf in hf_models], 2)
        x_hat, _ = their_forward(state, x.flatten(0, 1).float(), batchtopk=True)
    x = x.flatten(0, 1).float()
    ev = 1 - (x - x_hat).pow(2).sum((0, 2)) / (x - x.mean(0)).pow(2).sum((0, 2))
    torch.testing.assert_close(torch.tensor(summary["reconstruction"]["explained_variance_per_model"]), ev,
                               rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("architecture", ["l1", "batchtopk"])
def test_a_published_crosscoder_reads_back_whole_and_as_the_reference_read_its_own(tmp_path, architecture):
    """write_published then load_from_hf on the directory: the same weights (BatchTopK's threshold
    included), architecture, model pair and factors; and the files load the way the reference's
    load_from_hf did (its config into the constructor, the four weights into the module)."""
    from conftest import tiny_cfg
    from crossdiff.io.hub import write_published

    cc = CrossCoder(tiny_cfg(architecture=architecture, k=4, normalisation_factor=[0.5, 2.0],
                             model_names=["base-x", "chat-x"]))
    with torch.no_grad():
        cc.b_enc.normal_(), cc.b_dec.normal_()
        if architecture == "batchtopk":
            cc.threshold.fill_(0.37)
    folder = write_published(cc, tmp_path)
    assert folder == tmp_path / cc.cfg["hook_point"]
    back = CrossCoder.load_from_hf(str(tmp_path), path=cc.cfg["hook_point"])
    assert type(back) is type(cc)
    for name, want in cc.state_dict().items():
        torch.testing.assert_close(back.state_dict()[name], want, atol=0, rtol=0)
    for key in ("architecture", "model_names", "normalisation_factor", "dict_size", "hook_point"):
        assert back.cfg[key] == cc.cfg[key], key
    # The reference's load_from_hf as its analysis.py calls it (no device): cfg.json into the
    # constructor, which reads these keys and moves itself to cfg["device"], then the weights
    # loaded with map_location=cfg["device"] (it raised KeyError: 'device' when we left it out).
    cfg = json.loads((folder / "cfg.json").read_text())
    reads = ("dict_size", "d_in", "enc_dtype", "seed", "dec_init_norm", "device")
    assert all(key in cfg for key in reads), [key for key in reads if key not in cfg]
    weights = torch.load(folder / "cc_weights.pt", map_location=cfg["device"], weights_only=True)
    ref = CrossCoder({k: cfg[k] for k in (*reads, "hook_point", "architecture", "k") if k in cfg})
    ref.load_state_dict(weights)
    torch.testing.assert_close(ref.W_dec, cc.W_dec, atol=0, rtol=0)


def test_push_to_hub_uploads_the_published_layout(tmp_path, monkeypatch):
    """push_to_hub creates the repo and uploads one folder holding <hook>/cfg.json and
    <hook>/cc_weights.pt (huggingface_hub's HfApi replaced by one that copies into a directory)."""
    import shutil

    import huggingface_hub

    from conftest import tiny_cfg

    calls = []

    class FakeApi:
        def create_repo(self, repo_id, exist_ok=False, private=False):
            calls.append(("create", repo_id, private))

        def upload_folder(self, repo_id, folder_path, commit_message=""):
            calls.append(("upload", repo_id))
            shutil.copytree(folder_path, tmp_path / "hub" / repo_id)

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    cc = CrossCoder(tiny_cfg())
    assert cc.push_to_hub("me/my-crosscoder", private=True) == "me/my-crosscoder"
    assert calls == [("create", "me/my-crosscoder", True), ("upload", "me/my-crosscoder")]
    back = CrossCoder.load_from_hf(str(tmp_path / "hub" / "me/my-crosscoder"), path=cc.cfg["hook_point"])
    torch.testing.assert_close(back.W_enc, cc.W_enc, atol=0, rtol=0)


def dfc_training_dir(directory, tamper=False):
    """A training run of the DFC authors' fork (superkaiba/dfc_learning) as its training.py leaves
    it: config.json holding the trainer's config (dict_class_kwargs as strings) and model_final.pt,
    a torch.save of the state dict with its _partition_config; 8 of the 48 latents exclusive to
    each model, their other model's weights zero."""
    state = their_files(directory / "tmp", batchtopk=True, normalised=False)
    for m, block in ((1, slice(0, 8)), (0, slice(8, 16))):  # model A's block, then model B's
        state["encoder.weight"][m, :, block] = 0
        state["decoder.weight"][m, block] = 0
    if tamper:
        state["decoder.weight"][1, 3, 0] = 1e-4
    state["_partition_config"] = {"dict_size": F, "model_a_exclusive_pct": 1 / 6, "model_b_exclusive_pct": 1 / 6}
    torch.save(state, directory / "model_final.pt")
    trainer = {"dict_class": "DedicatedFeatureBatchTopKCrossCoder", "layer": 13, "k": 4,
               "dict_class_kwargs": {"model_a_exclusive_pct": str(1 / 6), "model_b_exclusive_pct": str(1 / 6)}}
    (directory / "config.json").write_text(json.dumps({"trainer": trainer, "buffer": {}}))
    return state


def test_a_dedicated_feature_crosscoder_of_the_dfc_authors_loads_with_its_partition(tmp_path):
    from crossdiff.arch.partition import PartitionError
    from crossdiff.diffing.classes import latent_classes

    state = dfc_training_dir(tmp_path)
    cc = CrossCoder.load_from_hf(str(tmp_path))
    assert cc.partition.exclusive == 8 and cc.cfg["exclusive_fraction"] == 1 / 6 and cc.cfg["k"] == 4
    assert cc.verify_partition()["forbidden"] == 0
    classes = latent_classes(cc)
    assert classes["base_only"].nonzero().flatten().tolist() == list(range(8))
    assert classes["chat_only"].nonzero().flatten().tolist() == list(range(8, 16))
    x = torch.randn(64, M, D) * 4
    torch.testing.assert_close(cc.encode(x), their_forward(state, x, True)[1], rtol=1e-4, atol=1e-5)
    dfc_training_dir(tmp_path / "broken", tamper=True)
    with pytest.raises(PartitionError, match="largest forbidden weight 0.0001"):
        CrossCoder.load_from_hf(str(tmp_path / "broken"))
