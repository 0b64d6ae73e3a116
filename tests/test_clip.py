"""The CLIP dual encoder: published ViT-B/16 layout, attention and block equations, the two towers'
pooling, logits and loss by hand, and loading (our checkpoints, plain state dicts, OpenAI's TorchScript archive)."""
import math
import os
import zipfile

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import common
from conftest import key_list
from common import CLIP, FusedQKVAttention, QuickGELU, ResidualBlock

SPEC_KEYS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "clip_vit_b16_state_dict.txt")
VOCAB = 30  # a small vocabulary for the tiny model; the end-of-text id is VOCAB - 1 = 29, the largest


def published_keys():
    """{key: shape} from the published ViT-B/16 key list (tests/, shipped with the repository)."""
    return key_list(SPEC_KEYS, "")


def tiny(seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    return CLIP("tiny", vocab_size=VOCAB).to(dtype).eval()


# ---------------------------------------------------------------------------------------------
# 1. the published layout
# ---------------------------------------------------------------------------------------------
def test_base_state_dict_equals_published_vit_b16():
    sd = {k: tuple(v.shape) for k, v in CLIP("base").state_dict().items()}
    assert sd == published_keys()
    # the header of the key list: 302 tensors, 149,620,737 values (OpenAI's ViT-B/16 count)
    assert len(sd) == 302
    assert sum(math.prod(s) for s in sd.values()) == 149_620_737


def test_tiny_needs_a_vocabulary_and_unknown_config_is_refused():
    with pytest.raises(ValueError, match="needs vocab_size"):
        CLIP("tiny")
    with pytest.raises(ValueError, match="unknown CLIP configuration 'huge'"):
        CLIP("huge", vocab_size=10)


# ---------------------------------------------------------------------------------------------
# 2. QuickGELU
# ---------------------------------------------------------------------------------------------
def test_quick_gelu_values():
    y = QuickGELU()(torch.tensor([0.0, 1.0, -1.0], dtype=torch.float64))
    # 0 * sigmoid(0) = 0
    # 1 * sigmoid(1.702) = 1 / (1 + e^-1.702) = 1 / (1 + 0.182331...) = 0.8457957659...
    # -1 * sigmoid(-1.702) = -(1 - 0.8457957659...) = -0.1542042341...
    expected = torch.tensor([0.0, 0.8457957659328212, -0.1542042340671787], dtype=torch.float64)
    assert y.dtype == torch.float64
    torch.testing.assert_close(y, expected, rtol=0, atol=1e-15)


# ---------------------------------------------------------------------------------------------
# 3. fused-qkv attention
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("causal", [False, True])
def test_fused_attention_equals_torch_multihead_attention(causal):
    torch.manual_seed(1)
    B, N, D, H = 3, 5, 16, 4
    attn = FusedQKVAttention(D, H).double()
    with torch.no_grad():
        attn.in_proj_weight.normal_(0, 0.5)
        attn.in_proj_bias.normal_(0, 0.5)
        attn.out_proj.weight.normal_(0, 0.5)
        attn.out_proj.bias.normal_(0, 0.5)
    ref = nn.MultiheadAttention(D, H, batch_first=True, dtype=torch.float64)
    ref.load_state_dict(attn.state_dict())  # same names: in_proj_weight, in_proj_bias, out_proj.*
    x = torch.randn(B, N, D, dtype=torch.float64)
    mask = CLIP.causal_mask(N, dtype=torch.float64) if causal else None
    with torch.no_grad():
        expected, _ = ref(x, x, x, attn_mask=mask, need_weights=False)
        out = attn(x, mask)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("causal", [False, True])
def test_fused_attention_with_zero_queries_and_keys_averages_values(causal):
    torch.manual_seed(2)
    B, N, D, H = 2, 4, 8, 2
    attn = FusedQKVAttention(D, H).double()
    with torch.no_grad():
        attn.in_proj_weight.normal_()
        attn.in_proj_bias.normal_()
        attn.in_proj_weight[: 2 * D] = 0  # q and k rows
        attn.in_proj_bias[: 2 * D] = 0
        attn.out_proj.weight.copy_(torch.eye(D))
        attn.out_proj.bias.zero_()
    x = torch.randn(B, N, D, dtype=torch.float64)
    v = x @ attn.in_proj_weight[2 * D:].t() + attn.in_proj_bias[2 * D:]  # (B, N, D)
    # q = k = 0: every logit is 0, so softmax is uniform over the attended positions
    if causal:
        # position i attends 0..i: (v_0 + ... + v_i) / (i + 1)
        expected = v.cumsum(dim=1) / torch.arange(1, N + 1, dtype=torch.float64)[None, :, None]
        out = attn(x, CLIP.causal_mask(N, dtype=torch.float64))
    else:
        # every position: (v_0 + v_1 + v_2 + v_3) / 4
        expected = v.mean(dim=1, keepdim=True).expand(B, N, D)
        out = attn(x)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-13)
    # position 0 under the mask sees itself only: exactly v_0 (up to rounding)
    if causal:
        torch.testing.assert_close(out[:, 0], v[:, 0], rtol=0, atol=1e-13)


# ---------------------------------------------------------------------------------------------
# 4. causal mask
# ---------------------------------------------------------------------------------------------
def test_causal_mask_values():
    inf = float("-inf")
    expected = torch.tensor([[0.0, inf, inf], [0.0, 0.0, inf], [0.0, 0.0, 0.0]])
    m = CLIP.causal_mask(3)
    assert m.dtype == torch.float32
    assert torch.equal(m, expected)  # -inf == -inf in torch.equal
    assert CLIP.causal_mask(3, dtype=torch.float64).dtype == torch.float64


def test_causal_mask_hides_later_tokens_in_run_blocks():
    model = tiny()
    torch.manual_seed(3)
    x = torch.randn(2, 6, 64, dtype=torch.float64)
    x2 = x.clone()
    x2[:, 4] += torch.randn(2, 64, dtype=torch.float64)  # change token 4 only
    mask = CLIP.causal_mask(6, dtype=torch.float64)
    with torch.no_grad():
        y, ys = CLIP.run_blocks(model.transformer.resblocks, x, mask, return_all=True)
        y2 = CLIP.run_blocks(model.transformer.resblocks, x2, mask)
    assert len(ys) == 4 and torch.equal(ys[-1], y)  # tiny: 4 text blocks, the last output is the result
    assert torch.equal(y[:, :4], y2[:, :4])  # positions 0..3 never see token 4: bit-identical
    assert not torch.allclose(y[:, 4:], y2[:, 4:])  # positions 4, 5 do see it
    # without the mask every position sees token 4
    with torch.no_grad():
        z = CLIP.run_blocks(model.transformer.resblocks, x)
        z2 = CLIP.run_blocks(model.transformer.resblocks, x2)
    assert not torch.allclose(z[:, 0], z2[:, 0])


# ---------------------------------------------------------------------------------------------
# 5. the text tower
# ---------------------------------------------------------------------------------------------
EOT = VOCAB - 1
IDS = torch.tensor([[3, 7, 5, 11, EOT, 0],    # end of text at position 4
                    [4, EOT, 0, 0, 0, 0],     # end of text at position 1
                    [2, 9, 8, EOT, 0, 0]])    # end of text at position 3


def manual_text(model, ids, eot_pos):
    """text_tokens -> blocks (causal) -> ln_final at the given positions -> @ text_projection, full length."""
    x = model.token_embedding(ids) + model.positional_embedding[: ids.shape[1]]
    mask = torch.full((ids.shape[1],) * 2, float("-inf"), dtype=x.dtype).triu(1)
    for blk in model.transformer.resblocks:
        x = blk(x, mask)
    x = model.ln_final(x[torch.arange(len(ids)), torch.tensor(eot_pos)])
    return x @ model.text_projection


def test_encode_text_pools_at_end_of_text_and_ignores_padding():
    model = tiny()
    with torch.no_grad():
        e = model.encode_text(IDS)
        # padded to the full context length (40) with zeros: the same embeddings
        padded = torch.cat([IDS, torch.zeros(3, 40 - 6, dtype=torch.long)], dim=1)
        e_pad = model.encode_text(padded)
        # the manual computation on the whole uncropped 40-token sequence, pooled at 4, 1, 3
        e_ref = manual_text(model, padded, [4, 1, 3])
        # a token after row 1's end of text (position 3, inside the others' span) changes row 1 nothing
        other = IDS.clone()
        other[1, 3] = 17
        e_other = model.encode_text(other)
    assert e.shape == (3, 64)
    assert torch.equal(e, e_pad)
    torch.testing.assert_close(e, e_ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(e_other[1], e[1], rtol=0, atol=1e-12)
    assert torch.equal(e_other[[0, 2]], e[[0, 2]])
    # pooling somewhere else (the position before the end of text) gives another embedding
    with torch.no_grad():
        wrong = manual_text(model, padded, [3, 0, 2])
    for b in range(3):
        assert not torch.allclose(wrong[b], e[b])


# ---------------------------------------------------------------------------------------------
# 6. the image tower
# ---------------------------------------------------------------------------------------------
def test_encode_image_equals_manual_computation():
    model = tiny()
    v = model.visual
    torch.manual_seed(4)
    img = torch.randn(2, 3, 48, 48, dtype=torch.float64)
    p, g = 8, 6  # 48 / 8 = 6 patches a side, 36 patches
    # patches in row-major order, each flattened (channel, row, col) as conv1's weight (D, 3, p, p)
    patches = img.reshape(2, 3, g, p, g, p).permute(0, 2, 4, 1, 3, 5).reshape(2, g * g, 3 * p * p)
    with torch.no_grad():
        x = patches @ v.conv1.weight.reshape(64, -1).t()                       # (2, 36, 64)
        x = torch.cat([v.class_embedding.expand(2, 1, 64), x], dim=1) + v.positional_embedding
        x = v.ln_pre(x)
        tokens = model.image_tokens(img)
        h = x
        for blk in v.transformer.resblocks:
            h = blk(h)
        expected = v.ln_post(h[:, 0]) @ v.proj
        out = model.encode_image(img)
    # 1 + (48 / 8)^2 = 1 + 36 = 37 tokens
    assert tokens.shape == (2, 37, 64)
    torch.testing.assert_close(tokens, x, rtol=0, atol=1e-12)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("rows, cols, token", [
    (slice(0, 8), slice(40, 48), 6),    # top-right patch: row 0, column 5 -> patch 0 * 6 + 5 = 5 -> token 1 + 5 = 6
    (slice(40, 48), slice(0, 8), 31),   # bottom-left patch: row 5, column 0 -> patch 5 * 6 = 30 -> token 31
    (slice(8, 16), slice(16, 24), 9),   # row 1, column 2 -> patch 1 * 6 + 2 = 8 -> token 9
])
def test_image_tokens_are_row_major_patches(rows, cols, token):
    model = tiny()
    torch.manual_seed(5)
    img = torch.randn(1, 3, 48, 48, dtype=torch.float64)
    img2 = img.clone()
    img2[:, :, rows, cols] += 1.0
    with torch.no_grad():
        t, t2 = model.image_tokens(img), model.image_tokens(img2)
    changed = [i for i in range(37) if not torch.equal(t[0, i], t2[0, i])]
    assert changed == [token]


# ---------------------------------------------------------------------------------------------
# 7. logits
# ---------------------------------------------------------------------------------------------
def test_forward_is_scaled_cosine_with_clamp():
    model = tiny()
    torch.manual_seed(6)
    img = torch.randn(3, 3, 48, 48, dtype=torch.float64)
    # logit_scale starts at ln(1 / 0.07) = 2.659260036932778, exp = 1 / 0.07 = 14.285714285714...
    # (the parameter is born float32, so to float32 precision)
    assert model.logit_scale.item() == pytest.approx(2.659260036932778, abs=1e-6)
    scale = model.logit_scale.exp().item()
    assert scale == pytest.approx(14.285714285714286, rel=1e-6)
    with torch.no_grad():
        cos = F.cosine_similarity(model.encode_image(img)[:, None], model.encode_text(IDS)[None, :], dim=-1)  # (3, 3)
        logits = model(img, IDS)
        torch.testing.assert_close(logits, scale * cos, rtol=0, atol=1e-12)
        # exp(ln 1000) = 1000 > 100: clamped to 100
        model.logit_scale.fill_(math.log(1000.0))
        torch.testing.assert_close(model(img, IDS), 100.0 * cos, rtol=0, atol=1e-12)
        # exp(ln 50) = 50 < 100: not clamped
        model.logit_scale.fill_(math.log(50.0))
        torch.testing.assert_close(model(img, IDS), 50.0 * cos, rtol=0, atol=1e-12)
    assert logits.abs().max() <= scale + 1e-12


# ---------------------------------------------------------------------------------------------
# 8. CLIP's symmetric loss
# ---------------------------------------------------------------------------------------------
def test_clip_loss_by_hand():
    d = dict(dtype=torch.float64)
    # uniform logits over 4: both directions give ln 4 = 1.3862943611198906
    assert common.clip_loss(torch.zeros(4, 4, **d)).item() == pytest.approx(1.3862943611198906, abs=1e-14)
    # [[2, 0], [0, 2]]: each row and column CE = -log(e^2 / (e^2 + 1)) = log(1 + e^-2) = 0.1269280110429726
    assert common.clip_loss(torch.tensor([[2.0, 0.0], [0.0, 2.0]], **d)).item() == pytest.approx(0.1269280110429726, abs=1e-14)
    # [[1, 0], [2, 3]] (rows images, columns texts):
    #   rows:    image 0: -log(e^1 / (e^1 + e^0)) = log(1 + e^-1) = 0.3132616875182229
    #            image 1: -log(e^3 / (e^2 + e^3)) = log(1 + e^-1) = 0.3132616875182229   mean 0.3132616875182229
    #   columns: text 0 (1, 2): -log(e^1 / (e^1 + e^2)) = log(1 + e) = 1.3132616875182228
    #            text 1 (0, 3): -log(e^3 / (e^0 + e^3)) = log(1 + e^-3) = 0.04858735157374196  mean 0.6809245195459824
    #   total (0.3132616875182229 + 0.6809245195459824) / 2 = 0.4970931035321027
    logits = torch.tensor([[1.0, 0.0], [2.0, 3.0]], **d)
    assert common.clip_loss(logits).item() == pytest.approx(0.4970931035321027, abs=1e-14)
    # the transpose swaps the two directions: same total
    assert common.clip_loss(logits.t()).item() == pytest.approx(0.4970931035321027, abs=1e-14)


# ---------------------------------------------------------------------------------------------
# 9. the residual block
# ---------------------------------------------------------------------------------------------
def test_residual_block_is_pre_ln_with_residuals():
    torch.manual_seed(7)
    blk = ResidualBlock(16, 4).double()
    with torch.no_grad():
        for prm in blk.parameters():
            prm.normal_(0, 0.5)
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    with torch.no_grad():
        # MLP branch off: x + attn(ln_1(x)) (pre-LN; post-LN would be ln_1(x + attn(x)))
        blk.mlp.c_proj.weight.zero_()
        blk.mlp.c_proj.bias.zero_()
        torch.testing.assert_close(blk(x), x + blk.attn(blk.ln_1(x)), rtol=0, atol=1e-14)
        # both branches off: the identity, bit for bit (x + 0 + 0)
        blk.attn.out_proj.weight.zero_()
        blk.attn.out_proj.bias.zero_()
        assert torch.equal(blk(x), x)
        assert torch.equal(blk(x, CLIP.causal_mask(5, dtype=torch.float64)), x)


def test_residual_block_mlp_branch():
    torch.manual_seed(8)
    blk = ResidualBlock(8, 2).double()
    with torch.no_grad():
        for prm in blk.parameters():
            prm.normal_(0, 0.5)
        blk.attn.out_proj.weight.zero_()
        blk.attn.out_proj.bias.zero_()
    x = torch.randn(2, 3, 8, dtype=torch.float64)
    with torch.no_grad():
        # attention branch off: x + c_proj(QuickGELU(c_fc(ln_2(x)))), QuickGELU(h) = h * sigmoid(1.702 h)
        h = blk.mlp.c_fc(blk.ln_2(x))
        expected = x + blk.mlp.c_proj(h * torch.sigmoid(1.702 * h))
        torch.testing.assert_close(blk(x), expected, rtol=0, atol=1e-14)


# ---------------------------------------------------------------------------------------------
# 10. loading
# ---------------------------------------------------------------------------------------------
def same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_save_clip_then_load_clip_round_trips(tmp_path):
    model = tiny(dtype=torch.float32)
    path = str(tmp_path / "clip_tiny.pt")
    common.save_clip(path, model, epoch=3)
    loaded, meta = common.load_clip(path)  # config and vocabulary from the file
    assert (loaded.config, loaded.vocab_size) == ("tiny", VOCAB)
    assert meta["config"] == "tiny" and meta["vocab_size"] == VOCAB and meta["epoch"] == 3
    assert not loaded.training
    assert same_weights(loaded, model)
    # our checkpoint says 'tiny'; asking for 'base' is refused, naming both
    with pytest.raises(common.CheckpointError, match="holds a 'tiny' CLIP model but --config base"):
        common.load_clip(path, config="base")


def test_plain_state_dict_loads_with_config(tmp_path):
    model = tiny(seed=1, dtype=torch.float32)
    path = str(tmp_path / "plain.pt")
    torch.save(model.state_dict(), path)
    loaded, meta = common.load_clip(path, config="tiny")
    assert (loaded.config, loaded.vocab_size) == ("tiny", VOCAB)  # vocabulary from token_embedding.weight (30, 64)
    assert meta == {"config": "tiny", "vocab_size": VOCAB}
    assert same_weights(loaded, model)


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::torch.jit.TracerWarning")
def test_torchscript_archive_like_openai(tmp_path):
    model = tiny(seed=2, dtype=torch.float32)
    # OpenAI's archive holds three non-weight entries next to the weights
    # (our model keeps context_length and vocab_size as plain attributes: replace them by buffers)
    del model.context_length, model.vocab_size
    model.register_buffer("input_resolution", torch.tensor(48))
    model.register_buffer("context_length", torch.tensor(40))
    model.register_buffer("vocab_size", torch.tensor(VOCAB))
    model = model.half()
    assert model.input_resolution.dtype == torch.int64  # .half() leaves integer buffers alone
    fp16 = {k: v.clone() for k, v in model.state_dict().items()}
    assert fp16["visual.proj"].dtype == torch.float16
    img = torch.randn(2, 3, 48, 48).half()
    ids = IDS[:2, :5]
    with torch.no_grad():
        traced = torch.jit.trace(model, (img, ids), check_trace=False)
    path = str(tmp_path / "ViT-tiny.pt")
    torch.jit.save(traced, path)
    with zipfile.ZipFile(path) as z:  # a TorchScript archive, as OpenAI's ViT-B-16.pt
        assert any(n.endswith("constants.pkl") for n in z.namelist())

    sd, meta = common.read_clip_state_dict(path)
    assert meta == {}
    assert set(sd) == set(fp16) - {"input_resolution", "context_length", "vocab_size"}
    loaded, meta = common.load_clip(path, config="tiny")
    assert meta == {"config": "tiny", "vocab_size": VOCAB}
    own = loaded.state_dict()
    assert set(own) == set(sd)
    for k, v in own.items():
        assert v.dtype == torch.float32, k
        assert torch.equal(v, fp16[k].float()), k


def test_mismatched_state_dict_names_each_key(tmp_path):
    sd = tiny(dtype=torch.float32).state_dict()
    del sd["ln_final.bias"]                                # missing
    sd["visual.extra_token"] = torch.zeros(3)              # unexpected
    sd["text_projection"] = torch.zeros(64, 32)            # wrong shape: the model's is (64, 64)
    path = str(tmp_path / "bad.pt")
    torch.save(sd, path)
    with pytest.raises(common.CheckpointError) as e:
        common.load_clip(path, config="tiny")
    msg = str(e.value)
    assert "missing 1 key (ln_final.bias)" in msg
    assert "unexpected 1 key (visual.extra_token)" in msg
    assert "text_projection (64, 32) vs model (64, 64)" in msg
    assert path in msg and "CLIP ViT checkpoint" in msg
    # the same through load_state_dict_strict directly
    with pytest.raises(common.CheckpointError, match=r"missing 1 key \(ln_final.bias\)"):
        common.load_state_dict_strict(tiny(dtype=torch.float32), sd, source="x")


def test_unusable_paths_give_one_clear_sentence(tmp_path):
    missing = str(tmp_path / "nowhere.pt")
    with pytest.raises(common.CheckpointError) as e:
        common.load_clip(missing, config="tiny")
    assert f"CLIP weights file {missing} does not exist" in str(e.value)
    assert "ViT-B-16.pt" in str(e.value)

    with pytest.raises(common.CheckpointError) as e:
        common.load_clip(str(tmp_path), config="tiny")
    assert f"{tmp_path} is a folder, not a CLIP weights file; pass the .pt file inside it." in str(e.value)

    text = tmp_path / "notes.pt"
    text.write_text("these are not weights\n")
    with pytest.raises(common.CheckpointError) as e:
        common.load_clip(str(text), config="tiny")
    assert str(e.value) == f"{text} is a text file (starting 'these are not weights'), not a PyTorch checkpoint."


def test_state_dict_without_token_embedding_is_a_checkpoint_error(tmp_path):
    # a tiny file without token_embedding.weight: the vocabulary cannot be read from it, and the key is
    # missing; the answer should be the same CheckpointError naming the missing key, not CLIP()'s ValueError
    sd = tiny(dtype=torch.float32).state_dict()
    del sd["token_embedding.weight"]
    path = str(tmp_path / "no_vocab.pt")
    torch.save(sd, path)
    with pytest.raises(common.CheckpointError, match=r"missing 1 key \(token_embedding.weight\)"):
        common.load_clip(path, config="tiny")
