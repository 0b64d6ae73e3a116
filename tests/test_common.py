"""common.py: the CAV-MAE and CLIP backbones (published layouts, forward paths, interface), the one
checkpoint loader, metrics helpers and files written whole."""
import math
import os
import zipfile

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import common
from conftest import key_list, refused
from common import CAVMAE, CLIP, FusedQKVAttention, QuickGELU, ResidualBlock

SPEC_KEYS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cavmae_state_dict_ks50.txt")
CLIP_KEYS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "clip_vit_b16_state_dict.txt")
VOCAB = 30  # a small vocabulary for the tiny CLIP; the end-of-text id is VOCAB - 1 = 29, the largest


def published_keys():
    """{key without 'module.': shape} from the published checkpoint's key list (shipped in tests/)."""
    return key_list(SPEC_KEYS, "module.")


@pytest.fixture(scope="module")
def base():
    return CAVMAE("base", num_classes=50)


def test_base_state_dict_equals_published_checkpoint(base):
    sd = {k: tuple(v.shape) for k, v in base.state_dict().items()}
    assert sd == published_keys()
    # the header of the key list: 478 tensors, 164,540,210 values
    assert len(sd) == 478
    assert sum(math.prod(s) for s in sd.values()) == 164_540_210


def test_base_token_counts(base):
    # audio: 1024 frames x 128 bins in 16x16 patches -> (128/16) * (1024/16) = 8 * 64 = 512 tokens
    # video: 224 x 224 in 16x16 patches -> 14 * 14 = 196 tokens
    assert (base.n_audio, base.n_video) == (512, 196)


# ---------------------------------------------------------------------------- checkpoints
def same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("arch", ["cavmae", "clip"])
@pytest.mark.parametrize("layout", ["ours", "bare", "module", "state_dict", "model"])
def test_checkpoint_layouts_load_and_bare_ones_are_recognised_from_shapes(tmp_path, arch, layout):
    torch.manual_seed(0)
    model = CAVMAE("tiny", num_classes=7) if arch == "cavmae" else CLIP("tiny", vocab_size=VOCAB)
    path, sd = str(tmp_path / "m.pt"), model.state_dict()
    if layout == "ours":
        common.save_checkpoint(path, model, epoch=3)
    elif layout == "bare":
        torch.save(sd, path)
    elif layout == "module":  # DataParallel / DistributedDataParallel keys
        torch.save({"module." + k: v for k, v in sd.items()}, path)
    else:  # nested, as other trainers save
        torch.save({layout: sd, "epoch": 3}, path)
    loaded, meta = common.load_checkpoint(path)  # no --config: ours carry it, the others are read from shapes
    assert type(loaded) is type(model) and not loaded.training and same_weights(loaded, model)
    size = {"num_classes": 7} if arch == "cavmae" else {"vocab_size": VOCAB}
    own = {"epoch": 3} if layout == "ours" else {}  # only our files carry metadata
    assert meta == {"config": "tiny", **size, **own}


def test_published_layouts_are_recognised_from_their_shapes():
    # the published key lists on the meta device: shapes without memory
    cavmae = {k: torch.empty(s, device="meta") for k, s in published_keys().items()}
    assert common.looks_like(cavmae) == ("CAV-MAE", "base", "a CAV-MAE of width 768 and 11 layers per tower")
    clip = {k: torch.empty(s, device="meta") for k, s in key_list(CLIP_KEYS).items()}
    assert common.looks_like(clip) == ("CLIP", "base", "a CLIP of width 768 and 12 layers per tower")


def test_checkpoint_of_another_size_or_architecture_is_refused_saying_what_to_pass(tmp_path, monkeypatch):
    path = str(tmp_path / "tiny.pt")
    torch.save(CLIP("tiny", vocab_size=VOCAB).state_dict(), path)
    refused(common.load_checkpoint, path, config="base",
            match="tiny.pt holds a CLIP of width 64 and 4 layers per tower, not the CLIP 'base'; pass "
                  "--config tiny.")
    common.save_checkpoint(path, CAVMAE("tiny", num_classes=3))
    refused(common.load_checkpoint, path, config="base", match="holds a 'tiny' model but --config base was")
    assert common.load_checkpoint(path, config="tiny")[1]["num_classes"] == 3
    # a CAV-MAE of a size no configuration has (2 layers per tower): another file
    monkeypatch.setitem(common.CONFIGS, "odd", dict(common.CONFIGS["tiny"], depth=2))
    torch.save(CAVMAE("odd", num_classes=3).state_dict(), path)
    monkeypatch.delitem(common.CONFIGS, "odd")
    refused(common.load_checkpoint, path, match="tiny.pt holds a CAV-MAE of width 64 and 2 layers per tower, "
                                               "which matches no --config (base, tiny); pass another file.")
    torch.save({"fc.weight": torch.zeros(2, 2)}, path)
    refused(common.load_checkpoint, path, match="holds neither CAV-MAE nor CLIP (first key fc.weight)")


def test_checkpoint_that_does_not_fit_names_the_first_bad_key(tmp_path):
    sd = CAVMAE("tiny", num_classes=10).state_dict()
    sd.pop("norm_a.weight")
    sd["extra.weight"] = torch.zeros(3)
    torch.save(sd, tmp_path / "bad.pth")
    # sorted(missing | unexpected) = [extra.weight, norm_a.weight]
    refused(common.load_checkpoint, str(tmp_path / "bad.pth"),
            match="bad.pth does not fit CAV-MAE 'tiny': 2 keys missing, unexpected or of another shape "
                  "(first extra.weight)")
    sd = CAVMAE("tiny", num_classes=10).state_dict()
    sd["pos_embed_v"] = torch.zeros(1, 5, 64)  # the model's is (1, 16, 64)
    torch.save(sd, tmp_path / "bad.pth")
    refused(common.load_checkpoint, str(tmp_path / "bad.pth"),
            match="1 keys missing, unexpected or of another shape (first pos_embed_v)")
    # pre-trained only
    sd = {k: v for k, v in CAVMAE("tiny").state_dict().items() if not k.startswith("mlp_head")}
    torch.save(sd, tmp_path / "bad.pth")
    refused(common.load_checkpoint, str(tmp_path / "bad.pth"), match="has no mlp_head.1.weight")
    sd = CLIP("tiny", vocab_size=VOCAB).state_dict()
    del sd["token_embedding.weight"]
    torch.save(sd, tmp_path / "bad.pth")
    refused(common.load_checkpoint, str(tmp_path / "bad.pth"), match="has no token_embedding.weight")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_checkpoint_with_nan_or_infinite_weights_is_refused_naming_the_tensor(tmp_path, bad):
    model = CAVMAE("tiny", num_classes=10)
    sd = model.state_dict()
    sd["blocks_v.1.norm1.weight"][3] = bad  # a diverged run: the first bad tensor in state-dict order
    sd["mlp_head.1.bias"][0] = bad
    common.save_checkpoint(str(tmp_path / "diverged.pt"), model)
    refused(common.load_checkpoint, str(tmp_path / "diverged.pt"),
            match="diverged.pt holds NaN or infinite values in blocks_v.1.norm1.weight; the training that "
                  "wrote it diverged: train it again or use another checkpoint.")


def test_missing_and_garbage_checkpoint_files_are_refused(tmp_path):
    refused(common.load_checkpoint, str(tmp_path / "nope.pt"), match="checkpoint nope.pt does not exist")
    (tmp_path / "folder.pt").mkdir()
    refused(common.load_checkpoint, str(tmp_path / "folder.pt"), match="checkpoint folder.pt is a folder")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    refused(common.load_checkpoint, str(tmp_path / "junk.pt"), match="junk.pt is not a checkpoint torch can")
    common.save_checkpoint(str(tmp_path / "whole.pt"), CAVMAE("tiny"))
    whole = (tmp_path / "whole.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(whole[: len(whole) // 2])  # an interrupted download
    refused(common.load_checkpoint, str(tmp_path / "cut.pt"), match="cut.pt is not a checkpoint torch can")
    torch.save({"a": 1}, tmp_path / "foreign.pt")  # a dict of numbers, not of tensors
    refused(common.load_checkpoint, str(tmp_path / "foreign.pt"), match="foreign.pt holds no state dict")


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
    fp16 = {k: v.clone() for k, v in model.state_dict().items()}
    assert fp16["visual.proj"].dtype == torch.float16
    with torch.no_grad():
        traced = torch.jit.trace(model, (torch.randn(2, 3, 48, 48).half(), IDS[:2, :5]), check_trace=False)
    path = str(tmp_path / "ViT-tiny.pt")
    torch.jit.save(traced, path)
    with zipfile.ZipFile(path) as z:  # a TorchScript archive, as OpenAI's ViT-B-16.pt
        assert any(n.endswith("constants.pkl") for n in z.namelist())
    loaded, meta = common.load_checkpoint(path)  # recognised as tiny from its shapes
    assert meta == {"config": "tiny", "vocab_size": VOCAB}
    own = loaded.state_dict()
    assert set(own) == set(fp16) - {"input_resolution", "context_length", "vocab_size"}
    for k, v in own.items():
        assert v.dtype == torch.float32 and torch.equal(v, fp16[k].float()), k


def test_attention_logits_hand_computed():
    # q = k = (1, ..., 1) for every token (weights 0, biases 1): each logit is q.k * d_h^-1/2
    # = 16 * 16^-0.5 = 4 with head dim 64 / 4 = 16.
    torch.manual_seed(0)
    m = CAVMAE("tiny").double()
    qkv = m.blocks_u[0].attn.qkv
    with torch.no_grad():
        qkv.weight[:128].zero_()
        qkv.bias[:128].fill_(1.0)
    z_a, z_v = torch.randn(2, m.n_audio, 64).double(), torch.randn(2, m.n_video, 64).double()
    _, logits = m.fuse(z_a, z_v, return_logits=True)
    assert logits.shape == (2, 4, 48, 48)
    assert torch.allclose(logits, torch.full_like(logits, 4.0))


def test_fuse_logits_reproduce_the_attention_output():
    torch.manual_seed(0)
    m = CAVMAE("tiny").double().eval()
    x = torch.randn(2, 10, 64).double()
    blk = m.blocks_u[0]
    out, logits = blk.attn(blk.norm1(x), return_logits=True)
    v = blk.attn.qkv(blk.norm1(x)).reshape(2, 10, 3, 4, 16)[:, :, 2].transpose(1, 2)  # (B, H, N, d)
    manual = blk.attn.proj((logits.softmax(-1) @ v).transpose(1, 2).reshape(2, 10, 64))
    assert torch.allclose(out, manual)


def test_unimodal_paths_use_their_own_norms():
    torch.manual_seed(0)
    m = CAVMAE("tiny").eval()
    a, v = torch.randn(2, 128, 64), torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        before = {mode: m(a, v, mode) for mode in ("multimodal", "audioonly", "videoonly")}
        m.blocks_u[0].norm1_v.weight.mul_(3.0)  # touches only the video-only path
        m.norm_v.bias.add_(1.0)
        after = {mode: m(a, v, mode) for mode in ("multimodal", "audioonly", "videoonly")}
    assert torch.equal(before["multimodal"], after["multimodal"])
    assert torch.equal(before["audioonly"], after["audioonly"])
    assert not torch.allclose(before["videoonly"], after["videoonly"])


def test_run_blocks_returns_every_block_output():
    torch.manual_seed(0)
    m = CAVMAE("tiny").eval()
    x = torch.randn(2, m.n_audio, 64)
    with torch.no_grad():
        last, outs = m.run_blocks(m.blocks_a, x, return_all=True)
        assert len(outs) == 3 and torch.equal(outs[-1], last)
        assert torch.equal(outs[0], m.blocks_a[0](x))


def test_keep_tokens_keeps_distinct_tokens_in_order():
    B, N, D = 5, 32, 3
    x = torch.arange(N).float().view(1, N, 1).expand(B, N, D).clone()  # token i carries value i
    kept = common.keep_tokens(x, N // 2, generator=torch.Generator().manual_seed(0))
    ids = kept[:, :, 0].long()  # (B, 16) original token indices
    assert ids.shape == (B, 16)
    for row in ids:
        assert len(set(row.tolist())) == 16  # distinct
        assert torch.equal(row, row.sort().values)  # original order
    assert len({tuple(r.tolist()) for r in ids}) > 1  # each sample its own subset


def test_seed_everything_repeats():
    common.seed_everything(3)
    a = torch.randn(4)
    common.seed_everything(3)
    assert torch.equal(a, torch.randn(4))


def test_get_device_default_is_cpu_without_cuda():
    if not torch.cuda.is_available():
        assert common.get_device().type == "cpu"
        refused(common.get_device, "cuda", match="--device cuda is not usable in this PyTorch; use cpu.")
    assert common.get_device("cpu").type == "cpu"


@pytest.mark.skipif(torch.backends.mps.is_available(), reason="this machine has an Apple GPU")
def test_a_device_torch_cannot_use_is_refused_at_once():
    refused(common.get_device, "mps", match="--device mps is not usable in this PyTorch")
    refused(common.get_device, "gpu0", match="--device gpu0 is not usable in this PyTorch")


# ---------------------------------------------------------------------------- files written whole
def test_two_writers_of_one_file_do_not_collide(tmp_path, monkeypatch):
    # Process A starts writing, process B writes the same file meanwhile and finishes first (the two
    # first runs of the probe). With one shared `<path>.tmp`, B renames A's temp file away and A dies;
    # with a temp name per writer both finish and the file holds one whole object.
    path = str(tmp_path / "cache.pt")
    real_save = torch.save
    calls = []

    def save_with_a_rival(obj, f, *a, **kw):
        real_save(obj, f, *a, **kw)
        if not calls:  # the first writer is overtaken once, between writing and renaming
            calls.append(f)
            common.atomic_save({"writer": torch.tensor(2)}, path)

    monkeypatch.setattr(torch, "save", save_with_a_rival)
    common.atomic_save({"writer": torch.tensor(1)}, path)
    monkeypatch.setattr(torch, "save", real_save)
    assert torch.load(path)["writer"].item() == 1  # the last rename wins, whole
    assert os.listdir(tmp_path) == ["cache.pt"]  # no temp file left behind


def test_interrupted_write_leaves_the_old_file_and_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "r.json"
    common.write_json(str(path), {"a": 1})

    def interrupted_dump(obj, f, **kw):
        f.write('{"half": ')
        raise KeyboardInterrupt

    monkeypatch.setattr(common.json, "dump", interrupted_dump)
    with pytest.raises(KeyboardInterrupt):
        common.write_json(str(path), {"a": 2})
    assert path.read_text() == '{\n "a": 1\n}' and os.listdir(tmp_path) == ["r.json"]


def test_embedded_benchmark_cache_is_regenerated_when_truncated(tmp_path, monkeypatch):
    import data
    small, generate = dict(data.EMBEDDED, n_train=4, n_val=2, n_test=3), data.generate_embedded
    monkeypatch.setattr(data, "generate_embedded", lambda seed=0, cfg=None: generate(seed, small))
    monkeypatch.setattr(data, "_RAW", {})
    first = data.embedded_raw(7, cache_dir=str(tmp_path))
    (path,) = list(tmp_path.iterdir())
    # the probe's truncated .cache file (PytorchStreamReader error)
    path.write_bytes(path.read_bytes()[:1000])
    data._RAW.clear()
    again = data.embedded_raw(7, cache_dir=str(tmp_path))
    assert torch.equal(again["test"]["wav"], first["test"]["wav"]) and len(again["test"]["label"]) == 3
    torch.save({"train": {}}, path)  # a foreign file (KeyError before)
    data._RAW.clear()
    again = data.embedded_raw(7, cache_dir=str(tmp_path))
    assert torch.equal(again["train"]["frames"], first["train"]["frames"])


def test_output_paths_are_checked_before_any_work(tmp_path, monkeypatch):
    with pytest.raises(SystemExit, match=f"error: --results {tmp_path} is a folder; give a file name"):
        common.check_output_file(str(tmp_path), "--results")
    (tmp_path / "afile").write_text("x")
    with pytest.raises(SystemExit, match="is a file, not a folder"):
        common.check_output_file(str(tmp_path / "afile" / "sub" / "r.json"), "--out")
    assert common.check_output_file(str(tmp_path / "new" / "r.json"), "--results")  # created on save
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    if os.geteuid() == 0:  # root ignores permission bits: ask as if we were an ordinary user
        real = os.access
        monkeypatch.setattr(os, "access", lambda p, m: False if str(p) == str(locked) else real(p, m))
    with pytest.raises(SystemExit, match="no write permission"):
        common.check_output_file(str(locked / "r.json"), "--results")


def test_sincos_pos_embed_by_hand():
    # dim 4: one frequency omega = 1 / 10000^0 = 1; a token is [sin(col), cos(col), sin(row), cos(row)]
    pe = common.sincos_pos_embed(4, 2, 2)  # (1, 4, 4), row-major
    s1, c1 = math.sin(1.0), math.cos(1.0)
    expected = torch.tensor([[0, 1, 0, 1], [s1, c1, 0, 1], [0, 1, s1, c1], [s1, c1, s1, c1]])
    assert torch.allclose(pe[0], expected, atol=1e-6)


# ---------------------------------------------------------------------------- CLIP
def tiny(seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    return CLIP("tiny", vocab_size=VOCAB).to(dtype).eval()


# ---------------------------------------------------------------------------------------------
# 1. the published layout
# ---------------------------------------------------------------------------------------------
def test_base_state_dict_equals_published_vit_b16():
    sd = {k: tuple(v.shape) for k, v in CLIP("base").state_dict().items()}
    assert sd == key_list(CLIP_KEYS)
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
        y = CLIP.run_blocks(model.transformer.resblocks, x, mask)
        y2 = model.run("text", x2)  # the interface: the text tower with its causal mask
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
        tokens = model.embed("image", img)
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
    # top-right patch: row 0, column 5 -> patch 0 * 6 + 5 = 5 -> token 1 + 5 = 6
    (slice(0, 8), slice(40, 48), 6),
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
        t, t2 = model.embed("image", img), model.embed("image", img2)
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
        # (3, 3)
        cos = F.cosine_similarity(model.encode_image(img)[:, None], model.encode_text(IDS)[None, :], dim=-1)
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
    loss = common.clip_loss(torch.tensor([[2.0, 0.0], [0.0, 2.0]], **d)).item()
    assert loss == pytest.approx(0.1269280110429726, abs=1e-14)
    # [[1, 0], [2, 3]] (rows images, columns texts):
    #   rows:    image 0: -log(e^1 / (e^1 + e^0)) = log(1 + e^-1) = 0.3132616875182229
    #            image 1: -log(e^3 / (e^2 + e^3)) = log(1 + e^-1) = 0.3132616875182229; mean the same
    #   columns: text 0 (1, 2): -log(e^1 / (e^1 + e^2)) = log(1 + e) = 1.3132616875182228
    #            text 1 (0, 3): -log(e^3 / (e^0 + e^3)) = log(1 + e^-3) = 0.04858735157374196
    #            mean 0.6809245195459824
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
