"""
The runtime under training: device choice, the precision policy, the torchrun process group and the share of each
rank in an epoch's batches, atomic file writes, a run's log, the code version, one-line errors, one run per output
folder and a clean stop on Ctrl-C or SIGTERM. Nothing here is about CLIP or the chain; train.py, chain.py, data.py
and synthetic.py share it.
"""

import argparse
import contextlib
import datetime
import errno
import fcntl
import functools
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading

import torch
import torch.distributed as dist
from tqdm import tqdm

# -----------------------------------------------------------------------------
# device and precision

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def pick_device(name="auto"):
    """The torch.device for --device; a bare "cuda" is this process's GPU (cuda:LOCAL_RANK under torchrun)."""
    available = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available(), "cpu": True}
    name = next(d for d in available if available[d]) if name == "auto" else name  # cuda, else mps, else cpu
    if not available.get(name.split(":")[0]):
        raise ValueError(f"--device {name} is not available here; use one of: auto, "
                         + ", ".join(d for d in available if available[d]))
    return torch.device(f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if name == "cuda" else name)


def has_bf16_matmul():
    """Whether this CPU has bf16 matrix instructions (AVX512-BF16 or AMX), the ones bf16 autocast runs on."""
    capabilities = torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else {}
    return bool(capabilities.get("avx512_bf16") or capabilities.get("amx_bf16"))


def default_precision(device):
    """bf16 autocast on CUDA and on CPUs with bf16 matrix instructions (faster there); fp32
    elsewhere. Norms, logits and losses stay fp32 either way."""
    return "bf16" if device.type == "cuda" or device.type == "cpu" and has_bf16_matmul() else "fp32"


def autocast(device, precision=""):
    """The precision policy in one place: autocast to bf16 or fp16, or none for fp32 ("": the device's default).
    Norms, logits and losses are computed in fp32 by the code that calls this (train.Objective)."""
    precision = precision or default_precision(device)
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


def world_size():
    """The number of processes torchrun starts (WORLD_SIZE; 1 outside torchrun), known before they join a group."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank_and_world():
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


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
# an epoch's global batches, shared out over the ranks (data.py's and synthetic.py's training batches)


def steps_per_epoch(num_samples, batch_size, world_size=1):
    """Global batches of batch_size x world_size samples in an epoch of num_samples (the last incomplete one is
    dropped); a one-line ValueError when there is none."""
    steps = num_samples // (batch_size * world_size)
    if steps == 0:
        raise ValueError(f"{num_samples} samples make no batch of {batch_size} x {world_size} ranks: "
                         "lower --batch-size or raise --num-samples")
    return steps


def rank_slice(step, batch_size, rank, world_size):
    """Rank `rank`'s part of global batch `step` in an epoch's order of samples: global batches are consecutive
    slices of batch_size x world_size, and rank r takes the r-th batch_size of each."""
    first = (step * world_size + rank) * batch_size
    return slice(first, first + batch_size)


# -----------------------------------------------------------------------------
# files: written whole or not at all, read back with one clear line when they are not readable


class DiskFull(OSError):
    """Raised when a write meets a full disk; its message names the file and the fix."""


def atomic_write(path, write):
    """Write `path` through `write(tmp_path)` and rename it into place: a crash or a full disk leaves the previous
    file intact, and no temporary file behind."""
    path = os.fspath(path)
    tmp = path + ".tmp"  # not *.bin or *.pt: no loader ever picks up a half-written file
    try:
        write(tmp)
        os.replace(tmp, path)
    except Exception as e:
        # torch.save reports a full disk as an obscure RuntimeError: look at the disk itself, temp file still there
        full = isinstance(e, OSError) and e.errno == errno.ENOSPC or _nearly_full(path)
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if full:
            raise DiskFull(errno.ENOSPC, f"no space left on device writing {path}: free some space and rerun the "
                           "same command (it resumes from the last checkpoint)") from None
        raise
    except BaseException:  # an interrupt: no temp file left behind either
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def _nearly_full(path):
    try:
        return shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free < 1 << 20  # under 1 MiB left
    except OSError:
        return False


def save_torch(obj, path):
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def save_text(text, path):
    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)
    atomic_write(path, write)


def save_json(obj, path):
    save_text(json.dumps(obj, indent=2) + "\n", path)


def load_json(path, what="run file"):
    """A JSON file this code wrote; an empty, cut or garbled one is a ValueError that names it and the fix."""
    try:
        with open(path) as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: this {what} is not readable JSON ({e.__class__.__name__}: {e}); delete it and "
                         "rerun the same command") from None


def save_config(path, step, config):
    """A run's config.json (a dict with "settings"): the run as it started. A resume (step > 0) adds what differs from
    then on (the device, the code version, a setting free on resume) under "resumed", so that no value is claimed for
    a part of the run it did not hold for."""
    first = load_json(path, "run config") if step and os.path.exists(path) else None
    if isinstance(first, dict) and isinstance(first.get("settings"), dict):
        changed = {k: v for k, v in config.items() if k != "settings" and first.get(k) != v}
        settings = {k: v for k, v in config["settings"].items() if first["settings"].get(k) != v}
        config = {**first, "resumed": first.get("resumed", []) + [{"step": step, **changed, "settings": settings}]}
    save_json(config, path)


def git_hash():
    """The commit of this code, with "-dirty" when the work tree has changes; "unknown" outside git."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD"], cwd=here).returncode != 0
        return head.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


# -----------------------------------------------------------------------------
# a run's log: metrics.jsonl and the console


def _record_step(line):
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):  # a record cut short by a crash: dropped
        return math.inf


class Log:
    """metrics.jsonl and the console, written by rank 0 only: a progress bar on a terminal, plain lines in a log
    file. A resumed run replays the steps after its checkpoint, so their old records are dropped first."""

    def __init__(self, out_dir, step, total_steps, enabled):
        self.path, self.enabled = os.path.join(out_dir, "metrics.jsonl"), enabled
        self.tty = enabled and sys.stderr.isatty()
        self.bar = tqdm(total=total_steps, initial=step, disable=not self.tty, unit="step", dynamic_ncols=True)
        if enabled:
            kept = [r for r in open(self.path) if _record_step(r) <= step] if os.path.exists(self.path) else []
            save_text("".join(kept), self.path)

    def __call__(self, record, line, always=True):
        """Append a record; print its line (steps: only when no bar shows)."""
        if self.enabled:
            try:
                with open(self.path, "a") as f:
                    f.write(json.dumps(record) + "\n")
            except OSError as e:  # a full disk: write() knows no file name, so name it here
                raise OSError(e.errno, e.strerror, self.path) from None
            if always or not self.tty:
                tqdm.write(line)

    def step(self, step, total_steps, epoch, losses, lr, logit_scale, speed):
        record = {"step": step, "epoch": epoch, **losses, "lr": lr, "logit_scale": logit_scale, "samples_per_s": speed}
        self.bar.set_postfix(loss=f"{losses['loss']:.3f}", lr=f"{lr:.2e}", samples_s=f"{speed:.0f}")
        self(record, f"step {step}/{total_steps} " + " ".join(f"{k} {v:.4g}" for k, v in record.items() if k != "step"),
             always=False)


# -----------------------------------------------------------------------------
# command lines: a failure the user can act on is one line on stderr, never a traceback


class EvaluationFailed(RuntimeError):
    """Any failure inside a run's evaluation, as one line; the run's checkpoint is kept."""


STOPPED = (FloatingPointError, DiskFull, EvaluationFailed)  # a run that stopped on its own: exit status 1; bad input: 2
USER_ERRORS = (ValueError, OSError, FloatingPointError, EvaluationFailed)


class ArgumentParser(argparse.ArgumentParser):
    """argparse, with a usage error as one line too (argparse prints the whole usage first)."""

    def error(self, message):
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def check_out_dir(path, flag="--out"):
    """Refuse an output folder that cannot be made or written, before anything is written."""
    path = os.path.abspath(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"{flag} {path} is a file, not a folder; pass another {flag}")
    existing = path
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing) or not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {path}: {existing} is not a writable folder; pass another {flag}")


def exit_with(error):
    """Print `error` as one line (`error: ...`) and exit: 1 for a run that stopped, 2 for bad input."""
    text = str(error)
    if isinstance(error, OSError) and not isinstance(error, DiskFull) and error.strerror:
        where = error.filename or "a file of the run"  # an OSError from the system: say where, and what to do
        fix = {errno.ENOSPC: "free some space and rerun the same command (it resumes from the last checkpoint)",
               errno.EACCES: "check its permissions, or pass another --out",
               errno.EROFS: "it is on a read-only file system: pass another --out"}.get(error.errno, "check it")
        text = f"{where}: {error.strerror.lower()}; {fix}"
    print(f"error: {' '.join(text.split())}", file=sys.stderr)
    sys.exit(1 if isinstance(error, STOPPED) or getattr(error, "errno", None) == errno.ENOSPC else 2)


# -----------------------------------------------------------------------------
# a command's run: one run per output folder; Ctrl-C and SIGTERM stop it with one line

LOCK_FILE = "run.lock"  # in the output folder while a run holds it; its text names the holder
RERUN_TO_RESUME = "the files in --out are whole; rerun the same command to resume from its last checkpoint"
_held = []  # (descriptor, lock file, folder made for it or None) of each folder this command holds


def hold_out_dir(folder):
    """Hold `folder` (made if need be) for this run until its command ends (see stops_cleanly): a second run on it
    is refused in one line naming the first one's PID. The lock is advisory (flock on folder/run.lock): the OS drops
    it when the process dies, kill -9 included, so a crash never leaves a stale lock. Under torchrun rank 0 takes
    it and the other ranks share its outcome (so they never wait at a collective rank 0 has left)."""
    error = None
    if is_rank0():
        try:
            error = _lock(folder)
        except OSError as e:
            error = f"--out {folder}: {(e.strerror or str(e)).lower()}; pass another --out"
    error = from_rank0(error)
    if error:
        raise ValueError(error)


def _lock(folder):
    """Take folder's lock; the one-line refusal when another process holds it, else None."""
    made = not os.path.isdir(folder)
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, LOCK_FILE)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 256).decode(errors="replace").strip() or "a process that is starting"
            os.close(fd)
            return (f"--out {folder} is in use by another run ({holder}); wait for it to end or stop it, or pass "
                    "another --out")
        with contextlib.suppress(FileNotFoundError):  # still the folder's lock file, not one its last holder removed
            if os.path.samestat(os.fstat(fd), os.stat(path)):
                break
        os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, f"PID {os.getpid()} on {socket.gethostname()}\n".encode())
    _held.append((fd, path, folder if made else None))
    return None


def _release(keep=0):
    """Release the folders held, but the first `keep` (those of an enclosing command)."""
    while len(_held) > keep:
        fd, path, made = _held.pop()
        with contextlib.suppress(OSError):
            os.remove(path)  # while still locked: a run that opened it meanwhile sees it gone and opens a new one
        os.close(fd)
        if made:
            with contextlib.suppress(OSError):  # a folder made for a run that stopped before writing: left empty
                os.rmdir(made)


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM, raised where the main thread was (whatever handles Ctrl-C handles SIGTERM alike)."""


def stops_cleanly(how_to_resume):
    """Decorate a command's main(): SIGINT (Ctrl-C) and SIGTERM (what timeout, Slurm and Kubernetes send) raise
    Interrupted where the run is, so a file being written is dropped with its temp file (atomic_write); then rank 0
    prints one line, `interrupted by SIGTERM: <how_to_resume>`, and the exit status is 128 + the signal (130, 143),
    as shells expect. After a signal any failure is the interrupt (under torchrun, a rank's collective fails when
    its peers stop first). The folders held with hold_out_dir are released on the way out."""
    def decorate(main):
        @functools.wraps(main)
        def run(*args, **kwargs):
            received, held = [], len(_held)

            def stop(signum, frame):
                if not received:  # a second signal while stopping is ignored: the cleanup is short (kill -9 works)
                    received.append(signum)
                    raise Interrupted(signum)
            signals = (signal.SIGINT, signal.SIGTERM) if threading.current_thread() is threading.main_thread() else ()
            previous = {s: signal.signal(s, stop) for s in signals}
            try:
                return main(*args, **kwargs)
            except BaseException as e:
                if not received and not isinstance(e, KeyboardInterrupt):
                    raise
                signum = received[0] if received else signal.SIGINT
                if is_rank0():
                    print(f"interrupted by {signal.Signals(signum).name}: {how_to_resume}", file=sys.stderr)
                sys.exit(128 + signum)
            finally:
                _release(held)
                for s, handler in previous.items():
                    signal.signal(s, handler)
        return run
    return decorate
