"""Input pipelines for the ViT example: CIFAR-100 (tfds ArrayRecord) and digits, through grain.

Both tasks go through one `grain.MapDataset` pipeline:

* training (`train_dataset`): a fresh permutation of the source every epoch
  (`MapDataset.shuffle` followed by `repeat`, which reseeds each epoch), an
  optional augmentation of every image (zero padding by ``crop_padding``
  pixels on each side, a random crop back to the source size, and a
  horizontal flip with probability 1/2), a bilinear resize to the model's
  resolution, normalisation to [-1, 1] (the ViT convention), and batches with
  the remainder of every epoch dropped. The order and the augmentation of an
  element depend only on ``seed`` and its position in the stream, so two
  pipelines with the same arguments give identical batches.
* evaluation (`eval_dataset`): the source once, in order, resized and
  normalised, without augmentation; the last batch is smaller unless
  ``pad_remainder`` is set.

Every batch is a dict of NumPy arrays: ``"image"`` float32 of shape
``(batch, size, size, channels)`` in [-1, 1], and ``"label"`` int32 of shape
``(batch,)``.

Resuming. `make_iterator` turns a pipeline into a grain iterator;
`get_state` returns its position as a small JSON-able dict (``{"next_index":
batches_taken}``) and `set_state` moves a fresh iterator over the same
pipeline there, so a resumed run sees exactly the batches of an
uninterrupted one. Store the dict with orbax's ``ocp.args.JsonSave`` or as
``extras`` of `zojax.checkpointing.save`. The state is a position only: the
source, batch size, seed and augmentation settings must be the same when it
is restored.

Sources:

* `cifar100_source`: a split of CIFAR-100 read with ``tfds.data_source``
  from a ``data_dir`` where it was prepared in the ArrayRecord format. It
  never downloads; when the data are not there it raises `DataNotPrepared`,
  whose message says how to prepare them (see `prepare_instructions`).
* `digits_sources`: scikit-learn's bundled 8x8 digits (no download), split
  into train and test per class, optionally restricted to some classes.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import grain
import numpy as np

CIFAR100 = "cifar100"
CIFAR100_PADDING = 4  # pixels of zero padding before the random 32x32 crop

Example = dict[str, np.ndarray]


class DataNotPrepared(RuntimeError):
  """A data set is not prepared where it was looked for; the message says how to prepare it."""


@dataclasses.dataclass(frozen=True)
class ArraySource:
  """A random-access source over in-memory arrays.

  Attributes:
    images: ``(n, height, width, channels)``, uint8 in [0, 255] or floating
      point in [0, 1].
    labels: ``(n,)`` integer class labels.
  """

  images: np.ndarray
  labels: np.ndarray

  def __post_init__(self):
    if self.images.ndim != 4 or self.labels.shape != self.images.shape[:1]:
      raise ValueError(
        f"images must be (n, h, w, c) and labels (n,); got {self.images.shape} and "
        f"{self.labels.shape}"
      )

  def __len__(self) -> int:
    return self.labels.shape[0]

  def __getitem__(self, index: int) -> Example:
    return {"image": self.images[index], "label": self.labels[index]}


# --------------------------------------------------------------------------- sources


def prepare_instructions(data_dir: str | os.PathLike) -> str:
  """How to prepare CIFAR-100 under ``data_dir`` on a machine with internet access.

  Args:
    data_dir: the tfds data directory the training program was given.

  Returns:
    A message for the user: the commands that download CIFAR-100 and write it
    in the ArrayRecord format (the format ``tfds.data_source`` reads), and
    the flag that points the program at it.
  """
  return (
    f"CIFAR-100 is not prepared in the ArrayRecord format under {data_dir}.\n"
    "Prepare it on a machine with internet access (building needs TensorFlow):\n"
    "  pip install tensorflow tensorflow-datasets\n"
    f"  tfds build cifar100 --data_dir={data_dir} --file_format=array_record\n"
    "or, in Python:\n"
    "  import tensorflow_datasets as tfds\n"
    f'  tfds.builder("cifar100", data_dir="{data_dir}").download_and_prepare('
    'file_format="array_record")\n'
    f"then copy the directory here if needed and pass --data-dir {data_dir}."
  )


def _prepared_as_array_record(name: str, data_dir: str | os.PathLike | None) -> bool:
  """Whether tfds finds ``name`` prepared under ``data_dir`` with ArrayRecord files."""
  import tensorflow_datasets as tfds  # examples-only dependency, imported on use

  builder = tfds.builder(name, data_dir=data_dir)
  if not builder.is_prepared():
    return False
  return tfds.core.FileFormat.ARRAY_RECORD in builder.info.available_file_formats()


def cifar100_source(data_dir: str | os.PathLike | None, split: str) -> Sequence[Mapping[str, Any]]:
  """A random-access CIFAR-100 split read from a prepared tfds directory.

  Calls ``tfds.data_source`` with ``download=False``: nothing is fetched from
  the network, a missing data set fails at once.

  Args:
    data_dir: the tfds data directory (None: tfds' default, ``$TFDS_DATA_DIR``
      or ``~/tensorflow_datasets``).
    split: a tfds split, e.g. ``"train"``, ``"test"`` or ``"train[:90%]"``.

  Returns:
    A sequence of dicts with ``"image"`` (uint8, 32x32x3) and ``"label"``
    (int64, 0-99), among other fields.

  Raises:
    DataNotPrepared: CIFAR-100 is not prepared in the ArrayRecord format under
      ``data_dir``; the message says how to prepare it.
  """
  import tensorflow_datasets as tfds  # examples-only dependency, imported on use

  try:
    return tfds.data_source(CIFAR100, split=split, data_dir=data_dir, download=False)
  except Exception as err:
    # What tfds raises for missing data depends on the path it took (no files,
    # TFRecord files only, no data_dir given). Errors on prepared data (a bad
    # split name, say) are re-raised as they are.
    if _prepared_as_array_record(CIFAR100, data_dir):
      raise
    shown = data_dir if data_dir is not None else tfds.core.constants.get_default_data_dir()
    raise DataNotPrepared(prepare_instructions(shown)) from err


def stratified_split(
  labels: np.ndarray, test_fraction: float, seed: int | Sequence[int]
) -> tuple[np.ndarray, np.ndarray]:
  """Indices of a per-class random split, each returned in increasing order.

  Args:
    labels: ``(n,)`` integer labels.
    test_fraction: share of every class that goes to the test indices.
    seed: seed of the permutation of each class (an int or a sequence of ints,
      as `numpy.random.default_rng` takes).

  Returns:
    ``(train_indices, test_indices)``, disjoint, covering ``range(n)``.
  """
  rng = np.random.default_rng(seed)
  train, test = [], []
  for c in np.unique(labels):
    idx = rng.permutation(np.flatnonzero(labels == c))
    n_test = int(round(test_fraction * idx.size))
    test.append(idx[:n_test])
    train.append(idx[n_test:])
  return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def digits_sources(
  *,
  classes: Sequence[int] | None = None,
  test_fraction: float = 0.25,
  split_seed: int = 0,
) -> tuple[ArraySource, ArraySource]:
  """scikit-learn's bundled digits as ``(train, test)`` sources.

  The 1797 8x8 grayscale images (pixel values 0-16, scaled to [0, 1]) are
  split per class; the split is made on all ten classes before any
  restriction, so the examples of a restricted source are exactly those of
  the same classes in the full one (a model pretrained on some classes never
  saw the full test split).

  Args:
    classes: keep only these digits, in both splits, with their labels
      unchanged (e.g. ``range(5)`` for first-order pretraining on 0-4); None
      keeps all ten.
    test_fraction: share of every class held out for the test split.
    split_seed: seed of the split (the same seed gives the same split).

  Returns:
    ``(train, test)`` `ArraySource`s of float32 ``(n, 8, 8, 1)`` images in
    [0, 1] and int32 labels, in increasing order of the original index.

  Raises:
    ValueError: ``test_fraction`` is not in (0, 1) or ``classes`` names a
      label outside 0-9.
  """
  from sklearn.datasets import load_digits  # examples-only dependency

  if not 0.0 < test_fraction < 1.0:
    raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
  digits = load_digits()
  images = (digits.images / 16.0).astype(np.float32)[..., None]
  labels = digits.target.astype(np.int32)
  train_idx, test_idx = stratified_split(labels, test_fraction, split_seed)
  if classes is not None:
    keep = np.asarray(sorted(set(int(c) for c in classes)), dtype=np.int32)
    if keep.size == 0 or keep.min() < 0 or keep.max() > 9:
      raise ValueError(f"classes must be a non-empty subset of 0-9, got {list(classes)}")
    train_idx = train_idx[np.isin(labels[train_idx], keep)]
    test_idx = test_idx[np.isin(labels[test_idx], keep)]
  return (
    ArraySource(images[train_idx], labels[train_idx]),
    ArraySource(images[test_idx], labels[test_idx]),
  )


# --------------------------------------------------------------------------- per-image transforms


@functools.lru_cache(maxsize=32)
def _resize_weights(in_size: int, out_size: int) -> np.ndarray:
  """``(out_size, in_size)`` weights of a 1-D linear resize (antialiased when shrinking).

  Output pixel ``o`` samples the input at ``(o + 0.5) * in / out - 0.5`` with a
  triangle kernel widened by ``max(1, in / out)``; each row sums to one. This
  is what ``jax.image.resize(..., method="linear")`` computes.
  """
  scale = in_size / out_size
  width = max(1.0, scale)
  centers = (np.arange(out_size) + 0.5) * scale - 0.5
  dist = np.abs(np.arange(in_size)[None, :] - centers[:, None]) / width
  weights = np.maximum(0.0, 1.0 - dist)
  return (weights / weights.sum(axis=1, keepdims=True)).astype(np.float32)


def resize(image: np.ndarray, size: int) -> np.ndarray:
  """Bilinear resize of an ``(h, w, c)`` float image to ``(size, size, c)``.

  Args:
    image: float32 ``(h, w, c)``.
    size: output height and width.

  Returns:
    float32 ``(size, size, c)``; the input itself when it is already that size.
  """
  h, w, _ = image.shape
  if h == size and w == size:
    return image
  rows = _resize_weights(h, size)  # (size, h)
  cols = _resize_weights(w, size)  # (size, w)
  out = np.tensordot(rows, image, axes=(1, 0))  # (size, w, c)
  return np.matmul(cols, out)  # (size, size, c): cols @ out[i] for every row i


def to_unit(image: np.ndarray) -> np.ndarray:
  """An image as float32 in [0, 1]: uint8 is divided by 255, floats are taken as in [0, 1]."""
  if image.dtype == np.uint8:
    return image.astype(np.float32) / 255.0
  return image.astype(np.float32)


def random_crop_flip(image: np.ndarray, rng: np.random.Generator, padding: int) -> np.ndarray:
  """Zero-pads ``padding`` pixels on each side, crops back at random, flips with probability 1/2.

  Args:
    image: ``(h, w, c)`` of any dtype.
    rng: the generator that draws the crop offsets and the flip.
    padding: pixels of zero padding on each side (0: no crop, flip only).

  Returns:
    An ``(h, w, c)`` image of the input's dtype.
  """
  h, w, _ = image.shape
  dy, dx = rng.integers(0, 2 * padding + 1, size=2)
  flip = rng.random() < 0.5
  padded = np.pad(image, ((padding, padding), (padding, padding), (0, 0)))
  out = padded[dy : dy + h, dx : dx + w]
  return out[:, ::-1] if flip else out


def _record(example: Mapping[str, Any]) -> Example:
  """The ``image`` and ``label`` of a source record (other tfds fields are dropped)."""
  return {"image": np.asarray(example["image"]), "label": np.asarray(example["label"], np.int32)}


def _finish(example: Example, image_size: int) -> Example:
  """Resizes to ``image_size`` and normalises to [-1, 1] (float32)."""
  image = resize(to_unit(example["image"]), image_size)
  return {"image": image * 2.0 - 1.0, "label": example["label"]}


def _eval_element(example: Mapping[str, Any], image_size: int) -> Example:
  """Evaluation preprocessing of one record: resize and normalise."""
  return _finish(_record(example), image_size)


def _train_element(
  example: Mapping[str, Any], rng: np.random.Generator, image_size: int, padding: int
) -> Example:
  """Training preprocessing of one record: crop and flip, then resize and normalise."""
  record = _record(example)
  record["image"] = random_crop_flip(record["image"], rng, padding)
  return _finish(record, image_size)


def _stack_padded(examples: Sequence[Example], batch_size: int) -> Example:
  """Stacks examples into a batch, padded to ``batch_size`` with zero images and label -1."""
  images = np.stack([e["image"] for e in examples])
  labels = np.stack([e["label"] for e in examples])
  missing = batch_size - len(examples)
  if missing:
    images = np.concatenate([images, np.zeros((missing,) + images.shape[1:], images.dtype)])
    labels = np.concatenate([labels, np.full((missing,), -1, labels.dtype)])
  return {"image": images, "label": labels}


# --------------------------------------------------------------------------- pipelines


def _seeds(seed: int) -> tuple[int, int]:
  """Independent 32-bit seeds for the shuffle and the augmentation, derived from ``seed``."""
  shuffle_seed, augment_seed = np.random.SeedSequence(seed).generate_state(2)
  return int(shuffle_seed), int(augment_seed)


class _BatchRows(grain.MapDataset):
  """Rows ``start:stop`` of each batch of ``parent.batch(batch_size, drop_remainder=True)``.

  Indexed as grain's batching is (epoch ``e`` of the parent holds its
  elements ``e * len(parent) ...``), but only the elements of those rows are
  read from the parent, so a process prepares only its part of a batch.
  """

  def __init__(self, parent: grain.MapDataset, batch_size: int, start: int, stop: int):
    super().__init__(parent)
    self._batch_size, self._start, self._stop = batch_size, start, stop

  def __len__(self) -> int:
    return len(self._parent) // self._batch_size

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    epoch, index_in_epoch = divmod(index, len(self))
    first = epoch * len(self._parent) + index_in_epoch * self._batch_size
    examples = [self._parent[first + r] for r in range(self._start, self._stop)]
    return {key: np.stack([e[key] for e in examples]) for key in examples[0]}

  def __str__(self) -> str:
    return f"BatchRows(batch_size={self._batch_size}, rows={self._start}:{self._stop})"


def train_dataset(
  source: Sequence[Any],
  *,
  batch_size: int,
  image_size: int,
  seed: int,
  augment: bool = True,
  crop_padding: int = CIFAR100_PADDING,
  num_epochs: int | None = None,
  rows: tuple[int, int] | None = None,
) -> grain.MapDataset:
  """The training pipeline: per-epoch shuffle, augmentation, resize, normalise, batch.

  Args:
    source: a random-access source of dicts with ``"image"`` and ``"label"``
      (`cifar100_source`, `ArraySource`).
    batch_size: examples per batch; the last, incomplete batch of every epoch
      is dropped.
    image_size: height and width of the output images.
    seed: seed of the order and of the augmentation (any non-negative int).
    augment: pad-and-crop plus horizontal flip (see `random_crop_flip`);
      False keeps the images as they are.
    crop_padding: the padding of the random crop, in source pixels.
    num_epochs: passes over the source; None repeats forever.
    rows: ``(start, stop)``: only rows ``start:stop`` of every batch, and
      only those examples are read and transformed (one process's part of
      a global batch in a multi-process run); they equal the same rows of
      the whole batch. None: whole batches.

  Returns:
    A `grain.MapDataset` of batches ``{"image": float32 (batch_size,
    image_size, image_size, c) in [-1, 1], "label": int32 (batch_size,)}``
    (``stop - start`` rows with ``rows``); index ``i`` is batch ``i % steps``
    of epoch ``i // steps``.

  Raises:
    ValueError: the source has fewer than ``batch_size`` examples, or
      ``rows`` is not a non-empty range within a batch.
  """
  if len(source) < batch_size:
    raise ValueError(f"the source has {len(source)} examples, fewer than a batch of {batch_size}")
  if rows is not None and not 0 <= rows[0] < rows[1] <= batch_size:
    raise ValueError(f"rows must be (start, stop) with 0 <= start < stop <= {batch_size}: {rows}")
  shuffle_seed, augment_seed = _seeds(seed)
  ds = grain.MapDataset.source(source).shuffle(seed=shuffle_seed)
  if augment:
    element = functools.partial(_train_element, image_size=image_size, padding=crop_padding)
    ds = ds.random_map(element, seed=augment_seed)
  else:
    ds = ds.map(functools.partial(_eval_element, image_size=image_size))
  if rows is None:
    ds = ds.batch(batch_size, drop_remainder=True)
  else:
    ds = _BatchRows(ds, batch_size, *rows)
  # Indices past the first epoch reach `shuffle` and `random_map` unchanged,
  # so every epoch gets its own permutation and its own crops and flips.
  return ds.repeat(num_epochs)


def eval_dataset(
  source: Sequence[Any],
  *,
  batch_size: int,
  image_size: int,
  pad_remainder: bool = False,
) -> grain.MapDataset:
  """The evaluation pipeline: every example once, in order, resized and normalised.

  Args:
    source: a random-access source of dicts with ``"image"`` and ``"label"``.
    batch_size: examples per batch.
    image_size: height and width of the output images.
    pad_remainder: pad the last batch to ``batch_size`` with zero images and
      label -1 (static shapes for a jitted step; mask on ``label >= 0``);
      False leaves it smaller.

  Returns:
    A finite `grain.MapDataset` of ``{"image", "label"}`` batches, as for
    `train_dataset`.
  """
  ds = grain.MapDataset.source(source).map(functools.partial(_eval_element, image_size=image_size))
  batch_fn = functools.partial(_stack_padded, batch_size=batch_size) if pad_remainder else None
  return ds.batch(batch_size, drop_remainder=False, batch_fn=batch_fn)


def make_iterator(
  dataset: grain.MapDataset, *, num_threads: int = 2, prefetch: int = 4
) -> grain.DatasetIterator:
  """A checkpointable iterator over ``dataset`` that prepares batches in background threads.

  Args:
    dataset: a pipeline from `train_dataset` or `eval_dataset`.
    num_threads: threads preparing batches (0: in the calling thread). The
      batches do not depend on it.
    prefetch: batches prepared ahead.

  Returns:
    A `grain.DatasetIterator` with ``get_state``/``set_state``.
  """
  options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch)
  return iter(dataset.to_iter_dataset(options))


def get_state(iterator: grain.DatasetIterator) -> dict[str, Any]:
  """The iterator's position as a JSON-able dict (``{"next_index": batches_taken}``).

  Args:
    iterator: from `make_iterator`.

  Returns:
    A plain dict of JSON types, for ``ocp.args.JsonSave`` or the ``extras``
    of `zojax.checkpointing.save`.
  """
  return json.loads(json.dumps(iterator.get_state()))


def set_state(iterator: grain.DatasetIterator, state: Mapping[str, Any]) -> None:
  """Moves ``iterator`` to a position saved by `get_state`.

  The iterator must come from the same pipeline (source, batch size, image
  size, seed and augmentation) as the one whose state was saved; its next
  batch is then the one the saved iterator would have returned.

  Args:
    iterator: from `make_iterator`.
    state: a dict from `get_state` (possibly after a JSON round trip).
  """
  iterator.set_state(dict(state))


def batches(
  dataset: grain.MapDataset, *, num_threads: int = 2, prefetch: int = 4
) -> Callable[[], grain.DatasetIterator]:
  """A function that starts a fresh pass over a finite ``dataset`` each call (for evaluation).

  Args:
    dataset: a finite pipeline, e.g. from `eval_dataset`.
    num_threads: as for `make_iterator`.
    prefetch: as for `make_iterator`.

  Returns:
    ``() -> iterator`` over all of ``dataset``'s batches.
  """
  return functools.partial(make_iterator, dataset, num_threads=num_threads, prefetch=prefetch)
