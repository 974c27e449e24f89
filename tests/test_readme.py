"""The README's promises: its test command is what CI runs, and its code runs."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def _blocks(lang):
  return re.findall(rf"```{lang}\n(.*?)```", README, flags=re.S)


def test_ci_runs_the_readme_test_command():
  commands = [line for block in _blocks("bash") for line in block.splitlines() if line.strip()]
  assert len(commands) == 2, "the README must show exactly two set-up commands"
  test_command = next(c for c in commands if "pytest" in c)
  ci = (ROOT / ".ci" / "run").read_text().splitlines()
  assert test_command in ci


def test_python_examples_run():
  namespace = {}
  for block in _blocks("python"):
    exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102
  assert float(namespace["optax"].tree_utils.tree_get(namespace["opt_state"], "loss")) > 0
