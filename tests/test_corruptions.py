"""Tests of the Kinetics50-C / VGGSound-C corruptions: identities, hand-computed values, severity
monotonicity, ranges, determinism, WAV I/O, noise / frost files, error messages."""
import math
import wave

import numpy as np
import pytest
import torch
import torchaudio
import torchvision.io

from data import (AUDIO_CORRUPTIONS, AUDIO_SEVERITY, NOISE_RMS, VIDEO_CORRUPTIONS,
                              VIDEO_SEVERITY, audio_noise_overlay, brightness, contrast, corrupt_audio,
                              corrupt_video, elastic_transform, fit_noise_length, frost, gaussian_noise_audio,
                              gaussian_noise_video, glass_blur, impulse_noise, motion_blur, noise_stand_in,
                              pixelate, read_wav, write_wav, zoom_blur)


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
    x = torch.tensor([[0.2, 0.4, 0.1], [0.0, 0.0, 0.0], [0.8, 0.4, 0.2]], dtype=torch.float64).T.reshape(1, 3, 1, 3)
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
    with pytest.raises(FileNotFoundError, match='thunder.wav'):
        corrupt_audio(w, 'thunder', 1, gen(), noise_dir=str(tmp_path))


def test_frost_dir_photograph_is_used(tmp_path):
    ice = torch.tensor([100, 150, 200], dtype=torch.uint8).view(3, 1, 1).expand(3, 300, 400).contiguous()
    torchvision.io.write_png(ice, str(tmp_path / 'frost1.png'))
    x = textured(2)
    y = corrupt_video(x, 'frost', 3, gen(), frost_dir=str(tmp_path))
    # severity 3 = (.7, .7): clip(.7 x + .7 * (100, 150, 200) / 255); a constant photo stays constant when resized
    expected = (0.7 * x + 0.7 * torch.tensor([100, 150, 200], dtype=torch.float64).view(1, 3, 1, 1) / 255).clamp(0, 1)
    assert torch.allclose(y, expected, atol=1e-6, rtol=0)
    (tmp_path / 'empty').mkdir()
    for missing in (tmp_path / 'empty', tmp_path / 'absent'):
        with pytest.raises(FileNotFoundError, match='frost photographs'):
            corrupt_video(x, 'frost', 3, gen(), frost_dir=str(missing))


# --- errors -----------------------------------------------------------------------------------
def test_bad_names_and_severities():
    x, w = textured(1, size=16), tone(1, 100)
    with pytest.raises(ValueError, match="'blur'.*gaussian_noise, shot_noise.*jpeg_compression"):
        corrupt_video(x, 'blur', 3)
    with pytest.raises(ValueError, match="'rainfall'.*gaussian_noise, traffic, crowd, rain, thunder, wind"):
        corrupt_audio(w, 'rainfall', 3)
    for bad in (0, 6, 2.5, '3'):
        with pytest.raises(ValueError, match='valid severities are 1, 2, 3, 4, 5'):
            corrupt_video(x, 'fog', bad)
        with pytest.raises(ValueError, match='valid severities are 1, 2, 3, 4, 5'):
            corrupt_audio(w, 'wind', bad)
