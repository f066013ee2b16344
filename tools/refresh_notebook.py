"""Runs tpu/colab_demo.ipynb top to bottom on this machine's CPU and saves it with its outputs.

    python tools/refresh_notebook.py                    # the full demo (~8 minutes on 2 cores)
    python tools/refresh_notebook.py --workdir /tmp/nb  # where the demo writes (default: a fresh temp dir)

The notebook is committed with the outputs of such a run, so a reader sees what to expect before running
it. The run uses this checkout (REPO_DIR) and the CPU; the saved parameters cell is the committed one,
unchanged, so a fresh Colab still starts from the defaults. Nothing is written unless every cell ran.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from typing import Sequence

try:
  from mini_o3_jax import cli
except ImportError:  # run from a checkout without installing the package
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from mini_o3_jax import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "tpu", "colab_demo.ipynb")
KERNEL = "mini_o3_refresh_python"


def parse_args(argv: Sequence[str] | None = None):
  parser = cli.parser(__doc__)
  parser.add_argument("--notebook", default=NOTEBOOK, help="the notebook to run and rewrite")
  parser.add_argument("--workdir", default="", help="the demo's work directory; empty: a fresh temporary one")
  parser.add_argument("--timeout", type=int, default=3600, help="seconds any one cell may run")
  return parser.parse_args(argv)


def _kernel_for_this_interpreter(jupyter_dir: str) -> None:
  """A kernelspec for this very interpreter, found through JUPYTER_PATH (no global install needed)."""
  spec_dir = os.path.join(jupyter_dir, "kernels", KERNEL)
  os.makedirs(spec_dir)
  with open(os.path.join(spec_dir, "kernel.json"), "w") as f:
    json.dump({"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
               "display_name": "mini_o3_jax refresh", "language": "python"}, f)


def main(argv: Sequence[str] | None = None) -> int:
  args = parse_args(argv)
  import nbclient  # pylint: disable=g-import-not-at-top  (optional: requirements-dev)
  import nbformat  # pylint: disable=g-import-not-at-top
  nb = nbformat.read(args.notebook, as_version=4)
  params = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
  if len(params) != 1:
    raise SystemExit(f"{args.notebook}: expected exactly one cell tagged 'parameters', found {len(params)}")
  committed, kernelspec = params[0].source, nb.metadata.get("kernelspec")
  with tempfile.TemporaryDirectory(prefix="refresh_notebook_") as tmp:
    workdir = args.workdir or os.path.join(tmp, "mini_o3_demo")
    params[0].source = committed + "\n".join(
        ["", "# refresh_notebook.py: this checkout, the CPU", f"REPO_DIR = {ROOT!r}", f"WORKDIR = {workdir!r}",
         "PLATFORM = 'cpu'"])
    _kernel_for_this_interpreter(os.path.join(tmp, "jupyter"))
    os.environ["JUPYTER_PATH"] = os.path.join(tmp, "jupyter")  # where the kernel manager looks the spec up
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device, as a user has
    env["JAX_PLATFORMS"] = "cpu"
    client = nbclient.NotebookClient(nb, kernel_name=KERNEL, timeout=args.timeout,
                                     resources={"metadata": {"path": tmp}})
    client.execute(env=env)  # raises CellExecutionError, and nothing is written, if a cell fails
  params[0].source = committed
  nb.metadata["kernelspec"] = kernelspec  # the committed kernel (Colab's python3), not this run's
  nbformat.validate(nb)
  tmp_out = args.notebook + ".tmp"
  nbformat.write(nb, tmp_out)
  os.replace(tmp_out, args.notebook)
  print(f"wrote {args.notebook} with the outputs of a CPU run")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
