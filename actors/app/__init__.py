"""The composition root: the ``txproc`` command line and the demo.

It sits at the top of the import graph and wires the layers below it together (the
actors, the adapters and the pure core in ``processor``); nothing imports it.
"""
