"""mergekit integration: the two method adapters (``mergekit_015``,
``mergekit_014``), their one dispatch function (``dispatch``), the optional
report recording (``recording``), what the adapters learn from the mergekit run
calling them (``mergekit_run``: options, recipe; ``seeds``: where the seed came
from), registration, the start-up hook and the one probe of the installed
mergekit API (``methods.mergekit_api``).

Imports ``core`` and ``io``; never the front ends (``cli``, ``insight``, ``demo``).
Importing this package itself is free (the ``.pth`` start-up hook loads
:mod:`.bootstrap`, standard library only).
"""
