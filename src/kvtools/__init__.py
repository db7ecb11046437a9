"""Tools beside the library: the engine simulator (`kvtools.sim`, the `kvindex-sim` command),
the one-command demo (`kvtools.demo`, `kvindex demo`) and the offline analysis
(`kvtools.analyze`, `kvindex analyze`).

The only package that imports both `kvindex` (the index) and `epp` (the picker): the analysis
schedules with the picker's own framework, and the demo runs both. Neither library imports it.
"""

from kvindex import __version__

__all__ = ["__version__"]
