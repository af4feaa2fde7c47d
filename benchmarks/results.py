"""
The header of every results/ file a benchmark writes: the command, the CPU and its capabilities, the threads, torch,
the date and the conditions the figures were taken in; and the atomic write of the file.
"""
import datetime
import os
import platform
import shlex
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import runtime  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "results")


def cpu_model():
    """The CPU's model name from /proc/cpuinfo (Linux), else torch's or the platform's name for it."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    capabilities = torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else {}
    return capabilities.get("cpu_name") or platform.processor() or "unknown"


def header(title, conditions, cmd=None):
    """A results file's first lines: the title, the command as run (default: this process's), the machine, torch, the
    date, `conditions`."""
    capabilities = torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else {}
    flags = ", ".join(k for k, v in sorted(capabilities.items()) if v is True)
    return [f"# {title}", "", f"Command: `{cmd or command()}`  ",
            f"CPU: {cpu_model()}, {os.cpu_count()} logical cores; capabilities: {flags}  ",
            f"torch {torch.__version__}, {torch.get_num_threads()} threads; {datetime.date.today().isoformat()}  ",
            f"Conditions: {conditions}", ""]


def write(name, lines):
    """Write lines to results/<name> atomically; returns the path."""
    path = os.path.join(RESULTS, name)
    runtime.save_text("\n".join(lines) + "\n", path)
    return path


def command(argv=None):
    """The command line that ran, as a user types it (argv: the script and its arguments, default sys.argv)."""
    argv = sys.argv if argv is None else argv
    return shlex.join(["python", os.path.relpath(argv[0]), *argv[1:]])
