"""The ``genderid`` command line: parse -> build -> run -> report. Heavy imports happen inside each command."""
from __future__ import annotations

import argparse
import json
import sys
from typing import Optional, Sequence


def _size(text: str) -> tuple[int, int]:
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT, e.g. 178x218, got {text!r}") from None
    return width, height


def cmd_synth(args: argparse.Namespace) -> int:
    from genderid.synth import write_synthetic_celeba

    out = write_synthetic_celeba(args.out, n=args.n, seed=args.seed, size=args.size)
    print(f"wrote {args.n} synthetic images ({args.size[0]}x{args.size[1]}) in the CelebA layout to {out}")
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    from genderid.prepare import prepare

    manifest = prepare(args.celeba, args.out, recipe=args.split, per_class=args.per_class,
                       test_per_class=args.test_per_class, seed=args.seed, rows_per_shard=args.rows_per_shard,
                       align=args.align)
    counts = ", ".join(f"{name} {c['total']} ({c['male']} male)" for name, c in manifest["counts"].items())
    no_face = f"; no face found in {manifest['aligned']['no_face']['count']}" if args.align else ""
    print(f"prepared {manifest['rows']} rows in {len(manifest['files'])} shard(s) at {args.out}: {counts}; "
          f"skipped {manifest['skipped']['count']} unreadable image(s){no_face}")
    return 0


def _config(args: argparse.Namespace):
    from genderid.config import load_config

    return load_config(args.config, args.overrides)


def cmd_train(args: argparse.Namespace) -> int:
    from genderid import tracking
    from genderid.train_ray import run_training

    config = _config(args)
    best = run_training(config)
    m = best["metrics"]
    print(f"best checkpoint (epoch {m.get('epoch')}, val_loss {m.get('val_loss'):.4f}, "
          f"val_accuracy {m.get('val_accuracy'):.4f}): {best['checkpoint']}")
    if not args.no_evaluate:
        from genderid.evaluate import default_split, evaluate_checkpoint

        out = args.report_dir or f"{best['checkpoint'].rstrip('/')}-report"
        report = evaluate_checkpoint(best["checkpoint"], config.data.source, out, default_split(config.data.source))
        tracking.log_report(config, out)
        print(f"{report['split']} accuracy {report['accuracy']:.4f}, AUC {report['auc']:.4f}; report: {out}")
    if tracking.ui_command(config):
        print(f"MLflow: {tracking.ui_command(config)}")
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    from genderid import tracking
    from genderid.tune_ray import results_table, run_sweep

    config = _config(args)
    rows, best = run_sweep(config)
    print(results_table(rows, config.tune.metric))
    print(f"best trial checkpoint: {best['checkpoint']}")
    if tracking.ui_command(config):
        print(f"MLflow: {tracking.ui_command(config)}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from genderid.evaluate import evaluate_checkpoint
    from genderid.runtime import RuntimeSettings

    settings = RuntimeSettings(args.runtime, args.precision)
    report = evaluate_checkpoint(args.checkpoint, args.data, args.out, split=args.split, settings=settings,
                                 robustness=args.robustness, flip_tta=args.flip_tta)
    compared = report["runtime"]
    if "accuracy_change_points" in compared:
        name = settings.name + (" + flip TTA" if args.flip_tta else "")
        print(f"{name}: accuracy {compared['accuracy']:.4f} vs torch fp32 "
              f"{compared['torch_fp32_accuracy']:.4f} ({compared['accuracy_change_points']:+.2f} points); "
              "labels equal to torch fp32 on "
              f"{compared['labels_equal_to_torch_fp32']:.2%} of images")
    calibration = report["calibration"]
    print(f"{report['split']} split: accuracy {report['accuracy']:.4f}, balanced accuracy "
          f"{report['balanced_accuracy']:.4f}, AUC {report['auc']:.4f} on {report['count']} images; "
          f"ECE {calibration['ece_before']:.4f} before / {calibration['ece_after']:.4f} after calibration "
          f"(T = {calibration['temperature']:.3f}), {calibration['uncertain_share']:.1%} uncertain; "
          f"report and MODEL_CARD.md: {args.out}")
    if "robustness" in report:
        worst = report["robustness"]["worst"][0]
        block = report["robustness"]
        means = ", ".join(f"{a:.4f}" for a in block["mean_accuracy_by_severity"])
        print(f"robustness: mean accuracy over corruptions {means} at severities "
              f"{', '.join(map(str, block['severities']))}; largest drop: {worst['corruption']} "
              f"({worst['accuracy_drop_points']:.1f} points)")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from genderid import runtime
    from genderid.checkpoint import load_checkpoint

    settings = runtime.RuntimeSettings("onnxruntime", args.precision)
    loaded = load_checkpoint(args.checkpoint)
    if settings.precision == "int8" and not args.data:
        raise runtime.RuntimeSettingError("--precision int8 calibrates on val images: add --data PREPARED")
    calibration = runtime.val_batches(args.data, loaded.preprocessing) if args.data else None
    model = runtime.build(loaded, settings, calibration_batches=calibration)
    location = runtime.export_location(loaded.source, loaded.meta["weights_sha256"], settings)
    print(f"{settings.name} model of {loaded.source} ({len(model) / 1e6:.1f} MB): {location}; serve it with "
          f"args runtime: onnxruntime, precision: {settings.precision}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from pathlib import Path

    if args.annotate and not args.faces:
        from genderid.errors import UserError

        raise UserError("--annotate draws the faces that --faces finds; add --faces")
    if args.faces:
        return _predict_faces(args)
    if args.url:
        from genderid.client import predict_url

        for path in args.images:
            print(json.dumps({"image": path, **predict_url(args.url, path)}))
        return 0
    from genderid.predictor import Predictor

    predictor = Predictor.from_checkpoint(args.checkpoint)
    images = [Path(p).read_bytes() for p in args.images]
    for path, prediction in zip(args.images, predictor.predict(images)):
        print(json.dumps({"image": path, **prediction.to_dict(predictor.model_version)}))
    return 0


def _predict_faces(args: argparse.Namespace) -> int:
    """Every face of each photo, through the endpoint (--url) or locally (--checkpoint); --annotate draws them."""
    from pathlib import Path

    if args.url:
        from genderid.client import predict_url

        answer = lambda path: predict_url(args.url, path, route="faces")  # noqa: E731
    else:
        from genderid.predictor import Predictor

        predictor = Predictor.from_checkpoint(args.checkpoint)
        answer = lambda path: predictor.predict_faces(Path(path).read_bytes())  # noqa: E731
    for path in args.images:
        result = answer(path)
        print(json.dumps({"image": path, **result}))
        if args.annotate:
            from genderid.annotate import annotate_file

            out = annotate_file(path, result["faces"], args.annotate, several=len(args.images) > 1)
            print(f"annotated: {out}", file=sys.stderr)
    return 0


def cmd_runs(args: argparse.Namespace) -> int:
    import time

    from genderid.runs import list_runs

    rows = list_runs(args.storage)
    if args.json:
        print(json.dumps(rows, indent=2, default=float))
        return 0
    if not rows:
        print(f"no runs or sweeps under {args.storage}")
        return 0

    def number(value) -> str:
        return "-" if value is None else f"{value:.4f}"

    table = [("name", "kind", "when (UTC)", "val_accuracy", "val_loss", "finished", "best checkpoint")]
    for row in rows:
        when = time.strftime("%Y-%m-%d %H:%M", time.gmtime(row["when"])) if row["when"] else "-"
        table.append((row["name"], row["kind"], when, number(row["val_accuracy"]), number(row["val_loss"]),
                      "yes" if row["finished"] else "no", row["checkpoint"] or row.get("error") or "-"))
    widths = [max(len(str(line[i])) for line in table) for i in range(len(table[0]) - 1)]
    for line in table:
        print("  ".join(str(cell).ljust(width) for cell, width in zip(line, widths)) + "  " + str(line[-1]))
    return 0


def cmd_config_show(args: argparse.Namespace) -> int:
    from genderid.config import named_config_path

    print(named_config_path(args.name).read_text(), end="")
    return 0


def cmd_serve_config(args: argparse.Namespace) -> int:
    from pathlib import Path

    from genderid.errors import UserError
    from genderid.serve_deploy import DEFAULT_SERVE_CONFIG

    out = Path(args.out)
    if out.exists() and not args.force:
        raise UserError(f"{out} exists; choose another --out or pass --force to overwrite it")
    out.write_text(DEFAULT_SERVE_CONFIG.read_text())
    print(f"wrote {out}: set applications[0].args.checkpoint, then `serve run {out}`")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from genderid.demo import run_demo

    run_demo(workdir=args.workdir, celeba=args.celeba, n=args.n, config_path=args.config, overrides=args.overrides,
             port=args.port, keep_serving=args.keep_serving, serve_config=args.serve_config, resume=args.resume)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from genderid.config import StorageConfig
    from genderid.demo import DEFAULT_WORKDIR

    parser = argparse.ArgumentParser(prog="genderid", description="Train, tune and serve a CelebA gender classifier "
                                                                   "on Ray.")
    parser.add_argument("--verbose", action="store_true",
                        help="show Ray's own logs on the console too (also GENDERID_LOG=debug)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = commands.add_parser("demo", help="the main job end to end on synthetic (or --celeba) data")
    demo.add_argument("--celeba", help="a CelebA folder to use instead of synthetic data")
    demo.add_argument("--workdir", default=DEFAULT_WORKDIR,
                      help=f"where every output goes (default: {DEFAULT_WORKDIR}; each run in a folder of its own)")
    demo.add_argument("--n", type=int, default=800, help="synthetic images to make (default: 800)")
    demo.add_argument("--config", help="config file or named config to start from (default: tiny)")
    demo.add_argument("overrides", nargs="*", metavar="key=value",
                      help="dotted overrides on top of the demo's, e.g. tune.num_samples=8 train.epochs=6")
    demo.add_argument("--port", type=int, default=8000, help="Serve HTTP port (default: 8000)")
    demo.add_argument("--keep-serving", action="store_true", help="keep the endpoint up until Ctrl-C")
    demo.add_argument("--resume", metavar="RUN_ID",
                      help="continue an earlier demo run in the workdir (default: every demo run is a fresh one)")
    demo.add_argument("--serve-config", help="Serve config to deploy (default: the repository's serve_config.yaml)")
    demo.set_defaults(handler=cmd_demo)

    synth = commands.add_parser("synth", help="write a synthetic data set in the official CelebA layout")
    synth.add_argument("out")
    synth.add_argument("--n", type=int, default=1000, help="number of images (default: 1000)")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--size", type=_size, default=(178, 218), help="WIDTHxHEIGHT (default: 178x218)")
    synth.set_defaults(handler=cmd_synth)

    prepare = commands.add_parser("prepare", help="CelebA folder (local or s3://) -> Parquet shards")
    prepare.add_argument("--celeba", required=True, help="CelebA folder or s3:// prefix")
    prepare.add_argument("--out", required=True, help="destination folder or s3:// prefix")
    from genderid.celeba import SPLIT_RECIPES

    prepare.add_argument("--split", choices=SPLIT_RECIPES, default="official",
                         help="official: list_eval_partition.txt; balanced: the seed study's recipe; selection: "
                              "val = 10%% of the train identities (model selection), test = the official val and "
                              "test (reported only)")
    prepare.add_argument("--per-class", type=int, default=20000, help="balanced: train+val images per class")
    prepare.add_argument("--test-per-class", type=int, default=500, help="balanced: test images per class")
    prepare.add_argument("--seed", type=int, default=0, help="balanced, selection: seed of the split")
    prepare.add_argument("--rows-per-shard", type=int, default=2000)
    prepare.add_argument("--align", action="store_true",
                         help="detect and align each image's largest face to CelebA's crop (for tight crops or "
                              "photos); images without a face are counted in the manifest and left out")
    prepare.set_defaults(handler=cmd_prepare)

    train = commands.add_parser("train", help="Ray Train run; writes best.json and a test report")
    train.add_argument("--config", required=True, help="YAML config file, or a named config: tiny, cpu, ...")
    train.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. train.lr=3e-4")
    train.add_argument("--no-evaluate", action="store_true", help="skip evaluating the best checkpoint")
    train.add_argument("--report-dir", help="where the evaluation report goes (default: beside the checkpoint)")
    train.set_defaults(handler=cmd_train)

    tune = commands.add_parser("tune", help="Ray Tune sweep over lr x unfreeze depth; writes results.csv, best.json")
    tune.add_argument("--config", required=True, help="YAML config file, or a named config: tiny, cpu, ...")
    tune.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. tune.num_samples=8")
    tune.set_defaults(handler=cmd_tune)

    from genderid.runtime import PRECISIONS, RUNTIMES

    evaluate = commands.add_parser("evaluate", help="report.json + plots for a checkpoint on a prepared split")
    evaluate.add_argument("--checkpoint", required=True, help="checkpoint directory, s3:// URI or best.json")
    evaluate.add_argument("--data", required=True, help="prepared data set (path or s3://)")
    evaluate.add_argument("--out", required=True, help="output folder (path or s3://)")
    evaluate.add_argument("--split", choices=("test", "val", "train"), default="test")
    evaluate.add_argument("--runtime", choices=RUNTIMES, default="torch",
                          help="what runs the model; other than torch fp32, the report compares it with torch fp32")
    evaluate.add_argument("--precision", choices=PRECISIONS, default="fp32",
                          help="int8: onnxruntime, calibrated on --data's val images when not built yet")
    evaluate.add_argument("--flip-tta", action="store_true",
                          help="average each image with its mirror image; the report compares it with torch fp32")
    evaluate.add_argument("--robustness", action="store_true",
                          help="also score the split under photo corruptions (blur, JPEG, brightness, contrast, "
                               "noise, rotation, shift, downscaling, grayscale) at severities 1-3")
    evaluate.set_defaults(handler=cmd_evaluate)

    export = commands.add_parser("export", help="build a checkpoint's ONNX Runtime model (int8: calibrated on val "
                                                "images), stored beside the checkpoint for serving")
    export.add_argument("--checkpoint", required=True, help="checkpoint directory, s3:// URI or best.json")
    export.add_argument("--data", help="prepared data set whose val images calibrate int8")
    export.add_argument("--precision", choices=PRECISIONS, default="int8")
    export.set_defaults(handler=cmd_export)

    config = commands.add_parser("config", help="the named configs that ship with genderid")
    config_commands = config.add_subparsers(dest="config_command", required=True, metavar="SUBCOMMAND")
    show = config_commands.add_parser("show", help="print a named config (tiny, cpu, celeba-vgg16, ...)")
    show.add_argument("name")
    show.set_defaults(handler=cmd_config_show)

    serve_config = commands.add_parser("serve-config", help="write a starting serve_config.yaml (the shipped one)")
    serve_config.add_argument("--out", default="serve_config.yaml", help="where (default: ./serve_config.yaml)")
    serve_config.add_argument("--force", action="store_true", help="overwrite an existing file")
    serve_config.set_defaults(handler=cmd_serve_config)

    runs = commands.add_parser("runs", help="the train runs and sweeps under a storage path, newest first")
    default_storage = StorageConfig.path  # the config's own default for storage.path
    runs.add_argument("storage", nargs="?", default=default_storage,
                      help=f"storage.path, local or s3:// (default: {default_storage})")
    runs.add_argument("--json", action="store_true", help="one JSON list, for scripts")
    runs.set_defaults(handler=cmd_runs)

    predict = commands.add_parser("predict", help="label + probability per image")
    predict.add_argument("images", nargs="+", metavar="IMAGE")
    source = predict.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="checkpoint directory, s3:// URI or best.json (local, no Serve)")
    source.add_argument("--url", help="the Serve endpoint, e.g. http://127.0.0.1:8000")
    predict.add_argument("--faces", action="store_true",
                         help="IMAGEs are photos: find every face (box, label, p_male, uncertain), as POST /faces")
    predict.add_argument("--annotate", metavar="OUT.jpg",
                         help="with --faces: write the photo with its faces drawn (several photos: OUT-<name>.jpg)")
    predict.set_defaults(handler=cmd_predict)
    return parser


def user_errors() -> tuple[type[BaseException], ...]:
    """Errors whose message is the whole story for the user: printed on one line, without a traceback."""
    from genderid.errors import UserError

    return (UserError, FileNotFoundError)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.verbose:
        from genderid.console import set_verbose

        set_verbose()
    try:
        return args.handler(args)
    except user_errors() as exc:
        print(f"genderid {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: what the command started has been stopped on the way out
        print(f"genderid {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
