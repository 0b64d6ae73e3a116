"""Source training: the README's `python train.py`, on a short schedule."""
import pytest

import common
import data
import train


def test_source_training_saves_a_checkpoint_that_reproduces_its_metrics(tmp_path):
    out = tmp_path / "src.pt"
    train.main(["--epochs", "2", "--out", str(out)])
    model, meta = common.load_checkpoint(str(out))
    metrics = meta["metrics"]
    assert set(metrics) == {"train_seconds", "multimodal", "audioonly", "videoonly"}
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
