"""Tests of the LM example's generated task (examples/lm_prompt/synthetic.py)."""

import time

import numpy as np
import pytest

from examples.lm_prompt import synthetic, tasks

VOCABULARY = (
  set(synthetic.POLARITY)
  | set(synthetic.NEUTRAL_ADJECTIVES)
  | set(synthetic.ASPECTS)
  | set(synthetic.VERBS)
  | set(synthetic.INTENSIFIERS)
  | {"the", synthetic.NEGATION, synthetic.JOIN, synthetic.CONTRAST, synthetic.END}
  | {w for head, tails in synthetic._FILLERS for part in (head, *tails) for w in part.split()}
)


@pytest.mark.parametrize(
  "sentence, score",
  [
    ("the film was superb .", 2),
    ("the plot was bland .", -1),
    ("the cast was very bland .", -2),
    ("the cast was truly superb .", 3),
    ("the film was not awful .", 1),
    ("the film was not very superb .", -1),
    ("the film was long .", 0),
    ("the plot was bland but the cast was wonderful .", -1 + 3 * 2),
    ("the film was wonderful but the ending was very painful .", 2 - 3 * 3),
    ("the film was wonderful and the ending was painful .", 0),
    ("the music was decent and the plot was not slow but the lead was dreadful .", 1 + 1 - 6),
    ("i watched it on sunday . the plot felt not bland .", 1),
  ],
)
def test_rule_on_handwritten_reviews(sentence, score):
  assert synthetic.polarity(sentence) == score
  if score:
    assert synthetic.label(sentence) == int(score > 0)
  else:
    with pytest.raises(ValueError, match="scores 0"):
      synthetic.label(sentence)


def test_surface_rule_ignores_negation_and_contrast():
  sentence = "the plot was not bland but the cast was wonderful ."
  assert synthetic.surface_polarity(sentence) == -1 + 2
  assert synthetic.polarity(sentence) == 1 + 3 * 2


def test_task_deterministic_balanced_and_labelled_by_rule():
  a = synthetic.generate_task(501, seed=4)
  assert a == synthetic.generate_task(501, seed=4)
  assert a != synthetic.generate_task(501, seed=5)
  labels = [e["label"] for e in a]
  assert labels.count(0) == 250 and labels.count(1) == 251
  assert all(synthetic.label(e["sentence"]) == e["label"] for e in a)
  assert set(a[0]) == {"sentence", "label"} == {*tasks.SYNTHETIC_SST2.columns, "label"}
  assert {w for e in a for w in e["sentence"].split()} <= VOCABULARY
  assert all(e["sentence"].endswith(" .") for e in a)
  assert "great" not in VOCABULARY and "terrible" not in VOCABULARY


def test_ladder_matches_docstring():
  # The table in the module docstring, rounded to two decimals.
  got = synthetic.baseline_accuracies(synthetic.generate_task(4000, seed=0))
  want = dict(surface=0.67, negation_only=0.82, contrast_only=0.75, last_clause=0.90, rule=1.0)
  assert got == pytest.approx(want, abs=0.005)


def test_corpus_deterministic_and_prior_is_partial():
  docs = synthetic.generate_corpus(3000, seed=1)
  assert docs == synthetic.generate_corpus(3000, seed=1)
  assert docs != synthetic.generate_corpus(3000, seed=2)
  tails = {" It was great .": 1, " It was terrible .": 0}
  labelled = [(d[: -len(t)], a) for d in docs for t, a in tails.items() if d.endswith(t)]
  assert len(labelled) / len(docs) == pytest.approx(0.7, abs=0.03)
  labelled = [
    (r, a) for r, a in labelled if synthetic.polarity(r) and synthetic.surface_polarity(r)
  ]
  truth = np.mean([synthetic.label(r) == a for r, a in labelled])
  surface = np.mean([int(synthetic.surface_polarity(r) > 0) == a for r, a in labelled])
  # Expected about 0.72 and 0.82 (30% true answers, 70% surface ones, 10% flipped).
  assert 0.6 < truth < surface < 0.9
  none = synthetic.generate_corpus(500, seed=1, labelled_fraction=0.0)
  assert not any("It was" in d for d in none)


def test_task_and_corpus_streams_differ():
  reviews = {e["sentence"] for e in synthetic.generate_task(200, seed=0)}
  docs = synthetic.generate_corpus(200, seed=0, text_fraction=0.0, labelled_fraction=0.0)
  assert len(reviews & set(docs)) < 20


def test_corpus_argument_checks():
  with pytest.raises(ValueError, match="label_noise"):
    synthetic.generate_corpus(10, 0, label_noise=1.5)
  with pytest.raises(ValueError, match="<= 1"):
    synthetic.generate_corpus(10, 0, labelled_fraction=0.8, text_fraction=0.3)


def test_tokenizer_fast_special_ids_and_single_token_words():
  docs = synthetic.generate_corpus(5000, seed=0)
  start = time.perf_counter()
  tok = synthetic.train_tokenizer(docs)
  assert time.perf_counter() - start < 1.0
  assert [tok.token_to_id(t) for t in synthetic.SPECIAL_TOKENS] == [
    synthetic.PAD_ID,
    synthetic.BOS_ID,
    synthetic.EOS_ID,
    synthetic.UNK_ID,
  ]
  ids = tasks.label_token_ids(tasks.SYNTHETIC_SST2, tok)
  assert [tok.id_to_token(int(i)) for i in ids] == ["Ġterrible", "Ġgreat"]
  assert all(len(tok.encode(" " + w, add_special_tokens=False).ids) == 1 for w in VOCABULARY)
  text = docs[0]
  assert tok.decode(tok.encode(text, add_special_tokens=False).ids) == text
  assert tok.to_str() == synthetic.train_tokenizer(docs).to_str()
