"""Settings of the running process: the libraries' progress bars, glibc's malloc, and the
signal handlers that turn Ctrl-C and SIGTERM into a saved checkpoint.
"""
import signal
import threading


# ---------------------------------------------------------------------------- environment
def library_progress(show):
    """transformers' and the hub's own progress bars (loading weights, dequantizing a GGUF) off
    when the config's `progress` is: a run logged to a file then prints one line per step, not
    bars. With show, they stay as the environment set them (HF_HUB_DISABLE_PROGRESS_BARS).
    Process-wide, so the scripts call it, not the library."""
    if show:
        return
    import huggingface_hub.utils
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    huggingface_hub.utils.disable_progress_bars()


def keep_freed_memory():
    """On Linux/glibc, stop malloc from handing large freed blocks back to the OS. By default
    every block over 32 MB is unmapped when freed, so each step's fresh [B, F] temporaries are
    page-faulted in again: 7-10% of a CPU step at the Gemma shape. Process-wide, so the scripts
    call it (train.py, tools/bench.py on CPU), not the library. Returns False where it does not apply."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's mallopt parameter numbers
        return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1))
    except (OSError, AttributeError):  # not glibc
        return False


def install_stop_handlers(on_signal):
    """Route SIGINT and SIGTERM to on_signal(signum); returns the handlers they replaced (None
    outside the main thread, where Python cannot set handlers)."""
    if threading.current_thread() is not threading.main_thread():
        return None
    old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    for s in old:
        signal.signal(s, lambda signum, frame: on_signal(signum))
    return old


def restore_handlers(old):
    """Put back the handlers install_stop_handlers replaced."""
    for s, handler in (old or {}).items():
        signal.signal(s, handler)
