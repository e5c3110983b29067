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

from genderid.errors import UserError

# What makes the demo short on a 2-core laptop; the user's overrides come after these and win.
DEMO_OVERRIDES = ("tune.num_samples=4", "tune.max_epochs=3", "tune.unfreeze_depth=[1, 3, 5]",
                  "tune.lr=[0.0003, 0.01]", "train.epochs=4")
SAMPLE_IMAGES = 4
SWEEP_RUN, TRAIN_RUN = "sweep", "train"  # the sweep and the train run inside each demo run's folder
DEFAULT_WORKDIR = "runs/demo"
LATEST_FILE = "latest.json"  # in the workdir: a best.json-style pointer to the latest finished demo run's model
RUN_FILE = "run.json"  # in each demo run's folder, written when it starts: what it was started with


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


class DemoError(UserError):
    """The demo cannot run as asked (a run to resume that is not there, a port Serve is not on)."""


def new_run_id(workdir: Path) -> str:
    """A fresh, sortable run id (UTC time); never one that exists in ``workdir``."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    run_id, n = stamp, 1
    while (workdir / run_id).exists():
        n += 1
        run_id = f"{stamp}-{n}"
    return run_id


def demo_runs(workdir: Path) -> list[str]:
    """The ids of the demo runs in ``workdir`` (folders with a ``run.json``), oldest first."""
    return sorted(p.name for p in workdir.iterdir() if (p / RUN_FILE).is_file()) if workdir.is_dir() else []


def _check_port(port: int) -> None:
    """Serve runs with one HTTP port per cluster: refuse a --port that the Serve already running does not use."""
    from ray.serve.context import _get_global_client  # Ray 2.60 has no public getter for the running HTTP options

    running = _get_global_client().http_config.port
    if running != port:
        raise DemoError(f"Serve is already running on this cluster with HTTP port {running}, so the demo cannot serve "
                        f"on --port {port}; pass --port {running}, or stop that Serve first (`serve shutdown`)")


def run_demo(workdir: str = DEFAULT_WORKDIR, celeba: Optional[str] = None, n: int = 800,
             config_path: Optional[str] = None, overrides: Sequence[str] = (), port: int = 8000,
             keep_serving: bool = False, serve_config: Optional[str] = None, resume: Optional[str] = None) -> dict:
    """Run the whole job as a fresh run in ``workdir`` (or continue the run ``resume``); returns the summary that is
    also printed and written to ``<workdir>/<run id>/summary.json``. Whatever the demo started (Ray, Serve) it stops
    again, also when a step fails or on Ctrl-C."""
    import ray

    from genderid.config import load_config, named_config_path
    from genderid.ray_runtime import init_ray
    from genderid.serve_deploy import DEFAULT_SERVE_CONFIG, load_serve_config

    workdir_path = Path(workdir).resolve()
    if resume is not None:
        if resume not in demo_runs(workdir_path):
            known = ", ".join(demo_runs(workdir_path)) or "none"
            raise DemoError(f"--resume {resume}: no such demo run in {workdir_path} (runs there: {known})")
        run_id = resume
    else:
        run_id = new_run_id(workdir_path)
    run_path = workdir_path / run_id
    data = str(workdir_path / "prepared")
    # Validate everything the user gave before any work starts.
    config = load_config(config_path or named_config_path("tiny"),
                         [*DEMO_OVERRIDES, *overrides, f"data.source={data}", f"storage.path={run_path}",
                          f"storage.name={SWEEP_RUN}"])
    serve_settings = load_serve_config(serve_config or DEFAULT_SERVE_CONFIG, port=port)  # checked up front
    owns_ray = not ray.is_initialized()
    init_ray()
    owns_serve = not _serve_running()
    finished, progress = False, {"deployed": False}
    try:
        if not owns_serve:
            _check_port(port)
        if resume is not None:
            print(f"[demo] resuming run {run_id}: its sweep and training continue from what {run_path} holds")
        else:
            run_path.mkdir(parents=True)
            (run_path / RUN_FILE).write_text(json.dumps({
                "run_id": run_id, "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "celeba": celeba, "n": n, "config": config_path, "overrides": list(overrides)}, indent=2))
            print(f"[demo] run {run_id}: every output of this run goes to {run_path}")
        summary = _run_steps(config, run_id, run_path, workdir_path, data, celeba, n, port, serve_settings, progress)
        finished = True
        if keep_serving:
            url = summary["endpoint"]
            try:  # the message inside: a Ctrl-C from the moment it shows is a clean stop, not an interruption
                print(f"[demo] serving at {url}: open {url}/ in a browser to try your own photos (POST /predict, "
                      f"POST /faces, GET /healthz, GET /metadata); Ctrl-C stops it", flush=True)
                while True:
                    time.sleep(3600)
            except KeyboardInterrupt:
                pass
        return summary
    finally:
        if not finished and (run_path / RUN_FILE).is_file():
            print(f"[demo] stopped before the end; run {run_id} can be continued with --resume {run_id}", flush=True)
        _shutdown(owns_serve, owns_ray, progress["deployed"])


def _run_steps(config, run_id: str, run_path: Path, workdir_path: Path, data: str, celeba: Optional[str], n: int,
               port: int, serve_settings: dict, progress: dict) -> dict:
    from genderid import runs, tracking
    from genderid.client import predict_url
    from genderid.evaluate import default_split, evaluate_checkpoint
    from genderid.prepare import prepare
    from genderid.report import summary as report_summary
    from genderid.search import describe
    from genderid.serve_deploy import APP_NAME, deploy, set_checkpoint, wait_until_running
    from genderid.train_ray import run_training
    from genderid.tune_ray import results_table, run_sweep

    started = time.perf_counter()
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

    train_config = _best_train_config(config, sweep_best, run_path)
    _step(4, f"train the best config ({describe(sweep_best['params'])}) for {train_config.train.epochs} epochs "
             "on Ray Train")
    best = run_training(train_config)
    print(f"[demo] best checkpoint: {best['checkpoint']}")

    _step(5, "evaluate the best checkpoint")
    split = default_split(data)
    report_dir = run_path / "report"
    report = evaluate_checkpoint(best["checkpoint"], data, str(report_dir), split, robustness=True)
    tracking.log_report(train_config, str(report_dir))
    print(f"[demo] {split} accuracy {report['accuracy']:.3f}, balanced accuracy {report['balanced_accuracy']:.3f}, "
          f"AUC {report['auc']:.3f} on {report['count']} images; ECE {report['calibration']['ece_before']:.3f} -> "
          f"{report['calibration']['ece_after']:.3f} calibrated, {report['calibration']['uncertain_share']:.1%} "
          f"uncertain; model card: {report_dir / 'MODEL_CARD.md'}")
    worst = report["robustness"]["worst"][0]
    print(f"[demo] under photo corruptions (severity 1-3) mean accuracy "
          f"{', '.join(f'{a:.3f}' for a in report['robustness']['mean_accuracy_by_severity'])}; largest drop: "
          f"{worst['corruption']} ({worst['accuracy_drop_points']:.1f} points); {report_dir / 'robustness.png'}")
    # The workdir's latest.json names this run's model: what serve_config.yaml serves by default.
    runs.write_best(str(workdir_path), "train", best["checkpoint"], params=sweep_best["params"], file=LATEST_FILE)
    latest_pointer = runs.path(str(workdir_path), LATEST_FILE)

    _step(6, "serve the best checkpoint from serve_config.yaml")
    progress["deployed"] = True  # from here on, the app is the demo's to delete
    deploy(set_checkpoint(serve_settings, latest_pointer, report=str(report_dir / "report.json")))
    wait_until_running(APP_NAME)
    url = f"http://127.0.0.1:{port}"
    print(f"[demo] endpoint: {url}/predict and {url}/faces; try it in a browser: {url}/")

    _step(7, f"{SAMPLE_IMAGES} images through HTTP")
    predictions = []
    for path, truth in _sample_images(data, run_path / "samples"):
        answer = predict_url(url, path)
        predictions.append({"image": str(path), "true": truth, **answer})
        print(f"[demo] {path.name}: {answer['label']} (p_male {answer['p_male']:.3f}"
              f"{', uncertain' if answer['uncertain'] else ''}; true: {truth})")

    summary = {
        "run_id": run_id,
        "best_config": {**sweep_best["params"], "batch_size": train_config.train.batch_size},
        "test_metrics": report_summary(report),
        "endpoint": url, "page": f"{url}/", "predictions": predictions,
        "outputs": {"data": data, "run": str(run_path), "sweep": sweep_dir,
                    "sweep_results": runs.path(sweep_dir, runs.RESULTS_FILE),
                    "train_run": runs.run_dir(str(run_path), TRAIN_RUN), "best_checkpoint": best["checkpoint"],
                    "best_json": runs.path(runs.run_dir(str(run_path), TRAIN_RUN), runs.BEST_FILE),
                    "latest_json": latest_pointer, "report": str(report_dir),
                    "model_card": str(report_dir / "MODEL_CARD.md"),
                    "mlflow": tracking.ui_command(config)},
        "seconds": round(time.perf_counter() - started, 1),
    }
    (run_path / "summary.json").write_text(json.dumps(summary, indent=2))
    print("\n[demo] summary\n" + json.dumps(summary, indent=2))
    print(f"[demo] done in {summary['seconds']} s; summary: {run_path / 'summary.json'}")
    return summary


def _shutdown(owns_serve: bool, owns_ray: bool, deployed: bool) -> None:
    """Stop only what the demo started: Serve (or only its app, in a Serve it joined), and Ray when it started it."""
    import ray
    from ray import serve

    from genderid.serve_deploy import APP_NAME

    if owns_serve:
        if deployed or _serve_running():
            serve.shutdown()
    elif deployed:
        serve.delete(APP_NAME)
    if owns_ray:
        ray.shutdown()
    print("[demo] shut down cleanly", flush=True)
