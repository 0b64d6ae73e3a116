"""The CAV-MAE backbone: published checkpoint layout, checkpoint errors, forward paths, token subsets."""
import math
import os

import pytest
import torch

import common
from conftest import key_list
from common import CAVMAE

SPEC_KEYS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cavmae_state_dict_ks50.txt")


def published_keys():
    """{key without 'module.': shape} from the published checkpoint's key list (tests/, shipped with the repository)."""
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
    # one sentence: the three counts, then what to do
    assert str(e.value) == (f"{path} does not fit CAVMAE(config='tiny', num_classes=10): missing 1 key (norm_a.weight), "
                            "unexpected 1 key (extra.weight), wrongly shaped 1 key (pos_embed_v (1, 5, 64) vs model "
                            "(1, 16, 64)); check --config and that the file is a CAV-MAE fine-tuned checkpoint.")


def test_checkpoint_mismatch_message_counts_and_shows_the_first_three_of_each_kind(tmp_path):
    sd = CAVMAE("tiny", num_classes=10).state_dict()
    blocks = sorted(k for k in sd if k.startswith("blocks_a."))  # 20 tensors per tiny block x 3 blocks
    for k in blocks:
        sd.pop(k)
    path = tmp_path / "no_audio_blocks.pth"
    torch.save(sd, path)
    with pytest.raises(common.CheckpointError) as e:
        common.load_checkpoint(str(path), config="tiny")
    msg = str(e.value)
    assert len(blocks) == 60 and f"missing 60 keys (first: {', '.join(blocks[:3])}), " in msg
    assert "unexpected 0 keys, wrongly shaped 0 keys; " in msg and blocks[3] not in msg
    assert len(msg) - len(str(path)) < 300 and msg.count(". ") == 0  # one sentence, not a list of 60 keys
    assert common.count_keys("missing", ["a", "b", "c", "d"]) == "missing 4 keys (first: a, b, c)"
    assert common.count_keys("missing", ["a", "b"]) == "missing 2 keys (a, b)"


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_checkpoint_with_nan_or_infinite_weights_is_refused_naming_the_tensor(tmp_path, bad):
    model = CAVMAE("tiny", num_classes=10)
    sd = model.state_dict()
    sd["blocks_v.1.norm1.weight"][3] = bad  # a diverged run: the first bad tensor in state-dict order
    sd["mlp_head.1.bias"][0] = bad
    path = tmp_path / "diverged.pt"
    common.save_checkpoint(str(path), model)
    with pytest.raises(common.CheckpointError) as e:
        common.load_checkpoint(str(path))
    assert str(e.value) == (f"{path} holds NaN or infinite values in blocks_v.1.norm1.weight (first of 2 such tensors); "
                            f"the training that wrote it diverged or the file is damaged: train it again or use "
                            f"another checkpoint.")


def test_missing_and_garbage_checkpoint_files_say_what_they_are(tmp_path):
    with pytest.raises(common.CheckpointError, match="does not exist"):
        common.load_checkpoint(str(tmp_path / "nope.pt"))
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(common.CheckpointError, match="is a text file .*'not a checkpoint'.*not a PyTorch checkpoint"):
        common.load_checkpoint(str(tmp_path / "junk.pt"))
    (tmp_path / "folder.pt").mkdir()
    with pytest.raises(common.CheckpointError, match="is a folder, not a checkpoint file"):
        common.load_checkpoint(str(tmp_path / "folder.pt"))
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(common.CheckpointError, match=r"is empty \(0 bytes\)"):
        common.load_checkpoint(str(tmp_path / "empty.pt"))
    common.save_checkpoint(str(tmp_path / "whole.pt"), CAVMAE("tiny"))
    whole = (tmp_path / "whole.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(whole[: len(whole) // 2])  # an interrupted download
    with pytest.raises(common.CheckpointError, match="truncated or damaged"):
        common.load_checkpoint(str(tmp_path / "cut.pt"))
    torch.save({"a": 1}, tmp_path / "foreign.pt")  # a dict of numbers, not of tensors
    with pytest.raises(common.CheckpointError, match="is not a CAV-MAE state dict"):
        common.load_checkpoint(str(tmp_path / "foreign.pt"))


def test_config_that_contradicts_the_checkpoint_is_refused(tmp_path):
    common.save_checkpoint(str(tmp_path / "t.pt"), CAVMAE("tiny", num_classes=3))
    with pytest.raises(common.CheckpointError, match="holds a 'tiny' model but --config base was given"):
        common.load_checkpoint(str(tmp_path / "t.pt"), config="base")
    assert common.load_checkpoint(str(tmp_path / "t.pt"), config="tiny")[1]["num_classes"] == 3


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


@pytest.mark.skipif(torch.backends.mps.is_available(), reason="this machine has an Apple GPU")
def test_a_device_torch_cannot_use_is_refused_at_once():
    with pytest.raises(SystemExit, match="error: --device mps is not available in this PyTorch build"):
        common.get_device("mps")
    with pytest.raises(SystemExit, match="is not a device name"):
        common.get_device("gpu0")


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


@pytest.mark.parametrize("damage", ["truncated", "foreign", "text"])
def test_cache_file_that_is_damaged_is_rebuilt(tmp_path, damage):
    path = tmp_path / "c.pt"
    common.atomic_save({"x": torch.arange(1000)}, str(path))
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:300])
    elif damage == "foreign":
        torch.save({"y": torch.zeros(2)}, path)  # readable, but not what this cache holds
    else:
        path.write_text("hello")
    notes = []
    obj = common.load_or_rebuild(str(path), lambda: {"x": torch.arange(5)}, valid=lambda o: "x" in o, note=notes.append)
    assert torch.equal(obj["x"], torch.arange(5)) and torch.equal(torch.load(path)["x"], torch.arange(5))
    assert "rebuilding" in notes[0]
    # the rebuilt file is used from now on
    assert common.load_or_rebuild(str(path), lambda: 1 / 0, valid=lambda o: "x" in o)["x"].tolist() == [0, 1, 2, 3, 4]


def test_embedded_benchmark_cache_is_regenerated_when_truncated(tmp_path, monkeypatch):
    import data
    small, generate = dict(data.EMBEDDED, n_train=4, n_val=2, n_test=3), data.generate_embedded
    monkeypatch.setattr(data, "generate_embedded", lambda seed=0, cfg=None: generate(seed, small))
    monkeypatch.setattr(data, "_RAW", {})
    first = data.embedded_raw(7, cache_dir=str(tmp_path))
    (path,) = list(tmp_path.iterdir())
    path.write_bytes(path.read_bytes()[:1000])  # the probe's truncated .cache file (PytorchStreamReader error)
    data._RAW.clear()
    again = data.embedded_raw(7, cache_dir=str(tmp_path))
    assert torch.equal(again["test"]["wav"], first["test"]["wav"]) and len(again["test"]["label"]) == 3
    torch.save({"train": {}}, path)  # a foreign file (KeyError before)
    data._RAW.clear()
    assert torch.equal(data.embedded_raw(7, cache_dir=str(tmp_path))["train"]["frames"], first["train"]["frames"])


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


def test_error_from_a_dataloader_worker_becomes_its_own_sentence():
    wrapped = ValueError("Caught DataError in DataLoader worker process 0.\nOriginal Traceback (most recent call "
                         "last):\n  File \"x.py\", line 1, in f\ndata.DataError: clip.wav is empty; remove it.\n")
    assert common.error_sentence(wrapped) == "clip.wav is empty; remove it."
    assert common.error_sentence(ValueError("plain")) == "plain"


# ---------------------------------------------------------------------------- CAV-MAE pre-training
def test_sincos_pos_embed_by_hand():
    # dim 4: one frequency omega = 1 / 10000^0 = 1; a token is [sin(col), cos(col), sin(row), cos(row)]
    pe = common.sincos_pos_embed(4, 2, 2)  # (1, 4, 4), row-major
    s1, c1 = math.sin(1.0), math.cos(1.0)
    expected = torch.tensor([[0, 1, 0, 1], [s1, c1, 0, 1], [0, 1, s1, c1], [s1, c1, s1, c1]])
    assert torch.allclose(pe[0], expected, atol=1e-6)


def test_random_masking_keeps_a_quarter_and_restores_the_order():
    x = torch.arange(8.0).view(1, 8, 1).repeat(3, 1, 2)  # token i holds the value i
    visible, mask, restore = common.random_masking(x, 0.75, torch.Generator().manual_seed(0))
    assert visible.shape == (3, 2, 2) and torch.equal(mask.sum(1), torch.full((3,), 6.0))  # int(8 * 0.25) = 2 kept
    for b in range(3):
        kept = visible[b, :, 0].long()
        assert torch.equal(mask[b, kept], torch.zeros(2))  # the kept tokens are the unmasked positions
        # [visible; the rest] gathered with ids_restore is the original order
        rest = torch.tensor([i for i in range(8) if i not in kept.tolist()], dtype=torch.float)
        shuffled = torch.cat([kept.float(), rest])
        assert sorted(shuffled.tolist()) == list(range(8))
        assert torch.equal(torch.sort(shuffled[restore[b]]).values, torch.arange(8.0))


def test_patchify_orders_rows_then_columns_then_channels():
    x = torch.arange(16.0).view(1, 1, 4, 4)
    p = common.patchify(x, 2)  # 4 patches of 2 x 2
    assert p[0].tolist() == [[0, 1, 4, 5], [2, 3, 6, 7], [8, 9, 12, 13], [10, 11, 14, 15]]
    rgb = torch.stack([torch.zeros(2, 2), torch.ones(2, 2), 2 * torch.ones(2, 2)]).unsqueeze(0)  # (1, 3, 2, 2)
    assert common.patchify(rgb, 2)[0, 0].tolist() == [0, 1, 2] * 4  # channel is the fastest index


def test_mae_loss_by_hand():
    pred = torch.zeros(1, 2, 2, dtype=torch.float64)
    target = torch.tensor([[[1.0, 3.0], [5.0, 5.0]]], dtype=torch.float64)
    mask = torch.tensor([[1.0, 0.0]], dtype=torch.float64)  # only patch 0 was removed
    # plain: mean((0 - 1)^2, (0 - 3)^2) = 5 over the removed patch only
    assert common.mae_loss(pred, target, mask, norm_pix=False).item() == pytest.approx(5.0)
    # normalised: patch [1, 3] has mean 2 and unbiased var 2 -> [-1, 1] / sqrt(2 + 1e-6); mse = 1 / (2 + 1e-6)
    assert common.mae_loss(pred, target, mask).item() == pytest.approx(1 / (2 + 1e-6))


def test_contrastive_loss_by_hand():
    eye = torch.eye(2, dtype=torch.float64)
    # S = [[20, 0], [0, 20]]: each video's own audio wins: -log(e^20 / (e^20 + 1)) = log(1 + e^-20)
    assert common.contrastive_loss(eye, eye).item() == pytest.approx(math.log1p(math.exp(-20)), rel=1e-6)
    # both audios equal: each video column sees (20, 20) or (0, 0) -> log 2 either way
    same = torch.tensor([[1.0, 0.0], [1.0, 0.0]], dtype=torch.float64)
    assert common.contrastive_loss(same, eye).item() == pytest.approx(math.log(2))


def test_pretrain_losses_weights_and_decoder_keys():
    torch.manual_seed(0)
    model, decoder = CAVMAE("tiny"), common.CAVMAEDecoder("tiny")
    losses = common.pretrain_losses(model, decoder, torch.randn(4, 128, 64), torch.randn(4, 3, 64, 64),
                                    torch.Generator().manual_seed(0))
    # L = 1.0 (L_mae_a + L_mae_v) + 0.01 L_c
    expected = losses["mae_a"] + losses["mae_v"] + 0.01 * losses["contrastive"]
    assert losses["loss"].item() == pytest.approx(expected.item())
    # the published decoder's names (CAV-MAE's pre-trained checkpoint), none of them in the fine-tuned model
    names = {k.split(".")[0] for k in decoder.state_dict()}
    assert names == {"decoder_embed", "mask_token", "decoder_modality_a", "decoder_modality_v", "decoder_pos_embed_a",
                     "decoder_pos_embed_v", "decoder_blocks", "decoder_norm", "decoder_pred_a", "decoder_pred_v"}
    assert not names & {k.split(".")[0] for k in model.state_dict()}
    assert decoder.decoder_pred_a.out_features == 16 * 16 and decoder.decoder_pred_v.out_features == 16 * 16 * 3


def test_pretraining_keeps_position_embeddings_fixed_and_releases_them_after(tmp_path):
    import data
    import train
    torch.manual_seed(0)
    model = CAVMAE("tiny")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ds = data.AVTensors({"audio": torch.randn(16, 128, 64), "video": torch.randn(16, 3, 64, 64),
                         "label": torch.arange(16) % 10})
    args = train.build_parser().parse_args(["--pretrain-epochs", "1", "--config", "tiny"])
    train.pretrain(model, ds, args, "cpu", quiet=True)
    after = model.state_dict()
    assert torch.equal(before["pos_embed_a"], after["pos_embed_a"]) and torch.equal(before["pos_embed_v"], after["pos_embed_v"])
    assert model.pos_embed_a.requires_grad and model.pos_embed_v.requires_grad  # trainable again for fine-tuning
    assert not torch.equal(before["blocks_a.0.attn.qkv.weight"], after["blocks_a.0.attn.qkv.weight"])
    assert torch.equal(before["mlp_head.1.weight"], after["mlp_head.1.weight"])  # the head is not pre-trained
