"""Every number of the README's result tables equals its results file in reported/.

Each table row is rebuilt here from the JSON the run wrote and must stand in README.md word for word
(`python tests/test_readme.py` prints the rows, for pasting after a new run)."""
import json
import os

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TTA_METHODS = ("source", "tent", "eata", "sar", "deyo", "read", "abpem", "brimpr")
TASKS = {"food": "accuracy", "imdb": "F1-macro", "memes": "AUROC"}


def load(name):
    with open(os.path.join(ROOT, "reported", name)) as f:
        return json.load(f)


def cell(values):
    """mean +/- std over seeds (population std, as the runners print), or the value of one seed."""
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{np.mean(values):.1f} ± {np.std(values):.1f}"


def tta_rows():
    """Averages over corruption types: video, audio (seeds 1 2 3), continual (seed 1); cost of the video
    run."""
    video, audio, cont = load("adapt_video.json"), load("adapt_audio.json"), load("adapt_continual.json")
    rows = []
    for m in TTA_METHODS:
        rows.append(f"| {m} | {cell(video['average_per_seed'][m])} | {cell(audio['average_per_seed'][m])} | "
                    f"{cell(cont['average_per_seed'][m])} | {video['time_ratio_to_source'][m]:.2f} |")
    return rows


def image_text_rows(method, protocol, variants, settings=None):
    """One row per (task, setting) of the image-text runs (one per task: `train.py --method M --data TASK`):
    | task (metric) | setting | variant cells ... |"""
    rows = []
    for r in [r for task in TASKS for r in load(f"train_{method}_{task}.json")["results"]]:
        if r["protocol"] != protocol or (settings and r["setting"] not in settings):
            continue
        cells = " | ".join(cell(r["values"][v]) for v in variants)
        rows.append(f"| {r['task']} ({TASKS[r['task']]}) | {r['setting']} | {cells} |")
    return rows


def av_rows(file, variants, settings):
    rows = []
    for r in load(file)["results"]:
        if r["setting"] in settings:
            # the audio-video runs before 2026-12 wrote "accuracy"
            values = r.get("values", r.get("accuracy"))
            rows.append(f"| {r['setting']} | " + " | ".join(cell(values[v]) for v in variants) + " |")
    return rows


CMPT_IT = ("head_only", "cmpt", "lambda0", "dropout")
AOEPT_IT = ("map", "aoept", "no_memory", "no_instantiation", "no_aux", "no_shared")
CMPT_AV = ("cmpt", "lambda0", "dropout", "baseline")
AT_TEST = ("complete (both)", "text only (image 100% missing)", "image only (text 100% missing)")
AV_SETTINGS = ("complete (0% missing)", "audio 100% missing", "video 100% missing", "missing-audio 70%",
               "missing-video 70%", "missing-both 70%")


def all_rows():
    return {"test-time adaptation": tta_rows(),
            "CMPT, image-text, MAP protocol": image_text_rows("cmpt", "map", CMPT_IT),
            "CMPT, image-text, missing at test": image_text_rows("cmpt", "inference", CMPT_IT,
                                                                 AT_TEST),
            "CMPT, audio-video": av_rows("train_cmpt.json", CMPT_AV, AV_SETTINGS),
            "AOEPT and MAP, image-text": image_text_rows("aoept", "map", AOEPT_IT)}


@pytest.mark.parametrize("table", list(all_rows()))
def test_readme_table_equals_its_results_file(table):
    readme = open(os.path.join(ROOT, "README.md")).read()
    rows = all_rows()[table]
    assert rows, f"no rows for {table}"
    for row in rows:
        assert row in readme, f"README lacks, or differs from, this row of {table}: {row}"


if __name__ == "__main__":
    for name, rows in all_rows().items():
        print(f"\n{name}")
        print("\n".join(rows))
