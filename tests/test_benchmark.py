"""Properties of the embedded benchmark, each checked on the generated data itself (never on a
method's score). The README's "The embedded benchmark" section says why each one matters."""
import math

import pytest
import torch
import torch.nn.functional as F

import data
from conftest import spectrum_slope
import train


@pytest.fixture(scope="module")
def raw():
    return data.embedded_raw(0)


def spearman(a, b):
    """Rank correlation of two 1-D tensors (no ties expected)."""
    ra, rb = a.argsort().argsort().double(), b.argsort().argsort().double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return ((ra * rb).sum() / (ra.norm() * rb.norm())).item()


def test_spearman_by_hand():
    # ranks (0, 1, 2) against (0, 1, 2): 1; against (2, 1, 0): -1
    assert spearman(torch.tensor([1.0, 5.0, 9.0]), torch.tensor([0.1, 0.2, 0.3])) == pytest.approx(1.0)
    assert spearman(torch.tensor([1.0, 5.0, 9.0]), torch.tensor([3.0, 2.0, 1.0])) == pytest.approx(-1.0)


def test_splits_are_as_large_as_kinetics50_c_and_balanced(raw):
    assert len(raw["test"]["label"]) >= 2496  # 39 batches of 64, as Kinetics50-C's 2,466 clips
    assert len(raw["train"]["label"]) >= 3000  # pre-training and fine-tuning
    for split in ("train", "val", "test"):
        counts = torch.bincount(raw[split]["label"], minlength=10)
        assert counts.max() - counts.min() <= 1


def object_pixels(frames):
    """Pixels of the objects: saturation (max - min) / max above 0.5 (the background is mixed from two
    colours of saturation at most 0.35; objects have 0.6 to 0.95). frames (N, 3, S, S) in [0, 1]."""
    hi, lo = frames.amax(1), frames.amin(1)
    return (hi - lo) / hi.clamp_min(1e-6) > 0.5  # (N, S, S)


def test_one_event_shapes_both_the_picture_and_the_sound(raw):
    # Within every class (so not through the class), a clip's picture and sound share its event:
    # bigger objects sound lower (object area vs the strongest spectral peak), lighter objects sound
    # brighter (the objects' value vs the spectral centroid).
    test = raw["test"]
    frames = test["frames"].float() / 255
    obj = object_pixels(frames)
    area = obj.float().sum((1, 2))
    value = (frames.amax(1) * obj).sum((1, 2)) / area.clamp_min(1)
    wav = test["wav"].float() / 32767
    spectrum = torch.fft.rfft(wav).abs()
    freqs = torch.fft.rfftfreq(wav.shape[1], 1 / data.SAMPLE_RATE)
    centroid = (spectrum * freqs).sum(1) / spectrum.sum(1)
    # the pitch: the strongest peak above 50 Hz (the pink-noise ambience's power grows as 1 / f below the
    # lowest pitch, about 120 Hz)
    pitch = freqs[(spectrum * (freqs >= 50)).argmax(1)]
    for k in range(10):
        i = test["label"] == k
        assert spearman(area[i], pitch[i]) < -0.2, k
        assert spearman(value[i], centroid[i]) > 0.4, k
    # and the factors are not the class: they vary as much inside a class as overall
    assert test["size"][test["label"] == 0].std() > 0.8 * test["size"].std()


def test_frames_have_the_amplitude_spectrum_of_natural_images(raw):
    # radially averaged amplitude spectrum of the grey clean test frames ~ 1 / f^alpha, natural images
    # have alpha about 1 (0.8 .. 1.6 measured on photographs)
    grey = raw["test"]["frames"][:1000].float().mean(1) / 255                      # (N, S, S)
    alpha = spectrum_slope(grey)
    assert 0.8 <= alpha <= 1.6


def test_sounds_are_events_with_onsets_and_several_components(raw):
    wav = raw["test"]["wav"].float() / 32767
    # an onset: the energy of a 10 ms frame at least 4 times (6 dB) that of each of the 3 frames before it
    energy = wav.unfold(1, 160, 160).pow(2).mean(-1) + 1e-10                          # (N, 130)
    before = torch.minimum(torch.minimum(energy[:, 2:-1], energy[:, 1:-2]), energy[:, :-3])
    assert ((energy[:, 3:] / before).amax(1) > 4).float().mean() > 0.95
    # several spectral components: at least 3 of the (5) partials stand 10 x above the median level
    spectrum = F.avg_pool1d(torch.fft.rfft(wav).abs()[:, None], 9, 1, 4)[:, 0]
    med = spectrum.median(1, keepdim=True).values
    peaks = (spectrum[:, 1:-1] > spectrum[:, :-2]) & (spectrum[:, 1:-1] >= spectrum[:, 2:]) & (spectrum[:, 1:-1] > 10 * med)
    assert (peaks.sum(1) >= 3).float().mean() > 0.9


def video_only_accuracy(model, frames, labels):
    with torch.no_grad():
        x = data.frames_to_input(frames, model.image_size)
        return 100.0 * (model(None, x, mode="videoonly").argmax(1) == labels).float().mean().item()


def test_the_class_is_visible_at_several_scales_and_across_the_frame(source_model, raw):
    # the source model's video-only path (trained on clean frames) on frames downsampled 4x and on
    # frames with one quadrant replaced by the frame's mean colour: well above chance (10%) in each
    frames, labels = raw["test"]["frames"].float() / 255, raw["test"]["label"]
    clean = video_only_accuracy(source_model, frames, labels)
    down = F.interpolate(F.avg_pool2d(frames, 4), scale_factor=4, mode="bilinear", align_corners=False)
    assert video_only_accuracy(source_model, down, labels) > 30.0
    for q in range(4):
        masked = frames.clone()
        r, c = divmod(q, 2)
        h = frames.shape[-1] // 2
        masked[:, :, r * h:(r + 1) * h, c * h:(c + 1) * h] = frames.mean((2, 3), keepdim=True)
        assert video_only_accuracy(source_model, masked, labels) > max(30.0, 0.8 * clean)


def test_severity_5_degrades_like_kinetics50_c_and_vggsound_c(source_model):
    # every corruption lowers Source's accuracy; the video average keeps 55-90% of the clean accuracy and
    # the audio average 30-85% (Kinetics50-C / VGGSound-C: 60.5 / 56.2 video, 69.4 / 25.0 audio)
    def accuracy(**corruption):
        ds = data.embedded_split("test", source_model, **corruption)
        return train.evaluate(source_model, data.make_loader(ds, 256, shuffle=False), "cpu", ("multimodal",))["multimodal"]
    clean = accuracy()
    video = [accuracy(video_corruption=c) for c in data.VIDEO_CORRUPTIONS]
    audio = [accuracy(audio_corruption=c) for c in data.AUDIO_CORRUPTIONS]
    assert max(video + audio) < clean
    assert 0.55 <= sum(video) / len(video) / clean <= 0.90
    assert 0.30 <= sum(audio) / len(audio) / clean <= 0.85


def test_retrieval_counts_a_hit_when_a_clip_finds_its_own_partner():
    # audio i and video i point the same way for i = 0, 1; audio 2 points at video 0: 2 hits of 3
    c_a = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.1]])
    c_v = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    assert train.common.retrieval_top1(c_a, c_v) == pytest.approx(2 / 3)
    assert math.isclose(train.common.retrieval_top1(c_v, c_v), 1.0)
