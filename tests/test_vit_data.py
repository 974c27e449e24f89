"""Tests of the ViT example's input pipelines (examples/vit_cifar100/data.py).

CIFAR-100 is never downloaded: ``tfds.testing.mock_data`` (policy
``USE_CODE``) replaces what ``tfds.data_source`` reads with deterministic
random examples of the real feature spec (uint8 32x32x3 images, labels 0-99),
and needs no TensorFlow. The mock gives every split the same ``num_examples``.
"""

import json
import math
import socket
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds

from examples.vit_cifar100 import data

NUM_EXAMPLES = 50  # per mocked split
BATCH = 8
STEPS_PER_EPOCH = NUM_EXAMPLES // BATCH  # 6: two examples dropped every epoch


@pytest.fixture
def cifar():
  """Mocked CIFAR-100 train and test sources."""
  with tfds.testing.mock_data(num_examples=NUM_EXAMPLES, policy=tfds.testing.MockPolicy.USE_CODE):
    yield {split: data.cifar100_source("/nonexistent/tfds", split) for split in ("train", "test")}


def take(iterator, n):
  return [next(iterator) for _ in range(n)]


def assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys() == {"image", "label"}
    np.testing.assert_array_equal(x["image"], y["image"])
    np.testing.assert_array_equal(x["label"], y["label"])


def id_source(n, size=6, seed=0):
  """An in-memory source whose label is the example's index (random uint8 images)."""
  images = np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)
  return data.ArraySource(images, np.arange(n, dtype=np.int32))


# --------------------------------------------------------------------------- image transforms


@pytest.mark.parametrize("size", [5, 20, 48])
def test_resize_matches_jax_linear_resize(size):
  image = np.random.default_rng(0).random((32, 32, 3), dtype=np.float32)
  expected = jax.image.resize(jnp.asarray(image), (size, size, 3), "linear")
  out = data.resize(image, size)
  assert out.shape == (size, size, 3) and out.dtype == np.float32
  np.testing.assert_allclose(out, expected, atol=1e-5)


def test_random_crop_flip_is_a_window_of_the_padded_image():
  image = np.random.default_rng(0).integers(1, 256, (8, 8, 3), dtype=np.uint8)
  padded = np.pad(image, ((4, 4), (4, 4), (0, 0)))
  rng = np.random.default_rng(1)
  flips = set()
  for _ in range(40):
    out = data.random_crop_flip(image, rng, padding=4)
    assert out.shape == image.shape and out.dtype == image.dtype
    windows = {
      (dy, dx, flip)
      for dy in range(9)
      for dx in range(9)
      for flip in (False, True)
      if np.array_equal(out, padded[dy : dy + 8, dx : dx + 8][:, :: -1 if flip else 1])
    }
    assert windows
    flips |= {flip for _, _, flip in windows}
  assert flips == {False, True}


# --------------------------------------------------------------------------- CIFAR-100 (mocked)


@pytest.mark.parametrize("image_size", [32, 224])
def test_train_batches_shapes_dtypes_ranges(cifar, image_size):
  ds = data.train_dataset(cifar["train"], batch_size=BATCH, image_size=image_size, seed=0)
  batch = next(data.make_iterator(ds))
  assert batch.keys() == {"image", "label"}
  assert batch["image"].shape == (BATCH, image_size, image_size, 3)
  assert batch["image"].dtype == np.float32 and batch["label"].dtype == np.int32
  assert batch["label"].shape == (BATCH,)
  assert -1.0 <= batch["image"].min() < 0.0 < batch["image"].max() <= 1.0
  assert ((0 <= batch["label"]) & (batch["label"] < 100)).all()


def test_train_is_deterministic_from_seed(cifar):
  def first_batches(seed, num_threads):
    ds = data.train_dataset(cifar["train"], batch_size=BATCH, image_size=32, seed=seed)
    return take(data.make_iterator(ds, num_threads=num_threads), 3)

  reference = first_batches(0, num_threads=2)
  assert_batches_equal(reference, first_batches(0, num_threads=0))
  other = first_batches(1, num_threads=2)
  assert not np.array_equal(reference[0]["label"], other[0]["label"])
  assert not np.array_equal(reference[0]["image"], other[0]["image"])


def test_resume_matches_uninterrupted_run_across_epochs(cifar):
  def iterator():
    ds = data.train_dataset(cifar["train"], batch_size=BATCH, image_size=32, seed=3)
    return data.make_iterator(ds)

  uninterrupted = take(iterator(), 2 * STEPS_PER_EPOCH + 1)
  k = STEPS_PER_EPOCH - 2
  interrupted = iterator()
  assert_batches_equal(take(interrupted, k), uninterrupted[:k])
  state = json.loads(json.dumps(data.get_state(interrupted)))  # as stored in a checkpoint
  del interrupted
  resumed = iterator()
  data.set_state(resumed, state)
  # The next batches run over the end of the first epoch and past the second.
  assert_batches_equal(take(resumed, len(uninterrupted) - k), uninterrupted[k:])


def test_eval_covers_the_test_split_once_in_order_without_augmentation(cifar):
  source = cifar["test"]
  ds = data.eval_dataset(source, batch_size=BATCH, image_size=32)
  batches = list(data.batches(ds)())
  assert len(batches) == math.ceil(NUM_EXAMPLES / BATCH)
  assert [len(b["label"]) for b in batches[:-1]] == [BATCH] * (len(batches) - 1)
  images = np.concatenate([b["image"] for b in batches])
  labels = np.concatenate([b["label"] for b in batches])
  expected = np.stack([source[i]["image"] for i in range(NUM_EXAMPLES)])
  np.testing.assert_allclose(images, expected / 127.5 - 1.0, atol=1e-6)
  np.testing.assert_array_equal(labels, [source[i]["label"] for i in range(NUM_EXAMPLES)])
  assert labels.dtype == np.int32 and images.dtype == np.float32
  # A second pass gives the same batches.
  assert_batches_equal(list(data.batches(ds)()), batches)


def test_eval_pad_remainder_gives_full_batches_with_masked_padding(cifar):
  ds = data.eval_dataset(cifar["test"], batch_size=BATCH, image_size=16, pad_remainder=True)
  batches = list(data.batches(ds)())
  assert all(b["image"].shape == (BATCH, 16, 16, 3) for b in batches)
  labels = np.concatenate([b["label"] for b in batches])
  pad = (-NUM_EXAMPLES) % BATCH
  assert pad > 0 and len(labels) == NUM_EXAMPLES + pad
  assert (labels[:NUM_EXAMPLES] >= 0).all() and (labels[NUM_EXAMPLES:] == -1).all()
  assert (batches[-1]["image"][BATCH - pad :] == 0).all()


def test_missing_cifar100_raises_fast_without_network(tmp_path, monkeypatch):
  attempts = []

  def no_network(*args, **kwargs):
    attempts.append(args)
    raise OSError("network access in a test")

  monkeypatch.setattr(socket, "getaddrinfo", no_network)
  monkeypatch.setattr(socket, "create_connection", no_network)
  monkeypatch.setattr(socket.socket, "connect", no_network)
  start = time.perf_counter()
  with pytest.raises(data.DataNotPrepared) as info:
    data.cifar100_source(tmp_path, "train")
  elapsed = time.perf_counter() - start
  assert elapsed < 10.0
  assert attempts == []
  assert list(tmp_path.iterdir()) == []  # nothing was downloaded or written
  assert isinstance(info.value, RuntimeError)
  message = str(info.value)
  assert f"tfds build cifar100 --data_dir={tmp_path} --file_format=array_record" in message
  assert "pip install tensorflow tensorflow-datasets" in message
  assert 'download_and_prepare(file_format="array_record")' in message
  assert f"--data-dir {tmp_path}" in message


def test_missing_cifar100_in_the_default_data_dir(tmp_path, monkeypatch):
  monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path))
  with pytest.raises(data.DataNotPrepared, match=f"--data-dir {tmp_path}"):
    data.cifar100_source(None, "test")
  assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- in-memory sources


def test_epochs_are_fresh_permutations_with_the_remainder_dropped():
  n, batch = 20, 6
  ds = data.train_dataset(id_source(n), batch_size=batch, image_size=6, seed=0)
  steps = n // batch
  it = data.make_iterator(ds)
  epochs = [np.concatenate([b["label"] for b in take(it, steps)]) for _ in range(3)]
  for ids in epochs:
    assert len(ids) == steps * batch and len(set(ids.tolist())) == len(ids)
    assert set(ids.tolist()) <= set(range(n))
  assert not np.array_equal(epochs[0], epochs[1])
  assert not np.array_equal(epochs[1], epochs[2])


def test_augmentation_is_redrawn_every_epoch():
  n = 12
  source = id_source(n, size=16)
  ds = data.train_dataset(source, batch_size=n, image_size=16, seed=0, crop_padding=4)
  first, second = take(data.make_iterator(ds), 2)
  by_id = [dict(zip(b["label"].tolist(), b["image"])) for b in (first, second)]
  assert any(not np.array_equal(by_id[0][i], by_id[1][i]) for i in range(n))
  plain = data.train_dataset(source, batch_size=n, image_size=16, seed=0, augment=False)
  unaugmented = next(data.make_iterator(plain))
  for label, image in zip(unaugmented["label"], unaugmented["image"]):
    np.testing.assert_allclose(image, source.images[label] / 127.5 - 1.0, atol=1e-6)


def test_rows_of_batches_are_those_rows_of_the_whole_batches_and_read_only_them():
  n, batch = 20, 6
  source = id_source(n, size=16)
  kwargs = dict(batch_size=batch, image_size=8, seed=0, crop_padding=4)
  whole = take(data.make_iterator(data.train_dataset(source, **kwargs)), 7)  # past 2 epochs
  parts = [(0, 2), (2, 4), (4, 6)]
  for start, stop in parts:
    ds = data.train_dataset(source, rows=(start, stop), **kwargs)
    rows = take(data.make_iterator(ds), 7)
    expected = [{k: v[start:stop] for k, v in b.items()} for b in whole]
    assert_batches_equal(rows, expected)
    for b in rows:
      assert b["image"].dtype == np.float32 and b["label"].dtype == np.int32

  class Counting(data.ArraySource):
    reads = 0

    def __getitem__(self, index):
      Counting.reads += 1
      return super().__getitem__(index)

  ds = data.train_dataset(Counting(source.images, source.labels), rows=(2, 4), **kwargs)
  ds[0], ds[5]  # one batch of the first epoch, one of the second
  assert Counting.reads == 4
  for bad in [(0, 0), (3, 2), (-1, 2), (0, batch + 1)]:
    with pytest.raises(ValueError, match="rows must be"):
      data.train_dataset(source, rows=bad, **kwargs)


def test_train_dataset_rejects_a_source_smaller_than_a_batch():
  with pytest.raises(ValueError, match="fewer than a batch"):
    data.train_dataset(id_source(4), batch_size=5, image_size=6, seed=0)


def test_digits_split_is_deterministic_stratified_and_disjoint():
  train, test = data.digits_sources()
  again_train, again_test = data.digits_sources()
  np.testing.assert_array_equal(train.images, again_train.images)
  np.testing.assert_array_equal(test.labels, again_test.labels)
  assert len(train) + len(test) == 1797
  assert train.images.shape[1:] == (8, 8, 1) and train.images.dtype == np.float32
  assert train.labels.dtype == np.int32
  assert 0.0 <= train.images.min() and train.images.max() <= 1.0
  for c in range(10):
    share = np.sum(test.labels == c) / (np.sum(test.labels == c) + np.sum(train.labels == c))
    assert abs(share - 0.25) < 0.01
  # The 1797 digits images are pairwise distinct, so a shared image is a shared example.
  train_rows = {row.tobytes() for row in train.images}
  assert not any(row.tobytes() in train_rows for row in test.images)
  other_train, _ = data.digits_sources(split_seed=1)
  assert not np.array_equal(train.labels, other_train.labels)


def test_digits_class_restriction_keeps_the_same_split():
  train, test = data.digits_sources()
  low_train, low_test = data.digits_sources(classes=range(5))
  assert set(low_train.labels.tolist()) == set(range(5)) == set(low_test.labels.tolist())
  keep = train.labels < 5
  np.testing.assert_array_equal(low_train.images, train.images[keep])
  np.testing.assert_array_equal(low_train.labels, train.labels[keep])
  np.testing.assert_array_equal(low_test.images, test.images[test.labels < 5])
  with pytest.raises(ValueError, match="subset of 0-9"):
    data.digits_sources(classes=[3, 10])
  with pytest.raises(ValueError, match="test_fraction"):
    data.digits_sources(test_fraction=1.0)


@pytest.mark.parametrize("image_size", [8, 16])
def test_digits_through_the_pipeline(image_size):
  train, test = data.digits_sources(classes=[0, 1, 2, 3, 4])
  ds = data.train_dataset(train, batch_size=32, image_size=image_size, seed=0, augment=False)
  batch = next(data.make_iterator(ds))
  assert batch["image"].shape == (32, image_size, image_size, 1)
  assert batch["image"].dtype == np.float32 and batch["label"].dtype == np.int32
  assert batch["image"].min() == -1.0 and batch["image"].max() <= 1.0
  assert set(batch["label"].tolist()) <= set(range(5))
  evaluated = list(data.batches(data.eval_dataset(test, batch_size=64, image_size=image_size))())
  labels = np.concatenate([b["label"] for b in evaluated])
  np.testing.assert_array_equal(labels, test.labels)
  if image_size == 8:
    images = np.concatenate([b["image"] for b in evaluated])
    np.testing.assert_allclose(images, test.images * 2.0 - 1.0, atol=1e-6)
