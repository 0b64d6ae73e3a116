"""Tests of cmpt.py: Eq. 4 and Eq. 5 by hand, modality dropout, LoRA, freezing, and a tiny run of
`python train.py --method cmpt`."""
import copy
import json

import pytest
import torch

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
    assert cmpt.alignment_loss(cmpt_1[:2], cls_2[:2], cmpt_2[:2], cls_1[:2]).item() == pytest.approx(2.4375, abs=1e-12)


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
    a, v, ha, hv = cmpt.drop_modality(audio, video, has_a, has_v, 0.25, 0.25, u=0.3)  # 0.25 <= u < 0.5: drop video
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
    names = {"cls_a", "cls_v", "head.weight", "head.bias"} | ({"cmpt_a", "cmpt_v"} if proxy else set())
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


def test_one_train_step_changes_only_the_trainable_tensors_and_reset_restores():
    bb = tiny_backbone()
    model = cmpt.build(bb)
    model.modality_dropout = False  # deterministic: complete samples present, so L_align reaches the proxies
    params, names = cmpt.collect_params(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0)  # no decay: a change must come from a gradient
    learner = cmpt.CMPT(model, opt).train()
    batch = tiny_batch(bb)
    torch.manual_seed(0)
    logits = learner(batch)  # step 1 moves B (A's gradient is 0 while B = 0) ...
    learner(batch)  # ... step 2 moves A as well
    assert logits.shape == (8, 10)
    after = model.state_dict()
    trainable = set(names)
    for k, v in before.items():
        if k in trainable:
            assert not torch.equal(after[k], v), f"{k} did not change"
        else:
            assert torch.equal(after[k], v), f"frozen {k} changed"
    learner.reset()
    for k, v in before.items():
        assert torch.equal(model.state_dict()[k], v), f"reset() did not restore {k}"


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
        tok = model.tokens(batch["audio"], batch["video"])
        assert torch.allclose(model(full), model.head(tok["cls_a"] + tok["cls_v"]))
        T = model.head(cmpt.fuse(tok["cls_a"], tok["cls_v"], tok["cmpt_a"], tok["cmpt_v"],
                                 batch["has_audio"], batch["has_video"]))
        assert torch.allclose(model(batch), T)
        assert torch.allclose(model(batch)[-2], model.head(tok["cls_v"] + tok["cmpt_v"])[-2])  # audio missing
        assert torch.allclose(model(batch)[-1], model.head(tok["cls_a"] + tok["cmpt_a"])[-1])  # video missing


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
    audio = [n for n in names if n.startswith("backbone.blocks_a.") or n in ("cls_a", "cmpt_a")]
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
    assert not torch.equal(named["cmpt_v"], before["cmpt_v"])  # the video side trained
    # the prediction is Eq. 5's audio-missing branch, CLS_v + CMPT_v, as with the encoder run
    model.eval()
    with torch.no_grad():
        tok = model.tokens(no_audio["audio"], no_audio["video"])  # no has_*: every modality encoded
        assert torch.allclose(model(no_audio), model.head(tok["cls_v"] + tok["cmpt_v"]))
    assert calls == [1]


# ----------------------------------------------------------------------------------------------
# End to end: python train.py --method cmpt on a tiny configuration
# ----------------------------------------------------------------------------------------------
def test_train_py_method_cmpt_end_to_end(tmp_path):
    import train
    out = tmp_path / "train_cmpt.json"
    train.main(["--method", "cmpt", "--epochs", "1", "--seeds", "1", "--variants", "cmpt",
                "--protocols", "map", "--device", "cpu", "--results", str(out)])
    res = json.loads(out.read_text())
    rows = {(r["protocol"], r["setting"]): r["accuracy"] for r in res["results"]}
    assert set(rows) == {("map", "missing-audio 70%"), ("map", "missing-video 70%"), ("map", "missing-both 70%")}
    for accs in rows.values():
        assert set(accs) == {"cmpt"} and len(accs["cmpt"]) == 1
        # chance is 10%; one epoch from the source encoders already learns the task
        assert 30.0 < accs["cmpt"][0] <= 100.0
