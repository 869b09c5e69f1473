"""Optional extras: one clear error when a feature's packages are not installed."""

from __future__ import annotations

import importlib.util


class MissingExtraError(ImportError):
    """A feature was used without its optional extra installed."""


def need(extra: str, *modules: str, feature: str) -> None:
    """Raise :class:`MissingExtraError` naming ``extra`` when one of ``modules`` is missing."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise MissingExtraError(f"{', '.join(missing)} is not installed; {feature} needs the "
                                f"{extra} extra: pip install 'gyre[{extra}]'")
