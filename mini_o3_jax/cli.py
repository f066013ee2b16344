"""What the command-line tools share before JAX loads, so `--help` and a bad flag answer at once.

Standard library only: a tool parses its arguments with this, then imports the package's heavy modules.
"""

from __future__ import annotations

import argparse

# --dtype of tools/export_hf.py and tools/import_hf.py -> the stored dtype.
DTYPES = {"fp32": "float32", "bf16": "bfloat16"}


def parser(doc: str) -> argparse.ArgumentParser:
  """An argument parser described by the first paragraph of a tool's docstring, showing defaults."""
  return argparse.ArgumentParser(description=doc.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
