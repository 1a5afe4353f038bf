"""The application floor: the `openamct` command (cli/), image data, built-in models, evaluation, reports and the
QAT training loop. Nothing below imports it."""
