"""Progress bars: a live bar on a terminal, plain newline-terminated lines in a log file."""

import io

from mini_o3_jax import progress


class _Terminal(io.StringIO):

  def isatty(self):
    return True


def test_a_log_file_gets_plain_lines_with_the_metrics():
  log = io.StringIO()
  with progress.bar(range(5), stream=log, desc="sft", total=5) as bar:
    for _ in bar:
      bar.set_postfix_str("loss=0.5")
  text = log.getvalue()
  assert "\r" not in text and text.endswith("\n")
  last = text.splitlines()[-1]
  assert last.startswith("sft") and "5/5" in last and "loss=0.5" in last


def test_a_terminal_gets_the_live_bar():
  tty = _Terminal()
  with progress.bar(range(3), stream=tty, desc="rl", total=3) as bar:
    for _ in bar:
      pass
  assert "\r" in tty.getvalue()
