"""EATA, SAR and DeYO (adapt.py): each filter, weight and loss by hand; freezing, reset, the update rules;
READ's balance term saturating at batch 64."""
import copy
import math
from types import SimpleNamespace

import pytest
import torch

import adapt
from common import CAVMAE
from conftest import changed_keys

D = torch.float64
LN50 = math.log(50)  # 3.912023


# ---------------------------------------------------------------------------- thresholds and weights
def test_entropy_margins_for_50_classes():
    assert abs(adapt.entropy_margin(50, 0.4) - 1.564809) < 1e-6  # E0 = 0.4 * 3.912023
    assert abs(adapt.entropy_margin(50, 0.5) - 1.956012) < 1e-6  # tau_Ent = 0.5 * 3.912023


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
    # cos = 0.22 / (0.902774 * 0.616441) = 0.22 / 0.556506 = 0.395323: kept if epsilon = 0.4, dropped if epsilon = 0.1
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
    assert adapt.fisher_penalty(p, [torch.tensor([1.0, 2.0], dtype=D)], [torch.tensor([0.0, 0.5], dtype=D)]).item() == 1.5


def test_fisher_is_the_mean_of_squared_batch_gradients():
    W = torch.zeros(2, 2, dtype=D, requires_grad=True)
    logits_fn = lambda x: x @ W  # logits [0, 0]: argmax 0, dCE/dlogits = p - y = (-0.5, 0.5)
    F = adapt.fisher_diagonal(logits_fn, [W], [torch.tensor([[1.0, 0.0]], dtype=D), torch.tensor([[0.0, 2.0]], dtype=D)])
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
    assert abs(adapt.plpd(p, p_shuffled).item() - 0.4) < 1e-12  # y_hat = 0: 0.7 - 0.3 (not 0.5, the new argmax)
    e0 = 0.4 * LN50
    w = adapt.deyo_weight(torch.tensor([1.0, 1.8], dtype=D), torch.tensor([0.30, 0.25], dtype=D), e0)
    # exp(1.564809 - 1) + exp(0.3) = 1.759112 + 1.349859 = 3.108971
    # exp(1.564809 - 1.8) + exp(0.25) = 0.790420 + 1.284025 = 2.074445; its loss term 1.8 * 2.074445 = 3.734002
    assert torch.allclose(w, torch.tensor([3.108971, 2.074445], dtype=D), atol=1e-6)
    assert abs(adapt.weighted_entropy(torch.tensor([1.8], dtype=D), w[1:]).item() - 3.734002) < 1e-6


def test_patch_shuffle_by_hand():
    x = torch.arange(16.0, dtype=D).reshape(1, 1, 4, 4)
    # 2 x 2 tiles, row-major: T0 = [[0,1],[4,5]], T1 = [[2,3],[6,7]], T2 = [[8,9],[12,13]], T3 = [[10,11],[14,15]]
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
    """One row per sample, logit 30 on its class (p = 1 - 9e-13), 0 elsewhere; counts[k] samples of class k."""
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
        return {"audio": torch.randn(12, 128, 64, generator=g), "video": torch.randn(12, 3, 64, 64, generator=g),
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
    """Thresholds that keep every sample of a random tiny model (near-uniform predictions, Ent <= ln 10 = 2.3)."""
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


def test_eata_redundancy_margin_default_and_flag(tiny_batch):
    # m uniform over 10 classes, p one-hot: cos = (1/10) / (1 * sqrt(10) / 10) = 1 / sqrt(10) = 0.316228, the
    # smallest |cos| any p can have (|p| <= 1): dropped by BriMPR's 0.1 (and EATA's 0.05), kept by 0.4
    one_hot = torch.zeros(1, 10, dtype=D)
    one_hot[0, 3] = 1
    assert abs(adapt.eata_cosine(one_hot, torch.full((10,), 0.1, dtype=D)).item() - 0.316228) < 1e-6
    torch.manual_seed(0)
    assert adapt.EATA.setup(CAVMAE("tiny"), ctx()).epsilon == 0.1  # BriMPR run.py --d_margin
    flagged = SimpleNamespace(**vars(ctx()), eata_redundancy=0.4)  # adapt.py --eata-redundancy 0.4
    model = CAVMAE("tiny")
    adapter = adapt.EATA.setup(model, flagged)
    assert adapter.epsilon == 0.4
    adapter(tiny_batch)  # m set
    adapter.reset()
    assert adapter.epsilon == 0.4 and adapter.m is None  # reset keeps the margin


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
    assert changed_keys(start, model) == set() and len(adapter.optimizer.state) == 8  # weights back, Adam kept
    assert adapter.recoveries == 1 and adapter.ema == adapter.losses["sam"]  # first ema = L2, kept after recovery
    adapter.reset()
    assert adapter.ema is None


def adam_state(optimizer):
    """A copy of Adam's per-parameter state (exp_avg, exp_avg_sq, step), in parameter order."""
    return copy.deepcopy(optimizer.state_dict()["state"])


def test_sar_recovery_reloads_the_weights_and_keeps_adam_reset_restores_both(tiny_batch):
    model, start, adapter = make("sar")
    keep_everything(adapter)
    adapter.reset_em = -math.inf  # no recovery: two plain steps build up Adam's state
    adapter(tiny_batch)
    adapter(tiny_batch)
    before = {}
    recover = adapter.recover
    adapter.recover = lambda: (before.update(adam_state(adapter.optimizer)), recover())  # the state at recovery
    adapter.reset_em = math.inf
    adapter(tiny_batch)  # third step, then the recovery
    after = adam_state(adapter.optimizer)
    assert adapter.recoveries == 1 and changed_keys(start, model) == set()  # the saved (source) weights
    assert len(after) == len(before) == 8  # norm1 / norm2 weight and bias of blocks_a.0 and blocks_v.0
    for i, s in after.items():  # bit-identical to just before the recovery, not fresh
        assert set(s) == {"step", "exp_avg", "exp_avg_sq"} and float(s["step"]) == 3.0
        assert all(torch.equal(s[k], before[i][k]) for k in s) and s["exp_avg"].abs().sum() > 0
    adapter.reset()  # between corruption types: the source weights and a fresh Adam
    assert changed_keys(start, model) == set() and len(adapter.optimizer.state) == 0
    assert adapter.ema is None and adapter.optimizer.state_dict() == adapter.optimizer_state
