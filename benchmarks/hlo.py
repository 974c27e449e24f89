"""Cross-device traffic of a compiled step, read from its HLO text.

A compiled JAX function's ``compiled.as_text()`` is the HLO module XLA runs,
after SPMD partitioning: its collectives (``all-reduce``, ``all-gather``, ...)
are the step's communication. This module walks that text and counts what one
execution all-reduces:

* a tuple-shaped ``all-reduce`` (as XLA's all-reduce combiner emits it) counts
  every element of the tuple; an async pair counts once (``all-reduce-start``,
  not ``all-reduce-done`` again);
* a ``while`` loop counts its body times its known trip count (and fails if a
  loop with collectives has none);
* a ``conditional`` counts its costliest branch, since only one runs;
* other calls (``call``, ``fusion``, ``to_apply=`` ...) count their callee.

`reduced_floats` counts elements (and insists they are floating point),
`reduced_bytes` counts bytes from each element type's width (``f32`` 4,
``bf16`` 2, ``pred`` 1, ...). Used by ``tests/test_data_parallel.py`` and
``benchmarks/data_parallel_bytes.py``.

Example:
  >>> import jax, jax.numpy as jnp
  >>> hlo = jax.jit(lambda x: x + 1).lower(jnp.ones(3)).compile().as_text()
  >>> reduced_floats(hlo), reduced_bytes(hlo), other_collectives(hlo)
  (0, 0, {})
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable

__all__ = [
  "OTHER_COLLECTIVES",
  "all_reduced_bytes",
  "all_reduced_floats",
  "dtype_bits",
  "hlo_computations",
  "other_collectives",
  "reduced",
  "reduced_bytes",
  "reduced_floats",
]

# Cross-device operations other than all-reduce.
OTHER_COLLECTIVES = ("all-gather", "collective-permute", "all-to-all", "reduce-scatter")

_HEADER = re.compile(r"^(?:ENTRY )?%([\w.-]+) \(.*\{$")
_ALL_REDUCE = re.compile(r"^\s*(?:ROOT )?%\S+ = (.+?) all-reduce(?:-start)?\(")
_SHAPE = re.compile(r"(\w+)\[([\d,]*)\]")
_NAME = r"%([\w.-]+)"
_OTHER = re.compile(r"^\s*(?:ROOT )?%\S+ = .+? (" + "|".join(OTHER_COLLECTIVES) + r")(?:-start)?\(")


def hlo_computations(hlo: str) -> tuple[dict[str, list[str]], str]:
  """Splits an HLO module's text into its computations.

  Args:
    hlo: the text of an HLO module, e.g. ``compiled.as_text()``.

  Returns:
    ``(computations, entry)``: the instruction lines of each computation by
    name, and the name of the entry computation.
  """
  comps, entry, name = {}, None, None
  for line in hlo.splitlines():
    header = _HEADER.match(line)
    if header:
      name = header.group(1)
      comps[name] = []
      entry = name if line.startswith("ENTRY") else entry
    elif line == "}":
      name = None
    elif name is not None:
      comps[name].append(line)
  return comps, entry


def dtype_bits(dtype: str) -> int:
  """Bits per element of an HLO element type: ``f32`` 32, ``bf16`` 16, ``pred`` 8, ``s4`` 4."""
  if dtype == "pred":
    return 8
  if dtype == "token":
    return 0
  match = re.match(r"[a-z]+?(\d+)", dtype)
  if not match:
    raise ValueError(f"unknown HLO element type {dtype!r}")
  return int(match.group(1))


def _all_reduced_shapes(line: str) -> list[tuple[str, int]]:
  """``(element type, elements)`` of each operand an all-reduce line reduces; [] otherwise."""
  match = _ALL_REDUCE.match(line)
  if not match:
    return []
  # One shape, or a tuple of them.
  return [
    (dtype, math.prod(int(d) for d in dims.split(",") if d))
    for dtype, dims in _SHAPE.findall(match.group(1))
  ]


def all_reduced_floats(line: str) -> int:
  """Elements an ``all-reduce`` (or ``all-reduce-start``) line reduces; 0 for other lines.

  Raises:
    AssertionError: if the all-reduce reduces a non-float element type.
  """
  total = 0
  for dtype, size in _all_reduced_shapes(line):
    assert dtype.startswith(("f", "bf")), ("a non-float all-reduce", line)
    total += size
  return total


def all_reduced_bytes(line: str) -> int:
  """Bytes an ``all-reduce`` (or ``all-reduce-start``) line reduces, any element type."""
  bits = sum(size * dtype_bits(dtype) for dtype, size in _all_reduced_shapes(line))
  return math.ceil(bits / 8)


def reduced(hlo: str, line_cost: Callable[[str], int]) -> int:
  """Sums ``line_cost`` over the instructions one execution of an HLO module runs.

  Loop bodies count their known trip count times, conditionals their
  costliest branch, other called computations once per call.

  Args:
    hlo: the text of an HLO module.
    line_cost: the cost of one instruction line, e.g. `all_reduced_bytes`.

  Returns:
    The total cost.

  Raises:
    AssertionError: if a loop whose body has a cost has no known trip count.
  """
  comps, entry = hlo_computations(hlo)

  @functools.cache
  def cost(name):
    total = 0
    for line in comps[name]:
      total += line_cost(line)
      for group in re.findall(r"branch_computations=\{([^}]*)\}", line):
        total += max(cost(b) for b in re.findall(_NAME, group))
      branches = re.findall(r"(?:true|false)_computation=" + _NAME, line)
      total += max((cost(b) for b in branches), default=0)
      for body in re.findall(r"\bbody=" + _NAME, line):
        if cost(body):
          trips = re.search(r'"known_trip_count":\{"n":"(\d+)"\}', line)
          assert trips, ("a loop with collectives and no known trip count", line)
          total += int(trips.group(1)) * cost(body)
      for callee in re.findall(r"\b(?:calls|to_apply|condition)=" + _NAME, line):
        total += cost(callee)
      for group in re.findall(r"called_computations=\{([^}]*)\}", line):
        total += sum(cost(c) for c in re.findall(_NAME, group))
    return total

  return cost(entry)


def reduced_floats(hlo: str) -> int:
  """Floats all-reduced by one execution of a compiled HLO module.

  Tuple-shaped and async (``all-reduce-start``) all-reduces count each
  element once (``all-reduce-done`` not again), a loop body counts its known
  trip count times, and a conditional its costliest branch, since only one
  runs (mezo_bcd holds one branch per block).

  Raises:
    AssertionError: on an all-reduce of a non-float type, or a loop with
      collectives and no known trip count.
  """
  return reduced(hlo, all_reduced_floats)


def reduced_bytes(hlo: str) -> int:
  """Bytes all-reduced by one execution of a compiled HLO module (as `reduced_floats`).

  Each element counts its type's width (``f32`` 4 bytes, ``bf16`` 2, ...);
  any element type is accepted.
  """
  return reduced(hlo, all_reduced_bytes)


def other_collectives(hlo: str) -> dict[str, int]:
  """How many instructions of each collective other than all-reduce an HLO module holds.

  A static count (a loop body's instruction counts once), for spotting
  all-gathers and the like; an empty dict when there are none.
  """
  counts: dict[str, int] = {}
  for line in hlo.splitlines():
    match = _OTHER.match(line)
    if match:
      counts[match.group(1)] = counts.get(match.group(1), 0) + 1
  return counts
