"""A short rank process that ends the moment its work is done (started by test_exit.py): one
rank of a 2-rank gloo world runs one forward+backward of the pipelined block at EP 2 (its
all-to-alls asynchronous, several in flight), then the program ends at once. Prints "ep done"
as its last act; a clean process then exits 0.
"""

from __future__ import annotations


def ep() -> None:
    from pipeline_helpers import inputs, load, make_layer, step
    from rank_procs import gloo_rank

    from ampipe.parallel import init_parallel_groups
    from ampipe.pipeline import AMPipeBlock

    with gloo_rank() as a:
        plan = load("grouped-p3")
        layer = make_layer(plan, ep=init_parallel_groups(a.world).ep)
        block = AMPipeBlock.from_layer(layer, plan)
        x, dy = inputs(plan, seed=100 + a.rank)
        step(block, layer, x, dy)
        print("ep done", flush=True)


if __name__ == "__main__":
    ep()
