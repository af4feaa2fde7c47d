"""
Checkpoint files: open_clip and the official CoM-PT model zoo in, open_clip `local-dir` folders out, and train.py's own
checkpoint.pt (its layout is written and read back only here: save_checkpoint, load_checkpoint, restore_checkpoint).

vit.CLIP has open_clip's state-dict keys and shapes (tests/test_openclip_parity.py), so moving weights between the
two is a matter of file layout, never of key surgery on the model. This file holds that layout:

import, `load_state_dict_any(path) -> (state_dict, cfg)`, reads with torch.load(weights_only=True)
  - a bare state dict (the official CoM-PT zoo files, converted by hand from DDP runs, keep `module.` keys);
  - a training dict with "state_dict" (open_clip and the official CoM-PT code: epoch, name, state_dict,
    optimizer[, scaler]) or "model" (this repo's checkpoint.pt, whose "config" is then used and checked);
  - an open_clip local-dir folder (open_clip_config.json + open_clip_pytorch_model.bin), e.g. our own export;
  - a run folder of train.py or a stage folder of chain.py (its checkpoint.pt);
  leading `module.` (DDP) and `_orig_mod.` (torch.compile) prefixes are dropped, in any combination.
  Without a stored config, the config is inferred from the tensor shapes: tower widths and depths, patch size,
  image size (from the number of positions), context length, vocabulary, embed dim. The towers must be one of
  vit.SIZES (a clear error otherwise); the data-dependent fields (image size, patch, context, vocabulary) and the
  embed dim are taken from the weights as they are. Two things the weights do not hold are assumed: heads
  (width / 64, as everywhere in the family) and the tokenizer (by vocabulary size: 49408 -> "clip-bpe", 259 -> "byte").

export, `export_open_clip(model, cfg, out_dir)`, writes what open_clip's `local-dir:` loader looks for:
  open_clip_config.json with "model_cfg" (embed_dim, vision_cfg, text_cfg: open_clip's CLIP with its defaults,
  which are vit.CLIP's semantics) and "preprocess_cfg" (CLIP mean/std, bicubic, resize shortest side + center
  crop), and open_clip_pytorch_model.bin (the bare state dict). Then, with no conversion,
      model, _, preprocess = open_clip.create_model_and_transforms("local-dir:" + out_dir)
  and `clip_benchmark eval --model local-dir:OUT_DIR ...` load it. open_clip's loader prefers any *.safetensors
  over our .bin and picks among *.bin / *.pth by name, so give the export a folder of its own. Our CLIPConfig is
  kept beside open_clip's keys (under "clip_config"; open_clip ignores it) so that the folder loads back exactly.

Tokenizer: open_clip (and so CLIP_benchmark) tokenizes with OpenAI's CLIP BPE. Only a model trained with
tokenizer "clip-bpe" works end to end there; a model trained with the byte tokenizer loads in open_clip and its
image tower is usable, but its text tower needs this repo's tokenizer.py ("tokenizer" in "clip_config" says which).
"""

import os
import pickle
import re
import warnings

import torch
import torch.nn as nn

import grow
import runtime
import vit
from tokenizer import VOCAB_SIZES
from vit import MEAN, STD

WEIGHTS_FILE = "open_clip_pytorch_model.bin"  # first in open_clip's preferred order for .bin files
CONFIG_FILE = "open_clip_config.json"
RUN_CHECKPOINT = "checkpoint.pt"  # what train.py writes in a run folder (and chain.py in each stage's)
TOKENIZER_BY_VOCAB = {size: name for name, size in VOCAB_SIZES.items()}  # tokenizer.py's, by vocabulary size
WRAPPER_PREFIX = re.compile(r"^(?:module\.|_orig_mod\.)+")  # DDP and torch.compile wrappers, nested either way


def strip_prefixes(state_dict):
    """The state dict with leading `module.` / `_orig_mod.` wrapper prefixes removed from every key."""
    return {WRAPPER_PREFIX.sub("", k): v for k, v in state_dict.items()}


def size_of(cfg):
    """The registered size whose tower shapes and head counts `cfg` has, or None."""
    shape = dict(vision_width=cfg.vision_width, vision_layers=cfg.vision_layers,
                 text_width=cfg.text_width, text_layers=cfg.text_layers)
    for name, towers in vit.SIZES.items():
        ref = vit.config(name)
        if towers == shape and (cfg.vision_heads, cfg.text_heads, cfg.mlp_ratio) == \
                (ref.vision_heads, ref.text_heads, ref.mlp_ratio):
            return name
    return None


# -----------------------------------------------------------------------------
# import


def infer_config(state_dict, source="state dict"):
    """The CLIPConfig of a state dict with open_clip key names (prefixes already stripped), from its tensor shapes.
    Raises ValueError (naming `source`) when it is not a CLIP of this family."""
    for key in ("visual.conv1.weight", "visual.positional_embedding", "visual.proj", "token_embedding.weight",
                "positional_embedding", "text_projection", "visual.transformer.resblocks.0.mlp.c_fc.weight",
                "transformer.resblocks.0.mlp.c_fc.weight"):
        if key not in state_dict:
            raise ValueError(f"{source}: no {key!r}, so it is not a CLIP state dict with open_clip key names "
                             "(a ViT image tower and a transformer text tower)")
    sd = state_dict

    def depth(prefix):  # number of blocks under prefix
        found = {int(m.group(1)) for k in sd if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))}
        return max(found) + 1

    vision_width, _, patch_size, _ = sd["visual.conv1.weight"].shape  # (w, 3, p, p)
    positions = sd["visual.positional_embedding"].shape[0] - 1  # grid * grid patches (+ the class token)
    grid = round(positions ** 0.5)
    if grid * grid != positions:
        raise ValueError(f"{source}: {positions} image positions do not form a square grid")
    vocab_size, text_width = sd["token_embedding.weight"].shape
    ratios = {sd[k].shape[0] // sd[k].shape[1] for k in ("visual.transformer.resblocks.0.mlp.c_fc.weight",
                                                         "transformer.resblocks.0.mlp.c_fc.weight")}
    if len(ratios) != 1:
        raise ValueError(f"{source}: the two towers have different MLP ratios {sorted(ratios)}; vit.CLIP has one")
    if vocab_size not in TOKENIZER_BY_VOCAB:
        raise ValueError(f"{source}: a vocabulary of {vocab_size} tokens matches no tokenizer of this repo "
                         f"({', '.join(f'{n}: {v}' for v, n in TOKENIZER_BY_VOCAB.items())})")
    cfg = vit.CLIPConfig(
        embed_dim=sd["visual.proj"].shape[1], image_size=grid * patch_size, patch_size=patch_size,
        vision_width=vision_width, vision_layers=depth("visual.transformer.resblocks."),
        vision_heads=max(1, vision_width // vit.HEAD_DIM),
        text_width=text_width, text_layers=depth("transformer.resblocks."),
        text_heads=max(1, text_width // vit.HEAD_DIM),
        context_length=sd["positional_embedding"].shape[0], vocab_size=vocab_size, mlp_ratio=ratios.pop(),
        tokenizer=TOKENIZER_BY_VOCAB[vocab_size],
    )
    if size_of(cfg) is None:
        sizes = ", ".join(f"{n} ({s['vision_width']}/{s['vision_layers']}, {s['text_width']}/{s['text_layers']})"
                          for n, s in vit.SIZES.items())
        raise ValueError(f"{source}: image tower {cfg.vision_width} wide x {cfg.vision_layers} layers, text tower "
                         f"{cfg.text_width} x {cfg.text_layers}, MLP ratio {cfg.mlp_ratio} is no registered size; "
                         f"registered (image/text width/layers, MLP ratio 4): {sizes}")
    return cfg


def mismatch(state_dict, cfg):
    """What keeps the state dict from having exactly vit.CLIP(cfg)'s keys and shapes ("" when nothing does)."""
    with torch.device("meta"):
        expected = {k: v.shape for k, v in vit.CLIP(cfg).state_dict().items()}
    missing, unexpected = sorted(set(expected) - set(state_dict)), sorted(set(state_dict) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state_dict) if state_dict[k].shape != expected[k])
    return "; ".join(f"{what} {keys[:3]}{' ...' if len(keys) > 3 else ''}" for what, keys in
                     (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)) if keys)


def check_matches(state_dict, cfg, source="state dict"):
    """Raise ValueError unless the state dict has exactly vit.CLIP(cfg)'s keys and shapes."""
    problem = mismatch(state_dict, cfg)
    if problem:
        raise ValueError(f"{source} does not match its config ({problem})")


def _torch_load(path):
    """torch.load(weights_only=True): tensors and plain containers only, so a file can never run code here. What it
    refuses, or cannot read, is one ValueError that names the file and why."""
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols before refusing: the error says enough
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError for what is refused; EOFError, RuntimeError, KeyError... for broken files
        text = str(e)
        refused = re.search(r"GLOBAL ([\w.]+)", text)  # "Unsupported global: GLOBAL posix.system", or similar
        if refused:
            raise ValueError(f"{path}: refused as unsafe to load: it holds a {refused.group(1)} object (only tensors and "
                             "plain containers are loaded); if you trust the file, load it where it was written and "
                             "save its model's state_dict() alone") from None
        if isinstance(e, pickle.UnpicklingError):
            op = re.search(r"Unsupported operand \d+", text)
            raise ValueError(f"{path}: refused as unsafe to load: a pickle this loader cannot prove harmless "
                             f"({op.group(0) if op else 'not plain tensors'}); use a file of tensors only, saved "
                             "with torch.save") from None
        first = next((line.strip() for line in text.splitlines() if line.strip()), "").split(". ")[0][:100]
        raise ValueError(f"{path}: not a readable PyTorch checkpoint ({type(e).__name__}{': ' + first if first else ''}"
                         "; empty, cut short or another format)") from None


def load_state_dict_any(path):
    """(state_dict, cfg) from an open_clip / official CoM-PT checkpoint, this repo's checkpoint.pt or a run or
    chain-stage folder holding it, or an open_clip local-dir folder (see the file docstring). Keys are vit.CLIP's;
    tensors are on the CPU, as stored."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint {path} not found; give a .pt/.bin file, a run or chain-stage folder or an "
                                "open_clip local-dir folder")
    if os.path.isfile(os.path.join(path, RUN_CHECKPOINT)):  # a run or chain-stage folder
        path = os.path.join(path, RUN_CHECKPOINT)
    stored_cfg, config_source = None, path  # config_source: the file it is read from
    if os.path.isdir(path):
        config_path, weights_path = os.path.join(path, CONFIG_FILE), os.path.join(path, WEIGHTS_FILE)
        if not (os.path.isfile(config_path) and os.path.isfile(weights_path)):
            stages = sorted(e.name for e in os.scandir(path) if os.path.isfile(os.path.join(e, RUN_CHECKPOINT)))
            raise FileNotFoundError(f"{path} is a folder of no model: a run or chain-stage folder holds "
                                    f"{RUN_CHECKPOINT}, an open_clip local-dir needs {CONFIG_FILE} and {WEIGHTS_FILE}"
                                    + (f"; give one of its model folders ({', '.join(stages[:4])}"
                                       f"{', ...' if len(stages) > 4 else ''})" if stages else ""))
        stored = runtime.load_json(config_path, "open_clip config")
        if not isinstance(stored, dict):
            raise ValueError(f"{config_path}: holds a JSON {type(stored).__name__}, not an open_clip config (an object "
                             "with model_cfg and clip_config); export the model again")
        stored_cfg, config_source = stored.get("clip_config"), config_path
        obj = _torch_load(weights_path)
    else:
        obj = _torch_load(path)
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: holds a {type(obj).__name__}, not a state dict or a training dict")
    if not all(isinstance(v, torch.Tensor) for v in obj.values()):  # a training dict: find the weights
        key = next((k for k in ("ema", "state_dict", "model") if isinstance(obj.get(k), dict)), None)  # trained first
        if key is None:
            raise ValueError(f"{path}: a dict without 'state_dict' or 'model' weights (top-level keys: "
                             f"{sorted(map(str, obj))[:8]}); expected a state dict or a training checkpoint")
        stored_cfg = obj.get("config") if isinstance(obj.get("config"), dict) else stored_cfg
        obj = obj[key]
    state_dict = strip_prefixes(obj)
    if stored_cfg is None:
        cfg = infer_config(state_dict, path)
    else:
        try:
            cfg = vit.CLIPConfig.from_dict(stored_cfg)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{config_source}: its stored config is not a CLIPConfig ({e})") from None
    check_matches(state_dict, cfg, path)
    check_finite(state_dict, path)
    return state_dict, cfg


def check_finite(state_dict, source):
    """Refuse weights holding NaN or inf (a diverged run's) when they are loaded, before any work is done with them."""
    bad = [k for k, v in state_dict.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise ValueError(f"{source}: {len(bad)} of its {len(state_dict)} tensors hold NaN or inf ({', '.join(bad[:2])}"
                         f"{', ...' if len(bad) > 2 else ''}): the run that wrote it diverged; give an earlier "
                         "checkpoint")


def load_model(path, device="cpu"):
    """vit.CLIP built from the checkpoint's (stored or inferred) config, weights loaded with strict=True."""
    state_dict, cfg = load_state_dict_any(path)
    model = vit.CLIP(cfg)
    model.load_state_dict(state_dict, strict=True)
    return model.to(device)


def initialise(model, state_dict, cfg, method="lossless", seed=0, source="--init-from"):
    """Start `model` from `state_dict` (a model of config `cfg`, e.g. from load_state_dict_any): loaded as it is
    when both have the same towers, grown by grow.py's `method` when cfg's towers are smaller."""
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
        name, target = (size_of(c) or "unregistered size" for c in (cfg, model.cfg))
        raise ValueError(f"{source}: its model ({name}) is larger than this one ({target}) in some dimension; load it "
                         "into a model of its own size, or grow it into a larger one")


# -----------------------------------------------------------------------------
# train.py's checkpoint.pt: the one place that knows its layout

TRAINING_KEYS = ("model", "config", "step", "optimizer", "settings", "rng")  # what a resume needs


def save_checkpoint(path, step, model, optimizer, distill, scaler, settings, world_size, wall_time, losses,
                    average=None):
    """A plain dict of tensors and Python values (torch.load(weights_only=True) reads it), written atomically; the
    model's own state dict, so no DDP or compile prefix. settings: train.py's flags as a dict; losses: the last logged
    losses, which a resumed run that has no step left to take reports; average: the weight average (train.py's
    --ema), which is then the trained model (trained_state)."""
    runtime.save_torch({
        "ema": average.state_dict() if average is not None else None,
        "model": model.state_dict(), "config": model.cfg.to_dict(), "step": step, "optimizer": optimizer.state_dict(),
        "distill": distill.state_dict() if distill is not None else None, "settings": settings,
        "scaler": scaler.state_dict(), "world_size": world_size, "wall_time": wall_time, "losses": losses,
        "rng": {"torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if next(model.parameters()).is_cuda else []}}, path)


def load_checkpoint(path, cfg=None):
    """train.py's checkpoint.pt as the dict it saved, for resuming; anything else, or (given `cfg`) a model that is not
    one of config `cfg`, is a one-line ValueError."""
    try:
        ckpt = _torch_load(path)
    except ValueError as e:
        raise ValueError(f"{e}; cannot resume from it: delete it to start the run over, or pass --resume none") from None
    missing = [k for k in TRAINING_KEYS if k not in ckpt] if isinstance(ckpt, dict) else TRAINING_KEYS
    if missing:
        raise ValueError(f"{path}: not a training checkpoint of train.py (no {', '.join(missing[:3])}); to start "
                         "from its weights, pass it as --init-from")
    if cfg is not None:  # this run's model, or another run's (another size, or tensors of other shapes)?
        theirs = ckpt["config"] if isinstance(ckpt["config"], dict) else {}
        differ = [k for k, v in cfg.to_dict().items() if theirs.get(k) != v]
        shapes = "" if differ else mismatch(ckpt["model"], cfg)
        if differ or shapes:
            problem = (f"of another config ({differ[0]} {theirs.get(differ[0])} there, {getattr(cfg, differ[0])} here)"
                       if differ else f"whose weights do not match its config ({shapes})")
            raise ValueError(f"checkpoint {path} holds a model {problem}: it is another run's; use another --out, or "
                             f"move {os.path.dirname(path) or '.'} away to start over")
    return ckpt


def restore_checkpoint(ckpt, model, optimizer, distill, scaler, device, average=None):
    """Load a checkpoint dict (load_checkpoint) back into the run's objects and the RNG, for an exact resume; returns
    (step, wall time so far in seconds, last losses)."""
    model.load_state_dict(ckpt["model"])
    if average is not None:
        average.load_state_dict(ckpt["ema"])
    if distill is not None:
        distill.load_state_dict(ckpt["distill"])
    optimizer.load_state_dict(ckpt["optimizer"])
    if ckpt.get("scaler"):  # fp16 runs: the loss scale
        scaler.load_state_dict(ckpt["scaler"])
    torch.set_rng_state(ckpt["rng"]["torch"])
    if device.type == "cuda" and ckpt["rng"]["cuda"]:
        torch.cuda.set_rng_state_all(ckpt["rng"]["cuda"])
    return ckpt["step"], ckpt["wall_time"], ckpt.get("losses", {})


def trained_state(ckpt):
    """The trained model's weights in a checkpoint dict: the weight average when the run kept one, else the weights."""
    return ckpt.get("ema") or ckpt["model"]


# -----------------------------------------------------------------------------
# export


def open_clip_config(cfg):
    """The content of open_clip_config.json for a model of config `cfg` (open_clip's CLIP, default options)."""
    model_cfg = {
        "embed_dim": cfg.embed_dim,
        "quick_gelu": False,
        "vision_cfg": {"image_size": cfg.image_size, "patch_size": cfg.patch_size, "width": cfg.vision_width,
                       "layers": cfg.vision_layers, "head_width": cfg.vision_width // cfg.vision_heads,
                       "mlp_ratio": cfg.mlp_ratio},
        "text_cfg": {"context_length": cfg.context_length, "vocab_size": cfg.vocab_size, "width": cfg.text_width,
                     "heads": cfg.text_heads, "layers": cfg.text_layers, "mlp_ratio": cfg.mlp_ratio},
    }
    preprocess_cfg = {"size": cfg.image_size, "mode": "RGB", "mean": list(MEAN), "std": list(STD),
                      "interpolation": "bicubic", "resize_mode": "shortest", "fill_color": 0}
    return {"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg, "clip_config": cfg.to_dict()}


def export_open_clip(model, cfg, out_dir):
    """Write an open_clip local-dir for `model` (a vit.CLIP, possibly DDP- or compile-wrapped, or its state dict)
    into out_dir: open_clip_config.json and open_clip_pytorch_model.bin. Returns out_dir."""
    state = model.state_dict() if isinstance(model, nn.Module) else model
    state = {k: v.detach().cpu() for k, v in strip_prefixes(state).items()}
    check_matches(state, cfg, f"export to {out_dir}")
    os.makedirs(out_dir, exist_ok=True)
    runtime.save_torch(state, os.path.join(out_dir, WEIGHTS_FILE))  # *.tmp first: open_clip never picks it up
    runtime.save_json(open_clip_config(cfg), os.path.join(out_dir, CONFIG_FILE))
    return out_dir
