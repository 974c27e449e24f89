"""Tests for docs/hooks/mathml.py: the site's math is MathML, rendered at build time."""

import importlib.util
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _hook():
  spec = importlib.util.spec_from_file_location(
    "mathml_hook", ROOT / "docs" / "hooks" / "mathml.py"
  )
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_arithmatex_spans_become_mathml():
  page = (
    '<p>with <span class="arithmatex">\\(\\hat g = \\frac{1}{N} \\sum_i c_i z_i\\)</span>:</p>\n'
    '<div class="arithmatex">\\[\n\\theta \\leftarrow \\theta - \\eta\\, \\big\\| x \\big\\|_F'
    " \\quad \\text{fan\\_in} &lt; \\arg\\min_x\n\\]</div>"
  )
  out = _hook().render_math(page)
  assert "\\(" not in out and "\\[" not in out and "\\frac" not in out
  inline, display = re.findall(r"<math [^>]*>", out)
  assert 'display="inline"' in inline and 'display="block"' in display
  assert "<mfrac>" in out and "<msub>" in out
  assert "fan_in" in out and "fan\\_in" not in out  # \_ inside \text{}
  assert "\u2016" in out  # the sized norm bar
  assert ">arg<" in out
  assert "<mo>&#x0003C;</mo>" in out  # the HTML-escaped "<" is an operator again
  assert out.startswith('<p>with <span class="arithmatex"><math')


def test_a_formula_it_cannot_render_is_an_error():
  hook = _hook()
  with pytest.raises(ValueError, match="notacommand"):
    hook.tex_to_mathml("x + \\notacommand{y}", display=False)


def test_the_site_loads_no_math_script_from_the_internet():
  config = (ROOT / "mkdocs.yml").read_text()
  assert "docs/hooks/mathml.py" in config
  assert not re.search(r"^\s*-\s*https?://", config, flags=re.M)
  assert "mathjax" not in config.lower()


def test_every_formula_of_the_docs_pages_renders():
  """The Markdown pages' own math (docstrings are checked by mkdocs build --strict)."""
  hook = _hook()
  count = 0
  formula = re.compile(r"\\\[(.*?)\\\]|\\\((.*?)\\\)", flags=re.S)
  for page in (ROOT / "docs").rglob("*.md"):
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    for display, inline in formula.findall(text):
      hook.tex_to_mathml(display or inline, display=bool(display))
      count += 1
  assert count > 100
