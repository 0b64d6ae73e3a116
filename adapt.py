"""Test-time adaptation runner: `python adapt.py --method NAME` or `--methods A B C`; one table.

    python adapt.py --method brimpr                  # Source beside BriMPR, 15 video corruptions, severity 5
    python adapt.py --methods source tent eata sar deyo read abpem brimpr --seeds 1 2 3  # BriMPR's Table 1
    python adapt.py --methods tent read abpem --modality both --corruption gaussian_noise+wind
    python adapt.py --methods tent eata brimpr --continual  # all corruption types in one stream, no reset

Protocol (READ, ABPEM, BriMPR): severity 5; one corruption type at a time, model and optimiser reset
between types (and seeds); one online pass over the shuffled stream; accuracy averaged over batches,
seeds, types. A stream's order depends on the seed alone: methods of one batch size (all but ABPEM, 8)
see the batches Source (the frozen model) sees. Last rows: time per batch against Source's forward on
the same batches. An adapter (setup(model, ctx)): `adapter(batch)` adapts and returns the prediction the
paper reports; `reset()` restores the start; `losses` holds the last loss terms (floats).
"""
import argparse
import copy
import hashlib
import math
import os
import sys
import time
from types import SimpleNamespace

import numpy as np
import torch
from tqdm import tqdm

import abpem
import brimpr
import common
import data
import train
from common import need


# ---- Baseline losses ------------------------------------------------------------------------------
def softmax_entropy(logits):
    # Tent's loss, per sample: H(p) = -sum_k p_k log p_k   (B, K) -> (B,)
    return -(logits.softmax(1) * logits.log_softmax(1)).sum(1)


def read_confidence_loss(logits, gamma=math.exp(-1)):
    p = logits.softmax(1).max(1).values  # (B,) the max softmax probability
    # READ Eq. (6) (1/B) sum_i p_i log(e gamma / p_i), with gamma = e^-1 the mean of -p log p
    return (p * torch.log(math.e * gamma / p)).mean()


def read_balance_loss(logits):
    """READ Eq. 7 as the public code has it; it saturates at batch 64 (a 40 / 24 split of two classes:
    -1.9e-6; 5 / 3 at batch 8: -0.63), e.g. -1e-9 to -2e-5 on the embedded audio corruptions."""
    c = logits.softmax(1).sum(0)  # (K,)
    # Eq. (7) L_bal = sum_k s_k log s_k, s = softmax(sum_i p_i)
    return (c.softmax(0) * c.log_softmax(0)).sum()


def eata_weight(ent, e0):
    # EATA Eq. (3) S_ent(x) = 1 / exp(E(x) - E0), detached   (B,) -> (B,)
    return torch.exp(e0 - ent.detach())


def eata_cosine(probs, m):
    # EATA Eq. (5) keep x if |cos(y_hat(x), m^{t-1})| < epsilon   probs (B, K), m (K,) -> (B,)
    return torch.nn.functional.cosine_similarity(probs, m.unsqueeze(0), dim=1).abs()


def eata_update_mean(m, probs):
    """The moving average of the kept predictions (n, K); m (K,) or None at first; none kept: m unchanged."""
    if probs.shape[0] == 0:
        return m
    p_mean = probs.detach().mean(0)  # (K,)
    # EATA Eq. (4) m^t = 0.9 m^{t-1} + 0.1 mean_b y_hat_b   (m^1 = the first mean)
    return p_mean if m is None else 0.9 * m + 0.1 * p_mean


def weighted_entropy(ent, weight):
    # EATA Eq. (8) first term, DeYO Eq. (10): mean over the selected samples (not over B) of S(x) Ent(x)
    return (weight * ent).mean()


def fisher_penalty(params, fisher, anchor):
    # EATA Eq. (8) second term (beta on the caller's side): R = sum_i F_i (theta_i - theta0_i)^2, over lists
    return sum((f * (p - a) ** 2).sum() for p, f, a in zip(params, fisher, anchor))


def fisher_diagonal(logits_fn, params, batches):
    """EATA's Fisher diagonal from whole-batch (not per-sample) squared gradients, as its code does."""
    fisher = [torch.zeros_like(p) for p in params]
    for batch in batches:
        logits = logits_fn(batch)  # (B, K)
        # EATA Eq. (Fisher) F_i = (1/Q) sum_q (d CE(f(x_q), argmax f(x_q)) / d theta_i)^2  (no. not verified)
        loss = torch.nn.functional.cross_entropy(logits, logits.argmax(1).detach())
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        for f, g in zip(fisher, grads):
            if g is not None:  # parameters off the forward path (the _a/_v norms) keep F = 0
                f += g.detach() ** 2
    return [f / len(batches) for f in fisher]


def sam_perturbation(grads, rho):
    """SAM's ascent step e = rho * g / (||g||_2 + 1e-12), ||g|| over ALL tensors. list -> list."""
    norm = torch.norm(torch.stack([g.norm(2) for g in grads]), 2)
    # SAR Eq. (4) e(theta) = rho * g / ||g||_2
    return [rho * g / (norm + 1e-12) for g in grads]


def sar_ema(ema, loss):
    # SAR Eq. (recovery) e_m <- 0.9 e_m + 0.1 L(theta + e), the first e_m = L   (number not verified)
    return loss if ema is None else 0.9 * ema + 0.1 * loss


def patch_shuffle(x, grid, perm=None, generator=None):
    """DeYO's object-destroying transform: x (B, C, H, W) cut into grid x grid tiles, permuted per sample by
    perm (B, grid^2) (default: random). -> (B, C, H, W)"""
    B, C, H, W = x.shape
    need(H % grid == 0 and W % grid == 0, f"DeYO's patch shuffle needs sides divisible by {grid}: {H}x{W}.")
    h, w = H // grid, W // grid
    tiles = x.reshape(B, C, grid, h, grid, w).permute(0, 2, 4, 1, 3, 5).reshape(B, grid * grid, C, h, w)
    if perm is None:
        perm = torch.rand(B, grid * grid, generator=generator).argsort(1)  # (B, grid^2), on the CPU
    tiles = tiles[torch.arange(B, device=x.device)[:, None], perm.to(x.device)]  # row-major tile order
    return tiles.reshape(B, grid, grid, C, h, w).permute(0, 3, 1, 4, 2, 5).reshape(B, C, H, W)


def plpd(probs, probs_shuffled):
    y_hat = probs.argmax(1, keepdim=True)  # (B, 1) the pseudo-label
    # DeYO Eq. (PLPD) PLPD = p(y_hat | x) - p(y_hat | x')   (number not verified)
    return (probs.gather(1, y_hat) - probs_shuffled.gather(1, y_hat)).squeeze(1)


def deyo_weight(ent, d, e0):
    # DeYO Eq. (10) alpha(x) = 1 / exp(Ent(x) - Ent_0) + 1 / exp(-PLPD(x)), detached   (B,) x2 -> (B,)
    return torch.exp(e0 - ent.detach()) + torch.exp(d.detach())


# ---- Baselines (Adam 1e-4, batch 64, as the multimodal papers run them; names as in the papers) ---
class Source:
    """The source model, frozen, no adaptation."""
    BATCH_SIZE = 64

    def __init__(self, model, ctx=None):
        self.model, self.losses = model.eval(), {}

    @classmethod
    def setup(cls, model, ctx):
        return cls(model, ctx)

    @torch.no_grad()
    def __call__(self, batch):
        return self.model(batch["audio"], batch["video"])

    def reset(self):
        pass


def layernorm_params(*modules):
    """The weight and bias of every LayerNorm inside `modules`, in module order."""
    norms = [m for mod in modules for m in mod.modules() if isinstance(m, torch.nn.LayerNorm)]
    return [p for m in norms for p in (m.weight, m.bias)]


def lower_block_norms(model, skip_top=2):
    """SAR / DeYO's parameters in BriMPR's code: the LayerNorms of blocks_a and blocks_v but the top two."""
    # DEVIATION: the public code names blocks 9-10 of CAV-MAE's 11; the top two of any depth (tiny: 0 of 3).
    n = max(1, len(model.blocks_a) - skip_top)
    return layernorm_params(model.blocks_a[:n], model.blocks_v[:n])


class Episodic(Source):
    """Adam 1e-4 on PARAMS(model) only; reset() restores model and optimiser (tent style)."""
    PARAMS = staticmethod(layernorm_params)

    def __init__(self, model, ctx):
        # DEVIATION: the public code runs EATA, SAR and DeYO under fp16 autocast with a GradScaler; fp32 here.
        super().__init__(model.requires_grad_(False))
        self.params = self.PARAMS(model)
        for p in self.params:
            p.requires_grad_(True)
        self.optimizer = torch.optim.Adam(self.params, lr=1e-4, betas=(0.9, 0.999), weight_decay=0.0)
        self.model_state = copy.deepcopy(model.state_dict())
        self.optimizer_state = copy.deepcopy(self.optimizer.state_dict())

    def step(self, loss):
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()

    def reset(self):
        self.model.load_state_dict(self.model_state, strict=True)
        self.optimizer.load_state_dict(copy.deepcopy(self.optimizer_state))


class Tent(Episodic):
    """Tent (Wang et al., ICLR 2021, DequanWang/tent): the mean entropy over every LayerNorm's affine."""

    def __call__(self, batch):
        logits = self.model(batch["audio"], batch["video"])
        loss = softmax_entropy(logits).mean()
        self.step(loss)
        self.losses = {"entropy": loss.item()}
        return logits.detach()


class READ(Episodic):
    """READ (Yang et al., ICLR 2024, XLearning-SCU/2024-ICLR-READ): the unified block's qkv (READ's q, k, v
    Linears copy it) minimise Eqs. 6 + 7; the prediction is a second pass after the update (public code)."""
    PARAMS = staticmethod(lambda model: [model.blocks_u[0].attn.qkv.weight, model.blocks_u[0].attn.qkv.bias])

    def __call__(self, batch):
        with torch.no_grad():
            z_a, z_v = self.model.encode(batch["audio"], batch["video"])  # frozen: (B, N_a, D), (B, N_v, D)
        logits = self.model.classify(self.model.fuse(z_a, z_v))
        l_ra, l_bal = read_confidence_loss(logits), read_balance_loss(logits)
        self.step(l_ra + l_bal)
        self.losses = {"ra": l_ra.item(), "bal": l_bal.item()}
        with torch.no_grad():
            return self.model.classify(self.model.fuse(z_a, z_v))


class EATA(Episodic):
    """EATA (Niu et al., ICML 2022, mr-eggplant/EATA; settings of BriMPR's EATA.py, run.py): weighted entropy
    minimisation on reliable, non-redundant samples plus a Fisher penalty; the first forward's prediction.
    Caution: |cos(p, m)| >= 1 / sqrt(C) (0.32 at C = 10) for m near uniform: epsilon 0.1 keeps NO sample."""
    E0_FACTOR = 0.4  # E0 = 0.4 ln C; EATA.py e_margin
    EPSILON = 0.1  # redundancy margin; BriMPR run.py --d_margin (the original EATA: 0.05 on ImageNet)
    BETA = 1.0  # Fisher weight; BriMPR run.py --fisher_alpha default (class default 2000 overridden)
    FISHER_SIZE, FISHER_BATCH, FISHER_SEED = 2000, 64, 0  # BriMPR run.py fisher_size, -b; our seed

    def __init__(self, model, ctx):
        super().__init__(model, ctx)
        self.e0, self.epsilon = self.E0_FACTOR * math.log(ctx.num_classes), self.EPSILON
        self.anchor = [p.detach().clone() for p in self.params]  # theta0, the source values
        self.m = None  # moving average of the kept predictions (K,)
        # DEVIATION: the public code draws 2000 clips with python's global RNG and caches the Fisher in a
        # pickle; ours are ctx.source_batch's 2000, cut in batches of 64 in order, at every set-up.
        clean = ctx.source_batch(self.FISHER_SIZE, self.FISHER_SEED)
        n, b = len(clean["label"]), self.FISHER_BATCH
        batches = [{k: v[i:i + b] for k, v in clean.items()} for i in range(0, n, b)]
        self.fisher = fisher_diagonal(lambda x: model(x["audio"], x["video"]), self.params, batches)

    def __call__(self, batch):
        logits = self.model(batch["audio"], batch["video"])  # (B, K)
        ent = softmax_entropy(logits)  # (B,)
        probs = logits.softmax(1).detach()  # (B, K)
        # EATA Eq. (3) reliable samples: Ent(x) < E0
        keep = ent < self.e0
        if self.m is not None:
            # EATA Eq. (5) non-redundant samples: |cos(p(x), m)| < epsilon (not on the first batch)
            keep = keep & (eata_cosine(probs, self.m) < self.epsilon)
        self.m = eata_update_mean(self.m, probs[keep])  # Eq. (4)
        self.losses = {"ent": 0.0, "ewc": 0.0, "kept": 0.0}
        if keep.any():
            l_ent = weighted_entropy(ent[keep], eata_weight(ent[keep], self.e0))
            l_ewc = fisher_penalty(self.params, self.fisher, self.anchor)
            # EATA Eq. (8) L = mean_kept S(x) Ent(x) + beta R
            self.step(l_ent + self.BETA * l_ewc)
            self.losses = {"ent": l_ent.item(), "ewc": l_ewc.item(), "kept": int(keep.sum()) / len(ent)}
        return logits.detach()

    def reset(self):
        super().reset()
        self.m = None


class SAR(Episodic):
    """SAR (Niu et al., ICLR 2023, mr-eggplant/SAR; BriMPR's SAR.py): reliable, sharpness-aware entropy with
    model recovery, which keeps Adam's state and the low average (public code); the first forward's output."""
    PARAMS = staticmethod(lower_block_norms)
    E0_FACTOR = 0.4  # E0 = 0.4 ln C; SAR.py margin_e0
    RHO = 0.05  # SAM neighbourhood size; SAM default, BriMPR setup_model.py
    RESET_EM = 0.2  # model-recovery threshold e_m; SAR.py reset_constant_em

    def __init__(self, model, ctx):
        super().__init__(model, ctx)
        self.e0 = self.E0_FACTOR * math.log(ctx.num_classes)
        self.rho, self.reset_em, self.ema, self.recoveries = self.RHO, self.RESET_EM, None, 0

    def __call__(self, batch):
        audio, video = batch["audio"], batch["video"]
        logits = self.model(audio, video)  # (B, K)
        ent = softmax_entropy(logits)  # (B,)
        # SAR Eq. (2) keep Ent(x) < E0 (an empty selection: NaN loss, zero gradient, as in the public code)
        keep = ent < self.e0
        loss1 = ent[keep].mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss1.backward()
        with torch.no_grad():  # the ascent step to theta + e, over the parameters that got a gradient
            live = [p for p in self.params if p.grad is not None]
            old = [p.detach().clone() for p in live]
            for p, e in zip(live, sam_perturbation([p.grad for p in live], self.rho)):
                p.add_(e)  # Eq. (4) theta + e(theta)
        self.optimizer.zero_grad(set_to_none=True)
        ent2 = softmax_entropy(self.model(audio, video))[keep]  # (n_kept,) at theta + e
        # SAR: filter again at theta + e; the second loss gives the update direction
        loss2 = ent2[ent2 < self.e0].mean()
        if not math.isnan(loss2.item()):
            self.ema = sar_ema(self.ema, loss2.item())
        loss2.backward()
        with torch.no_grad():
            for p, o in zip(live, old):
                p.copy_(o)  # back to theta, keeping the gradient taken at theta + e
        self.optimizer.step()
        self.losses = {"ent": loss1.item(), "sam": loss2.item(), "kept": int(keep.sum()) / len(ent)}
        if self.ema is not None and self.ema < self.reset_em:
            # SAR Eq. (recovery) the source weights only: SAM's load_state_dict leaves the base Adam's state
            self.model.load_state_dict(self.model_state, strict=True)
            self.recoveries += 1
        return logits.detach()

    def reset(self):
        # DEVIATION: BriMPR's run.py resets SAR through its SAM wrapper, which keeps Adam's state across
        # corruption types; we restore the optimiser too, as the protocol (model AND optimiser) says.
        super().reset()
        self.ema = None


class DeYO(Episodic):
    """DeYO (Lee et al., ICLR 2024, Jhyun17/DeYO; BriMPR's DeYO.py): entropy on confident samples whose class
    needs the shape (shuffled 4 x 4 patches must lower its probability); the first forward's prediction."""
    PARAMS = staticmethod(lower_block_norms)
    TAU_ENT_FACTOR = 0.5  # tau_Ent = 0.5 ln C; BriMPR run.py / setup_model.py deyo_margin
    E0_FACTOR = 0.4  # Ent0 = 0.4 ln C; setup_model.py margin_e0
    TAU_PLPD = 0.2  # BriMPR run.py --plpd_threshold
    GRID = 4  # patches per side; BriMPR run.py --patch_len

    def __init__(self, model, ctx):
        super().__init__(model, ctx)
        self.tau_ent = self.TAU_ENT_FACTOR * math.log(ctx.num_classes)
        self.e0, self.tau_plpd = self.E0_FACTOR * math.log(ctx.num_classes), self.TAU_PLPD

    def __call__(self, batch):
        logits = self.model(batch["audio"], batch["video"])  # (B, K)
        ent = softmax_entropy(logits)  # (B,)
        # DeYO Eq. (8) keep Ent(x) < tau_Ent
        keep = ent < self.tau_ent
        self.losses = {"ent": 0.0, "kept": 0.0}
        if keep.any():
            with torch.no_grad():
                # DEVIATION: the public code resizes to a multiple of the grid and back around the shuffle, a
                # no-op for CAV-MAE's 1024 x 128 and 224 x 224 and the tiny 128 x 64 and 64 x 64; none here.
                a_s = patch_shuffle(batch["audio"][keep].unsqueeze(1), self.GRID).squeeze(1)  # (n, T, F)
                v_s = patch_shuffle(batch["video"][keep], self.GRID)  # (n, 3, H, W)
                d = plpd(logits[keep].softmax(1), self.model(a_s, v_s).softmax(1))  # (n,)
            # DeYO Eq. (PLPD) keep PLPD > tau_PLPD among the entropy-kept samples
            sel = d > self.tau_plpd
            if sel.any():
                ent_k = ent[keep][sel]
                loss = weighted_entropy(ent_k, deyo_weight(ent_k, d[sel], self.e0))
                self.step(loss)
                self.losses = {"ent": loss.item(), "kept": int(sel.sum()) / len(ent)}
        return logits.detach()


# a method: BATCH_SIZE (an int or a dict by dataset) and setup(model, ctx) -> adapter
METHODS = {"source": Source, "tent": Tent, "eata": EATA, "sar": SAR, "deyo": DeYO, "read": READ,
           "abpem": abpem, "brimpr": brimpr}


# ---- Streams and the run --------------------------------------------------------------------------
def corruption_list(modality, corruption):
    """The corruption types to run: names, or 'video+audio' pairs for --modality both."""
    both = [f"{v}+{a}" for v in data.VIDEO_CORRUPTIONS for a in data.AUDIO_CORRUPTIONS]
    valid = {"video": data.VIDEO_CORRUPTIONS, "audio": data.AUDIO_CORRUPTIONS, "both": both}[modality]
    if corruption == "all":
        return list(valid)
    chosen = [c.strip() for c in corruption.split(",")]
    for c in chosen:
        need(c in valid, f"unknown {modality} corruption {c!r}; choose 'all' or the names `--help` lists.")
        need(chosen.count(c) == 1, f"--corruption names {c} twice; give each corruption once.")
    return chosen


def corrupted_set(args, model, corruption):
    """The corrupted test set of one corruption type (a video or audio name, or a 'video+audio' pair)."""
    if args.modality == "both":
        vc, ac = corruption.split("+")
    else:
        vc, ac = (corruption, None) if args.modality == "video" else (None, corruption)
    if args.data == "read":
        return data.read_layout_split(args.data_root, args.label_csv, model, vc, ac, args.severity)
    return data.embedded_split("test", model, seed=args.data_seed, video_corruption=vc, audio_corruption=ac,
                               severity=args.severity, frost_dir=args.frost_dir, noise_dir=args.noise_dir)


def source_batch_fn(args, model, device):
    """ctx.source_batch(n, seed): n random clean training clips (BriMPR's statistics, EATA's Fisher)."""
    def source_batch(n, seed=0):
        if args.data == "embedded":
            ds = data.embedded_split("train", model, seed=args.data_seed)
        else:
            path = args.source_json or os.path.join(args.data_root, "clean", "train.json")  # BriMPR's layout
            need(os.path.isfile(path), f"{path} does not exist: this method needs clean training clips; pass "
                                       f"a READ-format training list with --source-json.")
            sizes = model.mel_bins, model.audio_length, model.image_size
            ds = data.ReadLayoutDataset(path, args.label_csv, *sizes)
        need(len(ds) >= 2, f"the source list has {len(ds)} usable clip(s) and the source statistics need at "
                           f"least 2; pass a larger clean training list with --source-json.")
        idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))[:n]
        return data.to_device(torch.utils.data.default_collate([ds[int(i)] for i in idx]), device)
    return source_batch


def method_names(args):
    """The methods to run: --methods, else --method; Source always first (the paired reference), each once."""
    return list(dict.fromkeys(["source"] + (args.methods or [args.method or "brimpr"])))


def results_path(args, names):
    """results/adapt_<methods>_<modality>[_<selection>].json: no run overwrites another selection's file."""
    joined = args.corruption.replace("+", "-").replace(",", "+")
    if len(joined) > 40:
        joined = f"{args.corruption.count(',') + 1}corr-{hashlib.sha1(joined.encode()).hexdigest()[:8]}"
    tags = [(args.corruption != "all", joined), (args.severity != 5, f"sev{args.severity}"),
            (args.continual, "continual"), (args.seeds != [1], "seeds" + "-".join(map(str, args.seeds))),
            (args.batch_size is not None, f"bs{args.batch_size}"),
            (args.no_cache and "abpem" in names, "nocache"),
            (args.data != "embedded", f"read-{args.dataset}"),
            (args.data == "embedded" and args.data_seed != 0, f"data{args.data_seed}")]
    name = "_".join(["adapt", "-".join(names), args.modality] + [tag for on, tag in tags if on])
    return os.path.join(train.RESULTS_DIR, name + ".json")


def run(args):
    """Every method on the same shuffled streams; one table, one JSON. A stream is seeded by the seed alone
    (loader order, global RNG), so a method's numbers do not depend on which other methods run."""
    device = common.get_device(args.device)
    names, corruptions = method_names(args), corruption_list(args.modality, args.corruption)
    if args.checkpoint:
        model, meta = common.load_checkpoint(args.checkpoint, config=args.config, device=device)
    else:
        model, meta = train.default_source(args.config or "tiny", args.data_seed, device)
    if args.data == "embedded":
        ckpt = args.checkpoint or train.default_checkpoint("embedded", args.config or "tiny")
        train.check_data_seed(ckpt, meta, args.data_seed)
        num_classes = data.EMBEDDED["num_classes"]
    else:
        num_classes = len(data.read_label_csv(args.label_csv))
    need(model.num_classes == num_classes, f"the checkpoint has {model.num_classes} classes but the data has "
                                           f"{num_classes}; use the checkpoint trained on this dataset.")
    dataset, methods = args.dataset or "embedded", {n: METHODS[n] for n in names}
    bs = {n: args.batch_size or (m.BATCH_SIZE[dataset] if isinstance(m.BATCH_SIZE, dict) else m.BATCH_SIZE)
          for n, m in methods.items()}  # the papers' batch sizes unless --batch-size
    ctx = SimpleNamespace(dataset=dataset, modality=args.modality, num_classes=num_classes,
                          continual=args.continual, use_cache=not args.no_cache,
                          source_batch=source_batch_fn(args, model, device))
    adapters = {n: m.setup(copy.deepcopy(model), ctx) for n, m in methods.items()}  # each its own copy
    acc = {c: {n: [] for n in names} for c in corruptions}  # per corruption and method, one value per seed
    times = {n: [] for n in names}  # seconds per batch
    source_times = {bs["source"]: times["source"]}  # Source's forward per batch, by batch size
    n_samples, t_start = 0, time.time()

    def stream(name, corruption, test, seed, reset):
        """One pass of `name` over the shuffled stream of one corruption -> batch-averaged accuracy (%)."""
        nonlocal n_samples
        adapter, accs = adapters[name], []
        if reset:
            adapter.reset()
        loader = data.make_loader(test, bs[name], shuffle=True, seed=seed)
        bar = tqdm(loader, desc=f"{name} {corruption} (seed {seed})", leave=False, dynamic_ncols=True)
        for batch in bar:
            batch = data.to_device(batch, device)
            t0 = time.perf_counter()
            logits = adapter(batch)
            times[name].append(time.perf_counter() - t0)
            if bs[name] != bs["source"]:  # the time base at this batch size: Source's forward on this batch
                t0 = time.perf_counter()
                adapters["source"](batch)
                source_times.setdefault(bs[name], []).append(time.perf_counter() - t0)
            accs.append(100.0 * (logits.argmax(1) == batch["label"]).float().mean().item())
            n_samples += len(batch["label"])
            bar.set_postfix(acc=f"{np.mean(accs):.1f}", **{k: f"{v:.3f}" for k, v in adapter.losses.items()})
        return float(np.mean(accs))

    for group in [corruptions] if args.continual else [[c] for c in corruptions]:
        sets = {c: corrupted_set(args, model, c) for c in group}  # made once, used by every method and seed
        for seed in args.seeds:
            for n in names:
                common.seed_everything(seed)
                for i, c in enumerate(group):
                    acc[c][n].append(stream(n, c, sets[c], seed, reset=(i == 0)))
            tqdm.write(f"{'continual' if args.continual else group[0]:<32} seed {seed}: " + "  ".join(
                f"{n} {np.mean([acc[c][n][-1] for c in group]):5.1f}" for n in names))

    wall = time.time() - t_start
    ms = {n: 1000 * float(np.mean(times[n])) for n in names}
    source_ms = {b: 1000 * float(np.mean(t)) for b, t in source_times.items()}
    ratio = {n: ms[n] / source_ms[bs[n]] for n in names}
    print(results_table(acc, names, len(args.seeds), {n: (bs[n], ms[n], ratio[n]) for n in names}))
    print(f"{n_samples} samples in {wall:.1f} s; time per batch against Source's forward on the same batches")
    seeds = range(len(args.seeds))
    per_seed = {n: [float(np.mean([acc[c][n][s] for c in corruptions])) for s in seeds] for n in names}
    avg = {n: float(np.mean(v)) for n, v in per_seed.items()}
    summary = {c: {n: {"mean": float(np.mean(v)), "std": float(np.std(v)), "per_seed": v}
                   for n, v in d.items()} for c, d in acc.items()}
    out = args.results or results_path(args, names)
    common.write_json(out, {"args": vars(args), "methods": names, "batch_size": bs, "accuracy": summary,
                            "average": avg, "average_std": {n: float(np.std(v)) for n, v in per_seed.items()},
                            "average_per_seed": per_seed, "wall_seconds": wall,
                            "samples_per_second": n_samples / wall, "ms_per_batch": ms,
                            "source_ms_per_batch": {str(b): v for b, v in source_ms.items()},
                            "time_ratio_to_source": ratio})
    print(f"wrote {out}")
    return avg, summary


def results_table(acc, columns, n_seeds, timing):
    """Rows: types, average (per seed over types, then mean +/- std over seeds), timing; columns: methods."""
    def cell(v):
        return f"{np.mean(v):5.1f}" + (f" +/- {np.std(v):4.1f}" if n_seeds > 1 else "")
    w = max(24, max(len(c) for c in acc) + 2)
    cw = max(16 if n_seeds > 1 else 9, max(len(c) for c in columns) + 2)
    rule = "-" * (w + cw * len(columns))
    lines = [f"{'corruption':<{w}}" + "".join(f"{c:>{cw}}" for c in columns), rule]
    for c, d in acc.items():
        lines.append(f"{c:<{w}}" + "".join(f"{cell(d[k]):>{cw}}" for k in columns))
    mean_over_seeds = {k: [np.mean([acc[c][k][s] for c in acc]) for s in range(n_seeds)] for k in columns}
    lines += [rule, f"{'average':<{w}}" + "".join(f"{cell(mean_over_seeds[k]):>{cw}}" for k in columns), rule]
    for row, i, fmt in (("batch size", 0, "d"), ("ms per batch", 1, ".1f"), ("x Source forward", 2, ".2f")):
        lines.append(f"{row:<{w}}" + "".join(f"{timing[k][i]:>{cw}{fmt}}" for k in columns))
    return "\n".join(lines)


# ---- Command line ---------------------------------------------------------------------------------
def build_parser():
    sizes = ", ".join(f"{n} {m.BATCH_SIZE}" for n, m in METHODS.items())
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    arg = p.add_argument
    arg("--method", choices=list(METHODS), help="the method run beside Source (default: brimpr)")
    arg("--methods", nargs="+", choices=list(METHODS), metavar="NAME",
        help="several methods on the same streams, Source included; overrides --method (default: none)")
    arg("--modality", default="video", choices=["video", "audio", "both"],
        help="the corrupted modality (both: each video corruption with each audio one) (default: video)")
    arg("--corruption", default="all", help=f"'all', a name or a comma-separated list; video: "
        f"{', '.join(data.VIDEO_CORRUPTIONS)}; audio: {', '.join(data.AUDIO_CORRUPTIONS)}; both: video+audio "
        f"pairs, e.g. gaussian_noise+wind (default: all)")
    arg("--severity", type=int, default=5, choices=[1, 2, 3, 4, 5], help="corruption severity (default: 5)")
    arg("--seeds", type=train.seed_int, nargs="+", default=[1],
        help="seeds (stream order, masks), distinct; results are averaged (default: 1)")
    arg("--batch-size", type=train.positive_int, help=f"test batch size (default: the paper's: {sizes})")
    arg("--no-cache", action="store_true",
        help="ABPEM only: switch off the public code's feature cache (default: on, as every released script)")
    arg("--continual", action="store_true",
        help="all corruption types in one stream, no reset between them (default: off, reset per type)")
    arg("--data", default="embedded", choices=["embedded", "read"],
        help="the embedded benchmark or Kinetics50-C / VGGSound-C in READ's file layout (default: embedded)")
    arg("--dataset", choices=["ks50", "vggsound", "embedded"],
        help="picks the papers' per-dataset settings (default: embedded; required with --data read)")
    arg("--data-root", help="--data read: folder with clean/, video/, audio/ JSON lists (default: none)")
    arg("--label-csv", help="--data read: class_labels_indices CSV, indices 0..K-1 (default: none)")
    arg("--source-json", help="--data read: clean training clips (default: <data-root>/clean/train.json)")
    arg("--checkpoint", help="source model (default: checkpoints/embedded_<config>.pt, trained if missing)")
    arg("--config", choices=list(common.CONFIGS),
        help="configuration of a published checkpoint (default: the checkpoint's own, else tiny)")
    arg("--data-seed", type=train.seed_int, default=0,
        help="seed of the embedded benchmark; must match the checkpoint's (default: 0)")
    arg("--frost-dir", help="--data embedded: folder of frost photographs (default: none, a stand-in)")
    arg("--noise-dir", help="--data embedded: folder of traffic/crowd/rain/thunder/wind.wav (default: none)")
    arg("--results", help="results JSON (default: results/adapt_<methods>_<modality>[_<selection>].json)")
    arg("--device", help="cpu, cuda, cuda:1 (default: cuda if available, else cpu)")
    return p


def check_args(args):
    """Every check that needs no model or data work, before the run starts."""
    common.get_device(args.device)
    need(len(set(args.seeds)) == len(args.seeds), f"--seeds {' '.join(map(str, args.seeds))} repeats a seed; "
                                                  f"give each seed once.")
    need(not args.no_cache or "abpem" in method_names(args),
         "--no-cache switches off ABPEM's feature cache; add abpem to --method / --methods.")
    for flag, where in (("data_root", "read"), ("label_csv", "read"), ("source_json", "read"),
                        ("frost_dir", "embedded"), ("noise_dir", "embedded")):
        need(args.data == where or getattr(args, flag) is None,
             f"--{flag.replace('_', '-')} applies to --data {where} only; drop it or pass --data {where}.")
    if args.data == "read":
        need(args.data_root and args.label_csv and args.checkpoint and args.dataset, "--data read needs "
             "--data-root, --label-csv, --checkpoint (a CAV-MAE fine-tuned on the data) and --dataset.")
        need(os.path.isdir(args.data_root), f"--data-root {args.data_root} is not a folder; pass the folder "
                                            f"with clean/, video/ and audio/.")
    chosen = corruption_list(args.modality, args.corruption)  # unknown names end here, before any work
    for kind in sorted({c.split("+")[-1] for c in chosen} & set(data.AUDIO_CORRUPTIONS[1:])):
        need(not args.noise_dir or args.modality == "video" or os.path.isfile(f"{args.noise_dir}/{kind}.wav"),
             f"--noise-dir {args.noise_dir} has no {kind}.wav; add one for each noise that runs.")
    out = args.results or results_path(args, method_names(args))
    common.check_output_file(out, "--results" if args.results else "the results file")


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        check_args(args)
        return run(args)
    except common.Refusal as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        sys.exit("interrupted: every file written so far is whole; nothing else was saved.")


if __name__ == "__main__":
    main()
