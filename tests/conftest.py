import os

import pytest
import torch

# Triton kernels run on the CPU through Triton's interpreter when no GPU is present. The flag must be set
# before any @triton.jit function is created, so it is set here, before test modules import the kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
