"""What the command-line tools share before JAX loads, so `--help` and a bad flag answer at once.

Standard library only: a tool parses its arguments with this, then imports the package's heavy modules.
"""

from __future__ import annotations

import argparse

# --dtype of tools/export_hf.py and tools/import_hf.py -> the stored dtype.
DTYPES = {"fp32": "float32", "bf16": "bfloat16"}


class _DefaultsAndLayout(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
  """Shows each flag's default and keeps the description's own line breaks."""


def parser(doc: str, whole_doc: bool = False) -> argparse.ArgumentParser:
  """An argument parser described by a tool's docstring (its first paragraph, or all of it as written),
  showing defaults."""
  if whole_doc:
    return argparse.ArgumentParser(description=doc, formatter_class=_DefaultsAndLayout)
  return argparse.ArgumentParser(description=doc.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
