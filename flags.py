"""
The flags of a training run: train.py's settings as a dataclass (Settings, each field a flag --field-name), their
checks, and the command-line arguments train.py and chain.py share (the settings, the model's data shape, where its
weights start, the teacher).
"""

import os
from dataclasses import dataclass, field, fields

import data
import grow
import interop
import recipe
import runtime
import synthetic
import vit
from distill import ALPHA
from tokenizer import VOCAB_SIZES


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
    num_samples: int = flag(0, f"samples per epoch (0: the whole source; synthetic: {synthetic.NUM_SAMPLES})")
    zeroshot_data: str = flag("", "zero-shot classification set, an ImageFolder: <dir>/<class name>/<image>")
    val_data: str = flag("", "retrieval set: synthetic or a source of the --data kinds (synthetic data: its own)")
    templates: str = flag("", "file of zero-shot prompts, one a line with {} for the class name (default: 7 "
                          "open_clip prompts for --zeroshot-data, 3 for synthetic)")
    probes: int = flag(0, "synthetic data: pictures that fit linear probes of its attributes at the end of a run, "
                       f"half as many score them (0: none; {synthetic.PROBES} as evaluate.py --synthetic-probes: "
                       "more than the rest of the evaluation costs)")
    bpe: str = flag("", "CLIP BPE vocabulary file (bpe_simple_vocab_16e6.txt.gz) for --tokenizer clip-bpe")
    workers: int = flag(0, "data loading processes (0: load in the training process)")
    # optimisation
    epochs: int = flag(8, "passes over the training data")
    steps: int = flag(0, "total optimizer steps; overrides --epochs (0: epochs x steps per epoch); a run is not "
                      "extended on resume: the schedule spans it (train on with --init-from OUT --out NEW)")
    batch_size: int = flag(recipe.SYNTHETIC_BATCH, "image-text pairs per step and process")
    lr: float = flag(recipe.SYNTHETIC_LR, "peak AdamW learning rate")
    wd: float = flag(recipe.WEIGHT_DECAY, "AdamW weight decay (not on gains, biases and the logit scale)")
    warmup: int = flag(recipe.SYNTHETIC_WARMUP, "linear learning-rate warmup, in steps")
    grad_clip: float = flag(1.0, "largest global gradient norm (0: no clipping)")
    ema: float = flag(0.0, "deliver an exponential moving average of the weights, started at the initial ones, whose "
                      "horizon is this fraction of the run (0: the last weights; chain.py sets it for grown stages)")
    seed: int = flag(0, "seed of the model's initialisation and of the data order and augmentation")
    # runtime
    device: str = flag("auto", "auto (cuda, else mps, else cpu), cpu, cuda, cuda:N or mps")
    precision: str = flag("", "autocast dtype: bf16, fp16 (with a GradScaler) or fp32 (default: bf16 on CUDA and on "
                          "CPUs with bf16 matrix instructions, else fp32); norms, logits and losses stay fp32")
    grad_checkpointing: bool = flag(False, "recompute activations in the backward pass: less memory, more compute")
    compile: bool = flag(False, "torch.compile the two towers (slow first steps, then faster)")
    # evaluation, logging, checkpoints
    eval_every: int = flag(1, "evaluate every N epochs, and at the end (0: only at the end)")
    eval_steps: int = flag(0, "also evaluate every N steps, from step 0 (0: never)")
    save_every: int = flag(1000, "checkpoint every N steps, and at the end (0: only at the end)")
    log_every: int = flag(50, "log the losses every N steps")
    resume: str = flag("auto", f"auto (from OUT/{interop.RUN_CHECKPOINT} when present), none (start over) or a "
                       "checkpoint path")


# what a resume may change (and "workers", but for tar shards); any other setting is refused (resume)
FREE_ON_RESUME = ("device", "eval_every", "eval_steps", "save_every", "log_every", "grad_checkpointing", "compile", "resume")


def check_settings(settings):
    """One-line errors for bad values, before any work."""
    positive = ("epochs", "batch_size", "captions_per_image", "lr", "log_every")
    for name in positive + ("steps", "warmup", "wd", "grad_clip", "ema", "workers", "num_samples", "eval_every",
                            "eval_steps", "save_every"):
        value = getattr(settings, name)
        if not (value > 0 if name in positive else value >= 0):
            raise ValueError(f"--{name.replace('_', '-')} must be {'positive' if name in positive else '0 or more'}, "
                             f"got {value}")
    if settings.resume not in ("auto", "none") and not os.path.isfile(settings.resume):
        raise FileNotFoundError(f"--resume {settings.resume}: no such checkpoint; pass auto, none or an existing file")
    if settings.precision not in ("",) + tuple(runtime.DTYPES):
        raise ValueError(f"--precision {settings.precision}: choose one of {', '.join(runtime.DTYPES)}")
    runtime.pick_device(settings.device)


def add_settings_args(parser, skip=(), defaults=None):
    """One flag --field-name per field of Settings, except those in `skip`; `defaults` overrides some defaults."""
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


def add_model_args(parser):
    """The model's data-dependent shape, where its weights start, and the teacher (train.py; chain.py's first stage)."""
    synthetic, real = data.default_shape("synthetic"), data.default_shape("real")

    def default(key):
        return f"0: {synthetic[key]} for synthetic data, else {real[key]}; or a given checkpoint's"
    parser.add_argument("--image-size", type=int, default=0, help=f"input resolution in pixels ({default('image_size')})")
    parser.add_argument("--patch-size", type=int, default=0, help=f"ViT patch size in pixels ({default('patch_size')})")
    parser.add_argument("--context-length", type=int, default=0, help="text length in tokens, start and end "
                        f"included ({default('context_length')})")
    parser.add_argument("--tokenizer", default="", choices=["", "byte", "clip-bpe"], help="byte or clip-bpe (default: "
                        "byte for synthetic data, else clip-bpe, whose vocabulary comes from --bpe or an installed "
                        "open_clip)")
    parser.add_argument("--init-from", default="", help="start from this checkpoint (open_clip, the official CoM-PT "
                        "zoo or ours): loaded when it has the model's shape, grown (--grow-method) when smaller")
    parser.add_argument("--grow-method", default="lossless", choices=grow.METHODS, help="growth operator (grow.py)")
    parser.add_argument("--teacher", default="", help="distil towards this checkpoint's features (CoM-PT's FD loss)")
    parser.add_argument("--alpha", type=float, default=ALPHA, help="weight of the feature-distillation loss")


def model_config(size, args, like=None):
    """The CLIPConfig of `size` for these flags: the data shape (image size, patch, context, tokenizer) from the
    flags, else from `like` (the config of a checkpoint given with --init-from or --teacher), else the data's. The
    model flags (add_model_args) are checked here, before any work."""
    keys = ("image_size", "patch_size", "context_length")
    if min(getattr(args, k) for k in keys) < 0:
        raise ValueError("--image-size, --patch-size and --context-length must be positive (0: the data's default)")
    if not args.alpha >= 0:
        raise ValueError(f"--alpha must be 0 or more (the weight of the feature-distillation loss), got {args.alpha}")
    default = like.to_dict() if like is not None else data.default_shape(args.data, args.bpe)
    shape = {k: getattr(args, k) or default[k] for k in keys + ("tokenizer",)}
    return vit.config(size, **shape, vocab_size=VOCAB_SIZES[shape["tokenizer"]])


# -----------------------------------------------------------------------------
# chain.py's own: the sizes of a chain, and values given per stage


def parse_sizes(text):
    sizes = [s.strip() for s in text.split(",") if s.strip()]
    if not sizes:
        raise ValueError(f"--sizes {text!r}: name the models in ascending order, e.g. --sizes tiny,small,base")
    params = {s: vit.count_params(vit.config(s)) for s in sizes}  # unknown size: ValueError naming the valid ones
    for a, b in zip(sizes, sizes[1:]):
        if params[b] <= params[a] or any(vit.SIZES[b][k] < v for k, v in vit.SIZES[a].items()):
            fix = ",".join(sorted(dict.fromkeys(sizes), key=params.get))
            raise ValueError(f"--sizes must be in ascending order: {b} cannot follow {a} (it is not larger in every "
                             f"dimension); e.g. --sizes {fix}")
    return sizes


def per_stage(text, n, flag, kind=int):
    """A comma list with one value per stage, or one value for every stage."""
    try:
        values = [kind(v) for v in text.split(",")]
    except ValueError:
        raise ValueError(f"{flag} {text}: expected a comma list of {kind.__name__}s, one per stage") from None
    if len(values) not in (1, n) or min(values) < 0:
        raise ValueError(f"{flag} {text}: expected one value or {n} (one per size), none negative")
    return values * n if len(values) == 1 else values
