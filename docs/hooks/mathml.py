"""MkDocs hook: render the site's math to MathML at build time.

``pymdownx.arithmatex`` (generic mode) leaves every formula as TeX in
``<span class="arithmatex">\\(...\\)</span>`` and
``<div class="arithmatex">\\[...\\]</div>``, for a JavaScript renderer to
typeset in the browser. Loading that renderer from a CDN leaves raw TeX on
every page read offline (or behind a firewall), and vendoring MathJax means
shipping megabytes of JavaScript with the site. MathML needs neither: every
current browser renders it natively. So this hook converts each formula with
``latex2mathml`` (pure Python, from PyPI, in the ``docs`` extra) when a page
is built, and the site loads no math script at all.

A formula that ``latex2mathml`` cannot render fully (it leaves an unknown
command such as ``\\foo`` as text) stops the build with an error naming the
page and the formula, so ``mkdocs build --strict`` never publishes raw TeX.
A few commands it lacks are rewritten first (`_REWRITES`).
"""

from __future__ import annotations

import html
import re

from latex2mathml.converter import convert

_ARITHMATEX = re.compile(r'<(span|div) class="arithmatex">(.*?)</\1>', re.S)
_DELIMITERS = {"span": ("\\(", "\\)"), "div": ("\\[", "\\]")}
# Commands latex2mathml does not know, spelled with ones it does.
_REWRITES = (
  (re.compile(r"\\arg(?![A-Za-z])"), r"\\operatorname{arg}"),
  # A sized norm bar, \big\| (the converter sizes only literal delimiters).
  (re.compile(r"(\\(?:big|Big|bigg|Bigg)[lr]?)\s*\\(?:\||Vert)"), "\\1\u2016"),
)
# Text inside \text{...}-like groups is literal in MathML: "\_" would show its backslash.
_TEXT_GROUP = re.compile(r"\\(text|texttt|mathrm)\{([^{}]*)\}")
_LEFTOVER = re.compile(r"\\[A-Za-z]+|\\.")


def _prepare(tex: str) -> str:
  for pattern, replacement in _REWRITES:
    tex = pattern.sub(replacement, tex)
  return _TEXT_GROUP.sub(
    lambda m: f"\\{m.group(1)}{{{m.group(2).replace(chr(92) + '_', '_')}}}", tex
  )


def tex_to_mathml(tex: str, display: bool) -> str:
  """One formula (without its delimiters) as a ``<math>`` element.

  Raises:
    ValueError: if the formula does not convert, or converts with TeX left
      over in the output (a command the converter does not know).
  """
  try:
    out = convert(_prepare(tex), display="block" if display else "inline")
  except Exception as err:  # noqa: BLE001 - latex2mathml raises many kinds
    raise ValueError(f"cannot render {tex!r} as MathML: {err}") from err
  text = html.unescape(re.sub(r"<[^>]+>", " ", out))
  leftover = _LEFTOVER.findall(text)
  if leftover:
    raise ValueError(f"cannot render {leftover} in {tex!r} as MathML")
  return out


def render_math(content: str) -> str:
  """Replaces every arithmatex span/div of a page's HTML by its MathML.

  The span or div is kept (with its ``arithmatex`` class, for styling)
  around the ``<math>`` element.
  """

  def one(match: re.Match) -> str:
    tag, body = match.group(1), html.unescape(match.group(2)).strip()
    left, right = _DELIMITERS[tag]
    if body.startswith(left) and body.endswith(right):
      body = body[len(left) : -len(right)]
    return f'<{tag} class="arithmatex">{tex_to_mathml(body, tag == "div")}</{tag}>'

  return _ARITHMATEX.sub(one, content)


def on_page_content(html_content, page, config, files):  # noqa: ARG001 - MkDocs' signature
  # Imported here: the tests run render_math without MkDocs installed.
  from mkdocs.exceptions import PluginError

  try:
    return render_math(html_content)
  except ValueError as err:
    raise PluginError(f"{page.file.src_path}: {err}") from err
