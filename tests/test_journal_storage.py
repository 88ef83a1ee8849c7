"""`--storage journal:PATH` (studies/journal.py) short of running workers (tests/test_distributed.py
runs four on one): a path that cannot be written is one line before any work, the commands that only
read create no journal, they and the read-only dashboard read one, and `harness slurm` writes it into
the job as given."""

from __future__ import annotations

import json
import os
import threading
import urllib.error
import urllib.request

import optuna
import pytest

from harness.cli import main
from harness.studies.journal import open_journal
from harness.studies.study import requeue


def error_line(capsys) -> str:
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("harness: error: "), err
    return lines[0]


@pytest.fixture
def read_only_folder(tmp_path):
    """A folder this user cannot create files in: one made read-only, or (root writes even those) /proc."""
    if os.geteuid() == 0:
        yield "/proc"
        return
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    yield str(folder)
    folder.chmod(0o755)


@pytest.mark.parametrize(
    "where, says",
    [
        ("{tmp}/no-such-folder/optuna.journal", "no folder {tmp}/no-such-folder for the journal file"),
        ("{ro}/optuna.journal", "cannot write the journal file {ro}/optuna.journal"),
        ("", "name the journal file after journal:"),
        ("{tmp}", "is a folder; name the journal file in it"),
    ],
    ids=["missing-folder", "read-only-folder", "no-path", "a-folder"],
)
def test_a_journal_that_cannot_be_written_is_one_line_before_any_work(
    where, says, tmp_path, read_only_folder, capsys, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    path = where.format(tmp=tmp_path, ro=read_only_folder)
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert (
        main(["tune", "--study", "s", "--trials", "1", "--storage", f"journal:{path}", "--tracking-uri", tracking]) == 2
    )
    line = error_line(capsys)
    assert says.format(tmp=tmp_path, ro=read_only_folder) in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no journal, no MLflow store: nothing began


@pytest.mark.parametrize("command", ["best", "compare", "dashboard"])
def test_a_read_only_command_creates_no_journal(command, tmp_path, capsys):
    journal = tmp_path / "optuna.journal"
    assert main([command, "--study", "s", "--storage", f"journal:{journal}"]) == 2
    assert f"no study storage at {journal}" in error_line(capsys)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command", ["tune", "best"])
def test_a_file_that_is_no_journal_is_one_line(command, tmp_path, capsys):
    (tmp_path / "optuna.db").write_text("SQLite format 3\n\x00\x01 not a journal\n")
    storage = f"journal:{tmp_path / 'optuna.db'}"
    assert (
        main([command, "--study", "s", "--storage", storage, "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}"]) == 2
    )
    assert "check that it is an Optuna journal file" in error_line(capsys)


@pytest.fixture
def journal(tmp_path):
    """A journal with study `s`: one complete trial, with a run id."""
    url = f"journal:{tmp_path / 'optuna.journal'}"
    study = optuna.create_study(study_name="s", storage=open_journal(url, 30, requeue))
    study.enqueue_trial({"x": 0.5}, user_attrs={"mlflow_run_id": "abc"})
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=1)
    return url


def test_a_journal_trial_is_lost_after_three_beats_and_the_time_a_beat_may_wait_for_the_lock(journal):
    from harness.studies.journal import LOCK_GRACE
    from harness.studies.optuna_access import heartbeat

    study = optuna.load_study(study_name="s", storage=open_journal(journal, 30, requeue))
    assert heartbeat(study).grace == 3 * 30 + LOCK_GRACE


def test_reading_commands_open_a_journal_study(journal, capsys):
    from harness.studies.results import best_run_id, load

    assert [t.params for t in load("s", journal).trials] == [{"x": 0.5}]
    assert best_run_id("s", journal) == "abc"
    assert main(["best", "--study", "other", "--storage", journal]) == 2
    assert "study 'other' not found in journal:" in error_line(capsys)


def test_the_dashboard_reads_a_journal_and_never_writes_it(journal, tmp_path):
    from harness.studies.dashboard import open_dashboard, read_only_storage

    before = (tmp_path / "optuna.journal").read_bytes()
    server, page, _ = open_dashboard("s", journal, port=0)
    serving = threading.Thread(target=server.serve_forever, daemon=True)
    serving.start()
    try:
        base, study_id = page.split("/dashboard/")[0], page.rsplit("/", 1)[1]
        with urllib.request.urlopen(f"{base}/api/studies/{study_id}", timeout=30) as r:
            assert [t["params"][0]["param_external_value"] for t in json.loads(r.read())["trials"]] == ["0.5"]
        rename = urllib.request.Request(f"{base}/api/studies/{study_id}/rename", method="POST", data=b"{}")
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(rename, timeout=30)
        assert refused.value.code == 405
    finally:
        server.shutdown()
        server.server_close()
    storage = read_only_storage(journal)
    with pytest.raises(PermissionError, match="read-only"):
        storage.set_study_user_attr(0, "x", 1)
    assert (tmp_path / "optuna.journal").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["optuna.journal"]  # no lock left behind either


def test_harness_slurm_writes_a_journal_storage_into_the_job_as_given(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    storage = "journal:/shared/studies/optuna.journal"
    assert main(["slurm", "--study", "s", "--storage", storage, "--dry-run", "--", "--space", "cnn"]) == 0
    assert f"export HARNESS_STORAGE={storage}" in capsys.readouterr().out.splitlines()
