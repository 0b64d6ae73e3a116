"""The CAV-MAE backbone: published checkpoint layout, checkpoint errors, forward paths, token subsets."""
import math
import os

import pytest
import torch

import common
from common import CAVMAE

SPEC_KEYS = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "spec", "cavmae_state_dict_ks50.txt")


def published_keys():
    """{key without 'module.': shape} from the published checkpoint's key list (shared/spec, beside the repo)."""
    assert os.path.isfile(SPEC_KEYS), f"this test reads the published key list at {SPEC_KEYS}"
    keys = {}
    for line in open(SPEC_KEYS):
        if line.startswith("#") or not line.strip():
            continue
        name, shape = line.rstrip("\n").split("\t")
        keys[name[len("module."):]] = tuple(int(s) for s in shape.strip("()").split(",") if s.strip())
    return keys


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


def test_load_published_layout_with_module_prefix(tmp_path):
    src = CAVMAE("tiny", num_classes=7)
    path = tmp_path / "published_style.pth"
    torch.save({"module." + k: v for k, v in src.state_dict().items()}, path)  # DataParallel keys
    model, meta = common.load_checkpoint(str(path), config="tiny")
    assert meta["num_classes"] == 7
    for k, v in src.state_dict().items():
        assert torch.equal(model.state_dict()[k], v)


def test_wrong_checkpoint_names_missing_unexpected_and_misshaped_keys(tmp_path):
    sd = CAVMAE("tiny", num_classes=10).state_dict()
    sd.pop("norm_a.weight")
    sd["extra.weight"] = torch.zeros(3)
    sd["pos_embed_v"] = torch.zeros(1, 5, 64)
    path = tmp_path / "bad.pth"
    torch.save(sd, path)
    with pytest.raises(common.CheckpointError) as e:
        common.load_checkpoint(str(path), config="tiny")
    msg = str(e.value)
    assert "missing keys: norm_a.weight" in msg
    assert "unexpected keys: extra.weight" in msg
    assert "pos_embed_v (1, 5, 64) vs model (1, 16, 64)" in msg


def test_missing_and_garbage_checkpoint_files(tmp_path):
    with pytest.raises(common.CheckpointError, match="does not exist"):
        common.load_checkpoint(str(tmp_path / "nope.pt"))
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(common.CheckpointError, match="could not read"):
        common.load_checkpoint(str(tmp_path / "junk.pt"))


def test_save_load_round_trip(tmp_path):
    m = CAVMAE("tiny", num_classes=10)
    common.save_checkpoint(str(tmp_path / "c.pt"), m, note="x")
    m2, meta = common.load_checkpoint(str(tmp_path / "c.pt"))
    assert meta["note"] == "x" and meta["config"] == "tiny"
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), m2.state_dict().values()))


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
        with pytest.raises(SystemExit, match="CUDA is not available"):
            common.get_device("cuda")
    assert common.get_device("cpu").type == "cpu"
