"""Data: the embedded audio-visual and image-text benchmarks, corruptions, real-data readers, missing data.

Audio-video batches: audio (B, T, F) normalised kaldi fbank, video (B, 3, H, W) one ImageNet-normalised RGB
frame, label (B,), index (B,) (position in the split: pairs Source with a method). Image-text batches: image
(B, 3, H, W) CLIP-normalised, text (B, C) ids, label, index. Missing-modality data adds has_<modality> (B,)
bool (`with_missing`). The embedded benchmarks are generated from a seed and cached in `.cache/` under their
version ids; the 15 video + 6 audio corruptions of Kinetics50-C / VGGSound-C act on raw frames / waveforms.

Deviations (each marked `# DEVIATION:` at its line):
- corruptions: spatial parameters are scaled from 224 px to the frame size (corrupt_video)
- corruptions: float in, float out, no uint8 rounding between steps (corrupt_video)
- defocus_blur: the disk kernel is anti-aliased by supersampling (disk_kernel)
- glass_blur: bilinear resampling at random offsets instead of whole-pixel swaps (glass_blur)
- snow: the snow layer is drawn at 224 px and area-resized to the frame (snow)
- frost: procedural stand-ins for ImageNet-C's ice photographs (frost)
- fog: the fractal map is the next power of two >= the frame size (fog)
- elastic_transform: the field's amplitude follows the 224 px grid (elastic_transform)
- elastic_transform: affine warp and displacement in one resampling (elastic_transform)
- audio noises: procedural stand-ins for READ's recordings (corrupt_audio, corrupt_wav_files)
- read_image: a 16-bit PNG keeps its high byte (PIL clips 16-bit grey to white in convert("RGB"))
- clean_text: ftfy.fix_text's defaults written with the standard library; mojibake is not repaired
- CLIP_SPLIT: the `regex` module's \\p{L} / \\p{N} built for `re` from Python's own Unicode tables
- MM-IMDb: the first plot of a film, one sample per film (mmimdb_samples)
- MM-IMDb: genres outside the 23 other than the four MM-IMDb dropped are refused (mmimdb_samples)
- Hateful Memes: dev_seen / test_seen read by their published names (IMAGE_TEXT_SPLITS)
- Food-101: without MAP's split.json, val is a seeded 10% of the train rows (food101_samples)
- missing tables: drawn with a seeded torch.Generator, not Python's `random` (missing_masks)
"""
import argparse
import csv
import difflib
import functools
import gzip
import hashlib
import html
import json
import math
import os
import re
import sys
import unicodedata
import wave
import zlib

import numpy as np
import torch
import torch.nn.functional as F
import torchaudio
import torchvision.io
import torchvision.transforms.functional as TF
from tqdm import tqdm

import common
from common import Refusal, need


SAMPLE_RATE = 16000
FBANK_MEAN, FBANK_STD = -5.081, 4.4849  # READ's normalisation constants (KS50 and VGGSound)
FBANK_WINDOW = 400  # samples in one 25 ms kaldi fbank window at 16 kHz: a shorter clip has no frame
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)  # openai/CLIP
CACHE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), ".cache")


# ---- The one pre-processing path (READ / CAV-MAE), and batches ---------------------------------------------
def wav_to_fbank(wav, mel_bins=128, target_length=1024):
    """wav (T_samples,) 16 kHz -> normalised fbank (target_length, mel_bins), as READ / CAV-MAE."""
    wav = wav - wav.mean()
    fbank = torchaudio.compliance.kaldi.fbank(
        wav.unsqueeze(0), htk_compat=True, sample_frequency=SAMPLE_RATE, use_energy=False,
        window_type="hanning", num_mel_bins=mel_bins, dither=0.0, frame_shift=10)  # (frames, F)
    pad = target_length - fbank.shape[0]
    fbank = F.pad(fbank, (0, 0, 0, pad)) if pad > 0 else fbank[:target_length]
    return (fbank - FBANK_MEAN) / FBANK_STD


def wavs_to_fbank(wavs, mel_bins, target_length):
    """(N, T_samples) -> (N, target_length, mel_bins)."""
    rows = tqdm(wavs, desc="fbank", unit="clip", leave=False, dynamic_ncols=True, disable=len(wavs) < 500)
    return torch.stack([wav_to_fbank(w, mel_bins, target_length) for w in rows])


def frames_to_input(frames, size, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """uint8 or [0, 1] float frames (N, 3, h, w) -> (N, 3, size, size) normalised with mean / std."""
    x = frames.float() / 255.0 if frames.dtype == torch.uint8 else frames.float()
    if x.shape[-2:] != (size, size):
        x = TF.resize(x, size, interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
        x = TF.center_crop(x, [size, size]).clamp(0, 1)
    mean, std = (torch.as_tensor(v, dtype=x.dtype, device=x.device)[:, None, None] for v in (mean, std))
    return (x - mean) / std  # torchvision's normalize, the same two operations


class AVTensors(torch.utils.data.Dataset):
    """In-memory samples {'audio': (N, T, F), 'video': (N, 3, H, W), 'label': (N,), ...} -> one dict each."""

    def __init__(self, fields):
        n = len(fields["label"])
        need(n > 0, "The dataset is empty; check the data path or the split you asked for.")
        self.fields = dict(fields)
        self.fields.setdefault("index", torch.arange(n))

    def __len__(self):
        return len(self.fields["label"])

    def __getitem__(self, i):
        """Sample i, or with a list of positions the batch of those samples (what make_loader asks for)."""
        return {k: v[i] for k, v in self.fields.items()}

    def with_fields(self, **extra):
        """A copy with fields added or replaced (e.g. has_audio / has_video, corrupted audio)."""
        return AVTensors({**self.fields, **extra})


def make_loader(dataset, batch_size, shuffle, seed=0, num_workers=0):
    """A DataLoader whose order depends only on `seed`; AVTensors are indexed a batch at a time."""
    g = torch.Generator().manual_seed(seed)
    if isinstance(dataset, AVTensors):
        sampler = torch.utils.data.RandomSampler if shuffle else torch.utils.data.SequentialSampler
        order = sampler(dataset, generator=g) if shuffle else sampler(dataset)
        batches = torch.utils.data.BatchSampler(order, batch_size, drop_last=False)
        return torch.utils.data.DataLoader(dataset, batch_size=None, sampler=batches, generator=g,
                                           num_workers=num_workers)
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=g,
                                       num_workers=num_workers, drop_last=False)


def to_device(batch, device):
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


# ---- Corruptions of Kinetics50-C / VGGSound-C (READ), batched in torch -------------------------------------
# Video: the 15 ImageNet-C corruptions (hendrycks/robustness `imagenet_c/corruptions.py`, copied into READ's
# `make_corruptions/make_c_video.py`) for float frames (N, 3, H, W) in [0, 1]; audio: READ's
# `make_c_audio.py`. Written from the public facts (ImageMagick's MotionBlurImage, Pillow's BOX resize,
# scipy's gaussian_filter and zoom, pydub's apply_gain / overlay); randomness only from `generator`.
VIDEO_CORRUPTIONS = ('gaussian_noise', 'shot_noise', 'impulse_noise', 'defocus_blur', 'glass_blur',
                     'motion_blur', 'zoom_blur', 'snow', 'frost', 'fog', 'brightness', 'contrast',
                     'elastic_transform', 'pixelate', 'jpeg_compression')
AUDIO_CORRUPTIONS = ('gaussian_noise', 'traffic', 'crowd', 'rain', 'thunder', 'wind')
SEVERITIES = (1, 2, 3, 4, 5)

# ImageNet-C tables, severity 1 .. 5, spatial values in pixels of a 224 x 224 frame.
VIDEO_SEVERITY = {
    'gaussian_noise': [.08, .12, .18, .26, .38],                       # sigma on [0, 1] pixels
    'shot_noise': [60, 25, 12, 5, 3],                                  # photons per unit intensity
    'impulse_noise': [.03, .06, .09, .17, .27],                        # salt-and-pepper amount
    'defocus_blur': [(3, .1), (4, .5), (6, .5), (8, .5), (10, .5)],    # (disk radius, alias sigma)
    'glass_blur': [(.7, 1, 2), (.9, 2, 1), (1, 2, 3), (1.1, 3, 2), (1.5, 4, 2)],  # (sigma, delta, iterations)
    'motion_blur': [(10, 3), (15, 5), (15, 8), (15, 12), (20, 15)],    # (radius, sigma)
    # zoom factors; float rounding makes arange(1, 1.11, .01) end at 1.11 (12 factors), as in ImageNet-C
    'zoom_blur': [[float(z) for z in np.arange(1, 1.11, .01)],
                  [float(z) for z in np.arange(1, 1.16, .01)],
                  [float(z) for z in np.arange(1, 1.21, .02)],
                  [float(z) for z in np.arange(1, 1.26, .02)],
                  [float(z) for z in np.arange(1, 1.31, .03)]],
    # (mean, std, zoom, threshold, motion radius, motion sigma, image weight)
    'snow': [(.1, .3, 3, .5, 10, 4, .8), (.2, .3, 2, .5, 12, 4, .7), (.55, .3, 4, .9, 12, 8, .7),
             (.55, .3, 4.5, .85, 12, 8, .65), (.55, .3, 2.5, .85, 12, 12, .55)],
    'frost': [(1, .4), (.8, .6), (.7, .7), (.65, .7), (.6, .75)],      # (image weight, frost weight)
    'fog': [(1.5, 2), (2, 2), (2.5, 1.7), (2.5, 1.5), (3, 1.4)],       # (strength, wibble decay)
    'brightness': [.1, .2, .3, .4, .5],                                # added to HSV value
    'contrast': [.4, .3, .2, .1, .05],                                 # factor around the mean
    # (alpha, sigma, affine); ImageNet-C: "244 should have been 224, but ultimately nothing is incorrect"
    'elastic_transform': [(244 * 2, 244 * .7, 244 * .1), (244 * 2, 244 * .08, 244 * .2),
                          (244 * .05, 244 * .01, 244 * .02), (244 * .07, 244 * .01, 244 * .02),
                          (244 * .12, 244 * .01, 244 * .02)],
    'pixelate': [.6, .5, .4, .3, .25],                                 # downscale factor (box)
    'jpeg_compression': [25, 18, 15, 10, 7],                           # JPEG quality
}
# READ make_c_audio.py: sigma of added white noise (waveform in [-1, 1]); gain in dB of the overlaid recording
AUDIO_SEVERITY = {
    'gaussian_noise': [.08, .12, .18, .26, .38],
    'traffic': [1, 2, 4, 6, 8],
    'crowd': [1, 2, 4, 6, 8],
    'rain': [1, 2, 4, 6, 8],
    'thunder': [1, 2, 4, 6, 8],
    'wind': [1, 2, 4, 6, 8],
}
NOISE_RMS = 0.1  # RMS of every synthetic noise stand-in (-20 dBFS)
REFERENCE_SIZE = 224  # frame size at which ImageNet-C's spatial parameters are defined
FROST_CROP = 224  # ImageNet-C crops a 224 x 224 patch out of a frost photograph


def _generator(generator):
    return generator if generator is not None else torch.Generator().manual_seed(0)


def _draw(fn, shape, g, **kw):
    """fn(shape, generator=g) on CPU; with g a list of N generators, frame i is drawn from g[i] alone."""
    if isinstance(g, torch.Generator):
        return fn(shape, generator=g, **kw)
    first = fn((1, *shape[1:]), generator=g[0], **kw)                      # (1, ...)
    if len(g) == 1:
        return first
    out = first.new_empty(shape)                                           # (N, ...)
    out[:1] = first
    for i in range(1, len(g)):
        fn((1, *shape[1:]), generator=g[i], out=out[i:i + 1], **kw)        # written in place, no copy
    return out


def _check_name(name, severity, valid, kind):
    close = ", ".join(difflib.get_close_matches(str(name), valid, n=3, cutoff=0.5)) or "none"
    need(name in valid, f"Unknown {kind} corruption {name!r} (closest: {close}); see the names in --help.")
    need(not isinstance(severity, bool) and severity in SEVERITIES,
         f"Severity {severity!r} is out of range; valid severities are 1, 2, 3, 4, 5.")


def _fold_index(i, n, mode):
    """Fold positions into 0..n-1: 'nearest' (a a | a b), scipy 'reflect' (b a | a b), OpenCV 'mirror'."""
    if mode == 'nearest':
        return i.clamp(0, n - 1)
    if mode == 'reflect':
        i = i % (2 * n)
        return torch.where(i >= n, 2 * n - 1 - i, i)
    if mode == 'mirror':
        if n == 1:
            return torch.zeros_like(i)
        i = i % (2 * n - 2)
        return torch.where(i >= n, 2 * n - 2 - i, i)
    raise ValueError(f"Unknown border mode {mode!r}; valid modes are: nearest, reflect, mirror.")


def _gaussian_matrix(n, sigma, truncate, mode):
    """(n, n) float64 M with M @ v = scipy gaussian_filter1d(v, sigma, truncate, mode)."""
    radius = int(truncate * sigma + 0.5)
    k = torch.arange(-radius, radius + 1)                                    # (K,)
    w = torch.exp(-0.5 * (k.double() / sigma) ** 2)
    w = w / w.sum()
    rows = torch.arange(n)[:, None].expand(n, len(k))                        # (n, K)
    cols = _fold_index(rows + k[None], n, mode)                              # (n, K)
    m = torch.zeros(n, n, dtype=torch.float64)
    m.index_put_((rows, cols), w.expand(n, -1), accumulate=True)
    return m


def gaussian_blur(x, sigma, truncate=4.0, mode='nearest'):
    """Separable Gaussian filter over the last two dims (skimage.filters.gaussian defaults)."""
    if sigma <= 0:
        return x
    mh = _gaussian_matrix(x.shape[-2], sigma, truncate, mode).to(x)        # (H, H)
    mw = _gaussian_matrix(x.shape[-1], sigma, truncate, mode).to(x)        # (W, W)
    return mh @ x @ mw.T


def _box_resize_matrix(n_in, n_out):
    """(n_out, n_in) float64 weights of Pillow's BOX resample from n_in to n_out pixels."""
    scale = n_in / n_out
    center = (torch.arange(n_out, dtype=torch.float64)[:, None] + 0.5) * scale     # (n_out, 1)
    t = (torch.arange(n_in, dtype=torch.float64)[None] + 0.5 - center) / max(scale, 1.0)
    w = ((t > -0.5) & (t <= 0.5)).double()                                   # (n_out, n_in)
    return w / w.sum(1, keepdim=True)


def _zoom_and_trim(crop, zoom, h, w):
    """Zoom crop (N, C, ch, cw) bilinearly as scipy.ndimage.zoom order 1, trim its centre to h x w."""
    ch, cw = crop.shape[-2:]
    zh, zw = round(ch * zoom), round(cw * zoom)
    zoomed = F.interpolate(crop, size=(zh, zw), mode='bilinear', align_corners=True)
    trim_h, trim_w = (zh - h) // 2, (zw - w) // 2
    return zoomed[..., trim_h:trim_h + h, trim_w:trim_w + w]


def clipped_zoom(x, zoom):
    """ImageNet-C clipped_zoom: zoom the centre ceil(H / zoom) x ceil(W / zoom), trim back to H x W."""
    h, w = x.shape[-2:]
    ch, cw = math.ceil(h / zoom), math.ceil(w / zoom)
    top, left = (h - ch) // 2, (w - cw) // 2
    return _zoom_and_trim(x[..., top:top + ch, left:left + cw], zoom, h, w)


def _line_blur(x, radius, sigma, angles):
    """ImageMagick MotionBlurImage: sum_i k_i x(p + round(i (cos a, sin a))), angles (N,) in degrees."""
    n, c, h, w = x.shape
    width = 2 * math.ceil(radius) + 1
    i = torch.arange(width, dtype=torch.float64)                            # (width,)
    k = torch.exp(-i ** 2 / (2 * max(sigma, 1e-6) ** 2))
    k = (k / k.sum()).tolist()
    a = torch.deg2rad(angles.detach().double().cpu())[:, None]              # (N, 1)
    dx = torch.ceil(i[None] * torch.cos(a) - 0.5).long().tolist()         # (N, width) column offsets
    dy = torch.ceil(i[None] * torch.sin(a) - 0.5).long().tolist()         # (N, width) row offsets
    r = width - 1  # no offset is longer: a replicate border of r is "edge pixels repeated"
    padded = F.pad(x, (r, r, r, r), mode='replicate')                      # (N, C, H+2r, W+2r)
    out = torch.zeros_like(x)
    for j in range(n):  # each image its own angle: its taps are shifted windows of its padded copy
        out_j = out[j]
        for t in range(width):
            out_j += k[t] * padded[j, :, r + dy[j][t]:r + dy[j][t] + h, r + dx[j][t]:r + dx[j][t] + w]
    return out


def _pow2_at_least(n):
    return 1 << max(0, math.ceil(math.log2(n)))


def plasma_fractal(n, mapsize=256, wibble_decay=3.0, generator=None):
    """n diamond-square maps (ImageNet-C plasma_fractal) (n, mapsize, mapsize) float64 in [0, 1]."""
    g = _generator(generator)
    m = torch.zeros(n, mapsize, mapsize, dtype=torch.float64)               # (n, S, S)
    step, wibble = mapsize, 100.0

    def wibbled_mean(total):
        return total / 4 + wibble * (_draw(torch.rand, total.shape, g, dtype=torch.float64) * 2 - 1) * wibble

    while step >= 2:
        half = step // 2
        # squares: centre of each square = mean of its 4 corners
        corners = m[:, 0::step, 0::step]
        total = corners + corners.roll(-1, 1)
        total = total + total.roll(-1, 2)
        m[:, half::step, half::step] = wibbled_mean(total)
        # diamonds: midpoints of the square edges = mean of their 4 diamond neighbours
        centres = m[:, half::step, half::step]
        corners = m[:, 0::step, 0::step]
        total = centres + centres.roll(1, 1) + corners + corners.roll(-1, 2)
        m[:, 0::step, half::step] = wibbled_mean(total)
        total = centres + centres.roll(1, 2) + corners + corners.roll(-1, 1)
        m[:, half::step, 0::step] = wibbled_mean(total)
        step //= 2
        wibble /= wibble_decay
    m = m - m.amin((1, 2), keepdim=True)
    return m / m.amax((1, 2), keepdim=True)


def gaussian_noise_video(x, sigma, generator=None):
    """clip(x + N(0, sigma^2)). x: (N, C, H, W) in [0, 1]."""
    g = _generator(generator)
    return (x + sigma * _draw(torch.randn, x.shape, g, dtype=torch.float64).to(x)).clamp(0, 1)


def shot_noise(x, photons, generator=None):
    """clip(Poisson(x * photons) / photons)."""
    g = _generator(generator)
    rate = (x * photons).detach().double().cpu()                          # (N, C, H, W)
    if isinstance(g, torch.Generator):
        counts = torch.poisson(rate, generator=g)
    elif len(g) == 1:  # one generator per frame (`_draw`)
        counts = torch.poisson(rate, generator=g[0])
    else:
        counts = torch.cat([torch.poisson(rate[i:i + 1], generator=gi) for i, gi in enumerate(g)])
    return (counts / photons).to(x).clamp(0, 1)


def impulse_noise(x, amount, generator=None):
    """Salt and pepper: each element -> 0 with probability amount / 2, -> 1 with amount / 2."""
    g = _generator(generator)
    u = _draw(torch.rand, x.shape, g, dtype=torch.float64).to(x)
    return torch.where(u < amount / 2, torch.zeros_like(x), torch.where(u < amount, torch.ones_like(x), x))


def disk_kernel(radius, alias_blur):
    """ImageNet-C's disk of `radius` px, smoothed by a Gaussian (sigma alias_blur, 3 or 5 taps). (K, K)."""
    ksize = 3 if radius <= 8 else 5
    half = math.ceil(radius) + ksize // 2
    ss = 8
    # DEVIATION: the covered fraction of each pixel (8 x 8 supersampling), not ImageNet-C's pixel centres
    # inside the disk, so sub-pixel radii at 64 x 64 still blur
    sub = (torch.arange(ss, dtype=torch.float64) + 0.5) / ss - 0.5
    fine = (torch.arange(-half, half + 1, dtype=torch.float64)[:, None] + sub[None]).flatten()  # (K*ss,)
    inside = (fine[:, None] ** 2 + fine[None] ** 2 <= radius ** 2).double()                   # (K*ss, K*ss)
    size = 2 * half + 1
    disk = inside.view(size, ss, size, ss).mean((1, 3))                                        # (K, K)
    if disk.sum() == 0:
        disk[half, half] = 1.0
    disk = disk / disk.sum()
    t = torch.arange(-(ksize // 2), ksize // 2 + 1, dtype=torch.float64)
    g1 = torch.exp(-t ** 2 / (2 * max(alias_blur, 1e-6) ** 2))
    g1 = g1 / g1.sum()
    disk = F.conv2d(disk[None, None], (g1[:, None] * g1[None])[None, None], padding=ksize // 2)[0, 0]
    return disk / disk.sum()


def _filter2d(x, kernel, mode='mirror'):
    """Depthwise 2-D correlation with one (K, K) kernel, border `mode` (OpenCV filter2D's default)."""
    n, c, h, w = x.shape
    half = kernel.shape[-1] // 2
    ih = _fold_index(torch.arange(-half, h + half), h, mode).to(x.device)
    iw = _fold_index(torch.arange(-half, w + half), w, mode).to(x.device)
    padded = x[:, :, ih][:, :, :, iw]                                        # (N, C, H+2h, W+2h)
    weight = kernel.to(x)[None, None].expand(c, 1, *kernel.shape)           # (C, 1, K, K)
    return F.conv2d(padded, weight, groups=c)


def defocus_blur(x, radius, alias_blur):
    return _filter2d(x, disk_kernel(radius, alias_blur)).clamp(0, 1)


def glass_blur(x, sigma, max_delta, iterations, generator=None):
    """Gaussian blur, `iterations` rounds of random local displacement within max_delta, blur again."""
    g = _generator(generator)
    n, c, h, w = x.shape
    x = gaussian_blur(x, sigma)
    yy, xx = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64),
                            indexing='ij')
    for _ in range(iterations):
        # DEVIATION: every pixel resampled at a random offset U(-d, d) in one grid_sample (fractional deltas
        # of a scaled-down frame work), not ImageNet-C's sequential swaps at integer offsets
        dy = (_draw(torch.rand, (n, h, w), g, dtype=torch.float64) * 2 - 1) * max_delta   # (N, H, W)
        dx = (_draw(torch.rand, (n, h, w), g, dtype=torch.float64) * 2 - 1) * max_delta
        grid = torch.stack([2 * (xx + dx) / max(w - 1, 1) - 1, 2 * (yy + dy) / max(h - 1, 1) - 1], -1)
        x = F.grid_sample(x, grid.to(x), mode='bilinear', padding_mode='border', align_corners=True)
    return gaussian_blur(x, sigma).clamp(0, 1)


def motion_blur(x, radius, sigma, generator=None):
    """ImageMagick motion blur at a random angle U(-45, 45) degrees per image."""
    g = _generator(generator)
    angles = _draw(torch.rand, (x.shape[0],), g, dtype=torch.float64) * 90 - 45   # (N,)
    return _line_blur(x, radius, sigma, angles).clamp(0, 1)


def zoom_blur(x, zooms):
    """Mean of the image and its clipped zooms by each factor in `zooms`."""
    out = x.clone()
    for z in zooms:
        out = out + clipped_zoom(x, z)
    return (out / (len(zooms) + 1)).clamp(0, 1)


def snow(x, mean, std, zoom, threshold, radius, sigma, image_weight, generator=None, layer_size=None):
    """ImageNet-C snow: a zoomed, thresholded, motion-blurred N(mean, std) layer added twice to the image."""
    g = _generator(generator)
    n, c, h, w = x.shape
    lh, lw = (h, w) if layer_size is None else (layer_size, round(w * layer_size / h))
    # DEVIATION (layer_size): a flake is `zoom` px wide, so the layer is drawn at 224 px, where the table is
    # defined, and area-resized to H x W before the (scaled) motion blur
    ch, cw = math.ceil(lh / zoom), math.ceil(lw / zoom)
    layer = mean + std * _draw(torch.randn, (n, 1, ch, cw), g, dtype=torch.float64).to(x)  # (N, 1, ch, cw)
    layer = _zoom_and_trim(layer, zoom, lh, lw)                              # (N, 1, lh, lw)
    layer = torch.where(layer < threshold, torch.zeros_like(layer), layer).clamp(0, 1)
    if (lh, lw) != (h, w):
        layer = F.interpolate(layer, size=(h, w), mode='area')              # (N, 1, H, W)
    angles = _draw(torch.rand, (n,), g, dtype=torch.float64) * 90 - 135
    layer = _line_blur(layer, radius, sigma, angles)
    grey = 0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]       # (N, 1, H, W), OpenCV RGB2GRAY
    x = image_weight * x + (1 - image_weight) * torch.maximum(x, grey * 1.5 + 0.5)
    return (x + layer + layer.flip(-2, -1)).clamp(0, 1)


def _ice_texture(n, size, scale, generator):
    """n procedural ice textures (n, 3, size, size) with the colour statistics of ImageNet-C's frost."""
    g = generator
    sheet = plasma_fractal(n, _pow2_at_least(size), 1.8, g)[:, None, :size, :size]          # (n, 1, S, S)
    crystals = torch.zeros(n, 1, size, size, dtype=torch.float64)
    base = torch.rand(n, 1, generator=g, dtype=torch.float64) * 60                           # (n, 1) degrees
    for j in range(6):
        length = max(1.5, scale * (0.03 if j % 2 else 0.07))                # needle length, px
        seeds = torch.rand(n, 1, size, size, generator=g, dtype=torch.float64) < 0.04 * sheet ** 2
        seeds = seeds.double() * (0.5 + 0.5 * torch.rand(n, 1, size, size, generator=g, dtype=torch.float64))
        seeds[..., [0, -1], :] = 0
        seeds[..., :, [0, -1]] = 0  # the line blur repeats edge pixels: keep seeds off the edge
        angles = base[:, 0] + 60 * j + 15 * torch.randn(n, generator=g, dtype=torch.float64)
        taps = 2 * math.ceil(length) + 1
        crystals = torch.maximum(crystals, _line_blur(seeds, length, length, angles) * taps / 2)
    grain = torch.randn(n, 1, size, size, generator=g, dtype=torch.float64)
    texture = 0.8 * sheet + crystals.clamp(0, 1) + 0.04 * grain
    mu = texture.mean((2, 3), keepdim=True)
    sd = texture.std((2, 3), keepdim=True)
    texture = ((texture - mu) / sd * 0.11 + 0.70).clamp(0, 1)             # blue-channel statistics
    tint = torch.tensor([.57 / .70, .66 / .70, 1.0], dtype=torch.float64).view(1, 3, 1, 1)
    return texture * tint                                                  # (n, 3, S, S)


def frost_bank(size, generator=None):
    """The stand-in's five ice "photographs" for frames of `size` px: (5, 3, 2 size, 2 size)."""
    return _ice_texture(5, 2 * size, size, _generator(generator))


def frost_stand_in(n, size, generator=None, bank=None):
    """One random texture of the bank and one random crop per frame: (n, 3, size, size) in [0, 1]."""
    g = _generator(generator)
    if bank is None:
        bank = frost_bank(size, g)                                         # (5, 3, 2S, 2S)
    which = _draw(functools.partial(torch.randint, 5), (n,), g)            # (n,)
    top = _draw(functools.partial(torch.randint, size + 1), (n,), g)
    left = _draw(functools.partial(torch.randint, size + 1), (n,), g)
    rows = (top[:, None] + torch.arange(size))[:, None, :, None]           # (n, 1, S, 1)
    cols = (left[:, None] + torch.arange(size))[:, None, None, :]          # (n, 1, 1, S)
    return bank[which[:, None, None, None], torch.arange(3)[None, :, None, None], rows, cols]


def frost_from_dir(frost_dir, n, size, generator=None):
    """n random 224-px crops of the photographs in frost_dir, resized to size: (n, 3, size, size)."""
    g = _generator(generator)
    names = [p for p in visible_names(frost_dir) if p.lower().endswith(IMAGE_SUFFIXES)]
    paths = [os.path.join(frost_dir, p) for p in names]
    need(paths, f"No .jpg or .png frost photographs in {frost_dir}; put ImageNet-C's frost pictures there or "
         f"leave frost_dir unset.")
    photos = [read_image(p) for p in paths]
    crop = min([FROST_CROP] + [min(p.shape[-2:]) for p in photos])
    patches = []
    for i in range(n):  # one random photograph and crop per frame (from frame i's generator if a list)
        gi = g if isinstance(g, torch.Generator) else g[i]
        photo = photos[int(torch.randint(len(photos), (1,), generator=gi))]
        top = int(torch.randint(photo.shape[1] - crop + 1, (1,), generator=gi))
        left = int(torch.randint(photo.shape[2] - crop + 1, (1,), generator=gi))
        patches.append(photo[:, top:top + crop, left:left + crop])
    patches = torch.stack(patches).double() / 255                           # (n, 3, crop, crop)
    if crop != size:
        patches = F.interpolate(patches, size=(size, size), mode='bilinear', antialias=True,
                                align_corners=False)
    return patches.clamp(0, 1)


def frost(x, image_weight, frost_weight, generator=None, frost_dir=None, bank=None):
    """clip(image_weight * x + frost_weight * ice)."""
    n, _, h, w = x.shape
    if frost_dir is not None:
        ice = frost_from_dir(frost_dir, n, max(h, w), generator)
    else:
        # DEVIATION: ImageNet-C's ice photographs are not shipped; a procedural stand-in.
        ice = frost_stand_in(n, max(h, w), generator, bank)
    ice = ice[..., :h, :w].to(x)                                            # (N, 3, H, W)
    return (image_weight * x + frost_weight * ice).clamp(0, 1)


def fog(x, strength, wibble_decay, generator=None):
    """Add strength * plasma fractal, rescale by max / (max + strength) per image."""
    n, _, h, w = x.shape
    # DEVIATION: ImageNet-C uses a 256 map cropped to 224; we use the next power of two >= H, W.
    fractal = plasma_fractal(n, _pow2_at_least(max(h, w)), wibble_decay, generator)[:, None, :h, :w].to(x)
    max_val = x.amax((1, 2, 3), keepdim=True)                               # (N, 1, 1, 1)
    return ((x + strength * fractal) * max_val / (max_val + strength)).clamp(0, 1)


def brightness(x, delta):
    """Add delta to the HSV value V = max(r, g, b), hue and saturation kept; black becomes grey delta."""
    v = x.amax(1, keepdim=True)                                             # (N, 1, H, W)
    v_new = (v + delta).clamp(0, 1)
    return torch.where(v > 0, x * (v_new / v.clamp_min(1e-12)), v_new.expand_as(x)).clamp(0, 1)


def contrast(x, factor):
    """(x - mean) * factor + mean, mean per image and channel."""
    means = x.mean((2, 3), keepdim=True)                                    # (N, C, 1, 1)
    return ((x - means) * factor + means).clamp(0, 1)


def _smoothing_gain(n, sigma, truncate, mode):
    """The variance a 1-D Gaussian filter keeps of unit-variance white noise (mean of sum_j M_ij^2)."""
    return _gaussian_matrix(n, sigma, truncate, mode).pow(2).sum(1).mean().item()


def elastic_transform(x, alpha, sigma, affine, generator=None, field_size=None):
    """Random affine warp and elastic displacement alpha * Gaussian_sigma(U(-1, 1)) in one resampling."""
    g = _generator(generator)
    n, c, h, w = x.shape
    # affine A maps pts1 -> pts2 (getAffineTransform); warpAffine: dst(p) = src(A^-1 p)
    cy, cx, sq = float(h // 2), float(w // 2), min(h, w) // 3
    pts1 = torch.tensor([[cx + sq, cy + sq], [cx + sq, cy - sq], [cx - sq, cy - sq]], dtype=torch.float64)
    pts2 = pts1 + (_draw(torch.rand, (n, 3, 2), g, dtype=torch.float64) * 2 - 1) * affine
    p1 = torch.cat([pts1, torch.ones(3, 1, dtype=torch.float64)], 1)
    a = torch.linalg.solve(p1, pts2).transpose(1, 2)
    a = torch.cat([a, torch.tensor([0., 0., 1.], dtype=torch.float64).expand(n, 1, 3)], 1)
    a_inv = torch.linalg.inv(a)
    # elastic: smooth random displacement field, scipy gaussian_filter(mode='reflect', truncate=3)
    dx = gaussian_blur(_draw(torch.rand, (n, h, w), g, dtype=torch.float64) * 2 - 1, sigma, 3.0,
                       'reflect') * alpha
    dy = gaussian_blur(_draw(torch.rand, (n, h, w), g, dtype=torch.float64) * 2 - 1, sigma, 3.0,
                       'reflect') * alpha
    if field_size is not None and sigma > 0:
        # DEVIATION: smoothed noise's amplitude depends on the pixel grid (~1 / sigma_px); rescale the field
        # to the std it has on the 224 px grid where the table is defined
        k = field_size / h
        fw = round(w * k)
        gain = (_smoothing_gain(field_size, sigma * k, 3.0, 'reflect')
                * _smoothing_gain(fw, sigma * k, 3.0, 'reflect')
                / (_smoothing_gain(h, sigma, 3.0, 'reflect')
                   * _smoothing_gain(w, sigma, 3.0, 'reflect'))) ** 0.5
        dx, dy = dx * gain, dy * gain
    # DEVIATION: out(p) = src(A^-1 (p + d(p))) in one bilinear resampling (ImageNet-C resamples twice).
    yy, xx = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64),
                            indexing='ij')
    px, py = xx + dx, yy + dy                                                # (N, H, W)
    sx = a_inv[:, 0, 0, None, None] * px + a_inv[:, 0, 1, None, None] * py + a_inv[:, 0, 2, None, None]
    sy = a_inv[:, 1, 0, None, None] * px + a_inv[:, 1, 1, None, None] * py + a_inv[:, 1, 2, None, None]
    grid = torch.stack([2 * sx / max(w - 1, 1) - 1, 2 * sy / max(h - 1, 1) - 1], -1)
    out = F.grid_sample(x, grid.to(x), mode='bilinear', padding_mode='reflection', align_corners=True)
    return out.clamp(0, 1)


def pixelate(x, factor):
    """Pillow BOX resize down to int(H * factor) and back up to H."""
    h, w = x.shape[-2:]
    sh, sw = int(h * factor), int(w * factor)
    down_h, down_w = _box_resize_matrix(h, sh).to(x), _box_resize_matrix(w, sw).to(x)      # (sh, H), (sw, W)
    up_h, up_w = _box_resize_matrix(sh, h).to(x), _box_resize_matrix(sw, w).to(x)          # (H, sh), (W, sw)
    small = down_h @ x @ down_w.T                                           # (N, C, sh, sw)
    return (up_h @ small @ up_w.T).clamp(0, 1)


def jpeg_compression(x, quality):
    """Encode / decode every frame as JPEG at `quality` (torchvision libjpeg, uint8)."""
    u8 = (x.detach() * 255).round().clamp(0, 255).to(torch.uint8).cpu()    # (N, C, H, W)
    encoded = torchvision.io.encode_jpeg(list(u8), quality=int(quality))
    decoded = torchvision.io.decode_jpeg(encoded)                           # codec works per image
    return (torch.stack(decoded).to(device=x.device, dtype=x.dtype) / 255).clamp(0, 1)


def corrupt_video(frames, name, severity, generator=None, frost_dir=None, frost_bank=None):
    """Video corruption `name` at `severity` on frames (N, 3, H, W) in [0, 1] (generator: one or N)."""
    _check_name(name, severity, VIDEO_CORRUPTIONS, 'video')
    g = _generator(generator)
    p = VIDEO_SEVERITY[name][int(severity) - 1]
    # DEVIATION: spatial parameters are defined at 224 x 224; scale them to this frame size.
    # DEVIATION: float in, float out: no uint8 rounding between steps and no JPEG-85 save.
    s = frames.shape[-2] / REFERENCE_SIZE
    x = frames
    apply = {
        'gaussian_noise': lambda: gaussian_noise_video(x, p, g),
        'shot_noise': lambda: shot_noise(x, p, g),
        'impulse_noise': lambda: impulse_noise(x, p, g),
        'defocus_blur': lambda: defocus_blur(x, p[0] * s, p[1]),
        'glass_blur': lambda: glass_blur(x, p[0] * s, p[1] * s, p[2], g),
        'motion_blur': lambda: motion_blur(x, p[0] * s, p[1] * s, g),
        'zoom_blur': lambda: zoom_blur(x, p),
        'snow': lambda: snow(x, p[0], p[1], p[2], p[3], p[4] * s, p[5] * s, p[6], g, REFERENCE_SIZE),
        'frost': lambda: frost(x, p[0], p[1], g, frost_dir, frost_bank),
        'fog': lambda: fog(x, p[0], p[1], g),
        'brightness': lambda: brightness(x, p),
        'contrast': lambda: contrast(x, p),
        'elastic_transform': lambda: elastic_transform(x, p[0] * s, p[1] * s, p[2] * s, g, REFERENCE_SIZE),
        'pixelate': lambda: pixelate(x, p),
        'jpeg_compression': lambda: jpeg_compression(x, p),
    }
    return apply[name]()


def read_image(path):
    """A JPEG / PNG file -> uint8 (3, H, W) RGB as PIL's convert("RGB") gives it; unreadable: refused."""
    try:
        io = torchvision.io
        image = io.decode_image(io.read_file(str(path)), mode=io.ImageReadMode.RGB)
    except (RuntimeError, OSError) as err:
        why = "it is truncated" if "truncated" in str(err) else "it is damaged or not an image"
        raise Refusal(f"{path} is not a readable JPEG/PNG image ({why}); replace or remove it.") \
            from None
    need(image.shape[-1] * image.shape[-2] > 0, f"{path} is an empty image; replace or remove it.")
    if image.dtype == torch.uint16:
        # DEVIATION: PIL clips a 16-bit grey PNG to 255 in convert("RGB"), a white picture; we keep the high
        # byte of every 16-bit PNG, as PIL does for 16-bit colour
        image = (image.to(torch.int32) >> 8).to(torch.uint8)
    return image


def read_wav(path):
    """A PCM WAV (8/16/24/32-bit) -> ((T,) float32 mono in [-1, 1], sample rate); stereo is averaged."""
    channels, width, rate, _ = wav_info(path)
    with wave.open(str(path), 'rb') as f:
        raw = f.readframes(f.getnframes())
    # a trailing partial frame (odd data size) is dropped
    raw = raw[:len(raw) - len(raw) % (channels * width)]
    need(raw, f"{path} has a WAV header but no complete sample; replace or remove it.")
    if width == 1:
        data = (np.frombuffer(raw, np.uint8).astype(np.float32) - 128) / 128
    elif width == 2:
        data = np.frombuffer(raw, '<i2').astype(np.float32) / 32768
    elif width == 3:
        b = np.frombuffer(raw, np.uint8).reshape(-1, 3).astype(np.int32)
        v = b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)
        data = (np.where(v >= 1 << 23, v - (1 << 24), v)).astype(np.float32) / (1 << 23)
    elif width == 4:
        data = (np.frombuffer(raw, '<i4').astype(np.float64) / 2 ** 31).astype(np.float32)
    data = data.reshape(-1, channels).mean(1)                               # (T,)
    return torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32)), rate


def wav_info(path):
    """(channels, bytes per sample, sample rate, frames) from a PCM WAV's header; an unusable file refused."""
    try:
        with wave.open(str(path), 'rb') as f:
            info = f.getnchannels(), f.getsampwidth(), f.getframerate(), f.getnframes()
    except (wave.Error, EOFError, OSError) as err:
        raise Refusal(f"{path} is not a PCM WAV file the wave module can read ({err or 'cut short'}); "
                      f"convert it to 16-bit PCM.") from None
    channels, width, rate, frames = info
    need(width in (1, 2, 3, 4), f"{path} has {8 * width}-bit samples; convert it to 8, 16, 24 or 32-bit PCM.")
    need(rate > 0, f"{path} declares a sample rate of {rate} Hz; fix its header or convert it again.")
    need(frames > 0, f"{path} is an empty WAV file (0 samples); replace or remove it.")
    return info


def write_wav(path, waveform, sample_rate=16000):
    """Write (T,) float in [-1, 1] as 16-bit PCM mono (x * 32768, rounded, clipped); returns path."""
    pcm = torch.round(waveform.detach().double().cpu().flatten() * 32768).clamp(-32768, 32767)
    with wave.open(str(path), 'wb') as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(int(sample_rate))
        f.writeframes(pcm.numpy().astype('<i2').tobytes())
    return path


def gaussian_noise_audio(wavs, sigma, generator=None):
    """wavs + N(0, sigma^2) per sample (absolute sigma, READ; no clipping). wavs: (N, T)."""
    g = _generator(generator)
    return wavs + sigma * _draw(torch.randn, wavs.shape, g, dtype=torch.float64).to(wavs)


def fit_noise_length(noise, num_samples):
    """READ: cut the recording to the clip length, or repeat it whole and cut. (L,) -> (T,)."""
    if noise.shape[-1] >= num_samples:
        return noise[..., :num_samples]
    repeats = num_samples // noise.shape[-1] + 1
    return noise.repeat(repeats)[:num_samples]


def audio_noise_overlay(wavs, noise, gain_db):
    """READ (pydub): noise tiled to T, gain 10 ** (gain_db / 20), added; both clipped to [-1, 1]."""
    noise = fit_noise_length(noise, wavs.shape[-1]).to(wavs)                 # (T,)
    gain = 10 ** (gain_db / 20)
    return (wavs + (gain * noise).clamp(-1, 1)[None]).clamp(-1, 1)


def _spectral_shape(white, sample_rate, response):
    """Filter white noise (..., T) by a zero-phase magnitude response(freqs in Hz) via the FFT."""
    t = white.shape[-1]
    freqs = torch.fft.rfftfreq(t, 1 / sample_rate, dtype=torch.float64)
    return torch.fft.irfft(torch.fft.rfft(white) * response(freqs), n=t)


def _slow_curve(shape, num_samples, rate_hz, sample_rate, g):
    """Random values in [0, 1] at rate_hz, linearly interpolated to num_samples. (*shape, T)."""
    points = max(2, math.ceil(num_samples / sample_rate * rate_hz) + 2)
    knots = torch.rand(*shape, points, generator=g, dtype=torch.float64)
    flat = knots.reshape(-1, 1, points)
    curve = F.interpolate(flat, size=num_samples, mode='linear', align_corners=True)
    return curve.reshape(*shape, num_samples)


def _unit_rms(x):
    return x / x.pow(2).mean(-1, keepdim=True).sqrt().clamp_min(1e-12)


def noise_stand_in(kind, num_samples, generator=None, sample_rate=16000):
    """Synthetic stand-in for READ's recording `kind`: (num_samples,) float32 of RMS NOISE_RMS."""
    g = _generator(generator)
    t_n, sr = num_samples, sample_rate
    t = torch.arange(t_n, dtype=torch.float64) / sr                         # (T,) seconds
    white = torch.randn(t_n, generator=g, dtype=torch.float64)
    if kind == 'traffic':
        # low-passed road rumble + engine harmonics on a drifting 45-70 Hz fundamental, slow swells
        rumble = _spectral_shape(white, sr, lambda f: 1 / (1 + f / 80) / (1 + (f / 1500) ** 4))
        f0 = 45 + 25 * _slow_curve((), t_n, 0.3, sr, g)                     # (T,) Hz
        phase = 2 * math.pi * torch.cumsum(f0, 0) / sr
        k = torch.arange(1, 7, dtype=torch.float64)[:, None]                # harmonics 1..6
        offsets = torch.rand(6, 1, generator=g, dtype=torch.float64) * 2 * math.pi
        engine = (torch.sin(k * phase[None] + offsets) / k).sum(0)
        swell = 0.4 + 0.6 * _slow_curve((), t_n, 0.4, sr, g) ** 2
        out = (_unit_rms(rumble) + 0.6 * _unit_rms(engine)) * swell
    elif kind == 'crowd':
        # babble: 16 voices, each 3 formant-like tones buzzing at its pitch, syllable-rate envelopes
        v = 16
        pitch = 100 + 150 * torch.rand(v, 1, generator=g, dtype=torch.float64)                  # (V, 1) Hz
        lo = torch.tensor([300., 900., 2400.], dtype=torch.float64).view(1, 3, 1)
        span = torch.tensor([600., 1400., 900.], dtype=torch.float64).view(1, 3, 1)
        formants = lo + span * _slow_curve((v, 3), t_n, 4.0, sr, g)
        phase = 2 * math.pi * torch.cumsum(formants, -1) / sr
        tones = (torch.sin(phase) * torch.tensor([1., .5, .25], dtype=torch.float64).view(1, 3, 1)).sum(1)
        buzz = 0.5 + 0.5 * torch.cos(2 * math.pi * pitch * t[None])                              # (V, T)
        rate = 3 + 3 * torch.rand(v, 1, generator=g, dtype=torch.float64)
        start = torch.rand(v, 1, generator=g, dtype=torch.float64) * 2 * math.pi
        syllables = torch.sin(math.pi * rate * t[None] + start).abs() ** 2                       # (V, T)
        loud = 0.3 + 0.7 * torch.rand(v, 1, generator=g, dtype=torch.float64)
        murmur = _spectral_shape(white, sr, lambda f: ((f > 100) & (f < 3000)).double())
        out = _unit_rms((tones * buzz * syllables * loud).sum(0)) + 0.3 * _unit_rms(murmur)
    elif kind == 'rain':
        # broadband hiss + random crackle impulses (about 300 / s, 1.5 ms decaying 3 kHz ring)
        hiss = _spectral_shape(white, sr, lambda f: (f / (f + 300)).sqrt())
        drops = (torch.rand(t_n, generator=g, dtype=torch.float64) < 300 / sr).double()
        drops = drops * (0.2 + 0.8 * torch.rand(t_n, generator=g, dtype=torch.float64))
        drops = drops * torch.sign(torch.randn(t_n, generator=g, dtype=torch.float64))
        tk = torch.arange(int(0.006 * sr), dtype=torch.float64) / sr
        ring = torch.exp(-tk / 0.0015) * torch.sin(2 * math.pi * 3000 * tk)
        crackle = F.conv1d(drops.view(1, 1, -1), ring.flip(0).view(1, 1, -1),
                           padding=len(ring) - 1)[0, 0, :t_n]
        out = _unit_rms(hiss) + 0.8 * _unit_rms(crackle)
    elif kind == 'thunder':
        # low-passed rumble (< 250 Hz) under a few decaying claps, one per ~4 s, some before the clip
        rumble = _spectral_shape(white, sr, lambda f: 1 / (1 + (f / 250) ** 4) / (1 + f / 60))
        events = max(1, round(t_n / sr / 4))
        when = torch.rand(events, 1, generator=g, dtype=torch.float64) * (t_n / sr + 1) - 1     # (E, 1) s
        decay = 0.8 + 1.7 * torch.rand(events, 1, generator=g, dtype=torch.float64)              # s
        size = 0.5 + 0.5 * torch.rand(events, 1, generator=g, dtype=torch.float64)
        age = (t[None] - when).clamp_min(0)                                                      # (E, T)
        claps = (size * (1 - torch.exp(-age / 0.05)) * torch.exp(-age / decay) * (age > 0)).sum(0)
        out = _unit_rms(rumble) * (0.15 + claps)
    else:  # wind
        # band-passed noise around 400 Hz (one octave wide) + low buffeting, slow gusts
        band = _spectral_shape(white, sr, lambda f: torch.exp(-0.5 * (torch.log2(f.clamp_min(1) / 400)) ** 2))
        buffet = _spectral_shape(torch.randn(t_n, generator=g, dtype=torch.float64), sr,
                                 lambda f: 1 / (1 + (f / 60) ** 4))
        gusts = 0.25 + 0.75 * _slow_curve((), t_n, 0.5, sr, g)
        out = (_unit_rms(band) + 0.5 * _unit_rms(buffet)) * gusts
    return (NOISE_RMS * _unit_rms(out)).clamp(-1, 1).float()


def noise_recording(kind, num_samples, generator=None, noise_dir=None, sample_rate=16000):
    """`<noise_dir>/<kind>.wav` (resampled) if noise_dir is given, else the stand-in. (L,) float32."""
    if noise_dir is None:
        return noise_stand_in(kind, num_samples, generator, sample_rate)
    path = os.path.join(noise_dir, kind + '.wav')
    need(os.path.isfile(path), f"No {kind} noise recording at {path}; put READ's {kind}.wav there.")
    return _read_noise(os.path.abspath(path), os.path.getmtime(path), sample_rate)


@functools.lru_cache(maxsize=1)
def _read_noise(path, mtime, sample_rate):
    """A noise recording, mono, resampled to the clip's rate; read once per run."""
    noise, rate = read_wav(path)  # stereo is averaged to mono
    if rate != sample_rate:
        noise = torchaudio.functional.resample(noise, rate, sample_rate)
    need(noise.numel() > 0, f"{path} is shorter than one sample at {sample_rate} Hz; use a longer recording.")
    return noise


def corrupt_audio(wavs, name, severity, generator=None, noise_dir=None, sample_rate=16000, noise=None):
    """Audio corruption `name` at `severity` on waveforms (N, T); noise: the recording to overlay."""
    _check_name(name, severity, AUDIO_CORRUPTIONS, 'audio')
    g = _generator(generator)
    p = AUDIO_SEVERITY[name][int(severity) - 1]
    if name == 'gaussian_noise':
        return gaussian_noise_audio(wavs, p, g)
    # DEVIATION: without noise_dir, a synthetic stand-in of READ's recording (one for the set, as READ's)
    if noise is None:
        noise = noise_recording(name, wavs.shape[-1], g, noise_dir, sample_rate)
    return audio_noise_overlay(wavs, noise, p)


# ---- The embedded benchmark --------------------------------------------------------------------------------
# Each clip is one audio-visual event: k objects of the class's kind seen in the frame and heard striking,
# once each. Latent factors shared by both modalities: size (bigger <-> lower, louder), count k in 1..4
# (k objects <-> k onsets), material (lighter colour <-> brighter timbre). The class is carried by several
# cues per modality, each ambiguous on its own: video hue, shape and a fine oriented background grain (which
# blur, noise and pixelation remove); audio partial ratios, decay time and pitch register. Frames are 1/f
# scenes with soft-edged shaded objects; sounds are impacts over pink-noise ambience.
EMBEDDED = dict(
    num_classes=10, n_train=3000, n_val=300, n_test=2496,  # 2,496 = 39 batches of 64, as Kinetics50-C
    clip_samples=20800,  # 1.3 s at 16 kHz -> exactly 128 fbank frames
    frame_size=64,
    max_count=4,  # objects / onsets per clip: 1..4
    hue_jitter=0.06,  # std of the object hue around its class hue (class hues are 0.1 apart)
    grain_period=(3.0, 4.5),  # px: the period of the fine background grain
    grain_contrast=0.2,  # its relative contrast
    orient_jitter=10.0,  # std (degrees) of the background orientation (class orientations are 36 apart)
    size_px=(4.5, 10.0),  # object radius in pixels at s = 0 and s = 1 (64 x 64 frame)
    register_oct=0.22,  # spacing of the 10 class pitch registers, octaves (200 Hz .. 2^(9 x 0.22) x 200 Hz)
    size_oct=1.2,  # the size latent moves the pitch over this many octaves (big = low)
    decay_s=(0.05, 0.14, 0.4),  # the three decay times of the fundamental, seconds
    decay_jitter=0.5,  # log-normal std of a clip's decay time
    inharmonic_jitter=0.07,  # relative std of each partial's frequency ratio, per clip
    snr_db=(-5.0, 20.0),  # signal-to-ambience ratio of a clip, drawn uniformly in this range (dB)
)
# class c -> its cue values (index tables; each cue alone leaves pairs of classes ambiguous)
CLASS_HUE = (0, 3, 6, 9, 2, 5, 8, 1, 4, 7)            # hue = CLASS_HUE[c] / 10
CLASS_SHAPE = (0, 1, 2, 3, 4, 0, 1, 2, 3, 4)          # index into SHAPES
CLASS_ORIENT = (0, 0, 1, 1, 2, 2, 3, 3, 4, 4)         # background orientation = 36 deg x index
CLASS_PARTIALS = (0, 1, 2, 0, 3, 4, 1, 3, 4, 2)       # index into PARTIALS
CLASS_DECAY = (0, 1, 2, 1, 0, 1, 2, 2, 2, 0)          # index into EMBEDDED['decay_s']
CLASS_REGISTER = (0, 7, 4, 1, 8, 5, 2, 9, 6, 3)       # pitch register index
SHAPES = ((0, 0.0), (3, 0.28), (4, 0.2), (5, 0.42), (2, 0.38))  # radius(theta) = 1 + a cos(m theta): (m, a)
PARTIALS = ((1.0, 2.0, 3.0, 4.0, 5.0),                # harmonic (string, voice)
            (1.0, 3.0, 5.0, 7.0, 9.0),                # odd harmonics (closed pipe, clarinet-like)
            (1.0, 2.756, 5.404, 8.933, 13.34),        # free bar (xylophone, marimba)
            (1.0, 1.594, 2.136, 2.296, 2.653),        # circular membrane (drum)
            (1.0, 2.1, 3.3, 4.6, 6.0))                # stretched (stiff string, bell-like)
EMBEDDED_VERSION = 3  # bump when the generator changes; the cache name also carries a hash of EMBEDDED


def embedded_id(cfg=EMBEDDED):
    """The benchmark's version and a hash of its settings: caches and checkpoints carry it."""
    text = json.dumps([EMBEDDED_VERSION, cfg, CLASS_HUE, CLASS_SHAPE, CLASS_ORIENT, CLASS_PARTIALS,
                       CLASS_DECAY, CLASS_REGISTER, SHAPES, PARTIALS], sort_keys=True)
    return f"v{EMBEDDED_VERSION}-{hashlib.sha1(text.encode()).hexdigest()[:8]}"


def _hsv_to_rgb(h, s, v):
    """h, s, v tensors in [0, 1] of equal shape -> rgb (..., 3) in [0, 1]."""
    k = torch.stack([(5 + h * 6) % 6, (3 + h * 6) % 6, (1 + h * 6) % 6], dim=-1)
    return v.unsqueeze(-1) - (v * s).unsqueeze(-1) * (torch.minimum(k, 4 - k).clamp(0, 1))


def draw_latents(labels, g, cfg=EMBEDDED):
    """The per-clip event factors shared by sound and picture: size, count (long), material; (N,) each."""
    n = len(labels)
    size = torch.rand(n, generator=g)
    count = torch.randint(1, cfg["max_count"] + 1, (n,), generator=g)
    return {"size": size, "count": count, "material": torch.rand(n, generator=g)}


def _one_over_f(n, size, g, exponent):
    """n zero-mean, unit-std noise fields (n, size, size) with amplitude spectrum ~ 1 / f^exponent."""
    fy = torch.fft.fftfreq(size)[:, None]
    fx = torch.fft.rfftfreq(size)[None, :]
    amp = (fx ** 2 + fy ** 2).sqrt().clamp_min(1.0 / size) ** -exponent       # (S, S/2 + 1), f in cycles/px
    amp[0, 0] = 0.0                                                           # zero mean
    field = torch.fft.irfft2(torch.fft.rfft2(torch.randn(n, size, size, generator=g)) * amp, s=(size, size))
    return (field - field.mean((1, 2), keepdim=True)) / field.std((1, 2), keepdim=True)


def _oriented_band(n, size, g, orientation, period, kappa=4.0, bandwidth=0.35):
    """n unit-std fields (n, size, size) of fine grain around 1 / period, along `orientation` (n,)."""
    fy = torch.fft.fftfreq(size)[:, None]
    fx = torch.fft.rfftfreq(size)[None, :]
    f = (fx ** 2 + fy ** 2).sqrt().clamp_min(1.0 / size)[None]               # (1, S, S/2 + 1)
    phi = torch.atan2(fy, fx)[None]
    radial = torch.exp(-0.5 * (torch.log2(f * period[:, None, None]) / bandwidth) ** 2)
    angular = torch.exp(kappa * (torch.cos(2 * (phi - orientation[:, None, None] - math.pi / 2)) - 1))
    field = torch.fft.irfft2(torch.fft.rfft2(torch.randn(n, size, size, generator=g)) * radial * angular,
                             s=(size, size))
    return (field - field.mean((1, 2), keepdim=True)) / field.std((1, 2), keepdim=True)


def synth_frames(labels, latents, g, cfg=EMBEDDED):
    """One frame per clip: a 1/f scene with the class's grain and objects -> uint8 (N, 3, S, S)."""
    n, S, K = len(labels), cfg["frame_size"], cfg["max_count"]
    # background: two pale colours mixed by a 1/f field, 1/f shading, grain along the class orientation
    orient = torch.tensor(CLASS_ORIENT)[labels].float() * math.pi / 5 \
        + math.radians(cfg["orient_jitter"]) * torch.randn(n, generator=g)  # (N,)
    scene = _one_over_f(n, S, g, 1.0)                                         # (N, S, S)
    light = _one_over_f(n, S, g, 1.2)
    lo_p, hi_p = cfg["grain_period"]
    period = lo_p + (hi_p - lo_p) * torch.rand(n, generator=g)
    grain = _oriented_band(n, S, g, orient, period)
    c1 = _hsv_to_rgb(torch.rand(n, generator=g), 0.1 + 0.25 * torch.rand(n, generator=g),
                     0.25 + 0.3 * torch.rand(n, generator=g))
    c2 = _hsv_to_rgb(torch.rand(n, generator=g), 0.1 + 0.25 * torch.rand(n, generator=g),
                     0.55 + 0.3 * torch.rand(n, generator=g))
    mix = torch.sigmoid(2.5 * scene)[:, None]                                 # (N, 1, S, S)
    img = c1[:, :, None, None] * (1 - mix) + c2[:, :, None, None] * mix
    img = img * (1 + 0.2 * light[:, None] + cfg["grain_contrast"] * grain[:, None])  # (N, 3, S, S)
    m = torch.tensor([SHAPES[s][0] for s in CLASS_SHAPE], dtype=torch.float)[labels][:, None]   # (N, 1)
    a = torch.tensor([SHAPES[s][1] for s in CLASS_SHAPE])[labels][:, None]
    lo, hi = cfg["size_px"]
    radius = (lo + (hi - lo) * latents["size"])[:, None] * (0.9 + 0.2 * torch.rand(n, K, generator=g))
    cy, cx = (S * (0.12 + 0.76 * torch.rand(2, n, K, generator=g)))           # (N, K) each
    turn = 2 * math.pi * torch.rand(n, K, generator=g)
    hue = (torch.tensor(CLASS_HUE)[labels].float() / 10 + cfg["hue_jitter"]
           * torch.randn(n, generator=g)) % 1.0
    sat = 0.6 + 0.35 * torch.rand(n, generator=g)
    val = 0.4 + 0.55 * latents["material"]
    colour = _hsv_to_rgb(hue, sat, val)                                        # (N, 3)
    yy, xx = torch.meshgrid(torch.arange(S).float() + 0.5, torch.arange(S).float() + 0.5, indexing="ij")
    for j in range(K):  # painter's order; slot j is drawn only when count > j
        dy, dx = yy - cy[:, j, None, None], xx - cx[:, j, None, None]         # (N, S, S)
        rho, theta = (dx ** 2 + dy ** 2).sqrt(), torch.atan2(dy, dx)
        edge = radius[:, j, None, None] * (1 + a[:, :, None]
                                           * torch.cos(m[:, :, None] * (theta - turn[:, j, None, None])))
        alpha = torch.sigmoid((edge - rho) / 0.5) * (latents["count"] > j).float()[:, None, None]
        shade = 1.0 - 0.25 * (dy + dx) / (2 * radius[:, j, None, None])       # lit from the top left
        obj = colour[:, :, None, None] * shade.clamp(0.6, 1.3)[:, None]
        img = img * (1 - alpha[:, None]) + obj * alpha[:, None]
    return (img.clamp(0, 1) * 255).round().to(torch.uint8)


def synth_audio(labels, latents, g, cfg=EMBEDDED):
    """One sound per clip: strikes of the class's resonator over pink noise -> (N, T) in [-1, 1]."""
    n, T, K = len(labels), cfg["clip_samples"], cfg["max_count"]
    t = torch.arange(T) / SAMPLE_RATE                                          # (T,) s
    size, material, count = latents["size"][:, None], latents["material"][:, None], latents["count"]
    register = torch.tensor(CLASS_REGISTER)[labels].float()[:, None]
    f0 = 200.0 * 2.0 ** (cfg["register_oct"] * register + cfg["size_oct"] * (0.5 - size))       # (N, 1) Hz
    ratios = torch.tensor(PARTIALS)[torch.tensor(CLASS_PARTIALS)[labels]]      # (N, P)
    ratios = ratios * (1 + cfg["inharmonic_jitter"] * torch.randn(ratios.shape, generator=g)).clamp_min(0.5)
    ratios[:, 0] = 1.0
    tilt = 1.8 - 1.3 * material
    amps = torch.arange(1, ratios.shape[1] + 1).float()[None] ** -tilt        # (N, P)
    amps = amps * (f0 * ratios < 7000).float()                                 # nothing above 7 kHz
    decay = torch.tensor(cfg["decay_s"])[torch.tensor(CLASS_DECAY)[labels]][:, None] \
        * torch.exp(cfg["decay_jitter"] * torch.randn(n, 1, generator=g))     # (N, 1) s
    # onsets: the clip is cut into `count` equal slots, one strike at a random place in each
    slot = 1.15 / count.float()[:, None]
    onset = 0.05 + slot * (torch.arange(K).float()[None] + 0.7 * torch.rand(n, K, generator=g))  # (N, K) s
    level = (0.35 + 0.65 * size) * (0.8 + 0.4 * torch.rand(n, K, generator=g))                  # (N, K)
    level = level * (torch.arange(K)[None] < count[:, None]).float()
    # transient: band-limited noise centred at 1.5 kHz x 2^(1.5 material), 8 ms decay
    freqs = torch.fft.rfftfreq(T, 1 / SAMPLE_RATE)[None]                       # (1, T/2 + 1)
    centre = 1500.0 * 2.0 ** (1.5 * material)
    band = torch.exp(-0.5 * (torch.log2(freqs.clamp_min(20) / centre) / 0.5) ** 2)
    burst = torch.fft.irfft(torch.fft.rfft(torch.randn(n, T, generator=g)) * band, n=T)
    burst = burst / burst.pow(2).mean(1, keepdim=True).sqrt()
    # one strike (N, T): 2 ms attack; partial p rings at f0 ratio_p, decays with tau_p = decay / sqrt(ratio_p)
    attack = 1 - torch.exp(-t[None] / 0.002)
    phase = 2 * math.pi * torch.rand(n, ratios.shape[1], generator=g)
    ring = torch.zeros(n, T)
    for p in range(ratios.shape[1]):
        tau = decay / ratios[:, p, None].sqrt()
        partial = torch.sin(2 * math.pi * f0 * ratios[:, p, None] * t[None] + phase[:, p, None])  # (N, T)
        ring = ring + amps[:, p, None] * partial * torch.exp(-t[None] / tau)
    strike = attack * (ring / amps.sum(1, keepdim=True).clamp_min(1e-6) + 0.5 * burst
                       * torch.exp(-t[None] / 0.008))
    # the clip: every strike placed at its onset with its level (a convolution with the impulse train)
    train = torch.zeros(n, T)
    train.scatter_add_(1, (onset * SAMPLE_RATE).round().long().clamp(max=T - 1), level)
    wav = torch.fft.irfft(torch.fft.rfft(strike, n=2 * T) * torch.fft.rfft(train, n=2 * T), n=2 * T)[:, :T]
    wav = 0.4 * wav
    # ambience: pink noise at a signal-to-noise ratio drawn per clip
    spectrum = torch.fft.rfft(torch.randn(n, T, generator=g), dim=1)
    pink = torch.fft.irfft(spectrum / torch.arange(1, spectrum.shape[1] + 1).sqrt(), n=T, dim=1)
    snr_db = cfg["snr_db"][0] + (cfg["snr_db"][1] - cfg["snr_db"][0]) * torch.rand(n, 1, generator=g)
    signal_rms = wav.pow(2).mean(1, keepdim=True).sqrt()
    pink = pink / pink.pow(2).mean(1, keepdim=True).sqrt() * signal_rms * 10 ** (-snr_db / 20)
    return (wav + pink).clamp(-1, 1)


def generate_embedded(seed=0, cfg=EMBEDDED, chunk=500, quiet=None):
    """{split: {'wav' int16, 'frames' uint8, 'label', latents}}; split i seeded seed * 1000 + i."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same bytes on every machine (two threads round some frames otherwise)
    try:
        return _generate_embedded(seed, cfg, chunk, quiet)
    finally:
        torch.set_num_threads(threads)


def _generate_embedded(seed, cfg, chunk, quiet):
    out = {}
    total = sum(cfg[f"n_{s}"] for s in ("train", "val", "test"))
    bar = tqdm(total=total, desc="generating the embedded benchmark", unit="clip", dynamic_ncols=True,
               disable=total < 1000 if quiet is None else quiet)
    for i, split in enumerate(("train", "val", "test")):
        g = torch.Generator().manual_seed(seed * 1000 + i)
        n = cfg[f"n_{split}"]
        labels = (torch.arange(n) % cfg["num_classes"])[torch.randperm(n, generator=g)]
        latents = draw_latents(labels, g, cfg)
        wavs, frames = [], []
        for s in range(0, n, chunk):
            part = {k: v[s:s + chunk] for k, v in latents.items()}
            wavs.append(synth_audio(labels[s:s + chunk], part, g, cfg))
            frames.append(synth_frames(labels[s:s + chunk], part, g, cfg))
            bar.update(len(labels[s:s + chunk]))
        wav = (torch.cat(wavs) * 32767).round().to(torch.int16)
        out[split] = {"wav": wav, "frames": torch.cat(frames), "label": labels, **latents}
    bar.close()
    return out


def embedded_raw(seed=0, cache_dir=CACHE_DIR, image_text=False):
    """The raw embedded benchmark (audio-video or image-text), generated once per seed and cached."""
    if image_text:
        name, make, keys = f"image_text_{it_embedded_id()}", generate_image_text, set(IT_TASKS)
    else:
        name, make, keys = f"embedded_{embedded_id()}", generate_embedded, {"train", "val", "test"}
    path = os.path.join(cache_dir, f"{name}_seed{seed}.pt")
    if path not in _RAW:
        _RAW[path] = _load_or_make(path, lambda: make(seed), keys)
    return _RAW[path]


def _load_or_make(path, make, keys):
    """torch.load(path) if it holds a dict with these keys, else make(), saved there."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(obj, dict) and set(obj) == keys:
            return obj
    except Exception:  # no file, or not one this version wrote
        pass
    obj = make()
    try:
        common.atomic_save(obj, path)
    except OSError as err:
        print(f"[cache] could not write {path} ({err.strerror or err})", file=sys.stderr)
    return obj


_RAW = {}  # the raw benchmarks, loaded once per process
_CLEAN = {}  # the clean pre-processed inputs of the embedded benchmarks, made once per process


def embedded_split(split, model, seed=0, video_corruption=None, audio_corruption=None, severity=5,
                   corruption_seed=0, frost_dir=None, noise_dir=None, cache_dir=CACHE_DIR):
    """One split of the embedded benchmark as AVTensors for `model`'s input sizes; a corruption acts on
    the raw waveforms / frames, from a generator seeded with `corruption_seed` (the audio one first)."""
    raw = embedded_raw(seed, cache_dir)[split]
    g = torch.Generator().manual_seed(corruption_seed)
    wavs, frames = raw["wav"].float() / 32767, raw["frames"].float() / 255  # (N, T_samples), (N, 3, S, S)
    clean = _CLEAN.setdefault((seed, split, model.mel_bins, model.audio_length, model.image_size, cache_dir),
                              {})
    if audio_corruption:
        wavs = corrupt_audio(wavs, audio_corruption, severity, generator=g, noise_dir=noise_dir).clamp(-1, 1)
        audio = wavs_to_fbank(wavs, model.mel_bins, model.audio_length)
    else:
        if "audio" not in clean:
            clean["audio"] = wavs_to_fbank(wavs, model.mel_bins, model.audio_length)
        audio = clean["audio"]
    if video_corruption:
        frames = corrupt_video(frames, video_corruption, severity, generator=g, frost_dir=frost_dir)
        video = frames_to_input(frames, model.image_size)
    else:
        if "video" not in clean:
            clean["video"] = frames_to_input(frames, model.image_size)
        video = clean["video"]
    return AVTensors({"audio": audio, "video": video, "label": raw["label"]})


# ---- The embedded image-text benchmark: food (Food-101-like), imdb (MM-IMDb-like), memes (Hateful Memes) --
# One small visual world for the three tasks: 1/f scenes with `count` soft-edged objects. Four per-sample
# attributes are shown and named in the text (count, colour, size, region), so text and image correspond per
# sample (what CLIP's objective learns). Class evidence: outline (5 shapes), fine inner pattern (4) and the
# scene's tint; a motif = (shape, pattern). food: 20 dishes in 4 groups, the title names the dish (p 0.8) or
# only its group. imdb: 12 genres of unequal frequency, each figure shows one genre's motif (p 0.6), the plot
# names genres by cue words (p 0.9, false cue p 0.04). memes: hateful = [h_t + h_i > 0.5] (text hostility,
# target subject), 10% flipped; half the samples are confounders of the other half (same text or picture).
IT_TASKS = {  # task -> what the papers' table reports on the dataset it stands for
    "food": dict(kind="single", metric="accuracy", num_classes=20, like="UPMC Food-101"),
    "imdb": dict(kind="multilabel", metric="f1_macro", num_classes=12, like="MM-IMDb"),
    "memes": dict(kind="binary", metric="auroc", num_classes=2, like="Hateful Memes"),
}
IT_EMBEDDED = dict(
    n_train=2000, n_val=200, n_test=1024,  # per task; 1,024 test samples = 16 batches of 64
    image_size=48, max_count=4,
    size_px=(4.5, 6.5, 8.5),  # object radius (px of a 48 x 48 picture) of small / medium / large
    pattern_period=4.0, pattern_contrast=0.6,  # the fine inner pattern
    shape_jitter=0.2,  # relative std of a shape's modulation depth
    p_mention=0.8,  # each per-sample attribute is named with this probability
    food_p_dish=0.8,  # a food title names the dish (else only its group)
    imdb_genre_freq=(0.5, 0.35, 0.28, 0.22, 0.18, 0.15, 0.12, 0.1, 0.08, 0.06, 0.05, 0.04),
    imdb_p_motif=0.6, imdb_p_cue=0.9, imdb_p_false_cue=0.04, imdb_words=(10, 30),
    memes_flip=0.1, memes_p_dark=(0.2, 0.8),  # P(a dark scene) at hostility -2 and +2, linear between
)
IT_COLOURS = (("red", 0.0), ("orange", 0.08), ("yellow", 0.15), ("green", 0.33), ("cyan", 0.5),
              ("blue", 0.62),
              ("purple", 0.75), ("pink", 0.88))
COLOUR_WORDS = tuple(c for c, _ in IT_COLOURS)
IT_COUNTS = (("one", "a", "single"), ("two", "pair"), ("three",), ("four",))  # count 1..4
IT_SIZES = (("small", "tiny"), ("medium",), ("big", "large"))
IT_REGIONS = ("left", "right", "top", "bottom")
IT_SHAPES = ((0, 0.0), (3, 0.3), (4, 0.22), (5, 0.42), (2, 0.4))  # radius(theta) = 1 + a cos(m theta): (m, a)
FOOD_GROUPS = ("dessert", "soup", "salad", "snack")
FOOD_DISHES = (("cake", "gateau"), ("pie", "tart"), ("pudding", "custard"), ("cookies", "biscuits"),
               ("donuts", "crullers"), ("ramen", "noodles"), ("chowder", "bisque"), ("pho", "broth"),
               ("gazpacho", "borscht"), ("miso", "dashi"), ("caesar", "romaine"), ("coleslaw", "slaw"),
               ("tabbouleh", "bulgur"), ("caprese", "mozzarella"), ("nicoise", "tuna"),
               ("nachos", "tortilla"), ("fries", "chips"), ("pretzel", "twist"), ("samosa", "pakora"),
               ("dumplings", "gyoza"))
FOOD_TINT = (0.05, 0.55, 0.3, 0.8)  # hue of each group's scene tint
IMDB_GENRES = ("drama", "comedy", "romance", "thriller", "crime", "action", "horror", "documentary", "scifi",
               "family", "war", "western")
IMDB_CUES = (("grief", "family", "struggle"), ("hilarious", "funny", "laughs"), ("love", "falls", "heart"),
             ("suspense", "danger", "chase"), ("murder", "detective", "police"),
             ("fight", "explosive", "battle"), ("ghost", "terror", "haunted"),
             ("interviews", "footage", "true"), ("alien", "spaceship", "future"),
             ("kids", "parents", "holiday"), ("soldiers", "army", "front"), ("cowboy", "sheriff", "desert"))
IMDB_DARK = (3, 4, 6, 10)  # thriller, crime, horror, war: darker posters
MEMES_TONE = (("lovely", "kind", "sweet"), ("nice", "fine", "okay"), ("weird", "odd", "strange"),
              ("stupid", "ugly", "gross"), ("vile", "disgusting", "filthy"))  # hostility -2 .. 2
# (motif, colour) of the 6 subjects; the first 3 (warm colours) are targets
MEMES_SUBJECTS = ((1, 0), (6, 1), (11, 7), (16, 4), (3, 5), (13, 6))
IT_NOISE = ("the", "with", "and", "of", "best", "easy", "homemade", "recipe", "photo", "look", "this", "is",
            "so", "when", "you", "my", "today", "story", "new", "really", "just", "about", "in", "a", "life",
            "world", "young", "man", "woman", "town", "after", "meets", "must", "their", "his", "her")
IT_VERSION = 1  # bump when the generator changes; the cache name also carries a hash of the settings


def it_vocab():
    """Every word the generator can write, in a fixed order (the embedded tokenizer's vocabulary)."""
    words = [w for ws in IT_COUNTS + IT_SIZES for w in ws] + [c for c, _ in IT_COLOURS] + list(IT_REGIONS) \
        + ["on", "at", "objects"] + list(FOOD_GROUPS) + [w for ws in FOOD_DISHES for w in ws] \
        + [w for ws in IMDB_CUES for w in ws] + [w for ws in MEMES_TONE for w in ws] + list(IT_NOISE)
    return tuple(dict.fromkeys(words))  # unique, first occurrence kept


def it_embedded_id(cfg=IT_EMBEDDED):
    """Version + hash of every setting and word table: caches and checkpoints carry it."""
    text = json.dumps([IT_VERSION, cfg, IT_TASKS, IT_COLOURS, IT_COUNTS, IT_SIZES, IT_REGIONS, IT_SHAPES,
                       FOOD_GROUPS, FOOD_DISHES, FOOD_TINT, IMDB_GENRES, IMDB_CUES, IMDB_DARK, MEMES_TONE,
                       MEMES_SUBJECTS, IT_NOISE], sort_keys=True)
    return f"it{IT_VERSION}-{hashlib.sha1(text.encode()).hexdigest()[:8]}"


def draw_attributes(n, g, cfg=IT_EMBEDDED):
    """Per-sample attributes a picture shows and its text names: count 1..4, colour, size, region."""
    return {"count": torch.randint(1, cfg["max_count"] + 1, (n,), generator=g),
            "colour": torch.randint(0, len(IT_COLOURS), (n,), generator=g),
            "size": torch.randint(0, len(IT_SIZES), (n,), generator=g),
            "region": torch.randint(0, len(IT_REGIONS), (n,), generator=g)}


def render_pictures(attrs, motif, tint, g, cfg=IT_EMBEDDED):
    """Pictures of `count` objects of motifs (N, K) on scenes of hue `tint` -> uint8 (N, 3, S, S)."""
    n, S, K = len(motif), cfg["image_size"], cfg["max_count"]
    scene = _one_over_f(n, S, g, 1.0)                                          # (N, S, S)
    light = _one_over_f(n, S, g, 1.2)
    hue1 = torch.where(tint.isnan(), torch.rand(n, generator=g),
                       tint + 0.04 * torch.randn(n, generator=g)) % 1.0
    dark = attrs.get("dark", torch.zeros(n, dtype=torch.bool)).float()
    c1 = _hsv_to_rgb(hue1, 0.3 + 0.15 * torch.rand(n, generator=g),
                     (0.35 + 0.25 * torch.rand(n, generator=g)) * (1 - 0.55 * dark))
    c2 = _hsv_to_rgb(torch.rand(n, generator=g), 0.1 + 0.2 * torch.rand(n, generator=g),
                     (0.55 + 0.3 * torch.rand(n, generator=g)) * (1 - 0.55 * dark))
    mix = torch.sigmoid(2.5 * scene)[:, None]
    img = (c1[:, :, None, None] * (1 - mix) + c2[:, :, None, None] * mix) * (1 + 0.2 * light[:, None])
    # objects: centres inside the named region (a half of the picture)
    radius = torch.tensor(cfg["size_px"])[attrs["size"]][:, None] \
        * (0.9 + 0.2 * torch.rand(n, K, generator=g))  # (N, K)
    u, v = 0.14 + 0.72 * torch.rand(2, n, K, generator=g)                      # along / across the half
    across = 0.12 + 0.3 * v
    region = attrs["region"][:, None].expand(n, K)
    cx = torch.where(region == 0, across, torch.where(region == 1, 1 - across, u)) * S
    cy = torch.where(region == 2, across, torch.where(region == 3, 1 - across, u)) * S
    turn = 2 * math.pi * torch.rand(n, K, generator=g)
    shape = motif // 4
    m = torch.tensor([s[0] for s in IT_SHAPES], dtype=torch.float)[shape]     # (N, K)
    jitter = (1 + cfg["shape_jitter"] * torch.randn(n, K, generator=g)).clamp(0.3, 1.7)
    a = torch.tensor([s[1] for s in IT_SHAPES])[shape] * jitter
    hues = torch.tensor([h for _, h in IT_COLOURS])
    hue = (hues[attrs["colour"]] + 0.02 * torch.randn(n, generator=g)) % 1.0
    colour = _hsv_to_rgb(hue, 0.75 + 0.2 * torch.rand(n, generator=g),
                         0.75 + 0.2 * torch.rand(n, generator=g))
    yy, xx = torch.meshgrid(torch.arange(S).float() + 0.5, torch.arange(S).float() + 0.5, indexing="ij")
    w = 2 * math.pi / cfg["pattern_period"]
    waves = (torch.cos(w * yy), torch.cos(w * (xx * math.sin(math.pi / 3) + yy * math.cos(math.pi / 3))))
    patterns = torch.stack([torch.zeros(S, S), waves[0], waves[1], torch.cos(w * xx) * torch.cos(w * yy)])
    for j in range(K):  # painter's order; slot j is drawn only when count > j
        dy, dx = yy - cy[:, j, None, None], xx - cx[:, j, None, None]          # (N, S, S)
        rho, theta = (dx ** 2 + dy ** 2).sqrt(), torch.atan2(dy, dx)
        wave_j = torch.cos(m[:, j, None, None] * (theta - turn[:, j, None, None]))  # (N, S, S)
        edge = radius[:, j, None, None] * (1 + a[:, j, None, None] * wave_j)
        alpha = torch.sigmoid((edge - rho) / 0.5) * (attrs["count"] > j).float()[:, None, None]
        shade = (1.0 - 0.25 * (dy + dx) / (2 * radius[:, j, None, None])).clamp(0.6, 1.3)
        texture = 1 + cfg["pattern_contrast"] * patterns[motif[:, j] % 4]      # (N, S, S)
        obj = colour[:, :, None, None] * (shade * texture)[:, None]
        img = img * (1 - alpha[:, None]) + obj * alpha[:, None]
    return (img.clamp(0, 1) * 255).round().to(torch.uint8)


def _pick(options, rng):
    return options[rng.integers(len(options))]


def describe(attrs, i, rng, p_mention):
    """The words naming sample i's attributes: [count] [size] [colour] objects [on the region]."""
    words = []
    if rng.random() < p_mention:
        words.append(_pick(IT_COUNTS[attrs["count"][i] - 1], rng))
    if rng.random() < p_mention:
        words.append(_pick(IT_SIZES[attrs["size"][i]], rng))
    if rng.random() < p_mention:
        words.append(IT_COLOURS[attrs["colour"][i]][0])
    words.append("objects")
    if rng.random() < p_mention:
        words += ["on", IT_REGIONS[attrs["region"][i]]]
    return words


def add_noise_words(words, rng, k):
    for _ in range(k):
        words.insert(int(rng.integers(len(words) + 1)), _pick(IT_NOISE, rng))
    return words


def _food(n, g, rng, cfg):
    label = (torch.arange(n) % 20)[torch.randperm(n, generator=g)]
    attrs = draw_attributes(n, g, cfg)
    motif = label[:, None].expand(n, cfg["max_count"])
    images = render_pictures(attrs, motif, torch.tensor(FOOD_TINT)[label // 5], g, cfg)
    a, texts = {k: v.tolist() for k, v in attrs.items()}, []
    for i, c in enumerate(label.tolist()):
        name = _pick(FOOD_DISHES[c], rng) if rng.random() < cfg["food_p_dish"] else FOOD_GROUPS[c // 5]
        words = describe(a, i, rng, cfg["p_mention"])
        words[words.index("objects")] = name  # "two big red cake on the left"
        texts.append(" ".join(add_noise_words(words, rng, int(rng.integers(1, 5)))))
    return images, texts, label, attrs


def _imdb(n, g, rng, cfg):
    freq = torch.tensor(cfg["imdb_genre_freq"])
    label = (torch.rand(n, len(freq), generator=g) < freq).float()            # (N, G) multi-hot
    none = label.sum(1) == 0
    label[none, torch.multinomial(freq, int(none.sum()), replacement=True, generator=g)] = 1.0
    attrs = draw_attributes(n, g, cfg)
    attrs["dark"] = label[:, list(IMDB_DARK)].sum(1) > 0
    K = cfg["max_count"]
    # figure j shows the motif of the film's (j mod #genres)-th genre with probability p_motif, else none
    order = torch.argsort(label + torch.rand(label.shape, generator=g), dim=1, descending=True)
    slot = torch.arange(K)[None] % label.sum(1, keepdim=True).long()          # (N, K)
    genre = order.gather(1, slot)
    shown = torch.rand(n, K, generator=g) < cfg["imdb_p_motif"]
    motif = torch.where(shown, 1 + genre, torch.zeros_like(genre))
    images = render_pictures(attrs, motif, torch.full((n,), float("nan")), g, cfg)
    a, texts = {k: v.tolist() for k, v in attrs.items()}, []
    lo, hi = cfg["imdb_words"]
    for i, row in enumerate(label.tolist()):
        words = describe(a, i, rng, cfg["p_mention"])
        for gi, present in enumerate(row):
            if rng.random() < (cfg["imdb_p_cue"] if present else cfg["imdb_p_false_cue"]):
                words.insert(int(rng.integers(len(words) + 1)), _pick(IMDB_CUES[gi], rng))
        extra = max(0, int(rng.integers(lo, hi + 1)) - len(words))
        texts.append(" ".join(add_noise_words(words, rng, extra)))
    return images, texts, label, attrs


def memes_label(h_t, target, flip):
    """hateful = [h_t + h_i > 0.5], h_i = +1 for a target subject, else -1; `flip` marks noisy labels."""
    h_i = torch.where(target, 1, -1)
    return ((h_t + h_i > 0.5) ^ flip).long()


def _memes(n, g, rng, cfg):
    half = n // 2
    subject = torch.randint(0, len(MEMES_SUBJECTS), (n,), generator=g)
    h_t = torch.randint(-2, 3, (n,), generator=g)
    # sibling i + half is base i's confounder: its text with a subject of the other kind, or its picture
    # with a hostility across the decision line
    same_text = torch.rand(half, generator=g) < 0.5
    base, sib = torch.arange(half), torch.arange(half) + half
    other_kind = (subject[base] + 3 + torch.randint(0, 3, (half,), generator=g)) % 6
    subject[sib] = torch.where(same_text, other_kind, subject[base])
    crossed = torch.where(h_t[base] >= 0, torch.randint(-2, 0, (half,), generator=g),
                          torch.randint(1, 3, (half,), generator=g))
    h_t[sib] = torch.where(same_text, h_t[base], crossed)
    attrs = draw_attributes(n, g, cfg)
    lo, hi = cfg["memes_p_dark"]
    attrs["dark"] = torch.rand(n, generator=g) < lo + (hi - lo) * (h_t + 2).float() / 4
    # a sibling shows what its text says: the base's count, size, region (and, same picture, its pixels)
    for k in attrs:
        attrs[k][sib] = attrs[k][base]
    attrs["colour"] = torch.tensor([c for _, c in MEMES_SUBJECTS])[subject]  # a subject's colour marks it
    motif = torch.tensor([m for m, _ in MEMES_SUBJECTS])[subject][:, None].expand(n, cfg["max_count"])
    images = render_pictures(attrs, motif, torch.full((n,), float("nan")), g, cfg)
    images[sib[~same_text]] = images[base[~same_text]]
    label = memes_label(h_t, subject < 3, torch.rand(n, generator=g) < cfg["memes_flip"])
    a, texts = {k: v.tolist() for k, v in attrs.items()}, []
    for i in range(n):
        if i >= half and same_text[i - half]:
            texts.append(texts[i - half])
            continue
        words = [w for w in describe(a, i, rng, cfg["p_mention"]) if w not in COLOUR_WORDS]
        words += [_pick(MEMES_TONE[h_t[i] + 2], rng) for _ in range(int(rng.integers(1, 4)))]
        texts.append(" ".join(add_noise_words(words, rng, int(rng.integers(1, 5)))))
    perm = torch.randperm(n, generator=g)  # siblings are not neighbours
    sibling = torch.cat([sib, base])
    attrs = {k: v[perm] for k, v in attrs.items()}
    attrs.update(subject=subject[perm], hostility=h_t[perm], sibling=perm.argsort()[sibling[perm]],
                 same_text=torch.cat([same_text, same_text])[perm])
    return images[perm], [texts[i] for i in perm.tolist()], label[perm], attrs


def generate_image_text(seed=0, cfg=IT_EMBEDDED, quiet=None):
    """{task: {split: {'images': uint8 (N, 3, S, S), 'texts', 'label', attributes}}} from `seed`."""
    out = {}
    makers = {"food": _food, "imdb": _imdb, "memes": _memes}
    bar = tqdm(total=9, desc="generating the embedded image-text benchmark", unit="split", dynamic_ncols=True,
               disable=quiet)
    for t, task in enumerate(IT_TASKS):
        out[task] = {}
        for s, split in enumerate(("train", "val", "test")):
            g = torch.Generator().manual_seed(seed * 1000 + 10 * t + s)
            rng = np.random.default_rng(seed * 1000 + 10 * t + s)
            images, texts, label, attrs = makers[task](cfg[f"n_{split}"], g, rng, cfg)
            out[task][split] = {"images": images, "texts": texts, "label": label, **attrs}
            bar.update(1)
    bar.close()
    return out


def embedded_tokenizer():
    return WordTokenizer(it_vocab())


def embedded_image_text_split(task, split, image_size, context_length, tokenizer=None, seed=0,
                              cache_dir=CACHE_DIR):
    """One split of an embedded image-text task as AVTensors {'image', 'text', 'label', 'index'}."""
    need(task in IT_TASKS, f"Unknown embedded image-text task {task!r}; choose one of {', '.join(IT_TASKS)}.")
    raw = embedded_raw(seed, cache_dir, image_text=True)[task][split]
    tokenizer = tokenizer or embedded_tokenizer()
    key = ("it", task, split, seed, image_size, cache_dir)
    if key not in _CLEAN:
        _CLEAN[key] = frames_to_input(raw["images"], image_size, mean=CLIP_MEAN, std=CLIP_STD)
    return AVTensors({"image": _CLEAN[key], "text": tokenizer(raw["texts"], context_length),
                      "label": raw["label"]})


# ---- Real files: the READ / Kinetics50-C / VGGSound-C layout -----------------------------------------------
def visible_names(folder):
    """The sorted names in `folder` (none if it is not a folder), hidden ones (starting with ".") left out."""
    return sorted(n for n in os.listdir(folder) if not n.startswith(".")) if os.path.isdir(folder) else []


def check_input_file(path, what, hint):
    """Refuse unless `path` is an existing file, saying whether it is missing or a folder."""
    need(not os.path.isdir(path), f"{what} {path} is a folder, not a file; {hint}")
    need(os.path.isfile(path), f"{what} {path} does not exist; {hint}")


def read_text(path, what, hint, parse_json=False):
    """The text of an existing UTF-8 file (a spreadsheet's BOM dropped), or its JSON; refused otherwise."""
    check_input_file(path, what, hint)
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            text = f.read()
        return json.loads(text) if parse_json else text
    except UnicodeDecodeError:
        raise Refusal(f"{what} {path} is not UTF-8 text (a binary file?); pass the right file.") from None
    except json.JSONDecodeError as err:
        raise Refusal(f"{what} {path} is not valid JSON ({err.msg} at line {err.lineno}); {hint}") from None


def read_label_csv(path):
    """Label CSV `index,mid[,display_name]` -> {mid: index}; indices 0..K-1, each once."""
    text = read_text(path, "Label CSV", "pass the class_labels_indices_*.csv of your dataset.")
    rows = [r for r in csv.reader(text.splitlines()) if any(c.strip() for c in r)]
    if rows and not rows[0][0].strip().isdigit():
        rows = rows[1:]  # header
    need(rows, f"Label CSV {path} has no rows; expected lines `index,mid,display_name`.")
    bad = next((r for r in rows if len(r) < 2 or not r[0].strip().isdigit() or not r[1].strip()), None)
    need(bad is None, f"Label CSV {path} has the line {','.join(bad or [])[:40]!r}; every line needs "
         f"`index,mid[,display_name]`.")
    mids, indices = [r[1].strip() for r in rows], [int(r[0]) for r in rows]
    twice = next((m for m in mids if mids.count(m) > 1), None)
    need(twice is None, f"Label CSV {path} lists the label {twice!r} twice; give every mid one index.")
    need(sorted(indices) == list(range(len(rows))),
         f"Label CSV {path} has indices other than 0..{len(rows) - 1} (each once); renumber them from 0.")
    return dict(zip(mids, indices))


ENTRY_FIELDS = ("video_id", "wav", "video_path", "labels")


def read_json_list(path):
    """READ's JSON {'data': [{'video_id', 'wav', 'video_path', 'labels'}, ...]} -> its checked list."""
    obj = read_text(path, "Data list", "READ's lists look like {\"data\": [...]}.", parse_json=True)
    need(isinstance(obj, dict) and isinstance(obj.get("data"), list),
         f"{path} is not a READ data list (a JSON object with a 'data' list of clips); pass one.")
    need(obj["data"], f"Data list {path} is empty; there is nothing to evaluate.")
    seen = set()
    for i, e in enumerate(obj["data"]):
        need(isinstance(e, dict) and all(isinstance(e.get(k), str) for k in ENTRY_FIELDS)
             and all(e[k].strip() for k in ENTRY_FIELDS[:3]),
             f"Entry {i} of {path} needs the strings {', '.join(ENTRY_FIELDS)} (only labels may be empty).")
        need(e["video_id"] not in seen, f"{path} lists the clip {e['video_id']!r} twice; remove one of them.")
        seen.add(e["video_id"])
    return obj["data"]


def frame_path(entry, index=5):
    """Path of frame `index` of a clip, falling back to lower indices when a frame is missing."""
    for i in range(index, -1, -1):
        p = os.path.join(entry["video_path"], f"frame_{i}", f"{entry['video_id']}.jpg")
        if os.path.isfile(p):
            return p
    return None


def _check_image_header(path):
    """Refuse unless the file starts like a JPEG or PNG (decoding is per batch)."""
    with open(path, "rb") as f:
        head = f.read(8)
    need(head.startswith(b"\xff\xd8\xff") or head.startswith(b"\x89PNG\r\n\x1a\n"),
         f"{path} is not a JPEG or PNG image ({'empty' if not head else 'wrong first bytes'}); replace or "
         f"remove it.")


class ReadLayoutDataset(torch.utils.data.Dataset):
    """Clips of a READ list, pre-processed per item; clips without a label, WAV or frame skipped."""

    def __init__(self, json_path, label_csv, mel_bins=128, target_length=1024, image_size=224,
                 frame_index=5, entries=None):
        entries = read_json_list(json_path) if entries is None else entries
        mid_to_index = read_label_csv(label_csv)
        self.items, skipped, unlabelled = [], [], 0
        for e in entries:
            mids = [m.strip() for m in e["labels"].split(",") if m.strip()]
            unknown = next((m for m in mids if m not in mid_to_index), None)
            need(unknown is None, f"Clip {e['video_id']} in {json_path} has the label {unknown!r}, not in "
                 f"{os.path.basename(label_csv)}; use the label CSV of this data list.")
            need(len(mids) <= 1, f"Clip {e['video_id']} in {json_path} has {len(mids)} labels, but these "
                 f"runs are single-label; keep the one label to score it against.")
            frame = frame_path(e, frame_index)
            if not mids:
                unlabelled += 1
                continue
            if frame is None or not os.path.isfile(e["wav"]):
                skipped.append(e["video_id"])
                continue
            _, _, rate, n = wav_info(e["wav"])  # the header now: a WAV this project cannot read is named
            need(n * SAMPLE_RATE >= FBANK_WINDOW * rate, f"{e['wav']} lasts {1000 * n / rate:.1f} ms, "
                 f"shorter than one 25 ms fbank window; replace or remove it.")
            _check_image_header(frame)
            self.items.append((e["wav"], frame, mid_to_index[mids[0]]))
        if skipped or unlabelled:
            first = f" (first: {skipped[0]})" if skipped else ""
            print(f"[data] {json_path}: skipped {len(skipped)} of {len(entries)} clips with a missing WAV or "
                  f"frame{first} and {unlabelled} without a label", file=sys.stderr)
        need(self.items, f"No clip of {json_path} has a label, its WAV and a frame on disk; check the paths.")
        self.mel_bins, self.target_length, self.image_size = mel_bins, target_length, image_size
        self.skipped = len(skipped) + unlabelled

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        wav_path, frame, label = self.items[i]
        wav, sr = read_wav(wav_path)
        if sr != SAMPLE_RATE:
            wav = torchaudio.functional.resample(wav, sr, SAMPLE_RATE)
        return {"audio": wav_to_fbank(wav, self.mel_bins, self.target_length),
                "video": frames_to_input(read_image(frame).unsqueeze(0), self.image_size)[0],
                "label": torch.tensor(label), "index": torch.tensor(i)}


def read_layout_json(data_root, modality, corruption, severity):
    """READ's test list: <root>/clean/severity_0.json or <root>/<modality>/<corruption>/severity_<s>.json."""
    if corruption is None:
        return os.path.join(data_root, "clean", "severity_0.json")
    return os.path.join(data_root, modality, corruption, f"severity_{severity}.json")


def read_layout_split(data_root, label_csv, model, video_corruption=None, audio_corruption=None, severity=5):
    """A READ-layout test set; with both corruptions, the clips in both lists (others counted)."""
    kw = dict(mel_bins=model.mel_bins, target_length=model.audio_length, image_size=model.image_size)
    video = read_layout_json(data_root, "video", video_corruption, severity)
    audio = read_layout_json(data_root, "audio", audio_corruption, severity)
    if not (video_corruption and audio_corruption):
        return ReadLayoutDataset(video if video_corruption else audio, label_csv, **kw)  # none: clean
    vid, wav_of = read_json_list(video), {e["video_id"]: e["wav"] for e in read_json_list(audio)}
    both = [{**e, "wav": wav_of[e["video_id"]]} for e in vid if e["video_id"] in wav_of]
    need(both, f"The video list and the audio list ({os.path.basename(audio)}) share no video_id; pass "
         f"lists made from the same clean list.")
    if len(both) < max(len(vid), len(wav_of)):
        print(f"[data] --modality both: dropped {len(vid) - len(both)} of {len(vid)} clips of {video} "
              f"missing from the audio list and {len(wav_of) - len(both)} of {len(wav_of)} clips of {audio} "
              f"missing from the video list", file=sys.stderr)
    return ReadLayoutDataset(f"{video_corruption}+{audio_corruption}", label_csv, entries=both, **kw)


# ---- Image-text: tokenizers --------------------------------------------------------------------------------
# `CLIPTokenizer` (openai/CLIP `clip/simple_tokenizer.py`, written again from its description, read from
# `bpe_simple_vocab_16e6.txt.gz`) and `WordTokenizer` (the embedded vocabulary) share one interface (.sot,
# .eot, .vocab_size, .encode, tokenizer(texts, C) -> (N, C)); both give the end token the largest id, where
# CLIP pools (argmax(ids)). Against OpenAI's tokenizer (ftfy, regex, the published merges file): the same ids
# for all 52,651 non-ASCII lines of the translations Django 5.2 and Sphinx 9.0 ship (93.1% before).
BPE_MERGES_USED = 49152 - 256 - 2  # OpenAI's loader reads lines 1 .. 48,894 of the merges file
SOT_TEXT, EOT_TEXT = "<|startoftext|>", "<|endoftext|>"


def numerals():
    """The characters of Nl and No (non-decimal numbers) as the body of a `re` class."""
    runs = []
    for c in map(chr, range(sys.maxunicode + 1)):
        if c.isnumeric() and not c.isdecimal() and not c.isalpha():
            if runs and ord(runs[-1][1]) == ord(c) - 1:
                runs[-1][1] = c
            else:
                runs.append([c, c])
    return "".join(f"{first}-{last}" for first, last in runs)


# \p{N}: decimal digits (`\d`) and NUMERALS; \p{L}: the word characters (`\w`) that are neither, nor "_"
NUMERALS = numerals()
# DEVIATION: `re` has no \p{L} / \p{N}: [^\W\d_NUMERALS] / [\dNUMERALS] from Python's Unicode tables (may lag
# the `regex` module's); marks (M*) fall in the runs of other characters, as in CLIP
CLIP_SPLIT = re.compile(rf"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[^\W\d_{NUMERALS}]+|"
                        rf"[\d{NUMERALS}]|(?:[^\s\w]|_)+", re.IGNORECASE)
# ftfy.fix_text's character fixes as one str.translate table: full- and half-width forms to standard width,
# Latin ligatures split, C1 controls read as Windows-1252, curly quotes straightened, invisible controls
# removed
FTFY_TABLE = {
    **{c: unicodedata.normalize("NFKC", chr(c)) for c in range(0xFF01, 0xFFF0)}, 0x3000: " ",
    **{ord(c): unicodedata.normalize("NFKC", c) for c in "ĲĳǱǲǳǄǅǆǇǈǉǊǋǌﬀﬁﬂﬃﬄﬆ"}, 0x0149: "'n", 0xFB05: "ſt",
    **{c: bytes([c]).decode("cp1252", "ignore") or chr(c) for c in range(0x80, 0xA0)},
    **{c: "'" for c in (0x02BC, 0x2018, 0x2019, 0x201A, 0x201B)}, **{c: '"' for c in range(0x201C, 0x2020)},
    **{c: None for c in (*range(0x09), 0x0B, *range(0x0E, 0x20), 0x7F, *range(0x206A, 0x2070), 0xFEFF,
                         *range(0xFFF9, 0xFFFD))},
}


def bytes_to_unicode():
    """CLIP's / GPT-2's table byte -> printable character, in CLIP's vocabulary order."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    table = {b: chr(b) for b in printable}
    others = [b for b in range(256) if b not in table]
    table.update({b: chr(256 + n) for n, b in enumerate(others)})
    return table


def clean_text(text):
    """CLIP's clean-up: ftfy.fix_text's steps, html.unescape twice, whitespace runs -> one, lower-cased."""
    # DEVIATION: ftfy.fix_text's defaults with the standard library; mojibake ("cafÃ©") is not repaired
    if "<" not in text:  # ftfy decodes HTML entities (again while any is left) unless the text holds '<'
        text = html.unescape(html.unescape(text))
    text = unicodedata.normalize("NFC", text.translate(FTFY_TABLE).translate(FTFY_TABLE))
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip().lower()


def pad_token_ids(ids_per_text, sot, eot, context_length):
    """[[ids...], ...] -> (N, C) long [sot] + ids + [eot], zero-padded; cut to C with eot last."""
    need(ids_per_text, "No texts were given to tokenize; pass a non-empty list of strings.")
    out = torch.zeros(len(ids_per_text), context_length, dtype=torch.long)  # (N, C)
    for row, ids in enumerate(ids_per_text):
        ids = [sot] + ids + [eot]
        if len(ids) > context_length:
            ids = ids[:context_length]
            ids[-1] = eot
        out[row, :len(ids)] = torch.tensor(ids, dtype=torch.long)
    return out


class CLIPTokenizer:
    """OpenAI CLIP's byte-level BPE: bytes, bytes + `</w>`, merges, start, end (49,408 ids)."""

    def __init__(self, path):
        merges = self._read_merges(path)
        self.byte_encoder = bytes_to_unicode()
        symbols = list(self.byte_encoder.values())
        vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [SOT_TEXT, EOT_TEXT]
        self.encoder = {token: i for i, token in enumerate(vocab)}  # later duplicates win, as in CLIP
        self.bpe_ranks = {m: rank for rank, m in enumerate(merges)}
        self.sot, self.eot = self.encoder[SOT_TEXT], self.encoder[EOT_TEXT]
        self.vocab_size = len(vocab)
        self.cache = {SOT_TEXT: SOT_TEXT, EOT_TEXT: EOT_TEXT}

    @staticmethod
    def _read_merges(path):
        """The merges as OpenAI's loader reads them: line 0 skipped, then up to 48,894 merges."""
        hint = "pass CLIP's bpe_simple_vocab_16e6.txt.gz"
        check_input_file(path, "BPE merges file", hint)
        with open(path, "rb") as f:
            raw = f.read()
        try:
            text = (gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw).decode("utf-8")
        except (OSError, EOFError, zlib.error, UnicodeDecodeError):
            raise Refusal(f"BPE merges file {path} is not UTF-8 text, gzipped or plain; {hint}.") \
                from None
        lines = text.split("\n")[1:BPE_MERGES_USED + 1]
        if lines and not lines[-1]:
            lines.pop()  # the final newline of a file shorter than CLIP's
        merges = [tuple(line.split()) for line in lines]
        bad = next((n for n, merge in enumerate(merges, start=1) if len(merge) != 2), 0)
        need(not bad, f"line {bad} of BPE merges file {path} is not a merge (two symbols); {hint}.")
        need(merges, f"BPE merges file {path} has no merges after its first line; {hint}.")
        return merges

    def bpe(self, word):
        """One word -> its BPE symbols: merge the lowest-ranked adjacent pair until none is listed."""
        if word in self.cache:
            return self.cache[word]
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        while len(symbols) > 1:
            pairs = set(zip(symbols[:-1], symbols[1:]))
            best = min(pairs, key=lambda pair: self.bpe_ranks.get(pair, math.inf))
            if best not in self.bpe_ranks:
                break
            merged, i = [], 0
            while i < len(symbols):  # merge every occurrence of `best`, left to right
                if i < len(symbols) - 1 and (symbols[i], symbols[i + 1]) == best:
                    merged.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        self.cache[word] = " ".join(symbols)
        return self.cache[word]

    def encode(self, text):
        """A string -> BPE token ids (no start / end tokens)."""
        ids = []
        for word in CLIP_SPLIT.findall(clean_text(text)):
            word = "".join(self.byte_encoder[b] for b in word.encode("utf-8"))
            ids.extend(self.encoder[symbol] for symbol in self.bpe(word).split(" "))
        return ids

    def __call__(self, texts, context_length=77):
        return pad_token_ids([self.encode(t) for t in texts], self.sot, self.eot, context_length)


class WordTokenizer:
    """The embedded vocabulary with CLIPTokenizer's interface: 0 pad, 1 .. W words, W + 1 sot, W + 2 eot."""

    def __init__(self, words):
        words = [w.lower() for w in words]
        self.words = words
        self.encoder = {w: i + 1 for i, w in enumerate(words)}
        self.sot, self.eot = len(words) + 1, len(words) + 2
        self.vocab_size = len(words) + 3

    def encode(self, text):
        """A string -> word ids (lower-cased, split on whitespace; no start / end tokens)."""
        ids = []
        for word in text.lower().split():
            need(word in self.encoder, f"The word {word!r} of the text {text[:60]!r} is not in the "
                 f"vocabulary; add it to the word list or fix the text.")
            ids.append(self.encoder[word])
        return ids

    def __call__(self, texts, context_length=77):
        return pad_token_ids([self.encode(t) for t in texts], self.sot, self.eot, context_length)


# ---- Image-text: real datasets (MM-IMDb, UPMC Food-101, Hateful Memes in their published layouts) ----------
# Pictures follow AOEPT's public CLIP pipeline (core/model/Base/base_data.py, Unified/Unified_data.py): PIL's
# Image.open(path).convert("RGB") (alpha dropped, not composited; palette looked up; before any resize), then
# Hugging Face's CLIPImageProcessor of openai/clip-vit-base-patch16 (use_fast=False): shorter side to 224 by
# PIL's bicubic resize, centre crop, /255, CLIP mean / std. `read_image` + `clip_preprocess` match it within
# one grey level (transformers 4.57.6, Pillow 13.0; RGB, grey, CMYK JPEG, RGBA, palette, grey+alpha, 16-bit
# PNGs). OpenAI's `preprocess` differs: it resizes before convert("RGB") and rounds the crop's offsets.
# The raw files are read (MAP converts them to Arrow tables first) and checked when a split is built:
#   MM-IMDb        <root>/images/<id>.jpeg, <root>/labels/<id>.json {"plot": [...], "genres": [...]},
#                  <root>/split.json {"train", "dev", "test": [id, ...]}; 23 genres, multi-label
#   UPMC Food-101  <root>/images/{train,test}/<class>/<file>.jpg, <root>/texts/{train,test}_titles.csv
#                  (rows: image file name, text, class); 101 classes = sorted folders
#   Hateful Memes  <root>/img/<id>.png, <root>/{train,dev_seen,test_seen}.jsonl (id, img, label 0/1, text)
MMIMDB_GENRES = ("Drama", "Comedy", "Romance", "Thriller", "Crime", "Action", "Adventure", "Horror",
                 "Documentary", "Mystery", "Sci-Fi", "Fantasy", "Family", "Biography", "War", "History",
                 "Music", "Animation", "Musical", "Western", "Sport", "Short", "Film-Noir")  # MAP's order
MMIMDB_DROPPED_GENRES = ("Adult", "News", "Reality-TV", "Talk-Show")  # in the label files, not among the 23
IMAGE_TEXT_TASKS = {
    "mmimdb": {"kind": "multilabel", "metric": "f1_macro", "num_classes": 23},
    "food101": {"kind": "single", "metric": "accuracy", "num_classes": 101},
    "hatememes": {"kind": "binary", "metric": "auroc", "num_classes": 2},  # 2 logits, label long 0/1
}
IMAGE_TEXT_SPLITS = {  # our split -> the dataset's own name for it
    "mmimdb": {"train": "train", "val": "dev", "test": "test"},
    "food101": {"train": "train", "val": "val", "test": "test"},  # val: MAP's split.json or 10% of train
    # DEVIATION: MAP reads dev.jsonl / test.jsonl (test_seen.jsonl renamed); we read the published names
    "hatememes": {"train": "train", "val": "dev_seen", "test": "test_seen"},
}
FOOD101_VAL_FRACTION, FOOD101_VAL_SEED = 0.1, 0
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def clip_preprocess(image, size=224):
    """uint8 (3, h, w) RGB -> (3, size, size) as CLIPImageProcessor: PIL bicubic, rounded, centre crop."""
    h, w = image.shape[-2:]
    long_side = int(size * max(h, w) / min(h, w))
    new_h, new_w = (long_side, size) if w <= h else (size, long_side)
    x = image.float()
    for shape in ((h, new_w), (new_h, new_w)):
        if tuple(x.shape[-2:]) != shape:
            x = TF.resize(x, list(shape), interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
            x = (x + 0.5).floor().clamp(0, 255)  # PIL rounds halves up
    top, left = (new_h - size) // 2, (new_w - size) // 2
    x = x[:, top:top + size, left:left + size] / 255
    mean, std = (torch.tensor(v)[:, None, None] for v in (CLIP_MEAN, CLIP_STD))
    return (x - mean) / std


class ImageTextFiles(torch.utils.data.Dataset):
    """Image-text samples read per item; an id listed twice is refused (it would be scored twice)."""

    def __init__(self, name, ids, image_paths, texts, labels, tokenizer, image_size=224, context_length=77):
        need(ids, f"{name} has no samples; check the data root and the split you asked for.")
        seen = set()
        twice = next((i for i in ids if i in seen or seen.add(i)), None)
        need(twice is None, f"{name} lists the sample {twice!r} twice; remove one of them.")
        self.name, self.ids, self.image_paths, self.texts = name, list(ids), list(image_paths), list(texts)
        # single-label / binary: (N,) long; multi-label: (N, K) float multi-hot
        self.labels = torch.tensor(labels, dtype=torch.float if isinstance(labels[0], list) else torch.long)
        self.tokenizer, self.image_size, self.context_length = tokenizer, image_size, context_length

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"image": clip_preprocess(read_image(self.image_paths[i]), self.image_size),
                "text": self.tokenizer([self.texts[i]], self.context_length)[0],
                "label": self.labels[i], "index": torch.tensor(i)}


def _image(path, where):
    """`path`, refused unless it exists and starts like a JPEG or PNG."""
    need(os.path.isfile(path), f"{where} names the image {path}, which does not exist; restore it or remove "
         f"the sample.")
    _check_image_header(path)
    return path


def mmimdb_samples(root, split):
    """MM-IMDb split -> (ids, images, first plots, multi-hot genres); a film with none is skipped."""
    split_path, hint = os.path.join(root, "split.json"), "pass the folder that holds MM-IMDb's split.json."
    movies = read_text(split_path, "MM-IMDb split file", hint, parse_json=True)
    movies = movies.get(split) if isinstance(movies, dict) else None
    need(isinstance(movies, list) and movies, f"{split_path} has no non-empty list {split!r}; {hint}")
    genre_index = {g.lower(): k for k, g in enumerate(MMIMDB_GENRES)}
    dropped = {g.lower() for g in MMIMDB_DROPPED_GENRES}
    ids, paths, texts, labels, unlabelled = [], [], [], [], []
    for movie in map(str, movies):
        image = _image(os.path.join(root, "images", f"{movie}.jpeg"), f"Movie {movie} of split.json")
        label_path = os.path.join(root, "labels", f"{movie}.json")
        meta = read_text(label_path, "MM-IMDb label file", "it holds 'plot' and 'genres'.", parse_json=True)
        plots, genres = (meta.get("plot"), meta.get("genres")) if isinstance(meta, dict) else (None, None)
        need(isinstance(plots, list) and plots and all(isinstance(p, str) for p in plots)
             and isinstance(genres, list) and all(isinstance(g, str) for g in genres),
             f"MM-IMDb label file {label_path} needs a non-empty 'plot' list and a 'genres' list of strings.")
        # DEVIATION: MAP and AOEPT ignore every genre outside the 23; we ignore only the four MM-IMDb dropped
        # (AOEPT's preprocess_datasets.py) and refuse others (another dataset's file would lose its labels)
        unknown = next((g for g in genres if g.lower() not in genre_index and g.lower() not in dropped), None)
        close = ", ".join(difflib.get_close_matches(str(unknown), MMIMDB_GENRES, n=3, cutoff=0.5)) or "none"
        need(unknown is None, f"MM-IMDb label file {label_path} has the genre {unknown!r}, not one of the 23 "
             f"(closest: {close}); fix or remove the file.")
        lowered = {g.lower() for g in genres}
        multi_hot = [float(g.lower() in lowered) for g in MMIMDB_GENRES]
        if not any(multi_hot):
            unlabelled.append(movie)
            continue
        ids.append(movie)
        paths.append(image)
        # DEVIATION: MAP makes one sample per plot (single_plot=False); we take the first plot, one sample
        # per film, so the splits have the published sizes 15,552 / 2,608 / 7,799
        texts.append(plots[0])
        labels.append(multi_hot)
    if unlabelled:
        print(f"[data] MM-IMDb {split}: skipped {len(unlabelled)} of {len(movies)} films without a genre of "
              f"the 23 (first: {unlabelled[0]})", file=sys.stderr)
    return ids, paths, texts, labels


def food101_classes(root):
    """The class names: the sorted visible folder names of <root>/images/train."""
    folder = os.path.join(root, "images", "train")
    classes = [d for d in visible_names(folder) if os.path.isdir(os.path.join(folder, d))]
    need(classes, f"UPMC Food-101 image folder {folder} has no class folders; pass the folder that holds "
         f"images/ and texts/ as the data root.")
    return classes


def food101_samples(root, split):
    """UPMC Food-101 'train' / 'val' / 'test' -> (file names, image paths, texts, class indices)."""
    class_index = {c: k for k, c in enumerate(food101_classes(root))}
    csv_split = "test" if split == "test" else "train"
    csv_path = os.path.join(root, "texts", f"{csv_split}_titles.csv")
    text = read_text(csv_path, "UPMC Food-101 text file", "it lists `image file name,text,class` per line.")
    rows = [r for r in csv.reader(text.splitlines()) if r]
    if rows and not rows[0][0].strip().lower().endswith(IMAGE_SUFFIXES):
        rows = rows[1:]  # a header line (some copies have one)
    need(rows, f"UPMC Food-101 text file {csv_path} has no rows; restore it from UPMC Food-101.")
    ids, paths, texts, labels = [], [], [], []
    for number, row in enumerate(rows, start=1):
        where = f"row {number} of {csv_split}_titles.csv"
        need(len(row) >= 3, f"{where} is {','.join(row)[:60]!r}; every row needs `file name,text,class`.")
        # the text may hold unquoted commas: the first field is the file, the last the class
        file, cls = row[0].strip(), row[-1].strip()
        need(cls in class_index, f"{where} has the class {cls!r}, which has no folder in "
             f"{os.path.join(root, 'images', 'train')}; fix the row or add the folder.")
        ids.append(file)
        paths.append(_image(os.path.join(root, "images", csv_split, cls, file), where))
        texts.append(",".join(row[1:-1]))
        labels.append(class_index[cls])
    if split == "test":
        return ids, paths, texts, labels
    map_split = os.path.join(root, "split.json")
    if os.path.isfile(map_split):  # MAP's split file: its lists of image file names
        hint = "MAP's Food101/split.json maps 'train', 'val', 'test' to lists of image file names."
        lists = read_text(map_split, "UPMC Food-101 split file", hint, parse_json=True)
        chosen = lists.get(split) if isinstance(lists, dict) else None
        need(isinstance(chosen, list) and chosen, f"{map_split} has no non-empty list {split!r}; {hint}")
        row_of = {file: i for i, file in enumerate(ids)}
        absent = next((f for f in chosen if f not in row_of), None)
        need(absent is None, f"{map_split} lists {absent!r} in {split!r}, which is not a row of "
             f"train_titles.csv; use the split.json of this copy of UPMC Food-101.")
        keep = [row_of[f] for f in chosen]
    else:
        # DEVIATION: without MAP's split.json (copy it to <root>/split.json to use it) val is a seeded 10% of
        # the train rows, train the rest; classes are sorted, not in MAP's class_idx.json order
        order = torch.randperm(len(ids), generator=torch.Generator().manual_seed(FOOD101_VAL_SEED))
        n_val = round(FOOD101_VAL_FRACTION * len(ids))
        keep = sorted(order[:n_val].tolist() if split == "val" else order[n_val:].tolist())
    return tuple([v[i] for i in keep] for v in (ids, paths, texts, labels))


def hatememes_samples(root, split):
    """Hateful Memes 'train' / 'dev_seen' / 'test_seen' -> (ids, image paths, texts, labels 0/1)."""
    path = os.path.join(root, f"{split}.jsonl")
    text = read_text(path, "Hateful Memes list", "Hateful Memes has train, dev_seen and test_seen.jsonl.")
    ids, paths, texts, labels = [], [], [], []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"line {number} of {split}.jsonl"
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as err:
            raise Refusal(f"{where} is not valid JSON ({err.msg}); each line is one object with id, img, "
                          f"label and text.") from None
        need(not isinstance(entry, dict) or "label" in entry, f"{where} has no 'label' (the challenge's "
             f"unlabelled test.jsonl?); evaluate on test_seen.jsonl, which carries the labels.")
        need(isinstance(entry, dict) and all(k in entry for k in ("id", "img", "text"))
             and entry["label"] in (0, 1) and not isinstance(entry["label"], bool),
             f"{where} needs id, img, label (0 or 1) and text.")
        ids.append(str(entry["id"]))
        paths.append(_image(os.path.join(root, str(entry["img"])), where))
        texts.append(str(entry["text"]))
        labels.append(int(entry["label"]))
    return ids, paths, texts, labels


IMAGE_TEXT_READERS = {"mmimdb": mmimdb_samples, "food101": food101_samples, "hatememes": hatememes_samples}


def image_text_split(dataset, root, split, tokenizer, image_size=224, context_length=77):
    """One split ('train' / 'val' / 'test') of a real image-text dataset -> an ImageTextFiles."""
    need(dataset in IMAGE_TEXT_READERS, f"unknown image-text dataset {dataset!r}; choose one of "
         f"{', '.join(IMAGE_TEXT_READERS)}.")
    need(split in ("train", "val", "test"), f"unknown split {split!r}; choose train, val or test.")
    need(os.path.isdir(root), f"data root {root} is not a folder; pass the folder of the {dataset} files.")
    ids, paths, texts, labels = IMAGE_TEXT_READERS[dataset](root, IMAGE_TEXT_SPLITS[dataset][split])
    return ImageTextFiles(f"{dataset} {split} ({root})", ids, paths, texts, labels, tokenizer,
                          image_size, context_length)


# ---- Missing modalities (CMPT, MAP, AOEPT): one representation, has_<modality> masks and a blank input -----
# DEVIATION: MAP draws with Python's global `random` and floors rate * n; we draw from a seeded
# torch.Generator and round (cmpt_counts, map_counts), so our samples are not MAP's one for one
def missing_masks(n, counts, seed=0):
    """{modality: (n,) bool has}: counts[m] samples lack m, none two; in dict order from one permutation."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))  # (n,)
    has, start = {}, 0
    for modality, count in counts.items():
        has[modality] = torch.ones(n, dtype=torch.bool)
        has[modality][order[start:start + count]] = False
        start += count
    return has


def cmpt_counts(kind, rate, n):
    """CMPT's rule: 'audio' / 'video': round(rate n) lack it; 'both': round(rate n / 2) lack each."""
    need(kind in ("none", "audio", "video", "both"), f"Unknown missing kind {kind!r}; choose none, audio, "
         f"video or both.")
    need(0 <= rate <= 1, f"A missing rate is a fraction in [0, 1], not {rate}; pass e.g. 0.7 for 70%.")
    whole, half = round(rate * n), round(rate * n / 2)
    return {"audio": {"audio": whole, "both": half}.get(kind, 0),
            "video": {"video": whole, "both": half}.get(kind, 0)}


def map_counts(kind, rate, n):
    """MAP's rule: m = round(rate n) incomplete; 'both': m - m // 2 lack the text, m // 2 the image."""
    need(kind in ("text", "image", "both"), f"Unknown missing kind {kind!r}; choose text, image or both.")
    need(0 <= rate <= 1, f"A missing rate is a fraction in [0, 1], not {rate}; pass e.g. 0.7 for 70%.")
    m = round(rate * n)
    return {"text": {"text": m, "both": m - m // 2}.get(kind, 0),
            "image": {"image": m, "both": m // 2}.get(kind, 0)}


def image_placeholder(kind, shape, mean=CLIP_MEAN, std=CLIP_STD):
    """A missing image (3, H, W): 'ones' (MAP), 'zeros' (CMPT), 'black' (-mean / std, AOEPT's CLIP)."""
    need(kind in ("ones", "zeros", "black"),
         f"Unknown image placeholder {kind!r}; choose ones, zeros or black.")
    if kind == "black":
        return (-torch.tensor(mean) / torch.tensor(std))[:, None, None].expand(shape).clone()
    return torch.ones(shape) if kind == "ones" else torch.zeros(shape)


def with_missing(dataset, has, blank):
    """`dataset` with has_<m> fields and blank[m] where has[m] is False (AVTensors copied, files wrapped)."""
    for m, mask in has.items():
        need(len(mask) == len(dataset),
             f"{len(mask)} {m} flags for {len(dataset)} samples; make them for this split.")
    if not isinstance(dataset, AVTensors):
        return MissingInputs(dataset, has, blank)
    fields = {}
    for m, mask in has.items():
        x = dataset.fields[m]  # (N, ...)
        fields[m] = torch.where(mask.view(-1, *[1] * (x.dim() - 1)), x, blank[m].to(x.dtype)[None])
        fields[f"has_{m}"] = mask
    return dataset.with_fields(**fields)


class MissingInputs(torch.utils.data.Dataset):
    """A dataset read on demand, with inputs marked missing as `with_missing` does."""

    def __init__(self, dataset, has, blank):
        self.dataset, self.has, self.blank = dataset, has, blank

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        item = dict(self.dataset[i])
        for m, mask in self.has.items():
            if not mask[i]:
                item[m] = self.blank[m].to(item[m].dtype).clone()
            item[f"has_{m}"] = mask[i]
        return item


def missing_table_path(folder, dataset, split, kind, rate, seed):
    """<folder>/missing_<dataset>_<split>_<kind>_<rate in %>_seed<seed>.json."""
    return os.path.join(folder, f"missing_{dataset}_{split}_{kind}_{100 * rate:g}_seed{seed}.json")


def load_or_make_missing_table(path, ids, kind, rate, seed=0):
    """MAP's missing table of `ids`, made once and reused (codes 0 complete, 1 no text, 2 no
    image) -> {'image': has_image, 'text': has_text}; one made for other ids or settings is refused."""
    ids = [str(i) for i in ids]
    settings = {"kind": kind, "rate": rate, "seed": seed}
    hint = "delete it or choose another folder for the missing tables."
    name = os.path.basename(path)
    if os.path.exists(path):
        saved = read_text(path, "missing table", hint, parse_json=True)
        need(isinstance(saved, dict) and all(k in saved for k in (*settings, "ids", "missing")),
             f"{name} is not a missing table (kind, rate, seed, ids, missing); {hint}")
        need({k: saved[k] for k in settings} == settings,
             f"Missing table {name} was made with other settings "
             f"than kind={kind}, rate={rate}, seed={seed}; {hint}")
        need(saved["ids"] == ids, f"Missing table {name} was made for other samples; {hint}")
        codes = torch.tensor(saved["missing"], dtype=torch.long)
        need(codes.shape == (len(ids),) and bool(((codes >= 0) & (codes <= 2)).all()),
             f"Missing table {name} does not hold one code 0, 1 or 2 per sample; {hint}")
        return {"image": codes != 2, "text": codes != 1}
    has = missing_masks(len(ids), map_counts(kind, rate, len(ids)), seed)
    codes = (~has["text"]).long() + 2 * (~has["image"]).long()  # (n,) 0 / 1 / 2
    common.write_json(path, {**settings, "ids": ids, "missing": codes.tolist()})
    return {"image": has["image"], "text": has["text"]}


# ---- Making a corrupted set in READ's layout: `python data.py corrupt` -------------------------------------
JPEG_QUALITY = 85  # READ saved every corrupted frame as JPEG quality 85
CORRUPT_SETTINGS = "corrupt_settings.json"  # in <out>: what the set was made with, checked on resume
NOISE_SECONDS = 10  # length of a procedural noise recording (READ's clips last 10 s)
BATCH_SIZE = 4  # frames corrupted in one call


def file_generator(seed, *parts):
    """A torch.Generator for one output file, seeded from `seed` and the file's names (crc32)."""
    return torch.Generator().manual_seed(seed * 2 ** 32 + zlib.crc32("/".join(map(str, parts)).encode()))


def clip_frames(entry):
    """[(i, path)] of the clip's frames <video_path>/frame_<i>/<video_id>.jpg that exist (READ stores 10)."""
    names = [n for n in visible_names(entry["video_path"]) if n.startswith("frame_") and n[6:].isdigit()]
    paths = [(int(n[6:]), os.path.join(entry["video_path"], n, entry["video_id"] + ".jpg")) for n in names]
    return sorted((i, p) for i, p in paths if os.path.isfile(p))


@functools.lru_cache(maxsize=8)
def set_frost_bank(seed, size):
    """The frost stand-in's five textures of a set, shared by every frame (as ImageNet-C's photographs)."""
    return frost_bank(size, file_generator(seed, "frost", "bank", size))


@functools.lru_cache(maxsize=8)
def set_noise_recording(seed, kind, sample_rate):
    """The stand-in for READ's recording `kind` of a set, NOISE_SECONDS long, shared by every clip."""
    generator = file_generator(seed, kind, "recording", sample_rate)
    return noise_stand_in(kind, NOISE_SECONDS * sample_rate, generator, sample_rate)


def corrupt_frame_files(files, name, severity, seed, frost_dir=None):
    """Corrupt frames [(src, dst, video_id, i)] at their sizes, each from its own generator; JPEG 85."""
    images = [read_image(src) for src, _, _, _ in files]                   # uint8 (3, H, W) each
    by_size = {}
    for k, image in enumerate(images):
        by_size.setdefault(tuple(image.shape[-2:]), []).append(k)
    for (h, w), ks in by_size.items():
        frames = torch.stack([images[k] for k in ks]).float() / 255       # (n, 3, H, W) in [0, 1]
        generators = [file_generator(seed, name, severity, files[k][2], files[k][3]) for k in ks]
        bank = set_frost_bank(seed, max(h, w)) if name == "frost" and frost_dir is None else None
        out = corrupt_video(frames, name, severity, generators, frost_dir=frost_dir, frost_bank=bank)
        u8 = (out * 255).round().clamp(0, 255).to(torch.uint8)            # (n, 3, H, W)
        for k, jpeg in zip(ks, torchvision.io.encode_jpeg(list(u8), quality=JPEG_QUALITY)):
            common.atomic_write(files[k][1], lambda tmp: torchvision.io.write_file(tmp, jpeg))


def corrupt_wav_files(files, name, severity, seed, noise_dir=None):
    """Corrupt WAVs [(src, dst, video_id, None)] at their own rates, each from its own generator."""
    for src, dst, video_id, _ in files:
        wav, rate = read_wav(src)                                          # (T,), stereo averaged
        # DEVIATION: without noise_dir a procedural recording, one per set as READ's (set_noise_recording)
        stand_in = name != "gaussian_noise" and noise_dir is None
        noise = set_noise_recording(seed, name, rate) if stand_in else None
        out = corrupt_audio(wav[None], name, severity, file_generator(seed, name, severity, video_id),
                            noise_dir=noise_dir, sample_rate=rate, noise=noise)[0]
        common.atomic_write(dst, lambda tmp: write_wav(tmp, out.clamp(-1, 1), rate))


def _absolute(entry):
    return {**entry, "wav": os.path.abspath(entry["wav"]),
            "video_path": os.path.abspath(entry["video_path"]) + os.sep}


def make_corrupted_set(json_path, out, video=(), audio=(), severities=(5,), noise_dir=None, frost_dir=None,
                       seed=0, train_json=None, quiet=False, batch_size=BATCH_SIZE):
    """Corrupted copies of the clips of `json_path` in READ's layout under `out` (clean/severity_0.json,
    video|audio/<corruption>/severity_<s>.json and files): frames JPEG 85 at their size, WAVs 16-bit mono at
    their rate. Each file has its own generator: a rerun skips the files on disk and gives the same set."""
    out = os.path.abspath(out)
    entries = [_absolute(e) for e in read_json_list(json_path)]
    train = [_absolute(e) for e in read_json_list(train_json)] if train_json else None
    settings = {"source": os.path.abspath(json_path), "seed": seed, "jpeg_quality": JPEG_QUALITY,
                "noise_dir": os.path.abspath(noise_dir) if noise_dir else None,
                "frost_dir": os.path.abspath(frost_dir) if frost_dir else None}
    settings_path = os.path.join(out, CORRUPT_SETTINGS)
    if os.path.isfile(settings_path):
        with open(settings_path) as f:
            need(f.read() == json.dumps(settings, indent=1), f"{out} holds a set made with other settings; "
                 f"resume with the same --json, --seed, --noise-dir and --frost-dir, or use another --out.")
    common.write_json(settings_path, settings)
    common.write_json(os.path.join(out, "clean", "severity_0.json"), {"data": entries})
    if train:  # BriMPR's layout keeps the clean training list beside it (its source statistics)
        common.write_json(os.path.join(out, "clean", "train.json"), {"data": train})
    frames = {e["video_id"]: clip_frames(e) for e in entries} if video else {}
    report = {"written": 0, "skipped_existing": 0, "clips_without_files": {}}
    todo = []  # (list key, modality, corruption, severity, its clips, its files not yet on disk)
    for modality, name, s in [("video", n, s) for n in video for s in severities] + \
            [("audio", n, s) for n in audio for s in severities]:
        key = f"{modality}/{name}/severity_{s}"
        folder = os.path.join(out, key)
        listed, files = [], []
        for e in entries:
            if modality == "video":
                mine = [(src, os.path.join(folder, f"frame_{i}", e["video_id"] + ".jpg"), e["video_id"], i)
                        for i, src in frames[e["video_id"]]]
                clip = {**e, "video_path": folder + os.sep}
            else:
                dst = os.path.join(folder, e["video_id"] + ".wav")
                mine = [(e["wav"], dst, e["video_id"], None)] if os.path.isfile(e["wav"]) else []
                clip = {**e, "wav": dst}
            listed += [clip] if mine else []
            files += [f for f in mine if not os.path.isfile(f[1])]
            report["skipped_existing"] += sum(os.path.isfile(f[1]) for f in mine)
        todo.append((key, modality, name, s, listed, files))
        report["clips_without_files"][key] = len(entries) - len(listed)
    total = report["skipped_existing"] + sum(len(t[-1]) for t in todo)
    bar = tqdm(total=total, initial=report["skipped_existing"], desc="corrupting", unit="file", disable=quiet,
               dynamic_ncols=True)
    try:
        for key, modality, name, s, listed, files in todo:
            for k in range(0, len(files), batch_size):
                batch = files[k:k + batch_size]
                if modality == "video":
                    corrupt_frame_files(batch, name, s, seed, frost_dir)
                else:
                    corrupt_wav_files(batch, name, s, seed, noise_dir)
                report["written"] += len(batch)
                bar.update(len(batch))
            common.write_json(os.path.join(out, key + ".json"), {"data": listed})
    finally:
        bar.close()  # before any error message
    return report


def build_parser():
    p = argparse.ArgumentParser(prog="python data.py", description="Data tools. `corrupt`: write corrupted "
                                "copies of a clean READ-layout list in READ's layout.")
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("corrupt", help="make a corrupted set in READ's layout from a clean list",
                       description="Write <out>/clean/severity_0.json, <out>/video/<c>/severity_<s>.json "
                       "with JPEG frames and <out>/audio/<c>/severity_<s>.json with WAVs. Resumable: files "
                       "already written are skipped; every file is written whole or not at all.")
    c.add_argument("--json", required=True,
                   help="clean READ-layout list {'data': [{video_id, wav, video_path, labels}]} (required)")
    c.add_argument("--out", required=True, help="output folder, created if needed (required)")
    c.add_argument("--video", nargs="+", default=["all"], choices=("all", "none") + VIDEO_CORRUPTIONS,
                   metavar="NAME", help="video corruptions: all, none or names (default: all)")
    c.add_argument("--audio", nargs="+", default=["all"], choices=("all", "none") + AUDIO_CORRUPTIONS,
                   metavar="NAME", help="audio corruptions: all, none or names (default: all)")
    c.add_argument("--severities", nargs="+", type=int, choices=SEVERITIES, default=[5],
                   help="severities 1..5 (default: 5, the papers' protocol)")
    c.add_argument("--noise-dir", default=None, help="folder with traffic/crowd/rain/thunder/wind.wav, any "
                   "rate and channel count (default: none, procedural stand-ins)")
    c.add_argument("--frost-dir", default=None,
                   help="folder of frost photographs, jpg/png (default: none, procedural stand-in)")
    c.add_argument("--seed", type=int, default=0, help="seed of the corruptions, 0 .. 2^32-1 (default: 0)")
    c.add_argument("--train-json", default=None, help="clean training list to copy to "
                   "<out>/clean/train.json, where adapt.py looks for BriMPR's source clips (default: none)")
    c.add_argument("--batch-size", type=int, default=BATCH_SIZE,
                   help=f"frames corrupted in one call; the files do not depend on it (default: 4)")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    torch.set_num_threads(1)  # zoom blur's bilinear resize rounds differently with more threads
    video = [n for n in VIDEO_CORRUPTIONS if n in args.video or "all" in args.video]
    audio = [n for n in AUDIO_CORRUPTIONS if n in args.audio or "all" in args.audio]
    try:
        need(video or audio, "--video none and --audio none leave nothing to do; name a corruption.")
        need(0 <= args.seed < 2 ** 32, f"--seed {args.seed}: a seed is a whole number from 0 to 4294967295.")
        need(args.batch_size >= 1, f"--batch-size {args.batch_size}: give a whole number of at least 1.")
        need(not args.frost_dir or os.path.isdir(args.frost_dir),
             f"--frost-dir {args.frost_dir} is not a folder; pass a folder of frost photographs (jpg/png).")
        for kind in [k for k in audio if k != "gaussian_noise"] if args.noise_dir else []:
            path = os.path.join(args.noise_dir, f"{kind}.wav")
            check_input_file(path, "noise recording", f"--noise-dir needs a {kind}.wav.")
            wav_info(path)
        common.check_output_folder(args.out, "--out")
        report = make_corrupted_set(args.json, args.out, video, audio, sorted(set(args.severities)),
                                    args.noise_dir, args.frost_dir, args.seed, args.train_json,
                                    batch_size=args.batch_size)
    except Refusal as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        sys.exit("interrupted; rerun the same command to resume (no file is half-written).")
    missing = {k: v for k, v in report["clips_without_files"].items() if v}
    print(f"wrote {report['written']} files, kept {report['skipped_existing']} already there, in {args.out}"
          + (f"; clips left out for lack of frames or WAV: {missing}" if missing else ""))
    return report


if __name__ == "__main__":
    main()
