"""`harness dashboard`: optuna-dashboard on a study's storage, safe beside the workers writing to it.

The storage is in WAL mode, the dashboard's connections are read-only and wait out a busy
database, a journal file (`journal:PATH`) is read through a backend that refuses to write, and
requests that would write are answered 405 before they reach the storage: an optuna-dashboard on
a live SQLite study once crashed it with "database is locked" (optuna-dashboard#545). Why each is
needed: docs/browsing.md. Each trial's note (written by the worker, `note_run_link`) links its run
in the MLflow UI.
"""

from __future__ import annotations

import json
import logging
import sqlite3
from pathlib import Path
from socketserver import ThreadingMixIn
from urllib.parse import quote
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from harness.tracking import error_line

MLFLOW_UI = "http://127.0.0.1:5000"  # what `harness ui` serves
INSTALL = "pip install optuna-dashboard"


def mlflow_run_url(tracking_uri: str, experiment_id: str, run_id: str) -> str:
    """The run's page in the MLflow UI: the tracking server itself, or `harness ui` for a local store."""
    base = tracking_uri.rstrip("/") if tracking_uri.startswith(("http://", "https://")) else MLFLOW_UI
    return f"{base}/#/experiments/{experiment_id}/runs/{run_id}"


def note_run_link(trial, run) -> None:
    """The trial's optuna-dashboard note: a link to its MLflow run. Never fails the trial.

    Written as `save_note` writes a trial's first note (version 1, the text in chunks), without
    its two reads of all the study's system attrs: every trial's note adds two, so those reads
    grew with the study (about 4 ms more per 100 trials on SQLite). A worker's trial is new
    (a re-queued one has a new trial id), so it has no note to follow or to clear."""
    try:
        from optuna_dashboard import save_note

        url = mlflow_run_url(run.client.tracking_uri, run.experiment_id, run.run_id)
        local = " (start `harness ui` to open it)" if url.startswith(MLFLOW_UI) else ""
        body = f"**MLflow run** of trial {trial.number}: [{run.run_id}]({url}){local}"
        try:
            from optuna_dashboard._note import note_ver_key, split_body
        except ImportError:  # another optuna-dashboard layout: its public call
            save_note(trial, body)
            return
        from harness.studies.optuna_access import study_id, study_storage, trial_id

        attrs = {note_ver_key(trial_id(trial)): 1, **split_body(body, trial_id(trial))}
        for key, value in attrs.items():
            study_storage(trial.study).set_study_system_attr(study_id(trial.study), key, value)
    except Exception as e:  # a missing package, a busy storage: the trial goes on without its note
        logging.getLogger(__name__).warning("trial %s: no dashboard note (%s)", trial.number, error_line(e))


def read_only_storage(url: str):
    """A storage on `url` that cannot write: an RDBStorage waiting up to 60 s for a busy database, or
    a journal file's that refuses every write (no lock taken: readers never hold the workers up)."""
    import optuna

    from harness.studies.journal import journal_path, read_journal

    if journal_path(url) is not None:
        return read_journal(url, writable=False)
    if url.startswith("sqlite:///"):
        path = Path(url.removeprefix("sqlite:///")).expanduser().resolve()

        def connect():  # a URI filename: read-only, whatever characters the path holds
            return sqlite3.connect(f"file:{quote(str(path))}?mode=ro", uri=True, timeout=60, check_same_thread=False)

        engine = {"creator": connect}
    elif url.startswith(("postgresql", "postgres")):
        engine = {"connect_args": {"options": "-c default_transaction_read_only=on"}, "pool_pre_ping": True}
    else:
        engine = {}
    return optuna.storages.RDBStorage(
        url, engine_kwargs=engine, skip_compatibility_check=True, skip_table_creation=True
    )


def refuse_writes(app):
    """WSGI: only GET and HEAD reach optuna-dashboard; the rest is answered 405 with the reason."""
    reason = json.dumps(
        {
            "reason": "this dashboard is read-only (harness dashboard): it never writes to a "
            "study that workers are running"
        }
    ).encode()

    def wrapped(environ, start_response):
        if environ.get("REQUEST_METHOD", "GET") in ("GET", "HEAD"):
            return app(environ, start_response)
        start_response(
            "405 Method Not Allowed",
            [("Content-Type", "application/json"), ("Allow", "GET, HEAD"), ("Content-Length", str(len(reason)))],
        )
        return [reason]

    return wrapped


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True  # Ctrl-C does not wait for a browser's open requests


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format, *args):  # no line per request (the browser polls every few seconds)
        pass


def open_dashboard(study: str, storage: str | None = None, host: str = "127.0.0.1", port: int = 8080):
    """(server, URL of the study's page, storage URL), not serving yet; a user's error is a StudyError."""
    from harness.studies.options import StudyError
    from harness.studies.optuna_access import study_id
    from harness.studies.study import existing_storage
    from harness.tracking import redact

    try:
        import optuna_dashboard
    except ImportError:
        raise StudyError(f"optuna-dashboard is not installed: {INSTALL}") from None
    url = existing_storage(storage, study)  # the same resolution as `harness tune`; creates nothing
    try:
        ro = read_only_storage(url)
        names = {s.study_name: study_id(s) for s in ro.get_all_studies()}
    except StudyError:  # a journal file that is none: said already
        raise
    except Exception as e:
        raise StudyError(
            f"cannot read study storage {redact(url)} ({error_line(e)}): check the --storage URL "
            "and that the database server is running"
        ) from None
    if study not in names:
        raise StudyError(
            f"study {study!r} not found in {redact(url)}; studies there: "
            f"{', '.join(names) or 'none'} (pass --storage if it lives elsewhere)"
        )
    app = refuse_writes(optuna_dashboard.wsgi(ro))
    try:
        server = make_server(host, port, app, server_class=_Server, handler_class=_QuietHandler)
    except OSError as e:
        raise StudyError(f"cannot listen on {host}:{port} ({e.strerror or e}): pick another --port") from None
    return server, f"http://{host}:{server.server_port}/dashboard/studies/{names[study]}", url


def serve(study: str, storage: str | None = None, host: str = "127.0.0.1", port: int = 8080) -> None:
    """`harness dashboard`: serve until Ctrl-C."""
    from harness.tracking import redact

    server, page, url = open_dashboard(study, storage, host, port)
    print(f"optuna-dashboard (read-only) for study {study!r} on {page}", flush=True)
    print(f"storage {redact(url)}; each trial's note (Trials tab) links its MLflow run; Ctrl-C stops it", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
