"""ampfuse-info (or python -m ampfuse info): which backends this installation can use, and why not.

Prints a JSON report; when the CUDA extension was not built, the report says what the build
decided (ampfuse/_build.json, written by setup.py) and how to build the extension later. Exit
status 0, or 1 with one line on stderr."""

import json
import os
import sys

BUILD_LATER = ("on a machine whose torch sees a GPU (or with FORCE_CUDA=1, and TORCH_CUDA_ARCH_LIST to choose the "
               "architectures; default 8.0;9.0), with a CUDA build of torch and a CUDA toolkit (CUDA_HOME), run in "
               "the ampfuse source folder: pip install --no-build-isolation --no-deps .")


def build_note():
    """What setup.py decided about the CUDA extension, or None (a source checkout, an old install)."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_build.json")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f).get("cuda_extension")
    except (OSError, ValueError):
        return None


def report():
    from . import info

    out = info()
    cuda = out["backends"]["cuda"]
    if not cuda["available"] and "not built" in (cuda["reason"] or ""):
        cuda["build"] = build_note() or "unknown (no ampfuse/_build.json: not installed by pip from this version)"
        cuda["how_to_build"] = BUILD_LATER
    return out


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv not in ([], ["info"]):
        print("usage: ampfuse-info  (or: python -m ampfuse [info])", file=sys.stderr)
        return 2
    try:
        print(json.dumps(report(), indent=2))
    except Exception as exc:  # noqa: BLE001 - one line, not a traceback
        print(f"ampfuse-info: error: {type(exc).__name__}: {' '.join(str(exc).split())}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
