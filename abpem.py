"""ABPEM: Attention Bootstrapping with Principal Entropy Minimization.

Zhao, Luo, Luo, Huang, Yuan, Xiao, Zhang. "Attention Bootstrapping for Multi-Modal Test-Time
Adaptation", AAAI 2025.
arXiv: https://arxiv.org/abs/2503.02221
Code:  https://github.com/YushengZhao/ABPEM (`TTA/ABPEM.py`, `models/cav_mae.py`, `run_read.py`,
       `scripts/ours-*.sh`), itself built on READ's code (XLearning-SCU/2024-ICLR-READ).

Idea. Under a distribution shift the cross-attention of the fusion block (one modality's queries
on the other modality's keys) drifts much more than its self-attention: the "attention gap".
ABPEM adapts the unified block's q, k, v projections online, one Adam step per test batch, with
two terms: attention bootstrapping pulls the statistics (mean, std) of the raw cross-attention
scores towards those of the self-attention scores of the modality whose keys they read, the
self-attention side being the fixed anchor (stop-gradient); principal entropy minimisation
minimises only the top-k classes' terms of the prediction entropy, which the paper argues
carries less gradient noise than the full entropy. The public code adds a class-balance term.
The reported prediction is a second forward pass through the updated block.

Equations. Neither the public code nor its README cites the paper's equation numbers, and the
paper's numbering was not available here, so the equations carry names, not numbers:

    Eq. (S)     S = mean_h ( Q_h K_h^T / sqrt(D / H) )              (B, N, N), rows = queries,
                the unified block's pre-softmax scores, audio tokens first (N = N_a + N_v)
    Eq. (STAT)  blocks S_aa = S[:, :N_a, :N_a],  S_vv = S[:, N_a:, N_a:],
                       S_av = S[:, :N_a, N_a:] (audio queries, video keys),
                       S_va = S[:, N_a:, :N_a] (video queries, audio keys);
                mu_X(b) = mean of the entries of X_b,  sigma_X(b) = their std (unbiased, n - 1)
    Eq. (KL)    KL(N(mu_p, sigma_p^2) || N(mu_q, sigma_q^2))
                  = ln(sigma_q / sigma_p) + (sigma_p^2 + (mu_p - mu_q)^2) / (2 sigma_q^2) - 1/2
    Eq. (AB)    L_AB = mean_b KL(N(mu_va, sigma_va) || sg N(mu_aa, sigma_aa))
                     + mean_b KL(N(mu_av, sigma_av) || sg N(mu_vv, sigma_vv))      sg = stop-gradient
    Eq. (PEM)   p_b = softmax(logits_b);  L_PEM = mean_b sum_{c in top-k(p_b)} -p_bc ln(p_bc + 1e-6)
                (no renormalisation over the top k)
    Eq. (BAL)   p_bar = mean_b p_b;  H(p_bar) = -sum_c p_bar_c ln p_bar_c          (public code only)
    Eq. (L)     L = w_ent L_PEM - w_bal H(p_bar) + w_attn L_AB

Deviations and gap-fillings (each marked `# DEVIATION:` in the code):
  1. The class-balance term -w_bal H(p_bar) comes from the public code (`--fix-loss-bal`, on in
     every released script), not from the paper's loss as summarised (L = lambda L_AB + L_PEM).
  2. The feature cache (public code `--use-cache`, on in all four released scripts
     scripts/ours-{ks50,vgg}-{video,audio}.sh; the paper does not describe it) is ON by default
     here, as the released scripts run; `adapt.py --no-cache` (use_cache=False) switches it off.
     With it on, the frozen encoder outputs of the last batches (at most CACHE_SIZE samples,
     whole batches, always the current one: 32 // 8 = 4 batches for Kinetics50) are concatenated
     and the loss and the step run over all of them, as in the code; the reported prediction uses
     the current batch only. The code counts the cache in batches (cache_size // batch_size, empty
     if the batch exceeds it); we count samples.
  3. No AMP: everything runs in the model's dtype (fp32); half-precision attention scores are
     upcast to fp32 before their statistics (the public code runs under torch.cuda.amp).
  4. The embedded benchmark (10 classes) is not in the paper: k = 2 (~15% of the classes,
     1.5 rounded up), batch 8, cache 32, and Kinetics50's weights (w_attn 1 video / 5 audio).
  5. `--modality both` (both modalities corrupted) is not in the paper: the dataset's video
     settings (k, w_attn, cache) are used.
  6. Ties in the top-k selection are broken towards the lower class index (stable sort); the
     public code's unstable sort leaves the choice open. The value is the same either way
     (tied probabilities have equal entropy terms); only the gradient's direction depends on it.
  7. k larger than the number of classes is clamped to K (the code's gather would fail).

Equivalences, not deviations: updating `blocks_u[0].attn.qkv` (weight and bias) is the public
code's parameter set (its `qa, ka, va` are views of `qkv`, and `qv, kv, vv` are the same modules);
the public code's configure_model calls `model.train()`, but its runner (run_read.py) then calls
`eval()` on the wrapper before adapting, so it runs in eval mode as we do (CAV-MAE has no dropout
or drop-path anyway); the frozen encoders run once per batch and both passes through the
unified block reuse their outputs (the code's `av_feat`). Reading published numbers: the code's
`run_read.py` reports, per corruption, the MAXIMUM over 5 seeds (10 for VGGSound video), while
`adapt.py` reports the mean.

Dimension key: B batch, N = N_a + N_v tokens (audio first), D width, H heads, K classes,
k principal classes, L modality-specific layers.
"""
import copy
import math

import torch

# ----------------------------------------------------------------------------------------------
# Hyper-parameters
# ----------------------------------------------------------------------------------------------
LR = 1e-4  # Adam learning rate; public code scripts/ours-*.sh (--lr 1e-4)
BETAS = (0.9, 0.999)  # Adam betas; public code run_read.py
WEIGHT_DECAY = 0.0  # Adam weight decay; public code run_read.py (--wd default 0.0)
W_ENT = 1.0  # weight of L_PEM; scripts/ours-*.sh (--ent-weight 1.0)
W_BAL = 1.0  # weight of -H(p_bar); run_read.py (--bal-weight default 1.0, on with --fix-loss-bal)
PEM_EPS = 1e-6  # epsilon inside the log of Eq. (PEM); TTA/ABPEM.py
USE_CACHE = True  # feature cache, public code only (--use-cache, on in every released script); Deviation 2

# Per dataset and corrupted modality. Kinetics50 / VGGSound from scripts/ours-{ks50,vgg}-{video,audio}.sh.
# DEVIATION: the embedded benchmark (10 classes) is not in the paper: k = 2 is ~15% of the classes
# (1.5, rounded up), like the paper's video k (8 of 50); w_attn, cache and batch as Kinetics50.
K_PRINCIPAL = {"ks50": {"video": 8, "audio": 7},  # --prime-ent-k
               "vggsound": {"video": 28, "audio": 30},
               "embedded": {"video": 2, "audio": 2}}
W_ATTN = {"ks50": {"video": 1.0, "audio": 5.0},  # --attn-weight
          "vggsound": {"video": 1.0, "audio": 1.0},
          "embedded": {"video": 1.0, "audio": 5.0}}
CACHE_SIZE = {"ks50": {"video": 32, "audio": 32},  # --cache-size, in samples (used only with the cache)
              "vggsound": {"video": 128, "audio": 64},
              "embedded": {"video": 32, "audio": 32}}
BATCH_SIZE = {"ks50": 8, "vggsound": 32,  # --batch-size; scripts/ours-*.sh
              "embedded": 8}  # ours: Kinetics50's, the closer dataset in size


def settings(dataset, modality, num_classes=None):
    """k, w_attn and the cache size for a dataset ('embedded' | 'ks50' | 'vggsound') and a corrupted
    modality ('video' | 'audio' | 'both'). An unknown dataset gets ~15% of `num_classes` (>= 1) and
    Kinetics50's weights."""
    # DEVIATION: the paper has no protocol with both modalities corrupted; use the video settings.
    m = "audio" if modality == "audio" else "video"
    if dataset in K_PRINCIPAL:
        k = K_PRINCIPAL[dataset][m]
    else:
        k = max(1, math.ceil(0.15 * (num_classes or 10) - 1e-9))
    d = dataset if dataset in W_ATTN else "ks50"
    return {"k": k, "w_attn": W_ATTN[d][m], "cache_size": CACHE_SIZE[d][m]}


# ----------------------------------------------------------------------------------------------
# Losses and small operations (pure functions)
# ----------------------------------------------------------------------------------------------
def head_mean(attn_logits):
    """Eq. (S): head-averaged raw attention scores. (B, H, N, N) -> (B, N, N)."""
    # Eq. (S) S = mean_h Q_h K_h^T / sqrt(D/H)  (the 1/sqrt scaling is already in the logits)
    return attn_logits.mean(dim=1)


def attention_blocks(scores, n_audio):
    """The four blocks of S (B, N, N), audio tokens first: aa (B, N_a, N_a), vv (B, N_v, N_v),
    av (B, N_a, N_v) = audio queries on video keys, va (B, N_v, N_a) = video queries on audio keys."""
    # Eq. (STAT) S_aa = S[:, :N_a, :N_a], S_vv = S[:, N_a:, N_a:], S_av = S[:, :N_a, N_a:], S_va = S[:, N_a:, :N_a]
    return {"aa": scores[:, :n_audio, :n_audio], "vv": scores[:, n_audio:, n_audio:],
            "av": scores[:, :n_audio, n_audio:], "va": scores[:, n_audio:, :n_audio]}


def block_stats(block):
    """Eq. (STAT) per sample: mean and unbiased std of all entries. (B, n, m) -> mu (B,), sigma (B,)."""
    flat = block.flatten(1)  # (B, n * m)
    # Eq. (STAT) mu = mean of the entries, sigma = sqrt(sum (x - mu)^2 / (n m - 1))
    return flat.mean(dim=1), flat.std(dim=1, correction=1)


def attention_stats(scores, n_audio):
    """The attention-gap statistics: {'aa', 'vv', 'av', 'va'} -> (mu (B,), sigma (B,)) of S (B, N, N)."""
    if scores.dtype in (torch.float16, torch.bfloat16):
        # DEVIATION: the public code runs under AMP; the statistics are computed in fp32 here.
        scores = scores.float()
    return {name: block_stats(x) for name, x in attention_blocks(scores, n_audio).items()}


def gaussian_kl(mu_p, sigma_p, mu_q, sigma_q):
    """Eq. (KL), KL(N(mu_p, sigma_p^2) || N(mu_q, sigma_q^2)), elementwise on tensors of one shape."""
    # Eq. (KL) ln(sigma_q / sigma_p) + (sigma_p^2 + (mu_p - mu_q)^2) / (2 sigma_q^2) - 1/2
    return torch.log(sigma_q / sigma_p) + (sigma_p ** 2 + (mu_p - mu_q) ** 2) / (2 * sigma_q ** 2) - 0.5


def attention_bootstrap_loss(scores, n_audio):
    """Eq. (AB). scores: head-averaged raw attention S (B, N, N), audio tokens first -> scalar.

    Each cross block is pulled to the self block of the modality whose KEYS it reads (S_va, video
    queries on audio keys, to S_aa; S_av to S_vv); the self-attention statistics are detached.
    """
    st = attention_stats(scores, n_audio)
    (mu_aa, sigma_aa), (mu_vv, sigma_vv) = st["aa"], st["vv"]
    (mu_av, sigma_av), (mu_va, sigma_va) = st["av"], st["va"]
    kl_va = gaussian_kl(mu_va, sigma_va, mu_aa.detach(), sigma_aa.detach())  # (B,)
    kl_av = gaussian_kl(mu_av, sigma_av, mu_vv.detach(), sigma_vv.detach())  # (B,)
    # Eq. (AB) L_AB = mean_b KL(va || sg aa) + mean_b KL(av || sg vv)   (added, not averaged)
    return kl_va.mean() + kl_av.mean()


def principal_entropy(logits, k, eps=PEM_EPS):
    """Eq. (PEM): mean_b sum_{c in top-k(p_b)} -p_bc log(p_bc + eps). logits: (B, K) -> scalar."""
    p = logits.softmax(dim=1)  # (B, K)
    ent = -p * torch.log(p + eps)  # (B, K), every class's entropy term
    # DEVIATION: k > K is clamped to K (paper silent; the code's gather would fail).
    k = min(int(k), p.shape[1])
    # DEVIATION: ties broken towards the lower class index (stable sort); same value either way.
    top = torch.sort(p.detach(), dim=1, descending=True, stable=True).indices[:, :k]  # (B, k)
    # Eq. (PEM) L_PEM = mean_b sum_{c in top-k} -p_bc ln(p_bc + eps), no renormalisation
    return ent.gather(1, top).sum(dim=1).mean()


def balance_entropy(logits):
    """Eq. (BAL): H(p_bar), p_bar = mean_b softmax(logits_b), no epsilon. logits: (B, K) -> scalar."""
    p_bar = logits.softmax(dim=1).mean(dim=0)  # (K,)
    # Eq. (BAL) H(p_bar) = -sum_c p_bar_c ln p_bar_c
    return -(p_bar * torch.log(p_bar)).sum()


def total_loss(l_pem, h_bal, l_ab, w_ent=W_ENT, w_bal=W_BAL, w_attn=1.0):
    """Eq. (L) from the three scalar terms."""
    # DEVIATION: the balance term is the public code's (--fix-loss-bal), not in the paper's loss.
    # Eq. (L) L = w_ent L_PEM - w_bal H(p_bar) + w_attn L_AB
    return w_ent * l_pem - w_bal * h_bal + w_attn * l_ab


# ----------------------------------------------------------------------------------------------
# Model surgery: nothing is added; the unified block's q, k, v projections are unfrozen
# ----------------------------------------------------------------------------------------------
def collect_params(model):
    """The unified block's attention q, k, v projections (one fused Linear): (params, names)."""
    qkv = model.blocks_u[0].attn.qkv
    return [qkv.weight, qkv.bias], ["blocks_u.0.attn.qkv.weight", "blocks_u.0.attn.qkv.bias"]


def configure_model(model):
    """Eval mode, everything frozen except collect_params(model) (LayerNorms included)."""
    model.eval()
    model.requires_grad_(False)
    params, _ = collect_params(model)
    for p in params:
        p.requires_grad_(True)
    return model


class FeatureCache:
    """Public code only (`--use-cache`): FIFO of the frozen encoders' outputs of the last batches.

    Holds whole batches, at most `size` samples, always at least the newest batch.
    """

    def __init__(self, size):
        self.size, self.items = size, []

    def push(self, z_a, z_v):
        """Add one batch (B, N_a, D), (B, N_v, D); return the cache (B_c, N_a, D), (B_c, N_v, D)."""
        # DEVIATION: the public code counts the cache in batches (cache_size // batch_size); we
        # count samples, which is the same for the released settings and never empty.
        self.items.append((z_a.detach(), z_v.detach()))
        while len(self.items) > 1 and sum(a.shape[0] for a, _ in self.items) > self.size:
            self.items.pop(0)
        return torch.cat([a for a, _ in self.items]), torch.cat([v for _, v in self.items])

    def clear(self):
        self.items = []


# ----------------------------------------------------------------------------------------------
# One step
# ----------------------------------------------------------------------------------------------
def forward_and_adapt(model, optimizer, z_a, z_v, k, w_ent=W_ENT, w_bal=W_BAL, w_attn=1.0):
    """One ABPEM update from the frozen encoders' outputs z_a (B, N_a, D), z_v (B, N_v, D).

    Returns the logits of this (pre-update) forward (B, K) and the separate loss terms.
    """
    feat, attn_logits = model.fuse(z_a, z_v, return_logits=True)  # (B, D), (B, H, N, N)
    scores = head_mean(attn_logits)  # (B, N, N)
    logits = model.classify(feat)  # (B, K)
    l_pem = principal_entropy(logits, k)
    h_bal = balance_entropy(logits)
    l_ab = attention_bootstrap_loss(scores, z_a.shape[1])
    loss = total_loss(l_pem, h_bal, l_ab, w_ent, w_bal, w_attn)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return logits.detach(), {"pem": l_pem.item(), "bal": h_bal.item(), "ab": l_ab.item(), "loss": loss.item()}


# ----------------------------------------------------------------------------------------------
# The adapter (tent style) and the runner's entry point
# ----------------------------------------------------------------------------------------------
class ABPEM:
    """Model + Adam on the unified block's qkv; `adapter(batch)` adapts and returns the prediction
    of a second forward after the update; `reset()` restores model, optimiser and cache exactly."""

    def __init__(self, model, k, w_attn, w_ent=W_ENT, w_bal=W_BAL, lr=LR, use_cache=USE_CACHE, cache_size=32):
        self.model = configure_model(model)
        self.k, self.w_attn, self.w_ent, self.w_bal = k, w_attn, w_ent, w_bal
        params, self.param_names = collect_params(model)
        self.optimizer = torch.optim.Adam(params, lr=lr, betas=BETAS, weight_decay=WEIGHT_DECAY)
        self.model_state = copy.deepcopy(model.state_dict())
        self.optimizer_state = copy.deepcopy(self.optimizer.state_dict())
        # DEVIATION: the feature cache is public code only (not in the paper); on by default, as released.
        self.cache = FeatureCache(cache_size) if use_cache else None
        self.losses = {}

    def forward(self, batch):
        """batch: dict with audio (B, T, F), video (B, 3, H, W) -> logits (B, K) after the update."""
        with torch.no_grad():  # the encoders are frozen: run them once, reuse for both passes
            z_a, z_v = self.model.encode(batch["audio"], batch["video"])  # (B, N_a, D), (B, N_v, D)
        z_a_fit, z_v_fit = self.cache.push(z_a, z_v) if self.cache is not None else (z_a, z_v)
        _, self.losses = forward_and_adapt(self.model, self.optimizer, z_a_fit, z_v_fit, self.k,
                                           self.w_ent, self.w_bal, self.w_attn)
        with torch.no_grad():  # the reported prediction: a second forward after the update (public code)
            return self.model.classify(self.model.fuse(z_a, z_v))  # (B, K)

    __call__ = forward

    def reset(self):
        self.model.load_state_dict(self.model_state, strict=True)
        self.optimizer.load_state_dict(copy.deepcopy(self.optimizer_state))
        if self.cache is not None:
            self.cache.clear()


def setup(model, ctx, use_cache=None):
    """adapt.py's entry point: the per-dataset settings from ctx.dataset / ctx.modality.

    use_cache: the public code's feature cache (None -> ctx.use_cache, which adapt.py sets to `not --no-cache`;
    without it in ctx USE_CACHE, on, as the released scripts run).
    """
    if use_cache is None:
        use_cache = getattr(ctx, "use_cache", USE_CACHE)
    s = settings(getattr(ctx, "dataset", "embedded"), getattr(ctx, "modality", "video"),
                 getattr(ctx, "num_classes", None))
    return ABPEM(model, k=s["k"], w_attn=s["w_attn"], use_cache=use_cache,
                 cache_size=s["cache_size"])
