"""adapt.py: the baselines' losses by hand (Tent, EATA, SAR, DeYO, READ), freezing, reset and update rules;
the runner end to end on a tiny READ-layout set, its refusals, its results files. Runs on the embedded
benchmark with the trained default model are `slow`."""
import copy
import json
import math
import os
from types import SimpleNamespace

import pytest
import torch

import adapt
import common
import data
from common import CAVMAE
from test_data import read_layout_argv
from conftest import changed_keys, refused, source_stream_accuracy

LOGITS = torch.tensor([[2.0, 1.0, 0.0, -1.0], [0.0, 0.5, 1.5, 0.0]], dtype=torch.float64)
D = torch.float64
LN50 = math.log(50)  # 3.912023


# ---------------------------------------------------------------------------- losses
def test_softmax_entropy_uniform_is_log_k():
    assert torch.allclose(adapt.softmax_entropy(torch.zeros(3, 5, dtype=torch.float64)),
                          torch.full((3,), math.log(5), dtype=torch.float64))


@pytest.mark.parametrize("p, expected", [(0.9, 0.094824), (0.5, 0.346574), (math.exp(-1), 0.367879)])
def test_read_confidence_single_sample(p, expected):
    # gamma = e^-1: p log(e * e^-1 / p) = -p log p; 0.9 * ln(1/0.9) = 0.9 * 0.105361 = 0.094824
    # probabilities (p, (1-p)/2, (1-p)/2): p is the largest for all three values of p
    logits = torch.tensor([[math.log(p), math.log((1 - p) / 2), math.log((1 - p) / 2)]], dtype=torch.float64)
    assert abs(adapt.read_confidence_loss(logits).item() - expected) < 1e-6


def test_read_losses_check_values():
    # max probabilities 0.643914 and 0.526121: mean of -p ln p = (0.283534 + 0.338226) / 2 = 0.305880
    assert abs(adapt.read_confidence_loss(LOGITS).item() - 0.305880) < 1e-6
    # L_bal = sum_k s_k log s_k = -H(softmax(sum_i p_i)) = -1.361689
    assert abs(adapt.read_balance_loss(LOGITS).item() + 1.361689) < 1e-6


def test_read_confidence_threshold_direction():
    # d/dp [p log(e gamma / p)] = log(gamma / p): negative above gamma (pushed up), positive below
    for p, sign in ((0.9, -1), (0.2, 1)):
        logits = torch.tensor([[math.log(p), math.log(1 - p)]], dtype=torch.float64, requires_grad=True)
        adapt.read_confidence_loss(logits).backward()
        assert math.copysign(1, logits.grad[0, 0].item()) == sign


# ---------------------------------------------------------------------------- freezing and reset
@pytest.mark.parametrize("name", ["tent", "read"])
def test_baseline_updates_exactly_its_parameters_and_resets(name, tiny_batch):
    torch.manual_seed(0)
    model = CAVMAE("tiny")
    start = copy.deepcopy(model.state_dict())
    adapter = adapt.METHODS[name].setup(model, SimpleNamespace())
    adapter(tiny_batch)
    if name == "tent":  # the LayerNorms on the multimodal path (the _a/_v norms get no gradient there)
        expected = {k for k in start if any(s in k for s in (".norm1.", ".norm2.")) or k.startswith("norm.")
                    or k.startswith("mlp_head.0.")}
    else:  # READ: the unified block's q, k, v projections
        expected = {"blocks_u.0.attn.qkv.weight", "blocks_u.0.attn.qkv.bias"}
    assert changed_keys(start, model) == expected
    adapter(tiny_batch)
    assert len(adapter.optimizer.state) > 0
    adapter.reset()
    assert changed_keys(start, model) == set()
    assert len(adapter.optimizer.state) == 0


def test_read_predicts_after_the_update(tiny_batch):
    torch.manual_seed(0)
    model = CAVMAE("tiny")
    adapter = adapt.READ.setup(model, SimpleNamespace())
    out = adapter(tiny_batch)
    with torch.no_grad():
        # the updated model's output
        assert torch.allclose(out, model(tiny_batch["audio"], tiny_batch["video"]))


# ---------------------------------------------------------------------------- thresholds and weights
def test_entropy_margins_for_50_classes():
    ctx50 = SimpleNamespace(num_classes=50)
    torch.manual_seed(0)
    deyo, sar = adapt.DeYO(CAVMAE("tiny"), ctx50), adapt.SAR(CAVMAE("tiny"), ctx50)
    assert abs(sar.e0 - 1.564809) < 1e-6 and abs(deyo.e0 - 1.564809) < 1e-6  # E0 = 0.4 * 3.912023
    assert abs(deyo.tau_ent - 1.956012) < 1e-6  # tau_Ent = 0.5 * 3.912023


def test_eata_weight_by_hand():
    e0 = 0.4 * LN50
    w = adapt.eata_weight(torch.tensor([0.5, 1.0, 1.5], dtype=D), e0)
    # exp(1.564809 - 0.5) = exp(1.064809) = 2.900286; exp(0.564809) = 1.759112; exp(0.064809) = 1.066955
    assert torch.allclose(w, torch.tensor([2.900286, 1.759112, 1.066955], dtype=D), atol=1e-6)


def test_eata_weighted_loss_divides_by_the_number_kept():
    e0 = 0.4 * LN50
    ent = torch.tensor([0.5, 1.0, 1.6], dtype=D)
    keep = ent < e0  # 1.6 >= 1.564809 is dropped
    assert keep.tolist() == [True, True, False]
    loss = adapt.weighted_entropy(ent[keep], adapt.eata_weight(ent[keep], e0))
    # (0.5 * 2.900286 + 1.0 * 1.759112) / 2 = (1.450143 + 1.759112) / 2 = 1.604628 (over 2 kept, not 3)
    assert abs(loss.item() - 1.604628) < 1e-6


def test_eata_weight_is_detached():
    ent = torch.tensor([0.5, 1.0], dtype=D, requires_grad=True)
    adapt.weighted_entropy(ent, adapt.eata_weight(ent, 1.0)).backward()
    # d/d ent_b of mean_b w_b ent_b with w constant = w_b / 2 = exp(1 - ent_b) / 2
    assert torch.allclose(ent.grad, torch.tensor([math.exp(0.5) / 2, 0.5], dtype=D))


def test_eata_redundancy_cosine_by_hand():
    m = torch.tensor([0.5, 0.3, 0.2], dtype=D)
    p = torch.tensor([[0.05, 0.05, 0.9]], dtype=D)
    # p.m = 0.025 + 0.015 + 0.18 = 0.22; |p| = sqrt(0.815) = 0.902774; |m| = sqrt(0.38) = 0.616441
    # cos = 0.22 / (0.902774 * 0.616441) = 0.22 / 0.556506 = 0.395323:
    # kept if epsilon = 0.4, dropped if epsilon = 0.1
    cos = adapt.eata_cosine(p, m)
    assert abs(cos.item() - 0.395323) < 1e-6 and cos.item() < 0.4 and not cos.item() < 0.1
    # m uniform over 50 classes, p one-hot: cos = (1/50) / (1 * sqrt(50) / 50) = 1 / sqrt(50) = 0.141421
    one_hot = torch.zeros(1, 50, dtype=D)
    one_hot[0, 7] = 1
    assert abs(adapt.eata_cosine(one_hot, torch.full((50,), 1 / 50, dtype=D)).item() - 0.141421) < 1e-6


def test_eata_moving_average_by_hand():
    m = adapt.eata_update_mean(None, torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=D))
    assert m.tolist() == [0.5, 0.5]  # first batch: the plain mean
    m = adapt.eata_update_mean(m, torch.tensor([[1.0, 0.0]], dtype=D))
    assert torch.allclose(m, torch.tensor([0.55, 0.45], dtype=D))  # 0.9 * 0.5 + 0.1 * 1, 0.9 * 0.5 + 0.1 * 0
    assert adapt.eata_update_mean(m, torch.zeros(0, 2, dtype=D)) is m  # nothing kept: unchanged
    assert adapt.eata_update_mean(None, torch.zeros(0, 2, dtype=D)) is None


def test_fisher_penalty_by_hand():
    p = [torch.tensor([1.0, 1.0], dtype=D)]
    # 1 * (1 - 0)^2 + 2 * (1 - 0.5)^2 = 1 + 0.5 = 1.5
    assert adapt.fisher_penalty(p, [torch.tensor([1.0, 2.0], dtype=D)],
                                [torch.tensor([0.0, 0.5], dtype=D)]).item() == 1.5


def test_fisher_is_the_mean_of_squared_batch_gradients():
    W = torch.zeros(2, 2, dtype=D, requires_grad=True)
    logits_fn = lambda x: x @ W  # logits [0, 0]: argmax 0, dCE/dlogits = p - y = (-0.5, 0.5)
    F = adapt.fisher_diagonal(logits_fn, [W],
                              [torch.tensor([[1.0, 0.0]], dtype=D), torch.tensor([[0.0, 2.0]], dtype=D)])
    # batch 1: dW = [[-0.5, 0.5], [0, 0]] -> squared [[0.25, 0.25], [0, 0]]
    # batch 2: dW = [[0, 0], [-1, 1]] (x = 2) -> squared [[0, 0], [1, 1]]; F = sum / 2 batches
    assert torch.allclose(F[0], torch.tensor([[0.125, 0.125], [0.5, 0.5]], dtype=D))
    # one batch of x = (1, 0) and (-1, 0): the batch-mean gradient cancels -> F = 0 (a per-sample
    # average of squared gradients would give 0.25)
    F = adapt.fisher_diagonal(logits_fn, [W], [torch.tensor([[1.0, 0.0], [-1.0, 0.0]], dtype=D)])
    assert torch.equal(F[0], torch.zeros(2, 2, dtype=D))


def test_sam_perturbation_and_sar_ema_by_hand():
    e = adapt.sam_perturbation([torch.tensor([3.0], dtype=D), torch.tensor([4.0], dtype=D)], 0.05)
    # ||g|| = 5 over both tensors: e = 0.05 * (3, 4) / 5 = (0.03, 0.04)
    assert abs(e[0].item() - 0.03) < 1e-12 and abs(e[1].item() - 0.04) < 1e-12
    ema = None
    for loss, expected in ((0.5, 0.5), (0.3, 0.48), (0.1, 0.442)):  # 0.9 * 0.5 + 0.03; 0.9 * 0.48 + 0.01
        ema = adapt.sar_ema(ema, loss)
        assert abs(ema - expected) < 1e-12


def test_plpd_and_deyo_weight_by_hand():
    p = torch.tensor([[0.7, 0.2, 0.1]], dtype=D)
    p_shuffled = torch.tensor([[0.3, 0.5, 0.2]], dtype=D)
    # y_hat = 0: 0.7 - 0.3 (not 0.5, the new argmax)
    assert abs(adapt.plpd(p, p_shuffled).item() - 0.4) < 1e-12
    e0 = 0.4 * LN50
    w = adapt.deyo_weight(torch.tensor([1.0, 1.8], dtype=D), torch.tensor([0.30, 0.25], dtype=D), e0)
    # exp(1.564809 - 1) + exp(0.3) = 1.759112 + 1.349859 = 3.108971
    # exp(1.564809 - 1.8) + exp(0.25) = 0.790420 + 1.284025 = 2.074445;
    # its loss term 1.8 * 2.074445 = 3.734002
    assert torch.allclose(w, torch.tensor([3.108971, 2.074445], dtype=D), atol=1e-6)
    assert abs(adapt.weighted_entropy(torch.tensor([1.8], dtype=D), w[1:]).item() - 3.734002) < 1e-6


def test_patch_shuffle_by_hand():
    x = torch.arange(16.0, dtype=D).reshape(1, 1, 4, 4)
    # 2 x 2 tiles, row-major: T0 = [[0,1],[4,5]], T1 = [[2,3],[6,7]],
    # T2 = [[8,9],[12,13]], T3 = [[10,11],[14,15]]
    # order (3, 2, 1, 0): T3 T2 / T1 T0
    out = adapt.patch_shuffle(x, 2, perm=torch.tensor([[3, 2, 1, 0]]))
    expected = torch.tensor([[10, 11, 8, 9], [14, 15, 12, 13], [2, 3, 0, 1], [6, 7, 4, 5]], dtype=D)
    assert torch.equal(out[0, 0], expected)
    # random permutations: every sample keeps its multiset of tiles; the identity order gives x back
    y = torch.randn(3, 3, 8, 8, dtype=D)
    assert torch.equal(adapt.patch_shuffle(y, 4, perm=torch.arange(16).expand(3, 16)), y)
    z = adapt.patch_shuffle(y, 4, generator=torch.Generator().manual_seed(0))
    assert torch.equal(z.flatten(1).sort(1).values, y.flatten(1).sort(1).values) and not torch.equal(z, y)


# ---------------------------------------------------------------------------- READ at batch 64
def confident_logits(counts):
    """One row per sample, logit 30 on its class (p = 1 - 9e-13), 0 elsewhere;
    counts[k] samples of class k."""
    rows = [[30.0 if j == k else 0.0 for j in range(10)] for k, c in enumerate(counts) for _ in range(c)]
    return torch.tensor(rows, dtype=D)


def test_read_balance_term_saturates_at_batch_64():
    # batch 64 split 40 / 24 over 10 classes: c = (40, 24, 0 x 8), s = softmax(c) = (1 - e^-16, e^-16, ~0):
    # L_bal = s_0 ln s_0 + s_1 ln s_1 = -e^-16 - 16 e^-16 = -17 * 1.125352e-7 = -1.913098e-6
    assert abs(adapt.read_balance_loss(confident_logits([40, 24])).item() + 1.913098e-6) < 1e-11
    # batch 8 split 5 / 3: Z = e^5 + e^3 + 8 = 148.413159 + 20.085537 + 8 = 176.498696,
    # s = (0.840873, 0.113800, 0.005666 x 8): L_bal = -0.145738 - 0.247323 - 0.234483 = -0.627544
    assert abs(adapt.read_balance_loss(confident_logits([5, 3])).item() + 0.627544) < 1e-5


# ---------------------------------------------------------------------------- the adapters
def ctx(calls=None):
    def source_batch(n, seed=0):
        if calls is not None:
            calls.append((n, seed))
        g = torch.Generator().manual_seed(1)
        return {"audio": torch.randn(12, 128, 64, generator=g),
                "video": torch.randn(12, 3, 64, 64, generator=g),
                "label": torch.arange(12) % 10}
    return SimpleNamespace(num_classes=10, source_batch=source_batch, dataset="embedded", modality="video")


MULTIMODAL_NORMS = lambda keys: {k for k in keys if any(s in k for s in (".norm1.", ".norm2."))
                                 or k.startswith(("norm.", "mlp_head.0."))}
LOWER_NORMS = {f"blocks_{m}.0.{n}.{w}" for m in "av" for n in ("norm1", "norm2") for w in ("weight", "bias")}


def make(name):
    torch.manual_seed(0)
    model = CAVMAE("tiny")
    start = copy.deepcopy(model.state_dict())
    adapter = adapt.METHODS[name].setup(model, ctx())
    return model, start, adapter


def keep_everything(adapter):
    """Thresholds that keep every sample of a random tiny model
    (near-uniform predictions, Ent <= ln 10 = 2.3)."""
    if isinstance(adapter, adapt.DeYO):
        adapter.tau_ent, adapter.tau_plpd = 10.0, -math.inf
    else:  # EATA's E0 is also in its weight exp(E0 - Ent): finite
        adapter.e0 = 10.0


@pytest.mark.parametrize("name", ["eata", "sar", "deyo"])
def test_baseline_updates_exactly_its_parameters_and_resets(name, tiny_batch):
    model, start, adapter = make(name)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    layernorms = {k for k in start if "norm" in k or k.startswith("mlp_head.0.")}
    if name == "eata":  # every LayerNorm (as Tent); only the multimodal path's get gradient
        assert trainable == layernorms
        expected = MULTIMODAL_NORMS(start)
    else:  # BriMPR's walk: the LayerNorms of the lower modality-specific blocks (tiny: block 0 of 3)
        assert trainable == {k for k in layernorms if k.startswith(("blocks_a.0.", "blocks_v.0."))}
        expected = LOWER_NORMS
    assert isinstance(adapter.optimizer, torch.optim.Adam) and adapter.optimizer.defaults["lr"] == 1e-4
    keep_everything(adapter)
    source = copy.deepcopy(model)
    out = adapter(tiny_batch)
    with torch.no_grad():  # the prediction is the first forward's, before the update
        assert torch.equal(out, source(tiny_batch["audio"], tiny_batch["video"]))
    assert changed_keys(start, model) == expected
    assert all(torch.isfinite(v).all() for v in model.state_dict().values())
    adapter(tiny_batch)
    assert len(adapter.optimizer.state) > 0
    adapter.reset()
    assert changed_keys(start, model) == set() and len(adapter.optimizer.state) == 0


@pytest.mark.parametrize("name, block", [("eata", {"e0": -math.inf}), ("deyo", {"tau_plpd": math.inf}),
                                         ("deyo", {"tau_ent": -math.inf})])
def test_no_step_when_no_sample_is_kept(name, block, tiny_batch):
    model, start, adapter = make(name)
    keep_everything(adapter)
    for k, v in block.items():
        setattr(adapter, k, v)
    adapter(tiny_batch)
    assert changed_keys(start, model) == set() and len(adapter.optimizer.state) == 0
    assert adapter.losses["kept"] == 0.0


def test_eata_fisher_from_clean_source_clips(tiny_batch):
    calls = []
    torch.manual_seed(0)
    model = CAVMAE("tiny")
    adapter = adapt.EATA.setup(model, ctx(calls))
    assert calls == [(2000, 0)]  # BriMPR's 2000 clean training clips, seed 0 (the first 32 are BriMPR's own)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    nonzero = {n for n, f in zip(names, adapter.fisher) if f.abs().sum() > 0}
    assert nonzero == MULTIMODAL_NORMS(names)  # the _a/_v norms and norm_a/norm_v are off the path: F = 0
    # the same numbers as the batch-gradient rule on those 12 clips (one batch of <= 64)
    clean = ctx().source_batch(2000)
    ref = adapt.fisher_diagonal(lambda b: model(b["audio"], b["video"]), adapter.params, [clean])
    assert all(torch.allclose(a, b) for a, b in zip(adapter.fisher, ref))
    assert all(p.grad is None for p in adapter.params)


def test_eata_redundancy_filter_from_the_second_batch(tiny_batch):
    model, start, adapter = make("eata")
    keep_everything(adapter)
    adapter.epsilon = 0.0  # |cos| < 0 never holds: rejects everything, but not on the first batch (m unset)
    adapter(tiny_batch)
    with torch.no_grad():
        p = CAVMAE("tiny").eval()
        p.load_state_dict(start)
        probs = p(tiny_batch["audio"], tiny_batch["video"]).softmax(1)
    assert torch.allclose(adapter.m, probs.mean(0))  # m = the mean prediction of the kept (all 8)
    first = copy.deepcopy(model.state_dict())
    m = adapter.m
    adapter(tiny_batch)
    assert changed_keys(first, model) == set() and adapter.m is m  # nothing kept: no step, m unchanged
    adapter.reset()
    assert adapter.m is None


def test_eata_redundancy_margin_keeps_nothing_near_uniform_m():
    # m uniform over 10 classes, p one-hot: cos = (1/10) / (1 * sqrt(10) / 10) = 1 / sqrt(10) = 0.316228, the
    # smallest |cos| any p can have (|p| <= 1): dropped by BriMPR's 0.1 (and EATA's 0.05)
    one_hot = torch.zeros(1, 10, dtype=D)
    one_hot[0, 3] = 1
    assert abs(adapt.eata_cosine(one_hot, torch.full((10,), 0.1, dtype=D)).item() - 0.316228) < 1e-6
    torch.manual_seed(0)
    assert adapt.EATA.setup(CAVMAE("tiny"), ctx()).epsilon == 0.1  # BriMPR run.py --d_margin


def test_sar_steps_with_the_gradient_at_the_perturbed_point(tiny_batch):
    model, start, adapter = make("sar")
    keep_everything(adapter)
    ref = copy.deepcopy(model)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = dict(ref.named_parameters())
    live = [params[n] for n in names]
    a, v = tiny_batch["audio"], tiny_batch["video"]
    g1 = torch.autograd.grad(adapt.softmax_entropy(ref(a, v)).mean(), live, allow_unused=True)
    pairs = [(p, g) for p, g in zip(live, g1) if g is not None]  # the _a/_v norms are off the path
    with torch.no_grad():
        for p, e in zip([p for p, _ in pairs], adapt.sam_perturbation([g for _, g in pairs], 0.05)):
            p.add_(e)
    g2 = torch.autograd.grad(adapt.softmax_entropy(ref(a, v)).mean(), [p for p, _ in pairs])
    adapter(tiny_batch)
    got = [p.grad for p in adapter.params if p.grad is not None]
    assert len(got) == len(g2) == 8  # norm1 / norm2 weight and bias of blocks_a.0 and blocks_v.0
    assert all(torch.allclose(x, y, atol=1e-7) for x, y in zip(got, g2))
    assert not all(torch.allclose(x, y, atol=1e-7) for x, y in zip(got, [g for _, g in pairs]))
    # Adam's first step from theta (not theta + e): theta - lr * g2 / (|g2| + eps)
    own = dict(model.named_parameters())
    for (n, _), g in zip([(n, g) for n, g in zip(names, g1) if g is not None], g2):
        assert torch.allclose(own[n], start[n] - 1e-4 * g / (g.abs() + 1e-8), atol=1e-7)


def test_sar_model_recovery_keeps_the_low_average(tiny_batch):
    model, start, adapter = make("sar")
    keep_everything(adapter)
    adapter.reset_em = math.inf  # any average is below it: recover after the step
    adapter(tiny_batch)
    # weights back, Adam kept
    assert changed_keys(start, model) == set() and len(adapter.optimizer.state) == 8
    # first ema = L2, kept after recovery
    assert adapter.recoveries == 1 and adapter.ema == adapter.losses["sam"]
    adapter.reset()
    assert adapter.ema is None


def adam_state(optimizer):
    """A copy of Adam's per-parameter state (exp_avg, exp_avg_sq, step), in parameter order."""
    return copy.deepcopy(optimizer.state_dict()["state"])


def test_sar_recovery_reloads_the_weights_and_keeps_adam_reset_restores_both(tiny_batch):
    model, start, adapter = make("sar")
    _, _, twin = make("sar")  # three plain steps: Adam's state just before the recovery below
    for a in (adapter, twin):
        keep_everything(a)
        a.reset_em = -math.inf  # no recovery
    for _ in range(3):
        twin(tiny_batch)
    adapter(tiny_batch)
    adapter(tiny_batch)
    adapter.reset_em = math.inf
    adapter(tiny_batch)  # third step, then the recovery
    before, after = adam_state(twin.optimizer), adam_state(adapter.optimizer)
    assert adapter.recoveries == 1 and changed_keys(start, model) == set()  # the saved (source) weights
    assert len(after) == len(before) == 8  # norm1 / norm2 weight and bias of blocks_a.0 and blocks_v.0
    for i, s in after.items():  # bit-identical to the state of three plain steps, not fresh
        assert set(s) == {"step", "exp_avg", "exp_avg_sq"} and float(s["step"]) == 3.0
        assert all(torch.equal(s[k], before[i][k]) for k in s) and s["exp_avg"].abs().sum() > 0
    adapter.reset()  # between corruption types: the source weights and a fresh Adam
    assert changed_keys(start, model) == set() and len(adapter.optimizer.state) == 0
    assert adapter.ema is None and adapter.optimizer.state_dict() == adapter.optimizer_state


# ---------------------------------------------------------------------------- the runner
def run(tmp_path, *extra):
    out = tmp_path / "r.json"
    adapt.main(["--corruption", "gaussian_noise", "--seeds", "1", "--results", str(out), *extra])
    return json.loads(out.read_text())


# the fixture: the source model exists first
@pytest.mark.slow
def test_runner_end_to_end_and_paired_source(tmp_path, source_model):
    res = run(tmp_path, "--method", "read")
    acc = res["accuracy"]["gaussian_noise"]
    assert 0 <= acc["read"]["mean"] <= 100
    # the Source column is the frozen model's batch-averaged accuracy on the same stream
    assert abs(acc["source"]["mean"] - source_stream_accuracy("gaussian_noise", 64)) < 1e-9
    assert res["batch_size"] == {"source": 64, "read": 64} and res["samples_per_second"] > 0
    # one batch size: one time base
    assert res["source_ms_per_batch"] == {"64": res["ms_per_batch"]["source"]}


@pytest.mark.slow
def test_runner_same_seed_same_numbers(tmp_path):
    a = run(tmp_path, "--method", "tent", "--modality", "audio")
    b = run(tmp_path, "--method", "tent", "--modality", "audio")
    assert a["accuracy"] == b["accuracy"]


def test_runner_bad_corruption_name(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        adapt.main(["--method", "source", "--corruption", "gaussian_blurr",
                    "--results", str(tmp_path / "r.json")])
    assert str(e.value).startswith("error: unknown video corruption 'gaussian_blurr'")  # main: the sentence
    assert not (tmp_path / "r.json").exists()


def test_runner_missing_checkpoint(tmp_path):
    with pytest.raises(SystemExit) as e:
        adapt.main(["--method", "source", "--checkpoint", str(tmp_path / "missing.pt")])
    assert str(e.value).startswith("error: checkpoint missing.pt does not exist; pass a .pt/.pth file")


def test_runner_on_read_layout(tmp_path):
    out = tmp_path / "read.json"
    adapt.main(read_layout_argv(tmp_path, "read") + ["--results", str(out), "--batch-size", "4"])
    res = json.loads(out.read_text())
    assert set(res["accuracy"]) == {"gaussian_noise"}
    # 6 clips in batches of 4 and 2: batch accuracies are multiples of 25 and 50,
    # their mean a multiple of 12.5
    acc = res["accuracy"]["gaussian_noise"]["read"]["mean"]
    assert 0 <= acc <= 100 and abs(acc / 12.5 - round(acc / 12.5)) < 1e-5


def test_runner_both_modalities_on_read_layout_counts_dropped_clips(tmp_path, capsys):
    argv = read_layout_argv(tmp_path, "source") + ["--modality", "both",
                                                   "--corruption", "gaussian_noise+wind"]
    audio = tmp_path / "audio" / "wind" / "severity_5.json"
    entries = json.loads(audio.read_text())["data"]
    audio.write_text(json.dumps({"data": entries[1:]}))  # clip0 has no corrupted WAV
    out = tmp_path / "r.json"
    adapt.main(argv + ["--batch-size", "5", "--results", str(out)])
    video = tmp_path / "video" / "gaussian_noise" / "severity_5.json"
    assert (f"dropped 1 of 6 clips of {video} missing from the audio list "
            f"and 0 of 5 clips of {audio} missing from the video list") in capsys.readouterr().err
    # the 5 clips left in one batch of 5: the accuracy is a multiple of 100 / 5 = 20
    acc = json.loads(out.read_text())["accuracy"]["gaussian_noise+wind"]["source"]["mean"]
    assert abs(acc / 20 - round(acc / 20)) < 1e-5


def test_runner_refuses_a_checkpoint_holding_nan(tmp_path):
    argv = read_layout_argv(tmp_path, "source")
    model = CAVMAE("tiny", num_classes=3)
    with torch.no_grad():
        model.norm.weight[0] = float("nan")
    common.save_checkpoint(str(tmp_path / "tiny3.pt"), model)
    with pytest.raises(SystemExit) as e:
        adapt.main(argv + ["--results", str(tmp_path / "r.json")])
    assert str(e.value).startswith("error: tiny3.pt holds NaN or infinite values in norm.weight; ")
    assert not (tmp_path / "r.json").exists()


def test_runner_refuses_a_checkpoint_with_other_classes(tmp_path):
    ckpt = tmp_path / "k50.pt"
    common.save_checkpoint(str(ckpt), CAVMAE("tiny", num_classes=50))
    with pytest.raises(SystemExit) as e:
        adapt.main(["--method", "source", "--checkpoint", str(ckpt), "--corruption", "contrast"])
    assert "the checkpoint has 50 classes but the data has 10" in str(e.value)


def test_runner_read_layout_without_training_list_for_brimpr(tmp_path):
    with pytest.raises(SystemExit) as e:
        adapt.main(read_layout_argv(tmp_path, "brimpr", n=4) + ["--results", str(tmp_path / "r.json")])
    assert "clean" in str(e.value) and "--source-json" in str(e.value)
    assert not (tmp_path / "r.json").exists()


# ---------------------------------------------------------------------------- several methods, one table
@pytest.mark.slow
def test_runner_methods_share_streams_and_sets(tmp_path, monkeypatch, capsys):
    built = []
    corrupted_set = adapt.corrupted_set
    monkeypatch.setattr(adapt, "corrupted_set",
                        lambda args, model, c: built.append(c) or corrupted_set(args, model, c))
    out = tmp_path / "all.json"
    adapt.main(["--methods", "tent", "eata", "sar", "deyo", "read", "abpem",
                "--corruption", "gaussian_noise,contrast", "--seeds", "1", "2", "--results", str(out)])
    res = json.loads(out.read_text())
    assert built == ["gaussian_noise", "contrast"]  # each corrupted set built once for all methods and seeds
    assert res["methods"] == ["source", "tent", "eata", "sar", "deyo", "read", "abpem"]  # Source always first
    assert res["batch_size"] == {"source": 64, "tent": 64, "eata": 64, "sar": 64, "deyo": 64, "read": 64,
                                 "abpem": 8}
    # the Source column is the frozen model on the shuffled stream of batch 64;
    # JSON average = mean over corruptions
    for seed_i, seed in enumerate((1, 2)):
        assert abs(res["accuracy"]["contrast"]["source"]["per_seed"][seed_i]
                   - source_stream_accuracy("contrast", 64, seed)) < 1e-9
    for m in res["methods"]:
        assert abs(res["average"][m] - (res["accuracy"]["gaussian_noise"][m]["mean"]
                                        + res["accuracy"]["contrast"][m]["mean"]) / 2) < 1e-9
    # ABPEM's time base: Source's forward on ABPEM's own batches of 8, timed in the same run
    assert set(res["source_ms_per_batch"]) == {"64", "8"} and res["time_ratio_to_source"]["source"] == 1.0
    assert (res["time_ratio_to_source"]["abpem"]
            == res["ms_per_batch"]["abpem"] / res["source_ms_per_batch"]["8"])
    table = capsys.readouterr().out
    header = next(line for line in table.splitlines() if line.startswith("corruption"))
    assert header.split() == ["corruption", "source", "tent", "eata", "sar", "deyo", "read", "abpem"]
    assert "x Source forward" in table
    # a method's numbers do not depend on the other methods run beside it
    alone = run(tmp_path, "--methods", "sar", "--corruption", "gaussian_noise,contrast", "--seeds", "1", "2")
    assert alone["accuracy"]["contrast"]["sar"] == res["accuracy"]["contrast"]["sar"]


@pytest.mark.slow
def test_runner_source_seeds_stored_once(tmp_path, capsys):
    out = tmp_path / "src.json"
    adapt.main(["--method", "source", "--corruption", "gaussian_noise", "--seeds", "1", "2",
                "--results", str(out)])
    res = json.loads(out.read_text())
    per_seed = res["accuracy"]["gaussian_noise"]["source"]["per_seed"]
    assert per_seed == [source_stream_accuracy("gaussian_noise", 64, 1),
                        source_stream_accuracy("gaussian_noise", 64, 2)]
    # one corruption: the mean of the 2 seeds
    assert res["average"]["source"] == (per_seed[0] + per_seed[1]) / 2
    average_row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("average"))
    assert average_row.split()[1] == f"{res['average']['source']:.1f}"


@pytest.mark.slow
def test_runner_continual_and_both_with_methods(tmp_path):
    both = run(tmp_path, "--methods", "tent", "read", "--modality", "both",
               "--corruption", "gaussian_noise+wind")
    assert (set(both["accuracy"]) == {"gaussian_noise+wind"}
            and set(both["average"]) == {"source", "tent", "read"})
    single = run(tmp_path, "--methods", "tent", "--corruption", "gaussian_noise,contrast")
    cont = run(tmp_path, "--methods", "tent", "--corruption", "gaussian_noise,contrast", "--continual")
    # the continual stream starts from the source model, so its first corruption is the episodic run's;
    # the second continues from the adapted state (no reset)
    assert cont["accuracy"]["gaussian_noise"] == single["accuracy"]["gaussian_noise"]
    assert cont["accuracy"]["contrast"]["source"] == single["accuracy"]["contrast"]["source"]


def test_results_files_are_named_by_what_was_run():
    parse = adapt.build_parser().parse_args
    path = lambda argv: adapt.results_path(parse(argv), adapt.method_names(parse(argv)))
    wide = path(["--method", "tent"])
    assert wide.endswith("adapt_source-tent_video.json")
    narrower = [path(["--method", "tent", "--corruption", "fog"]),
                path(["--method", "tent", "--continual"]),
                path(["--method", "tent", "--severity", "3"]),
                path(["--method", "tent", "--seeds", "1", "2"]),
                path(["--methods", "tent", "read"]),
                path(["--method", "tent", "--modality", "audio"]),
                path(["--method", "tent", "--batch-size", "8"])]
    assert len(set(narrower + [wide])) == len(narrower) + 1  # no two selections share a file
    assert narrower[0].endswith("adapt_source-tent_video_fog.json")
    assert path(["--method", "abpem", "--no-cache"]) != path(["--method", "abpem"])
    assert path(["--method", "eata", "--data-seed", "3"]).endswith("adapt_source-eata_video_data3.json")
    many = path(["--method", "tent", "--corruption", ",".join(adapt.corruption_list("video", "all")[:9])])
    assert len(os.path.basename(many)) < 80  # long selections get a short hash tag


@pytest.mark.slow
def test_runner_default_results_file(tmp_path, monkeypatch):
    monkeypatch.setattr(adapt.train, "RESULTS_DIR", str(tmp_path))
    adapt.main(["--method", "source", "--corruption", "fog"])
    assert [p.name for p in tmp_path.iterdir()] == ["adapt_source_video_fog.json"]


# ---------------------------------------------------------------------------- checks before any work


def tiny10(tmp_path, data_seed=0):
    ckpt = tmp_path / "tiny10.pt"
    common.save_checkpoint(str(ckpt), CAVMAE("tiny", num_classes=10), data="embedded", data_seed=data_seed,
                           benchmark=data.embedded_id())
    return str(ckpt)


def test_label_csv_not_0_to_k_minus_1_is_refused(tmp_path):
    argv = read_layout_argv(tmp_path, "source") + ["--results", str(tmp_path / "r.json")]
    # 1-based indices: clip i's label i % 3 read as index i % 3 + 1, scored against the wrong output (or none)
    (tmp_path / "labels.csv").write_text("index,mid\n1,/m/c0\n2,/m/c1\n3,/m/c2\n")
    with pytest.raises(SystemExit) as e:
        adapt.main(argv)
    assert "labels.csv has indices other than 0..2 (each once); renumber them from 0." in str(e.value)
    assert not (tmp_path / "r.json").exists()


def test_checkpoint_of_another_data_seed_is_refused(tmp_path):
    with pytest.raises(SystemExit) as e:
        adapt.main(["--method", "source", "--checkpoint", tiny10(tmp_path, data_seed=0), "--data-seed", "1",
                    "--corruption", "contrast", "--results", str(tmp_path / "r.json")])
    assert "trained on the embedded benchmark with --data-seed 0, not 1" in str(e.value)


@pytest.mark.parametrize("argv, message", [
    (["--method", "tent", "--no-cache"], "--no-cache switches off ABPEM's feature cache; add abpem"),
    (["--label-csv", "TEXT"], "--label-csv applies to --data read only"),
    (["--frost-dir", "DIR", "--data", "read"], "--frost-dir applies to --data embedded only"),
    (["--seeds", "2", "2"], "--seeds 2 2 repeats a seed"),
    (["--corruption", "fog,fog"], "--corruption names fog twice"),
    (["--corruption", "fog,frog"], "unknown video corruption 'frog'"),
    (["--modality", "audio", "--corruption", "wind", "--noise-dir", "DIR"], "has no wind.wav"),
    (["--data", "read", "--data-root", "DIR"], "--data read needs --data-root, --label-csv, --checkpoint"),
    (["--data", "read", "--data-root", "TEXT", "--label-csv", "TEXT", "--checkpoint", "TEXT",
      "--dataset", "ks50"],
     "is not a folder"),
])
def test_bad_flags_are_refused_before_any_work(tmp_path, argv, message):
    (tmp_path / "notes.txt").write_text("my notes")
    sub = {"DIR": str(tmp_path), "TEXT": str(tmp_path / "notes.txt")}
    args = adapt.build_parser().parse_args(["--method", "source", "--corruption", "contrast",
                                            "--results", str(tmp_path / "r.json")]
                                           + [sub.get(a, a) for a in argv])
    refused(adapt.check_args, args, match=message)
    assert sorted(os.listdir(tmp_path)) == ["notes.txt"]  # nothing written


@pytest.mark.parametrize("argv, message", [
    (["--results", "DIR"], "--results DIR is a folder; give a file name"),
    (["--device", "mps"], "--device mps is not usable in this PyTorch; use cpu"),
    (["--checkpoint", "DIR"], "is a folder; pass a .pt/.pth file"),
    (["--checkpoint", "TEXT"], "notes.txt is not a checkpoint torch can read safely"),
])
def test_bad_files_end_with_one_sentence_and_nothing_written(tmp_path, argv, message):
    (tmp_path / "notes.txt").write_text("my notes")
    sub = {"DIR": str(tmp_path), "TEXT": str(tmp_path / "notes.txt")}
    argv = [sub.get(a, a) for a in argv]
    if "--results" not in argv:
        argv += ["--results", str(tmp_path / "r.json")]
    with pytest.raises(SystemExit) as e:
        adapt.main(["--method", "source", "--corruption", "contrast", *argv])
    assert message.replace("DIR", str(tmp_path)) in str(e.value) and str(e.value).startswith("error: ")
    assert sorted(os.listdir(tmp_path)) == ["notes.txt"]  # nothing written, no stray temp file


def test_batch_size_and_seeds_out_of_range_are_refused_by_the_parser(capsys):
    for argv in (["--batch-size", "0"], ["--seeds", "-3"], ["--severity", "6"]):
        with pytest.raises(SystemExit):
            adapt.main(argv)
        err = capsys.readouterr().err
        assert ": error: argument " + argv[0] + ":" in err.strip().splitlines()[-1] and "Traceback" not in err


def test_help_states_every_default_and_the_methods():
    parser = adapt.build_parser()
    for action in parser._actions:
        if action.dest != "help":
            assert "default" in (action.help or ""), action.dest
    text = parser.format_help().replace("\n", " ")
    assert all(name in text for name in adapt.METHODS)


def test_ctrl_c_ends_with_one_line_and_writes_nothing(tmp_path, monkeypatch):
    def interrupt(*a, **k):
        raise KeyboardInterrupt
    # stopped during the data work of the first corruption
    monkeypatch.setattr(adapt, "corrupted_set", interrupt)
    out = tmp_path / "r.json"
    with pytest.raises(SystemExit) as e:
        adapt.main(["--method", "tent", "--checkpoint", tiny10(tmp_path), "--corruption", "contrast",
                    "--results", str(out)])
    assert str(e.value) == "interrupted: every file written so far is whole; nothing else was saved."
    assert sorted(os.listdir(tmp_path)) == ["tiny10.pt"]
