"""
Evaluation of CLIP models: zero-shot classification, image-text retrieval, linear probes and fine-tuning of the image
tower, and linear probes of the synthetic set's attributes (the paper judges its models on 45 datasets, zero-shot and
fine-tuning). train.py evaluates with it during training; `python evaluate.py --model M ...` evaluates any model
interop.py loads (our runs and chain stages, open_clip, the official CoM-PT zoo), prints a markdown table, writes JSON.

Metrics follow CLIP_benchmark. Zero-shot (Radford et al. 2021): a class embedding is the mean of its normalised
prompt-template embeddings, renormalised; an image goes to the nearest class by cosine similarity; top-1, top-5 and
mean per-class recall (balanced accuracy); top-k is undefined (null) on a task of fewer than k classes. Retrieval:
R@1/5/10 both ways, a query being a hit when any of its positives is among the top k. Linear probe: logistic
regression on the frozen, L2-normalised image features, its weight decay chosen on a held-out 20% of the training
split, then refit on the whole split; top-1, top-5 and mean per-class recall. Deviations from CLIP_benchmark's probe:
full-batch L-BFGS in float64 on standardised features, run to convergence (the CLIP paper's solver; CLIP_benchmark
uses AdamW for 10 epochs), one weight decay per decade from 1e-6 to 1e2 (CLIP_benchmark bisects further around the
best), features kept in memory rather than cached on disk. Fine-tuning (not in CLIP_benchmark): the image tower and a
zero-initialised linear head on its embedding, AdamW with warmup and cosine decay, at least FINETUNE_MIN_STEPS steps.
The command line computes in fp32 unless --precision bf16 (train.py evaluates in its run's precision), counts every
picture it scores or skips, and writes its own JSON or, with --format clip_benchmark, CLIP_benchmark's records.
"""

import copy
import math
import os
import sys
import time
from collections import Counter

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import Subset
from tqdm import tqdm

import data
import interop
import recipe
import runtime
import synthetic
import vit
from tokenizer import prompt_tokens

SIMPLE_TEMPLATES = ("itap of a {}.", "a bad photo of the {}.", "a origami {}.", "a photo of the large {}.",
                    "a {} in a video game.", "art of the {}.", "a photo of the small {}.")  # open_clip's short set
WEIGHT_DECAYS = tuple(10.0 ** e for e in range(-6, 3))  # the linear probe's grid: 1e-6 ... 1e2


def load_templates(templates, default):
    """Prompt templates: a list, a file with one per line, or None for the default; each holds "{}"."""
    if isinstance(templates, str):
        if not os.path.isfile(templates):
            raise FileNotFoundError(f"--templates {templates}: no such file (one prompt with {{}} per line)")
        with open(templates, encoding="utf-8") as f:
            templates = [line.strip() for line in f if line.strip() and not line.startswith("#")]
    templates = list(templates or default)
    bad = [t for t in templates if "{}" not in t]
    if bad or not templates:
        raise ValueError(f"templates: {bad[0]!r} has no '{{}}' for the class name" if bad else "templates: none")
    return templates


def build_eval_sets(source="synthetic", *, tokenizer, image_size, context_length, zeroshot_data=None,
                    val_data=None, templates=None, data_root=None, csv_img_key="filepath", csv_caption_key="title",
                    caption_sep=None, captions_per_image=1, batch_size=256, workers=0, seed=0,
                    probes=synthetic.PROBES):
    """Evaluation sets, as a dict (an absent key means no such evaluation):

    "zeroshot": dict(batches=iterable of (images [b,3,H,W], labels long [b]), classnames=[n names],
                     templates=[t prompts with "{}"], tokens=long [n, t, C])  (the prompts, tokenized)
    "retrieval": dict(batches=iterable of (images [b,3,H,W], tokens long [b, k, C]))  (k captions per
                     image; caption j of image i matches image i only)
    "probes": (synthetic source only) the attribute probe sets of evaluate.attribute_probes: `probes` pictures to
              fit, half as many to score (none for probes=0)

    Synthetic source (or val_data "synthetic"): synthetic.build_eval_sets, held out from training (other splits of its
    generator), in memory: synthetic.ZEROSHOT_PER_CLASS pictures per zero-shot class, RETRIEVAL_SIZE retrieval pictures
    with FULL_CAPTIONS captions each, the probe sets. zeroshot_data: an ImageFolder (prompts SIMPLE_TEMPLATES, or
    `templates`: a list or a file); val_data: any caption source, with k = captions_per_image. Real sets are
    EvalBatches, read from disk at each pass (iterate them once per evaluation), with bad samples left out and counted
    in .skipped.
    """
    if isinstance(tokenizer, str):
        tokenizer = data.get_tokenizer(tokenizer)
    sets = {}
    if source == "synthetic" or val_data == "synthetic":
        whole = source == "synthetic"  # else only its retrieval set
        own = synthetic.build_eval_sets(tokenizer, context_length, image_size, seed, batch_size,
                                        zeroshot_per_class=synthetic.ZEROSHOT_PER_CLASS if whole else 0,
                                        probe_sizes=(probes, probes // 2) if whole else (0, 0))
        sets = own if whole else {"retrieval": own["retrieval"]}
        if templates and "zeroshot" in sets:  # other prompts for the synthetic classes
            templates = load_templates(templates, ())
            sets["zeroshot"] = dict(sets["zeroshot"], templates=templates,
                                    tokens=prompt_tokens(tokenizer, synthetic.CLASSNAMES, templates, context_length))
    if zeroshot_data:
        folder, classnames = data.image_folder(zeroshot_data, image_size)
        templates = load_templates(templates, SIMPLE_TEMPLATES)
        sets["zeroshot"] = dict(batches=data.EvalBatches(data.EvalItems(folder, data.eval_transform(image_size)),
                                                         batch_size, workers),
                                classnames=list(classnames), templates=templates,
                                tokens=prompt_tokens(tokenizer, classnames, templates, context_length))
    if val_data and val_data != "synthetic":
        src = data.open_source(val_data, image_size=image_size, data_root=data_root, csv_img_key=csv_img_key,
                          csv_caption_key=csv_caption_key, caption_sep=caption_sep)
        items = data.EvalItems(src, data.eval_transform(image_size), tokenizer, context_length, captions_per_image)
        sets["retrieval"] = dict(batches=data.EvalBatches(data.EvalShards(items) if isinstance(src, data.Shards) else items,
                                                     batch_size, workers))
    return sets


def eval_sets_for(settings, cfg, tokenizer):
    """The evaluation sets of train.py's settings (its data's own, --zeroshot-data, --val-data) for a model of config
    `cfg`: build_eval_sets."""
    return build_eval_sets(settings.data, tokenizer=tokenizer, image_size=cfg.image_size,
                           context_length=cfg.context_length, zeroshot_data=settings.zeroshot_data or None,
                           val_data=settings.val_data or None, templates=settings.templates or None,
                           captions_per_image=settings.captions_per_image, workers=settings.workers,
                           probes=settings.probes, **data.source_args(settings))


# -----------------------------------------------------------------------------
# metrics


def top_k(logits, labels, ks=(1, 5)):
    """Top-k accuracy of logits (N, K) for each k; None (undefined, as in CLIP_benchmark) where k > K classes: every
    picture would count as right."""
    top = logits.topk(min(max(ks), logits.shape[1]), dim=-1).indices  # (N, k)
    hits = top == labels[:, None]
    return {k: hits[:, :k].any(dim=-1).float().mean().item() if k <= logits.shape[1] else None for k in ks}


def zeroshot_accuracy(image_features, labels, class_features, ks=(1, 5)):
    """Top-k accuracy of normalised image features (N, E) classified by normalised class embeddings (K, E)."""
    return top_k(image_features @ class_features.T, labels, ks)


def mean_per_class_recall(logits, labels):
    """The mean over the classes present in `labels` of the fraction of their samples whose top logit is right
    (CLIP_benchmark's mean per-class recall, sklearn's balanced accuracy)."""
    hits = (logits.argmax(dim=-1) == labels).float()  # (N,)
    counts = torch.bincount(labels, minlength=logits.shape[1]).float()  # (K,)
    right = torch.zeros_like(counts).index_add_(0, labels, hits)
    return (right[counts > 0] / counts[counts > 0]).mean().item()


def classification_metrics(logits, labels):
    """top1, top5 (None with fewer than 5 classes) and mean_per_class_recall of logits (N, K)."""
    top = top_k(logits, labels)
    return {"top1": top[1], "top5": top[5], "mean_per_class_recall": mean_per_class_recall(logits, labels)}


def retrieval_recall(image_features, text_features, text_image, ks=(1, 5, 10)):
    """R@k both ways for normalised features; text_image[j] is the index of the image that caption j describes.
    Image -> text: a hit when any of the image's captions is among the top k; text -> image: when its image is."""
    sim = image_features @ text_features.T  # (N_img, N_txt)
    k_max = max(ks)
    top_texts = sim.topk(min(k_max, sim.shape[1]), dim=1).indices  # (N_img, k)
    i2t = text_image[top_texts] == torch.arange(sim.shape[0], device=sim.device)[:, None]
    top_images = sim.T.topk(min(k_max, sim.shape[0]), dim=1).indices  # (N_txt, k)
    t2i = top_images == text_image[:, None]
    out = {f"i2t_R@{k}": i2t[:, :k].any(dim=1).float().mean().item() for k in ks}
    out.update({f"t2i_R@{k}": t2i[:, :k].any(dim=1).float().mean().item() for k in ks})
    return out


# -----------------------------------------------------------------------------
# zero-shot classification and retrieval


STAGE_LINES = {"on": False}  # evaluate.py's command line turns on a line per stage in a log (train.py's stays quiet)


def progress(batches, desc):
    """A progress bar over `batches` that shows on a terminal once they take more than 3 seconds (its total:
    len(batches), when they have one); where no bar shows (stderr is a log), the command line prints one line at the
    end of each stage instead: its pictures and seconds."""
    if STAGE_LINES["on"] and not sys.stderr.isatty():
        return _stage_line(batches, desc)
    return tqdm(batches, desc=desc, delay=3, leave=False, disable=None, unit="batch")


def _stage_line(batches, desc):
    start, pictures = time.time(), 0
    for batch in batches:
        pictures += len(batch[0])
        yield batch
    print(f"evaluate: {desc}: {pictures} pictures in {time.time() - start:.1f} s", file=sys.stderr, flush=True)


@torch.no_grad()
def embed(encode, inputs, device, precision="", batch_size=256):
    """Normalised fp32 features of `inputs` (images or tokens), encoded in chunks."""
    device, out = torch.device(device), []
    for chunk in inputs.split(batch_size):
        with runtime.autocast(device, precision):
            out.append(F.normalize(encode(chunk.to(device)).float(), dim=-1))
    return torch.cat(out)


def evaluate(model, eval_sets, device, precision=""):
    """Zero-shot top-1/top-5/mean per-class recall and retrieval R@1/5/10 (fractions in [0, 1]) of `model` on
    build_eval_sets' sets: "zeroshot" (batches of images and labels, prompt tokens (classes, templates, C)) and
    "retrieval" (batches of images and their k captions' tokens (b, k, C)). Each set's batches are read once."""
    was_training = model.training
    model.eval()
    out = {}
    if "zeroshot" in eval_sets:
        zs = eval_sets["zeroshot"]
        n_classes, n_templates, C = zs["tokens"].shape
        prompts = embed(model.encode_text, vit.trim_tokens(zs["tokens"].view(-1, C)), device, precision)  # (K * T, E)
        # a class is the mean of its normalised template embeddings, renormalised
        class_features = F.normalize(prompts.view(n_classes, n_templates, -1).mean(dim=1), dim=-1)  # (K, E)
        images, labels = zip(*[(embed(model.encode_image, x, device, precision), y)
                               for x, y in progress(zs["batches"], "zero-shot")])
        images, labels = torch.cat(images), torch.cat(labels).to(device)
        top = zeroshot_accuracy(images, labels, class_features)
        out.update(zeroshot_top1=top[1], zeroshot_top5=top[5],
                   zeroshot_mean_per_class_recall=mean_per_class_recall(images @ class_features.T, labels))
    if "retrieval" in eval_sets:
        images, texts = zip(*[(embed(model.encode_image, x, device, precision),
                               embed(model.encode_text, vit.trim_tokens(t.flatten(0, 1)), device,
                                     precision).view(*t.shape[:2], -1))
                              for x, t in progress(eval_sets["retrieval"]["batches"], "retrieval")])
        images, texts = torch.cat(images), torch.cat(texts)  # (N, E), (N, k, E): k captions per image
        text_image = torch.arange(len(images), device=device).repeat_interleave(texts.shape[1])
        out.update(retrieval_recall(images, texts.flatten(0, 1), text_image))
    model.train(was_training)
    return out


# -----------------------------------------------------------------------------
# linear probes on frozen image features


@torch.no_grad()
def image_features(model, batches, device, precision="", desc="image features"):
    """Normalised image features (N, E) of the frozen model and the targets (N, ...) of `batches`, an iterable of
    (images, targets): computed once, kept in memory on the CPU, so that every probe fit reuses them."""
    was_training = model.training
    model.eval()
    features, targets = zip(*[(embed(model.encode_image, x, device, precision, len(x)).cpu(), y)
                              for x, y in progress(batches, desc)])
    model.train(was_training)
    return torch.cat(features), torch.cat(targets)


# the linear probe's stopping rule: L-BFGS runs until the fit has converged, not for a fixed number of iterations
# (a cap of 100, scikit-learn's default, stopped 1,797 digits' 512-d features at a loss of 0.363 where the optimum is
# 0.266: 2 points of top-1). The fit runs in float64 (fp32 cannot resolve the last steps along the nearly collinear
# directions of real features: it stalls short of the optimum), and stops when the largest gradient component is below
# PROBE_GRAD_TOL or one iteration changes the loss (or every weight) by less than PROBE_CHANGE_TOL times the starting
# loss; PROBE_MAX_ITER is only a safety cap, with a warning when it is reached.
PROBE_GRAD_TOL = 1e-6     # on standardised features, of the mean cross-entropy: within ~1e-5 of the optimal loss
PROBE_CHANGE_TOL = 1e-10  # relative: a fit that no longer moves
PROBE_MAX_ITER = 10_000   # 100x scikit-learn's default; the fits here converge in tens to hundreds of iterations


def fit_logistic(features, labels, n_classes, weight_decay, start=None, max_iter=PROBE_MAX_ITER, converge=True):
    """Multinomial logistic regression by full-batch L-BFGS, run to convergence (the stopping rule above): mean
    cross-entropy + weight_decay / 2 * |W|^2 (the bias is not decayed), on features standardised with their own mean
    and std. Returns (W (D, K), b (K,)) for the raw features, deterministic (from zeros, or from `start`, an earlier
    solution on the same features). converge=False: the quick fit of the synthetic attribute probes (fp32, at most
    100 iterations, gradient tolerance 1e-5), which train.py's final evaluation runs on 4,000 pictures per attribute;
    run to convergence there, it took minutes instead of seconds."""
    if not converge:
        max_iter = 100  # scikit-learn's LogisticRegression default
    dtype = torch.float32 if features.device.type == "mps" or not converge else torch.float64  # MPS: no float64
    features = features.to(dtype)
    mean, std = features.mean(dim=0), features.std(dim=0) + 1e-6  # + 1e-6: a constant feature divides by no zero
    x = (features - mean) / std  # (N, D)
    W, b = (x.new_zeros(x.shape[1], n_classes), x.new_zeros(n_classes)) if start is None else \
        (start[0].to(dtype) * std[:, None], start[1].to(dtype) + mean @ start[0].to(dtype))
    W, b = W.clone().requires_grad_(), b.clone().requires_grad_()

    def objective():
        return F.cross_entropy(x @ W + b, labels) + weight_decay / 2 * W.pow(2).sum()
    with torch.no_grad():
        scale = objective().item()  # the starting loss: the change tolerance is relative to it
    # the CLIP paper's solver: L-BFGS; lr 1 is the quasi-Newton step, which the strong-Wolfe line search then scales;
    # 20 past gradients kept (torch's default, 100, costs memory for no gain here)
    optimizer = torch.optim.LBFGS([W, b], lr=1, max_iter=max_iter, history_size=20,
                                  max_eval=2 * max_iter if converge else None,  # None: torch's default, 1.25x
                                  tolerance_grad=PROBE_GRAD_TOL if converge else 1e-5,
                                  tolerance_change=PROBE_CHANGE_TOL * scale if converge else 1e-9,
                                  line_search_fn="strong_wolfe")

    def loss():  # L-BFGS evaluates it several times per step
        optimizer.zero_grad()
        value = objective()
        value.backward()
        return value
    optimizer.step(loss)
    if converge and optimizer.state[W].get("n_iter", 0) >= max_iter:
        print(f"warning: the linear probe (weight decay {weight_decay:g}) reached its safety cap of {max_iter} L-BFGS "
              "iterations before converging; its figures may be low", file=sys.stderr)
    W, b = W.detach() / std[:, None], b.detach()
    return W.float(), (b - mean @ W).float()  # ((x - mean) / std) @ W + b == x @ (W / std) + (b - mean @ (W / std))


def held_out_split(labels, fraction, seed):
    """(kept, held-out) indices: a seeded draw of `fraction` of each class (rounded down) held out."""
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    order = order[labels[order].argsort(stable=True)]  # grouped by class, shuffled within each
    grouped = labels[order]
    place = torch.arange(len(order)) - torch.searchsorted(grouped, grouped)  # 0, 1, ... within each class
    held = place < (fraction * torch.bincount(labels)[grouped]).floor()
    return order[~held], order[held]


def linear_probe(train_features, train_labels, test_features, test_labels, *, weight_decays=WEIGHT_DECAYS,
                 val_fraction=0.2, seed=0, device="cpu", converge=True):
    """Logistic regression on frozen features (N, D) with labels (N,): the weight decay that classifies a held-out
    `val_fraction` of the training split best (the smallest among ties) is refit on the whole split, each fit run to
    convergence (converge=False: fit_logistic's quick fits). Returns the test split's classification_metrics (top1,
    top5, mean_per_class_recall) and the weight_decay chosen."""
    x, y = train_features.float().to(device), train_labels.to(device)
    n_classes = int(max(train_labels.max(), test_labels.max())) + 1
    kept, held = (i.to(device) for i in held_out_split(train_labels.cpu(), val_fraction, seed))
    if len(held) == 0:
        raise ValueError(f"linear probe: {len(train_labels)} training samples leave no held-out part to choose the "
                         f"weight decay on; give at least {math.ceil(1 / val_fraction)} images per class")
    threads = torch.get_num_threads()
    if x.device.type == "cpu":  # small steps: on a busy CPU, two threads made 2000 x 512 features 4-20x slower
        torch.set_num_threads(1)
    try:
        best, start = (-1.0, None), None
        for weight_decay in sorted(weight_decays, reverse=True):  # strongest first: each fit starts from the last
            start = fit_logistic(x[kept], y[kept], n_classes, weight_decay, start, converge=converge)
            accuracy = ((x[held] @ start[0] + start[1]).argmax(dim=-1) == y[held]).float().mean().item()
            best = max(best, (accuracy, -weight_decay))  # ties: the smaller weight decay
        weight_decay = -best[1]
        W, b = fit_logistic(x, y, n_classes, weight_decay, converge=converge)
    finally:
        torch.set_num_threads(threads)
    logits = test_features.float().to(device) @ W + b  # (M, K)
    return {**classification_metrics(logits, test_labels.to(device)), "weight_decay": weight_decay}


def attribute_probes(model, probe_sets, device, precision="", batch_size=256, converge=False, **probe_args):
    """Linear-probe top-1 of the frozen image tower for each attribute of the probe sets, as probe_<attribute>:
    {"train": (images [N,3,H,W], {attribute: labels long [N]}), "test": (images [M,3,H,W], {attribute: labels [M]})}.
    A label < 0 (an attribute a picture does not have) leaves that picture out of that attribute's probe, and an
    attribute no picture has is left out. The fits are fit_logistic's quick ones unless converge=True: a run's own
    probe figures and `evaluate.py --synthetic-probes` agree, in seconds."""
    names, features = list(probe_sets["train"][1]), []
    for split in ("train", "test"):
        images, labels = probe_sets[split]
        if set(labels) != set(names):
            raise ValueError(f"probe sets: the {split} split's attributes {sorted(labels)} are not {sorted(names)}")
        targets = torch.stack([labels[name] for name in names], dim=1)  # (N, attributes)
        batches = zip(images.split(batch_size), targets.split(batch_size))
        features.append(image_features(model, batches, device, precision, f"{split} probe features"))
    (train_x, train_y), (test_x, test_y) = features  # computed once for all the attributes
    out = {}
    for j, name in enumerate(names):
        fit, test = train_y[:, j] >= 0, test_y[:, j] >= 0
        if not fit.any() or not test.any():  # no picture has it (e.g. relations in a set without two objects)
            continue
        result = linear_probe(train_x[fit], train_y[fit, j], test_x[test], test_y[test, j], device=device,
                              converge=converge, **probe_args)
        out[f"probe_{name}"] = result["top1"]
    return out


# -----------------------------------------------------------------------------
# fine-tuning: the image tower and a linear head, end to end


class Classifier(nn.Module):
    def __init__(self, visual, embed_dim, n_classes):
        super().__init__()
        self.visual = visual
        self.head = nn.Linear(embed_dim, n_classes)
        nn.init.zeros_(self.head.weight)  # every class equally likely at the start
        nn.init.zeros_(self.head.bias)

    def forward(self, images):
        return self.head(self.visual(images))  # (B, classes), on the image embedding (before normalisation)


def picture_counts(batches, files=None):
    """The pictures scored and skipped (by kind) in the passes made over `batches`: an EvalBatches read from disk
    (with the files its ImageFolder `files` left out before reading), or in-memory (images, targets) batches."""
    if not isinstance(batches, data.EvalBatches):
        return {"scored": sum(len(images) for images, _ in batches), "skipped": {}}
    skipped = batches.skipped + (files.skipped if files is not None else Counter())
    return {"scored": batches.scored, "skipped": dict(sorted(skipped.items()))}


def folder_pair(train_dir, test_dir, flag, draft=None):
    """The training and test ImageFolders (data.Files with labels) and the class names, which must be the same."""
    (train_files, names), (test_files, test_names) = (data.image_folder(d, draft, flag) for d in (train_dir, test_dir))
    if names != test_names:
        raise ValueError(f"{flag}: {train_dir} and {test_dir} have different class folders (in one only: "
                         f"{sorted(set(names) ^ set(test_names))[:3]}); give both splits the same class folders")
    return train_files, test_files, names


# fine-tuning's floor on optimizer steps: a small training split at the default 5 epochs makes too few steps to train
# the zero-initialised head (1,437 digits at batch 256: 25 steps, 30% top-1; at batch 64 for 10 epochs, 200 steps
# at lr 1e-3: 71%), so a split that gives fewer than FINETUNE_MIN_STEPS in `epochs` passes gets more passes
FINETUNE_MIN_STEPS = 200


def finetune_epochs(epochs, pictures, batch_size, min_steps=FINETUNE_MIN_STEPS):
    """The passes fine-tuning makes: `epochs`, or more when they give fewer than min_steps optimizer steps (epochs
    = 0 stays 0: the initial head)."""
    steps_per_epoch = math.ceil(pictures / batch_size)
    return max(epochs, math.ceil(min_steps / steps_per_epoch)) if epochs > 0 else 0


def finetune(model, train_folder, test_folder, device, *, epochs=5, lr=1e-4, weight_decay=0.1, batch_size=64,
             workers=0, seed=0, precision="fp32", min_steps=FINETUNE_MIN_STEPS, pictures=None):
    """Fine-tune a copy of `model`'s image tower with a zero-initialised linear head on an ImageFolder's training
    split (data.train_transform at the model's image size; AdamW, open_clip's parameter groups, 10% warmup, then
    cosine decay) for `epochs` passes, or for as many as make min_steps optimizer steps (finetune_epochs), and return
    the test split's (data.eval_transform) classification_metrics. The caller's model is not changed; epochs=0 gives
    the initial head's figures. `pictures`, a dict, receives the pictures scored and skipped of both splits."""
    device = torch.device(device)
    train_files, test_files, names = folder_pair(train_folder, test_folder, "--finetune", model.cfg.image_size)
    items = data.EvalItems(train_files, data.train_transform(model.cfg.image_size))
    wanted, epochs = epochs, finetune_epochs(epochs, len(items), batch_size, min_steps)
    if epochs != wanted:
        print(f"fine-tuning: {len(items)} pictures at batch {batch_size} make {math.ceil(len(items) / batch_size)} "
              f"steps per epoch; {epochs} epochs instead of {wanted}, for the minimum of {min_steps} steps",
              file=sys.stderr)
    total_steps = epochs * math.ceil(len(items) / batch_size)
    with torch.random.fork_rng(devices=[]):  # seeded head, order and augmentation; the caller's RNG untouched
        torch.manual_seed(seed)
        classifier = Classifier(copy.deepcopy(model.visual), model.cfg.embed_dim, len(names)).to(device).train()
        # open_clip's groups; torch's default betas and eps (this is fine-tuning, not CLIP's pre-training recipe)
        optimizer = torch.optim.AdamW(recipe.param_groups(classifier, weight_decay), lr=lr)
        step = 0
        for epoch in range(epochs):
            batches = data.EvalBatches(Subset(items, torch.randperm(len(items)).tolist()), batch_size, workers)
            for images, labels in progress(batches, f"fine-tuning, epoch {epoch + 1}/{epochs}"):
                for group in optimizer.param_groups:
                    group["lr"] = recipe.lr_at(step, total_steps, total_steps // 10, lr)  # 10% warmup
                with runtime.autocast(device, precision):
                    logits = classifier(images.to(device))
                loss = F.cross_entropy(logits.float(), labels.to(device))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                step += 1
            if epoch == 0 and pictures is not None:  # every pass reads the same pictures
                pictures["finetune_train"] = picture_counts(batches, train_files)
    classifier.eval()
    test = data.EvalBatches(data.EvalItems(test_files, data.eval_transform(model.cfg.image_size)), batch_size, workers)
    with torch.no_grad(), runtime.autocast(device, precision):
        logits, labels = zip(*[(classifier(x.to(device)).float().cpu(), y) for x, y in progress(test, "fine-tune test")])
    if pictures is not None:
        pictures["finetune_test"] = picture_counts(test, test_files)
    return classification_metrics(torch.cat(logits), torch.cat(labels))


# -----------------------------------------------------------------------------
# command line: python evaluate.py --model M [tasks]


PRECISIONS = ("fp32", "bf16")  # fine-tuning trains too: fp16 would need a GradScaler


def parse_args(argv=None):
    p = runtime.ArgumentParser(description="Evaluate a CLIP model: zero-shot, retrieval, linear probe, fine-tuning "
                                "and synthetic attribute probes. Prints a markdown table, writes JSON.")
    p.add_argument("--model", required=True, help="checkpoint.pt, a run or chain-stage folder, an open_clip local-dir "
                   "or checkpoint file, or an official CoM-PT checkpoint")
    p.add_argument("--out", default="", help="JSON file of the metrics (default: evaluate.json). With --format "
                   "clip_benchmark, one file per task: {task}, {dataset} and {model} in the name are filled in, as in "
                   "CLIP_benchmark's --output (default: clip_benchmark_{task}.json)")
    p.add_argument("--format", default="ours", choices=["ours", "clip_benchmark"], help="ours: one JSON of every "
                   "metric with the config and the pictures read; clip_benchmark: CLIP_benchmark's layout and metric "
                   "names, one record per task (dataset, model, pretrained, task, metrics, language)")
    # tasks; none: the synthetic zero-shot and retrieval (models with the byte tokenizer)
    p.add_argument("--zeroshot", default="", help="an ImageFolder <dir>/<class name>/<image>, or synthetic")
    p.add_argument("--retrieval", default="", help="synthetic, a .csv/.tsv, .tar shards or a folder (as train.py's --data)")
    p.add_argument("--linear-probe", default="", metavar="TRAIN_DIR,TEST_DIR", help="two ImageFolders with the same "
                   "classes: logistic regression on the frozen image features, fitted to convergence")
    p.add_argument("--finetune", default="", metavar="TRAIN_DIR,TEST_DIR", help="two ImageFolders with the same "
                   "classes: the image tower and a linear head trained end to end")
    p.add_argument("--synthetic-probes", action="store_true", help="linear probes of the synthetic set's attributes")
    # data
    p.add_argument("--templates", default="", help="file of zero-shot prompts, one a line with {} for the class name "
                   "(default: 7 open_clip prompts for an ImageFolder, 3 for synthetic)")
    p.add_argument("--bpe", default="", help="CLIP BPE vocabulary file, for a model with the clip-bpe tokenizer")
    p.add_argument("--data-root", default="", help="folder the image paths of a --retrieval csv are relative to")
    p.add_argument("--csv-img-key", default="filepath", help="csv/tsv column of the image paths")
    p.add_argument("--csv-caption-key", default="title", help="csv/tsv caption column(s), comma-separated")
    p.add_argument("--captions-per-image", type=int, default=1, help="captions per image for --retrieval")
    # fine-tuning
    p.add_argument("--finetune-epochs", type=int, default=5, help="passes over the training split (more when they "
                   "make fewer than --finetune-min-steps steps)")
    p.add_argument("--finetune-min-steps", type=int, default=FINETUNE_MIN_STEPS, help="the fewest optimizer steps: "
                   "a small split gets ceil(steps / steps per epoch) epochs instead (0: exactly --finetune-epochs)")
    p.add_argument("--finetune-batch-size", type=int, default=64, help="pictures per fine-tuning step")
    p.add_argument("--finetune-lr", type=float, default=1e-4, help="peak AdamW learning rate")
    p.add_argument("--finetune-wd", type=float, default=0.1, help="AdamW weight decay (not on gains and biases)")
    # runtime
    p.add_argument("--device", default="auto", help="auto (cuda, else mps, else cpu), cpu, cuda, cuda:N or mps")
    p.add_argument("--precision", default="fp32", choices=PRECISIONS, help="fp32 (the references': CLIP_benchmark, "
                   "open_clip) or bf16 autocast (faster on GPUs and bf16 CPUs; a picture or two may change class)")
    p.add_argument("--batch-size", type=int, default=256, help="images per batch when computing features")
    p.add_argument("--workers", type=int, default=0, help="data loading processes (0: load in this process)")
    p.add_argument("--seed", type=int, default=0, help="seed of the probes' held-out split and of fine-tuning")
    args = p.parse_args(argv)
    args.out = args.out or ("clip_benchmark_{task}.json" if args.format == "clip_benchmark" else "evaluate.json")
    return args


def pair(value, flag):
    dirs = value.split(",")
    if len(dirs) != 2 or not all(dirs):
        raise ValueError(f"{flag} {value}: give two folders, TRAIN_DIR,TEST_DIR (e.g. {flag} data/train,data/test)")
    return dirs


def tasks_of(args, cfg):
    """The tasks asked for, as {task: dataset}; none asked: the synthetic zero-shot and retrieval. One rule says which
    tasks a model can take: the synthetic captions (zero-shot prompts, retrieval captions) are only for a model with
    the byte tokenizer, the one train.py uses on the synthetic set; any other model has never read them."""
    tasks = {"zeroshot": args.zeroshot, "retrieval": args.retrieval, "linear_probe": args.linear_probe,
             "finetune": args.finetune, "synthetic_probes": "synthetic" if args.synthetic_probes else ""}
    tasks = {task: dataset for task, dataset in tasks.items() if dataset} or \
        {"zeroshot": "synthetic", "retrieval": "synthetic"}
    synthetic_text = [f"--{t} synthetic" for t in ("zeroshot", "retrieval") if tasks.get(t) == "synthetic"]
    if synthetic_text and cfg.tokenizer != "byte":
        what = "so no synthetic task" if not any(vars(args)[t] for t in ("zeroshot", "retrieval", "linear_probe",
                                                                          "finetune", "synthetic_probes")) else \
            f"and the synthetic captions are for byte-tokenizer models: {' and '.join(synthetic_text)} is refused"
        raise ValueError(f"--model {args.model} has the {cfg.tokenizer} tokenizer, {what}; give --zeroshot DIR, "
                         "--retrieval SOURCE, --linear-probe TRAIN_DIR,TEST_DIR or --finetune ...")
    return tasks


def prepare(args, cfg):
    """Every input the flags name, opened and checked before any work: (eval sets for evaluate(), linear-probe
    folders, fine-tuning folders, attribute probe sets), each None or empty when not asked for."""
    tasks = tasks_of(args, cfg)
    for name in ("batch_size", "captions_per_image", "finetune_epochs", "finetune_batch_size"):
        if getattr(args, name) <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.finetune_min_steps < 0:
        raise ValueError(f"--finetune-min-steps must be 0 or more, got {args.finetune_min_steps}")
    if args.format == "clip_benchmark" and len(tasks) > 1 and "{task}" not in args.out:
        raise ValueError(f"--out {args.out}: {len(tasks)} tasks ({', '.join(tasks)}) make one CLIP_benchmark record "
                         "each; put {task} in the file name, e.g. --out 'results/{dataset}_{task}.json'")
    needs_text = "zeroshot" in tasks or "retrieval" in tasks
    shape = dict(tokenizer=data.get_tokenizer(cfg.tokenizer, args.bpe or None) if needs_text else None,
                 context_length=cfg.context_length, image_size=cfg.image_size, batch_size=args.batch_size,
                 workers=args.workers, templates=args.templates or None)
    own = build_eval_sets("synthetic", **shape) if "synthetic" in (tasks.get("zeroshot"), tasks.get("retrieval"),
                                                                   tasks.get("synthetic_probes")) else {}
    sets = {task: own[task] for task in ("zeroshot", "retrieval") if tasks.get(task) == "synthetic"}
    if tasks.get("zeroshot", "synthetic") != "synthetic":
        data.image_folder(args.zeroshot, flag="--zeroshot")  # its errors name this flag
        sets["zeroshot"] = build_eval_sets(None, zeroshot_data=args.zeroshot, **shape)["zeroshot"]
    if tasks.get("retrieval", "synthetic") != "synthetic":
        sets["retrieval"] = build_eval_sets(None, val_data=args.retrieval, data_root=args.data_root or None,
                                            csv_img_key=args.csv_img_key, csv_caption_key=args.csv_caption_key,
                                            captions_per_image=args.captions_per_image, **shape)["retrieval"]
    probe = folder_pair(*pair(args.linear_probe, "--linear-probe"), "--linear-probe", cfg.image_size) \
        if args.linear_probe else None
    tune = pair(args.finetune, "--finetune") if args.finetune else None
    if tune:
        folder_pair(*tune, "--finetune")  # checked now, read again by finetune()
    return sets, probe, tune, own["probes"] if args.synthetic_probes else None


def run(args, model, device, sets, probe, tune, probe_sets):
    """The metrics of every task asked for, by name, and the pictures each read: scored and skipped by kind."""
    metrics = evaluate(model, sets, device, args.precision) if sets else {}
    pictures = {task: picture_counts(sets[task]["batches"], getattr(getattr(sets[task]["batches"], "dataset", None),
                                                                    "source", None))
                for task in sets}
    if probe:
        train_files, test_files, _ = probe
        transform = data.eval_transform(model.cfg.image_size)  # as CLIP_benchmark: the model's test preprocessing
        features = []
        for split, files in (("train", train_files), ("test", test_files)):
            batches = data.EvalBatches(data.EvalItems(files, transform), args.batch_size, args.workers)
            features.append(image_features(model, batches, device, args.precision, f"linear probe, {split} features"))
            pictures[f"linear_probe_{split}"] = picture_counts(batches, files)
        (train_x, train_y), (test_x, test_y) = features
        result = linear_probe(train_x, train_y, test_x, test_y, seed=args.seed, device=device)
        metrics.update({f"linear_probe_{k}": v for k, v in result.items()})
    if tune:
        result = finetune(model, *tune, device, epochs=args.finetune_epochs, lr=args.finetune_lr,
                          weight_decay=args.finetune_wd, batch_size=args.finetune_batch_size, workers=args.workers,
                          seed=args.seed, precision=args.precision, min_steps=args.finetune_min_steps,
                          pictures=pictures)
        metrics.update({f"finetune_{k}": v for k, v in result.items()})
    if probe_sets:
        pictures.update({f"synthetic_probes_{split}": {"scored": len(probe_sets[split][0]), "skipped": {}}
                         for split in ("train", "test")})  # in memory: none to skip
        metrics.update(attribute_probes(model, probe_sets, device, args.precision, batch_size=args.batch_size,
                                        seed=args.seed))
    return metrics, pictures


def markdown(metrics):
    def cell(k, v):
        return "undefined" if v is None else f"{v:g}" if "weight_decay" in k else f"{100 * v:.2f}%"
    return "\n".join(["| metric | value |", "| --- | ---: |"] + [f"| {k} | {cell(k, v)} |" for k, v in metrics.items()])


def skipped_line(pictures):
    """One line naming every picture left out, by task and kind; "" when none was."""
    parts = [f"{task} {sum(c['skipped'].values())} of {c['scored'] + sum(c['skipped'].values())} (" +
             ", ".join(f"{kind} {n}" for kind, n in c["skipped"].items()) + ")"
             for task, c in pictures.items() if c["skipped"]]
    return "pictures skipped: " + "; ".join(parts) if parts else ""


# CLIP_benchmark's names: its task, and its metric name for each of ours (retrieval: "image retrieval" finds the image
# of a caption, our t2i; "text retrieval" the captions of an image, our i2t). Fine-tuning and the synthetic probes are
# not CLIP_benchmark tasks: they keep the zero-shot names (acc1, ...) and ours.
CLIP_BENCHMARK = {
    "zeroshot": ("zeroshot_classification", {"zeroshot_top1": "acc1", "zeroshot_top5": "acc5",
                                             "zeroshot_mean_per_class_recall": "mean_per_class_recall"}),
    "retrieval": ("zeroshot_retrieval", {f"{ours}_R@{k}": f"{theirs}_retrieval_recall@{k}" for k in (1, 5, 10)
                                         for ours, theirs in (("t2i", "image"), ("i2t", "text"))}),
    "linear_probe": ("linear_probe", {"linear_probe_top1": "lp_acc1", "linear_probe_top5": "lp_acc5",
                                      "linear_probe_mean_per_class_recall": "lp_mean_per_class_recall"}),
    "finetune": ("finetuning", {"finetune_top1": "acc1", "finetune_top5": "acc5",
                                "finetune_mean_per_class_recall": "mean_per_class_recall"}),
    "synthetic_probes": ("synthetic_probes", {f"probe_{name}": f"probe_{name}" for name in synthetic.ATTRIBUTES}),
}


def size_name(cfg):
    """The registered size (vit.SIZES) whose tower shapes `cfg` has, else "custom"."""
    return next((name for name, shape in vit.SIZES.items() if all(getattr(cfg, k) == v for k, v in shape.items())),
                "custom")


def clip_benchmark_records(args, cfg, tasks, metrics, pictures, device):
    """{file name: record} in CLIP_benchmark's layout (its cli.py's dump: dataset, model, pretrained, task, metrics,
    language), one per task, with precision, device and the pictures read added; model is the size, pretrained the
    checkpoint path."""
    records = {}
    for task, dataset in tasks.items():
        name, keys = CLIP_BENCHMARK[task]
        slug = dataset.replace("/", "_").strip("_")  # as CLIP_benchmark's {dataset} in --output
        record = {"dataset": dataset, "model": size_name(cfg), "pretrained": args.model, "task": name,
                  "metrics": {theirs: metrics[ours] for ours, theirs in keys.items() if ours in metrics},
                  "language": "en", "precision": args.precision, "device": str(device),
                  "pictures": {part: c for part, c in pictures.items() if part.startswith(task)}}
        records[args.out.format(task=name, dataset=slug, model=record["model"])] = record
    return records


@runtime.stops_cleanly("nothing was written; rerun the same command")  # Ctrl-C: one line, exit 130
def main(argv=None):
    args = parse_args(argv)
    try:
        device = runtime.pick_device(args.device)
        if os.path.isdir(args.out):
            raise ValueError(f"--out {args.out} is a folder; give a file, e.g. {os.path.join(args.out, 'evaluate.json')}")
        runtime.check_out_dir(os.path.dirname(os.path.abspath(args.out)), "--out")
        model = interop.load_model(args.model, device).eval()
        tasks = tasks_of(args, model.cfg)
        inputs = prepare(args, model.cfg)
        STAGE_LINES["on"] = True
        try:
            metrics, pictures = run(args, model, device, *inputs)
        finally:
            STAGE_LINES["on"] = False
        print(markdown(metrics))
        if skipped_line(pictures):
            print(skipped_line(pictures))
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        if args.format == "clip_benchmark":
            for path, record in clip_benchmark_records(args, model.cfg, tasks, metrics, pictures, device).items():
                runtime.save_json(record, path)
        else:
            runtime.save_json({"model": args.model, "config": model.cfg.to_dict(), "tasks": tasks, "metrics": metrics,
                               "precision": args.precision, "device": str(device), "pictures": pictures,
                               "args": vars(args), "git": runtime.git_hash()}, args.out)
    except runtime.USER_ERRORS as e:  # one line, no traceback (exit status 2 for bad input)
        runtime.exit_with(e)
    return metrics


if __name__ == "__main__":
    main()
