"""Tests of cmpt.py: Eqs. 4-7 by hand, modality dropout, LoRA, freezing and stop-gradient, on both backbones
(tiny CAV-MAE; tiny float64 CLIPs of 2 layers of width 8 built here): the text proxy's mask, CLIP's own class
tokens, Eq. 5 per missing case, the empty text, the task loss, the recipes."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

import cmpt
import common

f64 = dict(dtype=torch.float64)


# ----------------------------------------------------------------------------------------------
# Eq. 4: alignment loss
# ----------------------------------------------------------------------------------------------
def test_alignment_loss_by_hand_over_complete_samples_only():
    # m1 = audio, m2 = video; D = 2; sample 2 lacks audio, sample 3 lacks video.
    cmpt_1 = torch.tensor([[1., 1.], [0., 0.], [5., 5.], [9., 9.]], **f64)
    cls_2 = torch.tensor([[1., 3.], [1., 1.], [-5., -5.], [0., 0.]], **f64)
    cmpt_2 = torch.tensor([[0., 0.], [1., 0.], [7., 7.], [0., 3.]], **f64)
    cls_1 = torch.tensor([[2., 0.], [2., 2.], [5., 5.], [9., 9.]], **f64)
    has_1 = torch.tensor([True, True, False, True])
    has_2 = torch.tensor([True, True, True, False])
    # sample 0: MSE(cmpt_1, cls_2) = (0^2 + 2^2) / 2 = 2;  MSE(cmpt_2, cls_1) = (2^2 + 0^2) / 2 = 2
    #           MSE(cmpt_1, cls_1) = (1^2 + 1^2) / 2 = 1                      ratio = (2 + 2) / 1 = 4
    # sample 1: MSE(cmpt_1, cls_2) = (1 + 1) / 2 = 1;  MSE(cmpt_2, cls_1) = (1^2 + 2^2) / 2 = 2.5
    #           MSE(cmpt_1, cls_1) = (4 + 4) / 2 = 4                        ratio = (1 + 2.5) / 4 = 0.875
    # samples 2 and 3 are incomplete (sample 3 would even have a zero denominator): left out.
    # L_align = (4 + 0.875) / 2 = 2.4375   (a ratio of means would give (2 + 1.75) / (0.5 + 2) = 1.5)
    loss = cmpt.alignment_loss(cmpt_1, cls_2, cmpt_2, cls_1, complete=has_1 & has_2)
    assert loss.dtype == torch.float64
    assert loss.item() == pytest.approx(2.4375, abs=1e-12)
    # without a mask every row counts; rows 0 and 1 alone give the same value
    loss = cmpt.alignment_loss(cmpt_1[:2], cls_2[:2], cmpt_2[:2], cls_1[:2]).item()
    assert loss == pytest.approx(2.4375, abs=1e-12)


def test_alignment_loss_zero_denominator_is_floored():
    cmpt_1 = torch.tensor([[1., 2.]], **f64)
    cls_1 = torch.tensor([[1., 2.]], **f64)  # MSE(cmpt_1, cls_1) = 0 -> floored to ALIGN_EPS = 1e-6
    cls_2 = torch.tensor([[1., 4.]], **f64)  # MSE(cmpt_1, cls_2) = (0 + 2^2) / 2 = 2
    cmpt_2 = torch.tensor([[1., 2.]], **f64)  # MSE(cmpt_2, cls_1) = 0
    loss = cmpt.alignment_loss(cmpt_1, cls_2, cmpt_2, cls_1)
    assert cmpt.ALIGN_EPS == 1e-6
    assert loss.item() == pytest.approx(2.0 / 1e-6, rel=1e-12)  # (2 + 0) / 1e-6 = 2e6
    # above the floor the value is exact: cls_1 shifted by 0.01 in both features gives
    # MSE(cmpt_1, cls_1) = (0.01^2 + 0.01^2) / 2 = 1e-4 = MSE(cmpt_2, cls_1), so
    # L_align = (2 + 1e-4) / 1e-4 = 20001
    shifted = cls_1 + 0.01
    assert cmpt.alignment_loss(cmpt_1, cls_2, cmpt_2, shifted).item() == pytest.approx(20001.0, rel=1e-9)


def test_alignment_loss_without_complete_samples_is_zero_and_differentiable():
    x = torch.randn(3, 4, **f64, requires_grad=True)
    loss = cmpt.alignment_loss(x, x + 1, x * 2, x - 1, complete=torch.zeros(3, dtype=torch.bool))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(x.grad, torch.zeros_like(x))


def test_alignment_loss_has_no_stop_gradient():
    # Eq. 4 prints no stop-gradient: the class tokens (targets) receive gradient too.
    cmpt_1, cls_2, cmpt_2, cls_1 = (torch.randn(2, 3, **f64, requires_grad=True) for _ in range(4))
    cmpt.alignment_loss(cmpt_1, cls_2, cmpt_2, cls_1).backward()
    for t in (cmpt_1, cls_2, cmpt_2, cls_1):
        assert t.grad.abs().sum() > 0


# ----------------------------------------------------------------------------------------------
# Eq. 5: gating and additive fusion; Eq. 7
# ----------------------------------------------------------------------------------------------
def test_fuse_by_hand():
    cls_1 = torch.tensor([[1., 2.], [3., 4.], [5., 6.], [7., 8.]], **f64)
    cls_2 = torch.tensor([[10., 20.], [30., 40.], [50., 60.], [70., 80.]], **f64)
    cmpt_1 = torch.tensor([[100., 200.], [300., 400.], [500., 600.], [700., 800.]], **f64)
    cmpt_2 = torch.tensor([[1000., 2000.], [3000., 4000.], [5000., 6000.], [7000., 8000.]], **f64)
    has_1 = torch.tensor([True, False, True, False])
    has_2 = torch.tensor([True, True, False, False])
    expected = torch.tensor([
        [11., 22.],  # both present: cls_1 + cls_2 = [1 + 10, 2 + 20]
        [3030., 4040.],  # m1 missing: cls_2 + cmpt_2 = [30 + 3000, 40 + 4000]
        [505., 606.],  # m2 missing: cls_1 + cmpt_1 = [5 + 500, 6 + 600]
        [0., 0.],  # both missing (not in the paper): 0
    ], **f64)
    T = cmpt.fuse(cls_1, cls_2, cmpt_1, cmpt_2, has_1, has_2)
    assert T.dtype == torch.float64
    assert torch.equal(T, expected)


def test_total_loss_by_hand():
    task, align = torch.tensor(1.5, **f64), torch.tensor(2.0, **f64)
    assert cmpt.LAMBDA == 0.2
    assert cmpt.total_loss(task, align, 0.2).item() == pytest.approx(1.9, abs=1e-12)  # 1.5 + 0.2 * 2
    # lambda = 0 gives the task loss itself, even when L_align is not finite
    assert cmpt.total_loss(task, torch.tensor(float("inf"), **f64), 0.0).item() == 1.5


def test_drop_modality_touches_complete_samples_only():
    has_a = torch.tensor([True, True, False])  # sample 0 complete, 1 lacks video, 2 lacks audio
    has_v = torch.tensor([True, False, True])
    audio = torch.ones(3, 2, 2, **f64) * has_a[:, None, None]  # missing inputs are already zeros
    video = torch.ones(3, 3, 2, 2, **f64) * has_v[:, None, None, None]
    a, v, ha, hv = cmpt.drop_modality(audio, video, has_a, has_v, 0.25, 0.25, u=0.1)  # u < 0.25: drop audio
    assert ha.tolist() == [False, True, False] and hv.tolist() == [True, False, True]
    assert a[0].abs().sum() == 0 and torch.equal(a[1], audio[1]) and torch.equal(v, video)
    # 0.25 <= u < 0.5: drop video
    a, v, ha, hv = cmpt.drop_modality(audio, video, has_a, has_v, 0.25, 0.25, u=0.3)
    assert ha.tolist() == [True, True, False] and hv.tolist() == [False, False, True]
    assert v[0].abs().sum() == 0 and torch.equal(v[2], video[2]) and torch.equal(a, audio)
    a, v, ha, hv = cmpt.drop_modality(audio, video, has_a, has_v, 0.25, 0.25, u=0.7)  # keep both
    assert ha is has_a and hv is has_v and a is audio and v is video


# ----------------------------------------------------------------------------------------------
# LoRA (Eq. 3)
# ----------------------------------------------------------------------------------------------
def test_lora_with_zero_B_equals_the_frozen_linear():
    torch.manual_seed(0)
    base = torch.nn.Linear(8, 24)
    lora = cmpt.LoRALinear(copy.deepcopy(base), splits=3).train()  # dropout active
    x = torch.randn(5, 7, 8)
    assert torch.equal(lora.lora_B, torch.zeros_like(lora.lora_B))
    assert torch.equal(lora(x), base(x))


def test_lora_splits_are_separate_q_k_v_updates_by_hand():
    base = torch.nn.Linear(2, 3).double()
    torch.nn.init.zeros_(base.weight)
    torch.nn.init.zeros_(base.bias)
    lora = cmpt.LoRALinear(base, rank=1, alpha=1.0, dropout=0.1, splits=3).eval()
    with torch.no_grad():
        lora.lora_A.copy_(torch.tensor([[[1., 0.]], [[0., 1.]], [[1., 1.]]], **f64))  # A_q, A_k, A_v (1, 2)
        lora.lora_B.copy_(torch.tensor([[[2.]], [[3.]], [[4.]]], **f64))  # B_q, B_k, B_v (1, 1)
    x = torch.tensor([[1., 2.]], **f64)
    # q: 2 * (1*1 + 0*2) = 2;  k: 3 * (0*1 + 1*2) = 6;  v: 4 * (1*1 + 1*2) = 12;  alpha / r = 1
    assert torch.equal(lora(x), torch.tensor([[2., 6., 12.]], **f64))


# ----------------------------------------------------------------------------------------------
# Model surgery and freezing
# ----------------------------------------------------------------------------------------------
def tiny_backbone(seed=0):
    torch.manual_seed(seed)
    bb = common.CAVMAE("tiny", num_classes=10).eval()
    for p in bb.parameters():
        p.requires_grad_(False)
    return bb


def tiny_batch(bb, B=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"audio": torch.randn(B, bb.audio_length, bb.mel_bins, generator=g),
            "video": torch.randn(B, 3, bb.image_size, bb.image_size, generator=g),
            "label": torch.arange(B) % 10,
            "has_audio": torch.tensor([True] * (B - 2) + [False, True]),
            "has_video": torch.tensor([True] * (B - 2) + [True, False])}


def expected_trainable(bb, proxy=True):
    names = {"cls.audio", "cls.video", "head.weight", "head.bias"}
    names |= {"cmpt.audio", "cmpt.video"} if proxy else set()
    for enc in ("blocks_a", "blocks_v"):
        for i in range(len(getattr(bb, enc))):
            for lin in ("qkv", "proj"):
                names |= {f"backbone.{enc}.{i}.attn.{lin}.lora_A", f"backbone.{enc}.{i}.attn.{lin}.lora_B"}
    return names


@pytest.mark.parametrize("kw", [{}, {"proxy": False}])
def test_exactly_lora_tokens_and_head_require_grad(kw):
    bb = tiny_backbone()
    model = cmpt.build(bb, **kw)
    params, names = cmpt.collect_params(model)
    assert set(names) == expected_trainable(bb, kw.get("proxy", True))
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(names)
    assert len(params) == len(names)


def test_surgery_keeps_the_frozen_encoder_function():
    # With B = 0 every LoRA'd block computes what the frozen block computed (eval: no dropout).
    bb = tiny_backbone()
    ref = copy.deepcopy(bb)
    model = cmpt.build(bb).eval()
    x = torch.randn(2, 5, bb.embed_dim)
    for enc in ("blocks_a", "blocks_v"):
        assert torch.equal(model.backbone.run_blocks(getattr(model.backbone, enc), x),
                           ref.run_blocks(getattr(ref, enc), x))


def test_one_train_step_changes_only_the_trainable_tensors():
    bb = tiny_backbone()
    model = cmpt.build(bb)
    model.modality_dropout = False  # deterministic: complete samples present, so L_align reaches the proxies
    params, names = cmpt.collect_params(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0)  # no decay: a change must come from a gradient
    batch = tiny_batch(bb)
    torch.manual_seed(0)
    cmpt.train_step(model, batch, opt)  # step 1 moves B (A's gradient is 0 while B = 0) ...
    cmpt.train_step(model, batch, opt)  # ... step 2 moves A as well
    after = model.state_dict()
    trainable = set(names)
    for k, v in before.items():
        if k in trainable:
            assert not torch.equal(after[k], v), f"{k} did not change"
        else:
            assert torch.equal(after[k], v), f"frozen {k} changed"


def test_train_step_losses_and_forward_defaults():
    bb = tiny_backbone()
    model = cmpt.build(bb)
    params, _ = cmpt.collect_params(model)
    opt = torch.optim.AdamW(params, lr=1e-3)
    batch = tiny_batch(bb)
    model.modality_dropout = False
    _, losses = cmpt.train_step(model, batch, opt)
    assert set(losses) == {"task", "align", "total"}
    assert losses["total"] == pytest.approx(losses["task"] + 0.2 * losses["align"], rel=1e-5)  # Eq. 7
    # Eq. 5 in forward: a batch without has_* fields is complete; has_* flags switch to the proxies
    model.eval()
    with torch.no_grad():
        full = {k: batch[k] for k in ("audio", "video", "label")}
        x, has = model.inputs(full)
        assert has["audio"].all() and has["video"].all()
        (cls_a, cmpt_a), (cls_v, cmpt_v) = model.tokens(x, has).values()
        assert torch.allclose(model(full), model.head(cls_a + cls_v))
        T = model.head(cmpt.fuse(cls_a, cls_v, cmpt_a, cmpt_v, batch["has_audio"], batch["has_video"]))
        assert torch.allclose(model(batch), T)
        assert torch.allclose(model(batch)[-2], model.head(cls_v + cmpt_v)[-2])  # audio missing
        assert torch.allclose(model(batch)[-1], model.head(cls_a + cmpt_a)[-1])  # video missing


def test_a_modality_dropped_for_the_whole_batch_is_not_encoded_nor_updated():
    bb = tiny_backbone()
    model = cmpt.build(bb)
    model.modality_dropout = False
    params, names = cmpt.collect_params(model)
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.02)
    batch = tiny_batch(bb)
    torch.manual_seed(0)
    cmpt.train_step(model, batch, opt)  # a complete step first: every parameter has Adam state
    cmpt.train_step(model, batch, opt)
    audio = [n for n in names if n.startswith("backbone.blocks_a.") or n in ("cls.audio", "cmpt.audio")]
    named = dict(model.named_parameters())
    before = {n: named[n].detach().clone() for n in names}
    state = {n: {k: v.clone() for k, v in opt.state[named[n]].items()} for n in audio}
    calls = []
    model.backbone.blocks_a[0].register_forward_pre_hook(lambda *a: calls.append(1))
    no_audio = dict(batch, audio=torch.zeros_like(batch["audio"]), has_audio=torch.zeros(8, dtype=torch.bool),
                    has_video=torch.ones(8, dtype=torch.bool))
    logits, _ = cmpt.train_step(model, no_audio, opt)
    assert calls == []  # the audio encoder did not run
    for n in audio:  # parameters and their AdamW moments and step count bit-identical (weight decay too)
        assert torch.equal(named[n], before[n]), n
        assert all(torch.equal(v, state[n][k]) for k, v in opt.state[named[n]].items()), n
    assert not torch.equal(named["cmpt.video"], before["cmpt.video"])  # the video side trained
    # the prediction is Eq. 5's audio-missing branch, CLS_v + CMPT_v, as with the encoder run
    model.eval()
    with torch.no_grad():
        x, has = model.inputs({k: no_audio[k] for k in ("audio", "video")})  # no has_*: both encoded
        cls_v, cmpt_v = model.tokens(x, has)["video"]
        assert torch.allclose(model(no_audio), model.head(cls_v + cmpt_v))
    assert calls == [1]


# ==============================================================================================
# The image-text setting (CLIP)
# ==============================================================================================
from conftest import D, E, EOT, INF, SOT, TEXT, TEXT_EOT, VOCAB, images, small_config  # noqa: F401


def randomize_lora(model, seed=3, std=0.3):
    """Non-zero LoRA factors B (and fresh A) in every adapted block, so that the adapters change something."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(std * torch.randn(p.shape, generator=g, **f64))


# ----------------------------------------------------------------------------------------------
# 1. LoRA on CLIP's fused q, k, v (`qkv_adapter`) and its out_proj
# ----------------------------------------------------------------------------------------------
def test_add_lora_on_clip_blocks_adds_q_k_v_updates_in_their_own_third_by_hand(make_clip):
    clip = make_clip()
    cmpt.add_lora(clip.visual.transformer.resblocks)
    clip.visual.transformer.resblocks.eval()  # LoRA dropout off
    for blk in clip.visual.transformer.resblocks:
        assert type(blk.attn.qkv_adapter) is cmpt.LoRA and blk.attn.qkv_adapter.splits == 3
        assert isinstance(blk.attn.out_proj, cmpt.LoRALinear)
    assert all(blk.attn.qkv_adapter is None for blk in clip.transformer.resblocks)  # the text tower untouched
    attn = clip.visual.transformer.resblocks[0].attn
    ad = attn.qkv_adapter
    # alpha / r = 1 / 1
    assert ad.lora_A.shape == (3, 1, D) and ad.lora_B.shape == (3, D, 1) and ad.scaling == 1.0
    x = torch.randn(1, 2, D, generator=torch.Generator().manual_seed(0), **f64)
    x[0, 0, :3] = torch.tensor([1.0, 2.0, 3.0])
    x[0, 1, :3] = torch.tensor([-1.0, -4.0, 4.0])
    e = torch.eye(D, **f64)
    base = F.linear(x, attn.in_proj_weight, attn.in_proj_bias)  # (1, 2, 3 D) rows [q | k | v]
    with torch.no_grad():
        ad.lora_A.copy_(torch.stack([e[0:1], e[1:2], e[2:3]]))  # A_q reads x_0, A_k x_1, A_v x_2
        ad.lora_B.zero_()
        ad.lora_B[1] = 0.5  # only B_k = 0.5 (all 8 rows)
        out = attn.project_qkv(x)
    delta = torch.zeros(1, 2, 3 * D, **f64)
    delta[0, 0, D:2 * D] = 1.0  # token 0: k += B_k A_k x = 0.5 * x_1 = 0.5 * 2 = 1
    delta[0, 1, D:2 * D] = -2.0  # token 1: 0.5 * (-4) = -2
    assert torch.equal(out, base + delta)
    # q, v unchanged
    assert torch.equal(out[..., :D], base[..., :D]) and torch.equal(out[..., 2 * D:], base[..., 2 * D:])
    with torch.no_grad():
        ad.lora_B.zero_()
        ad.lora_B[0] = 1.0  # B_q = 1
        ad.lora_B[2, :, 0] = torch.arange(1, D + 1, **f64) / 4  # B_v = [0.25, 0.5, ..., 2]
        out = attn.project_qkv(x)
    delta = torch.zeros(1, 2, 3 * D, **f64)
    delta[0, 0, :D] = 1.0  # q, token 0: 1 * x_0 = 1
    delta[0, 1, :D] = -1.0  # q, token 1: 1 * (-1) = -1
    # v, token 0: x_2 B_v = 3 B_v
    delta[0, 0, 2 * D:] = torch.tensor([0.75, 1.5, 2.25, 3.0, 3.75, 4.5, 5.25, 6.0])
    delta[0, 1, 2 * D:] = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0])  # v, token 1: 4 B_v
    assert torch.equal(out, base + delta)
    # the attention itself uses the adapted projection: it equals a plain attention with merged weights
    # W_qkv + [B_q A_q; B_k A_k; B_v A_v] and W_out + B_o A_o
    with torch.no_grad():
        attn.out_proj.lora_A.normal_()
        attn.out_proj.lora_B.normal_()
        plain = common.FusedQKVAttention(D, 2).double()
        merged = torch.cat([ad.lora_B[s] @ ad.lora_A[s] for s in range(3)])
        plain.in_proj_weight.copy_(attn.in_proj_weight + merged)
        plain.in_proj_bias.copy_(attn.in_proj_bias)
        out = attn.out_proj
        plain.out_proj.weight.copy_(out.base.weight + out.lora_B[0] @ out.lora_A[0])
        plain.out_proj.bias.copy_(attn.out_proj.base.bias)
        torch.testing.assert_close(attn(x), plain(x), rtol=0, atol=1e-12)
        unadapted = common.FusedQKVAttention(D, 2).double()
        unadapted.in_proj_weight.copy_(attn.in_proj_weight)
        unadapted.in_proj_bias.copy_(attn.in_proj_bias)
        unadapted.out_proj.load_state_dict(attn.out_proj.base.state_dict())
        assert not torch.allclose(attn(x), unadapted(x))  # the updates do reach the output


def test_lora_at_init_leaves_clip_bit_identical_and_adapter_keys_only_when_set(make_clip):
    clip = make_clip()
    ref = copy.deepcopy(clip)
    before = set(ref.state_dict())
    assert not any("qkv_adapter" in k for k in before)  # FusedQKVAttention without an adapter: no key
    cmpt.add_lora(clip.visual.transformer.resblocks)
    cmpt.add_lora(clip.transformer.resblocks)
    clip.train()  # LoRA dropout active: with B = 0 the update is still exactly 0
    img = images(3)
    with torch.no_grad():
        assert torch.equal(clip.encode_image(img), ref.encode_image(img))
        assert torch.equal(clip.encode_text(TEXT), ref.encode_text(TEXT))
    # keys: out_proj.* moves under out_proj.base.*, and each block gets 4 LoRA factors
    expected = {k.replace("attn.out_proj.", "attn.out_proj.base.") for k in before}
    for tower in ("visual.transformer", "transformer"):
        for l in range(2):
            expected |= {f"{tower}.resblocks.{l}.attn.{mod}.lora_{f}" for mod in ("qkv_adapter", "out_proj")
                         for f in "AB"}
    assert set(clip.state_dict()) == expected  # 2 towers x 2 blocks x 4 = 16 new keys
    assert len(expected) == len(before) + 16


# ----------------------------------------------------------------------------------------------
# 2. The text proxy's attention mask
# ----------------------------------------------------------------------------------------------
def test_proxy_text_mask_by_hand():
    m = cmpt.proxy_text_mask(torch.tensor([1, 2]), 3)  # sequences [CMPT, t_0, t_1, t_2]
    assert m.shape == (2, 1, 4, 4)
    text_rows = [[INF, 0, INF, INF],  # t_0 sees t_0 only (not the proxy, column 0)
                 [INF, 0, 0, INF],  # t_1 sees t_0, t_1
                 [INF, 0, 0, 0]]  # t_2 sees t_0 .. t_2
    assert m[0, 0].tolist() == [[0, 0, 0, INF]] + text_rows  # eot 1: the proxy sees columns 0 .. eot + 1 = 2
    assert m[1, 0].tolist() == [[0, 0, 0, 0]] + text_rows  # eot 2: columns 0 .. 3, everything


# ----------------------------------------------------------------------------------------------
# 3. CMPT on CLIP: at LoRA = 0 CLIP's own tokens are CLS_1 and CLS_2
# ----------------------------------------------------------------------------------------------
def test_cmpt_clip_class_tokens_are_clips_embeddings_at_lora_init(make_clip):
    img = images(3)
    ref = make_clip()
    with torch.no_grad():
        want_i, want_t = ref.encode_image(img), ref.encode_text(TEXT)
    # image: without the proxy the image tower is CLIP's (the proxy, a full participant, would change CLS_1)
    model = cmpt.build(make_clip(), num_classes=3, proxy=False).eval()
    with torch.no_grad():
        cls_1, cmpt_1 = model.encode("image", img)
    assert cmpt_1 is None and torch.equal(cls_1, want_i)
    model = cmpt.build(make_clip(), num_classes=3).eval()  # proxy=True
    with torch.no_grad():
        cls_1, cmpt_1 = model.encode("image", img)
        cls_2, cmpt_2 = model.encode("text", TEXT)
    assert not torch.allclose(cls_1, want_i)  # the image proxy is seen by the class token
    # text: the tokens never see the proxy, so the end-of-text token is CLIP's text embedding
    torch.testing.assert_close(cls_2, want_t, rtol=0, atol=1e-12)
    # the proxy's output reads its own text up to the end-of-text token: alone or in the batch, the same
    with torch.no_grad():
        for i in range(3):
            alone = TEXT[i:i + 1, : int(TEXT_EOT[i]) + 1]
            torch.testing.assert_close(model.encode("text", alone)[1], cmpt_2[i:i + 1], rtol=0, atol=1e-12)
        other = TEXT.clone()
        other[0, 1] = 6  # a token inside sample 0's text
        assert not torch.allclose(model.encode("text", other)[1][0], cmpt_2[0])  # the proxy sees it


# ----------------------------------------------------------------------------------------------
# 4. CMPT on CLIP: has_<modality> and Eq. 5 per sample
# ----------------------------------------------------------------------------------------------
def test_cmpt_clip_inputs_and_fusion_per_missing_case(make_clip):
    model = cmpt.build(make_clip(), num_classes=3).eval()
    randomize_lora(model)  # LoRA active: the check is not only CLIP's frozen towers
    img = images(3)
    batch = {"image": img, "text": TEXT, "has_image": torch.tensor([True, True, False]),
             "has_text": torch.tensor([True, False, True]), "label": torch.tensor([0, 1, 2])}
    x, has = model.inputs(batch)
    assert x["image"] is img and x["text"] is TEXT and has["image"] is batch["has_image"]
    _, has = model.inputs({"image": img, "text": TEXT})  # no has_<modality>: all complete
    assert has["image"].tolist() == has["text"].tolist() == [True, True, True]
    with torch.no_grad():
        logits = model(batch)
        cls_1, cmpt_1 = model.encode("image", img)
        cls_2, cmpt_2 = model.encode("text", TEXT)
        want = torch.stack([model.head(cls_1[0] + cls_2[0]),  # code 0: CLS_1 + CLS_2
                            model.head(cls_1[1] + cmpt_1[1]),  # text missing: CLS_1 + CMPT_1
                            model.head(cls_2[2] + cmpt_2[2])])  # image missing: CLS_2 + CMPT_2
        torch.testing.assert_close(logits, want, rtol=0, atol=1e-12)
        # what is missing is never read: another image for sample 2 changes nothing of its logits
        other = dict(batch, image=torch.cat([img[:2], images(1, seed=9)]))
        torch.testing.assert_close(model(other)[2], logits[2], rtol=0, atol=1e-12)
        # image missing from the whole batch: the image tower does not run, logits = head(CLS_2 + CMPT_2)
        calls = []
        hook = model.backbone.tower("image")[0].register_forward_pre_hook(lambda *a: calls.append(1))
        no = torch.zeros(3, dtype=torch.bool)
        only_text = model(dict(batch, has_image=no, has_text=~no))
        hook.remove()
    assert calls == []
    torch.testing.assert_close(only_text, model.head(cls_2 + cmpt_2), rtol=0, atol=1e-12)


# ----------------------------------------------------------------------------------------------
# 5. The empty text and modality dropout on CLIP
# ----------------------------------------------------------------------------------------------
def test_blanks_and_drop_modality_put_the_empty_text_in_dropped_complete_samples_only(make_clip):
    model = cmpt.build(make_clip(), num_classes=3)
    empty = [SOT, EOT, 0, 0, 0, 0]  # [start 10 - 2, end 10 - 1, padding]
    # 4 samples: complete, no text, no image, complete; as data.with_missing gives them, sample 1 already
    # holds the empty text and sample 2 a zero image (cmpt.IMAGE_PLACEHOLDER "zeros")
    text = torch.stack([TEXT[0], torch.tensor(empty), TEXT[2], TEXT[1]])
    img = images(4)
    img[2] = 0.0
    batch = {"image": img, "text": text, "has_image": torch.tensor([True, True, False, True]),
             "has_text": torch.tensor([True, False, True, True])}
    x, has = model.inputs(batch)
    x_1, x_2, has_1, has_2 = x["image"], x["text"], has["image"], has["text"]
    blank_1, blank_2 = cmpt.blank(model.backbone, "image", x_1), cmpt.blank(model.backbone, "text", x_2)
    assert blank_1 is None  # a dropped image is zeros
    assert blank_2.tolist() == empty and blank_2.dtype == text.dtype
    assert blank_2.argmax().item() == 1  # its end-of-text token (the largest id) is at position 1
    # 0.25 <= u = 0.3 < 0.5: drop the text of the complete samples 0 and 3; sample 2 (no image) keeps its text
    i, t, h1, h2 = cmpt.drop_modality(x_1, x_2, has_1, has_2, u=0.3, blank_1=blank_1, blank_2=blank_2)
    assert t.tolist() == [empty, empty, TEXT[2].tolist(), empty]
    assert h1.tolist() == [True, True, False, True] and h2.tolist() == [False, False, True, False]
    assert torch.equal(i, img)
    # u = 0.1 < 0.25: drop the image of the complete samples 0 and 3 (zeros); sample 1 (no text) keeps it
    i, t, h1, h2 = cmpt.drop_modality(x_1, x_2, has_1, has_2, u=0.1, blank_1=blank_1, blank_2=blank_2)
    assert torch.equal(t, text)
    assert h1.tolist() == [False, True, False, False] and h2.tolist() == [True, False, True, True]
    assert torch.equal(i[[0, 2, 3]], torch.zeros(3, 3, 8, 8, **f64)) and torch.equal(i[1], img[1])
    # u = 0.7: both kept, nothing replaced
    i, t, h1, h2 = cmpt.drop_modality(x_1, x_2, has_1, has_2, u=0.7, blank_1=blank_1, blank_2=blank_2)
    assert t is x_2 and i is x_1 and h1 is has_1 and h2 is has_2


# ----------------------------------------------------------------------------------------------
# 6. The task loss
# ----------------------------------------------------------------------------------------------
def test_task_loss_bce_for_float_targets_and_ce_for_class_indices():
    zeros = torch.zeros(2, 3, **f64)
    # every logit 0: sigmoid 1/2, -log(1/2) = ln 2 = 0.693147 for a target 1 and for a target 0
    assert cmpt.task_loss(zeros, torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0]], **f64)).item() == \
        pytest.approx(math.log(2), abs=1e-12)
    logits = torch.tensor([[math.log(3), 0.0]], **f64)
    # multi-label: target 1 on ln 3: -log(sigmoid(ln 3)) = -log(3/4) = ln(4/3); target 0 on 0: ln 2
    # mean = (ln(4/3) + ln 2) / 2 = (0.287682 + 0.693147) / 2 = 0.490415
    assert cmpt.task_loss(logits, torch.tensor([[1.0, 0.0]], **f64)).item() == \
        pytest.approx((math.log(4 / 3) + math.log(2)) / 2, abs=1e-12)
    # class index 0: softmax([ln 3, 0]) = [3/4, 1/4], -log(3/4) = ln(4/3) = 0.287682
    assert cmpt.task_loss(logits, torch.tensor([0])).item() == pytest.approx(math.log(4 / 3), abs=1e-12)
    # -log(1/4)
    assert cmpt.task_loss(logits, torch.tensor([1])).item() == pytest.approx(math.log(4), abs=1e-12)


# ----------------------------------------------------------------------------------------------
# 7. Recipes (the fixed key set of train.py's contract) and the variants
# ----------------------------------------------------------------------------------------------
def test_recipes_have_the_contract_keys_and_the_papers_values():
    keys = {"epochs", "batch_size", "lr", "weight_decay", "eps", "betas", "schedule", "warmup",
            "warmup_factor", "power", "grad_clip", "select"}
    assert all(set(r) == keys for r in cmpt.RECIPES.values())
    # Table 6: AdamW eps 1e-8, wd 0.02, lr 1e-3, 10 epochs, batch 8, poly 0.9 after 5 warm-up epochs, 0.1 lr
    assert cmpt.RECIPES["paper"] == dict(epochs=10, batch_size=8, lr=1e-3, weight_decay=0.02, eps=1e-8,
                                         betas=(0.9, 0.999), schedule="poly", warmup=0.5, warmup_factor=0.1,
                                         power=0.9, grad_clip=None, select="best_val")
    # the embedded budgets as before the redesign (image-text: 2 x 32 at 1e-2; audio-video: 4 x 64, one-cycle)
    assert (cmpt.RECIPES["embedded"]["epochs"], cmpt.RECIPES["embedded"]["batch_size"]) == (2, 32)
    assert (cmpt.RECIPES["audio-video"]["epochs"], cmpt.RECIPES["audio-video"]["batch_size"]) == (4, 64)
    defaults = cmpt.DEFAULT_VARIANTS
    assert set(defaults["image-text"]) | set(defaults["audio-video"]) == set(cmpt.VARIANTS)
