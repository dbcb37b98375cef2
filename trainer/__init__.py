"""Offline pipelines of MoLE: training stages 1-3, the demo, and the helpers they share with the tests.

Run as `python -m trainer <command>` from the repository root.
"""
