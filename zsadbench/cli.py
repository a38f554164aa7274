"""The ``zsadbench`` command line: a thin layer over the Python API (each subcommand calls one function).

It answers ``--help``, ``--version`` and usage errors without importing torch, open_clip or mlflow: every heavy
import happens inside the handler of the command that needs it. Usage errors exit with status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from zsadbench import __version__
from zsadbench.config import ConfigError, parse_assignments

Handler = Callable[[argparse.Namespace], int]


class UsageError(ValueError):
    """The command line (or its --config file) asks for something that cannot be done; exit status 2."""


def _csv_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


# ------------------------------------------------------------------------------------------------ method options

def add_method_options(parser: argparse.ArgumentParser, *, with_method: bool = True) -> None:
    """Adds the options every command that builds a method shares (--method, --preset, --set, --pretrained, ...)."""
    if with_method:
        parser.add_argument("--method", required=True, help="registered method name (see `zsadbench methods`)")
    parser.add_argument("--preset", help="a named configuration of the method, e.g. 'smoke' (tiny and fast; see "
                                         "`zsadbench methods METHOD`)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a method config field (dotted keys for groups), repeatable")
    parser.add_argument("--pretrained", help="weights: an open_clip tag, a local state-dict file, or 'random'")
    parser.add_argument("--checkpoint", help="a trained checkpoint of the method (zsadbench's or the authors')")
    parser.add_argument("--shots", type=_non_negative_int, help="few-shot: k normal reference images per category")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument("--config", metavar="TOML", help="options from a TOML file (command-line options win); "
                                                         "`--print-config` writes one")
    parser.add_argument("--print-config", action="store_true",
                        help="print the method's fully resolved config as TOML (for --config) and exit")


def add_job_options(parser: argparse.ArgumentParser, what: str) -> None:
    """Adds what `run` and `train` share: method, dataset, method options, MLflow and --resume."""
    required = parser.add_argument_group("required (unless --resume)")
    required.add_argument("--method", help="registered method name (see `zsadbench methods`)")
    required.add_argument("--dataset", help="registered dataset name (see `zsadbench datasets`)")
    parser.add_argument("--data-root", help="the dataset's folder (not needed for `synthetic`)")
    parser.add_argument("--categories", type=_csv_list, help="comma-separated subset of categories (default: all)")
    parser.add_argument("--dataset-option", action="append", default=[], metavar="KEY=VALUE",
                        help="a loader option, e.g. image_size=64 for the synthetic benchmark; repeatable")
    add_method_options(parser, with_method=False)
    parser.add_argument("--tracking-uri",
                        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or results/mlflow.db)")
    parser.add_argument("--experiment", default="zsadbench", help="MLflow experiment name (default: zsadbench)")
    parser.add_argument("--run-name", help="MLflow run name")
    parser.add_argument("--resume", metavar="RUN",
                        help=f"resume an interrupted {what}: its run id, or the path of its folder (its original "
                             "options are used)")
    parser.add_argument("--feature-cache", action=argparse.BooleanOptionalAction, default=None,
                        help="keep the frozen backbone's image features on disk and reuse them (default: on for "
                             "training, off for run); `zsadbench cache info` shows the cache")
    parser.add_argument("--feature-cache-dir", metavar="DIR",
                        help="the feature cache's folder (default: $ZSADBENCH_FEATURE_CACHE or "
                             "<results>/cache/features)")


def method_overrides(args: argparse.Namespace) -> dict[str, str]:
    """Returns the method config overrides: preset < --config's [config] < --pretrained/--checkpoint/--shots < --set.

    An option the method does not have is a usage error that says so in the method's terms.
    """
    from zsadbench.registry import get_method

    cls = get_method(args.method)
    overrides: dict[str, Any] = {}
    if args.preset:
        if args.preset not in cls.presets:
            raise UsageError(f"{args.method} has no preset {args.preset!r}; presets: "
                             f"{', '.join(cls.presets) or 'none'}")
        overrides |= cls.presets[args.preset]
    overrides |= getattr(args, "config_overrides", {})
    fields = {f.name for f in dataclasses.fields(cls.Config)}
    shortcuts = {"pretrained": f"{args.method} loads no pretrained weights",
                 "checkpoint": f"{args.method} has no learned parts to load a checkpoint into",
                 "shots": f"{args.method} is not a few-shot method"}
    for name, refusal in shortcuts.items():
        value = getattr(args, name, None)
        if value is None:
            continue
        if name not in fields:
            raise UsageError(f"{refusal} (--{name})")
        overrides[name] = str(value)
    return {**overrides, **parse_assignments(args.set)}


def _load_config_file(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """Parses ``argv``; with --config, the file's options become defaults the command line overrides."""
    args = parser.parse_args(argv)
    path = getattr(args, "config", None)
    if not path:
        return args
    import tomllib

    try:
        data = tomllib.loads(Path(path).read_text())
    except FileNotFoundError:
        parser.error(f"--config {path}: no such file")
    except (OSError, tomllib.TOMLDecodeError) as exc:
        parser.error(f"--config {path}: not a TOML file ({exc})")
    config = data.pop("config", {})
    sub = _subparser(parser, args.command)
    known = {a.dest for a in sub._actions}
    values = {key.replace("-", "_"): value for key, value in data.items()}
    unknown = sorted(k for k in values if k not in known or k in ("config", "print_config", "help"))
    if unknown:
        parser.error(f"--config {path}: unknown option{'s' if len(unknown) > 1 else ''} {', '.join(unknown)} for "
                     f"`zsadbench {args.command}`")
    if isinstance(values.get("categories"), str):
        values["categories"] = _csv_list(values["categories"])
    sub.set_defaults(**values)
    args = parser.parse_args(argv)
    args.config_overrides = _flatten_table(config)
    return args


def _flatten_table(table: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in table.items():
        if isinstance(value, dict):
            out |= _flatten_table(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


def _subparser(parser: argparse.ArgumentParser, command: str) -> argparse.ArgumentParser:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices[command]
    raise KeyError(command)


def print_config(args: argparse.Namespace) -> int:
    """Prints the resolved method config (defaults included) as TOML that --config reads back."""
    import tomli_w

    from zsadbench.config import apply_overrides, to_dict
    from zsadbench.registry import get_method

    config = apply_overrides(get_method(args.method).Config(), method_overrides(args))

    def drop_none(d: dict[str, Any]) -> dict[str, Any]:  # TOML has no null: a left-out key keeps its default None
        return {k: drop_none(v) if isinstance(v, dict) else v for k, v in d.items() if v is not None}

    print(f"# zsadbench {__version__}: resolved config of {args.method}; use with --config FILE")
    print(tomli_w.dumps({"method": args.method, "config": drop_none(to_dict(config))}), end="")
    return 0


def job_fields(args: argparse.Namespace, command: str) -> dict[str, Any] | None:
    """Returns the JobSpec fields given on the command line, or None when resuming."""
    if args.resume is not None:
        return None
    if not args.method or not args.dataset:
        raise UsageError("--method and --dataset are required (or --resume RUN)")
    return dict(method=args.method, dataset=args.dataset, data_root=args.data_root, categories=args.categories,
                overrides=method_overrides(args), dataset_options=parse_assignments(args.dataset_option),
                seed=args.seed, device=args.device, experiment=args.experiment, run_name=args.run_name,
                feature_cache=args.feature_cache, feature_cache_dir=args.feature_cache_dir)


# ------------------------------------------------------------------------------------------------------ commands

def _add_run(sub: argparse._SubParsersAction) -> Handler:
    p = sub.add_parser("run", help="evaluate a method on a dataset and record an MLflow run",
                       description="Evaluate a method on a dataset; prints a per-category table, writes "
                                   "results/runs/<run-id>/ and records one MLflow run.")
    add_job_options(p, "run")
    p.add_argument("--batch-size", type=_positive_int, default=8, help="images per forward pass (default: 8)")
    p.add_argument("--num-workers", type=_non_negative_int, default=0,
                   help="image-decoding worker processes (default: 0)")
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
        if args.print_config:
            return print_config(args)
        fields = job_fields(args, "run")
        from zsadbench.evaluation import EvalOptions
        from zsadbench.jobs import RunSpec, run

        spec = None
        if fields is not None:
            spec = RunSpec(**fields, eval=EvalOptions(
                batch_size=args.batch_size, num_workers=args.num_workers, resolution=args.eval_resolution,
                mask_resize=args.mask_resize, aupro=args.aupro, skip_bad=args.skip_bad))
        outcome = run(spec, resume=args.resume, tracking_uri=args.tracking_uri, json_path=args.json_path)
        print(f"{outcome.method_label} on {outcome.dataset} (values in percent)")
        print(outcome.result.format())
        print(f"\nrun {outcome.run_id}: results in {outcome.folder}")
        for note in outcome.notes:
            print(note)
        if outcome.sync_hint:
            print(outcome.sync_hint)
        return 0

    return handle


def _add_train(sub: argparse._SubParsersAction) -> Handler:
    p = sub.add_parser("train", help="train a method's learnable parts on an auxiliary dataset (MLflow run)",
                       description="Train a trainable method (AnomalyCLIP, AdaptCLIP, HeadCLIP) on an auxiliary "
                                   "dataset's test split, as the papers do; writes a checkpoint each epoch to "
                                   "results/training/<run-id>/ and records one MLflow run. Evaluate with "
                                   "`zsadbench run --method M --checkpoint results/training/<run-id>/epoch_K.pth`.")
    add_job_options(p, "training")
    p.add_argument("--epochs", type=_positive_int, help="training epochs (default: the method's, 15 for AnomalyCLIP)")
    p.add_argument("--batch-size", type=_positive_int, help="images per optimiser step (default: the method's, 8)")
    p.add_argument("--lr", type=float, help="learning rate (default: the method's, 1e-3)")

    def handle(args: argparse.Namespace) -> int:
        if args.print_config:
            return print_config(args)
        fields = job_fields(args, "train")
        from zsadbench.jobs import TrainSpec, train

        spec = None
        if fields is not None:
            for key, value in (("train.epochs", args.epochs), ("train.batch_size", args.batch_size),
                               ("train.lr", args.lr)):
                if value is not None:
                    fields["overrides"][key] = str(value)
            spec = TrainSpec(**fields)
        outcome = train(spec, resume=args.resume, tracking_uri=args.tracking_uri)
        result = outcome.result
        for epoch, losses in enumerate(result.epoch_losses, start=result.first_epoch):
            print(f"epoch {epoch}: " + ", ".join(f"{k} {v:.4f}" for k, v in losses.items()))
        print(f"\ntraining {outcome.run_id}: checkpoints in {outcome.folder}")
        if outcome.evaluate_hint:
            print(f"evaluate with: {outcome.evaluate_hint}")
        if outcome.sync_hint:
            print(outcome.sync_hint)
        return 0

    return handle


def _add_predict(sub: argparse._SubParsersAction) -> Handler:
    p = sub.add_parser("predict", help="anomaly maps, scores and overlays for any images (no dataset layout)",
                       description="Score arbitrary images with a method: writes OUT/scores.csv, OUT/maps/<name>.tiff "
                                   "(float32 anomaly maps at the method's input size) and OUT/overlays/<name>.png.")
    add_method_options(p)
    p.add_argument("--images", nargs="+", required=True, metavar="DIR|FILE", help="image files and/or folders")
    p.add_argument("--out", required=True, metavar="OUT", help="output folder (created)")
    p.add_argument("--shots-dir", "--references", dest="shots_dir", metavar="DIR",
                   help="few-shot methods: a folder of normal reference images (all are used)")
    p.add_argument("--category", default="object",
                   help="the object's class word for text prompts (default: 'object')")
    p.add_argument("--batch-size", type=_positive_int, default=8, help="images per forward pass (default: 8)")

    def handle(args: argparse.Namespace) -> int:
        if args.shots_dir and args.shots is None:
            args.shots = len(_image_files([args.shots_dir]))
        if args.print_config:
            return print_config(args)
        overrides = method_overrides(args)
        images = _image_files(args.images)
        references = _image_files([args.shots_dir]) if args.shots_dir else []
        from zsadbench.jobs import predict

        written = predict(args.method, images, args.out, overrides=overrides, references=references,
                          category=args.category, device=args.device, seed=args.seed, batch_size=args.batch_size)
        print(written.table)
        print(f"\n{len(images)} images scored: {written.folder}/scores.csv, maps/ and overlays/")
        return 0

    return handle


def _image_files(items: list[str]) -> list[Path]:
    """Returns the image files named or contained (not recursively) in ``items``; names any that is neither."""
    from zsadbench.data import IMAGE_EXTENSIONS

    files: list[Path] = []
    for item in items:
        path = Path(item).expanduser()
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
            if not found:
                raise UsageError(f"{path}: no images ({', '.join(IMAGE_EXTENSIONS)}) in this folder")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise UsageError(f"{path}: no such file or folder")
    return files


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
        import json

        import zsadbench
        from zsadbench.evaluate_maps import SETTINGS, evaluate_anomaly_maps

        dataset = zsadbench.load_dataset(args.dataset, args.data_root, **parse_assignments(args.dataset_option))
        result = evaluate_anomaly_maps(args.anomaly_maps, dataset, args.categories, aupro=args.aupro)
        print(result.format())
        if args.json_path:
            Path(args.json_path).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json_path).write_text(json.dumps({**result.to_json(), "settings": SETTINGS}, indent=2))
            print(f"\nmetrics written to {args.json_path}")
        return 0

    return handle


def _add_methods(sub: argparse._SubParsersAction) -> Handler:
    p = sub.add_parser("methods", help="list registered methods (kind, presets, reference, licenses), or one's options",
                       description="Without a name: every registered method with its kind, presets, the reference "
                                   "implementation it follows (owner/repo@commit) and the licenses of its code and of "
                                   "its default weights. With a name: its paper, options (defaults and meaning) and "
                                   "presets.")
    p.add_argument("name", nargs="?", help="a method name: list its options")

    def handle(args: argparse.Namespace) -> int:
        from zsadbench.registry import get_method, list_methods

        if args.name:
            print(describe_method(get_method(args.name)))
            return 0
        rows = [(name, cls.display_name(), method_kinds(cls), ", ".join(cls.presets) or "-",
                 cls.reference or "none released", cls.code_license or "not declared",
                 cls.weights_license or "not declared") for name, cls in list_methods().items()]
        print(_text_table(["method", "label", "kind", "presets", "reference", "code license", "weights license"],
                          rows))
        print("\nThe built-in methods are reimplementations that copy no reference code; THIRD_PARTY_NOTICES.md "
              "gives the licenses of code, weights and datasets.\n`zsadbench methods NAME` lists a method's options; "
              "`--preset smoke` runs its tiny configuration.")
        return 0

    return handle


def method_kinds(cls: type) -> str:
    """Returns what kind of method ``cls`` is: inductive, transductive, trainable, few-shot (comma-separated)."""
    import zsadbench.detector as detector

    kinds = [k for k, flag in (("transductive", cls.transductive),  # type: ignore[attr-defined]
                               ("trainable", issubclass(cls, detector.Trainable)),
                               ("few-shot", issubclass(cls, detector.FewShot))) if flag]
    return ", ".join(kinds) or "inductive"


def describe_method(cls: Any) -> str:
    """Returns a method's description: label, kind, presets and every option with its default and meaning."""
    from zsadbench.config import describe_options

    lines = [f"{cls.name}: {cls.display_name()} ({method_kinds(cls)})"]
    if cls.__doc__:
        lines.append(cls.__doc__.strip().splitlines()[0])
    lines.append(f"paper: {cls.paper or 'not declared'}; reference: {cls.reference or 'none released'}; code license: "
                 f"{cls.code_license or 'not declared'}; weights license: {cls.weights_license or 'not declared'}")
    lines.append("")
    rows = [(name, repr(default), meaning) for name, default, meaning in describe_options(cls.Config)]
    lines.append(_text_table(["option (--set KEY=VALUE)", "default", "meaning"], rows))
    for preset, overrides in cls.presets.items():
        lines.append(f"\npreset {preset}: " + ", ".join(f"{k}={v}" for k, v in overrides.items()))
    return "\n".join(lines)


def _text_table(header: list[str], rows: Sequence[Sequence[Any]]) -> str:
    widths = [max(len(str(x)) for x in column) for column in zip(header, *rows)]
    widths[-1] = 0  # the last column is not padded
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([line(header), line(["-" * len(h) for h in header]), *(line(r) for r in rows)])


def _add_datasets(sub: argparse._SubParsersAction) -> Handler:
    p = sub.add_parser("datasets", help="list registered datasets: domain, categories, counts, license, how to get it")
    p.add_argument("name", nargs="?", help="show one dataset in full (layout and the steps to obtain it)")

    def handle(args: argparse.Namespace) -> int:
        from zsadbench.download import describe_dataset
        from zsadbench.registry import get_dataset, list_datasets

        if args.name:
            print(describe_dataset(get_dataset(args.name), full=True))
            return 0
        for info in list_datasets().values():
            print(describe_dataset(info))
        return 0

    return handle


def _add_download(sub: argparse._SubParsersAction) -> Handler:
    p = sub.add_parser("download", help="download, check (SHA-256) and unpack a dataset, or print how to get it",
                       description="Download a dataset's published archives (resumable; verified against the "
                                   "published SHA-256), unpack them atomically into --root and record the license, "
                                   "hashes and fingerprint there. Gated or manual datasets: print the exact steps "
                                   "and the folder layout, then check --root if it is already filled.")
    p.add_argument("dataset", help="registered dataset name (see `zsadbench datasets`)")
    p.add_argument("--root", required=True, help="the folder to create (what --data-root then points at)")
    p.add_argument("--cache", help="where archives are downloaded (default: a hidden folder next to --root)")
    p.add_argument("--keep-archives", action="store_true", help="keep the archives after unpacking")

    def handle(args: argparse.Namespace) -> int:
        from zsadbench.download import download

        result = download(args.dataset, args.root, cache=args.cache, keep_archives=args.keep_archives)
        return 0 if result.status in ("downloaded", "present", "manual-ok") else 1

    return handle


def _add_verify(sub: argparse._SubParsersAction) -> Handler:
    p = sub.add_parser("verify", help="check a dataset copy: counts, masks, image/mask sizes, fingerprint",
                       description="Read a dataset with its loader and report file counts per category and split, "
                                   "anomalous images without masks, image/mask size mismatches, differences from "
                                   "the published counts, and the dataset fingerprint that runs record. Exit "
                                   "status 1 on any problem.")
    p.add_argument("dataset", help="registered dataset name (see `zsadbench datasets`)")
    p.add_argument("--root", help="the dataset's folder (not needed for `synthetic`)")
    p.add_argument("--dataset-option", action="append", default=[], metavar="KEY=VALUE",
                   help="a loader option (as for `zsadbench run`); repeatable")
    p.add_argument("--workers", type=int, help="hashing threads (default: 2 x CPUs, at most 16)")
    p.add_argument("--no-fingerprint", action="store_true", help="skip hashing the files")

    def handle(args: argparse.Namespace) -> int:
        from zsadbench.download import verify

        report = verify(args.dataset, args.root, workers=args.workers, fingerprint=not args.no_fingerprint,
                        options=parse_assignments(args.dataset_option))
        print(report.format())
        return 0 if report.ok else 1

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
    p.add_argument("--bootstrap", type=_non_negative_int, default=1000, metavar="N",
                   help="bootstrap replicates for intervals and paired tests; 0 skips them (default: 1000)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed (default: 0)")
    p.add_argument("--include-random", action="store_true",
                   help="rank runs with random weights too (left out of the tables by default: chance-level)")

    def handle(args: argparse.Namespace) -> int:
        from zsadbench.report import leaderboard

        datasets = [d for group in args.datasets for d in group] if args.datasets else None
        board, written = leaderboard(args.experiment, args.tracking_uri, datasets, args.out,
                                     reported=args.reported, replicates=args.bootstrap, seed=args.seed,
                                     include_random=args.include_random)
        for dataset in board.datasets:
            print(f"{dataset.key}: {len(dataset.rows)} rows ({', '.join(r.label for r in dataset.rows)})")
        if board.random_runs:
            print(f"{board.random_runs} runs with random weights left out (--include-random ranks them)")
        print(f"wrote {written['markdown']}, {written['html'].name}, {written['csv'].name} and "
              f"{len(written) - 3} plots in {written['markdown'].parent / 'plots'}")
        return 0

    return handle


def _add_check(sub: argparse._SubParsersAction) -> Handler:
    p = sub.add_parser("check", help="regression check: every method on a small synthetic benchmark vs its goldens",
                       description="Run every registered method (or --method) with its tiny seeded regression "
                                   "configuration on a fixed small synthetic benchmark and compare metrics and "
                                   "anomaly-map summaries with its goldens (built-in methods: zsadbench's own, "
                                   "packaged; a plugin: the goldens folder next to its module). Exit status 1 on any "
                                   "difference beyond tolerance.")
    p.add_argument("--method", action="append", type=_csv_list, metavar="NAME",
                   help="check only this method (repeatable, or comma-separated)")
    p.add_argument("--update", action="store_true", help="(re)write the goldens instead of comparing")
    p.add_argument("--goldens", metavar="DIR",
                   help="goldens folder for every checked method (default: each method's own goldens folder)")

    def handle(args: argparse.Namespace) -> int:
        from zsadbench.regression import check, format_report

        methods = [m for group in args.method for m in group] if args.method else None
        report = check(methods, update=args.update, goldens=args.goldens)
        print(format_report(report))
        return 1 if report.failed else 0

    return handle


def _add_sync(sub: argparse._SubParsersAction) -> Handler:
    p = sub.add_parser("sync", help="copy a run's results folder into MLflow (after the server was unreachable)",
                       description="Copy a run or training folder (parameters, metrics, status, artifacts) into "
                                   "MLflow: for jobs that went on while the tracking server was unreachable.")
    p.add_argument("run", metavar="RUN", help="a run id of the results folder, or the path of a run's folder")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: the one the run used)")

    def handle(args: argparse.Namespace) -> int:
        from zsadbench.jobs import sync

        run_id = sync(args.run, args.tracking_uri)
        print(f"run {run_id} synced to MLflow")
        return 0

    return handle


COMMANDS: list[Callable[[argparse._SubParsersAction], Handler]] = [
    _add_run, _add_train, _add_predict, _add_evaluate, _add_methods, _add_datasets, _add_download, _add_verify,
    _add_leaderboard, _add_check, _add_sync]


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


def _add_cache(sub: argparse._SubParsersAction) -> Handler:
    p = sub.add_parser("cache", help="the feature cache of frozen backbone features: show (info) or empty (clear)",
                       description="The feature cache keeps what frozen backbones computed for each image (on by "
                                   "default for `zsadbench train`, `--feature-cache` for `zsadbench run`). `info` "
                                   "prints entries and size per stage against the bound; `clear` deletes entries.")
    p.add_argument("action", choices=("info", "clear"), help="info: entries, size, bound, location; clear: delete")
    p.add_argument("--dir", dest="cache_dir", metavar="DIR",
                   help="the cache folder (default: $ZSADBENCH_FEATURE_CACHE or <results>/cache/features)")
    p.add_argument("--stage", help="clear only this stage's entries (a name `info` lists, e.g. anomalyclip.dual_path)")

    def handle(args: argparse.Namespace) -> int:
        from zsadbench.feature_cache import FeatureCache, format_size

        cache = FeatureCache(args.cache_dir)
        if args.action == "info":
            print(cache.info().format())
            return 0
        count, size = cache.clear(args.stage)
        print(f"removed {count} entr{'y' if count == 1 else 'ies'} ({format_size(size)}) from {cache.root}"
              + (f", stage {args.stage}" if args.stage else ""))
        return 0

    return handle


def _add_sweep(sub: argparse._SubParsersAction) -> Handler:
    p = sub.add_parser("sweep", help="run a grid of methods x datasets x checkpoints x shots x seeds on Ray",
                       description="Expand a sweep (a TOML file or --preset) into its grid, train learned methods on "
                                   "their auxiliary datasets first, run every cell as an idempotent job on a local "
                                   "Ray instance or a cluster (--ray-address), and write the leaderboard. Finished "
                                   "cells are never recomputed: run the same command again to resume.")
    p.add_argument("spec", nargs="?", metavar="SPEC.toml", help="the sweep file (or use --preset)")
    p.add_argument("--preset", help="a built-in sweep: tiny (synthetic benchmark, random weights, a minute or two), "
                                    "zsad-industrial, zsad-medical, zsad (the ZSAD protocols; need --data-dir)")
    p.add_argument("--data-dir", metavar="DIR", help="folder of the datasets ({data} in the spec's data roots)")
    p.add_argument("--ray-address", metavar="ADDRESS",
                   help="join an existing Ray cluster (e.g. 10.0.0.1:6379 or auto) instead of starting a local one")
    p.add_argument("--workers", type=_positive_int,
                   help="jobs at once on the local Ray instance (default: one per GPU, else what cores and memory fit)")
    p.add_argument("--memory-per-job", type=float, default=3.0, metavar="GB",
                   help="memory one CPU job needs, for the default number of workers (default: 3)")
    p.add_argument("--tracking-uri", help="MLflow tracking server for the workers (default: the sweep starts its own "
                                          "on 127.0.0.1 over results/mlflow.db)")
    p.add_argument("--retries", type=_non_negative_int, help="retries of a failed cell (default: the spec's, 2)")
    p.add_argument("--dry-run", action="store_true", help="print the grid (and what is finished) and exit")
    p.add_argument("--leaderboard", action="store_true",
                   help="write the sweep's leaderboard from the runs recorded so far and exit (works while it runs)")
    p.add_argument("--print-spec", action="store_true", help="print the preset's TOML (a starting point) and exit")

    def handle(args: argparse.Namespace) -> int:
        if bool(args.spec) == bool(args.preset):
            raise UsageError("give a sweep file (SPEC.toml) or --preset NAME (one of them)")
        from zsadbench import sweep

        if args.preset and args.preset not in sweep.PRESETS:
            raise UsageError(f"--preset {args.preset}: no such sweep preset ({', '.join(sweep.PRESETS)})")
        if args.print_spec:
            if not args.preset:
                raise UsageError("--print-spec prints a preset: pass --preset NAME")
            print(sweep.PRESETS[args.preset].strip())
            return 0
        spec = sweep.load_spec(args.spec or args.preset, data_dir=args.data_dir)
        if args.retries is not None:
            spec.retries = args.retries
        if args.leaderboard:
            path = sweep.refresh_leaderboard(spec, args.tracking_uri or sweep.default_store_uri())
            print(f"wrote {path}")
            return 0
        if args.dry_run:
            print(sweep.describe_grid(spec))
            return 0
        outcome = sweep.execute(spec, ray_address=args.ray_address, tracking_uri=args.tracking_uri,
                                workers=args.workers, memory_per_job_gb=args.memory_per_job)
        print(outcome.grid.markdown())
        for label, error in outcome.failed:
            print(f"failed: {label}: {error}")
        print(f"sweep {spec.name}: {outcome.grid.summary()}")
        print(f"runs in MLflow experiment {spec.experiment_name!r} (parent run {outcome.parent_run}); cells in "
              f"{spec.folder}")
        if outcome.leaderboard is not None:
            print(f"leaderboard: {outcome.leaderboard}")
        return 1 if outcome.failed else 0

    return handle


COMMANDS.append(_add_cache)
COMMANDS.append(_add_sweep)


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, Handler]]:
    """Returns the argument parser and the handler of each subcommand."""
    parser = argparse.ArgumentParser(prog="zsadbench", description="Benchmark harness for zero-shot anomaly detection")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages and show tracebacks")
    parser.add_argument("--version", action="version", version=f"zsadbench {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    handlers: dict[str, Handler] = {}
    for add in COMMANDS:
        before = set(sub.choices)
        handler = add(sub)
        for name in set(sub.choices) - before:
            handlers[name] = handler
    return parser, handlers


def _one_line_warnings(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                       line: str | None = None) -> str:
    return f"warning: {message}\n"


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``zsadbench`` console script; returns the exit status."""
    parser, handlers = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    args = _load_config_file(parser, argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s")
    # mlflow sets its own logger to INFO when it is imported (later, lazily); this keeps its setup messages out
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "DEBUG" if args.verbose else "WARNING")
    for chatty in ("alembic", "mlflow", "httpx", "huggingface_hub"):
        logging.getLogger(chatty).setLevel(logging.DEBUG if args.verbose else logging.WARNING)
    # each retry of a bounded MLflow request would print a line; zsadbench says once when the server is gone
    logging.getLogger("urllib3").setLevel(logging.DEBUG if args.verbose else logging.ERROR)
    if not args.verbose:
        warnings.formatwarning = _one_line_warnings
    try:
        return handlers[args.command](args)
    except (UsageError, ConfigError) as exc:
        print(f"zsadbench {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if args.verbose or not _is_user_error(exc):
            raise
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"zsadbench {args.command}: error: {message}", file=sys.stderr)
        return 2


def _is_user_error(exc: Exception) -> bool:
    """Returns whether ``exc`` is one of zsadbench's one-line errors about the user's input (no traceback)."""
    from zsadbench.tracking import TrackingError

    errors: tuple[type[Exception], ...] = (KeyError, ValueError, FileNotFoundError, TrackingError)
    if "zsadbench.checkpoints" in sys.modules:
        errors += (sys.modules["zsadbench.checkpoints"].CheckpointError,)
    return isinstance(exc, errors)


if __name__ == "__main__":
    sys.exit(main())
