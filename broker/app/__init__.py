"""The composition root: the one place the broker's objects are built and wired, and servers started.

May import everything in the product except `broker.cli` and `broker.testing`.
"""
