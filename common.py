"""The two backbones (CAV-MAE audio-video, CLIP image-text), their checkpoints and shared helpers.

CAV-MAE (Gong et al., ICLR 2023, arXiv 2210.07839, YuanGongND/cav-mae), fine-tuned as READ, ABPEM and
BriMPR use it; `base` has the published checkpoints' keys: fbank -> patch_embed_a -> blocks_a -> z_a;
frame -> patch_embed_v -> blocks_v -> z_v; [z_a; z_v] -> blocks_u -> norm -> token mean -> mlp_head.
Its blocks own six LayerNorms: the joint path uses norm1/norm2, one modality alone its _a/_v norms.
CLIP (Radford et al., ICML 2021, arXiv 2103.00020, openai/CLIP); `base` has OpenAI's ViT-B/16 keys:
image -> [class; patches] -> ln_pre -> blocks -> ln_post(class) @ proj; text -> causal blocks ->
ln_final(end-of-text token, the largest id) @ text_projection.

The backbone interface both offer (cmpt.py, aoept.py): `modalities`, `has_class_token`, `causal`,
width(m), `embed_dim` (pooled width), embed(m, x, prefix) -> tokens (B, P + N_m, D_m) with the prefix in
front, cls_index(m, x) (CLIP), tower(m) (blocks), run(m, x, mask), pool(m, token (B, D_m)) -> (B, E).

Dimension key: B batch, N tokens, D width, H heads, K classes, E CLIP's joint width.
"""
import json
import math
import os
import random
import uuid
import zipfile
from collections import OrderedDict

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

# `base` is CAV-MAE as published; `tiny` the same architecture, trained in seconds on the embedded benchmark.
CONFIGS = {
    "base": dict(embed_dim=768, num_heads=12, depth=11, depth_u=1, mlp_ratio=4.0,
                 audio_length=1024, mel_bins=128, image_size=224, patch_size=16,
                 decoder_dim=512, decoder_depth=8, decoder_heads=16),
    "tiny": dict(embed_dim=64, num_heads=4, depth=3, depth_u=1, mlp_ratio=4.0,
                 audio_length=128, mel_bins=64, image_size=64, patch_size=16,
                 decoder_dim=32, decoder_depth=2, decoder_heads=2),
}


# --- CAV-MAE ---------------------------------------------------------------------------------------------
class Attention(nn.Module):
    """Multi-head self-attention with one fused qkv projection (timm layout, qkv_bias=True)."""

    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, return_logits=False):
        """x: (B, N, D) -> (B, N, D); with return_logits also the scaled pre-softmax logits (B, H, N, N)."""
        B, N, D = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, D // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, H, N, D/H)
        logits = (q @ k.transpose(-2, -1)) * self.scale  # (B, H, N, N), rows = queries
        out = (logits.softmax(dim=-1) @ v).transpose(1, 2).reshape(B, N, D)
        out = self.proj(out)
        return (out, logits) if return_logits else out


class Block(nn.Module):
    """Pre-norm transformer block with three sets of LayerNorms: shared, audio (_a), video (_v)."""

    def __init__(self, dim, num_heads, mlp_ratio):
        super().__init__()
        self.norm1, self.norm1_a, self.norm1_v = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads)
        self.norm2, self.norm2_a, self.norm2_v = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(OrderedDict(fc1=nn.Linear(dim, hidden), act=nn.GELU(),
                                             fc2=nn.Linear(hidden, dim)))

    def forward(self, x, modality=None, return_logits=False):
        """x: (B, N, D) -> (B, N, D) with the shared norms (None) or the modality's ('a' / 'v')."""
        n1, n2 = {None: (self.norm1, self.norm2), "a": (self.norm1_a, self.norm2_a),
                  "v": (self.norm1_v, self.norm2_v)}[modality]
        a = self.attn(n1(x), return_logits=return_logits)
        a, logits = a if return_logits else (a, None)
        x = x + a
        x = x + self.mlp(n2(x))
        return (x, logits) if return_logits else x


def patch_embed(in_chans, dim, p):
    """A Conv2d with kernel = stride = patch size p, under the published name `proj`."""
    return nn.Sequential(OrderedDict(proj=nn.Conv2d(in_chans, dim, kernel_size=p, stride=p)))


class CAVMAE(nn.Module):
    """CAV-MAE fine-tuned classifier. `CAVMAE('base', 50)` has the published checkpoint's keys."""

    modalities = ("audio", "video")
    has_class_token = False
    causal = ()

    def __init__(self, config="tiny", num_classes=10):
        super().__init__()
        need(config in CONFIGS, f"unknown model configuration {config!r}; choose one of {sorted(CONFIGS)}.")
        c = CONFIGS[config]
        self.config, self.num_classes = config, num_classes
        D, p = c["embed_dim"], c["patch_size"]
        self.embed_dim, self.num_heads = D, c["num_heads"]
        self.audio_length, self.mel_bins, self.image_size = c["audio_length"], c["mel_bins"], c["image_size"]
        self.n_audio = (c["mel_bins"] // p) * (c["audio_length"] // p)  # 8 x 64 = 512 for base
        self.n_video = (c["image_size"] // p) ** 2  # 14 x 14 = 196 for base

        self.patch_embed_a = patch_embed(1, D, p)
        self.patch_embed_v = patch_embed(3, D, p)
        self.modality_a = nn.Parameter(torch.zeros(1, 1, D))
        self.modality_v = nn.Parameter(torch.zeros(1, 1, D))
        self.pos_embed_a = nn.Parameter(torch.zeros(1, self.n_audio, D))
        self.pos_embed_v = nn.Parameter(torch.zeros(1, self.n_video, D))
        self.blocks_a = nn.ModuleList([Block(D, c["num_heads"], c["mlp_ratio"]) for _ in range(c["depth"])])
        self.blocks_v = nn.ModuleList([Block(D, c["num_heads"], c["mlp_ratio"]) for _ in range(c["depth"])])
        self.blocks_u = nn.ModuleList([Block(D, c["num_heads"], c["mlp_ratio"]) for _ in range(c["depth_u"])])
        self.norm_a, self.norm_v, self.norm = nn.LayerNorm(D), nn.LayerNorm(D), nn.LayerNorm(D)
        self.mlp_head = nn.Sequential(nn.LayerNorm(D), nn.Linear(D, num_classes))
        self._init_weights()

    def _init_weights(self):
        # CAV-MAE's initialisation: fixed 2-D sin-cos position embeddings (audio grid: frequency x
        # time), xavier-uniform Linears and patch kernels, N(0, 0.02) modality embeddings.
        p = self.patch_embed_a.proj.kernel_size[0]
        D = self.embed_dim
        self.pos_embed_a.data.copy_(sincos_pos_embed(D, self.mel_bins // p, self.audio_length // p))
        self.pos_embed_v.data.copy_(sincos_pos_embed(D, self.image_size // p, self.image_size // p))
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        for m in (self.patch_embed_a.proj, self.patch_embed_v.proj):
            nn.init.xavier_uniform_(m.weight.view(m.weight.shape[0], -1))
        for p in (self.modality_a, self.modality_v):
            nn.init.normal_(p, std=0.02)

    def embed_audio(self, fbank):
        """fbank (B, T, F) -> audio tokens (B, N_a, D), frequency-major as in CAV-MAE."""
        x = self.patch_embed_a(fbank.unsqueeze(1).transpose(2, 3))  # (B, D, F/p, T/p) from (B, 1, F, T)
        return x.flatten(2).transpose(1, 2) + self.pos_embed_a + self.modality_a  # row-major patches

    def embed_video(self, frame):
        """frame (B, 3, H, W) -> video tokens (B, N_v, D)."""
        return self.patch_embed_v(frame).flatten(2).transpose(1, 2) + self.pos_embed_v + self.modality_v

    @staticmethod
    def run_blocks(blocks, x, return_all=False):
        """Run blocks on x (B, N, D); return_all: also every block's output."""
        outs = []
        for blk in blocks:
            x = blk(x)
            outs.append(x)
        return (x, outs) if return_all else x

    def encode(self, audio, video):
        """Both modality-specific encoders: -> z_a (B, N_a, D), z_v (B, N_v, D)."""
        z_a = self.run_blocks(self.blocks_a, self.embed_audio(audio))
        z_v = self.run_blocks(self.blocks_v, self.embed_video(video))
        return z_a, z_v

    def fuse(self, z_a, z_v, return_logits=False):
        """Unified block over [audio; video] -> norm -> token mean (B, D); return_logits: also its attention
        logits (B, H, N, N), audio tokens first (ABPEM)."""
        x = torch.cat([z_a, z_v], dim=1)  # (B, N_a + N_v, D)
        logits = None
        for blk in self.blocks_u:
            x = blk(x, return_logits=return_logits)
            if return_logits:
                x, logits = x
        feat = self.norm(x).mean(dim=1)  # (B, D)
        return (feat, logits) if return_logits else feat

    def fuse_single(self, z, modality):
        """One modality ('a' or 'v') through the unified block with its own norms -> (B, D)."""
        for blk in self.blocks_u:
            z = blk(z, modality=modality)
        return (self.norm_a if modality == "a" else self.norm_v)(z).mean(dim=1)

    def classify(self, feat):
        """mlp_head: (B, D) -> logits (B, K)."""
        return self.mlp_head(feat)

    def forward(self, audio, video, mode="multimodal"):
        """audio (B, T, F), video (B, 3, H, W) -> logits (B, K). mode: multimodal | audioonly | videoonly."""
        if mode == "audioonly":
            return self.classify(self.fuse_single(self.run("audio", self.embed_audio(audio)), "a"))
        if mode == "videoonly":
            return self.classify(self.fuse_single(self.run("video", self.embed_video(video)), "v"))
        need(mode == "multimodal", f"unknown mode {mode!r}; use multimodal, audioonly or videoonly.")
        return self.classify(self.fuse(*self.encode(audio, video)))

    # -- the backbone interface (see the module docstring) -----------------------------------------
    def width(self, m):
        return self.embed_dim

    def embed(self, m, x, prefix=None):
        t = self.embed_audio(x) if m == "audio" else self.embed_video(x)  # (B, N_m, D)
        return t if prefix is None else torch.cat([prefix, t], dim=1)

    def tower(self, m):
        return self.blocks_a if m == "audio" else self.blocks_v

    def run(self, m, x, mask=None):
        return self.run_blocks(self.tower(m), x)

    def pool(self, m, t):
        """CAV-MAE's towers end without a norm (norm_a / norm_v follow the unified block): a LayerNorm
        without parameters, the same for both modalities, so their pooled tokens share one scale."""
        return F.layer_norm(t, t.shape[-1:])


def sincos_pos_embed(dim, grid_h, grid_w):
    """MAE's fixed 2-D sin-cos position embedding: (1, grid_h * grid_w, dim), row-major. Half the
    channels encode the column, half the row: [sin(pos w_i), cos(pos w_i)], w_i = 10000^(-i / (dim / 4))."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))  # (D/4,)
    rows, cols = torch.meshgrid(torch.arange(grid_h, dtype=torch.float64),
                                torch.arange(grid_w, dtype=torch.float64), indexing="ij")

    def half(pos):  # (N,) -> (N, D/2)
        angle = pos.flatten()[:, None] * omega[None]
        return torch.cat([angle.sin(), angle.cos()], dim=1)
    return torch.cat([half(cols), half(rows)], dim=1).float().unsqueeze(0)


def keep_tokens(x, keep, generator=None):
    """Keep `keep` random tokens per sample (MAE-style), in their order. x (B, N, D) -> (B, keep, D)."""
    B, N, D = x.shape
    noise = torch.rand(B, N, generator=generator, device="cpu").to(x.device)  # (B, N)
    idx = noise.argsort(dim=1)[:, :keep].sort(dim=1).values  # (B, keep) distinct token indices
    return x.gather(1, idx.unsqueeze(-1).expand(B, keep, D))


# --- CLIP (image-text): OpenAI CLIP ViT-B/16 and a tiny configuration ------------------------------------
CLIP_CONFIGS = {
    # OpenAI CLIP ViT-B/16: 149,620,737 parameters
    "base": dict(image_size=224, patch_size=16, vision_width=768, vision_layers=12, vision_heads=12,
                 embed_dim=512, context_length=77, vocab_size=49408, text_width=512, text_layers=12,
                 text_heads=8),
    # 48 x 48 images in 36 patches of 8 x 8, at most 40 tokens, the embedded benchmark's vocabulary
    "tiny": dict(image_size=48, patch_size=8, vision_width=64, vision_layers=4, vision_heads=4,
                 embed_dim=64, context_length=40, vocab_size=None, text_width=64, text_layers=4,
                 text_heads=4),
}
CLIP_INIT_TEMPERATURE = 0.07  # CLIP: logit_scale starts at ln(1 / 0.07)
CLIP_MAX_LOGIT_SCALE = 100.0  # CLIP clamps exp(logit_scale) at 100
CLIP_NON_WEIGHTS = ("input_resolution", "context_length", "vocab_size")  # entries of the TorchScript archive


class QuickGELU(nn.Module):
    """CLIP's GELU approximation: x * sigmoid(1.702 x)."""

    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class FusedQKVAttention(nn.Module):
    """Self-attention with nn.MultiheadAttention's parameters: in_proj_weight (3 D, D) holding q, k, v as
    row blocks, in_proj_bias, out_proj. `qkv_adapter` (CMPT's LoRA): x -> (B, N, 3 D) added to [q|k|v]."""

    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        self.out_proj = nn.Linear(dim, dim)
        self.qkv_adapter = None  # no module, no state-dict keys until a method sets one

    def project_qkv(self, x):
        """x (B, N, D) -> [q | k | v] (B, N, 3 D)."""
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
        return qkv if self.qkv_adapter is None else qkv + self.qkv_adapter(x)

    def forward(self, x, attn_mask=None):
        """x (B, N, D) -> (B, N, D). attn_mask: (N, N) added to the logits (-inf = not attended)."""
        B, N, D = x.shape
        qkv = self.project_qkv(x).reshape(B, N, 3, self.num_heads, D // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, H, N, D/H)
        logits = (q @ k.transpose(-2, -1)) * (D // self.num_heads) ** -0.5  # (B, H, N, N), rows = queries
        if attn_mask is not None:
            logits = logits + attn_mask
        out = (logits.softmax(dim=-1) @ v).transpose(1, 2).reshape(B, N, D)
        return self.out_proj(out)


class ResidualBlock(nn.Module):
    """CLIP's pre-LN block: x + attn(ln_1(x)); x + mlp(ln_2(x)), mlp = c_fc -> QuickGELU -> c_proj."""

    def __init__(self, dim, num_heads):
        super().__init__()
        self.attn = FusedQKVAttention(dim, num_heads)
        self.ln_1 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(OrderedDict(c_fc=nn.Linear(dim, 4 * dim), gelu=QuickGELU(),
                                             c_proj=nn.Linear(4 * dim, dim)))
        self.ln_2 = nn.LayerNorm(dim)

    def forward(self, x, attn_mask=None):
        x = x + self.attn(self.ln_1(x), attn_mask)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    """A stack of residual blocks (`resblocks`, the published key names)."""

    def __init__(self, dim, layers, num_heads):
        super().__init__()
        self.resblocks = nn.ModuleList([ResidualBlock(dim, num_heads) for _ in range(layers)])


class VisionTransformer(nn.Module):
    """CLIP's image tower (`visual.*`): patch conv, class embedding, positions, ln_pre, blocks, ln_post."""

    def __init__(self, image_size, patch_size, width, layers, heads, embed_dim):
        super().__init__()
        scale = width ** -0.5
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        n = (image_size // patch_size) ** 2 + 1  # patches and the class token
        self.positional_embedding = nn.Parameter(scale * torch.randn(n, width))
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = Transformer(width, layers, heads)
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, embed_dim))


class CLIP(nn.Module):
    """CLIP dual encoder. `CLIP('base')` has the keys and shapes of OpenAI's ViT-B/16 state dict."""

    modalities = ("image", "text")
    has_class_token = True
    causal = ("text",)

    def __init__(self, config="tiny", vocab_size=None):
        super().__init__()
        need(config in CLIP_CONFIGS, f"unknown CLIP configuration {config!r}; choose {sorted(CLIP_CONFIGS)}.")
        c = dict(CLIP_CONFIGS[config])
        c["vocab_size"] = vocab_size or c["vocab_size"]
        need(c["vocab_size"], f"CLIP({config!r}) needs vocab_size, the tokenizer's vocabulary size.")
        self.config, self.vocab_size = config, c["vocab_size"]
        self.image_size, self.context_length = c["image_size"], c["context_length"]
        self.embed_dim = c["embed_dim"]
        self.visual = VisionTransformer(c["image_size"], c["patch_size"], c["vision_width"],
                                        c["vision_layers"], c["vision_heads"], c["embed_dim"])
        self.transformer = Transformer(c["text_width"], c["text_layers"], c["text_heads"])
        self.token_embedding = nn.Embedding(c["vocab_size"], c["text_width"])
        self.positional_embedding = nn.Parameter(torch.empty(c["context_length"], c["text_width"]))
        self.ln_final = nn.LayerNorm(c["text_width"])
        self.text_projection = nn.Parameter(torch.empty(c["text_width"], c["embed_dim"]))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / CLIP_INIT_TEMPERATURE)))
        self._init_weights(c)

    def _init_weights(self, c):
        # CLIP's initialize_parameters: token N(0, 0.02), text positions N(0, 0.01); per block, q/k/v
        # N(0, width^-1/2), out_proj and c_proj N(0, width^-1/2 (2 L)^-1/2), c_fc N(0, (2 width)^-1/2);
        # text_projection N(0, width^-1/2). The image tower's vectors are drawn in its constructor.
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        for tower, width, layers in ((self.transformer, c["text_width"], c["text_layers"]),
                                     (self.visual.transformer, c["vision_width"], c["vision_layers"])):
            for blk in tower.resblocks:
                nn.init.normal_(blk.attn.in_proj_weight, std=width ** -0.5)
                nn.init.normal_(blk.attn.out_proj.weight, std=width ** -0.5 * (2 * layers) ** -0.5)
                nn.init.zeros_(blk.attn.out_proj.bias)
                nn.init.normal_(blk.mlp.c_fc.weight, std=(2 * width) ** -0.5)
                nn.init.normal_(blk.mlp.c_proj.weight, std=width ** -0.5 * (2 * layers) ** -0.5)
        nn.init.normal_(self.text_projection, std=c["text_width"] ** -0.5)

    @staticmethod
    def causal_mask(n, device=None, dtype=torch.float32):
        """(n, n) additive mask: 0 on and below the diagonal, -inf above (token i sees tokens 0..i)."""
        return torch.full((n, n), float("-inf"), device=device, dtype=dtype).triu(1)

    @staticmethod
    def run_blocks(blocks, x, attn_mask=None):
        for blk in blocks:
            x = blk(x, attn_mask)
        return x

    # -- the backbone interface (see the module docstring) -----------------------------------------
    def width(self, m):
        return self.visual.conv1.out_channels if m == "image" else self.token_embedding.embedding_dim

    def embed(self, m, x, prefix=None):
        """Image: ln_pre([prefix; class; patches] + positions), no position for the prefix. Text: [prefix;
        token + position embeddings] up to the last end-of-text token (the padding after it is unseen)."""
        if m == "image":
            v = self.visual
            t = v.conv1(x).flatten(2).transpose(1, 2)  # (B, N, D_v), row-major patches
            cls = v.class_embedding.to(t.dtype).expand(t.shape[0], 1, -1)  # (B, 1, D_v)
            t = torch.cat([cls, t], dim=1) + v.positional_embedding  # (B, 1 + N, D_v)
            return v.ln_pre(t if prefix is None else torch.cat([prefix, t], dim=1))
        x = x[:, : int(x.argmax(dim=-1).max()) + 1]  # (B, C')
        t = self.token_embedding(x) + self.positional_embedding[: x.shape[1]]  # (B, C', D_t)
        return t if prefix is None else torch.cat([prefix, t], dim=1)

    def cls_index(self, m, x):
        """The class token: first of the image tokens; the end-of-text token (the largest id) of a text."""
        return x.argmax(dim=-1) if m == "text" else torch.zeros(len(x), dtype=torch.long, device=x.device)

    def tower(self, m):
        return self.visual.transformer.resblocks if m == "image" else self.transformer.resblocks

    def run(self, m, x, mask=None):
        if mask is None and m in self.causal:
            mask = self.causal_mask(x.shape[1], x.device, x.dtype)
        return self.run_blocks(self.tower(m), x, mask)

    def pool(self, m, t):
        """ln_post(t) @ proj (image) or ln_final(t) @ text_projection (text): (B, D_m) -> (B, E)."""
        if m == "image":
            return self.visual.ln_post(t) @ self.visual.proj
        return self.ln_final(t) @ self.text_projection

    def encode_image(self, image):
        """image (B, 3, S, S) -> image embedding (B, E)."""
        return self.pool("image", self.run("image", self.embed("image", image))[:, 0])

    def encode_text(self, text):
        """ids (B, C) -> text embedding (B, E), pooled at the end-of-text token."""
        x = self.run("text", self.embed("text", text))  # (B, C', D_t)
        return self.pool("text", x[torch.arange(len(x), device=x.device), self.cls_index("text", text)])

    def forward(self, image, text):
        """-> logits_per_image (B, B): exp(logit_scale) x cosine of image i and text j."""
        img = F.normalize(self.encode_image(image), dim=-1)
        txt = F.normalize(self.encode_text(text), dim=-1)
        return self.logit_scale.exp().clamp(max=CLIP_MAX_LOGIT_SCALE) * img @ txt.t()


def clip_loss(logits_per_image):
    """CLIP's symmetric InfoNCE: (CE(logits, arange) + CE(logits^T, arange)) / 2. (B, B) -> scalar."""
    target = torch.arange(len(logits_per_image), device=logits_per_image.device)
    return 0.5 * (F.cross_entropy(logits_per_image, target) + F.cross_entropy(logits_per_image.t(), target))


# --- Metrics, in % (no sklearn) --------------------------------------------------------------------------
def accuracy(logits, labels):
    """logits (N, K), labels (N,) long -> % of rows whose argmax is the label."""
    return 100.0 * (logits.argmax(dim=-1) == labels).double().mean().item()


def f1_scores(logits, targets, threshold=0.5):
    """MM-IMDb: logits, multi-hot targets (N, K) -> {'f1_macro', 'f1_micro'} in %, predicted where sigmoid >=
    threshold; F1_k = 2 TP_k / (2 TP_k + FP_k + FN_k), 0 without positives or predictions; micro pools all."""
    pred = torch.sigmoid(logits) >= threshold  # (N, K) bool
    true = targets > 0.5  # (N, K) bool
    tp = (pred & true).sum(0).double()  # (K,)
    fp = (pred & ~true).sum(0).double()
    fn = (~pred & true).sum(0).double()
    denom = 2 * tp + fp + fn
    f1_k = torch.where(denom > 0, 2 * tp / denom.clamp(min=1), torch.zeros_like(denom))
    denom_all = denom.sum()
    micro = (2 * tp.sum() / denom_all).item() if denom_all > 0 else 0.0
    return {"f1_macro": 100.0 * f1_k.mean().item(), "f1_micro": 100.0 * micro}


def auroc(scores, labels):
    """Binary (Hateful Memes): scores (N,), labels (N,) 0/1 -> P(score of a positive > score of a
    negative) in %, a tie counting one half (the Mann-Whitney form of the area under the ROC curve)."""
    labels = torch.as_tensor(labels).bool()
    pos, neg = scores[labels].double(), scores[~labels].double()  # (P,), (M,)
    need(len(pos) and len(neg), f"AUROC needs both classes but the labels hold {len(pos)} positives and "
                                f"{len(neg)} negatives; evaluate on a split with both.")
    wins = (pos[:, None] > neg[None, :]).double() + 0.5 * (pos[:, None] == neg[None, :]).double()  # (P, M)
    return 100.0 * wins.mean().item()


# --- Refusals, device, seeding ---------------------------------------------------------------------------
class Refusal(ValueError):
    """Bad input a user can fix; the message is one sentence saying what is wrong and what to do."""


def need(condition, message):
    """Refuse with `message` (one sentence of at most 200 characters) unless `condition` holds."""
    if not condition:
        raise Refusal(message)


def get_device(name=None):
    """`cuda` when available, else `cpu`; `name` ('cpu', 'cuda:1', ...) overrides; refused if unusable."""
    if not name:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
        torch.zeros(1, device=device)
    except Exception:  # not a device name, no CUDA, a device index too large, mps on Linux, ...
        other = " or cuda" if torch.cuda.is_available() else ""
        raise Refusal(f"--device {name} is not usable in this PyTorch; use cpu{other}.") from None
    return device


def seed_everything(seed):
    """Seed python, numpy and torch (all devices). Returns a torch.Generator seeded the same."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


# --- Checkpoints: one loader for ours, the published CAV-MAE and the published CLIP ----------------------
ARCHS = {"CAV-MAE": (CAVMAE, CONFIGS, "patch_embed_a.proj.weight", "blocks_a"),
         "CLIP": (CLIP, CLIP_CONFIGS, "visual.conv1.weight", "visual.transformer.resblocks")}


def save_checkpoint(path, model, **meta):
    """Save {'config', 'num_classes' (CAV-MAE) or 'vocab_size' (CLIP), 'state_dict', **meta} atomically."""
    size = {"vocab_size": model.vocab_size} if isinstance(model, CLIP) else {"num_classes": model.num_classes}
    atomic_save({"config": model.config, **size, "state_dict": model.state_dict(), **meta}, path)


def read_weights(path):
    """-> (state dict in float32 without `module.` prefixes, our metadata or {}). Reads a TorchScript archive
    (OpenAI's CLIP), a state dict, or one nested under 'state_dict' / 'model' (ours and others')."""
    name = os.path.basename(path)
    what = "is a folder" if os.path.isdir(path) else "does not exist"
    need(os.path.isfile(path), f"checkpoint {name} {what}; pass a .pt/.pth file written by train.py or a "
                               f"published CAV-MAE or CLIP checkpoint.")
    names = zipfile.ZipFile(path).namelist() if zipfile.is_zipfile(path) else []
    if any(n.endswith("constants.pkl") for n in names):  # a TorchScript archive
        obj = torch.jit.load(path, map_location="cpu").state_dict()
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # not a torch file, a truncated download, pickled Python objects, ...
            raise Refusal(f"{name} is not a checkpoint torch can read safely (damaged, truncated or pickled "
                          f"objects); download or save it again as a state dict.") from None
    meta = {}
    while isinstance(obj, dict) and isinstance(obj.get("state_dict", obj.get("model")), dict):
        meta = {k: v for k, v in obj.items() if k not in ("state_dict", "model")}
        obj = obj["state_dict"] if isinstance(obj.get("state_dict"), dict) else obj["model"]
    need(isinstance(obj, dict) and obj and all(torch.is_tensor(v) for v in obj.values()),
         f"{name} holds no state dict (a dict of tensors); pass a file from train.py or a published one.")
    sd = {}
    for k, v in obj.items():
        while k.startswith("module."):  # DataParallel / DistributedDataParallel
            k = k[len("module."):]
        if k not in CLIP_NON_WEIGHTS:
            sd[k] = v.float() if v.is_floating_point() else v
    return sd, (meta if "config" in meta else {})


def looks_like(sd):
    """What a state dict holds, from its keys and shapes: (arch, config or None, 'a CAV-MAE of width ...')."""
    for arch, (_, configs, key, blocks) in ARCHS.items():
        if key in sd:
            width = sd[key].shape[0]
            depth = len({k.split(".")[len(blocks.split("."))] for k in sd if k.startswith(blocks + ".")})
            found = [c for c, v in configs.items() if (v.get("embed_dim"), v.get("depth")) == (width, depth)
                     or (v.get("vision_width"), v.get("vision_layers")) == (width, depth)]
            what = f"a {arch} of width {width} and {depth} layers per tower"
            return arch, (found[0] if found else None), what
    return None, None, f"neither CAV-MAE nor CLIP (first key {next(iter(sd))})"


def load_checkpoint(path, config=None, device="cpu"):
    """-> (CAVMAE or CLIP in eval mode on `device`, metadata) from our file or a published one; the
    configuration comes from our metadata, else `config`, else the weights' shapes."""
    name = os.path.basename(path)
    sd, meta = read_weights(path)
    arch, seen, what = looks_like(sd)
    need(arch, f"{name} holds {what}; pass a CAV-MAE or CLIP checkpoint.")
    configs = ARCHS[arch][1]
    flag = f"--config {seen}" if seen else "another file"
    if config and meta.get("config", config) != config:
        raise Refusal(f"{name} holds a {meta['config']!r} model but --config {config} was given; drop "
                      f"--config (our files carry their own) or pass --config {meta['config']}.")
    cfg = meta.get("config") or config or seen
    need(cfg, f"{name} holds {what}, which matches no --config ({', '.join(configs)}); pass another file.")
    fits = cfg in configs and cfg in (seen, meta.get("config"))  # our metadata, else the shapes, decide
    need(fits, f"{name} holds {what}, not the {arch} {cfg!r}; pass {flag}.")
    if arch == "CAV-MAE":
        need("mlp_head.1.weight" in sd, f"{name} has no mlp_head.1.weight, so it is not a fine-tuned CAV-MAE "
                                        f"classifier; pass a fine-tuned checkpoint.")
        model = CAVMAE(cfg, num_classes=sd["mlp_head.1.weight"].shape[0])
    else:
        need("token_embedding.weight" in sd, f"{name} has no token_embedding.weight; pass a whole CLIP file.")
        model = CLIP(cfg, vocab_size=sd["token_embedding.weight"].shape[0])
    own = model.state_dict()
    bad = sorted(set(own) ^ set(sd)) or sorted(k for k in own if own[k].shape != sd[k].shape)
    need(not bad, f"{name} does not fit {arch} {cfg!r}: {len(bad)} keys missing, unexpected or of another "
                  f"shape (first {bad[0] if bad else ''}); pass a {arch} checkpoint of this code.")
    nan = [k for k, v in sd.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    need(not nan, f"{name} holds NaN or infinite values in {nan[0] if nan else ''}; the training that wrote "
                  f"it diverged: train it again or use another checkpoint.")
    model.load_state_dict(sd, strict=True)
    size = {"num_classes": model.num_classes} if arch == "CAV-MAE" else {"vocab_size": model.vocab_size}
    return model.to(device).eval(), {**meta, "config": cfg, **size}


# --- Files written whole or not at all; output paths checked up front ------------------------------------
def atomic_write(path, write):
    """Call write(temp_path), then rename the temp file onto `path`: readers see the old file or the whole
    new one; the temp file (unique to this process and call) is removed if writing fails or is interrupted."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    folder, base = os.path.split(os.path.abspath(path))
    tmp = os.path.join(folder, f".{base}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def atomic_save(obj, path):
    """torch.save(obj, path), whole or not at all."""
    return atomic_write(path, lambda tmp: torch.save(obj, tmp))


def write_json(path, obj):
    """Write a JSON results file whole or not at all."""
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=1)
    return atomic_write(path, write)


def check_output_file(path, flag):
    """Refuse (SystemExit, one sentence naming `flag`), before any work, a path that cannot be written."""
    if os.path.isdir(path):
        raise SystemExit(f"error: {flag} {path} is a folder; give a file name, e.g. {path}/out.json.")
    existing = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(existing):  # the nearest folder that exists (the rest is created on save)
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise SystemExit(f"error: {flag} {path} cannot be created: {existing} is a file, not a folder.")
    if not os.access(existing, os.W_OK | os.X_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        raise SystemExit(f"error: {flag} {path} cannot be written: no write permission in {existing}; "
                         f"choose another location.")
    return path


def check_output_folder(path, flag):
    """Like check_output_file for a folder that will receive files."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise SystemExit(f"error: {flag} {path} is a file; give a folder.")
    check_output_file(os.path.join(path, "x"), flag)
    return path
