"""Source training: the README's `python train.py`, on a short schedule."""
import pytest

import common
import data
import train


def test_source_training_saves_a_checkpoint_that_reproduces_its_metrics(tmp_path):
    out = tmp_path / "src.pt"
    train.main(["--pretrain-epochs", "1", "--epochs", "2", "--out", str(out)])
    model, meta = common.load_checkpoint(str(out))
    metrics = meta["metrics"]
    assert set(metrics) == {"train_seconds", "multimodal", "audioonly", "videoonly", "retrieval_pretrained",
                            "retrieval_finetuned", "stage_seconds"}
    # the stages of the run, in order; with the pre-training's retrieval check between them they add up to
    # no more than the training time
    assert list(metrics["stage_seconds"]) == ["data", "pre-training", "fine-tuning"]
    assert 0 < sum(metrics["stage_seconds"].values()) <= metrics["train_seconds"]
    assert meta["benchmark"] == data.embedded_id()
    # the saved clean test accuracies are what the saved weights give again
    again = train.evaluate(model, data.make_loader(data.embedded_split("test", model), 256, shuffle=False), "cpu")
    for mode in ("multimodal", "audioonly", "videoonly"):
        assert again[mode] == pytest.approx(metrics[mode])
    assert metrics["multimodal"] > 30.0  # 10 classes: chance is 10%; two epochs already learn the cues


def test_read_layout_training_needs_its_lists(tmp_path):
    with pytest.raises(SystemExit, match="--train-json"):
        train.main(["--data", "read", "--out", str(tmp_path / "x.pt")])


@pytest.mark.parametrize("argv, message", [
    (["--method", "cmpt", "--map-rate", "70"], "--map-rate is a fraction in (0, 1]"),
    (["--method", "cmpt", "--variants", "nope"], "unknown variant 'nope' of cmpt"),
    (["--method", "aoept", "--protocols", "inference"], "aoept reports only the map protocol"),
    (["--method", "cmpt", "--checkpoint", "/nonexistent/typo.pt"], "checkpoint file /nonexistent/typo.pt does not exist"),
    (["--method", "cmpt", "--data", "read"], "needs --train-json, --val-json, --label-csv and --checkpoint"),
])
def test_bad_arguments_end_with_one_sentence(argv, message):
    with pytest.raises(SystemExit) as e:
        train.main(argv)
    assert message in str(e.value)


def test_missing_masks_reject_rates_outside_zero_one():
    with pytest.raises(ValueError, match="fraction in"):
        data.missing_masks(10, "audio", 7.0)


# ---------------------------------------------------------------------------- READ-layout data, checks before work
import json
import os
import time

import torch

from common import CAVMAE
from test_data import make_read_layout


def read_method_argv(root, method, n=6):
    make_read_layout(root, n=n)
    ckpt = root / "src3.pt"
    torch.manual_seed(0)
    common.save_checkpoint(str(ckpt), CAVMAE("tiny", num_classes=3))
    lst = str(root / "clean" / "severity_0.json")
    return ["--method", method, "--data", "read", "--checkpoint", str(ckpt), "--train-json", lst, "--val-json", lst,
            "--label-csv", str(root / "labels.csv"), "--epochs", "1", "--seeds", "1", "--results", str(root / "r.json")]


def test_cmpt_runs_its_protocols_on_read_layout_data(tmp_path):
    train.main(read_method_argv(tmp_path, "cmpt") + ["--variants", "cmpt", "baseline", "--batch-size", "3"])
    res = json.loads((tmp_path / "r.json").read_text())["results"]
    settings = [(r["protocol"], r["setting"]) for r in res]
    # the complete row once, then 6 rates per missing modality, then the 3 MAP settings
    assert settings[:7] == [("inference", "complete (0% missing)")] + [("inference", f"audio {r}% missing")
                                                                       for r in (10, 30, 50, 70, 90, 100)]
    assert ("map", "missing-both 70%") in settings and len(settings) == 1 + 12 + 3
    for r in res:  # 6 test clips: every accuracy is a whole number of clips, k * 100 / 6
        for acc in r["accuracy"].values():
            assert len(acc) == 1 and abs(acc[0] * 6 / 100 - round(acc[0] * 6 / 100)) < 1e-9


def test_aoept_runs_the_map_protocol_on_read_layout_data(tmp_path):
    train.main(read_method_argv(tmp_path, "aoept", n=8) + ["--variants", "aoept", "--batch-size", "4"])
    res = json.loads((tmp_path / "r.json").read_text())["results"]
    assert [r["setting"] for r in res] == ["missing-audio 70%", "missing-video 70%", "missing-both 70%"]
    for r in res:  # 8 test clips: multiples of 12.5
        assert abs(r["accuracy"]["aoept"][0] / 12.5 - round(r["accuracy"]["aoept"][0] / 12.5)) < 1e-9


def test_label_csv_not_0_to_k_minus_1_is_refused_by_train(tmp_path):
    argv = read_method_argv(tmp_path, "cmpt")
    (tmp_path / "labels.csv").write_text("index,mid\n1,/m/c0\n2,/m/c1\n3,/m/c2\n")
    with pytest.raises(SystemExit) as e:
        train.main(argv)
    assert "labels.csv has indices 1..3, not exactly 0..2" in str(e.value)
    with pytest.raises(SystemExit) as e:  # source training died with IndexError before
        train.main(["--data", "read", "--train-json", argv[argv.index("--train-json") + 1],
                    "--label-csv", str(tmp_path / "labels.csv"), "--out", str(tmp_path / "s.pt")])
    assert "not exactly 0..2" in str(e.value)


def test_config_that_contradicts_the_checkpoint_is_refused_before_training(tmp_path):
    ckpt = tmp_path / "tiny.pt"
    common.save_checkpoint(str(ckpt), CAVMAE("tiny", num_classes=10), data="embedded", data_seed=0,
                           benchmark=data.embedded_id())
    t0 = time.time()
    with pytest.raises(SystemExit) as e:
        train.main(["--method", "cmpt", "--config", "base", "--checkpoint", str(ckpt), "--results", str(tmp_path / "r.json")])
    assert "holds a 'tiny' model but --config base was given" in str(e.value)
    assert time.time() - t0 < 10 and not (tmp_path / "r.json").exists()


def test_data_seed_mismatch_is_refused(tmp_path):
    ckpt = tmp_path / "seed0.pt"
    common.save_checkpoint(str(ckpt), CAVMAE("tiny", num_classes=10), data="embedded", data_seed=0,
                           benchmark=data.embedded_id())
    with pytest.raises(SystemExit) as e:
        train.main(["--method", "cmpt", "--checkpoint", str(ckpt), "--data-seed", "1", "--results", str(tmp_path / "r.json")])
    assert "trained on the embedded benchmark with --data-seed 0, not 1" in str(e.value)


@pytest.mark.parametrize("argv, message", [
    (["--results", "DIR/r.json"], "--results applies to --method cmpt / aoept"),
    (["--method", "cmpt", "--results", "DIR"], "--results DIR is a folder; give a file name"),
    (["--out", "DIR"], "--out DIR is a folder; give a file name"),
    (["--method", "cmpt", "--out", "DIR/x.pt"], "--out is where source training saves"),
    (["--device", "mps"], "--device mps is not available"),
    (["--variants", "cmpt"], "--variants applies to --method cmpt / aoept"),
    (["--checkpoint", "DIR/x.pt"], "--checkpoint applies to --method cmpt / aoept"),
    (["--method", "cmpt", "--seeds", "1", "1"], "--seeds 1 1 repeats a seed"),
    (["--label-csv", "DIR/l.csv"], "--label-csv applies to --data read only"),
    (["--method", "cmpt", "--checkpoint", "DIR"], "is a folder, not a checkpoint file"),
    (["--method", "cmpt", "--checkpoint", "TEXT"], "is a text file"),
])
def test_bad_flags_are_refused_before_any_work(tmp_path, argv, message):
    (tmp_path / "notes.txt").write_text("my notes")
    argv = [str(tmp_path) if a == "DIR" else str(tmp_path / "notes.txt") if a == "TEXT" else a.replace("DIR", str(tmp_path))
            for a in argv]
    if "--results" not in argv and "--method" in argv:
        argv += ["--results", str(tmp_path / "r.json")]
    if "--out" not in argv and "--method" not in argv:
        argv += ["--out", str(tmp_path / "s.pt")]
    with pytest.raises(SystemExit) as e:
        train.main(argv)
    assert message.replace("DIR", str(tmp_path)) in str(e.value) and str(e.value).startswith("error: ")
    assert sorted(os.listdir(tmp_path)) == ["notes.txt"]  # nothing written, no stray temp file


@pytest.mark.parametrize("argv", [["--seeds", "-1"], ["--batch-size", "0"], ["--epochs", "-2"], ["--lr", "0"],
                                  ["--workers", "-1"], ["--lr", "nan"]])
def test_out_of_range_numbers_are_refused_by_the_parser(argv, capsys):
    with pytest.raises(SystemExit):
        train.main(argv)
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]  # usage, then one sentence
    assert ": error: argument " + argv[0] + ":" in last and "Traceback" not in err


def test_help_states_every_default_and_the_variants():
    text = train.build_parser().format_help()
    for action in train.build_parser()._actions:
        if action.dest != "help":
            assert "default" in (action.help or ""), action.dest
    import aoept
    import cmpt
    for name in list(cmpt.VARIANTS) + list(aoept.VARIANTS) + list(cmpt.IMAGE_TEXT_VARIANTS) + list(aoept.IMAGE_TEXT_VARIANTS):
        assert name in text


def test_ctrl_c_ends_with_one_line_saying_what_was_saved(tmp_path, monkeypatch):
    argv = read_method_argv(tmp_path, "cmpt") + ["--variants", "cmpt"]

    def interrupt(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(train, "fit", interrupt)
    with pytest.raises(SystemExit) as e:
        train.main(argv)
    assert str(e.value) == (f"interrupted: saved nothing; not saved: results {tmp_path / 'r.json'} "
                            f"(no file is left half-written).")
    monkeypatch.setattr(common, "save_checkpoint", interrupt)  # source training, stopped while saving
    with pytest.raises(SystemExit) as e:
        train.main(["--epochs", "1", "--out", str(tmp_path / "s.pt")])
    assert str(e.value).startswith(f"interrupted: saved nothing; not saved: checkpoint {tmp_path / 's.pt'}")
