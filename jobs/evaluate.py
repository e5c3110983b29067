"""Ray Job entry point for evaluation: `... -- python jobs/evaluate.py --checkpoint CKPT --data DATA --out DIR`."""
import sys
from pathlib import Path

# Under `ray job submit --working-dir .` the package is not installed: import it from the uploaded tree.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from genderid.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
