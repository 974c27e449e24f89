"""Renamed keyword arguments: the old spelling still works for one release, with a warning.

zojax 0.2 settled its public names against optax's (see "Names" in the optax
page of the docs): ``seed=`` became ``key=`` and ``dimension_numbers=``
became ``weight_dimension_numbers=``. The factories take both spellings and
call `renamed` to pick one.
"""

from __future__ import annotations

import warnings
from typing import Any

REMOVED_IN = "0.3"


def renamed(
  owner: str, new: str, new_value: Any, old: str, old_value: Any, default: Any = None
) -> Any:
  """The value of argument ``new`` of ``owner``, given under its old name ``old`` or not.

  Args:
    owner: the function, for the messages (``"zojax.mezo"``).
    new: the argument's name.
    new_value: what was passed as ``new`` (``default`` if nothing).
    old: its deprecated name.
    old_value: what was passed as ``old`` (None if nothing).
    default: ``new``'s default, meaning "not given".

  Returns:
    ``new_value``, or ``old_value`` if the old name was used.

  Raises:
    ValueError: both names given.
  """
  if old_value is None:
    return new_value
  warnings.warn(
    f"{owner}({old}=...) is deprecated and will be removed in zojax {REMOVED_IN}; "
    f"pass {new}=... instead (same values).",
    DeprecationWarning,
    stacklevel=3,
  )
  given = not (
    new_value is default
    or (_is_plain_int(default) and _is_plain_int(new_value) and new_value == default)
  )
  if given:
    raise ValueError(f"{owner} got both {new}= and its deprecated name {old}=; pass {new}= only.")
  return old_value


def _is_plain_int(x: Any) -> bool:
  return isinstance(x, int) and not isinstance(x, bool)
