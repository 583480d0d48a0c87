"""`python train.py ...` is the same as `simpletuner train ...`."""

import sys

from simpletuner.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
