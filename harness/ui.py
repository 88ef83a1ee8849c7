"""`harness ui`: the MLflow UI over the tracking store, opened on a study's or an experiment's runs.

MLflow 3.17 opens an experiment on its GenAI overview; the training view is one URL parameter
away (`?workflowType=machine_learning`: Runs, Models, Model registry), so the URL printed (and
opened, where a graphical browser exists) goes straight there. The server runs in a process
group of its own, stopped as a whole on Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import os
import subprocess
import sys

from harness.tags import RUN_KIND
from harness.tracking import open_client, redact, tracking_uri

UI_MODE = "workflowType=machine_learning"  # MLflow 3 opens experiments on its GenAI overview: the training view
UI_READY_SECONDS = 180  # a first start on a busy 2-core machine takes about 30 s


def serve(
    tracking: str | None, study: str | None, experiment: str | None, host: str, port: int, no_browser: bool
) -> int:
    """Serve the UI until Ctrl-C; returns the exit code (2: a study, experiment or port that can't be had)."""
    uri = tracking_uri(tracking)
    client = open_client(uri)  # a fresh store is created (and migrated) here, under the workers' lock
    try:
        exp_id, what = _ui_target(client, study, experiment, redact(uri))
    except LookupError as e:
        print(f"harness: error: {e}", file=sys.stderr)
        return 2
    if uri.startswith(("http://", "https://")):  # a tracking server already serves the UI
        return _show(client, uri.rstrip("/"), exp_id, what, no_browser)
    refused = _cannot_bind(host, port)
    if refused:
        print(f"harness: error: {refused}", file=sys.stderr)
        return 2
    host, base = _local_address(host, port)
    print(f"MLflow UI starting on {base} over {redact(uri)} ...", flush=True)
    server = _start_server(uri, host, port)
    return _serve_until_stopped(server, client, base, exp_id, what, no_browser)


def _cannot_bind(host: str, port: int) -> str | None:
    """Why the server could not listen on host:port (None: it can), found before it starts."""
    import socket

    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server will
            probe.bind((host, port))
    except OSError as e:
        return f"cannot serve on {host}:{port} ({e.strerror or e}): choose another --port (or --host)"
    return None


def _local_address(host: str, port: int) -> tuple[str, str]:
    """The host to serve on and the base URL to browse: a wildcard address is browsed on loopback."""
    host = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "[::1]"}.get(host, host)
    return host, f"http://{f'[{host}]' if ':' in host and not host.startswith('[') else host}:{port}"


def _start_server(uri: str, host: str, port: int) -> subprocess.Popen:
    """`mlflow ui` over the store, in a process group of its own: Ctrl-C reaches this process, which
    then stops the whole server."""
    # one worker is plenty for one person; the job runner serves GenAI judges only (7 more processes)
    env = {
        **os.environ,
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": os.environ.get("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false"),
    }
    cmd = [
        sys.executable,
        "-m",
        "mlflow",
        "ui",
        "--backend-store-uri",
        uri,
        "--host",
        host,
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    return subprocess.Popen(cmd, env=env, start_new_session=True)


def _serve_until_stopped(
    server: subprocess.Popen, client, base: str, exp_id: str | None, what: str, no_browser: bool
) -> int:
    """Show the UI once the server answers, then wait: 0 once Ctrl-C or SIGTERM stops it, 1 if it
    never answers or stops by itself. The server is stopped on every way out."""
    import signal

    def on_term(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_term)  # `kill` stops it as cleanly as Ctrl-C
    try:
        if not _wait_until_answering(server, base):
            why = (
                f"did not answer in {UI_READY_SECONDS} s"
                if server.poll() is None
                else f"stopped (exit code {server.returncode}) before it answered"
            )
            print(f"harness: error: the MLflow UI server {why}: see its messages above", file=sys.stderr)
            return 1
        _show(client, base, exp_id, what, no_browser)
        print("Ctrl-C stops the server", flush=True)
        code = server.wait()
        print(f"harness: error: the MLflow UI server stopped by itself (exit code {code})", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        _stop_server(server)
        print("MLflow UI stopped", flush=True)
        return 0
    finally:
        _stop_server(server)  # (a no-op once it is stopped)
        signal.signal(signal.SIGTERM, previous)


def _ui_target(client, study: str | None, experiment: str | None, store: str) -> tuple[str | None, str]:
    """The experiment id to open (None: the experiments list) and what it is; LookupError names the choices."""

    def missing(kind: str, kinds: str, name: str, names, fix: str) -> LookupError:
        names = sorted(n for n in set(names) if n)
        more = f" and {len(names) - 20} more" if len(names) > 20 else ""
        there = f"its {kinds}: {', '.join(names[:20])}{more}" if names else f"it has no {kinds} yet"
        return LookupError(f"no {kind} {name!r} in {store}; {there} ({fix})")

    if study:
        ids = [e.experiment_id for e in client.search_experiments()]
        runs = client.search_runs(ids, f"tags.{RUN_KIND} = 'study'", max_results=1000) if ids else []
        found = {r.data.tags.get("study"): r.info.experiment_id for r in runs}
        if study not in found:
            raise missing(
                "study",
                "studies",
                study,
                found,
                "pick one with --study" if found else "`harness tune --study NAME` makes one",
            )
        return found[study], f"study {study}: its study run and trials"
    if experiment:
        exp = client.get_experiment_by_name(experiment)
        if exp is None or exp.lifecycle_stage != "active":
            raise missing(
                "experiment",
                "experiments",
                experiment,
                [e.name for e in client.search_experiments()],
                "pick one with --experiment",
            )
        return exp.experiment_id, f"experiment {experiment}: its runs"
    return None, "experiments"


def _ui_url(base: str, exp_id: str | None) -> str:
    return f"{base}/#/experiments/{exp_id}/runs?{UI_MODE}" if exp_id else f"{base}/#/experiments?{UI_MODE}"


def _show(client, base: str, exp_id: str | None, what: str, no_browser: bool) -> int:
    """Print the URL; open it where a browser can show it (a console one would take the terminal)."""
    import webbrowser

    url = _ui_url(base, exp_id)
    print(f"{what}, in Model-training mode: {url}", flush=True)
    if exp_id is None:  # the list's links drop the mode: give each experiment's own
        print(
            "(MLflow opens an experiment picked there on its GenAI overview until you switch it to "
            "'Model training' once; the runs directly:)"
        )
        for exp in client.search_experiments(max_results=10, order_by=["last_update_time DESC"]):
            print(f"  {exp.name}: {_ui_url(base, exp.experiment_id)}", flush=True)
    graphical = os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY") or sys.platform in ("darwin", "win32")
    if not no_browser and (graphical or os.environ.get("BROWSER")):
        try:
            webbrowser.open(url)
        except webbrowser.Error:
            pass
    return 0


def _wait_until_answering(server: subprocess.Popen, base: str) -> bool:
    """Poll the server's /health until it answers; False if it exits first or takes too long."""
    import time
    import urllib.request

    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never through a proxy
    deadline = time.monotonic() + UI_READY_SECONDS
    while server.poll() is None and time.monotonic() < deadline:
        try:
            with opener.open(f"{base}/health", timeout=2) as response:
                if response.status == 200:
                    return True
        except OSError:
            pass
        time.sleep(0.25)
    return False


def _stop_server(server: subprocess.Popen) -> None:
    """Ctrl-C to the server's whole process group, as a terminal would; then SIGTERM, then SIGKILL.

    Another Ctrl-C meanwhile is ignored: the stop takes 30 s at most and leaves no server behind.
    """
    import signal
    import time

    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        for sig, seconds in ((signal.SIGINT, 20), (signal.SIGTERM, 5), (signal.SIGKILL, 5)):
            try:
                os.killpg(server.pid, sig)
            except ProcessLookupError:
                return
            deadline = time.monotonic() + seconds
            while time.monotonic() < deadline:
                server.poll()  # reap it, or the group never empties
                try:
                    os.killpg(server.pid, 0)
                except ProcessLookupError:
                    return
                time.sleep(0.1)
    finally:
        signal.signal(signal.SIGINT, previous)
