"""`harness` command line: a thin layer of argparse over the library."""
from __future__ import annotations

import argparse
import os
import subprocess
import sys

from harness import config as C
from harness.errors import HarnessError
from harness.tracking import DEFAULT_TRACKING_URI, tracking_uri

class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: the problem and where to look, no usage dump."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE",
                   help="YAML config, or the name of one in studies/configs/ (default, fast; default: default)")
    p.add_argument("--data-dir", metavar="DIR",
                   help=f"data root holding cifar-10-batches-py/ (default: ${C.DATA_DIR_ENV} or ./data)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a setting, dotted for nested ones: --set epochs=1 --set data.train_subset=10000")
    p.add_argument("--profile", choices=C.PROFILES, default="auto",
                   help="the config's (and a study space's) budget: quick for CPUs, full for GPUs; auto picks by device")


def add_tracking_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tracking-uri", metavar="URI",
                   help=f"MLflow store (default: $MLFLOW_TRACKING_URI or {DEFAULT_TRACKING_URI})")


def resolve_config(args) -> C.Config:
    from studies.library import config_path

    return C.load(config_path(args.config), args.overrides, args.data_dir, getattr(args, "profile", "auto"))


def cmd_train(args) -> int:
    from harness.experiment import resume_run, run_experiment

    if args.resume:
        result = resume_run(args.resume, args.tracking_uri, args.data_dir, progress=not args.quiet)
    else:
        result = run_experiment(resolve_config(args), args.tracking_uri, args.experiment, progress=not args.quiet)
    m = result.metrics
    print(f"run {result.run_id}: test accuracy {m['test_accuracy']:.4f} (top-5 {m['test_top5_accuracy']:.4f}), "
          f"best val accuracy {result.fit.best_val_accuracy:.4f} at epoch {result.fit.best_epoch}")
    print(f"tracking store: {tracking_uri(args.tracking_uri)}; browse it with `harness ui`")
    return 0


UI_MODE = "workflowType=machine_learning"  # MLflow 3 opens experiments on its GenAI overview: the training view
UI_READY_SECONDS = 180  # a first start on a busy 2-core machine takes about 30 s


def cmd_ui(args) -> int:
    """The MLflow UI over the tracking store, opened on a study's or experiment's runs in Model-training mode."""
    import signal
    import socket

    from studies.driver import _redact, open_client

    uri = tracking_uri(args.tracking_uri)
    client = open_client(uri)  # a fresh store is created (and migrated) here, under the workers' lock
    try:
        exp_id, what = _ui_target(client, args.study, args.experiment, _redact(uri))
    except LookupError as e:
        print(f"harness: error: {e}", file=sys.stderr)
        return 2
    if uri.startswith(("http://", "https://")):  # a tracking server already serves the UI
        return _show(client, uri.rstrip("/"), exp_id, what, args.no_browser)
    try:
        family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
        with socket.socket(family) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server will
            probe.bind((args.host, args.port))
    except OSError as e:
        print(f"harness: error: cannot serve on {args.host}:{args.port} ({e.strerror or e}): "
              "choose another --port (or --host)", file=sys.stderr)
        return 2
    host = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "[::1]"}.get(args.host, args.host)
    base = f"http://{f'[{host}]' if ':' in host and not host.startswith('[') else host}:{args.port}"
    print(f"MLflow UI starting on {base} over {_redact(uri)} ...", flush=True)
    # one worker is plenty for one person; the job runner serves GenAI judges only (7 more processes)
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION":
           os.environ.get("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")}
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri,
           "--host", args.host, "--port", str(args.port), "--workers", "1"]
    # a process group of its own: Ctrl-C reaches this process, which then stops the whole server
    server = subprocess.Popen(cmd, env=env, start_new_session=True)

    def on_term(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_term)  # `kill` stops it as cleanly as Ctrl-C
    try:
        if not _wait_until_answering(server, base):
            why = (f"did not answer in {UI_READY_SECONDS} s" if server.poll() is None
                   else f"stopped (exit code {server.returncode}) before it answered")
            print(f"harness: error: the MLflow UI server {why}: see its messages above", file=sys.stderr)
            return 1
        _show(client, base, exp_id, what, args.no_browser)
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
        runs = client.search_runs(ids, "tags.run_kind = 'study'", max_results=1000) if ids else []
        found = {r.data.tags.get("study"): r.info.experiment_id for r in runs}
        if study not in found:
            raise missing("study", "studies", study, found,
                          "pick one with --study" if found else "`harness tune --study NAME` makes one")
        return found[study], f"study {study}: its study run and trials"
    if experiment:
        exp = client.get_experiment_by_name(experiment)
        if exp is None or exp.lifecycle_stage != "active":
            raise missing("experiment", "experiments", experiment, [e.name for e in client.search_experiments()],
                          "pick one with --experiment")
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
        print("(MLflow opens an experiment picked there on its GenAI overview until you switch it to "
              "'Model training' once; the runs directly:)")
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


def cmd_tune(args) -> int:
    from studies.driver import TuneOptions, tune
    from studies.report import write_summary  # noqa: F401  (fail on a broken install before trials)

    opts = TuneOptions(study=args.study, space=args.space, trials=args.trials, timeout=args.timeout,
                       storage=args.storage, sampler=args.sampler, pruner=args.pruner, seed=args.seed,
                       objectives=args.objectives, profile=args.profile, config=args.config,
                       overrides=args.overrides, data_dir=args.data_dir, tracking_uri=args.tracking_uri,
                       workers=args.workers, heartbeat=args.heartbeat, progress=not args.quiet)
    study = tune(opts)
    _print_best(study, args)
    if args.transfer:
        from studies.transfer import run_transfer

        try:
            result = run_transfer(f"best:{args.study}", data_dir=args.data_dir, tracking_uri=args.tracking_uri,
                                  storage=args.storage, progress=not args.quiet)
            print(f"transfer study: parent run {result.parent_run_id} in experiment '{result.experiment}'")
        except HarnessError as e:  # the study stands; no transfer
            print(f"harness: transfer skipped: {e}")
    print(f"study summary: the run 'study-{args.study}' in MLflow experiment '{args.study}' "
          f"(`harness report --study {args.study}` refreshes it, `harness compare --study {args.study}` lists trials)")
    print(f"browse: `harness ui --study {args.study}` (the study run; expand it for its trials)")
    return 0


def _print_best(study, args) -> None:
    from studies.driver import StudyError, best_trial

    try:
        best = best_trial(study)
    except StudyError as e:  # no complete trial yet
        print(str(e))
        return
    _print_trial(best)


def _print_trial(best) -> None:
    values = ", ".join(f"{v:.4f}" for v in best.values)
    print(f"best trial {best.number}: objective {values}; MLflow run {best.user_attrs.get('mlflow_run_id')}")
    for k, v in best.params.items():
        print(f"  {k} = {v}")


def cmd_best(args) -> int:
    from harness.tracking import client_for
    from studies.driver import best_trial, load

    study = load(args.study, args.storage)
    best = best_trial(study)  # none complete yet: one line and exit 2
    _print_trial(best)
    run_id = best.user_attrs.get("mlflow_run_id")
    if run_id:
        from harness.checkpoints import get_run
        from studies.report import champion_uri, champion_version

        client = client_for(args.tracking_uri)
        run = get_run(client, run_id)  # another store: one line naming --tracking-uri
        keys = ("best_val_accuracy", "test_accuracy", "test_top5_accuracy", "test_loss", "num_params",
                "epochs_trained")
        for k in keys:
            if k in run.data.metrics:
                print(f"  {k}: {run.data.metrics[k]:.6g}")
        champion = champion_version(client, args.study)  # None: no trial that logged its model yet
        if champion is not None:
            print(f"champion model: {champion_uri(args.study)} (version {champion.version}, run {champion.run_id})")
    return 0


def cmd_compare(args) -> int:
    from harness.tracking import client_for
    from studies.driver import load
    from studies.report import compare_table

    study = load(args.study, args.storage)
    try:
        table = compare_table(client_for(args.tracking_uri), study, sort=args.sort, columns=args.column)
    except ValueError as e:
        raise C.ConfigError(str(e)) from None
    if args.top:
        table = table.head(args.top)
    if args.csv:
        table.to_csv(args.csv, index=False)
        print(f"wrote {args.csv}")
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(table.to_markdown(index=False) + "\n")
        print(f"wrote {args.markdown}")
    if not (args.csv or args.markdown) or args.show:
        print(table.to_string(index=False, float_format=lambda v: f"{v:.4f}") if not table.empty else "no trial runs yet")
    return 0


def cmd_report(args) -> int:
    from harness.tracking import client_for
    from studies.driver import StudyError, load
    from studies.report import write_summary

    study = load(args.study, args.storage)
    parent = study.user_attrs.get("mlflow_parent_run_id")
    if not parent:
        raise StudyError(f"study {args.study} has no MLflow study run: it was not made by `harness tune`")
    summary = write_summary(study, client_for(args.tracking_uri), parent)
    print(f"summary of study {args.study} refreshed on its MLflow run: {summary}")
    return 0


def cmd_reproduce(args) -> int:
    from harness.experiment import reproduce

    result, diffs = reproduce(args.run_id, args.tracking_uri, args.data_dir, progress=not args.quiet)
    print(f"reproduced {args.run_id} as run {result.run_id}")
    print(f"{'metric':<24}{'original':>12}{'reproduced':>12}{'difference':>12}")
    for k, (a, b) in diffs.items():
        print(f"{k:<24}{a:>12.6f}{b:>12.6f}{b - a:>+12.6f}")
    return 0


def cmd_transfer(args) -> int:
    from studies.transfer import run_transfer

    modes = tuple(args.modes.split(",")) if args.modes else ("probe", "finetune", "freeze", "scratch")
    result = run_transfer(args.source, target=args.target, data_dir=args.data_dir, tracking_uri=args.tracking_uri,
                          overrides=args.overrides, modes=modes, storage=args.storage, progress=not args.quiet)
    print(result.table.to_string(index=False))
    print(f"transfer parent run {result.parent_run_id}")
    return 1 if result.failed else 0


def cmd_split_study(args) -> int:
    from studies.split_study import curves_markdown, run_split_study

    result = run_split_study(data_dir=args.data_dir, tracking_uri=args.tracking_uri, overrides=args.overrides,
                             config=args.config, classes_a=args.classes_a, class_seed=args.class_seed,
                             depths=args.depths, progress=not args.quiet)
    print(f"A = {', '.join(result.classes_a)}\nB = {', '.join(result.classes_b)}")
    print(curves_markdown(result.curves))
    print(f"split study parent run {result.parent_run_id} in experiment '{result.experiment}'")
    return 1 if result.failed else 0


def cmd_analyze(args) -> int:
    from analysis.analyze import analyze_run

    result = analyze_run(args.run_id, args.tracking_uri, args.data_dir, samples=args.samples,
                         compare_run_id=args.compare, progress=not args.quiet)
    print(result.table.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    print(f"analysed {result.n_images} test images; logged to run {result.logged_to} (metrics analysis_*, artifacts analysis/)")
    return 0


def cmd_dashboard(args) -> int:
    from studies.dashboard import serve

    serve(args.study, args.storage, args.host, args.port)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="harness", description="Train, tune, transfer and analyse CNNs on CIFAR, every run tracked in MLflow.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    p = sub.add_parser("train", help="train and track one run")
    add_config_args(p)
    add_tracking_arg(p)
    p.add_argument("--experiment", help="MLflow experiment name (default: <dataset>-train)")
    p.add_argument("--resume", metavar="RUN_ID",
                   help="continue a stopped run from its last checkpoint (its own config; --set is ignored)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_train)

    from studies.driver import OBJECTIVES, PRUNERS, SAMPLERS

    p = sub.add_parser("tune", help="run (or resume, or join) an Optuna study; trials nest under the study run")
    p.add_argument("--study", required=True, help="study name (also its MLflow experiment)")
    p.add_argument("--space", default="cnn", help="search space: a name in studies/spaces/ or a YAML file")
    p.add_argument("--trials", type=int, default=20,
                   help="the study's total of complete+pruned trials; run again to resume, raise to extend")
    p.add_argument("--timeout", type=float, help="stop starting trials after this many seconds")
    p.add_argument("--storage", help="Optuna storage URL (default: $HARNESS_STORAGE or sqlite:///mlruns/optuna.db; "
                                     "postgresql://user@host/db for many machines)")
    p.add_argument("--sampler", choices=SAMPLERS, default="tpe")
    p.add_argument("--pruner", choices=PRUNERS, default="hyperband")
    p.add_argument("--seed", type=int, default=0, help="sampler seed")
    p.add_argument("--objectives", choices=OBJECTIVES, default="accuracy",
                   help="validation accuracy alone, or against parameter count / CPU latency (Pareto front)")
    p.add_argument("--workers", type=int, default=1, help="worker processes on this machine")
    p.add_argument("--heartbeat", type=int, default=30, help="seconds between trial heartbeats")
    p.add_argument("--transfer", action="store_true", help="run the CIFAR-100 transfer study on the best trial")
    add_config_args(p)
    add_tracking_arg(p)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_tune)

    for name, func, text in (("best", cmd_best, "print a study's best trial and its run"),
                             ("report", cmd_report, "refresh a study's summary on its MLflow run"),
                             ("compare", cmd_compare, "table of a study's trial runs")):
        p = sub.add_parser(name, help=text)
        p.add_argument("--study", required=True)
        p.add_argument("--storage", help="Optuna storage URL (default: sqlite:///mlruns/optuna.db)")
        add_tracking_arg(p)
        p.set_defaults(func=func)
        if name == "compare":
            p.add_argument("--sort", default="val_accuracy", help="column to sort by (best first)")
            p.add_argument("--top", type=int, help="only the first N rows")
            p.add_argument("--column", action="append", help="extra metric/param/tag column")
            p.add_argument("--csv", metavar="FILE", help="write the table as CSV")
            p.add_argument("--markdown", metavar="FILE", help="write the table as Markdown")
            p.add_argument("--show", action="store_true", help="print the table even when writing a file")

    p = sub.add_parser("reproduce", help="retrain a run from its logged config and compare")
    p.add_argument("run_id")
    p.add_argument("--data-dir", metavar="DIR", help="data root, if not where the run found it")
    add_tracking_arg(p)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_reproduce)

    p = sub.add_parser("transfer", help="transfer study from a run or best:STUDY to a target dataset")
    p.add_argument("--from", dest="source", required=True, help="RUN_ID or best:STUDY")
    p.add_argument("--target", default="cifar100", choices=("cifar100", "cifar10"))
    p.add_argument("--modes", help="comma list of probe,finetune,freeze,freeze_K,scratch")
    p.add_argument("--storage", help="Optuna storage for best:STUDY")
    p.add_argument("--data-dir", metavar="DIR")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    add_tracking_arg(p)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_transfer)

    p = sub.add_parser("split-study", help="Yosinski et al. transfer by depth between two halves of CIFAR-10")
    p.add_argument("--classes-a", metavar="A,B,...", help="half A's classes, names or indices (default: seeded)")
    p.add_argument("--class-seed", type=int, default=0, help="seed of the default split into halves")
    p.add_argument("--depths", metavar="1,2,...", help="transfer depths (default: every stage)")
    add_config_args(p)
    add_tracking_arg(p)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_split_study)

    p = sub.add_parser("analyze", help="feature-space analysis of a run's model, stage by stage")
    p.add_argument("run_id")
    p.add_argument("--data-dir", metavar="DIR")
    p.add_argument("--samples", type=int, help="seeded sample of N test images (default: all)")
    p.add_argument("--compare", metavar="RUN_ID", help="model to compare by CKA")
    add_tracking_arg(p)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_analyze)

    p = sub.add_parser("dashboard", help="optuna-dashboard on a study, read-only (safe while workers run it)")
    p.add_argument("--study", required=True)
    p.add_argument("--storage", help="Optuna storage URL (default: $HARNESS_STORAGE or sqlite:///mlruns/optuna.db)")
    p.add_argument("--host", default="127.0.0.1", help="interface to serve on (default: this machine only)")
    p.add_argument("--port", type=int, default=8080, help="0: any free port")
    p.set_defaults(func=cmd_dashboard)

    p = sub.add_parser("ui", help="start the MLflow UI on the tracking store and open a study's runs")
    target = p.add_mutually_exclusive_group()
    target.add_argument("--study", metavar="NAME", help="open this study's experiment: its study run and trials")
    target.add_argument("--experiment", metavar="NAME", help="open this experiment's runs")
    add_tracking_arg(p)
    p.add_argument("--host", default="127.0.0.1", help="interface to serve on (default: this machine only)")
    p.add_argument("--port", type=int, default=5000)
    p.add_argument("--no-browser", action="store_true", help="print the URL only")
    p.set_defaults(func=cmd_ui)
    return parser


def main(argv: list[str] | None = None) -> int:
    from harness.interrupts import exit_code, stop_cleanly

    args = build_parser().parse_args(argv)
    restore = stop_cleanly()  # SIGTERM stops as cleanly as Ctrl-C; a second signal at once
    try:
        return args.func(args)
    except HarnessError as e:  # bad input or something missing: its one line, no traceback
        print(f"harness: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        print(f"harness: {e or 'interrupted'}; a run in progress was ended KILLED with what it logged "
              "(`harness train --resume RUN_ID` continues a run from its last epoch; a study resumes, "
              "its stopped trials too, with the same command)", file=sys.stderr)
        return exit_code(e)
    finally:
        restore()


if __name__ == "__main__":
    sys.exit(main())
