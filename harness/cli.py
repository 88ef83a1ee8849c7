"""`harness` command line: a thin layer of argparse over the library."""
from __future__ import annotations

import argparse
import os
import subprocess
import sys

from harness import config as C
from harness.tracking import DEFAULT_TRACKING_URI, tracking_uri

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                              "studies", "configs", "default.yaml")


def add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", help="YAML config (default: studies/configs/default.yaml)")
    p.add_argument("--data-dir", metavar="DIR",
                   help=f"data root holding cifar-10-batches-py/ (default: ${C.DATA_DIR_ENV} or ./data)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a setting, dotted for nested ones: --set epochs=1 --set data.train_subset=10000")


def add_tracking_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tracking-uri", metavar="URI",
                   help=f"MLflow store (default: $MLFLOW_TRACKING_URI or {DEFAULT_TRACKING_URI})")


def resolve_config(args) -> C.Config:
    path = args.config or (DEFAULT_CONFIG if os.path.exists(DEFAULT_CONFIG) else None)
    return C.load(path, args.overrides, args.data_dir)


def cmd_train(args) -> int:
    from harness.experiment import run_experiment

    cfg = resolve_config(args)
    result = run_experiment(cfg, args.tracking_uri, args.experiment, progress=not args.quiet)
    m = result.metrics
    print(f"run {result.run_id}: test accuracy {m['test_accuracy']:.4f} (top-5 {m['test_top5_accuracy']:.4f}), "
          f"best val accuracy {result.fit.best_val_accuracy:.4f} at epoch {result.fit.best_epoch}")
    print(f"tracking store: {tracking_uri(args.tracking_uri)}; browse it with `harness ui`")
    return 0


def cmd_ui(args) -> int:
    uri = tracking_uri(args.tracking_uri)
    print(f"MLflow UI on http://{args.host}:{args.port} over {uri}")
    print(f"training runs: open an experiment, then its Runs tab "
          f"(http://{args.host}:{args.port}/#/experiments/<id>/runs); Ctrl-C stops the server")
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri,
           "--host", args.host, "--port", str(args.port)]
    try:
        return subprocess.call(cmd)
    except KeyboardInterrupt:
        return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="harness", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train and track one run")
    add_config_args(p)
    add_tracking_arg(p)
    p.add_argument("--experiment", help="MLflow experiment name (default: <dataset>-train)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("ui", help="open the MLflow UI on the tracking store")
    add_tracking_arg(p)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=5000)
    p.set_defaults(func=cmd_ui)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from harness.data import DatasetError
    from harness.training import NonFiniteLoss

    try:
        return args.func(args)
    except (C.ConfigError, DatasetError, NonFiniteLoss) as e:
        print(f"harness: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("harness: interrupted; the run was ended as KILLED", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
