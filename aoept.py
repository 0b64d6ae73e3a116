"""AOEPT: Modal-Contextualized Prompts for modality-missing prompt tuning, and a MAP-style baseline.

Lang, Hong, Zhong, Zhou. "AOEPT: Breaking the Implicit Modality-Reduction Bottleneck in
Modality-Missing Prompt Tuning", ICML 2026. arXiv 2605.24816. Public code: github.com/Jian-Lang/AOEPT
(`core/model/AOEPT/AOEPT_CLIP_model.py`, `core/model/AOEPT/module.py`,
`core/model/AOEPT/preprocess/cluster_tokens.py`, `core/utils/stats_utils.py`, `script/run_aoept.sh`).
The paper body was not available to us: the public code is the authority, and the comments name
the step of its pipeline (collect, distil, construct, instantiate, insert, auxiliary loss) where a
paper would give an equation number.

Idea. Missing-modality prompt methods before AOEPT (MAP, Lee et al. CVPR 2023, and its followers)
choose or build prompts from the modalities a sample HAS, so a frozen multimodal transformer fed a
sample without modality m only ever sees observed-modality information: it is confined to the
observed-modality subspace (the "implicit modality-reduction bottleneck"). AOEPT gives every
prompted layer l and modality m a Modal-Contextualized Prompt (MCP) read out of a frozen memory
C^l_m of m's features over the training data, and instantiates it per sample with a channel gate
computed from the OTHER modality, so a sample missing m still receives m-like, sample-specific
information. Here the two CAV-MAE towers (`blocks_a`, `blocks_v`) play the roles of CLIP's text and
image towers; after the prompted towers the prompts are stripped and the tokens go through the
frozen unified block (`fuse`) and a classifier head.

The three steps and the training objective (m in {a, v}, m' the other modality, h^l_m the tokens
entering block l of m's tower, prompt positions excluded):

    collect     c^l_{m,i} = mean_n h^l_{m,i,n}       frozen backbone, no prompts, training split,
                                                     l < depth, only samples i that have m
    distil      C^l_m = KMeans_K({c^l_{m,i}}_i)      (K, D) per layer, K-means, then FROZEN
    construct   P^l_m = LN_m( Attn(Q^l_m, C^l_m, C^l_m) + Q^l_m )                        (L, D)
                Attn(Q, C, C) = concat_h softmax(Q_h C_h^T / sqrt(d_h)) C_h   (no projections)
    shared      S^l_m = LN^s_m( Attn(W^l_m(Q^l_s), C^l_m, C^l_m) + W^l_m(Q^l_s) )                (L, D)
                Q^l_s (L, D/16) ONE query per layer for both modalities, W^l_m = Linear - GELU -
                Linear (D/16 -> D/16 -> D) per layer and modality, LN^s_m its own LayerNorm
    instantiate g^l_{m,i} = sigmoid( MLP^l_m(c^{l-1}_{m',i}) )  if sample i has m', else 1   (D,)
                P^l_{m,i} = P^l_m * g^l_{m,i}                 (channel-wise)             (L, D)
                S^l_{m,i} = S^l_m * gs^l_{m,i}, gs from its own gate MLP^s,l_m, the same rule
    insert      h^l_m <- [S^l_{m,i}; P^l_{m,i}; h^l_m[2L:]]   at l < depth (REPLACED, not accumulated);
                after depth the prompt outputs pass through; stripped before the unified block
    auxiliary   L_aux = mean over (l < depth, m) of InfoNCE over the samples that have m between
                mean_t P^l_{m,i,t} and sg(mean_n h^{l+1}_{m,i,n}), cosine logits * exp(s), s0 = ln 100
                (the modality-specific prompts only; the shared prompts are not in L_aux)
    total       L = CE(y, head(fuse(z_a, z_v))) + 0.05 * L_aux            (backbone frozen)

MAP-style baseline (`VARIANTS["map"]`): no memory, no gate, no auxiliary loss; one learnable prompt
set per missing case, chosen per sample: P^l_{m,i} = P^l_{m, case(i)}.

Missing inputs arrive as zeros in the model-input space (zero fbank, zero normalised frame):
CMPT's placeholder for audio-visual data, adopted here (MAP feeds empty text / all-ones images).

Two backbones: `AOEPT` prompts the two CAV-MAE towers (audio-video, above); `AOEPTCLIP` is the public
code's CLIP path (image-text, the paper's tables): prompts in front of the text tokens and in front of
the image class token, the same collect / distil / construct / instantiate / insert / auxiliary steps,
the frozen CLIP's own pooling after the prompts are stripped (class token, end-of-text token, each
through its final LayerNorm and projection) and a new head Linear(2 E -> C) on the two embeddings
concatenated; what trains besides the prompts is as in the public code (CLIP's two projections and
final LayerNorms too). Its per-dataset settings (prompt length, lr, weight decay, K) are the public
CLIP configs (PUBLIC_CLIP_CONFIGS). A missing image is a black image, a missing text the empty string.
MAP on CLIP (`IMAGE_TEXT_VARIANTS["map"]`) is MAP's own scheme: one prompt set of 16 tokens per missing
case, at each of the first half of the layers, each layer's prompts prepended in front of the earlier
ones (they accumulate), no memory, no gate, no auxiliary loss, the same frozen CLIP and head.

Deviations (each is a `# DEVIATION:` line below; the public code is the reference):
  1. Gate source: the public CLIP code runs text layer i before vision layer i, so the vision gate
     reads the text tower AFTER layer i while the text gate reads the vision tower after layer
     i-1; we use the previous layer for both towers (the symmetric rule of the spec).
  2. Shared prompts (the public code's default, `use_shared_prompt` True; `VARIANTS["aoept"]`, on
     here too; `VARIANTS["no_shared"]` leaves them out): as in the public code, except that its
     bottleneck width is the TEXT width / reduction for both modalities, and ours is D / 16 (the
     two CAV-MAE towers have the same width D).
  3. Head: the public code trains a fresh linear classifier on CLIP's two projections and also
     trains CLIP's final LayerNorms and projections; CAV-MAE has a head trained for this task,
     `mlp_head` (LayerNorm + Linear), so we fine-tune a copy of it (source-initialised); the
     unified block and its `norm` stay frozen.
  4. K: the public script asks for K = 256 centres (capped at n); with ~900-3,000 samples at width
     64 we use K = min(256, n // 8), at least 1.
  5. K-means: sklearn's KMeans (greedy k-means++, n_init 10, max_iter 300, tol 1e-4) becomes a torch
     Lloyd's K-means with plain k-means++ seeding and the same n_init / max_iter / tol rule; an
     empty cluster keeps its centre (sklearn moves it to a far point).
  6. Schedule: train.py's AdamW + OneCycleLR (10% warm-up from lr/25, cosine down to ~0) stands in
     for the public code's cosine decay with 10% linear warm-up; no early stopping on a
     validation split (the public trainer keeps the best validation epoch).
  7. Budget: 20 epochs at batch 128 in the yamls; 3 epochs at batch 32 here (~140 steps), so one
     run takes ~5-10 s on a CPU.
  8. Depth: the yamls prompt 4 of CLIP's 12 layers; the tiny towers have 3 blocks, we prompt 2.
  9. MAP-style baseline: MAP (ViLT) prepends input-level prompts that accumulate across layers and
     has no memory, gate or auxiliary loss; ours keeps AOEPT's insertion (replaced at each of the
     first `depth` layers, stripped) so that the comparison isolates memory + gate + auxiliary
     loss. Four missing cases (complete, no audio, no video, neither); the last never occurs in
     MAP's protocol.

 10. CLIP: the public code stretches the text position embeddings (bilinear, 77 -> 77 + prompt length) so
     that the prompts get positions; here the prompts have none and every text token keeps CLIP's own
     position (the frozen tower sees its tokens as it was trained on them); the prompts are in front, so
     under CLIP's causal mask every text token sees them.
 11. CLIP: the tiny CLIP has 4 layers per tower; prompting all 4 (the configs' depth 4 of ViT-B/16's 12)
     would leave none after the prompted ones, so the tiny model prompts its first 2 (TINY_CLIP_DEPTH);
     ViT-B/16 (12 layers) gets the configs' 4. MAP prompts the first half (6 of ViLT's 12; 2 of 4 here).
 12. CLIP budget: 2 epochs of batch 32 (126 steps on the 2,000 embedded training pairs) for the public
     configs' 20 epochs of batch 128 (IMAGE_TEXT); K = min(config's K, n // 8) as in Deviation 4.
 13. CLIP: a missing image is the public code's black image (0 before normalisation); the paper's
     all-ones image (after normalisation, MAP's) is the `ones_image` variant.
 14. CLIP, text means (the gate source, the features of L_aux, collect): over t_0 .. t_eot, the padding
     after the end-of-text token excluded, and after all 2L prompt positions; the public code averages
     every position after its prompts, padding included (and skips only L positions for the layer-0
     text gate when the shared prompts are on).
 15. MAP on CLIP (`map`): MAP's ViLT is one stream with one prompt set per case; on the dual encoder each
     tower gets its own set per case. It is trained with AOEPT's recipe for the same (dataset, missing
     type) (lr, weight decay, budget; MAP's own is lr 1e-2, weight decay 2e-2), sees AOEPT's black
     missing image (MAP's is all ones: the inputs of the two columns are the same) and trains the same
     head and CLIP projections, so that the columns differ only in their prompts.
(The shared prompts' bottleneck, text width / 16 for both towers, is the public code's.)

Dimension key: B batch, N tokens (N_a audio, N_v video), D width, C classes (logits (B, C)), E CLIP's
joint width.
Following the public code, K is the memory size (n_clusters), not the class count, and L is the
prompt length; layers are indexed l < depth (prompted) out of the towers' blocks. H heads of the
parameter-free attention, d_h = D / H; n = training samples that have a modality.
"""
import copy
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import common

# ----------------------------------------------------------------------------------------------
# Hyper-parameters (embedded benchmark defaults; the source of each is on its line)
# ----------------------------------------------------------------------------------------------
PROMPT_LEN = 6  # L tokens per prompt: public code AOEPT_CLIP_Food101_*.yaml (L 5-16 across datasets)
# DEVIATION: the yamls prompt 4 of CLIP's 12 layers; the tiny towers have 3 blocks, we prompt 2.
DEPTH = 2  # prompted layers (prompt_depth)
N_CLUSTERS = 256  # K memory centres per layer: script/run_aoept.sh default n_clusters
SAMPLES_PER_CLUSTER = 8  # ours: K = min(N_CLUSTERS, n // 8) when the data is small (Deviation 4)
KMEANS_N_INIT = 10  # restarts, best inertia kept: preprocess/cluster_tokens.py
KMEANS_MAX_ITER = 300  # Lloyd iterations per restart: preprocess/cluster_tokens.py
KMEANS_TOL = 1e-4  # stop when the squared centre shift <= tol * mean feature variance: sklearn's default
KMEANS_SEED = 42  # cluster_tokens.py --random_state default
ATTN_HEADS = 8  # heads of the parameter-free attention: AOEPT_CLIP_model.py attn_num_heads default
REDUCTION = 16  # gate MLP bottleneck D'/16: yamls reduction_ratio
INIT_STD = 0.02  # queries (and MAP prompts) ~ N(0, 0.02^2): AOEPT_CLIP_model.py
LOGIT_SCALE_INIT = math.log(100.0)  # InfoNCE logit scale s0 = ln 100 = 4.6052: AOEPT_CLIP_model.py
AUX_WEIGHT = 0.05  # L = L_task + 0.05 L_aux: yamls loss_alpha
RANDOM_MEMORY = 32  # memory rows when a modality is absent from every training sample: N in the yamls
GRAD_CLIP = 5.0  # max gradient norm: core/train.py
# DEVIATION: the yamls train 20 epochs at batch 128; we train 3 at batch 32 (~140 steps) so that a
# run takes ~5-10 s on a CPU. train.py's AdamW + OneCycleLR (10% warm-up, cosine) stands in for
# the public cosine decay with 10% linear warm-up; no early stopping on a validation split.
EPOCHS = 3  # yamls num_epoch: 20
LR = 1e-2  # peak learning rate, AdamW: yamls (Food101, HateMemes; MM-IMDb 2e-2)
WEIGHT_DECAY = 2e-2  # yamls (Food101, HateMemes; MM-IMDb 1e-4)
BATCH_SIZE = 32  # yamls batch_size: 128

# The module interface train.py expects (see its docstring).
VARIANTS = {
    "aoept": {},  # with the shared prompts, the public code's default (use_shared_prompt True)
    "no_shared": {"shared": False},  # modality-specific MCPs only
    "no_instantiation": {"gate": False},  # "w/o instantiation": the same MCP for every sample
    "map": {"memory": False, "gate": False, "per_case": True, "aux_weight": 0.0, "shared": False},  # MAP-style
}
PROTOCOLS = ("map",)  # AOEPT reports MAP's protocol: the same missing type and rate in train and test

# The CLIP path (image-text; train.py --method aoept --data food | imdb | memes | mmimdb | food101 | hatememes).
# The public code's CLIP configs, core/model/AOEPT/AOEPT_CLIP_<dataset>_<missing type>.yaml (missing rate 0.7):
# prompt length L, lr, weight decay, and the K of the memory they load (cache/collect_token_cluster_<K>/...).
PUBLIC_CLIP_CONFIGS = {
    ("Food101", "text"): dict(prompt_len=6, lr=1e-2, weight_decay=2e-2, n_clusters=256),
    ("Food101", "image"): dict(prompt_len=6, lr=1e-2, weight_decay=2e-2, n_clusters=256),
    ("Food101", "both"): dict(prompt_len=6, lr=1e-2, weight_decay=2e-2, n_clusters=256),
    ("HateMemes", "text"): dict(prompt_len=14, lr=1e-2, weight_decay=2e-2, n_clusters=128),
    ("HateMemes", "image"): dict(prompt_len=6, lr=2e-2, weight_decay=2e-2, n_clusters=128),
    ("HateMemes", "both"): dict(prompt_len=6, lr=5e-3, weight_decay=2e-2, n_clusters=128),
    ("MMIMDB", "text"): dict(prompt_len=12, lr=1e-2, weight_decay=1e-4, n_clusters=128),
    ("MMIMDB", "image"): dict(prompt_len=6, lr=2e-2, weight_decay=1e-4, n_clusters=128),
    ("MMIMDB", "both"): dict(prompt_len=5, lr=2e-2, weight_decay=1e-4, n_clusters=128),
}
PUBLIC_DATASET = {"food": "Food101", "food101": "Food101", "memes": "HateMemes", "hatememes": "HateMemes",
                  "imdb": "MMIMDB", "mmimdb": "MMIMDB"}  # our task -> the public code's dataset name
CLIP_DEPTH = 4  # prompt_depth of every public CLIP config: 4 of ViT-B/16's 12 layers
# DEVIATION: the tiny CLIP has 4 layers per tower; prompting all 4 would leave no layer after the prompted
# ones, so the tiny model prompts its first 2 (the published model prompts 4 and runs 8 more).
TINY_CLIP_DEPTH = 2
MAP_PROMPT_LEN = 16  # MAP's prompt length (vilt/config.py prompt_length)
MAP_LAYERS = 0.5  # MAP prompts layers 0-5 of ViLT's 12: half of the layers (2 of the tiny CLIP's 4)
# DEVIATION: the paper's missing image is all ones (after normalisation); the public CLIP code's, followed here, is
# black; the paper's is the `ones_image` variant.
IMAGE_PLACEHOLDER = "black"  # the public CLIP path feeds a black image (0 before normalisation) for a missing image


def image_text_config(task, kind, n_layers):
    """The public config of (task, missing kind) with the prompted depth for a CLIP of n_layers per tower:
    dict(prompt_len, lr, weight_decay, n_clusters, depth)."""
    cfg = dict(PUBLIC_CLIP_CONFIGS[(PUBLIC_DATASET[task], kind)])
    cfg["depth"] = CLIP_DEPTH if n_layers >= 12 else TINY_CLIP_DEPTH
    return cfg


# DEVIATION: the public CLIP configs train 20 epochs at batch 128 (~10,000 steps on Food-101); here 2 epochs at
# batch 32 over the 2,000 embedded training pairs (126 steps), so a 3-task, 3-seed table runs in minutes on a CPU.
# AdamW; the public cosine decay with 10% linear warm-up; lr and weight decay from the config of each
# (dataset, missing type), PUBLIC_CLIP_CONFIGS.
IMAGE_TEXT = dict(epochs=2, batch_size=32, lr=LR, weight_decay=WEIGHT_DECAY, eps=1e-8, schedule="cosine", warmup=0.1)
IMAGE_TEXT_DEFAULT = ("map", "aoept", "no_memory", "no_instantiation", "no_aux", "no_shared")  # the table's columns

# The variants on CLIP (first = the method). Each is build()'s keywords; `image_placeholder` is the data's.
IMAGE_TEXT_VARIANTS = {
    "aoept": {},  # memory, gate, L_aux, shared prompts: the public code's default
    "no_memory": {"memory": False, "shared": False},  # learnable prompts in place of the MCPs (gate and L_aux kept)
    "no_instantiation": {"gate": False},  # "w/o instantiation": no instance gate, the same MCP for every sample
    "no_aux": {"aux_weight": 0.0},  # without the auxiliary InfoNCE
    "no_shared": {"shared": False},  # modality-specific MCPs only
    # DEVIATION: one prompt set per case and tower (MAP's ViLT is one stream), AOEPT's recipe and black image
    "map": {"memory": False, "gate": False, "per_case": True, "aux_weight": 0.0, "shared": False, "accumulate": True,
            "prompt_len": MAP_PROMPT_LEN, "map_depth": True},  # MAP: one prompt set per missing case
    "ones_image": {"image_placeholder": "ones"},  # the paper's placeholder for a missing image (ones after normalisation)
}


# ----------------------------------------------------------------------------------------------
# Small operations, one per step of the pipeline (float-agnostic, no globals)
# ----------------------------------------------------------------------------------------------
def token_mean(x, n_prompt=0):
    """Mean-pooled features with the first n_prompt (prompt) positions excluded. x: (B, N, D) -> (B, D)."""
    return x[:, n_prompt:].mean(dim=1)


def kmeans_pp_init(x, k, generator):
    """k-means++ seeding: each next centre drawn with probability ~ squared distance to the nearest
    chosen one. x: (n, D) -> (k, D). `generator` is a CPU torch.Generator."""
    n = x.shape[0]
    idx = [int(torch.randint(n, (1,), generator=generator))]
    d2 = (x - x[idx[0]]).pow(2).sum(dim=1)  # (n,) squared distance to the nearest centre
    for _ in range(1, k):
        total = d2.sum()
        probs = d2 / total if total > 0 else torch.ones_like(d2)  # all points on centres: uniform
        i = int(torch.multinomial(probs.detach().double().cpu(), 1, generator=generator))
        idx.append(i)
        d2 = torch.minimum(d2, (x - x[i]).pow(2).sum(dim=1))
    return x[idx].clone()  # (k, D)


def kmeans(x, k, n_init=KMEANS_N_INIT, max_iter=KMEANS_MAX_ITER, tol=KMEANS_TOL, seed=KMEANS_SEED):
    """Lloyd's K-means, k-means++ seeding, best of n_init restarts by inertia. x: (n, D) -> centres (k, D)."""
    g = torch.Generator().manual_seed(seed)
    tol_abs = tol * x.var(dim=0, unbiased=False).mean()  # sklearn: tol relative to the data's variance
    best, best_inertia = None, math.inf
    for _ in range(n_init):
        c = kmeans_pp_init(x, k, g)  # (k, D)
        for _ in range(max_iter):
            assign = torch.cdist(x, c).argmin(dim=1)  # (n,) nearest centre
            sums = torch.zeros_like(c).index_add_(0, assign, x)  # (k, D)
            counts = torch.bincount(assign, minlength=k).to(x.dtype)  # (k,)
            # Step distil: each centre moves to the mean of its points
            # DEVIATION: sklearn (greedy k-means++) moves an empty cluster to a far point; ours
            # (plain k-means++) keeps its centre
            new = torch.where(counts[:, None] > 0, sums / counts.clamp(min=1)[:, None], c)
            shift = (new - c).pow(2).sum()
            c = new
            if shift <= tol_abs:
                break
        inertia = torch.cdist(x, c).pow(2).min(dim=1).values.sum().item()
        if inertia < best_inertia:
            best, best_inertia = c, inertia
    return best


def n_clusters(n, k_max=N_CLUSTERS, samples_per_cluster=SAMPLES_PER_CLUSTER):
    """K for n collected samples: the published 256, fewer when the data is small."""
    # DEVIATION: the public script asks for K = 256 (cluster_tokens.py caps it at n); with ~1,000
    # samples at width 64 that is one centre per four samples, so we use min(256, n // 8).
    return max(1, min(k_max, n // samples_per_cluster))


def param_free_attention(q, c, num_heads):
    """Attn(Q, C, C): multi-head scaled dot-product attention with NO projections (heads are
    channel slices). q: (..., L, D), c: (..., K, D) -> (..., L, D)."""
    d_h = q.shape[-1] // num_heads
    q_h = q.unflatten(-1, (num_heads, d_h)).transpose(-3, -2)  # (..., H, L, d_h)
    c_h = c.unflatten(-1, (num_heads, d_h)).transpose(-3, -2)  # (..., H, K, d_h)
    # Step construct: softmax(Q_h C_h^T / sqrt(d_h)) C_h, keys = values = the memory
    attn = (q_h @ c_h.transpose(-2, -1) / math.sqrt(d_h)).softmax(dim=-1)  # (..., H, L, K)
    return (attn @ c_h).transpose(-3, -2).flatten(-2)  # (..., L, D)


def modal_contextualized_prompt(query, memory, norm, num_heads):
    """P^l_m = LN_m(Attn(Q^l_m, C^l_m, C^l_m) + Q^l_m). query (L, D), memory (K, D), norm a callable -> (L, D)."""
    # Step construct: attention over the memory, residual, LayerNorm (shared across layers per modality)
    return norm(param_free_attention(query, memory, num_heads) + query)


def shared_prompt(shared_query, proj, memory, norm, num_heads):
    """S^l_m = LN^s_m(Attn(W_m(Q_s), C_m, C_m) + W_m(Q_s)): the shared query (L, D_s) projected into modality
    m by proj (a callable (L, D_s) -> (L, D)), then read out of m's memory C_m (K, D) like an MCP -> (L, D)."""
    q = proj(shared_query)  # (L, D) the modality's view of the shared query
    # Step shared: attention over m's own memory, residual, the shared prompts' own LayerNorm
    return modal_contextualized_prompt(q, memory, norm, num_heads)


def instance_gate(gate_logits, other_present):
    """g = sigmoid(MLP(c_{m'})) where the conditioning modality m' is present, exactly 1 where it is
    missing. gate_logits: (B, D), other_present: (B,) bool -> (B, D)."""
    # Step instantiate: per-sample channel gate, forced to 1 when m' is missing
    return torch.where(other_present[:, None], torch.sigmoid(gate_logits), torch.ones_like(gate_logits))


def info_nce(prompt_mean, feat, present, logit_scale):
    """In-batch InfoNCE between prompt means and DETACHED features over the samples where the
    modality is present. prompt_mean, feat: (B, D); present: (B,) bool; logit_scale: scalar s
    (logits scaled by exp(s)). -> scalar, or None when fewer than 2 samples are present."""
    idx = torch.nonzero(present).flatten()  # (n,)
    if idx.numel() < 2:
        return None
    p = F.normalize(prompt_mean[idx], dim=-1)  # (n, D)
    f = F.normalize(feat[idx].detach(), dim=-1)  # (n, D), stop-gradient on the feature side
    # Step auxiliary: CE(exp(s) * cos(p_i, f_j), j = i), in-batch negatives
    logits = logit_scale.exp() * p @ f.t()  # (n, n)
    return F.cross_entropy(logits, torch.arange(len(idx), device=logits.device))


# ----------------------------------------------------------------------------------------------
# Model surgery: prompts around the frozen CAV-MAE towers
# ----------------------------------------------------------------------------------------------
class PromptGate(nn.Module):
    """MLP^l_m: Linear(D', D'/16) - ReLU - Linear(D'/16, D_m) -> gate logits (public code module.py).

    Default PyTorch init: the public code's zero-init is commented out, so gates start near 0.5.
    """

    def __init__(self, dim_in, dim_out, reduction=REDUCTION):
        super().__init__()
        hidden = max(1, dim_in // reduction)
        self.net = nn.Sequential(nn.Linear(dim_in, hidden), nn.ReLU(), nn.Linear(hidden, dim_out))

    def forward(self, c):
        return self.net(c)  # (B, D_m) logits; the sigmoid and the missing rule are in instance_gate


class PromptedTowers(nn.Module):
    """What AOEPT (and the MAP baseline) adds to two frozen towers, whatever the backbone: the queries and
    their LayerNorms (or MAP's plain prompts), the gates, the shared prompts, the logit scale, the memory
    buffers, and how the prompts of one prompted layer are built and instantiated. Subclasses name
    MODALITIES and run their towers (AOEPT: CAV-MAE, AOEPTCLIP: CLIP)."""

    MODALITIES = ()

    def build_prompts(self, D, D_s, n_cases, prompt_len, depth, memory, gate, per_case, aux_weight, num_heads,
                      reduction, shared):
        """Create the trainable parts. D {m: width of m's tower}, D_s the shared prompts' bottleneck width,
        n_cases the missing cases of MAP's per-case prompts."""
        if memory and per_case:
            raise ValueError("per_case prompts are the MAP baseline; use them with memory=False")
        if shared and not memory:
            raise ValueError("shared prompts read the memory; use them with memory=True")
        other = dict(zip(self.MODALITIES, reversed(self.MODALITIES)))
        self.prompt_len, self.depth, self.num_heads = prompt_len, depth, num_heads
        self.use_memory, self.use_gate, self.per_case, self.aux_weight = memory, gate, per_case, aux_weight
        self.use_shared = shared
        if memory:
            # Step construct: learnable queries Q^l_m (depth, L, D_m) and one LayerNorm per modality
            self.query = nn.ParameterDict({m: nn.Parameter(INIT_STD * torch.randn(depth, prompt_len, D[m]))
                                           for m in self.MODALITIES})
            self.prompt_norm = nn.ModuleDict({m: nn.LayerNorm(D[m]) for m in self.MODALITIES})
            # Step distil: the frozen memory C_m (depth, K, D_m), a buffer per modality filled by `prepare`
            for m in self.MODALITIES:
                self.register_buffer(f"memory_{m}", torch.empty(0))
        else:
            # MAP: one prompt set per missing case (or one for every sample)
            shape = (n_cases, depth, prompt_len) if per_case else (depth, prompt_len)
            self.prompts = nn.ParameterDict({m: nn.Parameter(INIT_STD * torch.randn(*shape, D[m])) for m in self.MODALITIES})
        if gate:
            # Step instantiate: the gate of m's prompts reads the other modality's features
            self.gate = nn.ModuleDict({m: nn.ModuleList([PromptGate(D[other[m]], D[m], reduction) for _ in range(depth)])
                                       for m in self.MODALITIES})
        if shared:
            # Step shared: one bottleneck query per layer for both modalities (depth, L, D_s)
            self.shared_query = nn.Parameter(INIT_STD * torch.randn(depth, prompt_len, D_s))
            self.shared_proj = nn.ModuleDict({m: nn.ModuleList([
                nn.Sequential(nn.Linear(D_s, D_s), nn.GELU(), nn.Linear(D_s, D[m])) for _ in range(depth)])
                for m in self.MODALITIES})
            self.shared_norm = nn.ModuleDict({m: nn.LayerNorm(D[m]) for m in self.MODALITIES})
            if gate:
                self.shared_gate = nn.ModuleDict({m: nn.ModuleList([PromptGate(D[other[m]], D[m], reduction)
                                                                    for _ in range(depth)]) for m in self.MODALITIES})
        if aux_weight > 0:
            self.logit_scale = nn.Parameter(torch.tensor(LOGIT_SCALE_INIT))

    def memories(self):
        """{m: the frozen memory C_m (depth, K_m, D_m)}."""
        return {m: getattr(self, f"memory_{m}") for m in self.MODALITIES}

    def set_memory(self, *memories):
        """Install the distilled memories (depth, K_m, D_m), one per modality in MODALITIES order; frozen buffers."""
        for m, memory in zip(self.MODALITIES, memories):
            setattr(self, f"memory_{m}", memory.detach().clone())

    def base_prompts(self, case):
        """The prompts before instantiation: {m: (depth, B or 1, L, D_m)}. case (B,): each sample's missing case."""
        if self.use_memory:
            memory = self.memories()
            if memory[self.MODALITIES[0]].numel() == 0:
                raise RuntimeError("the AOEPT memory is empty: run aoept.prepare(model, train_loader, device) first.")
            return {m: modal_contextualized_prompt(self.query[m], memory[m], self.prompt_norm[m], self.num_heads)
                    .unsqueeze(1) for m in self.MODALITIES}  # (depth, 1, L, D_m): the same for every sample
        if self.per_case:
            # MAP: the prompt set of the sample's missing case
            return {m: self.prompts[m][case].transpose(0, 1) for m in self.MODALITIES}  # (depth, B, L, D_m)
        return {m: self.prompts[m].unsqueeze(1) for m in self.MODALITIES}

    def shared_prompts(self):
        """The shared prompts before instantiation: {m: (depth, 1, L, D_m)}, or None when off."""
        if not self.use_shared:
            return None
        memory = self.memories()
        return {m: torch.stack([shared_prompt(self.shared_query[l], self.shared_proj[m][l], memory[m][l],
                                              self.shared_norm[m], self.num_heads) for l in range(self.depth)])
                .unsqueeze(1) for m in self.MODALITIES}

    def layer_prompts(self, base, shared, l, c, present):
        """The instantiated prompts of prompted layer l: {m: (B, L or 2L, D_m)}, [shared; modality-specific].
        c {m: (B, D_m)}: each tower's mean features entering layer l; present {m: (B,) bool}."""
        other = dict(zip(self.MODALITIES, reversed(self.MODALITIES)))
        B = len(present[self.MODALITIES[0]])
        prompts = {}
        for m in self.MODALITIES:
            p = base[m][l].expand(B, -1, -1)  # (B, L, D_m)
            if self.use_gate:
                # Step instantiate: g^l_{m,i} = sigmoid(MLP^l_m(c^{l-1}_{m',i})), 1 where m' is missing
                g = instance_gate(self.gate[m][l](c[other[m]]), present[other[m]])  # (B, D_m)
                # Step instantiate: P^l_{m,i} = P^l_m * g^l_{m,i}
                p = p * g.unsqueeze(1)  # (B, L, D_m)
            prompts[m] = p
            if shared is not None:
                s = shared[m][l].expand(B, -1, -1)  # (B, L, D_m)
                if self.use_gate:
                    # Step instantiate: the shared prompt's own gate, same source and missing rule
                    s = s * instance_gate(self.shared_gate[m][l](c[other[m]]), present[other[m]]).unsqueeze(1)
                prompts[m] = torch.cat([s, p], dim=1)  # (B, 2L, D_m): [shared; modality-specific]
        return prompts

    def aux_loss(self, prompt_means, feats, present):
        """L_aux: InfoNCE averaged over the (layer, modality) terms that have >= 2 present samples."""
        zero = self.head.weight.new_zeros(()) if isinstance(self.head, nn.Linear) else self.head[1].weight.new_zeros(())
        if self.aux_weight <= 0:
            return zero
        terms = [info_nce(p, f, present[m], self.logit_scale) for (m, p), f in zip(prompt_means, feats)]
        terms = [t for t in terms if t is not None]
        # Step auxiliary: L_aux = mean over the (layer, modality) terms
        return torch.stack(terms).mean() if terms else zero


class AOEPT(PromptedTowers):
    """A frozen CAVMAE with deep prompts in both towers. model(batch) -> logits (B, C).

    memory: MCPs from the frozen K-means memory (else plain learnable prompts, MAP-style);
    gate: per-sample instantiation from the other modality; per_case: one prompt set per missing
    case (MAP); aux_weight: weight of the auxiliary InfoNCE (0 switches it off); shared: L more
    prompt tokens per layer from a query shared by both modalities (public code default; needs memory).
    """

    MODALITIES = ("a", "v")

    def __init__(self, backbone, prompt_len=PROMPT_LEN, depth=DEPTH, memory=True, gate=True,
                 per_case=False, aux_weight=AUX_WEIGHT, num_heads=ATTN_HEADS, reduction=REDUCTION, shared=True):
        super().__init__()
        if not 1 <= depth <= len(backbone.blocks_a):
            raise ValueError(f"depth {depth} must be between 1 and the towers' {len(backbone.blocks_a)} blocks")
        self.backbone = backbone.eval()
        for p in self.backbone.parameters():
            p.requires_grad_(False)
        D = backbone.embed_dim
        # DEVIATION: MAP's input-level prompts accumulate across ViLT's layers; the MAP-style
        # baseline keeps AOEPT's insertion so that only memory, gate and L_aux differ (4 missing cases).
        # DEVIATION: the public code's bottleneck is the text width / reduction for both towers; ours D / 16.
        self.build_prompts({m: D for m in self.MODALITIES}, max(1, D // reduction), 4, prompt_len, depth, memory,
                           gate, per_case, aux_weight, num_heads, reduction, shared)
        # DEVIATION: the public code trains a fresh classifier (+ CLIP's final norms/projections);
        # CAV-MAE's mlp_head (LayerNorm + Linear) is trained on this task, so we fine-tune a copy.
        self.head = copy.deepcopy(backbone.mlp_head).requires_grad_(True)

    def forward(self, batch, return_aux=False):
        """batch dict -> logits (B, C); with return_aux also the auxiliary loss (scalar tensor)."""
        bb, L = self.backbone, self.prompt_len
        x = {"a": bb.embed_audio(batch["audio"]), "v": bb.embed_video(batch["video"])}  # (B, N_a, D), (B, N_v, D)
        B = x["a"].shape[0]
        ones = torch.ones(B, dtype=torch.bool, device=x["a"].device)
        present = {"a": batch.get("has_audio", ones), "v": batch.get("has_video", ones)}  # (B,) each
        blocks = {"a": bb.blocks_a, "v": bb.blocks_v}
        # MAP's missing case: 0 complete, 1 no audio, 2 no video, 3 neither
        base = self.base_prompts((~present["a"]).long() + 2 * (~present["v"]).long())
        shared = self.shared_prompts()
        n_p = 0  # prompt positions at the front of each sequence
        prompt_means, feats = [], []  # for the auxiliary loss: (modality, (B, D)) per prompted layer
        for l in range(len(bb.blocks_a)):
            if l < self.depth:
                # the gate sources: each tower's token mean entering layer l (= after layer l-1)
                # DEVIATION: the public CLIP code gates vision at layer i with text AFTER layer i
                # (text runs first); we use the previous layer for both towers, symmetrically.
                c = {m: token_mean(x[m], n_p) for m in self.MODALITIES}  # (B, D) each
                prompts = self.layer_prompts(base, shared, l, c, present)  # {m: (B, L or 2L, D)}
                # Step insert: the gated prompts REPLACE the previous layer's prompt outputs
                x = {m: torch.cat([prompts[m], x[m][:, n_p:]], dim=1) for m in self.MODALITIES}  # (B, n_p + N_m, D)
                n_p = prompts["a"].shape[1]  # L, or 2L with the shared prompts
            x = {m: blocks[m][l](x[m]) for m in self.MODALITIES}
            if l < self.depth:
                for m in self.MODALITIES:
                    # (B, D) token mean of the gated modality-specific prompt (the last L positions)
                    prompt_means.append((m, prompts[m][:, -L:].mean(dim=1)))
                    feats.append(token_mean(x[m], n_p))  # (B, D) m's features after layer l
        # Step insert: strip the prompts before the frozen unified block
        feat = bb.fuse(x["a"][:, n_p:], x["v"][:, n_p:])  # (B, D)
        logits = self.head(feat)  # (B, C)
        if not return_aux:
            return logits
        return logits, self.aux_loss(prompt_means, feats, present)


def text_mean(x, eot, n_prompt=0):
    """Mean of a text's tokens t_0 .. t_eot (the padding after the end-of-text token excluded), with the
    first n_prompt (prompt) positions excluded. x (B, n_prompt + C, D), eot (B,) -> (B, D)."""
    t = x[:, n_prompt:]  # (B, C, D)
    valid = (torch.arange(t.shape[1], device=t.device)[None, :] <= eot[:, None]).to(t.dtype)  # (B, C)
    return (t * valid[..., None]).sum(dim=1) / valid.sum(dim=1, keepdim=True)


def image_text_present(batch):
    """{'i': has image, 't': has text} (B,) bool from the batch's missing codes (common.image_text_presence)."""
    return dict(zip(("i", "t"), common.image_text_presence(batch)))


class AOEPTCLIP(PromptedTowers):
    """A frozen CLIP with deep prompts in both towers (the public code's CLIP path). model(batch) -> logits (B, C).

    Prompts go in front of the text tokens and in front of the image class token (m = 'i' image, 't' text).
    Flags as in AOEPT, plus accumulate: MAP's insertion, where each prompted layer prepends its prompts
    in front of the previous ones (which stay); without it the prompts are replaced at each prompted
    layer (AOEPT). Head: Linear(2 E -> C) on the concatenated projected image and text features.
    """

    MODALITIES = ("i", "t")

    def __init__(self, backbone, num_classes, prompt_len=PROMPT_LEN, depth=CLIP_DEPTH, memory=True, gate=True,
                 per_case=False, aux_weight=AUX_WEIGHT, num_heads=ATTN_HEADS, reduction=REDUCTION, shared=True,
                 accumulate=False):
        super().__init__()
        n_layers = len(backbone.transformer.resblocks)
        if len(backbone.visual.transformer.resblocks) != n_layers or not 1 <= depth <= n_layers:
            raise ValueError(f"depth {depth} must be between 1 and the towers' {n_layers} blocks (equal in both towers)")
        self.backbone = backbone.eval()
        for p in self.backbone.parameters():
            p.requires_grad_(False)
        D = {"i": backbone.visual.conv1.out_channels, "t": backbone.token_embedding.embedding_dim}
        self.accumulate = accumulate
        # the shared prompts' bottleneck is the public code's, text width / reduction; MAP's 3 missing cases
        self.build_prompts(D, max(1, D["t"] // reduction), 3, prompt_len, depth, memory, gate, per_case, aux_weight,
                           num_heads, reduction, shared)
        # The public code's classifier: a new Linear on [image embedding; text embedding] (1024 -> C for ViT-B/16)
        self.head = nn.Linear(2 * backbone.embed_dim, num_classes)
        for p in CLIP_TRAINED_PARTS(backbone):  # the public code also trains CLIP's final LayerNorms and projections
            p.requires_grad_(True)

    def forward(self, batch, return_aux=False):
        """batch dict (image, text, optional missing) -> logits (B, C); with return_aux also L_aux (scalar)."""
        bb, L = self.backbone, self.prompt_len
        text = batch["text"]
        eot = text.argmax(dim=-1)  # (B,) CLIP: the end-of-text token has the largest id
        # DEVIATION: the public code stretches the text positions to 77 + L for the prompts; here the prompts have
        # no position and the text tokens keep CLIP's own.
        x = {"i": bb.image_tokens(batch["image"]), "t": bb.text_tokens(text[:, : int(eot.max()) + 1])}  # (B, 1 + N, D_i), (B, C', D_t)
        B = len(text)
        present = image_text_present(batch)
        missing = batch.get("missing", torch.zeros(B, dtype=torch.long, device=text.device))
        # DEVIATION: text means exclude the padding after the end-of-text token (the public code averages it in)
        mean = {"i": lambda h, n: token_mean(h, n), "t": lambda h, n: text_mean(h, eot, n)}  # prompts excluded
        blocks = {"i": bb.visual.transformer.resblocks, "t": bb.transformer.resblocks}
        base, shared = self.base_prompts(missing), self.shared_prompts()
        n_p = 0  # prompt positions at the front of each sequence
        prompt_means, feats = [], []  # for the auxiliary loss: (modality, (B, D_m)) per prompted layer
        for l in range(len(blocks["t"])):
            if l < self.depth:
                # the gate sources: each tower's mean features entering layer l (= after layer l-1)
                # DEVIATION: the public CLIP code gates vision at layer l with the text AFTER layer l (text
                # runs first); we use the previous layer for both towers, symmetrically.
                c = {m: mean[m](x[m], n_p) for m in self.MODALITIES}  # (B, D_m) each
                prompts = self.layer_prompts(base, shared, l, c, present)  # {m: (B, L or 2L, D_m)}
                if self.accumulate:
                    # MAP: this layer's prompts go in front of the earlier layers' (which stay)
                    x = {m: torch.cat([prompts[m], x[m]], dim=1) for m in self.MODALITIES}
                    n_p += prompts["i"].shape[1]
                else:
                    # Step insert: the gated prompts REPLACE the previous layer's prompt outputs
                    x = {m: torch.cat([prompts[m], x[m][:, n_p:]], dim=1) for m in self.MODALITIES}
                    n_p = prompts["i"].shape[1]  # L, or 2L with the shared prompts
            # the text tower's causal mask over [prompts; tokens]: the tokens see every prompt
            x["i"] = blocks["i"][l](x["i"])
            x["t"] = blocks["t"][l](x["t"], bb.causal_mask(x["t"].shape[1], x["t"].device, x["t"].dtype))
            if l < self.depth and self.aux_weight > 0:
                for m in self.MODALITIES:
                    prompt_means.append((m, prompts[m][:, -L:].mean(dim=1)))  # (B, D_m) the modality-specific prompt
                    feats.append(mean[m](x[m], n_p))  # (B, D_m) m's features after layer l
        # Step insert: strip the prompts; CLIP's pooling (class token, end-of-text token) into the joint space
        f = torch.cat([bb.pool_image(x["i"][:, n_p:]), bb.pool_text(x["t"][:, n_p:], eot)], dim=-1)  # (B, 2 E)
        logits = self.head(f)  # (B, C)
        if not return_aux:
            return logits
        return logits, self.aux_loss(prompt_means, feats, present)


def CLIP_TRAINED_PARTS(backbone):
    """The CLIP parameters the public code trains: the two projections and the final LayerNorms."""
    return [backbone.visual.proj, backbone.text_projection, *backbone.visual.ln_post.parameters(),
            *backbone.ln_final.parameters()]


def build(backbone, num_classes=None, **kw):
    """A frozen CAVMAE or CLIP (train.py passes a frozen deep copy) -> the prompted model of one variant.
    num_classes: the CLIP head's outputs (CAV-MAE's head is its own)."""
    if isinstance(backbone, common.CLIP):
        if num_classes is None:
            raise ValueError("aoept.build(CLIP) needs num_classes (the task's classes or labels)")
        if kw.pop("map_depth", False):  # MAP's prompted layers: half of the tower's
            kw["depth"] = max(1, round(MAP_LAYERS * len(backbone.transformer.resblocks)))
        return AOEPTCLIP(backbone, num_classes, **kw)
    return AOEPT(backbone, **kw)


def collect_params(model):
    """What trains: queries, prompt LayerNorms (or MAP prompts), gate MLPs, the shared query, projections,
    LayerNorms and gates, logit scale, head; on CLIP also its two projections and final LayerNorms.
    Never the rest of the backbone, never the memory (a buffer)."""
    named = [(n, p) for n, p in model.named_parameters() if not n.startswith("backbone.")]
    if isinstance(model, AOEPTCLIP):
        ids = {id(p) for p in CLIP_TRAINED_PARTS(model.backbone)}
        named += [(n, p) for n, p in model.named_parameters() if n.startswith("backbone.") and id(p) in ids]
    return [p for _, p in named], [n for n, _ in named]


# ----------------------------------------------------------------------------------------------
# Collect and distil (before training)
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def collect(backbone, loader, depth, device):
    """collect: frozen pass, no prompts; the token mean entering each of the first `depth` blocks,
    per modality, only over samples that have it -> {m: (n_m, depth, D)}."""
    backbone.eval()
    out = {"a": [], "v": []}
    for batch in loader:
        batch = {k: v.to(device) for k, v in batch.items()}
        x = {"a": backbone.embed_audio(batch["audio"]), "v": backbone.embed_video(batch["video"])}
        B = x["a"].shape[0]
        ones = torch.ones(B, dtype=torch.bool, device=device)
        present = {"a": batch.get("has_audio", ones), "v": batch.get("has_video", ones)}
        blocks = {"a": backbone.blocks_a, "v": backbone.blocks_v}
        for m in ("a", "v"):
            means = []
            for l in range(depth):
                # Step collect: c^l_{m,i} = mean_n h^l_{m,i,n}, h^l the tokens entering block l
                means.append(token_mean(x[m]))  # (B, D)
                x[m] = blocks[m][l](x[m])
            out[m].append(torch.stack(means, dim=1)[present[m]])  # (n_batch, depth, D), missing skipped
    D = backbone.embed_dim
    return {m: torch.cat(v) if v else torch.empty(0, depth, D, device=device) for m, v in out.items()}


@torch.no_grad()
def collect_clip(backbone, loader, depth, device):
    """collect on CLIP: frozen pass, no prompts; the mean of the tokens entering each of the first `depth`
    blocks (image: class token and patches; text: t_0 .. t_eot, the padding excluded), per modality, only
    over samples that have it -> {'i': (n_i, depth, D_i), 't': (n_t, depth, D_t)}."""
    backbone.eval()
    out = {"i": [], "t": []}
    for batch in loader:
        batch = {k: v.to(device) for k, v in batch.items()}
        text = batch["text"]
        eot = text.argmax(dim=-1)  # (B,)
        x = {"i": backbone.image_tokens(batch["image"]), "t": backbone.text_tokens(text[:, : int(eot.max()) + 1])}
        mask = backbone.causal_mask(x["t"].shape[1], device, x["t"].dtype)
        present = image_text_present(batch)
        blocks = {"i": backbone.visual.transformer.resblocks, "t": backbone.transformer.resblocks}
        for m in ("i", "t"):
            means = []
            for l in range(depth):
                # Step collect: c^l_{m,i} = mean_n h^l_{m,i,n}, h^l the tokens entering block l
                means.append(token_mean(x[m]) if m == "i" else text_mean(x[m], eot))  # (B, D_m)
                x[m] = blocks[m][l](x[m]) if m == "i" else blocks[m][l](x[m], mask)
            out[m].append(torch.stack(means, dim=1)[present[m]])  # (n_batch, depth, D_m), missing skipped
    D = {"i": backbone.visual.conv1.out_channels, "t": backbone.token_embedding.embedding_dim}
    return {m: torch.cat(v) if v else torch.empty(0, depth, D[m], device=device) for m, v in out.items()}


@torch.no_grad()
def distil(feats, seed=KMEANS_SEED, k_max=N_CLUSTERS):
    """distil: per-layer K-means of the collected means. feats (n, depth, D) -> memory (depth, K, D)."""
    n, depth, D = feats.shape
    if n == 0:
        # the public code's fallback when a modality was never observed: N random tokens
        g = torch.Generator().manual_seed(seed)
        return (INIT_STD * torch.randn(depth, RANDOM_MEMORY, D, generator=g)).to(feats)
    k = n_clusters(n, k_max)
    return torch.stack([kmeans(feats[:, l], k, seed=seed) for l in range(depth)])  # (depth, K, D)


def prepare(model, loader, device, k_max=N_CLUSTERS):
    """Collect + distil over the (missing-masked) training split into the model's frozen memory."""
    if not model.use_memory:
        return  # the MAP baseline has no memory
    if isinstance(model, AOEPTCLIP):
        feats = collect_clip(model.backbone, loader, model.depth, device)
        model.set_memory(distil(feats["i"], k_max=k_max), distil(feats["t"], k_max=k_max))
        return
    feats = collect(model.backbone, loader, model.depth, device)
    model.set_memory(distil(feats["a"], k_max=k_max), distil(feats["v"], k_max=k_max))


# ----------------------------------------------------------------------------------------------
# One step
# ----------------------------------------------------------------------------------------------
def train_step(model, batch, optimizer):
    """Forward, L = L_task + alpha L_aux, zero_grad / backward / clip / step. -> (logits, losses)."""
    logits, aux = model(batch, return_aux=True)  # (B, C), scalar
    label = batch["label"]
    # the task loss: cross-entropy, or binary cross-entropy per label for multi-label targets (MM-IMDb)
    task = F.binary_cross_entropy_with_logits(logits, label) if label.is_floating_point() else F.cross_entropy(logits, label)
    # Step total: L = L_task + 0.05 L_aux
    total = task + model.aux_weight * aux
    optimizer.zero_grad(set_to_none=True)
    total.backward()
    torch.nn.utils.clip_grad_norm_(collect_params(model)[0], GRAD_CLIP)
    optimizer.step()
    return logits.detach(), {"task": task.item(), "aux": aux.item(), "total": total.item()}


class PromptTuner(nn.Module):
    """Model + optimiser (tent style): forward(batch) is one training step and returns its logits;
    reset() puts the trainable parameters and the optimiser back where they started."""

    def __init__(self, model, optimizer):
        super().__init__()
        self.model, self.optimizer = model, optimizer
        self.start = (copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict()))

    def forward(self, batch):
        return train_step(self.model, batch, self.optimizer)[0]

    def reset(self):
        self.model.load_state_dict(self.start[0])
        self.optimizer.load_state_dict(self.start[1])
