"""SVDiff (issue 19), report-only figures:

- svdiff_step_time_ratio: Train Spectral Shifts vs core's Train LoRA node (rank 4, fp32, no gradient
  checkpointing) on the tiny random SD1.5 of the tests, 8 steps each at batch 2 on four 16x16 latents, whole
  nodes timed (ABBA-interleaved CPU time, median); both train every weight matrix of the UNet.
- svdiff_file_bytes_ratio: the saved shift file vs core's rank-4 LoRA weights of the same matrices (saved the
  same way, safetensors float32), on that model.
- svdiff_params_ratio_sd15: shift numbers vs rank-4 LoRA numbers over every weight matrix of a full-size SD1.5
  UNet (built on the meta device: shapes only).
"""
from __future__ import annotations

import json
import os
import sys
import tempfile

from bench import common

STEPS = 8


def child(pairs: int) -> dict:
    common.setup("sdpa")
    common.pin_threads()
    import torch
    import comfy.utils
    import safetensors.torch
    import ac_models
    from comfy_extras.nodes_train import TrainLoraNode
    from attention_control.nodes import svdiff as SV
    comfy.utils.PROGRESS_BAR_ENABLED = False
    model, clip = ac_models.tiny_sd15(), ac_models.random_clip_l()
    lat = {"samples": torch.randn(4, 4, 16, 16, generator=torch.Generator().manual_seed(0)) * 0.5}
    pos = [[clip.encode_from_tokens(clip.tokenize("a photo of sks")), {}]]
    out = {}

    def svdiff():
        with torch.inference_mode():
            out["shifts"] = SV.TrainSpectralShifts.execute(model, lat, pos, STEPS, 1e-3, 2, 0).result[1]

    def lora():
        with torch.inference_mode():
            # one latent dict per image: core 0.3.75's node fails on a single batched latent (multi_res unset)
            per_image = [{"samples": lat["samples"][i:i + 1]} for i in range(lat["samples"].shape[0])]
            res = TrainLoraNode.execute([model], per_image, [pos], [2], [STEPS], [1], [1e-4], [4], ["AdamW"], ["MSE"],
                                        [0], ["fp32"], ["fp32"], ["LoRA"], [False], ["[None]"])
            out["lora"] = (res.result if hasattr(res, "result") else res)[1]

    res = common.interleaved_ratio(lora, svdiff, pairs=pairs)
    with tempfile.TemporaryDirectory() as d:
        SV.save_shifts(out["shifts"], os.path.join(d, "s.safetensors"))
        names = set(out["shifts"])
        lora_sd = {k: v.detach().float().contiguous() for k, v in out["lora"].items()
                   if any(k.startswith(n + ".") for n in names) and not k.endswith((".diff", ".diff_b"))}
        safetensors.torch.save_file(lora_sd, os.path.join(d, "l.safetensors"))
        res["shift_bytes"] = os.path.getsize(os.path.join(d, "s.safetensors"))
        res["lora_bytes"] = os.path.getsize(os.path.join(d, "l.safetensors"))
    import comfy.supported_models
    mc = comfy.supported_models.SD15({"use_checkpoint": False, "image_size": 32, "use_spatial_transformer": True,
                                      "legacy": False, "adm_in_channels": None, "in_channels": 4, "out_channels": 4,
                                      "model_channels": 320, "num_res_blocks": [2, 2, 2, 2],
                                      "channel_mult": [1, 2, 4, 4], "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
                                      "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
                                      "transformer_depth_middle": 1, "use_linear_in_transformer": False,
                                      "context_dim": 768, "num_heads": 8, "use_temporal_resblock": False,
                                      "use_temporal_attention": False})
    full = mc.get_model({}, device=torch.device("meta"))
    shifts = lora4 = 0
    for _n, m in full.diffusion_model.named_modules():
        w = getattr(m, "weight", None)
        if w is not None and w.dim() >= 2 and hasattr(m, "weight_function"):
            out_f, in_f = w.shape[0], w[0].numel()
            shifts += min(out_f, in_f)
            lora4 += 4 * (out_f + in_f)
    res["sd15_shifts"], res["sd15_lora4"] = shifts, lora4
    return res


def collect(quick: bool = False) -> dict:
    r = common.run_child("bench.svdiff", "child", "2" if quick else "5")
    return {
        "svdiff_step_time_ratio": common.time_figure(
            r, None, f"Train Spectral Shifts vs core Train LoRA (rank 4, fp32, no checkpointing), {STEPS} steps at "
                     f"batch 2 each, tiny random SD1.5, whole nodes, CPU time"),
        "svdiff_file_bytes_ratio": {"value": round(r["shift_bytes"] / r["lora_bytes"], 4), "target": None, "unit": "x",
                                    "settings": f"saved shifts {r['shift_bytes']} B vs rank-4 LoRA of the same "
                                                f"matrices {r['lora_bytes']} B (safetensors float32), tiny SD1.5"},
        "svdiff_params_ratio_sd15": {"value": round(r["sd15_shifts"] / r["sd15_lora4"], 4), "target": None,
                                     "unit": "x", "settings": f"shift numbers {r['sd15_shifts']} vs rank-4 LoRA "
                                                              f"{r['sd15_lora4']} over every weight matrix of a "
                                                              f"full-size SD1.5 UNet"},
    }


if __name__ == "__main__":
    if sys.argv[1:2] == ["child"]:
        sys.stdout.write(json.dumps(child(int(sys.argv[2]))) + "\n")
