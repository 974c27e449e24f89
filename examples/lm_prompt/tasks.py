"""Prompt-based classification tasks for decoder LMs, as MeZO fine-tunes them.

MeZO (Malladi et al., arXiv 2305.17333) fine-tunes a decoder LM on a
classification task by turning every example into a prompt whose next token is
the answer, following LM-BFF (Gao et al., arXiv 2012.15723): each class has a
*label word*, and the model's logits at the last prompt token, restricted to the
label words, are the class scores (cross-entropy over them is the training
loss, their argmax the prediction). A `PromptTask` holds what that needs:

* ``columns``: the input fields an example must have (plus an integer
  ``"label"``);
* ``template``: a function of an example returning the prompt as two strings,
  ``(text, tail)``. ``text`` is the first input field, the part that may be
  truncated; ``tail`` is the rest of the prompt, ending right before the answer.
  The prompt is ``text + tail``;
* ``label_words``: one answer string per class, in class-index order, written
  exactly as it continues the prompt. After a word the answer carries its
  leading space (``" great"``), as byte-level BPE tokenizers (GPT-2, OPT,
  Llama 3) spell a word inside a sentence; after a newline it has none
  (``"Yes"``), as in MeZO's SuperGLUE templates.

The templates are MeZO's for OPT (``large_models/templates.py`` of
princeton-nlp/MeZO, whose ``tasks.py`` picks them for these tasks):

* ``sst2``: ``<sentence> It was``, answered " terrible" / " great";
* ``rte``: ``<premise>\\nDoes this mean that "<hypothesis>" is true? Yes or No?\\n``,
  answered "Yes" / "No";
* ``boolq``: ``<passage> <Question>?\\n`` (the question capitalised, a "?"
  added when missing), answered "No" / "Yes";
* ``synthetic-sst2``: SST-2's template on the generated reviews of
  `examples.lm_prompt.synthetic`.

Class indices follow the data sets' own integer labels: SST-2 0 = negative,
1 = positive; RTE 0 = entailment, 1 = not_entailment (GLUE and SuperGLUE
alike); BoolQ 0 = false, 1 = true.

Encoding (`encode_batch`) turns examples into fixed-shape NumPy arrays for a
jitted loss. The truncation rule, when a prompt does not fit ``max_length``:
the BOS token (if any) and every token of the template's tail are kept, and the
*earliest* tokens of ``text`` are dropped until it fits, so the end of the text
next to the question and the answer position always survive (MeZO also drops
tokens from the left). The prompt is tokenized once, whole, and split into text
and tail by the tokenizer's character offsets, so the kept tokens are exactly
those of the untruncated prompt. `encode_causal` is the language-model
encoding (next-token loss on whole texts, or on the targets of
``(prompt, target)`` pairs) for pretraining and generation-style tasks.

Tokenizers are ``tokenizers.Tokenizer`` objects (the ``tokenizer.json`` of a
Hugging Face model, or `synthetic.train_tokenizer`). Text is always encoded
without the tokenizer's own special tokens; a BOS id is prepended only when the
caller passes ``bos_id`` (OPT's tokenizer starts every sequence with ``</s>``,
id 2; Llama's with ``<s>``, id 1).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import tokenizers

Example = Mapping[str, Any]
Template = Callable[[Example], tuple[str, str]]


@dataclasses.dataclass(frozen=True)
class PromptTask:
  """A classification task posed as next-token prediction after a prompt.

  Attributes:
    name: registry name (`TASKS`).
    columns: input fields an example must have, besides ``"label"``; the first
      is the one `encode_batch` truncates.
    template: ``example -> (text, tail)``; the prompt is ``text + tail`` and its
      answer is the next token. ``text`` is the example's first column as it
      appears in the prompt.
    label_words: the answer for each class, in class-index order, spelled as it
      continues the prompt (``" great"`` after a word, ``"Yes"`` after a
      newline).
    classes: a name per class (``("negative", "positive")``), in the same order;
      `data` accepts these names as label values.
    description: one line on where the task and its template come from.
  """

  name: str
  columns: tuple[str, ...]
  template: Template
  label_words: tuple[str, ...]
  classes: tuple[str, ...]
  description: str = ""

  def __post_init__(self):
    if len(self.label_words) != len(self.classes):
      raise ValueError(
        f"task {self.name!r}: {len(self.label_words)} label words for {len(self.classes)} classes"
      )
    if len(set(self.label_words)) != len(self.label_words):
      raise ValueError(f"task {self.name!r}: label words {self.label_words} are not distinct")
    if not self.columns:
      raise ValueError(f"task {self.name!r} needs at least one input column")

  @property
  def num_classes(self) -> int:
    """Number of classes (= number of label words)."""
    return len(self.label_words)

  def prompt(self, example: Example) -> str:
    """The prompt text of ``example``; its answer is the next token."""
    text, tail = self.template(example)
    return text + tail

  def verbalize(self, example: Example, label: int | None = None) -> str:
    """The prompt followed by the label word of ``label`` (default: the example's label).

    Args:
      example: an example with the task's columns.
      label: a class index; ``None`` uses ``example["label"]``.

    Returns:
      ``prompt(example) + label_words[label]``, a text for causal-LM training or
      in-context demonstrations.
    """
    label = example["label"] if label is None else label
    return self.prompt(example) + self.label_words[int(label)]


def _field(example: Example, column: str) -> str:
  """``example[column]`` as stripped text; a clear KeyError when absent."""
  try:
    value = example[column]
  except KeyError:
    raise KeyError(
      f"example has no column {column!r} (it has {sorted(example)}); "
      "read data with examples.lm_prompt.data to get the task's columns"
    ) from None
  return str(value).strip()


def _sst2_template(example: Example) -> tuple[str, str]:
  return _field(example, "sentence"), " It was"


def _rte_template(example: Example) -> tuple[str, str]:
  hypothesis = _field(example, "hypothesis")
  return _field(example, "premise"), f'\nDoes this mean that "{hypothesis}" is true? Yes or No?\n'


def _boolq_template(example: Example) -> tuple[str, str]:
  question = _field(example, "question")
  if not question.endswith("?"):
    question += "?"
  question = question[:1].upper() + question[1:]
  return _field(example, "passage"), f" {question}\n"


SST2 = PromptTask(
  name="sst2",
  columns=("sentence",),
  template=_sst2_template,
  label_words=(" terrible", " great"),
  classes=("negative", "positive"),
  description="GLUE SST-2 sentiment; MeZO's OPT template (LM-BFF's 'It was [great|terrible]')",
)

RTE = PromptTask(
  name="rte",
  columns=("premise", "hypothesis"),
  template=_rte_template,
  label_words=("Yes", "No"),
  classes=("entailment", "not_entailment"),
  description="RTE entailment (GLUE/SuperGLUE); MeZO's OPT template, from PromptSource",
)

BOOLQ = PromptTask(
  name="boolq",
  columns=("passage", "question"),
  template=_boolq_template,
  label_words=("No", "Yes"),
  classes=("false", "true"),
  description="SuperGLUE BoolQ yes/no questions; MeZO's OPT template (passage, question, newline)",
)

SYNTHETIC_SST2 = PromptTask(
  name="synthetic-sst2",
  columns=("sentence",),
  template=_sst2_template,
  label_words=(" terrible", " great"),
  classes=("negative", "positive"),
  description="generated reviews (examples.lm_prompt.synthetic) with SST-2's template; no download",
)

TASKS: dict[str, PromptTask] = {t.name: t for t in (SST2, RTE, BOOLQ, SYNTHETIC_SST2)}
_ALIASES = {"sst-2": "sst2", "synthetic": "synthetic-sst2"}


def get_task(name: str) -> PromptTask:
  """The registered task called ``name`` (case-insensitive; ``"sst-2"`` is ``"sst2"``).

  Args:
    name: a key of `TASKS` or an alias.

  Returns:
    The `PromptTask`.

  Raises:
    ValueError: no such task; the message lists the known names.
  """
  key = name.strip().lower()
  key = _ALIASES.get(key, key)
  if key not in TASKS:
    raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(sorted(TASKS))}")
  return TASKS[key]


def _plain(tokenizer: tokenizers.Tokenizer) -> tokenizers.Tokenizer:
  """``tokenizer`` itself, or a copy without its padding and truncation settings.

  A ``tokenizer.json`` may switch padding or truncation on; both would change
  what `encode` returns, so they are dropped on a copy (the caller's tokenizer
  is left as it is).
  """
  if tokenizer.padding is None and tokenizer.truncation is None:
    return tokenizer
  copy = tokenizers.Tokenizer.from_str(tokenizer.to_str())
  copy.no_padding()
  copy.no_truncation()
  return copy


def _placeholder_example(task: PromptTask) -> dict[str, str]:
  return {column: "x" for column in task.columns}


def label_token_ids(task: PromptTask, tokenizer: tokenizers.Tokenizer) -> np.ndarray:
  """The token id of each class's label word, as it follows the task's prompt.

  Each word is tokenized in context: the prompt of a placeholder example is
  encoded with and without the word appended, and the word must add exactly one
  token while leaving the prompt's tokens unchanged. This gives the id the
  model actually predicts, for byte-level BPE (where ``" great"`` is one token
  and ``"great"`` another) and for SentencePiece (where a word at the very
  start of a text gets a different piece than inside one).

  Args:
    task: the task.
    tokenizer: the model's tokenizer.

  Returns:
    int32 array of shape ``(task.num_classes,)``.

  Raises:
    ValueError: a label word is not a single token after the prompt; the message
      names the word, the task and the pieces it tokenized into.
  """
  tok = _plain(tokenizer)
  context = task.prompt(_placeholder_example(task))
  base = tok.encode(context, add_special_tokens=False).ids
  ids = []
  for word in task.label_words:
    enc = tok.encode(context + word, add_special_tokens=False)
    added, added_pieces = enc.ids[len(base) :], enc.tokens[len(base) :]
    if enc.ids[: len(base)] != base or len(added) != 1:
      pieces = [tok.id_to_token(i) for i in tok.encode(word, add_special_tokens=False).ids]
      raise ValueError(
        f"label word {word!r} of task {task.name!r} is not a single token for this tokenizer: "
        f"after the prompt {context[-20:]!r} it tokenized into {added_pieces} (ids {added}), "
        f"and on its own into {pieces}; scoring needs one token per class (choose another "
        "label word, or score multi-token answers with encode_causal)"
      )
    ids.append(added[0])
  if len(set(ids)) != len(ids):
    raise ValueError(f"label words {task.label_words} of task {task.name!r} share a token: {ids}")
  return np.asarray(ids, np.int32)


def _check_padding(padding_side: str):
  if padding_side not in ("left", "right"):
    raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")


def _row_length(lengths: Sequence[int], max_length: int, pad_to_multiple_of: int | None) -> int:
  """Padded length: ``max_length``, or the longest row rounded up to a multiple."""
  if pad_to_multiple_of is None:
    return max_length
  if pad_to_multiple_of < 1:
    raise ValueError(f"pad_to_multiple_of must be >= 1, got {pad_to_multiple_of}")
  longest = max(lengths, default=1)
  return min(max_length, -(-longest // pad_to_multiple_of) * pad_to_multiple_of)


def _split_at(offsets: Sequence[tuple[int, int]], boundary: int) -> int:
  """Number of leading tokens that start before character ``boundary``."""
  count = 0
  for start, _ in offsets:
    if start >= boundary:
      break
    count += 1
  return count


def _pad(rows: Sequence[Sequence[int]], length: int, pad_id: int, side: str) -> np.ndarray:
  out = np.full((len(rows), length), pad_id, np.int32)
  for i, row in enumerate(rows):
    if side == "left":
      out[i, length - len(row) :] = row
    else:
      out[i, : len(row)] = row
  return out


def encode_batch(
  task: PromptTask,
  tokenizer: tokenizers.Tokenizer,
  examples: Sequence[Example],
  max_length: int,
  pad_id: int,
  padding_side: str = "left",
  *,
  bos_id: int | None = None,
  pad_to_multiple_of: int | None = None,
) -> dict[str, np.ndarray]:
  """Prompts of ``examples`` as padded arrays for next-token classification.

  Each row is ``[bos_id] + tokens(text) + tokens(tail)``. When a prompt is longer
  than ``max_length`` the earliest tokens of its text (the first column) are
  dropped; BOS and the tail always stay (see the module docstring).

  Args:
    task: the task (its template and columns).
    tokenizer: the model's tokenizer; its own special tokens, padding and
      truncation settings are not used.
    examples: mappings with the task's columns and an integer ``"label"``.
    max_length: the longest row, BOS included.
    pad_id: id written at padded positions (masked out by ``attention_mask``).
    padding_side: ``"left"`` (default; every row's answer position is the last
      column, convenient for decoders) or ``"right"``.
    bos_id: prepended to every row when given.
    pad_to_multiple_of: ``None`` pads every batch to ``max_length`` (one shape,
      one compilation); an integer pads to the batch's longest row rounded up to
      a multiple of it (at most ``max_length``).

  Returns:
    A dict of NumPy int32 arrays: ``input_ids`` and ``attention_mask`` of shape
    ``(B, T)``; ``positions`` ``(B,)``, the index of the last prompt token, whose
    next-token logits score the label words; ``labels`` ``(B,)``, the class
    indices.

  Raises:
    ValueError: ``max_length`` leaves no room for at least one text token after
      BOS and the tail, a label is outside the task's classes, or
      ``padding_side`` is unknown.
    KeyError: an example lacks one of the task's columns.
  """
  _check_padding(padding_side)
  tok = _plain(tokenizer)
  parts = [task.template(example) for example in examples]
  encodings = tok.encode_batch([text + tail for text, tail in parts], add_special_tokens=False)
  prefix = [] if bos_id is None else [int(bos_id)]
  rows, labels = [], []
  for example, (text, _), enc in zip(examples, parts, encodings):
    n_text = _split_at(enc.offsets, len(text))
    ids = enc.ids
    budget = max_length - len(prefix) - (len(ids) - n_text)
    if n_text > budget:
      if budget < 1:
        raise ValueError(
          f"max_length={max_length} is too short for task {task.name!r}: BOS and the "
          f"template's tail take {max_length - budget} tokens, leaving none for "
          f"{task.columns[0]!r}"
        )
      ids = ids[n_text - budget :]
    rows.append(prefix + list(ids))
    label = int(example["label"])
    if not 0 <= label < task.num_classes:
      raise ValueError(
        f"label {example['label']!r} is outside the classes of task {task.name!r}: "
        f"0..{task.num_classes - 1} {task.classes}"
      )
    labels.append(label)
  length = _row_length([len(r) for r in rows], max_length, pad_to_multiple_of)
  input_ids = _pad(rows, length, pad_id, padding_side)
  mask = _pad([[1] * len(r) for r in rows], length, 0, padding_side)
  if padding_side == "left":
    positions = np.full(len(rows), length - 1, np.int32)
  else:
    positions = np.asarray([len(r) - 1 for r in rows], np.int32).reshape(len(rows))
  return {
    "input_ids": input_ids,
    "attention_mask": mask,
    "positions": positions,
    "labels": np.asarray(labels, np.int32).reshape(len(rows)),
  }


def encode_causal(
  tokenizer: tokenizers.Tokenizer,
  texts: Sequence[str | tuple[str, str]],
  max_length: int,
  pad_id: int,
  *,
  bos_id: int | None = None,
  eos_id: int | None = None,
  padding_side: str = "right",
  pad_to_multiple_of: int | None = None,
) -> dict[str, np.ndarray]:
  """Texts as padded arrays for a next-token (causal LM) loss.

  A plain string is a target throughout (pretraining); a ``(prompt, target)``
  pair is scored on its target only (generation-style tasks: the prompt is
  context, the answer is what the loss asks for). Each row is ``[bos_id] +
  tokens(text) + [eos_id]`` (BOS and EOS when given; the pair's text is
  ``prompt + target``, tokenized whole and split by character offsets).

  Truncation to ``max_length``: a plain text keeps its first tokens (EOS is then
  dropped); a pair drops its earliest prompt tokens first and, if the target
  alone is still too long, the end of the target.

  The loss over a batch ``b`` with the model's logits ``logits[b, t]`` (the
  prediction of token ``t + 1``) is
  ``-sum_t loss_mask[b, t + 1] * log_softmax(logits[b, t])[input_ids[b, t + 1]]``.

  Args:
    tokenizer: the model's tokenizer (its own special tokens are not used).
    texts: strings, or ``(prompt, target)`` pairs.
    max_length: the longest row, BOS and EOS included.
    pad_id: id written at padded positions.
    bos_id: prepended to every row when given.
    eos_id: appended after every text (a target token) when given.
    padding_side: ``"right"`` (default) or ``"left"``.
    pad_to_multiple_of: as in `encode_batch`.

  Returns:
    A dict of NumPy int32 arrays of shape ``(B, T)``: ``input_ids``,
    ``attention_mask`` (1 on real tokens) and ``loss_mask``: 1 where
    ``input_ids[b, t]`` is a target token predicted from the tokens before it;
    0 on BOS, prompts, padding, and on a row's first token when there is no BOS
    (nothing precedes it).

  Raises:
    ValueError: ``max_length`` < 2, or ``padding_side`` is unknown.
  """
  _check_padding(padding_side)
  if max_length < 2:
    raise ValueError(f"max_length must be >= 2 for a next-token loss, got {max_length}")
  tok = _plain(tokenizer)
  pairs = [(t, "") if isinstance(t, str) else (str(t[0]), str(t[1])) for t in texts]
  plain = [isinstance(t, str) for t in texts]
  encodings = tok.encode_batch([p + q for p, q in pairs], add_special_tokens=False)
  prefix = [] if bos_id is None else [int(bos_id)]
  suffix = [] if eos_id is None else [int(eos_id)]
  rows, targets = [], []
  for (prompt, _), is_plain, enc in zip(pairs, plain, encodings):
    ids = list(enc.ids)
    if is_plain:
      row = (prefix + ids + suffix)[:max_length]
      target = [0] * len(prefix) + [1] * (len(row) - len(prefix))
    else:
      n_prompt = _split_at(enc.offsets, len(prompt))
      context, answer = ids[:n_prompt], ids[n_prompt:] + suffix
      room = max_length - len(prefix)
      # keep one slot for the last prompt token, which predicts the first target token
      answer = answer[: min(len(answer), room - 1 if context else room)]
      context = context[len(context) - min(len(context), room - len(answer)) :]
      row = prefix + context + answer
      target = [0] * (len(prefix) + len(context)) + [1] * len(answer)
    if row:
      target[0] = 0  # the first token has nothing before it to predict it from
    rows.append(row)
    targets.append(target)
  length = _row_length([len(r) for r in rows], max_length, pad_to_multiple_of)
  return {
    "input_ids": _pad(rows, length, pad_id, padding_side),
    "attention_mask": _pad([[1] * len(r) for r in rows], length, 0, padding_side),
    "loss_mask": _pad(targets, length, 0, padding_side),
  }
