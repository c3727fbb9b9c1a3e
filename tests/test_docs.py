"""README.md and .ci/run must not drift apart: CI runs README's two set-up commands word for word."""

import pathlib
import re
import shlex

ROOT = pathlib.Path(__file__).resolve().parent.parent


def readme_commands():
    text = (ROOT / "README.md").read_text()
    section = text.split("## Set up on a fresh machine", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.*?)\n```", section, flags=re.S)


def ci_lines():
    return (ROOT / ".ci" / "run").read_text().splitlines()


def readme_command(last_word):
    found = [c.strip() for c in readme_commands() if c.rstrip().endswith(last_word)]
    assert len(found) == 1, f"README's set-up section should have one command ending in {last_word!r}"
    return found[0]


def test_ci_runs_the_readme_test_command():
    assert readme_command("pytest") in ci_lines()


def test_ci_runs_the_readme_first_command_at_a_documented_size():
    first = readme_commands()[0].strip()
    assert first == readme_command("ampfuse-demo") and first in ci_lines()
    # the size CI runs it at is set through AMPFUSE_DEMO_ARGS, which README documents
    exports = [line for line in ci_lines() if line.startswith("export AMPFUSE_DEMO_ARGS=")]
    assert len(exports) == 1
    flags = shlex.split(exports[0].split("=", 1)[1])[0]
    readme = (ROOT / "README.md").read_text()
    assert f'AMPFUSE_DEMO_ARGS="{flags}"' in readme
    for flag in shlex.split(flags)[::2]:
        assert flag in readme, flag
