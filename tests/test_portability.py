"""Text files are read and written as UTF-8 whatever the platform's locale: ``open`` without an
``encoding`` uses the locale's (cp1252 on a Western Windows), so the bundled data's description
(UTF-8, with "…") loaded as mojibake there, and a ``cfg.json`` or a run's JSON with characters
outside it failed to decode."""

import ast
import os
import subprocess
import sys
from pathlib import Path

import sklearn_jsae

PACKAGE = Path(sklearn_jsae.__file__).parent
# Calls that open a file in text mode unless told otherwise (tempfile's default to binary).
_TEXT_BY_DEFAULT = {"open": "r", "fdopen": "r", "NamedTemporaryFile": "w+b", "TemporaryFile": "w+b",
                    "SpooledTemporaryFile": "w+b"}


def _text_io_without_encoding(tree):
    """Lines of ``tree`` that open, read or write a file as text with the locale's encoding."""
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call) or any(kw.arg == "encoding" for kw in node.keywords):
            continue
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
        if name in ("read_text", "write_text", "TextIOWrapper"):
            yield node.lineno, name
        elif name in _TEXT_BY_DEFAULT and not (isinstance(func, ast.Attribute) and ast.unparse(func.value) == "os"):
            at = 1 if name in ("open", "fdopen") else 0  # tempfile's functions take the mode first
            mode = next((kw.value for kw in node.keywords if kw.arg == "mode"),
                        node.args[at] if len(node.args) > at else ast.Constant(_TEXT_BY_DEFAULT[name]))
            if not (isinstance(mode, ast.Constant) and "b" in str(mode.value)):
                yield node.lineno, f"{ast.unparse(func)}(..., {ast.unparse(mode)})"


def test_the_package_names_the_encoding_of_every_text_file_it_opens():
    found = [f"{path.relative_to(PACKAGE.parent)}:{line}: {call}"
             for path in sorted(PACKAGE.rglob("*.py"))
             for line, call in _text_io_without_encoding(ast.parse(path.read_text(encoding="utf-8")))]
    assert found == [], "text I/O in the locale's encoding (pass encoding='utf-8'):\n" + "\n".join(found)


def test_the_scan_finds_each_form_of_text_io_without_an_encoding():
    source = """
open(path)
open(path, "w")
open(path, mode="a")
Path(p).read_text()
Path(p).write_text(s)
io.TextIOWrapper(raw)
tempfile.NamedTemporaryFile("w")
open(path, "rb")
open(path, encoding="utf-8")
os.open(path, os.O_RDONLY)
tempfile.NamedTemporaryFile()
Path(p).read_text(encoding="utf-8")
"""
    assert [line for line, _ in _text_io_without_encoding(ast.parse(source))] == [2, 3, 4, 5, 6, 7, 8]


def test_the_bundled_data_loads_without_the_locales_encoding():
    """Python's own check (PEP 597): every ``open`` without an encoding warns, made an error here
    for this package's modules (torch's own imports have some)."""
    script = ("import warnings; warnings.filterwarnings('error', category=EncodingWarning, module='sklearn_jsae')\n"
              "from sklearn_jsae.datasets import load_minilm_mlp; assert '…' in load_minilm_mlp().DESCR")
    done = subprocess.run([sys.executable, "-X", "warn_default_encoding", "-c", script], capture_output=True,
                          text=True, timeout=300, env={**os.environ, "PYTHONWARNINGS": ""})
    assert done.returncode == 0, done.stderr
