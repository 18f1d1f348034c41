"""Validate once, then call: the cache of single-weight configurations (``config``) and the plans of
many weights (``multi``, over ``multi_table`` and ``multi_inputs``)."""
