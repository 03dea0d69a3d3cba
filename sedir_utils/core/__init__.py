"""The bottom layer: run paths, JSON I/O, the stage and arm declarations, params, models, statistics.

It imports nothing above it.
"""
