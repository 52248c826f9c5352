"""Settings of the running process (crossdiff/scale/process.py): malloc and the libraries' bars."""
from pathlib import Path

import pytest

from crossdiff.scale import process


@pytest.mark.opt_in
def test_keep_freed_memory_keeps_a_freed_large_block_resident(tmp_path):
    """Without it glibc unmaps a freed 256 MB tensor at once (resident memory drops back); with
    it the block stays in the heap for the next step to reuse without page faults."""
    import subprocess
    import sys

    probe = (
        "import sys, torch\n"
        "from utils import keep_freed_memory\n"
        "if sys.argv[1] == '1': assert keep_freed_memory()\n"
        "rss = lambda: int(open('/proc/self/statm').read().split()[1]) * 4096 / 2**20\n"
        "before = rss(); t = torch.ones(64 * 2**20); during = rss(); del t; after = rss()\n"
        "print(during - before, after - before)\n")
    grown = {}
    for flag in ("0", "1"):
        out = subprocess.run([sys.executable, "-c", probe, flag], capture_output=True, text=True,
                             cwd=Path(__file__).resolve().parents[1], timeout=120)
        assert out.returncode == 0, out.stderr
        grown[flag] = [float(v) for v in out.stdout.split()]
    assert grown["0"][0] > 200 and grown["0"][1] < 50  # default: returned to the OS
    assert grown["1"][0] > 200 and grown["1"][1] > 200  # kept


def test_progress_false_silences_the_bars_transformers_and_the_hub_draw(capsys):
    """library_progress(False): the tqdm that transformers (loading weights, dequantizing a GGUF)
    and huggingface_hub draw writes nothing; library_progress(True) leaves them drawing."""
    import huggingface_hub.utils
    from transformers.utils import logging as hf_logging

    def drawn():
        for bar in (hf_logging.tqdm, huggingface_hub.utils.tqdm):
            for _ in bar(range(3), desc="loading", disable=False):
                pass
        return capsys.readouterr().err

    try:
        process.library_progress(True)
        assert drawn().count("loading") >= 2
        process.library_progress(False)
        assert drawn() == ""
    finally:
        hf_logging.enable_progress_bar()
        huggingface_hub.utils.enable_progress_bars()
