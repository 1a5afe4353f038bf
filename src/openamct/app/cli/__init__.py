"""The `openamct` command: post-training quantization of an image classifier in one call, quantization-aware
training, or evaluation; one module per command.

    openamct calibrate --model efficientnet_lite0 --images DIR [--labels FILE] [--output DIR] ...
    openamct retrain --model efficientnet_lite0 --images DIR [--train N] [--weight-bits 4] [--steps N] ...
    openamct evaluate --onnx outputs/efficientnet_lite0/efficientnet_lite0_deploy_model.onnx --images DIR

Bad input ends with one error line and exit code 2. The log goes to ./amct_log/amct_pytorch.log as AMCT's does.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys

import torch

from ... import __version__
from ...amct import amct_log
from ...core.config import ConfigError, InputError
from ..evaluation import EvaluationError
from ..training import PeerLost
from . import calibrate, common, evaluate, retrain


def build_parser() -> argparse.ArgumentParser:
    parser = common.Parser(prog="openamct",
                           description="AMCT-compatible quantization (INT8 PTQ and QAT) of PyTorch image classifiers, "
                                       "with export to ONNX (deploy and fake-quant models).")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=common.Parser)
    for command in (calibrate, evaluate, retrain):
        command.add_parser(commands)
    return parser


@contextlib.contextmanager
def _console_log_level(verbose: bool):
    """AMCT's log handlers, with the console kept at WARNING (the summary says what matters) unless asked
    otherwise."""
    amct_log.install()
    consoles = amct_log.consoles()
    saved = [h.level for h in consoles]
    if not verbose and "AMCT_LOG_LEVEL" not in os.environ:
        for handler in consoles:
            handler.setLevel(max(handler.level, logging.WARNING))
    try:
        yield
    finally:
        for handler, level in zip(consoles, saved):
            handler.setLevel(level)


def main(argv=None) -> int:
    """Entry point of the `openamct` command; returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except common.UsageError as err:
        print(err, file=sys.stderr)
        return common.EXIT_USAGE
    except SystemExit as exit_:  # --help, --version
        return exit_.code if isinstance(exit_.code, int) else 0
    threads = torch.get_num_threads()
    try:
        if args.threads:
            torch.set_num_threads(args.threads)
        with _console_log_level(args.verbose):
            return args.func(args)
    except (common.UsageError, ConfigError, EvaluationError, InputError) as err:
        print(f"openamct {args.command}: error: {common.one_line(err)}", file=sys.stderr)
        return common.EXIT_USAGE
    except PeerLost as err:
        print(f"openamct {args.command}: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"openamct {args.command}: interrupted", file=sys.stderr)
        return 130
    finally:
        common.release_locks()
        torch.set_num_threads(threads)


if __name__ == "__main__":
    sys.exit(main())
