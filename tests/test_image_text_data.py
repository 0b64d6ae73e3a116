"""Image-text data: tokenizers, CLIP pre-processing, the raw layouts of MM-IMDb / UPMC Food-101 /
Hateful Memes, MAP's missing tables, and the three metrics (common.py)."""
import base64
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
from conftest import refused


# ---------------------------------------------------------------------------- helpers
PUBLISHED_HEADER = '"bpe_simple_vocab_16e6.txt#version: 0.2'  # line 0 of the file OpenAI and open_clip ship
MERGES = ["h e", "l l", "he ll", "hell o</w>"]  # the merges of "hello": ids 512 .. 515


def write_merges(path, lines, header=PUBLISHED_HEADER, gz=True):
    text = ("\n".join([header] + lines) + "\n").encode("utf-8")
    with (gzip.open(path, "wb") if gz else open(path, "wb")) as f:
        f.write(text)
    return str(path)


@pytest.fixture
def bpe(tmp_path):
    return data.CLIPTokenizer(write_merges(tmp_path / "bpe.txt.gz", MERGES))


# ---------------------------------------------------------------------------- the merges file as published
@pytest.mark.parametrize("header", [PUBLISHED_HEADER, "#version: 0.2", "h e", ""])
@pytest.mark.parametrize("gz", [True, False])
def test_first_line_skipped_whatever_it_holds_gzipped_or_not(tmp_path, header, gz):
    tok = data.CLIPTokenizer(write_merges(tmp_path / "bpe", MERGES, header=header, gz=gz))
    # 256 byte characters + 256 '</w>' forms + 4 merges + sot + eot; line 0 never becomes a merge
    assert (tok.sot, tok.eot, tok.vocab_size) == (516, 517, 518)
    assert tok.bpe_ranks == {("h", "e"): 0, ("l", "l"): 1, ("he", "ll"): 2, ("hell", "o</w>"): 3}
    assert tok.encode("hello") == [515]


def test_reads_exactly_the_merges_openai_reads(tmp_path):
    # 48,895 lines after the header: OpenAI's loader keeps lines 1 .. 48,894; the malformed last one is unread
    lines = [f"a{n} b" for n in range(data.BPE_MERGES_USED)] + ["not a merge"]
    tok = data.CLIPTokenizer(write_merges(tmp_path / "big.gz", lines))
    assert data.BPE_MERGES_USED == 48894
    assert tok.vocab_size == 256 + 256 + 48894 + 2 == 49408 and tok.eot == 49407  # the published sizes
    assert tok.encoder["a48893b"] == 512 + 48893  # the last merge read


def test_bad_merges_files_are_refused(tmp_path):
    with gzip.open(tmp_path / "binary.gz", "wb") as f:
        f.write(b"\xff\xfe\x00\x81")
    refused(data.CLIPTokenizer, str(tmp_path / "binary.gz"),
            match="binary.gz is not UTF-8 text, gzipped or plain")
    whole = (tmp_path / "binary.gz").read_bytes()
    (tmp_path / "cut.gz").write_bytes(whole[:len(whole) // 2])  # a download cut short
    refused(data.CLIPTokenizer, str(tmp_path / "cut.gz"), match="cut.gz is not UTF-8 text")
    refused(data.CLIPTokenizer, write_merges(tmp_path / "three.gz", ["h e", "a b c"]),
            match="line 2 of BPE merges file")
    refused(data.CLIPTokenizer, write_merges(tmp_path / "header.gz", []),
            match="has no merges after its first line")


# ---------------------------------------------------------------------------- Unicode as OpenAI's tokenizer
def test_words_split_by_unicode_category():
    # \p{N} one character at a time: '²' (No), '½' (No), 'ⅻ' (Nl), '٣' (Nd); \p{L} runs: 'x', 'y'
    assert data.CLIP_SPLIT.findall("x²y½ⅻ٣") == ["x", "²", "y", "½", "ⅻ", "٣"]
    # marks are neither letters nor numbers: ह (Lo) ि (Mc) न (Lo) ् (Mn) द (Lo) ी (Mc) -> six pieces
    assert data.CLIP_SPLIT.findall("हिन्दी") == ["ह", "ि", "न", "्", "द", "ी"]
    # "_" is neither letter nor number (as in CLIP); a run of punctuation stays whole; contractions split off
    assert data.CLIP_SPLIT.findall("a_b!! don't") == ["a", "_", "b", "!!", "don", "'t"]


def test_clean_text_does_what_ftfy_does_to_tokens():
    # full-width letters -> ASCII, e + combining acute -> é (NFC), curly quotes straightened, 'ﬁ' -> 'fi',
    # entities decoded (twice), ideographic space -> space, lower-cased
    assert data.clean_text("Ｃａｆｅ\u0301 ‘n’ “x” ﬁsh &amp;amp;\u3000Tom") == "café 'n' \"x\" fish & tom"
    assert data.clean_text("a\ufeffb\x07c") == "abc"  # byte-order mark and BEL removed
    assert data.clean_text("\x93hi\x94") == '"hi"'  # C1 0x93 / 0x94 read as cp1252 “ ”, then straightened
    assert data.clean_text("it&rsquo;s <b>") == "it’s <b>"  # '<': ftfy keeps entities; CLIP's unescape adds ’
    assert data.clean_text("it&rsquo;s") == "it's"  # no '<': ftfy decodes ’ first, then straightens it


def test_ids_of_unicode_text(bpe):
    # byte ids: printable '!'..'~' are 0..93, '¡'..'¬' 94..105, '®'..'ÿ' 106..187; '</w>' forms + 256
    # '½' = UTF-8 C2 BD -> 'Â' (0xC2: 106 + 0xC2 - 0xAE = 126), '½</w>' (106 + 0xBD - 0xAE + 256 = 377)
    assert bpe.encode("½") == [126, 377]
    # 'x²' is two words (letter, number): 'x</w>' (0x78 - 0x21 + 256 = 343); '²' = C2 B2 -> 126,
    # 106 + 0xB2 - 0xAE + 256 = 366
    assert bpe.encode("x²") == [343, 126, 366]
    # a curly apostrophe becomes "'", so "'t" splits off: d 67, o 78, n</w> 333 ; ' 6, t</w> 339
    assert bpe.encode("DON’T") == bpe.encode("don't") == [67, 78, 333, 6, 339]
    # a full-width 'ｈ' becomes 'h': "ｈello" is "hello" = 515
    assert bpe.encode("ｈello") == [515]


# ---------------------------------------------------------------------------- pictures of every mode
def png(path, pixels, colour_type, depth=8, chunks=b""):
    """A PNG written by hand: pixels (H, W, C) ints; colour type 0 grey, 2 RGB, 3 palette, 4 grey+alpha,
    6 RGBA; `chunks` go before the image data."""
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    h, w = len(pixels), len(pixels[0])
    fmt = ">" + "B" * len(pixels[0][0]) * w if depth == 8 else ">" + "H" * len(pixels[0][0]) * w
    rows = b"".join(b"\x00" + struct.pack(fmt, *[v for px in row for v in px]) for row in pixels)
    with open(path, "wb") as f:
        header = chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, depth, colour_type, 0, 0, 0))
        body = chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")
        f.write(b"\x89PNG\r\n\x1a\n" + header + chunks + body)
    return str(path)


def flat(value, h=4, w=4):
    return [[list(value)] * w for _ in range(h)]


# an 8 x 8 CMYK JPEG (Adobe, as Photoshop writes them) of C, M, Y, K = 0, 128, 255, 64, made with PIL
CMYK_JPEG = base64.b64decode(
    "/9j/7gAOQWRvYmUAZAAAAAAA/9sAQwABAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEB"
    "AQEBAQEBAQEBAQEBAQEB/8AAFAgACAAIBEMRAE0RAFkRAEsRAP/EABcAAAMBAAAAAAAAAAAAAAAAAAQJCgv/xAAUEAEAAAAA"
    "AAAAAAAAAAAAAAAA/9oADgRDAE0AWQBLAAA/AL+A7P8Az+H/2Q==")


def test_read_image_every_mode_as_pil_convert_rgb(tmp_path):
    def rgb_at(path, y=0, x=0):
        return data.read_image(path)[:, y, x].tolist()
    assert rgb_at(png(tmp_path / "rgb.png", flat((10, 20, 30)), 2)) == [10, 20, 30]
    assert rgb_at(png(tmp_path / "grey.png", flat((77,)), 0)) == [77, 77, 77]
    grey_jpeg = torchvision.io.encode_jpeg(torch.full((1, 8, 8), 77, dtype=torch.uint8), quality=95)
    torchvision.io.write_file(str(tmp_path / "grey.jpg"), grey_jpeg)
    assert rgb_at(tmp_path / "grey.jpg", 3, 3) == [77, 77, 77]  # a flat block decodes exactly
    (tmp_path / "cmyk.jpg").write_bytes(CMYK_JPEG)
    # PIL: R = (255 - C)(255 - K) / 255 = 255 * 191 / 255 = 191, G = 127 * 191 / 255 = 95.1 -> 95, B = 0
    assert rgb_at(tmp_path / "cmyk.jpg", 3, 3) == [191, 95, 0]
    # RGBA: the left half fully transparent; alpha is dropped, not composited (on white it would be 255s)
    rgba = [[[10, 20, 30, 0]] * 2 + [[10, 20, 30, 255]] * 2 for _ in range(4)]
    assert rgb_at(png(tmp_path / "rgba.png", rgba, 6)) == rgb_at(tmp_path / "rgba.png", 0, 3) == [10, 20, 30]
    # palette: entry 0 = (200, 100, 50), fully transparent by tRNS; the colour is looked up, alpha dropped
    plte = struct.pack(">I", 6) + b"PLTE" + bytes([200, 100, 50, 0, 0, 0])
    plte += struct.pack(">I", zlib.crc32(plte[4:]))
    trns = struct.pack(">I", 1) + b"tRNS" + b"\x00" + struct.pack(">I", zlib.crc32(b"tRNS\x00"))
    assert rgb_at(png(tmp_path / "palette.png", flat((0,)), 3, chunks=plte + trns)) == [200, 100, 50]
    assert rgb_at(png(tmp_path / "grey_alpha.png", flat((77, 0)), 4)) == [77, 77, 77]
    # 16-bit: the high byte, 0x8A3F -> 0x8A = 138 (PIL's convert("RGB") would clip grey to 255: the DEVIATION)
    assert rgb_at(png(tmp_path / "grey16.png", flat((0x8A3F,)), 0, depth=16)) == [138, 138, 138]
    # 0x1234 -> 0x12 = 18, 0xABCD -> 0xAB = 171, 0xFFFF -> 255 (as PIL reads 16-bit colour)
    assert rgb_at(png(tmp_path / "rgb16.png", flat((0x1234, 0xABCD, 0xFFFF)), 2, depth=16)) == [18, 171, 255]


def test_read_image_refuses_a_damaged_file(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
    refused(data.read_image, tmp_path / "bad.png", match="bad.png is not a readable JPEG/PNG image")


def clip_value(v, c):
    """(v / 255 - mean_c) / std_c with CLIP's constants, float64."""
    return (v / 255 - data.CLIP_MEAN[c]) / data.CLIP_STD[c]


def expected(grey_levels):
    """(3, S, S) float: the same grey levels in the three channels, CLIP-normalised."""
    return torch.tensor([[[clip_value(v, c) for v in row] for row in grey_levels] for c in range(3)])


def test_clip_preprocess_resizes_as_pil_two_rounded_passes():
    # PIL's bicubic (a = -0.5) from 4 to 2 pixels: scale 2, support 4, taps x = 0..3 at
    # t = (x + 0.5 - centre) / 2. Output 0 (centre 1): t = -.25, .25, .75, 1.25 -> k = .8671875, .8671875,
    # .2265625, -.0703125 (sum 1.890625) -> weights .458678, .458678, .119835, -.037190; output 1 (centre 3)
    # takes them in reverse order. Row (0, 100, 200, 255): 45.8678 + 23.9669 - 9.4835 = 60.35 -> 60 ;
    # 11.9835 + 91.7355 + 116.9628 = 220.68 -> 221
    row = torch.tensor([0, 100, 200, 255], dtype=torch.uint8)
    out = data.clip_preprocess(row.expand(3, 4, 4), 2)
    assert torch.allclose(out, expected([[60, 221]] * 2).float(), atol=1e-6)
    # Rows (0, 0, 0, 255) x 2 over (255, 255, 255, 255) x 2. Widths first, rounded to 8 bits: top rows
    # -.037190 * 255 = -9.48 -> 0 (clamped), .458678 * 255 = 116.96 -> 117; bottom rows 255, 255. Heights:
    # column (0, 0, 255, 255): (.119835 - .037190) * 255 = 21.07 -> 21 ; .917355 * 255 = 233.93 -> 234
    # column (117, 117, 255, 255): .917355 * 117 + .082645 * 255 = 128.41 -> 128 ;
    # .082645 * 117 + .917355 * 255 = 243.60 -> 244   (one float pass without the clamp: 12 at [0, 0])
    image = torch.tensor([[0, 0, 0, 255]] * 2 + [[255] * 4] * 2, dtype=torch.uint8).expand(3, 4, 4)
    out = data.clip_preprocess(image, 2)
    assert torch.allclose(out, expected([[21, 128], [234, 244]]).float(), atol=1e-6)


def test_clip_preprocess_crops_with_offsets_rounded_down():
    # 8 x 11 at size 8: no resize (int(8 * 11 / 8) = 11); left offset (11 - 8) // 2 = 1 (torchvision: 2)
    columns = torch.arange(11, dtype=torch.uint8) * 10                        # column j holds 10 j
    out = data.clip_preprocess(columns.expand(3, 8, 11), 8)
    assert torch.allclose(out, expected([[10 * j for j in range(1, 9)]] * 8).float(), atol=1e-6)
    out = data.clip_preprocess(columns[:, None].expand(3, 11, 8), 8)          # 11 x 8: top offset 1
    assert torch.allclose(out, expected([[10 * i] * 8 for i in range(1, 9)]).float(), atol=1e-6)


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


WORDS = data.WordTokenizer(["hello", "world", "second", "plot", "red", "cake", "hot", "spicy", "tacos", "a",
                            "meme"])


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
    # "Hello,  hello!" -> "hello, hello!" -> hello | , | hello | !
    # (',' is 44 - 33 = 11 -> ',</w>' 267; '!</w>' 256)
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
    refused(bpe, [], 4, match='No texts were given')


def test_word_tokenizer():
    tok = data.WordTokenizer(["red", "cat"])
    # 0 pad, red 1, cat 2, sot 3, eot 4 (the largest id)
    assert (tok.sot, tok.eot, tok.vocab_size) == (3, 4, 5)
    assert tok(["Red  CAT", ""], context_length=5).tolist() == [[3, 1, 2, 4, 0], [3, 4, 0, 0, 0]]
    assert tok(["red cat red cat"], context_length=4).tolist() == [[3, 1, 2, 4]]  # truncated, ends in eot
    refused(tok, ["red dog"], 5, match="The word 'dog' of the text 'red dog' is not in the vocabulary")


# ---------------------------------------------------------------------------- pre-processing and images
def test_frames_to_input_default_unchanged_and_clip_constants():
    g = torch.Generator().manual_seed(0)
    frames = torch.randint(0, 256, (2, 3, 10, 12), dtype=torch.uint8, generator=g)
    x = frames.float() / 255.0  # the former body, written out: resize, crop, clamp, ImageNet mean / std
    x = torchvision.transforms.functional.resize(
        x, 8, interpolation=torchvision.transforms.InterpolationMode.BICUBIC, antialias=True)
    x = torchvision.transforms.functional.center_crop(x, [8, 8]).clamp(0, 1)
    expected = torchvision.transforms.functional.normalize(x, data.IMAGENET_MEAN, data.IMAGENET_STD)
    assert torch.equal(data.frames_to_input(frames, 8), expected)
    # a constant image of 200 through CLIP's path:
    # (0.784314 - 0.48145466) / 0.26862954 = 0.302859 / 0.268630 = 1.127423
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
    # a flat block is exact
    assert grey_jpeg.shape == (3, 8, 8) and grey_jpeg[:, 3, 3].tolist() == [77, 77, 77]
    rgba = data.read_image(write_rgba_png(tmp_path / "rgba.png", (10, 20, 30, 128)))
    assert rgba.shape == (3, 4, 4) and rgba[:, 1, 2].tolist() == [10, 20, 30]  # alpha dropped


# ---------------------------------------------------------------------------- MM-IMDb
def make_mmimdb(root, movies=None, splits=None):
    movies = movies or {"0001": (["hello world", "second plot"], ["Comedy", "News", "Film-Noir"]),
                        "0002": (["red cake"], ["Drama"]), "0003": (["a meme"], []),
                        "0004": (["hot"], ["Short"])}
    for i, (plots, genres) in movies.items():
        write_image(os.path.join(root, "images", f"{i}.jpeg"), (50, 100, 150), fmt="jpg")
        os.makedirs(os.path.join(root, "labels"), exist_ok=True)
        with open(os.path.join(root, "labels", f"{i}.json"), "w") as f:
            json.dump({"plot": plots, "genres": genres, "title": "x"}, f)
    with open(os.path.join(root, "split.json"), "w") as f:
        json.dump(splits or {"train": ["0001", "0002"], "dev": ["0003"], "test": ["0004"]}, f)
    return str(root)


def test_mmimdb_reads_labels_and_first_plot(tmp_path, capsys):
    root = make_mmimdb(tmp_path / "mmimdb", splits={"train": ["0001", "0002", "0003"], "dev": ["0004"],
                                                    "test": ["0004"]})
    sets = {s: data.image_text_split("mmimdb", root, s, WORDS, image_size=8, context_length=6)
            for s in ("train", "val", "test")}
    # 0003 has an empty genre list: skipped and counted
    assert {s: len(d) for s, d in sets.items()} == {"train": 2, "val": 1, "test": 1}
    assert ("MM-IMDb train: skipped 1 of 3 films without a genre of the 23 (first: 0003)"
            in capsys.readouterr().err)
    item = sets["train"][0]
    # Comedy is genre 1, Film-Noir genre 22 of the 23; News is one of the IMDb genres MM-IMDb dropped: ignored
    assert item["label"].dtype == torch.float and item["label"].nonzero().flatten().tolist() == [1, 22]
    assert sets["train"][1]["label"].nonzero().flatten().tolist() == [0]  # Drama
    # the first plot "hello world": sot 12, hello 1, world 2, eot 13 (11 words), padding
    assert item["text"].tolist() == [12, 1, 2, 13, 0, 0]
    assert item["image"].shape == (3, 8, 8) and item["index"].item() == 0
    assert sets["train"].ids == ["0001", "0002"]
    assert len(data.MMIMDB_GENRES) == data.IMAGE_TEXT_TASKS["mmimdb"]["num_classes"] == 23


def test_mmimdb_bad_inputs(tmp_path):
    root = make_mmimdb(tmp_path / "a", splits={"train": ["0001", "0009"], "dev": [], "test": ["0004"]})
    refused(data.image_text_split, "mmimdb", root, "train", WORDS, match="0009.jpeg, which does not exist")
    refused(data.image_text_split, "mmimdb", root, "val", WORDS,
            match="split.json has no non-empty list 'dev'")
    root = make_mmimdb(tmp_path / "b", movies={"0001": (["hot"], ["Cooking"])},
                       splits={"train": ["0001"], "dev": ["0001"], "test": ["0001"]})
    refused(data.image_text_split, "mmimdb", root, "test", WORDS,
            match="0001.json has the genre 'Cooking', not one of the 23 (closest: none)")
    with open(os.path.join(root, "labels", "0001.json"), "w") as f:
        f.write("{\"plot\": [\"hot\"")
    refused(data.image_text_split, "mmimdb", root, "test", WORDS, match='0001.json is not valid JSON')
    with open(os.path.join(root, "labels", "0001.json"), "w") as f:
        json.dump({"plot": [], "genres": []}, f)
    refused(data.image_text_split, "mmimdb", root, "test", WORDS,
            match="0001.json needs a non-empty 'plot' list")
    refused(data.image_text_split, "imdb", root, "test", WORDS, match="unknown image-text dataset 'imdb'")
    refused(data.image_text_split, "mmimdb", root, "dev", WORDS,
            match="unknown split 'dev'; choose train, val or test")


# ---------------------------------------------------------------------------- UPMC Food-101
def make_food101(root, train_rows=None, test_rows=None):
    for split, n in (("train", 5), ("test", 1)):
        for cls in ("tacos", "apple_pie"):
            for k in range(n):
                write_image(os.path.join(root, "images", split, cls, f"{cls}_{k}.jpg"), (200, 100, 0),
                            fmt="jpg")
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
    assert sorted(train.ids + val.ids) == sorted(f"{c}_{k}.jpg" for c in ("apple_pie", "tacos")
                                                 for k in range(5))
    # classes are the sorted folders: apple_pie 0, tacos 1
    assert test.labels.dtype == torch.long and test.labels.tolist() == [1, 0]
    assert train[0]["text"].tolist() == [12, 5, 6, 13, 0, 0]  # "red cake": sot, red 5, cake 6, eot
    # quoted and unquoted commas in the text; the word tokenizer splits on spaces only, so "hot," is unknown
    assert test.texts == ["hot, spicy tacos", "hot, spicy"]
    refused(test.__getitem__, 0, match="The word 'hot,' of the text")
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
    refused(data.image_text_split, "food101", root, "train", WORDS,
            match="split.json lists 'sushi_3.jpg' in 'train', which is not a row of")


def test_food101_header_and_bad_rows(tmp_path):
    header = ["image,text,class", "tacos_0.jpg,hot,tacos"]
    root = make_food101(tmp_path / "a", test_rows=header)
    test = data.image_text_split("food101", root, "test", WORDS, image_size=8, context_length=4)
    assert len(test) == 1 and test[0]["text"].tolist() == [12, 7, 13, 0]  # sot, hot, eot, pad
    root = make_food101(tmp_path / "b", test_rows=["tacos_7.jpg,hot,tacos"])
    refused(data.image_text_split, "food101", root, "test", WORDS, match='tacos_7.jpg, which does not exist')
    root = make_food101(tmp_path / "c", test_rows=["tacos_0.jpg,hot,sushi"])
    refused(data.image_text_split, "food101", root, "test", WORDS,
            match="test_titles.csv has the class 'sushi', which has no folder")
    root = make_food101(tmp_path / "d", test_rows=["tacos_0.jpg"])
    refused(data.image_text_split, "food101", root, "test", WORDS,
            match="test_titles.csv is 'tacos_0.jpg'; every row needs")


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
    # an 8 x 8 PNG of (10, 20, 30) at image_size 8 (no resize):
    # R (0.039216 - 0.48145466) / 0.26862954 = -1.646278
    image = train[0]["image"]
    assert abs(clip_value(10, 0) - -1.646278) < 1e-6
    for c, v in enumerate((10, 20, 30)):
        assert torch.allclose(image[c], torch.full((8, 8), clip_value(v, c)), atol=1e-6)


def test_hatememes_bad_inputs(tmp_path):
    unlabelled = {"test_seen": [{"id": 9999, "img": "img/09999.png", "text": "hello"}]}
    root = make_hatememes(tmp_path / "a", unlabelled)
    refused(data.image_text_split, "hatememes", root, "test", WORDS, match="test_seen.jsonl has no 'label' ")
    root = make_hatememes(tmp_path / "b", {"dev_seen": ['{"id": 1, "img": "img/01235.png",']})
    refused(data.image_text_split, "hatememes", root, "val", WORDS, match='dev_seen.jsonl is not valid JSON')
    root = make_hatememes(tmp_path / "c",
                          {"train": [{"id": 7, "img": "img/00007.png", "label": 0, "text": "hot"}]})
    refused(data.image_text_split, "hatememes", root, "train", WORDS, match='00007.png, which does not exist')
    root = make_hatememes(tmp_path / "d",
                          {"train": [{"id": 7, "img": "img/01235.png", "label": 2, "text": "hot"}]})
    refused(data.image_text_split, "hatememes", root, "train", WORDS,
            match='train.jsonl needs id, img, label (0 or 1) and text')
    root = make_hatememes(tmp_path / "e", {"train": [""]})
    refused(data.image_text_split, "hatememes", root, "train", WORDS, match='hatememes train ')
    root = make_hatememes(tmp_path / "f")
    with open(os.path.join(root, "img", "01235.png"), "wb") as f:
        f.write(b"GIF89a")
    refused(data.image_text_split, "hatememes", root, "train", WORDS,
            match='01235.png is not a JPEG or PNG image')


# ---------------------------------------------------------------------------- real folders (issue 25 item 5)
def test_genres_match_case_insensitively_and_an_unknown_one_names_the_closest(tmp_path):
    movies = {"0001": (["hot"], ["comedy", "SCI-FI", "news"]), "0002": (["hot"], ["Sci-fy"])}
    root = make_mmimdb(tmp_path / "m", movies=movies,
                       splits={"train": ["0001"], "dev": ["0002"], "test": ["0002"]})
    train = data.image_text_split("mmimdb", root, "train", WORDS, image_size=8, context_length=4)
    assert train[0]["label"].nonzero().flatten().tolist() == [1, 10]  # Comedy 1, Sci-Fi 10; news dropped
    refused(data.image_text_split, "mmimdb", root, "val", WORDS, match="genre 'Sci-fy', not one of the 23 "
            "(closest: Sci-Fi")


def test_hidden_files_and_folders_are_ignored(tmp_path):
    root = make_food101(tmp_path / "food")
    os.makedirs(os.path.join(root, "images", "train", ".ipynb_checkpoints"))
    (tmp_path / "food" / "images" / "train" / ".DS_Store").write_bytes(b"\x00\x01")
    assert data.food101_classes(root) == ["apple_pie", "tacos"]
    frost = tmp_path / "frost"
    write_image(str(frost / "frost1.png"), (100, 150, 200), h=300, w=300)
    (frost / "._frost2.png").write_bytes(b"\x00\x05")  # a macOS resource fork, not a picture
    x = torch.full((1, 3, 8, 8), 0.5, dtype=torch.float64)
    y = data.corrupt_video(x, "frost", 3, frost_dir=str(frost))
    # severity 3 = (.7, .7): .7 * .5 + .7 * 100 / 255 = 0.624510 in the red channel
    assert torch.allclose(y[0, 0], torch.full((8, 8), 0.35 + 0.7 * 100 / 255, dtype=torch.float64), atol=1e-6)


def test_a_duplicated_sample_id_is_refused_with_its_name(tmp_path):
    twice = {"train": [{"id": 1235, "img": "img/01235.png", "label": 1, "text": "a meme"},
                       {"id": 1235, "img": "img/04567.png", "label": 0, "text": "red cake"}]}
    root = make_hatememes(tmp_path / "hm", twice)
    refused(data.image_text_split, "hatememes", root, "train", WORDS, match="lists the sample '1235' twice")


# ---------------------------------------------------------------------------- missing tables
def test_map_missing_masks_counts():
    # n = 10, rate 0.7: m = round(7.0) = 7 incomplete samples; both: 7 - 7 // 2 = 4 lack text, 3 the image
    has = data.missing_masks(10, data.map_counts("both", 0.7, 10), seed=0)
    assert int((~has["text"]).sum()) == 4 and int((~has["image"]).sum()) == 3
    assert int((has["text"] & has["image"]).sum()) == 3  # 10 - 7 complete, none lacks both
    # an odd count split with text taking the extra one: n = 10, rate 0.3 -> m = 3 -> 2 text, 1 image
    has = data.missing_masks(10, data.map_counts("both", 0.3, 10), seed=0)
    assert int((~has["text"]).sum()) == 2 and int((~has["image"]).sum()) == 1
    state = torch.get_rng_state()
    data.missing_masks(10, data.map_counts("both", 0.7, 10), seed=5)
    assert torch.equal(state, torch.get_rng_state())  # the global RNG is not used
    refused(data.map_counts, "both", 70, 10, match="not 70; pass e.g. 0.7")


def test_missing_table_file_reused_and_refused(tmp_path):
    path = data.missing_table_path(str(tmp_path), "mmimdb", "train", "both", 0.7, 0)
    assert path == os.path.join(str(tmp_path), "missing_mmimdb_train_both_70_seed0.json")
    ids = ["0001", "0002", "0003", "0004"]
    has = data.load_or_make_missing_table(path, ids, "both", 0.7, 0)
    saved = json.load(open(path))
    # MAP's codes 0 complete, 1 text, 2 image missing
    codes = (~has["text"]).long() + 2 * (~has["image"]).long()
    assert saved == {"kind": "both", "rate": 0.7, "seed": 0, "ids": ids, "missing": codes.tolist()}
    # 4 samples, rate 0.7: m = round(2.8) = 3 -> 2 text, 1 image, 1 complete
    assert torch.bincount(codes, minlength=3).tolist() == [1, 2, 1]
    saved["missing"] = [2, 2, 1, 0]  # a file on disk wins over a new draw: it is read, not redrawn
    common.write_json(path, saved)
    again = data.load_or_make_missing_table(path, ids, "both", 0.7, 0)
    assert (again["image"].tolist() == [False, False, True, True]
            and again["text"].tolist() == [True, True, False, True])
    refused(data.load_or_make_missing_table, path, ids, "both", 0.5, 0,
            match="was made with other settings than kind=both, rate=0.5, seed=0")
    refused(data.load_or_make_missing_table, path, ids[:3], "both", 0.7, 0,
            match="was made for other samples")
    with open(path, "w") as f:
        f.write("[1, 2]")
    refused(data.load_or_make_missing_table, path, ids, "both", 0.7, 0, match="is not a missing table")
    assert open(path).read() == "[1, 2]"  # never overwritten


def test_with_missing_image_text_in_memory_placeholders():
    g = torch.Generator().manual_seed(0)
    image = torch.randn(4, 3, 2, 2, generator=g, dtype=torch.float64)
    text = WORDS(["hello", "red cake", "hot", "a meme"], 5)
    ds = data.AVTensors({"image": image, "text": text, "label": torch.tensor([0, 1, 0, 1])})
    has = {"text": torch.tensor([True, False, True, True]), "image": torch.tensor([True, True, False, True])}
    blank = {"text": WORDS([""], 5)[0], "image": data.image_placeholder("ones", (3, 2, 2))}
    f = data.with_missing(ds, has, blank).fields
    assert (f["has_text"].tolist() == [True, False, True, True]
            and f["has_image"].tolist() == [True, True, False, True])
    assert f["text"][1].tolist() == [12, 13, 0, 0, 0]  # the tokenised "": sot, eot
    assert (torch.equal(f["text"][[0, 2, 3]], text[[0, 2, 3]])
            and torch.equal(f["image"][[0, 1, 3]], image[[0, 1, 3]]))
    assert torch.equal(f["image"][2], torch.ones(3, 2, 2, dtype=torch.float64))
    assert torch.equal(data.image_placeholder("zeros", (3, 2, 2)), torch.zeros(3, 2, 2))
    black = data.image_placeholder("black", (3, 2, 2))
    # (0 - mean) / std: -0.48145466 / 0.26862954 = -1.792263, -0.4578275 / 0.26130258 = -1.752097,
    # -0.40821073 / 0.27577711 = -1.480220
    for c, v in enumerate((-1.792263, -1.752097, -1.480220)):
        assert torch.allclose(black[c], torch.full((2, 2), v), atol=1e-6)
    refused(data.image_placeholder, "grey", (3, 2, 2), match="Unknown image placeholder 'grey'")
    refused(data.with_missing, ds, {"text": has["text"][:3]}, blank, match="3 text flags for 4 samples")


def test_with_missing_image_text_lazy(tmp_path):
    root = make_hatememes(tmp_path / "hm")
    train = data.image_text_split("hatememes", root, "train", WORDS, image_size=8, context_length=5)
    has = {"text": torch.tensor([True, False]), "image": torch.tensor([False, True])}
    blank = {"text": WORDS([""], 5)[0], "image": data.image_placeholder("black", (3, 8, 8))}
    first, second = (data.with_missing(train, has, blank)[i] for i in (0, 1))
    assert first["has_image"].item() is False and second["has_text"].item() is False
    assert torch.allclose(first["image"][0], torch.full((8, 8), -1.792263), atol=1e-6)  # black, red channel
    assert first["text"].tolist() == [12, 10, 11, 13, 0]  # its text kept ("a meme")
    assert second["text"].tolist() == [12, 13, 0, 0, 0]  # the tokenised ""
    # its image kept
    assert torch.allclose(second["image"][2], torch.full((8, 8), clip_value(30, 2)), atol=1e-6)


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
    assert (common.f1_scores(zero, one)["f1_macro"] == 100.0
            and common.f1_scores(zero, one, 0.6)["f1_macro"] == 0.0)
    # class 1 has no positive and no prediction: it counts 0 (sklearn zero_division=0):
    # macro (1 + 0) / 2 = 50%
    # micro: TP 1, FP 0, FN 0 -> 100%
    f1 = common.f1_scores(torch.tensor([[1.0, -1.0]]), torch.tensor([[1.0, 0.0]]))
    assert (f1["f1_macro"], f1["f1_micro"]) == (50.0, 100.0)


def test_auroc_by_hand():
    scores = torch.tensor([0.1, 0.4, 0.35, 0.8], dtype=torch.float64)
    # positives 0.35, 0.8 ; negatives 0.1, 0.4: 0.35 > 0.1 yes, 0.35 > 0.4 no, 0.8 beats both -> 3 / 4 = 75%
    assert common.auroc(scores, torch.tensor([0, 0, 1, 1])) == pytest.approx(75.0)
    # tie: positive 0.5 against negatives 0.5 (half) and 0.2 (win): (0.5 + 1) / 2 = 75%
    assert common.auroc(torch.tensor([0.5, 0.5, 0.2]), torch.tensor([1, 0, 0])) == pytest.approx(75.0)
    refused(common.auroc, torch.tensor([0.5, 0.5, 0.2]), torch.tensor([0, 0, 0]),
            match="AUROC needs both classes but the labels hold 0 positives and 3 negatives")
