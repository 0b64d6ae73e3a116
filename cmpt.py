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

Here the two modalities are m1 = audio and m2 = video of a CAV-MAE model; each encoder is
CAV-MAE's modality-specific stack (`blocks_a` / `blocks_v`); its unified block is not used,
because CMPT fuses by addition (Eq. 5).

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
     iteration keep both with 0.5, drop audio with 0.25, drop video with 0.25; only complete
     samples are affected (a sample already missing one modality keeps the other).
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

Dimension key: B batch, N_a / N_v audio / video tokens, D width, K classes, L layers per
encoder, r LoRA rank.
"""
import copy
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

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
    """Cross-entropy of the classifier h (Eq. 6 output). logits (B, K), label (B,) -> scalar."""
    return F.cross_entropy(logits, label)


def total_loss(task, align, lam):
    """Eq. 7 from the two scalar terms."""
    if lam == 0:  # keeps an inf/nan L_align out of the gradient when it is only logged
        return task
    # Eq. (7) L_total = L_task + lambda * L_align
    return task + lam * align


def drop_modality(audio, video, has_a, has_v, p_drop_audio=P_DROP_AUDIO, p_drop_video=P_DROP_VIDEO, u=None):
    """Random modality dropout for one iteration (Sec. 3.5).

    audio (B, T, F), video (B, 3, H, W), has_a / has_v (B,) bool -> the same four, with one
    modality removed (placeholder zeros, has_* False) from every complete sample, or unchanged.
    u: the iteration's uniform draw in [0, 1) (default: torch.rand, the global generator).
    """
    u = torch.rand(()).item() if u is None else u
    complete = has_a & has_v  # (B,)
    # DEVIATION: paper gives no probabilities; drop audio with P_DROP_AUDIO, video with
    # P_DROP_VIDEO, keep both otherwise; only complete samples lose a modality.
    if u < p_drop_audio:
        has_a = has_a & ~complete
    elif u < p_drop_audio + p_drop_video:
        has_v = has_v & ~complete
    else:
        return audio, video, has_a, has_v
    # Missing input placeholder: zeros for audio and video (Sec. 3.5).
    audio = torch.where(has_a[:, None, None], audio, torch.zeros_like(audio))
    video = torch.where(has_v[:, None, None, None], video, torch.zeros_like(video))
    return audio, video, has_a, has_v


# ----------------------------------------------------------------------------------------------
# Model surgery: LoRA, tokens, head
# ----------------------------------------------------------------------------------------------
class LoRALinear(nn.Module):
    """A frozen nn.Linear plus `splits` independent rank-r updates, one per equal part of its output.

    y = W x + b + (alpha / r) concat_s(B_s A_s dropout(x)),  A_s (r, D_in), B_s (D_out / splits, r).
    A is Kaiming-uniform, B zero (the LoRA paper's init): at the start y = W x + b exactly.
    """

    def __init__(self, base, rank=LORA_RANK, alpha=LORA_ALPHA, dropout=LORA_DROPOUT, splits=1):
        super().__init__()
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        d_out, d_in = base.weight.shape
        kw = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.splits, self.scaling = splits, alpha / rank
        self.lora_A = nn.Parameter(torch.empty(splits, rank, d_in, **kw))  # (S, r, D_in)
        self.lora_B = nn.Parameter(torch.zeros(splits, d_out // splits, rank, **kw))  # (S, D_out/S, r)
        for s in range(splits):
            nn.init.kaiming_uniform_(self.lora_A[s], a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        """x (..., D_in) -> (..., D_out)."""
        h = torch.einsum("...i,sri->...sr", self.dropout(x), self.lora_A)  # (..., S, r)
        delta = torch.einsum("...sr,sor->...so", h, self.lora_B).flatten(-2)  # (..., D_out)
        # Eq. (3) W x + b + (alpha / r) B A dropout(x)
        return self.base(x) + self.scaling * delta


def add_lora(blocks, rank=LORA_RANK, alpha=LORA_ALPHA, dropout=LORA_DROPOUT):
    """LoRA on q, k, v and the output projection of every block (Sec. 4.2), in place."""
    for blk in blocks:
        # DEVIATION: CAV-MAE fuses q, k, v in one Linear; splits=3 gives q, k, v their own rank-r
        # LoRA, as on the paper's separate projections (one LoRA-dropout mask shared by the three).
        blk.attn.qkv = LoRALinear(blk.attn.qkv, rank, alpha, dropout, splits=3)
        blk.attn.proj = LoRALinear(blk.attn.proj, rank, alpha, dropout, splits=1)


class CMPTModel(nn.Module):
    """Frozen CAV-MAE encoders + CLS/CMPT tokens + LoRA + linear head. model(batch) -> logits (B, K).

    proxy: with CMPT tokens and the gating of Eq. 5 (False: CLS tokens only, plain addition).
    lam: lambda of Eq. 7. modality_dropout: random modality dropout in train_step.
    """

    def __init__(self, backbone, proxy=True, lam=LAMBDA, modality_dropout=True):
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

    def fused(self, tok, has_a, has_v):
        """The head's input T (B, D): Eq. 5 with proxies, else CLS^_a + CLS^_v of whatever came in."""
        if self.proxy:
            return fuse(tok["cls_a"], tok["cls_v"], tok["cmpt_a"], tok["cmpt_v"], has_a, has_v)
        # DEVIATION: without proxy tokens there is no gating: the placeholder's class token is added.
        return tok["cls_a"] + tok["cls_v"]

    def forward(self, batch):
        """batch dict (audio, video, optional has_audio / has_video) -> logits (B, K)."""
        has_a, has_v = availability(batch)
        tok = self.tokens(batch["audio"], batch["video"], has_a, has_v)
        # Eq. (6) y_hat = h(T)
        return self.head(self.fused(tok, has_a, has_v))  # (B, K)


def availability(batch):
    """has_audio / has_video of a batch, all True when the batch has no such fields: (B,), (B,)."""
    B = batch["label"].shape[0] if "label" in batch else batch["audio"].shape[0]
    full = torch.ones(B, dtype=torch.bool, device=batch["audio"].device)
    return batch.get("has_audio", full), batch.get("has_video", full)


def build(backbone, proxy=True, lam=LAMBDA, modality_dropout=True):
    """A CMPT model (or one of its ablations) around a frozen CAV-MAE; the backbone is changed in place."""
    return CMPTModel(backbone, proxy=proxy, lam=lam, modality_dropout=modality_dropout)


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
    audio, video, label = batch["audio"], batch["video"], batch["label"]
    has_a, has_v = availability(batch)  # (B,), (B,)
    if model.modality_dropout:
        audio, video, has_a, has_v = drop_modality(audio, video, has_a, has_v)
    tok = model.tokens(audio, video, has_a, has_v)  # Eq. 1-3: cls_a, cls_v, cmpt_a, cmpt_v, each (B, D)
    T = model.fused(tok, has_a, has_v)  # Eq. 5, (B, D)
    # Eq. (6) y_hat = h(T)
    logits = model.head(T)  # (B, K)
    task = task_loss(logits, label)
    if model.proxy:
        align = alignment_loss(tok["cmpt_a"], tok["cls_v"], tok["cmpt_v"], tok["cls_a"], complete=has_a & has_v)
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
