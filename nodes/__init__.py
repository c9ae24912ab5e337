"""Thin V3 node adapters, one file per technique; no math here."""


def all_nodes():
    from .aliases import with_aliases
    from . import (capture, collage, experts, inversion, layout, masactrl, p2p, pix2pix_zero, prompt_switch, regions,
                   segment, shapes_world, sketch, svdiff, tiled, weight_edits)
    classes = [*capture.NODES, *p2p.NODES, *layout.NODES, *masactrl.NODES, *inversion.NODES, *tiled.NODES,
               *regions.NODES, *collage.NODES, *shapes_world.NODES, *weight_edits.NODES, *svdiff.NODES,
               *pix2pix_zero.NODES, *sketch.NODES, *prompt_switch.NODES, *experts.NODES, *segment.NODES]
    return [with_aliases(c) for c in classes]
