"""Tests of aoept.py: parameter-free attention, the gate, K-means, InfoNCE by hand; prompt insertion
(replaced, not accumulated; stripped); collect; freezing (the memory too); a tiny run of
`python train.py --method aoept`."""
import json
import math
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import aoept  # noqa: E402
import common  # noqa: E402

f64 = dict(dtype=torch.float64)
LN3 = math.log(3.0)


def tiny_backbone(dtype=torch.float32):
    torch.manual_seed(0)
    bb = common.CAVMAE("tiny", num_classes=10).to(dtype).eval()
    for p in bb.parameters():
        p.requires_grad_(False)
    return bb


def tiny_batch(bb, B=6, dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    return {"audio": torch.randn(B, bb.audio_length, bb.mel_bins, generator=g).to(dtype),
            "video": torch.randn(B, 3, bb.image_size, bb.image_size, generator=g).to(dtype),
            "label": torch.arange(B) % 10,
            # samples 0-1 complete, 2-3 lack audio, 4-5 lack video (inputs left non-zero on purpose:
            # the flags alone decide)
            "has_audio": torch.tensor([True, True, False, False, True, True]),
            "has_video": torch.tensor([True, True, True, True, False, False])}


def with_memory(model, K=5, seed=2):
    g = torch.Generator().manual_seed(seed)
    dt = model.head[1].weight.dtype
    D = model.backbone.embed_dim
    model.set_memory(torch.randn(model.depth, K, D, generator=g).to(dt),
                     torch.randn(model.depth, K + 2, D, generator=g).to(dt))
    return model


def block_inputs(model):
    """Record the input of every tower block and of the unified block during the next forward."""
    seen = {}
    bb = model.backbone
    for name, blocks in (("a", bb.blocks_a), ("v", bb.blocks_v), ("u", bb.blocks_u)):
        for l, blk in enumerate(blocks):
            blk.register_forward_pre_hook(lambda mod, args, key=(name, l): seen.__setitem__(key, args[0].detach()))
            blk.register_forward_hook(
                lambda mod, args, out, key=(name, l): seen.__setitem__(key + ("out",), out.detach()))
    return seen


# ----------------------------------------------------------------------------------------------
# Construct: parameter-free multi-head attention, P = LN(Attn(Q, C, C) + Q)
# ----------------------------------------------------------------------------------------------
def test_param_free_attention_two_heads_by_hand():
    # D = 2, H = 2: head h sees channel h only, d_h = 1 (scale 1/sqrt(1) = 1). K = 2 memory rows.
    q = torch.tensor([[LN3, 0.0], [0.0, 0.0]], **f64)
    c = torch.tensor([[0.0, 1.0], [1.0, 0.0]], **f64)
    # row 0, head 0: logits ln3 * [0, 1] = [0, ln3] -> softmax [1/4, 3/4] -> 1/4*0 + 3/4*1 = 0.75
    # row 0, head 1: logits 0 * [1, 0] = [0, 0]     -> [1/2, 1/2]        -> 1/2*1 + 1/2*0 = 0.5
    # row 1: q = 0, both heads uniform -> 0.5, 0.5
    out = aoept.param_free_attention(q, c, num_heads=2)
    assert out.dtype == torch.float64
    assert torch.allclose(out, torch.tensor([[0.75, 0.5], [0.5, 0.5]], **f64), atol=1e-12)


def test_param_free_attention_one_head_scales_by_sqrt_dh():
    # H = 1, d_h = 2: logits = q c^T / sqrt(2); q0 = [sqrt2 ln3, 0] against c = [[0, 0], [1, 0]]
    # gives [0, sqrt2 ln3 / sqrt2] = [0, ln3] -> [1/4, 3/4] -> 1/4*[0, 0] + 3/4*[1, 0] = [0.75, 0]
    # q1 = 0 -> uniform -> [0.5, 0]
    q = torch.tensor([[math.sqrt(2) * LN3, 0.0], [0.0, 0.0]], **f64)
    c = torch.tensor([[0.0, 0.0], [1.0, 0.0]], **f64)
    out = aoept.param_free_attention(q, c, num_heads=1)
    assert torch.allclose(out, torch.tensor([[0.75, 0.0], [0.5, 0.0]], **f64), atol=1e-12)
    # a leading batch dimension gives the same rows
    assert torch.allclose(aoept.param_free_attention(q.expand(3, 2, 2), c.expand(3, 2, 2), 1), out.expand(3, 2, 2))


def test_modal_contextualized_prompt_residual_and_norm():
    q = torch.tensor([[LN3, 0.0], [0.0, 0.0]], **f64)
    c = torch.tensor([[0.0, 1.0], [1.0, 0.0]], **f64)
    # identity "norm": Attn + Q = [[0.75 + ln3, 0.5], [0.5, 0.5]] = [[1.848612, 0.5], [0.5, 0.5]]
    p = aoept.modal_contextualized_prompt(q, c, lambda t: t, num_heads=2)
    assert torch.allclose(p, torch.tensor([[0.75 + LN3, 0.5], [0.5, 0.5]], **f64), atol=1e-12)
    # LayerNorm over D = 2 (eps 0): row [a, b] -> [+1, -1] if a > b; row 1 is constant -> [0, 0]
    ln = torch.nn.LayerNorm(2, eps=0.0).double()
    p = aoept.modal_contextualized_prompt(q, c, ln, num_heads=2)
    assert torch.allclose(p[0], torch.tensor([1.0, -1.0], **f64), atol=1e-12)


# ----------------------------------------------------------------------------------------------
# Instantiate: the gate is 1 exactly when the conditioning modality is missing
# ----------------------------------------------------------------------------------------------
def test_instance_gate_by_hand():
    logits = torch.tensor([[0.0, LN3], [5.0, -5.0]], **f64)
    present = torch.tensor([True, False])
    g = aoept.instance_gate(logits, present)
    # sigmoid(0) = 1/2; sigmoid(ln3) = 3 / (3 + 1) = 0.75; row 1: the other modality is missing -> 1
    assert torch.allclose(g[0], torch.tensor([0.5, 0.75], **f64), atol=1e-12)
    assert torch.equal(g[1], torch.ones(2, **f64))


def test_gate_in_the_model_is_one_exactly_when_the_other_modality_is_missing():
    bb = tiny_backbone(torch.float64)
    model = with_memory(aoept.build(bb, depth=2, shared=False)).double().eval()
    batch = tiny_batch(bb, dtype=torch.float64)
    seen = block_inputs(model)
    with torch.no_grad():
        model(batch)
        L = model.prompt_len
        mcp = {m: aoept.modal_contextualized_prompt(model.query[m], getattr(model, f"memory_{m}"),
                                                    model.prompt_norm[m], model.num_heads) for m in ("a", "v")}
        has = {"a": batch["has_audio"], "v": batch["has_video"]}
        for m, other in (("a", "v"), ("v", "a")):
            for l in range(model.depth):
                got = seen[(m, l)][:, :L]  # (B, L, D) the gated prompt entering block l
                for i in range(6):
                    if not has[other][i]:
                        assert torch.equal(got[i], mcp[m][l]), f"{m} layer {l} sample {i}: gate is not 1"
                    else:
                        assert not torch.allclose(got[i], mcp[m][l]), f"{m} layer {l} sample {i}: gate is 1"
                # the gate source is the other tower's token mean entering block l, prompts excluded
                src = seen[(other, l)][:, L:]
                g = torch.sigmoid(model.gate[m][l](src.mean(1)))  # (B, D)
                want = torch.where(has[other][:, None, None], mcp[m][l] * g[:, None], mcp[m][l].expand(6, L, -1))
                assert torch.allclose(got, want, atol=1e-12)


# ----------------------------------------------------------------------------------------------
# Shared prompts (the public code's default): one query per layer, per-modality projection, own LN and gate
# ----------------------------------------------------------------------------------------------
def test_shared_prompt_by_hand():
    D_s, D = 2, 2
    proj = torch.nn.Sequential(torch.nn.Linear(D_s, D_s), torch.nn.GELU(), torch.nn.Linear(D_s, D)).double()
    with torch.no_grad():
        for lin in (proj[0], proj[2]):
            lin.weight.zero_()
            lin.bias.zero_()
        proj[2].bias.copy_(torch.tensor([0.0, 1.0]))  # W(q) = GELU(0) * 0 + (0, 1) = (0, 1) for any q
    q = torch.randn(3, D_s, **f64)  # L = 3
    memory = torch.tensor([[1.0, 2.0]], **f64)  # one row: softmax over a single key = 1, Attn = (1, 2)
    norm = torch.nn.LayerNorm(D).double()  # weight 1, bias 0, eps 1e-5
    out = aoept.shared_prompt(q, proj, memory, norm, num_heads=1)
    # Attn + W(q) = (1, 2) + (0, 1) = (1, 3): mean 2, variance 1 -> LN = (-1, 1) / sqrt(1 + 1e-5)
    assert torch.allclose(out, torch.tensor([[-1.0, 1.0]] * 3, **f64) / math.sqrt(1 + 1e-5), atol=1e-12)


def test_shared_prompts_come_first_gated_by_their_own_gate_and_are_stripped():
    bb = tiny_backbone(torch.float64)
    model = with_memory(aoept.build(bb, depth=2)).double().eval()  # the default: shared prompts on
    assert model.use_shared and model.shared_query.shape == (2, model.prompt_len, bb.embed_dim // 16)
    batch = tiny_batch(bb, dtype=torch.float64)
    seen = block_inputs(model)
    with torch.no_grad():
        logits = model(batch)
        L = model.prompt_len
        has = {"a": batch["has_audio"], "v": batch["has_video"]}
        memory = {"a": model.memory_a, "v": model.memory_v}
        for m, other in (("a", "v"), ("v", "a")):
            N = bb.n_audio if m == "a" else bb.n_video
            for l in range(2):
                x = seen[(m, l)]
                assert x.shape[1] == 2 * L + N  # [shared; specific; tokens], replaced at each layer
                S = aoept.shared_prompt(model.shared_query[l], model.shared_proj[m][l], memory[m][l],
                                        model.shared_norm[m], model.num_heads)  # (L, D)
                src = seen[(other, l)][:, 2 * L:].mean(1)  # the other tower's token mean entering block l
                g = aoept.instance_gate(model.shared_gate[m][l](src), has[other])  # (B, D), 1 where m' missing
                assert torch.allclose(x[:, :L], S * g[:, None], atol=1e-12)
                g_p = aoept.instance_gate(model.gate[m][l](src), has[other])
                P = aoept.modal_contextualized_prompt(model.query[m][l], memory[m][l], model.prompt_norm[m],
                                                      model.num_heads)
                assert torch.allclose(x[:, L:2 * L], P * g_p[:, None], atol=1e-12)
        u = seen[("u", 0)]  # both prompt sets stripped before the unified block
        assert torch.equal(u, torch.cat([seen[("a", 2, "out")][:, 2 * L:], seen[("v", 2, "out")][:, 2 * L:]], dim=1))
        assert torch.allclose(logits, model.head(bb.norm(bb.blocks_u[0](u)).mean(1)))
    assert "no_shared" in aoept.VARIANTS and not aoept.build(tiny_backbone(), **aoept.VARIANTS["no_shared"]).use_shared


# ----------------------------------------------------------------------------------------------
# Distil: K-means
# ----------------------------------------------------------------------------------------------
def test_kmeans_recovers_the_centres_of_separable_points():
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]], **f64)
    offsets = torch.tensor([[0.5, 0.0], [-0.5, 0.0], [0.0, 0.5], [0.0, -0.5]], **f64)  # mean 0
    x = (centres[:, None] + offsets[None]).reshape(12, 2)  # 4 points around each centre
    got = aoept.kmeans(x, 3, seed=0)
    # each cluster's mean is its centre exactly: (4 c + 0) / 4 = c
    order = torch.argsort(got[:, 0] * 100 + got[:, 1])  # sort to (0,0), (0,10), (10,0)
    assert torch.allclose(got[order], centres[[0, 2, 1]], atol=1e-12)
    assert torch.equal(aoept.kmeans(x, 3, seed=0), got)  # deterministic from the seed


def test_k_rule_fewer_centres_when_data_is_small():
    assert aoept.n_clusters(1050) == 131  # 1050 // 8
    assert aoept.n_clusters(450) == 56  # 450 // 8
    assert aoept.n_clusters(10_000) == 256  # the published K
    assert aoept.n_clusters(5) == 1


# ----------------------------------------------------------------------------------------------
# Auxiliary in-batch InfoNCE
# ----------------------------------------------------------------------------------------------
def test_info_nce_by_hand_over_present_samples_with_stop_gradient():
    p = torch.tensor([[1.0, 0.0], [0.0, 1.0], [3.0, 3.0]], **f64, requires_grad=True)
    f = torch.tensor([[2.0, 0.0], [0.0, 5.0], [-1.0, 7.0]], **f64, requires_grad=True)
    s = torch.tensor(0.0, **f64, requires_grad=True)  # exp(0) = 1
    present = torch.tensor([True, True, False])
    # over samples 0 and 1: cosines = I, logits = [[1, 0], [0, 1]]
    # each row: -log(e / (e + 1)) = log(1 + e^-1) = log(1.367879) = 0.3132617
    loss = aoept.info_nce(p, f, present, s)
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-1)), abs=1e-12)
    loss.backward()
    assert f.grad is None  # the features are detached
    assert p.grad is not None and torch.equal(p.grad[2], torch.zeros(2, **f64))  # absent sample: no term
    assert s.grad is not None
    assert aoept.info_nce(p, f, torch.tensor([True, False, False]), s) is None  # < 2 present: no term


# ----------------------------------------------------------------------------------------------
# Insert: replaced at every prompted layer, passed through after, stripped before fusion
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("m", ["a", "v"])
def test_prompts_replaced_not_accumulated_and_stripped(m):
    bb = tiny_backbone(torch.float64)
    model = with_memory(aoept.build(bb, depth=2, gate=False, shared=False)).double().eval()
    batch = tiny_batch(bb, dtype=torch.float64)
    seen = block_inputs(model)
    with torch.no_grad():
        logits = model(batch)
    L, N = model.prompt_len, (bb.n_audio if m == "a" else bb.n_video)
    P = aoept.modal_contextualized_prompt(model.query[m], getattr(model, f"memory_{m}"),
                                          model.prompt_norm[m], model.num_heads)  # (depth, L, D)
    for l in range(2):  # prompted layers: exactly L prompt tokens, the new ones
        x = seen[(m, l)]
        assert x.shape[1] == L + N  # replaced, not L * (l + 1) + N
        assert torch.equal(x[:, :L], P[l].expand(6, L, -1))
        if l > 0:  # the tokens are the previous block's outputs, its prompt outputs dropped
            assert torch.equal(x[:, L:], seen[(m, l - 1, "out")][:, L:])
            assert not torch.allclose(seen[(m, l - 1, "out")][:, :L], P[l].expand(6, L, -1))
    x = seen[(m, 2)]  # after depth: the prompt outputs of block 1 pass through
    assert torch.equal(x, seen[(m, 1, "out")])
    u = seen[("u", 0)]  # the unified block gets the tokens only, audio first
    assert u.shape[1] == bb.n_audio + bb.n_video
    assert torch.equal(u, torch.cat([seen[("a", 2, "out")][:, L:], seen[("v", 2, "out")][:, L:]], dim=1))
    assert torch.allclose(logits, model.head(bb.norm(bb.blocks_u[0](u)).mean(1)))


def test_map_baseline_selects_the_prompt_of_each_missing_case():
    bb = tiny_backbone(torch.float64)
    model = aoept.build(bb, **aoept.VARIANTS["map"]).double().eval()
    batch = tiny_batch(bb, dtype=torch.float64)
    seen = block_inputs(model)
    with torch.no_grad():
        model(batch)  # no memory needed, prepare is a no-op
    L = model.prompt_len
    case = [0, 0, 1, 1, 2, 2]  # complete, complete, no audio, no audio, no video, no video
    for m in ("a", "v"):
        for l in range(model.depth):
            for i, c in enumerate(case):
                assert torch.equal(seen[(m, l)][i, :L], model.prompts[m][c, l])
    _, names = aoept.collect_params(model)
    assert set(names) == {"prompts.a", "prompts.v", "head.0.weight", "head.0.bias", "head.1.weight", "head.1.bias"}


# ----------------------------------------------------------------------------------------------
# Collect
# ----------------------------------------------------------------------------------------------
def test_collect_means_before_each_layer_and_skips_missing_samples():
    bb = tiny_backbone(torch.float64)
    batch = tiny_batch(bb, dtype=torch.float64)
    feats = aoept.collect(bb, [batch], depth=2, device="cpu")
    assert feats["a"].shape == (4, 2, bb.embed_dim)  # samples 2, 3 lack audio
    assert feats["v"].shape == (4, 2, bb.embed_dim)  # samples 4, 5 lack video
    with torch.no_grad():
        xa = bb.embed_audio(batch["audio"])
        keep = torch.tensor([0, 1, 4, 5])
        assert torch.allclose(feats["a"][:, 0], xa.mean(1)[keep])  # layer 0: the embeddings' mean
        assert torch.allclose(feats["a"][:, 1], bb.blocks_a[0](xa).mean(1)[keep])  # layer 1: after block 0
    memory = aoept.distil(feats["a"])
    assert memory.shape == (2, 1, bb.embed_dim)  # K = max(1, 4 // 8) = 1: the mean of the 4 rows
    assert torch.allclose(memory[:, 0], feats["a"].mean(0), atol=1e-12)


# ----------------------------------------------------------------------------------------------
# Freezing: exactly the intended tensors train; the backbone and the memory do not move
# ----------------------------------------------------------------------------------------------
def expected_trainable(depth, shared=True):
    names = {"query.a", "query.v", "logit_scale", "head.0.weight", "head.0.bias", "head.1.weight", "head.1.bias"}
    names |= {"shared_query"} if shared else set()
    for m in ("a", "v"):
        names |= {f"prompt_norm.{m}.weight", f"prompt_norm.{m}.bias"}
        names |= {f"shared_norm.{m}.weight", f"shared_norm.{m}.bias"} if shared else set()
        for l in range(depth):
            names |= {f"gate.{m}.{l}.net.{i}.{w}" for i in (0, 2) for w in ("weight", "bias")}
            if shared:
                names |= {f"shared_gate.{m}.{l}.net.{i}.{w}" for i in (0, 2) for w in ("weight", "bias")}
                names |= {f"shared_proj.{m}.{l}.{i}.{w}" for i in (0, 2) for w in ("weight", "bias")}
    return names


@pytest.mark.parametrize("variant", ["aoept", "no_shared"])
def test_exactly_the_prompt_modules_and_head_train_one_step_and_reset(variant):
    bb = tiny_backbone()
    model = aoept.build(bb, **aoept.VARIANTS[variant])
    batch = tiny_batch(bb)
    aoept.prepare(model, [batch], "cpu")
    params, names = aoept.collect_params(model)
    assert set(names) == expected_trainable(aoept.DEPTH, shared=variant == "aoept")
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(names)
    assert {"memory_a", "memory_v"} <= {n for n, _ in model.named_buffers()}  # frozen: buffers, not parameters
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0)  # no decay: a change comes from a gradient
    learner = aoept.PromptTuner(model, opt).train()
    logits = learner(batch)
    assert logits.shape == (6, 10)
    after = model.state_dict()
    params_by_name = dict(model.named_parameters())
    for k, v in before.items():
        if k in set(names):
            grad = params_by_name[k].grad
            # a trainable tensor moves, unless its whole gradient is 0 (a gate's ReLU unit that no sample of
            # this batch activates passes no gradient to its input weights)
            assert not torch.equal(after[k], v) or (grad is not None and not grad.any()), f"{k} did not change"
        else:
            assert torch.equal(after[k], v), f"frozen {k} changed"  # backbone.*, memory_a, memory_v
    assert sum(not torch.equal(after[k], before[k]) for k in names) >= len(names) - 4  # at most a few dead units
    learner.reset()
    for k, v in before.items():
        assert torch.equal(model.state_dict()[k], v), f"reset() did not restore {k}"


def test_train_step_total_and_forward_needs_memory():
    bb = tiny_backbone()
    model = aoept.build(bb)
    with pytest.raises(RuntimeError, match="prepare"):
        model(tiny_batch(bb))
    with_memory(model)
    opt = torch.optim.AdamW(aoept.collect_params(model)[0], lr=1e-3)
    _, losses = aoept.train_step(model, tiny_batch(bb), opt)
    assert set(losses) == {"task", "aux", "total"}
    assert losses["aux"] > 0
    assert losses["total"] == pytest.approx(losses["task"] + 0.05 * losses["aux"], rel=1e-5)
    # the MAP-style baseline has no auxiliary loss
    model = aoept.build(tiny_backbone(), **aoept.VARIANTS["map"])
    opt = torch.optim.AdamW(aoept.collect_params(model)[0], lr=1e-3)
    _, losses = aoept.train_step(model, tiny_batch(bb), opt)
    assert losses["aux"] == 0.0 and losses["total"] == pytest.approx(losses["task"])


# ----------------------------------------------------------------------------------------------
# End to end: python train.py --method aoept on a tiny configuration
# ----------------------------------------------------------------------------------------------
def test_train_py_method_aoept_end_to_end(tmp_path):
    import train
    out = tmp_path / "train_aoept.json"
    train.main(["--method", "aoept", "--epochs", "1", "--seeds", "1", "--variants", "aoept",
                "--device", "cpu", "--results", str(out)])
    res = json.loads(out.read_text())
    rows = {(r["protocol"], r["setting"]): r["accuracy"] for r in res["results"]}
    assert set(rows) == {("map", "missing-audio 70%"), ("map", "missing-video 70%"), ("map", "missing-both 70%")}
    for accs in rows.values():
        assert set(accs) == {"aoept"} and len(accs["aoept"]) == 1
        # chance is 10%; the source model alone gets 58-71% on these test sets
        assert 30.0 < accs["aoept"][0] <= 100.0
