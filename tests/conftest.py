"""Test set-up: run Triton kernels under the CPU interpreter when no GPU is present.

TRITON_INTERPRET must be set before triton is first imported, so it happens here, at
collection time, before any test module imports ivfast.kernels.
"""
import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def clip_list(tmp_path_factory):
    """Eight tiny VP9 clips and their list, shared by the training-loop tests (read-only)."""
    from ivfast.data.synth import make_videos

    d = tmp_path_factory.mktemp("clips")
    paths = make_videos(d, num=8, codec="vp9", frames=16, size=(96, 80), seed=1)
    listing = d / "train.csv"
    listing.write_text("".join(f"{p}\n" for p in paths))
    return listing


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU; none is visible (torch.cuda.is_available() is False)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
