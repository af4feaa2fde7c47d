"""
Data for CLIP pre-training: transforms, the embedded synthetic caption set, training batches and the
zero-shot / retrieval evaluation sets. Tokenizers live in tokenizer.py (re-exported here).

The paper (CoM-PT, Fan et al. 2026) trains on CC3M; the chain itself does not depend on the data, so the
default source is `synthetic`: procedurally drawn pictures of coloured shapes with captions, needing no
files. It is meant to be learnable but not trivial: captions bind colour to shape, give size and position,
and for two-object pictures a spatial relation, each in five paraphrases; small shapes are 6-9 px at
32 px, colours are jittered on a noisy background. Raw-pixel nearest neighbours stay far from solving it.

Determinism: the global order of an epoch is a permutation drawn from (seed, epoch); each sample's
augmentation and caption choice come from (seed, epoch, index) only, under a forked RNG, so the stream
does not depend on the number of workers and the caller's global RNG is never touched.
"""

import math
from collections import Counter

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T

from tokenizer import get_tokenizer, tokenize  # noqa: F401  (re-exported)

# -----------------------------------------------------------------------------
# transforms (open_clip's image_transform)

MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP
STD = (0.26862954, 0.26130258, 0.27577711)


def _to_rgb(image):
    return image.convert("RGB")


def train_transform(image_size):
    return T.Compose([
        T.RandomResizedCrop(image_size, scale=(0.9, 1.0), interpolation=T.InterpolationMode.BICUBIC),
        _to_rgb, T.ToTensor(), T.Normalize(MEAN, STD)])


def eval_transform(image_size):
    return T.Compose([
        T.Resize(image_size, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(image_size),
        _to_rgb, T.ToTensor(), T.Normalize(MEAN, STD)])


# -----------------------------------------------------------------------------
# the synthetic caption set

SYNTHETIC_IMAGE_SIZE = 32      # small shapes stay recognisable; a ViT with patch 8 sees 16 tokens
SYNTHETIC_CONTEXT_LENGTH = 48  # the longest caption is 46 bytes, + SOT + EOT
SYNTHETIC_NUM_SAMPLES = 10_000

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (230, 210, 40),
           "purple": (140, 50, 180), "cyan": (40, 200, 210), "pink": (245, 140, 190), "white": (245, 245, 245)}
SHAPES = ("circle", "square", "triangle", "diamond", "cross", "ring")
CLASSNAMES = [f"{c} {s}" for c in COLOURS for s in SHAPES]  # zero-shot classes: 8 x 6 = 48
TEMPLATES = ("a {}", "a small {}", "a large {}")  # zero-shot prompts, averaged per class as CLIP does
_POSITIONS = ("at the top left", "at the top", "at the top right", "on the left", "in the center",
              "on the right", "at the bottom left", "at the bottom", "at the bottom right")  # a 3 x 3 grid
_ONE = ("a {size} {c} {s} {pos}", "{pos2}: a {size} {c} {s}", "a {c} {s}, {size}, {pos}",
        "{size} {c} {s} {pos}", "a {size} {s} in {c} {pos}")
_TWO = ("a {c} {s} {rel} a {c2} {s2}", "a {c2} {s2} {inv} a {c} {s}", "{c} {s} {rel} {c2} {s2}",
        "{s} in {c} {rel} {s2} in {c2}", "{c2} {s2} {inv} {c} {s}")
_RELATIONS = {"left of": ((-1, 0), "right of"), "right of": ((1, 0), "left of"),
              "above": ((0, -1), "below"), "below": ((0, 1), "above")}
_SPLITS = {"train": 0, "retrieval": 1, "zeroshot": 2}


def _draw_shape(draw, shape, cx, cy, r, fill):
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "ring":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=fill, width=max(2, round(0.4 * r)))
    elif shape == "square":
        h = 0.85 * r  # same area feel as the circle
        draw.rectangle([cx - h, cy - h, cx + h, cy + h], fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx + r, cy + 0.8 * r), (cx - r, cy + 0.8 * r)], fill=fill)
    elif shape == "diamond":
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)
    else:  # cross
        w = 0.3 * r
        draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=fill)
        draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=fill)


def synthetic_sample(seed, split, index, image_size=SYNTHETIC_IMAGE_SIZE, two_objects=None):
    """Draw picture `index` of `split` ("train", "retrieval", "zeroshot"): (PIL image, 5 captions, label).

    Everything comes from (seed, split, index). label = the class of the (first) object in CLASSNAMES.
    Zero-shot pictures hold one object; others hold two with probability 0.4.
    """
    rng = np.random.default_rng([seed, _SPLITS[split], index])
    S = 2 * image_size  # drawn at twice the size, then box-downsampled: cheap anti-aliasing
    grey = rng.uniform(60, 150)
    ramp = rng.uniform(-25, 25) * np.linspace(-1, 1, S)
    bg = np.broadcast_to(grey + (ramp[None, :] if rng.random() < 0.5 else ramp[:, None]), (S, S))  # a gentle gradient
    image = Image.fromarray(np.repeat(np.clip(bg, 0, 255)[..., None], 3, -1).astype(np.uint8))
    draw = ImageDraw.Draw(image)

    def colour(name=None):
        name = int(rng.integers(len(COLOURS))) if name is None else name
        rgb = np.clip(np.array(list(COLOURS.values())[name]) + rng.uniform(-25, 25, 3), 0, 255)
        return name, tuple(int(v) for v in rgb)

    if split == "zeroshot":  # classes in turn, so the set is balanced
        c, s = divmod(index % len(CLASSNAMES), len(SHAPES))
    else:
        c, s = int(rng.integers(len(COLOURS))), int(rng.integers(len(SHAPES)))
    c, rgb = colour(c)
    if two_objects is None:
        two_objects = split != "zeroshot" and rng.random() < 0.4
    if not two_objects:
        large = rng.random() < 0.5
        r = S * (rng.uniform(0.19, 0.25) if large else rng.uniform(0.1, 0.14))
        p = int(rng.integers(len(_POSITIONS)))  # anywhere in its cell of the grid
        cx, cy = np.clip((np.array([p % 3, p // 3]) + rng.uniform(0.15, 0.85, 2)) * S / 3, r, S - r)
        _draw_shape(draw, SHAPES[s], cx, cy, r, rgb)
        pos = _POSITIONS[p]
        words = dict(size="large" if large else "small", c=list(COLOURS)[c], s=SHAPES[s], pos=pos,
                     pos2=pos.split(" ", 2)[-1])
        captions = [t.format(**words) for t in _ONE]
    else:
        while True:  # the second object differs in colour or shape
            c2, rgb2 = colour()
            s2 = int(rng.integers(len(SHAPES)))
            if (c2, s2) != (c, s):
                break
        rel = list(_RELATIONS)[int(rng.integers(4))]
        (dx, dy), inv = _RELATIONS[rel]
        along = rng.uniform(0.22, 0.35, 2)  # distance from the centre line along the relation's axis
        across = rng.uniform(0.35, 0.65, 2)
        for k, (cc, ss, sign) in enumerate(((rgb, s, 1), (rgb2, s2, -1))):
            r = S * rng.uniform(0.1, 0.16)
            a = 0.5 + sign * (dx + dy) * along[k]
            fx, fy = (a, across[k]) if dx else (across[k], a)
            _draw_shape(draw, SHAPES[ss], fx * S, fy * S, r, cc)
        words = dict(c=list(COLOURS)[c], s=SHAPES[s], c2=list(COLOURS)[c2], s2=SHAPES[s2], rel=rel, inv=inv)
        captions = [t.format(**words) for t in _TWO]
    image = image.reduce(2)
    noisy = np.asarray(image, dtype=np.float32) + rng.normal(0, 8, (image_size, image_size, 1))
    image = Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))
    return image, captions, c * len(SHAPES) + s


class Synthetic:
    """`n` training pictures of the synthetic set, as a source of (PIL image, captions)."""

    def __init__(self, n, seed, image_size):
        self.n, self.seed, self.image_size = n, seed, image_size

    def __len__(self):
        return self.n

    def load(self, index):
        image, captions, _ = synthetic_sample(self.seed, "train", index, self.image_size)
        return image, captions


# -----------------------------------------------------------------------------
# training batches


class BadSample(Exception):
    """A sample that cannot be used; .kind names why (counted in TrainData.skipped)."""

    def __init__(self, kind, detail=""):
        super().__init__(f"{kind}: {detail}")
        self.kind = kind


class Pairs(Dataset):
    """Map-style dataset over a source; item (epoch, index) -> (image [3,H,W], tokens [C] or [k,C], skips).

    A bad sample is replaced by another index drawn from (seed, epoch, index), so a batch keeps its size.
    """

    def __init__(self, source, transform, tokenizer, context_length, seed, captions_per_image=1):
        self.source, self.transform, self.tokenizer = source, transform, tokenizer
        self.context_length, self.seed, self.k = context_length, seed, captions_per_image

    def __len__(self):
        return len(self.source)

    def __getitem__(self, key):
        epoch, index = key
        rng = np.random.default_rng([self.seed, epoch, index])
        skips = []
        for _ in range(100):
            try:
                image, captions = self.source.load(index)
                break
            except BadSample as e:
                skips.append(e.kind)
                index = int(rng.integers(len(self.source)))
        else:
            raise RuntimeError(f"100 bad samples in a row ({Counter(skips)}): check the data with `python data.py check`")
        pick = rng.choice(len(captions), self.k, replace=len(captions) < self.k)
        tokens = self.tokenizer([captions[i] for i in pick], self.context_length)  # (k, C)
        with torch.random.fork_rng(devices=[]):  # augmentation from (seed, epoch, index) only
            torch.default_generator.manual_seed(int(rng.integers(2**62)))
            image = self.transform(image)
        return image, tokens[0] if self.k == 1 else tokens, skips


def _collate(items):
    images, tokens, skips = zip(*items)
    return torch.stack(images), torch.stack(tokens), Counter(k for s in skips for k in s)


class TrainData:
    """Batches of one rank: a global batch of batch_size * world_size samples is drawn from a permutation
    of (seed, epoch); rank r takes its r-th slice. The last incomplete global batch is dropped."""

    def __init__(self, dataset, batch_size, workers, seed, rank=0, world_size=1, num_samples=None):
        self.dataset, self.batch_size, self.workers, self.seed = dataset, batch_size, workers, seed
        self.rank, self.world_size = rank, world_size
        self.num_samples = num_samples or len(dataset)
        self.steps_per_epoch = self.num_samples // (batch_size * world_size)
        if self.steps_per_epoch == 0:
            raise ValueError(f"{self.num_samples} samples make no batch of {batch_size} x {world_size} ranks: "
                             f"lower --batch-size or add data")
        self.skipped = Counter()

    def _order(self, epoch):
        g = torch.Generator().manual_seed(int(np.random.default_rng([self.seed, epoch]).integers(2**62)))
        n = len(self.dataset)
        reps = math.ceil(self.num_samples / n)  # an epoch longer than the data wraps around
        return torch.cat([torch.randperm(n, generator=g) for _ in range(reps)])[:self.num_samples]

    def batches(self, epoch, start_step=0):
        """Yield (images [B,3,H,W], tokens [B,C] or [B,k,C]) for steps start_step.. of `epoch`."""
        order = self._order(epoch).tolist()
        B, G = self.batch_size, self.batch_size * self.world_size
        plan = [[(epoch, i) for i in order[t * G + self.rank * B: t * G + (self.rank + 1) * B]]
                for t in range(start_step, self.steps_per_epoch)]
        loader = DataLoader(self.dataset, batch_sampler=plan, num_workers=self.workers, collate_fn=_collate,
                            generator=torch.Generator().manual_seed(self.seed))  # not the global RNG
        for images, tokens, skips in loader:
            self.skipped.update(skips)
            yield images, tokens


def build_train_data(source, *, tokenizer, image_size, context_length, batch_size, workers, seed, rank=0,
                     world_size=1, num_samples=None, data_root=None, csv_img_key="filepath",
                     csv_caption_key="title", captions_per_image=1):
    """TrainData for `source` ("synthetic" for now). tokenizer: a name or a tokenizer object."""
    if isinstance(tokenizer, str):
        tokenizer = get_tokenizer(tokenizer)
    if source == "synthetic":
        src = Synthetic(num_samples or SYNTHETIC_NUM_SAMPLES, seed, image_size)
    else:
        raise ValueError(f"unknown data source {source!r}: use 'synthetic'")
    dataset = Pairs(src, train_transform(image_size), tokenizer, context_length, seed, captions_per_image)
    return TrainData(dataset, batch_size, workers, seed, rank, world_size, num_samples)


# -----------------------------------------------------------------------------
# evaluation sets


def build_eval_sets(source="synthetic", *, tokenizer, image_size, context_length, seed=0, batch_size=256,
                    zeroshot_size=960, retrieval_size=500):
    """Evaluation sets, as a dict (an absent key means no such evaluation):

    "zeroshot": dict(batches=[(images [b,3,H,W], labels long [b]), ...], classnames=[n names],
                     templates=[t prompts with "{}"], tokens=long [n, t, C])  (the prompts, tokenized)
    "retrieval": dict(batches=[(images [b,3,H,W], tokens long [b, k, C]), ...])  (k captions per image;
                     caption j of image i is a match of image i only)

    For the synthetic source both are held out from training (other seeds of the generator): 960
    one-object pictures, 20 per class of the 48 colour-shape classes, and 500 pictures with 5 captions.
    """
    if isinstance(tokenizer, str):
        tokenizer = get_tokenizer(tokenizer)
    if source != "synthetic":
        raise ValueError(f"unknown data source {source!r}: use 'synthetic'")
    tf = eval_transform(image_size)
    zs = [synthetic_sample(seed, "zeroshot", i, image_size) for i in range(zeroshot_size)]
    zs_images = torch.stack([tf(im) for im, _, _ in zs])
    zs_labels = torch.tensor([label for _, _, label in zs])
    prompts = [t.format(c) for c in CLASSNAMES for t in TEMPLATES]
    zs_tokens = tokenizer(prompts, context_length).view(len(CLASSNAMES), len(TEMPLATES), context_length)
    rt = [synthetic_sample(seed, "retrieval", i, image_size) for i in range(retrieval_size)]
    rt_images = torch.stack([tf(im) for im, _, _ in rt])
    rt_tokens = torch.stack([tokenizer(caps, context_length) for _, caps, _ in rt])
    return {
        "zeroshot": dict(batches=list(zip(zs_images.split(batch_size), zs_labels.split(batch_size))),
                         classnames=list(CLASSNAMES), templates=list(TEMPLATES), tokens=zs_tokens),
        "retrieval": dict(batches=list(zip(rt_images.split(batch_size), rt_tokens.split(batch_size)))),
    }
