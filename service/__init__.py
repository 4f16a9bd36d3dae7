"""Pika fast-response gateway.

Nothing heavy is imported here: the CLI, the app factory and the engines import
their own dependencies when they are used.
"""

__version__ = "0.1.0"
