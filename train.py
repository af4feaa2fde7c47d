"""
Train one CLIP model, optionally distilled towards a teacher: one stage of Chain-of-Models Pre-Training (CoM-PT, Fan
et al., CVPR 2026, arXiv 2604.12391, Sec. 3). The smallest model of a chain trains with the CLIP loss alone; every
larger one, grown from its predecessor (grow.py), adds feature distillation towards it (distill.py).

The recipe is open_clip's (recipe.py): AdamW without weight decay on gains, biases and the logit scale; linear warmup,
then cosine decay to 0; the logit scale clamped after every step. A run writes checkpoint.pt, metrics.jsonl,
config.json and, at the end, open_clip/ (an open_clip local-dir) into its folder, and rerunning the same command
resumes it exactly. Under torchrun every process runs this file (README, "Use it"). The flags: flags.py (Settings).

Deviations from open_clip's trainer: resume at step rather than epoch granularity; grad-norm clipping on by default;
the distillation projector is saved with the student (the official CoM-PT code leaves it out); no gradient
accumulation, because summing micro-batch gradients would shrink the contrastive batch (a batch that does not fit
runs on more GPUs, the loss being global, or with --grad-checkpointing).

    python train.py --size cpu-tiny                     # the embedded synthetic set, minutes on a laptop CPU
"""

import json
import math
import os
import time
import traceback
from collections import Counter
from dataclasses import asdict, fields

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import data
import evaluate
import interop
import recipe
import runtime
import vit
from clip_loss import clip_loss
from distill import ALPHA, FeatureDistill
from flags import FREE_ON_RESUME, Settings, add_model_args, add_settings_args, check_settings, model_config


HERE = os.path.dirname(os.path.abspath(__file__))
CLOCK = ("wall_time_s", "eval_s")  # the result's clock readings: all else is the same for the same run


# -----------------------------------------------------------------------------
# one training step: the loss terms, backward, clipping, AdamW, the temperature bound


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
            if self.distill is not None:  # CoM-PT's feature-space transfer: L = L_clip + L_FD
                losses["fd_loss"] = self.distill(image_features, text_features, *teacher_features)
        return losses


NO_SCALER = torch.amp.GradScaler("cpu", enabled=False)  # scale, unscale_, step, update: plain backward and step


def train_step(objective, optimizer, images, tokens, lr, grad_clip, teacher=None, *, precision="", scaler=NO_SCALER):
    """One optimizer step on one batch; returns the loss terms as floats ("loss" is their sum), averaged over the
    ranks under DDP (`objective` is then the DDP-wrapped Objective): the global batch's loss."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    tokens = vit.trim_tokens(tokens)  # no work on the padding after the longest caption (exact)
    with runtime.autocast(images.device, precision):
        teacher_features = None
        if teacher is not None:  # forward only, in eval mode, on the student's augmented batch
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
    with torch.no_grad():  # CLIP's bound on the learned temperature: the logits' scale stays in [1, 100]
        getattr(objective, "module", objective).model.logit_scale.clamp_(0, recipe.LOGIT_SCALE_MAX)
    values = torch.stack([loss.detach(), *(v.detach() for v in losses.values())])
    if dist.is_initialized():  # each rank's loss averages its own rows of the global batch: their mean is the global loss
        dist.all_reduce(values)
        values /= dist.get_world_size()
    return dict(zip(["loss", *losses], values.tolist()))  # one device sync


# -----------------------------------------------------------------------------
# training: setup, the loop, the end


def train(model, settings, out_dir, *, teacher=None, distill=None):
    """Train `model` (a vit.CLIP) with `settings`, writing into `out_dir`; returns the final metrics. With a teacher
    (a vit.CLIP) and `distill` (a module (s_img, s_txt, t_img, t_txt) -> loss), the loss is clip_loss + fd_loss.
    Under torchrun every process calls it; all return rank 0's metrics."""
    check_settings(settings)
    check_teacher(model, teacher, distill)
    device = runtime.pick_device(settings.device)
    runtime.init_distributed(device)  # under torchrun: join its process group (once), else nothing
    rank, world_size = runtime.rank_and_world()
    precision = settings.precision or runtime.default_precision(device)
    tokenizer = data.get_tokenizer(model.cfg.tokenizer, settings.bpe or None)
    train_data = data.train_data_for(settings, model.cfg, tokenizer, rank, world_size, device)
    eval_sets = evaluate.eval_sets_for(settings, model.cfg, tokenizer) if rank == 0 else {}  # rank 0 evaluates
    steps_per_epoch = train_data.steps_per_epoch
    total_steps = settings.steps or settings.epochs * steps_per_epoch
    objective, optimizer, scaler = prepare(model, teacher, distill, settings, device, precision)
    # resume from out/checkpoint.pt when present ("auto"), from a given file, or not at all ("none")
    ckpt_path = os.path.join(out_dir, interop.RUN_CHECKPOINT)
    start = {"auto": ckpt_path if os.path.exists(ckpt_path) else None, "none": None}.get(settings.resume,
                                                                                          settings.resume)
    average = WeightAverage(model, recipe.ema_decay(settings.ema, total_steps)) if settings.ema else None
    step, wall_time, losses = resume(start, model, optimizer, distill, settings, device, scaler, world_size,
                                     train_data.sharded, average) if start else (0, 0.0, {})
    delivered = average.model if average is not None else model  # what is evaluated, exported and returned
    if world_size > 1:  # one wrapper for the student and its projector: their gradients are averaged over the ranks
        objective = DDP(objective, device_ids=[device.index] if device.type == "cuda" else None)
    if rank == 0:
        print(f"data: {settings.data}: {train_data.num_samples} samples, {steps_per_epoch} steps of "
              f"{settings.batch_size * world_size} per epoch; training {total_steps} steps"
              + (f", resumed at step {step}" if step else ""), flush=True)
        os.makedirs(out_dir, exist_ok=True)
        runtime.save_config(os.path.join(out_dir, "config.json"), step, {
            "settings": asdict(settings), "model": model.cfg.to_dict(), "git": runtime.git_hash(),
            "torch": torch.__version__, "device": str(device), "precision": precision, "world_size": world_size,
            "teacher": teacher.cfg.to_dict() if teacher is not None else None})
    log = runtime.Log(out_dir, step, total_steps, enabled=rank == 0)  # metrics.jsonl and the console
    t_start = t_log = time.time()
    step_log, eval_s, eval_log = step, 0.0, 0.0  # eval_s: seconds spent evaluating; samples/s counts training only
    if settings.eval_steps and step == 0:  # where the run starts from (a grown model: its predecessor's function)
        eval_s += evaluate_and_log(delivered, eval_sets, device, precision, log, step, steps_per_epoch, ckpt_path)[1]
    while step < total_steps:
        epoch, first = divmod(step, steps_per_epoch)
        for images, tokens in train_data.batches(epoch, first):
            # forward, backward, update: the CLIP loss, plus FD towards the teacher
            images, tokens = images.to(device, non_blocking=True), tokens.to(device, non_blocking=True)
            lr = recipe.lr_at(step, total_steps, settings.warmup, settings.lr)
            losses = train_step(objective, optimizer, images, tokens, lr, settings.grad_clip, teacher,
                                precision=precision, scaler=scaler)
            if not math.isfinite(losses["loss"]):  # the same on every rank: all stop
                last = ckpt_path if os.path.exists(ckpt_path) else "none written yet"
                raise FloatingPointError(f"non-finite loss {losses} at step {step + 1}: run stopped; last good "
                                         f"checkpoint: {last} (try a lower --lr, keep --grad-clip on)")
            if average is not None:
                average.update(model)
            step += 1
            log.bar.update()
            if step % settings.log_every == 0 or step == total_steps:
                trained = time.time() - t_log - (eval_s - eval_log)  # since the last log, evaluations left out
                speed = (step - step_log) * settings.batch_size * world_size / trained
                t_log, step_log, eval_log = time.time(), step, eval_s
                log.step(step, total_steps, step / steps_per_epoch, losses, lr, model.logit_scale.exp().item(), speed)
            if rank == 0 and ((settings.save_every and step % settings.save_every == 0) or step == total_steps):
                interop.save_checkpoint(ckpt_path, step, model, optimizer, distill, scaler, asdict(settings),
                                        world_size, wall_time + time.time() - t_start, losses, average)
            if step == total_steps:
                break
            if settings.eval_steps and step % settings.eval_steps == 0:
                eval_s += evaluate_and_log(delivered, eval_sets, device, precision, log, step, steps_per_epoch,
                                           ckpt_path)[1]
        if step < total_steps and settings.eval_every and (epoch + 1) % settings.eval_every == 0:
            eval_s += evaluate_and_log(delivered, eval_sets, device, precision, log, step, steps_per_epoch,
                                       ckpt_path)[1]
    log.bar.close()
    if average is not None:  # the trained model is the average (its checkpoint keeps both)
        model.load_state_dict(average.model.state_dict())
    if rank == 0:  # the model as an open_clip local-dir, beside the checkpoint
        interop.export_open_clip(model, model.cfg, os.path.join(out_dir, "open_clip"))
    # after the writes: once train() returns, every rank can read them
    metrics, spent = evaluate_and_log(model, eval_sets, device, precision, log, step, steps_per_epoch, ckpt_path,
                                      final=True)
    skipped = sum(runtime.all_ranks(train_data.skipped), Counter())  # bad samples met, by kind, on all ranks
    return {"step": step, "num_samples": train_data.num_samples, "samples_seen": step * settings.batch_size * world_size,
            "wall_time_s": wall_time + time.time() - t_start, "eval_s": eval_s + spent, **losses, **metrics,
            "skipped": dict(skipped)}


# -----------------------------------------------------------------------------
# what train() calls: the distillation module, setup, resume, evaluation


def distillation(model, teacher, alpha=ALPHA):
    """CoM-PT's feature-space transfer towards `teacher` (distill.py): FD of weight alpha, with projectors when the
    embedding dims differ; None without a teacher."""
    return FeatureDistill(model.cfg.embed_dim, teacher.cfg.embed_dim, alpha) if teacher is not None else None


class WeightAverage:
    """An exponential moving average of a model's weights (Polyak averaging), started at the weights it is given and
    updated after every optimizer step: a grown stage delivers it (recipe.py, "the grown stages")."""

    def __init__(self, model, decay):
        self.decay = decay
        self.model = vit.CLIP(model.cfg).to(next(model.parameters()).device).eval().requires_grad_(False)
        self.model.load_state_dict(model.state_dict())

    @torch.no_grad()
    def update(self, model):
        torch._foreach_lerp_(list(self.model.parameters()), [p.detach() for p in model.parameters()], 1 - self.decay)

    def state_dict(self):
        return self.model.state_dict()

    def load_state_dict(self, state_dict):
        self.model.load_state_dict(state_dict)


def check_teacher(model, teacher, distill):
    if (teacher is None) != (distill is None):
        raise ValueError("train() needs both a teacher and a distillation module, or neither")
    for key in ("image_size", "context_length", "vocab_size", "tokenizer") if teacher is not None else ():
        if getattr(teacher.cfg, key) != getattr(model.cfg, key):  # the teacher sees the student's batches
            raise ValueError(f"teacher {key} {getattr(teacher.cfg, key)!r} differs from the student's "
                             f"{getattr(model.cfg, key)!r}; give both the same data shape")


def prepare(model, teacher, distill, settings, device, precision):
    """Models on the device in their modes; the loss module, AdamW and the fp16 grad scaler."""
    model.to(device).train()
    model.set_grad_checkpointing(settings.grad_checkpointing)
    if settings.compile:  # in place: the state dict keeps its keys (no _orig_mod.)
        model.visual.compile()
        model.transformer.compile()
    if teacher is not None:
        teacher.to(device).eval()
        distill.to(device).train()
    optimizer = recipe.make_optimizer(model, settings.lr, settings.wd, device, distill)
    return Objective(model, distill), optimizer, torch.amp.GradScaler(device.type, enabled=precision == "fp16")


def resume(path, model, optimizer, distill, settings, device, scaler, world_size, sharded, average=None):
    """Restore a run from checkpoint `path` (interop.py reads it) after checking that it is this run's: the same
    model, settings (but FREE_ON_RESUME), number of processes and teacher; returns (step, wall time so far in seconds,
    last losses). sharded: the data are tar shards, whose batch order also depends on the number of workers."""
    ckpt = interop.load_checkpoint(path, model.cfg)  # another model, or tensors of other shapes: one line
    free, now = FREE_ON_RESUME + (() if sharded else ("workers",)), asdict(settings)
    for key, value in ckpt["settings"].items():  # in the order of Settings: the data stream first
        if key not in free and key in now and value != now[key]:
            why = {"workers": " (the batch order of shards depends on it)",
                   "steps": f" (the lr schedule spans the run: to train on, --init-from {path} --out NEW_FOLDER)",
                   "epochs": " (the lr schedule spans the run)"}.get(key, "")
            raise ValueError(f"checkpoint {path} was trained with {key}={value!r}, not {now[key]!r}{why}; resume with "
                             "the same value, or use another --out")
    if ckpt.get("world_size", 1) != world_size:  # so does the number of processes (the global batch)
        raise ValueError(f"checkpoint {path} was trained by {ckpt.get('world_size', 1)} processes, not {world_size}; "
                         "resume with as many (torchrun --nproc_per_node x --nnodes), or use another --out")
    if (ckpt["distill"] is None) != (distill is None):
        raise ValueError(f"checkpoint {path} was trained {'without' if distill is not None else 'with'} a teacher; "
                         f"resume it the same way, or use another --out")
    return interop.restore_checkpoint(ckpt, model, optimizer, distill, scaler, device, average)


def evaluate_and_log(model, eval_sets, device, precision, log, step, steps_per_epoch, checkpoint, final=False):
    """Rank 0 evaluates; the others wait for its metrics, which every rank returns with the seconds the evaluation
    took (the result's eval_s; samples/s leaves them out). The final evaluation adds the attribute probes of the
    synthetic set (probe_<attribute>: what the image tower knows). Any failure stops every rank with one line
    (runtime.EvaluationFailed) that names `checkpoint`, the run's checkpoint path, from which the same command
    resumes: a finished run is then evaluated again without training."""
    t_eval = time.time()

    def measure():
        try:  # in the run's precision (bf16 on CUDA and bf16 CPUs), unlike evaluate.py's fp32 default: a picture or
            # two may differ from `python evaluate.py` on the same checkpoint (README, "Use it")
            metrics = evaluate.evaluate(model, eval_sets, device, precision)
            if final and "probes" in eval_sets:
                metrics.update(evaluate.attribute_probes(model, eval_sets["probes"], device, precision))
            return metrics
        except Exception as e:  # a bad evaluation set or a bug: one line, sent to every rank
            frames = traceback.extract_tb(e.__traceback__)  # named by the innermost line of this code's files
            where = next((f for f in reversed(frames) if os.path.dirname(f.filename) == HERE), frames[-1])
            return f"{os.path.basename(where.filename)}:{where.lineno}: {type(e).__name__}: {e}"
    metrics = runtime.from_rank0(measure() if log.enabled else None)
    if isinstance(metrics, str):
        kept = (f"the trained model is kept in {checkpoint}: fix the cause and rerun the same command, which evaluates "
                f"it without training again") if final else (
                f"the last checkpoint is {checkpoint if os.path.exists(checkpoint) else 'none yet'}: fix the cause "
                f"(or evaluate at the end only: --eval-every 0) and rerun the same command to resume")
        raise runtime.EvaluationFailed(f"the evaluation at step {step} failed ({metrics}); {kept}")
    log({"step": step, "epoch": step / steps_per_epoch, **metrics}, f"step {step} eval: " + (
        " ".join(f"{k} {'undefined' if v is None else f'{v:.4f}'}" for k, v in metrics.items())  # None: top-5 of 4
        or "no eval sets (see --zeroshot-data, --val-data)"))
    return metrics, time.time() - t_eval


# -----------------------------------------------------------------------------
# command line (flags.py holds the flags; chain.py shares them)


def first_model(cfg, seed, init=None, method="lossless", init_from=""):
    """A fresh model of `cfg` (seeded), started from `init` = (state_dict, cfg) of --init-from when given."""
    torch.manual_seed(seed)  # the model's init: the same on every rank
    model = vit.CLIP(cfg)
    if init is not None:
        interop.initialise(model, *init, method=method, seed=seed, source=f"--init-from {init_from}")
    return model


def parse_args(argv=None):
    p = runtime.ArgumentParser(description="Train one CLIP model (optionally distilled from a teacher).")
    p.add_argument("--size", default="cpu-tiny", help=f"model size: {', '.join(vit.SIZES)}")
    p.add_argument("--out", default="out", help=f"output folder: {interop.RUN_CHECKPOINT}, metrics.jsonl, "
                   "config.json, open_clip/")
    add_model_args(p)
    add_settings_args(p)  # everything else: the fields of Settings
    return p.parse_args(argv)


@runtime.stops_cleanly(runtime.RERUN_TO_RESUME)  # Ctrl-C, SIGTERM: one line, exit 130 / 143
def main(argv=None):
    args = parse_args(argv)
    settings = Settings(**{f.name: getattr(args, f.name) for f in fields(Settings)})
    try:
        check_settings(settings)
        runtime.check_out_dir(args.out)
        init = interop.load_state_dict_any(args.init_from) if args.init_from else None
        teacher = interop.load_model(args.teacher) if args.teacher else None
        cfg = model_config(args.size, args, like=init[1] if init else teacher.cfg if teacher else None)
        model = first_model(cfg, settings.seed, init, args.grow_method, args.init_from)
        runtime.init_distributed(runtime.pick_device(settings.device))  # under torchrun: one process group
        runtime.hold_out_dir(args.out)  # one run at a time in --out, until main returns
        metrics = train(model, settings, args.out, teacher=teacher, distill=distillation(model, teacher, args.alpha))
    except runtime.USER_ERRORS as e:  # one line, no traceback: 2 for bad input, 1 for a run that stopped (NaN, disk)
        runtime.exit_with(e)
    finally:
        runtime.destroy_distributed()
    if runtime.is_rank0():
        print(json.dumps(metrics, indent=2))


if __name__ == "__main__":
    main()
