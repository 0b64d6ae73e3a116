"""Tests of brimpr.py: Eqs. 4, 6, 7, 8-10 by hand, masking, prompts and freezing, stop-gradient,
the source statistics, the continual-shift variant, the cost per batch, and `python adapt.py --method
brimpr` (slow: the trained default model)."""
import json
import math
from types import SimpleNamespace

import pytest
import torch

import brimpr
import common

f64 = dict(dtype=torch.float64)


# ----------------------------------------------------------------------------------------------
# PMGFA, Eq. 4
# ----------------------------------------------------------------------------------------------
def test_stat_distance_by_hand():
    mean_s = torch.tensor([[0., 0.], [1., 2.]], **f64)  # (L = 2, D = 2)
    std_s = torch.tensor([[1., 1.], [0.5, 0.5]], **f64)
    mean_t = torch.tensor([[3., 4.], [1., 2.]], **f64)
    std_t = torch.tensor([[1., 2.], [0.5, 0.5]], **f64)
    d = brimpr.stat_distance(mean_s, std_s, mean_t, std_t)
    # layer 0: ||(3, 4)||_2 + ||(0, 1)||_2 = 5 + 1 = 6  (squared norms would give 25 + 1 = 26)
    # layer 1: identical statistics -> 0 + 0 = 0
    assert d.dtype == torch.float64 and d.shape == (2,)
    assert d.tolist() == pytest.approx([6.0, 0.0], abs=1e-12)
    # a 3-4-5 triangle in the std alone, means equal: ||(-3, -4)||_2 = 5
    assert brimpr.stat_distance(mean_s[0], std_s[0] + torch.tensor([3., 4.], **f64),
                                mean_s[0], std_s[0]).item() == pytest.approx(5.0, abs=1e-12)


def test_identical_statistics_give_zero_distance_and_finite_gradient():
    mean = torch.randn(3, 4, **f64, requires_grad=True)
    std = torch.rand(3, 4, **f64)
    d = brimpr.stat_distance(mean.detach(), std, mean, std)
    assert torch.equal(d, torch.zeros(3, **f64))
    d.sum().backward()
    assert torch.isfinite(mean.grad).all()


def test_discrepancy_unbiased_std_averaged_over_layers_and_pmgfa_sum():
    # z: B = 2 samples, L = 2 layers, D = 2
    z = torch.tensor([[[0., 0.], [3., 4.]],
                      [[2., 2.], [3., 4.]]], **f64)
    # layer 0: mean (1, 1); unbiased std of {0, 2} = sqrt((1 + 1) / (2 - 1)) = sqrt(2) in each dim
    # layer 1: mean (3, 4); std (0, 0)
    mean, std = brimpr.batch_statistics(z)
    assert mean.tolist() == [[1., 1.], [3., 4.]]
    assert std.flatten().tolist() == pytest.approx([math.sqrt(2), math.sqrt(2), 0., 0.], abs=1e-12)
    src = {"mean": torch.tensor([[1., 1.], [0., 0.]], **f64),
           "std": torch.tensor([[math.sqrt(2), math.sqrt(2)], [0., 0.]], **f64)}
    # layer 0 matches the source: 0;  layer 1: ||(3, 4)|| + 0 = 5;  Disc = (0 + 5) / 2 = 2.5
    disc = brimpr.discrepancy(src, z)
    assert disc.item() == pytest.approx(2.5, abs=1e-12)
    # Eq. 4 sums over modalities: 2.5 + 1.5 = 4
    assert brimpr.pmgfa_loss(disc, torch.tensor(1.5, **f64)).item() == pytest.approx(4.0, abs=1e-12)


# ----------------------------------------------------------------------------------------------
# CMER, Eqs. 5-7
# ----------------------------------------------------------------------------------------------
def test_adaptive_temperature_by_hand():
    assert brimpr.TAU0 == 0.2 and brimpr.D0 == 5.0
    # at Disc_J = D0: 1 + 0.2 / (1 + e^0) = 1 + 0.2 / 2 = 1.1
    assert brimpr.adaptive_temperature(5.0) == pytest.approx(1.1, abs=1e-15)
    # at Disc_J = 0: 1 + 0.2 / (1 + e^5) = 1 + 0.2 / 149.4131591 = 1.0013385702
    assert brimpr.adaptive_temperature(0.0) == pytest.approx(1.0013385702, abs=1e-10)
    # very large shift: 1 + tau0 = 1.2
    assert brimpr.adaptive_temperature(1e4) == pytest.approx(1.2, abs=1e-15)
    # other tau0, D0: 1 + 0.5 / (1 + e^(2 - 2)) = 1.25
    assert brimpr.adaptive_temperature(2.0, tau0=0.5, d0=2.0) == pytest.approx(1.25, abs=1e-15)


def test_modality_weights_by_hand():
    # Disc_a = 1, Disc_v = 3: lambda_a = 1 - 1/4 = 0.75, lambda_v = 1 - 3/4 = 0.25
    la, lv = brimpr.modality_weights(1.0, 3.0)
    assert (la, lv) == pytest.approx((0.75, 0.25), abs=1e-15)
    assert brimpr.modality_weights(0.0, 0.0) == (0.5, 0.5)  # 0 / 0 guard


def test_soft_cross_entropy_by_hand_teacher_softened_only():
    # softmax (3/4, 1/4), (1/4, 3/4)
    student = torch.tensor([[math.log(3.0), 0.0], [0.0, math.log(3.0)]], **f64)
    teacher = torch.tensor([[2 * math.log(3.0), 0.0], [0.0, 0.0]], **f64)
    # T = 2: teacher row 0 -> softmax(ln 3, 0) = (3/4, 1/4); row 1 uniform (1/2, 1/2)
    # row 0: -(3/4 ln 3/4 + 1/4 ln 1/4) = 0.2157616 + 0.3465736 = 0.5623351
    # row 1: -(1/2 ln 1/4 + 1/2 ln 3/4) = 0.6931472 + 0.1438410 = 0.8369882
    ce = brimpr.soft_cross_entropy(student, teacher, 2.0)
    assert ce.shape == (2,)
    assert ce.tolist() == pytest.approx([0.5623351446, 0.8369882168], abs=1e-9)
    # T = 1: teacher row 0 -> (9/10, 1/10): -(0.9 ln 0.75 + 0.1 ln 0.25) = 0.2589139 + 0.1386294 = 0.3975433
    assert brimpr.soft_cross_entropy(student, teacher, 1.0)[0].item() == pytest.approx(0.3975433, abs=1e-7)


def test_soft_cross_entropy_stops_the_gradient_to_the_teacher():
    student = torch.randn(4, 5, **f64, requires_grad=True)
    teacher = torch.randn(4, 5, **f64, requires_grad=True)
    brimpr.soft_cross_entropy(student, teacher, 1.1).sum().backward()
    assert teacher.grad is None
    assert student.grad.abs().sum() > 0


def test_cmer_loss_by_hand():
    uniform = torch.zeros(1, 4, **f64)  # log softmax = ln 1/4 everywhere
    teacher = torch.tensor([[5., 1., 0., -2.]], **f64)
    # CE(anything, uniform student) = -sum_k p_k ln(1/4) = ln 4 for both terms
    # lambda_a = 0.3, lambda_v = 0.7: 0.3 ln 4 + 0.7 ln 4 = ln 4 = 1.3862944
    assert (brimpr.cmer_loss(uniform, uniform, teacher, 1.1, 0.3, 0.7).item()
            == pytest.approx(math.log(4), abs=1e-12))
    sharp = torch.tensor([[math.log(3.0), 0.0]], **f64)  # (3/4, 1/4)
    flat = torch.zeros(1, 2, **f64)
    target = torch.tensor([[1000.0, 0.0]], **f64)  # one-hot on class 0
    # a_m v term: -ln 3/4 = 0.2876821 (weight 0.25); a v_m term: -ln 1/2 = 0.6931472 (weight 0.75)
    # 0.25 * 0.2876821 + 0.75 * 0.6931472 = 0.0719205 + 0.5198604 = 0.5917809
    assert brimpr.cmer_loss(sharp, flat, target, 1.0, 0.25, 0.75).item() == pytest.approx(0.5917809, abs=1e-7)


def test_mask_tokens_keeps_int_half_distinct_tokens_per_sample():
    B, N, D = 16, 7, 3
    x = torch.arange(N, **f64)[None, :, None].expand(B, N, D).clone()  # token j carries the value j
    g = torch.Generator().manual_seed(0)
    kept = brimpr.mask_tokens(x, 0.5, generator=g)
    assert kept.shape == (B, 3, D)  # int(7 * 0.5) = 3
    ids = kept[:, :, 0].long()  # (B, 3)
    for row in ids.tolist():
        assert len(set(row)) == 3 and set(row) <= set(range(N))  # distinct real tokens
    assert torch.equal(kept, kept[:, :, :1].expand(B, 3, D))  # whole tokens, not mixed features
    assert len({tuple(r) for r in ids.tolist()}) > 1  # each sample its own subset
    assert brimpr.mask_tokens(torch.zeros(2, 16, 4), 0.5).shape == (2, 8, 4)


# ----------------------------------------------------------------------------------------------
# IICL, Eqs. 8-9; Eq. 10
# ----------------------------------------------------------------------------------------------
def test_info_nce_perfectly_aligned_orthogonal_pairs():
    eye = torch.eye(3, **f64)
    # similarities I / tau; each row/column: -1/tau + ln(e^{1/tau} + 2) = ln(1 + 2 e^{-1/tau})
    # tau = 1: ln(1 + 2 / e) = ln(1.7357589) = 0.5514448
    assert brimpr.info_nce(eye, eye, 1.0).item() == pytest.approx(0.5514448, abs=1e-7)
    # cosine similarity: scaling a side changes nothing
    assert brimpr.info_nce(eye, 5 * eye, 1.0).item() == pytest.approx(0.5514448, abs=1e-7)
    # tau = 0.07: ln(1 + 2 e^{-14.2857}) = 1.2486e-6
    assert brimpr.info_nce(eye, eye, 0.07).item() == pytest.approx(2 * math.exp(-1 / 0.07), rel=1e-5)


def test_info_nce_is_the_mean_of_both_directions_by_hand():
    z_a = torch.tensor([[1., 0.], [0., 1.]], **f64)
    z_v = torch.tensor([[1., 0.], [1., 0.]], **f64)
    # tau = 1, sim = z_a z_v^T = [[1, 1], [0, 0]]
    # audio -> video (rows): row 0 [1, 1] target 0: ln 2; row 1 [0, 0] target 1: ln 2 -> mean ln 2 = 0.6931472
    # video -> audio (columns): col 0 [1, 0] target 0: ln(1 + e^-1) = 0.3132617;
    #                           col 1 [1, 0] target 1: ln(e + 1) = 1.3132617 -> mean 0.8132617
    # symmetric: (0.6931472 + 0.8132617) / 2 = 0.7532044
    assert brimpr.info_nce(z_a, z_v, 1.0).item() == pytest.approx(0.7532044, abs=1e-7)
    assert brimpr.info_nce(z_v, z_a, 1.0).item() == pytest.approx(0.7532044, abs=1e-7)


def test_total_loss_unit_weights():
    # 1.5 + 0.25 + 2
    assert brimpr.total_loss(torch.tensor(1.5, **f64), torch.tensor(0.25, **f64), 2.0).item() == 3.75


# ----------------------------------------------------------------------------------------------
# Prompts, features, freezing
# ----------------------------------------------------------------------------------------------
def tiny_model(seed=0):
    torch.manual_seed(seed)
    return common.CAVMAE("tiny", num_classes=10).eval()


def random_batch(model, n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return {"audio": torch.randn(n, model.audio_length, model.mel_bins, generator=g),
            "video": torch.randn(n, 3, model.image_size, model.image_size, generator=g),
            "label": torch.randint(0, model.num_classes, (n,), generator=g)}


def fake_ctx(model, modality="video", continual=False, calls=None):
    def source_batch(n, seed=0):
        if calls is not None:
            calls.append((n, seed))
        return random_batch(model, n, seed=100 + seed)
    return SimpleNamespace(dataset="embedded", modality=modality, num_classes=model.num_classes,
                           continual=continual, source_batch=source_batch)


def test_prompts_shape_init_and_only_prompts_train():
    model = brimpr.PromptedCAVMAE(tiny_model())
    L, D = len(model.backbone.blocks_a), model.backbone.embed_dim
    for p in (model.prompts_a, model.prompts_v):
        assert p.shape == (L, 10, D)
        assert p.abs().max() <= 1e-4 and p.abs().max() > 0  # U(-1e-4, 1e-4)
    params, names = brimpr.collect_params(model)
    assert names == ["prompts_a", "prompts_v"]
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {"prompts_a", "prompts_v"}


def test_unprompted_encoder_is_the_frozen_encoder_and_features_use_the_next_norm1():
    bb = tiny_model()
    model = brimpr.PromptedCAVMAE(bb)
    x = bb.embed_audio(random_batch(bb, 3)["audio"])  # (3, N_a, D)
    with torch.no_grad():
        z, feats = model.encode(x, "a", prompted=False, features=True)
        ref, outs = bb.run_blocks(bb.blocks_a, x, return_all=True)
        assert torch.equal(z, ref)
        assert feats.shape == (3, len(bb.blocks_a), bb.embed_dim)
        # layer 0 pooled after blocks_a[1].norm1; the last layer after the unified block's norm1
        assert torch.allclose(feats[:, 0], bb.blocks_a[1].norm1(outs[0]).mean(1), atol=1e-6)
        assert torch.allclose(feats[:, -1], bb.blocks_u[0].norm1(outs[-1]).mean(1), atol=1e-6)
        # with prompts: same token count out, a different function
        zp = model.encode(x, "a")
        assert zp.shape == z.shape and not torch.allclose(zp, z)


def test_unimodal_feature_averages_shared_and_modality_norm_passes():
    bb = tiny_model()
    model = brimpr.PromptedCAVMAE(bb)
    z = torch.randn(4, bb.n_video, bb.embed_dim)
    with torch.no_grad():
        shared = bb.norm(bb.blocks_u[0](z)).mean(1)
        own = bb.norm_v(bb.blocks_u[0](z, modality="v")).mean(1)
        assert torch.allclose(model.unimodal_feature(z, "v"), (shared + own) / 2, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# Source statistics
# ----------------------------------------------------------------------------------------------
def test_source_statistics_of_32_clean_clips_frozen_and_unprompted():
    bb = tiny_model()
    calls = []
    adapter = brimpr.setup(bb, fake_ctx(bb, calls=calls))
    assert calls == [(32, 0)]  # 32 clean clips, seed 0, computed at set-up
    stats = adapter.src
    # values: frozen model, no prompts, unbiased std over the 32 clips
    batch = random_batch(bb, 32, seed=100)
    model = brimpr.PromptedCAVMAE(bb)
    with torch.no_grad():
        _, f_a = model.encode(bb.embed_audio(batch["audio"]), "a", prompted=False, features=True)
        z_v = bb.run_blocks(bb.blocks_v, bb.embed_video(batch["video"]))
        z_a = bb.run_blocks(bb.blocks_a, bb.embed_audio(batch["audio"]))
        f_u = bb.fuse(z_a, z_v)
    assert torch.allclose(stats["a"]["mean"], f_a.mean(0), atol=1e-6)
    assert torch.allclose(stats["a"]["std"], f_a.std(0, unbiased=True), atol=1e-6)
    assert stats["v"]["mean"].shape == (len(bb.blocks_v), bb.embed_dim)
    assert torch.allclose(stats["u"]["std"][0], f_u.std(0), atol=1e-6)
    assert torch.equal(brimpr.source_statistics(model, batch)["a"]["mean"], stats["a"]["mean"])  # no state


# ----------------------------------------------------------------------------------------------
# The adapter: prediction, freezing, stop-gradient, reset, cost
# ----------------------------------------------------------------------------------------------
def test_one_step_prediction_freezing_and_reset():
    bb = tiny_model()
    frozen = {k: v.clone() for k, v in bb.state_dict().items()}
    adapter = brimpr.setup(bb, fake_ctx(bb))
    assert adapter.tau == 0.07 and adapter.shift_reset is False
    prompts0 = {m: adapter.model.prompts(m).detach().clone() for m in "av"}
    batch = random_batch(bb, 8)

    before = adapter.model.predict(batch["audio"], batch["video"])
    torch.manual_seed(3)
    logits = adapter(batch)
    # the reported prediction is the complete pass from BEFORE the update, without a graph
    assert torch.allclose(logits, before, atol=1e-6)
    assert not logits.requires_grad and logits.grad_fn is None
    assert set(adapter.losses) == {"pmgfa", "cmer", "iicl"}
    assert all(math.isfinite(v) and v > 0 for v in adapter.losses.values())
    # only the prompts changed; every backbone tensor bit-identical
    for m in "av":
        assert not torch.equal(adapter.model.prompts(m), prompts0[m])
    for k, v in adapter.model.backbone.state_dict().items():
        assert torch.equal(v, frozen[k]), k
    after = adapter.model.predict(batch["audio"], batch["video"])
    assert not torch.allclose(after, before, atol=1e-6)  # the update changed the prediction
    first = {m: adapter.model.prompts(m).detach().clone() for m in "av"}

    adapter.reset()
    for m in "av":
        assert torch.equal(adapter.model.prompts(m), prompts0[m])
    assert adapter.optimizer.state_dict()["state"] == {}
    # after a reset, the same batch with the same masks gives the very same step
    torch.manual_seed(3)
    assert torch.equal(adapter(batch), logits)
    for m in "av":
        assert torch.equal(adapter.model.prompts(m), first[m])


def test_complete_pass_gives_no_gradient_through_the_cmer_target(monkeypatch):
    # The teacher that reaches Eq. 7 inside a real step carries no graph (and soft_cross_entropy
    # detaches it again, see test_soft_cross_entropy_stops_the_gradient_to_the_teacher).
    bb = tiny_model()
    model = brimpr.PromptedCAVMAE(bb)
    src = brimpr.source_statistics(model, random_batch(bb, 32, seed=100))
    seen = {}
    real_cmer = brimpr.cmer_loss

    def spy(logits_amv, logits_avm, teacher, *args):
        seen["teacher_requires_grad"] = teacher.requires_grad
        return real_cmer(logits_amv, logits_avm, teacher, *args)

    monkeypatch.setattr(brimpr, "cmer_loss", spy)
    opt = torch.optim.Adam(brimpr.collect_params(model)[0], lr=1e-4)
    brimpr.forward_and_adapt(model, random_batch(bb, 6), opt, src, 0.07)
    assert seen["teacher_requires_grad"] is False


def test_a_single_clip_batch_is_predicted_without_an_update():
    bb = tiny_model()
    adapter = brimpr.setup(bb, fake_ctx(bb))
    p0 = adapter.model.prompts_a.detach().clone()
    batch = random_batch(bb, 1)
    logits = adapter(batch)
    assert logits.shape == (1, 10) and torch.equal(adapter.model.prompts_a, p0) and adapter.losses == {}


def test_cost_two_encoder_passes_and_seven_unified_passes_per_batch():
    bb = tiny_model()
    adapter = brimpr.setup(bb, fake_ctx(bb))
    counts = {"a": 0, "v": 0, "u": 0}
    hooks = [bb.blocks_a[0].register_forward_hook(lambda *_: counts.__setitem__("a", counts["a"] + 1)),
             bb.blocks_v[0].register_forward_hook(lambda *_: counts.__setitem__("v", counts["v"] + 1)),
             bb.blocks_u[0].register_forward_hook(lambda *_: counts.__setitem__("u", counts["u"] + 1))]
    adapter(random_batch(bb, 4))
    for h in hooks:
        h.remove()
    # full + masked per encoder; unified: complete, a_m v, a v_m, 2 x audio-only, 2 x video-only
    assert counts == {"a": 2, "v": 2, "u": 7}


def test_setup_temperature_and_continual_switch():
    bb = tiny_model()
    assert brimpr.setup(bb, fake_ctx(bb, modality="both")).tau == 0.25
    assert brimpr.setup(bb, fake_ctx(bb, modality="audio")).tau == 0.07
    assert brimpr.setup(bb, fake_ctx(bb, continual=True)).shift_reset is True


# ----------------------------------------------------------------------------------------------
# Continual-shift variant (public code)
# ----------------------------------------------------------------------------------------------
def test_shift_detector_z_score_rule_by_hand():
    det = brimpr.ShiftDetector(window=10, threshold=5.0)
    for v in [1.0, 2.0] * 4 + [1.0]:  # 9 values: window not full yet
        assert det.update(v) is False
    assert det.update(100.0) is False  # huge, but the window is not full: joins it
    det.window.clear()
    for v in [1.0, 2.0] * 5:
        assert det.update(v) is False
    # window {1, 2} x 5: mean 1.5, std (ddof 1) = sqrt(10 * 0.25 / 9) = 0.5270463
    # 4.1: z = 2.6 / 0.527 = 4.93 < 5 -> no shift (joins the window, evicting the oldest 1.0)
    assert det.update(4.1) is False
    # window now 2,1,2,1,2,1,2,1,2,4.1: mean 1.81, std 0.9364; 6.6: z = 4.79 / 0.9364 = 5.115 > 5 -> shift
    assert det.update(6.6) is True
    assert len(det.window) == 0  # cleared


def test_continual_variant_resets_only_the_shifted_modality():
    bb = tiny_model()
    adapter = brimpr.setup(bb, fake_ctx(bb, continual=True))
    batch = random_batch(bb, 4)
    adapter(batch)
    assert not torch.equal(adapter.model.prompts_a, adapter.prompts_start["a"])
    # a full window of tiny, steady audio discrepancies (mean 1.05e-3, std 5.3e-5): the next real
    # Disc_a (order 1) has a z-score far above 5, so the audio prompts go back to their start;
    # the video window is empty, so the video prompts keep adapting.
    adapter.detectors["a"].window.extend([1.0e-3, 1.1e-3] * 5)
    adapter(batch)
    assert torch.equal(adapter.model.prompts_a, adapter.prompts_start["a"])
    assert len(adapter.detectors["a"].window) == 0
    assert not torch.equal(adapter.model.prompts_v, adapter.prompts_start["v"])
    assert len(adapter.detectors["v"].window) == 2
    # without the flag nothing is reset
    adapter.reset()
    adapter.shift_reset = False
    adapter(batch)
    adapter.detectors["a"].window.extend([1.0e-3, 1.1e-3] * 5)
    adapter(batch)
    assert not torch.equal(adapter.model.prompts_a, adapter.prompts_start["a"])


# ----------------------------------------------------------------------------------------------
# End to end: python adapt.py --method brimpr
# ----------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_adapt_py_method_brimpr_end_to_end(tmp_path, monkeypatch):
    import adapt
    # every reported prediction must equal the complete prompted pass BEFORE that batch's update
    real_forward, diffs = brimpr.BriMPR.forward, []

    def checked(self, batch):
        before = self.model.predict(batch["audio"], batch["video"])
        out = real_forward(self, batch)
        diffs.append((out - before).abs().max().item())
        return out

    monkeypatch.setattr(brimpr.BriMPR, "forward", checked)
    avg, summary = adapt.main(["--method", "brimpr", "--corruption", "gaussian_noise", "--seeds", "1",
                               "--device", "cpu", "--results", str(tmp_path / "r.json")])
    assert len(diffs) == 39 and max(diffs) < 1e-5  # 2,496 test clips in batches of 64
    res = json.loads((tmp_path / "r.json").read_text())
    for k in ("source", "brimpr"):
        assert 0.0 <= res["accuracy"]["gaussian_noise"][k]["mean"] <= 100.0
        assert res["average"][k] == pytest.approx(avg[k])
    assert res["batch_size"] == {"source": 64, "brimpr": 64} and res["time_ratio_to_source"]["brimpr"] > 1.0
