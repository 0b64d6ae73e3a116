"""CMPT and AOEPT on the CLIP dual encoder (image-text): LoRA through `qkv_adapter`, the text proxy's mask,
CMPTCLIP's tokens and per-case fusion, the empty-text placeholder, the task loss; AOEPTCLIP's prompt insertion
(replaced / accumulated, stripped), the gate forced to 1, MAP's per-case prompts, collect / distil on CLIP,
what trains, the public configs. Tiny float64 CLIPs (2 or 4 layers of width 8) built here; no data, no train.py."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

import aoept
import cmpt
import common

f64 = dict(dtype=torch.float64)
INF = float("-inf")
VOCAB = 10  # CLIP's convention: end-of-text = the largest id, 9; start-of-text = 8; 0 padding
SOT, EOT = VOCAB - 2, VOCAB - 1
D = 8  # both towers' width
E = 4  # the joint width
# end of text at 3, 2, 4: the batch is cut to eot.max() + 1 = 5 columns, rows 0 and 1 keep padding inside them
TEXT = torch.tensor([[SOT, 3, 5, EOT, 0, 0],
                     [SOT, 4, EOT, 0, 0, 0],
                     [SOT, 2, 6, 7, EOT, 0]])
TEXT_EOT = torch.tensor([3, 2, 4])


def small_config(layers):
    return dict(image_size=8, patch_size=4, vision_width=D, vision_layers=layers, vision_heads=2, embed_dim=E,
                context_length=6, vocab_size=None, text_width=D, text_layers=layers, text_heads=2)


@pytest.fixture
def make_clip(monkeypatch):
    """make_clip(layers=2, seed=0) -> a frozen float64 CLIP of `layers` blocks per tower, width 8, 2 heads,
    8 x 8 images in 4 patches of 4 x 4 (5 image tokens), contexts of 6, joint width 4, vocabulary 10."""
    monkeypatch.setitem(common.CLIP_CONFIGS, "t2", small_config(2))
    monkeypatch.setitem(common.CLIP_CONFIGS, "t4", small_config(4))

    def make(layers=2, seed=0):
        torch.manual_seed(seed)
        clip = common.CLIP(f"t{layers}", vocab_size=VOCAB).double().eval()
        for p in clip.parameters():
            p.requires_grad_(False)
        return clip
    return make


def images(B, seed=1):
    return torch.randn(B, 3, 8, 8, generator=torch.Generator().manual_seed(seed), **f64)


def randomize_lora(model, seed=3, std=0.3):
    """Non-zero LoRA factors B (and fresh A) in every adapted block, so that the adapters change something."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(std * torch.randn(p.shape, generator=g, **f64))


def block_io(clip):
    """Record every block's input (and the text blocks' attention mask) and output during the next forward:
    seen[(m, l)], seen[(m, l, 'mask')], seen[(m, l, 'out')] for m = 'i' (image) / 't' (text)."""
    seen = {}
    for m, blocks in (("i", clip.visual.transformer.resblocks), ("t", clip.transformer.resblocks)):
        for l, blk in enumerate(blocks):
            def pre(mod, args, key=(m, l)):
                seen[key] = args[0].detach()
                seen[key + ("mask",)] = args[1] if len(args) > 1 else None
            blk.register_forward_pre_hook(pre)
            blk.register_forward_hook(lambda mod, args, out, key=(m, l): seen.__setitem__(key + ("out",), out.detach()))
    return seen


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
    assert ad.lora_A.shape == (3, 1, D) and ad.lora_B.shape == (3, D, 1) and ad.scaling == 1.0  # alpha / r = 1 / 1
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
    assert torch.equal(out[..., :D], base[..., :D]) and torch.equal(out[..., 2 * D:], base[..., 2 * D:])  # q, v unchanged
    with torch.no_grad():
        ad.lora_B.zero_()
        ad.lora_B[0] = 1.0  # B_q = 1
        ad.lora_B[2, :, 0] = torch.arange(1, D + 1, **f64) / 4  # B_v = [0.25, 0.5, ..., 2]
        out = attn.project_qkv(x)
    delta = torch.zeros(1, 2, 3 * D, **f64)
    delta[0, 0, :D] = 1.0  # q, token 0: 1 * x_0 = 1
    delta[0, 1, :D] = -1.0  # q, token 1: 1 * (-1) = -1
    delta[0, 0, 2 * D:] = torch.tensor([0.75, 1.5, 2.25, 3.0, 3.75, 4.5, 5.25, 6.0])  # v, token 0: x_2 B_v = 3 B_v
    delta[0, 1, 2 * D:] = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0])  # v, token 1: 4 B_v
    assert torch.equal(out, base + delta)
    # the attention itself uses the adapted projection: it equals a plain attention with merged weights
    # W_qkv + [B_q A_q; B_k A_k; B_v A_v] and W_out + B_o A_o
    with torch.no_grad():
        attn.out_proj.lora_A.normal_()
        attn.out_proj.lora_B.normal_()
        plain = common.FusedQKVAttention(D, 2).double()
        plain.in_proj_weight.copy_(attn.in_proj_weight + torch.cat([ad.lora_B[s] @ ad.lora_A[s] for s in range(3)]))
        plain.in_proj_bias.copy_(attn.in_proj_bias)
        plain.out_proj.weight.copy_(attn.out_proj.base.weight + attn.out_proj.lora_B[0] @ attn.out_proj.lora_A[0])
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
# 3. CMPTCLIP: at LoRA = 0 CLIP's own tokens are CLS_1 and CLS_2
# ----------------------------------------------------------------------------------------------
def test_cmpt_clip_class_tokens_are_clips_embeddings_at_lora_init(make_clip):
    img = images(3)
    ref = make_clip()
    with torch.no_grad():
        want_i, want_t = ref.encode_image(img), ref.encode_text(TEXT)
    # image: without the proxy the image tower is CLIP's (the proxy, a full participant, would change CLS_1)
    model = cmpt.build(make_clip(), num_classes=3, proxy=False).eval()
    with torch.no_grad():
        cls_1, cmpt_1 = model.encode_image(img)
    assert cmpt_1 is None and torch.equal(cls_1, want_i)
    model = cmpt.build(make_clip(), num_classes=3).eval()  # proxy=True
    with torch.no_grad():
        cls_1, cmpt_1 = model.encode_image(img)
        cls_2, cmpt_2 = model.encode_text(TEXT)
    assert not torch.allclose(cls_1, want_i)  # the image proxy is seen by the class token
    # text: the tokens never see the proxy, so the end-of-text token is CLIP's text embedding
    torch.testing.assert_close(cls_2, want_t, rtol=0, atol=1e-12)
    # the proxy's output reads its own text up to the end-of-text token: alone or in the batch, the same
    with torch.no_grad():
        for i in range(3):
            alone = TEXT[i:i + 1, : int(TEXT_EOT[i]) + 1]
            torch.testing.assert_close(model.encode_text(alone)[1], cmpt_2[i:i + 1], rtol=0, atol=1e-12)
        other = TEXT.clone()
        other[0, 1] = 6  # a token inside sample 0's text
        assert not torch.allclose(model.encode_text(other)[1][0], cmpt_2[0])  # the proxy sees it


# ----------------------------------------------------------------------------------------------
# 4. CMPTCLIP: missing codes and Eq. 5 per sample
# ----------------------------------------------------------------------------------------------
def test_cmpt_clip_inputs_and_fusion_per_missing_case(make_clip):
    model = cmpt.build(make_clip(), num_classes=3).eval()
    randomize_lora(model)  # LoRA active: the check is not only CLIP's frozen towers
    img = images(3)
    batch = {"image": img, "text": TEXT, "missing": torch.tensor([0, 1, 2]), "label": torch.tensor([0, 1, 2])}
    x_1, x_2, has_1, has_2 = model.inputs(batch)
    assert x_1 is img and x_2 is TEXT
    assert has_1.tolist() == [True, True, False]  # code 2 = image missing
    assert has_2.tolist() == [True, False, True]  # code 1 = text missing
    _, _, h1, h2 = model.inputs({"image": img, "text": TEXT})  # no codes: all complete
    assert h1.tolist() == h2.tolist() == [True, True, True]
    with torch.no_grad():
        logits = model(batch)
        cls_1, cmpt_1 = model.encode_image(img)
        cls_2, cmpt_2 = model.encode_text(TEXT)
        want = torch.stack([model.head(cls_1[0] + cls_2[0]),  # code 0: CLS_1 + CLS_2
                            model.head(cls_1[1] + cmpt_1[1]),  # code 1, text missing: CLS_1 + CMPT_1
                            model.head(cls_2[2] + cmpt_2[2])])  # code 2, image missing: CLS_2 + CMPT_2
        torch.testing.assert_close(logits, want, rtol=0, atol=1e-12)
        # what is missing is never read: another image for sample 2 changes nothing of its logits
        other = dict(batch, image=torch.cat([img[:2], images(1, seed=9)]))
        torch.testing.assert_close(model(other)[2], logits[2], rtol=0, atol=1e-12)
        # image missing from the whole batch: the image tower does not run, logits = head(CLS_2 + CMPT_2)
        calls = []
        hook = model.backbone.visual.transformer.resblocks[0].register_forward_pre_hook(lambda *a: calls.append(1))
        only_text = model(dict(batch, missing=torch.tensor([2, 2, 2])))
        hook.remove()
    assert calls == []
    torch.testing.assert_close(only_text, model.head(cls_2 + cmpt_2), rtol=0, atol=1e-12)


# ----------------------------------------------------------------------------------------------
# 5. The empty text and modality dropout on CLIP
# ----------------------------------------------------------------------------------------------
def test_blanks_and_drop_modality_put_the_empty_text_in_dropped_complete_samples_only(make_clip):
    model = cmpt.build(make_clip(), num_classes=3)
    empty = [SOT, EOT, 0, 0, 0, 0]  # [start 10 - 2, end 10 - 1, padding]
    # 4 samples, codes 0, 1, 2, 0; as data.with_missing_table gives them, the text-missing sample 1 already
    # holds the empty text and the image-missing sample 2 a zero image (cmpt.IMAGE_PLACEHOLDER "zeros")
    text = torch.stack([TEXT[0], torch.tensor(empty), TEXT[2], TEXT[1]])
    img = images(4)
    img[2] = 0.0
    batch = {"image": img, "text": text, "missing": torch.tensor([0, 1, 2, 0])}
    x_1, x_2, has_1, has_2 = model.inputs(batch)
    blank_1, blank_2 = model.blanks(x_1, x_2)
    assert blank_1 is None  # a dropped image is zeros
    assert blank_2.tolist() == empty and blank_2.dtype == text.dtype
    assert blank_2.argmax().item() == 1  # its end-of-text token (the largest id) is at position 1
    # 0.25 <= u = 0.3 < 0.5: drop the text of the complete samples 0 and 3; sample 2 (no image) keeps its text
    i, t, h1, h2 = cmpt.drop_modality(x_1, x_2, has_1, has_2, u=0.3, blank_1=blank_1, blank_2=blank_2)
    assert t.tolist() == [empty, empty, TEXT[2].tolist(), empty]
    assert h1.tolist() == [True, True, False, True] and h2.tolist() == [False, False, True, False]
    assert torch.equal(i, img)
    # u = 0.1 < 0.25: drop the image of the complete samples 0 and 3 (zeros); sample 1 (no text) keeps its image
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
    assert cmpt.task_loss(logits, torch.tensor([1])).item() == pytest.approx(math.log(4), abs=1e-12)  # -log(1/4)


# ----------------------------------------------------------------------------------------------
# 7. AOEPTCLIP: prompt insertion (replaced), pass-through after depth, stripped; MAP's accumulation
# ----------------------------------------------------------------------------------------------
def with_clip_memory(model, K=3, seed=2):
    g = torch.Generator().manual_seed(seed)
    model.set_memory(torch.randn(model.depth, K, D, generator=g, **f64), torch.randn(model.depth, K + 1, D, generator=g, **f64))
    return model


@pytest.mark.parametrize("depth", [1, 2])
def test_aoept_clip_prompts_replaced_at_prompted_layers_pass_through_after_and_are_stripped(make_clip, depth):
    clip = make_clip()
    model = with_clip_memory(aoept.build(clip, num_classes=3, depth=depth, prompt_len=2, gate=False,
                                         shared=False).double().eval())
    seen = block_io(clip)
    img, L = images(3), 2
    with torch.no_grad():
        logits = model(batch_of(img))
        P = {m: aoept.modal_contextualized_prompt(model.query[m], getattr(model, f"memory_{m}"),
                                                  model.prompt_norm[m], model.num_heads) for m in "it"}  # (depth, L, D)
        tokens = {"i": clip.image_tokens(img), "t": clip.text_tokens(TEXT[:, :5])}  # (3, 5, D) each: 1 + 4 patches; 5 columns
    for m in "it":
        # layer 0: [P^0; CLIP's own embeddings], no positions on the prompts
        assert torch.equal(seen[(m, 0)], torch.cat([P[m][0].expand(3, L, D), tokens[m]], dim=1))
        if depth == 2:  # layer 1: new prompts in place of the prompt outputs of block 0
            assert seen[(m, 1)].shape[1] == L + 5
            assert torch.equal(seen[(m, 1)][:, :L], P[m][1].expand(3, L, D))
            assert torch.equal(seen[(m, 1)][:, L:], seen[(m, 0, "out")][:, L:])
            assert not torch.allclose(seen[(m, 0, "out")][:, :L], P[m][1].expand(3, L, D))
        else:  # after depth: block 0's outputs, its prompt outputs included, go on unchanged
            assert torch.equal(seen[(m, 1)], seen[(m, 0, "out")])
    for l in range(2):  # the text tower: CLIP's causal mask over [prompts; tokens] (the tokens see every prompt)
        assert torch.equal(seen[("t", l, "mask")], common.CLIP.causal_mask(L + 5, dtype=torch.float64))
        assert seen[("i", l, "mask")] is None  # the image tower has none
    # the prompts are stripped before CLIP's pooling: class token (position L), end-of-text (L + eot)
    f = torch.cat([clip.pool_image(seen[("i", 1, "out")][:, L:]), clip.pool_text(seen[("t", 1, "out")][:, L:], TEXT_EOT)], -1)
    torch.testing.assert_close(logits, model.head(f), rtol=0, atol=1e-12)
    wrong = torch.cat([clip.pool_image(seen[("i", 1, "out")]), clip.pool_text(seen[("t", 1, "out")], TEXT_EOT)], -1)
    assert not torch.allclose(logits, model.head(wrong))  # pooling at the prompt positions is another answer


def batch_of(img, missing=None, text=TEXT):
    b = {"image": img, "text": text, "label": torch.tensor([0, 1, 2])[: len(img)]}
    if missing is not None:
        b["missing"] = torch.tensor(missing)
    return b


def test_aoept_clip_accumulated_prompts_stack_in_front_of_the_earlier_ones(make_clip):
    clip = make_clip()
    model = aoept.build(clip, num_classes=3, depth=2, prompt_len=2, memory=False, gate=False, per_case=True,
                        aux_weight=0.0, shared=False, accumulate=True).double().eval()
    seen = block_io(clip)
    img, L, codes = images(3), 2, [0, 1, 2]
    with torch.no_grad():
        logits = model(batch_of(img, codes))
    for m in "it":
        Pm = model.prompts[m]  # (3 cases, depth 2, L, D)
        for i, c in enumerate(codes):
            assert torch.equal(seen[(m, 0)][i, :L], Pm[c, 0])
            # layer 1: 2 L prompt rows, this layer's first, then block 0's output (its prompt outputs kept)
            assert torch.equal(seen[(m, 1)][i, :L], Pm[c, 1])
        assert seen[(m, 1)].shape[1] == 2 * L + 5
        assert torch.equal(seen[(m, 1)][:, L:], seen[(m, 0, "out")])
    assert torch.equal(seen[("t", 1, "mask")], common.CLIP.causal_mask(2 * L + 5, dtype=torch.float64))
    f = torch.cat([clip.pool_image(seen[("i", 1, "out")][:, 2 * L:]),
                   clip.pool_text(seen[("t", 1, "out")][:, 2 * L:], TEXT_EOT)], -1)  # both layers' prompts stripped
    torch.testing.assert_close(logits, model.head(f), rtol=0, atol=1e-12)


# ----------------------------------------------------------------------------------------------
# 8. AOEPTCLIP: the gate is exactly 1 where the conditioning modality is missing
# ----------------------------------------------------------------------------------------------
def test_aoept_clip_gate_is_one_for_image_prompts_without_text_and_text_prompts_without_image(make_clip):
    clip = make_clip()
    model = with_clip_memory(aoept.build(clip, num_classes=3, depth=2, prompt_len=2).double().eval())  # gate, shared
    assert model.use_gate and model.use_shared
    seen = block_io(clip)
    L, codes = 2, torch.tensor([0, 1, 2])  # complete, text missing, image missing
    with torch.no_grad():
        model(batch_of(images(3), codes.tolist()))
        memory = {"i": model.memory_i, "t": model.memory_t}
        present = {"i": codes != 2, "t": codes != 1}
        ungated = {"i": 1, "t": 2}  # the sample whose OTHER modality is missing
        for l in range(2):
            # the gate sources: each tower's features entering layer l, prompts excluded, text padding excluded
            c = {"i": seen[("i", l)][:, 2 * L:].mean(1), "t": aoept.text_mean(seen[("t", l)][:, 2 * L:], TEXT_EOT)}
            for m, other in (("i", "t"), ("t", "i")):
                x = seen[(m, l)]  # [S * gs; P * g; tokens]
                S = aoept.shared_prompt(model.shared_query[l], model.shared_proj[m][l], memory[m][l],
                                        model.shared_norm[m], model.num_heads)  # (L, D)
                P = aoept.modal_contextualized_prompt(model.query[m][l], memory[m][l], model.prompt_norm[m],
                                                      model.num_heads)  # (L, D)
                u = ungated[m]
                assert torch.equal(x[u, :L], S) and torch.equal(x[u, L:2 * L], P), f"{m} layer {l}: gate is not 1"
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
    assert aoept.build(make_clip(2), num_classes=3, **aoept.IMAGE_TEXT_VARIANTS["map"]).depth == 1  # round(0.5 * 2)
    clip = make_clip(4)
    model = aoept.build(clip, num_classes=3, **aoept.IMAGE_TEXT_VARIANTS["map"]).double().eval()
    assert model.depth == 2 and model.prompt_len == 16  # round(0.5 * 4) = 2 layers; MAP's 16 tokens
    assert model.prompts["i"].shape == (3, 2, 16, D)
    seen = block_io(clip)
    codes = [1, 2, 0]
    with torch.no_grad():
        logits = model(batch_of(images(3), codes))
    for m in "it":
        for i, c in enumerate(codes):
            for l in range(2):
                assert torch.equal(seen[(m, l)][i, :16], model.prompts[m][c, l]), f"{m} layer {l} sample {i}"
        assert torch.equal(seen[(m, 1)][:, 16:], seen[(m, 0, "out")])  # accumulated: 32 prompt rows at layer 1
        assert torch.equal(seen[(m, 2)], seen[(m, 1, "out")])  # layers 2, 3: not prompted
    f = torch.cat([clip.pool_image(seen[("i", 3, "out")][:, 32:]), clip.pool_text(seen[("t", 3, "out")][:, 32:], TEXT_EOT)], -1)
    torch.testing.assert_close(logits, model.head(f), rtol=0, atol=1e-12)


# ----------------------------------------------------------------------------------------------
# 10. text_mean, image_text_present, collect_clip
# ----------------------------------------------------------------------------------------------
def test_text_mean_excludes_padding_and_prompts_by_hand():
    x = torch.tensor([[[1.0], [2.0], [6.0], [50.0]],
                      [[3.0], [5.0], [100.0], [200.0]]], **f64)  # (2, 4, 1)
    eot = torch.tensor([2, 1])
    # sample 0: t_0 .. t_2 = (1 + 2 + 6) / 3 = 3; sample 1: t_0 .. t_1 = (3 + 5) / 2 = 4
    assert aoept.text_mean(x, eot).tolist() == [[3.0], [4.0]]
    # one prompt position in front: sample 0 (2 + 6 + 50) / 3 = 19.333..; sample 1 (5 + 100) / 2 = 52.5
    torch.testing.assert_close(aoept.text_mean(x, eot, 1), torch.tensor([[58.0 / 3], [52.5]], **f64), rtol=0, atol=1e-12)


def test_image_text_present_from_codes():
    p = aoept.image_text_present({"image": torch.zeros(3, 3, 8, 8), "missing": torch.tensor([0, 1, 2])})
    assert p["i"].tolist() == [True, True, False] and p["t"].tolist() == [True, False, True]
    p = aoept.image_text_present({"image": torch.zeros(2, 3, 8, 8)})  # no codes: complete
    assert p["i"].tolist() == p["t"].tolist() == [True, True]


def test_collect_clip_layer_input_means_skip_missing_samples_and_prepare_fills_the_memory(make_clip):
    clip = make_clip()
    img = images(5)
    text_2 = torch.tensor([[SOT, 1, EOT, 0, 0, 0], [SOT, 5, 5, 5, 5, EOT]])  # another batch, other lengths
    loader = [batch_of(img[:3], [0, 1, 2]), {"image": img[3:], "text": text_2, "missing": torch.tensor([2, 0]),
                                           "label": torch.tensor([0, 1])}]
    feats = aoept.collect_clip(clip, loader, depth=2, device="cpu")
    # image: samples without code 2 = 0, 1 and 4 (n_i = 3); text: samples without code 1 = 0, 2, 3, 4 (n_t = 4)
    keep_i, keep_t = [0, 1, 4], [0, 2, 3, 4]
    texts = [TEXT[0], TEXT[1], TEXT[2], text_2[0], text_2[1]]
    assert feats["i"].shape == (3, 2, D) and feats["t"].shape == (4, 2, D)
    with torch.no_grad():
        for row, s in enumerate(keep_i):  # every sample alone: mean of [class; 4 patches] entering blocks 0 and 1
            x = clip.image_tokens(img[s:s + 1])
            torch.testing.assert_close(feats["i"][row, 0], x.mean((0, 1)), rtol=0, atol=1e-12)
            torch.testing.assert_close(feats["i"][row, 1], clip.visual.transformer.resblocks[0](x).mean((0, 1)),
                                       rtol=0, atol=1e-12)
        for row, s in enumerate(keep_t):  # every text alone, cut at its end-of-text token: no padding in the mean
            ids = texts[s][: int(texts[s].argmax()) + 1][None]
            x = clip.text_tokens(ids)
            mask = common.CLIP.causal_mask(ids.shape[1], dtype=torch.float64)
            torch.testing.assert_close(feats["t"][row, 0], x.mean((0, 1)), rtol=0, atol=1e-12)
            torch.testing.assert_close(feats["t"][row, 1], clip.transformer.resblocks[0](x, mask).mean((0, 1)),
                                       rtol=0, atol=1e-12)
    # prepare: K = max(1, min(k_max, n // 8)) = 1 here, the mean of the collected rows
    model = aoept.build(clip, num_classes=3, depth=2, prompt_len=2).double()
    aoept.prepare(model, loader, "cpu")
    assert model.memory_i.shape == (2, 1, D) and model.memory_t.shape == (2, 1, D)
    torch.testing.assert_close(model.memory_i[:, 0], feats["i"].mean(0), rtol=0, atol=1e-12)
    torch.testing.assert_close(model.memory_t[:, 0], feats["t"].mean(0), rtol=0, atol=1e-12)


# ----------------------------------------------------------------------------------------------
# 11. What trains on CLIP, and one step
# ----------------------------------------------------------------------------------------------
CLIP_PARTS = {"backbone.visual.proj", "backbone.text_projection", "backbone.visual.ln_post.weight",
              "backbone.visual.ln_post.bias", "backbone.ln_final.weight", "backbone.ln_final.bias"}


def test_aoept_clip_collect_params_and_one_train_step_move_only_those(make_clip):
    model = with_clip_memory(aoept.build(make_clip(), num_classes=3, depth=2, prompt_len=2).double())
    params, names = aoept.collect_params(model)
    expected = {"query.i", "query.t", "shared_query", "logit_scale", "head.weight", "head.bias"} | CLIP_PARTS
    for m in "it":
        expected |= {f"prompt_norm.{m}.{w}" for w in ("weight", "bias")} | {f"shared_norm.{m}.{w}" for w in ("weight", "bias")}
        for l in range(2):
            expected |= {f"{g}.{m}.{l}.net.{i}.{w}" for g in ("gate", "shared_gate") for i in (0, 2)
                         for w in ("weight", "bias")}
            expected |= {f"shared_proj.{m}.{l}.{i}.{w}" for i in (0, 2) for w in ("weight", "bias")}
    assert set(names) == expected and len(params) == len(names) == len(expected)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == expected
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0)  # no decay: a change comes from a gradient
    label = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]], **f64)  # multi-label: BCE
    batch = dict(batch_of(images(3), [0, 1, 2]), label=label)
    logits, losses = aoept.train_step(model, batch, opt)
    assert losses["task"] == pytest.approx(F.binary_cross_entropy_with_logits(logits, label).item(), abs=1e-12)
    after = model.state_dict()
    for k in CLIP_PARTS | {"head.weight", "head.bias", "query.i", "query.t"}:
        assert not torch.equal(after[k], before[k]), f"{k} did not change"
    for k, v in before.items():
        if k.startswith("backbone.") and k not in CLIP_PARTS or k in ("memory_i", "memory_t"):
            assert torch.equal(after[k], v), f"frozen {k} changed"


# ----------------------------------------------------------------------------------------------
# 12. The public CLIP configs; 13. distil's K cap
# ----------------------------------------------------------------------------------------------
def test_image_text_config_values():
    # Food101 / both: L 6, lr 1e-2, wd 2e-2, K 256; 12 layers (ViT-B/16): the configs' depth 4
    assert aoept.image_text_config("food", "both", 12) == dict(prompt_len=6, lr=1e-2, weight_decay=2e-2,
                                                               n_clusters=256, depth=4)
    # HateMemes / text: L 14; 4 layers (the tiny CLIP): depth 2
    cfg = aoept.image_text_config("memes", "text", 4)
    assert cfg["prompt_len"] == 14 and cfg["depth"] == 2
    # MMIMDB / both: L 5, lr 2e-2, wd 1e-4, K 128
    assert aoept.image_text_config("imdb", "both", 4) == dict(prompt_len=5, lr=2e-2, weight_decay=1e-4,
                                                              n_clusters=128, depth=2)


def test_distil_k_is_min_of_k_max_and_n_over_8():
    centres = {0: torch.tensor([[0.0, 0.0], [10.0, 0.0]], **f64), 1: torch.tensor([[0.0, 10.0], [5.0, 5.0]], **f64)}
    offsets = torch.tensor([[0.5, 0.0], [-0.5, 0.0], [0.0, 0.5], [0.0, -0.5]], **f64).repeat(2, 1)  # 8, mean 0

    def feats(per_centre):  # (2 * per_centre, depth 2, 2): per layer, per_centre points around each of its centres
        reps = per_centre // 8
        return torch.stack([(centres[l][:, None] + offsets.repeat(reps, 1)[None]).reshape(-1, 2) for l in (0, 1)], 1)

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
