"""Ray Job entry point for sweeps: `ray job submit --working-dir . -- python jobs/tune.py --config FILE [k=v ...]`.

The same code path as `genderid tune`.
"""
import sys
from pathlib import Path

# Under `ray job submit --working-dir .` the package is not installed: import it from the uploaded tree.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from genderid.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["tune", *sys.argv[1:]]))
