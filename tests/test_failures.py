"""What survives what: kill -9 at any moment, a full disk, corrupt or unsafe checkpoints, unreadable run files, bad
samples; and every bad command line is one line on stderr (`error: ...`, exit status 2, or 1 for a run that stopped
on its own), with nothing written."""
import errno
import json
import os
import pickle
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import chain
import data
import interop
import runtime
import train
import vit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = ["--image-size", "32", "--patch-size", "16", "--context-length", "16", "--batch-size", "8",
        "--num-samples", "32", "--device", "cpu", "--log-every", "1", "--eval-every", "0", "--probes", "0"]
SMALL_CHAIN = ["--sizes", "cpu-tiny,cpu-small", "--steps", "6,4", "--save-every", "1", *FAST]
TINY = dict(image_size=32, patch_size=16, context_length=16, vocab_size=259, tokenizer="byte")


class Evil:
    def __reduce__(self):  # unpickling would run os.system
        return (os.system, ("echo this should never run",))


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return vit.CLIP(vit.config("cpu-tiny", **TINY))


def one_line_error(main, argv, capsys, status=2):
    """Run a command line in-process; it must stop with `status` and exactly one stderr line, which is returned."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == status, err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


# -----------------------------------------------------------------------------
# resume keeps everything, run files are whole or refused by name


def test_a_finished_run_resumed_still_reports_its_final_losses(tmp_path):
    settings = train.Settings(steps=3, batch_size=8, warmup=1, num_samples=32, device="cpu", eval_every=0, probes=0)
    first = train.train(tiny_model(), settings, str(tmp_path))  # as if killed after its last checkpoint
    again = train.train(tiny_model(), settings, str(tmp_path))  # nothing left to train
    for key in ("loss", "clip_loss"):
        assert again[key] == first[key]


def test_unreadable_run_files_are_named(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["--sizes", "cpu-tiny,cpu-small", "--steps", "1,1", "--out", str(out), *FAST]
    chain.main(argv)
    (out / "1-cpu-tiny" / "result.json").write_text("")  # a crash at the wrong moment, in place: empty
    err = one_line_error(chain.main, argv, capsys)
    assert "1-cpu-tiny/result.json" in err and "delete it" in err
    (out / "1-cpu-tiny" / "result.json").unlink()
    (out / "manifest.json").write_text('{"sizes": [')
    assert "manifest.json" in one_line_error(chain.main, argv, capsys)
    leftovers = [f for _, _, files in os.walk(out) for f in files if f.endswith(".tmp")]
    assert leftovers == []


def test_a_bad_teacher_writes_nothing_so_the_corrected_command_runs(tmp_path, capsys):
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    out = tmp_path / "run"
    argv = ["--sizes", "cpu-tiny,cpu-small", "--steps", "1,1", "--out", str(out), *FAST]
    for flag in ("--teacher", "--init-from"):
        assert str(empty) in one_line_error(chain.main, [*argv, flag, str(empty)], capsys)
    missing = str(tmp_path / "missing.csv")
    assert missing in one_line_error(chain.main, [*argv, "--data", missing, "--tokenizer", "byte"], capsys)
    assert not out.exists()
    assert chain.main(argv)["stages"][1]["size"] == "cpu-small"


def test_a_full_disk_is_one_line_and_leaves_no_temp_file(tmp_path, capsys, monkeypatch):
    real_save = torch.save

    def save_then_fail(obj, path):  # what torch.save does on a full disk: a partial file, an obscure error
        real_save({"x": torch.zeros(10)}, path)
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
    monkeypatch.setattr(torch, "save", save_then_fail)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9, 0))
    out = tmp_path / "run"
    err = one_line_error(train.main, ["--out", str(out), "--steps", "2", *FAST], capsys, status=1)
    assert "no space left on device" in err and "checkpoint.pt" in err
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]
    with pytest.raises(runtime.DiskFull):  # and the same for a plain OSError from the file system
        runtime.atomic_write(str(tmp_path / "x"), lambda p: (_ for _ in ()).throw(OSError(errno.ENOSPC, "full")))


# -----------------------------------------------------------------------------
# bad command lines: one line each, exit status 2 (1: a run that stopped), nothing written


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Broken and hostile files: empty, cut short, an open_clip weight file, a code-running pickle."""
    root = tmp_path_factory.mktemp("files")
    model = tiny_model()
    torch.save(model.state_dict(), root / "openclip.pt")
    raw = (root / "openclip.pt").read_bytes()
    (root / "cut.pt").write_bytes(raw[:len(raw) // 2])
    (root / "empty.pt").write_bytes(b"")
    torch.save({"model": Evil()}, root / "evil.pt")
    with open(root / "evil_raw.pt", "wb") as f:
        pickle.dump(Evil(), f)
    (root / "a_file").write_text("not a folder")
    return root


TRAIN_CASES = [  # (flags, what the one line must name)
    (["--resume", "{empty.pt}"], "not a readable PyTorch checkpoint"),
    (["--resume", "{cut.pt}"], "not a readable PyTorch checkpoint"),
    (["--resume", "{openclip.pt}"], "not a training checkpoint"),
    (["--resume", "{evil.pt}"], "refused as unsafe to load: it holds a posix.system object"),
    (["--resume", "{evil_raw.pt}"], "refused as unsafe to load"),
    (["--init-from", "{empty.pt}"], "empty.pt: not a readable PyTorch checkpoint"),
    (["--init-from", "{evil.pt}"], "posix.system"),
    (["--teacher", "{empty.pt}"], "empty.pt: not a readable PyTorch checkpoint"),
    (["--teacher", "{cut.pt}"], "cut.pt"),
    (["--out", "{a_file}"], "is a file, not a folder"),
    (["--steps", "-1"], "--steps"),
    (["--bpe", "{a_file}", "--tokenizer", "clip-bpe"], "a_file: not a CLIP BPE vocabulary"),
    (["--alpha", "-1"], "--alpha"),
    (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
]


@pytest.mark.parametrize("flags, culprit", TRAIN_CASES)
def test_train_bad_input_is_one_line(flags, culprit, files, tmp_path, capsys):
    flags = [str(files / f[1:-1]) if f.startswith("{") else f for f in flags]  # {name}: a file of `files`
    out = [] if "--out" in flags else ["--out", str(tmp_path / "run")]
    err = one_line_error(train.main, [*flags, *out, *FAST], capsys)
    assert culprit in err and "weights_only=False" not in err
    assert not (tmp_path / "run").exists()


def test_an_auto_resumed_broken_checkpoint_is_one_line(files, tmp_path, capsys):
    (tmp_path / "run").mkdir()
    shutil.copy(files / "cut.pt", tmp_path / "run" / "checkpoint.pt")
    err = one_line_error(train.main, ["--out", str(tmp_path / "run"), *FAST], capsys)
    assert "checkpoint.pt: not a readable PyTorch checkpoint" in err and "--resume none" in err


def test_a_read_only_out_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(os, "access", lambda path, mode: False)  # as for a non-root user in a read-only folder
    err = one_line_error(train.main, ["--out", str(tmp_path / "run"), *FAST], capsys)
    assert "not a writable folder" in err
    assert "permission denied" in one_line_error(  # an OSError from the system is one line too
        lambda argv: runtime.exit_with(PermissionError(errno.EACCES, "Permission denied", "/x/checkpoint.pt")),
        [], capsys)


@pytest.mark.parametrize("flags, culprit, status", [
    (["--sizes", ""], "--sizes", 2),
    (["--sizes", "cpu-tiny,cpu-small", "--alpha", "-1"], "--alpha", 2),
    (["--sizes", "cpu-tiny,cpu-small", "--resume", "x"], "unrecognized arguments: --resume", 2),
    (["--sizes", "cpu-tiny,cpu-small", "--steps", "2,1", "--lr", "1e30"], "non-finite loss", 1),  # NaN in a stage
])
def test_chain_bad_input_is_one_line(flags, culprit, status, tmp_path, capsys):
    err = one_line_error(chain.main, [*flags, "--out", str(tmp_path / "run"), *FAST], capsys, status)
    assert culprit in err


def test_interop_names_the_refused_global(files):
    with pytest.raises(ValueError, match=r"posix\.system") as e:
        interop.load_model(files / "evil.pt")
    assert "weights_only=False" not in str(e.value)


def test_data_check_of_a_file_that_is_not_a_tar_fails(tmp_path, capsys):
    (tmp_path / "notatar.tar").write_text("hello")
    assert "no samples" in one_line_error(data.main, ["check", str(tmp_path / "notatar.tar")], capsys)


def test_a_caption_that_is_not_utf8_is_a_counted_bad_sample(tmp_path):
    from test_data import jpeg, solid
    for i in range(3):
        (tmp_path / f"{i}.jpg").write_bytes(jpeg(solid(i)))
    (tmp_path / "x.csv").write_bytes(b"filepath,title\n0.jpg,a caf\xe9 in latin-1\n1.jpg,plain\n2.jpg,fine\n")
    assert data.check(str(tmp_path / "x.csv")) == {"good": 2, "bad_caption": 1}


# -----------------------------------------------------------------------------
# kill -9 at a random step, and at a random moment between stages: the rerun ends bit-identical


def run_chain_process(out, kill_when=None, seed=0):
    """`python chain.py` in a subprocess; kill_when(out) -> True makes us SIGKILL it at that moment (polled)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "chain.py"), *SMALL_CHAIN, "--out", str(out)],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    if kill_when is not None:
        while proc.poll() is None and not kill_when(out):
            time.sleep(0.005)
        if proc.poll() is None:
            time.sleep(random.Random(seed).uniform(0, 0.3))  # somewhere after the moment
            proc.send_signal(signal.SIGKILL)
        proc.wait()
        return proc.returncode
    assert proc.wait(timeout=300) == 0
    return 0


def steps_logged(stage_dir):
    path = os.path.join(stage_dir, "metrics.jsonl")
    return sum(1 for line in open(path) if '"loss"' in line) if os.path.exists(path) else 0


def final_state(out):
    """Every stage's weights and AdamW moments, and the losses its result.json reports, as one flat dict."""
    state = {}
    for stage in ("1-cpu-tiny", "2-cpu-small"):
        ckpt = torch.load(os.path.join(out, stage, "checkpoint.pt"), weights_only=True)
        state.update({f"{stage}/{k}": v for k, v in ckpt["model"].items()})
        state.update({f"{stage}/adam.{i}.{k}": v for i, s in ckpt["optimizer"]["state"].items() for k, v in s.items()})
        result = json.load(open(os.path.join(out, stage, "result.json")))
        state.update({f"{stage}/{k}": result[k] for k in ("loss", "clip_loss", "fd_loss") if k in result})
    return state


def assert_same(a, b):
    assert a.keys() == b.keys()
    for k, v in a.items():
        assert torch.equal(v, b[k]) if isinstance(v, torch.Tensor) else v == b[k], k


def test_kill_9_at_a_random_step_or_between_stages_then_rerun_is_bit_identical(tmp_path):
    run_chain_process(tmp_path / "straight")
    reference = final_state(tmp_path / "straight")
    at_step = random.Random(1).randint(1, 5)  # inside the first stage (6 steps)
    scenarios = {"step": lambda out: steps_logged(os.path.join(out, "1-cpu-tiny")) >= at_step,
                 "between": lambda out: os.path.exists(os.path.join(out, "1-cpu-tiny", "result.json"))}
    for i, (name, kill_when) in enumerate(scenarios.items()):
        out = tmp_path / name
        assert run_chain_process(out, kill_when, seed=i) == -signal.SIGKILL, name  # it was killed, not finished
        run_chain_process(out)
        assert_same(final_state(out), reference)
