"""train.py: CAV-MAE pre-training, the training loop and its schedules, best-validation selection, the
metrics (n/a where undefined), the refusals, and the README's commands end to end on tiny configurations
(the default models: slow)."""
import gzip
import json
import math
import os

import pytest
import torch
import torchvision

import common
import data
import train
from conftest import refused


# --- the schedule, the loop, best-validation selection --------------------------------------------------
def test_poly_schedule_by_hand():
    # 10 steps, warm-up 0.5 -> w = 5 steps at 0.1 x lr, then (1 - (t - 5) / 5)^0.9
    f = train.lr_factor(dict(schedule="poly", warmup=0.5, warmup_factor=0.1, power=0.9), 10)
    assert [f(t) for t in range(5)] == [0.1] * 5
    assert f(5) == 1.0 and f(6) == pytest.approx(0.8 ** 0.9)  # (1 - 1 / 5)^0.9 = 0.818
    assert f(9) == pytest.approx(0.2 ** 0.9)  # (1 - 4 / 5)^0.9 = 0.235


def test_cosine_schedule_by_hand():
    # 20 steps, warm-up 0.1 -> w = 2: (t + 1) / 2 from warmup_factor 0, then 0.5 (1 + cos(pi (t - 2) / 18))
    f = train.lr_factor(dict(schedule="cosine", warmup=0.1, warmup_factor=0.0), 20)
    assert [f(0), f(1)] == [0.5, 1.0]
    assert f(2) == 1.0 and f(11) == pytest.approx(0.5)  # cos(0) = 1, cos(pi / 2) = 0
    assert f(20) == pytest.approx(0.0)  # cos(pi) = -1
    g = train.lr_factor(dict(schedule="cosine", warmup=0.1, warmup_factor=0.2), 20)
    assert g(0) == pytest.approx(0.2 + 0.8 * 0.5)  # 0.6: from warmup_factor to 1 over the 2 warm-up steps


def counting_run(select, scores, epochs=3):
    """A one-weight model whose step adds 1 to the weight; 2 batches per epoch; val returns scores[epoch]."""
    model = torch.nn.Linear(1, 1, bias=False)
    torch.nn.init.zeros_(model.weight)
    loader = data.make_loader(data.AVTensors({"label": torch.zeros(2)}), 1, shuffle=False)

    def step(batch, opt):
        with torch.no_grad():
            model.weight += 1
        return {}
    calls = iter(scores)
    recipe = dict(epochs=epochs, lr=0.1, weight_decay=0.0, schedule="poly", warmup=0.1, select=select)
    train.train_loop(model, model.parameters(), loader, recipe, step, "cpu", "t", val=lambda m: next(calls))
    return model.weight.item()


def test_best_validation_epoch_is_kept():
    assert counting_run("last", []) == 6.0  # 3 epochs x 2 steps
    assert counting_run("best_val", [1.0, 3.0, 2.0]) == 4.0  # the second epoch's weight
    assert counting_run("best_val", [None, 2.0, 2.0]) == 4.0  # undefined scores lose; a tie keeps the first
    assert counting_run("best_val", [None, None, None]) == 2.0  # nothing defined: the first epoch


def test_onecycle_recipe_matches_torch_onecycle():
    # the source, CLIP and audio-video method recipes step torch's OneCycleLR once per batch (20 steps here)
    model = torch.nn.Linear(1, 1)
    loader = data.make_loader(data.AVTensors({"label": torch.zeros(4)}), 1, shuffle=False)
    recipe = dict(epochs=5, lr=1.0, weight_decay=0.0, schedule="onecycle", warmup=0.1)
    seen = []

    def step(batch, opt):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        return {}
    train.train_loop(model, model.parameters(), loader, recipe, step, "cpu", "test")
    ref = torch.optim.AdamW(torch.nn.Linear(1, 1).parameters(), lr=1.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(ref, 1.0, total_steps=20, pct_start=0.1)
    expected = []
    for _ in range(20):
        ref.step()
        expected.append(ref.param_groups[0]["lr"])
        sched.step()
    assert seen == expected and seen[0] == pytest.approx(1 / 25) and seen[1] == pytest.approx(1.0)


# --- CAV-MAE pre-training: masking, patches, losses ----------------------------------------------------
def test_random_masking_keeps_a_quarter_and_restores_the_order():
    x = torch.arange(8.0).view(1, 8, 1).repeat(3, 1, 2)  # token i holds the value i
    visible, mask, restore = train.random_masking(x, 0.75, torch.Generator().manual_seed(0))
    # int(8 * 0.25) = 2 kept
    assert visible.shape == (3, 2, 2) and torch.equal(mask.sum(1), torch.full((3,), 6.0))
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
    p = train.patchify(x, 2)  # 4 patches of 2 x 2
    assert p[0].tolist() == [[0, 1, 4, 5], [2, 3, 6, 7], [8, 9, 12, 13], [10, 11, 14, 15]]
    # (1, 3, 2, 2)
    rgb = torch.stack([torch.zeros(2, 2), torch.ones(2, 2), 2 * torch.ones(2, 2)]).unsqueeze(0)
    assert train.patchify(rgb, 2)[0, 0].tolist() == [0, 1, 2] * 4  # channel is the fastest index


def test_mae_loss_by_hand():
    pred = torch.zeros(1, 2, 2, dtype=torch.float64)
    target = torch.tensor([[[1.0, 3.0], [5.0, 5.0]]], dtype=torch.float64)
    mask = torch.tensor([[1.0, 0.0]], dtype=torch.float64)  # only patch 0 was removed
    # plain: mean((0 - 1)^2, (0 - 3)^2) = 5 over the removed patch only
    assert train.mae_loss(pred, target, mask, norm_pix=False).item() == pytest.approx(5.0)
    # normalised: patch [1, 3] has mean 2 and unbiased var 2 -> [-1, 1] / sqrt(2 + 1e-6); mse = 1 / (2 + 1e-6)
    assert train.mae_loss(pred, target, mask).item() == pytest.approx(1 / (2 + 1e-6))


def test_contrastive_loss_by_hand():
    eye = torch.eye(2, dtype=torch.float64)
    # S = [[20, 0], [0, 20]]: each video's own audio wins: -log(e^20 / (e^20 + 1)) = log(1 + e^-20)
    assert train.contrastive_loss(eye, eye).item() == pytest.approx(math.log1p(math.exp(-20)), rel=1e-6)
    # both audios equal: each video column sees (20, 20) or (0, 0) -> log 2 either way
    same = torch.tensor([[1.0, 0.0], [1.0, 0.0]], dtype=torch.float64)
    assert train.contrastive_loss(same, eye).item() == pytest.approx(math.log(2))


def test_pretrain_losses_weights_and_decoder_keys():
    torch.manual_seed(0)
    model, decoder = common.CAVMAE("tiny"), train.CAVMAEDecoder("tiny")
    losses = train.pretrain_losses(model, decoder, torch.randn(4, 128, 64), torch.randn(4, 3, 64, 64),
                                    torch.Generator().manual_seed(0))
    # L = 1.0 (L_mae_a + L_mae_v) + 0.01 L_c
    expected = losses["mae_a"] + losses["mae_v"] + 0.01 * losses["contrastive"]
    assert losses["loss"].item() == pytest.approx(expected.item())
    # the published decoder's names (CAV-MAE's pre-trained checkpoint), none of them in the fine-tuned model
    names = {k.split(".")[0] for k in decoder.state_dict()}
    assert names == {"decoder_embed", "mask_token", "decoder_modality_a", "decoder_modality_v",
                     "decoder_pos_embed_a", "decoder_pos_embed_v", "decoder_blocks", "decoder_norm",
                     "decoder_pred_a", "decoder_pred_v"}
    assert not names & {k.split(".")[0] for k in model.state_dict()}
    assert decoder.decoder_pred_a.out_features == 16 * 16
    assert decoder.decoder_pred_v.out_features == 16 * 16 * 3


def test_pretraining_keeps_position_embeddings_fixed_and_releases_them_after(tmp_path):
    torch.manual_seed(0)
    model = common.CAVMAE("tiny")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ds = data.AVTensors({"audio": torch.randn(16, 128, 64), "video": torch.randn(16, 3, 64, 64),
                         "label": torch.arange(16) % 10})
    args = train.build_parser().parse_args(["--pretrain-epochs", "1", "--config", "tiny"])
    train.pretrain(model, ds, args, "cpu", quiet=True)
    after = model.state_dict()
    assert torch.equal(before["pos_embed_a"], after["pos_embed_a"])
    assert torch.equal(before["pos_embed_v"], after["pos_embed_v"])
    # trainable again for fine-tuning
    assert model.pos_embed_a.requires_grad and model.pos_embed_v.requires_grad
    assert not torch.equal(before["blocks_a.0.attn.qkv.weight"], after["blocks_a.0.attn.qkv.weight"])
    assert torch.equal(before["mlp_head.1.weight"], after["mlp_head.1.weight"])  # the head is not pre-trained


def test_retrieval_counts_a_hit_when_a_clip_finds_its_own_partner():
    # audio i and video i point the same way for i = 0, 1; audio 2 points at video 0: 2 hits of 3
    c_a = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.1]])
    c_v = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    assert train.retrieval_top1(c_a, c_v) == pytest.approx(2 / 3)
    assert math.isclose(train.retrieval_top1(c_v, c_v), 1.0)


# --- metrics: by hand, n/a where undefined --------------------------------------------------------------
def test_task_metrics_by_hand():
    # accuracy 2 of 3; AUROC with positive scores (0.9, 0.4) against negative (0.4): (1 + 0.5) / 2 = 75%
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    assert train.task_metric("single", logits, torch.tensor([0, 1, 1])) == pytest.approx(200 / 3)
    two = torch.log(torch.tensor([[0.1, 0.9], [0.6, 0.4], [0.6, 0.4]]))
    assert train.task_metric("binary", two, torch.tensor([1, 1, 0])) == pytest.approx(75.0)
    # F1-macro of 2 genres: genre 0 predicted right (F1 1), genre 1 one TP one FN (2 / 3) -> 83.3%
    multi = torch.tensor([[5.0, 5.0], [-5.0, -5.0]])
    target = torch.tensor([[1.0, 1.0], [0.0, 1.0]])
    assert train.task_metric("multilabel", multi, target) == pytest.approx(250 / 3)


def test_undefined_metrics_are_none_with_one_reason_each():
    notes = []
    assert train.task_metric("binary", torch.zeros(3, 2), torch.tensor([1, 1, 1]), notes) is None
    assert train.task_metric("multilabel", torch.zeros(2, 3), torch.zeros(2, 3), notes) is None
    assert train.task_metric("single", torch.zeros(0, 3), torch.zeros(0, dtype=torch.long), notes) is None
    assert notes == ["AUROC needs both classes and the split holds one",
                     "F1-macro needs positive labels and the split has none", "no samples to score"]
    feats = torch.eye(4)  # 4 samples, fewer than a batch of 64: no batch to retrieve in
    assert train.paired_retrieval(feats, feats, torch.arange(4)) == {"true_pairs": None,
                                                                      "class_shuffled": None}
    text = train.format_table({"memes (auroc %)": {"complete": {"cmpt": [None, 70.0], "map": [60.0, 70.0]},
                                                   "text only": {"cmpt": [None]}}}, notes[:1] * 2)
    lines = text.splitlines()
    assert lines[-1] == "n/a: AUROC needs both classes and the split holds one." and text.count("n/a:") == 1
    assert lines[3].split() == ["complete", "n/a", "65.0", "+/-", "5.0"]  # mean 65, std 5 over two seeds
    assert lines[4].split() == ["text", "only", "n/a", "-"]


def test_retrieval_arithmetic_by_hand():
    # one batch of 4 with one-hot features: each image's nearest text is its own -> 100%; with every class
    # of one sample, the within-class shuffle moves nothing -> also 100%
    feats = torch.eye(4)
    r = train.paired_retrieval(feats, feats, torch.tensor([0, 1, 2, 3]), batch_size=4)
    assert r == {"true_pairs": 100.0, "class_shuffled": 100.0}
    r = train.paired_retrieval(feats, feats.roll(1, 0), torch.tensor([0, 1, 2, 3]), batch_size=4)
    assert r["true_pairs"] == 0.0  # texts rolled by one: image i's nearest text is sample i + 1's


def test_map_settings_and_counts():
    # MAP's name and CMPT's availability: 70% missing-both -> 35% of each modality missing, 65% available
    assert train.map_setting("both", 0.7) == "missing-both 70% (image/text 65/65% available)"
    assert train.map_setting("text", 0.7) == "missing-text 70% (image/text 100/30% available)"
    args = train.build_parser().parse_args(["--method", "cmpt"])
    settings = train.inference_settings(args, False, 10, seed=1)
    assert [s for s, _ in settings][:3] == ["complete (0% missing)", "audio 10% missing", "audio 30% missing"]
    assert [int((~h["audio"]).sum()) for _, h in settings[1:7]] == [1, 3, 5, 7, 9, 10]  # round(rate x 10)
    it = train.inference_settings(args, True, 10, seed=1)
    assert [int((~h["text"]).sum()) for _, h in it[3:]] == [9, 7, 5, 3, 1]  # x% of the texts available
    assert [int((~h["image"]).sum()) for _, h in it[:3]] == [0, 10, 0]


# --- refusals, before any work --------------------------------------------------------------------------
@pytest.mark.parametrize("argv, match", [
    (["--data", "mmimdb"], "--data-root is needed by"),
    (["--data-root", "x", "--data", "food"], "--data-root is needed by"),
    (["--data", "food", "embedded", "--method", "cmpt"], "several --data names run the image-text tables"),
    (["--method", "source", "cmpt"], "--method source takes one --data"),
    (["--method", "cmpt", "--seeds", "2", "2"], "--seeds repeats a seed"),
    (["--method", "cmpt", "--data", "food", "imdb", "--checkpoint", "x.pt"], "(--checkpoint holds one)"),
    (["--method", "cmpt", "--out", "x.pt"], "--out is where source training saves"),
    (["--data", "read"], "--data read needs --train-json and --label-csv"),
    (["--method", "cmpt", "--data", "read", "--train-json", "a", "--label-csv", "b"], "--val-json and"),
    (["--data", "food", "--bpe", "/nonexistent/bpe.txt.gz"], "does not exist"),
])
def test_contradicting_flags_are_refused_in_one_sentence(argv, match):
    refused(train.check_args, train.build_parser().parse_args(argv), match=match)


def test_refusals_end_main_with_the_sentence_and_write_nothing(tmp_path):
    out = tmp_path / "r.json"
    with pytest.raises(SystemExit) as e:
        train.main(["--method", "cmpt", "--variants", "nope", "--results", str(out)])
    assert str(e.value).startswith("error: unknown variant 'nope'; choose from cmpt, ")
    with pytest.raises(SystemExit) as e:
        train.main(["--method", "aoept", "--protocols", "inference", "--data", "food", "--results", str(out)])
    assert "aoept report(s) only the protocol(s) map" in str(e.value)
    with pytest.raises(SystemExit) as e:
        train.main(["--data", "food", "--config", "base", "--results", str(out)])
    assert "--data food --config base needs OpenAI's CLIP ViT-B/16" in str(e.value)
    assert os.listdir(tmp_path) == []


def test_a_default_backbone_of_another_data_seed_is_refused_not_overwritten(tmp_path, monkeypatch):
    path = str(tmp_path / "embedded_tiny.pt")
    monkeypatch.setattr(train, "default_checkpoint", lambda *a: path)
    monkeypatch.setattr(train, "train_source", lambda *a, **k: 1 / 0)  # no training, no overwrite
    common.save_checkpoint(path, common.CAVMAE("tiny", 10), data="embedded", data_seed=0,
                           benchmark=data.embedded_id())
    before = open(path, "rb").read()
    args = train.build_parser().parse_args(["--method", "cmpt", "--data-seed", "1"])
    refused(train.backbone, args, "cpu", match="trained on the embedded benchmark with --data-seed 0, not 1")
    assert open(path, "rb").read() == before


def test_a_backbone_of_another_seed_or_kind_is_refused(tmp_path):
    meta = {"data": "embedded", "data_seed": 0, "benchmark": data.embedded_id()}
    refused(train.check_data_seed, "src.pt", meta, 1, match="src.pt was trained on the embedded benchmark "
            "with --data-seed 0, not 1; pass --data-seed 0 or a checkpoint of that seed.")
    refused(train.check_data_seed, "src.pt", dict(meta, benchmark="v2"), 0,
            match="src.pt was trained on another version of the embedded benchmark (v2); train it again")
    train.check_data_seed("published.pth", {}, 1)  # no metadata (a published checkpoint): nothing to check
    path = str(tmp_path / "clip.pt")  # a bare CLIP state dict, as a converted OpenAI file: needs CLIP's BPE
    torch.save(common.CLIP("tiny", vocab_size=50).state_dict(), path)
    args = train.build_parser().parse_args(["--data", "food", "--checkpoint", path, "--config", "tiny"])
    train.check_args(args)
    refused(train.backbone, args, "cpu", match="its texts need CLIP's BPE vocabulary: pass --bpe")
    args.data = "embedded"
    refused(train.backbone, args, "cpu", match="is not a CAV-MAE model")


@pytest.mark.parametrize("argv", [["--seeds", "-1"], ["--batch-size", "0"], ["--epochs", "-2"], ["--lr", "0"],
                                  ["--lr", "nan"], ["--map-rate", "70"], ["--recipe", "fast"]])
def test_out_of_range_numbers_are_refused_by_the_parser(argv, capsys):
    with pytest.raises(SystemExit):
        train.main(argv)
    err = capsys.readouterr().err
    assert f"error: argument {argv[0]}:" in err.strip().splitlines()[-1] and "Traceback" not in err


def test_help_states_every_default():
    for action in train.build_parser()._actions:
        if action.dest != "help":
            assert "default" in action.help or "required" in action.help, action.dest


def test_recipe_default_is_paper_with_a_real_dataset(tmp_path):
    args = train.build_parser().parse_args(["--method", "cmpt", "--data", "food101", "--data-root",
                                            str(tmp_path)])
    train.check_args(args)
    assert args.recipe == "paper"
    args = train.build_parser().parse_args(["--method", "cmpt", "--data", "food"])
    train.check_args(args)
    assert args.recipe == "embedded"


# --- end to end on tiny data ----------------------------------------------------------------------------
def make_read_tree(root, n=6, num_classes=3):
    """A tiny READ-layout list: n clips (2 frames, 1 s of audio), labels.csv with num_classes classes."""
    (root / "labels.csv").write_text("index,mid,display_name\n" + "".join(f"{k},/m/c{k},c{k}\n"
                                                                          for k in range(num_classes)))
    g = torch.Generator().manual_seed(0)
    entries = []
    for i in range(n):
        for f in (0, 5):
            os.makedirs(root / "frames" / f"frame_{f}", exist_ok=True)
            img = (torch.rand(3, 40, 48, generator=g) * 255).to(torch.uint8)
            torchvision.io.write_file(str(root / "frames" / f"frame_{f}" / f"clip{i}.jpg"),
                                      torchvision.io.encode_jpeg(img))
        data.write_wav(str(root / f"clip{i}.wav"), 0.1 * torch.randn(16000, generator=g))
        entries.append({"video_id": f"clip{i}", "wav": str(root / f"clip{i}.wav"),
                        "video_path": str(root / "frames") + "/", "labels": f"/m/c{i % num_classes}"})
    (root / "list.json").write_text(json.dumps({"data": entries}))
    return ["--train-json", str(root / "list.json"), "--label-csv", str(root / "labels.csv")]


def test_read_layout_source_training_and_cmpt_protocols(tmp_path):
    lists = make_read_tree(tmp_path)
    train.main(["--data", "read", *lists, "--val-json", lists[1], "--pretrain-epochs", "1", "--epochs", "1",
                "--batch-size", "3", "--out", str(tmp_path / "src.pt")])
    model, meta = common.load_checkpoint(str(tmp_path / "src.pt"))
    clips = data.ReadLayoutDataset(lists[1], lists[3], mel_bins=model.mel_bins,
                                   target_length=model.audio_length, image_size=model.image_size)
    again = train.evaluate(model, data.make_loader(clips, 6, False), "cpu")
    assert again == pytest.approx({k: meta["metrics"][k] for k in again})  # the saved metrics, again
    train.main(["--method", "cmpt", "--data", "read", *lists, "--val-json", lists[1], "--checkpoint",
                str(tmp_path / "src.pt"), "--epochs", "1", "--seeds", "1", "--variants", "cmpt", "baseline",
                "--batch-size", "3", "--results", str(tmp_path / "r.json")])
    res = json.loads((tmp_path / "r.json").read_text())["results"]
    settings = [(r["protocol"], r["setting"]) for r in res]
    # the complete row once, then 6 rates per missing modality, then the 3 MAP settings
    assert settings[:7] == [("inference", "complete (0% missing)")] + [("inference", f"audio {r}% missing")
                                                                       for r in (10, 30, 50, 70, 90, 100)]
    assert settings[13:] == [("map", f"missing-{k} 70%") for k in ("audio", "video", "both")]
    for r in res:  # 6 test clips: every accuracy is a whole number of clips, k * 100 / 6
        assert r["task"] == "read" and sorted(r["values"]) == ["baseline", "cmpt"]
        for acc in r["values"].values():
            assert len(acc) == 1 and acc[0] * 6 / 100 == pytest.approx(round(acc[0] * 6 / 100))


def write_memes(root, n_train=8, n_test=4, test_label=None):
    """A tiny Hateful Memes in its raw layout: img/*.png, train / dev_seen / test_seen .jsonl."""
    lines = {"train": [], "dev_seen": [], "test_seen": []}
    for i in range(n_train + n_test + 2):
        os.makedirs(root / "img", exist_ok=True)
        pixel = torch.tensor([20 * i % 256, 100, 200 - 10 * i], dtype=torch.uint8)
        picture = pixel[:, None, None].expand(3, 8, 8).contiguous()
        torchvision.io.write_png(picture, str(root / "img" / f"{i:05d}.png"))
        split = "train" if i < n_train else "test_seen" if i < n_train + n_test else "dev_seen"
        label = test_label if split == "test_seen" and test_label is not None else i % 2
        text = "hello" if i % 3 else ""
        lines[split].append({"id": i, "img": f"img/{i:05d}.png", "label": label, "text": text})
    for split, entries in lines.items():
        (root / f"{split}.jsonl").write_text("\n".join(json.dumps(e) for e in entries) + "\n")


def write_bpe(path):
    """A merges file with the published first line (OpenAI's loader skips it) and 4 merges."""
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write('"bpe_simple_vocab_16e6.txt#version: 0.2\nh e\nl l\nhe ll\nhell o</w>\n')
    return str(path)


def test_cmpt_and_aoept_on_real_memes_files_with_the_paper_recipe(tmp_path, capsys):
    # --data-root: the paper recipe by default (best validation epoch on dev_seen), shortened by --epochs
    write_memes(tmp_path / "memes")
    bpe = write_bpe(tmp_path / "bpe.txt.gz")
    ckpt = tmp_path / "clip.pt"
    torch.manual_seed(0)
    torch.save(common.CLIP("tiny", vocab_size=data.CLIPTokenizer(bpe).vocab_size).state_dict(), ckpt)
    out = tmp_path / "out" / "r.json"
    train.main(["--method", "cmpt", "aoept", "--data", "hatememes", "--data-root", str(tmp_path / "memes"),
                "--checkpoint", str(ckpt), "--config", "tiny", "--bpe", bpe, "--seeds", "1", "--epochs", "2",
                "--batch-size", "4", "--variants", "cmpt", "aoept", "--results", str(out)])
    saved = json.loads(out.read_text())
    assert saved["args"]["recipe"] == "paper"
    rows = {(r["protocol"], r["setting"]): sorted(r["values"]) for r in saved["results"]}
    assert [s for p, s in rows if p == "map"] == [train.map_setting(k, 0.7) for k in ("text", "image",
                                                                                        "both")]
    assert all(v == ["aoept", "cmpt"] for (p, _), v in rows.items() if p == "map")
    assert [s for p, s in rows if p == "inference"] == [  # CMPT's protocol only (AOEPT reports MAP's)
        "complete (both)", "text only (image 100% missing)", "image only (text 100% missing)",
        *[f"image 100%, text {a}% available" for a in (10, 30, 50, 70, 90)]]
    for r in saved["results"]:  # 4 test memes, 2 positive x 2 negative pairs, ties count half: k / 8
        assert r["task"] == "hatememes" and r["metric"] == "auroc"
        assert all(v[0] * 8 / 100 == pytest.approx(round(v[0] * 8 / 100)) for v in r["values"].values())
    # the missing tables beside the results, keyed by the memes' ids: 70% of 8 -> 6 texts missing (code 1)
    table = tmp_path / "out" / "missing_tables" / "missing_hatememes_train_text_70_seed0.json"
    table = json.loads(table.read_text())
    assert table["ids"] == [str(i) for i in range(8)] and sorted(table["missing"]) == [0, 0] + [1] * 6
    printed = capsys.readouterr().out
    # dev_seen holds 2 memes of both classes: AUROC defined, each run keeps one of its 2 epochs
    assert "recipe paper" in printed and "kept epoch" in printed


def test_an_undefined_metric_is_na_in_the_table_and_null_in_the_json(tmp_path, capsys):
    write_memes(tmp_path / "memes", test_label=0)  # every test meme of one class: AUROC is undefined
    bpe = write_bpe(tmp_path / "bpe.txt.gz")
    vocab = data.CLIPTokenizer(bpe).vocab_size
    torch.save(common.CLIP("tiny", vocab_size=vocab).state_dict(), tmp_path / "c.pt")
    out = tmp_path / "r.json"
    train.main(["--method", "cmpt", "--data", "hatememes", "--data-root", str(tmp_path / "memes"), "--recipe",
                "embedded", "--checkpoint", str(tmp_path / "c.pt"), "--config", "tiny", "--bpe", bpe,
                "--seeds", "1", "--epochs", "1", "--variants", "cmpt", "--protocols", "map",
                "--results", str(out)])
    saved = json.loads(out.read_text())
    assert [r["values"] for r in saved["results"]] == [{"cmpt": [None]}] * 3
    printed = capsys.readouterr().out
    assert printed.count("n/a: AUROC needs both classes and the split holds one.") == 1
    assert printed.count("  n/a") == 3 and "nan" not in printed.lower()


# --- the default models (slow) --------------------------------------------------------------------------
@pytest.mark.slow
def test_default_source_model_reproduces_its_readme_numbers():
    model, meta = train.default_source("tiny", 0, "cpu")
    m = meta["metrics"]  # README: clean test accuracy fused 96.6, audio-only 79.4; retrieval 2.9% pre-trained
    assert round(m["multimodal"], 1) == 96.6 and round(m["audioonly"], 1) == 79.4
    test = data.embedded_split("test", model)
    again = train.evaluate(model, data.make_loader(test, 256, shuffle=False), "cpu")
    assert again == pytest.approx({k: m[k] for k in again})


@pytest.mark.slow
def test_data_food_reports_the_frozen_clip(tmp_path, capsys):
    out = tmp_path / "r.json"
    train.main(["--data", "food", "--results", str(out)])
    saved = json.loads(out.read_text())
    assert saved["checkpoint"] == train.default_checkpoint("clip_embedded", "tiny")
    assert all(isinstance(saved[k], float) and 0 < saved[k] <= 100 for k in ("image", "text", "both"))
    assert saved["metric"] == "accuracy" and f"{saved['both']:5.1f}" in capsys.readouterr().out
    assert math.isfinite(saved["retrieval"]["true_pairs"])
