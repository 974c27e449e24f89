"""Tests of the LM example's data readers and MeZO sampling (examples/lm_prompt/data.py).

Small files in every supported form are written to ``tmp_path``: GLUE TSVs,
SuperGLUE JSON lines, Hub-style parquet shards, and a ``DatasetDict`` saved the
way ``datasets``' ``save_to_disk`` lays it out (``dataset_dict.json``, then per
split ``data-00000-of-00001.arrow`` in the Arrow IPC stream format,
``dataset_info.json`` and ``state.json``), written here with pyarrow alone.
"""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from examples.lm_prompt import data, tasks

SST2_ROWS = [
  {"sentence": "a charming and often affecting journey . ", "label": 1},
  {"sentence": "unflinchingly bleak and desperate ", "label": 0},
  {"sentence": "the acting , costumes , music are all superb .", "label": 1},
]
RTE_ROWS = [
  {"premise": "Dana Reeve died.", "hypothesis": "Christopher Reeve had an accident.", "label": 1},
  {"premise": "Yet, we now are discovering.", "hypothesis": "Bacteria is winning.", "label": 0},
]
BOOLQ_ROWS = [
  {
    "passage": "Persian is a language.",
    "question": "do iran and afghanistan speak the same language",
    "label": 1,
  },
  {"passage": "Ethanol fuel is a fuel.", "question": "does ethanol take more energy", "label": 0},
]


def write_tsv(path, header, rows):
  path.write_text("\n".join("\t".join(map(str, line)) for line in [header, *rows]) + "\n")


def write_jsonl(path, rows):
  path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def hf_features(columns, names):
  features = {c: {"dtype": "string", "_type": "Value"} for c in columns}
  features["label"] = {"names": list(names), "_type": "ClassLabel"}
  features["idx"] = {"dtype": "int32", "_type": "Value"}
  return features


def hf_table(rows, columns, names):
  table = pa.table(
    {
      **{c: pa.array([r[c] for r in rows], pa.string()) for c in columns},
      "label": pa.array([r["label"] for r in rows], pa.int64()),
      "idx": pa.array(range(len(rows)), pa.int32()),
    }
  )
  meta = {"info": {"features": hf_features(columns, names)}}
  return table.replace_schema_metadata({"huggingface": json.dumps(meta)})


def save_to_disk(root, splits, columns, names, shard_rows=None):
  """A DatasetDict directory as datasets' save_to_disk writes it."""
  root.mkdir(parents=True, exist_ok=True)
  (root / "dataset_dict.json").write_text(json.dumps({"splits": list(splits)}))
  for split, rows in splits.items():
    directory = root / split
    directory.mkdir()
    chunks = (
      [rows]
      if shard_rows is None
      else [rows[i : i + shard_rows] for i in range(0, len(rows), shard_rows)]
    )
    files = []
    for i, chunk in enumerate(chunks):
      name = f"data-{i:05d}-of-{len(chunks):05d}.arrow"
      table = hf_table(chunk, columns, names)
      with pa.OSFile(str(directory / name), "wb") as sink:
        with pa.ipc.new_stream(sink, table.schema) as writer:
          writer.write_table(table)
      files.append({"filename": name})
    info = {"features": hf_features(columns, names), "splits": {}}
    (directory / "dataset_info.json").write_text(json.dumps(info))
    state = {
      "_data_files": files,
      "_fingerprint": "0123456789abcdef",
      "_format_columns": None,
      "_format_kwargs": {},
      "_format_type": None,
      "_output_all_columns": False,
      "_split": split,
    }
    (directory / "state.json").write_text(json.dumps(state))
  return root


def expected(rows, task):
  return [{**{c: r[c] for c in task.columns}, "label": r["label"]} for r in rows]


def test_glue_sst2_tsv(tmp_path):
  write_tsv(
    tmp_path / "train.tsv", ["sentence", "label"], [(r["sentence"], r["label"]) for r in SST2_ROWS]
  )
  write_tsv(tmp_path / "dev.tsv", ["sentence", "label"], [(SST2_ROWS[0]["sentence"], 1)])
  write_tsv(tmp_path / "test.tsv", ["index", "sentence"], [(0, "no label here")])
  assert data.load_split(tasks.SST2, tmp_path, "train") == expected(SST2_ROWS, tasks.SST2)
  assert data.load_split(tasks.SST2, tmp_path, "validation") == expected(SST2_ROWS[:1], tasks.SST2)
  with pytest.raises(data.DataError, match="has no 'label' column"):
    data.load_split(tasks.SST2, tmp_path, "test")


def test_glue_rte_tsv_with_label_names(tmp_path):
  names = tasks.RTE.classes
  rows = [(i, r["premise"], r["hypothesis"], names[r["label"]]) for i, r in enumerate(RTE_ROWS)]
  write_tsv(tmp_path / "dev.tsv", ["index", "sentence1", "sentence2", "label"], rows)
  assert data.load_split(tasks.RTE, tmp_path, "validation") == expected(RTE_ROWS, tasks.RTE)


def test_superglue_jsonl(tmp_path):
  rte = [{**r, "label": tasks.RTE.classes[r["label"]], "idx": i} for i, r in enumerate(RTE_ROWS)]
  write_jsonl(tmp_path / "val.jsonl", rte)
  assert data.load_split(tasks.RTE, tmp_path, "validation") == expected(RTE_ROWS, tasks.RTE)
  boolq = [{**r, "label": bool(r["label"]), "idx": i} for i, r in enumerate(BOOLQ_ROWS)]
  write_jsonl(tmp_path / "train.jsonl", boolq)
  assert data.load_split(tasks.BOOLQ, tmp_path, "train") == expected(BOOLQ_ROWS, tasks.BOOLQ)


def test_hf_boolq_answer_column(tmp_path):
  rows = [
    {"question": r["question"], "answer": bool(r["label"]), "passage": r["passage"]}
    for r in BOOLQ_ROWS
  ]
  write_jsonl(tmp_path / "validation.jsonl", rows)
  assert data.load_split(tasks.BOOLQ, tmp_path, "validation") == expected(BOOLQ_ROWS, tasks.BOOLQ)


def test_parquet_single_and_shards(tmp_path):
  pq.write_table(
    hf_table(SST2_ROWS, ["sentence"], ["negative", "positive"]), tmp_path / "train.parquet"
  )
  assert data.load_split(tasks.SST2, tmp_path, "train") == expected(SST2_ROWS, tasks.SST2)
  (tmp_path / "data").mkdir()
  for i, chunk in enumerate((SST2_ROWS[:2], SST2_ROWS[2:])):
    table = hf_table(chunk, ["sentence"], ["negative", "positive"])
    pq.write_table(table, tmp_path / "data" / f"validation-0000{i}-of-00002.parquet")
  assert data.load_split(tasks.SST2, tmp_path, "validation") == expected(SST2_ROWS, tasks.SST2)


def test_save_to_disk_dataset_dict(tmp_path):
  root = save_to_disk(
    tmp_path / "rte",
    {"train": RTE_ROWS * 3, "validation": RTE_ROWS},
    ["premise", "hypothesis"],
    ["entailment", "not_entailment"],
    shard_rows=4,
  )
  assert len(list((root / "train").glob("*.arrow"))) == 2
  assert data.load_split(tasks.RTE, root, "train") == expected(RTE_ROWS * 3, tasks.RTE)
  assert data.load_split(tasks.RTE, root, "validation") == expected(RTE_ROWS, tasks.RTE)


def test_save_to_disk_reads_shards_in_state_order(tmp_path):
  root = save_to_disk(tmp_path, {"train": SST2_ROWS}, ["sentence"], ["negative", "positive"], 2)
  state_path = root / "train" / "state.json"
  state = json.loads(state_path.read_text())
  state["_data_files"].reverse()
  state_path.write_text(json.dumps(state))
  got = data.load_split(tasks.SST2, root, "train")
  assert got == expected(SST2_ROWS[2:] + SST2_ROWS[:2], tasks.SST2)


def test_reader_writes_nothing(tmp_path):
  save_to_disk(tmp_path / "hf", {"train": SST2_ROWS}, ["sentence"], ["negative", "positive"])
  write_tsv(tmp_path / "dev.tsv", ["sentence", "label"], [("fine", 1)])

  def snapshot():
    return {str(p): (p.stat().st_mtime_ns, p.stat().st_size) for p in sorted(tmp_path.rglob("*"))}

  before = snapshot()
  data.load_split(tasks.SST2, tmp_path / "hf", "train")
  data.load_split(tasks.SST2, tmp_path, "validation")
  assert snapshot() == before


@pytest.mark.parametrize(
  "write, match",
  [
    (lambda d: None, r"no train split of task 'sst2'.*download SST-2 from GLUE"),
    (lambda d: (d / "train.tsv").write_text(""), r"train.tsv' is empty"),
    (lambda d: (d / "train.jsonl").write_text("\n"), r"train.jsonl' holds no examples; download"),
    (
      lambda d: (d / "train.jsonl").write_text('{"sentence": "a", "label": 1}\n{"sentence": \n'),
      r"bad JSON on line 2 of '.*train.jsonl'",
    ),
    (lambda d: (d / "train.jsonl").write_text("[1, 2]\n"), "is a JSON list, not an object"),
    (
      lambda d: write_jsonl(d / "train.jsonl", [{"text": "a", "label": 1}]),
      r"example 1 of '.*train.jsonl' has no 'sentence' column.*it has \['label', 'text'\]",
    ),
    (
      lambda d: write_jsonl(
        d / "train.jsonl", [{"sentence": "a", "label": 1}, {"sentence": "b", "label": 2}]
      ),
      r"example 2 of '.*train.jsonl': label 2 is outside the classes of task 'sst2': 0..1",
    ),
    (
      lambda d: write_jsonl(d / "train.jsonl", [{"sentence": "a", "label": -1}]),
      "test splits of GLUE/SuperGLUE hide their labels",
    ),
    (
      lambda d: write_jsonl(d / "train.jsonl", [{"sentence": "a", "label": "neutral"}]),
      r"label 'neutral' is not a class of task 'sst2'",
    ),
    (
      lambda d: write_tsv(d / "train.tsv", ["sentence", "label"], [("a", 1, "extra")]),
      r"line 2 has 3 tab-separated fields",
    ),
    (
      lambda d: (write_jsonl(d / "train.jsonl", []), write_tsv(d / "train.tsv", ["a"], [])),
      r"several files hold the train split .*train.tsv, train.jsonl",
    ),
    (
      lambda d: pq.write_table(
        hf_table(SST2_ROWS, ["sentence"], ["pos", "neg"]), d / "train.parquet"
      ),
      r"names its labels \['pos', 'neg'\] but task 'sst2' expects \['negative', 'positive'\]",
    ),
    (lambda d: (d / "train.parquet").write_text("not parquet"), "not a readable parquet file"),
    (lambda d: (d / "train").mkdir(), r"holds no .arrow files"),
  ],
)
def test_errors(tmp_path, write, match):
  write(tmp_path)
  with pytest.raises(data.DataError, match=match):
    data.load_split(tasks.SST2, tmp_path, "train")


def test_save_to_disk_errors(tmp_path):
  root = save_to_disk(tmp_path, {"train": SST2_ROWS}, ["sentence"], ["negative", "positive"])
  arrow = root / "train" / "data-00000-of-00001.arrow"
  arrow.rename(root / "train" / "elsewhere.arrow")
  with pytest.raises(data.DataError, match=r"lists data files that are not there"):
    data.load_split(tasks.SST2, root, "train")
  (root / "train" / "state.json").unlink()
  (root / "train" / "elsewhere.arrow").write_bytes(b"garbage")
  with pytest.raises(data.DataError, match="not an Arrow IPC stream or file"):
    data.load_split(tasks.SST2, root, "train")


def test_data_dir_and_split_name_errors(tmp_path):
  with pytest.raises(data.DataError, match="is not a folder: download BoolQ from SuperGLUE"):
    data.load_split(tasks.BOOLQ, tmp_path / "missing", "train")
  with pytest.raises(ValueError, match="unknown split 'dev'"):
    data.load_split(tasks.BOOLQ, tmp_path, "dev")
  assert issubclass(data.DataError, ValueError)


def pool(n, num_classes=2):
  return [{"sentence": f"s{i}", "label": i % num_classes} for i in range(n)]


def test_sample_eval_is_mezo_draw():
  examples = pool(50)
  got = data.sample_eval(examples, 10, seed=7)
  np.random.seed(7)
  want = [examples[i] for i in np.random.permutation(50)[:10]]
  assert got == want == data.sample_eval(examples, 10, seed=7)
  assert got != data.sample_eval(examples, 10, seed=8)
  assert len(data.sample_eval(examples, 1000, seed=0)) == 50


def test_sample_k_shot():
  examples = pool(40, num_classes=3)
  got = data.sample_k_shot(examples, 4, seed=13)
  assert sorted(e["label"] for e in got) == [0] * 4 + [1] * 4 + [2] * 4
  assert len({e["sentence"] for e in got}) == 12
  assert got == data.sample_k_shot(examples, 4, seed=13) != data.sample_k_shot(examples, 4, 21)
  with pytest.raises(data.DataError, match="20 examples per class"):
    data.sample_k_shot(examples, 20, seed=0)


def test_split_train_dev_test():
  train_pool, validation = pool(3000), pool(300)
  for e in validation:
    e["sentence"] = "v" + e["sentence"]
  splits = data.split_train_dev_test(train_pool, validation, seed=0)
  assert [len(s) for s in splits] == [1000, 500, 300]
  names = [{e["sentence"] for e in s} for s in splits]
  assert not names[0] & names[1]
  assert all(n.startswith("v") for n in names[2]) and not any(n.startswith("v") for n in names[0])
  order = np.random.RandomState(0).permutation(3000)
  assert splits.train == [train_pool[i] for i in order[:1000]]
  assert splits.dev == [train_pool[i] for i in order[1000:1500]]
  assert splits.test == data.sample_eval(validation, 1000, 0)
  # A small training split (CB has 250): dev keeps its size, train gets the rest.
  small = data.split_train_dev_test(pool(250), validation, 1000, 100, 50, seed=1)
  assert [len(s) for s in small] == [150, 100, 50]
  with pytest.raises(data.DataError, match="too few"):
    data.split_train_dev_test(pool(100), validation, 1000, 100, 50)
