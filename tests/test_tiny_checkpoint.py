"""devtools.tiny_checkpoint: the cached random checkpoint loads through ComfyUI's own loader as SD1.5."""
import os

from devtools import tiny_checkpoint


def test_tiny_checkpoint_is_sd15_and_samples():
    path = tiny_checkpoint.ensure_checkpoint()
    assert os.path.getsize(path) < 600_000_000
    facts = tiny_checkpoint.verify(path, steps=1, latent=32)
    assert facts["is_sd15"], facts
    assert facts["clip"] == "SD1ClipModel"
    assert facts["samples_shape"] == (1, 4, 32, 32) and facts["samples_finite"]
    assert facts["image_shape"] == (1, 64, 64, 3) and facts["image_finite"]


def test_checkpoint_loader_node_finds_it(tmp_path):
    import folder_paths
    import nodes
    path = tiny_checkpoint.ensure_checkpoint()
    d = tmp_path / "checkpoints"
    d.mkdir()
    os.symlink(path, d / tiny_checkpoint.FILENAME)
    saved = folder_paths.folder_names_and_paths["checkpoints"]
    folder_paths.folder_names_and_paths["checkpoints"] = ([str(d)], saved[1])
    folder_paths.filename_list_cache.pop("checkpoints", None)
    try:
        model, clip, vae = nodes.CheckpointLoaderSimple().load_checkpoint(tiny_checkpoint.FILENAME)
    finally:
        folder_paths.folder_names_and_paths["checkpoints"] = saved
        folder_paths.filename_list_cache.pop("checkpoints", None)
    assert type(model.model.model_config).__name__ == "SD15"
    unet = model.model.diffusion_model
    assert unet.model_channels == 320 and len(unet.input_blocks) == 2
