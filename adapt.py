"""Test-time adaptation runner: `python adapt.py --method NAME` or `--methods A B C`, the papers' protocol, one table.

    python adapt.py --method brimpr                        # Source beside BriMPR, 15 video corruptions, severity 5
    python adapt.py --methods source tent eata sar deyo read abpem brimpr --seeds 1 2 3   # BriMPR's Table 1 columns
    python adapt.py --method read --modality audio --seeds 1 2 3
    python adapt.py --methods tent read abpem --modality both --corruption gaussian_noise+wind
    python adapt.py --methods tent eata brimpr --continual  # all corruption types in one stream, no reset
    python adapt.py --method brimpr --data read --data-root json_csv_files/ks50 \\
        --label-csv class_labels_indices_ks50.csv --checkpoint cav_mae_ks50.pth --config base --dataset ks50

Protocol (READ, ABPEM, BriMPR): severity 5; one corruption type at a time; the model and the
optimiser are reset between corruption types (and seeds); one online pass over the shuffled test
stream; accuracy averaged over batches, then over seeds, then over corruption types. Every method
runs on the same streams: each corrupted test set is built once and the loader order depends on
the seed alone, so methods with the same batch size (all but ABPEM, 8) see the very same batches,
and Source (the frozen model) is always a column, so every row is a paired comparison. The last
rows give each method's time per batch against Source's forward at the same batch size.

A method is anything with `BATCH_SIZE` (an int, or a dict by dataset name) and `setup(model, ctx)`
returning an adapter: `adapter(batch) -> logits` adapts on the batch and returns the prediction
the paper reports; `adapter.reset()` restores the start; `adapter.losses` holds the last loss
terms (a dict of floats, for the progress bar); `adapter.optimizer` is its torch optimiser.
Source, Tent, EATA, SAR, DeYO and READ are written in this file; `abpem.py` and `brimpr.py` are
modules with the same two names. Each method keeps its own copy of the model for the whole run.
"""
import argparse
import copy
import hashlib
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
    """READ Eq. 7: c_k = sum_i p_ik, s = softmax(c), L_bal = sum_k s_k log s_k (minus the entropy of s).

    Kept in the public code's form (softmax over the SUMMED probabilities). It saturates with large
    batches: the c_k grow with B, so a few units of difference between two classes' sums make s
    nearly one-hot and L_bal nearly 0 (its gradient too). With batch 64 and 10 classes, a batch
    split 40 / 24 between two classes gives -1.9e-6 (batch 8 split 5 / 3: -0.63); on the embedded
    benchmark's audio corruptions the term measured -1e-9 to -2e-5 (vs -1.23 at batch 8), so READ
    at batch 64 runs on its confidence loss alone there.
    """
    c = logits.softmax(1).sum(0)  # (K,)
    # Eq. (7) L_bal = sum_k s_k log s_k, s = softmax(sum_i p_i)
    return (c.softmax(0) * c.log_softmax(0)).sum()


def entropy_margin(num_classes, factor):
    """The entropy thresholds of EATA / SAR / DeYO: factor * ln C (0.4 ln C = E0, 0.5 ln C = tau_Ent)."""
    return factor * math.log(num_classes)


def eata_weight(ent, e0):
    """EATA's sample weight 1 / exp(Ent - E0) = exp(E0 - Ent), detached. ent: (B,) -> (B,)."""
    # EATA Eq. (3) S_ent(x) = 1 / exp(E(x) - E0) (on the samples with E(x) < E0)
    return torch.exp(e0 - ent.detach())


def eata_cosine(probs, m):
    """|cos(p_b, m)| per sample: probs (B, K), m (K,) -> (B,). EATA's redundancy test."""
    # EATA Eq. (5) keep x if |cos(y_hat(x), m^{t-1})| < epsilon
    return torch.nn.functional.cosine_similarity(probs, m.unsqueeze(0), dim=1).abs()


def eata_update_mean(m, probs):
    """The moving average of predictions over the kept samples: probs (n, K), m (K,) or None -> (K,) or None.
    First call (m None): the mean of probs. No sample kept: m unchanged."""
    if probs.shape[0] == 0:
        return m
    p_mean = probs.detach().mean(0)  # (K,)
    # EATA Eq. (4) m^t = 0.9 m^{t-1} + 0.1 mean_b y_hat_b   (m^1 = the first mean)
    return p_mean if m is None else 0.9 * m + 0.1 * p_mean


def weighted_entropy(ent, weight):
    """mean over the kept samples of weight * entropy (divides by the number kept, not by B). (n,), (n,) -> scalar."""
    # EATA Eq. (8) first term, DeYO Eq. (10): mean over the selected samples of S(x) Ent(x)
    return (weight * ent).mean()


def fisher_penalty(params, fisher, anchor):
    """sum_i F_i (theta_i - theta0_i)^2 over lists of tensors -> scalar. EATA's anti-forgetting term."""
    # EATA Eq. (8) second term (beta on the caller's side): R = sum_i F_i (theta_i - theta0_i)^2
    return sum((f * (p - a) ** 2).sum() for p, f, a in zip(params, fisher, anchor))


def fisher_diagonal(logits_fn, params, batches):
    """F_i = (1/Q) sum_q (d CE(f(x_q), argmax f(x_q)) / d theta_i)^2 with x_q a whole BATCH (a squared
    batch gradient, not a per-sample average), as EATA's code computes it. -> list like params."""
    fisher = [torch.zeros_like(p) for p in params]
    for batch in batches:
        logits = logits_fn(batch)  # (B, K)
        # EATA Eq. (Fisher) (number not verified): CE against the model's own argmax, batch mean
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
    """SAR's model-recovery statistic: 0.9 ema + 0.1 loss; the first value is the loss itself."""
    # SAR Eq. (recovery) e_m <- 0.9 e_m + 0.1 L(theta + e)   (number not verified)
    return loss if ema is None else 0.9 * ema + 0.1 * loss


def patch_shuffle(x, grid, perm=None, generator=None):
    """DeYO's object-destroying transform: cut every image into grid x grid tiles and permute the tiles,
    each sample its own permutation. x: (B, C, H, W), H and W divisible by grid; perm: (B, grid^2) tile
    order (default: random, from `generator` or torch's global one) -> (B, C, H, W)."""
    B, C, H, W = x.shape
    if H % grid or W % grid:
        raise ValueError(f"patch_shuffle needs sides divisible by {grid}, got {H} x {W}")
    h, w = H // grid, W // grid
    tiles = x.reshape(B, C, grid, h, grid, w).permute(0, 2, 4, 1, 3, 5).reshape(B, grid * grid, C, h, w)
    if perm is None:
        perm = torch.rand(B, grid * grid, generator=generator).argsort(1)  # (B, grid^2), on the CPU
    tiles = tiles[torch.arange(B, device=x.device)[:, None], perm.to(x.device)]  # row-major tile order
    return tiles.reshape(B, grid, grid, C, h, w).permute(0, 3, 1, 4, 2, 5).reshape(B, C, H, W)


def plpd(probs, probs_shuffled):
    """Pseudo-label probability difference p(y_hat | x) - p(y_hat | x'), y_hat = argmax p(. | x). (B, K) x2 -> (B,)."""
    y_hat = probs.argmax(1, keepdim=True)  # (B, 1)
    # DeYO Eq. (PLPD) PLPD = p(y_hat | x) - p(y_hat | x')   (number not verified)
    return (probs.gather(1, y_hat) - probs_shuffled.gather(1, y_hat)).squeeze(1)


def deyo_weight(ent, d, e0):
    """DeYO's sample weight exp(E0 - Ent) + exp(PLPD), detached. ent, d: (B,) -> (B,)."""
    # DeYO Eq. (10) alpha(x) = 1 / exp(Ent(x) - Ent_0) + 1 / exp(-PLPD(x))
    return torch.exp(e0 - ent.detach()) + torch.exp(d.detach())


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
    it into separate q, k, v Linears. At batch 64 the balance term (Eq. 7, kept in the public code's
    form) saturates to about 0 when the batch's predictions concentrate on a few classes (see
    read_balance_loss), so the confidence loss alone drives the update there.
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


def layernorm_params(*modules):
    """The weight and bias of every LayerNorm inside `modules`, in module order."""
    return [p for mod in modules for m in mod.modules() if isinstance(m, torch.nn.LayerNorm) for p in (m.weight, m.bias)]


def lower_block_norms(model, skip_top=2):
    """SAR / DeYO's parameter walk in BriMPR's code: the LayerNorms of blocks_a and blocks_v except the top
    `skip_top` blocks of each; the unified block, norm_a / norm_v, norm and mlp_head are left out."""
    # DEVIATION: the public code names blocks_a/v.9-10 (the top two of CAV-MAE's 11); we skip the top two
    # of any depth, at least one block kept (tiny, depth 3: block 0 only).
    n = max(1, len(model.blocks_a) - skip_top)
    return layernorm_params(model.blocks_a[:n], model.blocks_v[:n])


class EATA(Episodic):
    """EATA (Niu et al., "Efficient Test-Time Model Adaptation without Forgetting", ICML 2022;
    code mr-eggplant/EATA; multimodal settings from BriMPR's TTA/EATA.py, TTA/setup_model.py, run.py).

    Entropy minimisation on reliable, non-redundant samples weighted by confidence, plus a
    Fisher-weighted penalty that keeps the parameters near the source model:
        keep x if Ent(x) < E0 = 0.4 ln C, weight exp(E0 - Ent(x))                         Eq. (3)
        m = moving average of the kept predictions, m <- 0.9 m + 0.1 mean p                Eq. (4)
        after the first batch also keep x only if |cos(p(x), m)| < epsilon = 0.1          Eq. (5)
        L = mean_kept exp(E0 - Ent) Ent + beta sum_i F_i (theta_i - theta0_i)^2, beta = 1  Eq. (8)
        F_i = mean over Q clean batches of (d CE(f(x_q), argmax f(x_q)) / d theta_i)^2    Eq. (Fisher)
    Every LayerNorm's weight and bias (as Tent); Adam 1e-4, batch 64, no step when nothing is kept;
    the prediction is the first forward's (before the update). Equation numbers (3), (4), (5), (8)
    are those the public code's comments cite; the Fisher equation's number is not verified.

    Deviations (`# DEVIATION:` below): no fp16 autocast / GradScaler; the Fisher clips are
    ctx.source_batch(2000, seed 0) (2,000 of the clean training clips BriMPR's statistics come from)
    cut into batches of 64 in order, computed at set-up and
    not cached to disk (the public code shuffles with python's global RNG and caches a pickle).

    The redundancy margin epsilon: BriMPR's run.py defaults to 0.1 (its comment lists "0.4 / 0.1 /
    0.05" without saying which goes with which dataset); the original EATA uses 0.05 on ImageNet.
    Caution (arithmetic): softmax vectors are non-negative, so for m near uniform over C classes
    cos(p, m) = sum_k p_k / (sqrt(C) |p|) >= 1 / sqrt(C) for every p (sum_k p_k = 1 >= |p|):
    0.32 for C = 10, 0.14 for C = 50, 0.057 for C = 309. So epsilon = 0.1 keeps NO sample at 10 or
    50 classes once m is near uniform; 0.4 (`--eata-redundancy 0.4`) is the diagnostic row.
    """
    BATCH_SIZE = 64
    E0_FACTOR = 0.4  # E0 = 0.4 ln C; EATA.py e_margin
    EPSILON = 0.1  # redundancy margin; BriMPR run.py --d_margin default (class default 0.05 overridden); --eata-redundancy
    BETA = 1.0  # Fisher weight; BriMPR run.py --fisher_alpha default (class default 2000 overridden)
    FISHER_SIZE = 2000  # clean clips for the Fisher; BriMPR run.py fisher_size
    FISHER_BATCH = 64  # batch of the Fisher pass; BriMPR run.py -b
    FISHER_SEED = 0  # which clips; BriMPR's statistics use the first 32 of the same draw

    def __init__(self, model, params, num_classes, fisher, epsilon=EPSILON):
        super().__init__(model, params)
        self.params = params
        self.e0, self.epsilon, self.beta = entropy_margin(num_classes, self.E0_FACTOR), epsilon, self.BETA
        self.fisher = fisher  # list like params
        self.anchor = [p.detach().clone() for p in params]  # theta0, the source values
        self.m = None  # moving average of the kept predictions (K,)

    @classmethod
    def setup(cls, model, ctx):
        params = layernorm_params(model)
        model.eval().requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        clean = ctx.source_batch(cls.FISHER_SIZE, cls.FISHER_SEED)
        n = len(clean["label"])
        # DEVIATION: the public code draws 2000 clips with python's global RNG; ours are source_batch's first n.
        batches = [{k: v[i:i + cls.FISHER_BATCH] for k, v in clean.items()} for i in range(0, n, cls.FISHER_BATCH)]
        fisher = fisher_diagonal(lambda b: model(b["audio"], b["video"]), params, batches)
        epsilon = getattr(ctx, "eata_redundancy", None)  # adapt.py --eata-redundancy; None: BriMPR's 0.1
        return cls(model, params, ctx.num_classes, fisher, cls.EPSILON if epsilon is None else epsilon)

    def __call__(self, batch):
        # DEVIATION: the public code runs this forward under fp16 autocast with a GradScaler; fp32 here.
        logits = self.model(batch["audio"], batch["video"])  # (B, K)
        ent = softmax_entropy(logits)  # (B,)
        probs = logits.softmax(1).detach()  # (B, K)
        # EATA Eq. (3) reliable samples: Ent(x) < E0
        keep = ent < self.e0
        if self.m is not None:
            # EATA Eq. (5) non-redundant samples: |cos(p(x), m)| < epsilon (not on the first batch)
            keep = keep & (eata_cosine(probs, self.m) < self.epsilon)
        self.m = eata_update_mean(self.m, probs[keep])  # Eq. (4)
        n_kept = int(keep.sum())
        if n_kept > 0:
            l_ent = weighted_entropy(ent[keep], eata_weight(ent[keep], self.e0))
            l_ewc = fisher_penalty(self.params, self.fisher, self.anchor)
            # EATA Eq. (8) L = mean_kept S(x) Ent(x) + beta R
            loss = l_ent + self.beta * l_ewc
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            self.losses = {"ent": l_ent.item(), "ewc": l_ewc.item(), "kept": n_kept / len(ent)}
        else:
            self.losses = {"ent": 0.0, "ewc": 0.0, "kept": 0.0}
        return logits.detach()

    def reset(self):
        super().reset()
        self.m = None


class SAR(Episodic):
    """SAR (Niu et al., "Towards Stable Test-Time Adaptation in Dynamic Wild World", ICLR 2023; code
    mr-eggplant/SAR; multimodal settings from BriMPR's TTA/SAR.py, TTA/setup_model.py).

    Reliable entropy minimisation with a sharpness-aware step and model recovery:
        keep x if Ent(x) < E0 = 0.4 ln C; L(theta) = mean_kept Ent(x)                  Eq. (2)
        e = rho g / ||g||_2, g = dL/dtheta, rho = 0.05                                 Eq. (4)
        forward again at theta + e; keep again (Ent < E0) among the first kept; L2 = their mean
        entropy; step Adam from theta with dL2/dtheta at theta + e
        ema <- 0.9 ema + 0.1 L2 (first: L2); ema < e_m = 0.2 -> reload the source weights,
        keep Adam's moments and step count                                             Eq. (recovery)
    Parameters: the LayerNorms of the modality-specific blocks except the top two (BriMPR's walk; on
    the multimodal path only norm1 / norm2 get gradient). Adam 1e-4 (SAM wraps Adam in BriMPR's code;
    here the ascent step is written out and `optimizer` is the Adam), batch 64. The prediction is the
    first forward's. As in the public code, a recovery reloads the weights only (BriMPR's SAM
    wrapper restores its own, empty, state, so the Adam inside keeps its moments and step count),
    the low ema survives a recovery (recovery fires again until the average rises), an empty
    selection still lets Adam step (zero gradient, momentum only), and the recovery equation's
    number is not verified.

    Deviations (`# DEVIATION:` below): no fp16 autocast; the "top two blocks" rule for depths other
    than 11 (see lower_block_norms); reset() between corruption types (and seeds) restores Adam's
    state too, as the protocol says (BriMPR's run.py resets through the same SAM wrapper, so Adam's
    state carries over from one corruption type to the next there).
    """
    BATCH_SIZE = 64
    E0_FACTOR = 0.4  # E0 = 0.4 ln C; SAR.py margin_e0
    RHO = 0.05  # SAM neighbourhood size; SAM default, BriMPR setup_model.py
    RESET_EM = 0.2  # model-recovery threshold e_m; SAR.py reset_constant_em

    def __init__(self, model, params, num_classes):
        super().__init__(model, params)
        self.params = params
        self.e0, self.rho, self.reset_em = entropy_margin(num_classes, self.E0_FACTOR), self.RHO, self.RESET_EM
        self.ema = None
        self.recoveries = 0

    @classmethod
    def setup(cls, model, ctx):
        return cls(model, lower_block_norms(model), ctx.num_classes)

    def __call__(self, batch):
        audio, video = batch["audio"], batch["video"]
        # DEVIATION: the public code runs both forwards under fp16 autocast; fp32 here.
        logits = self.model(audio, video)  # (B, K)
        ent = softmax_entropy(logits)  # (B,)
        # SAR Eq. (2) reliable entropy: keep Ent(x) < E0 (empty selection: NaN loss, zero gradient, as in the code)
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
            self.recover()
        return logits.detach()

    def recover(self):
        """SAR's model recovery as BriMPR's code does it: the source weights back, Adam's state and the ema kept."""
        # SAR Eq. (recovery) reload the source weights only: SAM's load_state_dict leaves the base Adam's state
        self.model.load_state_dict(self.model_state, strict=True)
        self.recoveries += 1

    def reset(self):
        # DEVIATION: BriMPR's run.py resets SAR through its SAM wrapper, which keeps Adam's moments and step
        # count across corruption types; we restore the optimiser too, as the protocol (model AND optimiser) says.
        super().reset()
        self.ema = None


class DeYO(Episodic):
    """DeYO (Lee et al., "Entropy is not Enough for Test-Time Adaptation: From the Perspective of
    Disentangled Factors", ICLR 2024; code Jhyun17/DeYO; multimodal settings from BriMPR's TTA/DeYO.py).

    Entropy minimisation on samples that are confident AND whose prediction rests on the object's
    shape: shuffling 4 x 4 patches (which destroys the shape, not the texture) must lower the
    predicted class's probability:
        keep x if Ent(x) < tau_Ent = 0.5 ln C                                          Eq. (8)
        x' = patch_shuffle(x): audio fbank (time x mel) and video frame, 4 x 4 tiles each,
        every sample its own permutations; one no-grad forward of the shuffled pair
        PLPD(x) = p(y_hat | x) - p(y_hat | x'), keep x if PLPD > tau_PLPD = 0.2        Eq. (PLPD)
        alpha(x) = exp(Ent0 - Ent(x)) + exp(PLPD(x)), Ent0 = 0.4 ln C (detached)        Eq. (10)
        L = mean_kept alpha(x) Ent(x); no step when nothing is kept
    Parameters as SAR (LayerNorms of the lower modality-specific blocks); Adam 1e-4, batch 64; the
    prediction is the first forward's. The PLPD equation's number is not verified (named instead);
    (8) and (10) are the numbers the public code's comments cite.

    Deviations (`# DEVIATION:` below): no fp16 autocast / GradScaler; no resize around the shuffle
    (the public code resizes to a multiple of the grid and back, a no-op for CAV-MAE's 1024 x 128 and
    224 x 224 and for the tiny model's 128 x 64 and 64 x 64; other sizes raise an error); the "top
    two blocks" rule for depths other than 11 (see lower_block_norms).
    """
    BATCH_SIZE = 64
    TAU_ENT_FACTOR = 0.5  # tau_Ent = 0.5 ln C; BriMPR run.py / setup_model.py deyo_margin
    E0_FACTOR = 0.4  # Ent0 = 0.4 ln C; setup_model.py margin_e0
    TAU_PLPD = 0.2  # BriMPR run.py --plpd_threshold
    GRID = 4  # patches per side; BriMPR run.py --patch_len

    def __init__(self, model, params, num_classes):
        super().__init__(model, params)
        self.tau_ent = entropy_margin(num_classes, self.TAU_ENT_FACTOR)
        self.e0 = entropy_margin(num_classes, self.E0_FACTOR)
        self.tau_plpd, self.grid = self.TAU_PLPD, self.GRID

    @classmethod
    def setup(cls, model, ctx):
        return cls(model, lower_block_norms(model), ctx.num_classes)

    def __call__(self, batch):
        # DEVIATION: the public code runs both forwards under fp16 autocast with a GradScaler; fp32 here.
        logits = self.model(batch["audio"], batch["video"])  # (B, K)
        ent = softmax_entropy(logits)  # (B,)
        # DeYO Eq. (8) keep Ent(x) < tau_Ent
        keep = ent < self.tau_ent
        self.losses = {"ent": 0.0, "kept": 0.0}
        if keep.any():
            with torch.no_grad():
                # DEVIATION: no resize to a multiple of the grid and back (a no-op for the sizes here).
                a_s = patch_shuffle(batch["audio"][keep].unsqueeze(1), self.grid).squeeze(1)  # (n, T, F)
                v_s = patch_shuffle(batch["video"][keep], self.grid)  # (n, 3, H, W)
                d = plpd(logits[keep].softmax(1), self.model(a_s, v_s).softmax(1))  # (n,)
            # DeYO Eq. (PLPD) keep PLPD > tau_PLPD among the entropy-kept samples
            sel = d > self.tau_plpd
            if sel.any():
                ent_k = ent[keep][sel]
                loss = weighted_entropy(ent_k, deyo_weight(ent_k, d[sel], self.e0))
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.optimizer.step()
                self.losses = {"ent": loss.item(), "kept": int(sel.sum()) / len(ent)}
        return logits.detach()


METHODS = {"source": Source, "tent": Tent, "eata": EATA, "sar": SAR, "deyo": DeYO, "read": READ,
           "abpem": "abpem", "brimpr": "brimpr"}


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


SET_GROUP = 15  # corrupted embedded test sets made at a time (side by side; 15 x 205 MB at most)


def test_sets(args, model, names):
    """The corrupted test sets of corruption types `names` (video, audio, or 'video+audio' pairs), in order.
    Embedded: made side by side on every core (data.embedded_test_sets); a READ layout: one after the other."""
    pairs = []
    for corruption in names:
        if args.modality == "both":
            pairs.append(tuple(corruption.split("+")))
        else:
            pairs.append((corruption, None) if args.modality == "video" else (None, corruption))
    if args.data == "embedded":
        return data.embedded_test_sets(model, pairs, seed=args.data_seed, severity=args.severity,
                                       frost_dir=args.frost_dir, noise_dir=args.noise_dir)
    return [data.read_layout_split(args.data_root, args.label_csv, model, vc, ac, args.severity) for vc, ac in pairs]


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


def method_names(args):
    """The methods to run, in order: --methods, else --method; Source always first (the paired reference
    and the time base), each name once."""
    names = list(args.methods) if args.methods else [args.method or "brimpr"]
    return list(dict.fromkeys(["source"] + names))


def results_path(args, names):
    """results/adapt_<methods>_<modality>[_<corruptions>][_sev<s>][_continual][_seeds<..>][...].json: a run
    never overwrites the file of a run with another selection."""
    tag = ["adapt", "-".join(names), args.modality]
    if args.corruption != "all":
        chosen = args.corruption.replace("+", "-").split(",")
        joined = "+".join(chosen)
        tag.append(joined if len(joined) <= 40 else f"{len(chosen)}corr-{hashlib.sha1(joined.encode()).hexdigest()[:8]}")
    if args.severity != 5:
        tag.append(f"sev{args.severity}")
    if args.continual:
        tag.append("continual")
    if list(args.seeds) != [1]:
        tag.append("seeds" + "-".join(str(s) for s in args.seeds))
    if args.batch_size is not None:
        tag.append(f"bs{args.batch_size}")
    if "abpem" in names and args.no_cache:
        tag.append("nocache")
    if args.hidden_lr_scale != 1.0:
        tag.append(f"hiddenlr{args.hidden_lr_scale:g}")
    if "eata" in names and args.eata_redundancy is not None:
        tag.append(f"eataeps{args.eata_redundancy:g}")
    if args.data != "embedded":
        tag.append(f"read-{args.dataset}")
    elif args.data_seed != 0:
        tag.append(f"data{args.data_seed}")
    return os.path.join(train.RESULTS_DIR, "_".join(tag) + ".json")


def scale_hidden_lr(adapter, factor):
    """Diagnostic (muP, Yang et al. 2021): multiply the learning rate of the hidden weight MATRICES an
    adapter updates (2-D parameters: the q, k, v projections READ and ABPEM adapt) by `factor`, leaving
    vector-like parameters (LayerNorm affines, biases, prompt tokens) as they are. Adam moves every
    weight by about lr per step whatever the width, so a matrix update changes a width-D layer's output
    about D times more; the published model is 768 wide, ours 64: factor 768 / 64 = 12 gives our hidden
    matrices the published model's relative update size. Done before any step, so no Adam state is lost;
    the adapter's saved starting state is refreshed so reset() keeps the scaled groups."""
    opt = adapter.optimizer
    groups = []
    for g in opt.param_groups:
        settings = {k: v for k, v in g.items() if k != "params"}
        vectors = [p for p in g["params"] if p.dim() != 2]
        matrices = [p for p in g["params"] if p.dim() == 2]
        groups += [{**settings, "params": vectors}] if vectors else []
        groups += [{**settings, "params": matrices, "lr": g["lr"] * factor}] if matrices else []
    opt.param_groups.clear()
    for g in groups:
        opt.add_param_group(g)
    adapter.optimizer_state = copy.deepcopy(opt.state_dict())


def run(args):
    """Every method on the same shuffled streams: the corrupted test set is built once per corruption
    type and reused by every method and seed; a method's stream is seeded by the seed alone (loader
    order, global RNG), so methods with the same batch size see the very same batches, and a method's
    numbers do not depend on which other methods run. One table, one JSON."""
    device = common.get_device(args.device)
    names = method_names(args)
    methods = {n: get_method(n) for n in names}
    corruptions = corruption_list(args.modality, args.corruption)
    t_load = time.time()
    model, meta = load_model(args, device)
    # the source model's own stages when this run trained it (the first run), else the loading time
    stages = dict(meta.get("metrics", {}).get("stage_seconds", {})) if meta.get("trained_now") else {}
    stages = stages or {"loading the source model": time.time() - t_load}
    dataset = args.dataset or ("embedded" if args.data == "embedded" else None)
    if dataset is None:
        raise ValueError("--data read needs --dataset ks50 or vggsound (it picks the papers' per-dataset settings).")
    num_classes = data.EMBEDDED["num_classes"] if args.data == "embedded" else len(data.read_label_csv(args.label_csv))
    if model.num_classes != num_classes:
        raise ValueError(f"the checkpoint has {model.num_classes} classes but the data has {num_classes}; "
                         f"use the checkpoint trained on this dataset.")
    bs = {}
    for n, m in methods.items():  # the papers' batch sizes unless --batch-size
        bs[n] = args.batch_size or (m.BATCH_SIZE[dataset] if isinstance(m.BATCH_SIZE, dict) else m.BATCH_SIZE)
    ckpt = args.checkpoint or train.default_checkpoint("embedded", args.config or "tiny")
    ctx = SimpleNamespace(dataset=dataset, modality=args.modality, num_classes=model.num_classes, device=device,
                          continual=args.continual, cache_prefix=os.path.splitext(ckpt)[0],
                          data_seed=args.data_seed, use_cache=not args.no_cache, eata_redundancy=args.eata_redundancy,
                          source_id="embedded" if args.data == "embedded" else os.path.abspath(source_json(args)),
                          source_batch=source_batch_fn(args, model, device))
    adapters = {n: Source(model) if n == "source" else m.setup(copy.deepcopy(model), ctx) for n, m in methods.items()}
    if args.hidden_lr_scale != 1.0:
        for n, adapter in adapters.items():
            if n != "source":
                scale_hidden_lr(adapter, args.hidden_lr_scale)
    # Source's forward at every other batch size in use: the time base of the methods that run at it
    extra_bs = sorted({b for b in bs.values()} - {bs["source"]})

    acc = {c: {n: [] for n in names} for c in corruptions}  # per corruption and method, one value per seed
    times = {n: [] for n in names}  # seconds per batch
    source_times = {b: [] for b in [bs["source"]] + extra_bs}
    n_samples, t_start, sets = 0, time.time(), {}

    def stream(name, corruption, seed, batch_size, reset):
        """One pass of `name` over the shuffled stream of one corruption; -> batch-averaged accuracy (%)."""
        nonlocal n_samples
        if corruption not in sets:  # this corruption and the next ones (embedded: SET_GROUP at a time, side by side)
            t0 = time.time()
            i = corruptions.index(corruption)
            group = [c for c in corruptions[i:i + (SET_GROUP if args.data == "embedded" else 1)] if c not in sets]
            sets.update(zip(group, test_sets(args, model, group)))
            stages["corrupting the test sets"] = stages.get("corrupting the test sets", 0.0) + time.time() - t0
        adapter = adapters[name]
        if reset:
            adapter.reset()
        loader = data.make_loader(sets[corruption], batch_size, shuffle=True, seed=seed, num_workers=args.workers)
        accs, secs = [], []
        bar = tqdm(loader, desc=f"{name} {corruption} (seed {seed})", leave=False, dynamic_ncols=True)
        for batch in bar:
            batch = data.to_device(batch, device)
            t0 = time.perf_counter()
            logits = adapter(batch)
            secs.append(time.perf_counter() - t0)
            accs.append(100.0 * (logits.argmax(1) == batch["label"]).float().mean().item())
            n_samples += len(batch["label"])
            bar.set_postfix({"acc": f"{np.mean(accs):.1f}", **{k: f"{v:.3f}" for k, v in adapter.losses.items()}})
        if name == "source":
            source_times[batch_size].extend(secs)
        if batch_size == bs[name]:
            times[name].extend(secs)
        return float(np.mean(accs))

    def source_time_base(corruption, seed):
        for b in extra_bs:  # Source at the other batch sizes: time only, the accuracy column is at bs["source"]
            stream("source", corruption, seed, b, reset=False)

    if args.continual:  # per seed and method one stream through every corruption type, reset only at the start
        for seed in args.seeds:
            for n in names:
                common.seed_everything(seed)
                for i, c in enumerate(corruptions):
                    acc[c][n].append(stream(n, c, seed, bs[n], reset=(i == 0)))
                tqdm.write(f"continual seed {seed}: {n} {np.mean([acc[c][n][-1] for c in corruptions]):5.1f}")
            for c in corruptions:
                source_time_base(c, seed)
    else:
        for c in corruptions:
            for seed in args.seeds:
                for n in names:
                    common.seed_everything(seed)
                    acc[c][n].append(stream(n, c, seed, bs[n], reset=True))
                source_time_base(c, seed)
                tqdm.write(f"{c:<32} seed {seed}: " + "  ".join(f"{n} {acc[c][n][-1]:5.1f}" for n in names))
            sets.pop(c)  # the corrupted set is the same for every method and seed; free it once they are done

    wall = time.time() - t_start
    stages["adapting (every method, seed and stream)"] = wall - stages.get("corrupting the test sets", 0.0)
    ms = {n: 1000 * float(np.mean(times[n])) for n in names}
    source_ms = {b: 1000 * float(np.mean(t)) for b, t in source_times.items()}
    ratio = {n: ms[n] / source_ms[bs[n]] if source_ms[bs[n]] > 0 else float("nan") for n in names}
    print(results_table(acc, names, len(args.seeds), {n: (bs[n], ms[n], ratio[n]) for n in names}))
    print(f"{n_samples} samples in {wall:.1f} s ({n_samples / wall:.1f} samples/s over all methods); "
          f"time per batch against Source's forward at the same batch size")
    print("time per stage: " + ", ".join(f"{k} {v:.1f} s" for k, v in stages.items()))
    out = args.results or results_path(args, names)
    summary = {c: {k: {"mean": float(np.mean(v)), "std": float(np.std(v)), "per_seed": v} for k, v in d.items()}
               for c, d in acc.items()}
    per_seed_avg = {n: [float(np.mean([acc[c][n][s] for c in corruptions])) for s in range(len(args.seeds))]
                    for n in names}
    avg = {n: float(np.mean(v)) for n, v in per_seed_avg.items()}
    common.write_json(out, {"args": vars(args), "methods": names, "batch_size": bs, "accuracy": summary,
                            "average": avg, "average_std": {n: float(np.std(v)) for n, v in per_seed_avg.items()},
                            "average_per_seed": per_seed_avg, "wall_seconds": wall,
                            "samples_per_second": n_samples / wall, "ms_per_batch": ms, "stage_seconds": stages,
                            "source_ms_per_batch": {str(b): v for b, v in source_ms.items()},
                           "time_ratio_to_source": ratio})
    print(f"wrote {out}")
    return avg, summary


def results_table(acc, columns, n_seeds, timing=None):
    """Rows = corruption types, columns = methods (mean over seeds, +/- std over seeds), then the average
    (per seed the mean over corruption types, then mean +/- std over seeds); with timing
    {method: (batch size, ms per batch, ratio to Source's forward)} three more rows."""
    def cell(v):
        return f"{np.mean(v):5.1f}" + (f" +/- {np.std(v):4.1f}" if n_seeds > 1 else "")
    w = max(24, max(len(c) for c in acc) + 2)
    cw = max(16 if n_seeds > 1 else 9, max(len(c) for c in columns) + 2)
    rule = "-" * (w + cw * len(columns))
    lines = [f"{'corruption':<{w}}" + "".join(f"{c:>{cw}}" for c in columns), rule]
    for c, d in acc.items():
        lines.append(f"{c:<{w}}" + "".join(f"{cell(d[k]):>{cw}}" for k in columns))
    lines.append(rule)
    mean_over_seeds = {k: [np.mean([acc[c][k][s] for c in acc]) for s in range(n_seeds)] for k in columns}
    lines.append(f"{'average':<{w}}" + "".join(f"{cell(mean_over_seeds[k]):>{cw}}" for k in columns))
    if timing:
        lines.append(rule)
        lines.append(f"{'batch size':<{w}}" + "".join(f"{timing[k][0]:>{cw}d}" for k in columns))
        lines.append(f"{'ms per batch':<{w}}" + "".join(f"{timing[k][1]:>{cw}.1f}" for k in columns))
        lines.append(f"{'x Source forward':<{w}}" + "".join(f"{timing[k][2]:>{cw}.2f}" for k in columns))
    return "\n".join(lines)


def method_list():
    """'source, tent, read, ...': the methods of --method / --methods, for --help."""
    return ", ".join(METHODS)


def batch_sizes():
    """'source 64, ..., abpem 8 (ks50) / 32 (vggsound) / 8 (embedded), ...': each method's BATCH_SIZE, for --help."""
    def show(b):
        return " / ".join(f"{v} ({k})" for k, v in b.items()) if isinstance(b, dict) else str(b)
    return ", ".join(f"{name} {show(get_method(name).BATCH_SIZE)}" for name in METHODS)


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", default=None, choices=list(METHODS),
                   help=f"adaptation method printed beside Source, one of: {method_list()} (default: brimpr)")
    p.add_argument("--methods", nargs="+", default=None, choices=list(METHODS), metavar="NAME",
                   help="several methods on the same streams, one column each (Source always included): "
                        "e.g. --methods source tent eata sar deyo read abpem brimpr; overrides --method (default: none)")
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
    p.add_argument("--no-cache", action="store_true",
                   help="ABPEM only: switch off the public code's feature cache of recent batches (default: on, as in "
                        "every released script)")
    p.add_argument("--hidden-lr-scale", type=float, default=1.0,
                   help="diagnostic: multiply the learning rate of the hidden weight matrices every method updates "
                        "(READ's and ABPEM's q, k, v) by this; 12 = 768 / 64 is the muP width correction of the tiny "
                        "model (default: 1, the papers' learning rates)")
    p.add_argument("--eata-redundancy", type=train.positive_float, default=None, metavar="EPSILON",
                   help="EATA only: the redundancy margin epsilon, keep x if |cos(p(x), m)| < epsilon; with m near "
                        "uniform |cos| >= 1/sqrt(C) (0.32 at 10 classes, 0.14 at 50), so BriMPR's 0.1 keeps nothing "
                        "there; 0.4 is the diagnostic row (default: 0.1, BriMPR run.py; original EATA 0.05)")
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
    p.add_argument("--results", default=None, help="results JSON (default: results/adapt_<methods>_<modality>"
                                                   "[_<selection>].json, named by what was run)")
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
    if args.no_cache and "abpem" not in method_names(args):
        raise SystemExit("error: --no-cache switches off ABPEM's feature cache; add abpem to --method / --methods.")
    if args.eata_redundancy is not None and "eata" not in method_names(args):
        raise SystemExit("error: --eata-redundancy sets EATA's redundancy margin; add eata to --method / --methods.")
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
