"""Tests of the LM example's prompt tasks and encodings (examples/lm_prompt/tasks.py).

Tokenizers are small ones trained here: the synthetic task's byte-level BPE (the
GPT-2/OPT scheme) and a Metaspace BPE that marks word starts with "▁" as
SentencePiece (Llama 1/2) does.
"""

import numpy as np
import pytest
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from examples.lm_prompt import synthetic, tasks

PAD, BOS, EOS = synthetic.PAD_ID, synthetic.BOS_ID, synthetic.EOS_ID

_RTE_TEXT = [
  'A man sleeps.\nDoes this mean that "A man rests." is true? Yes or No?\nYes',
  'A dog barks.\nDoes this mean that "A cat sleeps." is true? Yes or No?\nNo',
]
_BOOLQ_TEXT = ["The sky is blue. Is the sky blue?\nYes", "Snow is cold. Is snow hot?\nNo"]


@pytest.fixture(scope="module")
def tok():
  corpus = synthetic.generate_corpus(2000, seed=0) + (_RTE_TEXT + _BOOLQ_TEXT) * 20
  return synthetic.train_tokenizer(corpus)


@pytest.fixture(scope="module")
def examples():
  return synthetic.generate_task(12, seed=3)


def metaspace_tokenizer(texts, vocab_size=400):
  tok = tokenizers.Tokenizer(models.BPE(unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
  tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
  trainer = trainers.BpeTrainer(
    vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>", "<unk>"], show_progress=False
  )
  tok.train_from_iterator(texts, trainer)
  return tok


def test_registry_and_aliases():
  assert set(tasks.TASKS) == {"sst2", "rte", "boolq", "synthetic-sst2"}
  assert tasks.get_task("SST-2") is tasks.SST2
  assert tasks.get_task(" RTE ") is tasks.RTE
  assert tasks.get_task("synthetic") is tasks.SYNTHETIC_SST2
  with pytest.raises(ValueError, match="known tasks: boolq, rte, sst2, synthetic-sst2"):
    tasks.get_task("mnli")


def test_mezo_templates():
  assert tasks.SST2.prompt({"sentence": " a charming film . "}) == "a charming film . It was"
  assert tasks.SST2.verbalize({"sentence": "bad .", "label": 0}) == "bad . It was terrible"
  rte = {"premise": "A man sleeps.", "hypothesis": "A man rests.", "label": 0}
  assert tasks.RTE.template(rte) == (
    "A man sleeps.",
    '\nDoes this mean that "A man rests." is true? Yes or No?\n',
  )
  assert tasks.RTE.verbalize(rte) == _RTE_TEXT[0]
  boolq = {"passage": "The sky is blue.", "question": "is the sky blue", "label": 1}
  assert tasks.BOOLQ.prompt(boolq) == "The sky is blue. Is the sky blue?\n"
  assert tasks.BOOLQ.verbalize(boolq) == _BOOLQ_TEXT[0]
  assert tasks.SYNTHETIC_SST2.template is tasks.SST2.template
  for task in tasks.TASKS.values():
    assert task.num_classes == len(task.classes) == 2


def test_missing_column_names_it():
  with pytest.raises(KeyError, match="no column 'hypothesis'"):
    tasks.RTE.prompt({"premise": "p"})


def test_task_validation():
  with pytest.raises(ValueError, match="2 label words for 3 classes"):
    tasks.PromptTask("t", ("a",), tasks.SST2.template, (" x", " y"), ("a", "b", "c"))
  with pytest.raises(ValueError, match="not distinct"):
    tasks.PromptTask("t", ("a",), tasks.SST2.template, (" x", " x"), ("a", "b"))


def test_label_token_ids_byte_level(tok):
  ids = tasks.label_token_ids(tasks.SYNTHETIC_SST2, tok)
  assert ids.dtype == np.int32
  assert [tok.id_to_token(int(i)) for i in ids] == ["Ġterrible", "Ġgreat"]
  # After a newline the answer has no leading space.
  assert [tok.id_to_token(int(i)) for i in tasks.label_token_ids(tasks.RTE, tok)] == ["Yes", "No"]
  assert [tok.id_to_token(int(i)) for i in tasks.label_token_ids(tasks.BOOLQ, tok)] == ["No", "Yes"]


def test_label_token_ids_metaspace():
  tok = metaspace_tokenizer(["the film was great . It was great", "It was terrible"] * 20)
  ids = tasks.label_token_ids(tasks.SST2, tok)
  assert [tok.id_to_token(int(i)) for i in ids] == ["▁terrible", "▁great"]


def test_label_word_not_single_token_names_word_task_and_pieces():
  # Too few merges for whole words: " terrible" splits into pieces.
  tok = synthetic.train_tokenizer(["It was terrible", "It was great"] * 5, vocab_size=270)
  with pytest.raises(ValueError) as info:
    tasks.label_token_ids(tasks.SST2, tok)
  message = str(info.value)
  assert "' terrible'" in message and "'sst2'" in message and "not a single token" in message
  assert "tokenized into [" in message


def test_encode_batch_left_padding(tok, examples):
  batch = tasks.encode_batch(tasks.SYNTHETIC_SST2, tok, examples, 40, PAD, bos_id=BOS)
  assert set(batch) == {"input_ids", "attention_mask", "positions", "labels"}
  assert batch["input_ids"].shape == batch["attention_mask"].shape == (12, 40)
  assert all(v.dtype == np.int32 for v in batch.values())
  np.testing.assert_array_equal(batch["positions"], np.full(12, 39))
  np.testing.assert_array_equal(batch["labels"], [e["label"] for e in examples])
  label_ids = tasks.label_token_ids(tasks.SYNTHETIC_SST2, tok)
  for row, mask, example in zip(batch["input_ids"], batch["attention_mask"], examples):
    prompt = tasks.SYNTHETIC_SST2.prompt(example)
    ids = [BOS] + tok.encode(prompt, add_special_tokens=False).ids
    np.testing.assert_array_equal(row[40 - len(ids) :], ids)
    assert (row[: 40 - len(ids)] == PAD).all()
    np.testing.assert_array_equal(mask, [0] * (40 - len(ids)) + [1] * len(ids))
    # The scored position is followed by the label word in the verbalized text.
    full = tok.encode(tasks.SYNTHETIC_SST2.verbalize(example), add_special_tokens=False).ids
    assert full == ids[1:] + [int(label_ids[example["label"]])]


def test_encode_batch_right_padding(tok, examples):
  left = tasks.encode_batch(tasks.SYNTHETIC_SST2, tok, examples, 40, PAD)
  right = tasks.encode_batch(tasks.SYNTHETIC_SST2, tok, examples, 40, PAD, "right")
  lengths = right["attention_mask"].sum(1)
  np.testing.assert_array_equal(right["positions"], lengths - 1)
  for i, n in enumerate(lengths):
    np.testing.assert_array_equal(right["input_ids"][i, :n], left["input_ids"][i, 40 - n :])
    assert right["input_ids"][i, right["positions"][i]] == left["input_ids"][i, -1]
  with pytest.raises(ValueError, match="padding_side"):
    tasks.encode_batch(tasks.SYNTHETIC_SST2, tok, examples, 40, PAD, "middle")


def test_encode_batch_pad_to_multiple(tok, examples):
  batch = tasks.encode_batch(
    tasks.SYNTHETIC_SST2, tok, examples, 64, PAD, bos_id=BOS, pad_to_multiple_of=8
  )
  longest = batch["attention_mask"].sum(1).max()
  assert batch["input_ids"].shape[1] == -(-longest // 8) * 8 < 64


def test_truncation_drops_earliest_text_tokens(tok):
  example = {"premise": " ".join(["the film was fine ."] * 30), "hypothesis": "A man rests."}
  example["label"] = 1
  tail = tasks.RTE.template(example)[1]
  tail_ids = tok.encode(tail, add_special_tokens=False).ids
  text_ids = tok.encode(example["premise"], add_special_tokens=False).ids
  max_length = 1 + len(tail_ids) + 10
  batch = tasks.encode_batch(tasks.RTE, tok, [example], max_length, PAD, bos_id=BOS)
  row = batch["input_ids"][0].tolist()
  assert row == [BOS] + text_ids[-10:] + tail_ids
  assert batch["attention_mask"].all() and batch["positions"][0] == max_length - 1
  # No room left for the text at all: an error saying so.
  with pytest.raises(ValueError, match="leaving none for 'premise'"):
    tasks.encode_batch(tasks.RTE, tok, [example], 1 + len(tail_ids), PAD, bos_id=BOS)


def test_label_out_of_range(tok):
  with pytest.raises(ValueError, match="outside the classes of task 'sst2'"):
    tasks.encode_batch(tasks.SST2, tok, [{"sentence": "fine .", "label": 2}], 16, PAD)


def test_tokenizer_settings_ignored_and_untouched(tok, examples):
  padded = tokenizers.Tokenizer.from_str(tok.to_str())
  padded.enable_padding(pad_id=PAD, length=50)
  padded.enable_truncation(max_length=3)
  a = tasks.encode_batch(tasks.SYNTHETIC_SST2, tok, examples, 40, PAD)
  b = tasks.encode_batch(tasks.SYNTHETIC_SST2, padded, examples, 40, PAD)
  for key in a:
    np.testing.assert_array_equal(a[key], b[key])
  assert padded.padding is not None and padded.truncation is not None


def test_encode_causal_plain(tok):
  texts = ["the film was fine .", "it ran for two hours . the plot was slow ."]
  batch = tasks.encode_causal(tok, texts, 32, PAD, bos_id=BOS, eos_id=EOS)
  assert set(batch) == {"input_ids", "attention_mask", "loss_mask"}
  for row, mask, loss, text in zip(*batch.values(), texts):
    ids = [BOS] + tok.encode(text, add_special_tokens=False).ids + [EOS]
    n = len(ids)
    assert row[:n].tolist() == ids and (row[n:] == PAD).all()
    assert mask.tolist() == [1] * n + [0] * (32 - n)
    assert loss.tolist() == [0] + [1] * (n - 1) + [0] * (32 - n)
  # Without BOS the first token has nothing to be predicted from.
  batch = tasks.encode_causal(tok, texts, 32, PAD)
  assert batch["loss_mask"][:, 0].tolist() == [0, 0]
  assert batch["loss_mask"][0, 1] == 1
  # Truncation keeps the first tokens.
  batch = tasks.encode_causal(tok, texts, 4, PAD, bos_id=BOS, eos_id=EOS)
  ids = [BOS] + tok.encode(texts[1], add_special_tokens=False).ids
  assert batch["input_ids"][1].tolist() == ids[:4]


def test_encode_causal_pairs(tok):
  prompt, target = "the film was fine . It was", " great"
  batch = tasks.encode_causal(tok, [(prompt, target)], 16, PAD, bos_id=BOS, padding_side="left")
  p_ids = tok.encode(prompt, add_special_tokens=False).ids
  t_ids = tok.encode(prompt + target, add_special_tokens=False).ids[len(p_ids) :]
  n = 1 + len(p_ids) + len(t_ids)
  assert batch["input_ids"][0, 16 - n :].tolist() == [BOS] + p_ids + t_ids
  assert batch["loss_mask"][0].tolist() == [0] * (16 - len(t_ids)) + [1] * len(t_ids)
  # Truncation drops the prompt's start and keeps the target.
  short = tasks.encode_causal(tok, [(prompt, target)], 4, PAD, bos_id=BOS)
  assert short["input_ids"][0].tolist() == [BOS] + p_ids[-2:] + t_ids
  assert short["loss_mask"][0].tolist() == [0, 0, 0, 1]
  with pytest.raises(ValueError, match="max_length"):
    tasks.encode_causal(tok, ["x"], 1, PAD)
