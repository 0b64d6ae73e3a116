"""Data: the embedded audio-visual and image-text benchmarks, corruptions, real-data readers, missing modalities.

Every loader here yields the same batches, dicts with named fields:

    batch["audio"]      (B, T, F) float  normalised kaldi fbank, T = model.audio_length, F = model.mel_bins
    batch["video"]      (B, 3, H, W) float  one RGB frame, ImageNet-normalised, H = W = model.image_size
    batch["label"]      (B,) long   class index
    batch["index"]      (B,) long   position of the clip in its split (pairs Source with a method)
    batch["has_audio"]  (B,) bool   only in missing-modality data: False where the audio is missing
    batch["has_video"]  (B,) bool   likewise for the video

Image-text data (a CLIP-style dual encoder; MAP, CMPT, AOEPT) yields batches with the fields image, text,
label, index and missing: see the comment of the section "Image-text: tokenizers".

Audio and video go through ONE pre-processing path whatever their origin (`wav_to_fbank`,
`frames_to_input`): 16 kHz mono -> minus mean -> kaldi fbank (htk_compat, hanning, 10 ms shift,
no dither) -> pad/cut to T frames -> (x + 5.081) / 4.4849; frames -> resize (bicubic) -> centre crop
-> /255 -> ImageNet mean/std.

The embedded image-text benchmark (`embedded_image_text_split`: food, imdb, memes, shaped like UPMC Food-101,
MM-IMDb and Hateful Memes) is generated in about 15 s and cached under `it_embedded_id`; its section's comment
and the README give its design and the properties tests/test_image_text_benchmark.py checks.

The embedded benchmark (`embedded_split`) is generated from a seed in about 15 s (both cores) and cached in
`.cache/` under its version id (`embedded_id`); each clip is one audio-visual event (see the section's
comment and the README for its design and the properties tests/test_benchmark.py checks). Its corruptions are the 15 video + 6 audio corruptions
of Kinetics50-C / VGGSound-C, applied to the raw frames / waveforms of the test split before
pre-processing, exactly where READ applied them to the real clips.

Sections, in file order:
    The one pre-processing path            wav_to_fbank, wavs_to_fbank, frames_to_input
    Both cores for the one-off preparation  parallel_fill, shared_empty, cpu_workers (THREAD_DEPENDENT)
    A dataset of tensors and its batches   AVTensors, make_loader, to_device
    Corruptions of Kinetics50-C / VGGSound-C   corrupt_video, corrupt_audio, read_image, read_wav, write_wav
    The embedded benchmark                 EMBEDDED, synth_frames, synth_audio, generate_embedded, embedded_raw,
                                           embedded_split, embedded_test_sets
    The embedded image-text benchmark      food / imdb / memes (IT_TASKS, IT_EMBEDDED): draw_attributes,
                                           render_pictures, generate_image_text, image_text_raw, it_embedded_id,
                                           embedded_tokenizer, embedded_image_text_split
    The READ file layout                   read_label_csv, read_json_list, ReadLayoutDataset, join_on_video_id,
                                           read_layout_split
    Missing modalities                     missing_masks, with_missing
    Image-text: tokenizers                 CLIPTokenizer, WordTokenizer (CLIP's BPE; a word vocabulary), clean_text,
                                           bytes_to_unicode, pad_token_ids
    Image-text: real datasets              MM-IMDb, UPMC Food-101, Hateful Memes in their raw layouts:
                                           image_text_split, IMAGE_TEXT_TASKS, IMAGE_TEXT_SPLITS, MMIMDB_GENRES,
                                           ImageTextFiles, clip_preprocess (CLIP_MEAN, CLIP_STD)
    Image-text: missing tables             MAP's per-sample codes 0 / 1 / 2: missing_table, missing_table_path,
                                           load_or_make_missing_table, with_missing_table, missing_image
    Making a corrupted set in READ's layout   make_corrupted_set, main (`python data.py corrupt --help`)
"""
import argparse
import csv
import functools
import gzip
import hashlib
import html
import json
import math
import mmap
import multiprocessing
import os
import pathlib
import re
import signal
import sys
import wave
import zlib

import numpy as np
import torch
import torch.nn.functional as F
import torchaudio
from tqdm import tqdm

import common


SAMPLE_RATE = 16000
FBANK_MEAN, FBANK_STD = -5.081, 4.4849  # READ's normalisation constants (KS50 and VGGSound)
FBANK_WINDOW = 400  # samples in one 25 ms kaldi fbank window at 16 kHz: a shorter clip has no frame
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)  # openai/CLIP
CACHE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), ".cache")


class DataError(ValueError):
    """A problem with the user's data; the message says what is wrong and what to do."""


# ----------------------------------------------------------------------------------------------
# The one pre-processing path
# ----------------------------------------------------------------------------------------------
def wav_to_fbank(wav, mel_bins=128, target_length=1024):
    """wav (T_samples,) 16 kHz -> normalised fbank (target_length, mel_bins), as READ / CAV-MAE."""
    wav = wav - wav.mean()
    fbank = torchaudio.compliance.kaldi.fbank(
        wav.unsqueeze(0), htk_compat=True, sample_frequency=SAMPLE_RATE, use_energy=False,
        window_type="hanning", num_mel_bins=mel_bins, dither=0.0, frame_shift=10)  # (frames, F)
    pad = target_length - fbank.shape[0]
    fbank = F.pad(fbank, (0, 0, 0, pad)) if pad > 0 else fbank[:target_length]
    return (fbank - FBANK_MEAN) / FBANK_STD


def wavs_to_fbank(wavs, mel_bins, target_length, workers=None):
    """(N, T_samples) -> (N, target_length, mel_bins). kaldi.fbank takes one waveform at a time, so many
    clips are shared among `workers` processes (parallel_fill; default one per core); the values do not
    depend on how many."""
    workers = cpu_workers() if workers is None else workers
    if workers <= 1 or len(wavs) < PARALLEL_MIN_CLIPS:
        return _fbank_rows(wavs, mel_bins, target_length, (0, len(wavs)))
    out = shared_empty((len(wavs), target_length, mel_bins), torch.float32)
    bounds = np.linspace(0, len(wavs), workers + 1).round().astype(int)
    parts = [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]
    parallel_fill(functools.partial(_fbank_rows, wavs, mel_bins, target_length), parts, [out[a:b] for a, b in parts],
                  workers)
    return out.clone()  # out of shared memory


def _fbank_rows(wavs, mel_bins, target_length, part):
    """The fbanks of clips part = (a, b): wavs[a:b]."""
    a, b = part
    return torch.stack([wav_to_fbank(w, mel_bins, target_length) for w in wavs[a:b]])


def frames_to_input(frames, size, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """uint8 or [0, 1] float frames (N, 3, h, w) -> (N, 3, size, size) float normalised with mean / std
    (ImageNet's by default; CLIP_MEAN / CLIP_STD for CLIP)."""
    x = frames.float() / 255.0 if frames.dtype == torch.uint8 else frames.float()
    if x.shape[-2:] != (size, size):
        TF = vision().transforms.functional
        x = TF.resize(x, size, interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
        x = TF.center_crop(x, [size, size]).clamp(0, 1)
    mean, std = (torch.as_tensor(v, dtype=x.dtype, device=x.device)[:, None, None] for v in (mean, std))
    return (x - mean) / std  # torchvision's normalize, the same two operations


def vision():
    """torchvision, imported on first use: the import takes one to two seconds (it loads torch._dynamo), and
    only resizing, JPEG coding and image files need it."""
    import torchvision.io
    import torchvision.transforms.functional
    return torchvision


# ----------------------------------------------------------------------------------------------
# Both cores for the one-off preparation: generating the benchmark, its fbanks, the corrupted test sets
# ----------------------------------------------------------------------------------------------
# A run's first minutes are spent making data, mostly in code that uses one core (kaldi fbank one clip
# at a time, random draws, small resizes). parallel_fill spreads independent jobs over forked worker
# processes of one thread each. A job's arithmetic is then that of one thread, which gives the same
# bytes as in this process only if the result does not depend on the thread count: checked byte for
# byte for every use here on the whole benchmark (its generation, kaldi fbank, every corruption of the
# test split but zoom blur, whose bilinear resize rounds differently with 2 threads; zoom blur therefore
# runs in this process, at its own thread count, as before). tests/test_data.py checks the machinery.
PARALLEL_MIN_CLIPS = 512  # fewer clips are prepared in this process (forking costs more than it saves)
THREAD_DEPENDENT = ("zoom_blur",)  # corruptions made in this process, see above
_IN_WORKER = False  # set in a worker: no pools inside a pool
_FILL = {}  # a worker's function and destinations, inherited through the fork


def cpu_workers():
    """Worker processes for parallel_fill: one per core this process may run on; 1 (work here) inside
    a worker, and where processes are not forked (not Linux: starting one afresh costs more than it saves)."""
    if _IN_WORKER or not sys.platform.startswith("linux"):
        return 1
    return len(os.sched_getaffinity(0))


def shared_empty(shape, dtype):
    """An uninitialised tensor in anonymous shared memory: forked workers write into it, this process
    reads it, with no copy through a pipe and no use of /dev/shm (64 MB in many containers)."""
    count = math.prod(shape)
    size = max(1, count * torch.empty((), dtype=dtype).element_size())
    return torch.frombuffer(mmap.mmap(-1, size), dtype=dtype, count=count).view(shape)


def parallel_fill(fn, jobs, dests, workers=None, in_process=(), progress=None):
    """dests[i] <- fn(jobs[i]) for every job (dests[i] a tensor, or a dict of tensors, made with
    shared_empty), in `workers` forked processes of one thread each (default cpu_workers()); the jobs
    whose indices are in `in_process` run in this process, at its thread count, while the workers do
    the rest. progress(i) is called as job i is done. -> dests. With one worker every job runs here."""
    workers = cpu_workers() if workers is None else workers
    here = sorted(set(in_process))
    elsewhere = [i for i in range(len(jobs)) if i not in here]
    if workers <= 1 or len(elsewhere) + bool(here) <= 1:  # nothing to run side by side: all here
        here, elsewhere = list(range(len(jobs))), []

    def run_here():
        for i in here:
            _copy_into(dests[i], fn(jobs[i]))
            if progress:
                progress(i)
    if not elsewhere:
        run_here()
        return dests
    context = multiprocessing.get_context("fork")
    with context.Pool(min(workers, len(elsewhere)), initializer=_init_worker, initargs=(fn, jobs, dests)) as pool:
        done = pool.imap_unordered(_fill_one, elsewhere)  # the workers start at once
        run_here()
        for i in done:
            if progress:
                progress(i)
    return dests


def _copy_into(dest, value):
    if isinstance(dest, dict):
        for k, d in dest.items():
            d.copy_(value[k])
    else:
        dest.copy_(value)


def _fill_one(i):
    """In a worker: job i of the pool's parallel_fill, written into its destination. -> i."""
    fn, jobs, dests = _FILL["task"]
    _copy_into(dests[i], fn(jobs[i]))
    return i


# ----------------------------------------------------------------------------------------------
# A dataset of tensors and its batches
# ----------------------------------------------------------------------------------------------
class AVTensors(torch.utils.data.Dataset):
    """In-memory clips: {'audio': (N, T, F), 'video': (N, 3, H, W), 'label': (N,), ...} -> per-sample dicts."""

    def __init__(self, fields):
        n = len(fields["label"])
        if n == 0:
            raise DataError("the dataset is empty; check the data path or the split you asked for.")
        assert all(len(v) == n for v in fields.values()), "all fields must have one row per clip"
        self.fields = dict(fields)
        self.fields.setdefault("index", torch.arange(n))

    def __len__(self):
        return len(self.fields["label"])

    def __getitem__(self, i):
        """Clip i, or with a list of positions the batch of those clips (what make_loader asks for)."""
        return {k: v[i] for k, v in self.fields.items()}

    def with_fields(self, **extra):
        """A copy with fields added or replaced (e.g. has_audio / has_video, corrupted audio)."""
        return AVTensors({**self.fields, **extra})


def make_loader(dataset, batch_size, shuffle, seed=0, num_workers=0):
    """A DataLoader whose shuffling depends only on `seed` (same seed, same stream).

    In-memory clips (AVTensors) are fetched a batch at a time, one indexing of each field, not clip by
    clip and stacked: the same batches in the same order (the same sampler, drawing from the same
    generator), without a Python loop over the clips of every batch."""
    g = torch.Generator().manual_seed(seed)
    if isinstance(dataset, AVTensors):
        order = torch.utils.data.RandomSampler(dataset, generator=g) if shuffle else torch.utils.data.SequentialSampler(dataset)
        batches = torch.utils.data.BatchSampler(order, batch_size, drop_last=False)
        return torch.utils.data.DataLoader(dataset, batch_size=None, sampler=batches, generator=g, num_workers=num_workers)
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=g,
                                       num_workers=num_workers, drop_last=False)


def to_device(batch, device):
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


# ----------------------------------------------------------------------------------------------
# Corruptions of Kinetics50-C / VGGSound-C (READ), batched in torch
# ----------------------------------------------------------------------------------------------
# Video: the 15 ImageNet-C corruptions (Hendrycks & Dietterich, ICLR 2019; hendrycks/robustness
# `ImageNet-C/imagenet_c/imagenet_c/corruptions.py`, copied unchanged into READ's
# `make_corruptions/make_c_video.py`), written again for batches of float frames (N, 3, H, W) in
# [0, 1]. Audio: READ's `make_corruptions/make_c_audio.py` (Gaussian noise; five recorded noises
# overlaid with a gain in dB). Randomness comes only from the `generator` argument.
#
# Dimension key: N frames or clips, C = 3 colour channels, H x W frame size, T audio samples.
#
# Written from the public facts, not copied: ImageMagick's MotionBlurImage (a one-sided line of
# 2 ceil(r) + 1 taps with weights exp(-i^2 / 2 sigma^2), offsets rounded, edge pixels repeated; one
# random angle per image as in ImageNet-C), Pillow's BOX resize, scipy's gaussian_filter and zoom,
# the diamond-square plasma fractal, pydub's apply_gain / overlay.
#
# Deviations (each marked `# DEVIATION:` below):
# - Spatial parameters (blur radii and sigmas, glass-blur max delta, motion-blur radius / sigma,
#   snow motion blur, elastic alpha / sigma / affine) are defined at 224 x 224; `corrupt_video`
#   scales them by H / 224 so a 64 x 64 frame gets a visually comparable corruption. Relative
#   parameters (noise levels, zoom factors, pixelate factor, contrast, brightness, JPEG quality,
#   blend weights, snow threshold) are not scaled. The fog map is the next power of two >= H
#   (256 at 224, as ImageNet-C). A frost photograph is cropped at 224 px and resized to H.
# - Two corruptions draw per-pixel noise whose look depends on the pixel grid, so at H != 224
#   they are tied to the 224 grid: the snow layer (flakes are `zoom` pixels wide) is drawn,
#   zoomed and thresholded at 224 x 224 and area-resized to H; the elastic displacement field
#   is rescaled to the amplitude it has on the 224 grid (without this, 64 x 64 frames would be
#   displaced by as many pixels as 224 x 224 ones, i.e. 3.5 times more).
# - Everything stays float: no uint8 rounding between steps (ImageNet-C works on uint8 PIL images
#   and READ saved every frame as JPEG quality 85; we do neither).
# - defocus_blur: the disk kernel is anti-aliased by 8 x 8 supersampling (pixel coverage), so a
#   sub-pixel radius (3 * 64 / 224 = 0.86 px) still blurs; ImageNet-C tests pixel centres only.
# - glass_blur: ImageNet-C's sequential loop of whole-pixel swaps at integer offsets randint(-d, d)
#   becomes `iterations` vectorised bilinear resamplings at random offsets U(-d, d) per axis
#   (grid_sample), which also works for the fractional deltas of a scaled-down frame (sev. 1 at
#   64 x 64: d = 0.29 px).
# - snow: the snow layer is not quantised to 8 bits nor PNG round-tripped before its motion blur,
#   and (at H != 224) is motion-blurred after the resize to H, with the scaled radius / sigma.
# - frost: the ImageNet-C ice photographs are not shipped; `frost_stand_in` synthesises five
#   procedural ice textures whose colour statistics match the photographs frost1-5 (measured:
#   channel means R .57 G .66 B .70, grey std about .11) and crops one at random per frame, as
#   ImageNet-C crops one of its photographs. With `frost_dir` the real photographs are used
#   (ImageNet-C picks one of frost1..frost5; we pick any jpg/png in the directory). A call draws the
#   five textures from its generator unless it is given `frost_bank`; `python data.py corrupt`
#   draws them once per set and frame size (`set_frost_bank`), as every ImageNet-C image is
#   cropped from the same five photographs.
# - elastic_transform: the random affine warp (OpenCV warpAffine) and the elastic displacement
#   (scipy map_coordinates) are merged into ONE bilinear grid_sample with reflect-101 borders.
# - audio traffic / crowd / rain / thunder / wind: READ's recordings are not shipped;
#   `noise_stand_in` synthesises each kind procedurally, normalised to RMS NOISE_RMS = 0.1
#   (-20 dBFS, a typical level for a recording). With `noise_dir` the real `<kind>.wav` is used.
#   A call draws the stand-in from its generator (one per call) unless it is given `noise`;
#   `python data.py corrupt` draws one 10 s stand-in per set, kind and sample rate
#   (`set_noise_recording`) and overlays it on every clip, as READ overlays its one recording.

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
    'glass_blur': [(.7, 1, 2), (.9, 2, 1), (1, 2, 3), (1.1, 3, 2), (1.5, 4, 2)],  # (sigma, max delta, iterations)
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
    # (alpha, sigma, affine); ImageNet-C's comment: "244 should have been 224, but ultimately
    # nothing is incorrect"; kept as published
    'elastic_transform': [(244 * 2, 244 * .7, 244 * .1), (244 * 2, 244 * .08, 244 * .2),
                          (244 * .05, 244 * .01, 244 * .02), (244 * .07, 244 * .01, 244 * .02),
                          (244 * .12, 244 * .01, 244 * .02)],
    'pixelate': [.6, .5, .4, .3, .25],                                 # downscale factor (box)
    'jpeg_compression': [25, 18, 15, 10, 7],                           # JPEG quality
}

# READ make_c_audio.py: sigma of added white noise (absolute, waveform in [-1, 1]); gain in dB of
# the overlaid noise recording.
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
    """The given torch.Generator (or list of per-frame generators), or a new CPU one seeded 0."""
    return generator if generator is not None else torch.Generator().manual_seed(0)


def _draw(fn, shape, g, **kw):
    """fn(shape, generator=g, **kw) on CPU (fn: torch.rand, torch.randn, partial(torch.randint, high)).
    g may be a list of N generators, one per frame (shape[0] = N): frame i's slice (1, *shape[1:]) is
    then drawn from g[i] alone, so each frame gets exactly what it gets when corrupted on its own."""
    if isinstance(g, torch.Generator):
        return fn(shape, generator=g, **kw)
    if len(g) != shape[0]:
        raise ValueError(f"{len(g)} generators for {shape[0]} frames; pass one generator per frame.")
    first = fn((1, *shape[1:]), generator=g[0], **kw)                      # (1, ...)
    if len(g) == 1:
        return first
    out = first.new_empty(shape)                                           # (N, ...)
    out[:1] = first
    for i in range(1, len(g)):
        fn((1, *shape[1:]), generator=g[i], out=out[i:i + 1], **kw)        # written in place, no copy
    return out


def _rand(shape, g, like):
    """U(0, 1) drawn on CPU from g (per frame if a list, `_draw`), moved to like's device / dtype."""
    return _draw(torch.rand, shape, g, dtype=torch.float64).to(device=like.device, dtype=like.dtype)


def _randn(shape, g, like):
    """N(0, 1) drawn on CPU from g (per frame if a list, `_draw`), moved to like's device / dtype."""
    return _draw(torch.randn, shape, g, dtype=torch.float64).to(device=like.device, dtype=like.dtype)


def _check_name(name, severity, valid, kind):
    """Raise ValueError naming the bad corruption name or severity and listing the valid ones."""
    if name not in valid:
        raise ValueError(f"Unknown {kind} corruption {name!r}; valid names are: {', '.join(valid)}.")
    if isinstance(severity, bool) or severity not in SEVERITIES:
        raise ValueError(f"Severity {severity!r} is out of range; valid severities are 1, 2, 3, 4, 5.")


# --- helpers: border folding, Gaussian filter as a matrix, box resize, clipped zoom, line blur ---
def _fold_index(i, n, mode):
    """Fold integer positions into 0..n-1: 'nearest' repeats the edge (a a | a b c), 'reflect' is
    scipy's (b a | a b c), 'mirror' is OpenCV's REFLECT_101 (c b | a b c)."""
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
    """(n, n) float64 matrix M with M @ v = 1-D Gaussian filter of v (scipy gaussian_filter1d:
    radius int(truncate * sigma + .5), weights exp(-k^2 / 2 sigma^2) normalised), border `mode`."""
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
    """Separable Gaussian filter over the last two dims (skimage.filters.gaussian defaults:
    truncate 4, border 'nearest'). x: (..., H, W) -> (..., H, W)."""
    if sigma <= 0:
        return x
    mh = _gaussian_matrix(x.shape[-2], sigma, truncate, mode).to(x)        # (H, H)
    mw = _gaussian_matrix(x.shape[-1], sigma, truncate, mode).to(x)        # (W, W)
    return mh @ x @ mw.T


def _box_resize_matrix(n_in, n_out):
    """(n_out, n_in) float64 weights of Pillow's BOX resample: output pixel i averages the input
    pixels j with -.5 < (j + .5 - (i + .5) * scale) / max(scale, 1) <= .5, scale = n_in / n_out."""
    scale = n_in / n_out
    center = (torch.arange(n_out, dtype=torch.float64)[:, None] + 0.5) * scale     # (n_out, 1)
    t = (torch.arange(n_in, dtype=torch.float64)[None] + 0.5 - center) / max(scale, 1.0)
    w = ((t > -0.5) & (t <= 0.5)).double()                                   # (n_out, n_in)
    return w / w.sum(1, keepdim=True)


def _zoom_and_trim(crop, zoom, h, w):
    """Resize crop (N, C, ch, cw) by `zoom` (bilinear, corners aligned as scipy.ndimage.zoom
    order 1, output round(ch * zoom)) and trim its centre to h x w."""
    ch, cw = crop.shape[-2:]
    zh, zw = round(ch * zoom), round(cw * zoom)
    zoomed = F.interpolate(crop, size=(zh, zw), mode='bilinear', align_corners=True)
    trim_h, trim_w = (zh - h) // 2, (zw - w) // 2
    return zoomed[..., trim_h:trim_h + h, trim_w:trim_w + w]


def clipped_zoom(x, zoom):
    """ImageNet-C clipped_zoom: crop the centre ceil(H / zoom) x ceil(W / zoom), zoom it, trim the
    centre back to H x W. x: (N, C, H, W)."""
    h, w = x.shape[-2:]
    ch, cw = math.ceil(h / zoom), math.ceil(w / zoom)
    top, left = (h - ch) // 2, (w - cw) // 2
    return _zoom_and_trim(x[..., top:top + ch, left:left + cw], zoom, h, w)


def _line_blur(x, radius, sigma, angles):
    """ImageMagick MotionBlurImage: out(p) = sum_i k_i x(p + round(i (cos a, sin a))),
    i = 0 .. 2 ceil(radius), k_i ~ exp(-i^2 / 2 sigma^2) normalised, edge pixels repeated.
    x: (N, C, H, W); angles: (N,) degrees, one per image."""
    n, c, h, w = x.shape
    width = 2 * math.ceil(radius) + 1
    i = torch.arange(width, dtype=torch.float64)                            # (width,)
    k = torch.exp(-i ** 2 / (2 * max(sigma, 1e-6) ** 2))
    k = (k / k.sum()).tolist()
    a = torch.deg2rad(angles.detach().double().cpu())[:, None]              # (N, 1)
    # ImageMagick rounds with ceil(v - .5)
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
    """Smallest power of two >= n."""
    return 1 << max(0, math.ceil(math.log2(n)))


def plasma_fractal(n, mapsize=256, wibble_decay=3.0, generator=None):
    """n diamond-square height maps (ImageNet-C plasma_fractal, batched): (n, mapsize, mapsize)
    float64, each min-max normalised to [0, 1]. mapsize must be a power of two."""
    if mapsize & (mapsize - 1):
        raise ValueError(f"mapsize {mapsize} is not a power of two; use e.g. 64, 128 or 256.")
    g = _generator(generator)
    m = torch.zeros(n, mapsize, mapsize, dtype=torch.float64)               # (n, S, S)
    step, wibble = mapsize, 100.0

    def wibbled_mean(total):
        # mean of the 4 neighbours + wibble * U(-wibble, wibble), as ImageNet-C
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


# --- the 15 video corruptions, each with its raw parameter (pixels of the given frame) ---
def gaussian_noise_video(x, sigma, generator=None):
    """clip(x + N(0, sigma^2)). x: (N, C, H, W) in [0, 1]."""
    g = _generator(generator)
    return (x + sigma * _randn(x.shape, g, x)).clamp(0, 1)


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
    """Salt and pepper on each element: with probability amount / 2 -> 0, amount / 2 -> 1."""
    g = _generator(generator)
    u = _rand(x.shape, g, x)
    return torch.where(u < amount / 2, torch.zeros_like(x), torch.where(u < amount, torch.ones_like(x), x))


def disk_kernel(radius, alias_blur):
    """ImageNet-C disk: normalised disk of `radius` px, then a Gaussian of sigma `alias_blur` over
    3 x 3 (5 x 5 if radius > 8) taps. Returns (K, K) float64."""
    ksize = 3 if radius <= 8 else 5
    half = math.ceil(radius) + ksize // 2
    ss = 8
    # DEVIATION: ImageNet-C keeps pixels whose centre is inside the disk; we use the covered
    # fraction of each pixel (8 x 8 supersampling), so sub-pixel radii at 64 x 64 still blur.
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
    """Depthwise 2-D correlation of every channel with one (K, K) kernel, border `mode`
    (OpenCV filter2D default = REFLECT_101 = 'mirror'). x: (N, C, H, W)."""
    n, c, h, w = x.shape
    half = kernel.shape[-1] // 2
    ih = _fold_index(torch.arange(-half, h + half), h, mode).to(x.device)
    iw = _fold_index(torch.arange(-half, w + half), w, mode).to(x.device)
    padded = x[:, :, ih][:, :, :, iw]                                        # (N, C, H+2h, W+2h)
    weight = kernel.to(x)[None, None].expand(c, 1, *kernel.shape)           # (C, 1, K, K)
    return F.conv2d(padded, weight, groups=c)


def defocus_blur(x, radius, alias_blur):
    """Depthwise convolution with the anti-aliased disk kernel."""
    return _filter2d(x, disk_kernel(radius, alias_blur)).clamp(0, 1)


def glass_blur(x, sigma, max_delta, iterations, generator=None):
    """Gaussian blur, `iterations` rounds of random local pixel displacement within max_delta, Gaussian blur."""
    g = _generator(generator)
    n, c, h, w = x.shape
    x = gaussian_blur(x, sigma)
    yy, xx = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing='ij')
    for _ in range(iterations):
        # DEVIATION: ImageNet-C swaps whole pixels at integer offsets randint(-d, d) in a sequential
        # loop; we resample every pixel (bilinear) at a random offset U(-d, d) per axis in one
        # grid_sample, which also works for the fractional deltas of a scaled-down frame.
        dy = (_draw(torch.rand, (n, h, w), g, dtype=torch.float64) * 2 - 1) * max_delta   # (N, H, W)
        dx = (_draw(torch.rand, (n, h, w), g, dtype=torch.float64) * 2 - 1) * max_delta
        grid = torch.stack([2 * (xx + dx) / max(w - 1, 1) - 1, 2 * (yy + dy) / max(h - 1, 1) - 1], -1)  # (N, H, W, 2)
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
    """ImageNet-C snow: a zoomed, thresholded N(mean, std) layer, motion-blurred at U(-135, -45)
    degrees, added twice (as is and turned 180 degrees) to the image blended towards bright grey.
    layer_size: draw the layer at layer_size x layer_size and area-resize it to H x W (None: at H x W)."""
    g = _generator(generator)
    n, c, h, w = x.shape
    lh, lw = (h, w) if layer_size is None else (layer_size, round(w * layer_size / h))
    # DEVIATION (with layer_size): a flake is `zoom` pixels wide, so the flake size is tied to the
    # pixel grid; we draw, zoom and threshold the layer at 224 x 224 where the table is defined and
    # area-resize it to H x W before the (scaled) motion blur; ImageNet-C blurs at 224 x 224.
    # clipped_zoom keeps only the centre ceil(lh / zoom) of the noise: draw just that part
    ch, cw = math.ceil(lh / zoom), math.ceil(lw / zoom)
    layer = mean + std * _randn((n, 1, ch, cw), g, x)                       # (N, 1, ch, cw)
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
    """n procedural ice textures (n, 3, size, size) float64: an uneven sheet (plasma fractal),
    feathery crystals (needles of 0.03 / 0.07 * scale px in 6 directions, seeded where the sheet
    is thick) and fine grain, scaled to the colour statistics of ImageNet-C's frost1-5 photographs
    (channel means R .57, G .66, B .70; grey std .11, measured)."""
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
    """The stand-in's five ice "photographs" for frames of `size` px: (5, 3, 2 size, 2 size) float64."""
    return _ice_texture(5, 2 * size, size, _generator(generator))


def frost_stand_in(n, size, generator=None, bank=None):
    """Stand-in for ImageNet-C's frost photographs, built the same way: five procedural ice
    textures of 2 size x 2 size px (`frost_bank`, drawn from the generator unless `bank` is given),
    one random texture and crop per frame. Returns (n, 3, size, size) float64 in [0, 1]."""
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
    """n random FROST_CROP x FROST_CROP crops of the jpg/png photographs in frost_dir, resized to
    size x size. (n, 3, size, size) float64 in [0, 1]."""
    g = _generator(generator)
    folder = pathlib.Path(frost_dir)
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in ('.jpg', '.jpeg', '.png')) if folder.is_dir() else []
    if not paths:
        raise FileNotFoundError(f"No .jpg or .png frost photographs in {frost_dir}; "
                                "put ImageNet-C's frost1.png .. frost6.jpg there or leave frost_dir unset.")
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
        patches = F.interpolate(patches, size=(size, size), mode='bilinear', antialias=True, align_corners=False)
    return patches.clamp(0, 1)


def frost(x, image_weight, frost_weight, generator=None, frost_dir=None, bank=None):
    """clip(image_weight * x + frost_weight * ice), ice from frost_dir or frost_stand_in (cropped
    from `bank` if given, see frost_bank)."""
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
    """Add delta to the HSV value V = max(r, g, b), hue and saturation fixed: rgb * min(V + delta, 1) / V;
    a black pixel (V = 0) becomes grey min(delta, 1)."""
    v = x.amax(1, keepdim=True)                                             # (N, 1, H, W)
    v_new = (v + delta).clamp(0, 1)
    return torch.where(v > 0, x * (v_new / v.clamp_min(1e-12)), v_new.expand_as(x)).clamp(0, 1)


def contrast(x, factor):
    """(x - mean) * factor + mean, mean per image and channel."""
    means = x.mean((2, 3), keepdim=True)                                    # (N, C, 1, 1)
    return ((x - means) * factor + means).clamp(0, 1)


def _smoothing_gain(n, sigma, truncate, mode):
    """Mean over positions of sum_j M_ij^2 for the (n, n) Gaussian filter matrix M: the variance
    a 1-D Gaussian filter keeps of unit-variance white noise."""
    return _gaussian_matrix(n, sigma, truncate, mode).pow(2).sum(1).mean().item()


def elastic_transform(x, alpha, sigma, affine, generator=None, field_size=None):
    """Random affine warp (three points moved by U(-affine, affine)) followed by an elastic
    displacement alpha * Gaussian_sigma(U(-1, 1)), sampled bilinearly in one grid_sample.
    field_size: give the displacement field the amplitude it has when drawn on a
    field_size x field_size grid (None: this frame's grid)."""
    g = _generator(generator)
    n, c, h, w = x.shape
    # affine: points (x, y) around the centre, moved at random; A maps pts1 -> pts2 (OpenCV getAffineTransform)
    cy, cx, sq = float(h // 2), float(w // 2), min(h, w) // 3
    pts1 = torch.tensor([[cx + sq, cy + sq], [cx + sq, cy - sq], [cx - sq, cy - sq]], dtype=torch.float64)  # (3, 2)
    pts2 = pts1 + (_draw(torch.rand, (n, 3, 2), g, dtype=torch.float64) * 2 - 1) * affine               # (N, 3, 2)
    p1 = torch.cat([pts1, torch.ones(3, 1, dtype=torch.float64)], 1)                                    # (3, 3)
    a = torch.linalg.solve(p1, pts2).transpose(1, 2)                                                   # (N, 2, 3)
    a = torch.cat([a, torch.tensor([0., 0., 1.], dtype=torch.float64).expand(n, 1, 3)], 1)             # (N, 3, 3)
    a_inv = torch.linalg.inv(a)                                                                        # warpAffine: dst(p) = src(A^-1 p)
    # elastic: smooth random displacement field, scipy gaussian_filter(mode='reflect', truncate=3)
    dx = gaussian_blur(_draw(torch.rand, (n, h, w), g, dtype=torch.float64) * 2 - 1, sigma, 3.0, 'reflect') * alpha
    dy = gaussian_blur(_draw(torch.rand, (n, h, w), g, dtype=torch.float64) * 2 - 1, sigma, 3.0, 'reflect') * alpha
    if field_size is not None and sigma > 0:
        # DEVIATION: smoothed per-pixel noise has an amplitude that depends on the pixel grid
        # (about 1 / sigma_px), so scaling alpha and sigma alone would leave the displacement the same
        # number of pixels at 64 as at 224. We rescale the field to the standard deviation it has on
        # the 224 x 224 grid where the table is defined (sigma in that grid's pixels).
        k = field_size / h
        fw = round(w * k)
        gain = (_smoothing_gain(field_size, sigma * k, 3.0, 'reflect') * _smoothing_gain(fw, sigma * k, 3.0, 'reflect')
                / (_smoothing_gain(h, sigma, 3.0, 'reflect') * _smoothing_gain(w, sigma, 3.0, 'reflect'))) ** 0.5
        dx, dy = dx * gain, dy * gain
    # DEVIATION: out(p) = src(A^-1 (p + d(p))) in one bilinear resampling (ImageNet-C resamples twice).
    yy, xx = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing='ij')
    px, py = xx + dx, yy + dy                                                # (N, H, W)
    sx = a_inv[:, 0, 0, None, None] * px + a_inv[:, 0, 1, None, None] * py + a_inv[:, 0, 2, None, None]
    sy = a_inv[:, 1, 0, None, None] * px + a_inv[:, 1, 1, None, None] * py + a_inv[:, 1, 2, None, None]
    grid = torch.stack([2 * sx / max(w - 1, 1) - 1, 2 * sy / max(h - 1, 1) - 1], -1)                    # (N, H, W, 2)
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
    encoded = vision().io.encode_jpeg(list(u8), quality=int(quality))
    decoded = vision().io.decode_jpeg(encoded)                           # codec works per image
    return (torch.stack(decoded).to(device=x.device, dtype=x.dtype) / 255).clamp(0, 1)


def corrupt_video(frames, name, severity, generator=None, frost_dir=None, frost_bank=None):
    """Apply video corruption `name` at `severity` (1..5) to frames (N, 3, H, W) in [0, 1].

    generator: one torch.Generator for the batch, or a list of N, one per frame: frame i then gets
    exactly what corrupt_video(frames[i:i + 1], ..., generator[i]) gives it (`_draw`), whatever else
    is in the batch. frost_bank: frost's five ice textures (frost_bank(max(H, W))) instead of
    drawing them from the generator."""
    _check_name(name, severity, VIDEO_CORRUPTIONS, 'video')
    if frames.dim() != 4 or frames.shape[1] != 3:
        raise ValueError(f"frames must be a tensor (N, 3, H, W) in [0, 1], got shape {tuple(frames.shape)}.")
    g = _generator(generator)
    p = VIDEO_SEVERITY[name][int(severity) - 1]
    # DEVIATION: spatial parameters are defined at 224 x 224; scale them to this frame size.
    # DEVIATION: float in, float out: no uint8 rounding between steps and no JPEG-85 save.
    s = frames.shape[-2] / REFERENCE_SIZE
    if name == 'gaussian_noise':
        return gaussian_noise_video(frames, p, g)
    if name == 'shot_noise':
        return shot_noise(frames, p, g)
    if name == 'impulse_noise':
        return impulse_noise(frames, p, g)
    if name == 'defocus_blur':
        return defocus_blur(frames, p[0] * s, p[1])  # alias blur is a pixel-grid anti-aliasing width: unscaled
    if name == 'glass_blur':
        return glass_blur(frames, p[0] * s, p[1] * s, p[2], g)
    if name == 'motion_blur':
        return motion_blur(frames, p[0] * s, p[1] * s, g)
    if name == 'zoom_blur':
        return zoom_blur(frames, p)
    if name == 'snow':
        return snow(frames, p[0], p[1], p[2], p[3], p[4] * s, p[5] * s, p[6], g, REFERENCE_SIZE)
    if name == 'frost':
        return frost(frames, p[0], p[1], g, frost_dir, frost_bank)
    if name == 'fog':
        return fog(frames, p[0], p[1], g)
    if name == 'brightness':
        return brightness(frames, p)
    if name == 'contrast':
        return contrast(frames, p)
    if name == 'elastic_transform':
        return elastic_transform(frames, p[0] * s, p[1] * s, p[2] * s, g, REFERENCE_SIZE)
    if name == 'pixelate':
        return pixelate(frames, p)
    return jpeg_compression(frames, p)


def read_image(path):
    """A JPEG / PNG file -> uint8 (3, H, W) RGB; an unreadable file is a DataError naming it."""
    try:
        io = vision().io
        image = io.decode_image(io.read_file(str(path)), mode=io.ImageReadMode.RGB)
    except (RuntimeError, OSError) as err:
        why = "it is truncated" if "truncated" in str(err) else "it is damaged or not an image"
        raise DataError(f"{path} is not a readable JPEG/PNG image ({why}); replace or remove it.") from None
    if image.shape[-1] == 0 or image.shape[-2] == 0:
        raise DataError(f"{path} is an empty image (0 pixels); replace or remove it.")
    return image


# --- audio ---
def read_wav(path):
    """Read a PCM WAV (8/16/24/32-bit) with the standard-library wave module: ((T,) float32 mono
    in [-1, 1], sample_rate). Stereo is averaged to mono."""
    channels, width, rate, _ = wav_info(path)
    with wave.open(str(path), 'rb') as f:
        raw = f.readframes(f.getnframes())
    raw = raw[:len(raw) - len(raw) % (channels * width)]  # a trailing partial frame (odd data size) is dropped
    if not raw:
        raise DataError(f"{path} has a WAV header but no complete sample; replace or remove it.")
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
    """(channels, bytes per sample, sample rate, frames) of a PCM WAV, read from its header only; a file
    this project cannot use (not a WAV, compressed, 0 channels, no samples, 0 Hz) is a DataError naming it."""
    try:
        with wave.open(str(path), 'rb') as f:
            info = f.getnchannels(), f.getsampwidth(), f.getframerate(), f.getnframes()
    except (wave.Error, EOFError) as err:
        what = f"({err})" if str(err) else "(its header is cut short)"
        raise DataError(f"{path} is not a PCM WAV file the wave module can read {what}; convert it to 16-bit PCM.") from None
    except OSError as err:
        raise DataError(f"{path} cannot be read as a WAV file ({err.strerror or err}).") from None
    channels, width, rate, frames = info
    if width not in (1, 2, 3, 4):
        raise DataError(f"{path} has {8 * width}-bit samples; only 8, 16, 24 and 32-bit PCM WAV files are supported.")
    if rate <= 0:
        raise DataError(f"{path} declares a sample rate of {rate} Hz; fix its header or convert it again.")
    if frames == 0:
        raise DataError(f"{path} is an empty WAV file (0 samples); replace or remove it.")
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
    return wavs + sigma * _randn(wavs.shape, g, wavs)


def fit_noise_length(noise, num_samples):
    """READ: cut the recording to the clip length, or repeat it whole and cut. (L,) -> (num_samples,)."""
    if noise.shape[-1] >= num_samples:
        return noise[..., :num_samples]
    repeats = num_samples // noise.shape[-1] + 1
    return noise.repeat(repeats)[:num_samples]


def audio_noise_overlay(wavs, noise, gain_db):
    """READ (pydub): noise cut / tiled to T, times 10 ** (gain_db / 20) (apply_gain), added to every
    clip (overlay); pydub's 16-bit arithmetic saturates, so both steps clip to [-1, 1].
    wavs: (N, T); noise: (L,) -> (N, T)."""
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
    """x / RMS(x) along the last dim."""
    return x / x.pow(2).mean(-1, keepdim=True).sqrt().clamp_min(1e-12)


def noise_stand_in(kind, num_samples, generator=None, sample_rate=16000):
    """Synthetic stand-in for READ's noise recording `kind` (traffic, crowd, rain, thunder, wind):
    (num_samples,) float32 with RMS NOISE_RMS, clipped to [-1, 1]."""
    if kind not in AUDIO_CORRUPTIONS[1:]:
        raise ValueError(f"Unknown noise kind {kind!r}; valid kinds are: {', '.join(AUDIO_CORRUPTIONS[1:])}.")
    g = _generator(generator)
    t_n, sr = num_samples, sample_rate
    t = torch.arange(t_n, dtype=torch.float64) / sr                         # (T,) seconds
    white = torch.randn(t_n, generator=g, dtype=torch.float64)
    if kind == 'traffic':
        # low-passed reddish road rumble / tyre noise + engine harmonics on a drifting 45-70 Hz
        # fundamental, under slow passing-car swells
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
        formants = lo + span * _slow_curve((v, 3), t_n, 4.0, sr, g)                              # (V, 3, T) Hz
        phase = 2 * math.pi * torch.cumsum(formants, -1) / sr
        tones = (torch.sin(phase) * torch.tensor([1., .5, .25], dtype=torch.float64).view(1, 3, 1)).sum(1)  # (V, T)
        buzz = 0.5 + 0.5 * torch.cos(2 * math.pi * pitch * t[None])                              # (V, T)
        rate = 3 + 3 * torch.rand(v, 1, generator=g, dtype=torch.float64)                        # syllables / s
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
        crackle = F.conv1d(drops.view(1, 1, -1), ring.flip(0).view(1, 1, -1), padding=len(ring) - 1)[0, 0, :t_n]
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
    """The noise `kind`: `<noise_dir>/<kind>.wav` (resampled to sample_rate) if noise_dir is given,
    else the synthetic stand-in of num_samples. Returns (L,) float32."""
    if noise_dir is None:
        return noise_stand_in(kind, num_samples, generator, sample_rate)
    path = os.path.join(noise_dir, kind + '.wav')
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No {kind} noise recording at {path}; put READ's {kind}.wav there "
                                "or leave noise_dir unset to use the synthetic stand-in.")
    key = (os.path.abspath(path), os.path.getmtime(path), sample_rate)
    if key not in _NOISE:  # read and resampled once per run, not once per clip
        noise, rate = read_wav(path)  # stereo is averaged to mono
        if rate != sample_rate:  # to the clip's rate, so the overlay keeps the clip's length and pitch
            noise = torchaudio.functional.resample(noise, rate, sample_rate)
        if noise.numel() == 0:
            raise DataError(f"{path} is shorter than one sample at {sample_rate} Hz; use a longer recording.")
        _NOISE.clear()
        _NOISE[key] = noise
    return _NOISE[key]


_NOISE = {}  # the last noise recording read, resampled


def corrupt_audio(wavs, name, severity, generator=None, noise_dir=None, sample_rate=16000, noise=None):
    """Apply audio corruption `name` at `severity` (1..5) to waveforms (N, T) at sample_rate.
    noise: the recording (L,) to overlay, instead of noise_recording(name, T, generator, noise_dir)."""
    _check_name(name, severity, AUDIO_CORRUPTIONS, 'audio')
    if wavs.dim() != 2:
        raise ValueError(f"wavs must be a tensor (N, T) of waveforms, got shape {tuple(wavs.shape)}.")
    g = _generator(generator)
    p = AUDIO_SEVERITY[name][int(severity) - 1]
    if name == 'gaussian_noise':
        return gaussian_noise_audio(wavs, p, g)
    # one recording for the whole set, always from its start (READ cuts rain_sound[:len(audio)]);
    # DEVIATION: without noise_dir, a synthetic stand-in of READ's recording (noise_stand_in)
    if noise is None:
        noise = noise_recording(name, wavs.shape[-1], g, noise_dir, sample_rate)
    return audio_noise_overlay(wavs, noise, p)


# ----------------------------------------------------------------------------------------------
# The embedded benchmark
# ----------------------------------------------------------------------------------------------
# Each clip is one audio-visual EVENT: k objects of the class's kind are seen in the frame and are
# heard striking, once each, in the audio. Three per-clip latent factors besides the class shape
# BOTH modalities, as a source's physical properties do in a real recording:
#   size s in [0, 1]       bigger objects in the frame  <->  lower pitch and louder strikes
#   count k in 1..4        k objects in the frame       <->  k onsets in the audio
#   material b in [0, 1]   lighter-coloured objects     <->  brighter timbre (flatter partial tilt,
#                                                            higher impact transient)
# The class is carried by several cues in each modality, each ambiguous on its own (cues shared by
# different pairs of classes, plus jitter), as in a real scene where the object, its colour and
# the context all say something:
#   video  object hue (10 hues, jittered) and object shape (5 shapes, classes c and c + 5 share
#          one), both visible at coarse scales, and a fine background grain (period 3-4.5 px) along
#          one of 5 orientations (classes 2j and 2j + 1 share one), a detail that blur, noise and
#          pixelation remove;
#   audio  the partial frequency ratios of the struck resonator (5 kinds: harmonic, odd,
#          bar, membrane, stretched; shared by pairs of classes), its decay time (3 lengths),
#          and a pitch register that overlaps with its neighbours once the size is applied.
# Frames are 1/f scenes (natural-image amplitude spectrum) with soft-edged shaded objects; sounds
# are impacts (2 ms attack, exponential decays, higher partials dying faster, a noise transient)
# over a pink-noise ambience.
EMBEDDED = dict(
    num_classes=10, n_train=3000, n_val=300, n_test=2496,  # 2,496 = 39 batches of 64, as Kinetics50-C
    clip_samples=20800,  # 1.3 s at 16 kHz -> exactly 128 fbank frames
    frame_size=64,
    max_count=4,  # objects / onsets per clip: 1..4
    # video cues
    hue_jitter=0.06,  # std of the object hue around its class hue (class hues are 0.1 apart)
    grain_period=(3.0, 4.5),  # px: the period of the fine background grain (a detail blur, noise and pixelation remove)
    grain_contrast=0.2,  # its relative contrast
    orient_jitter=10.0,  # std (degrees) of the background orientation (class orientations are 36 apart)
    size_px=(4.5, 10.0),  # object radius in pixels at s = 0 and s = 1 (64 x 64 frame)
    # audio cues
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
    """A short name of the benchmark version and its settings: caches and checkpoints carry it, so
    nothing made from another benchmark version is ever reused."""
    text = json.dumps([EMBEDDED_VERSION, cfg, CLASS_HUE, CLASS_SHAPE, CLASS_ORIENT, CLASS_PARTIALS,
                       CLASS_DECAY, CLASS_REGISTER, SHAPES, PARTIALS], sort_keys=True)
    return f"v{EMBEDDED_VERSION}-{hashlib.sha1(text.encode()).hexdigest()[:8]}"


def _hsv_to_rgb(h, s, v):
    """h, s, v tensors in [0, 1] of equal shape -> rgb (..., 3) in [0, 1]."""
    k = torch.stack([(5 + h * 6) % 6, (3 + h * 6) % 6, (1 + h * 6) % 6], dim=-1)
    return v.unsqueeze(-1) - (v * s).unsqueeze(-1) * (torch.minimum(k, 4 - k).clamp(0, 1))


def draw_latents(labels, g, cfg=EMBEDDED):
    """The per-clip event factors shared by sound and picture: size (N,), count (N,) long, material (N,)."""
    n = len(labels)
    return {"size": torch.rand(n, generator=g), "count": torch.randint(1, cfg["max_count"] + 1, (n,), generator=g),
            "material": torch.rand(n, generator=g)}


def _one_over_f(n, size, g, exponent):
    """n zero-mean, unit-std noise fields (n, size, size) with amplitude spectrum ~ 1 / f^exponent."""
    fy = torch.fft.fftfreq(size)[:, None]
    fx = torch.fft.rfftfreq(size)[None, :]
    amp = (fx ** 2 + fy ** 2).sqrt().clamp_min(1.0 / size) ** -exponent       # (S, S/2 + 1), f in cycles/px
    amp[0, 0] = 0.0                                                           # zero mean
    field = torch.fft.irfft2(torch.fft.rfft2(torch.randn(n, size, size, generator=g)) * amp, s=(size, size))
    return (field - field.mean((1, 2), keepdim=True)) / field.std((1, 2), keepdim=True)


def _oriented_band(n, size, g, orientation, period, kappa=4.0, bandwidth=0.35):
    """n unit-std noise fields (n, size, size) of fine oriented grain: energy in a band around spatial
    frequency 1 / period (n,) px (log-Gaussian, `bandwidth` octaves std), with wavefronts along
    `orientation` (n,) radians (von Mises weight exp(kappa (cos 2(phi - orientation - pi/2) - 1)))."""
    fy = torch.fft.fftfreq(size)[:, None]
    fx = torch.fft.rfftfreq(size)[None, :]
    f = (fx ** 2 + fy ** 2).sqrt().clamp_min(1.0 / size)[None]               # (1, S, S/2 + 1)
    phi = torch.atan2(fy, fx)[None]
    radial = torch.exp(-0.5 * (torch.log2(f * period[:, None, None]) / bandwidth) ** 2)
    angular = torch.exp(kappa * (torch.cos(2 * (phi - orientation[:, None, None] - math.pi / 2)) - 1))
    field = torch.fft.irfft2(torch.fft.rfft2(torch.randn(n, size, size, generator=g)) * radial * angular, s=(size, size))
    return (field - field.mean((1, 2), keepdim=True)) / field.std((1, 2), keepdim=True)


def synth_frames(labels, latents, g, cfg=EMBEDDED):
    """One frame per clip: a 1/f scene with a fine grain along the class orientation, and `count`
    soft-edged, shaded objects of the class shape and hue, radius set by `size`, lightness by
    `material`. labels (N,) -> uint8 (N, 3, S, S)."""
    n, S, K = len(labels), cfg["frame_size"], cfg["max_count"]
    # background: two random low-saturation colours mixed by a 1/f field (the scene), 1/f shading, and a
    # fine grain (like grass, fabric or water) running along the class's orientation
    orient = torch.tensor(CLASS_ORIENT)[labels].float() * math.pi / 5 \
        + math.radians(cfg["orient_jitter"]) * torch.randn(n, generator=g)  # (N,)
    scene = _one_over_f(n, S, g, 1.0)                                         # (N, S, S)
    light = _one_over_f(n, S, g, 1.2)
    lo_p, hi_p = cfg["grain_period"]
    period = lo_p + (hi_p - lo_p) * torch.rand(n, generator=g)
    grain = _oriented_band(n, S, g, orient, period)
    c1 = _hsv_to_rgb(torch.rand(n, generator=g), 0.1 + 0.25 * torch.rand(n, generator=g), 0.25 + 0.3 * torch.rand(n, generator=g))
    c2 = _hsv_to_rgb(torch.rand(n, generator=g), 0.1 + 0.25 * torch.rand(n, generator=g), 0.55 + 0.3 * torch.rand(n, generator=g))
    mix = torch.sigmoid(2.5 * scene)[:, None]                                 # (N, 1, S, S)
    img = c1[:, :, None, None] * (1 - mix) + c2[:, :, None, None] * mix
    img = img * (1 + 0.2 * light[:, None] + cfg["grain_contrast"] * grain[:, None])  # (N, 3, S, S)
    # objects: all of the class shape; radius from size, colour from the class hue and material
    m = torch.tensor([SHAPES[s][0] for s in CLASS_SHAPE], dtype=torch.float)[labels][:, None]   # (N, 1)
    a = torch.tensor([SHAPES[s][1] for s in CLASS_SHAPE])[labels][:, None]
    lo, hi = cfg["size_px"]
    radius = (lo + (hi - lo) * latents["size"])[:, None] * (0.9 + 0.2 * torch.rand(n, K, generator=g))  # (N, K)
    cy, cx = (S * (0.12 + 0.76 * torch.rand(2, n, K, generator=g)))           # (N, K) each
    turn = 2 * math.pi * torch.rand(n, K, generator=g)
    hue = (torch.tensor(CLASS_HUE)[labels].float() / 10 + cfg["hue_jitter"] * torch.randn(n, generator=g)) % 1.0
    sat = 0.6 + 0.35 * torch.rand(n, generator=g)
    val = 0.4 + 0.55 * latents["material"]
    colour = _hsv_to_rgb(hue, sat, val)                                        # (N, 3)
    yy, xx = torch.meshgrid(torch.arange(S).float() + 0.5, torch.arange(S).float() + 0.5, indexing="ij")
    for j in range(K):  # painter's order; slot j is drawn only when count > j
        dy, dx = yy - cy[:, j, None, None], xx - cx[:, j, None, None]         # (N, S, S)
        rho, theta = (dx ** 2 + dy ** 2).sqrt(), torch.atan2(dy, dx)
        edge = radius[:, j, None, None] * (1 + a[:, :, None] * torch.cos(m[:, :, None] * (theta - turn[:, j, None, None])))
        alpha = torch.sigmoid((edge - rho) / 0.5) * (latents["count"] > j).float()[:, None, None]  # soft edge, (N, S, S)
        shade = 1.0 - 0.25 * (dy + dx) / (2 * radius[:, j, None, None])       # lit from the top left
        obj = colour[:, :, None, None] * shade.clamp(0.6, 1.3)[:, None]
        img = img * (1 - alpha[:, None]) + obj * alpha[:, None]
    return (img.clamp(0, 1) * 255).round().to(torch.uint8)


def synth_audio(labels, latents, g, cfg=EMBEDDED):
    """One sound per clip: `count` strikes of the class's resonator (its partial ratios, decay and
    pitch register; pitch lowered and level raised by `size`, timbre brightened by `material`), each
    with a short noise transient, over pink-noise ambience. labels (N,) -> (N, clip_samples) in [-1, 1]."""
    n, T, K = len(labels), cfg["clip_samples"], cfg["max_count"]
    t = torch.arange(T) / SAMPLE_RATE                                          # (T,) s
    size, material, count = latents["size"][:, None], latents["material"][:, None], latents["count"]
    register = torch.tensor(CLASS_REGISTER)[labels].float()[:, None]
    f0 = 200.0 * 2.0 ** (cfg["register_oct"] * register + cfg["size_oct"] * (0.5 - size))       # (N, 1) Hz
    ratios = torch.tensor(PARTIALS)[torch.tensor(CLASS_PARTIALS)[labels]]      # (N, P)
    ratios = ratios * (1 + cfg["inharmonic_jitter"] * torch.randn(ratios.shape, generator=g)).clamp_min(0.5)
    ratios[:, 0] = 1.0
    tilt = 1.8 - 1.3 * material                                                # partial n has amplitude n^-tilt
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
    # one strike's sound (the impulse response of the struck object), (N, T): 2 ms attack; partial p
    # rings at f0 x ratio_p and dies with tau_p = decay / sqrt(ratio_p) (higher partials die faster)
    attack = 1 - torch.exp(-t[None] / 0.002)
    phase = 2 * math.pi * torch.rand(n, ratios.shape[1], generator=g)
    ring = torch.zeros(n, T)
    for p in range(ratios.shape[1]):
        tau = decay / ratios[:, p, None].sqrt()
        ring = ring + amps[:, p, None] * torch.sin(2 * math.pi * f0 * ratios[:, p, None] * t[None] + phase[:, p, None]) \
            * torch.exp(-t[None] / tau)
    strike = attack * (ring / amps.sum(1, keepdim=True).clamp_min(1e-6) + 0.5 * burst * torch.exp(-t[None] / 0.008))
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


def generate_embedded(seed=0, cfg=EMBEDDED, chunk=500, quiet=None, workers=None):
    """Generate the three splits: {split: {'wav': (N, T) int16, 'frames': uint8 (N, 3, S, S), 'label',
    'size', 'count', 'material'}}. Each split draws from its own generator (seed * 1000 + its index),
    so the splits are made side by side in `workers` processes (parallel_fill) with the same bytes as
    one after the other; within a split, chunks of `chunk` clips bound the memory."""
    splits = ("train", "val", "test")
    sizes = [cfg[f"n_{s}"] for s in splits]
    dests = [{"wav": shared_empty((n, cfg["clip_samples"]), torch.int16),
              "frames": shared_empty((n, 3, cfg["frame_size"], cfg["frame_size"]), torch.uint8),
              "label": shared_empty((n,), torch.int64), "size": shared_empty((n,), torch.float32),
              "count": shared_empty((n,), torch.int64), "material": shared_empty((n,), torch.float32)} for n in sizes]
    bar = tqdm(total=sum(sizes), desc="generating the embedded benchmark", unit="clip", dynamic_ncols=True,
               disable=sum(sizes) < 1000 if quiet is None else quiet)
    make = functools.partial(_generate_split, seed=seed, cfg=cfg, chunk=chunk)
    parallel_fill(make, list(enumerate(splits)), dests, workers, progress=lambda i: bar.update(sizes[i]))
    bar.close()
    return {split: {k: v.clone() for k, v in d.items()} for split, d in zip(splits, dests)}  # out of shared memory


def _generate_split(job, seed, cfg, chunk):
    """One split of the embedded benchmark: job = (its index i, its name); generator seed * 1000 + i."""
    i, split = job
    g = torch.Generator().manual_seed(seed * 1000 + i)
    n = cfg[f"n_{split}"]
    labels = (torch.arange(n) % cfg["num_classes"])[torch.randperm(n, generator=g)]
    latents = draw_latents(labels, g, cfg)
    wavs, frames = [], []
    for s in range(0, n, chunk):
        part = {k: v[s:s + chunk] for k, v in latents.items()}
        wavs.append(synth_audio(labels[s:s + chunk], part, g, cfg))
        frames.append(synth_frames(labels[s:s + chunk], part, g, cfg))
    return {"wav": (torch.cat(wavs) * 32767).round().to(torch.int16), "frames": torch.cat(frames), "label": labels,
            **latents}


def embedded_raw(seed=0, cache_dir=CACHE_DIR):
    """The raw embedded benchmark, generated once per seed and cached on disk."""
    path = os.path.join(cache_dir, f"embedded_{embedded_id()}_seed{seed}.pt")
    if path not in _RAW:  # a truncated or foreign cache file is regenerated; the temp name is per process
        _RAW[path] = common.load_or_rebuild(path, lambda: generate_embedded(seed), valid=_is_raw_benchmark)
    return _RAW[path]


_RAW = {}  # the raw benchmark, loaded once per process


def _is_raw_benchmark(obj):
    """Does a cache file hold what generate_embedded returns (three splits of wav, frames, label tensors)?"""
    return isinstance(obj, dict) and all(
        isinstance(obj.get(s), dict) and all(torch.is_tensor(obj[s].get(k)) for k in ("wav", "frames", "label"))
        for s in ("train", "val", "test"))


def embedded_split(split, model, seed=0, video_corruption=None, audio_corruption=None, severity=5,
                   corruption_seed=0, frost_dir=None, noise_dir=None, cache_dir=CACHE_DIR):
    """One split of the embedded benchmark as AVTensors, pre-processed for `model`'s input sizes.

    A corruption (names in VIDEO_CORRUPTIONS / AUDIO_CORRUPTIONS) is applied to the raw frames or
    waveforms first; the corrupted test set is the same for every run (fixed `corruption_seed`).
    embedded_test_sets makes many corrupted sets at once.
    """
    job = (seed, split, _input_sizes(model), video_corruption, audio_corruption, severity, corruption_seed,
           frost_dir, noise_dir, cache_dir)
    return _with_clean_inputs(job, _corrupted_inputs(job))


def embedded_test_sets(model, pairs, seed=0, severity=5, corruption_seed=0, frost_dir=None, noise_dir=None,
                       cache_dir=CACHE_DIR, workers=None, quiet=False):
    """The corrupted test sets of several corruptions at once: pairs [(video corruption or None, audio
    corruption or None)] -> [AVTensors], each equal to embedded_split('test', ...) of its pair, made side
    by side in `workers` processes (parallel_fill; zoom blur here, see THREAD_DEPENDENT) with a progress bar."""
    sizes = _input_sizes(model)
    jobs = [(seed, "test", sizes, vc, ac, severity, corruption_seed, frost_dir, noise_dir, cache_dir) for vc, ac in pairs]
    raw = embedded_raw(seed, cache_dir)["test"]  # loaded here, so the workers inherit it
    n, mel_bins, audio_length, image_size = len(raw["label"]), *sizes
    for vc, ac in pairs:  # a bad name is refused before any work starts
        if vc:
            _check_name(vc, severity, VIDEO_CORRUPTIONS, "video")
        if ac:
            _check_name(ac, severity, AUDIO_CORRUPTIONS, "audio")
    for modality in {m for vc, ac in pairs for m, c in (("audio", ac), ("video", vc)) if not c}:
        _clean_input(jobs[0], modality)  # the clean inputs in use first, in this process (a worker's copy is lost)
    dests = [{**({"audio": shared_empty((n, audio_length, mel_bins), torch.float32)} if ac else {}),
              **({"video": shared_empty((n, 3, image_size, image_size), torch.float32)} if vc else {})}
             for vc, ac in pairs]
    bar = tqdm(total=len(jobs), desc="corrupting the test sets", unit="set", dynamic_ncols=True, disable=quiet,
               leave=False)
    here = [i for i, (vc, _) in enumerate(pairs) if vc in THREAD_DEPENDENT]
    parallel_fill(_corrupted_inputs, jobs, dests, workers, in_process=here, progress=lambda i: bar.update(1))
    bar.close()
    return [_with_clean_inputs(job, {k: v.clone() for k, v in d.items()}) for job, d in zip(jobs, dests)]  # out of shared memory


def _input_sizes(model):
    return model.mel_bins, model.audio_length, model.image_size


def _corrupted_inputs(job):
    """The pre-processed inputs of one split under one (video, audio) corruption pair: {'audio', 'video'},
    only the corrupted modalities. The audio corruption draws first, then the video one, from one
    generator seeded with corruption_seed."""
    seed, split, (mel_bins, audio_length, image_size), vc, ac, severity, corruption_seed, frost_dir, noise_dir, cache_dir = job
    raw = embedded_raw(seed, cache_dir)[split]
    g = torch.Generator().manual_seed(corruption_seed)
    inputs = {}
    if ac:
        wav = raw["wav"].float() / 32767  # (N, T_samples)
        wav = corrupt_audio(wav, ac, severity, generator=g, noise_dir=noise_dir).clamp(-1, 1)
        inputs["audio"] = wavs_to_fbank(wav, mel_bins, audio_length)
    if vc:
        frames = raw["frames"].float() / 255  # (N, 3, S, S)
        inputs["video"] = frames_to_input(corrupt_video(frames, vc, severity, generator=g, frost_dir=frost_dir), image_size)
    return inputs


def _clean_input(job, modality):
    """The clean pre-processed 'audio' or 'video' of the job's split, the same for every corruption of the
    other modality: computed once per process (_CLEAN)."""
    seed, split, (mel_bins, audio_length, image_size), *_, cache_dir = job
    key = (modality, seed, split, mel_bins, audio_length, image_size)
    if key not in _CLEAN:
        raw = embedded_raw(seed, cache_dir)[split]
        _CLEAN[key] = (wavs_to_fbank(raw["wav"].float() / 32767, mel_bins, audio_length) if modality == "audio"
                       else frames_to_input(raw["frames"].float() / 255, image_size))
    return _CLEAN[key]


def _with_clean_inputs(job, inputs):
    """AVTensors of the job's split: `inputs` ({'audio', 'video'}, the corrupted ones), the clean input for a
    modality it lacks."""
    seed, split, *_, cache_dir = job
    fields = {m: inputs[m] if m in inputs else _clean_input(job, m) for m in ("audio", "video")}
    return AVTensors({**fields, "label": embedded_raw(seed, cache_dir)[split]["label"]})


_CLEAN = {}  # clean pre-processed inputs of the embedded benchmark, per (modality, seed, split, sizes)


# ----------------------------------------------------------------------------------------------
# The embedded image-text benchmark: food (Food-101-like), imdb (MM-IMDb-like), memes (Hateful-Memes-like)
# ----------------------------------------------------------------------------------------------
# One small visual world shared by the three tasks, as one CLIP is shared by the three datasets.
# A picture is a 1/f scene (natural-image amplitude spectrum, as the audio-visual frames) with `count`
# soft-edged, shaded objects. Every picture has four PER-SAMPLE attributes that its text names too, so
# that text and image correspond per sample and not only per class (what CLIP's objective learns):
#   count 1..4 ("two"), colour of 8 named hues ("red"), size of 3 ("small"), region of 4 ("on the left").
# Class evidence sits at several scales: the objects' outline (5 shapes, coarse), a fine inner pattern
# (solid, stripes at 0 or 60 degrees, dots; period 4 px, finer than a patch of 8) and the scene's
# tint (context). A motif = (shape, pattern): 20 of them.
#   food   20 dishes in 4 groups of 5; dish c is drawn with motif c and the tint of its group. Its title
#          names the dish by one of 2 synonyms with probability 0.8, otherwise only the group
#          ("dessert"), so the text is strong but not perfect and the picture settles the rest.
#   imdb   12 genres of unequal frequency (0.5 .. 0.04, at least one per film); each figure of the
#          poster shows the motif of one of the film's genres (motif 1 + g) with probability 0.6, else
#          a plain figure (motif 0, no genre); dark genres darken the poster. The plot names each genre
#          by one of 3 cue words with probability 0.9 and, with probability 0.04, a cue word of a
#          genre the film does not have; plots are long (10-30 words among noise words).
#   memes  the label comes from the pairing: a text's hostility h_t in {-2 .. 2} (its 1-3 tone words) and
#          the pictured subject (6 subjects, each a motif in its own colour; the 3 in warm colours are
#          "targets", h_i = +1, the others h_i = -1): hateful = [h_t + h_i > 0.5], 10% of labels flipped.
#          Harsher texts come with darker pictures more often (P(dark) 0.2 at h_t = -2 .. 0.8 at +2),
#          which is what lets a contrastive text tower learn the tone words at all. Half the samples are
#          confounders of the other half, as in Hateful Memes: the same text with another picture (a
#          subject of the other kind), or the same picture with another text (a hostility across the
#          decision line). A meme's text never names its colour (that would name the subject).
# Every text leaves some attributes out (each named with probability 0.8) and has noise words at
# random places.
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
IT_COLOURS = (("red", 0.0), ("orange", 0.08), ("yellow", 0.15), ("green", 0.33), ("cyan", 0.5), ("blue", 0.62),
              ("purple", 0.75), ("pink", 0.88))
COLOUR_WORDS = tuple(c for c, _ in IT_COLOURS)
IT_COUNTS = (("one", "a", "single"), ("two", "pair"), ("three",), ("four",))  # count 1..4
IT_SIZES = (("small", "tiny"), ("medium",), ("big", "large"))
IT_REGIONS = ("left", "right", "top", "bottom")
IT_SHAPES = ((0, 0.0), (3, 0.3), (4, 0.22), (5, 0.42), (2, 0.4))  # radius(theta) = 1 + a cos(m theta): (m, a)
FOOD_GROUPS = ("dessert", "soup", "salad", "snack")
FOOD_DISHES = (("cake", "gateau"), ("pie", "tart"), ("pudding", "custard"), ("cookies", "biscuits"), ("donuts", "crullers"),
               ("ramen", "noodles"), ("chowder", "bisque"), ("pho", "broth"), ("gazpacho", "borscht"), ("miso", "dashi"),
               ("caesar", "romaine"), ("coleslaw", "slaw"), ("tabbouleh", "bulgur"), ("caprese", "mozzarella"), ("nicoise", "tuna"),
               ("nachos", "tortilla"), ("fries", "chips"), ("pretzel", "twist"), ("samosa", "pakora"), ("dumplings", "gyoza"))
FOOD_TINT = (0.05, 0.55, 0.3, 0.8)  # hue of each group's scene tint
IMDB_GENRES = ("drama", "comedy", "romance", "thriller", "crime", "action", "horror", "documentary", "scifi",
               "family", "war", "western")
IMDB_CUES = (("grief", "family", "struggle"), ("hilarious", "funny", "laughs"), ("love", "falls", "heart"),
             ("suspense", "danger", "chase"), ("murder", "detective", "police"), ("fight", "explosive", "battle"),
             ("ghost", "terror", "haunted"), ("interviews", "footage", "true"), ("alien", "spaceship", "future"),
             ("kids", "parents", "holiday"), ("soldiers", "army", "front"), ("cowboy", "sheriff", "desert"))
IMDB_DARK = (3, 4, 6, 10)  # thriller, crime, horror, war: darker posters
MEMES_TONE = (("lovely", "kind", "sweet"), ("nice", "fine", "okay"), ("weird", "odd", "strange"),
              ("stupid", "ugly", "gross"), ("vile", "disgusting", "filthy"))  # hostility -2 .. 2
MEMES_SUBJECTS = ((1, 0), (6, 1), (11, 7), (16, 4), (3, 5), (13, 6))  # (motif, colour) of the 6 subjects; the first 3
# are targets, drawn in warm colours (red, orange, pink), the others in cool ones (cyan, blue, purple)
IT_NOISE = ("the", "with", "and", "of", "best", "easy", "homemade", "recipe", "photo", "look", "this", "is", "so",
            "when", "you", "my", "today", "story", "new", "really", "just", "about", "in", "a", "life", "world",
            "young", "man", "woman", "town", "after", "meets", "must", "their", "his", "her")
IT_VERSION = 1  # bump when the generator changes; the cache name also carries a hash of the settings


def it_vocab():
    """Every word the generator can write, in a fixed order (the embedded tokenizer's vocabulary)."""
    words = [w for ws in IT_COUNTS + IT_SIZES for w in ws] + [c for c, _ in IT_COLOURS] + list(IT_REGIONS) \
        + ["on", "at", "objects"] + list(FOOD_GROUPS) + [w for ws in FOOD_DISHES for w in ws] \
        + [w for ws in IMDB_CUES for w in ws] + [w for ws in MEMES_TONE for w in ws] + list(IT_NOISE)
    return tuple(dict.fromkeys(words))  # unique, first occurrence kept


def it_embedded_id(cfg=IT_EMBEDDED):
    """Version + hash of every setting and word table: caches and checkpoints carry it."""
    text = json.dumps([IT_VERSION, cfg, IT_TASKS, IT_COLOURS, IT_COUNTS, IT_SIZES, IT_REGIONS, IT_SHAPES, FOOD_GROUPS,
                       FOOD_DISHES, FOOD_TINT, IMDB_GENRES, IMDB_CUES, IMDB_DARK, MEMES_TONE, MEMES_SUBJECTS, IT_NOISE],
                      sort_keys=True)
    return f"it{IT_VERSION}-{hashlib.sha1(text.encode()).hexdigest()[:8]}"


def draw_attributes(n, g, cfg=IT_EMBEDDED):
    """The per-sample attributes a picture shows and its text names: count (N,) 1..4, colour (N,) 0..7,
    size (N,) 0..2, region (N,) 0..3."""
    return {"count": torch.randint(1, cfg["max_count"] + 1, (n,), generator=g),
            "colour": torch.randint(0, len(IT_COLOURS), (n,), generator=g),
            "size": torch.randint(0, len(IT_SIZES), (n,), generator=g),
            "region": torch.randint(0, len(IT_REGIONS), (n,), generator=g)}


def render_pictures(attrs, motif, tint, g, cfg=IT_EMBEDDED):
    """Pictures of `count` objects. motif (N, K) long in 0..19 (object j's shape = motif // 4, pattern =
    motif % 4); tint (N,) the scene's hue, or NaN for a random one; attrs from draw_attributes (a 'dark'
    entry (N,) bool darkens the scene). -> uint8 (N, 3, S, S)."""
    n, S, K = len(motif), cfg["image_size"], cfg["max_count"]
    scene = _one_over_f(n, S, g, 1.0)                                          # (N, S, S)
    light = _one_over_f(n, S, g, 1.2)
    hue1 = torch.where(tint.isnan(), torch.rand(n, generator=g), tint + 0.04 * torch.randn(n, generator=g)) % 1.0
    dark = attrs.get("dark", torch.zeros(n, dtype=torch.bool)).float()
    c1 = _hsv_to_rgb(hue1, 0.3 + 0.15 * torch.rand(n, generator=g), (0.35 + 0.25 * torch.rand(n, generator=g)) * (1 - 0.55 * dark))
    c2 = _hsv_to_rgb(torch.rand(n, generator=g), 0.1 + 0.2 * torch.rand(n, generator=g), (0.55 + 0.3 * torch.rand(n, generator=g)) * (1 - 0.55 * dark))
    mix = torch.sigmoid(2.5 * scene)[:, None]
    img = (c1[:, :, None, None] * (1 - mix) + c2[:, :, None, None] * mix) * (1 + 0.2 * light[:, None])  # (N, 3, S, S)
    # objects: centres inside the named region (a half of the picture), radius from the size, colour named
    radius = torch.tensor(cfg["size_px"])[attrs["size"]][:, None] * (0.9 + 0.2 * torch.rand(n, K, generator=g))  # (N, K)
    u, v = 0.14 + 0.72 * torch.rand(2, n, K, generator=g)                      # along / across the half
    across = 0.12 + 0.3 * v                                                    # fraction of S from the region's edge
    region = attrs["region"][:, None].expand(n, K)
    cx = torch.where(region == 0, across, torch.where(region == 1, 1 - across, u)) * S
    cy = torch.where(region == 2, across, torch.where(region == 3, 1 - across, u)) * S
    turn = 2 * math.pi * torch.rand(n, K, generator=g)
    shape = motif // 4
    m = torch.tensor([s[0] for s in IT_SHAPES], dtype=torch.float)[shape]     # (N, K)
    a = torch.tensor([s[1] for s in IT_SHAPES])[shape] * (1 + cfg["shape_jitter"] * torch.randn(n, K, generator=g)).clamp(0.3, 1.7)
    hue = (torch.tensor([h for _, h in IT_COLOURS])[attrs["colour"]] + 0.02 * torch.randn(n, generator=g)) % 1.0
    colour = _hsv_to_rgb(hue, 0.75 + 0.2 * torch.rand(n, generator=g), 0.75 + 0.2 * torch.rand(n, generator=g))  # (N, 3)
    yy, xx = torch.meshgrid(torch.arange(S).float() + 0.5, torch.arange(S).float() + 0.5, indexing="ij")
    w = 2 * math.pi / cfg["pattern_period"]
    waves = (torch.cos(w * yy), torch.cos(w * (xx * math.sin(math.pi / 3) + yy * math.cos(math.pi / 3))))
    patterns = torch.stack([torch.zeros(S, S), waves[0], waves[1], torch.cos(w * xx) * torch.cos(w * yy)])  # (4, S, S)
    for j in range(K):  # painter's order; slot j is drawn only when count > j
        dy, dx = yy - cy[:, j, None, None], xx - cx[:, j, None, None]          # (N, S, S)
        rho, theta = (dx ** 2 + dy ** 2).sqrt(), torch.atan2(dy, dx)
        edge = radius[:, j, None, None] * (1 + a[:, j, None, None] * torch.cos(m[:, j, None, None] * (theta - turn[:, j, None, None])))
        alpha = torch.sigmoid((edge - rho) / 0.5) * (attrs["count"] > j).float()[:, None, None]
        shade = (1.0 - 0.25 * (dy + dx) / (2 * radius[:, j, None, None])).clamp(0.6, 1.3)
        texture = 1 + cfg["pattern_contrast"] * patterns[motif[:, j] % 4]      # (N, S, S)
        obj = colour[:, :, None, None] * (shade * texture)[:, None]
        img = img * (1 - alpha[:, None]) + obj * alpha[:, None]
    return (img.clamp(0, 1) * 255).round().to(torch.uint8)


def _pick(options, rng):
    return options[rng.integers(len(options))]


def describe(attrs, i, rng, p_mention):
    """The words naming sample i's attributes, each named with probability p_mention, in a fixed order:
    [count] [size] [colour] objects [on the region]."""
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
    """Insert k noise words at random places."""
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
    label[none, torch.multinomial(freq, int(none.sum()), replacement=True, generator=g)] = 1.0  # at least one genre
    attrs = draw_attributes(n, g, cfg)
    attrs["dark"] = label[:, list(IMDB_DARK)].sum(1) > 0
    K = cfg["max_count"]
    # figure j shows the motif of the film's (j mod #genres)-th genre with probability p_motif, else a plain figure
    order = torch.argsort(label + torch.rand(label.shape, generator=g), dim=1, descending=True)  # present genres first
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
        texts.append(" ".join(add_noise_words(words, rng, max(0, int(rng.integers(lo, hi + 1)) - len(words)))))
    return images, texts, label, attrs


def memes_label(h_t, target, flip):
    """hateful = [h_t + h_i > 0.5] with h_i = +1 for a target subject, -1 otherwise; `flip` marks the noisy labels."""
    h_i = torch.where(target, 1, -1)
    return ((h_t + h_i > 0.5) ^ flip).long()


def _memes(n, g, rng, cfg):
    assert n % 2 == 0, "memes come in pairs of confounders: an even number of samples"
    half = n // 2
    subject = torch.randint(0, len(MEMES_SUBJECTS), (n,), generator=g)
    h_t = torch.randint(-2, 3, (n,), generator=g)
    # the second half are confounders of the first: sibling i + half keeps base i's text (a new picture,
    # a subject of the other kind) or its picture (a new text, the hostility across the decision line)
    same_text = torch.rand(half, generator=g) < 0.5
    base, sib = torch.arange(half), torch.arange(half) + half
    other_kind = (subject[base] + 3 + torch.randint(0, 3, (half,), generator=g)) % 6
    subject[sib] = torch.where(same_text, other_kind, subject[base])
    h_t[sib] = torch.where(same_text, h_t[base], torch.where(h_t[base] >= 0, torch.randint(-2, 0, (half,), generator=g),
                                                             torch.randint(1, 3, (half,), generator=g)))
    attrs = draw_attributes(n, g, cfg)
    lo, hi = cfg["memes_p_dark"]
    attrs["dark"] = torch.rand(n, generator=g) < lo + (hi - lo) * (h_t + 2).float() / 4  # harsher pictures for harsher words
    for k in attrs:  # a sibling shows what its text says: the base's count, size, region (and, same picture, its pixels)
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
        words = [w for w in describe(a, i, rng, cfg["p_mention"]) if w not in COLOUR_WORDS]  # the colour would name the subject
        words += [_pick(MEMES_TONE[h_t[i] + 2], rng) for _ in range(int(rng.integers(1, 4)))]
        texts.append(" ".join(add_noise_words(words, rng, int(rng.integers(1, 5)))))
    perm = torch.randperm(n, generator=g)  # siblings are not neighbours
    sibling = torch.cat([sib, base])                                           # original index -> its sibling's
    attrs = {k: v[perm] for k, v in attrs.items()}
    attrs.update(subject=subject[perm], hostility=h_t[perm], sibling=perm.argsort()[sibling[perm]],
                 same_text=torch.cat([same_text, same_text])[perm])
    return images[perm], [texts[i] for i in perm.tolist()], label[perm], attrs


def generate_image_text(seed=0, cfg=IT_EMBEDDED, quiet=None):
    """{task: {split: {'images': uint8 (N, 3, S, S), 'texts': [str], 'label': (N,) long or (N, G) float,
    per-sample attributes}}} for the three tasks, generated from `seed`."""
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


def image_text_raw(seed=0, cache_dir=CACHE_DIR):
    """The raw embedded image-text benchmark, generated once per seed and cached on disk."""
    path = os.path.join(cache_dir, f"image_text_{it_embedded_id()}_seed{seed}.pt")
    if path not in _RAW:
        _RAW[path] = common.load_or_rebuild(path, lambda: generate_image_text(seed), valid=_is_raw_image_text)
    return _RAW[path]


def _is_raw_image_text(obj):
    return isinstance(obj, dict) and all(
        isinstance(obj.get(t), dict) and all(isinstance(obj[t].get(s), dict) and torch.is_tensor(obj[t][s].get("images"))
                                             and isinstance(obj[t][s].get("texts"), list) for s in ("train", "val", "test"))
        for t in IT_TASKS)


def embedded_tokenizer():
    """The embedded benchmark's word-level tokenizer (its own small vocabulary, CLIP's interface)."""
    return WordTokenizer(it_vocab())


def embedded_image_text_split(task, split, image_size, context_length, tokenizer=None, seed=0, cache_dir=CACHE_DIR):
    """One split of an embedded image-text task as AVTensors {'image', 'text', 'label', 'index'}: pictures
    pre-processed as CLIP's (resize, centre crop, CLIP mean / std) to `image_size`, texts tokenised
    (default: the embedded word tokenizer; pass a CLIPTokenizer for the published CLIP) to `context_length`."""
    if task not in IT_TASKS:
        raise DataError(f"unknown embedded image-text task {task!r}; choose one of {', '.join(IT_TASKS)}.")
    raw = image_text_raw(seed, cache_dir)[task][split]
    tokenizer = tokenizer or embedded_tokenizer()
    key = ("it", task, split, seed, image_size)
    if key not in _CLEAN:
        _CLEAN[key] = frames_to_input(raw["images"], image_size, mean=CLIP_MEAN, std=CLIP_STD)
    return AVTensors({"image": _CLEAN[key], "text": tokenizer(raw["texts"], context_length), "label": raw["label"]})



# ----------------------------------------------------------------------------------------------
# The READ / Kinetics50-C / VGGSound-C file layout
# ----------------------------------------------------------------------------------------------
def check_input_file(path, what, hint):
    """A DataError unless `path` is an existing file: says whether it is missing or a folder."""
    if os.path.isdir(path):
        raise DataError(f"{what} {path} is a folder, not a file; {hint}")
    if not os.path.isfile(path):
        raise DataError(f"{what} {path} does not exist; {hint}")


def _read_text(path, what):
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:  # utf-8-sig: a spreadsheet's BOM is not a label
            return f.read()
    except UnicodeDecodeError:
        raise DataError(f"{what} {path} is not UTF-8 text (a binary file?); pass the right file.") from None


def read_label_csv(path):
    """Label CSV `index,mid[,display_name]` (with a header row) -> {mid: index}; the indices must be 0..K-1."""
    check_input_file(path, "label CSV", "pass the class_labels_indices_*.csv of your dataset.")
    rows = [r for r in csv.reader(_read_text(path, "label CSV").splitlines()) if r and any(c.strip() for c in r)]
    if rows and not rows[0][0].strip().isdigit():
        rows = rows[1:]  # header
    if not rows:
        raise DataError(f"label CSV {path} has no rows; expected lines `index,mid,display_name`.")
    bad = next((r for r in rows if len(r) < 2 or not r[0].strip().isdigit() or not r[1].strip()), None)
    if bad is not None:
        raise DataError(f"label CSV {path} has the line {','.join(bad)!r}; every line needs `index,mid[,display_name]`.")
    mids = [r[1].strip() for r in rows]
    indices = [int(r[0]) for r in rows]
    twice = next((m for m in mids if mids.count(m) > 1), None)
    if twice is not None:
        raise DataError(f"label CSV {path} lists the label {twice!r} twice; every mid needs exactly one index.")
    if sorted(indices) != list(range(len(rows))):
        # the model's output k is class k: other indices would silently mislabel (or crash on) every clip
        raise DataError(f"label CSV {path} has indices {_span(indices)}, not exactly 0..{len(rows) - 1} "
                        f"(one per line, each once); renumber them from 0.")
    return dict(zip(mids, indices))


def _span(values):
    v = sorted(values)
    return f"{v[0]}..{v[-1]}" + (" with repeats or gaps" if len(set(v)) != len(v) or v[-1] - v[0] + 1 != len(v) else "")


ENTRY_FIELDS = ("video_id", "wav", "video_path", "labels")


def read_json_list(path):
    """READ's JSON {'data': [{'video_id', 'wav', 'video_path', 'labels'}, ...]} -> list of dicts (fields checked,
    each video_id once)."""
    check_input_file(path, "data list", "check the path (or --data-root) you passed.")
    try:
        obj = json.loads(_read_text(path, "data list"))
    except json.JSONDecodeError as err:
        raise DataError(f"{path} is not valid JSON ({err.msg} at line {err.lineno}); "
                        f"READ's lists look like {{\"data\": [...]}}.") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("data"), list):
        raise DataError(f"{path} is not a READ data list (a JSON object with a 'data' list of clips).")
    entries = obj["data"]
    if not entries:
        raise DataError(f"data list {path} is empty; there is nothing to evaluate.")
    for i, e in enumerate(entries):
        if not isinstance(e, dict):
            raise DataError(f"entry {i} of {path} is {type(e).__name__} {str(e)[:40]!r}, not an object with "
                            f"{', '.join(ENTRY_FIELDS)}.")
        lacking = [k for k in ENTRY_FIELDS if k not in e]
        if lacking:
            raise DataError(f"an entry of {path} has no {lacking[0]!r} field ({str(e)[:80]}); READ's lists need "
                            f"video_id, wav, video_path and labels.")
        wrong = next((k for k in ENTRY_FIELDS if not isinstance(e[k], str) or not e[k].strip()), None)
        if wrong is not None:
            raise DataError(f"entry {i} of {path} has {wrong} = {e[wrong]!r}; every field of a clip is a non-empty "
                            f"string (labels: comma-separated mids).")
    first = {}
    for i, e in enumerate(entries):  # a clip listed twice would be scored twice
        if e["video_id"] in first:
            raise DataError(f"{path} lists the clip {e['video_id']!r} twice (entries {first[e['video_id']]} and {i}); "
                            f"remove one of them.")
        first[e["video_id"]] = i
    return entries


def frame_path(entry, index=5):
    """Path of frame `index` of a clip, falling back to lower indices when a frame is missing."""
    for i in range(index, -1, -1):
        p = os.path.join(entry["video_path"], f"frame_{i}", f"{entry['video_id']}.jpg")
        if os.path.isfile(p):
            return p
    return None


def _check_image_header(path):
    """A DataError unless the file starts like a JPEG or PNG (a cheap check at start; decoding is per batch)."""
    with open(path, "rb") as f:
        head = f.read(8)
    if not (head.startswith(b"\xff\xd8\xff") or head.startswith(b"\x89PNG\r\n\x1a\n")):
        raise DataError(f"{path} is not a JPEG or PNG image ({'empty' if not head else 'wrong first bytes'}); "
                        f"replace or remove it.")


class ReadLayoutDataset(torch.utils.data.Dataset):
    """Clips listed in a READ JSON, pre-processed on the fly for a model's input sizes.

    Clips whose WAV or every frame is missing are skipped, counted and reported once; a label not
    in the CSV is an error (a wrong CSV would silently mislabel everything), and so is a clip with
    several labels (the runs here are single-label; scoring the first would be silently wrong).
    """

    def __init__(self, json_path, label_csv, mel_bins=128, target_length=1024, image_size=224,
                 frame_index=5, entries=None):
        entries = read_json_list(json_path) if entries is None else entries
        mid_to_index = read_label_csv(label_csv)
        self.items, skipped = [], []
        for e in entries:
            mids = [m.strip() for m in str(e["labels"]).split(",") if m.strip()]
            unknown = [m for m in mids if m not in mid_to_index]
            if not mids or unknown:
                raise DataError(f"clip {e.get('video_id')} in {json_path} has label {e['labels']!r}, which is not in "
                                f"{label_csv}; use the label CSV that belongs to this data list.")
            if len(mids) > 1:  # scoring against the first label alone would be a silently wrong accuracy
                raise DataError(f"clip {e['video_id']} in {json_path} has {len(mids)} labels {e['labels']!r}, but these "
                                f"runs are single-label (one class per clip); keep the one label to score it against.")
            frame = frame_path(e, frame_index)
            if frame is None or not os.path.isfile(e["wav"]):
                skipped.append(e["video_id"])
                continue
            _, _, rate, n = wav_info(e["wav"])  # header only: an empty, 0-channel or compressed WAV is named now
            if n * SAMPLE_RATE < FBANK_WINDOW * rate:
                raise DataError(f"{e['wav']} lasts {1000 * n / rate:.1f} ms, shorter than one 25 ms fbank window; "
                                f"replace or remove it.")
            _check_image_header(frame)
            self.items.append((e["wav"], frame, mid_to_index[mids[0]]))  # the clip's one label
        if skipped:
            print(f"[data] skipped {len(skipped)} of {len(entries)} clips of {json_path} with a missing "
                  f"WAV or frame (first: {skipped[0]})", file=sys.stderr)
        if not self.items:
            raise DataError(f"no clip of {json_path} has both its WAV and a frame on disk; check the paths in it.")
        self.mel_bins, self.target_length, self.image_size = mel_bins, target_length, image_size
        self.skipped = len(skipped)

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        wav_path, frame, label = self.items[i]
        wav, sr = read_wav(wav_path)
        if sr != SAMPLE_RATE:
            wav = torchaudio.functional.resample(wav, sr, SAMPLE_RATE)
        image = read_image(frame)
        return {"audio": wav_to_fbank(wav, self.mel_bins, self.target_length),
                "video": frames_to_input(image.unsqueeze(0), self.image_size)[0],
                "label": torch.tensor(label), "index": torch.tensor(i)}


def read_layout_json(data_root, modality, corruption, severity):
    """Where READ keeps a test list: <root>/clean/severity_0.json, <root>/<modality>/<corruption>/severity_<s>.json."""
    if corruption is None:
        return os.path.join(data_root, "clean", "severity_0.json")
    return os.path.join(data_root, modality, corruption, f"severity_{severity}.json")


def join_on_video_id(video_json, audio_json):
    """The clips of both lists (video list's order): frames from the video list, the WAV from the audio list.
    Clips in only one list are dropped, counted and reported per list; no clip in common is a DataError."""
    vid, aud = read_json_list(video_json), {e["video_id"]: e["wav"] for e in read_json_list(audio_json)}
    both = [{**e, "wav": aud[e["video_id"]]} for e in vid if e["video_id"] in aud]
    if not both:
        raise DataError(f"the video list {video_json} and the audio list {audio_json} share no video_id; "
                        f"pass the lists made from the same clean list.")
    only_video, only_audio = len(vid) - len(both), len(aud) - len(both)
    if only_video or only_audio:
        print(f"[data] --modality both: dropped {only_video} of {len(vid)} clips of {video_json} missing from the "
              f"audio list and {only_audio} of {len(aud)} clips of {audio_json} missing from the video list",
              file=sys.stderr)
    return both


def read_layout_split(data_root, label_csv, model, video_corruption=None, audio_corruption=None, severity=5):
    """A READ-layout test set; with both corruptions, video frames of the one and WAVs of the other."""
    kw = dict(mel_bins=model.mel_bins, target_length=model.audio_length, image_size=model.image_size)
    if video_corruption and audio_corruption:
        both = join_on_video_id(read_layout_json(data_root, "video", video_corruption, severity),
                                read_layout_json(data_root, "audio", audio_corruption, severity))
        return ReadLayoutDataset(f"{video_corruption}+{audio_corruption}", label_csv, entries=both, **kw)
    if video_corruption:
        return ReadLayoutDataset(read_layout_json(data_root, "video", video_corruption, severity), label_csv, **kw)
    if audio_corruption:
        return ReadLayoutDataset(read_layout_json(data_root, "audio", audio_corruption, severity), label_csv, **kw)
    return ReadLayoutDataset(read_layout_json(data_root, None, None, 0), label_csv, **kw)


# ----------------------------------------------------------------------------------------------
# Missing modalities (CMPT, AOEPT)
# ----------------------------------------------------------------------------------------------
MISSING_KINDS = ("none", "audio", "video", "both")


def missing_masks(n, kind, rate, seed=0):
    """Per-sample availability, fixed by `seed`: -> has_audio (n,), has_video (n,) bool.

    kind 'audio': a `rate` fraction lacks audio; 'video': lacks video; 'both' (MAP's protocol):
    rate/2 lack audio and another rate/2 lack video, none lack both; 'none': all complete.
    """
    if kind not in MISSING_KINDS:
        raise ValueError(f"unknown missing kind {kind!r}; choose one of {MISSING_KINDS}")
    if not 0 <= rate <= 1:
        raise ValueError(f"a missing rate is a fraction in [0, 1], not {rate}")
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=g)
    has_a, has_v = torch.ones(n, dtype=torch.bool), torch.ones(n, dtype=torch.bool)
    if kind == "audio":
        has_a[order[: round(rate * n)]] = False
    elif kind == "video":
        has_v[order[: round(rate * n)]] = False
    elif kind == "both":
        m = round(rate * n / 2)
        has_a[order[:m]] = False
        has_v[order[m: 2 * m]] = False
    return has_a, has_v


def with_missing(dataset, has_audio, has_video):
    """Mark modalities missing: the missing input is replaced by zeros (CMPT's placeholder for audio
    and video, applied to the model's input tensors) and has_audio / has_video are added.
    In-memory AVTensors get new tensors; any other dataset (READ layout) is wrapped clip by clip."""
    if not isinstance(dataset, AVTensors):
        return MissingModalities(dataset, has_audio, has_video)
    f = dataset.fields
    audio = torch.where(has_audio[:, None, None], f["audio"], torch.zeros_like(f["audio"]))
    video = torch.where(has_video[:, None, None, None], f["video"], torch.zeros_like(f["video"]))
    return dataset.with_fields(audio=audio, video=video, has_audio=has_audio, has_video=has_video)


class MissingModalities(torch.utils.data.Dataset):
    """A dataset whose clips are read on demand, with modalities marked missing as `with_missing` does."""

    def __init__(self, dataset, has_audio, has_video):
        assert len(has_audio) == len(has_video) == len(dataset), "one availability flag per clip"
        self.dataset, self.has_audio, self.has_video = dataset, has_audio, has_video

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        item = dict(self.dataset[i])
        if not self.has_audio[i]:
            item["audio"] = torch.zeros_like(item["audio"])
        if not self.has_video[i]:
            item["video"] = torch.zeros_like(item["video"])
        return {**item, "has_audio": self.has_audio[i], "has_video": self.has_video[i]}


# ----------------------------------------------------------------------------------------------
# Image-text: tokenizers
# ----------------------------------------------------------------------------------------------
# Image-text batches (CLIP-style dual encoder; MAP, CMPT, AOEPT), dicts with named fields:
#
#     batch["image"]    (B, 3, H, W) float  CLIP-normalised (resize shorter side, centre crop, /255)
#     batch["text"]     (B, C) long   [sot, tokens..., eot, 0, ...], C = context length
#     batch["label"]    (B,) long (single-label, binary) or (B, K) float multi-hot (MM-IMDb)
#     batch["index"]    (B,) long   position of the sample in its split
#     batch["missing"]  (B,) long   only in missing-modality data: MAP's codes 0 complete,
#                                   1 text missing, 2 image missing
#
# Two tokenizers share one interface (.sot, .eot, .vocab_size, .encode(text), tokenizer(texts, C)):
# `CLIPTokenizer` is OpenAI CLIP's byte-level BPE (openai/CLIP `clip/simple_tokenizer.py`, written
# again from its description) read from the user's `bpe_simple_vocab_16e6.txt.gz`; `WordTokenizer`
# is a word-level vocabulary for the embedded synthetic benchmark. Both put the end token at the
# LARGEST id, so a text encoder that pools at argmax(ids) (CLIP) finds it.
#
# Deviations (each marked `# DEVIATION:` below):
# - CLIP cleans text with ftfy.fix_text first (repairs mojibake such as "cafÃ©"); ftfy is not
#   available here, so text is used as given (html.unescape twice, whitespace, lower-case only).
# - CLIP splits words with the `regex` module's \p{L} (letters) and \p{N} (numbers); `re` lacks
#   them. Letters become [^\W\d_] (word characters minus decimal digits and "_"), numbers \d
#   (decimal digits), the rest (?:[^\s\w]|_)+ (runs of what is neither space, letter nor digit,
#   "_" included, as in CLIP). Identical on ASCII and on letters and decimal digits of every
#   script; non-decimal numerals (superscripts, fractions, Roman numeral signs) join the letter
#   run instead of standing alone as \p{N} does.
BPE_MERGES_USED = 49152 - 256 - 2  # CLIP reads lines 1 .. 48,894 of the merges file (line 0: version)
SOT_TEXT, EOT_TEXT = "<|startoftext|>", "<|endoftext|>"
# DEVIATION: \p{L} -> [^\W\d_], \p{N} -> \d, [^\s\p{L}\p{N}]+ -> (?:[^\s\w]|_)+ (see above)
CLIP_SPLIT = re.compile(r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[^\W\d_]+|\d|(?:[^\s\w]|_)+",
                        re.IGNORECASE)


def bytes_to_unicode():
    """CLIP's / GPT-2's table byte -> printable character: the 188 printable bytes ('!'..'~', '¡'..'¬',
    '®'..'ÿ') map to themselves, the other 68 (control, space, ...) to chr(256), chr(257), ... in byte
    order. The table's order is CLIP's vocabulary order: the printable bytes first ('!' is id 0),
    then the 68 others."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    table = {b: chr(b) for b in printable}
    others = [b for b in range(256) if b not in table]
    table.update({b: chr(256 + n) for n, b in enumerate(others)})
    return table


def clean_text(text):
    """CLIP's clean-up: html.unescape twice, whitespace runs -> one space, stripped, lower-cased."""
    # DEVIATION: CLIP calls ftfy.fix_text(text) first; ftfy is not available (see the section comment)
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip().lower()


def pad_token_ids(ids_per_text, sot, eot, context_length):
    """[[ids...], ...] -> (N, C) long: [sot] + ids + [eot], zero-padded; a text too long is cut to C
    and its last position set to eot (CLIP's tokenize(truncate=True))."""
    if not ids_per_text:
        raise DataError("no texts were given to tokenize; pass a non-empty list of strings.")
    out = torch.zeros(len(ids_per_text), context_length, dtype=torch.long)  # (N, C)
    for row, ids in enumerate(ids_per_text):
        ids = [sot] + ids + [eot]
        if len(ids) > context_length:
            ids = ids[:context_length]
            ids[-1] = eot
        out[row, :len(ids)] = torch.tensor(ids, dtype=torch.long)
    return out


class CLIPTokenizer:
    """OpenAI CLIP's byte-level BPE from its merges file (`bpe_simple_vocab_16e6.txt.gz`).

    Vocabulary, in id order: the 256 byte characters (`bytes_to_unicode`), the same with `</w>`
    (end of word), one entry per merge (the two symbols joined), `<|startoftext|>`, `<|endoftext|>`:
    256 + 256 + 48,894 + 2 = 49,408 for the real file.
    """

    def __init__(self, path):
        merges = self._read_merges(path)
        self.byte_encoder = bytes_to_unicode()
        symbols = list(self.byte_encoder.values())
        vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [SOT_TEXT, EOT_TEXT]
        self.encoder = {token: i for i, token in enumerate(vocab)}  # later duplicates win, as dict(zip()) in CLIP
        self.bpe_ranks = {m: rank for rank, m in enumerate(merges)}
        self.sot, self.eot = self.encoder[SOT_TEXT], self.encoder[EOT_TEXT]
        self.vocab_size = len(vocab)
        self.cache = {SOT_TEXT: SOT_TEXT, EOT_TEXT: EOT_TEXT}

    @staticmethod
    def _read_merges(path):
        hint = "pass CLIP's bpe_simple_vocab_16e6.txt.gz (openai/CLIP, clip/)."
        check_input_file(path, "BPE merges file", hint)
        try:
            with gzip.open(path, "rb") as f:
                lines = f.read().decode("utf-8").split("\n")
        except (OSError, EOFError, zlib.error):
            raise DataError(f"BPE merges file {path} is not gzip-compressed (or is truncated); {hint}") from None
        except UnicodeDecodeError:
            raise DataError(f"BPE merges file {path} is not UTF-8 text inside its gzip; {hint}") from None
        if not lines[0].startswith("#version"):
            raise DataError(f"BPE merges file {path} does not start with the '#version' header line of CLIP's "
                            f"file; {hint}")
        merges = []
        for number, line in enumerate(lines[1:BPE_MERGES_USED + 1], start=1):
            parts = line.split()
            if not parts and number == len(lines) - 1:
                break  # the file's final newline
            if len(parts) != 2:
                raise DataError(f"line {number} of BPE merges file {path} is {line[:60]!r}, not two "
                                f"space-separated symbols; {hint}")
            merges.append(tuple(parts))
        if not merges:
            raise DataError(f"BPE merges file {path} has no merges after its header line; {hint}")
        return merges

    def bpe(self, word):
        """One word (byte characters) -> its BPE symbols joined by spaces: merge the lowest-ranked
        adjacent pair until no listed pair is left. The last character carries `</w>`."""
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
        """A list of N strings -> (N, context_length) long ids."""
        return pad_token_ids([self.encode(t) for t in texts], self.sot, self.eot, context_length)


class WordTokenizer:
    """A word-level vocabulary with CLIPTokenizer's interface, for the embedded benchmark:
    id 0 padding, 1 .. W the given words in order, W + 1 start, W + 2 end (the largest id)."""

    def __init__(self, words):
        words = [w.lower() for w in words]
        twice = next((w for w in words if words.count(w) > 1), None)
        if twice is not None:
            raise DataError(f"the word {twice!r} is listed twice in the vocabulary; list every word once.")
        self.words = words
        self.encoder = {w: i + 1 for i, w in enumerate(words)}
        self.sot, self.eot = len(words) + 1, len(words) + 2
        self.vocab_size = len(words) + 3

    def encode(self, text):
        """A string -> word ids (lower-cased, split on whitespace; no start / end tokens)."""
        ids = []
        for word in text.lower().split():
            if word not in self.encoder:
                raise DataError(f"the word {word!r} of the text {text[:60]!r} is not in the vocabulary; "
                                f"add it to the word list or fix the text.")
            ids.append(self.encoder[word])
        return ids

    def __call__(self, texts, context_length=77):
        """A list of N strings -> (N, context_length) long ids."""
        return pad_token_ids([self.encode(t) for t in texts], self.sot, self.eot, context_length)


# ----------------------------------------------------------------------------------------------
# Image-text: real datasets (MM-IMDb, UPMC Food-101, Hateful Memes in their published layouts)
# ----------------------------------------------------------------------------------------------
# Read straight from the raw files (MAP converts them to Arrow tables first; we do not). Every file
# is checked when the dataset is built (exists, is a JPEG/PNG by its first bytes, labels valid), so a
# bad file is named before any training; images are decoded and pre-processed per item.
#
#   MM-IMDb        <root>/images/<id>.jpeg, <root>/labels/<id>.json {"plot": [str, ...], "genres": [...]},
#                  <root>/split.json {"train", "dev", "test": [id, ...]}; 23 genres, multi-label
#   UPMC Food-101  <root>/images/{train,test}/<class>/<file>.jpg, <root>/texts/{train,test}_titles.csv
#                  (rows: image file name, text, class; no header); 101 classes = sorted folders
#   Hateful Memes  <root>/img/<id>.png, <root>/{train,dev_seen,test_seen}.jsonl (one object a line:
#                  id, img ("img/<id>.png"), label 0/1, text)
#
# Deviations (each marked `# DEVIATION:` below):
# - MM-IMDb: MAP's writer (vilt/utils/write_mmimdb.py, single_plot=False by default) makes one sample
#   per plot of a movie (a movie with two plots appears twice); we take the first plot (MAP's
#   single_plot=True), one sample per movie, so the splits have the published sizes
#   15,552 / 2,608 / 7,799 and a missing table has one entry per movie.
# - MM-IMDb: the label files also list IMDb genres that MM-IMDb dropped (Adult, News, Reality-TV,
#   Talk-Show, as AOEPT's preprocess_datasets.py names them); MAP and AOEPT ignore every genre outside
#   the 23. We ignore those four and refuse any other (a label file of another dataset would
#   otherwise lose its labels silently).
# - Food-101: MAP ships its own split.json (61,142 train / 6,846 val, both from the train CSV; AOEPT
#   reuses it) and a class_idx.json in an unsorted order; neither is shipped here. With MAP's
#   split.json copied to <root>/split.json its train / val lists of image file names are used;
#   without it val is a fixed 10% of the train rows drawn with torch.Generator seed
#   FOOD101_VAL_SEED, train the other 90%. Classes are sorted (not MAP's class_idx.json order).
# - Hateful Memes: MAP reads dev.jsonl / test.jsonl (test_seen.jsonl renamed, DATA.md); we read
#   dev_seen.jsonl and test_seen.jsonl by their published names.
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
    "food101": {"train": "train", "val": "train", "test": "test"},  # val: 10% of the train CSV
    "hatememes": {"train": "train", "val": "dev_seen", "test": "test_seen"},
}
FOOD101_VAL_FRACTION, FOOD101_VAL_SEED = 0.1, 0
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def clip_preprocess(image, size=224):
    """uint8 (3, h, w) -> (3, size, size) float: CLIP's resize of the shorter side (bicubic), centre
    crop, /255, CLIP mean / std."""
    return frames_to_input(image.unsqueeze(0), size, mean=CLIP_MEAN, std=CLIP_STD)[0]


def _read_json_file(path, what, hint):
    check_input_file(path, what, hint)
    try:
        return json.loads(_read_text(path, what))
    except json.JSONDecodeError as err:
        raise DataError(f"{what} {path} is not valid JSON ({err.msg} at line {err.lineno}); {hint}") from None


def _check_image_file(path, what):
    check_input_file(path, what, "put the image there or remove the sample from the split files.")
    _check_image_header(path)


class ImageTextFiles(torch.utils.data.Dataset):
    """Samples (image path, text, label) read lazily: each item is {'image': (3, S, S) CLIP-normalised,
    'text': (C,) ids, 'label', 'index'}. `ids` names each sample in the dataset's own terms."""

    def __init__(self, name, ids, image_paths, texts, labels, tokenizer, image_size=224, context_length=77):
        if not ids:
            raise DataError(f"{name} has no samples; check the data root and the split you asked for.")
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


def mmimdb_samples(root, split):
    """MM-IMDb split 'train' / 'dev' / 'test' -> (ids, image paths, first plots, multi-hot lists of 23)."""
    split_path = os.path.join(root, "split.json")
    hint = "MM-IMDb's split.json maps 'train', 'dev' and 'test' to lists of movie ids."
    splits = _read_json_file(split_path, "MM-IMDb split file", hint)
    if not isinstance(splits, dict) or not isinstance(splits.get(split), list):
        raise DataError(f"{split_path} has no list {split!r}; {hint}")
    if not splits[split]:
        raise DataError(f"the {split!r} list of {split_path} is empty; use the split.json of MM-IMDb.")
    genre_index = {g: k for k, g in enumerate(MMIMDB_GENRES)}
    ids, paths, texts, labels = [], [], [], []
    for movie in map(str, splits[split]):
        image = os.path.join(root, "images", f"{movie}.jpeg")
        label_path = os.path.join(root, "labels", f"{movie}.json")
        if not os.path.isfile(image) or not os.path.isfile(label_path):
            lacking = image if not os.path.isfile(image) else label_path
            raise DataError(f"movie {movie} of the {split!r} list of {split_path} has no file {lacking}; "
                            f"restore it from MM-IMDb or use the split.json that belongs to these files.")
        _check_image_header(image)
        meta = _read_json_file(label_path, "MM-IMDb label file", "it should hold 'plot' and 'genres' lists.")
        plots, genres = (meta.get("plot"), meta.get("genres")) if isinstance(meta, dict) else (None, None)
        if not isinstance(plots, list) or not plots or not all(isinstance(p, str) for p in plots) \
                or not isinstance(genres, list):
            raise DataError(f"MM-IMDb label file {label_path} needs a non-empty 'plot' list of strings and a "
                            f"'genres' list; restore it from MM-IMDb.")
        unknown = [g for g in genres if g not in genre_index and g not in MMIMDB_DROPPED_GENRES]
        if unknown:
            raise DataError(f"MM-IMDb label file {label_path} has the genre {unknown[0]!r}, not one of the 23 "
                            f"of MM-IMDb ({', '.join(MMIMDB_GENRES)}); fix or remove the file.")
        multi_hot = [0.0] * len(MMIMDB_GENRES)
        for g in genres:
            if g in genre_index:
                multi_hot[genre_index[g]] = 1.0
        ids.append(movie)
        paths.append(image)
        texts.append(plots[0])  # DEVIATION: MAP makes one sample per plot; we take the first (see above)
        labels.append(multi_hot)
    return ids, paths, texts, labels


def food101_classes(root):
    """The 101 class names: the sorted folder names of <root>/images/train."""
    folder = os.path.join(root, "images", "train")
    if not os.path.isdir(folder):
        raise DataError(f"UPMC Food-101 image folder {folder} does not exist; pass the folder that holds "
                        f"images/ and texts/ as the data root.")
    classes = sorted(d for d in os.listdir(folder) if os.path.isdir(os.path.join(folder, d)))
    if not classes:
        raise DataError(f"UPMC Food-101 image folder {folder} has no class folders; unpack the images there.")
    return classes


def food101_samples(root, split):
    """UPMC Food-101 'train' / 'val' / 'test' -> (file names, image paths, texts, class indices)."""
    classes = food101_classes(root)
    class_index = {c: k for k, c in enumerate(classes)}
    csv_split = "test" if split == "test" else "train"
    csv_path = os.path.join(root, "texts", f"{csv_split}_titles.csv")
    check_input_file(csv_path, "UPMC Food-101 text file", "it lists `image file name,text,class` per line.")
    rows = [r for r in csv.reader(_read_text(csv_path, "UPMC Food-101 text file").splitlines()) if r]
    if rows and not rows[0][0].strip().lower().endswith(IMAGE_SUFFIXES):
        rows = rows[1:]  # a header line (some copies have one)
    if not rows:
        raise DataError(f"UPMC Food-101 text file {csv_path} has no rows; restore it from UPMC Food-101.")
    ids, paths, texts, labels = [], [], [], []
    for number, row in enumerate(rows, start=1):
        if len(row) < 3:
            raise DataError(f"row {number} of {csv_path} is {','.join(row)[:60]!r}; every row needs "
                            f"`image file name,text,class`.")
        # the text may hold unquoted commas: the first field is the file, the last the class
        file, text, cls = row[0].strip(), ",".join(row[1:-1]), row[-1].strip()
        if cls not in class_index:
            raise DataError(f"row {number} of {csv_path} has the class {cls!r}, which has no folder in "
                            f"{os.path.join(root, 'images', 'train')}; fix the row or add the folder.")
        image = os.path.join(root, "images", csv_split, cls, file)
        if not os.path.isfile(image):
            raise DataError(f"row {number} of {csv_path} names the image {image}, which does not exist; "
                            f"restore the image or remove the row.")
        _check_image_header(image)
        ids.append(file)
        paths.append(image)
        texts.append(text)
        labels.append(class_index[cls])
    map_split = os.path.join(root, "split.json")
    if split != "test" and os.path.isfile(map_split):  # MAP's split file: its lists of image file names
        hint = "MAP's Food101/split.json maps 'train', 'val', 'test' to lists of image file names."
        lists = _read_json_file(map_split, "UPMC Food-101 split file", hint)
        if not isinstance(lists, dict) or not isinstance(lists.get(split), list) or not lists[split]:
            raise DataError(f"{map_split} has no non-empty list {split!r}; {hint}")
        row_of = {file: i for i, file in enumerate(ids)}
        absent = next((f for f in lists[split] if f not in row_of), None)
        if absent is not None:
            raise DataError(f"{map_split} lists {absent!r} in {split!r}, which is not a row of {csv_path}; "
                            f"use the split.json that belongs to this copy of UPMC Food-101, or remove it.")
        keep = [row_of[f] for f in lists[split]]
        ids, paths, texts, labels = ([v[i] for i in keep] for v in (ids, paths, texts, labels))
    elif split != "test":
        # DEVIATION: MAP's fixed val list is not shipped; a seeded 10% of the train rows (see above)
        g = torch.Generator().manual_seed(FOOD101_VAL_SEED)
        order = torch.randperm(len(ids), generator=g)
        n_val = round(FOOD101_VAL_FRACTION * len(ids))
        keep = sorted(order[:n_val].tolist() if split == "val" else order[n_val:].tolist())
        ids, paths, texts, labels = ([v[i] for i in keep] for v in (ids, paths, texts, labels))
    return ids, paths, texts, labels


HATEMEMES_FIELDS = ("id", "img", "label", "text")


def hatememes_samples(root, split):
    """Hateful Memes 'train' / 'dev_seen' / 'test_seen' -> (ids, image paths, texts, labels 0/1)."""
    path = os.path.join(root, f"{split}.jsonl")
    check_input_file(path, "Hateful Memes list", "Hateful Memes has train.jsonl, dev_seen.jsonl and test_seen.jsonl.")
    ids, paths, texts, labels = [], [], [], []
    for number, line in enumerate(_read_text(path, "Hateful Memes list").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"line {number} of {path} is not valid JSON ({err.msg}); each line is one object "
                            f"with {', '.join(HATEMEMES_FIELDS)}.") from None
        if not isinstance(entry, dict):
            raise DataError(f"line {number} of {path} is not a JSON object; each line is one object "
                            f"with {', '.join(HATEMEMES_FIELDS)}.")
        if "label" not in entry:
            raise DataError(f"line {number} of {path} has no 'label' (the unlabelled test.jsonl of the challenge?); "
                            f"evaluate on test_seen.jsonl, which carries the labels.")
        lacking = [k for k in HATEMEMES_FIELDS if k not in entry]
        if lacking or entry["label"] not in (0, 1) or isinstance(entry["label"], bool):
            what = f"no {lacking[0]!r}" if lacking else f"label {entry['label']!r}"
            raise DataError(f"line {number} of {path} has {what}; each line needs id, img, label (0 or 1) and text.")
        image = os.path.join(root, str(entry["img"]))
        if not os.path.isfile(image):
            raise DataError(f"line {number} of {path} names the image {image}, which does not exist; "
                            f"put the img/ folder next to {os.path.basename(path)}.")
        _check_image_header(image)
        ids.append(str(entry["id"]))
        paths.append(image)
        texts.append(str(entry["text"]))
        labels.append(int(entry["label"]))
    return ids, paths, texts, labels


IMAGE_TEXT_READERS = {"mmimdb": mmimdb_samples, "food101": food101_samples, "hatememes": hatememes_samples}


def image_text_split(dataset, root, split, tokenizer, image_size=224, context_length=77):
    """One split ('train' / 'val' / 'test') of a real image-text dataset -> an ImageTextFiles."""
    if dataset not in IMAGE_TEXT_READERS:
        raise DataError(f"unknown image-text dataset {dataset!r}; choose one of {', '.join(IMAGE_TEXT_READERS)}.")
    if split not in ("train", "val", "test"):
        raise DataError(f"unknown split {split!r}; choose train, val or test.")
    if not os.path.isdir(root):
        raise DataError(f"data root {root} is not a folder; pass the folder that holds the {dataset} files.")
    own = split if dataset == "food101" else IMAGE_TEXT_SPLITS[dataset][split]
    ids, paths, texts, labels = IMAGE_TEXT_READERS[dataset](root, own)
    return ImageTextFiles(f"{dataset} {split} ({root})", ids, paths, texts, labels, tokenizer,
                          image_size, context_length)


# ----------------------------------------------------------------------------------------------
# Image-text: missing tables (MAP's protocol)
# ----------------------------------------------------------------------------------------------
# A missing table holds one code per sample: 0 complete, 1 text missing, 2 image missing. MAP draws
# it once per (split, type, rate), saves it and reuses it, so every method sees the same missing
# samples. kind 'text' / 'image': round(rate n) samples lack that modality; 'both' (MAP's default,
# rate 0.7): of the m = round(rate n) incomplete samples, m - floor(m / 2) lack text and floor(m / 2)
# lack the image (an odd m gives text the extra one, as MAP's int(m * 0.5) image-missing samples do);
# none lacks both. A missing text becomes "" (only the start and end tokens), a missing image a
# placeholder: "ones" (all ones after normalisation: MAP; AOEPT's ViLT path), "zeros" (zeros after
# normalisation: CMPT), "black" (a black image before normalisation, -mean / std: AOEPT's CLIP path).
# DEVIATION: MAP draws with Python's global `random` (seed 0) and floors rate * n; we draw from a
# torch.Generator seeded by `seed` and round, so our tables are not MAP's sample for sample (MAP
# ships none to compare with).
MISSING_TABLE_KINDS = ("text", "image", "both")
MISSING_CODES = {"complete": 0, "text": 1, "image": 2}
IMAGE_PLACEHOLDERS = ("ones", "zeros", "black")


def missing_table(n, kind, rate, seed=0):
    """-> (n,) long codes: 0 complete, 1 text missing, 2 image missing (see the section comment)."""
    if kind not in MISSING_TABLE_KINDS:
        raise DataError(f"unknown missing kind {kind!r}; choose one of {', '.join(MISSING_TABLE_KINDS)}.")
    if not 0 <= rate <= 1:
        raise DataError(f"a missing rate is a fraction in [0, 1], not {rate}; pass e.g. 0.7 for 70%.")
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=g)  # (n,)
    m = round(rate * n)
    table = torch.zeros(n, dtype=torch.long)  # (n,)
    if kind == "text":
        table[order[:m]] = MISSING_CODES["text"]
    elif kind == "image":
        table[order[:m]] = MISSING_CODES["image"]
    else:
        n_image = m // 2
        table[order[:m - n_image]] = MISSING_CODES["text"]
        table[order[m - n_image:m]] = MISSING_CODES["image"]
    return table


def missing_table_path(folder, dataset, split, kind, rate, seed):
    """<folder>/missing_<dataset>_<split>_<kind>_<rate in %>_seed<seed>.json, e.g. ..._both_70_seed0.json."""
    return os.path.join(folder, f"missing_{dataset}_{split}_{kind}_{100 * rate:g}_seed{seed}.json")


def load_or_make_missing_table(path, ids, kind, rate, seed=0):
    """The missing table for samples `ids` (kept as strings): read from `path` when it was made for
    the same ids and settings, else drawn and written (whole); a file made otherwise is refused."""
    ids = [str(i) for i in ids]
    settings = {"kind": kind, "rate": rate, "seed": seed}
    if os.path.exists(path):
        hint = "delete it or choose another folder for the missing tables."
        saved = _read_json_file(path, "missing table", hint)
        if not isinstance(saved, dict) or not all(k in saved for k in ("kind", "rate", "seed", "ids", "missing")):
            raise DataError(f"{path} is not a missing table (kind, rate, seed, ids, missing); {hint}")
        if {k: saved[k] for k in settings} != settings:
            raise DataError(f"missing table {path} was made for kind={saved['kind']}, rate={saved['rate']}, "
                            f"seed={saved['seed']}, not kind={kind}, rate={rate}, seed={seed}; {hint}")
        if saved["ids"] != ids:
            raise DataError(f"missing table {path} was made for other samples ({len(saved['ids'])} ids, not these "
                            f"{len(ids)}); {hint}")
        table = torch.tensor(saved["missing"], dtype=torch.long)
        if table.shape != (len(ids),) or not bool(((table >= 0) & (table <= 2)).all()):
            raise DataError(f"missing table {path} does not hold one code 0, 1 or 2 per sample; {hint}")
        return table
    table = missing_table(len(ids), kind, rate, seed)
    common.write_json(path, {**settings, "ids": ids, "missing": table.tolist()})
    return table


def missing_image(placeholder, shape, mean=CLIP_MEAN, std=CLIP_STD):
    """The normalised stand-in for a missing image, (3, H, W) float (see the section comment)."""
    if placeholder == "ones":
        return torch.ones(shape)
    if placeholder == "zeros":
        return torch.zeros(shape)
    if placeholder == "black":
        # a black image (0) through the normalisation: (0 - mean_c) / std_c per channel
        return (-torch.tensor(mean) / torch.tensor(std))[:, None, None].expand(shape).clone()
    raise DataError(f"unknown image placeholder {placeholder!r}; choose one of {', '.join(IMAGE_PLACEHOLDERS)}.")


def with_missing_table(dataset, missing, tokenizer, context_length=77, image_placeholder="ones"):
    """Items carry 'missing'; a missing text is the tokenised "" and a missing image the placeholder.
    In-memory AVTensors get new tensors; a dataset read from files is wrapped item by item."""
    missing = torch.as_tensor(missing, dtype=torch.long)
    if missing.shape != (len(dataset),):
        raise DataError(f"the missing table has {missing.numel()} codes for {len(dataset)} samples; "
                        f"make it for this split (same ids).")
    if not bool(((missing >= 0) & (missing <= 2)).all()):
        raise DataError("a missing table holds the codes 0 (complete), 1 (text missing) and 2 (image missing) only.")
    if image_placeholder not in IMAGE_PLACEHOLDERS:
        raise DataError(f"unknown image placeholder {image_placeholder!r}; choose one of "
                        f"{', '.join(IMAGE_PLACEHOLDERS)}.")
    empty_text = tokenizer([""], context_length)[0]  # (C,) [sot, eot, 0, ...]
    if not isinstance(dataset, AVTensors):
        return MissingImageText(dataset, missing, empty_text, image_placeholder)
    f = dataset.fields
    if f["text"].shape[1] != context_length:
        raise DataError(f"the texts have {f['text'].shape[1]} tokens, not context_length = {context_length}; "
                        f"pass the context length they were tokenised with.")
    blank = missing_image(image_placeholder, f["image"].shape[1:])  # (3, H, W)
    text = torch.where((missing == 1)[:, None], empty_text[None], f["text"])  # (N, C)
    image = torch.where((missing == 2)[:, None, None, None], blank[None].to(f["image"].dtype), f["image"])  # (N, 3, H, W)
    return dataset.with_fields(text=text, image=image, missing=missing)


class MissingImageText(torch.utils.data.Dataset):
    """A dataset read on demand, with text / image replaced per item as `with_missing_table` does."""

    def __init__(self, dataset, missing, empty_text, image_placeholder):
        self.dataset, self.missing, self.empty_text = dataset, missing, empty_text
        self.image_placeholder = image_placeholder

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        item = dict(self.dataset[i])
        if self.missing[i] == 1:
            item["text"] = self.empty_text.clone()
        if self.missing[i] == 2:
            item["image"] = missing_image(self.image_placeholder, item["image"].shape).to(item["image"].dtype)
        return {**item, "missing": self.missing[i]}


# ----------------------------------------------------------------------------------------------
# Making a corrupted set in READ's layout: `python data.py corrupt`
# ----------------------------------------------------------------------------------------------
# READ built Kinetics50-C / VGGSound-C from the clean clips with `make_corruptions/` (ImageNet-C per
# frame, saved as JPEG quality 85; the audio corruptions per WAV). This does the same with the
# corruptions above, from any clean READ-layout list:
#
#   <out>/clean/severity_0.json                       the clean list (absolute paths)
#   <out>/video/<corruption>/severity_<s>.json        video_path -> <out>/video/<corruption>/severity_<s>/
#   <out>/video/<corruption>/severity_<s>/frame_<i>/<video_id>.jpg
#   <out>/audio/<corruption>/severity_<s>.json        wav -> <out>/audio/<corruption>/severity_<s>/<video_id>.wav
#
# Frames are corrupted at their stored size (the spatial parameters scale with the height, see
# corrupt_video) and saved as JPEG quality 85. A WAV is corrupted at its own sample rate and written
# as 16-bit mono at that rate; a noise recording is averaged to mono and resampled to the clip's rate
# first, so a stereo 48 kHz recording does not change a mono 16 kHz clip's length (READ issue #13).
# Each file's randomness comes from (--seed, corruption, severity, clip, frame) through its own
# generator, so a resumed run (files already written are skipped) gives the same set as an
# uninterrupted one, whatever --batch-size and --workers. Frames are corrupted --batch-size at a time
# (one call per corruption and stored size; frame i draws from its own generator, `_draw`), by
# --workers processes with one thread each (the same arithmetic whatever their number).
# What a set shares, as READ's recordings and ImageNet-C's photographs are shared by every file: the
# frost stand-in's five ice textures (one bank per seed and frame size) and each procedural noise
# recording (NOISE_SECONDS long, one per seed, kind and sample rate, cut from its start or tiled).
JPEG_QUALITY = 85
CORRUPT_SETTINGS = "corrupt_settings.json"  # in <out>: what the set was made with, checked on resume
NOISE_SECONDS = 10  # length of a procedural noise recording (READ's clips last 10 s)
BATCH_SIZE = 4  # frames corrupted in one call (faster at 64 x 64; at 224 x 224 more is slower, cache)
WORKERS = min(4, os.cpu_count() or 1)  # processes of `python data.py corrupt`


def file_generator(seed, *parts):
    """A torch.Generator for one output file, seeded from `seed` and the file's names (crc32)."""
    return torch.Generator().manual_seed(seed * 2 ** 32 + zlib.crc32("/".join(map(str, parts)).encode()))


def clip_frames(entry):
    """[(i, path)] of the clip's frames <video_path>/frame_<i>/<video_id>.jpg that exist (READ stores 10)."""
    folder = entry["video_path"]
    if not os.path.isdir(folder):
        return []
    names = sorted((n for n in os.listdir(folder) if n.startswith("frame_") and n[6:].isdigit()), key=lambda n: int(n[6:]))
    paths = [(int(n[6:]), os.path.join(folder, n, entry["video_id"] + ".jpg")) for n in names]
    return [(i, p) for i, p in paths if os.path.isfile(p)]


_SHARED = {}  # the set's frost banks and noise recordings in this process, least recently used first


def _shared(key, make):
    """make() once per key in this process, keeping the 8 last used (a bank of 224 px frames is 24 MB)."""
    value = _SHARED.pop(key) if key in _SHARED else make()
    _SHARED[key] = value  # now the most recently used
    while len(_SHARED) > 8:
        del _SHARED[next(iter(_SHARED))]
    return value


def set_frost_bank(seed, size):
    """The frost stand-in's five ice textures for frames of `size` px of a set made with `seed`,
    shared by every frame (ImageNet-C crops each image's frost from the same five photographs)."""
    return _shared(("frost", seed, size), lambda: frost_bank(size, file_generator(seed, "frost", "bank", size)))


def set_noise_recording(seed, kind, sample_rate):
    """The procedural stand-in for READ's recording `kind` at sample_rate in a set made with `seed`:
    NOISE_SECONDS long, shared by every clip (READ overlays one recording on all of them)."""
    return _shared(("noise", seed, kind, sample_rate), lambda: noise_stand_in(
        kind, NOISE_SECONDS * sample_rate, file_generator(seed, kind, "recording", sample_rate), sample_rate))


def corrupt_frame_files(files, name, severity, seed, frost_dir=None):
    """Corrupt frame files [(src, dst, video_id, frame_index)] at their stored sizes, one batch per
    size, and write each as JPEG quality 85 (whole or not at all). Frame (video_id, i) draws from
    file_generator(seed, name, severity, video_id, i) alone: its file is the same in any batch."""
    images = [read_image(src) for src, _, _, _ in files]                   # uint8 (3, H, W) each
    by_size = {}
    for k, image in enumerate(images):
        by_size.setdefault(tuple(image.shape[-2:]), []).append(k)
    for (h, w), ks in by_size.items():
        frames = torch.stack([images[k] for k in ks]).float() / 255       # (n, 3, H, W) in [0, 1]
        generators = [file_generator(seed, name, severity, files[k][2], files[k][3]) for k in ks]
        bank = set_frost_bank(seed, max(h, w)) if name == "frost" and frost_dir is None else None
        out = corrupt_video(frames, name, severity, generator=generators, frost_dir=frost_dir, frost_bank=bank)
        u8 = (out * 255).round().clamp(0, 255).to(torch.uint8)            # (n, 3, H, W)
        for k, jpeg in zip(ks, vision().io.encode_jpeg(list(u8), quality=JPEG_QUALITY)):
            common.atomic_write(files[k][1], lambda tmp: vision().io.write_file(tmp, jpeg))


def corrupt_wav_files(files, name, severity, seed, noise_dir=None):
    """Corrupt WAVs [(src, dst, video_id, None)] each at its own rate (mono) and write them as 16-bit
    mono PCM (whole or not at all); clip video_id draws from file_generator(seed, name, severity, video_id)."""
    for src, dst, video_id, _ in files:
        wav, rate = read_wav(src)                                          # (T,), stereo averaged
        # DEVIATION: without noise_dir a procedural recording, one per set as READ's (set_noise_recording)
        noise = set_noise_recording(seed, name, rate) if name != "gaussian_noise" and noise_dir is None else None
        out = corrupt_audio(wav[None], name, severity, generator=file_generator(seed, name, severity, video_id),
                            noise_dir=noise_dir, sample_rate=rate, noise=noise)[0]
        common.atomic_write(dst, lambda tmp: write_wav(tmp, out.clamp(-1, 1), rate))


def _corrupt_batch(job):
    """One batch of files of one corruption (run in a worker): -> (its list's key, files written)."""
    key, modality, name, severity, files, seed, noise_dir, frost_dir = job
    if modality == "video":
        corrupt_frame_files(files, name, severity, seed, frost_dir)
    else:
        corrupt_wav_files(files, name, severity, seed, noise_dir)
    return key, len(files)


def _exit_on_terminate(signum, frame):
    raise SystemExit(1)  # a BaseException: atomic_write removes its temp file on the way out


def _init_worker(*task):
    """A worker computes with one thread and starts no pool of its own; Ctrl-C is the main process's to
    handle, which then ends the pool (SIGTERM), and a file being written is removed, not left
    half-written. task: parallel_fill's (fn, jobs, dests), inherited through the fork."""
    global _IN_WORKER
    _IN_WORKER = True
    if task:
        _FILL["task"] = task
    torch.set_num_threads(1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _exit_on_terminate)


def _run_batches(jobs, workers):
    """Yield _corrupt_batch(job) for every job, in this process or in a pool of `workers` processes
    (spawned, one thread each), as each batch is done."""
    if workers <= 1 or len(jobs) <= 1:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # the workers' arithmetic, so the files do not depend on --workers
        try:
            for job in jobs:
                yield _corrupt_batch(job)
        finally:
            torch.set_num_threads(threads)
        return
    with multiprocessing.get_context("spawn").Pool(min(workers, len(jobs)), initializer=_init_worker) as pool:
        yield from pool.imap_unordered(_corrupt_batch, jobs)
        pool.close()  # done: the workers exit on their own (leaving the block early terminates them)
        pool.join()


def _absolute(entry):
    return {**entry, "wav": os.path.abspath(entry["wav"]), "video_path": os.path.abspath(entry["video_path"]) + os.sep}


def make_corrupted_set(json_path, out, video=(), audio=(), severities=(5,), noise_dir=None, frost_dir=None,
                       seed=0, train_json=None, quiet=False, batch_size=BATCH_SIZE, workers=1):
    """Write the corrupted copies of the clips in `json_path` in READ's layout under `out` (see above),
    `batch_size` files per call, in `workers` processes; the files do not depend on either.
    Returns {'written': n, 'skipped_existing': n, 'clips_without_files': {list: n}}."""
    if batch_size < 1 or workers < 1:
        raise ValueError(f"batch_size {batch_size} and workers {workers} must both be at least 1.")
    out = os.path.abspath(out)
    entries = [_absolute(e) for e in read_json_list(json_path)]
    settings = {"source": os.path.abspath(json_path), "seed": seed, "jpeg_quality": JPEG_QUALITY,
                "noise_dir": os.path.abspath(noise_dir) if noise_dir else None,
                "frost_dir": os.path.abspath(frost_dir) if frost_dir else None}
    settings_path = os.path.join(out, CORRUPT_SETTINGS)
    if os.path.isfile(settings_path):
        with open(settings_path) as f:
            try:
                before = json.load(f)
            except json.JSONDecodeError:
                before = None
        if before != settings:
            raise DataError(f"{out} holds a corrupted set made with other settings ({settings_path}); resume with the "
                            f"same --json, --seed, --noise-dir and --frost-dir, or choose another --out.")
    common.write_json(settings_path, settings)
    common.write_json(os.path.join(out, "clean", "severity_0.json"), {"data": entries})
    if train_json:  # BriMPR's layout keeps the clean training list beside it (its source statistics)
        common.write_json(os.path.join(out, "clean", "train.json"),
                          {"data": [_absolute(e) for e in read_json_list(train_json)]})
    frames = {e["video_id"]: clip_frames(e) for e in entries} if video else {}
    with_wav = [e for e in entries if os.path.isfile(e["wav"])]
    report = {"written": 0, "skipped_existing": 0, "clips_without_files": {}}
    # every list, the clips it names, and the batches of its files not yet on disk
    lists, jobs, pending = {}, [], {}
    for modality, names in (("video", video), ("audio", audio)):
        for name in names:
            for s in severities:
                key = f"{modality}/{name}/severity_{s}"
                folder = os.path.join(out, modality, name, f"severity_{s}")
                listed, todo = [], []
                for e in (entries if modality == "video" else with_wav):
                    if modality == "video":
                        files = [(src, os.path.join(folder, f"frame_{i}", e["video_id"] + ".jpg"), e["video_id"], i)
                                 for i, src in frames[e["video_id"]]]
                        if files:
                            listed.append({**e, "video_path": folder + os.sep})
                    else:
                        files = [(e["wav"], os.path.join(folder, e["video_id"] + ".wav"), e["video_id"], None)]
                        listed.append({**e, "wav": files[0][1]})
                    for f in files:
                        if os.path.isfile(f[1]):
                            report["skipped_existing"] += 1
                        else:
                            todo.append(f)
                lists[key] = listed
                report["clips_without_files"][key] = len(entries) - len(listed)
                batches = [todo[k:k + batch_size] for k in range(0, len(todo), batch_size)]
                jobs += [(key, modality, name, s, b, seed, noise_dir, frost_dir) for b in batches]
                pending[key] = len(batches)

    def write_list(key):
        common.write_json(os.path.join(out, key + ".json"), {"data": lists[key]})

    for key in [k for k, n in pending.items() if n == 0]:  # every file already there
        write_list(key)
    bar = tqdm(total=report["skipped_existing"] + sum(len(j[4]) for j in jobs), initial=report["skipped_existing"],
               desc="corrupting", unit="file", disable=quiet, dynamic_ncols=True)
    try:
        for key, written in _run_batches(jobs, workers):
            report["written"] += written
            bar.update(written)
            pending[key] -= 1
            if pending[key] == 0:  # a list is written once all its files are
                write_list(key)
    finally:
        bar.close()  # before any error message
    return report


def _names(values, valid, kind):
    """--video / --audio values ('all', 'none', names, comma-separated lists) -> names in table order."""
    names = [n.strip() for v in values for n in v.split(",") if n.strip()]
    if names == ["none"]:
        return []
    if names == ["all"]:
        return list(valid)
    bad = [n for n in names if n not in valid]
    if bad:
        raise DataError(f"unknown {kind} corruption {bad[0]!r}; choose 'all', 'none' or names from: {', '.join(valid)}.")
    return [n for n in valid if n in names]


def build_parser():
    p = argparse.ArgumentParser(
        prog="python data.py", description="Data tools. `corrupt`: write corrupted copies of a clean READ-layout "
        "list in READ's layout (Kinetics50-C / VGGSound-C style), with this project's corruptions.")
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("corrupt", help="make a corrupted set in READ's layout from a clean list",
                       description="Write <out>/clean/severity_0.json, <out>/video/<c>/severity_<s>.json with JPEG "
                       "frames and <out>/audio/<c>/severity_<s>.json with WAVs. Resumable: files already written "
                       "are skipped; every file is written whole or not at all.")
    c.add_argument("--json", required=True, help="clean READ-layout list {'data': [{video_id, wav, video_path, labels}]} "
                                                 "(required)")
    c.add_argument("--out", required=True, help="output folder, created if needed (required)")
    c.add_argument("--video", nargs="+", default=["all"],
                   help=f"video corruptions: all, none, or names ({', '.join(VIDEO_CORRUPTIONS)}) (default: all)")
    c.add_argument("--audio", nargs="+", default=["all"],
                   help=f"audio corruptions: all, none, or names ({', '.join(AUDIO_CORRUPTIONS)}) (default: all)")
    c.add_argument("--severities", nargs="+", default=["5"], help="severities 1..5 (default: 5, the papers' protocol)")
    c.add_argument("--noise-dir", default=None, help="folder with traffic/crowd/rain/thunder/wind.wav, any rate and "
                                                     "channel count (default: none, procedural stand-ins)")
    c.add_argument("--frost-dir", default=None, help="folder of frost photographs, jpg/png (default: none, procedural "
                                                     "stand-in)")
    c.add_argument("--seed", default="0", help="seed of the corruptions' randomness, 0 .. 2^32-1 (default: 0)")
    c.add_argument("--train-json", default=None, help="clean training list to copy to <out>/clean/train.json, where "
                                                      "adapt.py looks for BriMPR's source clips (default: none)")
    c.add_argument("--batch-size", default=str(BATCH_SIZE), help=f"frames corrupted in one call; the files do not "
                   f"depend on it (default: {BATCH_SIZE})")
    c.add_argument("--workers", default=str(WORKERS), help=f"processes corrupting in parallel, one thread each; the "
                   f"files do not depend on it (default: {WORKERS}, the cores of this machine up to 4)")
    return p


def _check_corrupt_args(args):
    """Every argument of `corrupt`, checked before any file is written: one sentence per problem."""
    video = _names(args.video, VIDEO_CORRUPTIONS, "video")
    audio = _names(args.audio, AUDIO_CORRUPTIONS, "audio")
    if not video and not audio:
        raise DataError("--video none and --audio none leave nothing to do; name at least one corruption.")
    try:
        severities = sorted({int(s) for s in args.severities})
    except ValueError:
        raise DataError(f"--severities {' '.join(args.severities)}: severities are whole numbers 1..5.") from None
    if any(s not in SEVERITIES for s in severities):
        raise DataError(f"--severities {' '.join(args.severities)} is out of range; valid severities are 1, 2, 3, 4, 5.")
    if not args.seed.isdigit() or int(args.seed) >= 2 ** 32:
        raise DataError(f"--seed {args.seed}: a seed is a whole number from 0 to {2 ** 32 - 1}.")
    for flag, value in (("--batch-size", args.batch_size), ("--workers", args.workers)):
        if not value.isdigit() or int(value) < 1:
            raise DataError(f"{flag} {value}: give a whole number of at least 1.")
    read_json_list(args.json)
    if args.train_json:
        read_json_list(args.train_json)
    kinds = [k for k in audio if k != "gaussian_noise"]
    if args.noise_dir:
        if not os.path.isdir(args.noise_dir):
            raise DataError(f"--noise-dir {args.noise_dir} is not a folder; pass the folder with <kind>.wav.")
        for k in kinds:
            check_input_file(os.path.join(args.noise_dir, f"{k}.wav"), "noise recording",
                             f"--noise-dir needs {', '.join(k + '.wav' for k in kinds)}.")
            wav_info(os.path.join(args.noise_dir, f"{k}.wav"))
    if args.frost_dir and not os.path.isdir(args.frost_dir):
        raise DataError(f"--frost-dir {args.frost_dir} is not a folder; pass a folder of frost photographs (jpg/png).")
    common.check_output_folder(args.out, "--out")
    return video, audio, severities


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        video, audio, severities = _check_corrupt_args(args)
        report = make_corrupted_set(args.json, args.out, video, audio, severities, args.noise_dir, args.frost_dir,
                                    int(args.seed), args.train_json, batch_size=int(args.batch_size),
                                    workers=int(args.workers))
    except (DataError, ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {common.error_sentence(e)}")
    except KeyboardInterrupt:
        sys.exit(f"interrupted: every file written so far in {args.out} is complete and the JSON lists of finished "
                 f"corruptions are written; run the same command again to continue (written files are skipped).")
    missing = {k: v for k, v in report["clips_without_files"].items() if v}
    print(f"wrote {report['written']} files, kept {report['skipped_existing']} already there, in {args.out}"
          + (f"; clips left out for lack of frames or WAV: {missing}" if missing else ""))
    return report


if __name__ == "__main__":
    main()
