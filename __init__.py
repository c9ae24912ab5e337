"""Attention Control: training-free attention-control techniques as composable ComfyUI nodes."""
import logging

WEB_DIRECTORY = "./web"
REQUIRED_COMFYUI = (0, 3, 75)

_log = logging.getLogger("attention_control")


def _comfy_version():
    try:
        import comfyui_version
        return tuple(int(x) for x in comfyui_version.__version__.split(".")[:3])
    except Exception:
        return None


_VERSION = _comfy_version()
VERSION_OK = _VERSION is None or _VERSION >= REQUIRED_COMFYUI
if not VERSION_OK:
    _log.error("Attention Control needs ComfyUI >= %s (found %s): update ComfyUI; the pack's nodes are not loaded.",
               ".".join(map(str, REQUIRED_COMFYUI)), ".".join(map(str, _VERSION)))


async def comfy_entrypoint():
    from comfy_api.latest import ComfyExtension

    class AttentionControlExtension(ComfyExtension):
        async def get_node_list(self):
            if not VERSION_OK:
                return []
            from .nodes import all_nodes
            return all_nodes()

    return AttentionControlExtension()
