"""
Evaluation of CLIP models: zero-shot classification and image-text retrieval, as CLIP_benchmark defines them.

Zero-shot (Radford et al. 2021): a class embedding is the mean of its normalised prompt-template embeddings,
renormalised; an image is classified by cosine similarity; metrics top-1 and top-5 accuracy and mean per-class recall
(balanced accuracy). Retrieval: R@k both ways, a query being a hit when any of its positives is among the top k (with
several captions per image). Used by train.py during training and by chain.py's report.
"""

import math
import os

import torch
import torch.nn.functional as F
from tqdm import tqdm

import data
import runtime

SIMPLE_TEMPLATES = ("itap of a {}.", "a bad photo of the {}.", "a origami {}.", "a photo of the large {}.",
                    "a {} in a video game.", "art of the {}.", "a photo of the small {}.")  # open_clip's short set


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
                    caption_sep=None, captions_per_image=1, batch_size=256, workers=0, seed=0):
    """Evaluation sets, as a dict (an absent key means no such evaluation):

    "zeroshot": dict(batches=iterable of (images [b,3,H,W], labels long [b]), classnames=[n names],
                     templates=[t prompts with "{}"], tokens=long [n, t, C])  (the prompts, tokenized)
    "retrieval": dict(batches=iterable of (images [b,3,H,W], tokens long [b, k, C]))  (k captions per
                     image; caption j of image i matches image i only)

    Synthetic source: both held out from training (other seeds of the generator), in memory (lists): 960
    one-object pictures, 20 per class of the 48 colour-shape classes, prompts TEMPLATES; 500 pictures with
    3 captions each (the paraphrases that describe the whole picture). zeroshot_data: an ImageFolder
    (prompts SIMPLE_TEMPLATES, or `templates`: a list or a file); val_data: any caption source, with
    k = captions_per_image. Real sets are EvalBatches, read from disk at each pass (iterate them once per
    evaluation), with bad samples left out and counted in .skipped.
    """
    if isinstance(tokenizer, str):
        tokenizer = data.get_tokenizer(tokenizer)
    tf, sets = data.eval_transform(image_size), {}
    if zeroshot_data or source == "synthetic":
        folder, classnames = data.image_folder(zeroshot_data, image_size) if zeroshot_data else (None, data.CLASSNAMES)
        templates = load_templates(templates, SIMPLE_TEMPLATES if zeroshot_data else data.TEMPLATES)
        prompts = tokenizer([t.format(c) for c in classnames for t in templates], context_length)
        if folder:
            batches = data.EvalBatches(data.EvalItems(folder, tf), batch_size, workers)
        else:
            zs = [data.synthetic_sample(seed, "zeroshot", i, image_size) for i in range(960)]
            images, labels = torch.stack([tf(im) for im, _, _ in zs]), torch.tensor([y for _, _, y in zs])
            batches = list(zip(images.split(batch_size), labels.split(batch_size)))
        sets["zeroshot"] = dict(batches=batches, classnames=list(classnames), templates=templates,
                                tokens=prompts.view(len(classnames), len(templates), context_length))
    if val_data and val_data != "synthetic":
        src = data.open_source(val_data, image_size=image_size, data_root=data_root, csv_img_key=csv_img_key,
                          csv_caption_key=csv_caption_key, caption_sep=caption_sep)
        items = data.EvalItems(src, tf, tokenizer, context_length, captions_per_image)
        sets["retrieval"] = dict(batches=data.EvalBatches(data.EvalShards(items) if isinstance(src, data.Shards) else items,
                                                     batch_size, workers))
    elif source == "synthetic" or val_data == "synthetic":
        rt = [data.synthetic_sample(seed, "retrieval", i, image_size) for i in range(500)]
        images = torch.stack([tf(im) for im, _, _ in rt])
        tokens = torch.stack([tokenizer(caps[:3], context_length) for _, caps, _ in rt])  # (500, 3, C): full ones
        sets["retrieval"] = dict(batches=list(zip(images.split(batch_size), tokens.split(batch_size))))
    return sets


# -----------------------------------------------------------------------------
# metrics


def zeroshot_accuracy(image_features, labels, class_features, ks=(1, 5)):
    """Top-k accuracy of normalised image features (N, E) classified by normalised class embeddings (K, E)."""
    top = (image_features @ class_features.T).topk(min(max(ks), len(class_features)), dim=-1).indices  # (N, k)
    hits = top == labels[:, None]
    return {k: hits[:, :k].any(dim=-1).float().mean().item() for k in ks}


def mean_per_class_recall(logits, labels):
    """The mean over the classes present in `labels` of the fraction of their samples whose top logit is right
    (CLIP_benchmark's mean per-class recall, sklearn's balanced accuracy)."""
    hits = (logits.argmax(dim=-1) == labels).float()  # (N,)
    counts = torch.bincount(labels, minlength=logits.shape[1]).float()  # (K,)
    right = torch.zeros_like(counts).index_add_(0, labels, hits)
    return (right[counts > 0] / counts[counts > 0]).mean().item()


def classification_metrics(logits, labels):
    return {"top1": (logits.argmax(dim=-1) == labels).float().mean().item(),
            "mean_per_class_recall": mean_per_class_recall(logits, labels)}


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


def progress(batches, desc):
    """A progress bar over `batches` that shows on a terminal once they take more than 3 seconds."""
    total = len(batches) if hasattr(batches, "__len__") else \
        math.ceil(len(batches.dataset) / batches.batch_size) if isinstance(batches, data.EvalBatches) else None
    return tqdm(batches, desc=desc, total=total, delay=3, leave=False, disable=None, unit="batch")


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
        prompts = embed(model.encode_text, zs["tokens"].view(-1, C), device, precision)  # (n_classes * n_templates, E)
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
                               embed(model.encode_text, t.flatten(0, 1), device, precision).view(*t.shape[:2], -1))
                              for x, t in progress(eval_sets["retrieval"]["batches"], "retrieval")])
        images, texts = torch.cat(images), torch.cat(texts)  # (N, E), (N, k, E): k captions per image
        text_image = torch.arange(len(images), device=device).repeat_interleave(texts.shape[1])
        out.update(retrieval_recall(images, texts.flatten(0, 1), text_image))
    model.train(was_training)
    return out
