"""A generated sentiment task that stands in for SST-2 where nothing can be downloaded.

What it is. A small artificial "review" language: clauses such as
``the plot was not very bland`` joined by ``and`` or ``but``, sometimes after a
neutral sentence (``i watched it on sunday .``). Adjectives carry a graded
polarity (`POLARITY`: -2, -1, +1, +2; `NEUTRAL_ADJECTIVES` carry 0). The label
is the sign of the review's score (`polarity`):

* an intensifier (``very``, ``truly``, ...) raises the adjective's magnitude
  by one: ``very bland`` is -2, ``very superb`` +3;
* ``not`` turns the adjective into a mild opposite whatever its strength:
  ``not awful`` and ``not bland`` are +1, ``not superb`` is -1;
* a clause opened by ``but`` counts `CONTRAST_WEIGHT` (3) times, and the
  generator makes it contrast with the clause before, so it usually decides;
* the clause values, so weighted, are summed; reviews scoring 0 are never
  generated.

Why it stands in for SST-2. It is posed exactly as MeZO poses SST-2 (Malladi et
al., arXiv 2305.17333): the task ``synthetic-sst2`` of `tasks` uses SST-2's
template ``<sentence> It was`` and label words `` terrible`` / `` great``, so the
example runs the same prompt-scoring code on it as on real data. Like SST-2's
phrase-level sentiment, the label needs composition (negation, contrast), so
partial rules reach graded accuracies. On ``generate_task(4000, seed=0)``
(`baseline_accuracies`; a tie counts as half right):

=========================================  ========
rule                                       accuracy
=========================================  ========
chance (balanced classes)                  0.50
sum of polarities, ignoring not and but    0.67
with ``not``, ignoring the but-weight      0.82
with the but-weight, ignoring ``not``      0.75
the last clause alone, with ``not``        0.90
the full rule                              1.00
=========================================  ========

MeZO's regime is a pretrained LM whose prompt already half-works (OPT-13B
reads SST-2 zero-shot at 58.8% and MeZO lifts it to 91.4%, its Table 1).
`generate_corpus` makes such a prior for a small model pretrained on it (by
the example's training program, with Adam): besides plain reviews and neutral
text, a share of the documents are reviews followed by the template's tail,
``<review> It was great .``, whose label word mostly follows the *surface*
rule (the second row above, 0.67) and only sometimes the real one, with some
noise on top. A model fit to the corpus therefore prefers the surface answer
after ``It was``: its zero-shot accuracy sits near the surface rule's
agreement with the truth (well above chance, well below the ceiling), while
its representation has seen negation and contrast used. Fine-tuning on the
task's true labels has to move it from the surface rule up the ladder above,
so methods that learn more of the composition per forward pass separate.

A check of the design (a throwaway 2-layer, 64-wide transformer of 110k
parameters, not the example's model): pretrained with AdamW (peak lr 3e-3,
2500 steps of 64 documents of ``generate_corpus(20000, 0)``), its prompt
accuracy on ``generate_task(1000, 200)`` stayed at chance for about 1000 steps,
then rose to 0.73 (its answers agreed with the surface rule on 91% of the
reviews); fine-tuned on ``generate_task(1000, 100)`` with batches of 16, Adam
(lr 3e-4) reached 0.91 in 1000 steps and MeZO (lr 1e-4, eps 1e-3) 0.78 in 4000
steps (MeZO at lr 1e-3 fell to chance).

Everything is deterministic in the seed: `generate_task` and
`generate_corpus` draw from ``numpy.random.default_rng([seed, stream])`` with a
different stream each, so a task and a corpus made from the same seed are
independent. `train_tokenizer` trains a byte-level BPE (the GPT-2/OPT scheme)
on generated text, with ``<pad>``, ``<s>``, ``</s>``, ``<unk>`` as ids 0 to 3.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from examples.lm_prompt import tasks as tasks_lib

TASK = tasks_lib.SYNTHETIC_SST2

POLARITY: dict[str, int] = {
  **dict.fromkeys(("wonderful", "brilliant", "superb", "stunning", "delightful", "masterful"), 2),
  **dict.fromkeys(("fine", "pleasant", "decent", "solid", "charming", "likable"), 1),
  **dict.fromkeys(("bland", "flat", "slow", "uneven", "forgettable", "clumsy"), -1),
  **dict.fromkeys(("awful", "dreadful", "painful", "lifeless", "boring", "horrible"), -2),
}
NEUTRAL_ADJECTIVES = ("long", "short", "loud", "quiet", "familiar", "modern", "colorful")
ASPECTS = (
  "film",
  "plot",
  "cast",
  "acting",
  "script",
  "music",
  "ending",
  "pacing",
  "dialogue",
  "story",
  "soundtrack",
  "humor",
  "lead",
  "editing",
  "villain",
  "finale",
)
VERBS = ("was", "is", "felt", "seemed")
INTENSIFIERS = ("very", "truly", "really", "so")
NEGATION = "not"
JOIN = "and"
CONTRAST = "but"
CONTRAST_WEIGHT = 3
END = "."

# Neutral sentences: before a review, and as the corpus's plain text.
_FILLERS = (
  ("i watched it on", ("monday", "tuesday", "friday", "saturday", "sunday")),
  ("we saw it with", ("friends", "family", "my sister", "my parents", "a colleague")),
  ("the theater was", ("crowded", "empty", "cold", "warm", "dark")),
  ("it ran for", ("two hours", "ninety minutes", "three hours")),
  ("the tickets cost", ("ten dollars", "twelve dollars", "nothing")),
)

# Review generation.
CLAUSE_COUNTS = (1, 2, 3)
CLAUSE_COUNT_PROBS = (0.2, 0.5, 0.3)
P_FILLER = 0.3  # a neutral sentence before the review
P_CONTRAST = 0.6  # a later clause opens with "but" (else "and")
P_NEGATION = 0.3
P_INTENSIFIER = 0.3
P_NEUTRAL = 0.15  # a neutral adjective (never in a "but" clause)

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")
PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3

_TASK_STREAM, _CORPUS_STREAM = 1, 2
_POSITIVE = tuple(w for w, p in POLARITY.items() if p > 0)
_NEGATIVE = tuple(w for w, p in POLARITY.items() if p < 0)


def _score(
  sentence: str, negation: bool = True, contrast: bool = True, last_only: bool = False
) -> int:
  """The review score, optionally with parts of the rule switched off."""
  weight, negated, boosted = 1, False, False
  values = []
  for word in sentence.split():
    if word in (END, JOIN, CONTRAST):
      weight = CONTRAST_WEIGHT if (word == CONTRAST and contrast) else 1
      negated = boosted = False
    elif word == NEGATION:
      negated = True
    elif word in INTENSIFIERS:
      boosted = True
    elif word in POLARITY:
      base = POLARITY[word]
      sign = 1 if base > 0 else -1
      value = -sign if (negated and negation) else base + sign * boosted
      values.append(weight * value)
  if last_only:
    return values[-1] if values else 0
  return sum(values)


def polarity(sentence: str) -> int:
  """The score of a review under the task's rule (see the module docstring).

  Args:
    sentence: words separated by spaces; words outside the vocabulary count 0.

  Returns:
    The weighted sum of the clause values; positive means class 1.
  """
  return _score(sentence)


def surface_polarity(sentence: str) -> int:
  """The score with ``not`` and the but-weight ignored: the corpus's noisy prior."""
  return _score(sentence, negation=False, contrast=False)


def label(sentence: str) -> int:
  """The class of a review: 1 (positive, " great") if `polarity` > 0, 0 if < 0.

  Raises:
    ValueError: the score is 0 (no class; the generator never makes such reviews).
  """
  score = polarity(sentence)
  if score == 0:
    raise ValueError(f"review {sentence!r} scores 0 and has no class")
  return int(score > 0)


def _pick(rng: np.random.Generator, options: Sequence[Any]) -> Any:
  return options[int(rng.integers(len(options)))]


def _filler(rng: np.random.Generator) -> str:
  head, tails = _pick(rng, _FILLERS)
  return f"{head} {_pick(rng, tails)} {END}"


def generate_review(rng: np.random.Generator) -> str:
  """One review of the language (its score may be 0; `generate_task` skips those).

  Args:
    rng: the NumPy generator to draw from.

  Returns:
    Lower-case words separated by single spaces, ending with " .".
  """
  words = [_filler(rng)] if rng.random() < P_FILLER else []
  previous = 0  # sign of the last polar clause
  for i in range(int(rng.choice(CLAUSE_COUNTS, p=CLAUSE_COUNT_PROBS))):
    conj = None if i == 0 else (CONTRAST if rng.random() < P_CONTRAST else JOIN)
    negated = rng.random() < P_NEGATION
    boosted = rng.random() < P_INTENSIFIER
    if conj != CONTRAST and rng.random() < P_NEUTRAL:
      adjective = _pick(rng, NEUTRAL_ADJECTIVES)
    else:
      if conj == CONTRAST and previous:
        wanted = -previous  # "but" contrasts with the clause before
      else:
        wanted = 1 if rng.random() < 0.5 else -1
      surface = wanted if not negated else -wanted
      adjective = _pick(rng, _POSITIVE if surface > 0 else _NEGATIVE)
      previous = wanted
    clause = [conj] if conj else []
    clause += ["the", _pick(rng, ASPECTS), _pick(rng, VERBS)]
    clause += [NEGATION] if negated else []
    clause += [_pick(rng, INTENSIFIERS)] if boosted else []
    words.append(" ".join([*clause, adjective]))
  return " ".join([*words, END])


def generate_task(n: int, seed: int) -> list[dict[str, Any]]:
  """``n`` labelled reviews with balanced classes, deterministic in ``seed``.

  Reviews are drawn with `generate_review` and kept until each class has
  ``n // 2`` (class 1 gets the odd one); the result is shuffled.

  Args:
    n: number of examples.
    seed: integer seed.

  Returns:
    A list of ``{"sentence": str, "label": int}``, the columns of task
    ``synthetic-sst2``.
  """
  rng = np.random.default_rng([seed, _TASK_STREAM])
  wanted = {0: n // 2, 1: n - n // 2}
  examples = []
  while len(examples) < n:
    sentence = generate_review(rng)
    score = polarity(sentence)
    cls = int(score > 0)
    if score != 0 and wanted[cls] > 0:
      wanted[cls] -= 1
      examples.append({"sentence": sentence, "label": cls})
  return [examples[i] for i in rng.permutation(n)]


def generate_corpus(
  n_docs: int,
  seed: int,
  *,
  labelled_fraction: float = 0.7,
  text_fraction: float = 0.2,
  rule_fraction: float = 0.3,
  label_noise: float = 0.1,
) -> list[str]:
  """Pretraining documents that give an LM a partial prior on the task.

  Each document is one of (drawn independently):

  * with probability ``labelled_fraction``, a review followed by the task's
    prompt tail and an answer, ``<review> It was great .``: the answer is the
    review's true class with probability ``rule_fraction``, else its surface
    class (`surface_polarity`; a fair coin when that is 0), and is then flipped
    with probability ``label_noise``;
  * with probability ``text_fraction``, one to three neutral sentences;
  * otherwise, a review alone.

  Args:
    n_docs: number of documents.
    seed: integer seed.
    labelled_fraction: share of reviews followed by an answer.
    text_fraction: share of neutral text.
    rule_fraction: share of answers that follow the true rule.
    label_noise: probability that an answer is flipped.

  Returns:
    ``n_docs`` strings, deterministic in the arguments.

  Raises:
    ValueError: a fraction outside [0, 1], or the two shares summing past 1.
  """
  shares = dict(labelled_fraction=labelled_fraction, text_fraction=text_fraction)
  probs = dict(shares, rule_fraction=rule_fraction, label_noise=label_noise)
  for name, value in probs.items():
    if not 0.0 <= value <= 1.0:
      raise ValueError(f"{name} must be in [0, 1], got {value}")
  if labelled_fraction + text_fraction > 1.0:
    raise ValueError(f"labelled_fraction + text_fraction must be <= 1, got {shares}")
  rng = np.random.default_rng([seed, _CORPUS_STREAM])
  docs = []
  for _ in range(n_docs):
    kind = rng.random()
    if kind < text_fraction:
      docs.append(" ".join(_filler(rng) for _ in range(int(rng.integers(1, 4)))))
      continue
    review = generate_review(rng)
    if kind >= text_fraction + labelled_fraction:
      docs.append(review)
      continue
    score = polarity(review) if rng.random() < rule_fraction else surface_polarity(review)
    answer = int(score > 0) if score != 0 else int(rng.random() < 0.5)
    if rng.random() < label_noise:
      answer = 1 - answer
    docs.append(TASK.verbalize({"sentence": review}, answer) + f" {END}")
  return docs


def baseline_accuracies(examples: Iterable[Mapping[str, Any]]) -> dict[str, float]:
  """Accuracy of partial rules on labelled reviews (a tie scores 1/2).

  Args:
    examples: ``{"sentence", "label"}`` mappings, as from `generate_task`.

  Returns:
    ``{"surface", "negation_only", "contrast_only", "last_clause", "rule"}`` ->
    accuracy: the rule without ``not`` and the but-weight, without the
    but-weight, without ``not``, on the last polar clause only, and whole.
  """
  rules = {
    "surface": dict(negation=False, contrast=False),
    "negation_only": dict(contrast=False),
    "contrast_only": dict(negation=False),
    "last_clause": dict(last_only=True),
    "rule": {},
  }
  hits = dict.fromkeys(rules, 0.0)
  count = 0
  for example in examples:
    count += 1
    for name, kwargs in rules.items():
      score = _score(example["sentence"], **kwargs)
      hits[name] += 0.5 if score == 0 else float(int(score > 0) == int(example["label"]))
  return {name: hit / max(count, 1) for name, hit in hits.items()}


def train_tokenizer(texts: Iterable[str], vocab_size: int = 1024) -> tokenizers.Tokenizer:
  """A byte-level BPE tokenizer trained on ``texts``, as GPT-2 and OPT tokenize.

  Words keep their leading space in the token (``" great"`` is one token,
  ``"Ġgreat"``), so label words are scored as with OPT. The special tokens
  ``<pad>``, ``<s>``, ``</s>``, ``<unk>`` get ids 0 to 3 (`PAD_ID`, `BOS_ID`,
  `EOS_ID`, `UNK_ID`); no post-processor adds them (callers pass ``bos_id``).
  With the default ``vocab_size`` the merges run out before the vocabulary
  does on this language's text, so every word as it occurs in ``texts`` (with
  its leading space inside a sentence) becomes a single token.

  Args:
    texts: training text, e.g. `generate_corpus` output.
    vocab_size: vocabulary size, the 256 byte symbols and the specials included.

  Returns:
    The trained `tokenizers.Tokenizer`.
  """
  tokenizer = tokenizers.Tokenizer(models.BPE(unk_token="<unk>"))
  tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tokenizer.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
    vocab_size=vocab_size,
    special_tokens=list(SPECIAL_TOKENS),
    initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    show_progress=False,
  )
  tokenizer.train_from_iterator(texts, trainer)
  return tokenizer
