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
    (["--data", "food", "--method", "cmpt"], "--method cmpt runs on the audio-visual data"),
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
