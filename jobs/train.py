"""Ray Job entry point for training: `ray job submit --working-dir . -- python jobs/train.py --config FILE [k=v ...]`.

The same code path as `genderid train`.
"""
import sys

from genderid.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
