"""LRP rules (the public home of ``crp_toolkit.engine.rules``)."""

from crp_toolkit.engine import rules as _engine
from crp_toolkit.engine.rules import *  # noqa: F403 - exactly the engine module's __all__

__all__ = list(_engine.__all__)
