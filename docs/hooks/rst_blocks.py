"""MkDocs hook: render the reStructuredText blocks of zojax docstrings.

Some docstrings write display math as an RST ``.. math::`` directive and a
code sample as a paragraph ending in ``::`` followed by an indented block.
Neither is Markdown, so this hook adds a Markdown preprocessor (to the site's
Markdown and, through ``markdown_extensions``, to mkdocstrings) that turns the
first into an arithmatex display block, ``\\[ ... \\]``, and the second into a
fenced Python code block. Text outside such blocks is left unchanged.
"""

from __future__ import annotations

import re

from markdown import Extension
from markdown.preprocessors import Preprocessor
from mkdocs.plugins import event_priority

_MATH = re.compile(r"^(\s*)\.\. math::\s*$")
_LITERAL = re.compile(r"^(\s*)(\S.*)::\s*$")


def _indent(line: str) -> int:
  return len(line) - len(line.lstrip())


def _block(lines: list[str], start: int, base: int) -> tuple[list[str], int]:
  """The indented block after ``lines[start - 1]`` (blank lines inside kept)."""
  end, body = start, []
  while end < len(lines) and not lines[end].strip():
    end += 1
  while end < len(lines) and (not lines[end].strip() or _indent(lines[end]) > base):
    body.append(lines[end])
    end += 1
  while body and not body[-1].strip():
    body.pop()
    end -= 1
  return body, end


class _RstBlocks(Preprocessor):
  def run(self, lines: list[str]) -> list[str]:
    out, i, fenced = [], 0, False
    while i < len(lines):
      line = lines[i]
      if line.lstrip().startswith(("```", "~~~")):
        fenced = not fenced
      math = None if fenced else _MATH.match(line)
      literal = None if fenced or math else _LITERAL.match(line)
      if math or literal:
        base = _indent(line)
        body, end = _block(lines, i + 1, base)
        if body:
          cut = min(_indent(b) for b in body if b.strip())
          body = [b[cut:] for b in body]
          pad = " " * base
          if math:
            out += ["", pad + "\\["] + [pad + b for b in body] + [pad + "\\]", ""]
          else:
            out += [pad + literal.group(2) + ":", "", pad + "```python"]
            out += [pad + b for b in body] + [pad + "```", ""]
          i = end
          continue
      out.append(line)
      i += 1
    return out


class RstBlocksExtension(Extension):
  def extendMarkdown(self, md):  # noqa: N802 - Markdown's API
    md.preprocessors.register(_RstBlocks(md), "zojax_rst_blocks", 40)


@event_priority(100)  # before mkdocstrings reads the Markdown extensions
def on_config(config):
  config.markdown_extensions.append(RstBlocksExtension())
  return config
