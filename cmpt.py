"""CMPT: Robust Multimodal Learning via Cross-Modal Proxy Tokens.

Reza, Patil, Solh, Asif. Transactions on Machine Learning Research (TMLR), OpenReview Wtc6wvcYJ0.
arXiv: https://arxiv.org/abs/2501.17823
Code:  https://github.com/CSIPLab/Cross-Modal-Proxy-Tokens (announced; not read here, the paper
       text is the authority).

Idea. Each modality's encoder gets two learnable tokens in front of its patch tokens: a class
token (CLS) and a cross-modal proxy token (CMPT). Both attend only to the tokens of their own
modality, but the CMPT is trained to approximate the class token of the OTHER modality. With both
modalities present the two class tokens are added and classified; when one modality is missing,
the available modality's CMPT stands in for the missing class token, so the classifier still sees
a sum of "its own" and "the other" class token. The pretrained encoders stay frozen; rank-1 LoRA on
the attention projections, the tokens and a linear head are all that train (a few thousand
parameters on the tiny backbone; on CAV-MAE base with 50 classes 0.18 M, the paper reports
0.17 M for its audio-video encoders).

Two backbones, one method (the same equations, `train_step` and LoRA serve both):
  - audio-video (CMPTModel): m1 = audio, m2 = video of a CAV-MAE model; each encoder is CAV-MAE's
    modality-specific stack (`blocks_a` / `blocks_v`); its unified block is not used, because CMPT fuses
    by addition (Eq. 5).
  - image-text (CMPTCLIP, the paper's Tables 1-3): m1 = image, m2 = text of a CLIP dual encoder
    (common.CLIP: OpenAI's ViT-B/16 or the tiny one pre-trained on the embedded pairs). CLS_1 is the image
    tower's class token, CLS_2 the text tower's end-of-text token (CLIP's own pooled tokens); each token is
    read after its tower's final LayerNorm and projection, in CLIP's joint space, where both have width E.

Equations (m1 = a, m2 = v; `^` marks an encoder output):
    Eq. 1  T_m  = Embed_m(x_m)                                                frozen, (B, N_m, D)
    Eq. 2  T~_m = [t_CMPT,m ; t_CLS,m ; T_m]                                  (B, N_m + 2, D)
    Eq. 3  T^_m = f_m(T~_m; Theta_m frozen, Delta_m LoRA),
           LoRA: W x + (alpha / r) B A dropout(x) on q, k, v and the output projection
    Eq. 4  L_align = 1/|D_c| sum_{x in D_c} [MSE(CMPT^_a, CLS^_v) + MSE(CMPT^_v, CLS^_a)]
                                               / MSE(CMPT^_a, CLS^_a)
           D_c = samples with both modalities; MSE = mean over the D features of one sample.
           As printed, the denominator holds only the FIRST modality's proxy against its own class
           token (proxy_1 vs CLS_1; there is no MSE(CMPT^_v, CLS^_v) term), so the equation is not
           symmetric in the two modalities: besides pulling each proxy to the other class token, it
           rewards pushing CMPT^_a away from CLS^_a (and CLS^_a away from CMPT^_a), with no such term
           for video. With no stop-gradient anywhere (Deviation 8), all four tokens move: the class
           tokens are pulled towards the other modality's proxy, not only the proxies towards them.
    Eq. 5  T = CLS^_a + CLS^_v     both present
               CLS^_v + CMPT^_v    audio missing
               CLS^_a + CMPT^_a    video missing
    Eq. 6  y_hat = h(T) = W_h T + b_h
    Eq. 7  L_total = L_CE(y_hat, y) + lambda L_align,  lambda = 0.2

Deviations (each marked `# DEVIATION:` in the code):
  1. CAV-MAE's encoders have no class token (CAV-MAE mean-pools its tokens): a learnable CLS
     token per modality is added next to the CMPT and trained like it.
  2. Encoder outputs are normalised by a LayerNorm without affine parameters, shared by both
     modalities, before Eqs. 4-6. The paper's AST / CLIP encoders end in their own final norm;
     CAV-MAE's modality-specific stacks end in none (`norm_a` / `norm_v` follow the unified block
     and differ per modality, so a proxy normalised by `norm_a` could not match a class token
     normalised by `norm_v`). It also bounds each MSE of Eq. 4 to [0, 4] (2 - 2 corr), so the
     denominator cannot be inflated without limit.
  3. Zero guard of Eq. 4: the per-sample denominator is clamped to at least ALIGN_EPS = 1e-6
     (paper silent). A batch without any complete sample gives L_align = 0 (paper silent).
  4. CAV-MAE fuses q, k, v in one Linear (`attn.qkv`): it gets three independent rank-1 LoRA
     updates, one per output third, which is separate LoRA on q, k and v (they share one
     LoRA-dropout mask on their common input; three separate Linears would draw three).
  5. Modality dropout probabilities (paper: "keep both or drop one at random", no numbers): per
     iteration keep both with 0.5, drop m1 (audio, image) with 0.25, drop m2 (video, text) with 0.25;
     only complete samples are affected (a sample already missing one modality keeps the other). The
     paper describes it for training on complete data; here it also runs in the MAP protocol's
     training (on its complete samples), for CMPT and the `dropout` ablation alike.
  6. Variants without proxy tokens (the baseline and "modality dropout" ablations) cannot gate
     (Eq. 5 needs a proxy): they fuse CLS^_a + CLS^_v of the zero placeholder, i.e. the model is
     not told what is missing. A sample missing both modalities (never in the protocols) gives
     T = 0 under Eq. 5.
  7. Optimisation for a 3,000-clip CPU benchmark: AdamW lr 1e-2, weight decay 0.02, batch 64,
     4 epochs, one-cycle schedule (set by train.py); paper (AV): lr 5e-5, batch 4, 100 epochs,
     poly decay 0.9 with 5 warm-up epochs. Those would take hours on a CPU.
  8. No stop-gradient in Eq. 4 (the paper prints none): the class tokens also move, CLS^_v and
     CLS^_a towards the other modality's proxy, and CLS^_a away from CMPT^_a through the
     denominator (which holds the first modality's pair only, as printed).
  9. CAV-MAE's unified block, its norms and its `mlp_head` are not used: CMPT's model is two
     encoders, additive fusion and a new linear head (Eq. 6, PyTorch's default Linear init).
 10. A modality missing from EVERY sample of a batch (modality dropout drops it for the whole
     batch) is not encoded at all (paper silent): with proxies, Eq. 5 never reads its tokens, so
     skipping its encoder changes no output and no gradient except that its LoRA factors and
     tokens get none (no compute, no update, their Adam(W) state untouched). The no-proxy
     ablations (Deviation 6) still encode the placeholder, because they add its class token.

 11. Image-text: CLIP's text tower stands in for the paper's BERT-base text encoder (one pre-trained
     dual encoder; the paper pairs CLIP's image tower with BERT).
 12. Image-text: CLIP's text tower is causal, so a proxy in front would see only itself; the text proxy
     sees every token of its text (up to the end-of-text token) and the text tokens keep CLIP's causal
     mask without seeing it (`proxy_text_mask`), so at LoRA = 0 CLS_2 is exactly CLIP's text embedding.
     (BERT is bidirectional: there the proxy and the tokens see each other.) The image proxy is a full
     participant, as in the paper's ViT; it goes through the image tower's ln_pre. Neither proxy has a
     position embedding.
 13. Image-text: CLIP fuses q, k, v in `in_proj_weight` (3 D, D): three rank-1 updates, one per row
     block (`LoRA(splits=3)` as `attn.qkv_adapter`), i.e. separate LoRA on q, k and v (sharing one
     LoRA-dropout mask on their common input, as in Deviation 4).
 14. Image-text: the tokens of Eqs. 4-6 are read after each tower's own final LayerNorm and projection
     (ln_post / proj, ln_final / text_projection, frozen): the towers' widths differ on ViT-B/16 (768 /
     512), their joint space does not; with BERT-base both are 768 wide. No shared LayerNorm here.
 15. Image-text budget: 2 epochs of batch 32 (126 steps on the 2,000 embedded training pairs) at lr 1e-2
     and a 10% warm-up at 0.1 x lr, then the paper's polynomial decay (power 0.9); the paper runs 10
     epochs of batch 8 (~76,000 steps on Food-101) at lr 1e-3 after 5 warm-up epochs (IMAGE_TEXT).
 16. `head_only` (image-text table's frozen-backbone baseline, not in the paper): CLIP frozen, no LoRA,
     no proxy, a linear head on CLS_1 + CLS_2 of whatever came in (the placeholder's tokens included).

Dimension key: B batch, N_a / N_v audio / video tokens, D width, E CLIP's joint width, K classes,
L layers per encoder, r LoRA rank.
"""
import copy
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import common

# ----------------------------------------------------------------------------------------------
# Hyper-parameters
# ----------------------------------------------------------------------------------------------
LAMBDA = 0.2  # weight of L_align in Eq. 7; Sec. 4.2 and Table 5 (ablation 0.0 .. 0.5)
LORA_RANK = 1  # LoRA rank r; Sec. 4.2, Table 7 (r = 1 as good as 2 or 4)
LORA_ALPHA = 1.0  # LoRA scaling alpha (update scaled by alpha / r); Sec. 4.2
LORA_DROPOUT = 0.1  # dropout on the LoRA branch input; Sec. 4.2
P_DROP_AUDIO = 0.25  # per-iteration probability of dropping audio; paper silent (Sec. 3.5), our choice
P_DROP_VIDEO = 0.25  # per-iteration probability of dropping video; paper silent (Sec. 3.5), our choice
ALIGN_EPS = 1e-6  # floor of Eq. 4's per-sample denominator; paper silent, our choice
TOKEN_INIT_STD = 0.02  # truncated-normal std of the new tokens; ViT/CAV-MAE convention, paper silent

# Training defaults for the embedded benchmark (train.py reads these).
# DEVIATION: paper (AV, Sec. 4.2) uses lr 5e-5, batch 4, 100 epochs, poly decay (power 0.9) with
# 5 warm-up epochs at 0.1 x lr; we use lr 1e-2, batch 64, 4 epochs and train.py's one-cycle
# schedule (10% warm-up, cosine decay), because one run must take seconds on a CPU (6,000
# sample passes, ~1 ms each) and only a few thousand LoRA / token / head parameters train.
# Chosen on the embedded VALIDATION split (lr 5e-3 / 1e-2, batch 32 / 64, 3 / 4 / 6 epochs gave
# the same accuracies within a point); the test split was not used to choose.
EPOCHS = 4
LR = 1e-2
WEIGHT_DECAY = 0.02  # AdamW weight decay; Sec. 4.2
BATCH_SIZE = 64

# The method and its ablations (first entry = the method). train.py: `--variants cmpt lambda0 ...`
VARIANTS = {
    "cmpt": {},  # proxy tokens, lambda = 0.2, modality dropout
    "lambda0": {"lam": 0.0},  # Table 5's lambda = 0: proxies trained by the task loss only
    "dropout": {"proxy": False, "modality_dropout": True},  # Fig. 3/7: modality dropout, no CMPT
    "baseline": {"proxy": False, "modality_dropout": False},  # Fig. 3/7: no CMPT, no dropout
}
PROTOCOLS = ("inference", "map")  # Sec. 4: missing at inference only; missing in training and test

# The CLIP path (image-text; train.py --method cmpt --data food | imdb | memes | mmimdb | food101 | hatememes).
# Paper, Table 6 (image-text): AdamW eps 1e-8, weight decay 0.02, lr 1e-3, 10 epochs, batch 8, polynomial
# decay (power 0.9) after 5 warm-up epochs at 0.1 x lr.
# DEVIATION: the paper's 10 epochs of batch 8 are ~76,000 steps on Food-101; a 3-task, 3-seed table must run in
# minutes on a CPU, so 2 epochs of batch 32 over the 2,000 embedded training pairs (126 steps), at lr 1e-2
# (10x the paper's: 600x fewer steps; the same lr as the audio-visual runs), warm-up 10% of the steps at 0.1 x lr.
IMAGE_TEXT = dict(epochs=2, batch_size=32, lr=1e-2, weight_decay=0.02, eps=1e-8, schedule="poly", warmup=0.1)
IMAGE_PLACEHOLDER = "zeros"  # a missing image is zeros (Sec. 3.5, after Lee et al.); a missing text the empty string
IMAGE_TEXT_VARIANTS = {
    "cmpt": {},  # proxy tokens, lambda = 0.2, modality dropout, LoRA
    "lambda0": {"lam": 0.0},  # Table 5's lambda = 0
    "dropout": {"proxy": False, "modality_dropout": True},  # modality dropout, no CMPT (LoRA kept)
    "baseline": {"proxy": False, "modality_dropout": False},  # no CMPT, no dropout (LoRA kept)
    # DEVIATION: not in the paper: the frozen-backbone baseline of the image-text table
    "head_only": {"proxy": False, "modality_dropout": False, "lora": False},  # frozen CLIP, a linear head on CLS_1 + CLS_2
}
IMAGE_TEXT_DEFAULT = ("head_only", "cmpt", "lambda0", "dropout")  # the table's columns (`baseline` on request)


# ----------------------------------------------------------------------------------------------
# Losses and small operations (pure functions)
# ----------------------------------------------------------------------------------------------
def normalize_tokens(t):
    """Parameter-free LayerNorm over the feature dimension: (..., D) -> (..., D)."""
    # DEVIATION: paper's encoders (AST, CLIP ViT) end in their own final norm; CAV-MAE's
    # modality-specific blocks end in none, so both modalities share one LayerNorm without affine
    # parameters (a proxy and the class token it stands in for live in the same space).
    return F.layer_norm(t, t.shape[-1:])


def alignment_loss(cmpt_1, cls_2, cmpt_2, cls_1, complete=None, eps=ALIGN_EPS):
    """L_align of Eq. 4 over the complete samples. cmpt_1, cls_2, cmpt_2, cls_1: (B, D) -> scalar.

    complete: (B,) bool, True where both modalities are present (D_c); None means all samples.
    Per-sample ratio, then the mean over D_c; 0 when D_c is empty.
    """
    if complete is not None:
        cmpt_1, cls_2, cmpt_2, cls_1 = cmpt_1[complete], cls_2[complete], cmpt_2[complete], cls_1[complete]
    if cmpt_1.shape[0] == 0:
        # DEVIATION: paper silent on a batch without complete samples; the term is 0 there.
        return cmpt_1.sum() * 0.0
    # DEVIATION: paper silent on a stop-gradient; none is used, the class tokens get gradient too
    # (towards the other modality's proxy in the numerator, cls_1 away from cmpt_1 in the denominator).
    num = (cmpt_1 - cls_2).pow(2).mean(-1) + (cmpt_2 - cls_1).pow(2).mean(-1)  # (B_c,)
    # DEVIATION: paper silent on a zero denominator; it is floored at eps (exact value otherwise).
    # As printed: only the FIRST modality's proxy vs its own class token (no cmpt_2 vs cls_2 term).
    den = (cmpt_1 - cls_1).pow(2).mean(-1).clamp_min(eps)  # (B_c,)
    # Eq. (4) L_align = mean_{D_c} [MSE(cmpt_1, cls_2) + MSE(cmpt_2, cls_1)] / MSE(cmpt_1, cls_1)
    return (num / den).mean()


def fuse(cls_1, cls_2, cmpt_1, cmpt_2, has_1, has_2):
    """Gated additive fusion of Eq. 5, per sample. Tokens (B, D), has_1 / has_2 (B,) bool -> T (B, D).

    Both present: cls_1 + cls_2; m1 missing: cls_2 + cmpt_2; m2 missing: cls_1 + cmpt_1;
    both missing (not in the paper): 0.
    """
    h1, h2 = has_1[:, None], has_2[:, None]  # (B, 1)
    # DEVIATION: paper never has a sample without both modalities; it gets T = 0.
    zero = torch.zeros_like(cls_1)
    # Eq. (5) T = CLS_1 + CLS_2 | CLS_2 + CMPT_2 (m1 missing) | CLS_1 + CMPT_1 (m2 missing)
    return torch.where(h1 & h2, cls_1 + cls_2,
                       torch.where(h2, cls_2 + cmpt_2, torch.where(h1, cls_1 + cmpt_1, zero)))


def task_loss(logits, label):
    """The task loss of the classifier h (Eq. 6 output), logits (B, K) -> scalar: cross-entropy for class
    indices (B,), binary cross-entropy per label for multi-label targets (B, K) in {0, 1} (MM-IMDb, Sec. 3.5)."""
    if label.is_floating_point():
        return F.binary_cross_entropy_with_logits(logits, label)
    return F.cross_entropy(logits, label)


def total_loss(task, align, lam):
    """Eq. 7 from the two scalar terms."""
    if lam == 0:  # keeps an inf/nan L_align out of the gradient when it is only logged
        return task
    # Eq. (7) L_total = L_task + lambda * L_align
    return task + lam * align


def drop_modality(x_1, x_2, has_1, has_2, p_drop_1=P_DROP_AUDIO, p_drop_2=P_DROP_VIDEO, u=None, blank_1=None, blank_2=None):
    """Random modality dropout for one iteration (Sec. 3.5).

    x_1, x_2: the two inputs, (B, ...) each (audio (B, T, F) and video (B, 3, H, W), or image and text
    ids); has_1 / has_2 (B,) bool -> the same four, with one modality removed from every complete sample
    (has_m False), or unchanged. Every row without modality m then holds its placeholder blank_m
    (broadcastable to x_m, default zeros), which the rows already missing it hold anyway.
    u: the iteration's uniform draw in [0, 1) (default: torch.rand, the global generator).
    """
    u = torch.rand(()).item() if u is None else u
    # DEVIATION: applied to the complete samples of any training set (the MAP protocol's too), not only to complete data
    complete = has_1 & has_2  # (B,)
    # DEVIATION: paper gives no probabilities; drop m1 with p_drop_1, m2 with p_drop_2, keep both
    # otherwise; only complete samples lose a modality.
    if u < p_drop_1:
        has_1 = has_1 & ~complete
    elif u < p_drop_1 + p_drop_2:
        has_2 = has_2 & ~complete
    else:
        return x_1, x_2, has_1, has_2

    def place(x, has, blank):
        # Missing input placeholder: zeros for image, audio and video; the empty string for text (Sec. 3.5)
        blank = torch.zeros_like(x) if blank is None else blank.to(x)
        return torch.where(has.view(-1, *[1] * (x.dim() - 1)), x, blank)

    return place(x_1, has_1, blank_1), place(x_2, has_2, blank_2), has_1, has_2


# ----------------------------------------------------------------------------------------------
# Model surgery: LoRA, tokens, head
# ----------------------------------------------------------------------------------------------
class LoRA(nn.Module):
    """`splits` independent rank-r updates, one per equal part of the output, without the frozen weight:
    x -> (alpha / r) concat_s(B_s A_s dropout(x)),  A_s (r, D_in), B_s (D_out / splits, r).
    A is Kaiming-uniform, B zero (the LoRA paper's init): the update starts at exactly 0."""

    def __init__(self, d_in, d_out, rank=LORA_RANK, alpha=LORA_ALPHA, dropout=LORA_DROPOUT, splits=1, device=None,
                 dtype=None):
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
        super().__init__(d_in, d_out, rank, alpha, dropout, splits, device=base.weight.device, dtype=base.weight.dtype)
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)

    def forward(self, x):
        """x (..., D_in) -> (..., D_out)."""
        # Eq. (3) W x + b + (alpha / r) B A dropout(x)
        return self.base(x) + self.delta(x)


def add_lora(blocks, rank=LORA_RANK, alpha=LORA_ALPHA, dropout=LORA_DROPOUT):
    """LoRA on q, k, v and the output projection of every block (Sec. 4.2), in place: CAV-MAE's blocks
    (`attn.qkv`, `attn.proj`) or CLIP's (`attn.in_proj_weight` fused, `attn.out_proj`)."""
    for blk in blocks:
        if isinstance(blk.attn, common.FusedQKVAttention):
            D = blk.attn.out_proj.in_features
            w = blk.attn.in_proj_weight
            # DEVIATION: CLIP fuses q, k, v in in_proj_weight (3 D, D); three rank-r updates, one per
            # row block (q, k, v), are added to its output: separate LoRA on q, k and v.
            blk.attn.qkv_adapter = LoRA(D, 3 * D, rank, alpha, dropout, splits=3, device=w.device, dtype=w.dtype)
            blk.attn.out_proj = LoRALinear(blk.attn.out_proj, rank, alpha, dropout, splits=1)
            continue
        # DEVIATION: CAV-MAE fuses q, k, v in one Linear; splits=3 gives q, k, v their own rank-r
        # LoRA, as on the paper's separate projections (one LoRA-dropout mask shared by the three).
        blk.attn.qkv = LoRALinear(blk.attn.qkv, rank, alpha, dropout, splits=3)
        blk.attn.proj = LoRALinear(blk.attn.proj, rank, alpha, dropout, splits=1)


class CMPTModel(nn.Module):
    """Frozen CAV-MAE encoders (m1 = audio, m2 = video) + CLS/CMPT tokens + LoRA + linear head.
    model(batch) -> logits (B, K).

    proxy: with CMPT tokens and the gating of Eq. 5 (False: CLS tokens only, plain addition).
    lam: lambda of Eq. 7. modality_dropout: random modality dropout in train_step. lora: LoRA on the
    attention projections (False: the encoders stay exactly the source model's).
    """

    def __init__(self, backbone, proxy=True, lam=LAMBDA, modality_dropout=True, lora=True):
        super().__init__()
        for p in backbone.parameters():  # Eq. 1 and Theta_m of Eq. 3: frozen
            p.requires_grad_(False)
        self.backbone = backbone
        self.proxy, self.lam, self.modality_dropout = proxy, lam, modality_dropout
        D, K = backbone.embed_dim, backbone.num_classes
        kw = dict(device=backbone.pos_embed_a.device, dtype=backbone.pos_embed_a.dtype)
        # DEVIATION: CAV-MAE's encoders have no class token; a learnable one per modality is added.
        self.cls_a = nn.Parameter(torch.zeros(1, 1, D, **kw))  # t_CLS,a
        self.cls_v = nn.Parameter(torch.zeros(1, 1, D, **kw))  # t_CLS,v
        tokens = [self.cls_a, self.cls_v]
        if proxy:
            self.cmpt_a = nn.Parameter(torch.zeros(1, 1, D, **kw))  # t_CMPT,a: audio's proxy of CLS_v
            self.cmpt_v = nn.Parameter(torch.zeros(1, 1, D, **kw))  # t_CMPT,v: video's proxy of CLS_a
            tokens += [self.cmpt_a, self.cmpt_v]
        for t in tokens:
            nn.init.trunc_normal_(t, std=TOKEN_INIT_STD)
        if lora:
            add_lora(backbone.blocks_a)  # Delta_a of Eq. 3
            add_lora(backbone.blocks_v)  # Delta_v of Eq. 3
        # DEVIATION: CAV-MAE's unified block and mlp_head are not used; CMPT classifies the fused
        # tokens with a new linear head.
        self.head = nn.Linear(D, K, **kw)  # h of Eq. 6

    def encode(self, T, blocks, cls, cmpt):
        """One modality: patch tokens T (B, N, D) -> (CLS^, CMPT^ or None), each (B, D)."""
        B = T.shape[0]
        extra = [cmpt.expand(B, -1, -1)] if cmpt is not None else []
        # Eq. (2) T~_m = Concat(T_CMPT,m, T_CLS,m, T_m)
        x = torch.cat(extra + [cls.expand(B, -1, -1), T], dim=1)  # (B, N + 2, D) with proxy, else (B, N + 1, D)
        # Eq. (3) T^_m = f_m(T~_m; Theta_m, Delta_m)
        x = self.backbone.run_blocks(blocks, x)  # (B, N + 2, D)
        x = normalize_tokens(x[:, : len(extra) + 1])  # (B, 2, D): the two new tokens only
        return (x[:, 1], x[:, 0]) if cmpt is not None else (x[:, 0], None)

    def tokens(self, audio, video, has_a=None, has_v=None):
        """audio (B, T, F), video (B, 3, H, W) -> dict of cls_a, cls_v, cmpt_a, cmpt_v (B, D).

        has_a / has_v (B,) bool: with proxies, a modality absent from every sample is not encoded;
        its tokens are zeros outside the graph (Eq. 5 never reads them).
        """
        bb = self.backbone
        out = {}
        for m, x, embed, blocks in (("a", audio, bb.embed_audio, bb.blocks_a), ("v", video, bb.embed_video, bb.blocks_v)):
            has = has_a if m == "a" else has_v
            if self.proxy and has is not None and not bool(has.any()):
                # DEVIATION: paper silent; the modality is missing for the whole batch: no encoder pass, so
                # its LoRA factors and tokens get no gradient and no optimiser update.
                zero = self.cls_a.new_zeros(x.shape[0], self.cls_a.shape[-1])  # (B, D)
                out[f"cls_{m}"], out[f"cmpt_{m}"] = zero, zero
                continue
            T = embed(x)  # Eq. 1, (B, N_m, D)
            out[f"cls_{m}"], out[f"cmpt_{m}"] = self.encode(T, blocks, getattr(self, f"cls_{m}"),
                                                            getattr(self, f"cmpt_{m}", None))  # (B, D) each
        return out

    # -- the interface train_step uses (the same for both backbones) ----------------------------
    def inputs(self, batch):
        """-> x_1 = audio (B, T, F), x_2 = video (B, 3, H, W), has_1, has_2 (B,) bool."""
        has_a, has_v = availability(batch)
        return batch["audio"], batch["video"], has_a, has_v

    def blanks(self, x_1, x_2):
        """The placeholders of a dropped modality: zeros for audio and video (None = zeros)."""
        return None, None

    def pair_tokens(self, x_1, x_2, has_1, has_2):
        """-> {cls_1, cls_2, cmpt_1, cmpt_2}: (B, D) each (m1 = audio, m2 = video)."""
        tok = self.tokens(x_1, x_2, has_1, has_2)
        return {"cls_1": tok["cls_a"], "cls_2": tok["cls_v"], "cmpt_1": tok.get("cmpt_a"), "cmpt_2": tok.get("cmpt_v")}

    def fused(self, tok, has_1, has_2):
        """The head's input T (B, D): Eq. 5 with proxies, else CLS^_1 + CLS^_2 of whatever came in."""
        if self.proxy:
            return fuse(tok["cls_1"], tok["cls_2"], tok["cmpt_1"], tok["cmpt_2"], has_1, has_2)
        # DEVIATION: without proxy tokens there is no gating: the placeholder's class token is added.
        return tok["cls_1"] + tok["cls_2"]

    def forward(self, batch):
        """batch dict (audio, video, optional has_audio / has_video) -> logits (B, K)."""
        x_1, x_2, has_1, has_2 = self.inputs(batch)
        # Eq. (6) y_hat = h(T)
        return self.head(self.fused(self.pair_tokens(x_1, x_2, has_1, has_2), has_1, has_2))  # (B, K)


def proxy_text_mask(eot, n, dtype=torch.float32):
    """Attention mask of the text tower with the proxy in front, [CMPT, t_0 .. t_{n-1}]: the proxy (row 0)
    sees itself and every text token up to its sample's end-of-text token; text token i sees text tokens
    0..i (CLIP's causal mask) and not the proxy. eot (B,) end-of-text positions among the n text tokens
    -> additive mask (B, 1, 1 + n, 1 + n): 0 attended, -inf not."""
    j = torch.arange(1 + n, device=eot.device)  # (1 + n,) positions in the sequence with the proxy
    sees = (j[None, :] <= j[:, None]).repeat(len(eot), 1, 1)  # (B, 1 + n, 1 + n) causal: row i sees j <= i
    sees[:, 1:, 0] = False  # the text tokens do not see the proxy
    sees[:, 0] = j[None, :] <= eot[:, None] + 1  # the proxy sees itself and t_0 .. t_eot
    mask = torch.zeros(sees.shape, device=eot.device, dtype=dtype).masked_fill(~sees, float("-inf"))
    return mask[:, None]  # (B, 1, 1 + n, 1 + n), broadcast over the heads


class CMPTCLIP(nn.Module):
    """Frozen CLIP towers (m1 = image, m2 = text) + CMPT tokens + LoRA + linear head. model(batch) -> logits (B, K).

    The image tower's class token and the text tower's end-of-text token are CLIP's own class tokens
    (CLS_1, CLS_2); both modalities are read after their tower's final LayerNorm and projection, in
    CLIP's joint space of width E (the widths of Eqs. 4-5 must agree: ViT-B/16 768, text 512, joint 512).
    Flags as in CMPTModel.
    """

    def __init__(self, backbone, num_classes, proxy=True, lam=LAMBDA, modality_dropout=True, lora=True):
        super().__init__()
        for p in backbone.parameters():  # Eq. 1 and Theta_m of Eq. 3: frozen
            p.requires_grad_(False)
        self.backbone = backbone
        self.proxy, self.lam, self.modality_dropout = proxy, lam, modality_dropout
        vis = backbone.visual
        D_v, D_t, E = vis.conv1.out_channels, backbone.token_embedding.embedding_dim, backbone.embed_dim
        kw = dict(device=vis.proj.device, dtype=vis.proj.dtype)
        if proxy:
            self.cmpt_1 = nn.Parameter(torch.zeros(1, 1, D_v, **kw))  # t_CMPT,image: the image's proxy of CLS_text
            self.cmpt_2 = nn.Parameter(torch.zeros(1, 1, D_t, **kw))  # t_CMPT,text: the text's proxy of CLS_image
            for t in (self.cmpt_1, self.cmpt_2):
                nn.init.trunc_normal_(t, std=TOKEN_INIT_STD)
        # DEVIATION: the paper's text encoder is BERT-base; CLIP's own text tower is used (one dual encoder).
        if lora:
            add_lora(vis.transformer.resblocks)  # Delta_image of Eq. 3
            add_lora(backbone.transformer.resblocks)  # Delta_text of Eq. 3
        self.head = nn.Linear(E, num_classes, **kw)  # h of Eq. 6

    def encode_image(self, image):
        """image (B, 3, S, S) -> CLS^_1, CMPT^_1 (or None): (B, E) each."""
        bb, n = self.backbone, int(self.proxy)
        prefix = self.cmpt_1.expand(len(image), -1, -1) if self.proxy else None
        # Eq. (1) T_image = Embed_image(x) (frozen patch embedding, class token, positions) and
        # Eq. (2) T~_image = Concat(T_CMPT, T_CLS, T_image)   (the proxy goes through ln_pre, without a position)
        x = bb.image_tokens(image, prefix=prefix)  # (B, n + 1 + N, D_v)
        # Eq. (3) T^_image = f_image(T~_image; Theta frozen, Delta LoRA)
        x = bb.run_blocks(bb.visual.transformer.resblocks, x)  # (B, n + 1 + N, D_v)
        # DEVIATION: read in CLIP's joint space (ln_post + proj, frozen): the towers' widths differ (768 / 512).
        cls = bb.pool_image(x[:, n:])  # (B, E): ln_post(class token) @ proj, as CLIP
        cmpt = bb.visual.ln_post(x[:, 0]) @ bb.visual.proj if self.proxy else None  # (B, E)
        return cls, cmpt

    def encode_text(self, text):
        """ids (B, C) -> CLS^_2 (the end-of-text token), CMPT^_2 (or None): (B, E) each."""
        bb, n = self.backbone, int(self.proxy)
        eot = text.argmax(dim=-1)  # (B,) CLIP: the end-of-text token has the largest id
        # Eq. (1) T_text = Embed_text(x) (frozen token and position embeddings)
        x = bb.text_tokens(text[:, : int(eot.max()) + 1])  # (B, C', D_t); the padding after it is never read
        if self.proxy:
            # DEVIATION: CMPT's text encoder is BERT (bidirectional); CLIP's text tower is causal, so a proxy in
            # front would see only itself. It sees every token of its text instead, and the text tokens keep
            # CLIP's causal mask and do not see it (their outputs are CLIP's at LoRA = 0).
            mask = proxy_text_mask(eot, x.shape[1], x.dtype)  # (B, 1, 1 + C', 1 + C')
            # Eq. (2) T~_text = Concat(T_CMPT, T_text)   (CLIP's class token is the end-of-text token)
            x = torch.cat([self.cmpt_2.expand(len(x), -1, -1), x], dim=1)  # (B, 1 + C', D_t)
        else:
            mask = bb.causal_mask(x.shape[1], x.device, x.dtype)  # (C', C')
        # Eq. (3) T^_text = f_text(T~_text; Theta frozen, Delta LoRA)
        x = bb.run_blocks(bb.transformer.resblocks, x, mask)
        cls = bb.pool_text(x[:, n:], eot)  # (B, E): ln_final(end-of-text token) @ text_projection
        cmpt = bb.ln_final(x[:, 0]) @ bb.text_projection if self.proxy else None  # (B, E)
        return cls, cmpt

    def inputs(self, batch):
        """-> x_1 = image (B, 3, S, S), x_2 = text ids (B, C), has_1, has_2 (B,) bool, from the batch's
        missing codes (0 complete, 1 text missing, 2 image missing; none: all complete)."""
        return (batch["image"], batch["text"], *common.image_text_presence(batch))

    def blanks(self, image, text):
        """Placeholders of a dropped modality: zeros for the image, the empty string for the text
        ([start, end] then padding; CLIP's ids: end = the largest id, start = end - 1)."""
        empty = torch.zeros(text.shape[1], dtype=text.dtype, device=text.device)  # (C,)
        empty[0], empty[1] = self.backbone.vocab_size - 2, self.backbone.vocab_size - 1
        return None, empty

    def pair_tokens(self, image, text, has_1, has_2):
        """-> {cls_1, cls_2, cmpt_1, cmpt_2}: (B, E) each; a modality absent from the whole batch is not encoded."""
        out = {}
        for m, x, has, encode in (("1", image, has_1, self.encode_image), ("2", text, has_2, self.encode_text)):
            if self.proxy and not bool(has.any()):
                # DEVIATION: paper silent; missing for the whole batch: no encoder pass (see CMPTModel.tokens).
                zero = self.head.weight.new_zeros(len(x), self.backbone.embed_dim)  # (B, E)
                out[f"cls_{m}"], out[f"cmpt_{m}"] = zero, zero
                continue
            out[f"cls_{m}"], out[f"cmpt_{m}"] = encode(x)
        return out

    fused = CMPTModel.fused
    forward = CMPTModel.forward


def availability(batch):
    """has_audio / has_video of a batch, all True when the batch has no such fields: (B,), (B,)."""
    B = batch["label"].shape[0] if "label" in batch else batch["audio"].shape[0]
    full = torch.ones(B, dtype=torch.bool, device=batch["audio"].device)
    return batch.get("has_audio", full), batch.get("has_video", full)


def build(backbone, num_classes=None, proxy=True, lam=LAMBDA, modality_dropout=True, lora=True):
    """A CMPT model (or one of its ablations) around a frozen CAV-MAE or CLIP; the backbone is changed in place.
    num_classes: the head's outputs for CLIP (CAV-MAE's own count otherwise)."""
    kw = dict(proxy=proxy, lam=lam, modality_dropout=modality_dropout, lora=lora)
    if isinstance(backbone, common.CLIP):
        if num_classes is None:
            raise ValueError("cmpt.build(CLIP) needs num_classes (the task's classes or labels)")
        return CMPTCLIP(backbone, num_classes, **kw)
    return CMPTModel(backbone, **kw)


def collect_params(model):
    """What trains (Sec. 3.5): LoRA factors, CLS/CMPT tokens, head. -> (params, names)."""
    params, names = [], []
    for name, p in model.named_parameters():
        if "lora_" in name or name.startswith(("cls_", "cmpt_", "head.")):
            p.requires_grad_(True)
            params.append(p)
            names.append(name)
        else:
            p.requires_grad_(False)
    return params, names


# ----------------------------------------------------------------------------------------------
# One training step
# ----------------------------------------------------------------------------------------------
def train_step(model, batch, optimizer):
    """Modality dropout, forward, Eq. 4-7, zero_grad / backward / step. -> (logits, loss floats)."""
    model.train()
    x_1, x_2, has_1, has_2 = model.inputs(batch)  # inputs, (B,), (B,)
    if model.modality_dropout:
        blank_1, blank_2 = model.blanks(x_1, x_2)
        x_1, x_2, has_1, has_2 = drop_modality(x_1, x_2, has_1, has_2, blank_1=blank_1, blank_2=blank_2)
    tok = model.pair_tokens(x_1, x_2, has_1, has_2)  # Eq. 1-3: cls_1, cls_2, cmpt_1, cmpt_2, each (B, D)
    T = model.fused(tok, has_1, has_2)  # Eq. 5, (B, D)
    # Eq. (6) y_hat = h(T)
    logits = model.head(T)  # (B, K)
    task = task_loss(logits, batch["label"])
    if model.proxy:
        align = alignment_loss(tok["cmpt_1"], tok["cls_2"], tok["cmpt_2"], tok["cls_1"], complete=has_1 & has_2)
    else:
        align = torch.zeros((), device=logits.device, dtype=logits.dtype)
    total = total_loss(task, align, model.lam)
    optimizer.zero_grad(set_to_none=True)
    total.backward()
    optimizer.step()
    return logits.detach(), {"task": task.item(), "align": align.item(), "total": total.item()}


class CMPT(nn.Module):
    """Model + optimiser (tent style). In train mode forward(batch) takes one training step and
    returns its logits; in eval mode it predicts. reset() restores the state at construction."""

    def __init__(self, model, optimizer):
        super().__init__()
        self.model, self.optimizer = model, optimizer
        self.model_state = copy.deepcopy(model.state_dict())
        self.optimizer_state = copy.deepcopy(optimizer.state_dict())

    def forward(self, batch):
        if self.training:
            logits, _ = train_step(self.model, batch, self.optimizer)
            return logits
        self.model.eval()
        return self.model(batch)

    def reset(self):
        self.model.load_state_dict(self.model_state, strict=True)
        self.optimizer.load_state_dict(self.optimizer_state)
