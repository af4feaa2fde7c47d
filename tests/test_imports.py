"""The dependency stack of the top-level modules, read from their source with ast (imports inside functions
included): the method's core imports only torch and the standard library, every other import points down the stack,
and so there is no cycle."""
import ast
import os
import runpy
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODULES = sorted(f[:-3] for f in os.listdir(ROOT) if f.endswith(".py"))
CORE = {"vit", "clip_loss", "grow", "distill", "tokenizer"}  # the method: torch and the standard library only

# the project modules each module may import, bottom of the stack first
ALLOWED = {**{name: set() for name in CORE},
           "runtime": set(),  # device, precision, process group, files, log
           "recipe": set(),  # optimizer, schedule, the official and synthetic recipes
           "synthetic": {"vit", "tokenizer", "runtime"},
           "interop": {"vit", "grow", "tokenizer", "runtime"},
           "data": {"vit", "tokenizer", "runtime", "synthetic"},
           "ledger": {"vit"},
           "grow_recipes": {"grow"},  # grow.py in timm and Hugging Face models: torch and grow.py only
           "evaluate": {"vit", "tokenizer", "runtime", "synthetic", "interop", "data", "recipe"}}
# the flags of a run, train.py's and chain.py's: beside evaluate, below train
ALLOWED["flags"] = ALLOWED["evaluate"] | {"grow", "distill"}
ALLOWED["train"] = ALLOWED["evaluate"] | {"evaluate", "flags", "clip_loss", "distill", "grow"}
ALLOWED["chain"] = ALLOWED["train"] | {"train", "ledger"}


def imports(name):
    """The top-level names a module imports, anywhere in its source."""
    with open(os.path.join(ROOT, name + ".py")) as f:
        tree = ast.parse(f.read())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            found.add(node.module.split(".")[0])
    return found


def project_imports(name):
    return imports(name) & set(MODULES)


def test_every_module_has_a_place_in_the_stack():
    assert set(MODULES) == set(ALLOWED), "place a new top-level module in ALLOWED (tests/test_imports.py)"


@pytest.mark.parametrize("name", MODULES)
def test_imports_point_down_the_stack(name):
    assert project_imports(name) <= ALLOWED.get(name, set()), project_imports(name) - ALLOWED.get(name, set())


@pytest.mark.parametrize("name", sorted(CORE))
def test_the_core_needs_torch_alone(name):
    # grow.py in particular is meant to be copied into another codebase
    outside = imports(name) - set(sys.stdlib_module_names) - {"torch"}
    assert not outside, f"{name}.py imports {outside}"


def test_no_cycle_and_the_named_edges():
    graph = {name: project_imports(name) for name in MODULES}
    done, path = set(), []

    def visit(name):
        assert name not in path, " -> ".join(path[path.index(name):] + [name])
        if name not in done:
            path.append(name)
            for dependency in sorted(graph[name]):
                visit(dependency)
            path.pop()
            done.add(name)
    for name in MODULES:
        visit(name)
    assert "train" not in graph["evaluate"]  # fine-tuning takes its recipe from recipe.py
    assert "chain" not in graph["train"]
    assert "data" not in graph["synthetic"]


# the benchmarks sit on top of the stack: each must at least build its command line against today's modules (a
# default read from a constant that was renamed fails here, not in the middle of someone's measurement)
BENCHMARKS = sorted(f for f in os.listdir(os.path.join(ROOT, "benchmarks"))
                    if f.endswith(".py") and f not in ("results.py", "svg.py"))  # those two are helpers


@pytest.mark.parametrize("script", BENCHMARKS)
def test_every_benchmark_answers_help(script, monkeypatch, capsys):
    path = os.path.join(ROOT, "benchmarks", script)
    monkeypatch.setattr(sys, "argv", [path, "--help"])
    monkeypatch.setattr(sys, "path", [os.path.dirname(path), *sys.path])  # as `python benchmarks/x.py` starts
    for name in ("results", "svg", "study"):  # the benchmarks' own helpers: found afresh, as in a new process
        monkeypatch.delitem(sys.modules, name, raising=False)
    with pytest.raises(SystemExit) as e:
        runpy.run_path(path, run_name="__main__")
    assert e.value.code == 0 and "usage:" in capsys.readouterr().out
