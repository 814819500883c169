"""Files: safetensors headers, input checks, digests and the report file's format.

Standard library (and safetensors/torch where a tensor is read); no mergekit and
nothing from the layers above.
"""
