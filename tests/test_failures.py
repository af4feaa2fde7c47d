"""What survives what: kill -9 at any moment, Ctrl-C and SIGTERM, a second run on the same folder, a resume with other
settings, a full disk, corrupt, unsafe, foreign or diverged checkpoints, unreadable run files, bad samples and hostile
captions; and every bad command line is one line on stderr (`error: ...`, exit status 2, or 1 for a run that stopped
on its own), with nothing written."""
import contextlib
import errno
import gzip
import io
import json
import os
import pickle
import random
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

import chain
import data
import evaluate
import interop
import runtime
import tokenizer
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


# -----------------------------------------------------------------------------
# the operator: Ctrl-C and SIGTERM, two runs on one folder, a resume with other settings


def stderr_of(main, argv):
    """Run a command line in-process: (exit status, what it wrote on stderr)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), pytest.raises(SystemExit) as e:
        main(argv)
    return e.value.code, err.getvalue()


def resumed_steps(monkeypatch):
    """The steps that the next runs resume from (interop.restore_checkpoint's), as a list filled as they do."""
    steps, restore = [], interop.restore_checkpoint

    def restore_and_note(*args):
        restored = restore(*args)
        steps.append(restored[0])
        return restored
    monkeypatch.setattr(interop, "restore_checkpoint", restore_and_note)
    return steps


# a run whose checkpoints take 0.2 s to write: there is time to signal it while its checkpoint.pt.tmp exists
SLOW_SAVES = ("import time, torch, train; save = torch.save; torch.save = lambda *a: (save(*a), time.sleep(0.2)); "
              "train.main()")
TRAIN_RUN = ["--steps", "10", "--save-every", "1", "--warmup", "2", *FAST]


@pytest.fixture(scope="module")
def sigterm_run(tmp_path_factory):
    """`python train.py` in a subprocess; a second run tried on its --out once it has a checkpoint; SIGTERM while it
    writes the next one; then the same command in-process, which finishes the run."""
    out = tmp_path_factory.mktemp("sigterm") / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", SLOW_SAVES, "--out", str(out), *TRAIN_RUN], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    ckpt, tmp = out / "checkpoint.pt", out / "checkpoint.pt.tmp"
    while proc.poll() is None and not ckpt.exists():
        time.sleep(0.005)
    second = stderr_of(train.main, ["--out", str(out), *TRAIN_RUN])  # while the first runs
    while proc.poll() is None and not tmp.exists():  # the next checkpoint is being written
        time.sleep(0.005)
    proc.send_signal(signal.SIGTERM)
    stopped = proc.wait(timeout=60), proc.stderr.read(), sorted(os.listdir(out))
    saved = torch.load(ckpt, weights_only=True)["step"]  # whole: the checkpoint being written was dropped
    with pytest.MonkeyPatch.context() as monkeypatch:
        resumed = resumed_steps(monkeypatch)
        train.main(["--out", str(out), *TRAIN_RUN])
    return dict(out=out, pid=proc.pid, second=second, stopped=stopped, saved=saved, resumed=resumed)


def test_sigterm_is_one_line_drops_the_file_being_written_and_the_rerun_resumes(sigterm_run):
    status, err, files = sigterm_run["stopped"]
    assert status == 128 + signal.SIGTERM == 143, err
    assert err.count("\n") == 1 and err.startswith("interrupted by SIGTERM: ") and "rerun the same command" in err
    assert not [f for f in files if f.endswith(".tmp")] and runtime.LOCK_FILE not in files
    assert sigterm_run["resumed"] == [sigterm_run["saved"]] and sigterm_run["saved"] >= 1
    records = [json.loads(line) for line in open(sigterm_run["out"] / "metrics.jsonl")]
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 11))  # each step once
    assert not (sigterm_run["out"] / runtime.LOCK_FILE).exists()


def test_a_second_run_on_the_same_out_is_refused_naming_the_first(sigterm_run, tmp_path):
    status, err = sigterm_run["second"]  # train.py, while the subprocess ran
    assert status == 2 and err.count("\n") == 1 and f"(PID {sigterm_run['pid']} on " in err, err
    out = tmp_path / "chain"
    runtime.hold_out_dir(str(out))  # as another process would (a lock is per open file, so this process too)
    try:
        status, err = stderr_of(chain.main, ["--sizes", "cpu-tiny,cpu-small", "--steps", "1,1", "--out", str(out),
                                             *FAST])
        assert status == 2 and err.count("\n") == 1 and f"(PID {os.getpid()} on " in err, err
        assert os.listdir(out) == [runtime.LOCK_FILE]  # refused before its manifest
    finally:
        runtime._release()
    assert not out.exists()  # the lock file goes with the run, and the folder it made for nothing


def test_a_resume_with_other_settings_is_refused_and_config_json_tells_what_changed(sigterm_run, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(sigterm_run["out"], out)
    before = (out / "config.json").read_text()
    for flag, value in (("--lr", "5e-4"), ("--warmup", "3"), ("--wd", "0.05"), ("--grad-clip", "0.5"),
                        ("--steps", "12"), ("--captions-per-image", "2")):
        err = one_line_error(train.main, ["--out", str(out), *TRAIN_RUN, flag, value], capsys)
        assert f"{flag[2:].replace('-', '_')}=" in err and "use another --out" in err, err
        assert flag != "--steps" or "--init-from" in err  # a longer run is a new one, started from this one's weights
    assert (out / "config.json").read_text() == before  # nothing rewritten
    train.main(["--out", str(out), *TRAIN_RUN, "--log-every", "5"])  # free on resume
    config = json.load(open(out / "config.json"))
    assert config["settings"]["log_every"] == 1  # as it held for the whole run before the resume
    assert config["resumed"][-1] == {"step": 10, "settings": {"log_every": 5}}


CHAIN_RUN = ["--sizes", "cpu-tiny,cpu-small", "--steps", "4,2", "--save-every", "1", *FAST]


@pytest.fixture(scope="module")
def ctrl_c_chain(tmp_path_factory):
    """`python chain.py`, in-process, Ctrl-C while it writes its first stage's third checkpoint (the signal itself,
    sent to this process); then the same command, which resumes and finishes the chain."""
    out = tmp_path_factory.mktemp("ctrl_c") / "chain"
    save, saves = torch.save, []

    def save_then_ctrl_c(obj, path):
        save(obj, path)  # a whole checkpoint.pt.tmp, not yet renamed into place
        saves.append(path)
        if len(saves) == 3:
            os.kill(os.getpid(), signal.SIGINT)
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setattr(torch, "save", save_then_ctrl_c)
        status, err = stderr_of(chain.main, ["--out", str(out), *CHAIN_RUN])
    stopped = dict(status=status, err=err, files=sorted(os.listdir(out / "1-cpu-tiny")), saving=saves[-1])
    with pytest.MonkeyPatch.context() as monkeypatch:
        resumed = resumed_steps(monkeypatch)
        chain.main(["--out", str(out), *CHAIN_RUN])
    return dict(out=out, resumed=resumed, **stopped)


def test_ctrl_c_in_a_chain_is_one_line_drops_the_file_being_written_and_the_rerun_resumes(ctrl_c_chain):
    assert ctrl_c_chain["status"] == 128 + signal.SIGINT == 130
    err = ctrl_c_chain["err"]
    assert err.count("\n") == 1 and err.startswith("interrupted by SIGINT: ") and "rerun the same command" in err
    assert ctrl_c_chain["saving"].endswith("checkpoint.pt.tmp")
    assert "checkpoint.pt" in ctrl_c_chain["files"] and not [f for f in ctrl_c_chain["files"] if f.endswith(".tmp")]
    assert ctrl_c_chain["resumed"] == [2]  # the third checkpoint was dropped: resumed from the second
    assert json.load(open(ctrl_c_chain["out"] / "report.json"))["stages"][1]["size"] == "cpu-small"


def test_a_checkpoint_of_other_shapes_is_named_with_the_fix(ctrl_c_chain, tmp_path, capsys):
    out = tmp_path / "chain"
    shutil.copytree(ctrl_c_chain["out"], out)
    shutil.copy(out / "2-cpu-small" / "checkpoint.pt", out / "1-cpu-tiny" / "checkpoint.pt")  # a finished stage's
    err = one_line_error(chain.main, ["--out", str(out), *CHAIN_RUN], capsys)
    assert "1-cpu-tiny/checkpoint.pt holds a model of another config (vision_width 128 there, 64 here)" in err
    assert "use another --out" in err
    ckpt = torch.load(out / "2-cpu-small" / "checkpoint.pt", weights_only=True)
    ckpt["model"]["visual.proj"] = ckpt["model"]["visual.proj"][:, :8]  # its config says otherwise
    torch.save(ckpt, out / "2-cpu-small" / "checkpoint.pt")
    err = one_line_error(train.main, ["--out", str(out / "2-cpu-small"), "--size", "cpu-small", *FAST], capsys)
    assert "2-cpu-small/checkpoint.pt holds a model whose weights do not match its config (wrong shape " \
           "['visual.proj'])" in err


def test_ctrl_c_in_evaluate_is_one_line_and_writes_nothing(ctrl_c_chain, tmp_path, monkeypatch):
    def ctrl_c(*args):
        os.kill(os.getpid(), signal.SIGINT)
    monkeypatch.setattr(evaluate, "run", ctrl_c)
    report = tmp_path / "eval.json"
    status, err = stderr_of(evaluate.main, ["--model", str(ctrl_c_chain["out"] / "1-cpu-tiny"), "--out", str(report)])
    assert status == 130 and err == "interrupted by SIGINT: nothing was written; rerun the same command\n"
    assert os.listdir(tmp_path) == []


# -----------------------------------------------------------------------------
# weights and configs refused when loaded, before anything is written


def test_non_finite_weights_are_refused_when_loaded(tmp_path, capsys):
    state = tiny_model().state_dict()
    state["visual.proj"][0, 0] = float("nan")
    torch.save(state, tmp_path / "nan.pt")
    out = tmp_path / "run"
    for main, argv in ((train.main, ["--init-from", str(tmp_path / "nan.pt"), *FAST]),
                       (chain.main, ["--sizes", "cpu-tiny,cpu-small", "--teacher", str(tmp_path / "nan.pt"), *FAST]),
                       (evaluate.main, ["--model", str(tmp_path / "nan.pt"), "--out", str(out / "eval.json")])):
        err = one_line_error(main, [*argv, "--out", str(out)] if main is not evaluate.main else argv, capsys)
        assert "nan.pt: 1 of its" in err and "hold NaN or inf (visual.proj)" in err, err
        assert not out.exists()  # so the corrected command runs on the same --out


def test_a_broken_open_clip_config_is_one_line(tmp_path, capsys):
    model = tiny_model()
    folder = interop.export_open_clip(model, model.cfg, str(tmp_path / "export"))
    config_path = os.path.join(folder, interop.CONFIG_FILE)
    config = json.load(open(config_path))
    cases = [([config], "holds a JSON list, not an open_clip config"),
             ({**config, "clip_config": {**config["clip_config"], "text_width": -64}},
              "text_width must be a positive integer, got -64")]
    for broken, culprit in cases:
        json.dump(broken, open(config_path, "w"))
        err = one_line_error(evaluate.main, ["--model", folder, "--out", str(tmp_path / "eval.json")], capsys)
        assert culprit in err and interop.CONFIG_FILE in err, err


# -----------------------------------------------------------------------------
# hostile samples: counted, and no costlier than normal ones


def test_a_hostile_caption_costs_what_a_normal_one_does(tmp_path, monkeypatch):
    path = tmp_path / "bpe.txt.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:  # a few merges: enough to merge "hello" and chains of x
        f.write("#version: 0.2\nh e\nl l\nhe ll\nhell o</w>\nx x\nxx xx\nxxxx xxxx\n")
    tok = tokenizer.BPETokenizer(str(path))
    merged, bpe = [], tok.bpe
    monkeypatch.setattr(tok, "bpe", lambda token: merged.append(len(token)) or bpe(token))
    hostile = "x" * 80_000 + " hello" * 10_000
    tokens = tok([hostile, "hello hello"], 16)
    assert max(merged) == tokenizer.MAX_WORD and sum(merged) <= 2 * tokenizer.MAX_WORD  # no work past the context
    assert tokens[0].tolist() == [tok.sot, *tok.encode("x" * tokenizer.MAX_WORD)[:14], tok.eot]
    hello = tok.encoder["hello</w>"]
    assert tokens[1].tolist()[:4] == [tok.sot, hello, hello, tok.eot]  # a normal caption, as before
    monkeypatch.setattr(tokenizer, "CACHE_WORDS", 5)  # the cache of merged words stays bounded
    tok([" ".join(f"word{i}" for i in range(20))], 77)
    assert len(tok.cache) <= 5


def test_a_csv_with_a_byte_order_mark_and_a_16_bit_png_are_read(tmp_path):
    from test_data import jpeg, solid
    grey = torch.arange(64, dtype=torch.int32).view(8, 8) * 4  # 0..252
    Image.fromarray((grey * 257).numpy().astype("uint16")).save(tmp_path / "deep.png")  # 16 bits a pixel
    decoded = torch.from_numpy(np.array(data.decode_image(str(tmp_path / "deep.png"))))
    assert torch.equal(decoded, grey[..., None].expand(8, 8, 3).to(torch.uint8))  # not white
    (tmp_path / "0.jpg").write_bytes(jpeg(solid(0)))
    (tmp_path / "x.csv").write_bytes("\ufefffilepath,title\n0.jpg,a caption\ndeep.png,grey\n".encode())  # "CSV UTF-8"
    assert data.check(str(tmp_path / "x.csv")) == {"good": 2}


def test_data_check_reads_every_shard_to_its_end(tmp_path):
    from test_data import make_shards
    shards = make_shards(tmp_path / "shards", stats=())  # no img2dataset _stats.json to count from
    raw = (shards / "00001.tar").read_bytes()
    (shards / "00001.tar").write_bytes(raw[:len(raw) // 3])  # a download cut short
    for source in (shards, shards / "{00000..00002}.tar"):
        counts = data.check(str(source))
        assert counts["unreadable_shard"] == 1 and counts["good"] < 24, counts


def test_a_full_disk_while_logging_names_the_file(tmp_path, capsys, monkeypatch):
    class Full(io.StringIO):
        def write(self, text):
            raise OSError(errno.ENOSPC, "No space left on device")

    def full_for_the_log(path, mode="r", *args, **kwargs):
        return Full() if str(path).endswith("metrics.jsonl") and mode == "a" else open(path, mode, *args, **kwargs)
    monkeypatch.setattr(runtime, "open", full_for_the_log, raising=False)
    out = tmp_path / "run"
    err = one_line_error(train.main, ["--out", str(out), "--steps", "2", *FAST], capsys, status=1)
    assert f"{out / 'metrics.jsonl'}: no space left on device; free some space" in err
