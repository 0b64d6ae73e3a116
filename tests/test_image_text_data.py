"""Image-text data: tokenizers, CLIP pre-processing, the raw layouts of MM-IMDb / UPMC Food-101 /
Hateful Memes, MAP's missing tables, and the three metrics (common.py)."""
import gzip
import json
import os
import struct
import zlib

import pytest
import torch
import torchvision

import common
import data


# ---------------------------------------------------------------------------- helpers
def write_merges(path, lines, header="#version: 0.2"):
    with gzip.open(path, "wb") as f:
        f.write(("\n".join([header] + lines) + "\n").encode("utf-8"))
    return str(path)


# h e, l l, he ll, hell o</w>: the merges of "hello"
MERGES = ["h e", "l l", "he ll", "hell o</w>"]


@pytest.fixture
def bpe(tmp_path):
    return data.CLIPTokenizer(write_merges(tmp_path / "bpe.txt.gz", MERGES))


def write_image(path, rgb, h=8, w=8, fmt="png"):
    """A constant-colour image file (uint8 RGB, or one value for grey)."""
    rgb = [rgb] if isinstance(rgb, int) else list(rgb)
    img = torch.tensor(rgb, dtype=torch.uint8)[:, None, None].expand(len(rgb), h, w).contiguous()
    encoded = torchvision.io.encode_png(img) if fmt == "png" else torchvision.io.encode_jpeg(img, quality=95)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torchvision.io.write_file(str(path), encoded)
    return str(path)


def write_rgba_png(path, rgba, h=4, w=4):
    """A PNG of colour type 6 (RGBA), written by hand: torchvision encodes only 1 or 3 channels."""
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    rows = b"".join(b"\x00" + bytes(rgba) * w for _ in range(h))  # filter byte 0, then the pixels
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 6, 0, 0, 0)) + \
        chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")
    with open(path, "wb") as f:
        f.write(png)
    return str(path)


def clip_value(c, channel):
    """((c / 255) - mean) / std with CLIP's constants."""
    return (c / 255 - data.CLIP_MEAN[channel]) / data.CLIP_STD[channel]


WORDS = data.WordTokenizer(["hello", "world", "second", "plot", "red", "cake", "hot", "spicy", "tacos", "a", "meme"])


# ---------------------------------------------------------------------------- tokenizers
def test_clip_tokenizer_vocabulary(bpe):
    # 256 byte characters + 256 '</w>' forms = 512; merges 512 .. 515; sot 516, eot 517
    assert (bpe.sot, bpe.eot, bpe.vocab_size) == (516, 517, 518)
    # printable bytes come first in CLIP's order: '!' (33) is id 0, 'h' (104) is 104 - 33 = 71
    assert bpe.encoder["!"] == 0 and bpe.encoder["h"] == 71 and bpe.encoder["h</w>"] == 71 + 256
    assert [bpe.encoder[m.replace(" ", "")] for m in MERGES] == [512, 513, 514, 515]


def test_clip_tokenizer_merges_and_splitting(bpe):
    # "hello": h e l l o</w> -> he l l o</w> -> he ll o</w> -> hell o</w> -> hello</w> = 515
    assert bpe.encode("hello") == [515]
    # "hell": h e l l</w> -> he l l</w>; no merge (he, l) or (l, l</w>) is listed -> 512, 'l' 75, 'l</w>' 331
    assert bpe.encode("hell") == [512, 108 - 33, 108 - 33 + 256]
    # "Hello,  hello!" -> "hello, hello!" -> hello | , | hello | !   (',' is 44 - 33 = 11 -> ',</w>' 267; '!</w>' 256)
    assert bpe.encode("Hello,  hello!") == [515, 267, 515, 256]
    # contractions: "don't" -> don | 't : d 67, o 78, n</w> 333 ; ' 6, t</w> 339
    assert bpe.encode("don't") == [67, 78, 333, 6, 339]
    # digits one at a time: "42" -> 4</w> (52 - 33 + 256 = 275), 2</w> (50 - 33 + 256 = 273)
    assert bpe.encode("42") == [275, 273]
    # "_" joins punctuation as in CLIP's [^\s\p{L}\p{N}]+: "!_!" is one word: ! 0, _ 62, !</w> 256
    assert bpe.encode("!_!") == [0, 62, 256]
    # html unescaped twice: "&amp;amp;" -> "&amp;" -> "&"; whitespace collapsed, lower-cased
    assert data.clean_text("  Tom &amp;amp;\n\t JERRY ") == "tom & jerry"


def test_clip_tokenizer_padding_truncation_and_empty(bpe):
    ids = bpe(["hello", "", "hello hello hello"], context_length=4)
    assert ids.dtype == torch.long
    assert ids.tolist() == [[516, 515, 517, 0],      # [sot, hello, eot, pad]
                            [516, 517, 0, 0],        # "" -> only the special tokens (MAP's missing text)
                            [516, 515, 515, 517]]    # 5 ids cut to 4, the last set to eot
    with pytest.raises(data.DataError, match="no texts were given"):
        bpe([], 4)


def test_clip_tokenizer_bad_files(tmp_path):
    plain = tmp_path / "plain.txt"
    plain.write_text("#version: 0.2\nh e\n")
    with pytest.raises(data.DataError, match=r"plain.txt is not gzip-compressed"):
        data.CLIPTokenizer(str(plain))
    with pytest.raises(data.DataError, match=r"line 2 of BPE merges file .*three.gz is 'a b c', not two"):
        data.CLIPTokenizer(write_merges(tmp_path / "three.gz", ["h e", "a b c"]))
    with pytest.raises(data.DataError, match=r"header.gz has no merges"):
        data.CLIPTokenizer(write_merges(tmp_path / "header.gz", []))
    with gzip.open(tmp_path / "empty.gz", "wb"):
        pass
    with pytest.raises(data.DataError, match=r"empty.gz does not start with the '#version' header"):
        data.CLIPTokenizer(str(tmp_path / "empty.gz"))
    with gzip.open(tmp_path / "binary.gz", "wb") as f:
        f.write(b"\xff\xfe\x00\x81")
    with pytest.raises(data.DataError, match=r"binary.gz is not UTF-8 text"):
        data.CLIPTokenizer(str(tmp_path / "binary.gz"))
    with pytest.raises(data.DataError, match=r"nowhere.gz does not exist"):
        data.CLIPTokenizer(str(tmp_path / "nowhere.gz"))


def test_word_tokenizer():
    tok = data.WordTokenizer(["red", "cat"])
    # 0 pad, red 1, cat 2, sot 3, eot 4 (the largest id)
    assert (tok.sot, tok.eot, tok.vocab_size) == (3, 4, 5)
    assert tok(["Red  CAT", ""], context_length=5).tolist() == [[3, 1, 2, 4, 0], [3, 4, 0, 0, 0]]
    assert tok(["red cat red cat"], context_length=4).tolist() == [[3, 1, 2, 4]]  # truncated, ends in eot
    with pytest.raises(data.DataError, match=r"the word 'dog' of the text 'red dog' is not in the vocabulary"):
        tok(["red dog"], 5)
    with pytest.raises(data.DataError, match=r"the word 'red' is listed twice"):
        data.WordTokenizer(["red", "Red"])


# ---------------------------------------------------------------------------- pre-processing and images
def test_frames_to_input_default_unchanged_and_clip_constants():
    g = torch.Generator().manual_seed(0)
    frames = torch.randint(0, 256, (2, 3, 10, 12), dtype=torch.uint8, generator=g)
    x = frames.float() / 255.0  # the former body, written out: resize, crop, clamp, ImageNet mean / std
    x = torchvision.transforms.functional.resize(x, 8, interpolation=torchvision.transforms.InterpolationMode.BICUBIC,
                                                 antialias=True)
    x = torchvision.transforms.functional.center_crop(x, [8, 8]).clamp(0, 1)
    expected = torchvision.transforms.functional.normalize(x, data.IMAGENET_MEAN, data.IMAGENET_STD)
    assert torch.equal(data.frames_to_input(frames, 8), expected)
    # a constant image of 200 through CLIP's path: (0.784314 - 0.48145466) / 0.26862954 = 0.302859 / 0.268630 = 1.127423
    img = torch.full((3, 10, 14), 200, dtype=torch.uint8)
    out = data.clip_preprocess(img, 8)
    assert out.shape == (3, 8, 8)
    assert abs(clip_value(200, 0) - 1.127423) < 1e-6
    for c in range(3):
        assert torch.allclose(out[c], torch.full((8, 8), clip_value(200, c)), atol=1e-5)


def test_read_image_grey_and_rgba_become_rgb(tmp_path):
    grey = data.read_image(write_image(tmp_path / "grey.png", 77))
    assert grey.shape == (3, 8, 8) and grey[:, 0, 0].tolist() == [77, 77, 77]
    grey_jpeg = data.read_image(write_image(tmp_path / "grey.jpg", 77, fmt="jpg"))
    assert grey_jpeg.shape == (3, 8, 8) and grey_jpeg[:, 3, 3].tolist() == [77, 77, 77]  # a flat block is exact
    rgba = data.read_image(write_rgba_png(tmp_path / "rgba.png", (10, 20, 30, 128)))
    assert rgba.shape == (3, 4, 4) and rgba[:, 1, 2].tolist() == [10, 20, 30]  # alpha dropped


# ---------------------------------------------------------------------------- MM-IMDb
def make_mmimdb(root, movies=None, splits=None):
    movies = movies or {"0001": (["hello world", "second plot"], ["Comedy", "News", "Film-Noir"]),
                        "0002": (["red cake"], ["Drama"]), "0003": (["a meme"], []), "0004": (["hot"], ["Short"])}
    for i, (plots, genres) in movies.items():
        write_image(os.path.join(root, "images", f"{i}.jpeg"), (50, 100, 150), fmt="jpg")
        os.makedirs(os.path.join(root, "labels"), exist_ok=True)
        with open(os.path.join(root, "labels", f"{i}.json"), "w") as f:
            json.dump({"plot": plots, "genres": genres, "title": "x"}, f)
    with open(os.path.join(root, "split.json"), "w") as f:
        json.dump(splits or {"train": ["0001", "0002"], "dev": ["0003"], "test": ["0004"]}, f)
    return str(root)


def test_mmimdb_reads_labels_and_first_plot(tmp_path):
    root = make_mmimdb(tmp_path / "mmimdb")
    sets = {s: data.image_text_split("mmimdb", root, s, WORDS, image_size=8, context_length=6)
            for s in ("train", "val", "test")}
    assert {s: len(d) for s, d in sets.items()} == {"train": 2, "val": 1, "test": 1}
    item = sets["train"][0]
    # Comedy is genre 1, Film-Noir genre 22 of the 23; News is one of the IMDb genres MM-IMDb dropped: ignored
    assert item["label"].dtype == torch.float and item["label"].nonzero().flatten().tolist() == [1, 22]
    assert sets["train"][1]["label"].nonzero().flatten().tolist() == [0]  # Drama
    assert sets["val"][0]["label"].sum().item() == 0  # no genre: all zeros
    # the first plot "hello world": sot 12, hello 1, world 2, eot 13 (11 words), padding
    assert item["text"].tolist() == [12, 1, 2, 13, 0, 0]
    assert item["image"].shape == (3, 8, 8) and item["index"].item() == 0
    assert sets["train"].ids == ["0001", "0002"]
    assert len(data.MMIMDB_GENRES) == data.IMAGE_TEXT_TASKS["mmimdb"]["num_classes"] == 23


def test_mmimdb_bad_inputs(tmp_path):
    root = make_mmimdb(tmp_path / "a", splits={"train": ["0001", "0009"], "dev": [], "test": ["0004"]})
    with pytest.raises(data.DataError, match=r"movie 0009 of the 'train' list of .*split.json has no file .*0009.jpeg"):
        data.image_text_split("mmimdb", root, "train", WORDS)
    with pytest.raises(data.DataError, match=r"the 'dev' list of .*split.json is empty"):
        data.image_text_split("mmimdb", root, "val", WORDS)
    root = make_mmimdb(tmp_path / "b", movies={"0001": (["hot"], ["Cooking"])},
                       splits={"train": ["0001"], "dev": ["0001"], "test": ["0001"]})
    with pytest.raises(data.DataError, match=r"0001.json has the genre 'Cooking', not one of the 23"):
        data.image_text_split("mmimdb", root, "test", WORDS)
    with open(os.path.join(root, "labels", "0001.json"), "w") as f:
        f.write("{\"plot\": [\"hot\"")
    with pytest.raises(data.DataError, match=r"MM-IMDb label file .*0001.json is not valid JSON"):
        data.image_text_split("mmimdb", root, "test", WORDS)
    with open(os.path.join(root, "labels", "0001.json"), "w") as f:
        json.dump({"plot": [], "genres": []}, f)
    with pytest.raises(data.DataError, match=r"0001.json needs a non-empty 'plot' list"):
        data.image_text_split("mmimdb", root, "test", WORDS)
    with pytest.raises(data.DataError, match=r"unknown image-text dataset 'imdb'"):
        data.image_text_split("imdb", root, "test", WORDS)
    with pytest.raises(data.DataError, match=r"unknown split 'dev'; choose train, val or test"):
        data.image_text_split("mmimdb", root, "dev", WORDS)


# ---------------------------------------------------------------------------- UPMC Food-101
def make_food101(root, train_rows=None, test_rows=None):
    for split, n in (("train", 5), ("test", 1)):
        for cls in ("tacos", "apple_pie"):
            for k in range(n):
                write_image(os.path.join(root, "images", split, cls, f"{cls}_{k}.jpg"), (200, 100, 0), fmt="jpg")
    os.makedirs(os.path.join(root, "texts"), exist_ok=True)
    train_rows = train_rows or [f"{c}_{k}.jpg,red cake,{c}" for c in ("apple_pie", "tacos") for k in range(5)]
    test_rows = test_rows or ['tacos_0.jpg,"hot, spicy tacos",tacos', "apple_pie_0.jpg,hot, spicy,apple_pie"]
    with open(os.path.join(root, "texts", "train_titles.csv"), "w") as f:
        f.write("\n".join(train_rows) + "\n")
    with open(os.path.join(root, "texts", "test_titles.csv"), "w") as f:
        f.write("\n".join(test_rows) + "\n")
    return str(root)


def test_food101_classes_splits_and_texts(tmp_path):
    root = make_food101(tmp_path / "food")
    train, val, test = (data.image_text_split("food101", root, s, WORDS, image_size=8, context_length=6)
                        for s in ("train", "val", "test"))
    # 10 train rows: val = round(0.1 * 10) = 1 row, train the other 9, no row in both
    assert (len(train), len(val), len(test)) == (9, 1, 2)
    assert sorted(train.ids + val.ids) == sorted(f"{c}_{k}.jpg" for c in ("apple_pie", "tacos") for k in range(5))
    # classes are the sorted folders: apple_pie 0, tacos 1
    assert test.labels.dtype == torch.long and test.labels.tolist() == [1, 0]
    assert train[0]["text"].tolist() == [12, 5, 6, 13, 0, 0]  # "red cake": sot, red 5, cake 6, eot
    # quoted and unquoted commas in the text; the word tokenizer splits on spaces only, so "hot," is unknown
    assert test.texts == ["hot, spicy tacos", "hot, spicy"]
    with pytest.raises(data.DataError, match=r"the word 'hot,' of the text"):
        test[0]
    assert len(data.image_text_split("food101", root, "val", WORDS)) == 1  # the same val every time


def test_food101_uses_maps_split_file_when_present(tmp_path):
    root = make_food101(tmp_path / "food")
    with open(os.path.join(root, "split.json"), "w") as f:
        json.dump({"train": ["tacos_1.jpg", "apple_pie_0.jpg"], "val": ["tacos_4.jpg"], "test": []}, f)
    train, val = (data.image_text_split("food101", root, s, WORDS) for s in ("train", "val"))
    assert train.ids == ["tacos_1.jpg", "apple_pie_0.jpg"] and train.labels.tolist() == [1, 0]
    assert val.ids == ["tacos_4.jpg"]
    assert len(data.image_text_split("food101", root, "test", WORDS)) == 2  # test always from test_titles.csv
    with open(os.path.join(root, "split.json"), "w") as f:
        json.dump({"train": ["sushi_3.jpg"], "val": ["tacos_4.jpg"]}, f)
    with pytest.raises(data.DataError, match=r"split.json lists 'sushi_3.jpg' in 'train', which is not a row of"):
        data.image_text_split("food101", root, "train", WORDS)


def test_food101_header_and_bad_rows(tmp_path):
    header = ["image,text,class", "tacos_0.jpg,hot,tacos"]
    root = make_food101(tmp_path / "a", test_rows=header)
    test = data.image_text_split("food101", root, "test", WORDS, image_size=8, context_length=4)
    assert len(test) == 1 and test[0]["text"].tolist() == [12, 7, 13, 0]  # sot, hot, eot, pad
    root = make_food101(tmp_path / "b", test_rows=["tacos_7.jpg,hot,tacos"])
    with pytest.raises(data.DataError, match=r"row 1 of .*test_titles.csv names the image .*tacos_7.jpg, which does not exist"):
        data.image_text_split("food101", root, "test", WORDS)
    root = make_food101(tmp_path / "c", test_rows=["tacos_0.jpg,hot,sushi"])
    with pytest.raises(data.DataError, match=r"row 1 of .*test_titles.csv has the class 'sushi', which has no folder"):
        data.image_text_split("food101", root, "test", WORDS)
    root = make_food101(tmp_path / "d", test_rows=["tacos_0.jpg"])
    with pytest.raises(data.DataError, match=r"row 1 of .*test_titles.csv is 'tacos_0.jpg'; every row needs"):
        data.image_text_split("food101", root, "test", WORDS)


# ---------------------------------------------------------------------------- Hateful Memes
def make_hatememes(root, lines=None):
    for i in ("01235", "04567", "08901", "09999"):
        write_image(os.path.join(root, "img", f"{i}.png"), (10, 20, 30))
    default = {"train": [{"id": 1235, "img": "img/01235.png", "label": 1, "text": "a meme"},
                         {"id": 4567, "img": "img/04567.png", "label": 0, "text": "red cake"}],
               "dev_seen": [{"id": 8901, "img": "img/08901.png", "label": 0, "text": "hot"}],
               "test_seen": [{"id": 9999, "img": "img/09999.png", "label": 1, "text": "hello"}]}
    for split, entries in {**default, **(lines or {})}.items():
        with open(os.path.join(root, f"{split}.jsonl"), "w") as f:
            f.write("\n".join(e if isinstance(e, str) else json.dumps(e) for e in entries) + "\n")
    return str(root)


def test_hatememes_reads_splits_pixels_and_labels(tmp_path):
    root = make_hatememes(tmp_path / "hm")
    train, val, test = (data.image_text_split("hatememes", root, s, WORDS, image_size=8, context_length=5)
                        for s in ("train", "val", "test"))
    assert (len(train), len(val), len(test)) == (2, 1, 1)
    assert [train[i]["label"].item() for i in (0, 1)] == [1, 0] and train[0]["label"].dtype == torch.long
    assert train.ids == ["1235", "4567"]
    # "a meme": a 10, meme 11 between sot 12 and eot 13
    assert train[0]["text"].tolist() == [12, 10, 11, 13, 0]
    # an 8 x 8 PNG of (10, 20, 30) at image_size 8 (no resize): R (0.039216 - 0.48145466) / 0.26862954 = -1.646278
    image = train[0]["image"]
    assert abs(clip_value(10, 0) - -1.646278) < 1e-6
    for c, v in enumerate((10, 20, 30)):
        assert torch.allclose(image[c], torch.full((8, 8), clip_value(v, c)), atol=1e-6)


def test_hatememes_bad_inputs(tmp_path):
    unlabelled = {"test_seen": [{"id": 9999, "img": "img/09999.png", "text": "hello"}]}
    root = make_hatememes(tmp_path / "a", unlabelled)
    with pytest.raises(data.DataError, match=r"line 1 of .*test_seen.jsonl has no 'label' .*evaluate on test_seen.jsonl"):
        data.image_text_split("hatememes", root, "test", WORDS)
    root = make_hatememes(tmp_path / "b", {"dev_seen": ['{"id": 1, "img": "img/01235.png",']})
    with pytest.raises(data.DataError, match=r"line 1 of .*dev_seen.jsonl is not valid JSON"):
        data.image_text_split("hatememes", root, "val", WORDS)
    root = make_hatememes(tmp_path / "c", {"train": [{"id": 7, "img": "img/00007.png", "label": 0, "text": "hot"}]})
    with pytest.raises(data.DataError, match=r"line 1 of .*train.jsonl names the image .*00007.png, which does not exist"):
        data.image_text_split("hatememes", root, "train", WORDS)
    root = make_hatememes(tmp_path / "d", {"train": [{"id": 7, "img": "img/01235.png", "label": 2, "text": "hot"}]})
    with pytest.raises(data.DataError, match=r"line 1 of .*train.jsonl has label 2; each line needs"):
        data.image_text_split("hatememes", root, "train", WORDS)
    root = make_hatememes(tmp_path / "e", {"train": [""]})
    with pytest.raises(data.DataError, match=r"hatememes train .* has no samples"):
        data.image_text_split("hatememes", root, "train", WORDS)
    root = make_hatememes(tmp_path / "f")
    with open(os.path.join(root, "img", "01235.png"), "wb") as f:
        f.write(b"GIF89a")
    with pytest.raises(data.DataError, match=r"01235.png is not a JPEG or PNG image"):
        data.image_text_split("hatememes", root, "train", WORDS)


# ---------------------------------------------------------------------------- missing tables
def test_missing_table_counts():
    # n = 10, rate 0.7: m = round(7.0) = 7 incomplete samples
    both = data.missing_table(10, "both", 0.7, seed=0)
    # both: 7 - floor(7 / 2) = 4 lack text, floor(7 / 2) = 3 lack the image, 10 - 7 = 3 complete
    assert both.dtype == torch.long and torch.bincount(both, minlength=3).tolist() == [3, 4, 3]
    assert torch.bincount(data.missing_table(10, "text", 0.7, 0), minlength=3).tolist() == [3, 7, 0]
    assert torch.bincount(data.missing_table(10, "image", 0.7, 0), minlength=3).tolist() == [3, 0, 7]
    # an odd count split with text taking the extra one: n = 10, rate 0.3 -> m = 3 -> 2 text, 1 image
    assert torch.bincount(data.missing_table(10, "both", 0.3, 0), minlength=3).tolist() == [7, 2, 1]
    assert torch.equal(both, data.missing_table(10, "both", 0.7, seed=0))  # same seed, same table
    assert any(not torch.equal(both, data.missing_table(10, "both", 0.7, seed=s)) for s in (1, 2, 3))
    state = torch.get_rng_state()
    data.missing_table(10, "both", 0.7, seed=5)
    assert torch.equal(state, torch.get_rng_state())  # the global RNG is not used
    with pytest.raises(data.DataError, match=r"unknown missing kind 'audio'"):
        data.missing_table(10, "audio", 0.7)
    with pytest.raises(data.DataError, match=r"not 70; pass e.g. 0.7"):
        data.missing_table(10, "both", 70)


def test_missing_table_file_reused_and_refused(tmp_path):
    path = data.missing_table_path(str(tmp_path), "mmimdb", "train", "both", 0.7, 0)
    assert path == os.path.join(str(tmp_path), "missing_mmimdb_train_both_70_seed0.json")
    ids = ["0001", "0002", "0003", "0004"]
    table = data.load_or_make_missing_table(path, ids, "both", 0.7, 0)
    saved = json.load(open(path))
    assert saved == {"kind": "both", "rate": 0.7, "seed": 0, "ids": ids, "missing": table.tolist()}
    # 4 samples, rate 0.7: m = round(2.8) = 3 -> 2 text, 1 image, 1 complete
    assert torch.bincount(table, minlength=3).tolist() == [1, 2, 1]
    saved["missing"] = [2, 2, 2, 2]  # a file on disk wins over a new draw: it is read, not redrawn
    common.write_json(path, saved)
    assert data.load_or_make_missing_table(path, ids, "both", 0.7, 0).tolist() == [2, 2, 2, 2]
    with pytest.raises(data.DataError, match=r"was made for kind=both, rate=0.7, seed=0, not kind=both, rate=0.5, seed=0"):
        data.load_or_make_missing_table(path, ids, "both", 0.5, 0)
    with pytest.raises(data.DataError, match=r"was made for other samples \(4 ids, not these 3\)"):
        data.load_or_make_missing_table(path, ids[:3], "both", 0.7, 0)
    with open(path, "w") as f:
        f.write("[1, 2]")
    with pytest.raises(data.DataError, match=r"is not a missing table"):
        data.load_or_make_missing_table(path, ids, "both", 0.7, 0)
    assert open(path).read() == "[1, 2]"  # never overwritten


def test_with_missing_table_in_memory_placeholders():
    g = torch.Generator().manual_seed(0)
    image = torch.randn(4, 3, 2, 2, generator=g, dtype=torch.float64)
    text = WORDS(["hello", "red cake", "hot", "a meme"], 5)
    ds = data.AVTensors({"image": image, "text": text, "label": torch.tensor([0, 1, 0, 1])})
    missing = torch.tensor([0, 1, 2, 0])
    out = data.with_missing_table(ds, missing, WORDS, 5, "ones")
    f = out.fields
    assert f["missing"].tolist() == [0, 1, 2, 0]
    assert f["text"][1].tolist() == [12, 13, 0, 0, 0]  # the tokenised "": sot, eot
    assert torch.equal(f["text"][[0, 2, 3]], text[[0, 2, 3]]) and torch.equal(f["image"][[0, 1, 3]], image[[0, 1, 3]])
    assert torch.equal(f["image"][2], torch.ones(3, 2, 2, dtype=torch.float64))
    zeros = data.with_missing_table(ds, missing, WORDS, 5, "zeros").fields["image"]
    assert torch.equal(zeros[2], torch.zeros(3, 2, 2, dtype=torch.float64))
    black = data.with_missing_table(ds, missing, WORDS, 5, "black").fields["image"]
    # (0 - mean) / std: -0.48145466 / 0.26862954 = -1.792263, -0.4578275 / 0.26130258 = -1.752097,
    # -0.40821073 / 0.27577711 = -1.480220
    for c, v in enumerate((-1.792263, -1.752097, -1.480220)):
        assert torch.allclose(black[2, c], torch.full((2, 2), v, dtype=torch.float64), atol=1e-6)
    batch = next(iter(data.make_loader(out, 4, shuffle=False)))
    assert batch["missing"].dtype == torch.long and batch["missing"].tolist() == [0, 1, 2, 0]
    with pytest.raises(data.DataError, match=r"the missing table has 3 codes for 4 samples"):
        data.with_missing_table(ds, missing[:3], WORDS, 5, "ones")
    with pytest.raises(data.DataError, match=r"unknown image placeholder 'grey'"):
        data.with_missing_table(ds, missing, WORDS, 5, "grey")
    with pytest.raises(data.DataError, match=r"the texts have 5 tokens, not context_length = 7"):
        data.with_missing_table(ds, missing, WORDS, 7, "ones")


def test_with_missing_table_lazy(tmp_path):
    root = make_hatememes(tmp_path / "hm")
    train = data.image_text_split("hatememes", root, "train", WORDS, image_size=8, context_length=5)
    out = data.with_missing_table(train, torch.tensor([2, 1]), WORDS, 5, "black")
    first, second = out[0], out[1]
    assert first["missing"].item() == 2 and second["missing"].item() == 1
    assert torch.allclose(first["image"][0], torch.full((8, 8), -1.792263), atol=1e-6)  # black, red channel
    assert first["text"].tolist() == [12, 10, 11, 13, 0]  # its text kept ("a meme")
    assert second["text"].tolist() == [12, 13, 0, 0, 0]  # the tokenised ""
    assert torch.allclose(second["image"][2], torch.full((8, 8), clip_value(30, 2)), atol=1e-6)  # its image kept


# ---------------------------------------------------------------------------- metrics (common.py)
def test_accuracy():
    logits = torch.tensor([[2.0, 1.0], [0.0, 3.0], [1.0, 0.0]], dtype=torch.float64)
    # argmax 0, 1, 0 against labels 0, 0, 0: 2 of 3 = 66.67%
    assert common.accuracy(logits, torch.tensor([0, 0, 0])) == pytest.approx(200 / 3)


def test_f1_scores_by_hand():
    logits = torch.tensor([[1.0, -1.0], [1.0, 1.0], [-1.0, -1.0]], dtype=torch.float64)
    targets = torch.tensor([[1, 0], [0, 1], [1, 0]], dtype=torch.float64)
    # predicted (sigmoid >= 0.5, i.e. logit >= 0): [[1, 0], [1, 1], [0, 0]]
    # class 0: TP 1 (row 0), FP 1 (row 1), FN 1 (row 2) -> 2 / (2 + 1 + 1) = 0.5 ; class 1: TP 1 -> 1.0
    # macro (0.5 + 1) / 2 = 75% ; micro TP 2, FP 1, FN 1 -> 4 / 6 = 66.67%
    f1 = common.f1_scores(logits, targets)
    assert f1["f1_macro"] == pytest.approx(75.0) and f1["f1_micro"] == pytest.approx(200 / 3)
    # a logit of 0 is sigmoid 0.5 >= 0.5: positive (F1 100); at threshold 0.6 it is not (FN 1: F1 0)
    zero, one = torch.tensor([[0.0]]), torch.tensor([[1.0]])
    assert common.f1_scores(zero, one)["f1_macro"] == 100.0 and common.f1_scores(zero, one, 0.6)["f1_macro"] == 0.0
    # class 1 has no positive and no prediction: it counts 0 (sklearn zero_division=0): macro (1 + 0) / 2 = 50%
    # micro: TP 1, FP 0, FN 0 -> 100%
    f1 = common.f1_scores(torch.tensor([[1.0, -1.0]]), torch.tensor([[1.0, 0.0]]))
    assert (f1["f1_macro"], f1["f1_micro"]) == (50.0, 100.0)


def test_auroc_by_hand():
    scores = torch.tensor([0.1, 0.4, 0.35, 0.8], dtype=torch.float64)
    # positives 0.35, 0.8 ; negatives 0.1, 0.4: 0.35 > 0.1 yes, 0.35 > 0.4 no, 0.8 beats both -> 3 / 4 = 75%
    assert common.auroc(scores, torch.tensor([0, 0, 1, 1])) == pytest.approx(75.0)
    # tie: positive 0.5 against negatives 0.5 (half) and 0.2 (win): (0.5 + 1) / 2 = 75%
    assert common.auroc(torch.tensor([0.5, 0.5, 0.2]), torch.tensor([1, 0, 0])) == pytest.approx(75.0)
    with pytest.raises(ValueError, match=r"AUROC needs both classes, but the labels hold 0 positives and 3 negatives"):
        common.auroc(torch.tensor([0.5, 0.5, 0.2]), torch.tensor([0, 0, 0]))
