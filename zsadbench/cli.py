"""The ``zsadbench`` command line: a thin layer over the Python API (each subcommand calls one function)."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from typing import Any

from zsadbench.config import ConfigError, parse_assignments

Handler = Callable[[argparse.Namespace], int]


def _csv_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def add_common_method_options(parser: argparse.ArgumentParser) -> None:
    """Adds the options every command that builds a method shares (--set, --pretrained, --device, --seed, ...)."""
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a method config field (dotted keys for groups), repeatable")
    parser.add_argument("--pretrained", help="weights: an open_clip tag, a local state-dict file, or 'random'")
    parser.add_argument("--checkpoint", help="a trained checkpoint of the method (zsadbench's or the authors')")
    parser.add_argument("--shots", type=int, help="few-shot: k normal reference images per category")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")


def add_job_options(parser: argparse.ArgumentParser, what: str) -> None:
    """Adds what `run` and `train` share: method, dataset, method options, MLflow and --resume."""
    parser.add_argument("--method", help="registered method name (see `zsadbench methods`)")
    parser.add_argument("--dataset", help="registered dataset name (see `zsadbench datasets`)")
    parser.add_argument("--data-root", help="the dataset's folder (not needed for `synthetic`)")
    parser.add_argument("--categories", type=_csv_list, help="comma-separated subset of categories (default: all)")
    parser.add_argument("--dataset-option", action="append", default=[], metavar="KEY=VALUE",
                        help="a loader option, e.g. image_size=64 for the synthetic benchmark; repeatable")
    add_common_method_options(parser)
    parser.add_argument("--tracking-uri",
                        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or results/mlflow.db)")
    parser.add_argument("--experiment", default="zsadbench", help="MLflow experiment name (default: zsadbench)")
    parser.add_argument("--run-name", help="MLflow run name")
    parser.add_argument("--resume", metavar="RUN_ID",
                        help=f"resume an interrupted {what} (its original options are used)")


def job_fields(args: argparse.Namespace, command: str) -> dict[str, Any] | None:
    """Returns the JobSpec fields given on the command line, or None when resuming."""
    if args.resume is not None:
        return None
    if not args.method or not args.dataset:
        raise SystemExit(f"zsadbench {command}: --method and --dataset are required (or --resume RUN_ID)")
    return dict(method=args.method, dataset=args.dataset, data_root=args.data_root, categories=args.categories,
                overrides=method_overrides(args), dataset_options=parse_assignments(args.dataset_option),
                seed=args.seed, device=args.device, experiment=args.experiment, run_name=args.run_name)


def method_overrides(args: argparse.Namespace) -> dict[str, str]:
    """Returns the config overrides from --set plus the --pretrained/--checkpoint/--shots shortcuts."""
    overrides = parse_assignments(args.set)
    for name in ("pretrained", "checkpoint", "shots"):
        value = getattr(args, name, None)
        if value is not None:
            overrides[name] = str(value)
    return overrides


def _add_run(sub: argparse._SubParsersAction) -> Handler:
    p = sub.add_parser("run", help="evaluate a method on a dataset and record an MLflow run",
                       description="Evaluate a method on a dataset; prints a per-category table, writes "
                                   "results/runs/<run-id>/ and records one MLflow run.")
    add_job_options(p, "run")
    p.add_argument("--batch-size", type=int, default=8, help="images per forward pass (default: 8)")
    p.add_argument("--num-workers", type=int, default=0, help="image-decoding worker processes (default: 0)")
    p.add_argument("--eval-resolution", choices=("input", "native"), default="input",
                   help="compare maps and masks at the method's input size (papers) or each image's native size")
    p.add_argument("--mask-resize", choices=("bilinear", "nearest", "bilinear-strict", "bilinear-any"),
                   default="bilinear", help="how masks reach the input size: bilinear then > 0.5 (default, most "
                   "references); bilinear-strict / bilinear-any reproduce MuSc's MVTec / VisA rules")
    p.add_argument("--aupro", choices=("exact", "step200"), default="exact",
                   help="AUPRO implementation; step200 is the AnomalyCLIP/MuSc variant, for paper comparison")
    p.add_argument("--skip-bad", action="store_true",
                   help="skip unreadable or inconsistent files (counted, logged and recorded) instead of stopping")
    p.add_argument("--json", dest="json_path", metavar="FILE", help="also write the metrics as JSON to FILE")

    def handle(args: argparse.Namespace) -> int:
        from zsadbench.evaluation import EvalOptions
        from zsadbench.runner import RunSpec, format_table, run

        fields = job_fields(args, "run")
        spec = None
        if fields is not None:
            spec = RunSpec(**fields, eval=EvalOptions(
                batch_size=args.batch_size, num_workers=args.num_workers, resolution=args.eval_resolution,
                mask_resize=args.mask_resize, aupro=args.aupro, skip_bad=args.skip_bad))
        run_id, result = run(spec, resume=args.resume, tracking_uri=args.tracking_uri, json_path=args.json_path)
        from zsadbench.jobs import read_state
        from zsadbench.paths import results_dir
        from zsadbench.registry import get_method

        stored = read_state("runs", run_id)[1]
        print(f"{get_method(stored['method']).display_name()} on {stored['dataset']}")
        print(format_table(result))

        print(f"\nrun {run_id}: results in {results_dir() / 'runs' / run_id}")
        return 0

    return handle


def _add_evaluate(sub: argparse._SubParsersAction) -> Handler:
    p = sub.add_parser("evaluate", help="score anomaly maps written by any tool (MVTec AD evaluation layout)",
                       description="Score anomaly maps stored as DIR/<category>/test/<defect>/<image stem>.tiff "
                                   "(float, any size: resized to the mask) with zsadbench's metric engine. Image "
                                   "score = map max unless DIR/<category>/scores.csv (columns image,score) gives one.")
    p.add_argument("--anomaly-maps", required=True, metavar="DIR", help="folder of the maps")
    p.add_argument("--dataset", required=True, help="registered dataset name (see `zsadbench datasets`)")
    p.add_argument("--data-root", help="the dataset's folder (masks and labels are read from it)")
    p.add_argument("--categories", type=_csv_list, help="comma-separated subset of categories")
    p.add_argument("--dataset-option", action="append", default=[], metavar="KEY=VALUE",
                   help="a loader option, e.g. image_size=64 for the synthetic benchmark; repeatable")
    p.add_argument("--aupro", choices=("exact", "step200"), default="exact",
                   help="AUPRO implementation; step200 is the AnomalyCLIP/MuSc variant, for paper comparison")
    p.add_argument("--json", dest="json_path", metavar="FILE", help="also write the metrics as JSON to FILE")

    def handle(args: argparse.Namespace) -> int:
        import zsadbench
        from zsadbench.evaluate_maps import SETTINGS, evaluate_anomaly_maps
        from zsadbench.runner import format_table, write_json

        dataset = zsadbench.load_dataset(args.dataset, args.data_root, **parse_assignments(args.dataset_option))
        result = evaluate_anomaly_maps(args.anomaly_maps, dataset, args.categories, aupro=args.aupro)
        print(format_table(result))
        if args.json_path:
            write_json(result, args.json_path, {"settings": SETTINGS})
            print(f"\nmetrics written to {args.json_path}")
        return 0

    return handle


def _add_train(sub: argparse._SubParsersAction) -> Handler:
    p = sub.add_parser("train", help="train a method's learnable parts on an auxiliary dataset (MLflow run)",
                       description="Train a trainable method (AnomalyCLIP, AdaptCLIP, HeadCLIP) on an auxiliary "
                                   "dataset's test split, as the papers do; writes a checkpoint each epoch to "
                                   "results/training/<run-id>/ and records one MLflow run. Evaluate with "
                                   "`zsadbench run --method M --checkpoint results/training/<run-id>/epoch_K.pth`.")
    add_job_options(p, "training")
    p.add_argument("--epochs", type=int, help="training epochs (default: the method's, 15 for AnomalyCLIP)")
    p.add_argument("--batch-size", type=int, help="images per optimiser step (default: the method's, 8)")
    p.add_argument("--lr", type=float, help="learning rate (default: the method's, 1e-3)")

    def handle(args: argparse.Namespace) -> int:
        from zsadbench.paths import results_dir
        from zsadbench.training import TrainSpec, train, with_train_overrides

        fields = job_fields(args, "train")
        spec = None
        if fields is not None:
            fields["overrides"] = with_train_overrides(fields["overrides"], args.epochs, args.batch_size, args.lr)
            spec = TrainSpec(**fields)
        run_id, result = train(spec, resume=args.resume, tracking_uri=args.tracking_uri)
        for epoch, losses in enumerate(result.epoch_losses, start=result.first_epoch):
            print(f"epoch {epoch}: " + ", ".join(f"{k} {v:.4f}" for k, v in losses.items()))
        folder = results_dir() / "training" / run_id
        print(f"\ntraining {run_id}: checkpoints in {folder}")
        if result.last_checkpoint is not None:
            import shlex

            from zsadbench.jobs import read_state

            # the model options of the training (backbone, weights, size) must be given again; train.* are not needed
            model_options = {k: v for k, v in read_state("training", run_id)[1]["overrides"].items()
                             if not k.startswith("train.") and k != "checkpoint"}
            options = "".join(f" --pretrained {shlex.quote(v)}" if k == "pretrained"
                              else f" --set {shlex.quote(f'{k}={v}')}" for k, v in model_options.items())
            print(f"evaluate with: zsadbench run --method {result.method} --checkpoint {result.last_checkpoint}"
                  f"{options} --dataset <dataset> ...")
        return 0

    return handle


def _add_methods(sub: argparse._SubParsersAction) -> Handler:
    sub.add_parser("methods", help="list registered methods")

    def handle(args: argparse.Namespace) -> int:
        from zsadbench.registry import list_methods

        for name, cls in list_methods().items():
            kinds = [k for k, flag in (("transductive", cls.transductive),
                                       ("trainable", _is(cls, "Trainable")), ("few-shot", _is(cls, "FewShot"))) if flag]
            summary = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
            print(f"{name:14s} {cls.display_name():28s} {', '.join(kinds) or 'inductive':28s} {summary}")
        return 0

    return handle


def _is(cls: type, base: str) -> bool:
    import zsadbench.detector as detector

    return issubclass(cls, getattr(detector, base))


def _add_datasets(sub: argparse._SubParsersAction) -> Handler:
    sub.add_parser("datasets", help="list registered datasets")

    def handle(args: argparse.Namespace) -> int:
        from zsadbench.registry import list_datasets

        for name, info in list_datasets().items():
            print(f"{name:11s} {info.domain:11s} {info.description}")
        return 0

    return handle


def _add_leaderboard(sub: argparse._SubParsersAction) -> Handler:
    p = sub.add_parser("leaderboard", help="write the leaderboard (Markdown, HTML, CSV, plots) from recorded runs",
                       description="Read the evaluation runs of an MLflow experiment back and write leaderboard.md, "
                                   "a self-contained leaderboard.html, leaderboard.csv and plots/*.png: one table "
                                   "per dataset, per-category tables, bootstrap intervals, paired tests and the "
                                   "paper-reported numbers beside the measured ones.")
    p.add_argument("--experiment", default="zsadbench", help="MLflow experiment name (default: zsadbench)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or results/mlflow.db)")
    p.add_argument("--datasets", nargs="+", type=_csv_list, metavar="NAME",
                   help="only these datasets (names as recorded, e.g. mvtec visa)")
    p.add_argument("--out", help="output folder (default: results/leaderboard)")
    p.add_argument("--reported", metavar="CSV",
                   help="paper-reported numbers (default: results/paper_reported.csv)")
    p.add_argument("--bootstrap", type=int, default=1000, metavar="N",
                   help="bootstrap replicates for intervals and paired tests; 0 skips them (default: 1000)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed (default: 0)")

    def handle(args: argparse.Namespace) -> int:
        from zsadbench.report import leaderboard

        datasets = [d for group in args.datasets for d in group] if args.datasets else None
        board, written = leaderboard(args.experiment, args.tracking_uri, datasets, args.out,
                                     reported=args.reported, replicates=args.bootstrap, seed=args.seed)
        for dataset in board.datasets:
            print(f"{dataset.key}: {len(dataset.rows)} rows ({', '.join(r.label for r in dataset.rows)})")
        print(f"wrote {written['markdown']}, {written['html'].name}, {written['csv'].name} and "
              f"{len(written) - 3} plots in {written['markdown'].parent / 'plots'}")
        return 0

    return handle


def _add_check(sub: argparse._SubParsersAction) -> Handler:
    p = sub.add_parser("check", help="regression check: every method on a small synthetic benchmark vs its goldens",
                       description="Run every registered method (or --method) with its tiny seeded regression "
                                   "configuration on a fixed small synthetic benchmark and compare metrics and "
                                   "anomaly-map summaries with the goldens in results/regression/. Exit status 1 on "
                                   "any difference beyond tolerance.")
    p.add_argument("--method", action="append", type=_csv_list, metavar="NAME",
                   help="check only this method (repeatable, or comma-separated)")
    p.add_argument("--update", action="store_true", help="(re)write the goldens instead of comparing")
    p.add_argument("--goldens", metavar="DIR", help="goldens folder (default: results/regression)")

    def handle(args: argparse.Namespace) -> int:
        from zsadbench.regression import check, format_report

        methods = [m for group in args.method for m in group] if args.method else None
        report = check(methods, update=args.update, goldens=args.goldens)
        print(format_report(report))
        return 1 if report.failed else 0

    return handle


COMMANDS: list[Callable[[argparse._SubParsersAction], Handler]] = [_add_run, _add_evaluate, _add_train, _add_methods,
                                                                   _add_datasets, _add_leaderboard, _add_check]


def _add_new_method(sub: argparse._SubParsersAction) -> Handler:
    p = sub.add_parser("new-method", help="write a method plugin package skeleton (entry point, tests, goldens)",
                       description="Write zsadbench-NAME/: a pyproject with the zsadbench.methods entry point, a "
                                   "detector module with a typed config and a simple working method, tests running "
                                   "the conformance suite (zsadbench.testing) and the regression check, and its "
                                   "goldens, created by running the check.")
    p.add_argument("name", help="registry name of the new method (lower case, words joined by '-' or '_')")
    p.add_argument("--out", default=".", metavar="DIR", help="folder to write zsadbench-NAME/ into (default: .)")

    def handle(args: argparse.Namespace) -> int:
        from zsadbench.scaffold import new_method

        made = new_method(args.name, args.out)
        root = made["root"]
        for path in made["files"]:
            print(f"wrote {path.relative_to(root.parent)}")
        print(f"\nnext: pip install -e {root} && python -m pytest {root / 'tests'} && "
              f"zsadbench check --method {made['name']}")
        return 0

    return handle


COMMANDS.append(_add_new_method)


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, Handler]]:
    """Returns the argument parser and the handler of each subcommand."""
    parser = argparse.ArgumentParser(prog="zsadbench", description="Benchmark harness for zero-shot anomaly detection")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", required=True)
    handlers: dict[str, Handler] = {}
    for add in COMMANDS:
        before = set(sub.choices)
        handler = add(sub)
        for name in set(sub.choices) - before:
            handlers[name] = handler
    return parser, handlers


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``zsadbench`` console script; returns the exit status."""
    parser, handlers = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s")
    logging.getLogger("alembic").setLevel(logging.WARNING)
    from zsadbench.checkpoints import CheckpointError
    from zsadbench.data import DataError

    try:
        return handlers[args.command](args)
    except (DataError, ConfigError, CheckpointError, KeyError, ValueError, FileNotFoundError) as exc:
        if args.verbose:
            raise
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"zsadbench {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
