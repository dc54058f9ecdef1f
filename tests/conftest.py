import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # plugin_stages for engine tests
# Before torch loads OpenMP. `make test` runs two pytest processes on 2 cores, so one OpenMP thread each (children
# inherit it). Two quickstart trainings side by side took 9 s with one thread each, 41 s with two spinning threads
# each and 227 s with two passive ones (this file's old setting): two-thread pools that share cores stall each other.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    """Run inside a temporary working directory (runs/ lands there)."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: a second torch thread only adds sync cost, and spins badly on a shared 2-core machine."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def triton(tmp_path_factory):
    """A real Triton (nvidia-pytriton's binary) serving the tiny model, portable flavour, dynamic batching on."""
    from servers import triton_with_tiny

    with triton_with_tiny(tmp_path_factory.mktemp("triton")) as served:
        yield served


@pytest.fixture(scope="module")
def torchserve(tmp_path_factory):
    """A real TorchServe serving the tiny model through deploykit's ONNX Runtime handler."""
    from servers import torchserve_with_tiny

    with torchserve_with_tiny(tmp_path_factory.mktemp("torchserve")) as served:
        yield served
