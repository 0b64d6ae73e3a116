"""Make the repository's flat modules importable from tests/ (run: python -m pytest -q tests)."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture
def tiny_batch():
    """A random batch of 8 clips at the tiny model's input sizes."""
    g = torch.Generator().manual_seed(0)
    return {"audio": torch.randn(8, 128, 64, generator=g), "video": torch.randn(8, 3, 64, 64, generator=g),
            "label": torch.arange(8) % 10}


def changed_keys(before, model):
    """Names of the state-dict tensors of `model` that differ from the `before` copy."""
    return {k for k, v in model.state_dict().items() if not torch.equal(before[k], v)}
