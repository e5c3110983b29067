"""Model, transforms, engine, metrics, checkpoint and predictor must work with Ray unimportable."""
import subprocess
import sys
import textwrap

PURE_MODULES = ["genderid.config", "genderid.preprocess", "genderid.model", "genderid.engine", "genderid.metrics",
                "genderid.checkpoint", "genderid.predictor", "genderid.batches", "genderid.celeba", "genderid.synth",
                "genderid.shards", "genderid.storage", "genderid.local_train", "genderid.cli",
                "genderid.http_inputs", "genderid.client", "genderid.runs", "genderid.search", "genderid.errors",
                "genderid.train_hooks", "genderid.batching", "genderid.loadgen", "genderid.calibration",
                "genderid.faces", "genderid.scenes", "genderid.annotate", "genderid.model_card", "genderid.report",
                "genderid.tracking", "genderid.progress", "genderid.runtime", "genderid.feature_cache",
                "genderid.corruptions", "genderid.robustness"]

SCRIPT = textwrap.dedent("""
    import importlib, importlib.abc, sys

    class BlockRay(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "ray" or name.startswith("ray."):
                raise ImportError(f"ray is blocked in this test: {name}")

    sys.meta_path.insert(0, BlockRay())
    try:
        import ray  # noqa: F401
        raise SystemExit("the blocker does not work")
    except ImportError:
        pass
    for name in MODULES:
        importlib.import_module(name)

    import io, tempfile
    import torch
    from PIL import Image
    from genderid import checkpoint, engine, model, predictor, preprocess
    net = model.GenderNet(width=0.0625, batch_norm=True, unfreeze_depth=2)
    images = torch.randn(4, 3, 32, 32)
    engine.train_one_epoch(net, [{"image": images, "male": torch.tensor([0, 1, 0, 1])}],
                           engine.make_optimizer(net, "adam", 1e-3))
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint.save_checkpoint(tmp, net, preprocessing=preprocess.Preprocessing(image_size=(32, 32)))
        buffer = io.BytesIO()
        Image.new("RGB", (40, 40)).save(buffer, format="PNG")
        loaded = predictor.Predictor.from_checkpoint(tmp)
        assert loaded.predict_faces(buffer.getvalue()) == {"faces": [], "image_size": [40, 40]}  # dlib, no Ray
        print(loaded.predict([buffer.getvalue()])[0].label)
    assert not any(m == "ray" or m.startswith("ray.") for m in sys.modules)
""")


def test_pure_modules_run_without_ray():
    script = f"MODULES = {PURE_MODULES!r}\n" + SCRIPT
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() in ("male", "female")
