"""
Train one CLIP model, optionally pulled towards a teacher by feature distillation; evaluate, checkpoint, resume.

CoM-PT (Fan et al., CVPR 2026, arXiv 2604.12391) trains a chain of CLIP models and every stage of the chain is one
call of `train`: the smallest model from scratch with the CLIP loss, each larger one (grown from its predecessor by
grow.py) with the CLIP loss plus feature distillation towards the predecessor (paper Sec. 3; distill.py). The teacher
runs in eval mode under no_grad on the same augmented batch; the distillation module's projector is trained with the
student and saved in its checkpoint. On the command line, `--init-from` starts from any checkpoint (open_clip, the
official CoM-PT zoo, ours; interop.py): loaded as it is when it has --size's shape, grown when it is smaller; and
`--teacher` distils towards one. Giving both the same smaller checkpoint is one chain stage.

The recipe is open_clip's (notes/clip_ecosystem.md §1.2): AdamW with betas (0.9, 0.98) and eps 1e-6, no weight decay
on gains, biases and logit_scale; lr warmup lr*(step+1)/warmup then cosine to 0; logit scale clamped to [0, ln 100]
after every step; autocast in bf16 on CUDA and fp32 elsewhere by default (--precision; fp16 adds a GradScaler), with
norms, logits and losses always in fp32. --compile compiles the two towers in place (nn.Module.compile), so the
state dict keeps its plain keys.
Evaluation (§1.5): zero-shot top-1/top-5 (a class embedding is the mean of its normalised template embeddings,
renormalised) and image<->text retrieval R@1/5/10 (a hit when any positive is among the top k).

Many GPUs: `torchrun --nproc_per_node N train.py ...` (and --nnodes for several machines) runs one process per
GPU, nccl on CUDA and gloo on the CPU, the student and its distillation head wrapped in one DDP. --batch-size is per
process; each rank reads its own slice of every global batch (data.py) and the CLIP loss scores every rank's rows
against the whole global batch (clip_loss.py gathers features with gradients), so N processes at batch b compute
the loss and gradients of one process at batch N*b. Rank 0 alone writes files and evaluates; the others wait at
the broadcast of its metrics. Model and optimizer stay identical on every rank and no randomness is per rank
(augmentation is seeded per sample), so rank 0's checkpoint resumes every rank (several machines: the output
folder must be on a shared file system).

Output folder: checkpoint.pt (a plain dict read with torch.load(weights_only=True): model state dict and config,
optimizer, distillation head, step, RNG and grad-scaler state; written atomically), metrics.jsonl, config.json
(settings, model config, git hash), and at the end open_clip/, an open_clip local-dir of the model
(`open_clip.create_model_and_transforms("local-dir:OUT/open_clip")`; interop.py). A run resumes from
out/checkpoint.pt when it exists; resume is exact (bit-identical on CPU).

Deviations from open_clip's trainer: resume at step rather than epoch granularity; grad-norm clipping on by default;
the distillation projector is saved with the student (the official CoM-PT code leaves it out). No gradient
accumulation: summing micro-batch gradients would shrink the contrastive batch (each micro-batch's rows would only
see its own negatives), and the honest version (open_clip's --accum-freq: embed every micro-batch without grad,
then recompute each one with grad against the cached features) costs one more forward per sample; a batch that
does not fit is run on more GPUs (the loss is global), or with --grad-checkpointing.

    python train.py --size cpu-tiny --data synthetic          # a few minutes on a laptop CPU
    torchrun --standalone --nproc_per_node 8 train.py --size base --data 'cc3m/{00000..00331}.tar' --batch-size 128
"""

import argparse
import datetime
import json
import math
import os
import subprocess
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, fields

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import data
import grow
import interop
import vit
from clip_loss import clip_loss
from distill import FeatureDistill


def flag(default, help):
    return field(default=default, metadata={"help": help})


@dataclass
class Settings:
    """The training flags of `python train.py` (each field is the flag --field-name), minus the model's shape, which
    the model's config fixes (image size, context length, tokenizer). Defaults suit the embedded synthetic data."""
    # data, passed through to data.py
    data: str = flag("synthetic", "synthetic, a .csv/.tsv file, .tar shards (brace range or glob), or a folder of "
                     "shards or of img2dataset files")
    data_root: str = flag("", "folder the image paths of a csv/tsv are relative to (default: the csv's folder)")
    csv_img_key: str = flag("filepath", "csv/tsv column of the image paths")
    csv_caption_key: str = flag("title", "csv/tsv caption column(s), comma-separated")
    caption_sep: str = flag("", "separator of several captions inside one caption field")
    captions_per_image: int = flag(1, "captions per image and step; the CLIP loss averages over them")
    num_samples: int = flag(0, "samples per epoch (0: the whole source; synthetic: 10000)")
    zeroshot_data: str = flag("", "zero-shot classification set, an ImageFolder: <dir>/<class name>/<image>")
    val_data: str = flag("", "retrieval set: synthetic or a source of the --data kinds (synthetic data: its own)")
    templates: str = flag("", "file of zero-shot prompts, one a line with {} for the class name (default: 7 "
                          "open_clip prompts for --zeroshot-data, 3 for synthetic)")
    bpe: str = flag("", "CLIP BPE vocabulary file (bpe_simple_vocab_16e6.txt.gz) for --tokenizer clip-bpe")
    workers: int = flag(0, "data loading processes (0: load in the training process)")
    # optimisation
    epochs: int = flag(8, "passes over the training data")
    steps: int = flag(0, "total optimizer steps; overrides --epochs (0: epochs x steps per epoch)")
    batch_size: int = flag(64, "image-text pairs per step and process")
    lr: float = flag(1e-3, "peak AdamW learning rate")
    wd: float = flag(0.1, "AdamW weight decay (not on gains, biases and the logit scale)")
    warmup: int = flag(100, "linear learning-rate warmup, in steps")
    grad_clip: float = flag(1.0, "largest global gradient norm (0: no clipping)")
    seed: int = flag(0, "seed of the model's initialisation and of the data order and augmentation")
    # runtime
    device: str = flag("auto", "auto (cuda, else mps, else cpu), cpu, cuda, cuda:N or mps")
    precision: str = flag("", "autocast dtype: bf16, fp16 (with a GradScaler) or fp32 (default: bf16 on CUDA, else "
                          "fp32); norms, logits and losses stay fp32")
    grad_checkpointing: bool = flag(False, "recompute activations in the backward pass: less memory, more compute")
    compile: bool = flag(False, "torch.compile the two towers (slow first steps, then faster)")
    # evaluation, logging, checkpoints
    eval_every: int = flag(1, "evaluate every N epochs, and at the end (0: only at the end)")
    save_every: int = flag(1000, "checkpoint every N steps, and at the end (0: only at the end)")
    log_every: int = flag(50, "log the losses every N steps")
    resume: str = flag("auto", "auto (from OUT/checkpoint.pt when present), none (start over) or a checkpoint path")


def check_settings(s):
    """One-line errors for bad values, before any work."""
    positive = ("epochs", "batch_size", "captions_per_image", "lr", "log_every")
    for name in positive + ("steps", "warmup", "wd", "grad_clip", "workers", "num_samples", "eval_every",
                            "save_every"):
        value = getattr(s, name)
        if not (value > 0 if name in positive else value >= 0):
            raise ValueError(f"--{name.replace('_', '-')} must be {'positive' if name in positive else '0 or more'}, "
                             f"got {value}")
    if s.resume not in ("auto", "none") and not os.path.isfile(s.resume):
        raise FileNotFoundError(f"--resume {s.resume}: no such checkpoint; pass auto, none or an existing file")
    if s.precision not in ("",) + tuple(DTYPES):
        raise ValueError(f"--precision {s.precision}: choose one of {', '.join(DTYPES)}")
    pick_device(s.device)


def pick_device(name):
    """The torch.device for --device; a bare "cuda" is this process's GPU (cuda:LOCAL_RANK under torchrun)."""
    available = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available(), "cpu": True}
    name = next(d for d in available if available[d]) if name == "auto" else name  # cuda, else mps, else cpu
    if not available.get(name.split(":")[0]):
        raise ValueError(f"--device {name} is not available here; use one of: auto, "
                         + ", ".join(d for d in available if available[d]))
    return torch.device(f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if name == "cuda" else name)


DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def autocast(device, precision=""):
    """The precision policy in one place: autocast to bf16 or fp16, or none for fp32 ("": bf16 on CUDA, else fp32)."""
    precision = precision or ("bf16" if device.type == "cuda" else "fp32")
    return torch.autocast(device.type, dtype=DTYPES[precision], enabled=precision != "fp32")


# -----------------------------------------------------------------------------
# many processes: torchrun's environment -> one process group, one GPU (or CPU) per process


def init_distributed(device):
    """Join the process group torchrun describes in the environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
    MASTER_PORT; one machine or several): nccl on CUDA, gloo on the CPU. Does nothing outside torchrun."""
    if "RANK" not in os.environ or dist.is_initialized():
        return
    if device.type not in ("cuda", "cpu"):
        raise ValueError(f"--device {device}: several processes need cuda (nccl) or cpu (gloo)")
    if device.type == "cuda":
        torch.cuda.set_device(device)  # nccl's collectives run on the current device
    # the others wait for rank 0's evaluation (ImageNet zero-shot: minutes) at a collective: allow it an hour
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=datetime.timedelta(hours=1))


def is_rank0():
    """Whether this process writes files and prints: rank 0 under torchrun, or the only process."""
    return int(os.environ.get("RANK", "0")) == 0


def destroy_distributed():
    if dist.is_initialized():
        dist.destroy_process_group()


def from_rank0(obj):
    """Rank 0's `obj` on every rank (the others wait for it: a barrier); `obj` itself in a single process."""
    if dist.is_initialized():
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        obj = box[0]
    return obj


def all_ranks(obj):
    """Every rank's `obj`, in rank order; [obj] in a single process."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


# -----------------------------------------------------------------------------
# optimisation: open_clip's AdamW groups, warmup + cosine, one training step


def param_groups(model, wd, distill=None):
    """open_clip's AdamW groups: no weight decay for gains, biases and logit_scale (ndim < 2, or bn/ln/bias/logit_scale
    in the name); the distillation projector gets its own group with weight decay (as in CoM-PT's KD stage)."""
    def exclude(n, p):
        return p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n
    named = list(model.named_parameters())
    groups = [{"params": [p for n, p in named if not exclude(n, p)], "weight_decay": wd},
              {"params": [p for n, p in named if exclude(n, p)], "weight_decay": 0.0}]
    head = list(distill.parameters()) if distill is not None else []
    if head:
        groups.append({"params": head, "weight_decay": wd})
    return groups


def make_optimizer(model, settings, device, distill=None):
    return torch.optim.AdamW(param_groups(model, settings.wd, distill), lr=settings.lr, betas=(0.9, 0.98), eps=1e-6,
                             fused=device.type == "cuda")


def lr_at(step, total_steps, warmup, base_lr):
    """open_clip's cosine schedule: lr * (step+1) / warmup during warmup, then cosine from lr to 0 at total_steps."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total_steps - warmup)
    return 0.5 * (1 + math.cos(math.pi * progress)) * base_lr


def encode_text(model, tokens):
    """Text features of tokens (B, C) -> (B, E), or of k captions per image (B, k, C) -> (B, k, E)."""
    return model.encode_text(tokens.flatten(0, -2)).view(*tokens.shape[:-1], -1)


class Objective(nn.Module):
    """The student and its distillation head as one module (so that one DDP wrapper syncs both): the loss terms."""

    def __init__(self, model, distill=None):
        super().__init__()
        self.model, self.distill = model, distill

    def forward(self, images, tokens, teacher_features=None):
        image_features = self.model.encode_image(images)  # (B, E) unnormalised
        text_features = encode_text(self.model, tokens)  # (B, E), or (B, k, E) for k captions per image
        with torch.autocast(images.device.type, enabled=False):  # norms, logits and losses in fp32
            image_features, text_features = image_features.float(), text_features.float()
            losses = {"clip_loss": clip_loss(F.normalize(image_features, dim=-1), F.normalize(text_features, dim=-1),
                                             self.model.logit_scale.exp())}
            if self.distill is not None:
                losses["fd_loss"] = self.distill(image_features, text_features, *teacher_features)
        return losses


NO_SCALER = torch.amp.GradScaler("cpu", enabled=False)  # scale, unscale_, step, update: plain backward and step


def train_step(objective, optimizer, images, tokens, lr, grad_clip, teacher=None, *, precision="", scaler=NO_SCALER):
    """One optimizer step on one batch; returns the loss terms as floats ("loss" is their sum), averaged over the
    ranks under DDP (`objective` is then the DDP-wrapped Objective): the global batch's loss."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    with autocast(images.device, precision):
        teacher_features = None
        if teacher is not None:
            with torch.no_grad():
                teacher_features = (teacher.encode_image(images), encode_text(teacher, tokens))
        losses = objective(images, tokens, teacher_features)
    loss = sum(losses.values())
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()  # DDP averages the gradients over the ranks here
    if grad_clip > 0:
        scaler.unscale_(optimizer)
        nn.utils.clip_grad_norm_(objective.parameters(), grad_clip)
    scaler.step(optimizer)  # fp16: skipped when a gradient overflowed
    scaler.update()
    with torch.no_grad():
        getattr(objective, "module", objective).model.logit_scale.clamp_(0, math.log(100))
    values = torch.stack([loss.detach(), *(v.detach() for v in losses.values())])
    if dist.is_initialized():  # each rank's loss averages its own rows of the global batch: their mean is the global loss
        dist.all_reduce(values)
        values /= dist.get_world_size()
    return dict(zip(["loss", *losses], values.tolist()))  # one device sync


# -----------------------------------------------------------------------------
# evaluation: zero-shot classification and image<->text retrieval


def zeroshot_accuracy(image_features, labels, class_features, ks=(1, 5)):
    """Top-k accuracy of normalised image features (N, E) classified by normalised class embeddings (K, E)."""
    top = (image_features @ class_features.T).topk(min(max(ks), len(class_features)), dim=-1).indices  # (N, k)
    hits = top == labels[:, None]
    return {k: hits[:, :k].any(dim=-1).float().mean().item() for k in ks}


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


@torch.no_grad()
def embed(encode, inputs, device, precision="", batch_size=256):
    """Normalised fp32 features of `inputs` (images or tokens), encoded in chunks."""
    out = []
    for chunk in inputs.split(batch_size):
        with autocast(device, precision):
            out.append(F.normalize(encode(chunk.to(device)).float(), dim=-1))
    return torch.cat(out)


def evaluate(model, eval_sets, device, precision=""):
    """Zero-shot top-1/top-5 and retrieval R@1/5/10 (fractions in [0, 1]) of `model` on data.build_eval_sets'
    sets: "zeroshot" (batches of images and labels, prompt tokens (classes, templates, C)) and "retrieval" (batches
    of images and their k captions' tokens (b, k, C)). Each set's batches are read once."""
    was_training = model.training
    model.eval()
    out = {}
    if "zeroshot" in eval_sets:
        zs = eval_sets["zeroshot"]
        n_classes, n_templates, C = zs["tokens"].shape
        prompts = embed(model.encode_text, zs["tokens"].view(-1, C), device, precision)  # (n_classes * n_templates, E)
        # a class is the mean of its normalised template embeddings, renormalised
        class_features = F.normalize(prompts.view(n_classes, n_templates, -1).mean(dim=1), dim=-1)  # (K, E)
        images, labels = zip(*[(embed(model.encode_image, x, device, precision), y) for x, y in zs["batches"]])
        top = zeroshot_accuracy(torch.cat(images), torch.cat(labels).to(device), class_features)
        out.update(zeroshot_top1=top[1], zeroshot_top5=top[5])
    if "retrieval" in eval_sets:
        images, texts = zip(*[(embed(model.encode_image, x, device, precision),
                               embed(model.encode_text, t.flatten(0, 1), device, precision).view(*t.shape[:2], -1))
                              for x, t in eval_sets["retrieval"]["batches"]])
        images, texts = torch.cat(images), torch.cat(texts)  # (N, E), (N, k, E): k captions per image
        text_image = torch.arange(len(images), device=device).repeat_interleave(texts.shape[1])
        out.update(retrieval_recall(images, texts.flatten(0, 1), text_image))
    model.train(was_training)
    return out


# -----------------------------------------------------------------------------
# checkpoints and run records


def save_checkpoint(path, state):
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)  # atomic: a crash leaves the previous checkpoint intact


def git_hash():
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD"], cwd=here).returncode != 0
        return head.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def load_checkpoint(path, model, optimizer, distill, settings, device, scaler=NO_SCALER, world_size=1, sharded=False):
    """Restore a run from `path` for an exact resume; returns (step, wall time so far in seconds). sharded: the data
    are tar shards, whose batch order also depends on the number of workers (data.ShardStream)."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if ckpt["config"] != model.cfg.to_dict():
        raise ValueError(f"checkpoint {path} holds a model of another config; use another --out or --resume none")
    for key in ("data", "batch_size", "seed") + (("workers",) if sharded else ()):  # they fix the data stream
        if ckpt["settings"][key] != getattr(settings, key):
            why = " (the batch order of shards depends on it)" if key == "workers" else ""
            raise ValueError(f"checkpoint {path} was trained with {key}={ckpt['settings'][key]!r}, not "
                             f"{getattr(settings, key)!r}{why}; resume with the same value, or use another --out")
    if ckpt.get("world_size", 1) != world_size:  # so does the number of processes (the global batch)
        raise ValueError(f"checkpoint {path} was trained by {ckpt.get('world_size', 1)} processes, not {world_size}; "
                         "resume with as many (torchrun --nproc_per_node x --nnodes), or use another --out")
    if (ckpt["distill"] is None) != (distill is None):
        raise ValueError(f"checkpoint {path} was trained {'without' if distill is not None else 'with'} a teacher; "
                         f"resume it the same way, or use another --out")
    model.load_state_dict(ckpt["model"])
    if distill is not None:
        distill.load_state_dict(ckpt["distill"])
    optimizer.load_state_dict(ckpt["optimizer"])
    if ckpt.get("scaler"):  # fp16 runs: the loss scale
        scaler.load_state_dict(ckpt["scaler"])
    torch.set_rng_state(ckpt["rng"]["torch"])
    if device.type == "cuda" and ckpt["rng"]["cuda"]:
        torch.cuda.set_rng_state_all(ckpt["rng"]["cuda"])
    return ckpt["step"], ckpt["wall_time"]


def initialise(model, state_dict, cfg, method="lossless", seed=0, source="--init-from"):
    """Start `model` from `state_dict` (a model of config `cfg`, e.g. from interop.load_state_dict_any): loaded as
    it is when both have the same towers, grown by grow.py's `method` when cfg's towers are smaller."""
    for key in ("image_size", "patch_size", "context_length", "vocab_size", "embed_dim"):
        if getattr(cfg, key) != getattr(model.cfg, key):
            raise ValueError(f"{source}: its {key} is {getattr(cfg, key)}, the model's {getattr(model.cfg, key)}; "
                             "give the model the checkpoint's data shape (--image-size, --patch-size, ...)")
    towers = ("vision_width", "vision_layers", "text_width", "text_layers")
    small, big = ([getattr(c, k) for k in towers] for c in (cfg, model.cfg))
    if small == big:
        model.load_state_dict(state_dict)
    elif all(a <= b for a, b in zip(small, big)):
        model.load_state_dict(grow.grow(state_dict, model.state_dict(), cfg, model.cfg, method=method, seed=seed))
    else:
        name, target = (interop.size_of(c) or "unregistered size" for c in (cfg, model.cfg))
        raise ValueError(f"{source}: its model ({name}) is larger than this one ({target}) in some dimension; load it "
                         "into a model of its own size, or grow it into a larger one")


def train(model, settings, out_dir, *, teacher=None, distill=None):
    """Train `model` (a vit.CLIP) with `settings`, writing into `out_dir`; returns the final metrics. With a teacher
    (a vit.CLIP) and `distill` (a module (s_img, s_txt, t_img, t_txt) -> loss), the loss is clip_loss + fd_loss.
    Under torchrun every process calls it (see the file docstring); all return rank 0's metrics."""
    s, cfg = settings, model.cfg
    check_settings(s)
    if (teacher is None) != (distill is None):
        raise ValueError("train() needs both a teacher and a distillation module, or neither")
    for key in ("image_size", "context_length", "vocab_size", "tokenizer") if teacher is not None else ():
        if getattr(teacher.cfg, key) != getattr(cfg, key):  # the teacher sees the student's batches
            raise ValueError(f"teacher {key} {getattr(teacher.cfg, key)!r} differs from the student's "
                             f"{getattr(cfg, key)!r}; give both the same data shape")
    device = pick_device(s.device)
    init_distributed(device)  # under torchrun: join its process group (a no-op when already done, or no torchrun)
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    main_process = rank == 0  # the one that writes files, logs and evaluates
    precision = s.precision or ("bf16" if device.type == "cuda" else "fp32")
    tokenizer = data.get_tokenizer(cfg.tokenizer, s.bpe or None)  # the model's config names its tokenizer
    shape = dict(tokenizer=tokenizer, image_size=cfg.image_size, context_length=cfg.context_length)
    source = dict(data_root=s.data_root or None, csv_img_key=s.csv_img_key, csv_caption_key=s.csv_caption_key,
                  caption_sep=s.caption_sep or None, captions_per_image=s.captions_per_image, workers=s.workers)
    train_data = data.build_train_data(s.data, **shape, **source, batch_size=s.batch_size, seed=s.seed, rank=rank,
                                       world_size=world_size, num_samples=s.num_samples or None)
    steps_per_epoch = train_data.steps_per_epoch
    total_steps = s.steps or s.epochs * steps_per_epoch
    if main_process:
        print(f"data: {s.data}: {train_data.num_samples} samples, {steps_per_epoch} steps of {s.batch_size * world_size} "
              f"per epoch; training {total_steps} steps", flush=True)

    model.to(device).train()
    model.set_grad_checkpointing(s.grad_checkpointing)
    if s.compile:  # in place: the state dict keeps its keys (no _orig_mod.)
        model.visual.compile()
        model.transformer.compile()
    if teacher is not None:
        teacher.to(device).eval()
        distill.to(device).train()
    objective = Objective(model, distill)
    optimizer = make_optimizer(model, s, device, distill)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")

    # resume from out/checkpoint.pt when present ("auto"), from a given file, or not at all ("none")
    ckpt_path = os.path.join(out_dir, "checkpoint.pt")
    resume = {"auto": ckpt_path if os.path.exists(ckpt_path) else None, "none": None}.get(s.resume, s.resume)
    step, wall_time = load_checkpoint(resume, model, optimizer, distill, s, device, scaler, world_size,
                                      sharded=isinstance(train_data.dataset, data.ShardStream)) if resume else (0, 0.0)
    if world_size > 1:  # one wrapper for the student and its projector: their gradients are averaged over the ranks
        objective = DDP(objective, device_ids=[device.index] if device.type == "cuda" else None)
    eval_sets = data.build_eval_sets(s.data, **shape, **source, zeroshot_data=s.zeroshot_data or None,
                                     val_data=s.val_data or None, templates=s.templates or None) if main_process else {}
    os.makedirs(out_dir, exist_ok=True)
    t_start = time.time()

    def checkpoint():  # the raw model's state dict: no DDP "module." prefix
        save_checkpoint(ckpt_path, {
            "model": model.state_dict(), "config": cfg.to_dict(), "step": step, "optimizer": optimizer.state_dict(),
            "distill": distill.state_dict() if distill is not None else None, "settings": asdict(s),
            "scaler": scaler.state_dict(), "world_size": world_size,
            "rng": {"torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if device.type == "cuda" else []},
            "wall_time": wall_time + time.time() - t_start})

    metrics_path = os.path.join(out_dir, "metrics.jsonl")
    tty = main_process and sys.stderr.isatty()  # a progress bar on a terminal, plain lines in a log file
    if main_process:
        with open(os.path.join(out_dir, "config.json"), "w") as f:
            json.dump({"settings": asdict(s), "model": cfg.to_dict(), "git": git_hash(), "torch": torch.__version__,
                       "device": str(device), "precision": precision, "world_size": world_size,
                       "teacher": teacher.cfg.to_dict() if teacher is not None else None}, f, indent=2)
        # a resumed run replays the steps after its checkpoint: drop their old records
        kept = [r for r in open(metrics_path) if json.loads(r)["step"] <= step] if os.path.exists(metrics_path) else []
        with open(metrics_path, "w") as f:
            f.writelines(kept)

    def log(record, line, always):  # a metrics.jsonl record; its line on the console (steps: when no bar shows)
        if main_process:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")
            if always or not tty:
                tqdm.write(line)

    def run_eval():  # rank 0 evaluates; the others wait for its metrics
        metrics = from_rank0(evaluate(model, eval_sets, device, precision) if main_process else None)
        log({"step": step, "epoch": step / steps_per_epoch, **metrics},
            f"step {step} eval: " + (" ".join(f"{k} {v:.4f}" for k, v in metrics.items()) or
                                     "no eval sets (see --zeroshot-data, --val-data)"), always=True)
        return metrics

    bar = tqdm(total=total_steps, initial=step, disable=not tty, unit="step", dynamic_ncols=True)
    t_log, step_log, losses = time.time(), step, {}
    while step < total_steps:
        epoch, first = divmod(step, steps_per_epoch)
        for images, tokens in train_data.batches(epoch, first):
            images, tokens = images.to(device, non_blocking=True), tokens.to(device, non_blocking=True)
            lr = lr_at(step, total_steps, s.warmup, s.lr)
            losses = train_step(objective, optimizer, images, tokens, lr, s.grad_clip, teacher, precision=precision,
                                scaler=scaler)
            if not math.isfinite(losses["loss"]):  # the same on every rank: all stop
                last = ckpt_path if os.path.exists(ckpt_path) else "none written yet"
                raise FloatingPointError(f"non-finite loss {losses} at step {step + 1}: run stopped; last good "
                                         f"checkpoint: {last} (try a lower --lr, keep --grad-clip on)")
            step += 1
            bar.update()
            if step % s.log_every == 0 or step == total_steps:
                speed = (step - step_log) * s.batch_size * world_size / (time.time() - t_log)
                t_log, step_log = time.time(), step
                record = {"step": step, "epoch": step / steps_per_epoch, **losses, "lr": lr,
                          "logit_scale": model.logit_scale.exp().item(), "samples_per_s": speed}
                bar.set_postfix(loss=f"{losses['loss']:.3f}", lr=f"{lr:.2e}", samples_s=f"{speed:.0f}")
                log(record, f"step {step}/{total_steps} " + " ".join(f"{k} {v:.4g}" for k, v in record.items()
                                                                     if k != "step"), always=False)
            if main_process and ((s.save_every and step % s.save_every == 0) or step == total_steps):
                checkpoint()
            if step == total_steps:
                break
        if step < total_steps and s.eval_every and (epoch + 1) % s.eval_every == 0:
            t_eval = time.time()
            run_eval()
            t_log += time.time() - t_eval  # samples/s counts training only
    bar.close()
    if main_process:  # the model as an open_clip local-dir, beside the checkpoint
        interop.export_open_clip(model, cfg, os.path.join(out_dir, "open_clip"))
    metrics = run_eval()  # after the writes: once train() returns, every rank can read them
    skipped = sum(all_ranks(train_data.skipped), Counter())
    return {"step": step, "num_samples": train_data.num_samples, "samples_seen": step * s.batch_size * world_size,
            "wall_time_s": wall_time + time.time() - t_start, **losses, **metrics,
            "skipped": dict(skipped)}  # bad samples of this run, by kind, on all ranks


# -----------------------------------------------------------------------------
# command line


def add_settings_args(parser, skip=(), defaults=None):
    """One flag --field-name per field of Settings (chain.py shares them), except those in `skip`; `defaults`
    overrides some fields' defaults."""
    defaults = defaults or {}
    for f in fields(Settings):
        if f.name in skip:
            continue
        name, help, default = "--" + f.name.replace("_", "-"), f.metadata["help"], defaults.get(f.name, f.default)
        if f.type is bool:
            parser.add_argument(name, action="store_true", help=help)
        else:
            parser.add_argument(name, type=f.type, default=default,
                                help=help + (f" (default: {default})" if default not in ("", 0) else ""))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Train one CLIP model (optionally distilled from a teacher).")
    # the model: its size and the data-dependent shape (0: the data's default)
    p.add_argument("--size", default="cpu-tiny", help=f"model size: {', '.join(vit.SIZES)}")
    p.add_argument("--image-size", type=int, default=0,
                   help=f"input resolution in pixels (0: {data.SYNTHETIC_IMAGE_SIZE} for synthetic data, else 224)")
    p.add_argument("--patch-size", type=int, default=0, help="ViT patch size in pixels (0: 4 for synthetic, else 16)")
    p.add_argument("--context-length", type=int, default=0, help="text length in tokens, start and end included "
                   f"(0: {data.SYNTHETIC_CONTEXT_LENGTH} for synthetic data, else 77)")
    p.add_argument("--tokenizer", default="", choices=["", "byte", "clip-bpe"], help="byte or clip-bpe (default: "
                   "byte for synthetic data, else clip-bpe, whose vocabulary comes from --bpe or an installed open_clip)")
    p.add_argument("--out", default="out", help="output folder: checkpoint.pt, metrics.jsonl, config.json, open_clip/")
    # where the weights start, and the teacher: checkpoints of open_clip, the official CoM-PT zoo or ours (interop.py)
    p.add_argument("--init-from", default="", help="start from this checkpoint: loaded when it has --size's shape, "
                   "grown when smaller; its data shape is the default of --image-size, --patch-size, ...")
    p.add_argument("--grow-method", default="lossless", choices=grow.METHODS, help="growth of a smaller --init-from")
    p.add_argument("--teacher", default="", help="distil towards this checkpoint's features (CoM-PT's FD loss)")
    p.add_argument("--alpha", type=float, default=500.0, help="weight of the feature-distillation loss (--teacher)")
    add_settings_args(p)  # everything else: the fields of Settings
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    settings = Settings(**{f.name: getattr(args, f.name) for f in fields(Settings)})
    synthetic = args.data == "synthetic"  # small pictures, short captions; real data gets CLIP's 224 px and 77 tokens
    try:
        check_settings(settings)
        if min(args.image_size, args.patch_size, args.context_length) < 0:
            raise ValueError("--image-size, --patch-size and --context-length must be positive (0: the data's default)")
        init = interop.load_state_dict_any(args.init_from) if args.init_from else None
        teacher = interop.load_model(args.teacher) if args.teacher else None
        like = init[1] if init else teacher.cfg if teacher else None  # a given model's data shape is the default

        def default(key, synthetic_value, real_value):
            return getattr(args, key) or (getattr(like, key) if like else synthetic_value if synthetic else real_value)
        name = args.tokenizer or (like.tokenizer if like else "clip-bpe" if settings.bpe or not synthetic else "byte")
        tokenizer = data.get_tokenizer(name, settings.bpe or None)
        cfg = vit.config(args.size, image_size=default("image_size", data.SYNTHETIC_IMAGE_SIZE, 224),
                         patch_size=default("patch_size", 4, 16),
                         context_length=default("context_length", data.SYNTHETIC_CONTEXT_LENGTH, 77),
                         vocab_size=tokenizer.vocab_size, tokenizer=tokenizer.name)
        torch.manual_seed(settings.seed)  # the model's init: the same on every rank
        model = vit.CLIP(cfg)
        if init:
            initialise(model, *init, method=args.grow_method, seed=settings.seed, source=f"--init-from {args.init_from}")
        distill = FeatureDistill(cfg.embed_dim, teacher.cfg.embed_dim, args.alpha) if teacher else None
        metrics = train(model, settings, args.out, teacher=teacher, distill=distill)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except FloatingPointError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    finally:
        destroy_distributed()
    if is_rank0():
        print(json.dumps(metrics, indent=2))


if __name__ == "__main__":
    main()
