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


@pytest.fixture(scope="session")
def source_model():
    """The default source model (checkpoints/embedded_tiny.pt), trained once if missing or out of date."""
    import train
    return train.default_source("tiny", 0, "cpu")[0]


def source_stream_accuracy(corruption, batch_size, seed=1):
    """The frozen source model's batch-averaged accuracy (%) on the shuffled video-corrupted test stream,
    computed directly, to check the runner's paired Source column."""
    import data, train
    model, _ = train.default_source("tiny", 0, "cpu")
    ds = data.embedded_split("test", model, video_corruption=corruption)
    accs = []
    with torch.no_grad():
        for b in data.make_loader(ds, batch_size, shuffle=True, seed=seed):
            accs.append(100.0 * (model(b["audio"], b["video"]).argmax(1) == b["label"]).float().mean().item())
    return sum(accs) / len(accs)
