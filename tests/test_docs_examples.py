"""The docs' integration pages run: every python block of a page, in order, in one namespace.

Each page's blocks assert what they show (the loss goes down, a step equals a
direct `tx.update`), so a change that breaks an integration fails here.
"""

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PAGES = [
  "docs/ecosystem/flax-linen.md",
  "docs/ecosystem/flax-nnx.md",
  "docs/ecosystem/equinox.md",
  "docs/ecosystem/optax.md",
]


def python_blocks(path: pathlib.Path) -> list[str]:
  return re.findall(r"^```python\n(.*?)^```", path.read_text(), flags=re.S | re.M)


@pytest.mark.parametrize("page", PAGES)
def test_page_examples_run(page):
  blocks = python_blocks(ROOT / page)
  assert blocks, f"{page} has no python example"
  namespace = {"__name__": "docs_example"}
  for i, block in enumerate(blocks):
    exec(compile(block, f"{page}[{i}]", "exec"), namespace)  # noqa: S102


def test_pages_are_in_the_nav():
  nav = (ROOT / "mkdocs.yml").read_text()
  for page in PAGES:
    assert page.removeprefix("docs/") in nav
