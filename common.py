"""The CAV-MAE fine-tuned audio-visual classifier and the small helpers every file shares.

CAV-MAE (Gong et al., ICLR 2023, arXiv 2210.07839, code YuanGongND/cav-mae), fine-tuned version
("CAVMAEFT") as used by READ, ABPEM and BriMPR (XLearning-SCU/2024-ICLR-READ `models/cav_mae.py`).
Written here from its description, so that `base` loads the published checkpoints
(`cav_mae_ks50.pth`, `vgg_65.5.pth`) key for key.

    audio fbank (B, T, F) --patch_embed_a--> (B, N_a, D) + pos_embed_a + modality_a
    video frame (B, 3, H, W) --patch_embed_v--> (B, N_v, D) + pos_embed_v + modality_v
    blocks_a (L modality-specific blocks)       blocks_v (L modality-specific blocks)
                 \\                             /
                  concat [audio; video] (B, N_a + N_v, D)
                  blocks_u (1 unified block) -> norm -> mean over tokens -> mlp_head -> (B, K)

Every block owns six LayerNorms (`norm1, norm1_a, norm1_v, norm2, norm2_a, norm2_v`). The
multimodal path uses `norm1/norm2` everywhere; the `_a/_v` norms and the final `norm_a/norm_v`
are used only when the unified block sees ONE modality (audio-only or video-only inference).

Two configurations share this code: `base` (the published model) and `tiny` (the default: the
same architecture, narrow and shallow, trained in seconds on the embedded benchmark).

The forward pass is split into plain functions so the method files can put their own pieces in
between without monkey-patching: `embed_audio / embed_video` (tokens), `keep_tokens` (random
token subsets, BriMPR's masking), `run_blocks` (a modality-specific encoder, optionally returning
each block's output), `fuse` (the unified block over both modalities, optionally returning the
raw attention logits for ABPEM), `fuse_single` (one modality through the unified block),
`classify` (mlp_head).

Dimension key: B batch, N tokens, D width, H heads, K classes, L modality-specific layers.
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

# Width, depth and input sizes of the two configurations. `base` is CAV-MAE as published.
CONFIGS = {
    "base": dict(embed_dim=768, num_heads=12, depth=11, depth_u=1, mlp_ratio=4.0,
                 audio_length=1024, mel_bins=128, image_size=224, patch_size=16,
                 decoder_dim=512, decoder_depth=8, decoder_heads=16),
    "tiny": dict(embed_dim=64, num_heads=4, depth=3, depth_u=1, mlp_ratio=4.0,
                 audio_length=128, mel_bins=64, image_size=64, patch_size=16,
                 decoder_dim=32, decoder_depth=2, decoder_heads=2),
}


# ----------------------------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------------------------
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


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block with three sets of LayerNorms: shared, audio (_a), video (_v)."""

    def __init__(self, dim, num_heads, mlp_ratio):
        super().__init__()
        self.norm1, self.norm1_a, self.norm1_v = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads)
        self.norm2, self.norm2_a, self.norm2_v = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def norms(self, modality=None):
        """The (pre-attention, pre-MLP) norm pair: shared for None, else the modality's own ('a'/'v')."""
        if modality is None:
            return self.norm1, self.norm2
        return (self.norm1_a, self.norm2_a) if modality == "a" else (self.norm1_v, self.norm2_v)

    def forward(self, x, modality=None, return_logits=False):
        """x: (B, N, D) -> (B, N, D); with return_logits also the attention logits (B, H, N, N)."""
        n1, n2 = self.norms(modality)
        a = self.attn(n1(x), return_logits=return_logits)
        a, logits = a if return_logits else (a, None)
        x = x + a
        x = x + self.mlp(n2(x))
        return (x, logits) if return_logits else x


class PatchEmbed(nn.Module):
    """A Conv2d with kernel = stride = patch size; (B, C, H, W) -> (B, H/p * W/p, D), row-major."""

    def __init__(self, in_chans, dim, patch_size):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


# ----------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------
class CAVMAE(nn.Module):
    """CAV-MAE fine-tuned classifier. `CAVMAE('base', 50)` has the published checkpoint's keys."""

    def __init__(self, config="tiny", num_classes=10):
        super().__init__()
        if config not in CONFIGS:
            raise ValueError(f"unknown model configuration {config!r}; choose one of {sorted(CONFIGS)}")
        c = CONFIGS[config]
        self.config, self.num_classes = config, num_classes
        D, p = c["embed_dim"], c["patch_size"]
        self.embed_dim, self.num_heads = D, c["num_heads"]
        self.audio_length, self.mel_bins, self.image_size = c["audio_length"], c["mel_bins"], c["image_size"]
        self.n_audio = (c["mel_bins"] // p) * (c["audio_length"] // p)  # 8 x 64 = 512 for base
        self.n_video = (c["image_size"] // p) ** 2  # 14 x 14 = 196 for base

        self.patch_embed_a = PatchEmbed(1, D, p)
        self.patch_embed_v = PatchEmbed(3, D, p)
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
        self.pos_embed_a.data.copy_(sincos_pos_embed(self.embed_dim, self.mel_bins // p, self.audio_length // p))
        self.pos_embed_v.data.copy_(sincos_pos_embed(self.embed_dim, self.image_size // p, self.image_size // p))
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        for m in (self.patch_embed_a.proj, self.patch_embed_v.proj):
            nn.init.xavier_uniform_(m.weight.view(m.weight.shape[0], -1))
        for p in (self.modality_a, self.modality_v):
            nn.init.normal_(p, std=0.02)

    # -- tokens -------------------------------------------------------------------------------
    def embed_audio(self, fbank):
        """fbank (B, T, F) -> audio tokens (B, N_a, D), frequency-major as in CAV-MAE."""
        x = fbank.unsqueeze(1).transpose(2, 3)  # (B, 1, F, T)
        return self.patch_embed_a(x) + self.pos_embed_a + self.modality_a

    def embed_video(self, frame):
        """frame (B, 3, H, W) -> video tokens (B, N_v, D)."""
        return self.patch_embed_v(frame) + self.pos_embed_v + self.modality_v

    # -- encoders -----------------------------------------------------------------------------
    @staticmethod
    def run_blocks(blocks, x, return_all=False):
        """Run a list of blocks on x (B, N, D). return_all: also the list of every block's output."""
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

    # -- unified block ------------------------------------------------------------------------
    def fuse(self, z_a, z_v, return_logits=False):
        """Unified block over [audio; video] -> norm -> token mean: feature (B, D).

        return_logits: also the unified block's scaled pre-softmax attention logits (B, H, N, N)
        of its (last) attention, audio tokens first (used by ABPEM).
        """
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

    # -- the three inference paths of CAV-MAE --------------------------------------------------
    def forward(self, audio, video, mode="multimodal"):
        """audio (B, T, F), video (B, 3, H, W) -> logits (B, K). mode: multimodal | audioonly | videoonly."""
        if mode == "audioonly":
            return self.classify(self.fuse_single(self.run_blocks(self.blocks_a, self.embed_audio(audio)), "a"))
        if mode == "videoonly":
            return self.classify(self.fuse_single(self.run_blocks(self.blocks_v, self.embed_video(video)), "v"))
        if mode != "multimodal":
            raise ValueError(f"unknown mode {mode!r}; use multimodal, audioonly or videoonly")
        return self.classify(self.fuse(*self.encode(audio, video)))


def sincos_pos_embed(dim, grid_h, grid_w):
    """MAE's fixed 2-D sin-cos position embedding: (1, grid_h * grid_w, dim), row-major.

    Half the channels encode the row, half the column; each half is [sin(pos w_i), cos(pos w_i)]
    with w_i = 1 / 10000^(i / (dim / 4)), i = 0 .. dim / 4 - 1.
    """
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))   # (D/4,)
    rows, cols = torch.meshgrid(torch.arange(grid_h, dtype=torch.float64),
                                torch.arange(grid_w, dtype=torch.float64), indexing="ij")
    def half(pos):  # (N,) -> (N, D/2)
        angle = pos.flatten()[:, None] * omega[None]
        return torch.cat([angle.sin(), angle.cos()], dim=1)
    # MAE puts the width (column) coordinate first
    return torch.cat([half(cols), half(rows)], dim=1).float().unsqueeze(0)


def keep_tokens(x, keep, generator=None):
    """Keep `keep` random tokens per sample (each sample its own permutation, MAE-style dropping).

    x: (B, N, D) -> (B, keep, D); the kept tokens stay in their original order.
    """
    B, N, D = x.shape
    noise = torch.rand(B, N, generator=generator, device="cpu").to(x.device)  # (B, N)
    idx = noise.argsort(dim=1)[:, :keep].sort(dim=1).values  # (B, keep) distinct token indices
    return x.gather(1, idx.unsqueeze(-1).expand(B, keep, D))


# ----------------------------------------------------------------------------------------------
# The CLIP dual encoder (image-text): OpenAI CLIP ViT-B/16 and a tiny configuration
# ----------------------------------------------------------------------------------------------
# CLIP (Radford et al., ICML 2021, arXiv 2103.00020, code openai/CLIP), written here from its
# description so that `base` loads the published ViT-B/16 weights key for key:
#
#   image (B, 3, S, S) --visual.conv1 (patch p, no bias)--> (B, N, D_v), N = (S / p)^2
#       [class_embedding ; patches] + positional_embedding -> ln_pre       (B, 1 + N, D_v)
#       visual.transformer (L_v residual blocks) -> ln_post(class token) @ proj   (B, E)
#   text ids (B, C) --token_embedding--> + positional_embedding            (B, C, D_t)
#       transformer (L_t residual blocks, causal mask) -> ln_final(end-of-text token) @ text_projection  (B, E)
#   logits_per_image = exp(logit_scale) * cos(image_i, text_j)            (B, B)
#
# A residual block is pre-LN: x + attn(ln_1(x)), then x + mlp(ln_2(x)), with an MLP c_fc -> QuickGELU ->
# c_proj and an attention whose q, k, v come from ONE fused projection (`attn.in_proj_weight`
# (3 D, D), rows [q; k; v], the layout of nn.MultiheadAttention). The end-of-text token has the
# largest id of the vocabulary, so its position is `text.argmax(-1)`, as in CLIP.
#
# The pieces are plain methods so the method files can put their own tokens in between:
# `image_tokens` / `text_tokens` (embeddings, Eq. 1 of CMPT), `run_blocks` (a tower's blocks, each
# block's output on request; AOEPT replaces its prompts between blocks), `causal_mask`,
# `pool_image` / `pool_text` (the class / end-of-text token after the last block -> joint space).
CLIP_CONFIGS = {
    # OpenAI CLIP ViT-B/16: 149,620,737 parameters
    "base": dict(image_size=224, patch_size=16, vision_width=768, vision_layers=12, vision_heads=12,
                 embed_dim=512, context_length=77, vocab_size=49408, text_width=512, text_layers=12, text_heads=8),
    # for this CPU: 48 x 48 images in 36 patches of 8 x 8, texts of at most 40 tokens; the vocabulary
    # is the embedded benchmark's (data.embedded_tokenizer().vocab_size), set when the model is built
    "tiny": dict(image_size=48, patch_size=8, vision_width=64, vision_layers=4, vision_heads=4,
                 embed_dim=64, context_length=40, vocab_size=None, text_width=64, text_layers=4, text_heads=4),
}
CLIP_INIT_TEMPERATURE = 0.07  # CLIP: logit_scale starts at ln(1 / 0.07)
CLIP_MAX_LOGIT_SCALE = 100.0  # CLIP clamps exp(logit_scale) at 100
CLIP_NON_WEIGHTS = ("input_resolution", "context_length", "vocab_size")  # entries of the TorchScript archive


class QuickGELU(nn.Module):
    """CLIP's GELU approximation: x * sigmoid(1.702 x)."""

    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class FusedQKVAttention(nn.Module):
    """Multi-head self-attention with nn.MultiheadAttention's parameters: in_proj_weight (3 D, D) holding
    the q, k, v projections as row blocks, in_proj_bias (3 D,), out_proj (D -> D). A method that adapts
    q, k or v (CMPT's LoRA) sets `qkv_adapter`, a module x (B, N, D) -> (B, N, 3 D) added to [q | k | v]."""

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
        q, k, v = self.project_qkv(x).reshape(B, N, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        logits = (q @ k.transpose(-2, -1)) * (D // self.num_heads) ** -0.5     # (B, H, N, N), rows = queries
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
    """CLIP's image tower (`visual.*`): patch conv, class embedding, positions, ln_pre, blocks, ln_post, proj."""

    def __init__(self, image_size, patch_size, width, layers, heads, embed_dim):
        super().__init__()
        scale = width ** -0.5
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn((image_size // patch_size) ** 2 + 1, width))
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = Transformer(width, layers, heads)
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, embed_dim))


class CLIP(nn.Module):
    """CLIP dual encoder. `CLIP('base')` has the keys and shapes of OpenAI's ViT-B/16 state dict."""

    def __init__(self, config="tiny", vocab_size=None):
        super().__init__()
        if config not in CLIP_CONFIGS:
            raise ValueError(f"unknown CLIP configuration {config!r}; choose one of {sorted(CLIP_CONFIGS)}")
        c = dict(CLIP_CONFIGS[config])
        c["vocab_size"] = vocab_size or c["vocab_size"]
        if not c["vocab_size"]:
            raise ValueError(f"CLIP({config!r}) needs vocab_size (the tokenizer's vocabulary size)")
        self.config, self.vocab_size = config, c["vocab_size"]
        self.image_size, self.context_length, self.embed_dim = c["image_size"], c["context_length"], c["embed_dim"]
        self.visual = VisionTransformer(c["image_size"], c["patch_size"], c["vision_width"], c["vision_layers"],
                                        c["vision_heads"], c["embed_dim"])
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

    # -- tokens -------------------------------------------------------------------------------
    def image_tokens(self, image, prefix=None):
        """image (B, 3, S, S) -> [class; patches] + positions, after ln_pre: (B, 1 + N, D_v).
        prefix (B, P, D_v): extra tokens put in front of the class token before ln_pre, without a
        position (CMPT's proxy token) -> (B, P + 1 + N, D_v)."""
        v = self.visual
        x = v.conv1(image).flatten(2).transpose(1, 2)                         # (B, N, D_v), row-major patches
        cls = v.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)         # (B, 1, D_v)
        x = torch.cat([cls, x], dim=1) + v.positional_embedding               # (B, 1 + N, D_v)
        return v.ln_pre(x if prefix is None else torch.cat([prefix, x], dim=1))

    def text_tokens(self, text):
        """ids (B, C), C <= context_length -> token + position embeddings (B, C, D_t)."""
        return self.token_embedding(text) + self.positional_embedding[: text.shape[1]]

    @staticmethod
    def causal_mask(n, device=None, dtype=torch.float32):
        """(n, n) additive mask: 0 on and below the diagonal, -inf above (token i sees tokens 0..i)."""
        return torch.full((n, n), float("-inf"), device=device, dtype=dtype).triu(1)

    @staticmethod
    def run_blocks(blocks, x, attn_mask=None, return_all=False):
        """Run a tower's blocks on x (B, N, D). return_all: also the list of every block's output."""
        outs = []
        for blk in blocks:
            x = blk(x, attn_mask)
            outs.append(x)
        return (x, outs) if return_all else x

    # -- pooling into the joint space ----------------------------------------------------------
    def pool_image(self, x):
        """Image tokens after the last block (B, 1 + N, D_v) -> ln_post(class token) @ proj (B, E)."""
        return self.visual.ln_post(x[:, 0]) @ self.visual.proj

    def pool_text(self, x, eot_index):
        """Text tokens after the last block (B, C, D_t), end-of-text positions (B,) -> (B, E)."""
        return self.ln_final(x[torch.arange(len(x), device=x.device), eot_index]) @ self.text_projection

    # -- the two towers and CLIP's similarity --------------------------------------------------
    def encode_image(self, image):
        """image (B, 3, S, S) -> image embedding (B, E)."""
        return self.pool_image(self.run_blocks(self.visual.transformer.resblocks, self.image_tokens(image)))

    def encode_text(self, text):
        """ids (B, C) -> text embedding (B, E), pooled at the end-of-text token (the largest id)."""
        eot = text.argmax(dim=-1)                                              # (B,)
        # the padding after the last end-of-text token changes nothing before it (causal mask): drop it
        x = self.text_tokens(text[:, : int(eot.max()) + 1])                    # (B, C', D_t)
        x = self.run_blocks(self.transformer.resblocks, x, self.causal_mask(x.shape[1], x.device, x.dtype))
        return self.pool_text(x, eot)

    def forward(self, image, text):
        """-> logits_per_image (B, B): exp(logit_scale) x cosine of image i and text j."""
        img = F.normalize(self.encode_image(image), dim=-1)
        txt = F.normalize(self.encode_text(text), dim=-1)
        return self.logit_scale.exp().clamp(max=CLIP_MAX_LOGIT_SCALE) * img @ txt.t()


def image_text_presence(batch):
    """(has_image, has_text), (B,) bool each, from an image-text batch's missing codes (MAP's: 0 complete,
    1 text missing, 2 image missing); a batch without codes is complete."""
    missing = batch.get("missing")
    if missing is None:
        missing = torch.zeros(len(batch["image"]), dtype=torch.long, device=batch["image"].device)
    return missing != 2, missing != 1


def clip_loss(logits_per_image):
    """CLIP's symmetric InfoNCE: image i picks text i among the batch and text i picks image i,
    (CE(logits, arange) + CE(logits^T, arange)) / 2. logits_per_image (B, B) -> scalar."""
    target = torch.arange(len(logits_per_image), device=logits_per_image.device)
    return 0.5 * (F.cross_entropy(logits_per_image, target) + F.cross_entropy(logits_per_image.t(), target))


def read_clip_state_dict(path):
    """The weights in a CLIP file: OpenAI's TorchScript archive (`ViT-B-16.pt`, fp16), a plain state dict,
    or a checkpoint written by train.py ({'config', 'state_dict', ...}). -> (state dict in float32, meta)."""
    if os.path.isdir(path):
        raise CheckpointError(f"--checkpoint {path} is a folder, not a CLIP weights file; pass the .pt file inside it.")
    if not os.path.isfile(path):
        raise CheckpointError(f"CLIP weights file {path} does not exist; pass OpenAI's ViT-B-16.pt or a file "
                              f"written by `python train.py --data food` with --checkpoint.")
    meta = {}
    if zipfile.is_zipfile(path) and any(n.endswith("constants.pkl") for n in zipfile.ZipFile(path).namelist()):
        try:  # a TorchScript archive, as OpenAI publishes the CLIP models
            sd = torch.jit.load(path, map_location="cpu").state_dict()
        except Exception as e:
            raise CheckpointError(f"{path} looks like a TorchScript archive but torch.jit.load cannot read it ({e}); "
                                  f"download it again.") from None
    else:
        obj = _read_checkpoint(path)
        if isinstance(obj, dict) and "state_dict" in obj and "config" in obj:
            meta, sd = {k: v for k, v in obj.items() if k != "state_dict"}, obj["state_dict"]
        else:
            sd = obj
    if not isinstance(sd, dict) or not sd or not all(torch.is_tensor(v) for v in sd.values()):
        raise CheckpointError(f"{path} is not a CLIP state dict (a dict of tensors) nor a checkpoint written by train.py.")
    sd = {k: v.float() if v.is_floating_point() else v for k, v in sd.items() if k not in CLIP_NON_WEIGHTS}
    return sd, meta


def load_clip(path, config=None, device="cpu"):
    """A CLIP model from `path` (see read_clip_state_dict), loaded strictly: a file that does not fit is
    refused naming its missing, unexpected and wrongly-shaped keys. A file without our metadata is taken
    as `config` ('base' unless given); the vocabulary size is read from token_embedding.weight.
    Returns (model in eval mode on `device`, metadata dict)."""
    sd, meta = read_clip_state_dict(path)
    if meta and config and config != meta["config"]:
        raise CheckpointError(f"{path} holds a {meta['config']!r} CLIP model but --config {config} was given; drop "
                              f"--config (our checkpoints carry their own) or pass --config {meta['config']}.")
    cfg = meta.get("config") or config or "base"
    if cfg not in CLIP_CONFIGS:
        raise CheckpointError(f"{path} names the CLIP configuration {cfg!r}, which this code does not know "
                              f"({', '.join(CLIP_CONFIGS)}); was it written by another version?")
    emb = sd.get("token_embedding.weight")
    if (emb is None or emb.dim() != 2) and not CLIP_CONFIGS[cfg]["vocab_size"]:
        raise CheckpointError(f"{path} does not fit CLIP(config={cfg!r}): missing 1 key (token_embedding.weight), the "
                              f"vocabulary it needs; check that the file is a CLIP checkpoint.")
    model = CLIP(cfg, vocab_size=emb.shape[0] if emb is not None and emb.dim() == 2 else None)
    load_state_dict_strict(model, sd, source=path, hint="Check --config and that the file is a CLIP ViT checkpoint "
                                                         "(OpenAI's ViT-B-16.pt for --config base).")
    meta.update(config=cfg, vocab_size=model.vocab_size)
    return model.to(device).eval(), meta


def save_clip(path, model, **meta):
    """Save {'config', 'vocab_size', 'state_dict', **meta}, whole or not at all."""
    atomic_save({"config": model.config, "vocab_size": model.vocab_size, "state_dict": model.state_dict(), **meta}, path)


# ----------------------------------------------------------------------------------------------
# Pre-training (CAV-MAE): masked reconstruction + audio-visual contrastive learning
# ----------------------------------------------------------------------------------------------
# The published checkpoints were pre-trained self-supervised before fine-tuning, and that is where
# the unimodal paths and the clip-level audio-visual alignment come from. The pieces below are
# CAV-MAE's (class CAVMAE of YuanGongND/cav-mae, written here from its description): 75% of each
# modality's tokens are dropped at random; the visible ones go through their encoder; the joint
# stream (unified block, shared norms, `norm`) feeds a light decoder that reconstructs every
# removed patch (normalised-pixel targets); the same unified block with the `_a` / `_v` norms and
# `norm_a` / `norm_v`, mean-pooled over the visible tokens, gives c_a and c_v for an InfoNCE loss
# (tau 0.05, each video picks its own audio among the batch). L = L_mae_a + L_mae_v + 0.01 L_c.
# Fine-tuning keeps the encoder (`CAVMAE`, the published keys) and drops `CAVMAEDecoder`.
MASK_RATIO = 0.75  # CAV-MAE recipes: 75% of the tokens of each modality removed
CONTRAST_TAU = 0.05  # fixed temperature of the contrastive loss
MAE_WEIGHT, CONTRAST_WEIGHT = 1.0, 0.01  # every released recipe (run_cavmae_pretrain_base.sh)


class CAVMAEDecoder(nn.Module):
    """CAV-MAE's pre-training decoder (keys as published: decoder_embed, mask_token, decoder_blocks, ...)."""

    def __init__(self, config="tiny"):
        super().__init__()
        c = CONFIGS[config]
        D, d, p = c["embed_dim"], c["decoder_dim"], c["patch_size"]
        self.grid_a = (c["mel_bins"] // p, c["audio_length"] // p)
        self.grid_v = (c["image_size"] // p, c["image_size"] // p)
        self.decoder_embed = nn.Linear(D, d)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, d))
        self.decoder_modality_a = nn.Parameter(torch.zeros(1, 1, d))
        self.decoder_modality_v = nn.Parameter(torch.zeros(1, 1, d))
        # fixed sin-cos position embeddings (requires_grad False, as in CAV-MAE)
        self.decoder_pos_embed_a = nn.Parameter(sincos_pos_embed(d, *self.grid_a), requires_grad=False)
        self.decoder_pos_embed_v = nn.Parameter(sincos_pos_embed(d, *self.grid_v), requires_grad=False)
        self.decoder_blocks = nn.ModuleList([Block(d, c["decoder_heads"], c["mlp_ratio"]) for _ in range(c["decoder_depth"])])
        self.decoder_norm = nn.LayerNorm(d)
        self.decoder_pred_a = nn.Linear(d, p * p * 1)
        self.decoder_pred_v = nn.Linear(d, p * p * 3)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        for t in (self.mask_token, self.decoder_modality_a, self.decoder_modality_v):
            nn.init.normal_(t, std=0.02)

    def forward(self, latent, n_vis_a, ids_restore_a, ids_restore_v):
        """latent (B, n_vis_a + n_vis_v, D), the joint stream's visible tokens [audio; video] ->
        predicted patches of EVERY position: audio (B, N_a, p*p), video (B, N_v, p*p*3)."""
        x = self.decoder_embed(latent)                                         # (B, n_vis, d)
        B, _, d = x.shape

        def unshuffle(vis, ids_restore):  # append mask tokens, put every token back in its place
            full = torch.cat([vis, self.mask_token.expand(B, ids_restore.shape[1] - vis.shape[1], d)], dim=1)
            return full.gather(1, ids_restore.unsqueeze(-1).expand(-1, -1, d))
        x_a = unshuffle(x[:, :n_vis_a], ids_restore_a) + self.decoder_pos_embed_a + self.decoder_modality_a  # (B, N_a, d)
        x_v = unshuffle(x[:, n_vis_a:], ids_restore_v) + self.decoder_pos_embed_v + self.decoder_modality_v  # (B, N_v, d)
        x = torch.cat([x_a, x_v], dim=1)
        for blk in self.decoder_blocks:
            x = blk(x)
        x = self.decoder_norm(x)
        n_a = x_a.shape[1]
        return self.decoder_pred_a(x[:, :n_a]), self.decoder_pred_v(x[:, n_a:])


def random_masking(x, mask_ratio, generator=None):
    """MAE's per-sample random token dropping. x (B, N, D) -> visible (B, keep, D), mask (B, N)
    with 1 = removed (original order), ids_restore (B, N) that un-shuffles [visible; removed].
    keep = int(N * (1 - mask_ratio))."""
    B, N, D = x.shape
    keep = int(N * (1 - mask_ratio))
    noise = torch.rand(B, N, generator=generator, device="cpu").to(x.device)  # (B, N)
    ids_shuffle = noise.argsort(dim=1)  # ascending: the first `keep` are kept
    ids_restore = ids_shuffle.argsort(dim=1)
    visible = x.gather(1, ids_shuffle[:, :keep].unsqueeze(-1).expand(-1, -1, D))
    mask = torch.ones(B, N, device=x.device, dtype=x.dtype)
    mask[:, :keep] = 0
    return visible, mask.gather(1, ids_restore), ids_restore


def patchify(x, p):
    """(B, C, H, W) -> (B, H/p * W/p, p*p*C), row-major patches, each ordered (row, col, channel)
    as MAE's patchify (the order the decoder's predictions are compared in)."""
    B, C, H, W = x.shape
    x = x.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 3, 5, 1)       # (B, H/p, W/p, p, p, C)
    return x.reshape(B, (H // p) * (W // p), p * p * C)


def mae_loss(pred, target, mask, norm_pix=True):
    """Mean squared error over each patch, averaged over the REMOVED patches only.
    pred, target (B, N, P); mask (B, N) with 1 = removed. norm_pix: each target patch becomes
    (t - mean) / sqrt(var + 1e-6), unbiased variance over the patch (CAV-MAE's norm_pix_loss)."""
    if norm_pix:
        mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1e-6) ** 0.5
    per_patch = ((pred - target) ** 2).mean(dim=-1)                           # (B, N)
    return (per_patch * mask).sum() / mask.sum()


def contrastive_loss(c_a, c_v, tau=CONTRAST_TAU):
    """CAV-MAE's InfoNCE: S_ij = <c_a_i, c_v_j> / tau on L2-normalised features; each video column
    j picks its own audio: -mean_j log softmax_i(S)_{jj}. c_a, c_v (B, D) -> scalar."""
    c_a, c_v = nn.functional.normalize(c_a, dim=-1), nn.functional.normalize(c_v, dim=-1)
    sim = c_a @ c_v.t() / tau                                                 # (B, B): rows audio, columns video
    target = torch.arange(len(sim), device=sim.device)
    return nn.functional.cross_entropy(sim.t(), target)  # row j of sim.t() = column j of sim, softmax over audio


def pretrain_losses(model, decoder, audio, video, generator=None, mask_ratio=MASK_RATIO):
    """One CAV-MAE pre-training forward. audio (B, T, F), video (B, 3, H, W) ->
    {'mae_a', 'mae_v', 'contrastive', 'loss'} (scalars; 'loss' is the weighted total)."""
    p = model.patch_embed_a.proj.kernel_size[0]
    vis_a, mask_a, restore_a = random_masking(model.embed_audio(audio), mask_ratio, generator)  # (B, n_a, D)
    vis_v, mask_v, restore_v = random_masking(model.embed_video(video), mask_ratio, generator)  # (B, n_v, D)
    z_a = model.run_blocks(model.blocks_a, vis_a)
    z_v = model.run_blocks(model.blocks_v, vis_v)
    # joint stream for the decoder: unified block with the shared norms, then `norm`
    x = torch.cat([z_a, z_v], dim=1)
    for blk in model.blocks_u:
        x = blk(x)
    pred_a, pred_v = decoder(model.norm(x), z_a.shape[1], restore_a, restore_v)
    loss_mae_a = mae_loss(pred_a, patchify(audio.unsqueeze(1).transpose(2, 3), p), mask_a)
    loss_mae_v = mae_loss(pred_v, patchify(video, p), mask_v)
    # contrastive streams: the same unified block with the modality's own norms, mean over visible tokens
    loss_c = contrastive_loss(model.fuse_single(z_a, "a"), model.fuse_single(z_v, "v"))
    loss = MAE_WEIGHT * (loss_mae_a + loss_mae_v) + CONTRAST_WEIGHT * loss_c
    return {"mae_a": loss_mae_a, "mae_v": loss_mae_v, "contrastive": loss_c, "loss": loss}


@torch.no_grad()
def retrieval_top1(c_a, c_v):
    """Audio -> video top-1 retrieval within one batch: fraction of i with argmax_j cos(c_a_i, c_v_j) = i."""
    sim = nn.functional.normalize(c_a, dim=-1) @ nn.functional.normalize(c_v, dim=-1).t()
    return (sim.argmax(dim=1) == torch.arange(len(sim), device=sim.device)).float().mean().item()


# ----------------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------------
# The three image-text tasks' metrics, in %, as pure float-agnostic functions (no sklearn):
#   accuracy   single-label (UPMC Food-101): argmax of the logits equals the label
#   f1_scores  multi-label (MM-IMDb): a class is predicted when sigmoid(logit) >= threshold (0.5);
#              macro = mean over classes of F1_k = 2 TP_k / (2 TP_k + FP_k + FN_k), a class with no
#              positive and no prediction counting F1 0 (sklearn's f1_score(average="macro",
#              zero_division=0)); micro = the same over all entries. MAP (vilt/gadgets/my_metrics.py) and
#              AOEPT (core/utils/metrics_utils.py) both call torchmetrics' F1 on sigmoid probabilities, not
#              sklearn; how torchmetrics treats a probability exactly at 0.5 and an empty class was not
#              checked here. On MM-IMDb's test split every genre has positives, so the empty-class
#              convention does not matter there.
#   auroc      binary (Hateful Memes, the positive class's probability or logit): the Mann-Whitney form
#              P(score of a random positive > score of a random negative), a tie counting one half.
def accuracy(logits, labels):
    """logits (N, K), labels (N,) long -> % of rows whose argmax is the label."""
    return 100.0 * (logits.argmax(dim=-1) == labels).double().mean().item()


def f1_scores(logits, targets, threshold=0.5):
    """logits (N, K), targets (N, K) multi-hot -> {'f1_macro', 'f1_micro'} in %."""
    pred = torch.sigmoid(logits) >= threshold  # (N, K) bool; a probability equal to the threshold is positive
    true = targets > 0.5  # (N, K) bool
    tp = (pred & true).sum(0).double()  # (K,)
    fp = (pred & ~true).sum(0).double()
    fn = (~pred & true).sum(0).double()
    # F1_k = 2 TP_k / (2 TP_k + FP_k + FN_k), 0 when the denominator is 0
    denom = 2 * tp + fp + fn
    f1_k = torch.where(denom > 0, 2 * tp / denom.clamp(min=1), torch.zeros_like(denom))
    denom_all = (2 * tp + fp + fn).sum()
    micro = (2 * tp.sum() / denom_all).item() if denom_all > 0 else 0.0
    return {"f1_macro": 100.0 * f1_k.mean().item(), "f1_micro": 100.0 * micro}


def auroc(scores, labels):
    """scores (N,) (higher = more positive), labels (N,) 0/1 -> area under the ROC curve in %."""
    labels = torch.as_tensor(labels).bool()
    pos, neg = scores[labels].double(), scores[~labels].double()  # (P,), (M,)
    if len(pos) == 0 or len(neg) == 0:
        raise ValueError(f"AUROC needs both classes, but the labels hold {len(pos)} positives and {len(neg)} "
                         f"negatives; evaluate on a split with both.")
    # AUC = 1/(P M) sum_ij [pos_i > neg_j] + 1/2 [pos_i = neg_j]
    wins = (pos[:, None] > neg[None, :]).double() + 0.5 * (pos[:, None] == neg[None, :]).double()  # (P, M)
    return 100.0 * wins.mean().item()


# ----------------------------------------------------------------------------------------------
# Device, seeding, checkpoints
# ----------------------------------------------------------------------------------------------
def get_device(name=None):
    """`cuda` when available, else `cpu`; `name` ('cpu', 'cuda', 'cuda:1', 'mps', ...) overrides.
    A device this torch cannot use ends the run here, with one sentence, before any work."""
    if not name:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise SystemExit(f"error: --device {name} is not a device name; use cpu, cuda or cuda:N.") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"error: --device {name} was asked for but CUDA is not available here; use --device cpu.")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise SystemExit(f"error: --device {name}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                         f"numbered from 0.")
    try:
        torch.zeros(1, device=device)
    except Exception:  # e.g. mps on Linux, xpu without its build: torch knows the name but cannot use it
        raise SystemExit(f"error: --device {name} is not available in this PyTorch build on this machine; "
                         f"use --device cpu{' or cuda' if torch.cuda.is_available() else ''}.") from None
    return device


def seed_everything(seed):
    """Seed python, numpy and torch (all devices). Returns a torch.Generator seeded the same."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


class Refusal(ValueError):
    """Bad input a user can fix; the message is one sentence saying what is wrong and what to do."""


def need(condition, message):
    """Refuse with `message` (one sentence of at most 200 characters) unless `condition` holds."""
    if not condition:
        raise Refusal(message)


class CheckpointError(Exception):
    """A checkpoint that does not fit the model; the message says what is wrong and what to do."""


def save_checkpoint(path, model, **meta):
    """Save {'config', 'num_classes', 'state_dict', **meta}, whole or not at all (`atomic_save`)."""
    atomic_save({"config": model.config, "num_classes": model.num_classes,
                 "state_dict": model.state_dict(), **meta}, path)


def load_state_dict_strict(model, state_dict, source="checkpoint",
                           hint="check --config and that the file is a CAV-MAE fine-tuned checkpoint."):
    """Strip `module.` (DataParallel), then load strictly. A mismatch raises CheckpointError in one sentence
    with the counts of missing, unexpected and wrongly-shaped keys and the first 3 of each, then `hint`
    (what to do); a tensor holding NaN or infinity raises CheckpointError naming the first such tensor."""
    sd = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state_dict.items()}
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    shapes = sorted(f"{k} {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
                    for k in set(sd) & set(own) if tuple(sd[k].shape) != tuple(own[k].shape))
    if missing or unexpected or shapes:
        raise CheckpointError(f"{source} does not fit {model_name(model)}: {count_keys('missing', missing)}, "
                              f"{count_keys('unexpected', unexpected)}, {count_keys('wrongly shaped', shapes)}; "
                              f"{hint}")
    bad = [k for k, v in sd.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:  # a diverged training run saves NaN weights: every prediction would be class 0, without a word
        more = f" (first of {len(bad)} such tensors)" if len(bad) > 1 else ""
        raise CheckpointError(f"{source} holds NaN or infinite values in {bad[0]}{more}; the training that wrote it "
                              f"diverged or the file is damaged: train it again or use another checkpoint.")
    model.load_state_dict(sd, strict=True)
    return model


def count_keys(kind, keys, first=3):
    """'missing 12 keys (first: a, b, c)', 'missing 1 key (a)', 'missing 0 keys': for a mismatch message."""
    if not keys:
        return f"{kind} 0 keys"
    shown = ", ".join(keys[:first])
    return f"{kind} {len(keys)} key{'s' if len(keys) > 1 else ''} ({'first: ' if len(keys) > first else ''}{shown})"


def model_name(model):
    """'CAVMAE(config='tiny', num_classes=10)': the model class with the settings that fix its keys."""
    settings = [f"config={model.config!r}"] + ([f"num_classes={model.num_classes}"] if hasattr(model, "num_classes") else [])
    return f"{type(model).__name__}({', '.join(settings)})"


def load_checkpoint(path, config=None, device="cpu"):
    """Load a model from our checkpoint format or a published CAV-MAE state dict.

    Our files carry their config and class count; a published `cav_mae_ks50.pth` is a bare state
    dict with `module.` keys: pass `config='base'`, the class count is read from mlp_head.1.
    Returns (model in eval mode on `device`, metadata dict).
    """
    obj = _read_checkpoint(path)
    if isinstance(obj, dict) and "state_dict" in obj and "config" in obj:
        meta = {k: v for k, v in obj.items() if k != "state_dict"}
        if config and config != obj["config"]:
            raise CheckpointError(f"{path} holds a {obj['config']!r} model but --config {config} was given; "
                                  f"drop --config (our checkpoints carry their own) or pass --config {obj['config']}.")
        if obj["config"] not in CONFIGS:
            raise CheckpointError(f"{path} names the model configuration {obj['config']!r}, which this code does not "
                                  f"know ({', '.join(CONFIGS)}); was it written by another version?")
        sd, cfg = obj["state_dict"], config or obj["config"]
        if not isinstance(sd, dict) or not all(torch.is_tensor(v) for v in sd.values()):
            raise CheckpointError(f"{path} has a 'state_dict' entry that is not a dict of tensors; "
                                  f"it was not written by train.py.")
    elif isinstance(obj, dict) and obj and all(torch.is_tensor(v) for v in obj.values()):
        meta, sd, cfg = {}, obj, config or "base"
    else:
        raise CheckpointError(f"{path} is not a CAV-MAE state dict nor a checkpoint written by train.py.")
    head = next((v for k, v in sd.items() if k.endswith("mlp_head.1.weight")), None)
    if head is None:
        raise CheckpointError(f"{path} has no mlp_head.1.weight, so it is not a fine-tuned CAV-MAE classifier.")
    model = CAVMAE(cfg, num_classes=head.shape[0])
    load_state_dict_strict(model, sd, source=path)
    meta.update(config=cfg, num_classes=head.shape[0])
    return model.to(device).eval(), meta


def _read_checkpoint(path):
    """torch.load a checkpoint file (weights only); anything else is a CheckpointError saying what the file is."""
    if os.path.isdir(path):
        raise CheckpointError(f"--checkpoint {path} is a folder, not a checkpoint file; pass the .pt/.pth file inside it.")
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint file {path} does not exist; train one with `python train.py` "
                              f"or pass the path of a downloaded CAV-MAE checkpoint with --checkpoint.")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # not a torch file, truncated download, pickled Python objects, ...
        raise CheckpointError(f"{path} {describe_unreadable(path, e)}") from None
    return obj


def describe_unreadable(path, error=None):
    """What a file that torch.load refused is, as the end of a sentence starting with its path."""
    with open(path, "rb") as f:
        head = f.read(4096)
    if not head:
        return "is empty (0 bytes), not a PyTorch checkpoint; the download or the save did not finish."
    if head.startswith(b"PK\x03\x04"):
        return ("is a zip archive (PyTorch's format) that torch cannot read: it is truncated or damaged; "
                "download or save it again.")
    if head[:1] == b"\x80" and error is not None and "weights_only" in str(error):
        return ("is a pickle of Python objects that torch refuses to load safely (weights_only); "
                "save the model's state_dict instead.")
    if head[:1] == b"\x80":
        return "is a pickle file but not a complete PyTorch checkpoint; it is truncated or damaged."
    try:
        text = head.decode("utf-8")
        if text.lstrip().startswith(("<!DOCTYPE", "<html", "<HTML")):
            return "is an HTML page (a failed download?), not a PyTorch checkpoint."
        return f"is a text file (starting {text[:40].strip()!r}), not a PyTorch checkpoint."
    except UnicodeDecodeError:
        return "is not a PyTorch checkpoint (neither a zip archive nor a pickle)."


# ----------------------------------------------------------------------------------------------
# Files written whole or not at all; caches that rebuild themselves; output paths checked up front
# ----------------------------------------------------------------------------------------------
def temp_name(path):
    """A temporary name beside `path`, unique to this process and call (two runs never share one)."""
    folder, name = os.path.split(os.path.abspath(path))
    return os.path.join(folder, f".{name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")


def atomic_write(path, write):
    """Call write(temp_path), then rename the temp file onto `path`: readers see the old file or the whole
    new one, never a part; the temp file is removed if writing fails or is interrupted (Ctrl-C)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = temp_name(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def atomic_save(obj, path):
    """torch.save(obj, path), whole or not at all (`atomic_write`)."""
    return atomic_write(path, lambda tmp: torch.save(obj, tmp))


def write_json(path, obj):
    """Write a JSON results file whole or not at all (`atomic_write`)."""
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=1)
    return atomic_write(path, write)


def load_or_rebuild(path, build, valid=lambda obj: True, note=print):
    """A cached object: torch.load(path) when the file is readable and valid(obj); otherwise (missing,
    truncated, foreign, from another version) obj = build(), saved with `atomic_save`, returned.
    A folder that cannot be written is reported with `note` and the object is used without caching."""
    if os.path.isfile(path):
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
            if valid(obj):
                return obj
        except Exception:
            pass
        note(f"[cache] {path} is unreadable or not what this version writes; rebuilding it")
    obj = build()
    try:
        atomic_save(obj, path)
    except OSError as err:
        note(f"[cache] could not write {path} ({err.strerror or err}); continuing without the cache")
    return obj


def check_output_file(path, flag):
    """Refuse, before any work, an output path that cannot be written: a folder, a path below a file, or a
    folder without write permission. Raises SystemExit with one sentence naming `flag`."""
    if os.path.isdir(path):
        raise SystemExit(f"error: {flag} {path} is a folder; give a file name, e.g. {os.path.join(path, 'out.json')}.")
    folder = os.path.dirname(os.path.abspath(path))
    existing = folder
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


def error_sentence(e):
    """The message of a user error as one line. An error raised in a DataLoader worker comes back with the
    worker's traceback in its text; keep only its last line (the original message)."""
    text = str(e)
    if "Original Traceback" in text:
        last = [line for line in text.strip().splitlines() if line.strip()][-1]
        text = last.split(": ", 1)[1] if ": " in last and last.split(": ", 1)[0].replace(".", "").isidentifier() else last
    return text


def interrupted_message(started, outputs):
    """One line after Ctrl-C: which of `outputs` ((what, path) pairs) were written during this run and which not.
    Every file is written whole or not at all, so nothing half-written is left."""
    saved = [f"{what} {p}" for what, p in outputs if p and os.path.isfile(p) and os.path.getmtime(p) >= started]
    missed = [f"{what} {p}" if p else what for what, p in outputs
              if not (p and os.path.isfile(p) and os.path.getmtime(p) >= started)]
    return (f"interrupted: saved {', '.join(saved) if saved else 'nothing'}; "
            f"not saved: {', '.join(missed) if missed else 'nothing'} (no file is left half-written).")
