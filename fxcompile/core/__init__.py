"""Formats, policies, the cost model's request (``auto``), assignments and the IR: the
vocabulary every other layer speaks.  Imports nothing of fxcompile's but ``errors``."""
