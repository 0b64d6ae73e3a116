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


# ---------------------------------------------------------------------------- both cores, the same bytes
def _square_and_pid(job):  # module level: a forked worker finds it by name
    if job == "bad":
        raise data.DataError("job 'bad' failed")
    return {"value": torch.tensor([float(job) ** 2]), "pid": torch.tensor([os.getpid()])}


def test_parallel_fill_puts_each_result_in_its_place_and_runs_chosen_jobs_here():
    jobs = [1, 2, 3, 4, 5]
    dests = [{"value": data.shared_empty((1,), torch.float32), "pid": data.shared_empty((1,), torch.int64)} for _ in jobs]
    done = []
    data.parallel_fill(_square_and_pid, jobs, dests, workers=2, in_process=[3], progress=done.append)
    assert [d["value"].item() for d in dests] == [1.0, 4.0, 9.0, 16.0, 25.0]  # job i -> dests[i]
    pids = [d["pid"].item() for d in dests]
    assert pids[3] == os.getpid() and all(p != os.getpid() for i, p in enumerate(pids) if i != 3)
    assert sorted(done) == [0, 1, 2, 3, 4]
    # one worker: every job here
    data.parallel_fill(_square_and_pid, jobs, dests, workers=1)
    assert all(d["pid"].item() == os.getpid() for d in dests)
    # a worker's error reaches the caller with its message
    with pytest.raises(data.DataError, match="job 'bad' failed"):
        data.parallel_fill(_square_and_pid, [1, "bad"], dests[:2], workers=2)


def test_generation_and_fbank_do_not_depend_on_the_worker_count():
    small = dict(data.EMBEDDED, n_train=40, n_val=20, n_test=30)
    one, two = data.generate_embedded(5, small, workers=1), data.generate_embedded(5, small, workers=2)
    assert all(torch.equal(one[s][k], two[s][k]) for s in one for k in one[s])
    wavs = 0.1 * torch.randn(data.PARALLEL_MIN_CLIPS, 3200, generator=torch.Generator().manual_seed(0))
    serial = torch.stack([data.wav_to_fbank(w, 64, 24) for w in wavs])
    assert torch.equal(data.wavs_to_fbank(wavs, 64, 24, workers=2), serial)
    assert torch.equal(data.wavs_to_fbank(wavs, 64, 24, workers=1), serial)


def test_embedded_test_sets_equal_one_split_at_a_time():
    m = CAVMAE("tiny")
    pairs = [("zoom_blur", None), ("fog", None), (None, "wind"), ("contrast", "rain")]
    sets = data.embedded_test_sets(m, pairs, workers=2, quiet=True)
    for (vc, ac), ds in zip(pairs, sets):
        one = data.embedded_split("test", m, video_corruption=vc, audio_corruption=ac)
        assert all(torch.equal(ds.fields[k], one.fields[k]) for k in ("audio", "video", "label")), (vc, ac)
    with pytest.raises(ValueError, match="Unknown video corruption 'fogg'"):
        data.embedded_test_sets(m, [("fog", None), ("fogg", None)], quiet=True)


def test_make_loader_gives_the_batches_of_per_clip_fetching():
    ds = data.AVTensors({"audio": torch.randn(70, 4, 2), "video": torch.randn(70, 3, 2, 2), "label": torch.arange(70)})
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


def test_importing_the_scripts_leaves_torchvision_unloaded():
    import subprocess
    import sys
    code = "import sys, adapt, train; print('torchvision' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.stdout.strip() == "False", out.stderr


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
    assert capsys.readouterr().err == (f"[data] --modality both: dropped 2 of 5 clips of {video} missing from the "
                                       f"audio list and 1 of 4 clips of {audio} missing from the video list\n")
    write_list(tmp_path / "audio" / "wind" / "severity_5.json", entries[5:])
    with pytest.raises(data.DataError, match=r"the video list .* and the audio list .* share no video_id"):
        data.read_layout_split(str(tmp_path), str(tmp_path / "labels.csv"), CAVMAE("tiny"),
                               video_corruption="gaussian_noise", audio_corruption="wind")


def test_clip_listed_twice_is_refused_naming_it_and_both_positions(tmp_path):
    entries = make_read_layout(tmp_path, n=4)
    twice = write_list(tmp_path / "twice.json", entries[:3] + [dict(entries[1])])  # clip1 at entries 1 and 3
    with pytest.raises(data.DataError) as e:
        data.read_json_list(twice)
    assert str(e.value) == f"{twice} lists the clip 'clip1' twice (entries 1 and 3); remove one of them."


def test_clip_with_several_labels_is_refused(tmp_path):
    entries = make_read_layout(tmp_path, n=3)
    multi = write_list(tmp_path / "multi.json", [entries[0], dict(entries[1], labels="/m/c1,/m/c2")])
    with pytest.raises(data.DataError) as e:  # VGGSound-style comma-separated mids: the first would be scored
        data.ReadLayoutDataset(multi, str(tmp_path / "labels.csv"))
    assert str(e.value) == (f"clip clip1 in {multi} has 2 labels '/m/c1,/m/c2', but these runs are single-label "
                            f"(one class per clip); keep the one label to score it against.")


# ---------------------------------------------------------------------------- bad inputs, one sentence each
def write_labels(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_label_csv_indices_must_be_exactly_0_to_k_minus_1(tmp_path):
    make_read_layout(tmp_path, n=3)
    # 1-based indices: class k would be scored against output k - 1 (adapt.py: a silently wrong accuracy;
    # train.py: IndexError at index 3 of a 3-way head)
    one_based = write_labels(tmp_path / "l1.csv", ["index,mid,display_name", "1,/m/c0,a", "2,/m/c1,b", "3,/m/c2,c"])
    with pytest.raises(data.DataError, match=r"l1.csv has indices 1..3, not exactly 0..2"):
        data.read_label_csv(one_based)
    gap = write_labels(tmp_path / "l2.csv", ["0,/m/c0", "1,/m/c1", "5,/m/c2"])
    with pytest.raises(data.DataError, match=r"indices 0..5 with repeats or gaps, not exactly 0..2"):
        data.read_label_csv(gap)
    twice = write_labels(tmp_path / "l3.csv", ["0,/m/c0", "1,/m/c0"])
    with pytest.raises(data.DataError, match="lists the label '/m/c0' twice"):
        data.read_label_csv(twice)
    # a spreadsheet's byte-order mark before a header-less first line is not a header: class 0 is kept
    (tmp_path / "bom.csv").write_bytes("\ufeff0,/m/c0\n1,/m/c1\n".encode("utf-8"))
    assert data.read_label_csv(str(tmp_path / "bom.csv")) == {"/m/c0": 0, "/m/c1": 1}
    with pytest.raises(data.DataError, match="is a folder, not a file"):
        data.read_label_csv(str(tmp_path))


@pytest.mark.parametrize("content, message", [
    ('{"data": "clips"}', "is not a READ data list"),
    ('[{"video_id": "a"}]', "is not a READ data list"),
    ('{"data": [1, 2]}', "entry 0 of .* is int '1', not an object"),
    ('{"data": [{"video_id": 7, "wav": "a.wav", "video_path": "f/", "labels": "/m/c0"}]}', "has video_id = 7"),
    ('{"data": [{"video_id": "a", "wav": "a.wav", "video_path": "f/", "labels": ["/m/c0"]}]}', "has labels = \\['/m/c0'\\]"),
    ('{"data": [', "is not valid JSON"),
])
def test_json_list_with_wrong_types_is_refused(tmp_path, content, message):
    (tmp_path / "l.json").write_text(content)
    with pytest.raises(data.DataError, match=message):
        data.read_json_list(str(tmp_path / "l.json"))


def test_binary_json_list_is_refused(tmp_path):
    (tmp_path / "l.json").write_bytes(b"\xff\xfe\x00\x81")
    with pytest.raises(data.DataError, match="is not UTF-8 text"):
        data.read_json_list(str(tmp_path / "l.json"))


def raw_wav(path, channels=1, width=2, rate=16000, payload=b"", declared_frames=None):
    """A WAV header written byte by byte (the wave module refuses to write 0 channels)."""
    import struct
    fmt = struct.pack("<HHIIHH", 1, channels, rate, rate * channels * width, channels * width, 8 * width)
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", len(payload)) + payload
    path.write_bytes(b"RIFF" + struct.pack("<I", len(body)) + body)
    return str(path)


def test_bad_wavs_are_named_and_odd_sizes_read_correctly(tmp_path):
    with pytest.raises(data.DataError, match="empty WAV file"):
        data.wav_info(raw_wav(tmp_path / "empty.wav"))
    with pytest.raises(data.DataError, match="bad # of channels"):
        data.wav_info(raw_wav(tmp_path / "zero.wav", channels=0, payload=b"\x00\x00"))
    with pytest.raises(data.DataError, match="sample rate of 0 Hz"):
        data.wav_info(raw_wav(tmp_path / "zerohz.wav", rate=0, payload=b"\x00\x00"))
    (tmp_path / "text.wav").write_text("hello")
    with pytest.raises(data.DataError, match="is not a PCM WAV file"):
        data.read_wav(tmp_path / "text.wav")
    # 16-bit stereo with a stray byte at the end: two whole frames (1000, 3000) and (-2000, 0), the byte dropped
    import struct
    odd = raw_wav(tmp_path / "odd.wav", channels=2, payload=struct.pack("<4h", 1000, 3000, -2000, 0) + b"\x07")
    wav, rate = data.read_wav(odd)
    # mono = mean of the channels: (1000 + 3000) / 2 / 32768 = 0.061035, (-2000 + 0) / 2 / 32768 = -0.030518
    assert rate == 16000 and torch.allclose(wav, torch.tensor([2000 / 32768, -1000 / 32768]))


def test_read_layout_refuses_empty_short_and_non_image_files_up_front(tmp_path):
    entries = make_read_layout(tmp_path, n=2)
    csv_path = str(tmp_path / "labels.csv")
    raw_wav(tmp_path / "wav" / "clip0.wav")  # 0 samples
    with pytest.raises(data.DataError, match="clip0.wav is an empty WAV file"):
        data.ReadLayoutDataset(str(tmp_path / "clean" / "severity_0.json"), csv_path)
    data.write_wav(str(tmp_path / "wav" / "clip0.wav"), torch.zeros(100))  # 6.25 ms
    with pytest.raises(data.DataError, match="lasts 6.2 ms, shorter than one 25 ms fbank window"):
        data.ReadLayoutDataset(str(tmp_path / "clean" / "severity_0.json"), csv_path)
    data.write_wav(str(tmp_path / "wav" / "clip0.wav"), torch.zeros(16000))
    (tmp_path / "frames" / "frame_5" / "clip1.jpg").write_text("not an image")
    with pytest.raises(data.DataError, match="clip1.jpg is not a JPEG or PNG image"):
        data.ReadLayoutDataset(str(tmp_path / "clean" / "severity_0.json"), csv_path)
    assert entries[1]["video_id"] == "clip1"


def test_truncated_jpeg_is_named_when_read(tmp_path):
    make_read_layout(tmp_path, n=2)
    frame = tmp_path / "frames" / "frame_5" / "clip1.jpg"
    frame.write_bytes(frame.read_bytes()[:200])  # starts like a JPEG, ends early
    ds = data.ReadLayoutDataset(str(tmp_path / "clean" / "severity_0.json"), str(tmp_path / "labels.csv"),
                                mel_bins=64, target_length=128, image_size=64)
    assert ds[0]["label"].item() == 0
    with pytest.raises(data.DataError, match="clip1.jpg is not a readable JPEG/PNG image"):
        ds[1]


def test_with_missing_on_a_lazily_read_dataset_matches_the_in_memory_one(tmp_path):
    make_read_layout(tmp_path, n=4)
    ds = data.ReadLayoutDataset(str(tmp_path / "clean" / "severity_0.json"), str(tmp_path / "labels.csv"),
                                mel_bins=64, target_length=128, image_size=64)
    in_memory = data.AVTensors(dict(torch.utils.data.default_collate([ds[i] for i in range(4)])))
    has_a, has_v = torch.tensor([True, False, True, True]), torch.tensor([True, True, False, True])
    lazy, eager = data.with_missing(ds, has_a, has_v), data.with_missing(in_memory, has_a, has_v)
    for i in range(4):
        for k in ("audio", "video", "label", "has_audio", "has_video"):
            assert torch.equal(lazy[i][k], eager[i][k])
    assert lazy[1]["audio"].abs().sum() == 0 and lazy[2]["video"].abs().sum() == 0
