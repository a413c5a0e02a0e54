"""`python -m benchmarks COMMAND [ARGS]`: the registry is benchmarks/commands/__init__.py;
`python -m benchmarks --help` lists the commands, one line each."""

import sys

from .commands import dispatch

if __name__ == "__main__":
    sys.exit(dispatch(sys.argv[1:]))
