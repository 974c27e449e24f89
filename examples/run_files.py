"""The files a training run of the examples writes: checked up front, repaired on resume.

Shared by the ViT (`examples.vit_cifar100.train`) and LM
(`examples.lm_prompt.train`) command lines:

* `check_output_file` / `check_output_dir`: a ``--log``, ``--json``,
  ``--plot`` or ``--checkpoint-dir`` that cannot be written is a usage error
  before anything is read or computed, not a failure after the run.
* `set_aside`: a damaged checkpoint step is renamed, not deleted, when
  ``--resume`` falls back to an older intact one.
* `trim_log`: the JSON-lines log is cut back to where it stood at the
  resumed checkpoint, so a killed run's later lines are not logged twice.
"""

from __future__ import annotations

import os

__all__ = ["UsageError", "check_output_dir", "check_output_file", "set_aside", "trim_log"]


class UsageError(Exception):
  """A bad command line, model, data set or environment: one message and exit code 2."""


def check_output_file(flag: str, path: str | None) -> None:
  """``path`` can be created or replaced: not a directory, in an existing writable directory.

  Raises:
    UsageError: naming ``flag`` and what is wrong with ``path``.
  """
  if path is None:
    return
  if os.path.isdir(path):
    raise UsageError(f"{flag} {path} is a directory; give a file name")
  folder = os.path.dirname(os.path.abspath(path))
  if not os.path.isdir(folder):
    raise UsageError(f"{flag} {path}: the directory {folder} does not exist")
  if not os.access(folder, os.W_OK):
    raise UsageError(f"{flag} {path}: the directory {folder} is not writable")
  if os.path.exists(path) and not os.access(path, os.W_OK):
    raise UsageError(f"{flag} {path} is not writable")


def check_output_dir(flag: str, path: str) -> None:
  """``path`` is a writable directory, or one that can be made under a writable one.

  Raises:
    UsageError: naming ``flag`` and what is wrong with ``path``.
  """
  if os.path.exists(path) and not os.path.isdir(path):
    raise UsageError(f"{flag} {path} is a file, not a directory")
  existing = os.path.abspath(path)
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing):
    raise UsageError(f"{flag} {path}: {existing} is a file, not a directory")
  if not os.access(existing, os.W_OK):
    raise UsageError(f"{flag} {path}: {existing} is not writable")


def set_aside(directory: str, step: int) -> str:
  """Renames the damaged checkpoint ``step`` to ``<step>.damaged`` (orbax then ignores it).

  The files are kept for inspection, and the step number is free again for
  the resumed run's own checkpoint.

  Returns:
    The new path (``.damaged2``, ``.damaged3``, ... if the name is taken).
  """
  source = os.path.join(directory, str(step))
  target, n = f"{source}.damaged", 1
  while os.path.exists(target):
    n += 1
    target = f"{source}.damaged{n}"
  os.rename(source, target)
  return target


def trim_log(path: str, saved: dict | None) -> int:
  """Cuts the JSON-lines log back to what it held when the resumed checkpoint was saved.

  A run killed after its last checkpoint logged evaluations that the resumed
  run logs again. ``saved`` is the checkpoint's record of the log (its
  absolute path and size then); the lines after that size go, and nothing
  else: a log at another path, or one shorter than recorded (not the same
  file), is left alone. The file is replaced atomically.

  Args:
    path: the ``--log`` file of the resumed run.
    saved: ``{"path": ..., "bytes": ...}`` from the checkpoint's extras, or
      None (no log then, or a checkpoint from before this record).

  Returns:
    The number of lines dropped.
  """
  if not saved or saved["path"] != os.path.abspath(path) or not os.path.exists(path):
    return 0
  with open(path, "rb") as f:
    content = f.read()
  size = saved["bytes"]
  if len(content) <= size:
    return 0
  tail = content[size:]
  temporary = f"{path}.tmp-{os.getpid()}"
  with open(temporary, "wb") as f:
    f.write(content[:size])
  os.replace(temporary, path)
  return tail.count(b"\n") + (not tail.endswith(b"\n"))
