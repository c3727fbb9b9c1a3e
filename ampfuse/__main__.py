"""python -m ampfuse info: which backends this installation can use, and why not."""

import json
import sys


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv not in ([], ["info"]):
        sys.exit("usage: python -m ampfuse [info]")
    from . import info

    print(json.dumps(info(), indent=2))


if __name__ == "__main__":
    main()
