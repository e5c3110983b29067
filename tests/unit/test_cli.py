"""The `genderid` commands that need no Ray: synth, predict --checkpoint, and how input errors are reported."""
import json
import subprocess
import sys

import pytest
import torch

from genderid.checkpoint import save_checkpoint
from genderid.cli import main
from genderid.model import GenderNet
from genderid.predictor import Predictor
from genderid.preprocess import Preprocessing


def test_synth_writes_the_celeba_layout(tmp_path, capsys):
    assert main(["synth", str(tmp_path / "celeba"), "--n", "20", "--size", "40x48"]) == 0
    assert len(list((tmp_path / "celeba" / "img_align_celeba").glob("*.jpg"))) == 20
    assert (tmp_path / "celeba" / "list_attr_celeba.txt").is_file() and "wrote 20" in capsys.readouterr().out


def test_predict_with_a_checkpoint_prints_one_json_line_per_image(tmp_path):
    main(["synth", str(tmp_path / "celeba"), "--n", "4", "--size", "40x48"])
    torch.manual_seed(0)
    checkpoint = save_checkpoint(tmp_path / "ckpt", GenderNet(width=0.0625, batch_norm=True).eval(),
                                 preprocessing=Preprocessing(image_size=(32, 32)))
    images = sorted(str(p) for p in (tmp_path / "celeba" / "img_align_celeba").glob("*.jpg"))[:2]
    run = subprocess.run([sys.executable, "-m", "genderid", "predict", *images, "--checkpoint", str(checkpoint)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    lines = [json.loads(line) for line in run.stdout.strip().splitlines()]
    expected = Predictor.from_checkpoint(str(checkpoint)).predict([open(p, "rb").read() for p in images])
    assert [line["image"] for line in lines] == images
    assert [line["label"] for line in lines] == [p.label for p in expected]


def test_predict_needs_a_checkpoint_or_a_url(capsys):
    with pytest.raises(SystemExit):
        main(["predict", "face.jpg"])
    assert "--checkpoint" in capsys.readouterr().err


def test_input_errors_exit_2_with_one_line(tmp_path, capsys):
    assert main(["predict", str(tmp_path / "x.jpg"), "--checkpoint", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("genderid predict: error:") and "nowhere" in err and "Traceback" not in err
    assert main(["predict", "x.jpg", "--url", "http://127.0.0.1:9"]) == 2  # unreadable image: no such file
