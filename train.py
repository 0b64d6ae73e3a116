"""Training: the source model, and the missing-modality methods (CMPT, AOEPT) with their protocols.

    python train.py                      # source model on the embedded benchmark -> checkpoints/embedded_tiny.pt
    python train.py --method cmpt        # CMPT + its ablations, missing-modality protocols, results table
    python train.py --method aoept       # AOEPT + its ablations + a MAP-style baseline, MAP protocol at 70%
    python train.py --data read --train-json train.json --val-json test.json --label-csv labels.csv --out src.pt
    python train.py --method cmpt --data read --checkpoint src.pt --train-json train.json --val-json test.json \\
        --label-csv labels.csv               # the same protocols on your READ-layout data
    python train.py --data food          # image-text: the frozen tiny CLIP (pre-trained first if missing), its
                                         # retrieval and each modality's linear probe on an embedded task
    python train.py --data mmimdb --data-root mmimdb/ --config base --checkpoint ViT-B-16.pt \\
        --bpe bpe_simple_vocab_16e6.txt.gz   # the same with OpenAI's CLIP on the real MM-IMDb files
    python train.py --method cmpt --data food imdb memes    # CMPT's image-text tables (MAP protocol; complete
                                         # training with a modality missing at test), its ablations, head-only
    python train.py --method aoept --data food imdb memes   # AOEPT's table (MAP protocol): MAP, AOEPT, ablations
    python train.py --method cmpt aoept --data food         # both papers' columns in one table

The source model is made the CAV-MAE way, on clean data: self-supervised pre-training
(`pretrain`: common.pretrain_losses, masked reconstruction + audio-visual contrastive, the paper's
weights 1 and 0.01), then supervised fine-tuning (`finetune`) with cross-entropy on the multimodal
logits plus, with half the weight each, the audio-only and video-only logits (CAV-MAE's unimodal
paths, which the methods use). It prints the clean accuracies and the audio-to-video retrieval of
the pre-trained and the fine-tuned model (`retrieval`).

The image-text backbone (`--data food | imdb | memes`) is a tiny CLIP pre-trained with CLIP's objective
on the training pairs of the three embedded tasks together (`pretrain_clip`), then frozen; the
papers freeze OpenAI's CLIP ViT-B/16 (`--config base --checkpoint ViT-B-16.pt --bpe ...`). What it
prints: image -> text retrieval in test batches of 64, and a linear probe per modality (image
embedding, text embedding, both concatenated) with the task's metric (`modality_probes`).

Deviation: CAV-MAE starts from ImageNet MAE weights and trains for 25 epochs of AudioSet-2M at Adam
5e-5; ours starts from scratch on the embedded benchmark, so one-cycle schedules with larger peak
learning rates (PRETRAIN, FINETUNE below).

A missing-modality method module (`cmpt.py`, `aoept.py`) provides:
    VARIANTS                 {name: kwargs}; the first is the method itself, the rest its ablations
    PROTOCOLS                which protocols its paper reports: subset of ("inference", "map")
    build(backbone, **kw)    -> nn.Module; model(batch) -> logits (B, K), reads has_audio / has_video
    collect_params(model)    -> (params, names): what trains
    train_step(model, batch, optimizer) -> (logits, {loss name: float})   zero_grad / backward / step inside
    prepare(model, loader, device)  optional: work before training (AOEPT's collect and distil)
    EPOCHS, LR, WEIGHT_DECAY, BATCH_SIZE  defaults for the embedded benchmark
"""
import argparse
import copy
import hashlib
import importlib
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import common
import data

HERE = os.path.dirname(os.path.abspath(__file__))
CHECKPOINT_DIR = os.path.join(HERE, "checkpoints")
RESULTS_DIR = os.path.join(HERE, "results")
METHODS = {"source": None, "cmpt": "cmpt", "aoept": "aoept"}  # name -> module with the interface above


def default_checkpoint(data_name="embedded", config="tiny"):
    """Where train.py saves, and adapt.py looks for, the source checkpoint."""
    return os.path.join(CHECKPOINT_DIR, f"{data_name}_{config}.pt")


# ----------------------------------------------------------------------------------------------
# Source model
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(model, loader, device, modes=("multimodal", "audioonly", "videoonly")):
    """Accuracy (%) of each inference path over a loader."""
    model.eval()
    correct = {m: 0 for m in modes}
    n = 0
    for batch in loader:
        batch = data.to_device(batch, device)
        z_a, z_v = model.encode(batch["audio"], batch["video"])  # each encoder once for all three paths
        feats = {"multimodal": lambda: model.fuse(z_a, z_v), "audioonly": lambda: model.fuse_single(z_a, "a"),
                 "videoonly": lambda: model.fuse_single(z_v, "v")}
        for m in modes:
            correct[m] += (model.classify(feats[m]()).argmax(1) == batch["label"]).sum().item()
        n += len(batch["label"])
    return {m: 100.0 * c / n for m, c in correct.items()}


# The source model is made the CAV-MAE way: self-supervised pre-training on the training split
# (common.pretrain_losses: masked reconstruction + audio-visual contrastive), then supervised
# fine-tuning of the same encoder with a classification head.
PRETRAIN = dict(epochs=6, lr=2e-3, batch_size=64, weight_decay=5e-7, betas=(0.95, 0.999))
FINETUNE = dict(epochs=9, lr=2e-3, batch_size=64, weight_decay=0.05)


@torch.no_grad()
def retrieval(model, dataset, device, batch_size=64, seed=0):
    """Audio -> video top-1 retrieval (%) within batches of `batch_size` clean clips, with the
    unimodal features CAV-MAE's contrastive loss uses (unified block with the _a / _v norms,
    norm_a / norm_v, mean over tokens): for the true pairs, and with every video swapped for
    another clip's of the same class (a clip's partner then shares only its class)."""
    model.eval()
    feats_a, feats_v = [], []
    for batch in data.make_loader(dataset, 256, shuffle=False):
        batch = data.to_device(batch, device)
        z_a, z_v = model.encode(batch["audio"], batch["video"])
        feats_a.append(model.fuse_single(z_a, "a"))
        feats_v.append(model.fuse_single(z_v, "v"))
    return paired_retrieval(torch.cat(feats_a).cpu(), torch.cat(feats_v).cpu(), dataset.fields["label"], batch_size, seed)


def pretrain(model, train_set, args, device, quiet=False):
    """CAV-MAE pre-training of `model`'s encoder on `train_set` (labels unused); returns the decoder."""
    decoder = common.CAVMAEDecoder(model.config).to(device)
    for p in (model.pos_embed_a, model.pos_embed_v):
        p.requires_grad_(False)  # CAV-MAE: fixed sin-cos position embeddings during pre-training
    params = [p for p in list(model.parameters()) + list(decoder.parameters()) if p.requires_grad]
    epochs = PRETRAIN["epochs"] if args.pretrain_epochs is None else args.pretrain_epochs
    loader = data.make_loader(train_set, PRETRAIN["batch_size"], shuffle=True, seed=args.seed)
    # DEVIATION: CAV-MAE starts from ImageNet MAE weights (Adam 5e-5, halved from epoch 10); ours
    # starts from scratch, so a larger one-cycle learning rate over a short schedule.
    opt = torch.optim.Adam(params, lr=PRETRAIN["lr"], betas=PRETRAIN["betas"], weight_decay=PRETRAIN["weight_decay"])
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=PRETRAIN["lr"], total_steps=max(1, epochs * len(loader)),
                                                pct_start=0.1)
    g = torch.Generator().manual_seed(args.seed)
    bar = tqdm(total=epochs * len(loader), desc="pre-training (masked + contrastive)", disable=quiet, dynamic_ncols=True)
    for epoch in range(epochs):
        model.train()
        for batch in loader:
            batch = data.to_device(batch, device)
            losses = common.pretrain_losses(model, decoder, batch["audio"], batch["video"], generator=g)
            opt.zero_grad(set_to_none=True)
            losses["loss"].backward()
            opt.step()
            sched.step()
            bar.update(1)
            bar.set_postfix(epoch=epoch + 1, mae_a=f"{losses['mae_a'].item():.3f}", mae_v=f"{losses['mae_v'].item():.3f}",
                            c=f"{losses['contrastive'].item():.3f}")
    bar.close()
    for p in (model.pos_embed_a, model.pos_embed_v):
        p.requires_grad_(True)  # fine-tuning trains them (CAVMAEFT's tr_pos=True)
    return decoder


def finetune(model, train_set, args, device, quiet=False):
    """Supervised fine-tuning: cross-entropy on the multimodal logits plus, with half the weight each,
    the audio-only and video-only logits (so the unimodal paths the methods use stay classifiers)."""
    epochs = FINETUNE["epochs"] if args.epochs is None else args.epochs
    lr = FINETUNE["lr"] if args.lr is None else args.lr
    batch_size = FINETUNE["batch_size"] if args.batch_size is None else args.batch_size
    loader = data.make_loader(train_set, batch_size, shuffle=True, seed=args.seed, num_workers=args.workers)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=FINETUNE["weight_decay"])
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * len(loader), pct_start=0.1)
    bar = tqdm(total=epochs * len(loader), desc="fine-tuning", disable=quiet, dynamic_ncols=True)
    for epoch in range(epochs):
        model.train()
        for batch in loader:
            batch = data.to_device(batch, device)
            z_a, z_v = model.encode(batch["audio"], batch["video"])
            y = batch["label"]
            loss_av = F.cross_entropy(model.classify(model.fuse(z_a, z_v)), y)
            loss_a = F.cross_entropy(model.classify(model.fuse_single(z_a, "a")), y)
            loss_v = F.cross_entropy(model.classify(model.fuse_single(z_v, "v")), y)
            loss = loss_av + 0.5 * (loss_a + loss_v)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.update(1)
            bar.set_postfix(epoch=epoch + 1, loss=f"{loss.item():.3f}")
    bar.close()
    return model.eval()


def train_source(args, quiet=False):
    """Pre-train (CAV-MAE) and fine-tune the source model on clean data; save it; return (model, metrics)."""
    device = common.get_device(args.device)
    common.seed_everything(args.seed)
    t0 = time.time()
    if args.data == "embedded":
        model = common.CAVMAE(args.config, num_classes=data.EMBEDDED["num_classes"])
        train_set = data.embedded_split("train", model, seed=args.data_seed)
        val_set = data.embedded_split("test", model, seed=args.data_seed)
    else:
        if not (args.train_json and args.label_csv):
            raise SystemExit("--data read needs --train-json and --label-csv (and --val-json to report accuracy).")
        num_classes = len(data.read_label_csv(args.label_csv))
        model = common.CAVMAE(args.config, num_classes=num_classes)
        kw = dict(mel_bins=model.mel_bins, target_length=model.audio_length, image_size=model.image_size)
        train_set = data.ReadLayoutDataset(args.train_json, args.label_csv, **kw)
        val_set = data.ReadLayoutDataset(args.val_json, args.label_csv, **kw) if args.val_json else None
    model.to(device)
    metrics = {}
    stages = {"data": time.time() - t0}  # seconds per stage of this run
    if args.pretrain_epochs != 0:
        t1 = time.time()
        pretrain(model, train_set, args, device, quiet)
        stages["pre-training"] = time.time() - t1
        if val_set is not None and isinstance(val_set, data.AVTensors):
            metrics["retrieval_pretrained"] = retrieval(model, val_set, device)
    t1 = time.time()
    finetune(model, train_set, args, device, quiet)
    stages["fine-tuning"] = time.time() - t1
    metrics["train_seconds"] = time.time() - t0
    metrics["stage_seconds"] = stages
    if val_set is not None:
        metrics.update(evaluate(model, data.make_loader(val_set, 256, shuffle=False), device))
        if isinstance(val_set, data.AVTensors):
            metrics["retrieval_finetuned"] = retrieval(model, val_set, device)
    out = args.out or default_checkpoint(args.data, args.config)
    common.save_checkpoint(out, model, data=args.data, data_seed=args.data_seed, seed=args.seed, metrics=metrics,
                           benchmark=data.embedded_id() if args.data == "embedded" else None)
    default = out == default_checkpoint(args.data, args.config)
    common.write_json(os.path.join(RESULTS_DIR, "train_source.json") if default else os.path.splitext(out)[0] + ".json",
               {"args": vars(args), "checkpoint": out, "clean_accuracy": metrics})
    if not quiet:
        print(f"saved {out}")
        print(f"clean test accuracy (%): fused {metrics.get('multimodal', float('nan')):.1f} | "
              f"audio-only {metrics.get('audioonly', float('nan')):.1f} | "
              f"video-only {metrics.get('videoonly', float('nan')):.1f} | {metrics['train_seconds']:.1f} s")
        for key in ("retrieval_pretrained", "retrieval_finetuned"):
            if key in metrics:
                r = metrics[key]
                print(f"audio->video top-1 retrieval in clean test batches of 64, {key.split('_')[1]} model: "
                      f"{r['true_pairs']:.1f}% (pairs shuffled within each class: {r['class_shuffled']:.1f}%)")
    return model, metrics


# ----------------------------------------------------------------------------------------------
# The image-text source backbone: a tiny CLIP pre-trained on the embedded pairs, then frozen
# ----------------------------------------------------------------------------------------------
# The papers freeze a CLIP pre-trained on 400 M web pairs. Here the tiny dual encoder is pre-trained
# with CLIP's objective (common.clip_loss: symmetric InfoNCE over the batch, learnable temperature
# from 0.07) on the training pairs of the three embedded tasks together, as one CLIP serves the
# three datasets; the labels are never used. Then it is frozen: the methods start from it.
CLIP_PRETRAIN = dict(epochs=25, lr=2e-3, batch_size=64, weight_decay=0.1, betas=(0.9, 0.98), eps=1e-6, warmup=0.1)
IMAGE_TEXT_DATA = tuple(data.IT_TASKS)  # embedded tasks: food, imdb, memes
REAL_IMAGE_TEXT = ("mmimdb", "food101", "hatememes")  # the papers' datasets, read from their raw layouts


def default_clip_checkpoint(config="tiny"):
    return os.path.join(CHECKPOINT_DIR, f"clip_embedded_{config}.pt")


def pretrain_clip(model, pairs, device, epochs=None, seed=0, quiet=False):
    """CLIP pre-training of `model` on `pairs` (AVTensors with 'image' and 'text'): AdamW with CLIP's betas
    and eps, linear warm-up then cosine decay; exp(logit_scale) clamped at 100 as in CLIP."""
    cfg = CLIP_PRETRAIN
    epochs = cfg["epochs"] if epochs is None else epochs
    loader = data.make_loader(pairs, cfg["batch_size"], shuffle=True, seed=seed)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embedding" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embedding" not in n)]
    # CLIP: no weight decay on gains, biases, embeddings and the temperature
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg["weight_decay"]}, {"params": rest, "weight_decay": 0.0}],
                            lr=cfg["lr"], betas=cfg["betas"], eps=cfg["eps"])
    total = max(1, epochs * len(loader))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg["lr"], total_steps=total, pct_start=cfg["warmup"])
    bar = tqdm(total=total, desc="CLIP pre-training (symmetric InfoNCE)", disable=quiet, dynamic_ncols=True)
    for epoch in range(epochs):
        model.train()
        for batch in loader:
            batch = data.to_device(batch, device)
            loss = common.clip_loss(model(batch["image"], batch["text"]))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            with torch.no_grad():
                model.logit_scale.clamp_(max=math.log(common.CLIP_MAX_LOGIT_SCALE))
            bar.update(1)
            bar.set_postfix(epoch=epoch + 1, loss=f"{loss.item():.3f}", T=f"{1 / model.logit_scale.exp().item():.3f}")
    bar.close()
    return model.eval()


@torch.no_grad()
def clip_features(model, dataset, device, batch_size=256):
    """Frozen image and text embeddings of a dataset: (N, E), (N, E)."""
    model.eval()
    feats_i, feats_t = [], []
    for batch in tqdm(data.make_loader(dataset, batch_size, shuffle=False), desc="frozen CLIP embeddings", leave=False,
                      dynamic_ncols=True, disable=len(dataset) < 5000):
        batch = data.to_device(batch, device)
        feats_i.append(model.encode_image(batch["image"]))
        feats_t.append(model.encode_text(batch["text"]))
    return torch.cat(feats_i), torch.cat(feats_t)


def class_of(label):
    """One class per sample for 'shuffled within each class': the label, or a multi-label sample's rarest genre."""
    if label.dim() == 1:
        return label
    rarity = torch.arange(label.shape[1], dtype=label.dtype)  # genres are listed from the most to the least frequent
    return (label * (rarity + 1)).argmax(1)


@torch.no_grad()
def paired_retrieval(feats_q, feats_k, label, batch_size=64, seed=0):
    """Top-1 retrieval (%) of each query's own key (image -> text, audio -> video) within batches of
    `batch_size` random test samples: for the true pairs, and with every key swapped for another sample's
    of the same class (a query's partner then shares only its class). Chance is 1 / batch_size."""
    cls = class_of(label)
    g = torch.Generator().manual_seed(seed)
    swap = torch.arange(len(cls))
    for k in cls.unique():
        idx = (cls == k).nonzero().flatten()
        swap[idx] = idx[torch.randperm(len(idx), generator=g)]
    order = torch.randperm(len(cls), generator=g)
    out = {"true_pairs": [], "class_shuffled": []}
    for s in range(0, len(order) - batch_size + 1, batch_size):
        b = order[s:s + batch_size]
        out["true_pairs"].append(common.retrieval_top1(feats_q[b], feats_k[b]))
        out["class_shuffled"].append(common.retrieval_top1(feats_q[b], feats_k[swap[b]]))
    return {k: 100.0 * float(np.mean(v)) for k, v in out.items()}


def task_metric(kind, logits, label):
    """The papers' metric of a task: accuracy (single-label), F1-macro (multi-label), AUROC (binary), in %."""
    if kind == "multilabel":
        return common.f1_scores(logits, label)["f1_macro"]
    if kind == "binary":
        return common.auroc(logits.softmax(-1)[:, 1], label)
    return common.accuracy(logits, label)


def task_loss(kind, logits, label):
    """Cross-entropy (single-label, binary with 2 logits) or binary cross-entropy per genre (multi-label)."""
    return F.binary_cross_entropy_with_logits(logits, label) if kind == "multilabel" else F.cross_entropy(logits, label)


def linear_probe(kind, num_classes, x_train, y_train, x_test, y_test, steps=500, lr=5e-3, weight_decay=1e-3, seed=0):
    """A linear head trained full-batch (AdamW) on frozen features (standardised with the training
    statistics); -> the task metric on the test features."""
    torch.manual_seed(seed)
    mean, std = x_train.mean(0), x_train.std(0).clamp_min(1e-6)
    x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
    head = torch.nn.Linear(x_train.shape[1], num_classes).to(x_train.device)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    for _ in range(steps):
        loss = task_loss(kind, head(x_train), y_train)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        return task_metric(kind, head(x_test), y_test)


def modality_probes(model, kind, num_classes, train_set, test_set, device, seed=0):
    """What each modality of the frozen backbone says about a task: the metric of a linear probe on the
    image embedding, on the text embedding and on both (concatenated), trained on `train_set`; and the
    image -> text retrieval on `test_set`."""
    (i_tr, t_tr), (i_te, t_te) = clip_features(model, train_set, device), clip_features(model, test_set, device)
    y_tr, y_te = train_set_labels(train_set).to(device), train_set_labels(test_set).to(device)
    probe = lambda a, b: linear_probe(kind, num_classes, a, y_tr, b, y_te, seed=seed)  # noqa: E731
    return {"image": probe(i_tr, i_te), "text": probe(t_tr, t_te),
            "both": probe(torch.cat([i_tr, t_tr], 1), torch.cat([i_te, t_te], 1)),
            "retrieval": paired_retrieval(i_te.cpu(), t_te.cpu(), y_te.cpu())}


def train_set_labels(dataset):
    """Every label of a dataset: the in-memory field, or the labels a dataset on disk keeps (data.ImageTextFiles)."""
    return dataset.fields["label"] if isinstance(dataset, data.AVTensors) else dataset.labels


def train_clip_source(config="tiny", data_seed=0, seed=0, device="cpu", epochs=None, out=None, quiet=False):
    """Pre-train the tiny CLIP on the training pairs of the three embedded tasks, save it (carrying the
    benchmark's id) and return (model, meta)."""
    common.seed_everything(seed)
    tokenizer = data.embedded_tokenizer()
    model = common.CLIP(config, vocab_size=tokenizer.vocab_size).to(device)
    splits = [data.embedded_image_text_split(t, "train", model.image_size, model.context_length, tokenizer, seed=data_seed)
              for t in data.IT_TASKS]
    pairs = data.AVTensors({k: torch.cat([s.fields[k] for s in splits]) for k in ("image", "text")}
                           | {"label": torch.zeros(sum(len(s) for s in splits))})
    t0 = time.time()
    pretrain_clip(model, pairs, device, epochs=epochs, seed=seed, quiet=quiet)
    out = out or default_clip_checkpoint(config)
    meta = dict(data="embedded-image-text", data_seed=data_seed, seed=seed, benchmark=data.it_embedded_id(),
                pretrain_seconds=time.time() - t0)
    common.save_clip(out, model, **meta)
    if not quiet:
        print(f"saved {out} ({meta['pretrain_seconds']:.0f} s of pre-training)")
    return model.eval(), {**meta, "config": config, "vocab_size": model.vocab_size}


def default_clip_source(config, data_seed, device):
    """The frozen backbone of the embedded image-text tasks: checkpoints/clip_embedded_<config>.pt, pre-trained
    first when it is missing, unreadable or made on another version of the benchmark."""
    path = default_clip_checkpoint(config)
    if os.path.isfile(path):
        try:
            model, meta = common.load_clip(path, device=device)
            if meta.get("benchmark") == data.it_embedded_id() and meta.get("data_seed") == data_seed:
                return model, meta
            print(f"the default CLIP backbone {path} was made on another version or seed of the embedded "
                  f"image-text benchmark; pre-training it again")
        except common.CheckpointError as e:
            print(f"the default CLIP backbone cannot be used ({e}); pre-training it again")
    else:
        print(f"no CLIP backbone at {path}: pre-training one first (a few minutes on a CPU)")
    return train_clip_source(config, data_seed, device=device, out=path)


def image_text_backbone(args, device):
    """The frozen CLIP and its tokenizer: --checkpoint (ours, or OpenAI's ViT-B-16.pt with --bpe), else the
    default embedded backbone. -> (model, tokenizer, path)."""
    if not args.checkpoint:
        if args.config == "base":
            raise SystemExit("error: --config base is OpenAI's CLIP ViT-B/16, which this project does not pre-train: pass "
                             "--checkpoint ViT-B-16.pt --bpe bpe_simple_vocab_16e6.txt.gz (or drop --config).")
        if args.data not in IMAGE_TEXT_DATA:
            raise SystemExit(f"error: --data {args.data} needs the published CLIP: pass --checkpoint ViT-B-16.pt "
                             f"--config base --bpe bpe_simple_vocab_16e6.txt.gz.")
        model, _ = default_clip_source(args.config or "tiny", args.data_seed, device)
        return model, data.embedded_tokenizer(), default_clip_checkpoint(args.config or "tiny")
    model, meta = common.load_clip(args.checkpoint, config=args.config, device=device)
    if meta.get("data") == "embedded-image-text":
        if args.data not in IMAGE_TEXT_DATA:
            raise SystemExit(f"error: {args.checkpoint} was pre-trained on the embedded benchmark's small vocabulary, "
                             f"which cannot read {args.data}'s texts; pass the published CLIP (--checkpoint ViT-B-16.pt "
                             f"--config base --bpe bpe_simple_vocab_16e6.txt.gz).")
        if meta.get("benchmark") != data.it_embedded_id():
            raise SystemExit(f"error: {args.checkpoint} was made on another version of the embedded image-text benchmark "
                             f"({meta.get('benchmark')}, this is {data.it_embedded_id()}); make it again with "
                             f"`python train.py --data {args.data}`.")
        return model, data.embedded_tokenizer(), args.checkpoint
    if not args.bpe:
        raise SystemExit(f"error: {args.checkpoint} is not one of this project's CLIP checkpoints, so its texts need "
                         f"CLIP's BPE vocabulary: pass --bpe bpe_simple_vocab_16e6.txt.gz.")
    tokenizer = data.CLIPTokenizer(args.bpe)
    if tokenizer.vocab_size != model.vocab_size:
        raise SystemExit(f"error: --bpe {args.bpe} gives {tokenizer.vocab_size} tokens but {args.checkpoint} embeds "
                         f"{model.vocab_size}; use the vocabulary file published with these weights.")
    return model, tokenizer, args.checkpoint


def image_text_sets(args, model, tokenizer):
    """(training set, test set, task info) of an image-text --data: an embedded task or a real dataset."""
    if args.data in IMAGE_TEXT_DATA:
        kw = dict(image_size=model.image_size, context_length=model.context_length, tokenizer=tokenizer, seed=args.data_seed)
        return (data.embedded_image_text_split(args.data, "train", **kw), data.embedded_image_text_split(args.data, "test", **kw),
                data.IT_TASKS[args.data])
    kw = dict(tokenizer=tokenizer, image_size=model.image_size, context_length=model.context_length)
    return (data.image_text_split(args.data, args.data_root, "train", **kw),
            data.image_text_split(args.data, args.data_root, "test", **kw), data.IMAGE_TEXT_TASKS[args.data])


def image_text_results_path(args):
    """results/source_<data>.json, or named after the --checkpoint when one is given."""
    name = f"_{os.path.splitext(os.path.basename(args.checkpoint))[0]}" if args.checkpoint else ""
    return args.results or os.path.join(RESULTS_DIR, f"source_{args.data}{name}.json")


def image_text_source(args):
    """`python train.py --data food|imdb|memes` (or a real dataset): the frozen CLIP backbone (pre-trained
    first when needed), its image -> text retrieval and the linear probes of each modality; table + JSON."""
    device = common.get_device(args.device)
    model, tokenizer, path = image_text_backbone(args, device)
    train_set, test_set, info = image_text_sets(args, model, tokenizer)
    r = modality_probes(model, info["kind"], info["num_classes"], train_set, test_set, device, seed=args.seed)
    metric = {"accuracy": "accuracy", "f1_macro": "F1-macro", "auroc": "AUROC"}[info["metric"]]
    ret = r["retrieval"]
    print(f"backbone {path}: image -> text top-1 retrieval in clean test batches of 64: {ret['true_pairs']:.1f}% "
          f"(pairs shuffled within each class: {ret['class_shuffled']:.1f}%; chance 1.6%)")
    print(f"linear probes on the frozen embeddings, test {metric} (%):  image only {r['image']:.1f} | "
          f"text only {r['text']:.1f} | both {r['both']:.1f}")
    out = image_text_results_path(args)
    common.write_json(out, {"args": vars(args), "checkpoint": path, "metric": info["metric"], **r})
    print(f"wrote {out}")
    return r


# ----------------------------------------------------------------------------------------------
# Missing-modality protocols (shared by CMPT and AOEPT)
# ----------------------------------------------------------------------------------------------
INFERENCE_RATES = (0, 10, 30, 50, 70, 90, 100)  # % of a modality missing at test time (CMPT, Fig. 3)
MAP_KINDS = ("audio", "video", "both")  # missing-audio, missing-video, missing-both (MAP protocol)


@torch.no_grad()
def accuracy(model, dataset, device, batch_size=256):
    model.eval()
    correct = 0
    for batch in data.make_loader(dataset, batch_size, shuffle=False):
        batch = data.to_device(batch, device)
        correct += (model(batch).argmax(1) == batch["label"]).sum().item()
    return 100.0 * correct / len(dataset)


def fit(module, variant, backbone, train_set, args, device, seed, desc):
    """Build one variant on a copy of the frozen source model and train it; returns the model."""
    common.seed_everything(seed)
    model = module.build(copy_frozen(backbone), **module.VARIANTS[variant]).to(device)
    loader = data.make_loader(train_set, module.BATCH_SIZE if args.batch_size is None else args.batch_size,
                              shuffle=True, seed=seed)
    if hasattr(module, "prepare"):
        module.prepare(model, data.make_loader(train_set, 256, shuffle=False), device)
    params, _ = module.collect_params(model)
    epochs = module.EPOCHS if args.epochs is None else args.epochs
    lr = module.LR if args.lr is None else args.lr
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=module.WEIGHT_DECAY)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * len(loader),
                                                pct_start=0.1)
    train_epochs(module, model, loader, opt, sched, epochs, device, desc)
    return model.eval()


def train_epochs(module, model, loader, opt, sched, epochs, device, desc):
    """The training loop of a missing-modality method: `module.train_step` on every batch, the schedule
    stepped after each, a progress bar with the loss terms. -> median ms per training step."""
    bar = tqdm(total=epochs * len(loader), desc=desc, leave=False, dynamic_ncols=True)
    step_seconds = []
    for _ in range(epochs):
        model.train()
        for batch in loader:
            batch = data.to_device(batch, device)
            t0 = time.perf_counter()
            _, losses = module.train_step(model, batch, opt)
            step_seconds.append(time.perf_counter() - t0)
            sched.step()
            bar.update(1)
            bar.set_postfix({k: f"{v:.3f}" for k, v in losses.items()})
    bar.close()
    return 1000 * float(np.median(step_seconds))


def copy_frozen(model):
    """A deep copy of the source model in eval mode with every parameter frozen."""
    m = copy.deepcopy(model).eval()
    for p in m.parameters():
        p.requires_grad_(False)
    return m


def run_missing(args):
    """Train every variant of a method and evaluate the missing-modality protocols; table + JSON."""
    module = importlib.import_module(METHODS[args.method])
    if not 0 < args.map_rate <= 1:
        raise SystemExit(f"--map-rate is a fraction in (0, 1], e.g. 0.7 for 70%, not {args.map_rate}.")
    bad = [v for v in (args.variants or []) if v not in module.VARIANTS]
    if bad:
        raise SystemExit(f"unknown variant {bad[0]!r} of {args.method}; choose from {', '.join(module.VARIANTS)}.")
    if not [p for p in module.PROTOCOLS if p in args.protocols]:
        raise SystemExit(f"{args.method} reports only the {', '.join(module.PROTOCOLS)} protocol(s); "
                         f"--protocols {' '.join(args.protocols)} leaves nothing to run.")
    device = common.get_device(args.device)
    backbone = load_or_train_source(args, device)
    train_full, test_full = missing_modality_sets(args, backbone)
    variants = args.variants or list(module.VARIANTS)
    protocols = [p for p in module.PROTOCOLS if p in args.protocols]
    rows = {}  # (protocol, setting) -> {variant: [acc per seed]}
    t0 = time.time()
    for seed in args.seeds:
        for variant in variants:
            if "inference" in protocols:  # train on complete data, test with x% of one modality missing
                model = fit(module, variant, backbone, train_full, args, device, seed, f"{variant} seed {seed}")
                acc = accuracy(model, test_full, device)  # 0% missing: complete data, the same for audio and video
                rows.setdefault(("inference", "complete (0% missing)"), {}).setdefault(variant, []).append(acc)
                tqdm.write(f"[{variant} seed {seed}] complete: {acc:.1f}")
                for kind in ("audio", "video"):
                    for rate in INFERENCE_RATES[1:]:  # 10 .. 100%; 0% is the complete row above
                        has_a, has_v = data.missing_masks(len(test_full), kind, rate / 100, seed=seed)
                        acc = accuracy(model, data.with_missing(test_full, has_a, has_v), device)
                        rows.setdefault(("inference", f"{kind} {rate}% missing"), {}).setdefault(variant, []).append(acc)
                        tqdm.write(f"[{variant} seed {seed}] {kind} {rate}% missing: {acc:.1f}")
            if "map" in protocols:  # the same missing type and rate in training and test
                for kind in MAP_KINDS:
                    tr = data.with_missing(train_full, *data.missing_masks(len(train_full), kind, args.map_rate, seed=seed))
                    te = data.with_missing(test_full, *data.missing_masks(len(test_full), kind, args.map_rate, seed=seed + 1))
                    model = fit(module, variant, backbone, tr, args, device, seed, f"{variant} MAP {kind} seed {seed}")
                    acc = accuracy(model, te, device)
                    rows.setdefault(("map", f"missing-{kind} {round(args.map_rate * 100)}%"), {}).setdefault(variant, []).append(acc)
                    tqdm.write(f"[{variant} seed {seed}] MAP missing-{kind}: {acc:.1f}")
    table = format_table(rows, variants, len(args.seeds))
    print(table)
    out = args.results or os.path.join(RESULTS_DIR, f"train_{args.method}.json")
    common.write_json(out, {"args": vars(args), "wall_seconds": time.time() - t0,
                            "results": [{"protocol": p, "setting": s, "accuracy": v} for (p, s), v in rows.items()]})
    print(f"wrote {out}")
    return rows


# ----------------------------------------------------------------------------------------------
# Missing-modality protocols on image-text (CMPT's and AOEPT's tables)
# ----------------------------------------------------------------------------------------------
IT_MAP_KINDS = ("text", "image", "both")  # MAP protocol rows: missing-text, missing-image, missing-both
IT_TEXT_AVAILABLE = (10, 30, 50, 70, 90)  # CMPT Figure 2: every image missing, x% of the texts available
_MEMORY_CACHE = {}  # AOEPT's collect + distil, once per (backbone, dataset, missing table, depth, K)


def image_text_ids(args, task, split, dataset):
    """The sample ids a missing table is keyed by: the dataset's own ids, or '<task>-<split>-<i>' for an embedded task."""
    if isinstance(dataset, data.ImageTextFiles):
        return dataset.ids
    return [f"{data.it_embedded_id()}-seed{args.data_seed}-{task}-{split}-{i}" for i in range(len(dataset))]


def missing_split(args, task, split, dataset, kind, rate):
    """The missing table of one split, beside the results: <results folder>/missing_tables/
    missing_<task>_<split>_<kind>_<rate>_seed<s>.json, drawn once (seeded by --table-seed) and read again by
    every method and seed."""
    folder = os.path.join(os.path.dirname(os.path.abspath(image_text_methods_results_path(args, args.methods, args.tasks))),
                          "missing_tables")
    path = data.missing_table_path(folder, task, split, kind, rate, args.table_seed)
    return data.load_or_make_missing_table(path, image_text_ids(args, task, split, dataset), kind, rate, args.table_seed)


def weights_hash(model):
    """A short hash of a model's weights (keys the AOEPT memory cache)."""
    h = hashlib.sha1()
    for k, v in model.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:12]


def schedule(kind, total, warmup, power=0.9, warmup_factor=0.1):
    """lr multiplier at step t of `total`: 'poly' = CMPT's (warmup_factor x lr for the warm-up steps, then
    (1 - progress)^power), 'cosine' = AOEPT's (linear warm-up, then cosine to 0)."""
    w = max(1, round(warmup * total))

    def factor(t):
        if t < w:
            return warmup_factor if kind == "poly" else (t + 1) / w
        progress = (t - w) / max(1, total - w)
        return (1 - progress) ** power if kind == "poly" else 0.5 * (1 + math.cos(math.pi * progress))
    return factor


@torch.no_grad()
def image_text_logits(model, dataset, device, batch_size=256):
    """(logits (N, K), labels) of a model over a dataset."""
    model.eval()
    out, labels = [], []
    for batch in data.make_loader(dataset, batch_size, shuffle=False):
        batch = data.to_device(batch, device)
        out.append(model(batch))
        labels.append(batch["label"])
    return torch.cat(out).cpu(), torch.cat(labels).cpu()


def fit_image_text(module, variant, backbone, train_set, info, cfg, args, device, seed, desc, memory_key=None):
    """Build one variant on a copy of the frozen CLIP, train it with the method's image-text recipe (`cfg`);
    returns (model, ms per training step)."""
    common.seed_everything(seed)
    kw = {k: v for k, v in {**cfg.get("build", {}), **variant}.items() if k != "image_placeholder"}
    model = module.build(copy_frozen(backbone), num_classes=info["num_classes"], **kw).to(device)
    if getattr(model, "use_memory", False):  # AOEPT: collect + distil, cached when the caller names the inputs
        key = (memory_key, model.depth, cfg.get("n_clusters"))
        if memory_key is None or key not in _MEMORY_CACHE:
            module.prepare(model, data.make_loader(train_set, 256, shuffle=False), device, k_max=cfg["n_clusters"])
            if memory_key is not None:
                _MEMORY_CACHE[key] = tuple(model.memories().values())
        else:
            model.set_memory(*_MEMORY_CACHE[key])
    batch_size = cfg["batch_size"] if args.batch_size is None else args.batch_size
    loader = data.make_loader(train_set, batch_size, shuffle=True, seed=seed)
    params, _ = module.collect_params(model)
    epochs = cfg["epochs"] if args.epochs is None else args.epochs
    lr = cfg["lr"] if args.lr is None else args.lr
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=cfg["weight_decay"], eps=cfg["eps"])
    total = max(1, epochs * len(loader))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule(cfg["schedule"], total, cfg["warmup"]))
    ms = train_epochs(module, model, loader, opt, sched, epochs, device, desc)
    return model.eval(), ms


@torch.no_grad()
def frozen_forward_ms(backbone, dataset, batch_size, device, repeats=5):
    """Median time (ms) of the frozen CLIP's plain forward pass (both towers) on one training batch."""
    batch = data.to_device(next(iter(data.make_loader(dataset, batch_size, shuffle=False))), device)
    times = []
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        backbone.encode_image(batch["image"]), backbone.encode_text(batch["text"])
        times.append(time.perf_counter() - t0)
    return 1000 * float(np.median(times[1:]))


def image_text_recipe(module, task, kind, backbone):
    """The training recipe of a method on one (task, missing kind): its IMAGE_TEXT dict, with AOEPT's public
    per-dataset config (prompt length, lr, weight decay, K, depth)."""
    cfg = dict(module.IMAGE_TEXT)
    if hasattr(module, "image_text_config"):
        pub = module.image_text_config(task, kind, len(backbone.transformer.resblocks))
        cfg.update(lr=pub["lr"], weight_decay=pub["weight_decay"], n_clusters=pub["n_clusters"],
                   build=dict(prompt_len=pub["prompt_len"], depth=pub["depth"]))
    return cfg


def map_setting(kind, rate):
    """'missing-both 70% (image/text 65/65% available)': MAP's name and CMPT's (image, text) availability."""
    avail = {"text": (100, 100 * (1 - rate)), "image": (100 * (1 - rate), 100),
             "both": (100 * (1 - rate / 2), 100 * (1 - rate / 2))}[kind]
    return f"missing-{kind} {100 * rate:g}% (image/text {avail[0]:g}/{avail[1]:g}% available)"


def run_image_text_missing(args, methods, tasks):
    """The missing-modality tables on image-text: for each task, every variant of every method, every seed.
    MAP protocol (both papers): the same missing type and rate in training and test. CMPT's inference
    protocol: trained on complete data, tested with a modality missing. -> rows, timings."""
    device = common.get_device(args.device)
    modules = {m: importlib.import_module(METHODS[m]) for m in methods}
    variants = {m: [v for v in (args.variants or list(mod.IMAGE_TEXT_DEFAULT)) if v in mod.IMAGE_TEXT_VARIANTS]
                for m, mod in modules.items()}
    bad = [v for v in (args.variants or []) if not any(v in mod.IMAGE_TEXT_VARIANTS for mod in modules.values())]
    if bad:
        names = ", ".join(v for mod in modules.values() for v in mod.IMAGE_TEXT_VARIANTS)
        raise SystemExit(f"error: unknown variant {bad[0]!r} of {' / '.join(methods)} on image-text; choose from {names}.")
    if not any(p in mod.PROTOCOLS for mod in modules.values() for p in args.protocols):
        raise SystemExit(f"error: {' / '.join(methods)} report(s) only the "
                         f"{', '.join(sorted({p for mod in modules.values() for p in mod.PROTOCOLS}))} protocol(s); "
                         f"--protocols {' '.join(args.protocols)} leaves nothing to run.")
    rate = args.map_rate
    rows, timing = {}, {}
    t_start = time.time()
    for task in tasks:
        args.data = task
        backbone, tokenizer, path = image_text_backbone(args, device)
        train_set, test_set, info = image_text_sets(args, backbone, tokenizer)
        C = backbone.context_length
        if not len(train_set) or not len(test_set):
            raise SystemExit(f"error: --data {task} has an empty training or test split; check --data-root.")
        bb_hash = weights_hash(backbone)
        metric = info["metric"]
        tables = {(split, kind): missing_split(args, task, split, ds, kind, rate)
                  for split, ds in (("train", train_set), ("test", test_set)) for kind in IT_MAP_KINDS}
        complete = torch.zeros(len(test_set), dtype=torch.long)

        def masked(ds, table, placeholder):
            return data.with_missing_table(ds, table, tokenizer, C, placeholder)

        def score(model, ds):
            return task_metric(info["kind"], *image_text_logits(model, ds, device))

        def record(protocol, setting, label, value):
            rows.setdefault((task, protocol, setting), {}).setdefault(label, []).append(value)

        for seed in args.seeds:
            for m, mod in modules.items():
                for variant in variants[m]:
                    vkw = mod.IMAGE_TEXT_VARIANTS[variant]
                    placeholder = vkw.get("image_placeholder", mod.IMAGE_PLACEHOLDER)
                    if "map" in args.protocols and "map" in mod.PROTOCOLS:
                        for kind in IT_MAP_KINDS:
                            cfg = image_text_recipe(mod, task, kind, backbone)
                            tr = masked(train_set, tables[("train", kind)], placeholder)
                            key = (bb_hash, task, args.data_seed, kind, rate, args.table_seed)
                            model, ms = fit_image_text(mod, vkw, backbone, tr, info, cfg, args, device, seed,
                                                       f"{task} {variant} missing-{kind} seed {seed}", memory_key=key)
                            timing.setdefault(variant, []).append(ms)
                            value = score(model, masked(test_set, tables[("test", kind)], placeholder))
                            record("map", map_setting(kind, rate), variant, value)
                            tqdm.write(f"[{task} {variant} seed {seed}] MAP missing-{kind} {round(100 * rate)}%: "
                                       f"{metric} {value:.1f}")
                    if "inference" in args.protocols and "inference" in mod.PROTOCOLS:
                        cfg = image_text_recipe(mod, task, "both", backbone)
                        model, ms = fit_image_text(mod, vkw, backbone, train_set, info, cfg, args, device, seed,
                                                   f"{task} {variant} complete data seed {seed}")
                        timing.setdefault(variant, []).append(ms)
                        settings = [("complete (both)", complete),
                                    ("text only (image 100% missing)", torch.full_like(complete, 2)),
                                    ("image only (text 100% missing)", torch.full_like(complete, 1))]
                        for avail in IT_TEXT_AVAILABLE:  # CMPT Fig. 2: every image there, avail% of the texts
                            settings.append((f"image 100%, text {avail}% available",
                                             data.missing_table(len(test_set), "text", 1 - avail / 100, args.table_seed)))
                        for setting, table in settings:
                            value = score(model, masked(test_set, table, placeholder))
                            record("inference", setting, variant, value)
                        tqdm.write(f"[{task} {variant} seed {seed}] complete training: both {rows[(task, 'inference', settings[0][0])][variant][-1]:.1f}"
                                   f" | text only {rows[(task, 'inference', settings[1][0])][variant][-1]:.1f}"
                                   f" | image only {rows[(task, 'inference', settings[2][0])][variant][-1]:.1f}")
        forward_ms = frozen_forward_ms(backbone, train_set, modules[methods[0]].IMAGE_TEXT["batch_size"]
                                       if args.batch_size is None else args.batch_size, device)
        timing.setdefault("frozen forward", []).append(forward_ms)
    return rows, timing, time.time() - t_start


def format_image_text_table(rows, columns, n_seeds, metrics):
    """One block per (task, protocol): a row per setting, a column per variant, mean +/- std over seeds."""
    def cell(v):
        return (f"{np.mean(v):5.1f}" + (f" +/- {np.std(v):3.1f}" if n_seeds > 1 else "")) if v else "-"
    w = max(len(s) for _, _, s in rows) + 2
    cw = max(15, max(len(c) for c in columns) + 2)
    lines, last = [], None
    for (task, protocol, setting), values in rows.items():
        if (task, protocol) != last:
            last = (task, protocol)
            title = {"map": "MAP protocol (same missing type and rate in training and test)",
                     "inference": "trained on complete data, modality missing at test"}[protocol]
            lines += ["", f"{task} ({metrics[task]} %), {title}",
                      f"{'setting':<{w}}" + "".join(f"{c:>{cw}}" for c in columns if any(c in v for (t, p, _), v in rows.items() if (t, p) == last))]
        cols = [c for c in columns if any(c in v for (t, p, _), v in rows.items() if (t, p) == last)]
        lines.append(f"{setting:<{w}}" + "".join(f"{cell(values.get(c, [])):>{cw}}" for c in cols))
    return "\n".join(lines)


def run_image_text_methods(args, methods, tasks):
    """`python train.py --method cmpt aoept --data food imdb memes`: tables, step-time ratios, results JSON."""
    rows, timing, wall = run_image_text_missing(args, methods, tasks)
    modules = [importlib.import_module(METHODS[m]) for m in methods]
    order = [v for mod in modules for v in list(mod.IMAGE_TEXT_DEFAULT) + list(mod.IMAGE_TEXT_VARIANTS)]
    order = sorted(dict.fromkeys(order), key=lambda v: v not in ("head_only", "map"))  # the baselines first
    columns = [v for v in order if any(v in r for r in rows.values())]
    metrics = {t: data.IT_TASKS[t]["metric"] if t in data.IT_TASKS else data.IMAGE_TEXT_TASKS[t]["metric"] for t in tasks}
    print(format_image_text_table(rows, columns, len(args.seeds), metrics))
    fwd = float(np.mean(timing.pop("frozen forward")))
    print(f"\ntime per training step (median, ms) and its ratio to the frozen CLIP's forward pass ({fwd:.1f} ms, same batch):")
    for v, ms in timing.items():
        print(f"  {v:<18} {np.mean(ms):7.1f} ms  {np.mean(ms) / fwd:5.2f}x")
    print(f"wall time {wall / 60:.1f} min, {len(args.seeds)} seed(s)")
    out = image_text_methods_results_path(args, methods, tasks)
    common.write_json(out, {"args": vars(args), "wall_seconds": wall, "frozen_forward_ms": fwd,
                            "step_ms": {v: float(np.mean(ms)) for v, ms in timing.items()},
                            "results": [{"task": t, "metric": metrics[t], "protocol": p, "setting": s, "values": v}
                                        for (t, p, s), v in rows.items()]})
    print(f"wrote {out}")
    return rows


def image_text_methods_results_path(args, methods, tasks):
    return args.results or os.path.join(RESULTS_DIR, f"train_{'_'.join(methods)}_{'_'.join(tasks)}.json")


def format_table(rows, variants, n_seeds):
    def cell(v):
        return f"{np.mean(v):5.1f}" + (f" +/- {np.std(v):3.1f}" if n_seeds > 1 else "")
    w = max(len(s) for _, s in rows) + 2
    cw = max(16, max(len(v) for v in variants) + 2)
    lines = [f"{'setting':<{w}}" + "".join(f"{v:>{cw}}" for v in variants)]
    for (p, s), accs in rows.items():
        lines.append(f"{s:<{w}}" + "".join(f"{cell(accs[v]):>{cw}}" for v in variants))
    return "\n".join(lines)


def missing_modality_sets(args, backbone):
    """(training set, test set) of the missing-modality protocols: the embedded benchmark's train / test
    splits, or the READ-layout lists --train-json / --val-json read for the backbone's input sizes."""
    if args.data == "embedded":
        return (data.embedded_split("train", backbone, seed=args.data_seed),
                data.embedded_split("test", backbone, seed=args.data_seed))
    kw = dict(mel_bins=backbone.mel_bins, target_length=backbone.audio_length, image_size=backbone.image_size)
    return (data.ReadLayoutDataset(args.train_json, args.label_csv, **kw),
            data.ReadLayoutDataset(args.val_json, args.label_csv, **kw))


def default_source(config, data_seed, device):
    """The default source model on the embedded benchmark: checkpoints/embedded_<config>.pt, trained first
    when it is missing, unreadable (an interrupted save) or made on another version of the benchmark.
    Returns (model, meta)."""
    path = default_checkpoint("embedded", config)
    if os.path.isfile(path):
        try:
            model, meta = common.load_checkpoint(path, device=device)
            if meta.get("benchmark") == data.embedded_id():
                return model, meta
            print(f"the default source checkpoint {path} was trained on another version of the embedded benchmark; "
                  f"training it again")
        except common.CheckpointError as e:
            print(f"the default source checkpoint cannot be used ({e}); training it again")
    else:
        print(f"no source checkpoint at {path}: training one first (about a minute and a half on a CPU)")
    train_source(build_parser().parse_args(["--config", config, "--device", str(device), "--out", path,
                                            "--data-seed", str(data_seed)]))
    model, meta = common.load_checkpoint(path, device=device)
    return model, {**meta, "trained_now": True}  # the caller may report this run's training stages


def check_data_seed(path, meta, data_seed):
    """Refuse a source model trained on another seed or another version of the embedded benchmark (its
    test split differs)."""
    if meta.get("data", "embedded") != "embedded":
        return
    if meta.get("data_seed", data_seed) != data_seed:
        raise SystemExit(f"error: {path} was trained on the embedded benchmark with --data-seed {meta['data_seed']}, "
                         f"not {data_seed}; pass the matching --data-seed or a --checkpoint trained with "
                         f"`python train.py --data-seed {data_seed} --out <file>`.")
    if "data" in meta and meta.get("benchmark") != data.embedded_id():
        raise SystemExit(f"error: {path} was trained on another version of the embedded benchmark "
                         f"({meta.get('benchmark') or 'before v3'}, this is {data.embedded_id()}); train it again with "
                         f"`python train.py --out {path}`.")


def load_or_train_source(args, device):
    if args.data == "read":  # the source model trained on the same data with `train.py --data read`
        model, _ = common.load_checkpoint(args.checkpoint, config=args.config, device=device)
        num_classes = len(data.read_label_csv(args.label_csv))
        if model.num_classes != num_classes:
            raise SystemExit(f"error: {args.checkpoint} has {model.num_classes} classes but {args.label_csv} has "
                             f"{num_classes}; use the source model trained on this dataset.")
        return model
    if args.checkpoint:
        path = args.checkpoint
        model, meta = common.load_checkpoint(path, config=args.config, device=device)
    else:
        path = default_checkpoint("embedded", args.config or "tiny")
        model, meta = default_source(args.config or "tiny", args.data_seed, device)
    if model.num_classes != data.EMBEDDED["num_classes"]:
        raise SystemExit(f"error: {path} has {model.num_classes} classes but the embedded benchmark has "
                         f"{data.EMBEDDED['num_classes']}; use a checkpoint trained by `python train.py`.")
    check_data_seed(path, meta, args.data_seed)
    return model


# ----------------------------------------------------------------------------------------------
def positive_int(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def non_negative_int(text):
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, not {value}")
    return value


def seed_int(text):
    """A seed: an integer 0 .. 2**32 - 1 (what numpy accepts)."""
    value = int(text)
    if not 0 <= value < 2 ** 32:
        raise argparse.ArgumentTypeError(f"a seed is an integer from 0 to {2 ** 32 - 1}, not {value}")
    return value


def positive_float(text):
    value = float(text)
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a positive number, not {text}")
    return value


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The module docstring as it is written, and the flags' help texts (each states its default)."""


def variant_names():
    """'cmpt: cmpt, lambda0, ...; aoept: ...': the variants of every method, for --help."""
    mods = {name: importlib.import_module(mod) for name, mod in METHODS.items() if mod}
    return ("; ".join(f"{name}: {', '.join(m.VARIANTS)}" for name, m in mods.items()) + "; on image-text: " +
            "; ".join(f"{name}: {', '.join(m.IMAGE_TEXT_VARIANTS)}" for name, m in mods.items()))


def method_defaults(attr):
    """'cmpt 4, aoept 3': a training default of every method module, for --help."""
    return ", ".join(f"{name} {getattr(importlib.import_module(mod), attr):g}" for name, mod in METHODS.items() if mod)


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--method", default="source", nargs="+", choices=list(METHODS),
                   help="source: train the source model; cmpt / aoept: train that method's variants and run its "
                        "protocols; on image-text data both may be given (cmpt aoept: one table) (default: source)")
    p.add_argument("--data", default="embedded", nargs="+", choices=["embedded", "read", *IMAGE_TEXT_DATA, *REAL_IMAGE_TEXT],
                   help="audio-visual: the embedded benchmark (generated locally) or a dataset in READ's file layout; "
                        "image-text: an embedded task (food, imdb, memes: the frozen CLIP backbone, its retrieval and "
                        "each modality's linear probe) or a real dataset in its raw layout under --data-root "
                        "(mmimdb, food101, hatememes); with --method cmpt / aoept several image-text tasks may be "
                        "given, e.g. food imdb memes (default: embedded)")
    p.add_argument("--config", default=None, choices=list(common.CONFIGS),
                   help="model size, base = published CAV-MAE (default: tiny; with --checkpoint, the checkpoint's own)")
    p.add_argument("--epochs", type=positive_int, default=None,
                   help=f"epochs (default: {FINETUNE['epochs']} of fine-tuning for source; {method_defaults('EPOCHS')})")
    p.add_argument("--pretrain-epochs", type=non_negative_int, default=None,
                   help=f"source: epochs of CAV-MAE pre-training before fine-tuning, 0 skips it "
                        f"(default: {PRETRAIN['epochs']})")
    p.add_argument("--lr", type=positive_float, default=None,
                   help=f"peak learning rate (default: {FINETUNE['lr']:g} for source fine-tuning; {method_defaults('LR')})")
    p.add_argument("--batch-size", type=positive_int, default=None,
                   help=f"batch size (default: {FINETUNE['batch_size']} for source; {method_defaults('BATCH_SIZE')})")
    p.add_argument("--seed", type=seed_int, default=0, help="seed of the source training run (default: 0)")
    p.add_argument("--seeds", type=seed_int, nargs="+", default=[1, 2, 3],
                   help="seeds of the method runs, distinct (default: 1 2 3)")
    p.add_argument("--data-seed", type=seed_int, default=0, help="seed of the embedded benchmark (default: 0)")
    p.add_argument("--out", default=None, help="source training: where to save the checkpoint; its metrics go "
                                               "beside it as .json (default: checkpoints/<data>_<config>.pt)")
    p.add_argument("--checkpoint", default=None,
                   help="cmpt / aoept: the source checkpoint they start from (default: checkpoints/embedded_<config>.pt, "
                        "trained first if missing; --data read: required, from `train.py --data read`)")
    p.add_argument("--results", default=None, help="cmpt / aoept: results JSON (default: results/train_<method>.json)")
    p.add_argument("--variants", nargs="+", default=None,
                   help=f"cmpt / aoept: only these variants, the first is the method itself ({variant_names()}) "
                        f"(default: all of the method's)")
    p.add_argument("--protocols", nargs="+", default=["inference", "map"], choices=["inference", "map"],
                   help="cmpt / aoept: which protocols to run, those the paper reports (default: inference map)")
    p.add_argument("--map-rate", type=float, default=0.7,
                   help="cmpt / aoept: missing rate of the MAP protocol, a fraction in (0, 1] (default: 0.7)")
    p.add_argument("--table-seed", type=seed_int, default=0,
                   help="image-text cmpt / aoept: seed of the missing tables, drawn once and kept in missing_tables/ "
                        "beside the results file, for every method and seed (default: 0, MAP's)")
    p.add_argument("--train-json", default=None, help="--data read: training list (JSON) (default: none, required)")
    p.add_argument("--val-json", default=None, help="--data read: list to report accuracy on; the test list of "
                                                    "cmpt / aoept (default: none; required for cmpt / aoept)")
    p.add_argument("--label-csv", default=None, help="--data read: class_labels_indices CSV with indices 0..K-1 "
                                                     "(default: none, required)")
    p.add_argument("--data-root", default=None, help="--data mmimdb | food101 | hatememes: the dataset's folder, "
                                                     "in its published raw layout (default: none, required)")
    p.add_argument("--bpe", default=None, help="image-text with the published CLIP: CLIP's BPE vocabulary "
                                               "bpe_simple_vocab_16e6.txt.gz (default: none)")
    p.add_argument("--workers", type=non_negative_int, default=0, help="DataLoader workers of source training (default: 0)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available, else cpu)")
    return p


METHOD_ONLY = ("checkpoint", "results", "variants", "protocols", "map_rate", "seeds")  # cmpt / aoept flags
READ_ONLY = ("train_json", "val_json", "label_csv")  # --data read flags


def check_args(args, parser):
    """Refuse, before any work, flags that contradict each other or would be ignored; check the device and
    the output paths. Fills in args.config for source training."""
    common.get_device(args.device)
    given = lambda name: getattr(args, name) != parser.get_default(name)  # noqa: E731
    flag = lambda name: "--" + name.replace("_", "-")  # noqa: E731
    image_text = args.data in IMAGE_TEXT_DATA + REAL_IMAGE_TEXT
    if image_text:
        methods = args.methods
        if args.method != "source" and not 0 < args.map_rate <= 1:
            raise SystemExit(f"error: --map-rate is a fraction in (0, 1], e.g. 0.7 for 70%, not {args.map_rate}.")
        if args.method != "source" and len(set(args.seeds)) != len(args.seeds):
            raise SystemExit(f"error: --seeds {' '.join(map(str, args.seeds))} repeats a seed; give each seed once.")
        method_flags = () if args.method != "source" else ("variants", "protocols", "map_rate", "seeds", "epochs", "lr",
                                                           "batch_size", "table_seed")
        ignored = [flag(n) for n in READ_ONLY + ("out", "workers", "pretrain_epochs") + method_flags
                   if given(n)] + (["--data-root"] if args.data in IMAGE_TEXT_DATA and args.data_root else [])
        if ignored:
            raise SystemExit(f"error: {ignored[0]} does not apply to --data {args.data}"
                             f"{' with --method source' if args.method == 'source' else ''}; see `python train.py --help`.")
        if args.data in REAL_IMAGE_TEXT and not args.data_root:
            raise SystemExit(f"error: --data {args.data} needs --data-root, the dataset's folder in its raw layout.")
        if args.bpe:
            data.check_input_file(args.bpe, "--bpe", "pass CLIP's bpe_simple_vocab_16e6.txt.gz.")
        path = image_text_results_path(args) if args.method == "source" else \
            image_text_methods_results_path(args, methods, args.tasks)
        results = common.check_output_file(path, "--results")
        return [("results", results)]
    if given("table_seed"):
        raise SystemExit("error: --table-seed applies to the image-text tables (--method cmpt / aoept --data food | imdb "
                         "| memes | mmimdb | food101 | hatememes).")
    if args.data_root or args.bpe:
        raise SystemExit(f"error: {'--data-root' if args.data_root else '--bpe'} applies to the image-text data only "
                         f"(--data food | imdb | memes | mmimdb | food101 | hatememes).")
    if args.method == "source":
        ignored = [flag(n) for n in METHOD_ONLY if given(n)]
        if ignored:
            raise SystemExit(f"error: {ignored[0]} applies to --method cmpt / aoept; source training saves to --out "
                             f"and writes its metrics beside it.")
        args.config = args.config or "tiny"
    elif args.out:
        raise SystemExit("error: --out is where source training saves its checkpoint; with --method "
                         f"{args.method} pass the source model as --checkpoint and the results file as --results.")
    if len(set(args.seeds)) != len(args.seeds):
        raise SystemExit(f"error: --seeds {' '.join(map(str, args.seeds))} repeats a seed; give each seed once.")
    if args.data == "embedded":
        ignored = [flag(n) for n in READ_ONLY if given(n)]
        if ignored:
            raise SystemExit(f"error: {ignored[0]} applies to --data read only; add --data read to use your lists.")
    else:
        needed = ["train_json", "label_csv"] + (["val_json", "checkpoint"] if args.method != "source" else [])
        lacking = [flag(n) for n in needed if not getattr(args, n)]
        if lacking:
            what = ("--train-json, --val-json, --label-csv and --checkpoint (the source model from "
                    "`train.py --data read`)") if args.method != "source" else \
                "--train-json and --label-csv (and --val-json to report accuracy)"
            raise SystemExit(f"error: --method {args.method} --data read needs {what}; {lacking[0]} is missing.")
        data.read_label_csv(args.label_csv)  # a wrong CSV is named now, not after the data work
    if args.method == "source":
        out = args.out or default_checkpoint(args.data, args.config)
        common.check_output_file(out, "--out")
        return [("checkpoint", out)]
    results = args.results or os.path.join(RESULTS_DIR, f"train_{args.method}.json")
    common.check_output_file(results, "--results")
    return [("results", results)]


def split_lists(args, parser):
    """--method and --data may name several (image-text methods on several tasks: one table); args.methods and
    args.tasks keep the lists, args.method and args.data the first of each for the single-run code."""
    as_list = lambda v: [v] if isinstance(v, str) else list(dict.fromkeys(v))  # noqa: E731  (a default is one name)
    args.methods, args.tasks = as_list(args.method), as_list(args.data)
    image_text = [t in IMAGE_TEXT_DATA + REAL_IMAGE_TEXT for t in args.tasks]
    if len(args.methods) > 1 or len(args.tasks) > 1:
        if not all(image_text) or "source" in args.methods:
            raise SystemExit("error: several --method or --data names run the image-text tables only: e.g. "
                             "--method cmpt aoept --data food imdb memes.")
        if len(args.tasks) > 1 and args.checkpoint:
            raise SystemExit("error: --checkpoint holds one backbone; give one --data with it.")
    args.method, args.data = args.methods[0], args.tasks[0]


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    started = time.time()
    outputs = []
    try:
        split_lists(args, parser)
        outputs = check_args(args, parser)
        if args.data in IMAGE_TEXT_DATA + REAL_IMAGE_TEXT and args.method != "source":
            run_image_text_methods(args, args.methods, args.tasks)
        elif args.data in IMAGE_TEXT_DATA + REAL_IMAGE_TEXT:
            image_text_source(args)
        elif args.method == "source":
            train_source(args)
        else:
            run_missing(args)
    except (common.CheckpointError, data.DataError, ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {common.error_sentence(e)}")
    except KeyboardInterrupt:
        sys.exit(common.interrupted_message(started, outputs))


if __name__ == "__main__":
    main()
