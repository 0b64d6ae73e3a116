"""`python data.py corrupt`: a corrupted set in READ's layout from a clean list, loaded by adapt.py."""
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
from test_data import make_read_layout


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
    write_stereo_wav(noise_dir / "wind.wav", 0.2 * torch.sin(2 * math.pi * 300 * t), 0.1 * torch.sin(2 * math.pi * 500 * t), 48000)
    out = tmp_path / "C"
    argv = ["corrupt", "--json", str(tmp_path / "clean" / "severity_0.json"), "--out", str(out),
            "--video", "contrast", "impulse_noise", "--audio", "gaussian_noise,wind", "--severities", "5",
            "--noise-dir", str(noise_dir), "--workers", "1"]
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
        clean = data.read_image(root / "frames" / "frame_5" / "clip3.jpg")[None].float() / 255  # (1, 3, 40, 48)
        saved = data.read_image(out / "video" / name / "severity_5" / "frame_5" / "clip3.jpg")[None].float() / 255
        assert saved.shape == clean.shape  # corrupted at the stored size
        g = data.file_generator(0, name, 5, "clip3", 5)
        expected = data.corrupt_video(clean, name, 5, generator=g)
        err = (saved - expected).abs().mean().item() * 255
        if name == "contrast":  # no randomness: only JPEG 85's loss (on pixel-noise test frames, its worst case)
            assert err < 3.0
        # exactly JPEG quality 85 of the project's corruption: encoding the expected frame at 85 gives the file
        jpeg = torchvision.io.encode_jpeg((expected[0] * 255).round().clamp(0, 255).to(torch.uint8), quality=85)
        assert bytes(jpeg.numpy()) == (out / "video" / name / "severity_5" / "frame_5" / "clip3.jpg").read_bytes()
    # each frame its own draw: frame_0 of the same clip is not hit at the same pixels as frame_5
    assert not torch.equal(data.file_generator(0, "impulse_noise", 5, "clip3", 0).get_state(),
                           data.file_generator(0, "impulse_noise", 5, "clip3", 5).get_state())


def test_wavs_are_the_projects_corruption_within_16_bit_quantisation(corrupted):
    root, out, _, _ = corrupted
    clean, rate = data.read_wav(root / "wav" / "clip2.wav")  # (16000,), 16 kHz
    noisy, noisy_rate = data.read_wav(out / "audio" / "gaussian_noise" / "severity_5" / "clip2.wav")
    expected = data.corrupt_audio(clean[None], "gaussian_noise", 5, generator=data.file_generator(0, "gaussian_noise", 5, "clip2"))
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
    assert (windy - expected).abs().max().item() <= 2 / 32768  # 16-bit steps of the noise file and of the output


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
                    "--label-csv", str(root / "labels.csv"), "--checkpoint", str(ckpt), "--modality", modality,
                    "--corruption", corruption, "--batch-size", "6", "--results", str(res)])
        got = json.loads(res.read_text())["accuracy"][corruption]["source"]["mean"]
        ds = data.ReadLayoutDataset(str(out / modality / corruption / "severity_5.json"), str(root / "labels.csv"),
                                    mel_bins=64, target_length=128, image_size=64)
        batch = torch.utils.data.default_collate([ds[i] for i in range(6)])
        with torch.no_grad():
            direct = 100.0 * (model(batch["audio"], batch["video"]).argmax(1) == batch["label"]).float().mean().item()
        assert got == pytest.approx(direct)  # one batch of all 6 clips: the same number


def test_clip_without_frames_is_left_out_and_reported(tmp_path):
    make_read_layout(tmp_path, n=3)
    for f in (tmp_path / "frames").rglob("clip1.jpg"):
        f.unlink()
    report = data.main(["corrupt", "--json", str(tmp_path / "clean" / "severity_0.json"), "--out", str(tmp_path / "C"),
                        "--video", "brightness", "--audio", "none", "--severities", "2"])
    listed = json.loads((tmp_path / "C" / "video" / "brightness" / "severity_2.json").read_text())["data"]
    assert [e["video_id"] for e in listed] == ["clip0", "clip2"]
    assert report["clips_without_files"] == {"video/brightness/severity_2": 1} and report["written"] == 4


@pytest.mark.parametrize("extra, message", [
    (["--video", "gaussian_blurr"], "unknown video corruption 'gaussian_blurr'"),
    (["--audio", "rainn"], "unknown audio corruption 'rainn'"),
    (["--severities", "6"], "--severities 6 is out of range"),
    (["--severities", "0"], "--severities 0 is out of range"),
    (["--severities", "high"], "severities are whole numbers 1..5"),
    (["--seed", "-1"], "a seed is a whole number"),
    (["--video", "none", "--audio", "none"], "leave nothing to do"),
    (["--audio", "wind", "--noise-dir", "NOISE"], "noise recording"),
    (["--workers", "0"], "--workers 0: give a whole number of at least 1"),
    (["--batch-size", "four"], "--batch-size four: give a whole number of at least 1"),
])
def test_bad_corrupt_arguments_end_with_one_sentence(tmp_path, extra, message):
    make_read_layout(tmp_path, n=2)
    (tmp_path / "noise").mkdir()
    extra = [str(tmp_path / "noise") if a == "NOISE" else a for a in extra]
    with pytest.raises(SystemExit) as e:
        data.main(["corrupt", "--json", str(tmp_path / "clean" / "severity_0.json"), "--out", str(tmp_path / "C"), *extra])
    assert message in str(e.value) and str(e.value).startswith("error: ")
    assert not (tmp_path / "C").exists()  # refused before anything was written


def test_output_folder_that_is_a_file_or_not_writable_is_refused(tmp_path, monkeypatch):
    make_read_layout(tmp_path, n=2)
    argv = ["corrupt", "--json", str(tmp_path / "clean" / "severity_0.json"), "--audio", "none", "--video", "fog"]
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
        alone = torch.cat([data.corrupt_video(x[i:i + 1], name, 5, g, frost_bank=bank) for i, g in enumerate(gens())])
        assert torch.equal(data.corrupt_video(x, name, 5, gens(), frost_bank=bank), alone), name


def two_size_set(root):
    """make_read_layout's 4 clips (frames 40 x 48 at frame_0 and frame_5), clip3's frames 36 x 44 instead."""
    make_read_layout(root, n=4)
    g = torch.Generator().manual_seed(1)
    for i in (0, 5):
        img = (torch.rand(3, 36, 44, generator=g) * 255).to(torch.uint8)
        torchvision.io.write_file(str(root / "frames" / f"frame_{i}" / "clip3.jpg"), torchvision.io.encode_jpeg(img))
    return root / "clean" / "severity_0.json"


def corrupted_files(out):
    """{relative path: bytes} of every frame, WAV and JSON list under out (the lists with out's path cut)."""
    return {str(p.relative_to(out)): p.read_bytes().replace(str(out).encode(), b"OUT")
            for p in out.rglob("*") if p.suffix in (".jpg", ".wav", ".json")}


def test_files_do_not_depend_on_batch_size_workers_or_an_interruption(tmp_path, monkeypatch):
    clean = two_size_set(tmp_path)
    base = ["corrupt", "--json", str(clean), "--video", "all", "--audio", "all", "--seed", "7"]
    data.main(base + ["--out", str(tmp_path / "A"), "--batch-size", "1", "--workers", "1"])  # one file per call
    reference = corrupted_files(tmp_path / "A")
    # 4 clips x 2 frames x 15 + 4 WAVs x 6, plus 21 lists and the clean one
    assert sum(k.endswith(".jpg") for k in reference) == 120 and sum(k.endswith(".wav") for k in reference) == 24
    # batches of 5 mix the two frame sizes and cross clips; two worker processes
    data.main(base + ["--out", str(tmp_path / "B"), "--batch-size", "5", "--workers", "2"])
    assert corrupted_files(tmp_path / "B") == reference
    # resumed after files were lost: the rest is kept, the lost ones come back the same
    lost = [tmp_path / "B" / k for k in ("video/frost/severity_5/frame_5/clip3.jpg", "video/fog/severity_5/frame_0/clip1.jpg",
                                         "video/snow/severity_5.json", "audio/crowd/severity_5/clip2.wav")]
    for p in lost:
        p.unlink()
    report = data.main(base + ["--out", str(tmp_path / "B"), "--batch-size", "2", "--workers", "2"])
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
        data.main(base + ["--out", str(tmp_path / "C"), "--batch-size", "3", "--workers", "1"])
    # the first corruption's 8 frames are written (calls on clip0-1, clip1-2, clip3's other size) and listed
    done = sorted(str(p.relative_to(tmp_path / "C")) for p in (tmp_path / "C").rglob("*.jpg"))
    assert done == sorted(f"video/gaussian_noise/severity_5/frame_{i}/clip{c}.jpg" for i in (0, 5) for c in range(4))
    assert (tmp_path / "C" / "video" / "gaussian_noise" / "severity_5.json").is_file()
    assert not (tmp_path / "C" / "video" / "shot_noise" / "severity_5.json").exists()
    assert not list((tmp_path / "C").rglob("*.tmp"))
    monkeypatch.setattr(data, "corrupt_video", real)
    report = data.main(base + ["--out", str(tmp_path / "C"), "--batch-size", "3", "--workers", "1"])
    assert report["skipped_existing"] == 8 and corrupted_files(tmp_path / "C") == reference
    # and the files are the project's corruptions of each file alone: frost cropped from the set's bank
    # (frames of clip3 are 36 x 44: the bank of size max(H, W) = 44), crowd over the set's recording
    frame = data.read_image(tmp_path / "frames" / "frame_5" / "clip3.jpg")[None].float() / 255   # (1, 3, 36, 44)
    iced = data.corrupt_video(frame, "frost", 5, data.file_generator(7, "frost", 5, "clip3", 5),
                              frost_bank=data.set_frost_bank(7, 44))
    jpeg = torchvision.io.encode_jpeg((iced[0] * 255).round().clamp(0, 255).to(torch.uint8), quality=85)
    assert bytes(jpeg.numpy()) == reference["video/frost/severity_5/frame_5/clip3.jpg"]
    wav, _ = data.read_wav(tmp_path / "wav" / "clip2.wav")                                          # (16000,)
    recording = data.set_noise_recording(7, "crowd", 16000)                                         # (160000,) 10 s
    assert recording.shape == (160000,) and recording.pow(2).mean().sqrt().item() == pytest.approx(data.NOISE_RMS, rel=0.02)
    expected = (wav + (10 ** (8 / 20) * recording[:16000]).clamp(-1, 1)).clamp(-1, 1)  # severity 5: +8 dB, cut from its start
    crowd, _ = data.read_wav(tmp_path / "A" / "audio" / "crowd" / "severity_5" / "clip2.wav")
    assert (crowd - expected).abs().max().item() <= 1 / 32768 + 1e-7  # one 16-bit step
