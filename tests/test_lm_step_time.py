"""Smoke test of benchmarks/lm_step_time.py on a one-layer decoder."""

from __future__ import annotations

import json

from benchmarks import lm_step_time


def test_reports_each_preset_over_the_forward_and_records_the_flags(tmp_path, monkeypatch):
  monkeypatch.setenv("XLA_FLAGS", "")
  out = tmp_path / "t.json"
  argv = ["--presets", "mezo", "--layers", "1", "--batch-size", "2", "--length", "8"]
  result = lm_step_time.main([*argv, "--repeats", "1", "--out", str(out)])
  (row,) = result["rows"]
  assert row["preset"] == "mezo" and row["step_ms"] > 0
  assert row["over_forward"] == row["step_ms"] / result["forward_ms"]  # no timing is asserted
  written = json.loads(out.read_text())
  assert written["config"]["xla_flags"] == "" and written["rows"][0]["preset"] == "mezo"
