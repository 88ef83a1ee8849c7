"""The README's quick-tour pictures, taken from a real study's stores (the main job's by default).

    .venv/bin/python scripts/screenshots.py [--study cifar10-cnn] [--out docs/images]

Starts `harness ui --study` and the read-only `harness dashboard` on free ports, loads them in a
headless Chromium (tests/chrome.py, the browser test's client) and writes:

    runs-table.png      the study run expanded into its trials, in the MLflow UI's runs table
    trial-confusion.png the best trial's normalized confusion matrix (its artifact, as logged)
    trial-umap.png      the best trial's UMAP of test-set embeddings (its artifact, as logged)
    summary.png         the study summary's interactive parallel-coordinates plot, rendered
    dashboard.png       optuna-dashboard on the study
"""

from __future__ import annotations

import argparse
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from chrome import Chrome, find_chromium  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def shoot(chromium: str, url: str, path: Path, wait_for: tuple[str, ...], before=None, settle: float = 2.0) -> None:
    browser = Chrome(chromium, url)
    try:
        browser.wait_for_text(*wait_for, timeout=120)
        if before is not None:
            before(browser)
        time.sleep(settle)  # charts animate in
        browser.screenshot(path)
        print(f"wrote {path}")
    finally:
        browser.close()


def runs_table(chromium: str, study: str, tracking: str, out: Path) -> None:
    port = free_port()
    ui = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "harness.cli",
            "ui",
            "--study",
            study,
            "--no-browser",
            "--port",
            str(port),
            "--tracking-uri",
            tracking,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        cwd=ROOT,
    )
    try:
        url = None
        for line in ui.stdout:
            if m := re.search(r"(http://\S+#/experiments/\S+)", line):
                url = m.group(1)
                break
        if url is None:
            raise SystemExit("harness ui printed no URL")

        def expand(browser: Chrome) -> None:
            browser.js("""(() => {  // the MLflow Assistant side panel, closed: the table gets the width
                const panel = [...document.querySelectorAll('*')].find(e => e.innerText === 'MLflow Assistant');
                let box = panel;
                while (box && !box.querySelector('button[aria-label*="lose"]')) box = box.parentElement;
                const close = box && [...box.querySelectorAll('button[aria-label*="lose"]')].pop();
                if (close) close.click();
            })()""")
            browser.js(f"""(() => {{
                const name = [...document.querySelectorAll('a')].find(a => a.innerText.trim() === 'study-{study}');
                const button = name && name.closest('[role=gridcell]').querySelector('button');
                if (button) button.click();
            }})()""")
            browser.wait_for_text("trial-0", timeout=120)

        shoot(chromium, url, out / "runs-table.png", (f"study-{study}", "Run Name"), before=expand)
    finally:
        ui.send_signal(subprocess.signal.SIGINT)
        ui.wait(timeout=60)


def artifacts(client, study_run: str, best_run: str, chromium: str, out: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        for artifact, name in (
            ("eval/confusion_normalized.png", "trial-confusion.png"),
            ("embeddings/umap.png", "trial-umap.png"),
        ):
            shutil.copy(client.download_artifacts(best_run, artifact, tmp), out / name)
            print(f"wrote {out / name}")
        html = client.download_artifacts(study_run, "summary/parallel_coordinate.html", tmp)
        shoot(chromium, Path(html).as_uri(), out / "summary.png", ("val_accuracy",))


def dashboard(chromium: str, study: str, storage: str, out: Path) -> None:
    from harness.studies.dashboard import open_dashboard

    server, page, _ = open_dashboard(study, storage, port=free_port())
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        shoot(chromium, page, out / "dashboard.png", ("Trials",), settle=4.0)
    finally:
        server.shutdown()
        server.server_close()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--study", default="cifar10-cnn")
    p.add_argument("--tracking-uri", default="sqlite:///mlruns/mlflow.db")
    p.add_argument("--storage", default="sqlite:///mlruns/optuna.db")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "images")
    a = p.parse_args()
    chromium = find_chromium()
    if chromium is None:
        raise SystemExit("no Chromium on this machine: apt-get install chromium")
    import optuna
    from mlflow import MlflowClient

    a.out.mkdir(parents=True, exist_ok=True)
    client = MlflowClient(a.tracking_uri)
    study = optuna.load_study(study_name=a.study, storage=a.storage)
    runs_table(chromium, a.study, a.tracking_uri, a.out)
    artifacts(
        client, study.user_attrs["mlflow_parent_run_id"], study.best_trial.user_attrs["mlflow_run_id"], chromium, a.out
    )
    dashboard(chromium, a.study, a.storage, a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
