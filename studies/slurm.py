"""`harness slurm`: a study's workers as a Slurm job array, and what a worker does inside one.

    job_id = submit(SlurmOptions(study="big", tune_args=["--space", "cnn", "--trials", "200"],
                                 array_size=8, partition="gpu", time="1-00:00:00", gpus_per_task=1))

One `harness tune` worker per array task, all on one study, with what a user would otherwise have
to get right by hand (`--requeue`, `--open-mode=append`, `--signal=B:USR1@N` and a worker the
script `exec`s); inside a job, its run tags and `requeue_self`. Why each: docs/many-machines.md.
scripts/slurm/harness-array.sbatch is `template()`.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from harness.errors import HarnessError

# tags on every run made inside a Slurm job (trial runs, and the study run where a job creates it)
TAG_JOB_ID = "slurm_job_id"
TAG_ARRAY_JOB_ID = "slurm_array_job_id"
TAG_ARRAY_TASK_ID = "slurm_array_task_id"
TAG_RESTART_COUNT = "slurm_restart_count"
TAG_NODE = "slurm_node"
TAG_ENV = {
    TAG_JOB_ID: "SLURM_JOB_ID",
    TAG_ARRAY_JOB_ID: "SLURM_ARRAY_JOB_ID",
    TAG_ARRAY_TASK_ID: "SLURM_ARRAY_TASK_ID",
    TAG_RESTART_COUNT: "SLURM_RESTART_COUNT",
    TAG_NODE: "SLURMD_NODENAME",
}

TEMPLATE = Path(__file__).resolve().parent.parent / "scripts" / "slurm" / "harness-array.sbatch"
TIME_FORMATS = "MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS"
_TIME = re.compile(r"(?:(\d+)-(\d+)(?::([0-5]?\d))?(?::([0-5]?\d))?|(\d+)(?::([0-5]?\d))?(?::([0-5]?\d))?)")


class SlurmError(HarnessError):
    """A job array that cannot be written or submitted; the message is one line naming the fix."""


@dataclass
class SlurmOptions:
    study: str
    tune_args: list[str] = field(default_factory=list)  # what each worker's `harness tune` gets besides --study
    array_size: int = 2  # workers, one per array task
    partition: str | None = None  # None: the cluster's default
    time: str | None = None  # the time limit of each task, in Slurm's formats (None: the partition's)
    gpus_per_task: int | None = None
    cpus_per_task: int | None = None
    mem: str | None = None  # per task, as Slurm writes it: 16G
    signal_seconds: int = 120  # SIGUSR1 this long before the time limit
    storage: str | None = None  # None: $HARNESS_STORAGE or the default
    tracking_uri: str | None = None  # None: $MLFLOW_TRACKING_URI or the default
    python: str = sys.executable
    workdir: str = field(default_factory=os.getcwd)  # where the workers run (relative paths, ./mlruns)
    log_dir: str = "slurm-logs"  # relative to workdir

    @property
    def job_name(self) -> str:
        return f"harness-{self.study}"

    @property
    def log_path(self) -> str:
        return str(Path(self.workdir, self.log_dir, f"{self.job_name}-%A_%a.out"))


# the documented template in the repo (scripts/slurm/harness-array.sbatch) is this, rendered
EXAMPLE = SlurmOptions(
    study="cifar10-cnn",
    tune_args=["--space", "cnn", "--trials", "200", "--data-dir", "/datasets"],
    array_size=8,
    partition="gpu",
    time="1-00:00:00",
    gpus_per_task=1,
    cpus_per_task=8,
    mem="32G",
    storage="postgresql://user:pass@db/optuna",
    tracking_uri="http://db:5000",
    python="/path/to/project/.venv/bin/python",
    workdir="/path/to/project",
)


def time_seconds(text: str) -> int | None:
    """Seconds of a Slurm time limit (None: unlimited); a malformed one is a SlurmError."""
    if text.upper() in ("UNLIMITED", "INFINITE"):
        return None
    m = _TIME.fullmatch(text)
    if not m:
        raise SlurmError(f"bad --time {text!r}: Slurm takes {TIME_FORMATS} (e.g. --time 4:00:00 or --time 1-12)")
    days, hours, d_min, d_sec, minutes, m_sec, h_sec = (int(g) if g else 0 for g in m.groups())
    if m.group(1):  # D-HH[:MM[:SS]]
        return ((days * 24 + hours) * 60 + d_min) * 60 + d_sec
    if m.group(7):  # HH:MM:SS
        return (minutes * 60 + m_sec) * 60 + h_sec
    return minutes * 60 + m_sec  # MM[:SS]


def check_options(opts: SlurmOptions) -> None:
    """What can be told wrong without Slurm: the numbers, the time, the arguments for `harness tune`."""
    if opts.array_size < 1:
        raise SlurmError(f"--array-size {opts.array_size}: give at least 1 worker")
    if opts.signal_seconds < 1:
        raise SlurmError(f"--signal-seconds {opts.signal_seconds}: give the seconds before the time limit, at least 1")
    limit = time_seconds(opts.time) if opts.time else None
    if limit is not None and limit <= opts.signal_seconds:
        raise SlurmError(
            f"--time {opts.time} ({limit} s) is not longer than --signal-seconds {opts.signal_seconds}: "
            "each worker would be told to stop as it starts; raise --time or lower --signal-seconds"
        )
    for flag in ("--study", "--workers"):
        if any(a == flag or a.startswith(flag + "=") for a in opts.tune_args):
            raise SlurmError(
                f"{flag} after `--`: give it to `harness slurm` itself "
                "(--study names the study, --array-size the workers, one per array task)"
            )


def require_slurm() -> None:
    if shutil.which("sbatch") is None:
        raise SlurmError(
            "no Slurm on this machine (sbatch is not on PATH): run `harness slurm` on the "
            "cluster's login node, or use --dry-run to print the script"
        )


def partitions() -> list[str]:
    """The cluster's partitions, as `sinfo` lists them (the default one without its `*`)."""
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%P"], capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.SubprocessError) as e:
        raise SlurmError(
            f"cannot list Slurm's partitions (sinfo: {e}): check that Slurm's controller answers"
        ) from None
    if out.returncode != 0:
        why = (out.stderr.strip().splitlines() or ["no output"])[-1]
        raise SlurmError(f"cannot list Slurm's partitions (sinfo: {why}): check that Slurm's controller answers")
    return [p.strip().rstrip("*") for p in out.stdout.split() if p.strip()]


def check_partition(name: str) -> None:
    known = partitions()
    if name not in known:
        raise SlurmError(
            f"no Slurm partition {name!r}: choose one of {', '.join(known) or '(none listed)'} (sinfo lists them)"
        )


def _storage(opts: SlurmOptions) -> str:
    from harness.studies.options import DEFAULT_STORAGE

    return opts.storage or os.environ.get("HARNESS_STORAGE") or DEFAULT_STORAGE


def _tracking(opts: SlurmOptions) -> str:
    from harness.config import DEFAULT_TRACKING_URI

    return opts.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def without_password(url: str) -> tuple[str, bool]:
    """`url` without the password of its user:password@ part, and whether it had one: a script
    file is kept on disk, printed by --dry-run and copied into Slurm's spool, so no secret goes in."""
    parts = urlsplit(url)
    if parts.password is None:
        return url, False
    user, host = parts.netloc.rsplit("@", 1)
    return urlunsplit(parts._replace(netloc=f"{user.split(':', 1)[0]}@{host}")), True


PASSWORD_NOTES = {
    "HARNESS_STORAGE": "# its password is not written here: libpq reads it on the node from ~/.pgpass (or $PGPASSWORD)",
    "MLFLOW_TRACKING_URI": "# its password is not written here: MLflow reads $MLFLOW_TRACKING_PASSWORD (sbatch passes"
    " the submitting shell's environment on)",
}


def _export(var: str, url: str) -> list[str]:
    url, had_password = without_password(url)
    return [PASSWORD_NOTES[var]] * had_password + [f"export {var}={shlex.quote(url)}"]


def render(opts: SlurmOptions) -> str:
    """The sbatch script: one `harness tune` worker of the study per array task."""
    q = shlex.quote
    resources = [
        f"--partition={opts.partition}" if opts.partition else None,
        f"--time={opts.time}" if opts.time else None,
        f"--cpus-per-task={opts.cpus_per_task}" if opts.cpus_per_task else None,
        f"--gpus-per-task={opts.gpus_per_task}" if opts.gpus_per_task else None,
        f"--mem={opts.mem}" if opts.mem else None,
    ]
    tune = [opts.python, "-m", "harness.cli", "tune", "--study", opts.study, "--quiet", *opts.tune_args]
    lines = [
        "#!/bin/bash",
        f"# {opts.array_size} `harness tune` workers of study {opts.study}, one per task of a Slurm job array.",
        "# Written by `harness slurm` (studies/slurm.py); `sbatch` this file to submit it.",
        f"#SBATCH --job-name={opts.job_name}",
        f"#SBATCH --array=0-{opts.array_size - 1}",
        *(f"#SBATCH {r}" for r in resources if r),
        "# a preempted task goes back in the queue; its trial resumes from its last checkpoint",
        "#SBATCH --requeue",
        f"# {opts.signal_seconds} s before the time limit the batch shell (the worker: see exec) gets SIGUSR1:",
        "# it stops its trial as on SIGTERM and requeues its task while the study has trials left",
        f"#SBATCH --signal=B:USR1@{opts.signal_seconds}",
        "# a requeued task's log goes on after its first attempt's",
        "#SBATCH --open-mode=append",
        f"#SBATCH --output={opts.log_path}",
        f"#SBATCH --chdir={opts.workdir}",
        "",
        *_export("HARNESS_STORAGE", _storage(opts)),
        *_export("MLFLOW_TRACKING_URI", _tracking(opts)),
        'export OMP_NUM_THREADS="${SLURM_CPUS_PER_TASK:-1}" PYTHONUNBUFFERED=1',
        (
            'echo "harness: task ${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID} (job $SLURM_JOB_ID) on $(hostname),'
            ' restart ${SLURM_RESTART_COUNT:-0}, $(date -Is)"'
        ),
        "# exec: the worker replaces this shell, so SIGUSR1 (above) and SIGTERM (preemption, scancel) reach it",
        "exec " + " ".join(q(a) for a in tune),
        "",
    ]
    return "\n".join(lines)


def script(opts: SlurmOptions, dry_run: bool = False) -> str:
    """The checked script: bad options, no Slurm (unless `dry_run`), an unknown partition fail first."""
    check_options(opts)
    if not dry_run:
        require_slurm()
    if opts.partition and shutil.which("sinfo"):
        check_partition(opts.partition)
    return render(opts)


def submit(opts: SlurmOptions) -> str:
    """Submit the job array; returns its job id."""
    text = script(opts)
    Path(opts.workdir, opts.log_dir).mkdir(parents=True, exist_ok=True)  # Slurm does not create it
    out = subprocess.run(["sbatch", "--parsable"], input=text, capture_output=True, text=True, timeout=60, check=False)
    if out.returncode != 0:
        why = (out.stderr.strip().splitlines() or ["no output"])[-1]
        raise SlurmError(f"sbatch refused the job array ({why}): see `harness slurm --dry-run` for the script")
    return out.stdout.strip().split(";")[0]


# ----------------------------------------------------------------------------
# Inside a job


def slurm_tags(env=None) -> dict[str, str]:
    """The Slurm job, array task, attempt and node a run is made in; none outside Slurm."""
    env = os.environ if env is None else env
    if not env.get("SLURM_JOB_ID"):
        return {}
    tags = {tag: env[var] for tag, var in TAG_ENV.items() if env.get(var)}
    tags.setdefault(TAG_RESTART_COUNT, "0")  # Slurm sets it from the first restart on
    return tags


def own_job(env=None) -> str | None:
    """This process's Slurm job as `scontrol` names it: ARRAYJOB_TASK for an array task."""
    env = os.environ if env is None else env
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    return env.get("SLURM_JOB_ID") or None


def requeue_self(env=None) -> str:
    """Put this process's own job back in the queue (Slurm then ends this attempt). Returns what
    happened, in one line; never raises: the study is already left in order."""
    job = own_job(env)
    if job is None:
        return "not in a Slurm job: nothing to requeue; run the same command to resume the study"
    try:
        out = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60, check=False)
    except (OSError, subprocess.SubprocessError) as e:
        return f"could not requeue Slurm job {job} ({e}): resubmit it to resume the study"
    if out.returncode != 0:
        why = (out.stderr.strip().splitlines() or ["no output"])[-1]
        return f"could not requeue Slurm job {job} ({why}): resubmit it to resume the study"
    return f"requeued Slurm job {job}: it resumes the study when Slurm starts it again"


def template() -> str:
    """scripts/slurm/harness-array.sbatch: `render(EXAMPLE)` with a note on what to edit."""
    shebang, rest = render(EXAMPLE).split("\n", 1)
    note = (
        "# TEMPLATE (python -m harness.studies.slurm regenerates it): edit the partition, resources, URIs, paths\n"
        "# and the options after `tune`, or let `harness slurm --dry-run` write one for you.\n"
    )
    return f"{shebang}\n{note}{rest}"


if __name__ == "__main__":  # regenerate the template: python -m harness.studies.slurm
    TEMPLATE.parent.mkdir(parents=True, exist_ok=True)
    TEMPLATE.write_text(template())
    print(f"wrote {TEMPLATE}")
