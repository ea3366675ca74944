"""Job-level parallelism on CPU: independent jobs on the intra-op threads, one thread each.

On a CPU, much of the engine's work is not one large BLAS call: dtype-converting copies of the
factors, batched ``R x R`` decompositions (fastest single-threaded, see
:func:`lorakit.lowrank.factored.small_work`), casts of the outputs, and skinny Gram products that
MKL barely speeds up with a second thread. Running whole independent jobs (chunks of modules,
tensors to check) side by side, each single-threaded, keeps every core busy through all of it.
While jobs run, torch's intra-op thread count is 1, and so is that of the BLAS libraries loaded
when the first parallel map ran, numpy's among them (through threadpoolctl; the engine's Gram
products run in numpy); both are process-wide and restored after. torch and numpy release the
GIL inside their kernels, so plain Python threads suffice.

Jobs run in parallel only on CPU, with more than one intra-op thread and at least
``MIN_JOBS_PER_WORKER`` jobs per worker; otherwise they run in order on the calling thread with
the usual multi-threaded kernels (so a few huge jobs still use every core).

Example:
    >>> list(parallel_map(lambda x: x * x, [1, 2, 3]))
    [1, 4, 9]
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager
from typing import TypeVar

import torch

MIN_JOBS_PER_WORKER = 2

J = TypeVar("J")
R = TypeVar("R")


def workers_for(n_jobs: int, device: torch.device | str = "cpu") -> int:
    """How many single-threaded workers ``n_jobs`` jobs get (1 means: run them in order).

    Example:
        >>> workers_for(1)
        1
    """
    if torch.device(device).type != "cpu":
        return 1
    threads = torch.get_num_threads()
    if threads <= 1 or n_jobs < MIN_JOBS_PER_WORKER * threads:
        return 1
    return threads


@functools.cache
def _blas_controller():  # type: ignore[no-untyped-def]
    """The BLAS libraries loaded so far, numpy's among them (found once: a scan takes about 3 ms;
    scipy.linalg is not imported for it, which would cost 0.17 s: the engine runs none of it)."""
    import numpy  # noqa: F401 - loads numpy's BLAS so the controller sees it
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController()


def single_threaded_blas() -> AbstractContextManager:
    """numpy's BLAS (and any other loaded then) limited to one thread inside the block (restored
    after).

    Example:
        >>> with single_threaded_blas():
        ...     pass
    """
    return _blas_controller().limit(limits=1, user_api="blas")


def parallel_map(fn: Callable[[J], R], jobs: Iterable[J], *,
                 device: torch.device | str = "cpu") -> Iterator[R]:
    """``fn`` over ``jobs``, results yielded in job order (see the module docstring for when the
    jobs run side by side). An exception in a job is raised here, at that job's turn.

    Example:
        >>> [r for r in parallel_map(str, range(3))]
        ['0', '1', '2']
    """
    jobs = list(jobs)
    n = workers_for(len(jobs), device)
    if n == 1:
        for job in jobs:
            yield fn(job)
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with (single_threaded_blas(),
              ThreadPoolExecutor(max_workers=n, thread_name_prefix="lorakit") as pool):
            futures = [pool.submit(fn, job) for job in jobs]
            try:
                for fut in futures:
                    yield fut.result()
            finally:
                for fut in futures:
                    fut.cancel()
    finally:
        torch.set_num_threads(threads)
