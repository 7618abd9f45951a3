"""The docs site's include hook (docs/hooks.py): a README section by its heading, headings raised,
links made right for the page; a missing heading is an error. (The whole site is built, warnings
as errors, by `hatch run docs:build` in CI.)"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _hooks() -> ModuleType:
    spec = importlib.util.spec_from_file_location("docs_hooks", ROOT / "docs" / "hooks.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TEXT = """# Title

## Porting

Intro, see [the audit](docs/porting-audit.md#rows) and [the code](packages/x/y.py).

### Detail

```bash
## not a heading (in a fence)
```

## Next

after
"""


def test_a_section_is_cut_at_the_next_heading_of_its_level_and_raised() -> None:
    hooks = _hooks()
    section = hooks._section(TEXT, "Porting", "README.md")
    assert section.splitlines()[0] == "# Porting"
    assert "\n## Detail\n" in section  # ### raised to ##
    assert "```bash\n## not a heading (in a fence)\n```" in section  # fenced lines are left as they are
    assert "Next" not in section and "after" not in section
    with pytest.raises(hooks.IncludeError, match="no heading 'Missing'"):
        hooks._section(TEXT, "Missing", "README.md")


def test_links_point_at_pages_or_become_paths() -> None:
    hooks = _hooks()
    text = hooks._rewrite_links(TEXT, "README.md", "porting.md", {"BENCHMARKS.md": "benchmarks.md"})
    assert "[the audit](porting-audit.md#rows)" in text  # docs/ files are pages of the site
    assert "the code (`packages/x/y.py`)" in text  # the site has no copy of the sources
    nested = hooks._rewrite_links("[b](BENCHMARKS.md)", "README.md", "reference/x.md", {"BENCHMARKS.md": "benchmarks.md"})
    assert nested == "[b](../benchmarks.md)"
