"""What the `pagedray` subcommands share: help with defaults, flag files, the model to run."""
from __future__ import annotations

import argparse
from pathlib import Path

from pagedray.common import envs


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """Append "(default: X)" to an option's help when it has a real default (not None/False/[])."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if _shows_default(action) and "%(default)" not in text:
            text += " (default: %(default)s)"
        return text

    def _format_action(self, action: argparse.Action) -> str:
        if not action.help and _shows_default(action):
            action.help = "default: %(default)s"   # argparse prints nothing for an option without help
        return super()._format_action(action)


def _shows_default(action: argparse.Action) -> bool:
    default = action.default
    return bool(action.option_strings) and default is not argparse.SUPPRESS and \
        default not in (None, False, [], "")


def read_flag_file(path: Path | None, flag: str, binary: bool = False) -> str | bytes | None:
    """The contents of the file a flag names; an unreadable file is one ValueError naming the flag."""
    if path is None:
        return None
    try:
        return path.read_bytes() if binary else path.read_text()
    except OSError as exc:
        raise ValueError(f"{flag} {str(path)!r}: cannot read it ({exc.strerror or exc})") from exc


def resolve_model(model: str | None) -> str:
    """--model, else $PAGEDRAY_MODEL, else the default model's folder (converted on first use)."""
    model = model or envs.model()
    if model is None:
        from pagedray.cluster.default_model import default_model_path
        return default_model_path()
    from pagedray.common.config import check_checkpoint_folder
    check_checkpoint_folder(model)
    return model
