"""Test-time adaptation runner: `python adapt.py --method NAME`, the papers' protocol, a paired table.

    python adapt.py --method brimpr                        # 15 video corruptions, severity 5, 1 seed
    python adapt.py --method read --modality audio --seeds 1 2 3
    python adapt.py --method abpem --modality both --corruption gaussian_noise+wind
    python adapt.py --method tent --continual              # all corruption types in one stream, no reset
    python adapt.py --method brimpr --data read --data-root json_csv_files/ks50 \\
        --label-csv class_labels_indices_ks50.csv --checkpoint cav_mae_ks50.pth --config base --dataset ks50

Protocol (READ, ABPEM, BriMPR): severity 5; one corruption type at a time; the model and the
optimiser are reset between corruption types (and seeds); one online pass over the shuffled test
stream; accuracy averaged over batches, then over seeds, then over corruption types. Source (the
frozen model) is evaluated on the very same batches, so every row is a paired comparison.

A method is anything with `BATCH_SIZE` (an int, or a dict by dataset name) and `setup(model, ctx)`
returning an adapter: `adapter(batch) -> logits` adapts on the batch and returns the prediction
the paper reports; `adapter.reset()` restores the start; `adapter.losses` holds the last loss
terms (a dict of floats, for the progress bar). Source, Tent and READ are written in this file;
`abpem.py` and `brimpr.py` are modules with the same two names.
"""
import argparse
import copy
import importlib
import math
import os
import sys
import time
from types import SimpleNamespace

import numpy as np
import torch
from tqdm import tqdm

import common
import data
import train


# ----------------------------------------------------------------------------------------------
# Baseline losses
# ----------------------------------------------------------------------------------------------
def softmax_entropy(logits):
    """Shannon entropy of softmax(logits) per sample: -sum_k p_k log p_k. (B, K) -> (B,)."""
    # Tent's loss: H(p) = -sum_k p_k log p_k
    return -(logits.softmax(1) * logits.log_softmax(1)).sum(1)


def read_confidence_loss(logits, gamma=math.exp(-1)):
    """READ Eq. 6: (1/B) sum_i p_i log(e * gamma / p_i), p_i the max softmax probability. -> scalar."""
    p = logits.softmax(1).max(1).values  # (B,)
    # Eq. (6) with gamma = e^-1 this is the mean of -p log p: confident samples pushed up, others down
    return (p * torch.log(math.e * gamma / p)).mean()


def read_balance_loss(logits):
    """READ Eq. 7: c_k = sum_i p_ik, s = softmax(c), L_bal = sum_k s_k log s_k (minus the entropy of s)."""
    c = logits.softmax(1).sum(0)  # (K,)
    # Eq. (7) L_bal = sum_k s_k log s_k, s = softmax(sum_i p_i)
    return (c.softmax(0) * c.log_softmax(0)).sum()


# ----------------------------------------------------------------------------------------------
# Baselines
# ----------------------------------------------------------------------------------------------
class Source:
    """The source model, frozen, no adaptation."""
    BATCH_SIZE = 64

    def __init__(self, model):
        self.model, self.losses = model.eval(), {}

    @classmethod
    def setup(cls, model, ctx):
        return cls(model)

    @torch.no_grad()
    def __call__(self, batch):
        return self.model(batch["audio"], batch["video"])

    def reset(self):
        pass


class Episodic:
    """Keeps a copy of the model's and the optimiser's starting state; reset() restores both (tent style)."""

    def __init__(self, model, params):
        self.model, self.losses = model.eval(), {}
        for p in model.parameters():
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        self.optimizer = torch.optim.Adam(params, lr=1e-4, betas=(0.9, 0.999), weight_decay=0.0)
        self.model_state = copy.deepcopy(model.state_dict())
        self.optimizer_state = copy.deepcopy(self.optimizer.state_dict())

    def reset(self):
        self.model.load_state_dict(self.model_state, strict=True)
        self.optimizer.load_state_dict(copy.deepcopy(self.optimizer_state))


class Tent(Episodic):
    """Tent (Wang et al., ICLR 2021, DequanWang/tent): minimise the mean prediction entropy, updating
    every LayerNorm's affine parameters, one step per batch; the prediction is that forward's output.
    Adam 1e-4 and batch 64 as the multimodal papers run it."""
    BATCH_SIZE = 64

    @classmethod
    def setup(cls, model, ctx):
        params = [p for m in model.modules() if isinstance(m, torch.nn.LayerNorm) for p in (m.weight, m.bias)]
        return cls(model, params)

    def __call__(self, batch):
        logits = self.model(batch["audio"], batch["video"])
        loss = softmax_entropy(logits).mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.losses = {"entropy": loss.item()}
        return logits.detach()


class READ(Episodic):
    """READ (Yang et al., ICLR 2024, XLearning-SCU/2024-ICLR-READ): update only the unified block's
    attention q, k, v projections with the confidence-aware loss (Eq. 6) plus the balance term
    (Eq. 7); Adam 1e-4, batch 64; the prediction is a second forward after the update (public code).

    The encoders are frozen, so their outputs are computed once per batch and reused by both passes
    through the unified block. Updating `qkv` in place is the same parameter set as READ's copy of
    it into separate q, k, v Linears.
    """
    BATCH_SIZE = 64

    @classmethod
    def setup(cls, model, ctx):
        qkv = model.blocks_u[0].attn.qkv
        return cls(model, [qkv.weight, qkv.bias])

    def __call__(self, batch):
        with torch.no_grad():
            z_a, z_v = self.model.encode(batch["audio"], batch["video"])  # frozen: (B, N_a, D), (B, N_v, D)
        logits = self.model.classify(self.model.fuse(z_a, z_v))
        l_ra, l_bal = read_confidence_loss(logits), read_balance_loss(logits)
        loss = l_ra + l_bal
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.losses = {"ra": l_ra.item(), "bal": l_bal.item()}
        with torch.no_grad():
            return self.model.classify(self.model.fuse(z_a, z_v))


METHODS = {"source": Source, "tent": Tent, "read": READ, "abpem": "abpem", "brimpr": "brimpr"}


def get_method(name):
    m = METHODS[name]
    return importlib.import_module(m) if isinstance(m, str) else m


# ----------------------------------------------------------------------------------------------
# Streams
# ----------------------------------------------------------------------------------------------
def corruption_list(modality, corruption):
    """The corruption types to run: names, or 'video+audio' pairs for --modality both."""
    if modality == "both":
        pairs = [f"{v}+{a}" for v in data.VIDEO_CORRUPTIONS for a in data.AUDIO_CORRUPTIONS]
        valid, names = pairs, "'<video corruption>+<audio corruption>', e.g. gaussian_noise+wind"
    else:
        valid = list(data.VIDEO_CORRUPTIONS if modality == "video" else data.AUDIO_CORRUPTIONS)
        names = ", ".join(valid)
    if corruption == "all":
        return valid
    chosen = [c.strip() for c in corruption.split(",")]
    bad = [c for c in chosen if c not in valid]
    if bad:
        raise ValueError(f"unknown {modality} corruption {bad[0]!r}; choose 'all' or one of {names}.")
    twice = next((c for c in chosen if chosen.count(c) > 1), None)
    if twice:
        raise ValueError(f"--corruption names {twice} twice; give each corruption once.")
    return chosen


def test_set(args, model, corruption):
    """The corrupted test set for one corruption type (video, audio, or a 'video+audio' pair)."""
    vc = ac = None
    if args.modality == "both":
        vc, ac = corruption.split("+")
    elif args.modality == "video":
        vc = corruption
    else:
        ac = corruption
    if args.data == "embedded":
        return data.embedded_split("test", model, seed=args.data_seed, video_corruption=vc, audio_corruption=ac,
                                   severity=args.severity, frost_dir=args.frost_dir, noise_dir=args.noise_dir)
    return data.read_layout_split(args.data_root, args.label_csv, model, vc, ac, args.severity)


def source_json(args):
    """The clean training list of the READ layout (public BriMPR code: <root>/clean/train.json)."""
    return args.source_json or os.path.join(args.data_root, "clean", "train.json")


def source_batch_fn(args, model, device):
    """ctx.source_batch(n, seed): n random clean training clips (BriMPR's source statistics)."""
    def source_batch(n, seed=0):
        if args.data == "embedded":
            ds = data.embedded_split("train", model, seed=args.data_seed)
        else:
            path = source_json(args)
            if not os.path.isfile(path):
                raise data.DataError(f"{path} does not exist: this method needs clean training clips for its source "
                                     f"statistics; pass a READ-format training list with --source-json.")
            ds = data.ReadLayoutDataset(path, args.label_csv, model.mel_bins, model.audio_length, model.image_size)
        if len(ds) < 2:
            raise data.DataError(f"the source list has {len(ds)} usable clip(s); source statistics need at least 2 "
                                 f"({n} by default); pass a larger clean training list with --source-json.")
        if len(ds) < n:
            tqdm.write(f"[source] only {len(ds)} clean clips for the source statistics ({n} asked for)")
        idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))[:n]
        return data.to_device(torch.utils.data.default_collate([ds[int(i)] for i in idx]), device)
    return source_batch


# ----------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------
def load_model(args, device):
    """The source model: --checkpoint, or the default embedded one (trained first if missing or unreadable).
    A model trained on another seed of the embedded benchmark is refused, as train.py does."""
    if args.checkpoint:
        model, meta = common.load_checkpoint(args.checkpoint, config=args.config, device=device)
    elif args.data != "embedded":
        raise ValueError("--data read needs --checkpoint (your CAV-MAE fine-tuned checkpoint) and --config.")
    else:
        model, meta = train.default_source(args.config or "tiny", args.data_seed, device)
    if args.data == "embedded":
        train.check_data_seed(args.checkpoint or train.default_checkpoint("embedded", args.config or "tiny"),
                              meta, args.data_seed)
    return model, meta


def run(args):
    device = common.get_device(args.device)
    method = get_method(args.method)
    corruptions = corruption_list(args.modality, args.corruption)
    model, meta = load_model(args, device)
    dataset = args.dataset or ("embedded" if args.data == "embedded" else None)
    if dataset is None:
        raise ValueError("--data read needs --dataset ks50 or vggsound (it picks the papers' per-dataset settings).")
    num_classes = data.EMBEDDED["num_classes"] if args.data == "embedded" else len(data.read_label_csv(args.label_csv))
    if model.num_classes != num_classes:
        raise ValueError(f"the checkpoint has {model.num_classes} classes but the data has {num_classes}; "
                         f"use the checkpoint trained on this dataset.")
    bs = args.batch_size
    if bs is None:
        bs = method.BATCH_SIZE[dataset] if isinstance(method.BATCH_SIZE, dict) else method.BATCH_SIZE
    ckpt = args.checkpoint or train.default_checkpoint("embedded", args.config or "tiny")
    ctx = SimpleNamespace(dataset=dataset, modality=args.modality, num_classes=model.num_classes, device=device,
                          continual=args.continual, cache_prefix=os.path.splitext(ckpt)[0],
                          data_seed=args.data_seed, use_cache=args.use_cache,
                          source_id="embedded" if args.data == "embedded" else os.path.abspath(source_json(args)),
                          source_batch=source_batch_fn(args, model, device))
    source = Source(model)
    adapter = method.setup(copy.deepcopy(model), ctx)
    paired = args.method != "source"

    acc = {c: {"source": [], args.method: []} for c in corruptions}  # per corruption, one value per seed
    time_src = time_method = 0.0
    n_batches = n_samples = 0
    t_start = time.time()
    sets = {}

    def stream(corruption, seed, reset):
        nonlocal time_src, time_method, n_batches, n_samples
        if corruption not in sets:
            sets[corruption] = test_set(args, model, corruption)
        if reset:
            adapter.reset()
        loader = data.make_loader(sets[corruption], bs, shuffle=True, seed=seed, num_workers=args.workers)
        accs_s, accs_m = [], []
        bar = tqdm(loader, desc=f"{corruption} (seed {seed})", leave=False, dynamic_ncols=True)
        for batch in bar:
            batch = data.to_device(batch, device)
            y = batch["label"]
            t0 = time.perf_counter()
            logits_s = source(batch) if paired else None
            t1 = time.perf_counter()
            logits_m = adapter(batch)
            t2 = time.perf_counter()
            time_src, time_method = time_src + (t1 - t0), time_method + (t2 - t1)
            n_batches, n_samples = n_batches + 1, n_samples + len(y)
            accs_m.append(100.0 * (logits_m.argmax(1) == y).float().mean().item())
            accs_s.append(100.0 * (logits_s.argmax(1) == y).float().mean().item() if paired else accs_m[-1])
            shown = {"source": f"{np.mean(accs_s):.1f}", args.method: f"{np.mean(accs_m):.1f}"}
            bar.set_postfix({**shown, **{k: f"{v:.3f}" for k, v in adapter.losses.items()}})
        acc[corruption]["source"].append(float(np.mean(accs_s)))
        acc[corruption][args.method].append(float(np.mean(accs_m)))
        tqdm.write(f"{corruption:<32} seed {seed}: source {np.mean(accs_s):5.1f}  {args.method} {np.mean(accs_m):5.1f}")

    if args.continual:  # one stream per seed through every corruption type, reset only at the start
        for seed in args.seeds:
            common.seed_everything(seed)
            for i, c in enumerate(corruptions):
                stream(c, seed, reset=(i == 0))
    else:
        for c in corruptions:
            for seed in args.seeds:
                common.seed_everything(seed)
                stream(c, seed, reset=True)
            sets.pop(c)  # the corrupted set is the same for every seed; free it once they are done

    wall = time.time() - t_start
    columns = ["source", args.method] if paired else ["source"]
    print(results_table(acc, columns, len(args.seeds)))
    ratio = time_method / time_src if paired and time_src > 0 else float("nan")
    timing = (f"source forward {1000 * time_src / n_batches:.1f} ms, {args.method} "
              f"{1000 * time_method / n_batches:.1f} ms ({ratio:.2f}x)") if paired else \
        f"source forward {1000 * time_method / n_batches:.1f} ms"
    print(f"{n_samples} samples in {wall:.1f} s ({n_samples / wall:.1f} samples/s); per batch of {bs}: {timing}")
    out = args.results or os.path.join(train.RESULTS_DIR, f"adapt_{args.method}_{args.modality}.json")
    summary = {c: {k: {"mean": float(np.mean(v)), "std": float(np.std(v)), "per_seed": v} for k, v in d.items()}
               for c, d in acc.items()}
    avg = {k: float(np.mean([np.mean(acc[c][k]) for c in corruptions])) for k in columns}
    common.write_json(out, {"args": vars(args), "batch_size": bs, "accuracy": summary, "average": avg,
                           "wall_seconds": wall, "samples_per_second": n_samples / wall,
                           "ms_per_batch": {"source": 1000 * time_src / n_batches,
                                            args.method: 1000 * time_method / n_batches},
                           "time_ratio_to_source": ratio})
    print(f"wrote {out}")
    return avg, summary


def results_table(acc, columns, n_seeds):
    """Rows = corruption types, columns = methods (mean over seeds, +/- std over seeds), then the average."""
    def cell(v):
        return f"{np.mean(v):5.1f}" + (f" +/- {np.std(v):4.1f}" if n_seeds > 1 else "")
    w = max(24, max(len(c) for c in acc) + 2)
    cw = 16 if n_seeds > 1 else 9
    lines = [f"{'corruption':<{w}}" + "".join(f"{c:>{cw}}" for c in columns), "-" * (w + cw * len(columns))]
    for c, d in acc.items():
        lines.append(f"{c:<{w}}" + "".join(f"{cell(d[k]):>{cw}}" for k in columns))
    lines.append("-" * (w + cw * len(columns)))
    mean_over_seeds = {k: [np.mean([acc[c][k][s] for c in acc]) for s in range(n_seeds)] for k in columns}
    lines.append(f"{'average':<{w}}" + "".join(f"{cell(mean_over_seeds[k]):>{cw}}" for k in columns))
    return "\n".join(lines)


def method_names():
    """'source, tent, read, ...': the methods of --method, for --help."""
    return ", ".join(METHODS)


def batch_sizes():
    """'source 64, ..., abpem 8 (ks50) / 32 (vggsound) / 8 (embedded), ...': each method's BATCH_SIZE, for --help."""
    def show(b):
        return " / ".join(f"{v} ({k})" for k, v in b.items()) if isinstance(b, dict) else str(b)
    return ", ".join(f"{name} {show(get_method(name).BATCH_SIZE)}" for name in METHODS)


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", default="brimpr", choices=list(METHODS),
                   help=f"adaptation method, one of: {method_names()} (default: brimpr)")
    p.add_argument("--modality", default="video", choices=["video", "audio", "both"],
                   help="which modality is corrupted (both: every video corruption paired with every audio one) "
                        "(default: video)")
    p.add_argument("--corruption", default="all",
                   help="'all', a corruption name, or a comma-separated list; video: "
                        f"{', '.join(data.VIDEO_CORRUPTIONS)}; audio: {', '.join(data.AUDIO_CORRUPTIONS)}; "
                        "both: video+audio pairs (default: all)")
    p.add_argument("--severity", type=int, default=5, choices=[1, 2, 3, 4, 5], help="corruption severity (default: 5)")
    p.add_argument("--seeds", type=train.seed_int, nargs="+", default=[1],
                   help="seeds (stream order, masks), distinct; results are averaged (default: 1)")
    p.add_argument("--batch-size", type=train.positive_int, default=None,
                   help=f"test batch size (default: the method paper's: {batch_sizes()})")
    p.add_argument("--use-cache", action="store_true",
                   help="ABPEM only: the public code's feature cache of recent batches (default: off; not in the paper)")
    p.add_argument("--continual", action="store_true",
                   help="all corruption types in one stream, no reset between them (default: off, reset per type)")
    p.add_argument("--data", default="embedded", choices=["embedded", "read"],
                   help="embedded benchmark (generated locally) or Kinetics50-C / VGGSound-C in READ's file layout "
                        "(default: embedded)")
    p.add_argument("--dataset", default=None, choices=["ks50", "vggsound", "embedded"],
                   help="picks the papers' per-dataset hyper-parameters (default: embedded; required with --data read)")
    p.add_argument("--data-root", default=None,
                   help="--data read: folder with clean/, video/, audio/ JSON lists (default: none, required)")
    p.add_argument("--label-csv", default=None,
                   help="--data read: class_labels_indices CSV, indices 0..K-1 (default: none, required)")
    p.add_argument("--source-json", default=None, help="--data read: clean training list for BriMPR's source "
                                                       "statistics (default: <data-root>/clean/train.json)")
    p.add_argument("--checkpoint", default=None, help="source checkpoint (default: checkpoints/embedded_<config>.pt, "
                                                      "trained on the fly if missing; required with --data read)")
    p.add_argument("--config", default=None, choices=list(common.CONFIGS),
                   help="model configuration of a published checkpoint; ours carry their own (default: the "
                        "checkpoint's own; tiny for the default checkpoint; base for a bare state dict)")
    p.add_argument("--data-seed", type=train.seed_int, default=0,
                   help="seed of the embedded benchmark; must match the checkpoint's (default: 0)")
    p.add_argument("--frost-dir", default=None,
                   help="--data embedded: folder of real frost photographs (default: none, procedural stand-in)")
    p.add_argument("--noise-dir", default=None, help="--data embedded: folder with traffic/crowd/rain/thunder/wind.wav "
                                                     "(default: none, procedural stand-ins)")
    p.add_argument("--results", default=None, help="results JSON (default: a file in results/ named after the "
                                                   "method and modality)")
    p.add_argument("--workers", type=train.non_negative_int, default=0,
                   help="DataLoader workers, useful with --data read (default: 0)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available, else cpu)")
    return p


def check_args(args, parser):
    """Every check that needs no model or data work, before run() starts: one sentence per problem."""
    common.get_device(args.device)
    given = lambda name: getattr(args, name) != parser.get_default(name)  # noqa: E731
    if len(set(args.seeds)) != len(args.seeds):
        raise SystemExit(f"error: --seeds {' '.join(map(str, args.seeds))} repeats a seed; give each seed once.")
    if args.use_cache and args.method != "abpem":
        raise SystemExit(f"error: --use-cache is ABPEM's feature cache; --method {args.method} has none.")
    if args.data == "read":
        if not (args.data_root and args.label_csv):
            raise SystemExit("error: --data read needs --data-root (the folder with clean/, video/, audio/) and --label-csv.")
        if args.frost_dir or args.noise_dir:
            raise SystemExit("error: --frost-dir and --noise-dir apply to --data embedded only "
                             "(READ's files are corrupted already; make corrupted copies with `python data.py corrupt`).")
        if not os.path.isdir(args.data_root):
            raise SystemExit(f"error: --data-root {args.data_root} is not a folder; pass the folder with clean/, "
                             f"video/ and audio/.")
        if not args.checkpoint:
            raise SystemExit("error: --data read needs --checkpoint: a CAV-MAE model fine-tuned on that dataset "
                             "(a published one with --config base, or one from `python train.py --data read`).")
        if not args.dataset:
            raise SystemExit("error: --data read needs --dataset ks50 or vggsound (it picks the papers' per-dataset "
                             "settings).")
        data.read_label_csv(args.label_csv)
        if args.source_json:
            data.check_input_file(args.source_json, "--source-json", "pass a READ-format clean training list.")
    else:
        ignored = [f"--{n.replace('_', '-')}" for n in ("data_root", "label_csv", "source_json") if given(n)]
        if ignored:
            raise SystemExit(f"error: {ignored[0]} applies to --data read only; add --data read to use your files.")
    if args.frost_dir and not os.path.isdir(args.frost_dir):
        raise SystemExit(f"error: --frost-dir {args.frost_dir} is not a folder; pass a folder of frost photographs (jpg/png).")
    chosen = corruption_list(args.modality, args.corruption)  # unknown names end here, before any work
    if args.noise_dir:
        if not os.path.isdir(args.noise_dir):
            raise SystemExit(f"error: --noise-dir {args.noise_dir} is not a folder; pass the folder with <kind>.wav.")
        kinds = {c.split("+")[-1] for c in chosen} & set(data.AUDIO_CORRUPTIONS[1:])
        missing = sorted(k for k in kinds if not os.path.isfile(os.path.join(args.noise_dir, f"{k}.wav")))
        if args.modality != "video" and missing:
            raise SystemExit(f"error: --noise-dir {args.noise_dir} has no {missing[0]}.wav; it needs <kind>.wav for "
                             f"{', '.join(sorted(kinds))}.")
        for k in sorted(kinds) if args.modality != "video" else []:
            data.wav_info(os.path.join(args.noise_dir, f"{k}.wav"))
    if args.results:
        common.check_output_file(args.results, "--results")
    else:
        common.check_output_folder(train.RESULTS_DIR, "the results folder")


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    started = time.time()
    default_ckpt = train.default_checkpoint("embedded", args.config or "tiny")
    try:
        check_args(args, parser)
        return run(args)
    except (common.CheckpointError, data.DataError, ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {common.error_sentence(e)}")
    except KeyboardInterrupt:
        outputs = [("results", args.results)] if args.results else \
            [("results", p) for p in new_files(train.RESULTS_DIR, started)] or [("the results JSON", None)]
        if not args.checkpoint and args.data == "embedded" and \
                (not os.path.isfile(default_ckpt) or os.path.getmtime(default_ckpt) >= started):
            outputs.insert(0, ("source checkpoint", default_ckpt))
        sys.exit(common.interrupted_message(started, outputs))


def new_files(folder, since):
    """Files in `folder` written since `since` (time.time())."""
    if not os.path.isdir(folder):
        return []
    paths = (os.path.join(folder, n) for n in sorted(os.listdir(folder)))
    return [p for p in paths if os.path.isfile(p) and os.path.getmtime(p) >= since]


if __name__ == "__main__":
    main()
