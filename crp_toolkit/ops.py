"""The op kinds the engine knows and how to teach it new ones (the public home of
``crp_toolkit.engine.ops``)."""

from crp_toolkit.engine import ops as _engine
from crp_toolkit.engine.ops import *  # noqa: F403 - exactly the engine module's __all__

__all__ = list(_engine.__all__)
