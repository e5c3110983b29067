"""Ray Job entry point for evaluation: `... -- python jobs/evaluate.py --checkpoint CKPT --data DATA --out DIR`."""
import sys

from genderid.cli import main

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
