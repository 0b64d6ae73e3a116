"""Properties of the embedded image-text benchmark (food, imdb, memes), each checked on the generated
data itself or on the frozen source backbone (never on a method's score). The README's "The embedded
image-text benchmark" section says why each one matters."""
import math

import pytest
import torch

import data
from conftest import spectrum_slope
import train


@pytest.fixture(scope="module")
def raw():
    return data.image_text_raw(0)


def object_mask(images):
    """The objects' pixels: saturation (max - min) / max above 0.6 and value above 0.15 (objects are drawn
    with saturation 0.75 .. 0.95, the scene with at most 0.45). images uint8 (N, 3, S, S) -> (N, S, S) bool."""
    x = images.float() / 255
    hi, lo = x.amax(1), x.amin(1)
    return ((hi - lo) / hi.clamp_min(1e-6) > 0.6) & (hi > 0.15)


def named(texts, words):
    """For each text, the index of the first of `words` it contains, or -1."""
    out = []
    for t in texts:
        tokens = t.split()
        out.append(next((i for i, w in enumerate(words) if w in tokens), -1))
    return torch.tensor(out)


def test_split_sizes_and_label_shapes(raw):
    for task in data.IT_TASKS:
        for split, n in (("train", 2000), ("val", 200), ("test", 1024)):
            assert len(raw[task][split]["texts"]) == len(raw[task][split]["images"]) == n
    food = raw["food"]["test"]["label"]
    counts = torch.bincount(food, minlength=20)
    assert counts.max() - counts.min() <= 1  # balanced, as Food-101's test split
    assert raw["imdb"]["test"]["label"].shape == (1024, 12)


def test_imdb_is_multilabel_with_unequal_genre_frequencies(raw):
    y = raw["imdb"]["train"]["label"]
    freq = y.mean(0)
    assert (y.sum(1) >= 1).all()  # every film has a genre
    assert 1.3 <= y.sum(1).mean() <= 2.5  # MM-IMDb: about 2.5 genres per film
    assert freq.max() / freq.min() >= 8  # MM-IMDb: Drama in half the films, Film-Noir in 1%
    assert (freq[:-1] >= freq[1:] - 0.02).all()  # listed from the most to the least frequent


def test_memes_labels_depend_on_the_pairing(raw):
    # Hateful Memes' confounders: the same text with another picture, or the same picture with another
    # text, flips the label for a share of the samples; so neither modality alone decides.
    m = raw["memes"]["train"]
    y, sib, same_text = m["label"], m["sibling"], m["same_text"]
    assert 0.3 <= y.float().mean() <= 0.5  # Hateful Memes: 35-38% hateful
    i = torch.arange(len(y))
    assert (sib[sib] == i).all()  # siblings are pairs
    t_pairs, i_pairs = i[same_text & (i < sib)], i[~same_text & (i < sib)]
    assert all(m["texts"][a] == m["texts"][b] for a, b in zip(t_pairs.tolist(), sib[t_pairs].tolist()))
    assert torch.equal(m["images"][i_pairs], m["images"][sib[i_pairs]])
    assert (y[t_pairs] != y[sib[t_pairs]]).float().mean() >= 0.3  # same text, other picture: label flips
    assert (y[i_pairs] != y[sib[i_pairs]]).float().mean() >= 0.3  # same picture, other text: label flips


def test_pictures_have_the_amplitude_spectrum_of_natural_images(raw):
    # radially averaged amplitude spectrum of the grey test pictures ~ 1 / f^alpha with alpha in 0.8 .. 1.6
    grey = torch.cat([raw[t]["test"]["images"][:300] for t in data.IT_TASKS]).float().mean(1) / 255
    alpha = spectrum_slope(grey)
    assert 0.8 <= alpha <= 1.6


def test_texts_name_what_the_picture_shows_per_sample(raw):
    # the region, colour and size a text names are those of ITS picture (per sample, not per class)
    for task in data.IT_TASKS:
        d = raw[task]["test"]
        mask = object_mask(d["images"])                                     # (N, S, S)
        S = mask.shape[-1]
        area = mask.float().sum((1, 2))
        yy, xx = torch.meshgrid(torch.arange(S).float(), torch.arange(S).float(), indexing="ij")
        cx = (mask * xx).sum((1, 2)) / area.clamp_min(1)
        cy = (mask * yy).sum((1, 2)) / area.clamp_min(1)
        region = named(d["texts"], data.IT_REGIONS)
        side = torch.stack([cx < S / 2, cx >= S / 2, cy < S / 2, cy >= S / 2], 1)  # left, right, top, bottom
        has = (region >= 0) & (area > 0)
        assert side[has, region[has]].float().mean() >= 0.95
        # colour: the named hue is the nearest of the 8 to the objects' mean hue
        x = d["images"].float() / 255
        hi, lo = x.amax(1), x.amin(1)
        r, g, b = x[:, 0], x[:, 1], x[:, 2]
        hue = torch.atan2(math.sqrt(3) * (g - b), 2 * r - g - b) / (2 * math.pi) % 1.0      # (N, S, S)
        mean_angle = torch.atan2((torch.sin(2 * math.pi * hue) * mask).sum((1, 2)),
                                 (torch.cos(2 * math.pi * hue) * mask).sum((1, 2))) / (2 * math.pi) % 1.0
        hues = torch.tensor([h for _, h in data.IT_COLOURS])
        dist = ((mean_angle[:, None] - hues[None]) % 1.0).minimum((hues[None] - mean_angle[:, None]) % 1.0)
        colour = named(d["texts"], list(data.COLOUR_WORDS))
        if task == "memes":  # a meme's text never names the colour: it is its subject's
            assert (colour == -1).all()
            colour = torch.tensor([c for _, c in data.MEMES_SUBJECTS])[d["subject"]]
        has = (colour >= 0) & (area > 0)
        assert (dist[has].argmin(1) == colour[has]).float().mean() >= 0.9
        # size: one small object covers less than one big one
        small, big = named(d["texts"], ["small", "tiny"]), named(d["texts"], ["big", "large"])
        one = d["count"] == 1
        assert area[one & (small >= 0)].median() * 2 < area[one & (big >= 0)].median()


def test_texts_vary_in_length_and_use_synonyms_and_noise(raw):
    lengths = {t: torch.tensor([len(s.split()) for s in raw[t]["train"]["texts"]]).float() for t in data.IT_TASKS}
    for t, n in lengths.items():
        assert n.std() >= 1.5, t
    assert lengths["imdb"].mean() >= 2 * lengths["food"].mean()  # plots are longer than titles
    food = raw["food"]["train"]
    dish = named(food["texts"], [w for ws in data.FOOD_DISHES for w in ws])
    assert 0.76 <= (dish >= 0).float().mean() <= 0.84  # a title names its dish with probability 0.8
    for c in range(20):  # both synonyms of every dish are used, and a dish word is its own class's
        words = set((dish[(food["label"] == c) & (dish >= 0)] % 2).tolist())
        assert words == {0, 1}
        assert ((dish[(food["label"] == c) & (dish >= 0)] // 2) == c).all()
    noise = named(food["texts"], list(data.IT_NOISE))
    assert (noise >= 0).float().mean() >= 0.9


def test_the_class_shows_at_a_fine_scale_too(raw):
    # the inner pattern (period P = 4 px) is a class cue finer than a patch: inside the objects, the share
    # of the spectrum at 1/P (stripes) .. sqrt(2)/P (dots) cycles per pixel is larger for striped or dotted
    # dishes than for solid ones
    d = raw["food"]["test"]
    x = d["images"].float().mean(1) / 255
    mask = object_mask(d["images"]).float()
    pattern = d["label"] % 4                                                  # motif c: pattern = c % 4
    big = d["size"] == 2
    spec = torch.fft.fft2((x - (x * mask).sum((1, 2), keepdim=True) / mask.sum((1, 2), keepdim=True).clamp_min(1)) * mask).abs()
    S = x.shape[-1]
    f = (torch.fft.fftfreq(S)[:, None] ** 2 + torch.fft.fftfreq(S)[None] ** 2).sqrt()
    P = data.IT_EMBEDDED["pattern_period"]
    band = ((f >= 0.8 / P) & (f <= 1.6 / P)).float()
    energy = (spec * band).sum((1, 2)) / (spec.sum((1, 2)) + 1e-6)
    solid, patterned = energy[big & (pattern == 0)], energy[big & (pattern > 0)]
    assert patterned.median() > 1.5 * solid.median()


@pytest.fixture(scope="module")
def probes():
    """The frozen source backbone's linear probes per task (the backbone is pre-trained once if missing)."""
    model, _ = train.default_clip_source("tiny", 0, "cpu")
    tok = data.embedded_tokenizer()
    out = {}
    for task, info in data.IT_TASKS.items():
        kw = dict(image_size=model.image_size, context_length=model.context_length, tokenizer=tok)
        out[task] = train.modality_probes(model, info["kind"], info["num_classes"],
                                          data.embedded_image_text_split(task, "train", **kw),
                                          data.embedded_image_text_split(task, "test", **kw), "cpu")
    return out


def chance(task, probes_of_nothing):
    """The same linear head trained on an input that carries nothing (constant features): it predicts the
    training prior, so accuracy 1/20 on food, AUROC 50 on memes, and on imdb positive only for genres in
    at least half the films. (The best input-free predictor of F1-macro, every genre for every film,
    scores mean_g 2 p_g / (1 + p_g) instead; the README gives both.)"""
    return probes_of_nothing[task]


@pytest.fixture(scope="module")
def probes_of_nothing():
    out = {}
    for task, info in data.IT_TASKS.items():
        kw = dict(image_size=48, context_length=40)
        train_set, test_set = (data.embedded_image_text_split(task, s, **kw) for s in ("train", "test"))
        y_tr, y_te = train_set.fields["label"], test_set.fields["label"]
        out[task] = train.linear_probe(info["kind"], info["num_classes"], torch.zeros(len(y_tr), 4), y_tr,
                                       torch.zeros(len(y_te), 4), y_te)
    return out


def test_a_head_without_input_scores_chance(probes_of_nothing, raw):
    assert probes_of_nothing["food"] == pytest.approx(5.0, abs=0.2)  # one class of 20 (1024 / 20 = 51.2 each)
    assert probes_of_nothing["memes"] == pytest.approx(50.0)  # constant scores: every pair a tie
    p = raw["imdb"]["test"]["label"].mean(0)
    # only the genre seen in >= 50% of the training films is predicted: F1 = 2 p / (1 + p) for it, 0 for the others
    assert probes_of_nothing["imdb"] == pytest.approx(100.0 * (2 * p[0] / (1 + p[0])).item() / 12, abs=0.01)


@pytest.mark.parametrize("task", list(data.IT_TASKS))
def test_text_is_the_stronger_modality_and_both_beat_either(task, probes, probes_of_nothing):
    # as on the real datasets (Food-101: 94.5 both, 85.3 text, 75.7 image with CMPT)
    r = probes[task]
    assert r["both"] > r["text"] > r["image"] > chance(task, probes_of_nothing) + 2


def test_the_backbone_matches_pictures_to_their_own_texts(probes):
    # image -> text top-1 in clean test batches of 64 (chance 1.6%) is at least twice the figure with the
    # pairs shuffled within each class (which leaves only the class to match): the frozen backbone has
    # learnt the per-sample correspondence, not only the class. (The aim of 30% is reached on food
    # only; the README reports each task's figure.)
    for task, r in probes.items():
        ret = r["retrieval"]
        assert ret["true_pairs"] >= 2 * ret["class_shuffled"], task
        assert ret["true_pairs"] >= 3 * 100 / 64, task  # at least 3x chance
