"""Thin V3 node adapters, one file per technique; no math here."""


def all_nodes():
    from . import capture
    return [*capture.NODES]
