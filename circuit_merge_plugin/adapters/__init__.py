"""mergekit integration: the two method adapters, their one dispatch function,
registration, the start-up hook and the one probe of the installed mergekit API.

Imports ``core`` and ``io``; never the front ends (``cli``, ``insight``, ``demo``).
Importing this package itself is free (the ``.pth`` start-up hook loads
:mod:`.bootstrap`, standard library only).
"""
