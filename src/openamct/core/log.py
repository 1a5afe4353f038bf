"""openamct's log: the standard `logging.getLogger("openamct")`, with no handler of its own.

A native user sees what their logging set-up shows (by default warnings, on stderr) and gets no log folder they did
not ask for; the AMCT calls and the CLI attach AMCT's `amct_log/amct_pytorch.log` handler (amct/amct_log.py). Each
record carries AMCT's module tag (`[AMCT]:[<tag>]` in that format) in `record.module_tag`.
"""
import logging

logger = logging.getLogger("openamct")


def info(message: str, tag: str = "Utils") -> None:
    logger.info(message, extra={"module_tag": tag})


def warning(message: str, tag: str = "Utils") -> None:
    logger.warning(message, extra={"module_tag": tag})


def debug(message: str, tag: str = "Utils") -> None:
    logger.debug(message, extra={"module_tag": tag})
