"""The adaptation runner and its baselines (Source, Tent, READ)."""
import copy
import json
import math
import os
from types import SimpleNamespace

import pytest
import torch

import adapt
import common
import data
from common import CAVMAE
from test_data import read_layout_argv
from conftest import changed_keys, source_stream_accuracy

LOGITS = torch.tensor([[2.0, 1.0, 0.0, -1.0], [0.0, 0.5, 1.5, 0.0]], dtype=torch.float64)


# ---------------------------------------------------------------------------- losses
def test_softmax_entropy_uniform_is_log_k():
    assert torch.allclose(adapt.softmax_entropy(torch.zeros(3, 5, dtype=torch.float64)),
                          torch.full((3,), math.log(5), dtype=torch.float64))


@pytest.mark.parametrize("p, expected", [(0.9, 0.094824), (0.5, 0.346574), (math.exp(-1), 0.367879)])
def test_read_confidence_single_sample(p, expected):
    # gamma = e^-1: p log(e * e^-1 / p) = -p log p; 0.9 * ln(1/0.9) = 0.9 * 0.105361 = 0.094824
    # probabilities (p, (1-p)/2, (1-p)/2): p is the largest for all three values of p
    logits = torch.tensor([[math.log(p), math.log((1 - p) / 2), math.log((1 - p) / 2)]], dtype=torch.float64)
    assert abs(adapt.read_confidence_loss(logits).item() - expected) < 1e-6


def test_read_losses_check_values():
    # max probabilities 0.643914 and 0.526121: mean of -p ln p = (0.283534 + 0.338226) / 2 = 0.305880
    assert abs(adapt.read_confidence_loss(LOGITS).item() - 0.305880) < 1e-6
    # L_bal = sum_k s_k log s_k = -H(softmax(sum_i p_i)) = -1.361689
    assert abs(adapt.read_balance_loss(LOGITS).item() + 1.361689) < 1e-6


def test_read_confidence_threshold_direction():
    # d/dp [p log(e gamma / p)] = log(gamma / p): negative above gamma (pushed up), positive below
    for p, sign in ((0.9, -1), (0.2, 1)):
        logits = torch.tensor([[math.log(p), math.log(1 - p)]], dtype=torch.float64, requires_grad=True)
        adapt.read_confidence_loss(logits).backward()
        assert math.copysign(1, logits.grad[0, 0].item()) == sign


# ---------------------------------------------------------------------------- freezing and reset
@pytest.mark.parametrize("name", ["tent", "read"])
def test_baseline_updates_exactly_its_parameters_and_resets(name, tiny_batch):
    torch.manual_seed(0)
    model = CAVMAE("tiny")
    start = copy.deepcopy(model.state_dict())
    adapter = adapt.METHODS[name].setup(model, SimpleNamespace())
    adapter(tiny_batch)
    if name == "tent":  # the LayerNorms on the multimodal path (the _a/_v norms get no gradient there)
        expected = {k for k in start if any(s in k for s in (".norm1.", ".norm2.")) or k.startswith("norm.")
                    or k.startswith("mlp_head.0.")}
    else:  # READ: the unified block's q, k, v projections
        expected = {"blocks_u.0.attn.qkv.weight", "blocks_u.0.attn.qkv.bias"}
    assert changed_keys(start, model) == expected
    adapter(tiny_batch)
    assert len(adapter.optimizer.state) > 0
    adapter.reset()
    assert changed_keys(start, model) == set()
    assert len(adapter.optimizer.state) == 0


def test_read_predicts_after_the_update(tiny_batch):
    torch.manual_seed(0)
    model = CAVMAE("tiny")
    adapter = adapt.READ.setup(model, SimpleNamespace())
    out = adapter(tiny_batch)
    with torch.no_grad():
        assert torch.allclose(out, model(tiny_batch["audio"], tiny_batch["video"]))  # the updated model's output


# ---------------------------------------------------------------------------- the runner
def run(tmp_path, *extra):
    out = tmp_path / "r.json"
    adapt.main(["--corruption", "gaussian_noise", "--seeds", "1", "--results", str(out), *extra])
    return json.loads(out.read_text())


def test_runner_end_to_end_and_paired_source(tmp_path, source_model):  # the fixture: the source model exists first
    res = run(tmp_path, "--method", "read")
    acc = res["accuracy"]["gaussian_noise"]
    assert 0 <= acc["read"]["mean"] <= 100
    # the Source column is the frozen model's batch-averaged accuracy on the same stream
    assert abs(acc["source"]["mean"] - source_stream_accuracy("gaussian_noise", 64)) < 1e-9
    assert res["batch_size"] == {"source": 64, "read": 64} and res["samples_per_second"] > 0
    # the stages: the source model was already there (loaded, not trained); corrupting + adapting = the run's wall time
    st = res["stage_seconds"]
    assert list(st) == ["loading the source model", "corrupting the test sets", "adapting (every method, seed and stream)"]
    assert st["corrupting the test sets"] + st["adapting (every method, seed and stream)"] == pytest.approx(res["wall_seconds"])


def test_runner_same_seed_same_numbers(tmp_path):
    a = run(tmp_path, "--method", "tent", "--modality", "audio")
    b = run(tmp_path, "--method", "tent", "--modality", "audio")
    assert a["accuracy"] == b["accuracy"]


def test_runner_bad_corruption_name(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        adapt.main(["--method", "source", "--corruption", "gaussian_blurr", "--results", str(tmp_path / "r.json")])
    assert "unknown video corruption 'gaussian_blurr'" in str(e.value)
    assert not (tmp_path / "r.json").exists()


def test_runner_missing_checkpoint(tmp_path):
    with pytest.raises(SystemExit) as e:
        adapt.main(["--method", "source", "--checkpoint", str(tmp_path / "missing.pt")])
    assert "does not exist" in str(e.value)


def test_runner_on_read_layout(tmp_path):
    out = tmp_path / "read.json"
    adapt.main(read_layout_argv(tmp_path, "read") + ["--results", str(out), "--batch-size", "4"])
    res = json.loads(out.read_text())
    assert set(res["accuracy"]) == {"gaussian_noise"}
    # 6 clips in batches of 4 and 2: batch accuracies are multiples of 25 and 50, their mean a multiple of 12.5
    acc = res["accuracy"]["gaussian_noise"]["read"]["mean"]
    assert 0 <= acc <= 100 and abs(acc / 12.5 - round(acc / 12.5)) < 1e-5


def test_runner_both_modalities_on_read_layout_counts_dropped_clips(tmp_path, capsys):
    argv = read_layout_argv(tmp_path, "source") + ["--modality", "both", "--corruption", "gaussian_noise+wind"]
    audio = tmp_path / "audio" / "wind" / "severity_5.json"
    entries = json.loads(audio.read_text())["data"]
    audio.write_text(json.dumps({"data": entries[1:]}))  # clip0 has no corrupted WAV
    out = tmp_path / "r.json"
    adapt.main(argv + ["--batch-size", "5", "--results", str(out)])
    video = tmp_path / "video" / "gaussian_noise" / "severity_5.json"
    assert (f"dropped 1 of 6 clips of {video} missing from the audio list and 0 of 5 clips of {audio} missing "
            f"from the video list") in capsys.readouterr().err
    # the 5 clips left in one batch of 5: the accuracy is a multiple of 100 / 5 = 20
    acc = json.loads(out.read_text())["accuracy"]["gaussian_noise+wind"]["source"]["mean"]
    assert abs(acc / 20 - round(acc / 20)) < 1e-5


def test_runner_refuses_a_checkpoint_holding_nan(tmp_path):
    argv = read_layout_argv(tmp_path, "source")
    model = CAVMAE("tiny", num_classes=3)
    with torch.no_grad():
        model.norm.weight[0] = float("nan")
    common.save_checkpoint(str(tmp_path / "tiny3.pt"), model)
    with pytest.raises(SystemExit) as e:
        adapt.main(argv + ["--results", str(tmp_path / "r.json")])
    assert str(e.value).startswith(f"error: {tmp_path / 'tiny3.pt'} holds NaN or infinite values in norm.weight; ")
    assert not (tmp_path / "r.json").exists()


def test_runner_refuses_a_checkpoint_with_other_classes(tmp_path):
    ckpt = tmp_path / "k50.pt"
    common.save_checkpoint(str(ckpt), CAVMAE("tiny", num_classes=50))
    with pytest.raises(SystemExit) as e:
        adapt.main(["--method", "source", "--checkpoint", str(ckpt), "--corruption", "contrast"])
    assert "the checkpoint has 50 classes but the data has 10" in str(e.value)


def test_runner_read_layout_without_training_list_for_brimpr(tmp_path):
    with pytest.raises(SystemExit) as e:
        adapt.main(read_layout_argv(tmp_path, "brimpr", n=4) + ["--results", str(tmp_path / "r.json")])
    assert "clean" in str(e.value) and "--source-json" in str(e.value)
    assert not (tmp_path / "r.json").exists()


# ---------------------------------------------------------------------------- several methods, one table
def test_runner_methods_share_streams_and_sets(tmp_path, monkeypatch, capsys):
    built = []
    test_sets = adapt.test_sets
    monkeypatch.setattr(adapt, "test_sets", lambda args, model, names: built.append(names) or test_sets(args, model, names))
    out = tmp_path / "all.json"
    adapt.main(["--methods", "tent", "eata", "sar", "deyo", "read", "abpem", "--corruption", "gaussian_noise,contrast",
                "--seeds", "1", "2", "--results", str(out)])
    res = json.loads(out.read_text())
    assert built == [["gaussian_noise", "contrast"]]  # each corrupted set built once (side by side) for all methods and seeds
    assert res["methods"] == ["source", "tent", "eata", "sar", "deyo", "read", "abpem"]  # Source always first
    assert res["batch_size"] == {"source": 64, "tent": 64, "eata": 64, "sar": 64, "deyo": 64, "read": 64, "abpem": 8}
    # the Source column is the frozen model on the shuffled stream of batch 64; JSON average = mean over corruptions
    for seed_i, seed in enumerate((1, 2)):
        assert abs(res["accuracy"]["contrast"]["source"]["per_seed"][seed_i] - source_stream_accuracy("contrast", 64, seed)) < 1e-9
    for m in res["methods"]:
        assert abs(res["average"][m] - (res["accuracy"]["gaussian_noise"][m]["mean"] + res["accuracy"]["contrast"][m]["mean"]) / 2) < 1e-9
    assert set(res["source_ms_per_batch"]) == {"64", "8"} and res["time_ratio_to_source"]["source"] == 1.0
    table = capsys.readouterr().out
    header = next(line for line in table.splitlines() if line.startswith("corruption"))
    assert header.split() == ["corruption", "source", "tent", "eata", "sar", "deyo", "read", "abpem"]
    assert "x Source forward" in table
    # a method's numbers do not depend on the other methods run beside it
    alone = run(tmp_path, "--methods", "sar", "--corruption", "gaussian_noise,contrast", "--seeds", "1", "2")
    assert alone["accuracy"]["contrast"]["sar"] == res["accuracy"]["contrast"]["sar"]


def test_runner_source_seeds_stored_once(tmp_path, capsys):
    out = tmp_path / "src.json"
    adapt.main(["--method", "source", "--corruption", "gaussian_noise", "--seeds", "1", "2", "--results", str(out)])
    res = json.loads(out.read_text())
    per_seed = res["accuracy"]["gaussian_noise"]["source"]["per_seed"]
    assert per_seed == [source_stream_accuracy("gaussian_noise", 64, 1), source_stream_accuracy("gaussian_noise", 64, 2)]
    assert res["average"]["source"] == (per_seed[0] + per_seed[1]) / 2  # one corruption: the mean of the 2 seeds
    average_row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("average"))
    assert average_row.split()[1] == f"{res['average']['source']:.1f}"


def test_runner_continual_and_both_with_methods(tmp_path):
    both = run(tmp_path, "--methods", "tent", "read", "--modality", "both", "--corruption", "gaussian_noise+wind")
    assert set(both["accuracy"]) == {"gaussian_noise+wind"} and set(both["average"]) == {"source", "tent", "read"}
    single = run(tmp_path, "--methods", "tent", "--corruption", "gaussian_noise,contrast")
    cont = run(tmp_path, "--methods", "tent", "--corruption", "gaussian_noise,contrast", "--continual")
    # the continual stream starts from the source model, so its first corruption is the episodic run's;
    # the second continues from the adapted state (no reset)
    assert cont["accuracy"]["gaussian_noise"] == single["accuracy"]["gaussian_noise"]
    assert cont["accuracy"]["contrast"]["source"] == single["accuracy"]["contrast"]["source"]


def test_results_files_are_named_by_what_was_run():
    parse = adapt.build_parser().parse_args
    path = lambda argv: adapt.results_path(parse(argv), adapt.method_names(parse(argv)))
    wide = path(["--method", "tent"])
    assert wide.endswith("adapt_source-tent_video.json")
    narrower = [path(["--method", "tent", "--corruption", "fog"]), path(["--method", "tent", "--continual"]),
                path(["--method", "tent", "--severity", "3"]), path(["--method", "tent", "--seeds", "1", "2"]),
                path(["--methods", "tent", "read"]), path(["--method", "tent", "--modality", "audio"]),
                path(["--method", "tent", "--batch-size", "8"])]
    assert len(set(narrower + [wide])) == len(narrower) + 1  # no two selections share a file
    assert narrower[0].endswith("adapt_source-tent_video_fog.json")
    assert path(["--method", "abpem", "--no-cache"]) != path(["--method", "abpem"])
    assert path(["--method", "eata", "--eata-redundancy", "0.4"]).endswith("adapt_source-eata_video_eataeps0.4.json")
    many = path(["--method", "tent", "--corruption", ",".join(adapt.corruption_list("video", "all")[:9])])
    assert len(os.path.basename(many)) < 80  # long selections get a short hash tag


def test_runner_default_results_file(tmp_path, monkeypatch):
    monkeypatch.setattr(adapt.train, "RESULTS_DIR", str(tmp_path))
    adapt.main(["--method", "source", "--corruption", "fog"])
    assert [p.name for p in tmp_path.iterdir()] == ["adapt_source_video_fog.json"]


# ---------------------------------------------------------------------------- checks before any work


def tiny10(tmp_path, data_seed=0):
    ckpt = tmp_path / "tiny10.pt"
    common.save_checkpoint(str(ckpt), CAVMAE("tiny", num_classes=10), data="embedded", data_seed=data_seed,
                           benchmark=data.embedded_id())
    return str(ckpt)


def test_label_csv_not_0_to_k_minus_1_is_refused(tmp_path):
    argv = read_layout_argv(tmp_path, "source") + ["--results", str(tmp_path / "r.json")]
    # 1-based indices: clip i's label i % 3 read as index i % 3 + 1, scored against the wrong output (or none)
    (tmp_path / "labels.csv").write_text("index,mid\n1,/m/c0\n2,/m/c1\n3,/m/c2\n")
    with pytest.raises(SystemExit) as e:
        adapt.main(argv)
    assert "labels.csv has indices 1..3, not exactly 0..2" in str(e.value)
    assert not (tmp_path / "r.json").exists()


def test_checkpoint_of_another_data_seed_is_refused(tmp_path):
    with pytest.raises(SystemExit) as e:
        adapt.main(["--method", "source", "--checkpoint", tiny10(tmp_path, data_seed=0), "--data-seed", "1",
                    "--corruption", "contrast", "--results", str(tmp_path / "r.json")])
    assert "trained on the embedded benchmark with --data-seed 0, not 1" in str(e.value)


@pytest.mark.parametrize("argv, message", [
    (["--results", "DIR"], "--results DIR is a folder; give a file name"),
    (["--device", "mps"], "--device mps is not available"),
    (["--checkpoint", "DIR"], "is a folder, not a checkpoint file"),
    (["--checkpoint", "TEXT"], "is a text file (starting 'my notes'), not a PyTorch checkpoint"),
    (["--method", "tent", "--no-cache"], "--no-cache switches off ABPEM's feature cache; add abpem"),
    (["--method", "tent", "--eata-redundancy", "0.4"], "--eata-redundancy sets EATA's redundancy margin; add eata"),
    (["--label-csv", "TEXT"], "--label-csv applies to --data read only"),
    (["--seeds", "2", "2"], "--seeds 2 2 repeats a seed"),
    (["--corruption", "fog,fog"], "--corruption names fog twice"),
    (["--modality", "audio", "--corruption", "wind", "--noise-dir", "DIR"], "has no wind.wav"),
    (["--data", "read", "--data-root", "TEXT", "--label-csv", "TEXT"], "is not a folder"),
])
def test_bad_flags_are_refused_before_any_work(tmp_path, argv, message):
    (tmp_path / "notes.txt").write_text("my notes")
    sub = {"DIR": str(tmp_path), "TEXT": str(tmp_path / "notes.txt")}
    argv = [sub.get(a, a) for a in argv]
    if "--results" not in argv:
        argv += ["--results", str(tmp_path / "r.json")]
    with pytest.raises(SystemExit) as e:
        adapt.main(["--method", "source", "--corruption", "contrast", *argv])
    assert message.replace("DIR", str(tmp_path)) in str(e.value) and str(e.value).startswith("error: ")
    assert sorted(os.listdir(tmp_path)) == ["notes.txt"]  # nothing written, no stray temp file


def test_batch_size_and_seeds_out_of_range_are_refused_by_the_parser(capsys):
    for argv in (["--batch-size", "0"], ["--seeds", "-3"], ["--workers", "-1"]):
        with pytest.raises(SystemExit):
            adapt.main(argv)
        err = capsys.readouterr().err
        assert ": error: argument " + argv[0] + ":" in err.strip().splitlines()[-1] and "Traceback" not in err


def test_help_states_every_default_and_the_methods():
    parser = adapt.build_parser()
    for action in parser._actions:
        if action.dest != "help":
            assert "default" in (action.help or ""), action.dest
    text = parser.format_help().replace("\n", " ")
    assert all(name in text for name in adapt.METHODS)


def test_ctrl_c_ends_with_one_line_saying_what_was_saved(tmp_path, monkeypatch):
    def interrupt(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(adapt, "test_sets", interrupt)  # stopped during the data work of the first corruption
    out = tmp_path / "r.json"
    with pytest.raises(SystemExit) as e:
        adapt.main(["--method", "tent", "--checkpoint", tiny10(tmp_path), "--corruption", "contrast",
                    "--results", str(out)])
    assert str(e.value) == f"interrupted: saved nothing; not saved: results {out} (no file is left half-written)."
    assert sorted(os.listdir(tmp_path)) == ["tiny10.pt"]


# ---------------------------------------------------------------------------- muP diagnostic
def test_hidden_lr_scale_multiplies_only_the_matrices_learning_rate(tiny_batch):
    torch.manual_seed(0)
    model = CAVMAE("tiny")
    adapter = adapt.READ.setup(copy.deepcopy(model), None)
    adapt.scale_hidden_lr(adapter, 12.0)
    qkv = adapter.model.blocks_u[0].attn.qkv
    w0, b0 = qkv.weight.detach().clone(), qkv.bias.detach().clone()
    adapter(tiny_batch)
    # Adam's first step moves each parameter by lr * m / (sqrt(v) + eps) = lr * g / (|g| + eps): lr where g != 0
    dw, db = (qkv.weight - w0).abs(), (qkv.bias - b0).abs()
    assert dw.max().item() == pytest.approx(12 * 1e-4, rel=1e-3)  # the matrix: 12 x 1e-4
    assert db.max().item() == pytest.approx(1e-4, rel=1e-3)       # the bias (a vector): 1e-4 unchanged
    adapter.reset()
    assert torch.equal(qkv.weight, w0) and [g["lr"] for g in adapter.optimizer.param_groups] == [1e-4, 12 * 1e-4]
