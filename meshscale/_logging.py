"""The library's logging manners: importing meshscale never configures logging.

meshscale logs through ``logging.getLogger(__name__)`` loggers under ``meshscale``, which
gets a `logging.NullHandler` (as the logging HOWTO asks of libraries): what is shown, and
how, is the application's choice (the `meshscale` command's ``-v``/``-q`` are one).

Orbax logs through absl at import time, and absl calls ``logging.basicConfig()`` whenever
the root logger has no handler yet: importing meshscale used to leave a root handler at
WARNING behind, so an application's own ``basicConfig`` silently did nothing. Orbax is
imported here first, while a placeholder handler stands on the root logger, and the
placeholder is removed afterwards.

Never: add a handler to, or set the level of, the root logger.
"""

from __future__ import annotations

import logging

logging.getLogger("meshscale").addHandler(logging.NullHandler())


def _import_orbax_leaving_the_root_logger_alone() -> None:
    root = logging.getLogger()
    placeholder = None if root.handlers else logging.NullHandler()
    if placeholder is not None:
        root.addHandler(placeholder)  # absl sees a handler and configures nothing
    try:
        import orbax.checkpoint  # noqa: F401
    finally:
        if placeholder is not None:
            root.removeHandler(placeholder)


_import_orbax_leaving_the_root_logger_alone()
