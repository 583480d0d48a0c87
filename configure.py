"""`python configure.py ...` is the same as `simpletuner configure ...`."""

import sys

from simpletuner.cli import main

if __name__ == "__main__":
    sys.exit(main(["configure", *sys.argv[1:]]))
