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


def key_list(path, prefix=""):
    """{key without `prefix`: shape} from a shipped key list ('#' comments, then 'key<TAB>(shape)' lines)."""
    assert os.path.isfile(path), f"this test reads the key list at {path}"
    keys = {}
    for line in open(path):
        if line.startswith("#") or not line.strip():
            continue
        name, shape = line.rstrip("\n").split("\t")
        keys[name[len(prefix):] if name.startswith(prefix) else name] = tuple(
            int(s) for s in shape.strip("()").split(",") if s.strip())
    return keys


def spectrum_slope(grey):
    """alpha of a radially averaged amplitude spectrum ~ 1 / f^alpha (least squares in log-log over
    1 .. S/2 - 1 cycles per picture). grey (N, S, S) in [0, 1]; natural images have alpha about 1
    (0.8 .. 1.6)."""
    S = grey.shape[-1]
    amp = torch.fft.fft2(grey - grey.mean((1, 2), keepdim=True)).abs().mean(0)     # (S, S)
    # cycles per picture
    f = (torch.fft.fftfreq(S)[:, None] ** 2 + torch.fft.fftfreq(S)[None] ** 2).sqrt() * S
    ring = f.round().long().flatten()
    keep = (ring >= 1) & (ring < S // 2)
    total = torch.zeros(S).index_add_(0, ring[keep], amp.flatten()[keep])
    count = torch.zeros(S).index_add_(0, ring[keep], torch.ones(int(keep.sum())))
    r = torch.arange(1, S // 2)
    x, y = r.double().log(), (total[1:S // 2] / count[1:S // 2]).double().log()
    return -(((x - x.mean()) * (y - y.mean())).sum() / ((x - x.mean()) ** 2).sum()).item()


def refused(fn, *args, match=None, **kwargs):
    """Call fn and return the refusal it raises (common.Refusal), after checking the house rule for every
    refusal: one sentence of at most 200 characters saying what is wrong and what to do."""
    import common
    with pytest.raises(common.Refusal) as info:
        fn(*args, **kwargs)
    text = str(info.value)
    assert len(text) <= 200, f"refusal of {len(text)} characters: {text}"
    assert "\n" not in text and text.rstrip().endswith((".", "?")), f"not one sentence: {text}"
    if match is not None:
        assert match in text, f"{match!r} not in {text!r}"
    return text


# ---------------------------------------------------------------- a small float64 CLIP (cmpt, aoept tests)
INF = float("-inf")
VOCAB = 10  # CLIP's convention: end-of-text = the largest id, 9; start-of-text = 8; 0 padding
SOT, EOT = VOCAB - 2, VOCAB - 1
D = 8  # both towers' width
E = 4  # the joint width
# end of text at 3, 2, 4: the batch is cut to eot.max() + 1 = 5 columns, rows 0 and 1 keep padding inside them
TEXT = torch.tensor([[SOT, 3, 5, EOT, 0, 0],
                     [SOT, 4, EOT, 0, 0, 0],
                     [SOT, 2, 6, 7, EOT, 0]])
TEXT_EOT = torch.tensor([3, 2, 4])


def small_config(layers):
    return dict(image_size=8, patch_size=4, vision_width=D, vision_layers=layers, vision_heads=2, embed_dim=E,
                context_length=6, vocab_size=None, text_width=D, text_layers=layers, text_heads=2)


@pytest.fixture
def make_clip(monkeypatch):
    """make_clip(layers=2, seed=0) -> a frozen float64 CLIP of `layers` blocks per tower, width 8, 2 heads,
    8 x 8 images in 4 patches of 4 x 4 (5 image tokens), contexts of 6, joint width 4, vocabulary 10."""
    import common
    monkeypatch.setitem(common.CLIP_CONFIGS, "t2", small_config(2))
    monkeypatch.setitem(common.CLIP_CONFIGS, "t4", small_config(4))

    def make(layers=2, seed=0):
        torch.manual_seed(seed)
        clip = common.CLIP(f"t{layers}", vocab_size=VOCAB).double().eval()
        for p in clip.parameters():
            p.requires_grad_(False)
        return clip
    return make


def images(B, seed=1):
    return torch.randn(B, 3, 8, 8, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
