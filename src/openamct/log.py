"""AMCT-style logging: `amct_log/amct_pytorch.log` under the working directory, AMCT's line format.

Console level from AMCT_LOG_LEVEL, file level from AMCT_LOG_FILE_LEVEL (debug|info|warning|error, default info),
as AMCT does, so porting users keep their habits. Under torch.distributed only rank 0 writes the file. The file is opened lazily at the first message, so importing
openamct never creates files.
"""
import logging
import os

from .fileio import is_main_process

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
        super().__init__(self._path(), mode="a", delay=True)

    @staticmethod
    def _path() -> str:
        return os.path.join(os.getcwd(), "amct_log", "amct_pytorch.log")

    def emit(self, record):
        if not is_main_process():  # ranks > 0 log to the console only
            return
        path = self._path()
        if path != self.baseFilename:
            self.close()
            self.baseFilename = path
        if self.stream is None:
            os.makedirs(os.path.dirname(path), mode=0o750, exist_ok=True)
        super().emit(record)


def get_logger() -> logging.Logger:
    logger = logging.getLogger("openamct")
    if not logger.handlers:
        logger.setLevel(logging.DEBUG)
        logger.propagate = False
        formatter = logging.Formatter(LOG_FORMAT)
        console = logging.StreamHandler()
        console.setLevel(_level("AMCT_LOG_LEVEL"))
        file_handler = _CwdFileHandler()
        file_handler.setLevel(_level("AMCT_LOG_FILE_LEVEL"))
        for handler in (console, file_handler):
            handler.setFormatter(formatter)
            handler.addFilter(_TagFilter())
            logger.addHandler(handler)
    return logger


def log(level: int, message: str, module: str = "Utils") -> None:
    """Log `message` with AMCT's `[AMCT]:[<module>]` tag."""
    get_logger().log(level, message, extra={"module_tag": module})


def info(message: str, module: str = "Utils") -> None:
    log(logging.INFO, message, module)


def warning(message: str, module: str = "Utils") -> None:
    log(logging.WARNING, message, module)


def debug(message: str, module: str = "Utils") -> None:
    log(logging.DEBUG, message, module)
