"""The load-time repack cache: a hit only while the source tensors are unchanged, entries die with the tensors."""
import gc

import pytest
import torch

from bivlm_kernels.backends import repack_cache as rc


def test_hit_stale_and_freed():
    rc.clear()
    a, b = torch.arange(10), torch.ones(3)
    builds = []

    def build():
        builds.append(1)
        return float(a.sum() + b.sum())

    assert rc.get("t", (a, b), build) == 48.0 and len(builds) == 1
    assert rc.get("t", (a, b), build) == 48.0 and len(builds) == 1        # hit
    a.add_(1)                                                             # in-place write: version bump
    assert rc.get("t", (a, b), build) == 58.0 and len(builds) == 2
    b.copy_(torch.zeros(3))
    assert rc.get("t", (a, b), build) == 55.0 and len(builds) == 3
    assert rc.get("other", (a, b), build) == 55.0 and len(builds) == 4   # tags are separate entries
    assert rc.size() == 2
    del a
    gc.collect()
    assert rc.size() == 0                                                 # freed with its first tensor


def test_same_storage_other_view_is_a_miss():
    rc.clear()
    a = torch.arange(12)
    v1, v2 = a[:6], a[:6].view(2, 3)
    assert rc.get("t", (v1,), lambda: "flat") == "flat"
    assert rc.get("t", (v2,), lambda: "2d") == "2d"


def test_inference_tensors_are_rebuilt_every_call():
    rc.clear()
    with torch.inference_mode():
        c = torch.ones(2)
    builds = []
    rc._warned.discard("t")
    with pytest.warns(RuntimeWarning, match="inference tensors"):
        for _ in range(3):
            rc.get("t", (c,), lambda: builds.append(1))
    assert len(builds) == 3 and rc.size() == 0
