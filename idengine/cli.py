"""The `idengine` command: parse arguments, call one function, say where the outputs went.

    idengine prepare --config C.yaml --out runs/prepared [key=value ...]
    idengine cv      --prepared runs/prepared --out runs/cv [--config C.yaml] [key=value ...]
    idengine tune    --prepared runs/prepared --out runs/tune [--config C.yaml] [key=value ...]
    idengine train   --prepared runs/prepared --cv runs/cv --out runs/model [--config C.yaml] [key=value ...]
    idengine predict --model runs/model --sequences reads.fasta.gz --out calls.csv
    idengine report  RUN_DIR
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from idengine.config_io import load_config

logger = logging.getLogger("idengine")


def _add_common(parser: argparse.ArgumentParser, out: bool = True) -> None:
    parser.add_argument("--config", help="YAML config (sections data, model, lora, train, tune, calibrate, predict)")
    if out:
        parser.add_argument("--out", required=True, help="output directory (replaced only when complete)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides such as train.lr=3e-4")


def _add_ray(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--address", default=None,
                        help="Ray cluster address (default: RAY_ADDRESS, or start a local Ray)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="idengine", description="Species identification from DNA barcodes.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="load, clean, split and report a labelled barcode set")
    _add_common(p)
    p = sub.add_parser("cv", help="cross-validate one config over the prepared folds")
    p.add_argument("--prepared", required=True, help="output directory of `idengine prepare`")
    _add_common(p)
    _add_ray(p)
    p = sub.add_parser("tune", help="Ray Tune + Optuna search over the cross-validated objective")
    p.add_argument("--prepared", required=True)
    p.add_argument("--resume", action="store_true", help="continue an interrupted experiment in --out")
    _add_common(p)
    _add_ray(p)
    p = sub.add_parser("train", help="train the final model, calibrate it, test it once and export it")
    p.add_argument("--prepared", required=True)
    p.add_argument("--cv", required=True, help="output directory of `idengine cv` (out-of-fold logits)")
    p.add_argument("--merge", action="store_true", help="also export a merged full model (gigabytes for 2.5B)")
    _add_common(p)
    _add_ray(p)
    p = sub.add_parser("predict", help="identify the sequences of a FASTA with an exported model")
    p.add_argument("--model", required=True, help="directory written by `idengine train`")
    p.add_argument("--sequences", required=True, help="FASTA or FASTA.gz")
    p.add_argument("--out", required=True, help="CSV of calls")
    _add_common(p, out=False)
    _add_ray(p)
    p = sub.add_parser("report", help="turn a prepare/cv/tune/train directory into one HTML page")
    p.add_argument("run_dir")
    p.add_argument("--out", default=None, help="HTML file (default RUN_DIR/report.html)")
    p.add_argument("--label-map", default=None, help="label_map.json to name species (default: found near RUN_DIR)")
    return parser


def _check_inputs(args: argparse.Namespace) -> None:
    """Refuse input directories and files that are not there before Ray starts (seconds; minutes on a cluster).

    The recipes check them again, and check their content; this only spares a user the wait for a typo.
    """
    from idengine import layout as C
    from idengine.data.fasta import check_fasta_start
    from idengine.data.prepared import read_prepared

    if getattr(args, "prepared", None):
        read_prepared(args.prepared)
    if getattr(args, "cv", None):
        missing = [f for f in (C.METRICS_FILE, C.OOF_FILE) if not (Path(args.cv) / f).is_file()]
        if missing:
            raise FileNotFoundError(f"--cv {args.cv}: not a cv directory (no {' or '.join(missing)}); give the "
                                    "output directory of `idengine cv`")
    if args.command == "predict":
        if not Path(args.model).is_dir():
            raise FileNotFoundError(f"--model {args.model}: no such directory; give the output directory of "
                                    "`idengine train`")
        check_fasta_start(args.sequences)


def run(args: argparse.Namespace) -> Path:
    """Dispatch one parsed command; returns the main output path."""
    if args.command == "report":
        from idengine.report.run import write_report

        return write_report(args.run_dir, args.out, label_map=args.label_map)
    config = load_config(args.config, args.overrides)
    if args.command == "prepare":
        from idengine.recipes.prepare import prepare_dataset

        return prepare_dataset(config, args.out)
    _check_inputs(args)
    from idengine.recipes.runtime import init_ray

    init_ray(args.address)
    if args.command == "cv":
        from idengine.recipes.cv import run_cv

        return run_cv(config, args.prepared, args.out)
    if args.command == "tune":
        from idengine.recipes.tune import run_tune

        return run_tune(config, args.prepared, args.out, resume=args.resume)
    if args.command == "train":
        from idengine.recipes.train import train_final

        return train_final(config, args.prepared, args.cv, args.out, merge=args.merge)
    if args.command == "predict":
        from idengine.deploy.predict import predict_file

        return predict_file(args.model, args.sequences, args.out, config.predict)
    raise ValueError(f"unknown command {args.command}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    from idengine.errors import InputError

    try:
        out = run(args)
    except (InputError, ValueError, FileNotFoundError) as err:
        logger.error("%s", err)
        return 2
    logger.info("%s: outputs in %s", args.command, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
