"""``--help`` formatting shared by megaseg's commands: every option's default is shown, except
where "(default: None)" would mislead (a required option, or one whose help says what happens
when it is not given) or say nothing (an on/off flag)."""

from __future__ import annotations

import argparse


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: X)" to an option's help, unless it is required, its default is None
    or SUPPRESS, it is a flag (store_true / store_false), or its help already names its
    default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help_text = action.help or ""
        if (
            action.required
            or action.default is None
            or action.default is argparse.SUPPRESS
            or isinstance(action, argparse._StoreTrueAction | argparse._StoreFalseAction)
            or "default" in help_text.lower()  # the help already says it
        ):
            return help_text
        return super()._get_help_string(action)


class RawDefaultsHelpFormatter(argparse.RawDescriptionHelpFormatter, DefaultsHelpFormatter):
    """:class:`DefaultsHelpFormatter` keeping the description's and epilog's line breaks."""
