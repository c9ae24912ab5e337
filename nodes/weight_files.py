"""Where the weight-edit nodes keep their files: a ComfyUI model folder per kind (models/<folder>/ and
output/<folder>/, so a file saved by a Save node is listed by its Load node at once), the save path of a
filename prefix, and the lookup of a chosen file with an error naming the input."""
from __future__ import annotations

import os

from ..attention.core import AttentionControlError


def register(folder: str):
    """ComfyUI's folder_paths with `folder` registered (models/<folder>/ and output/<folder>/, .safetensors)."""
    import folder_paths
    if folder not in folder_paths.folder_names_and_paths:
        dirs = [os.path.join(folder_paths.models_dir, folder),
                os.path.join(folder_paths.get_output_directory(), folder)]
        folder_paths.folder_names_and_paths[folder] = (dirs, {".safetensors"})
    return folder_paths


def listed(folder: str) -> list[str]:
    return register(folder).get_filename_list(folder)


def save_path(prefix: str, default: str) -> str:
    """output/<prefix>_00001_.safetensors, counting up past the files already there; folders made."""
    import folder_paths
    prefix = prefix.strip() or default
    full, name, counter, _sub, _ = folder_paths.get_save_image_path(prefix, folder_paths.get_output_directory())
    os.makedirs(full, exist_ok=True)
    return os.path.join(full, f"{name}_{counter:05}_.safetensors")


def find(folder: str, filename: str, input_name: str) -> str:
    path = register(folder).get_full_path(folder, filename)
    if path is None:
        raise AttentionControlError(f"{input_name}: '{filename}' is not in models/{folder}/ or output/{folder}/")
    return path
