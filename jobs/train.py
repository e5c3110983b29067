"""Ray Job entry point for training: `ray job submit --working-dir . -- python jobs/train.py --config FILE [k=v ...]`.

The same code path as `genderid train`.
"""
import sys
from pathlib import Path

# Under `ray job submit --working-dir .` the package is not installed: import it from the uploaded tree.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from genderid.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
