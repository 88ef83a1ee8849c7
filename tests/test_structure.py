"""The house's shape: arrows only downward, no import cycles, a command line that loads a
subcommand's modules only when that subcommand runs, and docs that point only at what exists
(docs/architecture.md naming every module).

    harness/   the core (config, data, models, training, evaluation, tracking, ...)   layer 0
    studies/   harness.studies: Optuna studies, transfer and split studies             layer 1
    analysis/  harness.analysis: feature-space analysis                                layer 1
    harness/api.py (the Python API, `import harness`) and harness/cli.py over it      layer 2

An import points only to a lower layer (or within one); studies and analysis know nothing of each
other. The graph counts every import, at the top of a module or inside a function. `from harness
import config` is an arrow to harness.config; only a name defined in the package's __init__ is one
to it (the API).
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = {"harness": "harness", "studies": "harness.studies", "analysis": "harness.analysis"}  # installed as
SIBLINGS = ("harness.studies", "harness.analysis")  # layer 1
TOP = ("harness", "harness.api", "harness.cli")  # layer 2


def module_name(path: Path) -> str:
    folder, *parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join([FOLDERS[folder], *(parts[:-1] if parts[-1] == "__init__" else parts)])


def layer(module: str) -> int:
    if module in TOP:
        return 2
    return 1 if module.startswith(tuple(f"{p}." for p in SIBLINGS)) or module in SIBLINGS else 0


def sibling(module: str) -> str | None:
    return next((p for p in SIBLINGS if module == p or module.startswith(p + ".")), None)


def imports_of(path: Path, modules=()) -> set[str]:
    """The project modules `path` imports (resolved to modules, not to names inside them): `from P
    import M` of a module M in `modules` is an arrow to P.M alone (what the importer uses of P)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            submodules = [f"{node.module}.{a.name}" for a in node.names]
            names = submodules + ([node.module] if not all(m in modules for m in submodules) else [])
        else:
            continue
        out |= {n for n in names if n.split(".")[0] in ("harness", *FOLDERS)}
    return out


def graph() -> dict[str, set[str]]:
    files = {module_name(p): p for folder in FOLDERS for p in (ROOT / folder).rglob("*.py")}
    return {name: {m for m in imports_of(path, files) if m in files and m != name} for name, path in files.items()}


def test_every_import_uses_the_installed_names():
    """`harness.studies`, never `studies`: installed, there is no top-level `studies` or `analysis`."""
    bare = [
        f"{p.relative_to(ROOT)}: {m}"
        for folder in (*FOLDERS, "tests", "benchmarks", "scripts")
        for p in (ROOT / folder).rglob("*.py")
        for m in imports_of(p)
        if m.split(".")[0] in ("studies", "analysis")
    ]
    assert not bare, bare


def test_arrows_point_only_downward():
    upward = [(a, b) for a, deps in graph().items() for b in deps if layer(b) > layer(a)]
    assert not upward, f"arrows up a layer (core 0, studies/analysis 1, API and CLI 2): {upward}"


def test_analysis_and_studies_do_not_import_each_other():
    across = [
        (a, b) for a, deps in graph().items() for b in deps if sibling(a) and sibling(b) and sibling(a) != sibling(b)
    ]
    assert not across, across


def test_no_import_cycle():
    g = graph()
    state: dict[str, int] = {}  # 1 on the path, 2 done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for dep in sorted(g[node]):
            if state.get(dep) == 1:
                raise AssertionError(f"import cycle: {' -> '.join(path[path.index(dep) :] + [dep])}")
            if dep not in state:
                visit(dep, path + [dep])
        state[node] = 2

    for node in sorted(g):
        if node not in state:
            visit(node, [node])


def imported_by(*argv: str, code: int = 0) -> str:
    """The modules `python -m harness.cli ARGV` imports (from -X importtime's report); it must exit `code`."""
    out = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "harness.cli", *argv], cwd=ROOT, capture_output=True, text=True
    )
    assert out.returncode == code, out.stderr[-2000:]
    return "\n".join(line.rsplit("|", 1)[-1].strip() for line in out.stderr.splitlines() if "|" in line)


@pytest.mark.slow
def test_train_help_does_not_import_optuna_or_the_studies():
    """`harness train` builds only its own subcommand's arguments (the others' come with their command)."""
    modules = imported_by("train", "--help").split("\n")
    loaded = {m for m in modules if m.startswith(("optuna", "harness.studies", "harness.analysis"))}
    assert not loaded, sorted(loaded)[:10]


@pytest.mark.parametrize(
    "argv",
    [
        ("--help",),
        ("train", "--set", "nope=1"),
        ("train", "--set", "epochs=many"),
        ("tune", "--study", "s", "--space", "nope"),
        ("tune", "--study", "s", "--objectives", "accuracy,speed"),
    ],
)
def test_help_and_a_bad_setting_are_answered_before_torch_or_mlflow_load(argv):
    """A typo is one line in a fraction of a second, not after the 3-10 s that torch and MLflow take to load."""
    modules = imported_by(*argv, code=0 if argv == ("--help",) else 2).split("\n")
    assert not {m.split(".")[0] for m in modules} & {"torch", "mlflow"}


IMPORT_LEAVES_NO_TRACE = """
import logging, warnings
import harness.studies.driver, harness.studies.optuna_access, harness.studies.report, harness.studies.study
import harness.studies.worker
from optuna.exceptions import ExperimentalWarning

def quiet_filters():
    return [f for f in warnings.filters if f[2] is ExperimentalWarning and f[0] == "ignore"]

optimize = logging.getLogger(harness.studies.optuna_access.OPTIMIZE_LOGGER)
assert not quiet_filters() and not optimize.filters, "set on import"
assert not hasattr(harness.studies.report, "_settled"), "a module-global cache"
for _ in range(2):  # what a worker and its study install when they start, once however often
    harness.studies.study.quiet_experimental()
    harness.studies.worker.quiet_trial_logs()
assert len(quiet_filters()) == 1 and len(optimize.filters) == 1
"""


def test_importing_the_studies_sets_no_filter_and_starting_one_sets_each_once():
    out = subprocess.run([sys.executable, "-c", IMPORT_LEAVES_NO_TRACE], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]


# ----------------------------------------------------------------------------
# The documentation: README.md and docs/*.md point only at what exists, and docs/architecture.md
# names every module.

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)|<img [^>]*src=\"([^\"]+)\"")
# a project file in backticks: `studies/spaces/fast.yaml`, `harness/host_reads.py` (not artifacts such as
# `analysis/stage_metrics.csv`, nor `mlruns/<id>/...`)
PROJECT_PATH = re.compile(
    r"`((?:harness|studies|analysis|benchmarks|scripts|tests|docs|\.ci)/[\w/-]+\.(?:py|sh|yaml|md))`"
)


def slug(heading: str) -> str:
    """GitHub's anchor for a Markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", ""))
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    return {slug(m) for m in re.findall(r"^#+ (.+)$", text, flags=re.M)}


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_the_docs_link_only_to_what_exists(doc):
    text = doc.read_text()
    broken = []
    for m in LINK.finditer(text):
        target = m.group(1) or m.group(2)
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        path = (doc.parent / file).resolve() if file else doc
        if not path.exists():
            broken.append(target)
        elif anchor and path.suffix == ".md" and anchor not in anchors(path):
            broken.append(f"{target} (no such heading)")
    for m in PROJECT_PATH.finditer(text):
        if not (ROOT / m.group(1)).exists():
            broken.append(m.group(1))
    assert not broken, f"{doc.name}: {broken}"


def test_the_architecture_page_names_every_module():
    page = (ROOT / "docs" / "architecture.md").read_text()
    files = [p for pkg in (*FOLDERS, "benchmarks") for p in (ROOT / pkg).glob("*.py") if p.name != "__init__.py"]
    files += [p for p in (ROOT / "scripts").rglob("*") if p.is_file()] + list((ROOT / ".ci").glob("*"))
    unnamed = [str(p.relative_to(ROOT)) for p in files if f"({'../' + str(p.relative_to(ROOT))})" not in page]
    assert not unnamed, f"add a line for each to docs/architecture.md: {sorted(unnamed)}"


MAX_FUNCTION_LINES = 60


def test_no_function_is_longer_than_a_screen():
    """Every function of the project (the benchmarks aside: each is one script's story) fits in 60 lines."""
    long = []
    for folder in ("harness", "studies", "analysis", "tests", "scripts"):
        for path in sorted((ROOT / folder).glob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    lines = node.end_lineno - node.lineno + 1
                    if lines > MAX_FUNCTION_LINES:
                        long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, "split into named steps: " + ", ".join(long)
