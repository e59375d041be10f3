import os
import sys
from pathlib import Path

import pytest
import torch

# Regression tests import the reference implementation that lives beside them; end-to-end tests
# share the video and annotation writers of tests/unit/data_fixtures.py.
sys.path.insert(0, str(Path(__file__).parent / "regression"))
sys.path.insert(0, str(Path(__file__).parent / "unit"))
torch.set_num_threads(min(2, torch.get_num_threads()))
# Where no GPU is, Triton's interpreter runs the fused merge kernels on CPU tensors
# (tests/unit/test_fused_merging.py). Triton reads this as its own functions are defined, on import.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matrices: a second thread only adds contention on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
