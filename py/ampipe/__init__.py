"""ampipe: intra-block pipelining of attention and the MoE all-to-all (AMPipe).

Importing ampipe needs torch only: ZeroMQ is imported by the rank process
(`python -m ampipe.worker`) alone, so GPU machines without pyzmq can use the model,
the executor and the kernels.
"""

__version__ = "0.1.0"
