"""
Data for CLIP pre-training: open_clip's transforms, readers for the formats CC3M (the paper's data, Sec. 4) comes in,
training batches (train_data_for: a run's, from train.py's settings), and the labelled images and caption sets that
evaluate.py scores. The tokenizers live in tokenizer.py (re-exported here), the
embedded synthetic set in synthetic.py (the default source, `synthetic`, needs no files). `python data.py check
SOURCE` reads a source end to end and counts its good and bad samples.

Real sources, named by one string: a .csv/.tsv in open_clip's layout (delimiter sniffed; image paths
relative to data_root, default the CSV's folder; several caption columns "a,b" and/or a separator inside
the field); img2dataset's webdataset shards (a .tar, a brace range, a glob, or a folder of them: members
key.jpg|jpeg|png|webp + key.txt, key.json ignored); img2dataset's "files" folders (key.jpg + key.txt).
A bad sample (corrupt, truncated, empty or not an image, missing file or caption, an unreadable shard) is
replaced so that its batch keeps its size, and counted by kind in TrainData.skipped.

Determinism: for CSV and files sources (and synthetic.py's set) the order of an epoch is a permutation drawn from
(seed, epoch); global batches are consecutive slices of it and rank r takes the r-th part of each. Each
sample's caption choice and augmentation come from (seed, epoch, index) on a forked RNG, so the stream does
not depend on the number of workers and the caller's global RNG is never touched. Shards are read
sequentially instead, which ties their stream to the number of workers too (see ShardStream).

Deviations from open_clip: JPEGs are DCT-downscaled while decoding (never below the training size, so a
224 px crop of a 512 px photo decodes and augments 2x faster); the last incomplete global batch of an epoch is
dropped; bad samples are replaced rather than crashing a worker.
"""

import csv
import glob
import io
import json
import math
import os
import re
import sys
import tarfile
from collections import Counter, deque
from itertools import chain, islice

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info
from torchvision import transforms as T
from torchvision.models import ResNet50_Weights
from tqdm import tqdm

import runtime
import synthetic
from tokenizer import get_tokenizer, tokenize  # noqa: F401  (re-exported)
from vit import MEAN, STD  # CLIP's input normalisation

# -----------------------------------------------------------------------------
# transforms (open_clip's image_transform)



def _to_rgb(image):
    return image.convert("RGB")


def train_transform(image_size):
    return T.Compose([
        T.RandomResizedCrop(image_size, scale=(0.9, 1.0), interpolation=T.InterpolationMode.BICUBIC),  # open_clip's
        _to_rgb, T.ToTensor(), T.Normalize(MEAN, STD)])


def eval_transform(image_size):
    return T.Compose([
        T.Resize(image_size, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(image_size),
        _to_rgb, T.ToTensor(), T.Normalize(MEAN, STD)])


# -----------------------------------------------------------------------------
# the model's data shape per source

REAL_SHAPE = dict(image_size=224, patch_size=16, context_length=77, tokenizer="clip-bpe")  # CLIP's ViT-*-16


def default_shape(source, bpe=""):
    """The model's data-dependent shape for a data source (image size, patch size, context length, tokenizer): the
    synthetic set's own (synthetic.py), or CLIP's for real data. A given BPE vocabulary file selects the CLIP BPE
    tokenizer."""
    shape = dict(synthetic.DATA_SHAPE if source == "synthetic" else REAL_SHAPE)
    if bpe:
        shape["tokenizer"] = "clip-bpe"
    return shape


# -----------------------------------------------------------------------------
# reading real data: a bad sample raises BadSample; it is then skipped, replaced and counted by kind

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
MAX_BAD_IN_A_ROW = 100  # replacements tried for one bad sample before a run stops: the source is broken, not noisy


def too_many_bad(kinds):
    return RuntimeError(f"{MAX_BAD_IN_A_ROW} bad samples in a row ({dict(kinds)}): run `python data.py check DATA`")


class BadSample(Exception):
    """A sample that cannot be used; .kind names why (counted in TrainData.skipped)."""

    def __init__(self, kind, detail=""):
        super().__init__(f"{kind}: {detail}")
        self.kind = kind


def decode_image(raw, draft=None):
    """A path or bytes -> RGB PIL image, EXIF orientation applied. A JPEG is DCT-downscaled while decoding,
    never below `draft` pixels a side (much faster for big photos)."""
    if isinstance(raw, str):
        if not os.path.isfile(raw):
            raise BadSample("missing_file", raw)
        size = os.path.getsize(raw)
    else:
        size, raw = len(raw), io.BytesIO(raw)
    if size == 0:
        raise BadSample("empty_file")
    try:
        with Image.open(raw) as image:
            if draft:
                image.draft("RGB", (draft, draft))
            image = ImageOps.exif_transpose(image)  # a loaded copy
            if image.mode.startswith("I"):  # 16-bit grey (PNG): its top 8 bits (convert() would clip it to white)
                image = Image.fromarray(np.clip(np.asarray(image, dtype=np.int64) >> 8, 0, 255).astype(np.uint8))
            return (image.convert("RGBA") if image.mode == "P" else image).convert("RGB")
    except UnidentifiedImageError as e:
        raise BadSample("not_an_image", str(e))
    except Exception as e:  # truncated, corrupt, decompression bomb...: one bad file never stops a run
        raise BadSample("corrupt_image", f"{type(e).__name__}: {e}")


def decode_captions(raw, sep=None):
    """Bytes or str -> the non-empty captions (several when `sep` splits them)."""
    try:  # not UTF-8 (a CSV is read with surrogateescape, so its stray bytes show here too): a bad sample
        text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
        text.encode("utf-8")
    except (UnicodeDecodeError, UnicodeEncodeError):
        raise BadSample("bad_caption", "not UTF-8")
    captions = [" ".join(c.split()) for c in (text.split(sep) if sep else [text])]
    if not any(captions):
        raise BadSample("empty_caption")
    return [c for c in captions if c]


class Strings:
    """Strings packed in one numpy buffer: DataLoader workers share it, where a list of str objects would be
    copied into each worker page by page as reference counts change (the classic worker memory blow-up)."""

    def __init__(self, strings):
        encoded = [s.encode("utf-8", "surrogateescape") for s in strings]
        self.offsets = np.cumsum([0] + [len(e) for e in encoded])
        self.buffer = np.frombuffer(b"".join(encoded), dtype=np.uint8)

    def __len__(self):
        return len(self.offsets) - 1

    def __getitem__(self, i):
        return self.buffer[self.offsets[i]:self.offsets[i + 1]].tobytes().decode("utf-8", "surrogateescape")


class Files:
    """Image files with captions: a CSV's caption columns (joined by \\x1f), or else key.txt beside key.jpg;
    with labels instead (an ImageFolder), load() returns (image, label)."""

    def __init__(self, images, captions=None, labels=None, sep=None, draft=None):
        self.images, self.captions = Strings(images), captions and Strings(captions)
        self.labels, self.sep, self.draft = labels, sep, draft
        self.skipped = Counter()  # files left out before reading, by kind (an ImageFolder's files that are no picture)

    def __len__(self):
        return len(self.images)

    def load(self, i):
        path = self.images[i]
        if self.labels is not None:
            return decode_image(path, self.draft), self.labels[i]
        if self.captions:
            fields = [f for f in self.captions[i].split("\x1f") if f.strip()]  # an empty extra column is fine
            if not fields:
                raise BadSample("empty_caption", path)
            captions = [c for f in fields for c in decode_captions(f, self.sep)]
        else:
            try:
                with open(os.path.splitext(path)[0] + ".txt", "rb") as f:
                    captions = decode_captions(f.read(), self.sep)
            except FileNotFoundError:
                raise BadSample("missing_caption", path)
        return decode_image(path, self.draft), captions


def read_csv(path, data_root=None, img_key="filepath", caption_key="title", sep=None, draft=None):
    """open_clip's CSV/TSV: the delimiter is sniffed; caption_key may list several columns ("a,b"); image
    paths are relative to data_root (default: the CSV's folder) unless absolute."""
    with open(path, newline="", encoding="utf-8-sig", errors="surrogateescape") as f:  # -sig: a BOM is skipped
        header = f.readline()
        try:
            delimiter = "\t" if "\t" in header else csv.Sniffer().sniff(header, ",;|").delimiter
        except csv.Error:
            delimiter = ","
        f.seek(0)
        reader = csv.DictReader(f, delimiter=delimiter)
        columns, keys = reader.fieldnames or [], [k.strip() for k in caption_key.split(",")]
        for key in [img_key] + keys:
            if key not in columns:
                raise ValueError(f"{path}: no column {key!r}; columns found (delimiter {delimiter!r}): {columns}; "
                                 f"name them with --csv-img-key and --csv-caption-key")
        root = os.path.dirname(os.path.abspath(path)) if data_root is None else data_root
        images, captions = [], []
        for row in reader:
            images.append(os.path.join(root, row[img_key] or ""))
            captions.append("\x1f".join((row[k] or "").replace("\x1f", " ") for k in keys))
    if not images:
        raise ValueError(f"{path}: no rows")
    if not any(os.path.isfile(p) for p in images[:20]):  # the first 20 all missing: a wrong root, not bad samples
        raise FileNotFoundError(f"{path}: images not found (the first is {images[0]}); pass --data-root, the folder "
                                f"that the {img_key!r} paths are relative to")
    return Files(images, captions, sep=sep, draft=draft)


def read_folder(root, sep=None, draft=None):
    """img2dataset's "files" output: key.jpg (or .jpeg/.png/.webp) + key.txt in (sub)folders."""
    images = sorted(os.path.join(d, f) for d, _, names in os.walk(root) for f in names
                    if f.rpartition(".")[2].lower() in IMAGE_EXTS)
    if not any(os.path.isfile(os.path.splitext(p)[0] + ".txt") for p in images):
        raise ValueError(f"data {root}: no .tar shards and no key.jpg + key.txt pairs (img2dataset's webdataset or "
                         f"files layouts)")
    return Files(images, sep=sep, draft=draft)


def expand_shards(source):
    """One .tar, a brace range ("cc3m/{00000..00331}.tar"), a glob, or a folder of .tar -> sorted paths."""
    def braces(s):
        m = re.search(r"\{([^{}]*)\}", s)
        if not m:
            return [s]
        r = re.fullmatch(r"(\d+)\.\.(\d+)", m[1])
        options = [str(i).zfill(len(r[1])) for i in range(int(r[1]), int(r[2]) + 1)] if r else m[1].split(",")
        return [x for o in options for x in braces(s[:m.start()] + o + s[m.end():])]

    if os.path.isdir(source):
        paths = glob.glob(os.path.join(source, "*.tar"))
    else:
        patterns = braces(source)
        paths = [p for pat in patterns for p in (glob.glob(pat) if set("*?[") & set(pat) else [pat])]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing or not paths:
        raise FileNotFoundError(f"data {source!r}: {missing[0] + ' not found' if missing else 'no .tar shards found'} "
                                f"(use synthetic, a .csv/.tsv, .tar shards or a folder of them)")
    if not all(p.endswith(".tar") for p in paths):
        raise ValueError(f"data {source!r}: use synthetic, a .csv/.tsv, .tar shards or a folder of them")
    return sorted(set(paths))


def tar_samples(path, start=0, read=True):
    """The samples of a shard from the start-th on, as dicts ext -> bytes (images and txt only; earlier ones
    are passed over unread). Members sharing a key (folder + name up to the first dot) are one sample. A shard
    unreadable from some point on, or cut short, ends there with "unreadable_shard" (one bad sample) in place of
    the sample it was in, whether its members are read or only counted; a file that is no tar at all yields none."""
    key, n, cut = None, -1, False
    try:
        size = os.path.getsize(path)
        with tarfile.open(path, "r:") as tar:
            cut, sample = True, {}  # until it is read to its end
            for member in tar:
                if member.offset_data + member.size > size:  # its data go past the end of the file
                    break
                if not member.isfile():
                    continue
                folder, name = os.path.split(member.name)
                stem, _, ext = name.partition(".")
                if (folder, stem) != key:
                    if key is not None and n >= start:
                        yield sample
                    key, sample, n = (folder, stem), {}, n + 1
                ext = ext.lower()
                if read and n >= start and (ext in IMAGE_EXTS or ext == "txt"):
                    sample[ext] = tar.extractfile(member).read()
            else:  # read to its end: whole if the end-of-archive marker (two zero blocks, POSIX tar) follows
                tar.fileobj.seek(tar.offset)
                cut = tar.fileobj.read(2 * tarfile.BLOCKSIZE) != bytes(2 * tarfile.BLOCKSIZE)
                if key is not None and n >= start:
                    yield sample
                n += 1
    except (OSError, EOFError, tarfile.TarError):
        pass
    if cut and max(n, 0) >= start:
        yield "unreadable_shard"


def parse_sample(sample, sep=None, draft=None):
    """A tar sample dict (or the kind of its failure) -> (image, captions)."""
    if isinstance(sample, str):
        raise BadSample(sample)
    ext = next((e for e in IMAGE_EXTS if e in sample), None)
    if ext is None or "txt" not in sample:
        raise BadSample("missing_image" if ext is None else "missing_caption")
    return decode_image(sample[ext], draft), decode_captions(sample["txt"], sep)


class Shards:
    """img2dataset webdataset shards: members key.jpg|jpeg|png|webp + key.txt (+ key.json, ignored). A
    shard's sample count comes from its img2dataset NNNNN_stats.json ("successes"), else from one scan."""

    def __init__(self, paths, sep=None, draft=None):
        self.paths, self.sep, self.draft = paths, sep, draft
        self.counts = [self._count(p) for p in paths]

    @staticmethod
    def _count(path):
        try:
            with open(path[:-len(".tar")] + "_stats.json") as f:
                return int(json.load(f)["successes"])
        except (OSError, ValueError, KeyError):
            return sum(1 for _ in tar_samples(path, read=False))

    def __len__(self):
        return sum(self.counts)


def open_source(source, *, image_size=None, data_root=None, csv_img_key="filepath", csv_caption_key="title",
                caption_sep=None):
    """The reader of a real data source string (a .csv/.tsv, .tar shards, or a folder): Files or Shards."""
    if source.lower().endswith((".csv", ".tsv")):
        if not os.path.isfile(source):
            raise FileNotFoundError(f"data {source}: no such file")
        return read_csv(source, data_root, csv_img_key, csv_caption_key, caption_sep, image_size)
    if os.path.isdir(source) and not glob.glob(os.path.join(source, "*.tar")):
        return read_folder(source, caption_sep, image_size)
    return Shards(expand_shards(source), caption_sep, image_size)


# -----------------------------------------------------------------------------
# training batches


class Item:
    """(image, captions) + a per-sample numpy RNG -> (image [3,H,W], tokens [C] or [k,C]); k captions are
    drawn without replacement when there are enough; the augmentation runs on a forked, seeded torch RNG."""

    def __init__(self, transform, tokenizer, context_length, captions_per_image=1):
        self.transform, self.tokenizer, self.C, self.k = transform, tokenizer, context_length, captions_per_image

    def __call__(self, image, captions, rng):
        pick = rng.choice(len(captions), self.k, replace=len(captions) < self.k)
        tokens = self.tokenizer([captions[i] for i in pick], self.C)  # (k, C)
        with torch.random.fork_rng(devices=[]):
            # a torch seed from the sample's numpy generator: any integer below 2^63 (torch's int64) will do
            torch.default_generator.manual_seed(int(rng.integers(2**62)))
            image = self.transform(image)
        return image, tokens[0] if self.k == 1 else tokens


class Pairs(Dataset):
    """Map-style training set: item (epoch, index) -> (image, tokens, kinds of the bad samples met). A bad
    sample is replaced by another index drawn from (seed, epoch, index), so a batch keeps its size."""

    def __init__(self, source, item, seed):
        self.source, self.item, self.seed = source, item, seed

    def __len__(self):
        return len(self.source)

    def __getitem__(self, key):
        epoch, index = key
        rng = np.random.default_rng([self.seed, epoch, index])
        skips = []
        while len(skips) < MAX_BAD_IN_A_ROW:
            try:
                return *self.item(*self.source.load(index), rng), skips
            except BadSample as e:
                skips.append(e.kind)
                index = int(rng.integers(len(self.source)))
        raise too_many_bad(Counter(skips))


class ShardStream(IterableDataset):
    """Training batches of one rank from tar shards, read sequentially. An epoch reads the shards in an order
    drawn from (seed, epoch) as one stream of positions. With L = max(workers, 1) lanes per rank, batch t of
    rank r is made by lane t % L from its own contiguous stretch of the stream, through a shuffle buffer; a
    bad sample is replaced by a sample drawn from the buffer. So no sample is read twice or dropped (but
    the tail, as with drop_last), the stream is a function of (seed, epoch, world size, workers), and a resume
    passes over the earlier batches of the epoch without decoding them."""

    buffer_size = 1000  # samples in the shuffle buffer of each lane (webdataset's usual size)

    def __init__(self, shards, item, seed):
        self.shards, self.item, self.seed = shards, item, seed
        self.epoch = self.start_step = 0  # set by TrainData.batches; the layout by TrainData
        self.batch_size = self.rank = self.steps = None

    def __len__(self):
        return len(self.shards)

    def _read(self, begin, end):
        """(position, sample) for positions begin..end of this epoch's stream: shards in an order drawn from
        (seed, epoch), redrawn for each pass when num_samples exceeds the data."""
        start, rep = 0, 0
        while start < end:
            for s in np.random.default_rng([self.seed, self.epoch, rep]).permutation(len(self.shards.paths)):
                a, b = max(begin - start, 0), min(end - start, self.shards.counts[s])
                pos = start + a
                for sample in islice(tar_samples(self.shards.paths[s], a), max(b - a, 0)):
                    yield pos, sample
                    pos += 1
                for pos in range(pos, start + b):  # a shard shorter than its count: unreadable from here
                    yield pos, "unreadable_shard"
                start += self.shards.counts[s]
                if start >= end:
                    return
            rep += 1

    def __iter__(self):
        info = get_worker_info()
        L, worker = (info.num_workers, info.id) if info else (1, 0)
        lane = (self.start_step + worker) % L  # the DataLoader asks its workers in turn, from worker 0
        B, n = self.batch_size, len(range(lane, self.steps, L))
        begin = B * (self.rank * self.steps + sum(len(range(l, self.steps, L)) for l in range(lane)))
        rng = np.random.default_rng([self.seed, self.epoch, self.rank, L, lane])
        buffer, recent, batch, skips = [], deque(maxlen=100), [], Counter()  # recent: replacements for a bad sample
        emitted = -B * len(range(lane, self.start_step, L))  # < 0: batches already trained on, not decoded
        for new in chain(self._read(begin, begin + n * B), [None] * self.buffer_size):
            if new is not None and len(buffer) < self.buffer_size:
                buffer.append(new)
                continue
            if not buffer:
                break
            j = int(rng.integers(len(buffer)))
            pos, sample = buffer[j]
            buffer[j] = new
            if new is None:
                buffer.pop(j)
            recent.append((pos, sample))
            emitted += 1
            if emitted <= 0:
                continue
            own = np.random.default_rng([self.seed, self.epoch, pos])
            for _ in range(MAX_BAD_IN_A_ROW):
                try:
                    batch.append(self.item(*parse_sample(sample, self.shards.sep, self.shards.draft), own))
                    break
                except BadSample as e:
                    skips[e.kind] += 1
                    pool = list(recent) + [b for b in buffer if b is not None]
                    sample = pool[int(own.integers(len(pool)))][1]
            else:
                raise too_many_bad(skips)
            if len(batch) == B:
                yield (*_collate(batch)[:2], skips)
                batch, skips = [], Counter()


def _in_process(loader):
    """Iterate a DataLoader without workers, making its batches on one torch thread: per-sample transforms
    are too small to share out, and on a busy CPU sharing makes them crawl (35x slower here at 224 px)."""
    it, threads = iter(loader), torch.get_num_threads()
    while True:
        torch.set_num_threads(1)
        try:
            batch = next(it)
        except StopIteration:
            return
        finally:
            torch.set_num_threads(threads)
        yield batch


def _collate(items):
    images, tokens, *skips = zip(*items)
    return torch.stack(images), torch.stack(tokens), Counter(k for s in (skips[0] if skips else ()) for k in s)


def _as_is(batch):
    return batch


class TrainData:
    """Batches of one rank. Map-style sources: a global batch of batch_size * world_size samples is drawn
    from a permutation of (seed, epoch), and rank r takes its r-th slice; shards: see ShardStream. The last
    incomplete global batch is dropped. .skipped counts the bad samples met, by kind."""

    def __init__(self, dataset, batch_size, workers, seed, rank=0, world_size=1, num_samples=None):
        self.dataset, self.batch_size, self.workers, self.seed = dataset, batch_size, workers, seed
        self.rank, self.world_size = rank, world_size
        self.num_samples = num_samples or len(dataset)
        self.steps_per_epoch = runtime.steps_per_epoch(self.num_samples, batch_size, world_size)
        if self.num_samples > len(dataset):
            print(f"warning: --num-samples {self.num_samples} exceeds the {len(dataset)} samples of the data: "
                  f"an epoch sees some twice", file=sys.stderr)
        if isinstance(dataset, ShardStream):
            dataset.batch_size, dataset.rank, dataset.steps = batch_size, rank, self.steps_per_epoch
        self.skipped = Counter()

    @property
    def sharded(self):
        """Whether the batch order depends on the number of workers (tar shards are read in sequence)."""
        return isinstance(self.dataset, ShardStream)

    def _order(self, epoch):
        g = torch.Generator().manual_seed(int(np.random.default_rng([self.seed, epoch]).integers(2**62)))  # as in Item
        n = len(self.dataset)
        reps = math.ceil(self.num_samples / n)  # an epoch longer than the data wraps around
        return torch.cat([torch.randperm(n, generator=g) for _ in range(reps)])[:self.num_samples]

    def batches(self, epoch, start_step=0):
        """Yield (images [B,3,H,W], tokens [B,C] or [B,k,C]) for steps start_step.. of `epoch`."""
        generator = torch.Generator().manual_seed(self.seed)  # the DataLoader's seeds: not from the global RNG
        if isinstance(self.dataset, ShardStream):
            self.dataset.epoch, self.dataset.start_step = epoch, start_step
            loader = DataLoader(self.dataset, batch_size=None, num_workers=self.workers, collate_fn=_as_is,
                                generator=generator)
        else:
            order = self._order(epoch).tolist()
            plan = [[(epoch, i) for i in order[runtime.rank_slice(t, self.batch_size, self.rank, self.world_size)]]
                    for t in range(start_step, self.steps_per_epoch)]
            loader = DataLoader(self.dataset, batch_sampler=plan, num_workers=self.workers, collate_fn=_collate,
                                generator=generator)
        for images, tokens, skips in loader if self.workers else _in_process(loader):
            self.skipped.update(skips)
            yield images, tokens


def build_train_data(source, *, tokenizer, image_size, context_length, batch_size, workers, seed, rank=0,
                     world_size=1, num_samples=None, data_root=None, csv_img_key="filepath",
                     csv_caption_key="title", caption_sep=None, captions_per_image=1, device="cpu"):
    """TrainData for a source string: "synthetic" (synthetic.TrainData, whose batches are drawn on `device`), a
    .csv/.tsv, .tar shard(s) or a folder. tokenizer: a name or a tokenizer object. caption_sep splits a caption field
    into several captions."""
    if isinstance(tokenizer, str):
        tokenizer = get_tokenizer(tokenizer)
    if source == "synthetic":  # drawn in batches on the training device
        return synthetic.TrainData(num_samples or synthetic.NUM_SAMPLES, batch_size, seed, rank, world_size,
                                   tokenizer, context_length, image_size, device, captions_per_image)
    item = Item(train_transform(image_size), tokenizer, context_length, captions_per_image)
    src = open_source(source, image_size=image_size, data_root=data_root, csv_img_key=csv_img_key,
                      csv_caption_key=csv_caption_key, caption_sep=caption_sep)
    if len(src) == 0:
        raise ValueError(f"data {source}: no samples")
    dataset = ShardStream(src, item, seed) if isinstance(src, Shards) else Pairs(src, item, seed)
    return TrainData(dataset, batch_size, workers, seed, rank, world_size, num_samples)


def source_args(settings):
    """The reader flags of train.py's settings (a train.Settings), as open_source and build_train_data take them."""
    return dict(data_root=settings.data_root or None, csv_img_key=settings.csv_img_key,
                csv_caption_key=settings.csv_caption_key, caption_sep=settings.caption_sep or None)


def source_size(settings):
    """Samples in one pass over settings.data: what an epoch holds when --num-samples is 0."""
    return synthetic.NUM_SAMPLES if settings.data == "synthetic" else len(open_source(settings.data,
                                                                                      **source_args(settings)))


def train_data_for(settings, cfg, tokenizer, rank=0, world_size=1, device="cpu"):
    """This rank's TrainData for train.py's settings and a model of config `cfg` (the synthetic set's batches are
    drawn on `device`)."""
    return build_train_data(settings.data, tokenizer=tokenizer, image_size=cfg.image_size,
                            context_length=cfg.context_length, batch_size=settings.batch_size,
                            workers=settings.workers, seed=settings.seed, rank=rank, world_size=world_size,
                            num_samples=settings.num_samples or None, captions_per_image=settings.captions_per_image,
                            device=device, **source_args(settings))


# -----------------------------------------------------------------------------
# labelled images and evaluation batches


def image_folder(root, draft=None, flag="--zeroshot-data"):
    """An ImageFolder (root/<class>/<image>) as Files with labels, and its class names. ImageNet's wnid
    folders (n01440764...) take torchvision's ImageNet category names, and must be all 1000. A classification task
    needs two classes or more. Files whose extension is not a picture's are left out and counted in .skipped
    (other_file; hidden files such as .DS_Store are not counted)."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"{flag} {root}: no such folder")
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir())
    if not classes:
        raise ValueError(f"{flag} {root}: no class folders; lay it out as {root}/<class>/<image> "
                         f"(ImageNet val: run its valprep.sh)")
    if len(classes) == 1:  # every picture would be right: top-1 100% means nothing
        raise ValueError(f"{flag} {root}: one class folder ({classes[0]}); a classification task needs at least 2, "
                         f"laid out as {root}/<class>/<image>")
    if all(re.fullmatch(r"n\d{8}", c) for c in classes):
        if len(classes) != 1000:
            raise ValueError(f"{flag} {root}: {len(classes)} ImageNet wnid folders, ImageNet has 1000 "
                             f"(for a subset, rename the folders to class names)")
        names = list(ResNet50_Weights.IMAGENET1K_V1.meta["categories"])  # in sorted-wnid order
    else:
        names = [c.replace("_", " ") for c in classes]
    images, labels, others = [], [], 0
    for label, c in enumerate(classes):
        files = [os.path.join(d, f) for d, _, fs in os.walk(os.path.join(root, c)) for f in fs if not f.startswith(".")]
        found = sorted(f for f in files if f.rpartition(".")[2].lower() in IMAGE_EXTS)
        images += found
        labels += [label] * len(found)
        others += len(files) - len(found)
    if not images:
        raise ValueError(f"{flag} {root}: no images ({', '.join(IMAGE_EXTS)}) in its class folders")
    files = Files(images, labels=labels, draft=draft)
    files.skipped.update({"other_file": others} if others else {})
    return files, names


class EvalItems(Dataset):
    """index -> (image [3,H,W], target) with target = label, or tokens [k,C] of the first k captions (cycled);
    a bad sample comes out as the kind of its failure and is left out of the batch."""

    def __init__(self, source, transform, tokenizer=None, context_length=None, k=1):
        self.source, self.transform, self.tokenizer, self.C, self.k = source, transform, tokenizer, context_length, k

    def __len__(self):
        return len(self.source)

    def make(self, image, target):
        if self.tokenizer is not None:
            target = self.tokenizer([target[i % len(target)] for i in range(self.k)], self.C)
        return self.transform(image), torch.as_tensor(target)

    def __getitem__(self, i):
        try:
            return self.make(*self.source.load(i))
        except BadSample as e:
            return e.kind


class EvalShards(IterableDataset):
    """EvalItems over tar shards: worker w reads shards w, w + workers, ..."""

    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)  # the shards' counts: img2dataset's _stats.json, else a scan

    def lanes(self, workers):
        """Samples per DataLoader worker (one lane without workers): each batches its own shards."""
        counts = self.items.source.counts
        return [sum(counts[w::workers]) for w in range(workers)] if workers else [sum(counts)]

    def __iter__(self):
        info = get_worker_info()
        shards = self.items.source
        for s in range(info.id, len(shards.paths), info.num_workers) if info else range(len(shards.paths)):
            n = 0
            for n, sample in enumerate(tar_samples(shards.paths[s]), 1):
                try:
                    yield self.items.make(*parse_sample(sample, shards.sep, shards.draft))
                except BadSample as e:
                    yield e.kind
            yield from ["unreadable_shard"] * (shards.counts[s] - n)  # fewer samples than its count


def _collate_eval(items):
    good = [x for x in items if not isinstance(x, str)]
    kinds = Counter(x for x in items if isinstance(x, str))
    return (*(_collate(good)[:2] if good else (torch.empty(0), torch.empty(0))), kinds)


class EvalBatches:
    """Re-iterable (images, targets) batches read from disk at each pass; .scored counts the good samples and
    .skipped the bad ones by kind."""

    def __init__(self, dataset, batch_size, workers):
        self.dataset, self.batch_size, self.workers, self.skipped = dataset, batch_size, workers, Counter()
        self.scored = 0  # good samples yielded, over every pass

    def __len__(self):
        """Batches in one pass (a progress bar's total): fewer if every sample of a batch is bad."""
        lanes = self.dataset.lanes(self.workers) if isinstance(self.dataset, EvalShards) else [len(self.dataset)]
        return sum(math.ceil(n / self.batch_size) for n in lanes)

    def __iter__(self):
        loader = DataLoader(self.dataset, batch_size=self.batch_size, num_workers=self.workers,
                            collate_fn=_collate_eval, generator=torch.Generator())
        for images, targets, kinds in loader if self.workers else _in_process(loader):
            self.skipped.update(kinds)
            self.scored += len(images)
            if len(images):
                yield images, targets


# -----------------------------------------------------------------------------
# python data.py check SOURCE: read a source end to end, count good and bad samples by kind


def check(source, workers=0, **source_args):
    """Read every sample of `source` once; print and return the counts of good and bad samples by kind."""
    src = open_source(source, **source_args)
    if len(src) == 0:
        raise ValueError(f"{source}: no samples to check (an empty source, or shards that are not tar archives)")
    items = EvalItems(src, eval_transform(8), get_tokenizer("byte"), 2)  # decoded in full, then made tiny
    batches = EvalBatches(EvalShards(items) if isinstance(src, Shards) else items, 256, workers)  # 256 a batch
    good = sum(len(images) for images, _ in tqdm(batches, desc=f"checking {source}"))
    print(f"{source}: {len(src)} samples expected, {good} good, {sum(batches.skipped.values())} bad")
    for kind, n in sorted(batches.skipped.items()):
        print(f"  {kind}: {n}")
    return Counter(good=good, **batches.skipped)


def main(argv=None):
    p = runtime.ArgumentParser(description="python data.py check SOURCE: read a data source end to end and count "
                                            "its good and bad samples by kind, without training")
    p.add_argument("command", choices=["check"])
    p.add_argument("source", help="a .csv/.tsv, a .tar, a brace range or glob of shards, or a folder")
    p.add_argument("--data-root", default=None, help="folder the CSV's image paths are relative to (default: its own)")
    p.add_argument("--csv-img-key", default="filepath", help="CSV column of the image paths")
    p.add_argument("--csv-caption-key", default="title", help="CSV caption column(s), comma-separated")
    p.add_argument("--caption-sep", default=None, help="separator of several captions inside one caption field")
    p.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    a = p.parse_args(argv)
    try:
        check(a.source, a.workers, data_root=a.data_root, csv_img_key=a.csv_img_key,
              csv_caption_key=a.csv_caption_key, caption_sep=a.caption_sep)
    except runtime.USER_ERRORS as e:
        runtime.exit_with(e)
    return 0


if __name__ == "__main__":
    sys.exit(main())
