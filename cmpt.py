"""CMPT: Robust Multimodal Learning via Cross-Modal Proxy Tokens.

Reza, Patil, Solh, Asif. TMLR (OpenReview Wtc6wvcYJ0), arXiv 2501.17823. Code announced at
github.com/CSIPLab/Cross-Modal-Proxy-Tokens (not readable here: the paper text is the authority).

Idea. Each modality's frozen encoder gets a cross-modal proxy token (CMPT) next to its class token
(CLS). Both attend only to their own modality, but the proxy is trained to approximate the OTHER
modality's class token; when a modality is missing, the available one's proxy stands in for it.
Rank-1 LoRA, the tokens and a linear head train. One model class serves both of the paper's
settings through common.py's backbone interface: m1, m2 = audio, video of CAV-MAE (its two
modality-specific towers) or image, text of CLIP (its two towers, read in the joint space).

    Eq. 1  T_m = Embed_m(x_m)                              frozen, (B, N_m, D)
    Eq. 2  T~_m = [t_CMPT,m ; t_CLS,m ; T_m]                (B, N_m + 2, D)
    Eq. 3  T^_m = f_m(T~_m; Theta_m frozen, Delta_m LoRA),  LoRA: W x + (alpha / r) B A dropout(x)
    Eq. 4  L_align = mean_{D_c} [MSE(CMPT^_1, CLS^_2) + MSE(CMPT^_2, CLS^_1)] / MSE(CMPT^_1, CLS^_1)
           (D_c: samples with both modalities; the denominator as printed: m1's pair only)
    Eq. 5  T = CLS^_1 + CLS^_2 (both) | CLS^_2 + CMPT^_2 (m1 missing) | CLS^_1 + CMPT^_1 (m2 missing)
    Eq. 6  y_hat = h(T) = W_h T + b_h
    Eq. 7  L_total = L_task + lambda L_align,  lambda = 0.2

Deviations (each a `# DEVIATION:` line below):
  1. CAV-MAE's towers have no class token: a learnable CLS per modality is added.
  2. CAV-MAE's tokens are read through a LayerNorm without parameters shared by both modalities.
  3. Eq. 4: the denominator is floored at 1e-6; a batch without complete samples gives L_align = 0.
  4. Fused q, k, v projections get three rank-1 updates (one per q, k, v) sharing one dropout mask.
  5. Modality dropout: keep both 0.5, drop m1 0.25, drop m2 0.25, on the complete samples of any set.
  6. Variants without proxies add the placeholder's CLS (no gating); a sample missing both gives T = 0.
  7. No stop-gradient in Eq. 4: the class tokens move too.
  8. A modality missing from the whole batch is not encoded (its LoRA and tokens get no update).
  9. CAV-MAE: its unified block and mlp_head are not used; a new linear head classifies T.
 10. Image-text: CLIP's text tower stands in for the paper's BERT-base.
 11. Image-text: the text proxy sees its whole text, the causal text tokens do not see it.
 12. Image-text: CLS and CMPT are read after each tower's final LayerNorm and projection (joint space).
 13. Image-text: MM-IMDb plots are cut at CLIP's 77 tokens (the paper's BERT reads 256).
 14. The head keeps PyTorch's default Linear initialisation (the paper does not give one).
 15. `head_only`, the image-text table's frozen-backbone column, is not in the paper.
 16. RECIPES["embedded"] / ["audio-video"]: short CPU budgets instead of Table 6's schedule.

Dimension key: B batch, N_m tokens of modality m, D token width, E pooled width (CLIP's joint space,
CAV-MAE's D), K classes, r LoRA rank.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import common

LAMBDA = 0.2  # lambda of Eq. 7; Sec. 4.2 and Table 5 (ablation 0.0 .. 0.5)
LORA_RANK = 1  # LoRA rank r; Sec. 4.2, Table 7
LORA_ALPHA = 1.0  # LoRA scaling alpha (update scaled by alpha / r); Sec. 4.2
LORA_DROPOUT = 0.1  # dropout on the LoRA branch input; Sec. 4.2
P_DROP_1 = 0.25  # per-iteration probability of dropping m1 (audio, image); paper silent (Sec. 3.5)
P_DROP_2 = 0.25  # per-iteration probability of dropping m2 (video, text); paper silent (Sec. 3.5)
ALIGN_EPS = 1e-6  # floor of Eq. 4's per-sample denominator; paper silent
TOKEN_INIT_STD = 0.02  # truncated-normal std of the new tokens; ViT / CAV-MAE convention, paper silent
# DEVIATION: CLIP's text tower stands in for the paper's BERT-base; MM-IMDb's plots are cut at its 77
# tokens (data.py; BERT reads 256).
IMAGE_PLACEHOLDER = "zeros"  # missing image: zeros, missing text: the empty string (Sec. 3.5, Lee et al.)

VARIANTS = {
    "cmpt": {},  # proxy tokens, lambda = 0.2, modality dropout, LoRA
    "lambda0": {"lam": 0.0},  # Table 5's lambda = 0: proxies trained by the task loss only
    "dropout": {"proxy": False, "modality_dropout": True},  # Fig. 3/7: modality dropout, no CMPT
    "baseline": {"proxy": False, "modality_dropout": False},  # Fig. 3/7: no CMPT, no dropout
    # DEVIATION: not in the paper: the frozen-backbone column of the image-text table
    "head_only": {"proxy": False, "modality_dropout": False, "lora": False},
}
DEFAULT_VARIANTS = {"audio-video": ("cmpt", "lambda0", "dropout", "baseline"),
                    "image-text": ("head_only", "cmpt", "lambda0", "dropout")}
PROTOCOLS = ("inference", "map")  # Sec. 4: missing at inference only; missing in training and test

# Recipes (contracts: train.py implements the schedules). "paper" is Table 6 (image-text): 5 of 10
# epochs of warm-up at 0.1 x lr, then polynomial decay; the model of the best validation epoch.
# DEVIATION: the paper's 10 epochs of batch 8 are ~76,000 steps on Food-101; the embedded image-text table
# runs 2 epochs of batch 32 (126 steps) at 10x the lr, and the audio-video one 4 epochs of batch 64 with
# torch's OneCycleLR (10% warm-up from lr / 25, cosine), chosen on the embedded validation split.
RECIPES = {
    "paper": dict(epochs=10, batch_size=8, lr=1e-3, weight_decay=0.02, eps=1e-8, betas=(0.9, 0.999),
                  schedule="poly", warmup=0.5, warmup_factor=0.1, power=0.9, grad_clip=None,
                  select="best_val"),
    "embedded": dict(epochs=2, batch_size=32, lr=1e-2, weight_decay=0.02, eps=1e-8, betas=(0.9, 0.999),
                     schedule="poly", warmup=0.1, warmup_factor=0.1, power=0.9, grad_clip=None,
                     select="last"),
    "audio-video": dict(epochs=4, batch_size=64, lr=1e-2, weight_decay=0.02, eps=1e-8, betas=(0.9, 0.999),
                        schedule="onecycle", warmup=0.1, warmup_factor=1 / 25, power=None, grad_clip=None,
                        select="last"),
}


# ----------------------------------------------------------------------------------------------
# Losses and small operations (pure functions)
# ----------------------------------------------------------------------------------------------
def alignment_loss(cmpt_1, cls_2, cmpt_2, cls_1, complete=None, eps=ALIGN_EPS):
    """L_align of Eq. 4 over the complete samples (complete (B,) bool, None: all). (B, D) each -> scalar."""
    if complete is not None:
        cmpt_1, cls_2, cmpt_2, cls_1 = cmpt_1[complete], cls_2[complete], cmpt_2[complete], cls_1[complete]
    if cmpt_1.shape[0] == 0:
        # DEVIATION: paper silent on a batch without complete samples; the term is 0 there.
        return cmpt_1.sum() * 0.0
    # DEVIATION: paper silent on a stop-gradient; none is used, the class tokens get gradient too.
    num = (cmpt_1 - cls_2).pow(2).mean(-1) + (cmpt_2 - cls_1).pow(2).mean(-1)  # (B_c,)
    # DEVIATION: paper silent on a zero denominator; it is floored at eps (exact value otherwise).
    den = (cmpt_1 - cls_1).pow(2).mean(-1).clamp_min(eps)  # (B_c,)
    # Eq. (4) L_align = mean_{D_c} [MSE(cmpt_1, cls_2) + MSE(cmpt_2, cls_1)] / MSE(cmpt_1, cls_1)
    return (num / den).mean()


def fuse(cls_1, cls_2, cmpt_1, cmpt_2, has_1, has_2):
    """Gated additive fusion of Eq. 5 per sample. Tokens (B, D), has_1 / has_2 (B,) bool -> T (B, D)."""
    h1, h2 = has_1[:, None], has_2[:, None]  # (B, 1)
    # DEVIATION: the paper never has a sample without both modalities; it gets T = 0.
    zero = torch.zeros_like(cls_1)
    # Eq. (5) T = CLS_1 + CLS_2 | CLS_2 + CMPT_2 (m1 missing) | CLS_1 + CMPT_1 (m2 missing)
    return torch.where(h1 & h2, cls_1 + cls_2,
                       torch.where(h2, cls_2 + cmpt_2, torch.where(h1, cls_1 + cmpt_1, zero)))


def task_loss(logits, label):
    """L_task of Eq. 7 (the paper names no more): cross-entropy for class indices (B,), binary
    cross-entropy per label for multi-label targets (B, K) in {0, 1} (MM-IMDb, as MAP's code)."""
    if label.is_floating_point():
        return F.binary_cross_entropy_with_logits(logits, label)
    return F.cross_entropy(logits, label)


def total_loss(task, align, lam):
    """Eq. 7 from the two scalar terms."""
    if lam == 0:  # keeps an inf/nan L_align out of the gradient when it is only logged
        return task
    # Eq. (7) L_total = L_task + lambda * L_align
    return task + lam * align


def drop_modality(x_1, x_2, has_1, has_2, p_drop_1=P_DROP_1, p_drop_2=P_DROP_2, u=None, blank_1=None,
                  blank_2=None):
    """Random modality dropout for one iteration (Sec. 3.5): inputs (B, ...) and has (B,) bool -> the
    same four, one modality removed from every complete sample (its rows hold blank_m, default zeros), or
    unchanged. u: the iteration's uniform draw (default torch.rand, the global generator)."""
    u = torch.rand(()).item() if u is None else u
    # DEVIATION: applied to the complete samples of any training set (the MAP protocol's too)
    complete = has_1 & has_2  # (B,)
    # DEVIATION: paper gives no probabilities; drop m1 with p_drop_1, m2 with p_drop_2, else keep both.
    if u < p_drop_1:
        has_1 = has_1 & ~complete
    elif u < p_drop_1 + p_drop_2:
        has_2 = has_2 & ~complete
    else:
        return x_1, x_2, has_1, has_2

    def place(x, has, blank):
        blank = torch.zeros_like(x) if blank is None else blank.to(x)
        return torch.where(has.view(-1, *[1] * (x.dim() - 1)), x, blank)

    return place(x_1, has_1, blank_1), place(x_2, has_2, blank_2), has_1, has_2


def blank(backbone, m, x):
    """The placeholder of a dropped modality (Sec. 3.5): None (zeros) for image, audio and video; for
    text the empty string, [start, end] then padding (CLIP's ids: end = the largest id, start = end - 1)."""
    if m != "text":
        return None
    empty = torch.zeros(x.shape[1], dtype=x.dtype, device=x.device)  # (C,)
    empty[0], empty[1] = backbone.vocab_size - 2, backbone.vocab_size - 1
    return empty


def proxy_text_mask(eot, n, dtype=torch.float32):
    """Mask of a causal text tower with the proxy in front, [CMPT, t_0 .. t_{n-1}]: the proxy sees itself
    and t_0 .. t_eot; text token i sees t_0 .. t_i (CLIP's causal mask), not the proxy. eot (B,) ->
    additive mask (B, 1, 1 + n, 1 + n): 0 attended, -inf not."""
    j = torch.arange(1 + n, device=eot.device)  # (1 + n,)
    sees = (j[None, :] <= j[:, None]).repeat(len(eot), 1, 1)  # (B, 1 + n, 1 + n) causal: row i sees j <= i
    sees[:, 1:, 0] = False  # the text tokens do not see the proxy
    sees[:, 0] = j[None, :] <= eot[:, None] + 1  # the proxy sees itself and t_0 .. t_eot
    mask = torch.zeros(sees.shape, device=eot.device, dtype=dtype).masked_fill(~sees, float("-inf"))
    return mask[:, None]  # broadcast over the heads


# ----------------------------------------------------------------------------------------------
# Model surgery: LoRA, tokens, head
# ----------------------------------------------------------------------------------------------
class LoRA(nn.Module):
    """`splits` rank-r updates, one per equal part of the output, without the frozen weight:
    x -> (alpha / r) concat_s(B_s A_s dropout(x)); A Kaiming-uniform, B zero, so the update starts at 0."""

    def __init__(self, d_in, d_out, rank=LORA_RANK, alpha=LORA_ALPHA, dropout=LORA_DROPOUT, splits=1,
                 device=None, dtype=None):
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        self.splits, self.scaling = splits, alpha / rank
        self.lora_A = nn.Parameter(torch.empty(splits, rank, d_in, **kw))  # (S, r, D_in)
        self.lora_B = nn.Parameter(torch.zeros(splits, d_out // splits, rank, **kw))  # (S, D_out/S, r)
        for s in range(splits):
            nn.init.kaiming_uniform_(self.lora_A[s], a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout)

    def delta(self, x):
        """x (..., D_in) -> the update (..., D_out)."""
        h = torch.einsum("...i,sri->...sr", self.dropout(x), self.lora_A)  # (..., S, r)
        return self.scaling * torch.einsum("...sr,sor->...so", h, self.lora_B).flatten(-2)  # (..., D_out)

    def forward(self, x):
        return self.delta(x)


class LoRALinear(LoRA):
    """A frozen nn.Linear plus its LoRA update: y = W x + b + (alpha / r) concat_s(B_s A_s dropout(x))."""

    def __init__(self, base, rank=LORA_RANK, alpha=LORA_ALPHA, dropout=LORA_DROPOUT, splits=1):
        d_out, d_in = base.weight.shape
        w = base.weight
        super().__init__(d_in, d_out, rank, alpha, dropout, splits, device=w.device, dtype=w.dtype)
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)

    def forward(self, x):
        # Eq. (3) W x + b + (alpha / r) B A dropout(x)
        return self.base(x) + self.delta(x)


def add_lora(blocks, rank=LORA_RANK, alpha=LORA_ALPHA, dropout=LORA_DROPOUT):
    """LoRA on q, k, v and the output projection of every block (Sec. 4.2), in place: CAV-MAE's blocks
    (`attn.qkv`, `attn.proj`) or CLIP's (`attn.in_proj_weight` fused, `attn.out_proj`)."""
    for blk in blocks:
        # DEVIATION: q, k, v are fused in one projection: three rank-r updates, one per q, k, v block of
        # its output (separate LoRA on q, k and v), share one LoRA-dropout mask on their common input.
        if isinstance(blk.attn, common.FusedQKVAttention):
            D, w = blk.attn.out_proj.in_features, blk.attn.in_proj_weight
            blk.attn.qkv_adapter = LoRA(D, 3 * D, rank, alpha, dropout, 3, device=w.device, dtype=w.dtype)
            blk.attn.out_proj = LoRALinear(blk.attn.out_proj, rank, alpha, dropout, splits=1)
        else:
            blk.attn.qkv = LoRALinear(blk.attn.qkv, rank, alpha, dropout, splits=3)
            blk.attn.proj = LoRALinear(blk.attn.proj, rank, alpha, dropout, splits=1)


class CMPTModel(nn.Module):
    """A frozen backbone (common.CAVMAE or common.CLIP) + CLS / CMPT tokens + LoRA + a linear head.
    model(batch) -> logits (B, K); batch: the two modalities' inputs, optional has_<modality> (B,) bool.

    proxy: CMPT tokens and Eq. 5's gating (False: CLS tokens only, plain addition). lam: lambda of Eq. 7.
    modality_dropout: random modality dropout in train_step. lora: LoRA on the attention projections.
    """

    def __init__(self, backbone, num_classes, proxy=True, lam=LAMBDA, modality_dropout=True, lora=True):
        super().__init__()
        for p in backbone.parameters():  # Eq. 1 and Theta_m of Eq. 3: frozen
            p.requires_grad_(False)
        self.backbone, self.modalities = backbone, backbone.modalities
        self.proxy, self.lam, self.modality_dropout = proxy, lam, modality_dropout
        w = next(backbone.parameters())
        kw = dict(device=w.device, dtype=w.dtype)

        def token(m):
            return nn.Parameter(torch.zeros(1, 1, backbone.width(m), **kw))
        # DEVIATION: CAV-MAE's towers have no class token (CAV-MAE mean-pools); a learnable one per modality.
        self.cls = nn.ParameterDict({m: token(m) for m in self.modalities if not backbone.has_class_token})
        # t_CMPT,m: m's proxy of the other modality's class token
        self.cmpt = nn.ParameterDict({m: token(m) for m in self.modalities if proxy})
        for t in [*self.cls.values(), *self.cmpt.values()]:
            nn.init.trunc_normal_(t, std=TOKEN_INIT_STD)
        if lora:
            for m in self.modalities:
                add_lora(backbone.tower(m))  # Delta_m of Eq. 3
        # DEVIATION: PyTorch's default Linear init (paper silent); on CAV-MAE a new head, not its mlp_head.
        self.head = nn.Linear(backbone.embed_dim, num_classes, **kw)  # h of Eq. 6

    def encode(self, m, x):
        """One modality: input x (B, ...) -> CLS^_m, CMPT^_m (or None), (B, E) each."""
        bb, B = self.backbone, len(x)
        prefix = [self.cmpt[m].expand(B, -1, -1)] if self.proxy else []
        prefix += [self.cls[m].expand(B, -1, -1)] if m in self.cls else []
        n = len(prefix)
        # Eq. (1) T_m = Embed_m(x_m) and Eq. (2) T~_m = Concat(T_CMPT,m, T_CLS,m, T_m), (B, n + N_m, D)
        t = bb.embed(m, x, prefix=torch.cat(prefix, dim=1) if prefix else None)
        mask = None
        if self.proxy and m in bb.causal:
            # DEVIATION: CMPT's BERT is bidirectional, CLIP's text tower causal: the proxy sees its whole text
            # and the text tokens do not see it (at LoRA = 0 their outputs are CLIP's).
            mask = proxy_text_mask(bb.cls_index(m, x), t.shape[1] - 1, t.dtype)
        # Eq. (3) T^_m = f_m(T~_m; Theta_m, Delta_m)
        t = bb.run(m, t, mask)  # (B, n + N_m, D)
        if m in self.cls:
            cls = t[:, n - 1]  # (B, D), our class token
        else:
            cls = t[torch.arange(B, device=t.device), n + bb.cls_index(m, x)]  # (B, D), the tower's own
        # DEVIATION: CLIP's tokens are read after the tower's final LayerNorm and projection (joint space: the
        # towers' widths differ); CAV-MAE's through one LayerNorm without parameters for both modalities.
        return bb.pool(m, cls), (bb.pool(m, t[:, 0]) if self.proxy else None)

    def tokens(self, x, has):
        """x, has: {m: input, (B,) bool} -> {m: (CLS^_m, CMPT^_m or None)}, (B, E) each."""
        out = {}
        for m in self.modalities:
            if self.proxy and not bool(has[m].any()):
                # DEVIATION: paper silent; m is missing from the whole batch: no encoder pass (Eq. 5 never
                # reads its tokens), so its LoRA factors and tokens get no gradient and no update.
                zero = self.head.weight.new_zeros(len(x[m]), self.backbone.embed_dim)  # (B, E)
                out[m] = (zero, zero)
                continue
            out[m] = self.encode(m, x[m])
        return out

    def fused(self, tok, has):
        """The head's input T (B, E): Eq. 5 with proxies, else CLS^_1 + CLS^_2 of whatever came in."""
        m1, m2 = self.modalities
        if self.proxy:
            return fuse(tok[m1][0], tok[m2][0], tok[m1][1], tok[m2][1], has[m1], has[m2])
        # DEVIATION: without proxy tokens there is no gating: the placeholder's class token is added.
        return tok[m1][0] + tok[m2][0]

    def inputs(self, batch):
        """-> ({m: input (B, ...)}, {m: has (B,) bool}); a batch without has_<m> is complete."""
        x = {m: batch[m] for m in self.modalities}
        ones = torch.ones(len(x[self.modalities[0]]), dtype=torch.bool, device=x[self.modalities[0]].device)
        return x, {m: batch.get(f"has_{m}", ones) for m in self.modalities}

    def forward(self, batch):
        x, has = self.inputs(batch)
        # Eq. (6) y_hat = h(T)
        return self.head(self.fused(self.tokens(x, has), has))  # (B, K)


def build(backbone, num_classes=None, proxy=True, lam=LAMBDA, modality_dropout=True, lora=True):
    """CMPT (or an ablation) around a frozen CAVMAE or CLIP, changed in place; num_classes: the head's
    outputs (default: CAV-MAE's own class count)."""
    num_classes = num_classes or getattr(backbone, "num_classes", None)
    common.need(num_classes, "cmpt.build needs num_classes (the task's classes) for a CLIP backbone.")
    return CMPTModel(backbone, num_classes, proxy=proxy, lam=lam, modality_dropout=modality_dropout,
                     lora=lora)


def collect_params(model):
    """What trains (Sec. 3.5): LoRA factors, CLS / CMPT tokens, head. -> (params, names)."""
    params, names = [], []
    for name, p in model.named_parameters():
        train = "lora_" in name or name.startswith(("cls.", "cmpt.", "head."))
        p.requires_grad_(train)
        if train:
            params.append(p)
            names.append(name)
    return params, names


# ----------------------------------------------------------------------------------------------
# One training step
# ----------------------------------------------------------------------------------------------
def train_step(model, batch, optimizer):
    """Modality dropout, forward, Eqs. 4-7, zero_grad / backward / step. -> (logits, loss floats)."""
    model.train()
    x, has = model.inputs(batch)
    m1, m2 = model.modalities
    if model.modality_dropout:
        bb = model.backbone
        blank_1, blank_2 = blank(bb, m1, x[m1]), blank(bb, m2, x[m2])
        x[m1], x[m2], has[m1], has[m2] = drop_modality(x[m1], x[m2], has[m1], has[m2], blank_1=blank_1,
                                                       blank_2=blank_2)
    tok = model.tokens(x, has)  # Eqs. 1-3: {m: (CLS^_m, CMPT^_m)}, (B, E) each
    T = model.fused(tok, has)  # Eq. 5, (B, E)
    # Eq. (6) y_hat = h(T)
    logits = model.head(T)  # (B, K)
    task = task_loss(logits, batch["label"])
    if model.proxy:
        complete = has[m1] & has[m2]
        align = alignment_loss(tok[m1][1], tok[m2][0], tok[m2][1], tok[m1][0], complete=complete)
    else:
        align = torch.zeros((), device=logits.device, dtype=logits.dtype)
    total = total_loss(task, align, model.lam)
    optimizer.zero_grad(set_to_none=True)
    total.backward()
    optimizer.step()
    return logits.detach(), {"task": task.item(), "align": align.item(), "total": total.item()}
