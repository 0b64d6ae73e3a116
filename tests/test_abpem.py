"""ABPEM (abpem.py): the equations' check values, the stop-gradient, freezing, reset, a tiny run."""
import copy
import json
import math
from types import SimpleNamespace

import pytest
import torch

import abpem
import adapt
from common import CAVMAE
from test_data import read_layout_argv
from conftest import changed_keys, source_stream_accuracy

F64 = dict(dtype=torch.float64)
LOGITS = torch.tensor([[2.0, 1.0, 0.0, -1.0], [0.0, 0.5, 1.5, 0.0]], **F64)


def t(x):
    return torch.tensor(x, **F64)


# ---------------------------------------------------------------------------- Eq. (KL)
def test_gaussian_kl_check_values():
    # KL(N(0,1) || N(1,2^2)) = ln(2/1) + (1 + 1) / (2 * 4) - 1/2 = 0.693147 + 0.25 - 0.5 = 0.443147
    assert abs(abpem.gaussian_kl(t(0.0), t(1.0), t(1.0), t(2.0)).item() - 0.443147) < 1e-6
    # KL(N(1,2^2) || N(0,1)) = ln(1/2) + (4 + 1) / 2 - 1/2 = -0.693147 + 2.5 - 0.5 = 1.306853
    assert abs(abpem.gaussian_kl(t(1.0), t(2.0), t(0.0), t(1.0)).item() - 1.306853) < 1e-6


def test_gaussian_kl_of_itself_is_zero_elementwise():
    mu, sigma = t([-3.0, 0.0, 0.5, 7.0]), t([0.1, 1.0, 2.0, 30.0])
    kl = abpem.gaussian_kl(mu, sigma, mu, sigma)  # ln 1 + sigma^2 / (2 sigma^2) - 1/2 = 0
    assert kl.shape == (4,) and torch.allclose(kl, torch.zeros(4, **F64), atol=1e-15)


# ---------------------------------------------------------------------------- Eq. (STAT), Eq. (AB)
def block(mu, sigma):
    """A 2 x 2 block with mean mu and unbiased std sigma: entries mu -/+ d with 4 d^2 / 3 = sigma^2."""
    d = sigma * math.sqrt(3) / 2
    return [[mu - d, mu + d], [mu - d, mu + d]]


def scores_with(aa, vv, av, va):
    """S (1, 4, 4) with N_a = 2 from four (mu, sigma) blocks; rows = queries, audio first."""
    s = torch.zeros(1, 4, 4, **F64)
    s[0, :2, :2], s[0, 2:, 2:] = t(block(*aa)), t(block(*vv))
    s[0, :2, 2:], s[0, 2:, :2] = t(block(*av)), t(block(*va))
    return s


def test_attention_stats_blocks_and_unbiased_std():
    s = scores_with(aa=(0, 1), vv=(1, 2), av=(-1, 3), va=(2, 0.5))
    st = abpem.attention_stats(s, n_audio=2)
    for name, (mu, sigma) in {"aa": (0, 1), "vv": (1, 2), "av": (-1, 3), "va": (2, 0.5)}.items():
        assert abs(st[name][0].item() - mu) < 1e-12 and abs(st[name][1].item() - sigma) < 1e-12


def test_bootstrap_loss_matches_cross_block_to_the_keys_self_block():
    # S_va (video queries, audio keys) ~ N(1, 2^2) pulled to S_aa ~ N(0, 1): KL = 1.306853
    # S_av (audio queries, video keys) ~ N(0, 1)   pulled to S_vv ~ N(1, 2^2): KL = 0.443147
    # added, not averaged: (ln 1/2 + 2.5 - 0.5) + (ln 2 + 0.25 - 0.5) = 1.75 exactly (the ln 2 terms cancel)
    s = scores_with(aa=(0, 1), vv=(1, 2), av=(0, 1), va=(1, 2))
    assert abs(abpem.attention_bootstrap_loss(s, n_audio=2).item() - 1.75) < 1e-12
    # the swapped pairing (va -> vv, av -> aa) would give KL(N(1,4)||N(1,4)) + KL(N(0,1)||N(0,1)) = 0
    # and a batch of two copies has the same mean over samples
    assert abs(abpem.attention_bootstrap_loss(s.repeat(2, 1, 1), 2).item() - 1.75) < 1e-12


def test_bootstrap_loss_stop_gradient_on_self_attention():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(3, 5, 5, generator=g, **F64).requires_grad_(True)  # N_a = 2, N_v = 3
    abpem.attention_bootstrap_loss(s, n_audio=2).backward()
    g = s.grad
    # aa, vv detached
    assert torch.count_nonzero(g[:, :2, :2]) == 0 and torch.count_nonzero(g[:, 2:, 2:]) == 0
    assert torch.all(g[:, :2, 2:] != 0) and torch.all(g[:, 2:, :2] != 0)  # the cross blocks av, va move


def test_bootstrap_loss_stats_in_fp32_for_half_scores():
    s = scores_with(aa=(0, 1), vv=(1, 2), av=(0, 1), va=(1, 2)).to(torch.bfloat16)
    st = abpem.attention_stats(s, 2)
    assert st["aa"][0].dtype == torch.float32


# ---------------------------------------------------------------------------- Eq. (PEM), Eq. (BAL)
def test_principal_entropy_and_balance_check_values():
    # p = softmax(LOGITS) = [[.643914 .236883 .087144 .032059], [.122995 .202785 .551225 .122995]]
    # top-2 terms -p ln(p + 1e-6): (.283443 + .341155) and (.328315 + .323564) -> mean 0.638239
    assert abs(abpem.principal_entropy(LOGITS, 2).item() - 0.638239) < 1e-6
    # p_bar = [.383455 .219834 .319185 .077527]; H(p_bar) = 1.263327
    assert abs(abpem.balance_entropy(LOGITS).item() - 1.263327) < 1e-6


def test_principal_entropy_of_a_known_distribution():
    logits = torch.log(t([[0.5, 0.3, 0.2]]))
    # full: .5 ln 2 + .3 ln(1/.3) + .2 ln 5 = .346574 + .361192 + .321888 = 1.029653 (eps moves it 3e-6)
    assert abs(abpem.principal_entropy(logits, 3).item() - 1.029653) < 1e-5
    # top-2, no renormalisation: .346574 + .361192 - 2 * 1e-6 (the eps) = 0.707763
    assert abs(abpem.principal_entropy(logits, 2).item() - 0.707763) < 1e-6
    # k larger than K is the full entropy
    assert abpem.principal_entropy(logits, 10).item() == abpem.principal_entropy(logits, 3).item()


def test_principal_entropy_uniform_is_k_over_K_of_log_K():
    # K = 5 uniform: every term is (1/5) ln 5 (up to eps), top-2 -> 2/5 ln 5 = 0.643775
    assert abs(abpem.principal_entropy(torch.zeros(4, 5, **F64), 2).item() - 0.4 * math.log(5)) < 1e-5
    assert abs(abpem.balance_entropy(torch.zeros(4, 5, **F64)).item() - math.log(5)) < 1e-12


def test_principal_entropy_top_k_with_ties():
    # p = [0.2, 0.4, 0.2, 0.2]: top-2 = class 1 and ONE of the tied classes 0, 2, 3
    # value: .4 ln(1/.4) + .2 ln(1/.2) = .366516 + .321888 = 0.688404 whichever tie is taken
    logits = torch.log(t([[0.2, 0.4, 0.2, 0.2]])).requires_grad_(True)
    value = abpem.principal_entropy(logits, 2)
    assert abs(value.item() - (0.4 * math.log(1 / 0.4) + 0.2 * math.log(5))) < 1e-5
    # the tie is broken towards the lowest index (class 0): same gradient as selecting {1, 0} by hand
    value.backward()
    ref = logits.detach().clone().requires_grad_(True)
    p = ref.softmax(1)
    (-(p * torch.log(p + 1e-6))[0, [1, 0]].sum()).backward()
    assert torch.allclose(logits.grad, ref.grad, atol=1e-15)
    assert logits.grad[0, 0] != logits.grad[0, 2] and torch.equal(logits.grad[0, 2], logits.grad[0, 3])


def test_total_loss_signs_and_weights():
    # 1 * 0.5 - 1 * 2.0 + 5 * 0.1 = -1.0
    assert abs(abpem.total_loss(t(0.5), t(2.0), t(0.1), 1.0, 1.0, 5.0).item() + 1.0) < 1e-12


# ---------------------------------------------------------------------------- settings
@pytest.mark.parametrize("dataset, modality, k, w_attn, bs", [
    ("ks50", "video", 8, 1.0, 8), ("ks50", "audio", 7, 5.0, 8), ("vggsound", "video", 28, 1.0, 32),
    ("vggsound", "audio", 30, 1.0, 32), ("embedded", "video", 2, 1.0, 8), ("embedded", "audio", 2, 5.0, 8),
    ("embedded", "both", 2, 1.0, 8)])
def test_published_settings(dataset, modality, k, w_attn, bs):
    model = CAVMAE("tiny")
    adapter = abpem.setup(model, SimpleNamespace(dataset=dataset, modality=modality, use_cache=True))
    assert (adapter.k, adapter.w_attn, abpem.BATCH_SIZE[dataset]) == (k, w_attn, bs)
    # the public code's feature cache, on in all four released scripts, is on by default
    # (32 samples = 4 batches of 8)
    assert adapter.cache is not None and adapter.cache.size == abpem.settings(dataset, modality)["cache_size"]
    assert abpem.setup(model, SimpleNamespace(dataset=dataset, modality=modality,
                                              use_cache=False)).cache is None
    group = adapter.optimizer.param_groups[0]
    assert (group["lr"], group["betas"], group["weight_decay"]) == (1e-4, (0.9, 0.999), 0.0)


# ---------------------------------------------------------------------------- freezing, reset, prediction
@pytest.mark.parametrize("use_cache", [False, True])
def test_updates_exactly_qkv_and_resets(tiny_batch, use_cache):
    torch.manual_seed(0)
    model = CAVMAE("tiny")
    start = copy.deepcopy(model.state_dict())
    adapter = abpem.setup(model, SimpleNamespace(dataset="embedded", modality="video", use_cache=use_cache))
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(abpem.collect_params(model)[1])
    adapter(tiny_batch)
    assert changed_keys(start, model) == {"blocks_u.0.attn.qkv.weight", "blocks_u.0.attn.qkv.bias"}
    first = copy.deepcopy(model.state_dict())
    adapter(tiny_batch)
    assert len(adapter.optimizer.state) > 0 and set(adapter.losses) == {"pem", "bal", "ab", "loss"}
    adapter.reset()
    assert changed_keys(start, model) == set() and len(adapter.optimizer.state) == 0
    # after reset the same batch gives bit-identical updates (Adam's moments and step count restored)
    adapter(tiny_batch)
    assert changed_keys(first, model) == set()


def test_predicts_after_the_update(tiny_batch):
    torch.manual_seed(0)
    model = CAVMAE("tiny")
    before = copy.deepcopy(model)
    adapter = abpem.setup(model, SimpleNamespace(dataset="embedded", modality="video", use_cache=True))
    out = adapter(tiny_batch)
    with torch.no_grad():
        assert torch.allclose(out, model(tiny_batch["audio"], tiny_batch["video"]))  # the updated model
        assert not torch.allclose(out, before(tiny_batch["audio"], tiny_batch["video"]))


def test_feature_cache_is_a_fifo_of_whole_batches():
    cache = abpem.FeatureCache(size=32)
    for i in range(6):  # batches of 8: at most 32 samples = the last 4 batches
        z_a, z_v = cache.push(torch.full((8, 3, 2), float(i)), torch.full((8, 5, 2), float(i)))
    assert z_a.shape == (32, 3, 2) and z_v.shape == (32, 5, 2)
    assert z_a[:, 0, 0].unique().tolist() == [2.0, 3.0, 4.0, 5.0]
    big = abpem.FeatureCache(size=4)  # a batch larger than the cache is still used on its own
    assert big.push(torch.zeros(8, 3, 2), torch.zeros(8, 5, 2))[0].shape[0] == 8


# ---------------------------------------------------------------------------- the runner
@pytest.mark.slow
def test_runner_end_to_end_and_paired_source(tmp_path):
    out = tmp_path / "r.json"
    adapt.main(["--method", "abpem", "--corruption", "gaussian_noise", "--seeds", "1", "--results", str(out)])
    res = json.loads(out.read_text())
    acc = res["accuracy"]["gaussian_noise"]
    assert res["batch_size"] == {"source": 64, "abpem": 8}
    assert 0 <= acc["abpem"]["mean"] <= 100 and 0 <= acc["source"]["mean"] <= 100
    # the Source column is the frozen model's batch-averaged accuracy on the same shuffled stream at
    # Source's batch size (64); ABPEM's time is measured against Source's forward on its own batches of 8
    assert abs(acc["source"]["mean"] - source_stream_accuracy("gaussian_noise", 64)) < 1e-9
    assert set(res["source_ms_per_batch"]) == {"64", "8"} and res["time_ratio_to_source"]["abpem"] > 0


def test_runner_on_read_layout(tmp_path):
    out = tmp_path / "abpem.json"
    adapt.main(read_layout_argv(tmp_path, "abpem") + ["--results", str(out)])
    res = json.loads(out.read_text())
    assert res["batch_size"]["abpem"] == 8  # Kinetics50's batch size; k = 8 is clamped to the 3 classes
    # 6 clips in one batch of 6: the accuracy is a multiple of 100 / 6
    a = res["accuracy"]["gaussian_noise"]["abpem"]["mean"]
    assert 0 <= a <= 100 and abs(a * 6 / 100 - round(a * 6 / 100)) < 1e-5  # float32 batch accuracy
