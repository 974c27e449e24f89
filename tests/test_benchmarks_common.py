"""Tests for benchmarks/common.py's resumable parts."""

from __future__ import annotations

import json
import os

from benchmarks import common


def test_checkpoint_round_trips_and_only_matches_its_settings(tmp_path):
  settings = {"seeds": [0, 1], "lr_factors": [0.5, 1.0], "budget": 100}
  payload = {"curves": [[0.1, float("nan")]], "lr": 1e-3}
  directory = str(tmp_path / "parts")
  assert common.read_checkpoint(directory, "mezo", settings) is None  # nothing saved yet
  common.write_checkpoint(directory, "mezo", settings, payload)
  back = common.read_checkpoint(directory, "mezo", settings)
  assert back["lr"] == 1e-3 and back["curves"][0][0] == 0.1 and back["curves"][0][1] != 0.1
  assert common.read_checkpoint(directory, "mezo", {**settings, "budget": 200}) is None
  assert common.read_checkpoint(directory, "mezo", {**settings, "seeds": [0, 2]}) is None
  assert common.read_checkpoint(directory, "zo_muon", settings) is None
  assert common.read_checkpoint(None, "mezo", settings) is None  # resuming off
  assert not [f for f in os.listdir(directory) if f.endswith(".tmp")]  # written atomically


def test_checkpoint_settings_compare_as_json_values(tmp_path):
  # Tuples come back as lists and ints stay ints: a resumed run passes the same settings.
  settings = {"seeds": (0, 1), "knobs": {"rank": 4, "k": None}}
  common.write_checkpoint(str(tmp_path), "a", settings, {"x": 1})
  assert common.read_checkpoint(str(tmp_path), "a", settings) == {"x": 1}
  with open(tmp_path / "a.json") as f:
    assert json.load(f)["settings"]["seeds"] == [0, 1]


def test_write_checkpoint_without_a_directory_writes_nothing(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  common.write_checkpoint(None, "a", {}, {"x": 1})
  assert os.listdir(tmp_path) == []
