"""Shared fixtures: tiny seeded models and configs. The hub is never reached from tests."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pytest  # noqa: E402
import torch  # noqa: E402

if os.environ.get("PYTEST_XDIST_WORKER"):  # pytest-xdist's workers share the cores: one thread each
    os.environ["OMP_NUM_THREADS"] = "1"  # and in every script a test starts
    torch.set_num_threads(1)


# a toy run (and its analysis); full-width Gemma-2; the two-process runs
SLOW_FIXTURES = {"toy_run", "toy_analysis", "tiny_gemma_dirs", "two_rank_runs"}


def pytest_addoption(parser):
    parser.addoption("--opt-in", action="store_true",
                     help="also run the opt-in tests (marked opt_in: they check a platform's behaviour, not ours)")


def pytest_collection_modifyitems(config, items):
    """Tests that use a slow fixture, or launch torchrun (several seconds each), are marked slow
    (`pytest -m "not slow"`: the fast loop). Tests marked opt_in run only with --opt-in. The
    tests that wait for the background toy run go last."""
    import inspect

    run_opt_in = config.getoption("--opt-in")
    # The tests that wait for the background toy run last (a stable sort: the same order in every
    # pytest-xdist worker), so that the workers run the others while it trains.
    items.sort(key=lambda item: bool({"toy_run", "toy_analysis"} & set(getattr(item, "fixturenames", ()))))
    for item in items:
        if "opt_in" in item.keywords and not run_opt_in:
            item.add_marker(pytest.mark.skip(reason="opt-in (glibc's allocator, not this repo): pytest --opt-in"))
        launches = "torchrun(" in inspect.getsource(getattr(item, "function", lambda: None))
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())) or launches:
            item.add_marker(pytest.mark.slow)


def tiny_cfg(tmp_path=None, **overrides):
    """A complete, valid training config at toy size, writing under tmp_path."""
    from crossdiff.config.schema import DEFAULTS

    cfg = dict(DEFAULTS, d_in=32, dict_size=64, seq_len=9, batch_size=32, buffer_mult=8,
               num_tokens=32 * 20, lr=1e-3, model_batch_size=4, log_every=5, save_every=1000,
               hook_point="blocks.1.hook_resid_pre", norm_estimate_batches=2, device="cpu",
               wandb_mode="disabled", progress=False, model_names=["a", "b"], model_name="a", seed=0)
    if tmp_path is not None:
        cfg["checkpoint_dir"] = str(tmp_path / "checkpoints")
        cfg["data_dir"] = str(tmp_path / "data")
    cfg.update(overrides)
    return cfg


# Exactly the keys of the reference replication's config dict (its train.py), at toy size: its
# notebooks and scripts build CrossCoder, Buffer and Trainer from such a dict.
REFERENCE_KEYS = ("seed", "batch_size", "buffer_mult", "lr", "num_tokens", "l1_coeff", "beta1", "beta2", "d_in",
                  "dict_size", "seq_len", "enc_dtype", "model_name", "site", "device", "model_batch_size", "log_every",
                  "save_every", "dec_init_norm", "hook_point", "wandb_project", "wandb_entity")


def reference_cfg(**overrides):
    """A config with the reference's keys only (values at toy size, its l1_coeff an int as there)."""
    cfg = {"seed": 49, "batch_size": 32, "buffer_mult": 8, "lr": 5e-5, "num_tokens": 32 * 6, "l1_coeff": 2,
           "beta1": 0.9, "beta2": 0.999, "d_in": 32, "dict_size": 64, "seq_len": 9, "enc_dtype": "fp32",
           "model_name": "gemma-2-2b", "site": "resid_pre", "device": "cpu", "model_batch_size": 4, "log_every": 100,
           "save_every": 30000, "dec_init_norm": 0.08, "hook_point": "blocks.1.hook_resid_pre",
           "wandb_project": "YOUR_WANDB_PROJECT", "wandb_entity": "YOUR_WANDB_ENTITY"}
    assert tuple(cfg) == REFERENCE_KEYS
    cfg.update(overrides)
    return cfg


def tiny_model(seed, d_model=32, n_layers=2, d_vocab=50, n_ctx=16, **kw):
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig(n_layers=n_layers, d_model=d_model, d_head=8, n_heads=d_model // 8,
                                  d_mlp=2 * d_model, n_ctx=n_ctx, d_vocab=d_vocab, act_fn="gelu",
                                  normalization_type="LN", seed=seed, **kw)
    return HookedTransformer(cfg).eval()


def random_tokens(n_seqs, seq_len, d_vocab=50, seed=0, bos=0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, d_vocab, (n_seqs, seq_len), generator=g)
    tokens[:, 0] = bos
    return tokens


def assert_buffer_resumes_identically(cfg, models, tokens, served=5, compared=12):
    """A buffer rebuilt from the state saved after `served` batches serves the next `compared`
    batches exactly as the original does."""
    from buffer import Buffer

    buf = Buffer(cfg, models[0], models[1], tokens)
    for _ in range(served):
        buf.next()
    state = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in buf.state_dict().items()}
    expected = [buf.next() for _ in range(compared)]
    restored = Buffer(cfg, models[0], models[1], tokens, state=state)
    for want in expected:
        assert torch.equal(restored.next(), want)


@pytest.fixture
def models():
    return tiny_model(1), tiny_model(2)


def tiny_gemma2_hf(n_layers=3, vocab_size=1000, seed=0):
    """A random-init transformers Gemma2ForCausalLM at Gemma-2-2b width (2304, 8 heads of 256,
    MLP 9216) with few layers and a small vocabulary, and a word-level tokenizer for it."""
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers import models as tk_models
    from transformers import Gemma2Config, Gemma2ForCausalLM, PreTrainedTokenizerFast

    hf_cfg = Gemma2Config(vocab_size=vocab_size, hidden_size=2304, intermediate_size=9216,
                          num_hidden_layers=n_layers, num_attention_heads=8, num_key_value_heads=4,
                          head_dim=256, max_position_embeddings=8192, query_pre_attn_scalar=256,
                          sliding_window=4096, final_logit_softcapping=30.0, attn_logit_softcapping=50.0)
    torch.manual_seed(seed)
    hf = Gemma2ForCausalLM(hf_cfg).eval()
    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, **{f"w{i}": i for i in range(4, vocab_size)}}
    tk = Tokenizer(tk_models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<bos>", eos_token="<eos>",
                                  pad_token="<pad>", unk_token="<unk>")
    return hf, tok


def gemma2_tiny_vocab(tmp_path, n_layers=3, vocab_size=1000, seed=0):
    """A random-init Gemma-2 model at Gemma-2-2b width through the real conversion path:
    transformers' Gemma2ForCausalLM -> HookedTransformer.from_pretrained("gemma-2-2b", hf_model=...),
    with a word-level tokenizer saved to and reloaded from tmp_path (no hub access)."""
    from transformer_lens import HookedTransformer
    from transformers import PreTrainedTokenizerFast

    hf, tok = tiny_gemma2_hf(n_layers, vocab_size, seed)
    tok.save_pretrained(tmp_path / "tokenizer")
    tok = PreTrainedTokenizerFast.from_pretrained(tmp_path / "tokenizer")
    model = HookedTransformer.from_pretrained("gemma-2-2b", hf_model=hf, tokenizer=tok,
                                              first_n_layers=n_layers, device="cpu")
    return hf, model.eval()


def shared_root(tmp_path_factory):
    """The session's base temporary directory, the same in every pytest-xdist worker."""
    root = tmp_path_factory.getbasetemp()
    return root.parent if os.environ.get("PYTEST_XDIST_WORKER") else root  # the workers' bases share it


def shared_dir(tmp_path_factory, name, build):
    """A directory built once per test session, also when pytest-xdist runs the tests in several
    worker processes: the first worker to ask builds it under a file lock, the others wait for
    it and read it. build(path) fills the directory; a build that raises leaves nothing."""
    import shutil

    from filelock import FileLock

    root = shared_root(tmp_path_factory)
    path, done = root / name, root / f"{name}.done"
    with FileLock(str(root / f"{name}.lock")):
        if not done.exists():
            shutil.rmtree(path, ignore_errors=True)
            path.mkdir()
            build(path)
            done.touch()
    return path


@pytest.fixture(scope="session")
def tiny_gemma_dirs(tmp_path_factory):
    """Local copies of a tiny Gemma-2 pair, as transformers' save_pretrained writes them, in
    directories named like the real ones (gemma-2-2b, gemma-2-2b-it): 2 layers at full width,
    vocabulary 1000; the chat model's second MLP is scaled so that the two differ. Returns the
    two paths and the HF models (read back from them)."""
    from transformers import Gemma2ForCausalLM

    names = ("gemma-2-2b", "gemma-2-2b-it")

    def build(root):
        base, tok = tiny_gemma2_hf(n_layers=2, seed=0)
        chat, _ = tiny_gemma2_hf(n_layers=2, seed=0)
        with torch.no_grad():
            chat.model.layers[1].mlp.down_proj.weight.mul_(1.5)
        for name, hf in zip(names, (base, chat)):
            hf.save_pretrained(root / name)
            tok.save_pretrained(root / name)

    root = shared_dir(tmp_path_factory, "gemma_pair", build)
    paths = [str(root / name) for name in names]
    return paths, [Gemma2ForCausalLM.from_pretrained(p).eval() for p in paths]


REPO = Path(__file__).resolve().parents[1]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*args, nproc=2, timeout=300):
    """torchrun --nproc_per_node=nproc ARGS in the repo, one thread per process, killed (the whole
    process group) if it runs past timeout."""
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TQDM_DISABLE="1",
               CUDA_VISIBLE_DEVICES="")
    if args[0].startswith("tools/"):  # a research tool runs as a module of the repository
        args = ("-m", args[0][:-3].replace("/", "."), *args[1:])
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={free_port()}",
           *args]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        proc.communicate()
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def script_command(script):
    """How a user starts a script: `python train.py` at the top, `python -m tools.bench` for
    tools/bench.py (a research tool imports the package from the repository)."""
    return [sys.executable, script] if "/" not in script else [sys.executable, "-m", script[:-3].replace("/", ".")]


def run_script(script, *args, timeout=600):
    """Run one of the repo's scripts as a user would, offline, on the CPU."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", CUDA_VISIBLE_DEVICES="", TQDM_DISABLE="1")
    return subprocess.run([*script_command(script), *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


def _script_output(root, name, out=None):
    """Keep a script's result in root (out given) or read it back, as a CompletedProcess."""
    if out is not None:
        (root / f"{name}.stdout").write_text(out.stdout)
        (root / f"{name}.stderr").write_text(out.stderr)
        return out
    return subprocess.CompletedProcess([], 0, (root / f"{name}.stdout").read_text(), (root / f"{name}.stderr").read_text())


# `python train.py --preset toy` at its defaults, then `python analysis.py` on its checkpoint: the
# suite's longest chain (1-3 minutes on one core). It starts in the background as soon as the
# tests are collected, so that the workers run other tests meanwhile; the toy_run and
# toy_analysis fixtures wait for their step.
TOY_JOBS = (("train", ["train.py", "--preset", "toy", "--checkpoint_dir", "{root}/checkpoints", "--data_dir",
                       "{root}/data", "--wandb_mode", "disabled"]),
            ("analysis", ["analysis.py", "--checkpoint", "{root}/checkpoints/version_0", "--ranked", "false"]))
_RUN_JOBS = """import json, os, subprocess, sys
root, jobs = sys.argv[1], json.loads(sys.argv[2])
for name, args in jobs:
    with open(f"{root}/{name}.stdout", "w") as out, open(f"{root}/{name}.stderr", "w") as err:
        try:
            code = subprocess.run([sys.executable, *[a.format(root=root) for a in args]], stdout=out, stderr=err,
                                  timeout=900).returncode
        except subprocess.TimeoutExpired:
            code = 124
    with open(f"{root}/{name}.rc.tmp", "w") as f:
        f.write(str(code))
    os.replace(f"{root}/{name}.rc.tmp", f"{root}/{name}.rc")
    if code:
        break
"""
_background = []  # the job this process started (stopped if its session is interrupted)


def start_toy_jobs(root):
    """Start TOY_JOBS in root/toy_run unless a process of this session already has."""
    from filelock import FileLock

    path = root / "toy_run"
    with FileLock(str(root / "toy_run.lock")):
        if path.exists():
            return path
        path.mkdir()
        env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", CUDA_VISIBLE_DEVICES="", TQDM_DISABLE="1")
        _background.append(subprocess.Popen([sys.executable, "-c", _RUN_JOBS, str(path), json.dumps(TOY_JOBS)],
                                            cwd=REPO, env=env, start_new_session=True))
    return path


def pytest_collection_finish(session):
    if any({"toy_run", "toy_analysis"} & set(getattr(item, "fixturenames", ())) for item in session.items):
        start_toy_jobs(shared_root(session.config._tmp_path_factory))


def pytest_sessionfinish(session, exitstatus):
    """An interrupted session stops the background job it started. Otherwise it is left to end
    by itself (each step has a timeout): a worker's session may end while another worker still
    waits for the job."""
    if exitstatus == pytest.ExitCode.INTERRUPTED:
        for proc in _background:
            if proc.poll() is None:
                os.killpg(proc.pid, 9)
                proc.wait()


def toy_job(tmp_path_factory, name, timeout=900):
    """The result of one of TOY_JOBS, once it has run (started here if no one has)."""
    import time

    path = start_toy_jobs(shared_root(tmp_path_factory))
    deadline = time.time() + timeout
    while not (path / f"{name}.rc").exists():
        assert time.time() < deadline, f"the background toy {name} did not finish within {timeout} s"
        assert (name == "train" or not (path / "train.rc").exists() or (path / "train.rc").read_text() == "0"), \
            "the toy run failed: " + (path / "train.stderr").read_text()[-3000:]
        time.sleep(0.5)
    out = subprocess.CompletedProcess(TOY_JOBS, int((path / f"{name}.rc").read_text()),
                                      (path / f"{name}.stdout").read_text(), (path / f"{name}.stderr").read_text())
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    return out, path


@pytest.fixture(scope="session")
def toy_run(tmp_path_factory):
    """`python train.py --preset toy` at its defaults, once per test session. Returns (out,
    checkpoints, data)."""
    out, path = toy_job(tmp_path_factory, "train")
    return out, path / "checkpoints", path / "data"


@pytest.fixture(scope="session")
def toy_analysis(toy_run, tmp_path_factory):
    """`python analysis.py` on the toy run's checkpoint, once per test session. Returns (out, the
    analysis directory)."""
    out, path = toy_job(tmp_path_factory, "analysis")
    return out, path / "checkpoints" / "version_0" / "analysis"


# tests/dp_worker.py's specs, in two torchrun launches: the runs, then the resumes from the
# checkpoints the runs left (a new launch: resumed from disk alone).
TWO_RANK_RUNS = ("l1", "batchtopk", "diff_sae", "topk", "convert_tokens", "harvest", "shard@2", "shard@1", "partition@2", "partition@1", "sparse@2", "sparse@1", "straight@1", "half@1",
                 "straight@2", "half@2", "save_fails", "sweep_signal@1", "sweep_signal@2")
TWO_RANK_RESUMES = ("resume@1", "resume@2", "sweep_resume@1", "sweep_resume@2")


@pytest.fixture(scope="session")
def two_rank_runs(tmp_path_factory):
    """Every two-process mode of tests/dp_worker.py on 2 gloo processes, in two torchrun launches
    per test session. Returns (the directory of their results, the runs' stdout, the resumes')."""
    def build(root):
        for name, specs in (("runs", TWO_RANK_RUNS), ("resumes", TWO_RANK_RESUMES)):
            out = torchrun("tests/dp_worker.py", str(root), *specs, timeout=600)
            assert out.returncode == 0, name + out.stdout[-2000:] + out.stderr[-3000:]
            _script_output(root, name, out)

    root = shared_dir(tmp_path_factory, "two_rank", build)
    return root, _script_output(root, "runs").stdout, _script_output(root, "resumes").stdout
