"""Pre-processing, the embedded benchmark, missing-modality masks and the READ file layout."""
import json
import math
import os

import pytest
import torch
import torchaudio
import torchvision

import common
import data
from common import CAVMAE


# ---------------------------------------------------------------------------- pre-processing
def test_fbank_normalisation_and_padding():
    wav = 0.1 * torch.sin(2 * math.pi * 440 * torch.arange(8000) / 16000)  # 0.5 s -> 48 frames
    fb = data.wav_to_fbank(wav, mel_bins=64, target_length=128)
    raw = torchaudio.compliance.kaldi.fbank(
        (wav - wav.mean()).unsqueeze(0), htk_compat=True, sample_frequency=16000, use_energy=False,
        window_type="hanning", num_mel_bins=64, dither=0.0, frame_shift=10)
    n = raw.shape[0]  # 1 + (8000 - 400) // 160 = 48 frames
    assert n == 48 and fb.shape == (128, 64)
    # normalisation: (x - (-5.081)) / 4.4849
    assert torch.allclose(fb[:n], (raw + 5.081) / 4.4849)
    # padded frames are zeros before normalisation: (0 + 5.081) / 4.4849 = 1.132913...
    assert torch.allclose(fb[n:], torch.full_like(fb[n:], 5.081 / 4.4849))


def test_fbank_cuts_long_audio():
    wav = torch.randn(16000 * 3) * 0.1  # 298 frames
    assert data.wav_to_fbank(wav, 64, 128).shape == (128, 64)


def test_frames_to_input_imagenet_normalisation():
    white = torch.full((1, 3, 8, 8), 255, dtype=torch.uint8)
    black = torch.zeros((1, 3, 8, 8), dtype=torch.uint8)
    # (1 - 0.485) / 0.229 = 2.248908, (1 - 0.456) / 0.224 = 2.428571, (1 - 0.406) / 0.225 = 2.64
    assert torch.allclose(data.frames_to_input(white, 8)[0, :, 0, 0], torch.tensor([2.248908, 2.428571, 2.64]), atol=1e-5)
    # -0.485 / 0.229 = -2.117904, -0.456 / 0.224 = -2.035714, -0.406 / 0.225 = -1.804444
    assert torch.allclose(data.frames_to_input(black, 8)[0, :, 0, 0], torch.tensor([-2.117904, -2.035714, -1.804444]), atol=1e-5)
    # a constant frame stays constant through resize + centre crop to another size
    out = data.frames_to_input(white, 4)
    assert out.shape == (1, 3, 4, 4) and torch.allclose(out, out[:, :, :1, :1].expand_as(out), atol=1e-5)


# ---------------------------------------------------------------------------- embedded benchmark
def test_embedded_generation_is_deterministic_and_balanced():
    small = dict(data.EMBEDDED, n_train=40, n_val=20, n_test=30)
    a, b = data.generate_embedded(5, small), data.generate_embedded(5, small)
    for split in ("train", "val", "test"):
        for k in ("wav", "frames", "label"):
            assert torch.equal(a[split][k], b[split][k])
    # 40 training clips over 10 classes: exactly 4 each
    assert torch.equal(torch.bincount(a["train"]["label"], minlength=10), torch.full((10,), 4))
    assert a["train"]["wav"].dtype == torch.int16 and a["train"]["wav"].shape == (40, 20800)
    assert a["train"]["frames"].dtype == torch.uint8 and a["train"]["frames"].shape == (40, 3, 64, 64)
    assert not torch.equal(a["train"]["wav"][:20], a["val"]["wav"])
    # 20,800 samples at 16 kHz give 1 + (20800 - 400) // 160 = 128 fbank frames, no padding needed
    assert 1 + (20800 - 400) // 160 == 128


def test_embedded_audio_pitch_encodes_the_class():
    # class c's fundamental is 250 * 2^(0.32 c) Hz: the spectrum peak of class-9 clips lies higher
    small = dict(data.EMBEDDED, jitter_audio=0.0)
    g = torch.Generator().manual_seed(0)
    wav = data.synth_audio(torch.tensor([0, 9]), g, small)
    peak = torch.fft.rfft(wav, dim=1).abs().argmax(1).float() * 16000 / wav.shape[1]  # Hz
    assert abs(peak[0].item() - 250.0) < 2.0  # 250 * 2^0
    assert abs(peak[1].item() - 250.0 * 2 ** (0.32 * 9)) < 2.0  # 250 * 2^2.88 = 1840.0 Hz


def test_corrupted_test_split_changes_only_its_modality():
    m = CAVMAE("tiny")
    clean = data.embedded_split("test", m)
    vid = data.embedded_split("test", m, video_corruption="contrast")
    aud = data.embedded_split("test", m, audio_corruption="gaussian_noise")
    assert torch.equal(clean.fields["audio"], vid.fields["audio"])
    assert not torch.equal(clean.fields["video"], vid.fields["video"])
    assert torch.equal(clean.fields["video"], aud.fields["video"])
    assert not torch.equal(clean.fields["audio"], aud.fields["audio"])
    # the corrupted set is the same on every call
    assert torch.equal(aud.fields["audio"], data.embedded_split("test", m, audio_corruption="gaussian_noise").fields["audio"])


def test_empty_dataset_is_an_error():
    with pytest.raises(data.DataError, match="empty"):
        data.AVTensors({"audio": torch.zeros(0, 2, 2), "video": torch.zeros(0, 3, 2, 2), "label": torch.zeros(0)})


# ---------------------------------------------------------------------------- missing modalities
def test_missing_masks_counts():
    has_a, has_v = data.missing_masks(100, "audio", 0.7, seed=0)
    assert (~has_a).sum() == 70 and has_v.all()
    has_a, has_v = data.missing_masks(100, "video", 0.3, seed=0)
    assert has_a.all() and (~has_v).sum() == 30
    # MAP's missing-both at 70%: 35% lack audio, 35% lack video, none lack both
    has_a, has_v = data.missing_masks(100, "both", 0.7, seed=0)
    assert (~has_a).sum() == 35 and (~has_v).sum() == 35 and (has_a | has_v).all()
    assert torch.equal(data.missing_masks(100, "both", 0.7, seed=0)[0], has_a)
    with pytest.raises(ValueError, match="unknown missing kind"):
        data.missing_masks(10, "text", 0.5)


def test_with_missing_puts_zero_placeholders():
    ds = data.AVTensors({"audio": torch.ones(3, 4, 2), "video": torch.ones(3, 3, 2, 2), "label": torch.arange(3)})
    has_a, has_v = torch.tensor([True, False, True]), torch.tensor([True, True, False])
    out = data.with_missing(ds, has_a, has_v)
    assert out.fields["audio"].sum(dim=(1, 2)).tolist() == [8.0, 0.0, 8.0]  # 4 x 2 ones, or zeros
    assert out.fields["video"].sum(dim=(1, 2, 3)).tolist() == [12.0, 12.0, 0.0]  # 3 x 2 x 2 ones, or zeros
    assert out[1]["has_audio"].item() is False and out[2]["has_video"].item() is False


# ---------------------------------------------------------------------------- READ file layout
def make_read_layout(root, n=6, num_classes=3, missing_wav=(), only_frame_3=()):
    """A tiny Kinetics50-C-style tree: clean/severity_0.json, video/<c>/severity_5.json, audio/<c>/..."""
    frames_dir, wav_dir = root / "frames", root / "wav"
    with open(root / "labels.csv", "w") as f:
        f.write("index,mid,display_name\n")
        for k in range(num_classes):
            f.write(f"{k},/m/c{k},class {k}\n")
    entries = []
    g = torch.Generator().manual_seed(0)
    for i in range(n):
        vid = f"clip{i}"
        for fi in ((3,) if i in only_frame_3 else (0, 5)):
            os.makedirs(frames_dir / f"frame_{fi}", exist_ok=True)
            img = (torch.rand(3, 40, 48, generator=g) * 255).to(torch.uint8)
            torchvision.io.write_file(str(frames_dir / f"frame_{fi}" / f"{vid}.jpg"), torchvision.io.encode_jpeg(img))
        os.makedirs(wav_dir, exist_ok=True)
        if i not in missing_wav:
            data.write_wav(str(wav_dir / f"{vid}.wav"), 0.1 * torch.randn(16000, generator=g))
        entries.append({"video_id": vid, "wav": str(wav_dir / f"{vid}.wav"), "video_path": str(frames_dir) + "/",
                        "labels": f"/m/c{i % num_classes}"})
    for sub in ("clean", "video/gaussian_noise", "audio/wind"):
        os.makedirs(root / sub, exist_ok=True)
        name = "severity_0.json" if sub == "clean" else "severity_5.json"
        with open(root / sub / name, "w") as f:
            json.dump({"data": entries}, f)
    return entries


def read_layout_argv(root, method, n=6):
    """A tiny READ tree with a 3-class tiny checkpoint, and the adapt.py arguments that run `method` on it."""
    make_read_layout(root, n=n)
    ckpt = root / "tiny3.pt"
    common.save_checkpoint(str(ckpt), CAVMAE("tiny", num_classes=3))
    return ["--method", method, "--data", "read", "--dataset", "ks50", "--data-root", str(root),
            "--label-csv", str(root / "labels.csv"), "--checkpoint", str(ckpt), "--corruption", "gaussian_noise"]


def test_read_layout_loader(tmp_path, capsys):
    make_read_layout(tmp_path, n=6, missing_wav=(4,), only_frame_3=(2,))
    ds = data.ReadLayoutDataset(str(tmp_path / "clean" / "severity_0.json"), str(tmp_path / "labels.csv"),
                                mel_bins=64, target_length=128, image_size=64)
    assert len(ds) == 5 and ds.skipped == 1  # clip4 has no WAV: skipped, counted, reported
    assert "skipped 1 of 6 clips" in capsys.readouterr().err
    labels = [ds[i]["label"].item() for i in range(len(ds))]
    assert labels == [0, 1, 2, 0, 2]  # clips 0, 1, 2, 3, 5 with label i % 3
    item = ds[2]
    assert item["audio"].shape == (128, 64) and item["video"].shape == (3, 64, 64)
    assert ds.items[2][1].endswith(os.path.join("frame_3", "clip2.jpg"))  # frame_5 missing: fell back to frame_3


def test_read_layout_errors(tmp_path):
    entries = make_read_layout(tmp_path, n=2)
    csv = str(tmp_path / "labels.csv")
    with pytest.raises(data.DataError, match="does not exist"):
        data.ReadLayoutDataset(str(tmp_path / "nope.json"), csv)
    (tmp_path / "empty.json").write_text(json.dumps({"data": []}))
    with pytest.raises(data.DataError, match="is empty"):
        data.ReadLayoutDataset(str(tmp_path / "empty.json"), csv)
    bad = [dict(entries[0], labels="/m/unknown")]
    (tmp_path / "bad.json").write_text(json.dumps({"data": bad}))
    with pytest.raises(data.DataError, match="not in"):
        data.ReadLayoutDataset(str(tmp_path / "bad.json"), csv)


def test_read_layout_both_modalities_joins_on_video_id(tmp_path):
    make_read_layout(tmp_path, n=4)
    ds = data.read_layout_split(str(tmp_path), str(tmp_path / "labels.csv"), CAVMAE("tiny"),
                                video_corruption="gaussian_noise", audio_corruption="wind")
    assert len(ds) == 4
