"""`harness` command line: a thin layer of argparse over the library and its Python API (harness/api.py).

Each command is a `cmd_*` function over the library and a small `add_*` function that builds its
parser. A command imports its modules only when it runs, so `harness train` never loads Optuna.
Errors a user can cause (HarnessError) print as one line and exit 2; Ctrl-C exits 130, SIGTERM 143.
"""

from __future__ import annotations

import argparse
import functools
import gc
import sys

from harness import api
from harness import config as C
from harness.errors import HarnessError
from harness.tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_ID


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: the problem and where to look, no usage dump."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config",
        metavar="FILE",
        help="YAML config, or the name of one in harness/configs/ (default, fast; default: default)",
    )
    p.add_argument(
        "--data-dir",
        metavar="DIR",
        help=f"data root holding cifar-10-batches-py/ (default: ${C.DATA_DIR_ENV} or ./data)",
    )
    add_set_arg(p)
    p.add_argument(
        "--profile",
        choices=C.PROFILES,
        default="auto",
        help="the config's (and a study space's) budget: quick for CPUs, full for GPUs; auto picks by device",
    )


def add_set_arg(
    p: argparse.ArgumentParser,
    help: str = "override a setting, dotted for nested ones: --set epochs=1 --set data.train_subset=10000",
) -> None:
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=help)


def add_tracking_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--tracking-uri",
        metavar="URI",
        help=f"MLflow store (default: $MLFLOW_TRACKING_URI or {C.DEFAULT_TRACKING_URI})",
    )


def add_storage_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--storage",
        help="Optuna storage URL (default: $HARNESS_STORAGE or sqlite:///mlruns/optuna.db; journal:PATH "
        "for a shared filesystem without a database; postgresql://user@host/db for many machines)",
    )


def add_worker_args(p: argparse.ArgumentParser) -> None:
    """How a study's (or a confirmation's) runs are trained: processes, heartbeats, evaluation."""
    p.add_argument("--workers", type=int, default=1, help="worker processes on this machine (spread over its GPUs)")
    p.add_argument("--heartbeat", type=int, default=30, help="seconds between a run's heartbeats")
    p.add_argument(
        "--evaluate",
        choices=("background", "inline"),
        default="background",
        help="a run's test set, figures and model: by a background process while the next run "
        "trains, or by the worker before it",
    )


def add_quiet_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quiet", action="store_true", help="no progress bars")


# ----------------------------------------------------------------------------
# Commands


def cmd_train(args) -> int:
    if args.resume:
        from harness.experiment import resume_run

        result = resume_run(args.resume, args.tracking_uri, args.data_dir, progress=not args.quiet)
    else:
        result = api.train(
            args.config,
            args.overrides,
            data_dir=args.data_dir,
            profile=args.profile,
            tracking_uri=args.tracking_uri,
            experiment=args.experiment,
            progress=not args.quiet,
        )
    m = result.metrics
    print(
        f"run {result.run_id}: test accuracy {m['test_accuracy']:.4f} (top-5 {m['test_top5_accuracy']:.4f}), "
        f"best val accuracy {result.fit.best_val_accuracy:.4f} at epoch {result.fit.best_epoch}"
    )
    from harness.tracking import tracking_uri

    print(f"tracking store: {tracking_uri(args.tracking_uri)}; browse it with `harness ui`")
    return 0


def cmd_ui(args) -> int:
    from harness.ui import serve

    return serve(args.tracking_uri, args.study, args.experiment, args.host, args.port, args.no_browser)


def cmd_tune(args) -> int:
    from harness.studies.driver import tune
    from harness.studies.options import TuneOptions

    opts = TuneOptions(
        study=args.study,
        space=args.space,
        trials=args.trials,
        timeout=args.timeout,
        storage=args.storage,
        sampler=args.sampler,
        pruner=args.pruner,
        seed=args.seed,
        objectives=args.objectives,
        profile=args.profile,
        config=args.config,
        overrides=args.overrides,
        data_dir=args.data_dir,
        tracking_uri=args.tracking_uri,
        workers=args.workers,
        heartbeat=args.heartbeat,
        evaluate=args.evaluate,
        progress=not args.quiet,
        confirm_top=args.confirm_top,
        confirm_seeds=args.confirm_seeds,
        confirm_epochs=args.confirm_epochs,
    )
    study = tune(opts)
    _print_best(study)
    source = f"best:{args.study}"
    if args.confirm_top:
        from harness.studies.confirm import confirm

        confirmed = confirm(opts)
        _print_confirmation(confirmed, args.study)
        source = confirmed.champion_run_id or source
    if args.transfer:
        from harness.studies.transfer import run_transfer

        try:
            result = run_transfer(
                source,
                data_dir=args.data_dir,
                tracking_uri=args.tracking_uri,
                storage=args.storage,
                progress=not args.quiet,
            )
            print(f"transfer study: parent run {result.parent_run_id} in experiment '{result.experiment}'")
        except HarnessError as e:  # the study stands; no transfer
            print(f"harness: transfer skipped: {e}")
    print(
        f"study summary: the run 'study-{args.study}' in MLflow experiment '{args.study}' "
        f"(`harness report --study {args.study}` refreshes it, `harness compare --study {args.study}` lists trials)"
    )
    print(f"browse: `harness ui --study {args.study}` (the study run; expand it for its trials)")
    return 0


def _print_best(study) -> None:
    from harness.studies.options import StudyError
    from harness.studies.results import best_trial

    try:
        best = best_trial(study)
    except StudyError as e:  # no complete trial yet
        print(str(e))
        return
    _print_trial(best, study)


def _print_trial(best, study=None) -> None:
    values = ", ".join(f"{v:.4f}" for v in best.values)
    ci = best.user_attrs.get("val_ci")
    interval = f" (95% interval {ci[0]:.4f}-{ci[1]:.4f})" if ci else ""
    print(f"best trial {best.number}: objective {values}{interval}; MLflow run {best.user_attrs.get('mlflow_run_id')}")
    for k, v in best.params.items():
        print(f"  {k} = {v}")
    if study is not None:
        from harness.studies.results import not_told_apart

        if tied := not_told_apart(study, best):
            print(
                f"  not told apart from it by one run each (overlapping 95% validation intervals): trial(s) "
                f"{', '.join(map(str, tied))}; `harness confirm --study {study.study_name}` retrains the top "
                "trials with new seeds"
            )


def _print_confirmation(result, study: str) -> None:
    print(f"confirmation of study {study} ({result.describe()}):")
    print(result.markdown())
    if result.champion:
        print(
            f"champion: {result.champion} (run {result.champion_run_id}, the best configuration's run nearest its mean)"
        )
    print("on MLflow: the study run's confirmation/ artifacts (table.md, table.csv, runs.csv, means.png)")


def cmd_confirm(args) -> int:
    result = api.confirm(
        args.study,
        args.top,
        args.seeds,
        overrides=args.overrides,
        data_dir=args.data_dir,
        storage=args.storage,
        tracking_uri=args.tracking_uri,
        progress=not args.quiet,
        workers=args.workers,
        heartbeat=args.heartbeat,
        evaluate=args.evaluate,
        timeout=args.timeout,
        epochs=args.epochs,
    )
    _print_confirmation(result, args.study)
    return 0


def cmd_best(args) -> int:
    from harness.studies.results import best_trial, load
    from harness.tracking import client_for

    study = load(args.study, args.storage)
    best = best_trial(study)  # none complete yet: one line and exit 2
    _print_trial(best, study)
    confirmed = study.user_attrs.get("confirmed_champion")
    if confirmed:
        lo, hi = confirmed["val_ci"]
        print(
            f"confirmed best: trial {confirmed['trial']}, mean val accuracy {confirmed['val_mean']:.4f} "
            f"[{lo:.4f}, {hi:.4f}] and test {confirmed['test_mean']:.4f} over n={confirmed['n']} seeds "
            f"(run {confirmed['run_id']}; `harness confirm --study {args.study}` prints the table)"
        )
    run_id = best.user_attrs.get(MLFLOW_RUN_ID)
    if run_id:
        from harness.checkpoints import get_run
        from harness.studies.report import champion_uri, champion_version

        client = client_for(args.tracking_uri)
        run = get_run(client, run_id)  # another store: one line naming --tracking-uri
        keys = ("best_val_accuracy", "test_accuracy", "test_top5_accuracy", "test_loss", "num_params", "epochs_trained")
        for k in keys:
            if k in run.data.metrics:
                print(f"  {k}: {run.data.metrics[k]:.6g}")
        champion = champion_version(client, args.study)  # None: no trial that logged its model yet
        if champion is not None:
            print(f"champion model: {champion_uri(args.study)} (version {champion.version}, run {champion.run_id})")
    return 0


def cmd_compare(args) -> int:
    table = api.compare(args.study, args.storage, args.tracking_uri, sort=args.sort, columns=args.column, top=args.top)
    if args.csv:
        table.to_csv(args.csv, index=False)
        print(f"wrote {args.csv}")
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(table.to_markdown(index=False) + "\n")
        print(f"wrote {args.markdown}")
    if not (args.csv or args.markdown) or args.show:
        print(
            table.to_string(index=False, float_format=lambda v: f"{v:.4f}") if not table.empty else "no trial runs yet"
        )
    return 0


def cmd_report(args) -> int:
    from harness.finisher import drain
    from harness.studies.options import StudyError
    from harness.studies.report import write_summary
    from harness.studies.results import load
    from harness.tracking import client_for

    study = load(args.study, args.storage)
    parent = study.user_attrs.get(MLFLOW_PARENT_RUN_ID)
    if not parent:
        raise StudyError(f"study {args.study} has no MLflow study run: it was not made by `harness tune`")
    if done := drain(args.tracking_uri):  # evaluations a killed worker or finisher left behind
        print(f"finished {done} trial evaluation{'s' if done > 1 else ''} left in the spool")
    summary = write_summary(study, client_for(args.tracking_uri), parent)
    print(f"summary of study {args.study} refreshed on its MLflow run: {summary}")
    return 0


def cmd_reproduce(args) -> int:
    report = api.reproduce(
        args.run_id, args.seeds, tracking_uri=args.tracking_uri, data_dir=args.data_dir, progress=not args.quiet
    )
    if args.seeds is None:
        print(f"reproduced {args.run_id} as run {report.runs['run_id'].iloc[0]}")
        print(f"{'metric':<24}{'original':>12}{'reproduced':>12}{'difference':>12}")
        for row in report.table.itertuples():
            print(f"{row.metric:<24}{row.original:>12.6f}{row.reproduced:>12.6f}{row.difference:>+12.6f}")
        return 0
    print(f"reproduced {args.run_id} with {args.seeds} new seeds: runs {', '.join(report.runs['run_id'])}")
    print(report.table.to_markdown(index=False, floatfmt=".4f"))
    for row in report.table.itertuples():
        if row.original_inside is not None:
            where = "inside" if row.original_inside else "OUTSIDE"
            print(
                f"{row.metric}: the original {row.original:.4f} lies {where} the 95% prediction interval "
                f"[{row.predict_low:.4f}, {row.predict_high:.4f}] of its config's seeds"
            )
    return 0


def cmd_transfer(args) -> int:
    from harness.studies.transfer import run_transfer

    modes = tuple(args.modes.split(",")) if args.modes else ("probe", "finetune", "freeze", "scratch")
    result = run_transfer(
        args.source,
        target=args.target,
        data_dir=args.data_dir,
        tracking_uri=args.tracking_uri,
        overrides=args.overrides,
        modes=modes,
        storage=args.storage,
        progress=not args.quiet,
    )
    print(result.table.to_string(index=False))
    print(f"transfer parent run {result.parent_run_id}")
    return 1 if result.failed else 0


def cmd_split_study(args) -> int:
    from harness.studies.split_study import curves_markdown, run_split_study

    result = run_split_study(
        data_dir=args.data_dir,
        tracking_uri=args.tracking_uri,
        overrides=args.overrides,
        config=args.config,
        classes_a=args.classes_a,
        class_seed=args.class_seed,
        depths=args.depths,
        progress=not args.quiet,
        profile=args.profile,
    )
    print(f"A = {', '.join(result.classes_a)}\nB = {', '.join(result.classes_b)}")
    print(curves_markdown(result.curves))
    print(f"split study parent run {result.parent_run_id} in experiment '{result.experiment}'")
    return 1 if result.failed else 0


def cmd_analyze(args) -> int:
    from harness.analysis.analyze import analyze_run

    result = analyze_run(
        args.run_id,
        args.tracking_uri,
        args.data_dir,
        samples=args.samples,
        compare_run_id=args.compare,
        progress=not args.quiet,
    )
    print(result.table.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    print(
        f"analysed {result.n_images} test images; logged to run {result.logged_to} (metrics analysis_*, artifacts "
        "analysis/)"
    )
    return 0


def cmd_slurm(args) -> int:
    from harness.studies.slurm import SlurmOptions, script, submit

    tune_args = args.tune_args[1:] if args.tune_args[:1] == ["--"] else args.tune_args
    opts = SlurmOptions(
        study=args.study,
        tune_args=tune_args,
        array_size=args.array_size,
        partition=args.partition,
        time=args.time,
        gpus_per_task=args.gpus_per_task,
        cpus_per_task=args.cpus_per_task,
        mem=args.mem,
        signal_seconds=args.signal_seconds,
        storage=args.storage,
        tracking_uri=args.tracking_uri,
        log_dir=args.log_dir,
    )
    if args.dry_run:
        print(script(opts, dry_run=True), end="")
        return 0
    job = submit(opts)
    print(
        f"submitted job array {job}: {opts.array_size} workers of study {args.study}; "
        f"logs {opts.log_path.replace('%A', job).replace('%a', '*')}; `squeue -j {job}` lists its tasks"
    )
    return 0


def cmd_dashboard(args) -> int:
    from harness.studies.dashboard import serve

    serve(args.study, args.storage, args.host, args.port)
    return 0


# ----------------------------------------------------------------------------
# Parsers, one function a command


def add_train(p: argparse.ArgumentParser) -> None:
    add_config_args(p)
    add_tracking_arg(p)
    p.add_argument("--experiment", help="MLflow experiment name (default: <dataset>-train)")
    p.add_argument(
        "--resume",
        metavar="RUN_ID",
        help="continue a stopped run from its last checkpoint (its own config; --set is ignored)",
    )
    add_quiet_arg(p)
    p.set_defaults(func=cmd_train)


def add_tune(p: argparse.ArgumentParser) -> None:
    from harness.studies.options import OBJECTIVES, PRUNERS, SAMPLERS  # (no Optuna in there)

    p.add_argument("--study", required=True, help="study name (also its MLflow experiment)")
    p.add_argument("--space", default="cnn", help="search space: a name in studies/spaces/ or a YAML file")
    p.add_argument(
        "--trials",
        type=int,
        default=20,
        help="the study's total of complete+pruned trials; run again to resume, raise to extend",
    )
    p.add_argument("--timeout", type=float, help="start no trial after this many seconds (those running finish)")
    add_storage_arg(p)
    p.add_argument("--sampler", choices=SAMPLERS, default="tpe")
    p.add_argument("--pruner", choices=PRUNERS, default="hyperband")
    p.add_argument("--seed", type=int, default=0, help="sampler seed")
    p.add_argument(
        "--objectives",
        choices=OBJECTIVES,
        default="accuracy",
        help="validation accuracy alone, or against parameter count / CPU latency (Pareto front)",
    )
    add_worker_args(p)
    p.add_argument(
        "--confirm-top",
        type=int,
        default=0,
        metavar="K",
        help="after tuning, confirm the top K trials with new seeds (`harness confirm`); 0: off",
    )
    p.add_argument("--confirm-seeds", type=int, default=3, metavar="N", help="new seeds per confirmed trial")
    p.add_argument(
        "--confirm-epochs",
        type=int,
        default=0,
        metavar="E",
        help="epochs of each confirmation run (default: its trial's)",
    )
    p.add_argument(
        "--transfer",
        action="store_true",
        help="run the CIFAR-100 transfer study on the best trial (the confirmed champion with --confirm-top)",
    )
    add_config_args(p)
    add_tracking_arg(p)
    add_quiet_arg(p)
    p.set_defaults(func=cmd_tune)


def add_study_lookup(p: argparse.ArgumentParser, func) -> None:
    p.add_argument("--study", required=True)
    add_storage_arg(p)
    add_tracking_arg(p)
    p.set_defaults(func=func)


def add_confirm(p: argparse.ArgumentParser) -> None:
    p.add_argument("--study", required=True)
    p.add_argument("--top", type=int, default=3, metavar="K", help="the K best trials (by validation accuracy)")
    p.add_argument("--seeds", type=int, default=3, metavar="N", help="new seeds for each (model init, data order)")
    p.add_argument(
        "--epochs", type=int, default=0, metavar="E", help="train each run E epochs (default: as its trial did)"
    )
    p.add_argument("--timeout", type=float, help="start no run after this many seconds (run again to resume)")
    add_worker_args(p)
    p.add_argument("--data-dir", metavar="DIR", help="data root, if not where the trials found it")
    add_set_arg(p, "change a setting of every run (e.g. eval.figures=false)")
    add_storage_arg(p)
    add_tracking_arg(p)
    add_quiet_arg(p)
    p.set_defaults(func=cmd_confirm)


def add_compare(p: argparse.ArgumentParser) -> None:
    p.add_argument("--study", required=True)
    add_storage_arg(p)
    add_tracking_arg(p)
    p.add_argument("--sort", default="val_accuracy", help="column to sort by (best first)")
    p.add_argument("--top", type=int, help="only the first N rows")
    p.add_argument("--column", action="append", help="extra metric/param/tag column")
    p.add_argument("--csv", metavar="FILE", help="write the table as CSV")
    p.add_argument("--markdown", metavar="FILE", help="write the table as Markdown")
    p.add_argument("--show", action="store_true", help="print the table even when writing a file")
    p.set_defaults(func=cmd_compare)


def add_reproduce(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_id")
    p.add_argument(
        "--seeds",
        type=int,
        metavar="N",
        help="retrain with N new seeds instead: the distribution, and whether the run lies inside it",
    )
    p.add_argument("--data-dir", metavar="DIR", help="data root, if not where the run found it")
    add_tracking_arg(p)
    add_quiet_arg(p)
    p.set_defaults(func=cmd_reproduce)


def add_transfer(p: argparse.ArgumentParser) -> None:
    p.add_argument("--from", dest="source", required=True, help="RUN_ID, best:STUDY or models:/NAME@ALIAS")
    p.add_argument("--target", default="cifar100", choices=("cifar100", "cifar10"))
    p.add_argument("--modes", help="comma list of probe,finetune,freeze,freeze_K,scratch")
    add_storage_arg(p)
    p.add_argument("--data-dir", metavar="DIR")
    add_set_arg(p)
    add_tracking_arg(p)
    add_quiet_arg(p)
    p.set_defaults(func=cmd_transfer)


def add_split_study(p: argparse.ArgumentParser) -> None:
    p.add_argument("--classes-a", metavar="A,B,...", help="half A's classes, names or indices (default: seeded)")
    p.add_argument("--class-seed", type=int, default=0, help="seed of the default split into halves")
    p.add_argument("--depths", metavar="1,2,...", help="transfer depths (default: every stage)")
    add_config_args(p)
    add_tracking_arg(p)
    add_quiet_arg(p)
    p.set_defaults(func=cmd_split_study)


def add_analyze(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_id")
    p.add_argument("--data-dir", metavar="DIR")
    p.add_argument("--samples", type=int, help="seeded sample of N test images (default: all)")
    p.add_argument("--compare", metavar="RUN_ID", help="model to compare by CKA")
    add_tracking_arg(p)
    add_quiet_arg(p)
    p.set_defaults(func=cmd_analyze)


def add_slurm(p: argparse.ArgumentParser) -> None:
    p.description = (
        "Everything after `--` goes to each worker's `harness tune`: "
        "harness slurm --study big --array-size 8 --partition gpu --time 1-00:00:00 "
        "--gpus-per-task 1 -- --space cnn --trials 200"
    )
    p.add_argument("--study", required=True, help="study name (also its MLflow experiment)")
    p.add_argument(
        "--array-size",
        "--workers",
        dest="array_size",
        type=int,
        default=2,
        help="workers, one per array task (default: 2)",
    )
    p.add_argument("--partition", help="Slurm partition (default: the cluster's)")
    p.add_argument("--time", help="each task's time limit: MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS")
    p.add_argument("--gpus-per-task", type=int)
    p.add_argument("--cpus-per-task", type=int)
    p.add_argument("--mem", help="memory per task, as Slurm writes it (16G)")
    p.add_argument(
        "--signal-seconds",
        type=int,
        default=120,
        help="SIGUSR1 this long before the time limit: the worker stops its trial and requeues its task (default: 120)",
    )
    p.add_argument("--log-dir", default="slurm-logs", help="the tasks' logs, one per task (default: slurm-logs)")
    p.add_argument("--dry-run", action="store_true", help="print the sbatch script instead of submitting it")
    add_storage_arg(p)
    add_tracking_arg(p)
    p.add_argument("tune_args", nargs=argparse.REMAINDER, help="-- then the options of `harness tune`")
    p.set_defaults(func=cmd_slurm)


def add_dashboard(p: argparse.ArgumentParser) -> None:
    p.add_argument("--study", required=True)
    add_storage_arg(p)
    p.add_argument("--host", default="127.0.0.1", help="interface to serve on (default: this machine only)")
    p.add_argument("--port", type=int, default=8080, help="0: any free port")
    p.set_defaults(func=cmd_dashboard)


def add_ui(p: argparse.ArgumentParser) -> None:
    target = p.add_mutually_exclusive_group()
    target.add_argument("--study", metavar="NAME", help="open this study's experiment: its study run and trials")
    target.add_argument("--experiment", metavar="NAME", help="open this experiment's runs")
    add_tracking_arg(p)
    p.add_argument("--host", default="127.0.0.1", help="interface to serve on (default: this machine only)")
    p.add_argument("--port", type=int, default=5000)
    p.add_argument("--no-browser", action="store_true", help="print the URL only")
    p.set_defaults(func=cmd_ui)


COMMANDS = {  # name: (help, the function that adds its arguments)
    "train": ("train and track one run", add_train),
    "tune": ("run (or resume, or join) an Optuna study; trials nest under the study run", add_tune),
    "confirm": ("retrain a study's top trials with new seeds; means, intervals, tests", add_confirm),
    "slurm": ("submit a study's workers as a Slurm job array (one `harness tune` a task)", add_slurm),
    "best": (
        "print a study's best trial, its run and its champion model",
        functools.partial(add_study_lookup, func=cmd_best),
    ),
    "report": ("refresh a study's summary on its MLflow run", functools.partial(add_study_lookup, func=cmd_report)),
    "compare": ("table of a study's trial runs", add_compare),
    "reproduce": ("retrain a run from its logged config and compare", add_reproduce),
    "transfer": ("transfer study from a run, best:STUDY or models:/STUDY@champion", add_transfer),
    "split-study": ("Yosinski et al. transfer by depth between two halves of CIFAR-10", add_split_study),
    "analyze": ("feature-space analysis of a run's model, stage by stage", add_analyze),
    "dashboard": ("optuna-dashboard on a study, read-only (safe while workers run it)", add_dashboard),
    "ui": ("start the MLflow UI on the tracking store and open a study's runs", add_ui),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """Every subcommand, with its arguments only where it is `command` (or `command` is None): the
    parser of `harness train` is built without `tune`'s, so it imports nothing of harness.studies."""
    parser = Parser(
        prog="harness", description="Train, tune, transfer and analyse CNNs on CIFAR, every run tracked in MLflow."
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    for name, (text, add_arguments) in COMMANDS.items():
        p = sub.add_parser(name, help=text)
        if command in (None, name):
            add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    from harness.interrupts import exit_code, stop_cleanly

    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv[0] if argv and argv[0] in COMMANDS else None).parse_args(argv)
    restore = stop_cleanly()  # SIGTERM stops as cleanly as Ctrl-C; a second signal at once
    try:
        return args.func(args)
    except HarnessError as e:  # bad input or something missing: its one line, no traceback
        print(f"harness: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        print(
            f"harness: {e or 'interrupted'}; a run in progress was ended KILLED with what it logged "
            "(`harness train --resume RUN_ID` continues a run from its last epoch; a study resumes, "
            "its stopped trials too, with the same command)",
            file=sys.stderr,
        )
        return exit_code(e)
    finally:
        restore()


def entry() -> None:
    """The `harness` command: `main`, then an exit that skips collecting ~900k objects one by one
    (2.5-3 s; the OS takes the memory back). Not in `main`, which tests and notebooks call in-process:
    a frozen heap is never collected, so every store and file they opened would stay open."""
    from harness.interrupts import forget_interrupt_in_exec

    code = main()
    forget_interrupt_in_exec()  # `python -m harness.cli` (Slurm jobs, tests) exits 130 after a Ctrl-C, not -2
    gc.freeze()
    sys.exit(code)


if __name__ == "__main__":
    entry()
