"""BriMPR: Bridging Modalities via Progressive Re-alignment for Multimodal Test-Time Adaptation.

Jiacheng Li, Songhe Feng. AAAI 2026 (oral).
arXiv: https://arxiv.org/abs/2511.22862
Code:  https://github.com/Luchicken/BriMPR (`TTA/BriMPR.py`, `models/vapt.py`, `run.py`, `run_both.py`)

Idea. When one modality is corrupted, two things go wrong at once: that modality's own features
drift away from what the network saw in training (a shallow, unimodal shift), and as a consequence
the two modalities no longer agree inside the fusion block (a high-level, cross-modal
misalignment). BriMPR divides and conquers. PMGFA puts a few learnable prompt tokens in front of
every modality-specific layer and tunes them so that each layer's batch statistics (mean and std
of the token-mean feature) match statistics stored from 32 clean training clips. CMER drops half
of one modality's tokens and asks the prediction from the recombined input to agree with the
pseudo-label of the complete input, weighted towards masking the LESS shifted modality. IICL
makes the two unimodal features of the same clip the nearest neighbours of each other in the
batch (InfoNCE). "Progressive" is conceptual: the three losses are summed and optimised with one
backward pass and one Adam step per batch; only the prompts train.

Equations (u in {a, v} the modality, i = 1..L the modality-specific layer, B the batch):
    PMGFA  prompts P_i^u (N_p, D) are prepended before layer i and dropped after it;
           Z_i^u = token mean of layer i's output (prompts excluded), (B, D);
           mu_i^{s,u}, sigma_i^{s,u}: per-dimension mean and unbiased std of Z_i^u over 32 clean
           source clips (frozen model, no prompts); mu_i^{t,u}, sigma_i^{t,u}: the same on the
           current test batch
    Eq. 4  Disc_u = (1/L) sum_i ( ||mu_i^{t,u} - mu_i^{s,u}||_2 + ||sigma_i^{t,u} - sigma_i^{s,u}||_2 )
           L_PMGFA = Disc_a + Disc_v;  Disc_J = the same distance on the fused feature Z^{av}
    Eq. 5  Z^{a_m v} = Psi([Phi_a(x_{a_m}); Phi_v(x_v)]),  Z^{a v_m} = Psi([Phi_a(x_a); Phi_v(x_{v_m})]),
           x_{u_m}: x_u with 50% of its tokens dropped (per sample), y^{..} = softmax(h(Z^{..}))
    Eq. 6  y_hat^{av} = softmax(h(Z^{av}) / AdaTp), stop-gradient;
           AdaTp = 1 + tau0 / (1 + exp(D0 - Disc_J))
    Eq. 7  L_CMER = lambda_a CE(y_hat^{av}, y^{a_m v}) + lambda_v CE(y_hat^{av}, y^{a v_m}),
           lambda_u = 1 - Disc_u / (Disc_a + Disc_v)
    Eq. 8-9 L_IICL = 1/2 [ InfoNCE(Z^a -> Z^v) + InfoNCE(Z^v -> Z^a) ], cosine similarity / tau,
           Z^u = unimodal pass of modality u through the unified block, token mean
    Eq. 10 L = L_PMGFA + L_CMER + L_IICL

Deviations and public-code details (each marked in the code):
  1. (from the public code) Before token-mean pooling, each layer's output goes through the
     frozen norm1 LayerNorm of the NEXT block (the unified block's norm1 after the last layer);
     the paper text pools the raw layer output. Same for the source statistics.
  2. (from the public code) IICL's unimodal feature is the average of two passes through the
     unified block: one with the shared norms (norm1/norm2, then norm) and one with the modality's
     own norms (norm1_u/norm2_u, then norm_u). The paper describes one unimodal pass.
  3. (from the public code) lambda_a, lambda_v and AdaTp are plain numbers (detached, `.item()`);
     the complete pass runs on detached encoder outputs, so neither the pseudo-label nor Disc_J
     gives gradient. We compute that pass under no_grad, which is the same thing, cheaper.
  4. (from the public code) The masked tokens go through the same prompted encoders (prompts in
     every layer), and the CMER gradient reaches the prompts through both the masked and the
     full-token encoder passes.
  5. DEVIATION: the public code's `F.pairwise_distance` adds eps = 1e-6 to each difference before
     the norm; we compute the exact norm (identical statistics give distance 0).
  6. DEVIATION: `reset()` restores the prompts to their initial draw (one U(-1e-4, 1e-4) draw at
     setup, seed PROMPT_SEED) instead of drawing new ones as the public code does, so that a reset
     is exact and runs are reproducible; the same in the continual-shift variant.
  7. DEVIATION: a test batch with fewer than 2 clips has no unbiased std (paper silent; never
     happens in the papers' streams): it is predicted with the current prompts, no update.
  8. DEVIATION: lambda_a = lambda_v = 1/2 when Disc_a + Disc_v = 0 (paper silent, 0/0).
  9. DEVIATION: the public code runs under CUDA autocast (fp16) with a GradScaler; we compute at
     the model's dtype (fp32 on CPU), no loss scaling.
 10. (from the public code, disabled there) Continual-shift variant: a window of the last 10
     Disc_u values per modality; if the new Disc_u has a z-score above 5 against a full window,
     that modality's prompts are re-initialised (Adam's moments are kept, as in the public code)
     and its window is cleared. On with the runner's `--continual` flag (ctx.continual) or
     `setup(..., shift_reset=True)`.

Dimension key: B batch, N_a / N_v audio / video tokens, N_p prompts per layer, D width,
K classes, L modality-specific layers.
"""
import copy
import hashlib
import math
import os
from collections import deque

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import common

# ----------------------------------------------------------------------------------------------
# Hyper-parameters
# ----------------------------------------------------------------------------------------------
BATCH_SIZE = 64  # test batch size; paper's setup, public code run.py -b 64
NUM_PROMPTS = 10  # prompt tokens per modality-specific layer per modality; run.py --num_prompts_a/_v
PROMPT_INIT = 1e-4  # prompts start as U(-1e-4, 1e-4); public code models/vapt.py PromptVA.reset
PROMPT_SEED = 0  # seed of that one draw; our choice (the public code draws from the global seed)
NUM_SOURCE_SAMPLES = 32  # clean training clips for the source statistics; run.py --num_samples_source
SOURCE_SEED = 0  # which 32 clips; our choice (the public code shuffles with the global seed)
MASK_RATIO = 0.5  # CMER token-dropping ratio; paper (CMER), public code run.py --mask 0.5
TAU0 = 0.2  # AdaTp amplitude tau0; Eq. 6, run.py --a 0.2
D0 = 5.0  # AdaTp offset D0; Eq. 6, run.py --b 5
TAU_SINGLE = 0.07  # IICL temperature, one modality shifted; public code run.py --tau 0.07
TAU_BOTH = 0.25  # IICL temperature, both modalities shifted; run_both.py --tau 0.25
LR = 1e-4  # Adam learning rate; paper's setup, public code TTA/setup_model.py setup_brimpr
BETAS = (0.9, 0.999)  # Adam betas; TTA/setup_model.py
WEIGHT_DECAY = 0.0  # TTA/setup_model.py
SHIFT_WINDOW = 10  # continual variant: Disc_u values kept per modality; TTA/BriMPR.py (window_size)
SHIFT_Z = 5.0  # continual variant: z-score that resets a modality's prompts; TTA/BriMPR.py detect_window
STATS_VERSION = 1  # format of the cached source statistics; bump when their definition changes


# ----------------------------------------------------------------------------------------------
# PMGFA: Prompt-driven Modality-specific Global Feature Alignment (Eqs. 1-4)
# ----------------------------------------------------------------------------------------------
def batch_statistics(z):
    """Per-dimension mean and unbiased std over the batch. z: (B, ..., D) -> (mean, std), each (..., D)."""
    # Eq. (4) mu = (1/B) sum_b Z_b,  sigma = sqrt( sum_b (Z_b - mu)^2 / (B - 1) )  (unbiased, as the public code)
    std, mean = torch.std_mean(z, dim=0)
    return mean, std


def stat_distance(mean_s, std_s, mean_t, std_t):
    """||mean_t - mean_s||_2 + ||std_t - std_s||_2 over the last dimension (NOT squared).

    Any leading shape, e.g. (L, D) -> (L,): one distance per layer.
    """
    # DEVIATION: the public code's F.pairwise_distance adds eps = 1e-6 to the difference; exact norm here.
    return torch.linalg.vector_norm(mean_t - mean_s, dim=-1) + torch.linalg.vector_norm(std_t - std_s, dim=-1)


def discrepancy(src, z):
    """Disc_u of Eq. 4: the per-layer distance between the batch's and the source statistics,
    averaged over layers. src: {'mean', 'std'} each (L, D); z: (B, L, D) -> scalar."""
    mean_t, std_t = batch_statistics(z)  # (L, D), (L, D)
    # Eq. (4) Disc_u = (1/L) sum_i ||mu_i^t - mu_i^s||_2 + ||sigma_i^t - sigma_i^s||_2
    return stat_distance(src["mean"], src["std"], mean_t, std_t).mean()


def pmgfa_loss(disc_a, disc_v):
    """L_PMGFA of Eq. 4: the per-modality discrepancies summed over modalities. scalars -> scalar."""
    # Eq. (4) L_PMGFA = sum_u Disc_u
    return disc_a + disc_v


# ----------------------------------------------------------------------------------------------
# CMER: Cross-modal Masked Embedding Recombination (Eqs. 5-7)
# ----------------------------------------------------------------------------------------------
def mask_tokens(x, mask_ratio=MASK_RATIO, generator=None):
    """MAE-style token dropping: each sample keeps its own random int(N (1 - ratio)) tokens.
    x: (B, N, D) -> (B, int(N (1 - ratio)), D)."""
    keep = int(x.shape[1] * (1 - mask_ratio))  # as the public code's random_masking
    # The kept tokens stay in their original order (the public code leaves them shuffled): the same
    # thing, since positions are already embedded and attention + mean pooling ignore token order.
    return common.keep_tokens(x, keep, generator)


def as_number(x):
    """A float from a float or a 0-d tensor, detached."""
    return x.detach().item() if torch.is_tensor(x) else float(x)


def adaptive_temperature(disc_joint, tau0=TAU0, d0=D0):
    """AdaTp of Eq. 6 from the fused feature's discrepancy Disc_J (a float or a 0-d tensor) -> float.

    Small shift -> 1 (sharp pseudo-labels); large shift -> 1 + tau0 (softer ones).
    """
    # from the public code: a plain number (Disc_J.item()), no gradient
    d = as_number(disc_joint)
    # Eq. (6) AdaTp = 1 + tau0 / (1 + exp(D0 - Disc_J))
    return 1.0 + tau0 / (1.0 + math.exp(d0 - d))


def modality_weights(disc_a, disc_v):
    """lambda_a, lambda_v of Eq. 7 from Disc_a, Disc_v (floats or 0-d tensors) -> two floats.

    The term that masks the LESS shifted modality gets the larger weight.
    """
    # from the public code: detached plain numbers (.item())
    d_a, d_v = as_number(disc_a), as_number(disc_v)
    if d_a + d_v == 0:
        # DEVIATION: paper silent on 0 / 0; equal weights.
        return 0.5, 0.5
    # Eq. (7) lambda_u = 1 - Disc_u / (Disc_a + Disc_v)
    return d_v / (d_a + d_v), d_a / (d_a + d_v)


def soft_cross_entropy(student_logits, teacher_logits, temperature):
    """CE(y_hat, y) per sample: -sum_k softmax(teacher / T)_k log softmax(student)_k. (B, K) -> (B,).

    The teacher (the complete pass) is detached: stop-gradient of Eq. 6. Only the teacher is
    softened by the temperature.
    """
    # Eq. (6) y_hat^{av} = softmax(h(Z^{av}) / AdaTp), stop-gradient
    y_hat = (teacher_logits.detach() / temperature).softmax(dim=1)  # (B, K)
    # Eq. (7) CE(y_hat, y) = -sum_k y_hat_k log y_k, y = softmax(student logits)
    return -(y_hat * student_logits.log_softmax(dim=1)).sum(dim=1)


def cmer_loss(logits_amv, logits_avm, teacher_logits, temperature, lambda_a, lambda_v):
    """L_CMER of Eq. 7: batch-mean CEs of the two recombined passes against the pseudo-label. -> scalar.

    logits_amv: masked audio + full video (B, K); logits_avm: full audio + masked video (B, K).
    """
    ce_amv = soft_cross_entropy(logits_amv, teacher_logits, temperature).mean()
    ce_avm = soft_cross_entropy(logits_avm, teacher_logits, temperature).mean()
    # Eq. (7) L_CMER = lambda_a CE(y_hat^{av}, y^{a_m v}) + lambda_v CE(y_hat^{av}, y^{a v_m})
    return lambda_a * ce_amv + lambda_v * ce_avm


# ----------------------------------------------------------------------------------------------
# IICL: Inter-modal Instance-wise Contrastive Learning (Eqs. 8-9)
# ----------------------------------------------------------------------------------------------
def info_nce(z_a, z_v, tau):
    """Symmetric InfoNCE with cosine similarity: z_a, z_v (B, D) -> scalar.

    Positives: the other modality of the same clip; negatives: the other B - 1 clips.
    """
    z_a, z_v = F.normalize(z_a, dim=-1), F.normalize(z_v, dim=-1)
    sim = z_a @ z_v.t() / tau  # (B, B): rows audio, columns video
    target = torch.arange(sim.shape[0], device=sim.device)
    # Eqs. (8)-(9), one direction: -1/B sum_b log( exp(s_bb) / sum_j exp(s_bj) ), rows then columns
    a_to_v, v_to_a = F.cross_entropy(sim, target), F.cross_entropy(sim.t(), target)
    # Eqs. (8)-(9) L_IICL = (L_{a->v} + L_{v->a}) / 2
    return (a_to_v + v_to_a) / 2


# ----------------------------------------------------------------------------------------------
# Objective (Eq. 10)
# ----------------------------------------------------------------------------------------------
IICL_WEIGHT = 1.0  # diagnostic only: 0 switches IICL off (Eq. (10) has no weight, i.e. 1)


def total_loss(l_pmgfa, l_cmer, l_iicl):
    """Eq. 10 with unit weights: scalars -> scalar."""
    # Eq. (10) L = L_PMGFA + L_CMER + L_IICL
    return l_pmgfa + l_cmer + IICL_WEIGHT * l_iicl


# ----------------------------------------------------------------------------------------------
# Model surgery: deep prompts around a frozen CAV-MAE
# ----------------------------------------------------------------------------------------------
class PromptedCAVMAE(nn.Module):
    """A frozen CAV-MAE plus deep prompts: prompts_a, prompts_v of shape (L, N_p, D), one set per
    modality-specific layer, prepended before the layer and dropped after it. The unified block
    gets no prompts."""

    def __init__(self, backbone, num_prompts=NUM_PROMPTS, init=PROMPT_INIT, seed=PROMPT_SEED):
        super().__init__()
        for p in backbone.parameters():
            p.requires_grad_(False)
        self.backbone = backbone.eval()
        L, D = len(backbone.blocks_a), backbone.embed_dim
        kw = dict(device=backbone.pos_embed_a.device, dtype=backbone.pos_embed_a.dtype)
        g = torch.Generator().manual_seed(seed)
        # from the public code (models/vapt.py): U(-1e-4, 1e-4), every modality-specific layer
        draw = [torch.empty(L, num_prompts, D, dtype=kw["dtype"]).uniform_(-init, init, generator=g) for _ in "av"]
        self.prompts_a = nn.Parameter(draw[0].to(kw["device"]))  # (L, N_p, D)
        self.prompts_v = nn.Parameter(draw[1].to(kw["device"]))  # (L, N_p, D)

    def prompts(self, modality):
        return self.prompts_a if modality == "a" else self.prompts_v

    def encode(self, x, modality, prompted=True, features=False):
        """Tokens x (B, N, D) through modality `modality`'s blocks ('a' or 'v').

        -> z (B, N, D); with features also the per-layer token-mean features Z_i^u (B, L, D).
        prompted=False: the plain frozen encoder (source statistics).
        """
        bb = self.backbone
        blocks = bb.blocks_a if modality == "a" else bb.blocks_v
        # DEVIATION: the paper pools layer i's raw output; the public code pools it after the NEXT
        # block's frozen norm1 (the unified block's norm1 after the last layer); we follow the code,
        # whose numbers the paper reports.
        next_norm1 = [blk.norm1 for blk in blocks[1:]] + [bb.blocks_u[0].norm1]
        prompts = self.prompts(modality) if prompted else None
        feats = []
        for i, blk in enumerate(blocks):
            if prompts is None:
                x = blk(x)  # (B, N, D)
            else:
                n_p = prompts.shape[1]
                x = torch.cat([prompts[i].expand(x.shape[0], -1, -1), x], dim=1)  # (B, N_p + N, D)
                x = blk(x)[:, n_p:]  # (B, N, D): prompt outputs dropped, layer i + 1 gets its own
            if features:
                feats.append(next_norm1[i](x).mean(dim=1))  # Z_i^u: (B, D)
        return (x, torch.stack(feats, dim=1)) if features else x  # (B, N, D), (B, L, D)

    def unimodal_feature(self, z, modality):
        """Z^u of IICL: z (B, N, D) of one modality through the unified block -> (B, D)."""
        bb = self.backbone
        shared = z
        for blk in bb.blocks_u:
            shared = blk(shared)  # shared norms, as in the multimodal path
        shared = bb.norm(shared).mean(dim=1)  # (B, D)
        own = bb.fuse_single(z, modality)  # the modality's own norms, then norm_u: (B, D)
        # DEVIATION: the paper describes one unimodal pass; the public code averages the shared-norm and
        # the modality-norm passes; we follow the code, whose numbers the paper reports.
        # Eq. (8) Z^u = (Psi_shared(z_u) + Psi_u(z_u)) / 2, each token-mean pooled
        return (shared + own) / 2

    @torch.no_grad()
    def predict(self, audio, video):
        """The complete prompted pass, no adaptation: audio (B, T, F), video (B, 3, H, W) -> (B, K)."""
        bb = self.backbone
        z_a = self.encode(bb.embed_audio(audio), "a")  # (B, N_a, D)
        z_v = self.encode(bb.embed_video(video), "v")  # (B, N_v, D)
        return bb.classify(bb.fuse(z_a, z_v))


@torch.no_grad()
def prompt_attention_share(model, video):
    """Diagnostic: the share of the video tokens' attention that goes to the prompt tokens, averaged over
    the video layers, heads and video query tokens. model: PromptedCAVMAE; video (B, 3, H, W) -> float."""
    bb = model.backbone
    x = bb.embed_video(video)  # (B, N_v, D)
    n_p = model.prompts_v.shape[1]
    shares = []
    for i, blk in enumerate(bb.blocks_v):
        x = torch.cat([model.prompts_v[i].expand(x.shape[0], -1, -1), x], dim=1)  # (B, N_p + N_v, D)
        _, logits = blk.attn(blk.norm1(x), return_logits=True)  # (B, H, N_p + N_v, N_p + N_v)
        shares.append(logits.softmax(dim=-1)[:, :, n_p:, :n_p].sum(dim=-1).mean())  # video queries -> prompt keys
        x = blk(x)[:, n_p:]
    return torch.stack(shares).mean().item()


def collect_params(model):
    """What trains: the prompts only. -> (params, names)."""
    params, names = [], []
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith("prompts_"))
        if p.requires_grad:
            params.append(p)
            names.append(name)
    return params, names


# ----------------------------------------------------------------------------------------------
# Source statistics: computed once, cached next to the checkpoint
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def source_statistics(model, batch):
    """Frozen model, no prompts, n clean clips -> {'a', 'v', 'u'}: {'mean', 'std'}, shapes (L, D), (L, D), (1, D)."""
    bb = model.backbone
    x_a, x_v = bb.embed_audio(batch["audio"]), bb.embed_video(batch["video"])  # (n, N_a, D), (n, N_v, D)
    z_a, f_a = model.encode(x_a, "a", prompted=False, features=True)  # (n, N_a, D), (n, L, D)
    z_v, f_v = model.encode(x_v, "v", prompted=False, features=True)  # (n, N_v, D), (n, L, D)
    f_u = bb.fuse(z_a, z_v)[:, None]  # (n, 1, D): fused feature, for Disc_J
    out = {}
    for key, f in (("a", f_a), ("v", f_v), ("u", f_u)):
        mean, std = batch_statistics(f)
        out[key] = {"mean": mean, "std": std}
    return out


def model_fingerprint(model):
    """A short hash of a CAV-MAE's weights: every tensor's name and shape and ~256 of its values."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        flat = t.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 256)].to("cpu", torch.float64)
        h.update(f"{name}{tuple(t.shape)}".encode())
        h.update(sample.numpy().tobytes())
    return h.hexdigest()[:32]


def load_or_compute_source_statistics(model, ctx, n=NUM_SOURCE_SAMPLES, seed=SOURCE_SEED):
    """The source statistics of `model` (a PromptedCAVMAE), from f'{ctx.cache_prefix}.brimpr_source_stats.pt'
    when that file was made from the same weights (a hash), data set, data seed and source list (if ctx has them),
    n and seed; else computed from ctx.source_batch(n, seed) and written there."""
    key = {"version": STATS_VERSION, "fingerprint": model_fingerprint(model.backbone),
           "dataset": str(ctx.dataset), "data_seed": getattr(ctx, "data_seed", None),
           "source": getattr(ctx, "source_id", None), "n": n, "seed": seed,
           "prompts": (tuple(model.prompts_a.shape), tuple(model.prompts_v.shape))}
    path = f"{ctx.cache_prefix}.brimpr_source_stats.pt" if getattr(ctx, "cache_prefix", None) else None
    device = model.prompts_a.device
    if path and os.path.isfile(path):
        try:
            cached = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # unreadable or truncated: recompute below
            cached = None
        if isinstance(cached, dict) and cached.get("key") == key:
            return {m: {s: t.to(device) for s, t in d.items()} for m, d in cached["stats"].items()}
    stats = source_statistics(model, ctx.source_batch(n, seed))
    if path:
        cpu = {m: {s: t.cpu() for s, t in d.items()} for m, d in stats.items()}
        try:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            common.atomic_save({"key": key, "stats": cpu}, path)  # unique temp name per process
        except OSError as err:  # a read-only folder: go on without the cache
            print(f"[brimpr] could not cache the source statistics at {path} ({err}); continuing without")
    return stats


# ----------------------------------------------------------------------------------------------
# One step
# ----------------------------------------------------------------------------------------------
def forward_and_adapt(model, batch, optimizer, src, tau, mask_ratio=MASK_RATIO, generator=None):
    """One BriMPR step on a test batch: forward, Eq. 4-10, zero_grad / backward / step.

    -> (complete-pass logits (B, K) from BEFORE the update, {'pmgfa', 'cmer', 'iicl'} floats,
        (Disc_a, Disc_v) floats).
    """
    bb = model.backbone
    if batch["audio"].shape[0] < 2:
        # DEVIATION: no unbiased std from one clip (paper silent): predict, do not update.
        return model.predict(batch["audio"], batch["video"]), {}, (float("nan"), float("nan"))
    x_a = bb.embed_audio(batch["audio"])  # (B, N_a, D): patch + position + modality embedding
    x_v = bb.embed_video(batch["video"])  # (B, N_v, D)
    # Eq. (5) masking: each sample drops its own random half of the tokens
    x_am = mask_tokens(x_a, mask_ratio, generator)  # (B, N_a / 2, D)
    x_vm = mask_tokens(x_v, mask_ratio, generator)  # (B, N_v / 2, D)

    # Each prompted encoder runs once on full and once on masked tokens; the full pass also
    # yields the per-layer features of PMGFA.
    z_a, f_a = model.encode(x_a, "a", features=True)  # (B, N_a, D), (B, L, D)
    z_v, f_v = model.encode(x_v, "v", features=True)  # (B, N_v, D), (B, L, D)
    # from the public code: the masked tokens get the same deep prompts (gradient through both passes)
    z_am = model.encode(x_am, "a")  # (B, N_a / 2, D)
    z_vm = model.encode(x_vm, "v")  # (B, N_v / 2, D)

    # Complete pass: the prediction and, detached, the CMER teacher.
    # from the public code: its input is detached, so no gradient flows here (no_grad is the same)
    with torch.no_grad():
        feat_av = bb.fuse(z_a, z_v)  # Z^{av}: (B, D)
        logits = bb.classify(feat_av)  # (B, K)

    # PMGFA
    disc_a = discrepancy(src["a"], f_a)  # Disc_a, scalar with gradient
    disc_v = discrepancy(src["v"], f_v)  # Disc_v
    l_pmgfa = pmgfa_loss(disc_a, disc_v)

    # CMER
    disc_j = discrepancy(src["u"], feat_av[:, None])  # Disc_J, no gradient: (B, 1, D) -> scalar
    temperature = adaptive_temperature(disc_j)
    lambda_a, lambda_v = modality_weights(disc_a, disc_v)
    # Eq. (5) Z^{a_m v} = Psi([Phi_a(x_{a_m}); Phi_v(x_v)]),  Z^{a v_m} = Psi([Phi_a(x_a); Phi_v(x_{v_m})])
    logits_amv = bb.classify(bb.fuse(z_am, z_v))  # y^{a_m v}: (B, K)
    logits_avm = bb.classify(bb.fuse(z_a, z_vm))  # y^{a v_m}: (B, K)
    l_cmer = cmer_loss(logits_amv, logits_avm, logits, temperature, lambda_a, lambda_v)

    # IICL
    c_a = model.unimodal_feature(z_a, "a")  # Z^a: (B, D)
    c_v = model.unimodal_feature(z_v, "v")  # Z^v: (B, D)
    l_iicl = info_nce(c_a, c_v, tau)

    loss = total_loss(l_pmgfa, l_cmer, l_iicl)
    # DEVIATION: the public code runs under CUDA autocast (fp16) with a GradScaler; plain fp32 here.
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    losses = {"pmgfa": l_pmgfa.item(), "cmer": l_cmer.item(), "iicl": l_iicl.item()}
    return logits, losses, (disc_a.item(), disc_v.item())


# ----------------------------------------------------------------------------------------------
# Continual-shift variant (public code, disabled there)
# ----------------------------------------------------------------------------------------------
class ShiftDetector:
    """from the public code (TTA/BriMPR.py detect_window): z-score of a new Disc_u against the window
    of the last SHIFT_WINDOW values; update() -> True when the shift is new (z > SHIFT_Z, full window),
    which clears the window; otherwise the value joins the window."""

    def __init__(self, window=SHIFT_WINDOW, threshold=SHIFT_Z):
        self.window, self.threshold = deque(maxlen=window), threshold

    def update(self, disc):
        w = np.asarray(self.window, dtype=np.float64)
        sigma = w.std(ddof=1) if len(w) > 1 else 0.0
        z = 0.0 if sigma == 0 else (disc - w.mean()) / sigma
        if z > self.threshold and len(self.window) == self.window.maxlen:
            self.window.clear()
            return True
        self.window.append(disc)
        return False

    def clear(self):
        self.window.clear()


# ----------------------------------------------------------------------------------------------
# The adapter
# ----------------------------------------------------------------------------------------------
class BriMPR(nn.Module):
    """Prompted model + Adam (tent style). forward(batch) adapts on the batch and returns the
    complete-pass logits from before the update; reset() restores prompts and optimiser."""

    def __init__(self, model, src, tau, shift_reset=False):
        super().__init__()
        self.model, self.src, self.tau, self.shift_reset = model.eval(), src, tau, shift_reset
        params, self.param_names = collect_params(model)
        self.optimizer = torch.optim.Adam(params, lr=LR, betas=BETAS, weight_decay=WEIGHT_DECAY)
        # DEVIATION: reset() restores this initial draw (public code draws new U(-1e-4, 1e-4) prompts).
        self.prompts_start = {m: model.prompts(m).detach().clone() for m in "av"}
        self.optimizer_state = copy.deepcopy(self.optimizer.state_dict())
        self.detectors = {m: ShiftDetector() for m in "av"}
        self.losses = {}
        self.eval()  # eval mode throughout; only the prompts adapt

    def forward(self, batch):
        logits, self.losses, (disc_a, disc_v) = forward_and_adapt(self.model, batch, self.optimizer, self.src, self.tau)
        if self.shift_reset and self.losses:
            for m, d in (("a", disc_a), ("v", disc_v)):
                if self.detectors[m].update(d):
                    self.reset_prompts(m)  # from the public code: the modality's prompts only, Adam kept
        return logits

    def predict(self, batch):
        """The current prediction without adapting: complete prompted pass, (B, K)."""
        return self.model.predict(batch["audio"], batch["video"])

    def reset_prompts(self, modality):
        with torch.no_grad():
            self.model.prompts(modality).copy_(self.prompts_start[modality])

    def reset(self):
        for m in "av":
            self.reset_prompts(m)
            self.detectors[m].clear()
        self.optimizer.load_state_dict(copy.deepcopy(self.optimizer_state))
        self.losses = {}


def setup(model, ctx, shift_reset=None):
    """adapt.py's entry point: wrap a (copied) source model. shift_reset: the continual-shift prompt
    reset (default: ctx.continual, i.e. on with `python adapt.py --continual`)."""
    prompted = PromptedCAVMAE(model, num_prompts=NUM_PROMPTS)  # read at call time: a diagnostic may set it
    src = load_or_compute_source_statistics(prompted, ctx)
    tau = TAU_BOTH if ctx.modality == "both" else TAU_SINGLE
    shift_reset = bool(getattr(ctx, "continual", False)) if shift_reset is None else shift_reset
    return BriMPR(prompted, src, tau, shift_reset=shift_reset)
