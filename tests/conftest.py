import ctypes
import fcntl
import gc
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
# Under pytest-xdist (the default: pyproject's addopts) each of the two workers computes on one thread;
# run alone (-n 0), this process takes both of a 2-core machine's cores.
XDIST_WORKER = os.environ.get("PYTEST_XDIST_WORKER")
torch.set_num_threads(1 if XDIST_WORKER else min(2, os.cpu_count() or 1))


def keep_freed_memory_in_the_heap():
    """glibc serves every allocation above its mmap threshold (32 MiB at most by default) with fresh
    pages from the kernel and unmaps them on free, so each step's (rows, 50257) logits are page-faulted
    in and zeroed anew: a third of the suite's CPU time was the kernel's. The suite keeps freed memory
    in the heap instead (up to 1 GiB a process): glibc's variables for every process it starts (read
    at their start), mallopt for this one. Not glibc (musl, macOS): nothing to do."""
    settings = {"MALLOC_MMAP_THRESHOLD_": (-3, 1 << 30), "MALLOC_TRIM_THRESHOLD_": (-1, 1 << 30),
                "MALLOC_TOP_PAD_": (-2, 256 << 20)}  # mallopt's M_MMAP_THRESHOLD, M_TRIM_THRESHOLD, M_TOP_PAD
    libc = ctypes.CDLL(None)
    if not hasattr(libc, "mallopt") or not hasattr(libc, "gnu_get_libc_version"):
        return
    for variable, (parameter, value) in settings.items():  # the mmap threshold first: a glibc that
        if libc.mallopt(parameter, value) == 0:  # refuses it (older ones cap it at 32 MiB) gets none
            return
        os.environ.setdefault(variable, str(value))


keep_freed_memory_in_the_heap()


@pytest.hookimpl(optionalhook=True)  # pytest-xdist's hook: absent under -p no:xdist
def pytest_xdist_auto_num_workers(config):
    """-n auto: two workers at most. More would each hold torch and transformers, and the tests that
    start two ranks already use two cores."""
    return min(2, os.cpu_count() or 1)


def made_once(tmp_path_factory, name, make):
    """A directory `make(directory)` fills once per test session: in this process, or under
    pytest-xdist by the first worker that needs it, while any other waits on a lock and then reads it."""
    if not XDIST_WORKER:
        directory = tmp_path_factory.mktemp(name)
        make(directory)
        return directory
    session_dir = tmp_path_factory.getbasetemp().parent  # this session's, above each worker's own
    directory = session_dir / name
    with open(session_dir / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (session_dir / f"{name}.made").exists():  # a worker whose make() failed left none
            shutil.rmtree(directory, ignore_errors=True)
            directory.mkdir()
            make(directory)
            (session_dir / f"{name}.made").touch()
    return directory


@pytest.fixture
def shared_data():
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} is absent (it holds the public test data beside the checkout)")
    return SHARED_DATA


@pytest.fixture
def one_process_group():
    """A one-process gloo group, for the collective code run in-process."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def pytest_collection_modifyitems(items):
    """The tests that read the demo's run first: it is the suite's longest piece of work (50 s on one
    thread), and started first it overlaps everything else instead of ending the session alone."""
    items.sort(key=lambda item: "demo_run" not in getattr(item, "fixturenames", ()))


def pytest_collection_finish(session):
    """Everything imported so far (torch, transformers, the project: millions of objects) is moved out
    of the garbage collector's reach: each training run ends with a full gc.collect() (to join its
    process group's threads), which otherwise walks all of it, 0.2 s a run here."""
    gc.collect()
    gc.freeze()
