"""The rank process: ``python -m ampipe.worker --controller tcp://HOST:PORT``.

Only ``ampipe.worker.loop`` (the ZeroMQ loop) imports pyzmq; the protocol codec and the
command registry here work without it.
"""

from ampipe.worker.commands import CommandContext, command

__all__ = ["CommandContext", "command"]
