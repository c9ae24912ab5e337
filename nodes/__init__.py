"""Thin V3 node adapters, one file per technique; no math here."""


def all_nodes():
    from . import capture, shapes_world
    return [*capture.NODES, *shapes_world.NODES]
