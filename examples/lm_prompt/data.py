"""Real task data from a local copy, and MeZO's train/dev/test sampling.

Nothing is downloaded and nothing is written: the user fetches a data set once
and points ``--data-dir`` at it. A split is found in that folder by its
conventional name (`SPLIT_NAMES`: ``train``; ``validation``, ``dev``, ``val``
or ``valid``; ``test``) in one of these forms:

* ``<name>.tsv``: GLUE's files, with a header row (SST-2 ``sentence<TAB>label``;
  RTE ``index<TAB>sentence1<TAB>sentence2<TAB>label`` with labels
  ``entailment``/``not_entailment``). Fields are split on tabs with no quoting,
  as GLUE writes them;
* ``<name>.jsonl``: SuperGLUE's files, one JSON object a line (RTE
  ``premise``/``hypothesis``/``label``, BoolQ ``passage``/``question``/``label``
  with true/false labels);
* ``<name>.parquet``, ``<name>-*.parquet`` or ``data/<name>-*.parquet``: the
  Hugging Face Hub's parquet layout (shards read in name order);
* ``<name>/``: a split directory written by ``datasets``' ``save_to_disk`` (a
  ``DatasetDict`` saved into ``--data-dir`` has one per split, beside its
  ``dataset_dict.json``). It holds ``data-00000-of-0000N.arrow`` shards in the
  Arrow IPC *stream* format, ``dataset_info.json`` and ``state.json``; the
  shards are read in the order ``state.json`` lists them (``_data_files``) with
  pyarrow, so the ``datasets`` package is not needed.

Every form is normalised to a list of dicts holding the task's columns as
strings and an integer ``"label"`` (the class index of `tasks.PromptTask`).
Other column names used by the sources are accepted (`COLUMN_ALIASES`: GLUE's
``sentence1``/``sentence2`` for ``premise``/``hypothesis``, the ``answer`` of
Hugging Face's ``boolq`` for ``label``), and labels may be class indices,
booleans, digit strings or class names (``"not_entailment"``, ``true``). When a
source states its class names (a ``ClassLabel`` in ``dataset_info.json`` or in
a parquet/arrow schema's metadata) they must match the task's, in order.

Anything missing or malformed raises `DataError` (a ``ValueError``) naming the
file, what was expected, and how to get the data.

Sampling (MeZO, Malladi et al., arXiv 2305.17333, ``large_models/run.py``):
`split_train_dev_test` draws one permutation of the training split with the
seed and takes ``num_train`` training and then ``num_dev`` development
examples from it (1000 and 500 for the OPT experiments), and draws the
``num_test`` test examples (1000) from the *validation* split with the same
seed, since GLUE and SuperGLUE hide their test labels. Permutations come from
``numpy.random.RandomState(seed).permutation``, the draw of MeZO's
``sample_subset``, so with the examples in Hugging Face's order the same seed
selects the same examples. `sample_k_shot` is the k-per-class sampling of
LM-BFF (Gao et al., arXiv 2012.15723) used for MeZO's RoBERTa experiments.
"""

from __future__ import annotations

import csv
import json
import os
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from examples.lm_prompt import tasks as tasks_lib

Example = dict[str, Any]
PathLike = str | os.PathLike

SPLIT_NAMES: dict[str, tuple[str, ...]] = {
  "train": ("train",),
  "validation": ("validation", "dev", "val", "valid"),
  "test": ("test",),
}
COLUMN_ALIASES: dict[str, tuple[str, ...]] = {
  "premise": ("sentence1",),
  "hypothesis": ("sentence2",),
  "label": ("answer",),
}
HOW_TO_GET: dict[str, str] = {
  "sst2": (
    "download SST-2 from GLUE (https://gluebenchmark.com/tasks) and point --data-dir at the "
    "folder holding train.tsv and dev.tsv, or save Hugging Face's 'glue'/'sst2' there with "
    "datasets' save_to_disk"
  ),
  "rte": (
    "download RTE from SuperGLUE (https://super.gluebenchmark.com/tasks; train.jsonl, "
    "val.jsonl) or GLUE (train.tsv, dev.tsv) and point --data-dir at its folder, or save "
    "Hugging Face's 'super_glue'/'rte' there with datasets' save_to_disk"
  ),
  "boolq": (
    "download BoolQ from SuperGLUE (https://super.gluebenchmark.com/tasks; train.jsonl, "
    "val.jsonl) and point --data-dir at its folder, or save Hugging Face's 'super_glue'/'boolq' "
    "there with datasets' save_to_disk"
  ),
  "synthetic-sst2": (
    "generate it with examples.lm_prompt.synthetic.generate_task (no files are needed), or "
    "write it as train.jsonl and validation.jsonl with 'sentence' and 'label'"
  ),
}
_STATE_JSON, _INFO_JSON = "state.json", "dataset_info.json"


class DataError(ValueError):
  """Missing or malformed task data; the message says where, what was expected, how to fix it."""


class Splits(NamedTuple):
  """The train, development and test examples of one sampled run."""

  train: list[Example]
  dev: list[Example]
  test: list[Example]


def _how_to_get(task: tasks_lib.PromptTask) -> str:
  return HOW_TO_GET.get(
    task.name,
    f"provide a train and a validation file with columns {list(task.columns)} and 'label'",
  )


def find_split(
  data_dir: PathLike, split: str, task: tasks_lib.PromptTask
) -> tuple[pathlib.Path, ...]:
  """The file(s) holding ``split`` in ``data_dir``.

  Args:
    data_dir: the folder the user pointed ``--data-dir`` at.
    split: ``"train"``, ``"validation"`` or ``"test"``.
    task: the task (for the error message).

  Returns:
    A tuple of paths: one file or ``save_to_disk`` directory, or the shards of
    a parquet split in name order.

  Raises:
    DataError: ``data_dir`` is not a folder, no file matches, or several forms
      of the split are present (the message lists them).
    ValueError: an unknown split name.
  """
  if split not in SPLIT_NAMES:
    raise ValueError(f"unknown split {split!r}; expected one of {sorted(SPLIT_NAMES)}")
  root = pathlib.Path(data_dir)
  if not root.is_dir():
    raise DataError(f"--data-dir {str(root)!r} is not a folder: {_how_to_get(task)}")
  found: list[tuple[pathlib.Path, ...]] = []
  looked_for = []
  for name in SPLIT_NAMES[split]:
    for suffix in (".tsv", ".jsonl", ".parquet"):
      looked_for.append(name + suffix)
      if (root / (name + suffix)).is_file():
        found.append((root / (name + suffix),))
    looked_for.append(name + "/")
    if (root / name).is_dir():
      found.append((root / name,))
    for pattern in (f"{name}-*.parquet", f"data/{name}-*.parquet"):
      looked_for.append(pattern)
      shards = tuple(sorted(root.glob(pattern)))
      if shards:
        found.append(shards)
  if not found:
    raise DataError(
      f"no {split} split of task {task.name!r} in {str(root)!r} (looked for "
      f"{', '.join(looked_for)}): {_how_to_get(task)}"
    )
  if len(found) > 1:
    names = ", ".join(str(paths[0].relative_to(root)) for paths in found)
    raise DataError(
      f"several files hold the {split} split in {str(root)!r} ({names}); keep one of them"
    )
  return found[0]


def _read_tsv(path: pathlib.Path) -> list[dict[str, Any]]:
  with open(path, encoding="utf-8-sig", newline="") as f:
    lines = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
  lines = [line for line in lines if line]
  if not lines:
    raise DataError(f"{str(path)!r} is empty; expected a header row and one example a line")
  header, rows = lines[0], []
  for number, line in enumerate(lines[1:], start=2):
    if len(line) != len(header):
      raise DataError(
        f"{str(path)!r} line {number} has {len(line)} tab-separated fields; the header "
        f"{header} has {len(header)}"
      )
    rows.append(dict(zip(header, line)))
  return rows


def _read_jsonl(path: pathlib.Path) -> list[dict[str, Any]]:
  rows = []
  with open(path, encoding="utf-8-sig") as f:
    for number, line in enumerate(f, start=1):
      if not line.strip():
        continue
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        raise DataError(
          f"bad JSON on line {number} of {str(path)!r} ({e.msg}); expected one JSON object a line"
        ) from None
      if not isinstance(row, dict):
        raise DataError(
          f"line {number} of {str(path)!r} is a JSON {type(row).__name__}, not an object"
        )
      rows.append(row)
  return rows


def _hf_class_names(features: Any) -> tuple[str, ...] | None:
  """The label's ClassLabel names from a ``datasets`` features dict, if it has them."""
  if not isinstance(features, Mapping):
    return None
  label = features.get("label")
  if isinstance(label, Mapping) and label.get("_type") == "ClassLabel" and label.get("names"):
    return tuple(str(name) for name in label["names"])
  return None


def _schema_class_names(schema: pa.Schema) -> tuple[str, ...] | None:
  """ClassLabel names from the ``huggingface`` metadata ``datasets`` writes into schemas."""
  raw = (schema.metadata or {}).get(b"huggingface")
  if raw is None:
    return None
  try:
    meta = json.loads(raw)
  except (json.JSONDecodeError, UnicodeDecodeError):
    return None
  info = meta.get("info", {}) if isinstance(meta, Mapping) else {}
  return _hf_class_names(info.get("features") if isinstance(info, Mapping) else None)


def _read_parquet(path: pathlib.Path) -> tuple[list[dict[str, Any]], tuple[str, ...] | None]:
  try:
    table = pq.read_table(path)
  except (pa.ArrowInvalid, OSError) as e:
    raise DataError(f"{str(path)!r} is not a readable parquet file ({e})") from None
  return table.to_pylist(), _schema_class_names(table.schema)


def _read_arrow(path: pathlib.Path) -> pa.Table:
  """An Arrow IPC file: the stream format ``datasets`` writes, or the file format."""
  try:
    with pa.memory_map(str(path)) as source:
      return pa.ipc.open_stream(source).read_all()
  except pa.ArrowInvalid:
    pass
  try:
    with pa.memory_map(str(path)) as source:
      return pa.ipc.open_file(source).read_all()
  except pa.ArrowInvalid as e:
    raise DataError(f"{str(path)!r} is not an Arrow IPC stream or file ({e})") from None


def _read_saved_dataset(
  directory: pathlib.Path,
) -> tuple[list[dict[str, Any]], tuple[str, ...] | None]:
  """Rows and ClassLabel names of one ``save_to_disk`` split directory."""
  names = None
  info_path = directory / _INFO_JSON
  if info_path.is_file():
    try:
      names = _hf_class_names(json.loads(info_path.read_text()).get("features"))
    except (json.JSONDecodeError, AttributeError) as e:
      raise DataError(f"{str(info_path)!r} is not a JSON object ({e})") from None
  state_path = directory / _STATE_JSON
  if state_path.is_file():
    try:
      listed = [entry["filename"] for entry in json.loads(state_path.read_text())["_data_files"]]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
      raise DataError(
        f"{str(state_path)!r} does not list the data files as datasets' save_to_disk writes "
        f"them ('_data_files': [{{'filename': ...}}]): {e!r}"
      ) from None
    files = [directory / name for name in listed]
    missing = [str(p.name) for p in files if not p.is_file()]
    if missing:
      raise DataError(f"{str(state_path)!r} lists data files that are not there: {missing}")
  else:
    files = sorted(directory.glob("*.arrow"))
  if not files:
    raise DataError(
      f"{str(directory)!r} holds no .arrow files; expected a split saved with datasets' "
      "save_to_disk (data-00000-of-00001.arrow, dataset_info.json, state.json)"
    )
  rows = []
  for file in files:
    table = _read_arrow(file)
    names = names or _schema_class_names(table.schema)
    rows.extend(table.to_pylist())
  return rows, names


def _label_index(value: Any, task: tasks_lib.PromptTask) -> int:
  """A label value as a class index; ValueError with the accepted forms otherwise."""
  classes = [c.lower() for c in task.classes]
  if isinstance(value, bool) or isinstance(value, np.bool_):
    value = str(bool(value)).lower()
  if isinstance(value, (int, np.integer)) or (isinstance(value, float) and value.is_integer()):
    index = int(value)
  elif isinstance(value, str) and value.strip().lstrip("-").isdigit():
    index = int(value.strip())
  elif isinstance(value, str) and value.strip().lower() in classes:
    index = classes.index(value.strip().lower())
  else:
    raise ValueError(
      f"label {value!r} is not a class of task {task.name!r}: expected 0..{task.num_classes - 1}"
      f" or one of {list(task.classes)}"
    )
  if not 0 <= index < task.num_classes:
    hidden = " (test splits of GLUE/SuperGLUE hide their labels as -1)" if index == -1 else ""
    raise ValueError(
      f"label {value!r} is outside the classes of task {task.name!r}: 0..{task.num_classes - 1} "
      f"{list(task.classes)}{hidden}"
    )
  return index


def normalize_examples(
  rows: Sequence[Mapping[str, Any]],
  task: tasks_lib.PromptTask,
  source: str = "<rows>",
  class_names: Sequence[str] | None = None,
) -> list[Example]:
  """Raw rows as the task's examples: its columns as strings and an integer label.

  Args:
    rows: mappings as read from a file; extra keys are dropped, `COLUMN_ALIASES`
      are accepted for missing ones.
    task: the task.
    source: where the rows came from, for error messages.
    class_names: the source's own label names, if it states them; they must
      equal the task's classes (compared case-insensitively).

  Returns:
    A list of ``{column: str, ..., "label": int}``.

  Raises:
    DataError: no rows, a missing column, a label outside the task's classes,
      or class names that differ from the task's.
  """
  how = _how_to_get(task)
  if not rows:
    raise DataError(f"{source!r} holds no examples; {how}")
  if class_names is not None and [c.lower() for c in class_names] != [
    c.lower() for c in task.classes
  ]:
    raise DataError(
      f"{source!r} names its labels {list(class_names)} but task {task.name!r} expects "
      f"{list(task.classes)} in that order; {how}"
    )
  examples = []
  for number, row in enumerate(rows, start=1):
    example = {}
    for column in (*task.columns, "label"):
      names = (column, *COLUMN_ALIASES.get(column, ()))
      key = next((name for name in names if name in row), None)
      if key is None or row[key] is None:
        raise DataError(
          f"example {number} of {source!r} has no {column!r} column (looked for "
          f"{list(names)}; it has {sorted(row)}); task {task.name!r} needs "
          f"{list(task.columns)} and 'label'; {how}"
        )
      example[column] = row[key]
    try:
      example["label"] = _label_index(example["label"], task)
    except ValueError as e:
      raise DataError(f"example {number} of {source!r}: {e}") from None
    for column in task.columns:
      example[column] = str(example[column])
    examples.append(example)
  return examples


def read_examples(
  paths: Sequence[PathLike] | PathLike, task: tasks_lib.PromptTask
) -> list[Example]:
  """The examples in a data file, a ``save_to_disk`` directory, or a list of parquet shards.

  Args:
    paths: one path, or several (parquet shards, read in the given order).
    task: the task whose columns and classes the examples must have.

  Returns:
    The normalised examples (see `normalize_examples`).

  Raises:
    DataError: an unsupported or malformed file, or rows that do not fit the task.
  """
  if isinstance(paths, (str, os.PathLike)):
    paths = [paths]
  rows, names = [], None
  for path in map(pathlib.Path, paths):
    if path.is_dir():
      part, part_names = _read_saved_dataset(path)
    elif not path.is_file():
      raise DataError(f"{str(path)!r} does not exist; {_how_to_get(task)}")
    elif path.suffix == ".tsv":
      part, part_names = _read_tsv(path), None
    elif path.suffix == ".jsonl":
      part, part_names = _read_jsonl(path), None
    elif path.suffix == ".parquet":
      part, part_names = _read_parquet(path)
    else:
      raise DataError(
        f"{str(path)!r} is not a supported data file (.tsv, .jsonl, .parquet, or a "
        "save_to_disk directory)"
      )
    rows.extend(part)
    names = names or part_names
  source = str(paths[0]) if len(paths) == 1 else f"{paths[0]} (+{len(paths) - 1} shards)"
  return normalize_examples(rows, task, source, names)


def load_split(task: tasks_lib.PromptTask, data_dir: PathLike, split: str) -> list[Example]:
  """One split of a task from ``data_dir`` (see the module docstring for the layouts).

  Args:
    task: the task.
    data_dir: the folder holding the task's files.
    split: ``"train"``, ``"validation"`` or ``"test"``.

  Returns:
    The split's examples, in file order.

  Raises:
    DataError: the split is missing, ambiguous or malformed.
  """
  return read_examples(find_split(data_dir, split, task), task)


def sample_eval(examples: Sequence[Example], n: int, seed: int) -> list[Example]:
  """A fixed evaluation subset: ``n`` examples (all when fewer) drawn without replacement.

  Args:
    examples: the pool (e.g. a validation split).
    n: how many to draw.
    seed: the seed of ``numpy.random.RandomState(seed).permutation`` (MeZO's draw).

  Returns:
    ``min(n, len(examples))`` examples, in the order drawn.
  """
  if n < 0:
    raise ValueError(f"n must be >= 0, got {n}")
  order = np.random.RandomState(seed).permutation(len(examples))[:n]
  return [examples[i] for i in order]


def sample_k_shot(examples: Sequence[Example], k: int, seed: int) -> list[Example]:
  """``k`` examples of every class (LM-BFF's few-shot sampling), deterministic in ``seed``.

  The pool is permuted with ``numpy.random.RandomState(seed)`` and the first
  ``k`` examples of each class in that order are kept.

  Args:
    examples: labelled examples (integer ``"label"``).
    k: examples per class.
    seed: integer seed.

  Returns:
    ``k * num_classes`` examples, in permuted order.

  Raises:
    DataError: a class has fewer than ``k`` examples.
  """
  if k < 1:
    raise ValueError(f"k must be >= 1, got {k}")
  counts: dict[int, int] = {}
  for example in examples:
    counts[int(example["label"])] = counts.get(int(example["label"]), 0) + 1
  short = {label: count for label, count in sorted(counts.items()) if count < k}
  if short or not counts:
    raise DataError(f"{k} examples per class were asked for, but the classes have {counts}")
  taken: dict[int, int] = {}
  chosen = []
  for i in np.random.RandomState(seed).permutation(len(examples)):
    label = int(examples[i]["label"])
    if taken.get(label, 0) < k:
      taken[label] = taken.get(label, 0) + 1
      chosen.append(examples[i])
  return chosen


def split_train_dev_test(
  train_examples: Sequence[Example],
  validation_examples: Sequence[Example],
  num_train: int = 1000,
  num_dev: int = 500,
  num_test: int = 1000,
  seed: int = 0,
) -> Splits:
  """MeZO's splits: train and dev from the training split, test from the validation split.

  One permutation of ``train_examples`` (``RandomState(seed)``) is cut to its
  first ``num_train + num_dev`` examples; the last ``num_dev`` of those are the
  development set and the rest the training set, so when the split is smaller
  than ``num_train + num_dev`` (CB has 250 examples) dev keeps ``num_dev`` and
  train gets what is left, as in MeZO. The test set is ``sample_eval(
  validation_examples, num_test, seed)``: GLUE and SuperGLUE hide their test
  labels, so MeZO tests on (at most ``num_test`` of) the validation split.

  Args:
    train_examples: the training split.
    validation_examples: the validation split.
    num_train: training examples (MeZO: 1000).
    num_dev: development examples (MeZO: 500; 100 for CB and COPA).
    num_test: test examples (MeZO: 1000).
    seed: integer seed (MeZO's ``train_set_seed``).

  Returns:
    `Splits` ``(train, dev, test)``.

  Raises:
    DataError: the training split is too small to leave any training example.
  """
  if min(num_train, num_dev, num_test) < 0:
    raise ValueError(f"sizes must be >= 0, got {num_train}, {num_dev}, {num_test}")
  order = np.random.RandomState(seed).permutation(len(train_examples))[: num_train + num_dev]
  if len(order) <= num_dev:
    raise DataError(
      f"the training split has {len(train_examples)} examples, too few for {num_dev} dev "
      "examples and any training example"
    )
  cut = len(order) - num_dev
  train = [train_examples[i] for i in order[:cut]]
  dev = [train_examples[i] for i in order[cut:]]
  return Splits(train, dev, sample_eval(validation_examples, num_test, seed))
