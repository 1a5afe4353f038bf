"""AMCT's log format: `amct_log/amct_pytorch.log` under the working directory, AMCT's line format.

Attached to the core's `openamct` logger by the AMCT calls and the CLI (`install()`), not by the core, so a native
user gets no log folder. Console level from AMCT_LOG_LEVEL, file level from AMCT_LOG_FILE_LEVEL
(debug|info|warning|error, default info), as AMCT does, so porting users keep their habits. Under
torch.distributed only rank 0 writes the file. The file is opened at the first message.
"""
import logging
import os

from ..core.fileio import is_main_process
from ..core.log import logger

LOG_FORMAT = "%(asctime)s - %(levelname)s - [AMCT]:[%(module_tag)s]: %(message)s"
_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


def _level(env_name: str) -> int:
    value = os.environ.get(env_name, "info").lower()
    if value not in _LEVELS:
        raise ValueError(f"{env_name}={value!r}: expected one of {sorted(_LEVELS)}")
    return _LEVELS[value]


class _TagFilter(logging.Filter):
    def filter(self, record):
        record.module_tag = getattr(record, "module_tag", "Utils")
        return True


class _CwdFileHandler(logging.FileHandler):
    """Writes `amct_log/amct_pytorch.log` under the current working directory, created at the first record."""

    def __init__(self):
        super().__init__(self.path(), mode="a", delay=True)

    @staticmethod
    def path() -> str:
        return os.path.join(os.getcwd(), "amct_log", "amct_pytorch.log")

    def emit(self, record):
        if not is_main_process():  # ranks > 0 log to the console only
            return
        path = self.path()
        if path != self.baseFilename:
            self.close()
            self.baseFilename = path
        if self.stream is None:
            os.makedirs(os.path.dirname(path), mode=0o750, exist_ok=True)
        super().emit(record)


class _Console(logging.StreamHandler):
    """AMCT's console handler (a class of its own, so the CLI can find it and quieten it)."""


def install() -> logging.Logger:
    """Attach AMCT's console and file handlers to the `openamct` logger (once)."""
    if not any(isinstance(h, (_Console, _CwdFileHandler)) for h in logger.handlers):
        logger.setLevel(logging.DEBUG)
        logger.propagate = False
        formatter = logging.Formatter(LOG_FORMAT)
        console = _Console()
        console.setLevel(_level("AMCT_LOG_LEVEL"))
        file_handler = _CwdFileHandler()
        file_handler.setLevel(_level("AMCT_LOG_FILE_LEVEL"))
        for handler in (console, file_handler):
            handler.setFormatter(formatter)
            handler.addFilter(_TagFilter())
            logger.addHandler(handler)
    return logger


def consoles() -> list:
    """The console handlers `install()` attached."""
    return [h for h in logger.handlers if isinstance(h, _Console)]


def log_path() -> str:
    return _CwdFileHandler.path()
