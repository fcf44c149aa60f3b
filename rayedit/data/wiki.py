"""Real English Wikipedia text that installs offline: the article sample shipped in gensim's wheel.

The papers' second-moment statistics come from a Wikipedia sample (ROME/MEMIT: 100,000 articles of the
``wikipedia`` 20200501.en dump). No hub is reachable here, but the gensim wheel on PyPI ships a shortened
English Wikipedia dump as test data (``enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2``:
206 pages, 106 of them articles, ~3.4 M characters of article text after markup stripping). Only that file is
read (gensim is never imported, so its numpy/scipy dependencies are not needed), its wikitext is reduced to
plain text with mwparserfromhell, and each article is cut into paragraph-aligned documents.
"""

from __future__ import annotations

import bz2
import functools
import hashlib
import importlib.metadata
import importlib.util
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

DISTRIBUTION = "gensim"
TESTED_VERSION = "4.4.0"
DUMP = "test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
CORPUS_NAME = "enwiki-sample"
# [OURS] documents are groups of whole paragraphs up to this many characters (~500 tokens), so the whole
# sample is used even where a model's context would truncate a long article (ROME/MEMIT truncate articles).
DOC_CHARS = 2_000


class WikiSourceError(ValueError):
    """The packaged Wikipedia sample cannot be used; the message says what to install."""


@dataclass(frozen=True)
class WikiSample:
    path: Path
    version: str
    sha256: str

    @property
    def identity(self) -> str:
        return f"{CORPUS_NAME}:{DISTRIBUTION}-{self.version}/{Path(DUMP).name}"


def locate() -> WikiSample:
    """The dump file inside the installed gensim wheel (found without importing gensim)."""
    spec = importlib.util.find_spec(DISTRIBUTION)
    if spec is None or not spec.submodule_search_locations:
        raise WikiSourceError(f"stats corpus {CORPUS_NAME!r} reads the Wikipedia sample shipped in the gensim wheel: "
                              f"pip install --no-deps {DISTRIBUTION}=={TESTED_VERSION} (bash scripts/setup.sh does)")
    path = Path(next(iter(spec.submodule_search_locations))) / DUMP
    if not path.is_file():
        raise WikiSourceError(f"stats corpus {CORPUS_NAME!r}: {path} is missing from the installed gensim; "
                              f"reinstall it: pip install --no-deps --force-reinstall {DISTRIBUTION}=={TESTED_VERSION}")
    return WikiSample(path=path, version=importlib.metadata.version(DISTRIBUTION), sha256=_sha256(path))


@functools.lru_cache(maxsize=4)
def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _articles(path: Path) -> list[tuple[str, str]]:
    """(title, wikitext) of every main-namespace page that is not a redirect."""
    out = []
    with bz2.open(path) as f:
        for _event, el in ET.iterparse(f):
            if not el.tag.endswith("}page"):
                continue
            ns, text = el.findtext("{*}ns"), el.findtext("{*}revision/{*}text") or ""
            if ns == "0" and not text.lstrip().lower().startswith("#redirect"):
                out.append((el.findtext("{*}title") or "", text))
            el.clear()
    return out


def paragraph_documents(text: str, max_chars: int = DOC_CHARS) -> list[str]:
    """Whole paragraphs packed greedily into documents of at most ``max_chars`` (a longer paragraph stays whole)."""
    docs, cur = [], ""
    for para in (p.strip() for p in text.split("\n")):
        if len(para) < 40:  # headings, list stubs, table residue
            continue
        if cur and len(cur) + 1 + len(para) > max_chars:
            docs.append(cur)
            cur = para
        else:
            cur = f"{cur}\n{para}" if cur else para
    if cur:
        docs.append(cur)
    return docs


@functools.lru_cache(maxsize=2)
def documents(path: Path | None = None) -> tuple[str, ...]:
    """Plain-text documents of the sample in dump order (deterministic; ~7 s to parse, cached per process)."""
    import mwparserfromhell

    path = path or locate().path
    out: list[str] = []
    for _title, wikitext in _articles(path):
        plain = mwparserfromhell.parse(wikitext).strip_code(normalize=True, collapse=True)
        out.extend(paragraph_documents(plain))
    return tuple(out)
