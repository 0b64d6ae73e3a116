"""Tests of aoept.py on a frozen CLIP (tiny float64 CLIPs of 2 or 4 layers of width 8 built here): the
parameter-free attention, the MCP, the gate, K-means and InfoNCE by hand; prompt insertion (replaced, or
accumulated for MAP; stripped before CLIP's pooling); the gate forced to 1; MAP's per-case prompts;
collect and distil; what trains (the memory does not); the recipes."""
import math

import pytest
import torch
import torch.nn.functional as F

import aoept
import common
from conftest import refused

f64 = dict(dtype=torch.float64)
LN3 = math.log(3.0)
MS = ("image", "text")
from conftest import D, E, EOT, INF, SOT, TEXT, TEXT_EOT, VOCAB, images, small_config  # noqa: F401


def block_io(clip):
    """Record every block's input (and the text blocks' attention mask) and output during the next forward:
    seen[(m, l)], seen[(m, l, 'mask')], seen[(m, l, 'out')] for m = 'image' / 'text'."""
    seen = {}
    for m, blocks in (("image", clip.visual.transformer.resblocks), ("text", clip.transformer.resblocks)):
        for l, blk in enumerate(blocks):
            def pre(mod, args, key=(m, l)):
                seen[key] = args[0].detach()
                seen[key + ("mask",)] = args[1] if len(args) > 1 else None
            blk.register_forward_pre_hook(pre)
            blk.register_forward_hook(
                lambda mod, args, out, key=(m, l): seen.__setitem__(key + ("out",), out.detach()))
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
    batched = aoept.param_free_attention(q.expand(3, 2, 2), c.expand(3, 2, 2), 1)
    assert torch.allclose(batched, out.expand(3, 2, 2))


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
    # S = LN(Attn(W(q), C, C) + W(q))
    out = aoept.modal_contextualized_prompt(proj(q), memory, norm, num_heads=1)
    # Attn + W(q) = (1, 2) + (0, 1) = (1, 3): mean 2, variance 1 -> LN = (-1, 1) / sqrt(1 + 1e-5)
    assert torch.allclose(out, torch.tensor([[-1.0, 1.0]] * 3, **f64) / math.sqrt(1 + 1e-5), atol=1e-12)


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
# 7. AOEPT: prompt insertion (replaced), pass-through after depth, stripped; MAP's accumulation
# ----------------------------------------------------------------------------------------------
def with_clip_memory(model, K=3, seed=2):
    g = torch.Generator().manual_seed(seed)
    model.memory.register_buffer("image", torch.randn(model.depth, K, D, generator=g, **f64))
    model.memory.register_buffer("text", torch.randn(model.depth, K + 1, D, generator=g, **f64))
    return model


def pooled(clip, x_image, x_text, n):
    """CLIP's pooling after n prompt positions: [ln_post(class) @ proj; ln_final(end of text) @ text_proj]."""
    eot = x_text[torch.arange(3), n + TEXT_EOT]
    return torch.cat([clip.pool("image", x_image[:, n]), clip.pool("text", eot)], -1)


@pytest.mark.parametrize("depth", [1, 2])
def test_aoept_clip_prompts_replaced_at_prompted_layers_pass_through_after_and_are_stripped(make_clip, depth):
    clip = make_clip()
    model = with_clip_memory(aoept.build(clip, num_classes=3, depth=depth, prompt_len=2, gate=False,
                                         shared=False).double().eval())
    seen = block_io(clip)
    img, L = images(3), 2
    with torch.no_grad():
        logits = model(batch_of(img))
        P = {m: aoept.modal_contextualized_prompt(model.query[m], getattr(model.memory, m),
                                                  # (depth, L, D)
                                                  model.prompt_norm[m], model.num_heads) for m in MS}
        # (3, 5, D): 1 + 4 patches; 5 columns
        tokens = {m: clip.embed(m, x) for m, x in (("image", img), ("text", TEXT))}
    for m in MS:
        # layer 0: [P^0; CLIP's own embeddings], no positions on the prompts
        assert torch.equal(seen[(m, 0)], torch.cat([P[m][0].expand(3, L, D), tokens[m]], dim=1))
        if depth == 2:  # layer 1: new prompts in place of the prompt outputs of block 0
            assert seen[(m, 1)].shape[1] == L + 5
            assert torch.equal(seen[(m, 1)][:, :L], P[m][1].expand(3, L, D))
            assert torch.equal(seen[(m, 1)][:, L:], seen[(m, 0, "out")][:, L:])
            assert not torch.allclose(seen[(m, 0, "out")][:, :L], P[m][1].expand(3, L, D))
        else:  # after depth: block 0's outputs, its prompt outputs included, go on unchanged
            assert torch.equal(seen[(m, 1)], seen[(m, 0, "out")])
    # the text tower: CLIP's causal mask over [prompts; tokens] (the tokens see every prompt)
    for l in range(2):
        assert torch.equal(seen[("text", l, "mask")], common.CLIP.causal_mask(L + 5, dtype=torch.float64))
        assert seen[("image", l, "mask")] is None  # the image tower has none
    # the prompts are stripped before CLIP's pooling: class token (position L), end-of-text (L + eot)
    f = pooled(clip, seen[("image", 1, "out")], seen[("text", 1, "out")], L)
    torch.testing.assert_close(logits, model.head(f), rtol=0, atol=1e-12)
    wrong = pooled(clip, seen[("image", 1, "out")], seen[("text", 1, "out")], 0)
    assert not torch.allclose(logits, model.head(wrong))  # pooling at the prompt positions is another answer


def batch_of(img, missing=None, text=TEXT):
    """A batch; missing: MAP's case per sample (0 complete, 1 text missing, 2 image missing) -> has_<m>."""
    b = {"image": img, "text": text, "label": torch.tensor([0, 1, 2])[: len(img)]}
    if missing is not None:
        b["has_image"], b["has_text"] = torch.tensor(missing) != 2, torch.tensor(missing) != 1
    return b


def test_aoept_clip_accumulated_prompts_stack_in_front_of_the_earlier_ones(make_clip):
    clip = make_clip()
    model = aoept.build(clip, num_classes=3, depth=2, prompt_len=2, memory=False, gate=False, per_case=True,
                        aux_weight=0.0, shared=False, accumulate=True).double().eval()
    seen = block_io(clip)
    img, L, codes = images(3), 2, [0, 1, 2]
    with torch.no_grad():
        logits = model(batch_of(img, codes))
    for m in MS:
        Pm = model.prompts[m]  # (3 cases, depth 2, L, D)
        for i, c in enumerate(codes):
            assert torch.equal(seen[(m, 0)][i, :L], Pm[c, 0])
            # layer 1: 2 L prompt rows, this layer's first, then block 0's output (its prompt outputs kept)
            assert torch.equal(seen[(m, 1)][i, :L], Pm[c, 1])
        assert seen[(m, 1)].shape[1] == 2 * L + 5
        assert torch.equal(seen[(m, 1)][:, L:], seen[(m, 0, "out")])
    assert torch.equal(seen[("text", 1, "mask")], common.CLIP.causal_mask(2 * L + 5, dtype=torch.float64))
    # both layers' prompts stripped
    f = pooled(clip, seen[("image", 1, "out")], seen[("text", 1, "out")], 2 * L)
    torch.testing.assert_close(logits, model.head(f), rtol=0, atol=1e-12)


# ----------------------------------------------------------------------------------------------
# 8. AOEPT: the gate is exactly 1 where the conditioning modality is missing
# ----------------------------------------------------------------------------------------------
def test_aoept_clip_gate_is_one_for_image_prompts_without_text_and_text_prompts_without_image(make_clip):
    clip = make_clip()
    # gate, shared
    model = with_clip_memory(aoept.build(clip, num_classes=3, depth=2, prompt_len=2).double().eval())
    assert model.use_gate and model.use_shared
    seen = block_io(clip)
    L, codes = 2, torch.tensor([0, 1, 2])  # complete, text missing, image missing
    with torch.no_grad():
        model(batch_of(images(3), codes.tolist()))
        memory = dict(model.memory.named_buffers())
        present = {"image": codes != 2, "text": codes != 1}
        ungated = {"image": 1, "text": 2}  # the sample whose OTHER modality is missing
        for l in range(2):
            # the gate sources: each tower's features entering layer l, without prompts and text padding
            c = {"image": seen[("image", l)][:, 2 * L:].mean(1),
                 "text": aoept.text_mean(seen[("text", l)][:, 2 * L:], TEXT_EOT)}
            for m, other in (("image", "text"), ("text", "image")):
                x = seen[(m, l)]  # [S * gs; P * g; tokens]
                q = model.shared_proj[m][l](model.shared_query[l])
                S = aoept.modal_contextualized_prompt(q, memory[m][l], model.shared_norm[m], model.num_heads)
                P = aoept.modal_contextualized_prompt(model.query[m][l], memory[m][l], model.prompt_norm[m],
                                                      model.num_heads)  # (L, D)
                u = ungated[m]
                assert torch.equal(x[u, :L], S) and torch.equal(x[u, L:2 * L], P), f"{m} {l}: gate is not 1"
                g = torch.sigmoid(model.gate[m][l](c[other]))  # (3, D)
                gs = torch.sigmoid(model.shared_gate[m][l](c[other]))
                for i in range(3):
                    if i == u:
                        continue
                    assert present[other][i]
                    torch.testing.assert_close(x[i, L:2 * L], P * g[i], rtol=0, atol=1e-12)
                    torch.testing.assert_close(x[i, :L], S * gs[i], rtol=0, atol=1e-12)
                    assert not torch.allclose(x[i, L:2 * L], P)  # sigmoid < 1: really gated


# ----------------------------------------------------------------------------------------------
# 9. MAP on CLIP: one prompt set per missing case, half of the layers, accumulated
# ----------------------------------------------------------------------------------------------
def test_map_variant_on_clip_picks_the_prompts_of_each_missing_case(make_clip):
    assert aoept.build(make_clip(2), num_classes=3, **aoept.VARIANTS["map"]).depth == 1  # round(0.5 * 2)
    clip = make_clip(4)
    model = aoept.build(clip, num_classes=3, **aoept.VARIANTS["map"]).double().eval()
    assert model.depth == 2 and model.prompt_len == 16  # round(0.5 * 4) = 2 layers; MAP's 16 tokens
    assert model.prompts["image"].shape == (3, 2, 16, D)
    seen = block_io(clip)
    codes = [1, 2, 0]
    with torch.no_grad():
        logits = model(batch_of(images(3), codes))
    for m in MS:
        for i, c in enumerate(codes):
            for l in range(2):
                assert torch.equal(seen[(m, l)][i, :16], model.prompts[m][c, l]), f"{m} layer {l} sample {i}"
        # accumulated: 32 prompt rows at layer 1
        assert torch.equal(seen[(m, 1)][:, 16:], seen[(m, 0, "out")])
        assert torch.equal(seen[(m, 2)], seen[(m, 1, "out")])  # layers 2, 3: not prompted
    f = pooled(clip, seen[("image", 3, "out")], seen[("text", 3, "out")], 32)
    torch.testing.assert_close(logits, model.head(f), rtol=0, atol=1e-12)


# ----------------------------------------------------------------------------------------------
# 10. text_mean, collect
# ----------------------------------------------------------------------------------------------
def test_text_mean_excludes_padding_and_prompts_by_hand():
    x = torch.tensor([[[1.0], [2.0], [6.0], [50.0]],
                      [[3.0], [5.0], [100.0], [200.0]]], **f64)  # (2, 4, 1)
    eot = torch.tensor([2, 1])
    # sample 0: t_0 .. t_2 = (1 + 2 + 6) / 3 = 3; sample 1: t_0 .. t_1 = (3 + 5) / 2 = 4
    assert aoept.text_mean(x, eot).tolist() == [[3.0], [4.0]]
    # one prompt position in front: sample 0 (2 + 6 + 50) / 3 = 19.333..; sample 1 (5 + 100) / 2 = 52.5
    want = torch.tensor([[58.0 / 3], [52.5]], **f64)
    torch.testing.assert_close(aoept.text_mean(x, eot, 1), want, rtol=0, atol=1e-12)


def test_collect_clip_layer_input_means_skip_missing_samples_and_prepare_fills_the_memory(make_clip):
    clip = make_clip()
    img = images(5)
    text_2 = torch.tensor([[SOT, 1, EOT, 0, 0, 0], [SOT, 5, 5, 5, 5, EOT]])  # another batch, other lengths
    second = {"image": img[3:], "text": text_2, "has_image": torch.tensor([False, True]),
              "has_text": torch.tensor([True, True]), "label": torch.tensor([0, 1])}
    loader = [batch_of(img[:3], [0, 1, 2]), second]
    feats = aoept.collect(clip, loader, depth=2, device="cpu")
    # image: the samples that have it, 0, 1 and 4 (n_i = 3); text: 0, 2, 3, 4 (n_t = 4)
    keep_i, keep_t = [0, 1, 4], [0, 2, 3, 4]
    texts = [TEXT[0], TEXT[1], TEXT[2], text_2[0], text_2[1]]
    assert feats["image"].shape == (3, 2, D) and feats["text"].shape == (4, 2, D)
    with torch.no_grad():
        # every sample alone: mean of [class; 4 patches] entering blocks 0 and 1
        for row, s in enumerate(keep_i):
            x = clip.embed("image", img[s:s + 1])
            torch.testing.assert_close(feats["image"][row, 0], x.mean((0, 1)), rtol=0, atol=1e-12)
            after = clip.tower("image")[0](x).mean((0, 1))
            torch.testing.assert_close(feats["image"][row, 1], after, rtol=0, atol=1e-12)
        # every text alone, cut at its end-of-text token: no padding in the mean
        for row, s in enumerate(keep_t):
            ids = texts[s][: int(texts[s].argmax()) + 1][None]
            x = clip.embed("text", ids)
            mask = common.CLIP.causal_mask(ids.shape[1], dtype=torch.float64)
            torch.testing.assert_close(feats["text"][row, 0], x.mean((0, 1)), rtol=0, atol=1e-12)
            after = clip.tower("text")[0](x, mask).mean((0, 1))
            torch.testing.assert_close(feats["text"][row, 1], after, rtol=0, atol=1e-12)
    # prepare: K = max(1, min(k_max, n // 8)) = 1 here, the mean of the collected rows
    model = aoept.build(clip, num_classes=3, depth=2, prompt_len=2).double()
    aoept.prepare(model, loader, "cpu")
    assert model.memory.image.shape == (2, 1, D) and model.memory.text.shape == (2, 1, D)
    torch.testing.assert_close(model.memory.image[:, 0], feats["image"].mean(0), rtol=0, atol=1e-12)
    torch.testing.assert_close(model.memory.text[:, 0], feats["text"].mean(0), rtol=0, atol=1e-12)


# ----------------------------------------------------------------------------------------------
# 11. What trains on CLIP, and one step
# ----------------------------------------------------------------------------------------------
CLIP_PARTS = {"backbone.visual.proj", "backbone.text_projection", "backbone.visual.ln_post.weight",
              "backbone.visual.ln_post.bias", "backbone.ln_final.weight", "backbone.ln_final.bias"}


def test_aoept_clip_collect_params_and_one_train_step_move_only_those(make_clip):
    model = with_clip_memory(aoept.build(make_clip(), num_classes=3, depth=2, prompt_len=2).double())
    params, names = aoept.collect_params(model)
    expected = {"query.image", "query.text", "shared_query", "logit_scale", "head.weight", "head.bias"}
    expected |= CLIP_PARTS
    for m in MS:
        expected |= {f"{norm}.{m}.{w}" for norm in ("prompt_norm", "shared_norm") for w in ("weight", "bias")}
        for l in range(2):
            expected |= {f"{g}.{m}.{l}.{i}.{w}" for g in ("gate", "shared_gate") for i in (0, 2)
                         for w in ("weight", "bias")}
            expected |= {f"shared_proj.{m}.{l}.{i}.{w}" for i in (0, 2) for w in ("weight", "bias")}
    assert set(names) == expected and len(params) == len(names) == len(expected)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == expected
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0)  # no decay: a change comes from a gradient
    label = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]], **f64)  # multi-label: BCE
    batch = dict(batch_of(images(3), [0, 1, 2]), label=label)
    logits, losses = aoept.train_step(model, batch, opt)
    bce = F.binary_cross_entropy_with_logits(logits, label).item()
    assert losses["task"] == pytest.approx(bce, abs=1e-12)
    after = model.state_dict()
    for k in CLIP_PARTS | {"head.weight", "head.bias", "query.image", "query.text"}:
        assert not torch.equal(after[k], before[k]), f"{k} did not change"
    for k, v in before.items():
        if k.startswith("backbone.") and k not in CLIP_PARTS or k.startswith("memory."):
            assert torch.equal(after[k], v), f"frozen {k} changed"


# ----------------------------------------------------------------------------------------------
# 12. The public CLIP configs; 13. distil's K cap
# ----------------------------------------------------------------------------------------------
def test_distil_k_is_min_of_k_max_and_n_over_8():
    centres = {0: torch.tensor([[0.0, 0.0], [10.0, 0.0]], **f64),
               1: torch.tensor([[0.0, 10.0], [5.0, 5.0]], **f64)}
    # 8, mean 0
    offsets = torch.tensor([[0.5, 0.0], [-0.5, 0.0], [0.0, 0.5], [0.0, -0.5]], **f64).repeat(2, 1)

    # (2 * per_centre, depth 2, 2): per layer, per_centre points around each of its centres
    def feats(per_centre):
        reps = per_centre // 8
        points = [(centres[l][:, None] + offsets.repeat(reps, 1)[None]).reshape(-1, 2) for l in (0, 1)]
        return torch.stack(points, 1)

    def by_x(c):
        return c[torch.argsort(c[:, 0] * 100 + c[:, 1])]

    # n = 16: n // 8 = 2 < k_max = 256 -> K = 2, each centre the mean of its 8 points = the centre
    mem = aoept.distil(feats(8))
    assert mem.shape == (2, 2, 2)
    for l in (0, 1):
        torch.testing.assert_close(by_x(mem[l]), by_x(centres[l]), rtol=0, atol=1e-12)
    # n = 32: n // 8 = 4 but k_max = 2 -> K = 2, the two centres again
    mem = aoept.distil(feats(16), k_max=2)
    assert mem.shape == (2, 2, 2)
    for l in (0, 1):
        torch.testing.assert_close(by_x(mem[l]), by_x(centres[l]), rtol=0, atol=1e-12)
    # k_max = 1: one centre, the mean of everything: layer 0 (5, 0), layer 1 (2.5, 7.5)
    mem = aoept.distil(feats(8), k_max=1)
    torch.testing.assert_close(mem[:, 0], torch.tensor([[5.0, 0.0], [2.5, 7.5]], **f64), rtol=0, atol=1e-12)


# ----------------------------------------------------------------------------------------------
# 14. One step: L = L_task + 0.05 L_aux; the memory must be filled first; the recipes
# ----------------------------------------------------------------------------------------------
def test_train_step_total_and_forward_needs_memory(make_clip):
    model = aoept.build(make_clip(), num_classes=3, prompt_len=2).double()
    refused(model, batch_of(images(3)), match="the AOEPT memory is empty; run aoept.prepare first.")
    with_clip_memory(model)
    opt = torch.optim.AdamW(aoept.collect_params(model)[0], lr=1e-3)
    _, losses = aoept.train_step(model, batch_of(images(3), [0, 1, 2]), opt)
    assert set(losses) == {"task", "aux", "total"} and losses["aux"] > 0
    assert losses["total"] == pytest.approx(losses["task"] + 0.05 * losses["aux"], rel=1e-9)
    model = aoept.build(make_clip(), num_classes=3, **aoept.VARIANTS["map"]).double()  # MAP: no L_aux
    opt = torch.optim.AdamW(aoept.collect_params(model)[0], lr=1e-3)
    _, losses = aoept.train_step(model, batch_of(images(3), [0, 1, 2]), opt)
    assert losses["aux"] == 0.0 and losses["total"] == pytest.approx(losses["task"], rel=1e-12)


def test_recipe_values_embedded_and_paper():
    keys = {"epochs", "batch_size", "lr", "weight_decay", "eps", "betas", "schedule", "warmup",
            "warmup_factor", "power", "grad_clip", "select", "prompt_len", "n_clusters"}
    r = aoept.recipe("food")  # Food101 / both: L 6, lr 1e-2, wd 2e-2, K 256; the embedded budget 2 x 32
    assert set(r) == keys
    assert (r["prompt_len"], r["lr"], r["weight_decay"], r["n_clusters"], r["epochs"], r["batch_size"]) == \
        (6, 1e-2, 2e-2, 256, 2, 32)
    assert (r["schedule"], r["warmup"], r["grad_clip"], r["select"]) == ("cosine", 0.1, 5.0, "last")
    assert aoept.recipe("hatememes", kind="text")["prompt_len"] == 14  # HateMemes / text: L 14
    r = aoept.recipe("mmimdb", paper=True)  # MMIMDB / both: L 5, lr 2e-2, wd 1e-4, K 128; 20 x 128, best val
    assert (r["prompt_len"], r["lr"], r["weight_decay"], r["n_clusters"]) == (5, 2e-2, 1e-4, 128)
    assert (r["epochs"], r["batch_size"], r["select"]) == (20, 128, "best_val")
    r = aoept.recipe("mmimdb", paper=True, variant="map")  # MAP's own: lr 1e-2, wd 2e-2, 16 tokens
    assert (r["prompt_len"], r["lr"], r["weight_decay"]) == (16, 1e-2, 2e-2)
    # the tiny CLIP (4 layers) prompts 2 layers, ViT-B/16's 12 layers the configs' 4
    assert (aoept.TINY_CLIP_DEPTH, aoept.CLIP_DEPTH) == (2, 4)
