"""The split study (Yosinski et al., 2014) on the real CIFAR-10 copy, with a CPU budget.

    python benchmarks/split_study.py --data-dir data [--epochs 4] [--train-subset 4000] [--set KEY=VALUE ...]

Trains baseA, baseB and, for each depth n = 1..3, AnB, BnB, AnB+ and BnB+ (14 runs) into a fresh
temporary MLflow store (or --tracking-uri), then prints the test accuracy on B by depth as a
Markdown table, baseA/baseB, and the wall time.
"""

from __future__ import annotations

import argparse
import tempfile
import time

from harness.studies.split_study import curves_markdown, run_split_study


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default="data")
    p.add_argument("--tracking-uri", help="MLflow store (default: a fresh temporary one)")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--train-subset", type=int, default=4000, help="training images of each half (of 20,000)")
    p.add_argument("--val-subset", type=int, default=1000)
    p.add_argument("--class-seed", type=int, default=0)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args()

    tmp = tempfile.mkdtemp(prefix="split-study-")
    uri = args.tracking_uri or f"sqlite:///{tmp}/mlflow.db"
    overrides = [
        f"epochs={args.epochs}",
        f"data.train_subset={args.train_subset}",
        f"data.val_subset={args.val_subset}",
        "eval.log_model=false",
        *args.overrides,
    ]
    start = time.perf_counter()
    result = run_split_study(
        data_dir=args.data_dir, tracking_uri=uri, overrides=overrides, class_seed=args.class_seed, progress=False
    )
    wall = time.perf_counter() - start
    base = {c.name: c.metrics.get("test_accuracy", float("nan")) for c in result.children}
    print(f"A = {', '.join(result.classes_a)}\nB = {', '.join(result.classes_b)}")
    print(f"settings: {' '.join(overrides)}; test: B's test images (all 5,000 unless data.test_subset is set)")
    print(
        f"baseA {base.get('baseA', float('nan')):.4f} (on A's test set), baseB {base.get('baseB', float('nan')):.4f}\n"
    )
    print(curves_markdown(result.curves))
    print(f"\n{len(result.children)} runs, {len(result.failed)} failed; wall time {wall / 60:.1f} min")
    print(f"tracking store: {uri} (parent run {result.parent_run_id})")


if __name__ == "__main__":
    main()
