"""The algorithm: parameters, the kernel, its random numbers and its counts.

Pure torch: no mergekit, no file or network I/O, nothing from the layers above
(``adapters``, ``cli``, ``insight``, ``demo``).
"""
