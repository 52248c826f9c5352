"""Files on disk: where versions live, atomic writes, safe reads, finding the newest (the
published formats others' crosscoders come in are io/hub.py's).

Layout (the reference's): <checkpoint_dir>/version_N/{k}.pt (weights), {k}_cfg.json (config,
written last: its presence marks checkpoint k complete; it records the training step) and, from
training, {k}_trainer.pt (and {k}_trainer_rank{r}.pt for each further data-parallel rank). Every
other file asks this one.
"""
import errno
import functools
import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import NamedTuple

import torch

REPO_DIR = Path(__file__).resolve().parents[2]  # crossdiff/io/ -> the repository
DEFAULT_CHECKPOINT_DIR = REPO_DIR / "checkpoints"
DEFAULT_DATA_DIR = REPO_DIR / "data"


class CheckpointError(ValueError):
    """A checkpoint file or its config is missing, unreadable or inconsistent."""


class CheckpointFiles(NamedTuple):
    weights: Path
    cfg: Path
    trainer: Path
    sums: Path  # the sha256 of the weights and the trainer state, as `sha256sum -c` reads them


def checkpoint_files(version_dir, k):
    """The files of checkpoint k in version_dir."""
    d = Path(version_dir)
    return CheckpointFiles(weights=d / f"{k}.pt", cfg=d / f"{k}_cfg.json", trainer=d / f"{k}_trainer.pt",
                           sums=d / f"{k}.sha256")


# ---------------------------------------------------------------- integrity
def file_sha256(path, chunk=2**24):
    """The sha256 of a file's bytes, read a chunk at a time (about 0.6 s per GB here)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def write_sums(sums_path, files):
    """sums_path lists each file's sha256 and name (`sha256sum -c` checks them), written atomically."""
    atomic_write_text(sums_path, "".join(f"{file_sha256(f)}  {Path(f).name}\n" for f in files))


def verify_sums(sums_path, names):
    """A CheckpointError naming the first of the files `names` (beside sums_path) whose bytes no
    longer have the sha256 recorded there. Files it does not list, or no sums file (written before
    checkpoints had one), are not checked."""
    sums_path = Path(sums_path)
    if not sums_path.is_file():
        return
    recorded = dict(reversed(line.split(None, 1)) for line in sums_path.read_text().splitlines() if line.strip())
    for name in names:
        if name in recorded and file_sha256(sums_path.parent / name) != recorded[name]:
            raise CheckpointError(f"{sums_path.parent / name}: its sha256 differs from the one recorded in {sums_path} "
                                  "when it was written: the file is damaged; use an earlier checkpoint")


def trainer_states(version_dir):
    """The trainer-state files present in version_dir, any k."""
    return sorted(Path(version_dir).glob("*_trainer.pt"))


def rank_state_file(version_dir, k, rank):
    """Checkpoint k's data state of data-parallel rank >= 1 (its buffer, pointers and shuffling
    RNG); rank 0's is in the trainer state."""
    return Path(version_dir) / f"{k}_trainer_rank{rank}.pt"


def rank_states(version_dir):
    """The rank data-state files present in version_dir, any k and rank."""
    return sorted(Path(version_dir).glob("*_trainer_rank*.pt"))


SHARD_STATE = ("optimizer", "steps_since_fired")  # split over the latents: each shard's, in its rank file


def read_trainer_state(version_dir, k, rank=0, world_size=1, shard_index=0):
    """The trainer state rank `rank` of a run with world_size processes resumes checkpoint k
    from: the run's state (rank 0's), with this rank's own data state when the checkpoint has one
    from a run of the same size ("buffer": None when it is missing: fresh buffers), and with its
    shard's Adam state and counters when the dictionary is split over the latents (shard s's are
    in the file of rank s, the first data group's)."""
    files = checkpoint_files(version_dir, k)
    trainer_file = files.trainer
    if not trainer_file.is_file():
        raise FileNotFoundError(f"cannot resume: {trainer_file} (optimizer and data state) is missing")
    verify_sums(files.sums, [trainer_file.name])
    state = _read_state(trainer_file)
    if rank > 0 and state.get("world_size", 1) == world_size:
        own = rank_state_file(version_dir, k, rank)
        state["buffer"] = _read_state(own)["buffer"] if own.is_file() else None
    if shard_index > 0:
        shard_state = _read_state(rank_state_file(version_dir, k, shard_index))
        state.update({key: shard_state[key] for key in SHARD_STATE})
    return state


def sequences_read(version_dir, cfg=None):
    """How many token sequences the run in version_dir had read at its newest checkpoint (wraps
    included, so it can exceed the dataset): the saved config's record, else its trainer state's
    pointers (read through a memory map: its buffer is never loaded); None when neither says."""
    if version_dir is None:
        return None
    k = latest_checkpoint(version_dir)
    cfg = read_cfg(version_dir, k) if cfg is None else cfg
    if cfg.get("sequences_read") is not None:
        return int(cfg["sequences_read"])
    trainer_file = checkpoint_files(version_dir, k).trainer
    if not trainer_file.is_file():
        return None
    state = torch.load(trainer_file, map_location="cpu", weights_only=True, mmap=True)
    buffer_state = state.get("buffer")
    if not buffer_state or "sequences_run" not in buffer_state:
        return None
    return int(state.get("sequence_offset", 0)) + int(state.get("world_size", 1)) * int(buffer_state["sequences_run"])


def prune_trainer_states(version_dir, k, world_size):
    """Delete the trainer and rank states of every checkpoint but k (they hold buffers: large)."""
    keep = {checkpoint_files(version_dir, k).trainer, *(rank_state_file(version_dir, k, r) for r in range(1, world_size))}
    for old in trainer_states(version_dir) + rank_states(version_dir):
        if old not in keep:
            old.unlink()


def _read_state(path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path}: cannot read the trainer state ({type(e).__name__}: {e})") from None


def read_cfg(version_dir, k=None):
    """The config saved with checkpoint k (the newest complete one when None)."""
    k = latest_checkpoint(version_dir) if k is None else k
    path = checkpoint_files(version_dir, k).cfg
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not a valid JSON config ({e})") from None


def load_mapped(path):
    """torch.load of a tensor file, memory-mapped where its format allows (every rank of a run then
    shares the page cache instead of holding its own copy: 4 GB each at the reference's dataset);
    files saved before torch's zip format are read whole."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as e:
        if "mmap" not in str(e):
            raise
        return torch.load(path, map_location="cpu", weights_only=True)


def data_dir(cfg=None):
    """Where downloads and the toy pair are cached: cfg["data_dir"], or data/ beside the code."""
    d = (cfg or {}).get("data_dir")
    return Path(d) if d else DEFAULT_DATA_DIR


def checkpoint_root(cfg):
    """Where versions live: cfg["checkpoint_dir"], or checkpoints/ beside the code."""
    root = cfg.get("checkpoint_dir")  # None or absent (a loaded published config): beside the code
    return Path(root) if root else DEFAULT_CHECKPOINT_DIR


def check_checkpoint_dir(cfg, resume_dir=None):
    """Before anything loads: the directory checkpoints will be written to (a resume's version
    directory, else the checkpoint root) exists or can be made, and takes a file. A CheckpointError
    naming the key and the reason, not a failure at the first save."""
    where = Path(resume_dir) if resume_dir is not None else checkpoint_root(cfg)
    try:
        where.mkdir(parents=True, exist_ok=True)
        probe = where / f".write_check_{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        key = "--resume" if resume_dir is not None else "config key 'checkpoint_dir'"
        raise CheckpointError(f"{key}: cannot write checkpoints into {where} ({type(e).__name__}: "
                              f"{e.strerror or e}); give a writable directory") from None
    return where


def next_version_dir(cfg, prefix="version"):
    """Create and return the next free version_N (or {prefix}_N) under the config's checkpoint root."""
    root = checkpoint_root(cfg)
    root.mkdir(parents=True, exist_ok=True)
    used = [int(p.name.split("_")[-1]) for p in root.glob(f"{prefix}_*") if p.name.split("_")[-1].isdigit()]
    version = max(used, default=-1) + 1
    while True:  # mkdir without exist_ok: two runs starting together never share a version
        try:
            (root / f"{prefix}_{version}").mkdir()
            return root / f"{prefix}_{version}"
        except FileExistsError:
            version += 1


def next_sweep_dir(cfg):
    """The next free sweep_N under the checkpoint root: a sweep's members are its version_i."""
    return next_version_dir(cfg, prefix="sweep")


PARAM_NAMES = ("W_enc", "W_dec", "b_enc", "b_dec")  # a crosscoder's parameters, the reference's names


def read_crosscoder(cfg_path, weights_path, mmap=False, verify=True):
    """(cfg, state) of one of our checkpoints or the reference's published one, read safely: an
    unreadable or unexpected file is a CheckpointError (or FileNotFoundError) naming it; the configs
    of older versions are completed with what their weights imply. mmap: map the weights (a shard
    then reads only its slices). verify: the weights against the checkpoint's recorded sha256."""
    for p in (cfg_path, weights_path):
        if not Path(p).is_file():
            raise FileNotFoundError(f"checkpoint file not found: {p}")
    weights_path = Path(weights_path)
    if verify:
        verify_sums(weights_path.with_suffix(".sha256"), [weights_path.name])
    try:
        cfg = json.loads(Path(cfg_path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{cfg_path}: not a valid JSON config ({e})") from None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{cfg_path}: config must be a JSON object")
    try:  # weights_only: loading a checkpoint never executes pickled code
        state = torch.load(weights_path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:
        raise CheckpointError(f"{weights_path}: cannot read weights ({type(e).__name__}: {e})") from None
    if not isinstance(state, dict) or not set(PARAM_NAMES) <= set(state):
        keys = sorted(state) if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"{weights_path}: expected tensors {list(PARAM_NAMES)}, found {keys}")
    cfg.setdefault("d_in", state["W_enc"].shape[1])  # the first published cfg.json had no d_in
    cfg.setdefault("n_models", state["W_enc"].shape[0])
    cfg.setdefault("architecture", "l1")  # configs from before BatchTopK, the reference's included
    for key in ("dict_size", "enc_dtype"):
        if key not in cfg:
            raise CheckpointError(f"{cfg_path}: config is missing required key '{key}'")
    return cfg, state


def write_checkpoint(version_dir, k, weights, cfg, trainer_state=None):
    """Checkpoint k: weights, trainer state (when given), their sha256 and the config, each
    atomically, the config last, so its presence marks the checkpoint complete. Returns the
    weights file's path."""
    for stale in Path(version_dir).glob(".*.tmp"):  # left by a save that was killed mid-write
        stale.unlink(missing_ok=True)
    files = checkpoint_files(version_dir, k)
    atomic_torch_save(weights, files.weights)
    if trainer_state is not None:
        atomic_torch_save(trainer_state, files.trainer)
    write_sums(files.sums, [files.weights] + [files.trainer] * (trainer_state is not None))
    atomic_write_text(files.cfg, json.dumps(jsonable(cfg), indent=2))
    return files.weights


def jsonable(obj):
    """The config as JSON: tensors and paths become lists and strings."""
    if isinstance(obj, dict):
        return {k: jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, torch.dtype):
        return str(obj)
    return obj


@functools.cache
def _umask():  # read once (setting it for a moment), not at import
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _atomic_write(path, write_fn):
    """Write to a temporary file in the same directory, fsync, then rename over path: an
    interrupted or failed write leaves any previous file at path untouched."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; checkpoints are shared like any file
        with os.fdopen(fd, "wb") as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        # torch.save reports a full disk (ENOSPC) as a RuntimeError ("unexpected pos ..."): every
        # failed write is one OSError here, naming the file and its disk, that the callers catch.
        if isinstance(e, (RuntimeError, OSError)):
            raise write_error(path, e) from None
        raise


def write_error(path, e):
    """An OSError naming the file that could not be written, its disk and how full it is."""
    try:
        usage = shutil.disk_usage(Path(path).parent)
        free = f"{usage.free / 2**20:,.1f} MiB free of {usage.total / 2**30:,.1f} GiB"
    except OSError:
        free = "free space unknown"
    return OSError(getattr(e, "errno", None) or errno.EIO,
                   f"could not write {path} ({type(e).__name__}: {e}); its disk has {free}")


WRITE_BYTES_PER_S = 25e6  # a slow network disk's write rate: what a checkpoint's write is given time for


def atomic_torch_save(obj, path):
    _atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_text(path, text):
    _atomic_write(path, lambda f: f.write(text.encode()))


def staging_dir(target, allowed, keep=None):
    """An empty directory beside target for a whole directory's files (a killed writer's is
    cleared, unless keep(it) says to go on from it), once target is checked to be absent or to
    hold only files whose names match the regex `allowed` (else a FileExistsError naming it):
    swap_in puts it in target's place."""
    target = Path(target)
    work, old = target.parent / f".{target.name}.partial", target.parent / f".{target.name}.old"
    if not target.exists() and old.exists():  # killed inside swap_in: the previous one goes back
        os.rename(old, target)
    if target.exists():
        other = [q.name for q in target.iterdir() if not re.fullmatch(allowed, q.name)] if target.is_dir() else [""]
        if other:
            raise FileExistsError(f"{target} holds other files ({', '.join(sorted(other)[:3])}): choose an empty or "
                                  "new directory")
    target.parent.mkdir(parents=True, exist_ok=True)
    if keep is not None and work.is_dir() and keep(work):
        return work
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    return work


def swap_in(work, target):
    """The finished directory work takes target's place: a reader sees the old one or the new
    one, never a mix (one that holds old files open keeps reading them)."""
    work, target = Path(work), Path(target)
    old = target.parent / f".{target.name}.old"
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        os.rename(target, old)
    os.rename(work, target)
    shutil.rmtree(old, ignore_errors=True)
    return target


def resolve_version_dir(version_dir):
    """A path that exists, else a name or number under the default checkpoints/ folder."""
    p = Path(str(version_dir))
    if not p.exists() and not p.is_absolute():
        name = f"version_{version_dir}" if str(version_dir).isdigit() else str(version_dir)
        p = DEFAULT_CHECKPOINT_DIR / name
    if not p.is_dir():
        raise FileNotFoundError(f"checkpoint directory not found: {version_dir}")
    return p


def complete_checkpoints(version_dir):
    """Save indices k in version_dir whose weights and config are both present, sorted."""
    version_dir = Path(version_dir)
    ks = []
    for cfg_file in version_dir.glob("*_cfg.json"):
        k = cfg_file.name[: -len("_cfg.json")]
        if k.isdigit() and checkpoint_files(version_dir, k).weights.is_file():
            ks.append(int(k))
    return sorted(ks)


def latest_checkpoint(version_dir):
    ks = complete_checkpoints(version_dir)
    if not ks:
        raise FileNotFoundError(f"no complete checkpoint (k.pt + k_cfg.json) in {version_dir}")
    return ks[-1]


def latest_version_dir(root=None):
    """The highest-numbered version_N under root (default checkpoints/) that has a checkpoint."""
    root = Path(root) if root else DEFAULT_CHECKPOINT_DIR
    versions = []
    for p in root.glob("version_*"):
        suffix = p.name.split("_", 1)[1]
        if suffix.isdigit() and complete_checkpoints(p):
            versions.append((int(suffix), p))
    if not versions:
        raise FileNotFoundError(f"no checkpoint found under {root}")
    return max(versions)[1]


def member_dirs(sweep_dir):
    """The members' version directories, in the sweep's order (sweep.json)."""
    manifest = json.loads((Path(sweep_dir) / "sweep.json").read_text())
    return [Path(sweep_dir) / m["dir"] for m in manifest["members"]]
