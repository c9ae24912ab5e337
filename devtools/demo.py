"""Run every example workflow on the real ComfyUI server and collect the images.

    python -m devtools.demo [--ckpt PATH] [--models DIR] [--model auto|shapes|tiny] [--out out] [--steps N]
                            [--only NAME] [--thumbnails]

(`make demo [CKPT=...] [MODELS=...]`). Starts ComfyUI 0.3.75 with this pack (devtools.server), converts each
example_workflows/*.json to the API format (devtools.workflow), chooses the model, runs it, copies the
images into out/<workflow-name>/ and writes out/contact_sheet.png. Exits 1 if any workflow fails.

The model: with --ckpt PATH that file is linked into the server's models/checkpoints and every
CheckpointLoaderSimple loads it. Otherwise, if the pack offers AttnCtl_ShapesWorldLoader (the trained
shapes-world model, outputs MODEL, CLIP, VAE like CheckpointLoaderSimple), each CheckpointLoaderSimple
is replaced by it; failing that, the tiny random SD1.5 checkpoint (devtools.tiny_checkpoint) is used.
--model tiny (or ATTNCTL_DEMO_MODEL=tiny, which the e2e tests also read) forces the tiny checkpoint.
--thumbnails also writes example_workflows/<name>.jpg from the outputs.

Workflows whose own loaders (UNETLoader, CLIPLoader, VAELoader, ...: the video_p2p_wan example) name model
files the server does not have are skipped with one log line; --models DIR (a ComfyUI-style models folder
with diffusion_models/, text_encoders/, vae/ ...) makes its files available to them.
"""
from __future__ import annotations

import argparse
import glob
import json
import logging
import tempfile
import os
import shutil
import subprocess
import sys
import time

from devtools.host import REPO

log = logging.getLogger("attention_control.devtools.demo")

WORKFLOW_DIR = os.path.join(REPO, "example_workflows")
SHAPES_LOADER = "AttnCtl_ShapesWorldLoader"
CKPT_LOADER = "CheckpointLoaderSimple"
# nodes whose steps must agree
SAMPLER_TYPES = ("KSampler", "KSamplerAdvanced", "AttnCtl_DDIMInversion", "AttnCtl_NullTextInversion", "AttnCtl_FlowInversion",
                 "BasicScheduler")
MODEL_FOLDERS = ("checkpoints", "diffusion_models", "unet", "text_encoders", "clip", "vae", "loras")


def example_workflows() -> list[str]:
    return sorted(glob.glob(os.path.join(WORKFLOW_DIR, "*.json")))


def workflow_name(path: str) -> str:
    return os.path.splitext(os.path.basename(path))[0]


def ensure_tiny_checkpoint() -> str:
    """The tiny random SD1.5 checkpoint, built in a child process (keeps this one free of ComfyUI)."""
    from devtools import tiny_checkpoint
    path = tiny_checkpoint.default_path()
    if not os.path.exists(path):
        log.info("building the tiny SD1.5 checkpoint (one time per machine)")
        env = dict(os.environ)
        env.setdefault("OMP_NUM_THREADS", "1")
        res = subprocess.run([sys.executable, "-m", "devtools.tiny_checkpoint"], cwd=REPO, env=env,
                             capture_output=True, text=True, timeout=900)
        if res.returncode != 0 or not os.path.exists(path):
            raise RuntimeError(f"building the tiny checkpoint failed:\n{res.stderr[-4000:]}")
    return path


def choose_model(server, ckpt: str | None = None, kind: str | None = None) -> dict:
    """Decides the model substitution for this server: {'loader': SHAPES_LOADER} or {'ckpt_name': name}.

    kind: 'auto' (default; the env var ATTNCTL_DEMO_MODEL can set it): the shapes-world loader when the pack
    offers it, else the tiny checkpoint; 'shapes' or 'tiny' force one. ckpt (a file) overrides both."""
    kind = kind or os.environ.get("ATTNCTL_DEMO_MODEL") or "auto"
    if kind not in ("auto", "shapes", "tiny"):
        raise ValueError(f"model kind {kind!r}: use auto, shapes or tiny")
    if ckpt:
        return {"ckpt_name": server.add_checkpoint(ckpt)}
    weights = os.path.join(REPO, "shapesworld", "weights", "shapes_world.safetensors")
    has_loader = SHAPES_LOADER in (server.object_info or {}) and os.path.exists(weights)
    if kind == "shapes" and not has_loader:
        raise RuntimeError(f"{SHAPES_LOADER} is not in /object_info or its weights are missing (make shapes-model)")
    if has_loader and kind != "tiny":
        return {"loader": SHAPES_LOADER}
    return {"ckpt_name": server.add_checkpoint(ensure_tiny_checkpoint())}


def _widget_defaults(node_def: dict) -> dict:
    from devtools.workflow import _default, _ordered_inputs, is_widget
    out = {}
    for name, spec in _ordered_inputs(node_def):
        if is_widget(spec) and name in (node_def.get("input", {}).get("required") or {}):
            try:
                out[name] = _default(spec)
            except KeyError:
                pass
    return out


def apply_model(api: dict, object_info: dict, model: dict) -> dict:
    """Points every CheckpointLoaderSimple of an API prompt at the chosen model (in place)."""
    for node in api.values():
        if node["class_type"] != CKPT_LOADER:
            continue
        if "loader" in model:
            node["class_type"] = model["loader"]
            node["inputs"] = _widget_defaults(object_info[model["loader"]])
        else:
            node["inputs"]["ckpt_name"] = model["ckpt_name"]
    return api


TRAIN_TYPES = ("AttnCtl_TrainSpectralShifts", "AttnCtl_TrainSketchPredictor")     # optimiser steps: capped at `steps` too (quick e2e runs)


def override_steps(api: dict, steps: int) -> dict:
    for node in api.values():
        if node["class_type"] in TRAIN_TYPES:
            node["inputs"]["steps"] = min(node["inputs"]["steps"], steps)
        if node["class_type"] in SAMPLER_TYPES and "steps" in node["inputs"]:
            node["inputs"]["steps"] = steps
            if "end_at_step" in node["inputs"]:
                node["inputs"]["end_at_step"] = min(node["inputs"]["end_at_step"], steps)
    return api


def _combo_options(spec) -> list | None:
    if not isinstance(spec, (list, tuple)) or not spec:
        return None
    if isinstance(spec[0], list):
        return spec[0]
    opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    return opts.get("options") if spec[0] == "COMBO" else None


def missing_model_files(api: dict, object_info: dict) -> list[str]:
    """'Node.input = file' for every loader input (a node of a loaders category) of an API prompt whose
    file is not among the server's choices: the workflow needs model files this server lacks."""
    out = []
    for node in api.values():
        node_def = object_info.get(node["class_type"]) or {}
        if "loaders" not in str(node_def.get("category", "")):
            continue
        specs = {**(node_def.get("input", {}).get("required") or {}), **(node_def.get("input", {}).get("optional") or {})}
        for name, value in node["inputs"].items():
            options = _combo_options(specs.get(name))
            if isinstance(value, str) and options is not None and value not in options:
                out.append(f"{node['class_type']}.{name} = {value}")
    return out


def extra_model_paths(models_dir: str, dest_dir: str) -> str:
    """An extra_model_paths.yaml (ComfyUI's --extra-model-paths-config) for a ComfyUI-style models folder."""
    path = os.path.join(dest_dir, "attnctl_demo_models.yaml")
    base = os.path.abspath(models_dir)
    with open(path, "w") as f:
        f.write("attnctl_demo:\n")
        f.write(f"    base_path: {json.dumps(base)}\n")
        for sub in MODEL_FOLDERS:
            f.write(f"    {sub}: {sub}\n")
    return path


def build_prompt(path: str, object_info: dict, model: dict, steps: int | None = None) -> dict:
    from devtools.workflow import load, ui_to_api
    api = ui_to_api(load(path), object_info)
    apply_model(api, object_info, model)
    if steps:
        override_steps(api, steps)
    return api


# ------------------------------------------------------------------------------------------ images
def _font(size: int):
    from PIL import ImageFont
    try:
        return ImageFont.load_default(size=size)
    except Exception:  # noqa: BLE001  older Pillow / no FreeType
        try:
            return ImageFont.load_default()
        except Exception:  # noqa: BLE001
            return None


def contact_sheet(groups: list[tuple[str, list[str]]], dest: str, cell: int = 192, cols: int = 6) -> str:
    """One row block per workflow: its label, then its images as cell x cell thumbnails."""
    from PIL import Image, ImageDraw
    font = _font(16)
    label_h = 24 if font is not None else 0
    blocks = []
    for name, paths in groups:
        rows = max(1, -(-len(paths) // cols))
        blocks.append((name, paths, rows))
    width = cols * cell
    height = sum(label_h + rows * cell for _, _, rows in blocks) or cell
    sheet = Image.new("RGB", (width, height), (24, 24, 24))
    draw = ImageDraw.Draw(sheet)
    y = 0
    for name, paths, rows in blocks:
        if font is not None:
            try:
                draw.text((6, y + 4), f"{name} ({len(paths)} images)", fill=(235, 235, 235), font=font)
            except Exception:  # noqa: BLE001  a font that cannot draw: no labels
                pass
        y += label_h
        for i, p in enumerate(paths):
            with Image.open(p) as im:
                im = im.convert("RGB")
                im.thumbnail((cell, cell))
                sheet.paste(im, ((i % cols) * cell + (cell - im.width) // 2, y + (i // cols) * cell + (cell - im.height) // 2))
        y += rows * cell
    sheet.save(dest)
    return dest


def thumbnail(paths: list[str], dest: str, height: int = 160, max_bytes: int = 60_000) -> str:
    """A JPEG strip of a workflow's outputs (the first five), kept under max_bytes."""
    from PIL import Image
    ims = []
    for p in paths[:5]:
        with Image.open(p) as im:
            im = im.convert("RGB")
            im.thumbnail((height * 4, height))
            ims.append(im)
    strip = Image.new("RGB", (sum(i.width for i in ims) + 4 * (len(ims) - 1), height), (24, 24, 24))
    x = 0
    for im in ims:
        strip.paste(im, (x, (height - im.height) // 2))
        x += im.width + 4
    for q in (85, 75, 60, 45, 30):
        strip.save(dest, "JPEG", quality=q, optimize=True)
        if os.path.getsize(dest) <= max_bytes:
            break
    return dest


# ------------------------------------------------------------------------------------------ main
def run_demo(ckpt: str | None = None, out_dir: str = "out", steps: int | None = None, only: list[str] | None = None,
             thumbnails: bool = False, timeout: float = 600.0, model_kind: str | None = None,
             models_dir: str | None = None) -> int:
    from devtools.server import ComfyServer, PromptFailed, PromptRejected, ServerError

    workflows = [p for p in example_workflows() if not only or workflow_name(p) in only]
    if not workflows:
        log.error("no example workflows found in %s", WORKFLOW_DIR)
        return 1
    os.makedirs(out_dir, exist_ok=True)
    failures = []
    skipped = []
    groups = []
    tmp = tempfile.mkdtemp(prefix="attnctl-demo-")
    extra = ["--extra-model-paths-config", extra_model_paths(models_dir, tmp)] if models_dir else []
    server = ComfyServer(extra_args=extra)
    try:
        server.start()
        log.info("ComfyUI is up at %s; pack nodes: %s", server.url, ", ".join(server.pack_nodes()))
        model = choose_model(server, ckpt, model_kind)
        log.info("model: %s", model)
        for path in workflows:
            name = workflow_name(path)
            t0 = time.monotonic()
            try:
                api = build_prompt(path, server.object_info, model, steps)
                missing = missing_model_files(api, server.object_info)
                if missing:
                    log.warning("%s: skipped: needs model files this server lacks (%s); give a ComfyUI models "
                                "folder holding them with --models DIR (make demo MODELS=DIR)", name, ", ".join(missing))
                    skipped.append(name)
                    continue
                entry = server.run(api, timeout=timeout)
            except (PromptRejected, PromptFailed, ServerError, ValueError) as e:
                log.error("%s: FAILED: %s", name, e)
                failures.append(name)
                continue
            images = server.output_images(entry)
            dest = os.path.join(out_dir, name)
            shutil.rmtree(dest, ignore_errors=True)
            os.makedirs(dest)
            copied = []
            for src in images:
                d = os.path.join(dest, os.path.basename(src))
                shutil.copyfile(src, d)
                copied.append(d)
            if not copied:
                log.error("%s: FAILED: the workflow ran but wrote no images", name)
                failures.append(name)
                continue
            groups.append((name, copied))
            log.info("%s: %d images in %.1f s -> %s", name, len(copied), time.monotonic() - t0, dest)
            if thumbnails:
                thumb = thumbnail(copied, os.path.join(WORKFLOW_DIR, name + ".jpg"))
                log.info("%s: thumbnail %s (%d bytes)", name, thumb, os.path.getsize(thumb))
    except ServerError as e:
        log.error("server: %s", e)
        return 1
    finally:
        server.cleanup()
        shutil.rmtree(tmp, ignore_errors=True)
    if groups:
        sheet = contact_sheet(groups, os.path.join(out_dir, "contact_sheet.png"))
        log.info("contact sheet: %s", sheet)
    if thumbnails:
        from devtools import help_pages
        help_pages.main([])          # the help pages' pictures follow the new thumbnails
    if failures:
        log.error("%d of %d workflows failed: %s", len(failures), len(workflows), ", ".join(failures))
        return 1
    log.info("all %d workflows ran%s", len(workflows) - len(skipped),
             f" ({len(skipped)} skipped for want of model files: {', '.join(skipped)})" if skipped else "")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Run every example workflow on the real ComfyUI server.")
    ap.add_argument("--ckpt", help="a checkpoint file for every CheckpointLoaderSimple")
    ap.add_argument("--out", default=os.path.join(REPO, "out"), help="output folder (default: out/)")
    ap.add_argument("--models", help="a ComfyUI-style models folder (diffusion_models/, text_encoders/, vae/ ...) "
                                     "for the workflows with their own loaders (video_p2p_wan)")
    ap.add_argument("--model", choices=("auto", "shapes", "tiny"), default=None,
                    help="default model when --ckpt is not given: auto (AttnCtl_ShapesWorldLoader if the pack offers "
                         "it, else the tiny random SD1.5 checkpoint; env ATTNCTL_DEMO_MODEL), shapes or tiny")
    ap.add_argument("--steps", type=int, default=None, help="override the sampler steps (quick runs)")
    ap.add_argument("--only", action="append", help="run only this workflow (name without .json); repeatable")
    ap.add_argument("--thumbnails", action="store_true", help="write example_workflows/<name>.jpg from the outputs")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds allowed per workflow")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if a.ckpt and not os.path.isfile(a.ckpt):
        ap.error(f"--ckpt: no such file: {a.ckpt}")
    if a.models and not os.path.isdir(a.models):
        ap.error(f"--models: no such folder: {a.models}")
    return run_demo(a.ckpt, a.out, a.steps, a.only, a.thumbnails, a.timeout, a.model, a.models)


if __name__ == "__main__":
    sys.exit(main())
