"""`harness ui` end to end: a real study on a temporary store, the real MLflow UI server started by
`harness ui --study` as a process of its own, and the printed URL rendered by a real headless
Chromium, driven over the DevTools protocol (`--remote-debugging-pipe`, so no extra package):
the study run shows in the runs table, and its trial runs once it is expanded, as a person would
click. The MLflow UI renders on the client, so the test waits for the table rather than dumping the
first HTML. Where no Chromium can be had the browser test skips, saying so (`.ci/run` installs it).
"""

from __future__ import annotations

import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import optuna  # noqa: F401  (imported now: its log handler keeps the stream of the moment, not a test's capsys)
import pytest
from chrome import Chrome, find_chromium
from helpers import as_sets, tiny_trial
from mlflow import MlflowClient

from harness.cli import main
from harness.tracking import NOTE_TAG, RunLogger, client_for

STUDY = "ui-study"
TRIALS = 2
FIXED = tiny_trial("epochs=1")
SPACE = """\
params:
  optimizer: {type: categorical, choices: [adamw, sgd]}
  lr: {type: float, low: 0.005, high: 0.05, log: true}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_error_line(capsys) -> str:
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("harness: error: "), err
    assert "MLflow UI starting" not in out  # refused before any server started
    return lines[0]


# ----------------------------------------------------------------------------
# Refused before the server starts


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    """A store holding one study run (as `harness tune` makes it) and a plain experiment."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('store') / 'mlflow.db'}"
    client = client_for(uri)
    RunLogger.start(client, "known", "study-known", tags={"study": "known", "run_kind": "study"}).end()
    RunLogger.start(client, "cifar10-train", "a-run").end()
    return uri


def test_missing_study_is_one_line_naming_the_studies(store, capsys):
    assert main(["ui", "--study", "missing", "--no-browser", "--tracking-uri", store]) == 2
    line = one_error_line(capsys)
    assert "no study 'missing'" in line and "its studies: known" in line and "--study" in line
    assert "cifar10-train" not in line  # an experiment that is no study


def test_missing_experiment_is_one_line_naming_the_experiments(store, capsys):
    assert main(["ui", "--experiment", "missing", "--no-browser", "--tracking-uri", store]) == 2
    line = one_error_line(capsys)
    assert "no experiment 'missing'" in line and "cifar10-train" in line and "known" in line


def test_port_in_use_is_one_line(store, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["ui", "--study", "known", "--no-browser", "--port", str(port), "--tracking-uri", store]) == 2
    line = one_error_line(capsys)
    assert f"cannot serve on 127.0.0.1:{port}" in line and "--port" in line


@pytest.mark.slow
def test_missing_study_from_the_installed_command(store, tmp_path):
    script = Path(sys.executable).parent / "harness"
    proc = subprocess.run(
        [str(script), "ui", "--study", "missing", "--tracking-uri", store],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "harness" in line]
    assert len(errors) == 1 and "no study 'missing'" in errors[0] and "known" in errors[0], proc.stderr
    assert "MLflow UI starting" not in proc.stdout


# ----------------------------------------------------------------------------
# The real thing, in a real browser


@pytest.fixture(scope="module")
def chromium() -> str:
    path = find_chromium()
    if path is None:
        pytest.skip("browser test: no Chromium on this machine (apt-get install chromium; .ci/run installs it)")
    return path


@pytest.fixture(scope="module")
def study_store(tmp_path_factory, cifar10_root) -> str:
    """A study of two tiny trials, made by `harness tune` on a temporary store."""
    tmp = tmp_path_factory.mktemp("ui")
    space = tmp / "space.yaml"
    space.write_text(SPACE)
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    args = [
        "tune",
        "--study",
        STUDY,
        "--space",
        str(space),
        "--trials",
        str(TRIALS),
        "--storage",
        f"sqlite:///{tmp / 'optuna.db'}",
        "--tracking-uri",
        uri,
        "--data-dir",
        str(cifar10_root),
        "--sampler",
        "random",
        "--pruner",
        "none",
        "--seed",
        "0",
        "--quiet",
        "--evaluate",
        "inline",
    ]
    assert main([*args, *as_sets(FIXED)]) == 0
    return uri


def read_lines(stream, lines: queue.Queue) -> None:
    for line in stream:
        lines.put(line)
    lines.put(None)


def assert_the_note_says_how_to_browse(exp) -> None:
    """(b) The experiment says what it holds and how to browse it."""
    note = exp.tags[NOTE_TAG]
    for words in (
        f"study-{STUDY}",
        "trial-<n>",
        "summary/",
        f"harness compare --study {STUDY}",
        f"harness best --study {STUDY}",
        f"harness report --study {STUDY}",
    ):
        assert words in note, note


def start_ui(port: int, store: str, tmp_path: Path) -> subprocess.Popen:
    """`harness ui --study` as a process of its own, its output a pipe to read, its errors in ui.err."""
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "harness.cli",
            "ui",
            "--study",
            STUDY,
            "--no-browser",
            "--port",
            str(port),
            "--tracking-uri",
            store,
        ],
        stdout=subprocess.PIPE,
        stderr=open(tmp_path / "ui.err", "w"),
        text=True,
        cwd=tmp_path,
    )


def printed_url(lines: queue.Queue, err: Path) -> str:
    """The experiment's URL, from the first line of `harness ui` that prints one."""
    out: list[str] = []
    url = None
    while url is None:
        line = lines.get(timeout=300)
        assert line is not None, f"harness ui ended early: {''.join(out)}{err.read_text()}"
        out.append(line)
        m = re.search(r"(http://\S+#/experiments/\S+)", line)
        url = m and m.group(1)
    return url


def expand_the_study_run(browser: Chrome) -> None:
    """Click the expander on the study run's row, as a person would, to show its nested trials; the
    grid may draw the row's name before its expander, so this waits for the button itself."""
    browser.wait_for_js(
        f"""(() => {{
        const name = [...document.querySelectorAll('a')].find(a => a.innerText.trim() === 'study-{STUDY}');
        const button = name && name.closest('[role=gridcell]').querySelector('button');
        if (button) button.click();
        return Boolean(button);
    }})()""",
        "the expander on the study run's row",
    )


def browse_to_the_trials(chromium: str, url: str, client: MlflowClient, exp) -> float:
    """Open `url` in Chromium and see the study run, then its trials; returns when they showed."""
    browser = Chrome(chromium, url)
    try:
        runs = client.search_runs([exp.experiment_id])
        trials = sorted(r.info.run_name for r in runs if r.data.tags.get("run_kind") == "trial")
        assert trials == [f"trial-{n}" for n in range(TRIALS)]
        # the runs table and the experiment's description (rendered from its Markdown): two fetches,
        # which the page shows in either order
        page = browser.wait_for_text(f"study-{STUDY}", "Run Name", f"Optuna study {STUDY}")
        assert browser.js("location.hash").startswith(f"#/experiments/{exp.experiment_id}/runs")  # not the overview
        # Model-training mode: its side bar (Runs, Models, Model registry), not the GenAI one (Overview, ...)
        assert "Model registry" in page and "Overview" not in page, page[:1000]
        if not all(t in page for t in trials):  # nested: shown once the study run is expanded
            expand_the_study_run(browser)
        browser.wait_for_text(*trials)
        return time.monotonic()
    finally:
        browser.close()


def stop_ui(ui: subprocess.Popen) -> int:
    """Ctrl-C to `harness ui` (if it still runs); its exit code."""
    if ui.poll() is None:
        ui.send_signal(signal.SIGINT)  # Ctrl-C
    try:
        return ui.wait(timeout=60)
    except subprocess.TimeoutExpired:
        ui.kill()
        raise


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_ui_opens_the_study_runs_in_a_real_browser(study_store, chromium, tmp_path):
    client = MlflowClient(study_store)
    exp = client.get_experiment_by_name(STUDY)
    assert_the_note_says_how_to_browse(exp)

    port = free_port()
    started = time.monotonic()
    ui = start_ui(port, study_store, tmp_path)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=read_lines, args=(ui.stdout, lines), daemon=True).start()
    try:
        url = printed_url(lines, tmp_path / "ui.err")
        ready = time.monotonic()
        assert url == f"http://127.0.0.1:{port}/#/experiments/{exp.experiment_id}/runs?workflowType=machine_learning"
        rendered = browse_to_the_trials(chromium, url, client, exp)
        print(
            f"harness ui answered in {ready - started:.1f} s; the browser showed the trials "
            f"{rendered - ready:.1f} s later"
        )
    finally:
        code = stop_ui(ui)
    rest = []
    while (line := lines.get(timeout=10)) is not None:
        rest.append(line)
    assert code == 0, (tmp_path / "ui.err").read_text()
    assert "MLflow UI stopped" in "".join(rest)
    with pytest.raises(OSError):  # nothing serves on the port any more
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
