"""MkDocs hook: drops the Sphinx role prefixes (``:func:``, ``:class:`` ...) that docstrings use before a name.

mkdocstrings renders ``:func:`fit``` as the literal text ":func:" followed by ``fit`` in code; the name alone reads
better. Listed under ``hooks`` in mkdocs.yml and excluded from the site (``exclude_docs``).
"""

from __future__ import annotations

import re
from typing import Any

_ROLE = re.compile(r":(?:py:)?(?:func|class|meth|data|mod|attr|exc|obj|const):(<code>)")


def on_page_content(html: str, **kwargs: Any) -> str:
    """Returns the page's HTML with Sphinx role prefixes removed before inline code."""
    return _ROLE.sub(r"\1", html)
