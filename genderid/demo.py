"""`genderid demo`: the main job end to end, on a local Ray (or the cluster in ``RAY_ADDRESS``).

synthetic CelebA-format data (or ``--celeba DIR``) -> prepare (Ray Data) -> a short Tune sweep (ASHA over lr x
unfreeze depth) -> train the best config (Ray Train) -> evaluate on the test split (report + plots) -> Serve from
``serve_config.yaml`` with the best checkpoint -> a few images through HTTP -> a summary -> clean shutdown.
Every step is the same code that ``genderid prepare/tune/train/evaluate`` and ``serve run`` use.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional, Sequence

# What makes the demo short on a 2-core laptop; the user's overrides come after these and win.
DEMO_OVERRIDES = ("tune.num_samples=4", "tune.max_epochs=3", "tune.unfreeze_depth=[1, 3, 5]",
                  "tune.lr=[0.0003, 0.01]", "train.epochs=4")
SAMPLE_IMAGES = 4
SWEEP_RUN, TRAIN_RUN = "sweep", "train"  # the demo's run names under its workdir


def _step(number: int, text: str) -> None:
    print(f"\n[demo] step {number}/7: {text}", flush=True)


def _serve_running() -> bool:
    import ray
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

    try:
        ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
        return True
    except ValueError:
        return False


def _best_train_config(base, sweep_best: dict, workdir: Path):
    """The demo's config with the sweep winner's searched values, as a fresh Train run under ``workdir``."""
    from genderid.config import config_from_dict
    from genderid.search import apply_params

    values = apply_params(base.to_dict(), sweep_best["params"])
    values["storage"] = {"path": str(workdir), "name": TRAIN_RUN}
    return config_from_dict(values)


def _sample_images(source: str, out: Path) -> list[tuple[Path, str]]:
    """A few test-split images written as files (what a user would send), with their true labels."""
    import numpy as np

    from genderid import shards

    table = shards.read_table(source)
    split = 2 if int(np.sum(table["split"].to_numpy() == 2)) else 1
    rows = table.filter(table["split"].to_numpy() == split).slice(0, SAMPLE_IMAGES)
    out.mkdir(parents=True, exist_ok=True)
    samples = []
    for image_id, data, male in zip(rows["image_id"].to_pylist(), rows["image"].to_pylist(),
                                    rows["male"].to_pylist()):
        path = out / image_id
        path.write_bytes(data)
        samples.append((path, "male" if male else "female"))
    return samples


def run_demo(workdir: str = "runs/demo", celeba: Optional[str] = None, n: int = 800, config_path: Optional[str] = None,
             overrides: Sequence[str] = (), port: int = 8000, keep_serving: bool = False,
             serve_config: Optional[str] = None) -> dict:
    """Run the whole job; returns the summary that is also printed and written to ``workdir/summary.json``."""
    import ray

    from genderid import runs
    from genderid.client import predict_url
    from genderid.config import load_config, named_config_path
    from genderid.evaluate import default_split, evaluate_checkpoint
    from genderid.prepare import prepare
    from genderid.ray_runtime import init_ray
    from genderid.report import summary as report_summary
    from genderid.search import describe
    from genderid.serve_deploy import (APP_NAME, DEFAULT_SERVE_CONFIG, deploy, load_serve_config, set_checkpoint,
                                       wait_until_running)
    from genderid.train_ray import run_training
    from genderid.tune_ray import results_table, run_sweep

    started = time.perf_counter()
    workdir_path = Path(workdir).resolve()
    data = str(workdir_path / "prepared")
    # Validate everything the user gave before any work starts.
    config = load_config(config_path or named_config_path("tiny"),
                         [*DEMO_OVERRIDES, *overrides, f"data.source={data}", f"storage.path={workdir_path}",
                          f"storage.name={SWEEP_RUN}"])
    serve_settings = load_serve_config(serve_config or DEFAULT_SERVE_CONFIG, port=port)  # checked up front
    owns_ray = not ray.is_initialized()
    init_ray()
    owns_serve = not _serve_running()

    _step(1, "data")
    if celeba is None:
        from genderid.synth import write_synthetic_celeba

        celeba = str(write_synthetic_celeba(workdir_path / "celeba-synthetic", n=n, seed=0, size=(64, 64)))
        print(f"[demo] {n} synthetic CelebA-format images: {celeba}")
    _step(2, "prepare on Ray Data")
    manifest = prepare(celeba, data)
    print(f"[demo] prepared {manifest['rows']} rows: {data}")

    _step(3, f"Tune sweep: {config.tune.num_samples} trials, ASHA over lr x unfreeze depth")
    rows, sweep_best = run_sweep(config)
    sweep_dir = runs.run_dir_of(config)
    print(results_table(rows, config.tune.metric))

    train_config = _best_train_config(config, sweep_best, workdir_path)
    _step(4, f"train the best config ({describe(sweep_best['params'])}) for {train_config.train.epochs} epochs "
             "on Ray Train")
    best = run_training(train_config)
    print(f"[demo] best checkpoint: {best['checkpoint']}")

    _step(5, "evaluate the best checkpoint")
    split = default_split(data)
    report_dir = workdir_path / "report"
    report = evaluate_checkpoint(best["checkpoint"], data, str(report_dir), split)
    print(f"[demo] {split} accuracy {report['accuracy']:.3f}, balanced accuracy {report['balanced_accuracy']:.3f}, "
          f"AUC {report['auc']:.3f} on {report['count']} images; ECE {report['calibration']['ece_before']:.3f} -> "
          f"{report['calibration']['ece_after']:.3f} calibrated, {report['calibration']['uncertain_share']:.1%} "
          f"uncertain; model card: {report_dir / 'MODEL_CARD.md'}")

    _step(6, "serve the best checkpoint from serve_config.yaml")
    best_pointer = runs.path(runs.run_dir(str(workdir_path), TRAIN_RUN), runs.BEST_FILE)
    deploy(set_checkpoint(serve_settings, best_pointer, report=str(report_dir / "report.json")))
    wait_until_running(APP_NAME)
    url = f"http://127.0.0.1:{port}"
    print(f"[demo] endpoint: {url}/predict and {url}/faces; try it in a browser: {url}/")

    _step(7, f"{SAMPLE_IMAGES} images through HTTP")
    predictions = []
    for path, truth in _sample_images(data, workdir_path / "samples"):
        answer = predict_url(url, path)
        predictions.append({"image": str(path), "true": truth, **answer})
        print(f"[demo] {path.name}: {answer['label']} (p_male {answer['p_male']:.3f}"
              f"{', uncertain' if answer['uncertain'] else ''}; true: {truth})")

    summary = {
        "best_config": {**sweep_best["params"], "batch_size": train_config.train.batch_size},
        "test_metrics": report_summary(report),
        "endpoint": url, "predictions": predictions,
        "outputs": {"data": data, "sweep": sweep_dir, "sweep_results": runs.path(sweep_dir, runs.RESULTS_FILE),
                    "train_run": runs.run_dir(str(workdir_path), TRAIN_RUN), "best_checkpoint": best["checkpoint"],
                    "best_json": best_pointer, "report": str(report_dir),
                    "model_card": str(report_dir / "MODEL_CARD.md")},
        "seconds": round(time.perf_counter() - started, 1),
    }
    (workdir_path / "summary.json").write_text(json.dumps(summary, indent=2))
    print("\n[demo] summary\n" + json.dumps(summary, indent=2))
    print(f"[demo] done in {summary['seconds']} s; summary: {workdir_path / 'summary.json'}")
    if keep_serving:
        print(f"[demo] serving at {url}: open {url}/ in a browser to try your own photos (POST /predict, "
              f"POST /faces, GET /healthz, GET /metadata); Ctrl-C stops it", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
    _shutdown(owns_serve, owns_ray)
    return summary


def _shutdown(owns_serve: bool, owns_ray: bool) -> None:
    """Stop only what the demo started: its app (or Serve), and Ray when it started it."""
    import ray
    from ray import serve

    from genderid.serve_deploy import APP_NAME

    if owns_serve:
        serve.shutdown()
    else:
        serve.delete(APP_NAME)
    if owns_ray:
        ray.shutdown()
    print("[demo] shut down cleanly", flush=True)
