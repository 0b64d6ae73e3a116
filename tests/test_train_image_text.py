"""train.py on the image-text data: the frozen CLIP backbone's report, and bad input refused before work."""
import json
import os

import pytest
import torch

import common
import data
import train


@pytest.mark.parametrize("argv, message", [
    (["--data", "mmimdb"], "--data mmimdb needs --data-root"),
    (["--data", "food", "embedded", "--method", "cmpt"], "several --method or --data names run the image-text tables only"),
    (["--data", "food", "--method", "source", "cmpt"], "several --method or --data names run the image-text tables only"),
    (["--data", "food", "--method", "cmpt", "--map-rate", "70"], "--map-rate is a fraction in (0, 1]"),
    (["--data", "food", "--method", "cmpt", "--seeds", "2", "2"], "--seeds 2 2 repeats a seed"),
    (["--data", "food", "--method", "cmpt", "--variants", "nope", "--results", "DIR/r.json"],
     "unknown variant 'nope' of cmpt on image-text"),
    (["--data", "food", "--method", "aoept", "--pretrain-epochs", "2"], "--pretrain-epochs does not apply to --data food"),
    (["--data", "food", "--table-seed", "3"], "--table-seed does not apply to --data food with --method source"),
    (["--table-seed", "3"], "--table-seed applies to the image-text tables"),
    (["--data", "food", "--method", "aoept", "--protocols", "inference", "--results", "DIR/r.json"],
     "aoept report(s) only the map protocol(s); --protocols inference leaves nothing to run"),
    (["--data", "food", "imdb", "--method", "cmpt", "--checkpoint", "DIR/x.pt"], "--checkpoint holds one backbone"),
    (["--data", "food", "--epochs", "3"], "--epochs does not apply to --data food"),
    (["--data", "memes", "--data-root", "DIR"], "--data-root does not apply to --data memes"),
    (["--data-root", "DIR", "--out", "DIR/s.pt"], "--data-root applies to the image-text data only"),
    (["--data", "food", "--bpe", "DIR/none.txt.gz"], "--bpe DIR/none.txt.gz does not exist"),
    (["--data", "food", "--results", "DIR"], "--results DIR is a folder; give a file name"),
    (["--data", "food", "--config", "base", "--results", "DIR/r.json"], "--config base is OpenAI's CLIP ViT-B/16"),
])
def test_bad_image_text_flags_are_refused_before_any_work(tmp_path, argv, message):
    argv = [a.replace("DIR", str(tmp_path)) for a in argv]
    with pytest.raises(SystemExit) as e:
        train.main(argv)
    assert message.replace("DIR", str(tmp_path)) in str(e.value) and str(e.value).startswith("error: ")
    assert os.listdir(tmp_path) == []  # nothing written


def test_a_foreign_clip_file_needs_the_bpe_vocabulary(tmp_path):
    # a plain state dict (as a user's converted OpenAI file) has no vocabulary of ours: --bpe is required
    model = common.CLIP("tiny", vocab_size=50)
    path = str(tmp_path / "clip.pt")
    torch.save(model.state_dict(), path)
    with pytest.raises(SystemExit) as e:
        train.main(["--data", "food", "--checkpoint", path, "--config", "tiny", "--results", str(tmp_path / "r.json")])
    assert "its texts need CLIP's BPE vocabulary: pass --bpe" in str(e.value)
    assert not (tmp_path / "r.json").exists()


def test_data_food_reports_the_backbone_and_writes_what_it_printed(tmp_path, capsys):
    out = tmp_path / "r.json"
    train.main(["--data", "food", "--results", str(out)])
    printed = capsys.readouterr().out
    saved = json.loads(out.read_text())
    assert saved["metric"] == "accuracy" and saved["checkpoint"] == train.default_clip_checkpoint("tiny")
    assert f"image only {saved['image']:.1f} | text only {saved['text']:.1f} | both {saved['both']:.1f}" in printed
    assert f"{saved['retrieval']['true_pairs']:.1f}% (pairs shuffled within each class: " \
           f"{saved['retrieval']['class_shuffled']:.1f}%" in printed
    # the same numbers computed directly from the frozen backbone
    model, _ = train.default_clip_source("tiny", 0, "cpu")
    kw = dict(image_size=model.image_size, context_length=model.context_length, tokenizer=data.embedded_tokenizer())
    r = train.modality_probes(model, "single", 20, data.embedded_image_text_split("food", "train", **kw),
                              data.embedded_image_text_split("food", "test", **kw), "cpu")
    assert r["image"] == pytest.approx(saved["image"]) and r["both"] == pytest.approx(saved["both"])
    assert r["retrieval"] == pytest.approx(saved["retrieval"])


def test_retrieval_arithmetic_by_hand():
    # one batch of 4 with one-hot features: each image's nearest text is its own -> 100%; with every class
    # of one sample, the within-class shuffle moves nothing -> also 100%
    feats = torch.eye(4)
    r = train.paired_retrieval(feats, feats, torch.tensor([0, 1, 2, 3]), batch_size=4)
    assert r == {"true_pairs": 100.0, "class_shuffled": 100.0}
    # texts rolled by one: image i's nearest text is sample i + 1's -> 0%
    r = train.paired_retrieval(feats, feats.roll(1, 0), torch.tensor([0, 1, 2, 3]), batch_size=4)
    assert r["true_pairs"] == 0.0


def test_chance_free_task_metrics_by_hand():
    # accuracy 2 of 3; AUROC with positive scores (0.9, 0.4) against negative (0.4): (1 + 0.5) / 2 = 75%
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    assert train.task_metric("single", logits, torch.tensor([0, 1, 1])) == pytest.approx(200 / 3)
    two = torch.log(torch.tensor([[0.1, 0.9], [0.6, 0.4], [0.6, 0.4]]))
    assert train.task_metric("binary", two, torch.tensor([1, 1, 0])) == pytest.approx(75.0)


def test_cmpt_and_aoept_run_on_real_hateful_memes_files_with_a_foreign_clip(tmp_path, capsys):
    # a tiny Hateful Memes in its raw layout (8 train, 4 test memes), a CLIP of the BPE file's vocabulary saved as a
    # plain state dict (as a user's converted OpenAI file), then both methods' MAP protocol in one command
    from test_image_text_data import MERGES, write_image, write_merges
    root = tmp_path / "memes"
    lines = {"train": [], "dev_seen": [], "test_seen": []}
    for i in range(12):
        write_image(str(root / "img" / f"{i:05d}.png"), (20 * i, 100, 200 - 10 * i))
        split = "train" if i < 8 else "test_seen"
        lines[split].append({"id": i, "img": f"img/{i:05d}.png", "label": i % 2, "text": "hello" if i % 3 else ""})
    lines["dev_seen"] = lines["test_seen"][:1]
    for split, entries in lines.items():
        (root / f"{split}.jsonl").write_text("\n".join(json.dumps(e) for e in entries) + "\n")
    bpe = write_merges(tmp_path / "bpe.txt.gz", MERGES)
    vocab = data.CLIPTokenizer(bpe).vocab_size  # 256 + 256 + 4 merges + 2 = 518
    ckpt = tmp_path / "clip.pt"
    torch.manual_seed(0)
    torch.save(common.CLIP("tiny", vocab_size=vocab).state_dict(), ckpt)
    out = tmp_path / "out" / "r.json"
    train.main(["--method", "cmpt", "aoept", "--data", "hatememes", "--data-root", str(root), "--checkpoint", str(ckpt),
                "--config", "tiny", "--bpe", bpe, "--seeds", "1", "--epochs", "1", "--batch-size", "4",
                "--variants", "cmpt", "aoept", "--results", str(out)])
    saved = json.loads(out.read_text())
    rows = {(r["protocol"], r["setting"]): sorted(r["values"]) for r in saved["results"]}
    assert {s for p, s in rows if p == "map"} == {train.map_setting(k, 0.7) for k in ("text", "image", "both")}
    assert all(v == ["aoept", "cmpt"] for (p, _), v in rows.items() if p == "map")
    # CMPT's protocol (AOEPT reports only MAP's): complete, each modality alone, and Fig. 2's text availability
    assert [s for p, s in rows if p == "inference"] == [
        "complete (both)", "text only (image 100% missing)", "image only (text 100% missing)",
        *[f"image 100%, text {a}% available" for a in (10, 30, 50, 70, 90)]]
    assert all(v == ["cmpt"] for (p, _), v in rows.items() if p == "inference")
    for r in saved["results"]:
        assert r["task"] == "hatememes" and r["metric"] == "auroc"
        for v in r["values"].values():  # 4 test memes, 2 positive x 2 negative pairs, ties count half: k / 8
            assert v[0] * 8 / 100 == pytest.approx(round(v[0] * 8 / 100))
    # the missing tables beside the results, keyed by the memes' own ids: 70% of 8 -> 6 texts missing (code 1)
    table = json.loads((tmp_path / "out" / "missing_tables" / "missing_hatememes_train_text_70_seed0.json").read_text())
    assert table["ids"] == [str(i) for i in range(8)] and sorted(table["missing"]) == [0, 0] + [1] * 6
    both = json.loads((tmp_path / "out" / "missing_tables" / "missing_hatememes_test_both_70_seed0.json").read_text())
    assert sorted(both["missing"]) == [0, 1, 1, 2]  # round(0.7 * 4) = 3 missing: 3 // 2 = 1 image, the other 2 text
    printed = capsys.readouterr().out
    assert "ratio to the frozen CLIP's forward pass" in printed
    assert f"{saved['step_ms']['cmpt']:7.1f} ms" in printed
