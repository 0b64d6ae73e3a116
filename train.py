"""Training: the two backbones, and the missing-modality methods (CMPT, AOEPT, MAP) in their protocols.

    python train.py                    # audio-visual source model -> checkpoints/embedded_tiny.pt
    python train.py --method cmpt      # CMPT and its ablations in CMPT's and MAP's protocols (audio-video)
    python train.py --data read --train-json tr.json --val-json te.json --label-csv labels.csv --out src.pt
    python train.py --data food        # the frozen tiny CLIP (pre-trained if missing): retrieval, probes
    python train.py --method cmpt aoept --data food imdb memes    # the image-text tables
    python train.py --method aoept --data food101 --data-root UPMC_Food101/ --config base \\
        --checkpoint ViT-B-16.pt --bpe bpe_simple_vocab_16e6.txt.gz    # OpenAI's CLIP on the real files

Protocols: MAP's (the same missing data in training and test) and CMPT's (complete training, a modality
missing at test). `--recipe embedded`: each method's short CPU budget; `--recipe paper`: the paper's,
tested at the best validation epoch. An undefined metric (one class present, no positive label, fewer
samples than a retrieval batch) is n/a with its reason. Deviation: backbones trained from scratch (PRETRAIN).
"""
import argparse
import copy
import importlib
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import common
import data

HERE = os.path.dirname(os.path.abspath(__file__))
CHECKPOINT_DIR = os.path.join(HERE, "checkpoints")
RESULTS_DIR = os.path.join(HERE, "results")
METHODS = {"cmpt": "cmpt", "aoept": "aoept"}  # name -> module (VARIANTS, PROTOCOLS, recipes, build, ...)
IMAGE_TEXT_DATA = tuple(data.IT_TASKS)  # embedded tasks: food, imdb, memes
REAL_IMAGE_TEXT = ("mmimdb", "food101", "hatememes")  # the papers' datasets, read from their raw layouts
IT_DATA = IMAGE_TEXT_DATA + REAL_IMAGE_TEXT
INFERENCE_RATES = (10, 30, 50, 70, 90, 100)  # % of one modality missing at test (CMPT, Fig. 3)
# DEVIATION: CAV-MAE starts from ImageNet MAE weights (Adam 5e-5, AudioSet); ours from scratch on 3,000
# clips, so one-cycle schedules (OneCycleLR, 10% warm-up) at larger peak learning rates.
PRETRAIN = dict(epochs=6, lr=2e-3, batch_size=64, weight_decay=5e-7, betas=(0.95, 0.999), optimizer="adam",
                schedule="onecycle", warmup=0.1)
FINETUNE = dict(epochs=9, lr=2e-3, batch_size=64, weight_decay=0.05, schedule="onecycle", warmup=0.1)
# CLIP's AdamW (betas 0.9 / 0.98, eps 1e-6, decay 0.1 except gains, biases, embeddings, temperature)
CLIP_PRETRAIN = dict(epochs=25, lr=2e-3, batch_size=64, weight_decay=0.1, betas=(0.9, 0.98), eps=1e-6,
                     schedule="onecycle", warmup=0.1)


def default_checkpoint(data_name="embedded", config="tiny"):
    """checkpoints/<data>_<config>.pt: embedded_tiny.pt (audio-visual), clip_embedded_tiny.pt (CLIP)."""
    return os.path.join(CHECKPOINT_DIR, f"{data_name}_{config}.pt")


def lr_factor(recipe, total):
    """lr factor at step t: poly (CMPT) or cosine (AOEPT) after a warm-up at / from warmup_factor."""
    w, poly = max(1, round(recipe["warmup"] * total)), recipe["schedule"] == "poly"
    start, power = recipe.get("warmup_factor", 0.1 if poly else 0.0), recipe.get("power", 0.9)

    def factor(t):
        progress = (t - w) / max(1, total - w)
        if t < w:
            return start if poly else start + (1 - start) * (t + 1) / w
        return (1 - progress) ** power if poly else 0.5 * (1 + math.cos(math.pi * progress))
    return factor


def train_loop(model, params, loader, recipe, step, device, desc, val=None, quiet=False):
    """step(batch, optimizer) -> {loss: float} over epochs, the schedule stepped per batch; select "best_val":
    the trained parameters of the epoch val(model) scores best."""
    adam = torch.optim.Adam if recipe.get("optimizer") == "adam" else torch.optim.AdamW
    opt = adam(params, lr=recipe["lr"], weight_decay=recipe["weight_decay"],
               betas=recipe.get("betas", (0.9, 0.999)), eps=recipe.get("eps", 1e-8))
    total = max(1, recipe["epochs"] * len(loader))
    if recipe["schedule"] == "onecycle":
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, recipe["lr"], total_steps=total,
                                                    pct_start=recipe["warmup"])
    else:
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(recipe, total))
    best = (None, 0, None)
    bar = tqdm(total=total, desc=desc, leave=False, disable=quiet, dynamic_ncols=True)
    for epoch in range(recipe["epochs"]):
        model.train()
        for batch in loader:
            losses = step(data.to_device(batch, device), opt)
            sched.step()
            bar.update(1)
            bar.set_postfix(epoch=epoch + 1, **{k: f"{v:.3f}" for k, v in losses.items()})
        if recipe.get("select") == "best_val":
            score = val(model)
            if best[2] is None or (score is not None and (best[0] is None or score > best[0])):
                best = (score, epoch, {n: p.detach().clone() for n, p in model.named_parameters()
                                       if p.requires_grad})
    bar.close()
    if best[2] is not None:
        model.load_state_dict(best[2], strict=False)  # the trained parameters of the best epoch
        tqdm.write(f"{desc}: kept epoch {best[1] + 1} of {recipe['epochs']} (best validation score)")
    return model.eval()


@torch.no_grad()
def predict(model, dataset, device, forward=lambda m, b: m(b)):
    """(logits (N, K), labels) of forward(model, batch) over a dataset: the one evaluation pass."""
    model.eval()
    out, labels = [], []
    for batch in data.make_loader(dataset, 256, shuffle=False):
        batch = data.to_device(batch, device)
        out.append(forward(model, batch).cpu())
        labels.append(batch["label"].cpu())
    return torch.cat(out), torch.cat(labels)


def task_metric(kind, logits, label, notes=None):
    """Accuracy, F1-macro (multi-label) or AUROC (binary) in %; None (reason to `notes`) where undefined."""
    why = None if len(label) else "no samples to score"
    if kind == "multilabel" and not bool((label > 0.5).any()):
        why = "F1-macro needs positive labels and the split has none"
    if kind == "binary" and len(label.unique()) < 2:
        why = "AUROC needs both classes and the split holds one"
    if why:
        return notes.append(why) if notes is not None else None
    if kind == "multilabel":
        return common.f1_scores(logits, label)["f1_macro"]
    if kind == "binary":
        return common.auroc(logits.softmax(-1)[:, 1], label)
    return common.accuracy(logits, label)


def evaluate(model, loader, device, modes=("multimodal", "audioonly", "videoonly")):
    """Accuracy (%) of each inference path of the audio-visual source model over a loader's dataset."""
    paths = {m: (lambda net, b, m=m: net(b["audio"], b["video"], m)) for m in modes}
    return {m: task_metric("single", *predict(model, loader.dataset, device, f)) for m, f in paths.items()}


def features(model, dataset, device):
    """Audio / video features (the unimodal paths CAV-MAE's contrastive loss uses) or CLIP's image / text."""
    def pair(m, b):
        if isinstance(m, common.CLIP):
            return torch.stack([m.encode_image(b["image"]), m.encode_text(b["text"])])
        z_a, z_v = m.encode(b["audio"], b["video"])
        return torch.stack([m.fuse_single(z_a, "a"), m.fuse_single(z_v, "v")])
    q, k = predict(model, dataset, device, lambda m, b: pair(m, b).transpose(0, 1))[0].unbind(1)
    return q.contiguous(), k.contiguous()


@torch.no_grad()
def paired_retrieval(feats_q, feats_k, label, batch_size=64, seed=0):
    """Top-1 retrieval (%) of each query's key in random test batches: true pairs, and keys swapped within
    a class (multi-label: the rarest genre). Chance 1 / batch_size; None with fewer samples than a batch."""
    rarity = torch.arange(1, label.shape[-1] + 1, dtype=label.dtype)  # genres: most to least frequent
    cls = label if label.dim() == 1 else (label * rarity).argmax(1)
    g = torch.Generator().manual_seed(seed)
    swap = torch.arange(len(cls))
    for k in cls.unique():
        idx = (cls == k).nonzero().flatten()
        swap[idx] = idx[torch.randperm(len(idx), generator=g)]
    order = torch.randperm(len(cls), generator=g)
    out = {"true_pairs": [], "class_shuffled": []}
    for s in range(0, len(order) - batch_size + 1, batch_size):
        b = order[s:s + batch_size]
        out["true_pairs"].append(retrieval_top1(feats_q[b], feats_k[b]))
        out["class_shuffled"].append(retrieval_top1(feats_q[b], feats_k[swap[b]]))
    return {k: 100.0 * float(np.mean(v)) if v else None for k, v in out.items()}


def linear_probe(kind, num_classes, x_train, y_train, x_test, y_test, notes=None, steps=500, lr=5e-3, seed=0):
    """task_metric of a linear head trained full-batch (AdamW) on standardised frozen features."""
    torch.manual_seed(seed)
    mean, std = x_train.mean(0), x_train.std(0).clamp_min(1e-6)
    x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
    head = torch.nn.Linear(x_train.shape[1], num_classes).to(x_train.device)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=1e-3)
    loss_fn = F.binary_cross_entropy_with_logits if kind == "multilabel" else F.cross_entropy
    for _ in range(steps):
        loss = loss_fn(head(x_train), y_train)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        return task_metric(kind, head(x_test), y_test, notes)


def format_table(blocks, notes=()):
    """{title: {row: {column: [value per seed]}}} -> mean (+/- std), n/a for None, then each reason once."""
    def cell(v):
        if not v or any(x is None for x in v):
            return "n/a" if v else "-"
        return f"{np.mean(v):5.1f}" + (f" +/- {np.std(v):3.1f}" if len(v) > 1 else "")
    lines = []
    for title, rows in [(t, r) for t, r in blocks.items() if r]:
        columns = list(dict.fromkeys(c for r in rows.values() for c in r))
        w = max(len(s) for s in [*rows, "setting"]) + 2
        cw = max(15, max(len(c) for c in columns) + 2)
        lines += ["", title, f"{'setting':<{w}}" + "".join(f"{c:>{cw}}" for c in columns)]
        lines += [f"{s:<{w}}" + "".join(f"{cell(r.get(c, [])):>{cw}}" for c in columns)
                  for s, r in rows.items()]
    return "\n".join(lines + [f"n/a: {reason}." for reason in dict.fromkeys(notes)])


# --- CAV-MAE pre-training (YuanGongND/cav-mae, class CAVMAE): 75% of each modality's tokens dropped; the
# visible ones through their encoder; the joint stream (unified block, shared norms, `norm`) feeds a light
# decoder that reconstructs every removed patch; the unified block with the _a / _v norms, mean-pooled,
# gives c_a, c_v for an InfoNCE. L = L_mae_a + L_mae_v + 0.01 L_c. Fine-tuning drops the decoder.
MASK_RATIO = 0.75  # CAV-MAE recipes: 75% of the tokens of each modality removed
CONTRAST_TAU = 0.05  # fixed temperature of the contrastive loss
MAE_WEIGHT, CONTRAST_WEIGHT = 1.0, 0.01  # every released recipe (run_cavmae_pretrain_base.sh)


class CAVMAEDecoder(nn.Module):
    """CAV-MAE's pre-training decoder (keys as published: decoder_embed, mask_token, decoder_blocks, ...)."""

    def __init__(self, config="tiny"):
        super().__init__()
        c = common.CONFIGS[config]
        D, d, p = c["embed_dim"], c["decoder_dim"], c["patch_size"]
        grid_a, grid_v = (c["mel_bins"] // p, c["audio_length"] // p), (c["image_size"] // p,) * 2
        self.decoder_embed = nn.Linear(D, d)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, d))
        self.decoder_modality_a = nn.Parameter(torch.zeros(1, 1, d))
        self.decoder_modality_v = nn.Parameter(torch.zeros(1, 1, d))
        self.decoder_pos_embed_a = nn.Parameter(common.sincos_pos_embed(d, *grid_a), requires_grad=False)
        self.decoder_pos_embed_v = nn.Parameter(common.sincos_pos_embed(d, *grid_v), requires_grad=False)
        self.decoder_blocks = nn.ModuleList([common.Block(d, c["decoder_heads"], c["mlp_ratio"])
                                             for _ in range(c["decoder_depth"])])
        self.decoder_norm = nn.LayerNorm(d)
        self.decoder_pred_a = nn.Linear(d, p * p * 1)
        self.decoder_pred_v = nn.Linear(d, p * p * 3)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        for t in (self.mask_token, self.decoder_modality_a, self.decoder_modality_v):
            nn.init.normal_(t, std=0.02)

    def forward(self, latent, n_vis_a, ids_restore_a, ids_restore_v):
        """latent (B, n_vis_a + n_vis_v, D), the joint stream's visible tokens [audio; video] -> predicted
        patches of every position: audio (B, N_a, p*p), video (B, N_v, p*p*3)."""
        x = self.decoder_embed(latent)  # (B, n_vis, d)
        B, _, d = x.shape

        def unshuffle(vis, ids_restore):  # append mask tokens, put every token back in its place
            full = torch.cat([vis, self.mask_token.expand(B, ids_restore.shape[1] - vis.shape[1], d)], dim=1)
            return full.gather(1, ids_restore.unsqueeze(-1).expand(-1, -1, d))
        x_a = unshuffle(x[:, :n_vis_a], ids_restore_a) + self.decoder_pos_embed_a + self.decoder_modality_a
        x_v = unshuffle(x[:, n_vis_a:], ids_restore_v) + self.decoder_pos_embed_v + self.decoder_modality_v
        x = self.decoder_norm(common.CAVMAE.run_blocks(self.decoder_blocks, torch.cat([x_a, x_v], dim=1)))
        n_a = x_a.shape[1]
        return self.decoder_pred_a(x[:, :n_a]), self.decoder_pred_v(x[:, n_a:])


def random_masking(x, mask_ratio, generator=None):
    """MAE's per-sample random token dropping. x (B, N, D) -> visible (B, keep, D), keep = int(N (1 -
    mask_ratio)); mask (B, N), 1 = removed; ids_restore (B, N) that un-shuffles [visible; removed]."""
    B, N, D = x.shape
    keep = int(N * (1 - mask_ratio))
    noise = torch.rand(B, N, generator=generator, device="cpu").to(x.device)  # (B, N)
    ids_shuffle = noise.argsort(dim=1)  # ascending: the first `keep` are kept
    ids_restore = ids_shuffle.argsort(dim=1)
    visible = x.gather(1, ids_shuffle[:, :keep].unsqueeze(-1).expand(-1, -1, D))
    mask = torch.ones(B, N, device=x.device, dtype=x.dtype)
    mask[:, :keep] = 0
    return visible, mask.gather(1, ids_restore), ids_restore


def patchify(x, p):
    """(B, C, H, W) -> (B, H/p * W/p, p*p*C): row-major patches, each ordered (row, col, channel) as MAE's."""
    B, C, H, W = x.shape
    x = x.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 3, 5, 1)  # (B, H/p, W/p, p, p, C)
    return x.reshape(B, (H // p) * (W // p), p * p * C)


def mae_loss(pred, target, mask, norm_pix=True):
    """Per-patch mean squared error, averaged over the removed patches (mask (B, N), 1 = removed). pred,
    target (B, N, P); norm_pix: targets (t - mean) / sqrt(var + 1e-6) per patch (CAV-MAE's norm_pix_loss)."""
    if norm_pix:
        mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1e-6) ** 0.5
    per_patch = ((pred - target) ** 2).mean(dim=-1)  # (B, N)
    return (per_patch * mask).sum() / mask.sum()


def contrastive_loss(c_a, c_v, tau=CONTRAST_TAU):
    """InfoNCE, S_ij = cos(c_a_i, c_v_j) / tau, each video j picks its audio: -mean_j log softmax_i(S)_jj."""
    sim = F.normalize(c_a, dim=-1) @ F.normalize(c_v, dim=-1).t() / tau  # (B, B): rows audio, columns video
    return F.cross_entropy(sim.t(), torch.arange(len(sim), device=sim.device))


def pretrain_losses(model, decoder, audio, video, generator=None, mask_ratio=MASK_RATIO):
    """audio (B, T, F), video (B, 3, H, W) -> {'mae_a', 'mae_v', 'contrastive', 'loss' (weighted total)}."""
    p = model.patch_embed_a.proj.kernel_size[0]
    vis_a, mask_a, restore_a = random_masking(model.embed_audio(audio), mask_ratio, generator)  # (B, n_a, D)
    vis_v, mask_v, restore_v = random_masking(model.embed_video(video), mask_ratio, generator)  # (B, n_v, D)
    z_a = model.run_blocks(model.blocks_a, vis_a)
    z_v = model.run_blocks(model.blocks_v, vis_v)
    x = model.run_blocks(model.blocks_u, torch.cat([z_a, z_v], dim=1))  # the joint stream, shared norms
    pred_a, pred_v = decoder(model.norm(x), z_a.shape[1], restore_a, restore_v)
    loss_mae_a = mae_loss(pred_a, patchify(audio.unsqueeze(1).transpose(2, 3), p), mask_a)
    loss_mae_v = mae_loss(pred_v, patchify(video, p), mask_v)
    loss_c = contrastive_loss(model.fuse_single(z_a, "a"), model.fuse_single(z_v, "v"))
    loss = MAE_WEIGHT * (loss_mae_a + loss_mae_v) + CONTRAST_WEIGHT * loss_c
    return {"mae_a": loss_mae_a, "mae_v": loss_mae_v, "contrastive": loss_c, "loss": loss}


@torch.no_grad()
def retrieval_top1(c_a, c_v):
    """Top-1 retrieval within one batch: fraction of i with argmax_j cos(c_a_i, c_v_j) = i."""
    sim = F.normalize(c_a, dim=-1) @ F.normalize(c_v, dim=-1).t()
    return (sim.argmax(dim=1) == torch.arange(len(sim), device=sim.device)).float().mean().item()


def pretrain(model, train_set, args, device, quiet=False):
    """CAV-MAE pre-training of `model`'s encoder on `train_set` (labels unused); returns the decoder."""
    decoder = CAVMAEDecoder(model.config).to(device)
    for p in (model.pos_embed_a, model.pos_embed_v):
        p.requires_grad_(False)  # CAV-MAE: fixed sin-cos position embeddings during pre-training
    params = [p for p in list(model.parameters()) + list(decoder.parameters()) if p.requires_grad]
    epochs = PRETRAIN["epochs"] if args.pretrain_epochs is None else args.pretrain_epochs
    g = torch.Generator().manual_seed(args.seed)

    def step(batch, opt):
        losses = pretrain_losses(model, decoder, batch["audio"], batch["video"], generator=g)
        opt.zero_grad(set_to_none=True)
        losses["loss"].backward()
        opt.step()
        return {k: losses[k].item() for k in ("mae_a", "mae_v", "contrastive")}
    loader = data.make_loader(train_set, PRETRAIN["batch_size"], shuffle=True, seed=args.seed)
    train_loop(model, params, loader, dict(PRETRAIN, epochs=epochs), step, device, "pre-train", quiet=quiet)
    for p in (model.pos_embed_a, model.pos_embed_v):
        p.requires_grad_(True)  # fine-tuning trains them (CAVMAEFT's tr_pos=True)
    return decoder


def train_source(args, quiet=False):
    """Pre-train (CAV-MAE) and fine-tune the source model on clean data: cross-entropy on the fused logits +
    0.5 x (audio-only + video-only cross-entropy), the unimodal paths the methods use; save it."""
    device = common.get_device(args.device)
    common.seed_everything(args.seed)
    t0 = time.time()
    k = len(data.read_label_csv(args.label_csv)) if args.data == "read" else data.EMBEDDED["num_classes"]
    model = common.CAVMAE(args.config, k)  # K classes
    sets = splits(args, model, None, ("train", "test"))[0]
    model.to(device)
    metrics, test = {}, sets.get("test")

    def retrieval():
        return paired_retrieval(*features(model, test, device), test.fields["label"])
    if args.pretrain_epochs != 0:
        pretrain(model, sets["train"], args, device, quiet)
        if isinstance(test, data.AVTensors):
            metrics["retrieval_pretrained"] = retrieval()
    recipe = dict(FINETUNE, **overrides(args))

    def step(batch, opt):
        z_a, z_v = model.encode(batch["audio"], batch["video"])
        y = batch["label"]
        loss_av = F.cross_entropy(model.classify(model.fuse(z_a, z_v)), y)
        loss_a = F.cross_entropy(model.classify(model.fuse_single(z_a, "a")), y)
        loss_v = F.cross_entropy(model.classify(model.fuse_single(z_v, "v")), y)
        loss = loss_av + 0.5 * (loss_a + loss_v)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return {"loss": loss.item()}
    loader = data.make_loader(sets["train"], recipe["batch_size"], shuffle=True, seed=args.seed)
    train_loop(model, model.parameters(), loader, recipe, step, device, "fine-tuning", quiet=quiet)
    if test is not None:
        metrics.update(evaluate(model, data.make_loader(test, 256, shuffle=False), device))
    if isinstance(test, data.AVTensors):
        metrics["retrieval_finetuned"] = retrieval()
    metrics["train_seconds"] = time.time() - t0
    out = args.out or default_checkpoint(args.data, args.config)
    common.save_checkpoint(out, model, data=args.data, data_seed=args.data_seed, seed=args.seed,
                           metrics=metrics, benchmark=data.embedded_id() if args.data == "embedded" else None)
    default = out == default_checkpoint(args.data, args.config)
    results = (os.path.join(RESULTS_DIR, "train_source") if default else os.path.splitext(out)[0]) + ".json"
    common.write_json(results, {"args": vars(args), "checkpoint": out, "clean_accuracy": metrics})
    if not quiet:  # accuracy of each path; audio -> video retrieval in test batches of 64 (chance 1.6%)
        shown = {k: v for k, v in metrics.items() if k in ("multimodal", "audioonly", "videoonly")}
        shown.update({f"{k} {p}": r[p] for k, r in metrics.items() if k.startswith("retrieval") for p in r})
        print(format_table({"clean test (%)": {k: {"%": [v]} for k, v in shown.items()}}))
        print(f"saved {out} ({metrics['train_seconds']:.0f} s)")
    return model, metrics


def train_clip(config="tiny", data_seed=0, seed=0, device="cpu", epochs=None, out=None, quiet=False):
    """CLIP pre-training (symmetric InfoNCE) on the training pairs of the three embedded tasks; saved."""
    common.seed_everything(seed)
    tokenizer = data.embedded_tokenizer()
    model = common.CLIP(config, vocab_size=tokenizer.vocab_size).to(device)
    sets = [data.embedded_image_text_split(t, "train", model.image_size, model.context_length, tokenizer,
                                           seed=data_seed) for t in data.IT_TASKS]
    pairs = data.AVTensors({k: torch.cat([s.fields[k] for s in sets]) for k in ("image", "text")}
                           | {"label": torch.zeros(sum(len(s) for s in sets))})
    t0 = time.time()
    recipe = dict(CLIP_PRETRAIN, epochs=CLIP_PRETRAIN["epochs"] if epochs is None else epochs)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embedding" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embedding" not in n)]

    def step(batch, opt):
        loss = common.clip_loss(model(batch["image"], batch["text"]))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(max=math.log(common.CLIP_MAX_LOGIT_SCALE))
        return {"loss": loss.item(), "T": 1 / model.logit_scale.exp().item()}
    groups = [{"params": decay, "weight_decay": recipe["weight_decay"]}, {"params": rest, "weight_decay": 0}]
    loader = data.make_loader(pairs, recipe["batch_size"], shuffle=True, seed=seed)
    train_loop(model, groups, loader, recipe, step, device, "CLIP pre-training", quiet=quiet)
    out = out or default_checkpoint("clip_embedded", config)
    meta = dict(data="embedded-image-text", data_seed=data_seed, seed=seed, benchmark=data.it_embedded_id(),
                pretrain_seconds=time.time() - t0)
    common.save_checkpoint(out, model, **meta)
    if not quiet:
        print(f"saved {out} ({meta['pretrain_seconds']:.0f} s of pre-training)")
    return model, meta


def default_source(config="tiny", data_seed=0, device="cpu", image_text=False):
    """The default backbone, checkpoints/[clip_]embedded_<config>.pt, trained first when it is unreadable or
    made on another version of its benchmark (one of another --data-seed is kept: the caller refuses it)."""
    path = default_checkpoint("clip_embedded" if image_text else "embedded", config)
    try:
        model, meta = common.load_checkpoint(path, device=device)
        made = data.it_embedded_id() if image_text else data.embedded_id()
        common.need(meta.get("benchmark") == made, f"{path} was made on another version of the benchmark.")
        return model, meta
    except common.Refusal as e:
        print(f"{e} Training it now (minutes on a CPU).")
    if image_text:
        train_clip(config, data_seed, device=device, out=path)
    else:
        train_source(build_parser().parse_args(["--config", config, "--device", str(device), "--out", path,
                                                "--data-seed", str(data_seed)]))
    model, meta = common.load_checkpoint(path, device=device)
    return model, {**meta, "trained_now": True}


def check_data_seed(path, meta, data_seed):
    """Refuse a backbone made on another seed or version of its embedded benchmark (its splits differ)."""
    made = {"embedded": data.embedded_id, "embedded-image-text": data.it_embedded_id}.get(meta.get("data"))
    name, seed = os.path.basename(path), meta.get("data_seed")
    common.need(made is None or seed == data_seed, f"{name} was trained on the embedded benchmark with "
                f"--data-seed {seed}, not {data_seed}; pass --data-seed {seed} or a checkpoint of that seed.")
    common.need(made is None or meta.get("benchmark") == made(), f"{name} was trained on another version of "
                f"the embedded benchmark ({meta.get('benchmark')}); train it again with train.py.")


def backbone(args, device):
    """The frozen backbone of --data (--checkpoint, or the default one) and its tokenizer."""
    image_text = args.data in IT_DATA
    bpe = "--checkpoint ViT-B-16.pt --config base --bpe bpe_simple_vocab_16e6.txt.gz"
    if args.checkpoint:
        model, meta = common.load_checkpoint(args.checkpoint, config=args.config, device=device)
    else:
        common.need(not image_text or args.config != "base" and args.data in IMAGE_TEXT_DATA, f"--data "
                    f"{args.data} --config {args.config} needs OpenAI's CLIP ViT-B/16: pass {bpe}.")
        model, meta = default_source(args.config, args.data_seed, device, image_text)
    check_data_seed(args.checkpoint or "the default backbone", meta, args.data_seed)
    common.need(isinstance(model, common.CLIP) == image_text, f"{args.checkpoint} is not a "
                f"{'CLIP' if image_text else 'CAV-MAE'} model; pass one for --data {args.data}.")
    if not image_text:
        n = len(data.read_label_csv(args.label_csv)) if args.data == "read" else data.EMBEDDED["num_classes"]
        common.need(model.num_classes == n, f"{args.checkpoint} has {model.num_classes} classes but the data "
                    f"has {n}; use the source model trained on this dataset.")
        return model, None
    if meta.get("data") == "embedded-image-text":
        common.need(args.data in IMAGE_TEXT_DATA, f"{args.checkpoint} knows the embedded benchmark's words "
                    f"only; pass the published CLIP ({bpe}).")
        return model, data.embedded_tokenizer()
    common.need(args.bpe, f"{args.checkpoint} is not one of this project's CLIP checkpoints, so its texts "
                f"need CLIP's BPE vocabulary: pass --bpe bpe_simple_vocab_16e6.txt.gz.")
    tokenizer = data.CLIPTokenizer(args.bpe)
    common.need(tokenizer.vocab_size == model.vocab_size, f"--bpe gives {tokenizer.vocab_size} tokens but "
                f"the checkpoint embeds {model.vocab_size}; use the vocabulary published with these weights.")
    return model, tokenizer


def splits(args, model, tokenizer, names):
    """({split: dataset} of --data at the backbone's input sizes, task info: kind, metric, num_classes)."""
    if args.data in ("embedded", "read"):
        info = {"kind": "single", "metric": "accuracy", "num_classes": model.num_classes}
        if args.data == "embedded":
            return {s: data.embedded_split(s, model, seed=args.data_seed) for s in names}, info
        kw = dict(mel_bins=model.mel_bins, target_length=model.audio_length, image_size=model.image_size)
        lists = {"train": args.train_json, "test": args.val_json}
        return {s: data.ReadLayoutDataset(lists[s], args.label_csv, **kw) for s in lists if lists[s]}, info
    kw = dict(image_size=model.image_size, context_length=model.context_length, tokenizer=tokenizer)
    if args.data in IMAGE_TEXT_DATA:
        return {s: data.embedded_image_text_split(args.data, s, seed=args.data_seed, **kw) for s in names}, \
            data.IT_TASKS[args.data]
    return {s: data.image_text_split(args.data, args.data_root, s, **kw) for s in names}, \
        data.IMAGE_TEXT_TASKS[args.data]


def modality_probes(model, kind, num_classes, train_set, test_set, device, seed=0, notes=None):
    """The frozen CLIP's linear probes (image, text, both concatenated) trained on train_set and scored on
    test_set with the task's metric, and its image -> text retrieval on test_set."""
    (i_tr, t_tr), (i_te, t_te) = features(model, train_set, device), features(model, test_set, device)
    y_tr, y_te = [s.fields["label"] if isinstance(s, data.AVTensors) else s.labels
                  for s in (train_set, test_set)]
    r = {m: linear_probe(kind, num_classes, a, y_tr, b, y_te, notes, seed=seed)
         for m, a, b in (("image", i_tr, i_te), ("text", t_tr, t_te),
                         ("both", torch.cat([i_tr, t_tr], 1), torch.cat([i_te, t_te], 1)))}
    return {**r, "retrieval": paired_retrieval(i_te, t_te, y_te)}


def image_text_source(args):
    """`train.py --data food`: the frozen CLIP's linear probe per modality (and both) and its retrieval."""
    device, notes = common.get_device(args.device), []
    model, tokenizer = backbone(args, device)
    sets, info = splits(args, model, tokenizer, ("train", "test"))
    r = modality_probes(model, info["kind"], info["num_classes"], sets["train"], sets["test"], device,
                        args.seed, notes)
    ret = r["retrieval"]
    if ret["true_pairs"] is None:
        notes.append("retrieval needs a test batch of 64 samples and the split has fewer")
    shown = {m: r[m] for m in ("image", "text", "both")} | {f"image -> text, {k}": v for k, v in ret.items()}
    print(format_table({f"linear probes (test {info['metric']} %); top-1 retrieval in test batches of 64 (%; "
                        f"chance 1.6)": {k: {"%": [v]} for k, v in shown.items()}}, notes))
    out, path = results_path(args), args.checkpoint or default_checkpoint("clip_embedded", args.config)
    common.write_json(out, {"args": vars(args), "checkpoint": path, "metric": info["metric"], **r})
    print(f"wrote {out}")
    return r


def map_setting(kind, rate):
    """'missing-both 70% (image/text 65/65% available)': MAP's name and CMPT's (image, text) availability."""
    avail = {"text": (100, 100 * (1 - rate)), "image": (100 * (1 - rate), 100),
             "both": (100 * (1 - rate / 2), 100 * (1 - rate / 2))}[kind]
    return f"missing-{kind} {100 * rate:g}% (image/text {avail[0]:g}/{avail[1]:g}% available)"


def map_has(args, image_text, split, dataset, kind, seed):
    """{modality: (n,) has} of MAP's protocol: audio-video drawn with the run's seed (test + 1, val + 2);
    image-text MAP's table, drawn once (--table-seed) into missing_tables/ and read by every run."""
    if not image_text:
        n, offset = len(dataset), {"train": 0, "test": 1, "val": 2}[split]
        return data.missing_masks(n, data.cmpt_counts(kind, args.map_rate, n), seed + offset)
    ids = dataset.ids if isinstance(dataset, data.ImageTextFiles) else \
        [f"{data.it_embedded_id()}-seed{args.data_seed}-{args.data}-{split}-{i}" for i in range(len(dataset))]
    folder = os.path.join(os.path.dirname(os.path.abspath(results_path(args))), "missing_tables")
    path = data.missing_table_path(folder, args.data, split, kind, args.map_rate, args.table_seed)
    return data.load_or_make_missing_table(path, ids, kind, args.map_rate, args.table_seed)


def inference_settings(args, image_text, n, seed):
    """CMPT's protocol, [(setting, has)]: complete, then x% of one modality missing (Fig. 3) or Fig. 2's."""
    modalities = ("image", "text") if image_text else ("audio", "video")

    def has(*absent):
        return {m: torch.full((n,), m not in absent) for m in modalities}
    if not image_text:
        return [("complete (0% missing)", has())] + [
            (f"{m} {r}% missing", data.missing_masks(n, data.cmpt_counts(m, r / 100, n), seed))
            for m in modalities for r in INFERENCE_RATES]
    return [("complete (both)", has()), ("text only (image 100% missing)", has("image")),
            ("image only (text 100% missing)", has("text"))] + [
        (f"image 100%, text {a}% available",
         data.missing_masks(n, data.map_counts("text", 1 - a / 100, n), args.table_seed))
        for a in INFERENCE_RATES[:-1]]  # CMPT Fig. 2: every image there, 10 .. 90% of the texts


def overrides(args):
    return {k: getattr(args, k) for k in ("epochs", "lr", "batch_size") if getattr(args, k)}


def method_recipe(module, args, kind, variant):
    """The method's recipe for --data, a missing kind and a variant, with --epochs / --lr / --batch-size."""
    if hasattr(module, "recipe"):
        return {**module.recipe(args.data, args.recipe == "paper", kind, variant), **overrides(args)}
    name = args.recipe if args.data in IT_DATA else "audio-video" + "-paper" * (args.recipe == "paper")
    common.need(name in module.RECIPES, "no paper recipe for audio-video data here; pass --recipe embedded.")
    return {**module.RECIPES[name], **overrides(args)}


def fit(module, variant, bb, sets, info, recipe, device, seed, desc, blank, val_has=None):
    """One variant on a frozen copy of the backbone, trained on sets['train'] (best epoch on sets['val'])."""
    common.seed_everything(seed)
    kw = {**{k: recipe[k] for k in ("prompt_len",) if k in recipe}, **module.VARIANTS[variant]}
    model = module.build(copy.deepcopy(bb).requires_grad_(False).eval(), info["num_classes"], **kw).to(device)
    if hasattr(module, "prepare"):  # AOEPT: memory collect + K-means (K at most the recipe's n_clusters)
        loader = data.make_loader(sets["train"], 256, shuffle=False)
        module.prepare(model, loader, device, recipe["n_clusters"])
    loader = data.make_loader(sets["train"], recipe["batch_size"], shuffle=True, seed=seed)
    val = None
    if recipe.get("select") == "best_val":  # the paper recipes: data with a validation split
        val_set = data.with_missing(sets["val"], val_has, blank)

        def val(m):
            return task_metric(info["kind"], *predict(m, val_set, device))
    return train_loop(model, module.collect_params(model)[0], loader, recipe,
                      lambda b, opt: module.train_step(model, b, opt)[1], device, desc, val=val)


def run_missing(args):
    """Every variant of every --method on every --data and seed, in the protocols its paper reports."""
    device = common.get_device(args.device)
    modules = {m: importlib.import_module(METHODS[m]) for m in args.methods}
    names = list(dict.fromkeys(v for mod in modules.values() for v in mod.VARIANTS))
    bad = [v for v in args.variants or [] if v not in names] + [None]
    common.need(bad[0] is None, f"unknown variant {bad[0]!r}; choose from {', '.join(names)}.")
    protocols = {m: [p for p in mod.PROTOCOLS if p in args.protocols] for m, mod in modules.items()}
    common.need(any(protocols.values()), f"{' / '.join(modules)} report(s) only the protocol(s) "
                f"{', '.join(sorted({p for mod in modules.values() for p in mod.PROTOCOLS}))}; pass those.")
    rows, notes, metrics, t_start = {}, [], {}, time.time()
    for task in args.tasks:
        args.data = task
        bb, tokenizer = backbone(args, device)
        image_text = isinstance(bb, common.CLIP)
        sets, info = splits(args, bb, tokenizer, ("train", "test") + ("val",) * (args.recipe == "paper"))
        metrics[task], sample = info["metric"], sets["test"][0]
        kinds = ("text", "image", "both") if image_text else ("audio", "video", "both")
        complete = {s: dict.fromkeys(bb.modalities, torch.ones(len(d), dtype=bool)) for s, d in sets.items()}
        for seed, (m, mod) in [(seed, item) for seed in args.seeds for item in modules.items()]:
            defaults = mod.DEFAULT_VARIANTS  # cmpt: per setting; aoept (image-text only): one tuple
            if isinstance(defaults, dict):
                defaults = defaults["image-text" if image_text else "audio-video"]
            for variant in [v for v in args.variants or defaults if v in mod.VARIANTS]:
                blank = {k: torch.zeros_like(sample[k]) for k in bb.modalities}
                if image_text:  # the tokenised "" for a text, the method's (or variant's) placeholder image
                    placeholder = mod.VARIANTS[variant].get("image_placeholder", mod.IMAGE_PLACEHOLDER)
                    blank = {"image": data.image_placeholder(placeholder, sample["image"].shape),
                             "text": tokenizer([""], bb.context_length)[0]}
                runs = [("inference", "both", complete)] if "inference" in protocols[m] else []
                runs += [("map", k, {s: map_has(args, image_text, s, ds, k, seed) for s, ds in sets.items()})
                         for k in kinds if "map" in protocols[m]]
                for protocol, kind, has in runs:
                    desc = f"{task} {variant} {'complete' if protocol == 'inference' else kind} seed {seed}"
                    train_sets = dict(sets, train=data.with_missing(sets["train"], has["train"], blank))
                    model = fit(mod, variant, bb, train_sets, info, method_recipe(mod, args, kind, variant),
                                device, seed, desc, blank, has.get("val"))
                    name = map_setting(kind, args.map_rate) if image_text else \
                        f"missing-{kind} {round(args.map_rate * 100)}%"
                    settings = inference_settings(args, image_text, len(sets["test"]), seed) \
                        if protocol == "inference" else [(name, has["test"])]
                    for setting, test_has in settings:
                        test_set = data.with_missing(sets["test"], test_has, blank)
                        value = task_metric(info["kind"], *predict(model, test_set, device), notes)
                        rows.setdefault((task, protocol, setting), {}).setdefault(variant, []).append(value)
                        tqdm.write(f"[{desc}] {setting}: {info['metric']} {value}")
    titles, blocks = {"map": "MAP protocol: the same missing data in training and test",
                      "inference": "trained on complete data, modality missing at test"}, {}
    for (task, protocol, setting), values in rows.items():
        blocks.setdefault(f"{task} ({metrics[task]} %), {titles[protocol]}", {})[setting] = values
    print(format_table(blocks, notes))
    wall = time.time() - t_start
    print(f"wall time {wall / 60:.1f} min, {len(args.seeds)} seed(s), recipe {args.recipe}")
    results = [{"task": t, "metric": metrics[t], "protocol": p, "setting": s, "values": v}
               for (t, p, s), v in rows.items()]
    common.write_json(results_path(args), {"args": vars(args), "wall_seconds": wall, "results": results})
    print(f"wrote {results_path(args)}")
    return rows


def results_path(args):
    """--results, else results/source_<data>[_<checkpoint>].json or train_<methods>[_<tasks>].json."""
    if args.results:
        return args.results
    if args.method == "source":
        name = f"_{os.path.splitext(os.path.basename(args.checkpoint))[0]}" if args.checkpoint else ""
        return os.path.join(RESULTS_DIR, f"source_{args.data}{name}.json")
    tasks = [t for t in args.tasks if t not in ("embedded", "read")]
    return os.path.join(RESULTS_DIR, "_".join(["train"] + args.methods + tasks) + ".json")


def bounded(cast, low, high=math.inf, open_low=False):
    """An argparse type: cast(text), within [low, high] ((low, high] with open_low)."""
    def parse(text):
        value = cast(text)
        if not ((value > low if open_low else value >= low) and value <= high):
            raise argparse.ArgumentTypeError(f"{text} is not in {'(' if open_low else '['}{low:g}, {high:g}]")
        return value
    return parse


positive_int, non_negative_int, seed_int = bounded(int, 1), bounded(int, 0), bounded(int, 0, 2 ** 32 - 1)
positive_float, fraction = bounded(float, 0, open_low=True), bounded(float, 0, 1, open_low=True)


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = p.add_argument
    add("--method", default="source", nargs="+", choices=["source", *METHODS],
        help="source: train (image-text: report) the backbone; cmpt / aoept, or both (default: source)")
    add("--data", default="embedded", nargs="+", choices=["embedded", "read", *IT_DATA],
        help="the embedded benchmark, READ's layout, image-text tasks, embedded or real (default: embedded)")
    add("--recipe", choices=["embedded", "paper"], help="cmpt / aoept: the short CPU budget or the paper's "
        "(default: paper when --data-root names a real dataset, else embedded)")
    add("--config", choices=sorted(set(common.CONFIGS) | set(common.CLIP_CONFIGS)),
        help="model size, base = the published CAV-MAE / CLIP (default: tiny; with --checkpoint, its own)")
    add("--epochs", type=positive_int, help=f"epochs (default: source {FINETUNE['epochs']}; the method's)")
    add("--pretrain-epochs", type=non_negative_int, help=f"pre-training (default: {PRETRAIN['epochs']})")
    add("--lr", type=positive_float, help=f"peak lr (default: source {FINETUNE['lr']:g}; the method's)")
    add("--batch-size", type=positive_int, help=f"batch (default: source {FINETUNE['batch_size']}; method's)")
    add("--seed", type=seed_int, default=0, help="seed of the source training run (default: 0)")
    add("--seeds", type=seed_int, nargs="+", default=[1, 2, 3], help="method seeds (default: 1 2 3)")
    add("--data-seed", type=seed_int, default=0, help="seed of the embedded benchmarks (default: 0)")
    add("--out", help="source: the checkpoint to save (default: checkpoints/<data>_<config>.pt)")
    add("--checkpoint", help="the backbone (default: checkpoints/[clip_]embedded_<config>.pt, or made)")
    add("--results", help="results JSON (default: results/train_<methods>[_<tasks>].json or source_<data>)")
    add("--variants", nargs="+", help="cmpt / aoept: only these variants (default: the paper's columns)")
    add("--protocols", nargs="+", default=["inference", "map"], choices=["inference", "map"],
        help="cmpt / aoept: the protocols to run, of those the paper reports (default: inference map)")
    add("--map-rate", type=fraction, default=0.7, help="MAP protocol's missing rate (default: 0.7)")
    add("--table-seed", type=seed_int, default=0, help="image-text: seed of the missing tables (default: 0)")
    add("--train-json", help="--data read: the training list (required)")
    add("--val-json", help="--data read: the list to report accuracy on; cmpt / aoept's test list (required)")
    add("--label-csv", help="--data read: class_labels_indices CSV, indices 0..K-1 (required)")
    add("--data-root", help="--data mmimdb | food101 | hatememes: the dataset's raw folder (required)")
    add("--bpe", help="the published CLIP's BPE vocabulary bpe_simple_vocab_16e6.txt.gz (default: none)")
    add("--device", help="cpu, cuda, cuda:1 (default: cuda if available, else cpu)")
    return p


def check_args(args):
    """Fill in the lists and defaults; refuse, before any work, flags that contradict each other."""
    args.methods, args.tasks = [list(dict.fromkeys([v] if isinstance(v, str) else v))
                                for v in (args.method, args.data)]
    args.method, args.data = args.methods[0], args.tasks[0]
    image_text = [t in IT_DATA for t in args.tasks]
    need = common.need
    need("source" not in args.methods or len(args.methods) == len(args.tasks) == 1, "--method source takes "
         "one --data; several names run the missing-modality tables, e.g. --method cmpt aoept --data food.")
    need(len(args.tasks) == 1 or all(image_text) and not args.checkpoint, "several --data names run the "
         "image-text tables only, each with its default backbone (--checkpoint holds one).")
    need(len(set(args.seeds)) == len(args.seeds), "--seeds repeats a seed; give each seed once.")
    need(bool(args.data_root) == (args.data in REAL_IMAGE_TEXT), "--data-root is needed by, and only by, "
         "--data mmimdb | food101 | hatememes: the dataset's folder in its raw layout.")
    need(args.method == "source" or not args.out, "--out is where source training saves its checkpoint; with "
         "cmpt / aoept pass the backbone as --checkpoint and the results file as --results.")
    if args.data == "read":
        method_lists = args.method == "source" or args.val_json and args.checkpoint
        need(args.train_json and args.label_csv and method_lists, "--data read needs --train-json and "
             "--label-csv, and with cmpt / aoept --val-json and --checkpoint.")
        data.read_label_csv(args.label_csv)  # a wrong CSV is named now, not after the data work
    if args.bpe:
        data.check_input_file(args.bpe, "--bpe", "pass CLIP's bpe_simple_vocab_16e6.txt.gz.")
    args.recipe = args.recipe or ("paper" if args.data_root else "embedded")
    source_av = args.method == "source" and not any(image_text)
    if not args.checkpoint or source_av:
        args.config = args.config or "tiny"  # else the checkpoint's own
    out = args.out or default_checkpoint(args.data, args.config) if source_av else results_path(args)
    common.check_output_file(out, "--out" if source_av else "--results")


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        common.get_device(args.device)
        check_args(args)
        if args.method != "source":
            run_missing(args)
        elif args.data in IT_DATA:
            image_text_source(args)
        else:
            train_source(args)
    except (common.Refusal, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        sys.exit("interrupted: every file written so far is whole; nothing else was saved.")


if __name__ == "__main__":
    main()
