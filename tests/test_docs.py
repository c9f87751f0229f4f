"""Every Python block of the README and docs/ runs as written, on the built-in tiny model.

The one substitution: the statement that loads a real checkpoint (`pipe = ...from_pretrained(`)
becomes the built-in `tiny` model on the CPU, and step counts of 30 become 2 (a CPU budget).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LOAD = re.compile(r"^pipe = \w+\.from_pretrained\((?:[^()]|\([^()]*\))*\)(?:\.to\([^)]*\))?$",
                  re.M | re.S)
TINY = ('from attnseg.pipeline.models.loading import load_pipeline as _load\n'
        'pipe = _load("tiny", "cpu", torch.float32)')


def python_blocks():
    for doc in DOCS:
        for i, m in enumerate(re.finditer(r"```python\n(.*?)```", doc.read_text(), re.S)):
            yield pytest.param(m.group(1), id=f"{doc.relative_to(ROOT)}#{i}")


def runnable(code: str) -> str:
    code, n = LOAD.subn(TINY, code)
    assert n <= 1
    if n:
        code = "import torch\n" + code
    return re.sub(r"\b(steps|num_steps|num_inference_steps)=30\b", r"\1=2", code)


def test_the_docs_have_python_blocks_and_the_loader_is_found():
    blocks = [p.values[0] for p in python_blocks()]
    assert len(blocks) >= 2
    assert sum(bool(LOAD.search(b)) for b in blocks) >= 2


@pytest.mark.parametrize("code", list(python_blocks()))
def test_python_block_runs(code):
    namespace: dict = {}
    exec(compile(runnable(code), "<doc>", "exec"), namespace)  # noqa: S102
    if "out" in namespace:  # the README's generate_with_masks block
        out = namespace["out"]
        assert out.images.shape == (2, 512, 512, 3)
        assert out.labels.shape == out.reliability.shape == (2, 512, 512)
        assert set(int(v) for v in out.labels[1].ravel()) <= {0, 1, 255}  # no sofa named
    if "labels" in namespace and "cap" in namespace:  # docs/python-api.md's step by step
        assert tuple(namespace["labels"].shape) == (1, 512, 512)
