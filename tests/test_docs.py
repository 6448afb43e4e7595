"""The documentation that must follow the code: docs/configuration.md (generated from the config classes) and the
README's fresh-machine commands (the ones CI runs)."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
MAX_README_LINES = 260


def load_generator():
    spec = importlib.util.spec_from_file_location(
        "generate_config_reference", ROOT / "docs" / "generate_config_reference.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_configuration_reference_is_current():
    generator = load_generator()
    expected = generator.render()
    current = generator.OUTPUT.read_text() if generator.OUTPUT.exists() else ""
    assert current == expected, (
        f"docs/configuration.md is out of date with the config classes' fields; refresh it with: {generator.COMMAND}"
    )


def test_configuration_reference_covers_every_field():
    generator = load_generator()
    text = generator.render()
    for cls, *_ in generator.load_classes():
        for name in cls.field_names():
            assert f"| `{name}`" in text, f"{cls.__name__}.{name} is missing from docs/configuration.md"


def ci_test_command() -> str:
    """The command .ci/run runs (the README's test command), without what CI adds after it."""
    lines = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line.startswith("python3 -m venv")]
    assert len(lines) == 1, ".ci/run should hold one command line starting with `python3 -m venv`"
    command = lines[0]
    # After the README's command CI compiles the kernels with the GPU machine's Triton and records the versions it
    # passed with: `&& .ci/triton36_tests.sh && python .ci/tested_versions.py`.
    return re.sub(r" && \.ci/triton36_tests\.sh && python \.ci/tested_versions\.py$", "", command)


def test_readme_is_short():
    lines = README.read_text().count("\n")
    assert lines <= MAX_README_LINES, (
        f"README.md has {lines} lines; keep it at most {MAX_README_LINES} (details: docs/)"
    )


def test_readme_keeps_the_fresh_machine_commands():
    readme = README.read_text()
    test_command = ci_test_command()
    dev_install = ' && pip install -q --no-build-isolation -e ".[dev]"'
    install = test_command.split(dev_install)[0] + dev_install  # the demo needs no test-only installs
    assert f"```bash\n{test_command}\n```" in readme, f"README.md lost the test command CI runs:\n{test_command}"
    assert f"```bash\n{install} && fastppo train\n```" in readme, "README.md lost the fresh-machine demo command"
    assert "## Fresh machine: two commands" in readme
