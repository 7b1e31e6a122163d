"""Thread-pool settings for torch, FAISS, OpenMP and BLAS, set once per process.

A process forked after torch or FAISS started their thread pools can hang, so Mercato
never forks after they load: worker processes are started with ``spawn`` (the
supervisor starts each service as a fresh interpreter). Call :func:`configure_threads`
first thing in a process, before torch / FAISS / numpy are imported, and again after
import to apply the limit to libraries that were already loaded.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import sys

_ENV_VARS = (
    "OMP_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "MKL_NUM_THREADS",
    "VECLIB_MAXIMUM_THREADS",
    "NUMEXPR_NUM_THREADS",
)

_configured: int | None = None


def configure_threads(threads: int = 1) -> int:
    """Limit every numeric library of this process to ``threads`` threads.

    Idempotent: the first call wins for the environment variables (they only matter
    before the libraries load); torch and FAISS limits are re-applied when loaded.
    Returns the thread count in force.
    """
    global _configured
    threads = max(1, int(threads))
    if _configured is None:
        for var in _ENV_VARS:
            os.environ[var] = str(threads)
        # Tokenizers / MKL-style libraries that read these at import time.
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        # Already set or a context started: keep what is there.
        with contextlib.suppress(RuntimeError):
            multiprocessing.set_start_method("spawn")
        _configured = threads
    if "torch" in sys.modules:
        import torch

        torch.set_num_threads(_configured)
        # Inter-op threads can only be set once, before any inter-op work started.
        with contextlib.suppress(RuntimeError):
            torch.set_num_interop_threads(_configured)
    if "faiss" in sys.modules:
        import faiss

        faiss.omp_set_num_threads(_configured)
    if "numpy" in sys.modules or "faiss" in sys.modules:
        # BLAS and OpenMP libraries already loaded read the environment variables above
        # at load time only: numpy's OpenBLAS, loaded by a service's imports before its
        # runtime calls this, would keep one thread per core, and its idle worker spins
        # between calls (it used twice the CPU of ranking's main thread under load, #14).
        from threadpoolctl import threadpool_limits

        threadpool_limits(limits=_configured)
    return _configured


def configured_threads() -> int | None:
    """The thread count set by :func:`configure_threads`, or None before it ran."""
    return _configured
