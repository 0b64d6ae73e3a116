"""Pre-processing, the embedded benchmark, corruptions (hand-worked values), missing modalities, the READ file
layout and `python data.py corrupt`."""
import json
import math
import os
import wave

import numpy as np

import pytest
import torch
import torchaudio
import torchvision

import adapt
import common
import data
from common import CAVMAE
from conftest import refused
from data import (AUDIO_CORRUPTIONS, AUDIO_SEVERITY, NOISE_RMS, VIDEO_CORRUPTIONS,
                              VIDEO_SEVERITY, audio_noise_overlay, brightness, contrast, corrupt_audio,
                              corrupt_video, elastic_transform, fit_noise_length, frost, gaussian_noise_audio,
                              gaussian_noise_video, glass_blur, impulse_noise, motion_blur, noise_stand_in,
                              pixelate, read_wav, write_wav, zoom_blur)


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
    assert torch.allclose(data.frames_to_input(white, 8)[0, :, 0, 0],
                          torch.tensor([2.248908, 2.428571, 2.64]), atol=1e-5)
    # -0.485 / 0.229 = -2.117904, -0.456 / 0.224 = -2.035714, -0.406 / 0.225 = -1.804444
    assert torch.allclose(data.frames_to_input(black, 8)[0, :, 0, 0],
                          torch.tensor([-2.117904, -2.035714, -1.804444]), atol=1e-5)
    # a constant frame stays constant through resize + centre crop to another size
    out = data.frames_to_input(white, 4)
    assert out.shape == (1, 3, 4, 4) and torch.allclose(out, out[:, :, :1, :1].expand_as(out), atol=1e-5)


# ---------------------------------------------------------------------------- embedded benchmark
def test_embedded_generation_is_deterministic_and_balanced():
    small = dict(data.EMBEDDED, n_train=40, n_val=20, n_test=30)
    a, b = data.generate_embedded(5, small), data.generate_embedded(5, small)
    for split in ("train", "val", "test"):
        for k in ("wav", "frames", "label", "size", "count", "material"):
            assert torch.equal(a[split][k], b[split][k])
    # 40 training clips over 10 classes: exactly 4 each
    assert torch.equal(torch.bincount(a["train"]["label"], minlength=10), torch.full((10,), 4))
    assert a["train"]["wav"].dtype == torch.int16 and a["train"]["wav"].shape == (40, 20800)
    assert a["train"]["frames"].dtype == torch.uint8 and a["train"]["frames"].shape == (40, 3, 64, 64)
    assert set(a["train"]["count"].tolist()) <= {1, 2, 3, 4}
    assert not torch.equal(a["train"]["wav"][:20], a["val"]["wav"])
    # 20,800 samples at 16 kHz give 1 + (20800 - 400) // 160 = 128 fbank frames, no padding needed
    assert 1 + (20800 - 400) // 160 == 128


def test_embedded_pitch_is_the_class_register_lowered_by_size():
    # f0 = 200 Hz * 2^(0.22 * register + 1.2 * (0.5 - size)); class 0 has register 0, class 7 register 9
    g = torch.Generator().manual_seed(0)
    latents = {"size": torch.tensor([0.5, 0.5, 1.0]), "count": torch.tensor([1, 1, 1]),
               "material": torch.tensor([0.5, 0.5, 0.5])}
    wav = data.synth_audio(torch.tensor([0, 7, 7]), latents, g)
    spectrum = torch.fft.rfft(wav, dim=1).abs()
    spectrum[:, :65] = 0  # below 50 Hz: the pink-noise ambience, whose power grows as 1 / f
    peak = spectrum.argmax(1).float() * 16000 / wav.shape[1]  # Hz, 0.77 Hz bins
    assert abs(peak[0].item() - 200.0) < 2.0                      # 200 * 2^0
    assert abs(peak[1].item() - 200.0 * 2 ** (0.22 * 9)) < 2.0    # 200 * 2^1.98 = 788.9 Hz
    assert abs(peak[2].item() - 200.0 * 2 ** (1.98 - 0.6)) < 2.0  # size 1: 0.6 octave lower, 520.5 Hz


def test_embedded_cache_name_changes_with_the_generator_settings():
    assert data.embedded_id() == data.embedded_id(dict(data.EMBEDDED))
    assert data.embedded_id() != data.embedded_id(dict(data.EMBEDDED, hue_jitter=0.07))
    assert data.embedded_id().startswith(f"v{data.EMBEDDED_VERSION}-")


@pytest.mark.slow
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
    assert torch.equal(aud.fields["audio"],
                       data.embedded_split("test", m, audio_corruption="gaussian_noise").fields["audio"])


def test_make_loader_gives_the_batches_of_per_clip_fetching():
    ds = data.AVTensors({"audio": torch.randn(70, 4, 2), "video": torch.randn(70, 3, 2, 2),
                         "label": torch.arange(70)})
    for shuffle in (True, False):
        torch.manual_seed(3)
        ours = list(data.make_loader(ds, 32, shuffle=shuffle, seed=7))
        after_ours = torch.rand(1)
        torch.manual_seed(3)
        g = torch.Generator().manual_seed(7)
        clip_by_clip = list(torch.utils.data.DataLoader(ds, batch_size=32, shuffle=shuffle, generator=g))
        assert torch.equal(after_ours, torch.rand(1))  # neither touches the global generator
        assert [len(b["label"]) for b in ours] == [32, 32, 6]
        for a, b in zip(ours, clip_by_clip):
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert len(data.make_loader(ds, 32, shuffle=True)) == 3


def test_empty_dataset_is_an_error():
    refused(data.AVTensors,
            {"audio": torch.zeros(0, 2, 2), "video": torch.zeros(0, 3, 2, 2), "label": torch.zeros(0)},
            match='empty')


# ---------------------------------------------------------------------------- missing modalities
def test_missing_masks_draw_disjoint_sets_in_dict_order():
    order = torch.randperm(10, generator=torch.Generator().manual_seed(4))
    has = data.missing_masks(10, {"audio": 3, "video": 2}, seed=4)
    # the first 3 of the permutation lack audio, the next 2 lack video, the other 5 are complete
    assert torch.equal(~has["audio"], torch.isin(torch.arange(10), order[:3]))
    assert torch.equal(~has["video"], torch.isin(torch.arange(10), order[3:5]))
    assert int((has["audio"] & has["video"]).sum()) == 5
    # more than n: the permutation runs out (old rule at rate 1 and odd n: 'both' of 7 -> 4 audio, 3 video)
    has = data.missing_masks(7, data.cmpt_counts("both", 1.0, 7))
    assert int((~has["audio"]).sum()) == 4 and int((~has["video"]).sum()) == 3


def test_cmpt_and_map_counts_by_hand():
    # CMPT, audio-video: 'both' at 70% of 101: round(35.35) = 35 lack each; 'audio': round(70.7) = 71
    assert data.cmpt_counts("both", 0.7, 101) == {"audio": 35, "video": 35}
    assert data.cmpt_counts("audio", 0.7, 101) == {"audio": 71, "video": 0}
    assert data.cmpt_counts("none", 0.7, 101) == {"audio": 0, "video": 0}
    # MAP, image-text: m = round(0.7 * 101) = 71; 'both': 71 - 35 = 36 lack the text, 71 // 2 = 35 the image
    assert data.map_counts("both", 0.7, 101) == {"text": 36, "image": 35}
    assert data.map_counts("image", 0.7, 101) == {"text": 0, "image": 71}
    refused(data.map_counts, "audio", 0.7, 10, match="Unknown missing kind 'audio'")
    refused(data.cmpt_counts, "both", 7.0, 10, match="not 7.0")


def test_with_missing_puts_the_blank_and_the_flags():
    ds = data.AVTensors({"audio": torch.ones(3, 4, 2), "video": torch.ones(3, 3, 2, 2),
                         "label": torch.arange(3)})
    has = {"audio": torch.tensor([True, False, True]), "video": torch.tensor([True, True, False])}
    out = data.with_missing(ds, has, {"audio": torch.zeros(4, 2), "video": torch.full((3, 2, 2), 0.5)})
    assert out.fields["audio"].sum(dim=(1, 2)).tolist() == [8.0, 0.0, 8.0]  # 4 x 2 ones, or zeros
    assert out.fields["video"].sum(dim=(1, 2, 3)).tolist() == [12.0, 12.0, 6.0]  # 3 x 2 x 2 ones, or halves
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
            torchvision.io.write_file(str(frames_dir / f"frame_{fi}" / f"{vid}.jpg"),
                                      torchvision.io.encode_jpeg(img))
        os.makedirs(wav_dir, exist_ok=True)
        if i not in missing_wav:
            data.write_wav(str(wav_dir / f"{vid}.wav"), 0.1 * torch.randn(16000, generator=g))
        entries.append({"video_id": vid, "wav": str(wav_dir / f"{vid}.wav"),
                        "video_path": str(frames_dir) + "/", "labels": f"/m/c{i % num_classes}"})
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
            "--label-csv", str(root / "labels.csv"), "--checkpoint", str(ckpt),
            "--corruption", "gaussian_noise"]


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
    # frame_5 missing: fell back to frame_3
    assert ds.items[2][1].endswith(os.path.join("frame_3", "clip2.jpg"))


def test_read_layout_errors(tmp_path):
    entries = make_read_layout(tmp_path, n=2)
    csv = str(tmp_path / "labels.csv")
    refused(data.ReadLayoutDataset, str(tmp_path / "nope.json"), csv, match='does not exist')
    (tmp_path / "empty.json").write_text(json.dumps({"data": []}))
    refused(data.ReadLayoutDataset, str(tmp_path / "empty.json"), csv, match='is empty')
    bad = [dict(entries[0], labels="/m/unknown")]
    (tmp_path / "bad.json").write_text(json.dumps({"data": bad}))
    refused(data.ReadLayoutDataset, str(tmp_path / "bad.json"), csv, match='not in')


def test_read_layout_both_modalities_joins_on_video_id(tmp_path, capsys):
    make_read_layout(tmp_path, n=4)
    ds = data.read_layout_split(str(tmp_path), str(tmp_path / "labels.csv"), CAVMAE("tiny"),
                                video_corruption="gaussian_noise", audio_corruption="wind")
    assert len(ds) == 4 and "dropped" not in capsys.readouterr().err  # the same clips in both: no notice


def write_list(path, entries):
    path.write_text(json.dumps({"data": entries}))
    return str(path)


def test_read_layout_both_modalities_counts_the_clips_in_one_list_only(tmp_path, capsys):
    entries = make_read_layout(tmp_path, n=6)
    video = write_list(tmp_path / "video" / "gaussian_noise" / "severity_5.json", entries[:5])  # no clip5
    audio = write_list(tmp_path / "audio" / "wind" / "severity_5.json", entries[2:])  # no clip0, clip1
    ds = data.read_layout_split(str(tmp_path), str(tmp_path / "labels.csv"), CAVMAE("tiny"),
                                video_corruption="gaussian_noise", audio_corruption="wind")
    # clips 2, 3, 4 are in both lists; clip0 and clip1 only in the video list, clip5 only in the audio list
    assert [os.path.basename(w) for w, _, _ in ds.items] == ["clip2.wav", "clip3.wav", "clip4.wav"]
    assert capsys.readouterr().err == (
        f"[data] --modality both: dropped 2 of 5 clips of {video} missing from the "
        f"audio list and 1 of 4 clips of {audio} missing from the video list\n")
    write_list(tmp_path / "audio" / "wind" / "severity_5.json", entries[5:])
    refused(data.read_layout_split, str(tmp_path), str(tmp_path / "labels.csv"), CAVMAE("tiny"),
            video_corruption="gaussian_noise", audio_corruption="wind",
            match='The video list and the audio list ')


def test_clip_listed_twice_is_refused_naming_it_and_both_positions(tmp_path):
    entries = make_read_layout(tmp_path, n=4)
    twice = write_list(tmp_path / "twice.json", entries[:3] + [dict(entries[1])])  # clip1 at entries 1 and 3
    assert refused(data.read_json_list, twice) == f"{twice} lists the clip 'clip1' twice; remove one of them."


def test_clip_without_a_label_is_skipped_and_counted(tmp_path, capsys):
    entries = make_read_layout(tmp_path, n=3)
    listed = write_list(tmp_path / "unlabelled.json", [entries[0], dict(entries[1], labels=" "), entries[2]])
    ds = data.ReadLayoutDataset(listed, str(tmp_path / "labels.csv"))
    assert [item[2] for item in ds.items] == [0, 2] and ds.skipped == 1  # clip1 left out
    assert "skipped 0 of 3 clips with a missing WAV or frame and 1 without a label" in capsys.readouterr().err


def test_clip_with_several_labels_is_refused(tmp_path):
    entries = make_read_layout(tmp_path, n=3)
    multi = write_list(tmp_path / "multi.json", [entries[0], dict(entries[1], labels="/m/c1,/m/c2")])
    # VGGSound-style comma-separated mids: the first would be scored
    assert refused(data.ReadLayoutDataset, multi, str(tmp_path / "labels.csv")) == (
        f"Clip clip1 in {multi} has 2 labels, but these runs are single-label; keep the one "
        f"label to score it against.")


# ---------------------------------------------------------------------------- bad inputs, one sentence each
def write_labels(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_label_csv_indices_must_be_exactly_0_to_k_minus_1(tmp_path):
    make_read_layout(tmp_path, n=3)
    # 1-based indices: class k would be scored against output k - 1 (adapt.py: a silently wrong accuracy;
    # train.py: IndexError at index 3 of a 3-way head)
    one_based = write_labels(tmp_path / "l1.csv",
                             ["index,mid,display_name", "1,/m/c0,a", "2,/m/c1,b", "3,/m/c2,c"])
    refused(data.read_label_csv, one_based, match='l1.csv has indices other than 0..2 (each once)')
    gap = write_labels(tmp_path / "l2.csv", ["0,/m/c0", "1,/m/c1", "5,/m/c2"])
    refused(data.read_label_csv, gap, match='l2.csv has indices other than 0..2')
    twice = write_labels(tmp_path / "l3.csv", ["0,/m/c0", "1,/m/c0"])
    refused(data.read_label_csv, twice, match="lists the label '/m/c0' twice")
    # a spreadsheet's byte-order mark before a header-less first line is not a header: class 0 is kept
    (tmp_path / "bom.csv").write_bytes("\ufeff0,/m/c0\n1,/m/c1\n".encode("utf-8"))
    assert data.read_label_csv(str(tmp_path / "bom.csv")) == {"/m/c0": 0, "/m/c1": 1}
    refused(data.read_label_csv, str(tmp_path), match='is a folder, not a file')


@pytest.mark.parametrize("content, message", [
    ('{"data": "clips"}', "is not a READ data list"),
    ('[{"video_id": "a"}]', "is not a READ data list"),
    ('{"data": [1, 2]}', "needs the strings video_id, wav, video_path, labels"),
    ('{"data": [{"video_id": 7, "wav": "a.wav", "video_path": "f/", "labels": "/m/c0"}]}', "Entry 0 of"),
    ('{"data": [{"video_id": "a", "wav": "a.wav", "video_path": "f/", "labels": ["/m/c0"]}]}', "Entry 0 of"),
    ('{"data": [{"video_id": "a", "wav": " ", "video_path": "f/", "labels": ""}]}',
     "only labels may be empty"),
    ('{"data": [', "is not valid JSON"),
])
def test_json_list_with_wrong_types_is_refused(tmp_path, content, message):
    (tmp_path / "l.json").write_text(content)
    refused(data.read_json_list, str(tmp_path / "l.json"), match=message)


def test_binary_json_list_is_refused(tmp_path):
    (tmp_path / "l.json").write_bytes(b"\xff\xfe\x00\x81")
    refused(data.read_json_list, str(tmp_path / "l.json"), match='is not UTF-8 text')


def raw_wav(path, channels=1, width=2, rate=16000, payload=b"", declared_frames=None):
    """A WAV header written byte by byte (the wave module refuses to write 0 channels)."""
    import struct
    fmt = struct.pack("<HHIIHH", 1, channels, rate, rate * channels * width, channels * width, 8 * width)
    body = (b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt
            + b"data" + struct.pack("<I", len(payload)) + payload)
    path.write_bytes(b"RIFF" + struct.pack("<I", len(body)) + body)
    return str(path)


def test_bad_wavs_are_named_and_odd_sizes_read_correctly(tmp_path):
    refused(data.wav_info, raw_wav(tmp_path / "empty.wav"), match='empty WAV file')
    refused(data.wav_info, raw_wav(tmp_path / "zero.wav", channels=0, payload=b"\x00\x00"),
            match='bad # of channels')
    refused(data.wav_info, raw_wav(tmp_path / "zerohz.wav", rate=0, payload=b"\x00\x00"),
            match='sample rate of 0 Hz')
    (tmp_path / "text.wav").write_text("hello")
    refused(data.read_wav, tmp_path / "text.wav", match='is not a PCM WAV file')
    # 16-bit stereo with a stray byte at the end:
    # two whole frames (1000, 3000) and (-2000, 0), the byte dropped
    import struct
    odd = raw_wav(tmp_path / "odd.wav", channels=2,
                  payload=struct.pack("<4h", 1000, 3000, -2000, 0) + b"\x07")
    wav, rate = data.read_wav(odd)
    # mono = mean of the channels: (1000 + 3000) / 2 / 32768 = 0.061035, (-2000 + 0) / 2 / 32768 = -0.030518
    assert rate == 16000 and torch.allclose(wav, torch.tensor([2000 / 32768, -1000 / 32768]))


def test_read_layout_refuses_empty_short_and_non_image_files_up_front(tmp_path):
    entries = make_read_layout(tmp_path, n=2)
    csv_path = str(tmp_path / "labels.csv")
    raw_wav(tmp_path / "wav" / "clip0.wav")  # 0 samples
    refused(data.ReadLayoutDataset, str(tmp_path / "clean" / "severity_0.json"), csv_path,
            match='clip0.wav is an empty WAV file')
    data.write_wav(str(tmp_path / "wav" / "clip0.wav"), torch.zeros(100))  # 6.25 ms
    refused(data.ReadLayoutDataset, str(tmp_path / "clean" / "severity_0.json"), csv_path,
            match='lasts 6.2 ms, shorter than one 25 ms fbank window')
    data.write_wav(str(tmp_path / "wav" / "clip0.wav"), torch.zeros(16000))
    (tmp_path / "frames" / "frame_5" / "clip1.jpg").write_text("not an image")
    refused(data.ReadLayoutDataset, str(tmp_path / "clean" / "severity_0.json"), csv_path,
            match='clip1.jpg is not a JPEG or PNG image')
    assert entries[1]["video_id"] == "clip1"


def test_truncated_jpeg_is_named_when_read(tmp_path):
    make_read_layout(tmp_path, n=2)
    frame = tmp_path / "frames" / "frame_5" / "clip1.jpg"
    frame.write_bytes(frame.read_bytes()[:200])  # starts like a JPEG, ends early
    ds = data.ReadLayoutDataset(str(tmp_path / "clean" / "severity_0.json"), str(tmp_path / "labels.csv"),
                                mel_bins=64, target_length=128, image_size=64)
    assert ds[0]["label"].item() == 0
    refused(ds.__getitem__, 1, match="clip1.jpg is not a readable JPEG/PNG image")


def test_with_missing_on_a_lazily_read_dataset_matches_the_in_memory_one(tmp_path):
    make_read_layout(tmp_path, n=4)
    ds = data.ReadLayoutDataset(str(tmp_path / "clean" / "severity_0.json"), str(tmp_path / "labels.csv"),
                                mel_bins=64, target_length=128, image_size=64)
    in_memory = data.AVTensors(dict(torch.utils.data.default_collate([ds[i] for i in range(4)])))
    has = {"audio": torch.tensor([True, False, True, True]), "video": torch.tensor([True, True, False, True])}
    blank = {"audio": torch.zeros(128, 64), "video": torch.zeros(3, 64, 64)}
    lazy, eager = data.with_missing(ds, has, blank), data.with_missing(in_memory, has, blank)
    for i in range(4):
        for k in ("audio", "video", "label", "has_audio", "has_video"):
            assert torch.equal(lazy[i][k], eager[i][k])
    assert lazy[1]["audio"].abs().sum() == 0 and lazy[2]["video"].abs().sum() == 0


# ---------------------------------------------------------------------------- corruptions
@pytest.fixture(autouse=True, scope='module')
def one_thread():
    """These tensors are tiny: one intra-op thread is as fast and avoids OpenMP spin-waiting
    (10-100x slower) when another process keeps the second core busy."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def textured(n=4, size=64, dtype=torch.float64):
    """Deterministic textured frames (n, 3, size, size) in [0, 1]: coarse and fine sin/cos gratings."""
    i = torch.arange(size, dtype=torch.float64).view(size, 1) / size
    j = torch.arange(size, dtype=torch.float64).view(1, size) / size
    frames = []
    for b in range(n):
        channels = []
        for c in range(3):
            v = (0.5 + 0.15 * torch.sin(2 * math.pi * (3 * i + 2 * j) + c + b)
                 + 0.12 * torch.cos(2 * math.pi * (7 * i - 5 * j + b / 4))
                 + 0.10 * torch.sin(2 * math.pi * (13 * i + (11 + c) * j))
                 + 0.08 * torch.sin(2 * math.pi * 16 * i + c) * torch.cos(2 * math.pi * (16 - b) * j))
            channels.append(v)
        frames.append(torch.stack(channels))
    return torch.stack(frames).clamp(0, 1).to(dtype)


def tone(n=2, num_samples=16000, amplitude=0.5):
    """(n, T) float64 440 Hz sine at 16 kHz."""
    t = torch.arange(num_samples, dtype=torch.float64) / 16000
    return (amplitude * torch.sin(2 * math.pi * 440 * t)).repeat(n, 1)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


# --- identities -------------------------------------------------------------------------------
def test_video_identity_parameters():
    x = textured(2)
    assert torch.equal(gaussian_noise_video(x, 0.0, gen()), x)
    assert torch.equal(impulse_noise(x, 0.0, gen()), x)
    assert torch.equal(brightness(x, 0.0), x)
    assert torch.equal(zoom_blur(x, [1.0]), x)          # (x + x) / 2
    assert torch.equal(pixelate(x, 1.0), x)
    assert torch.equal(motion_blur(x, 0, 1.0, gen()), x)  # one tap of weight 1
    assert torch.equal(frost(x, 1.0, 0.0, gen()), x)
    assert torch.allclose(contrast(x, 1.0), x, atol=1e-12, rtol=0)
    assert torch.allclose(glass_blur(x, 0.0, 0.0, 2, gen()), x, atol=1e-6, rtol=0)
    assert torch.allclose(elastic_transform(x, 0.0, 1.0, 0.0, gen()), x, atol=1e-6, rtol=0)


def test_audio_identity_parameters():
    w = tone()
    assert torch.equal(gaussian_noise_audio(w, 0.0, gen()), w)
    assert torch.equal(audio_noise_overlay(w, torch.zeros(100, dtype=torch.float64), 8), w)
    # 10 ** (-inf / 20) = 0: no noise at all
    assert torch.equal(audio_noise_overlay(w, noise_stand_in('rain', 16000, gen()), -math.inf), w)


# --- hand-computed values ---------------------------------------------------------------------
def test_contrast_two_by_two():
    x = torch.tensor([[0.0, 0.2], [0.4, 0.6]], dtype=torch.float64).view(1, 1, 2, 2)
    # mean = (0 + .2 + .4 + .6) / 4 = .3; (x - .3) * .5 + .3 = [.15, .25, .35, .45]
    expected = torch.tensor([[0.15, 0.25], [0.35, 0.45]], dtype=torch.float64).view(1, 1, 2, 2)
    assert torch.allclose(contrast(x, 0.5), expected, atol=1e-12, rtol=0)


def test_brightness_hsv_value_shift():
    x = torch.tensor([[0.2, 0.4, 0.1], [0.0, 0.0, 0.0], [0.8, 0.4, 0.2]],
                     dtype=torch.float64).T.reshape(1, 3, 1, 3)
    y = brightness(x, 0.5)[0, :, 0].T                   # (3 pixels, rgb)
    # V = max(.2, .4, .1) = .4 -> .9: rgb * .9 / .4 = (.45, .9, .225)
    assert torch.allclose(y[0], torch.tensor([0.45, 0.9, 0.225], dtype=torch.float64), atol=1e-12, rtol=0)
    # black: V = 0 -> .5, saturation 0: grey (.5, .5, .5)
    assert torch.allclose(y[1], torch.full((3,), 0.5, dtype=torch.float64), atol=1e-12, rtol=0)
    # V = .8 -> min(1.3, 1) = 1: rgb * 1 / .8 = (1, .5, .25)
    assert torch.allclose(y[2], torch.tensor([1.0, 0.5, 0.25], dtype=torch.float64), atol=1e-12, rtol=0)


def test_pixelate_box_blocks():
    x = torch.arange(16, dtype=torch.float64).view(1, 1, 4, 4) / 16
    # factor .5: BOX down to 2 x 2 = means of the 2 x 2 blocks, e.g. (0 + 1 + 4 + 5) / 4 / 16 = 2.5 / 16,
    # then BOX up to 4 x 4 repeats each mean over its block
    block_means = torch.tensor([[2.5, 4.5], [10.5, 12.5]], dtype=torch.float64) / 16
    expected = block_means.repeat_interleave(2, 0).repeat_interleave(2, 1).view(1, 1, 4, 4)
    assert torch.allclose(pixelate(x, 0.5), expected, atol=1e-12, rtol=0)


def test_audio_overlay_adds_noise_times_gain():
    w = tone(2, 8)
    noise = torch.tensor([0.01, -0.02, 0.03], dtype=torch.float64)
    # tiled to T = 8: n0 n1 n2 n0 n1 n2 n0 n1; gain 6 dB = 10 ** (6 / 20) = 1.9953
    tiled = torch.tensor([0.01, -0.02, 0.03, 0.01, -0.02, 0.03, 0.01, -0.02], dtype=torch.float64)
    assert torch.equal(fit_noise_length(noise, 8), tiled)
    assert torch.equal(fit_noise_length(torch.arange(10.0), 4), torch.arange(4.0))   # cut
    diff = audio_noise_overlay(w, noise, 6) - w
    assert torch.allclose(diff, (tiled * 10 ** (6 / 20)).expand(2, 8), atol=1e-15, rtol=0)


def test_gaussian_audio_noise_std():
    sigma = AUDIO_SEVERITY['gaussian_noise'][3]  # .26
    w = torch.zeros(8, 20480, dtype=torch.float64)
    noise = corrupt_audio(w, 'gaussian_noise', 4, gen())
    assert abs(noise.std().item() / sigma - 1) < 0.02
    assert abs(noise.mean().item()) < 0.01


def test_tables_match_imagenet_c():
    # np.arange(1, 1.11, .01) has 12 values (float rounding keeps 1.11); the others 16, 11, 13, 11
    assert [len(z) for z in VIDEO_SEVERITY['zoom_blur']] == [12, 16, 11, 13, 11]
    assert VIDEO_SEVERITY['zoom_blur'][4][-1] == pytest.approx(1.30)
    # elastic severity 1 = (244 * 2, 244 * .7, 244 * .1)
    assert VIDEO_SEVERITY['elastic_transform'][0] == pytest.approx((488, 170.8, 24.4))
    assert all(len(v) == 5 for v in list(VIDEO_SEVERITY.values()) + list(AUDIO_SEVERITY.values()))
    assert set(VIDEO_SEVERITY) == set(VIDEO_CORRUPTIONS) and set(AUDIO_SEVERITY) == set(AUDIO_CORRUPTIONS)


# --- severity monotonicity --------------------------------------------------------------------
# Pairs (a, b) with MSE(severity a) <= MSE(severity b); all consecutive pairs unless the table is
# not monotone in pixel distance (measured over 20 seeds at 64 x 64, means in the comments).
ALL_PAIRS = [(1, 2), (2, 3), (3, 4), (4, 5)]
MONOTONE_PAIRS = {
    # severities 1-2 add a large random affine warp (up to 24 / 49 px at 224), 3-5 a small one:
    # MSE .039 .047 | .012 .013 .014
    'elastic_transform': [(1, 2), (3, 4), (4, 5)],
    # the image weight drops .7 -> .65 while the frost weight stays .7, so severity 4 is closer to
    # the clean frame than 3: MSE .067 .087 .098 | .086 .092
    'frost': [(1, 2), (2, 3), (4, 5)],
    # severities 3 and 4 share strength 2.5 and differ only in fractal roughness: MSE .0316 vs .0318
    'fog': [(1, 2), (2, 3), (4, 5), (3, 5)],
    # severities 2 and 3 trade many faint flakes for fewer bright big ones: MSE .0901 vs .0902
    'snow': [(1, 2), (3, 4), (4, 5), (2, 4)],
}


@pytest.mark.parametrize('name', VIDEO_CORRUPTIONS)
def test_video_severity_monotone(name):
    x = textured(4)
    mse = {s: ((corrupt_video(x, name, s, gen(0)) - x) ** 2).mean().item() for s in range(1, 6)}
    assert mse[1] > 0
    for a, b in MONOTONE_PAIRS.get(name, ALL_PAIRS):
        assert mse[a] <= mse[b], f"{name}: MSE severity {a} = {mse[a]:.5f} > severity {b} = {mse[b]:.5f}"


@pytest.mark.parametrize('name', AUDIO_CORRUPTIONS)
def test_audio_severity_monotone(name):
    w = tone()
    mse = [((corrupt_audio(w, name, s, gen(0)) - w) ** 2).mean().item() for s in range(1, 6)]
    assert mse[0] > 0
    assert all(a <= b for a, b in zip(mse, mse[1:])), mse


# --- range, dtype, shape, determinism ---------------------------------------------------------
@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
@pytest.mark.parametrize('name', VIDEO_CORRUPTIONS)
def test_video_range_dtype_shape(name, dtype):
    x = textured(3, dtype=dtype)
    y = corrupt_video(x, name, 5, gen(1))
    assert y.shape == x.shape and y.dtype == dtype and y.device == x.device
    assert y.min() >= 0 and y.max() <= 1
    assert (y - x).abs().max() > 0.01  # severity 5 does change the frame


@pytest.mark.parametrize('name', VIDEO_CORRUPTIONS)
def test_video_deterministic(name):
    x = textured(2, size=32)
    assert torch.equal(corrupt_video(x, name, 3, gen(7)), corrupt_video(x, name, 3, gen(7)))
    assert torch.equal(corrupt_video(x, name, 3), corrupt_video(x, name, 3, gen(0)))  # None -> seed 0


@pytest.mark.parametrize('name', AUDIO_CORRUPTIONS)
def test_audio_deterministic_and_seeded(name):
    w = tone(2, 4000)
    a, b = corrupt_audio(w, name, 3, gen(7)), corrupt_audio(w, name, 3, gen(7))
    assert a.shape == w.shape and a.dtype == w.dtype
    assert torch.equal(a, b)
    assert not torch.equal(a, corrupt_audio(w, name, 3, gen(8)))


@pytest.mark.parametrize('kind', AUDIO_CORRUPTIONS[1:])
def test_noise_stand_in_level(kind):
    noise = noise_stand_in(kind, 16000, gen())
    assert noise.shape == (16000,) and noise.dtype == torch.float32
    assert noise.pow(2).mean().sqrt().item() == pytest.approx(NOISE_RMS, rel=1e-3)


def test_noise_stand_ins_differ_in_spectrum():
    def centroid(x):
        power = torch.fft.rfft(x.double()).abs() ** 2
        return (power * torch.fft.rfftfreq(len(x), 1 / 16000)).sum().item() / power.sum().item()
    c = {k: centroid(noise_stand_in(k, 32000, gen())) for k in AUDIO_CORRUPTIONS[1:]}
    # thunder is a low rumble, rain a broadband hiss with crackle
    assert c['thunder'] < c['traffic'] < c['wind'] < c['crowd'] < c['rain'], c


# --- files ------------------------------------------------------------------------------------
def test_wav_round_trip(tmp_path):
    x = torch.cat([torch.tensor([-1.0, 1.0, 0.0]), torch.rand(997, generator=gen()) * 2 - 1])
    path = write_wav(tmp_path / 'x.wav', x, 16000)
    y, sr = read_wav(path)
    assert sr == 16000 and y.dtype == torch.float32 and y.shape == x.shape
    assert (y - x).abs().max().item() <= 1 / 32767


def test_read_wav_stereo_and_8_bit(tmp_path):
    with wave.open(str(tmp_path / 's.wav'), 'wb') as f:
        f.setnchannels(2)
        f.setsampwidth(2)
        f.setframerate(8000)
        f.writeframes(np.array([16384, 0, -8192, -8192], '<i2').tobytes())   # frames (L, R)
    y, sr = read_wav(tmp_path / 's.wav')
    # (16384 + 0) / 2 / 32768 = .25; (-8192 - 8192) / 2 / 32768 = -.25
    assert sr == 8000 and torch.equal(y, torch.tensor([0.25, -0.25]))
    with wave.open(str(tmp_path / 'u8.wav'), 'wb') as f:
        f.setnchannels(1)
        f.setsampwidth(1)
        f.setframerate(16000)
        f.writeframes(bytes([128, 192, 0]))
    y, _ = read_wav(tmp_path / 'u8.wav')
    # (128 - 128) / 128 = 0; (192 - 128) / 128 = .5; (0 - 128) / 128 = -1
    assert torch.equal(y, torch.tensor([0.0, 0.5, -1.0]))


def test_noise_dir_recording_is_used(tmp_path):
    # a 300-sample recording of exact 16-bit values, tiled to 1000 samples
    rec = torch.round((torch.rand(300, generator=gen(3)) * 2 - 1) * 0.1 * 32768) / 32768
    write_wav(tmp_path / 'rain.wav', rec, 16000)
    w = tone(2, 1000)
    y = corrupt_audio(w, 'rain', 3, gen(), noise_dir=str(tmp_path))
    gain = 10 ** (AUDIO_SEVERITY['rain'][2] / 20)       # 4 dB
    expected = torch.cat([rec] * 4)[:1000].double() * gain
    assert torch.allclose(y - w, expected.expand(2, -1), atol=1e-12, rtol=0)
    # a recording at another rate is resampled to 16 kHz: 8 kHz, 300 samples -> 600, no tiling
    write_wav(tmp_path / 'wind.wav', rec, 8000)
    y = corrupt_audio(torch.zeros(1, 600, dtype=torch.float64), 'wind', 1, gen(), noise_dir=str(tmp_path))
    resampled = torchaudio.functional.resample(rec.float(), 8000, 16000)      # (600,)
    assert resampled.shape == (600,)
    assert torch.allclose(y[0], resampled.double() * 10 ** (1 / 20), atol=1e-12, rtol=0)
    refused(corrupt_audio, w, 'thunder', 1, gen(), noise_dir=str(tmp_path), match='thunder.wav')


def test_frost_dir_photograph_is_used(tmp_path):
    ice = torch.tensor([100, 150, 200], dtype=torch.uint8).view(3, 1, 1).expand(3, 300, 400).contiguous()
    torchvision.io.write_png(ice, str(tmp_path / 'frost1.png'))
    x = textured(2)
    y = corrupt_video(x, 'frost', 3, gen(), frost_dir=str(tmp_path))
    # severity 3 = (.7, .7): clip(.7 x + .7 * (100, 150, 200) / 255);
    # a constant photo stays constant when resized
    expected = (0.7 * x
                + 0.7 * torch.tensor([100, 150, 200], dtype=torch.float64).view(1, 3, 1, 1) / 255).clamp(0, 1)
    assert torch.allclose(y, expected, atol=1e-6, rtol=0)
    (tmp_path / 'empty').mkdir()
    for missing in (tmp_path / 'empty', tmp_path / 'absent'):
        refused(corrupt_video, x, 'frost', 3, gen(), frost_dir=str(missing), match='frost photographs')


# --- errors -----------------------------------------------------------------------------------
def test_bad_names_and_severities():
    x, w = textured(1, size=16), tone(1, 100)
    refused(corrupt_video, x, 'zoom_blurr', 3, match="'zoom_blurr' (closest: zoom_blur, motion_blur")
    refused(corrupt_audio, w, 'rainfall', 3, match="'rainfall' (closest: rain)")
    for bad in (0, 6, 2.5, '3'):
        refused(corrupt_video, x, 'fog', bad, match='valid severities are 1, 2, 3, 4, 5')
        refused(corrupt_audio, w, 'wind', bad, match='valid severities are 1, 2, 3, 4, 5')


# ---------------------------------------------------------------------------- python data.py corrupt
def write_stereo_wav(path, left, right, rate):
    """A 16-bit stereo WAV written with the wave module (interleaved left, right)."""
    pcm = np.round(np.stack([left.numpy(), right.numpy()], 1) * 32768).clip(-32768, 32767).astype("<i2")
    with wave.open(str(path), "wb") as f:
        f.setnchannels(2)
        f.setsampwidth(2)
        f.setframerate(rate)
        f.writeframes(pcm.tobytes())


@pytest.fixture
def corrupted(tmp_path):
    """A 6-clip clean set (frames 40 x 48 at frame_0 and frame_5, 1 s mono 16 kHz WAVs), a stereo 48 kHz
    wind recording of 0.5 s, and its corrupted copies: contrast and impulse_noise, gaussian_noise and wind."""
    make_read_layout(tmp_path, n=6)
    noise_dir = tmp_path / "noise"
    noise_dir.mkdir()
    t = torch.arange(24000) / 48000
    write_stereo_wav(noise_dir / "wind.wav", 0.2 * torch.sin(2 * math.pi * 300 * t),
                     0.1 * torch.sin(2 * math.pi * 500 * t), 48000)
    out = tmp_path / "C"
    argv = ["corrupt", "--json", str(tmp_path / "clean" / "severity_0.json"), "--out", str(out),
            "--video", "contrast", "impulse_noise", "--audio", "gaussian_noise", "wind", "--severities", "5",
            "--noise-dir", str(noise_dir)]
    report = data.main(argv)
    return tmp_path, out, argv, report


def test_frames_are_the_projects_corruption_saved_as_jpeg_85(corrupted):
    root, out, _, report = corrupted
    # 6 clips x 2 frames x 2 video corruptions + 6 clips x 2 audio corruptions
    assert report["written"] == 6 * 2 * 2 + 6 * 2 and report["skipped_existing"] == 0
    listed = json.loads((out / "video" / "contrast" / "severity_5.json").read_text())["data"]
    assert [e["video_id"] for e in listed] == [f"clip{i}" for i in range(6)]
    assert listed[0]["video_path"] == str(out / "video" / "contrast" / "severity_5") + os.sep
    assert listed[0]["wav"] == str(root / "wav" / "clip0.wav")  # clean audio kept
    for name in ("contrast", "impulse_noise"):
        # (1, 3, 40, 48)
        clean = data.read_image(root / "frames" / "frame_5" / "clip3.jpg")[None].float() / 255
        saved = data.read_image(out / "video" / name / "severity_5" / "frame_5"
                                / "clip3.jpg")[None].float() / 255
        assert saved.shape == clean.shape  # corrupted at the stored size
        g = data.file_generator(0, name, 5, "clip3", 5)
        expected = data.corrupt_video(clean, name, 5, generator=g)
        err = (saved - expected).abs().mean().item() * 255
        # no randomness: only JPEG 85's loss (on pixel-noise test frames, its worst case)
        if name == "contrast":
            assert err < 3.0
        # exactly JPEG quality 85 of the project's corruption:
        # encoding the expected frame at 85 gives the file
        jpeg = torchvision.io.encode_jpeg((expected[0] * 255).round().clamp(0, 255).to(torch.uint8),
                                          quality=85)
        assert bytes(jpeg.numpy()) == (out / "video" / name / "severity_5" / "frame_5"
                                       / "clip3.jpg").read_bytes()
    # each frame its own draw: frame_0 of the same clip is not hit at the same pixels as frame_5
    assert not torch.equal(data.file_generator(0, "impulse_noise", 5, "clip3", 0).get_state(),
                           data.file_generator(0, "impulse_noise", 5, "clip3", 5).get_state())


def test_wavs_are_the_projects_corruption_within_16_bit_quantisation(corrupted):
    root, out, _, _ = corrupted
    clean, rate = data.read_wav(root / "wav" / "clip2.wav")  # (16000,), 16 kHz
    noisy, noisy_rate = data.read_wav(out / "audio" / "gaussian_noise" / "severity_5" / "clip2.wav")
    expected = data.corrupt_audio(clean[None], "gaussian_noise", 5,
                                  generator=data.file_generator(0, "gaussian_noise", 5, "clip2"))
    assert noisy_rate == 16000 and noisy.shape == clean.shape
    assert (noisy - expected[0].clamp(-1, 1)).abs().max().item() <= 1 / 32768 + 1e-7  # one 16-bit step
    # wind: the stereo 48 kHz recording is averaged to mono and resampled to 16 kHz before the overlay,
    # so the clip keeps its 16,000 samples (READ issue #13: its length changed)
    windy, windy_rate = data.read_wav(out / "audio" / "wind" / "severity_5" / "clip2.wav")
    assert windy_rate == 16000 and windy.shape == (16000,)
    t = torch.arange(24000) / 48000
    mono = (0.2 * torch.sin(2 * math.pi * 300 * t) + 0.1 * torch.sin(2 * math.pi * 500 * t)) / 2
    noise = torchaudio.functional.resample(mono, 48000, 16000)  # 8,000 samples: tiled twice over the clip
    gain = 10 ** (8 / 20)  # severity 5: +8 dB
    expected = (clean + (gain * noise.repeat(2)).clamp(-1, 1)).clamp(-1, 1)
    # 16-bit steps of the noise file and of the output
    assert (windy - expected).abs().max().item() <= 2 / 32768


def test_resumed_run_skips_written_files_and_gives_the_same_set(corrupted):
    _, out, argv, _ = corrupted
    files = sorted(p for p in out.rglob("*") if p.suffix in (".jpg", ".wav"))
    before = {p: p.read_bytes() for p in files}
    mtimes = {p: p.stat().st_mtime_ns for p in files}
    gone = out / "video" / "impulse_noise" / "severity_5" / "frame_0" / "clip4.jpg"
    gone.unlink()  # as if the first run had been interrupted before this file
    report = data.main(argv)
    assert report["written"] == 1 and report["skipped_existing"] == len(files) - 1
    assert gone.read_bytes() == before[gone]  # the same randomness whatever was skipped before it
    assert all(p.stat().st_mtime_ns == mtimes[p] for p in files if p != gone)
    assert not [p for p in out.rglob("*.tmp")]


def test_resume_with_other_settings_is_refused(corrupted):
    _, out, argv, _ = corrupted
    with pytest.raises(SystemExit) as e:
        data.main(argv + ["--seed", "1"])
    assert "made with other settings" in str(e.value)


def test_corrupted_set_loads_with_adapt_read_and_scores_like_a_direct_evaluation(corrupted):
    root, out, _, _ = corrupted
    ckpt = root / "tiny3.pt"
    torch.manual_seed(0)
    model = CAVMAE("tiny", num_classes=3).eval()
    common.save_checkpoint(str(ckpt), model)
    for modality, corruption in (("audio", "wind"), ("video", "contrast")):
        res = root / f"{modality}.json"
        adapt.main(["--method", "source", "--data", "read", "--dataset", "ks50", "--data-root", str(out),
                    "--label-csv", str(root / "labels.csv"), "--checkpoint", str(ckpt),
                    "--modality", modality, "--corruption", corruption, "--batch-size", "6",
                    "--results", str(res)])
        got = json.loads(res.read_text())["accuracy"][corruption]["source"]["mean"]
        ds = data.ReadLayoutDataset(str(out / modality / corruption / "severity_5.json"),
                                    str(root / "labels.csv"), mel_bins=64, target_length=128, image_size=64)
        batch = torch.utils.data.default_collate([ds[i] for i in range(6)])
        with torch.no_grad():
            direct = 100.0 * (model(batch["audio"], batch["video"]).argmax(1)
                              == batch["label"]).float().mean().item()
        assert got == pytest.approx(direct)  # one batch of all 6 clips: the same number


def test_clip_without_frames_is_left_out_and_reported(tmp_path):
    make_read_layout(tmp_path, n=3)
    for f in (tmp_path / "frames").rglob("clip1.jpg"):
        f.unlink()
    report = data.main(["corrupt", "--json", str(tmp_path / "clean" / "severity_0.json"),
                        "--out", str(tmp_path / "C"),
                        "--video", "brightness", "--audio", "none", "--severities", "2"])
    listed = json.loads((tmp_path / "C" / "video" / "brightness" / "severity_2.json").read_text())["data"]
    assert [e["video_id"] for e in listed] == ["clip0", "clip2"]
    assert report["clips_without_files"] == {"video/brightness/severity_2": 1} and report["written"] == 4


@pytest.mark.parametrize("extra, message", [
    (["--video", "gaussian_blurr"], None),  # argparse: invalid choice
    (["--audio", "rainn"], None),
    (["--seed", "-1"], "a seed is a whole number"),
    (["--video", "none", "--audio", "none"], "leave nothing to do"),
    (["--audio", "wind", "--noise-dir", "NOISE"], "noise recording"),
    (["--batch-size", "0"], "--batch-size 0: give a whole number of at least 1"),
    (["--severities", "6"], None),  # argparse: invalid choice
    (["--severities", "high"], None),  # argparse: invalid int value
])
def test_bad_corrupt_arguments_end_with_one_sentence(tmp_path, extra, message):
    make_read_layout(tmp_path, n=2)
    (tmp_path / "noise").mkdir()
    extra = [str(tmp_path / "noise") if a == "NOISE" else a for a in extra]
    with pytest.raises(SystemExit) as e:
        data.main(["corrupt", "--json", str(tmp_path / "clean" / "severity_0.json"),
                   "--out", str(tmp_path / "C"), *extra])
    if message is None:
        assert e.value.code == 2  # argparse's usage error
    else:
        assert message in str(e.value) and str(e.value).startswith("error: ") and len(str(e.value)) <= 207
    assert not (tmp_path / "C").exists()  # refused before anything was written


def test_output_folder_that_is_a_file_or_not_writable_is_refused(tmp_path, monkeypatch):
    make_read_layout(tmp_path, n=2)
    argv = ["corrupt", "--json", str(tmp_path / "clean" / "severity_0.json"),
            "--audio", "none", "--video", "fog"]
    (tmp_path / "afile").write_text("x")
    with pytest.raises(SystemExit, match="--out .*afile is a file; give a folder"):
        data.main(argv + ["--out", str(tmp_path / "afile")])
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    if os.geteuid() == 0:  # root ignores permission bits: answer as the system would for an ordinary user
        real = os.access
        monkeypatch.setattr(os, "access", lambda p, m: False if str(p) == str(locked) else real(p, m))
    with pytest.raises(SystemExit, match="no write permission"):
        data.main(argv + ["--out", str(locked / "C")])


def test_a_batch_of_frames_gets_what_each_frame_gets_alone():
    # one generator per frame: frame i of a batch is exactly corrupt_video(frame i alone, its generator),
    # for every corruption (the random draws per frame, the filtering for the whole batch)
    x = torch.rand(5, 3, 40, 48, generator=torch.Generator().manual_seed(0))  # (5, 3, 40, 48)
    bank = data.frost_bank(48, torch.Generator().manual_seed(1))             # frost crops max(H, W) = 48
    for name in data.VIDEO_CORRUPTIONS:
        gens = lambda: [data.file_generator(0, name, 5, f"clip{i}", 3) for i in range(5)]
        alone = torch.cat([data.corrupt_video(x[i:i + 1], name, 5, g, frost_bank=bank)
                           for i, g in enumerate(gens())])
        assert torch.equal(data.corrupt_video(x, name, 5, gens(), frost_bank=bank), alone), name


def two_size_set(root):
    """make_read_layout's 4 clips (frames 40 x 48 at frame_0 and frame_5), clip3's frames 36 x 44 instead."""
    make_read_layout(root, n=4)
    g = torch.Generator().manual_seed(1)
    for i in (0, 5):
        img = (torch.rand(3, 36, 44, generator=g) * 255).to(torch.uint8)
        torchvision.io.write_file(str(root / "frames" / f"frame_{i}" / "clip3.jpg"),
                                  torchvision.io.encode_jpeg(img))
    return root / "clean" / "severity_0.json"


def corrupted_files(out):
    """{relative path: bytes} of every frame, WAV and JSON list under out (the lists with out's path cut)."""
    return {str(p.relative_to(out)): p.read_bytes().replace(str(out).encode(), b"OUT")
            for p in out.rglob("*") if p.suffix in (".jpg", ".wav", ".json")}


def test_files_do_not_depend_on_batch_size_workers_or_an_interruption(tmp_path, monkeypatch):
    clean = two_size_set(tmp_path)
    base = ["corrupt", "--json", str(clean), "--video", "all", "--audio", "all", "--seed", "7"]
    data.main(base + ["--out", str(tmp_path / "A"), "--batch-size", "1"])  # one file per call
    reference = corrupted_files(tmp_path / "A")
    # 4 clips x 2 frames x 15 + 4 WAVs x 6, plus 21 lists and the clean one
    assert (sum(k.endswith(".jpg") for k in reference) == 120
            and sum(k.endswith(".wav") for k in reference) == 24)
    # batches of 5 mix the two frame sizes and cross clips; two worker processes
    data.main(base + ["--out", str(tmp_path / "B"), "--batch-size", "5"])
    assert corrupted_files(tmp_path / "B") == reference
    # resumed after files were lost: the rest is kept, the lost ones come back the same
    lost = [tmp_path / "B" / k for k in ("video/frost/severity_5/frame_5/clip3.jpg",
                                         "video/fog/severity_5/frame_0/clip1.jpg",
                                         "video/snow/severity_5.json", "audio/crowd/severity_5/clip2.wav")]
    for p in lost:
        p.unlink()
    report = data.main(base + ["--out", str(tmp_path / "B"), "--batch-size", "2"])
    assert report["written"] == 3 and corrupted_files(tmp_path / "B") == reference
    # interrupted (Ctrl-C) after three batches, then run again
    real, calls = data.corrupt_video, []

    def interrupted(*args, **kw):
        calls.append(1)
        if len(calls) > 3:
            raise KeyboardInterrupt
        return real(*args, **kw)
    monkeypatch.setattr(data, "corrupt_video", interrupted)
    with pytest.raises(SystemExit, match="interrupted"):
        data.main(base + ["--out", str(tmp_path / "C"), "--batch-size", "3"])
    # the first corruption's 8 frames are written (calls on clip0-1, clip1-2, clip3's other size) and listed
    done = sorted(str(p.relative_to(tmp_path / "C")) for p in (tmp_path / "C").rglob("*.jpg"))
    assert done == sorted(f"video/gaussian_noise/severity_5/frame_{i}/clip{c}.jpg"
                          for i in (0, 5) for c in range(4))
    assert (tmp_path / "C" / "video" / "gaussian_noise" / "severity_5.json").is_file()
    assert not (tmp_path / "C" / "video" / "shot_noise" / "severity_5.json").exists()
    assert not list((tmp_path / "C").rglob("*.tmp"))
    monkeypatch.setattr(data, "corrupt_video", real)
    report = data.main(base + ["--out", str(tmp_path / "C"), "--batch-size", "3"])
    assert report["skipped_existing"] == 8 and corrupted_files(tmp_path / "C") == reference
    # and the files are the project's corruptions of each file alone: frost cropped from the set's bank
    # (frames of clip3 are 36 x 44: the bank of size max(H, W) = 44), crowd over the set's recording
    # (1, 3, 36, 44)
    frame = data.read_image(tmp_path / "frames" / "frame_5" / "clip3.jpg")[None].float() / 255
    iced = data.corrupt_video(frame, "frost", 5, data.file_generator(7, "frost", 5, "clip3", 5),
                              frost_bank=data.set_frost_bank(7, 44))
    jpeg = torchvision.io.encode_jpeg((iced[0] * 255).round().clamp(0, 255).to(torch.uint8), quality=85)
    assert bytes(jpeg.numpy()) == reference["video/frost/severity_5/frame_5/clip3.jpg"]
    wav, _ = data.read_wav(tmp_path / "wav" / "clip2.wav")                                          # (16000,)
    recording = data.set_noise_recording(7, "crowd", 16000)  # (160000,) 10 s
    assert (recording.shape == (160000,)
            and recording.pow(2).mean().sqrt().item() == pytest.approx(data.NOISE_RMS, rel=0.02))
    # severity 5: +8 dB, cut from its start
    expected = (wav + (10 ** (8 / 20) * recording[:16000]).clamp(-1, 1)).clamp(-1, 1)
    crowd, _ = data.read_wav(tmp_path / "A" / "audio" / "crowd" / "severity_5" / "clip2.wav")
    assert (crowd - expected).abs().max().item() <= 1 / 32768 + 1e-7  # one 16-bit step
