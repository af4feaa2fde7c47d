"""The header of every results/ file: the command that wrote it, the machine, torch, the date and the conditions."""
import datetime
import os
import shlex
import sys

import torch


def command(argv=None):
    return "python " + shlex.join(sys.argv if argv is None else argv)


def header(cmd, conditions=""):
    """The results file's first lines (markdown): the command, the CPU and its capabilities, the threads, torch, the
    date and, when given, the conditions of the measurement (idle or shared machine, ...)."""
    capabilities = torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else {}
    flags = ", ".join(k for k, v in sorted(capabilities.items()) if v is True)
    lines = [f"Command: `{cmd}`  ", f"CPU: {capabilities.get('cpu_name', 'unknown')}, {os.cpu_count()} logical cores, "
             f"{torch.get_num_threads()} torch threads; capabilities: {flags}  ",
             f"torch {torch.__version__}; {datetime.date.today().isoformat()}"]
    return lines[:-1] + [lines[-1] + "  ", f"Conditions: {conditions}"] if conditions else lines
