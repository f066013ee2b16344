"""Progress bars: a live bar on a terminal, plain newline-terminated lines in a log file."""

import io

from mini_o3_jax import progress


class _Terminal(io.StringIO):

  def isatty(self):
    return True


def test_a_log_file_gets_periodic_plain_lines_with_the_metrics():
  log = io.StringIO()
  with progress.bar(range(50), stream=log, desc="sft", total=50) as bar:
    for _ in bar:
      bar.set_postfix_str("loss=0.5")
  text = log.getvalue()
  assert "\r" not in text and text.endswith("\n")
  lines = text.splitlines()
  assert len(lines) <= 3  # the first and the last line: 50 steps and postfixes within one interval
  assert lines[-1].startswith("sft") and "50/50" in lines[-1] and "loss=0.5" in lines[-1]


def test_a_terminal_gets_the_live_bar():
  tty = _Terminal()
  with progress.bar(range(3), stream=tty, desc="rl", total=3) as bar:
    for _ in bar:
      pass
  assert "\r" in tty.getvalue()
