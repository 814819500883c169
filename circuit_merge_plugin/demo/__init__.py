"""A demo that builds small models locally and merges them (``python -m circuit_merge_plugin.demo``)."""
