"""mssd: an open-source MSSanté operator.

The map of the code is ``DESIGN.md`` (shared with the project); each package's
docstring states the invariants a newcomer would otherwise break.
"""

__version__ = "0.1.0"
