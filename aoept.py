"""AOEPT: Modal-Contextualized Prompts for modality-missing prompt tuning, and MAP as its baseline.

Lang, Hong, Zhong, Zhou. "AOEPT: Breaking the Implicit Modality-Reduction Bottleneck in Modality-Missing
Prompt Tuning", ICML 2026, arXiv 2605.24816. Code: github.com/Jian-Lang/AOEPT (AOEPT_CLIP_model.py,
module.py, cluster_tokens.py, the CLIP yamls): the authority, as the paper body was not readable.

Idea. Prompts built from the modalities a sample HAS (MAP, Lee et al. CVPR 2023) keep a frozen model in
the observed-modality subspace. AOEPT reads each layer's Modal-Contextualized Prompt (MCP) of m out of a
frozen memory of m's training features, gated per sample by the OTHER modality m'. On a frozen CLIP:
prompts in front of the text tokens and the image class token, stripped before CLIP's pooling; a new
head Linear(2 E -> C) on [image; text]. The pipeline's steps stand in for equation numbers:

    collect     c^l_{m,i} = mean_n h^l_{m,i,n}   tokens entering block l < depth, frozen, no prompts
    distil      C^l_m = KMeans_K({c^l_{m,i}}_i)   (K, D) per layer, then frozen
    construct   P^l_m = LN_m(Attn(Q^l_m, C^l_m, C^l_m) + Q^l_m),   Attn without projections   (L, D)
    shared      S^l_m = LN^s_m(Attn(W^l_m(Q^l_s), C^l_m, C^l_m) + W^l_m(Q^l_s)), Q^l_s (L, D_t / 16)
    instantiate g^l_{m,i} = sigmoid(MLP^l_m(c^{l-1}_{m',i})) if i has m', else 1;  P^l_{m,i} = P^l_m * g
    insert      h^l_m <- [S^l_{m,i}; P^l_{m,i}; h^l_m[2L:]] at l < depth (replaced), stripped at the end
    auxiliary   L_aux = mean_{l,m} InfoNCE on samples with m: (mean_t P^l_{m,i,t}, sg(mean_n h^{l+1}_{m,i,n}))
    total       L = L_task + 0.05 L_aux
MAP (`VARIANTS["map"]`): one prompt set per missing case (16 tokens, the first half of the layers),
prepended at each prompted layer in front of the earlier ones (they accumulate); no memory, gate, L_aux.

Deviations (each a `# DEVIATION:` line below):
  1. Gate source: the previous layer for both towers (the public code gates the image with text layer l).
  2. Text prompts have no positions (the public code stretches the text positions to 77 + 2L).
  3. Text means (gate, L_aux, collect) exclude the padding after the end-of-text token.
  4. Text pooling at the end-of-text token, CLIP's rule (the public code: HF eos_token_id 2, else last).
  5. The head keeps PyTorch's default Linear init (the public code: N(0, 0.02) weights, zero bias).
  6. MAP's prompts start N(0, 0.02^2), as AOEPT's queries (MAP's code: zeros with a one-filled token).
  7. MAP on the dual encoder: one prompt set per case and tower; embedded: AOEPT's recipe and black image.
  8. K = min(K, n // 8); torch K-means with plain k-means++ (an empty cluster keeps its centre).
  9. The tiny CLIP (4 layers) prompts its first 2 layers (ViT-B/16: the yamls' 4 of 12).
 10. A missing image is black (public CLIP code); the paper's all-ones image is `ones_image`.
 11. recipe(..., paper=False): 2 epochs of batch 32 instead of 20 of batch 128, the last epoch's model.

Dimension key: B batch, N tokens, D_m m's width, E joint width, C classes, K memory, L prompt length, H heads.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import common

N_CLUSTERS = 256  # K memory centres per layer: script/run_aoept.sh default n_clusters
KMEANS_N_INIT = 10  # restarts, best inertia kept: preprocess/cluster_tokens.py
KMEANS_MAX_ITER = 300  # Lloyd iterations per restart: preprocess/cluster_tokens.py
KMEANS_TOL = 1e-4  # stop when the squared centre shift <= tol * mean feature variance: sklearn's default
KMEANS_SEED = 42  # cluster_tokens.py --random_state default
ATTN_HEADS = 8  # heads of the parameter-free attention: AOEPT_CLIP_model.py attn_num_heads
REDUCTION = 16  # gate MLP bottleneck D / 16: yamls reduction_ratio
INIT_STD = 0.02  # queries (and MAP prompts) ~ N(0, 0.02^2): AOEPT_CLIP_model.py
LOGIT_SCALE_INIT = math.log(100.0)  # InfoNCE logit scale s0 = ln 100 = 4.6052: AOEPT_CLIP_model.py
AUX_WEIGHT = 0.05  # L = L_task + 0.05 L_aux: yamls loss_alpha
RANDOM_MEMORY = 32  # memory rows when a modality is absent from every training sample: N in the yamls
GRAD_CLIP = 5.0  # max gradient norm: core/train.py
PROMPT_LEN = 6  # L: AOEPT_CLIP_Food101_*.yaml (5-14 across datasets, PUBLIC_CLIP_CONFIGS)
CLIP_DEPTH = 4  # prompt_depth of every public CLIP config: 4 of ViT-B/16's 12 layers
# DEVIATION: prompting all 4 layers of the tiny CLIP would leave none after the prompted ones: it prompts 2.
TINY_CLIP_DEPTH = 2
MAP_PROMPT_LEN = 16  # MAP's prompt length (vilt/config.py prompt_length)
MAP_LAYERS = 0.5  # MAP prompts layers 0-5 of ViLT's 12: half of the layers (2 of the tiny CLIP's 4)
# DEVIATION: the paper's missing image is all ones after normalisation (MAP's); the public CLIP code's black.
IMAGE_PLACEHOLDER = "black"

# AOEPT_CLIP_<dataset>_<missing type>.yaml (missing rate 0.7): prompt length, lr, weight decay, memory K.
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

VARIANTS = {  # build() keywords; `image_placeholder` is the data's (build ignores it)
    "aoept": {},  # memory, gate, L_aux, shared prompts: the public code's default
    "no_memory": {"memory": False, "shared": False},  # learnable prompts in place of the MCPs
    "no_instantiation": {"gate": False},  # "w/o instantiation": the same MCP for every sample
    "no_aux": {"aux_weight": 0.0},  # without the auxiliary InfoNCE
    "no_shared": {"shared": False},  # modality-specific MCPs only
    # DEVIATION: a prompt set per case and tower (MAP: one stream); embedded: AOEPT's recipe and black image
    "map": {"memory": False, "gate": False, "per_case": True, "aux_weight": 0.0, "shared": False,
            "accumulate": True, "prompt_len": MAP_PROMPT_LEN, "map_depth": True},
    "ones_image": {"image_placeholder": "ones"},  # the paper's missing image (ones after normalisation)
}
DEFAULT_VARIANTS = ("map", "aoept", "no_memory", "no_instantiation", "no_aux", "no_shared")  # table columns
PROTOCOLS = ("map",)  # AOEPT reports MAP's protocol: the same missing type and rate in train and test


def recipe(dataset, paper=False, kind="both", variant="aoept"):
    """`variant`'s recipe on (dataset, missing kind): the contracts' keys, prompt_len (build with
    {'prompt_len': r['prompt_len'], **VARIANTS[v]}), n_clusters (prepare's k_max). Warm-up (t + 1) / w."""
    pub = PUBLIC_CLIP_CONFIGS[(PUBLIC_DATASET[dataset], kind)]
    # DEVIATION: embedded: 2 epochs of batch 32 (126 steps) for the yamls' 20 of batch 128, the last epoch.
    r = dict(epochs=2, batch_size=32, lr=pub["lr"], weight_decay=pub["weight_decay"], eps=1e-8,
             betas=(0.9, 0.999), schedule="cosine", warmup=0.1, warmup_factor=0.0, power=None,
             grad_clip=GRAD_CLIP, select="last", prompt_len=pub["prompt_len"], n_clusters=pub["n_clusters"])
    if paper:  # the yamls (AOEPT), MAP's config (lr 1e-2, weight decay 2e-2, 16 tokens); best validation
        r.update(epochs=20, batch_size=128, select="best_val")
        if variant == "map":
            r.update(lr=1e-2, weight_decay=2e-2, prompt_len=MAP_PROMPT_LEN)
    return r


def text_mean(x, eot, n_prompt=0):
    """Mean of a text's tokens t_0 .. t_eot after n_prompt positions. (B, n_prompt + C, D) -> (B, D)."""
    t = x[:, n_prompt:]  # (B, C, D)
    # DEVIATION: the padding after the end-of-text token is excluded (the public code averages it in).
    valid = (torch.arange(t.shape[1], device=t.device)[None, :] <= eot[:, None]).to(t.dtype)  # (B, C)
    return (t * valid[..., None]).sum(dim=1) / valid.sum(dim=1, keepdim=True)


def kmeans(x, k, n_init=KMEANS_N_INIT, max_iter=KMEANS_MAX_ITER, tol=KMEANS_TOL, seed=KMEANS_SEED):
    """Lloyd's K-means, k-means++ seeding, best of n_init restarts by inertia. x (n, D) -> centres (k, D)."""
    g = torch.Generator().manual_seed(seed)
    tol_abs = tol * x.var(dim=0, unbiased=False).mean()  # sklearn: tol relative to the data's variance
    best, best_inertia = None, math.inf
    for _ in range(n_init):
        # k-means++ seeding: each next centre drawn with probability ~ squared distance to the nearest one
        idx = [int(torch.randint(len(x), (1,), generator=g))]
        d2 = (x - x[idx[0]]).pow(2).sum(dim=1)  # (n,) squared distance to the nearest centre
        for _ in range(1, k):
            total = d2.sum()
            probs = d2 / total if total > 0 else torch.ones_like(d2)  # all points on centres: uniform
            idx.append(int(torch.multinomial(probs.detach().double().cpu(), 1, generator=g)))
            d2 = torch.minimum(d2, (x - x[idx[-1]]).pow(2).sum(dim=1))
        c = x[idx].clone()  # (k, D)
        for _ in range(max_iter):
            assign = torch.cdist(x, c).argmin(dim=1)  # (n,) nearest centre
            sums = torch.zeros_like(c).index_add_(0, assign, x)  # (k, D)
            counts = torch.bincount(assign, minlength=k).to(x.dtype)  # (k,)
            # Step distil: each centre moves to the mean of its points
            # DEVIATION: sklearn (greedy k-means++) moves an empty cluster to a far point; ours keeps it
            new = torch.where(counts[:, None] > 0, sums / counts.clamp(min=1)[:, None], c)
            shift = (new - c).pow(2).sum()
            c = new
            if shift <= tol_abs:
                break
        inertia = torch.cdist(x, c).pow(2).min(dim=1).values.sum().item()
        if inertia < best_inertia:
            best, best_inertia = c, inertia
    return best


def n_clusters(n, k_max=N_CLUSTERS, samples_per_cluster=8):
    """K for n collected samples: the published 256 (or the config's), fewer when the data is small."""
    # DEVIATION: the public script asks for K = 256 (capped at n); with ~1,000 samples we use min(K, n // 8).
    return max(1, min(k_max, n // samples_per_cluster))


def param_free_attention(q, c, num_heads):
    """Attn(Q, C, C) without projections (heads: channel slices). (..., L, D), (..., K, D) -> (..., L, D)."""
    d_h = q.shape[-1] // num_heads
    q_h = q.unflatten(-1, (num_heads, d_h)).transpose(-3, -2)  # (..., H, L, d_h)
    c_h = c.unflatten(-1, (num_heads, d_h)).transpose(-3, -2)  # (..., H, K, d_h)
    # Step construct: softmax(Q_h C_h^T / sqrt(d_h)) C_h, keys = values = the memory
    attn = (q_h @ c_h.transpose(-2, -1) / math.sqrt(d_h)).softmax(dim=-1)  # (..., H, L, K)
    return (attn @ c_h).transpose(-3, -2).flatten(-2)  # (..., L, D)


def modal_contextualized_prompt(query, memory, norm, num_heads):
    """P^l_m = LN_m(Attn(Q^l_m, C^l_m, C^l_m) + Q^l_m): query (L, D), memory (K, D), norm -> (L, D)."""
    # Step construct: attention over the memory, residual, LayerNorm (shared across layers per modality)
    return norm(param_free_attention(query, memory, num_heads) + query)


def instance_gate(gate_logits, other_present):
    """g = sigmoid(MLP(c_{m'})) where m' is present, exactly 1 where it is missing: (B, D), (B,) -> (B, D)."""
    # Step instantiate: per-sample channel gate, forced to 1 when m' is missing
    return torch.where(other_present[:, None], torch.sigmoid(gate_logits), torch.ones_like(gate_logits))


def info_nce(prompt_mean, feat, present, logit_scale):
    """In-batch InfoNCE of prompt means and DETACHED features (B, D) over the present samples (B,) bool,
    logits scaled by exp(logit_scale) -> scalar, or None when fewer than 2 samples are present."""
    idx = torch.nonzero(present).flatten()  # (n,)
    if idx.numel() < 2:
        return None
    p = F.normalize(prompt_mean[idx], dim=-1)  # (n, D)
    f = F.normalize(feat[idx].detach(), dim=-1)  # (n, D), stop-gradient on the feature side
    # Step auxiliary: CE(exp(s) * cos(p_i, f_j), j = i), in-batch negatives
    logits = logit_scale.exp() * p @ f.t()  # (n, n)
    return F.cross_entropy(logits, torch.arange(len(idx), device=logits.device))


def gate_mlp(dim_in, dim_out, reduction=REDUCTION):
    """MLP^l_m: Linear(D', D'/16) - ReLU - Linear(D'/16, D_m), default init (module.py's zero-init is off)."""
    hidden = max(1, dim_in // reduction)
    return nn.Sequential(nn.Linear(dim_in, hidden), nn.ReLU(), nn.Linear(hidden, dim_out))


def trained_parts(backbone):
    """The CLIP parameters the public code trains: the two projections and the final LayerNorms."""
    return [backbone.visual.proj, backbone.text_projection, *backbone.visual.ln_post.parameters(),
            *backbone.ln_final.parameters()]


class AOEPT(nn.Module):
    """A frozen CLIP with deep prompts in both towers. model(batch) -> logits (B, C); batch: image, text,
    optional has_image / has_text (B,) bool. memory: MCPs (else learnable prompts); gate: instantiation;
    per_case: a prompt set per missing case (MAP); aux_weight: of L_aux (0: off); shared: the shared
    prompts; accumulate: MAP's insertion; depth None: 4 layers of >= 12, else 2."""

    def __init__(self, backbone, num_classes, prompt_len=PROMPT_LEN, depth=None, memory=True, gate=True,
                 per_case=False, aux_weight=AUX_WEIGHT, num_heads=ATTN_HEADS, reduction=REDUCTION,
                 shared=True, accumulate=False):
        super().__init__()
        n_layers = len(backbone.tower("text"))
        depth = depth or (CLIP_DEPTH if n_layers >= 12 else TINY_CLIP_DEPTH)
        common.need(len(backbone.tower("image")) == n_layers and 1 <= depth <= n_layers,
                    f"depth {depth} must be between 1 and the {n_layers} blocks of each tower.")
        self.backbone = backbone.eval().requires_grad_(False)
        ms = self.modalities = backbone.modalities
        other = dict(zip(ms, reversed(ms)))
        D = {m: backbone.width(m) for m in ms}
        D_s = max(1, D["text"] // reduction)  # the shared prompts' bottleneck: public code's text width / 16
        self.prompt_len, self.depth, self.num_heads = prompt_len, depth, num_heads
        self.use_memory, self.use_gate, self.per_case, self.aux_weight = memory, gate, per_case, aux_weight
        self.use_shared, self.accumulate = shared, accumulate
        if memory:
            # Step construct: learnable queries Q^l_m (depth, L, D_m) and one LayerNorm per modality
            self.query = nn.ParameterDict({m: nn.Parameter(INIT_STD * torch.randn(depth, prompt_len, D[m]))
                                           for m in ms})
            self.prompt_norm = nn.ModuleDict({m: nn.LayerNorm(D[m]) for m in ms})
            self.memory = nn.Module()  # Step distil: the frozen memories C_m (depth, K, D_m), from `prepare`
            for m in ms:
                self.memory.register_buffer(m, torch.empty(0))
        else:
            # DEVIATION: MAP's code starts its prompts at zeros with one token of ones; ours N(0, 0.02^2).
            shape = (3, depth, prompt_len) if per_case else (depth, prompt_len)  # MAP's 3 missing cases
            self.prompts = nn.ParameterDict({m: nn.Parameter(INIT_STD * torch.randn(*shape, D[m]))
                                             for m in ms})
        if gate:
            # Step instantiate: the gate of m's prompts reads the other modality's features
            self.gate = nn.ModuleDict({m: nn.ModuleList([gate_mlp(D[other[m]], D[m], reduction)
                                                         for _ in range(depth)]) for m in ms})
        if shared:
            # Step shared: one bottleneck query per layer for both modalities (depth, L, D_s)
            self.shared_query = nn.Parameter(INIT_STD * torch.randn(depth, prompt_len, D_s))
            self.shared_proj = nn.ModuleDict({m: nn.ModuleList([
                nn.Sequential(nn.Linear(D_s, D_s), nn.GELU(), nn.Linear(D_s, D[m])) for _ in range(depth)])
                for m in ms})
            self.shared_norm = nn.ModuleDict({m: nn.LayerNorm(D[m]) for m in ms})
            if gate:
                self.shared_gate = nn.ModuleDict({m: nn.ModuleList([gate_mlp(D[other[m]], D[m], reduction)
                                                                    for _ in range(depth)]) for m in ms})
        if aux_weight > 0:
            self.logit_scale = nn.Parameter(torch.tensor(LOGIT_SCALE_INIT))
        # DEVIATION: PyTorch's default Linear init; the public code draws N(0, 0.02) weights and zero biases.
        self.head = nn.Linear(2 * backbone.embed_dim, num_classes)  # on [image; text] embeddings (2 E -> C)
        for p in trained_parts(backbone):  # the public code also trains these
            p.requires_grad_(True)

    def base_prompts(self, case):
        """The prompts before instantiation {m: (depth, B or 1, L, D_m)}; case (B,): the MAP missing cases."""
        ms = self.modalities
        if self.use_memory:
            common.need(self.memory.image.numel(), "the AOEPT memory is empty; run aoept.prepare first.")
            return {m: modal_contextualized_prompt(self.query[m], self.memory.get_buffer(m),
                                                   self.prompt_norm[m], self.num_heads).unsqueeze(1)
                    for m in ms}  # the same for every sample
        if self.per_case:  # MAP: the prompt set of the sample's missing case
            return {m: self.prompts[m][case].transpose(0, 1) for m in ms}
        return {m: self.prompts[m].unsqueeze(1) for m in ms}

    def layer_prompts(self, base, l, c, present):
        """Layer l's prompts {m: (B, L or 2L, D_m)}, [shared; specific]; c: means entering l; present."""
        other = dict(zip(self.modalities, reversed(self.modalities)))
        B = len(present["image"])
        prompts = {}
        for m in self.modalities:
            p = base[m][l].expand(B, -1, -1)  # (B, L, D_m)
            if self.use_gate:
                # Step instantiate: g^l_{m,i} = sigmoid(MLP^l_m(c^{l-1}_{m',i})), 1 where m' is missing
                g = instance_gate(self.gate[m][l](c[other[m]]), present[other[m]])  # (B, D_m)
                # Step instantiate: P^l_{m,i} = P^l_m * g^l_{m,i}
                p = p * g.unsqueeze(1)  # (B, L, D_m)
            prompts[m] = p
            if self.use_shared:
                # Step shared: S^l_m = LN^s_m(Attn(W^l_m(Q^l_s), C^l_m, C^l_m) + W^l_m(Q^l_s)), (L, D_m)
                q = self.shared_proj[m][l](self.shared_query[l])  # (L, D_m)
                C = self.memory.get_buffer(m)[l]  # (K, D_m)
                s = modal_contextualized_prompt(q, C, self.shared_norm[m], self.num_heads)
                s = s.expand(B, -1, -1)  # (B, L, D_m)
                if self.use_gate:
                    # Step instantiate: the shared prompt's own gate, same source and missing rule
                    s = s * instance_gate(self.shared_gate[m][l](c[other[m]]), present[other[m]]).unsqueeze(1)
                prompts[m] = torch.cat([s, p], dim=1)  # (B, 2L, D_m): [shared; modality-specific]
        return prompts

    def forward(self, batch, return_aux=False):
        """batch -> logits (B, C); with return_aux also L_aux (scalar)."""
        bb, L, ms = self.backbone, self.prompt_len, self.modalities
        text = batch["text"]
        # DEVIATION: pooled at the end-of-text token, as CLIP (the public code: HF eos_token_id 2, else last)
        eot = bb.cls_index("text", text)  # (B,)
        # DEVIATION: the prompts have no positions (the public code stretches the text's to 77 + 2L)
        x = {m: bb.embed(m, batch[m]) for m in ms}  # (B, 1 + N, D_image), (B, C', D_text)
        ones = torch.ones(len(text), dtype=torch.bool, device=text.device)
        present = {m: batch.get(f"has_{m}", ones) for m in ms}  # (B,) each
        case = (~present["text"]).long() + 2 * (~present["image"]).long()  # 0 complete, 1 no text, 2 no image
        mean = {"image": lambda h, n: h[:, n:].mean(dim=1),  # token means after the n prompt positions
                "text": lambda h, n: text_mean(h, eot, n)}
        base = self.base_prompts(case)
        n_p = 0  # prompt positions at the front of each sequence
        prompt_means, feats = [], []  # for L_aux: (modality, (B, D_m)) per prompted layer
        for l in range(len(bb.tower("text"))):
            if l < self.depth:
                # DEVIATION: the gate sources are both towers' means entering layer l (after layer l - 1); the
                # public CLIP code runs text first and gates the image with the text after layer l.
                c = {m: mean[m](x[m], n_p) for m in ms}  # (B, D_m) each
                prompts = self.layer_prompts(base, l, c, present)  # {m: (B, L or 2L, D_m)}
                if self.accumulate:  # MAP: this layer's prompts in front of the earlier layers' (which stay)
                    x = {m: torch.cat([prompts[m], x[m]], dim=1) for m in ms}
                    n_p += prompts["image"].shape[1]
                else:  # Step insert: the gated prompts REPLACE the previous layer's prompt outputs
                    x = {m: torch.cat([prompts[m], x[m][:, n_p:]], dim=1) for m in ms}
                    n_p = prompts["image"].shape[1]  # L, or 2L with the shared prompts
            x["image"] = bb.tower("image")[l](x["image"])
            # the text tower's causal mask over [prompts; tokens]: the tokens see every prompt
            mask = bb.causal_mask(x["text"].shape[1], text.device, x["text"].dtype)
            x["text"] = bb.tower("text")[l](x["text"], mask)
            if l < self.depth and self.aux_weight > 0:
                for m in ms:
                    prompt_means.append((m, prompts[m][:, -L:].mean(dim=1)))  # (B, D_m) m's specific prompt
                    feats.append(mean[m](x[m], n_p))  # (B, D_m) m's features after layer l
        # Step insert: strip the prompts; CLIP's pooling (class token, end-of-text token) into the joint space
        rows = torch.arange(len(text), device=text.device)
        f = torch.cat([bb.pool("image", x["image"][:, n_p]), bb.pool("text", x["text"][rows, n_p + eot])], -1)
        logits = self.head(f)  # (B, C) from (B, 2 E)
        if not return_aux:
            return logits
        zero = self.head.weight.new_zeros(())
        terms = [info_nce(p, f, present[m], self.logit_scale) for (m, p), f in zip(prompt_means, feats)]
        terms = [t for t in terms if t is not None]
        # Step auxiliary: L_aux = mean over the (layer, modality) terms with >= 2 present samples
        return logits, (torch.stack(terms).mean() if terms else zero)


def build(backbone, num_classes, image_placeholder=None, map_depth=False, **kw):
    """A frozen CLIP -> one variant's model; map_depth: MAP's layers; image_placeholder: data's (ignored)."""
    if map_depth:
        kw["depth"] = max(1, round(MAP_LAYERS * len(backbone.tower("text"))))
    return AOEPT(backbone, num_classes, **kw)


def collect_params(model):
    """What trains: all but the backbone and the memory, plus trained_parts(backbone). -> (params, names)."""
    named = [(n, p) for n, p in model.named_parameters() if not n.startswith("backbone.")]
    ids = {id(p) for p in trained_parts(model.backbone)}
    named += [(n, p) for n, p in model.named_parameters() if n.startswith("backbone.") and id(p) in ids]
    return [p for _, p in named], [n for n, _ in named]


@torch.no_grad()
def collect(backbone, loader, depth, device):
    """Step collect: frozen, no prompts; the token means entering each of the first `depth` blocks (text:
    t_0 .. t_eot), per modality, over the samples that have it -> {m: (n_m, depth, D_m)}."""
    ms = backbone.modalities
    out = {m: [] for m in ms}
    for batch in loader:
        batch = {k: v.to(device) for k, v in batch.items()}
        eot = backbone.cls_index("text", batch["text"])  # (B,)
        ones = torch.ones(len(eot), dtype=torch.bool, device=device)
        for m in ms:
            x = backbone.embed(m, batch[m])
            mask = backbone.causal_mask(x.shape[1], device, x.dtype) if m in backbone.causal else None
            means = []
            for l in range(depth):
                # Step collect: c^l_{m,i} = mean_n h^l_{m,i,n}, h^l the tokens entering block l
                means.append(text_mean(x, eot) if m == "text" else x.mean(dim=1))  # (B, D_m)
                x = backbone.tower(m)[l](x, mask)
            out[m].append(torch.stack(means, dim=1)[batch.get(f"has_{m}", ones)])  # (n_batch, depth, D_m)
    return {m: torch.cat(v) if v else torch.empty(0, depth, backbone.width(m), device=device)
            for m, v in out.items()}


@torch.no_grad()
def distil(feats, seed=KMEANS_SEED, k_max=N_CLUSTERS):
    """Step distil: per-layer K-means of the collected means. feats (n, depth, D) -> memory (depth, K, D)."""
    n, depth, D = feats.shape
    if n == 0:  # the public code's fallback when a modality was never observed: N random tokens
        g = torch.Generator().manual_seed(seed)
        return (INIT_STD * torch.randn(depth, RANDOM_MEMORY, D, generator=g)).to(feats)
    return torch.stack([kmeans(feats[:, l], n_clusters(n, k_max), seed=seed) for l in range(depth)])


def prepare(model, loader, device, k_max=N_CLUSTERS):
    """Collect + distil over the (missing-masked) training split into the model's frozen memory."""
    if not model.use_memory:
        return  # MAP and no_memory have no memory
    feats = collect(model.backbone, loader, model.depth, device)
    for m, f in feats.items():
        model.memory.register_buffer(m, distil(f, k_max=k_max))


def train_step(model, batch, optimizer):
    """Forward, L = L_task + alpha L_aux, zero_grad / backward / clip / step. -> (logits, loss floats)."""
    logits, aux = model(batch, return_aux=True)  # (B, C), scalar
    label = batch["label"]
    # the task loss: cross-entropy, or binary cross-entropy per label for multi-label targets (MM-IMDb)
    if label.is_floating_point():
        task = F.binary_cross_entropy_with_logits(logits, label)
    else:
        task = F.cross_entropy(logits, label)
    # Step total: L = L_task + 0.05 L_aux
    total = task + model.aux_weight * aux
    optimizer.zero_grad(set_to_none=True)
    total.backward()
    torch.nn.utils.clip_grad_norm_(collect_params(model)[0], GRAD_CLIP)
    optimizer.step()
    return logits.detach(), {"task": task.item(), "aux": aux.item(), "total": total.item()}
