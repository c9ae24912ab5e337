"""End to end in a real browser: the real ComfyUI 0.3.75 server serving the real front end
(comfyui-frontend-package), driven by headless Debian Chromium through Playwright.

The layout-guidance example workflow is loaded into the front end (with the demo's model substitution, as
in tests/test_e2e_server.py), a box is drawn, renamed, moved and resized with the mouse in the AttnCtl_Boxes
editor (web/js/attention_control.js), another is deleted with the Delete key and one with the delete button;
the node's `boxes` widget must hold the JSON of exactly those boxes. The prompt is queued from the front end
and must run to success with that value; after a page reload the value (and the editor's boxes) persist.
Screenshots go to out/browser/.

Needs /usr/bin/chromium (`make test` runs scripts/browser.sh, which installs Debian's chromium) and the
playwright package (requirements-host.txt). Playwright never downloads a browser here.
"""
from __future__ import annotations

import json
import os
import shutil

import pytest

from devtools.demo import choose_model
from devtools.host import REPO
from devtools.server import ComfyServer

CHROMIUM = "/usr/bin/chromium"
OUT = os.path.join(REPO, "out", "browser")
WORKFLOW = os.path.join(REPO, "example_workflows", "layout_guidance.json")
EXAMPLES = os.path.join(REPO, "example_workflows")
STEPS, SIZE = 3, 128           # as in the server e2e: a few steps on a small latent
RUN_TIMEOUT = 240.0
TOL = 0.03                     # box coordinates after a mouse drag, as fractions of the image
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-default-apps", "--mute-audio"]

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (requirements-host.txt)")
if not os.path.exists(CHROMIUM):
    pytest.skip(f"{CHROMIUM} is missing: run scripts/browser.sh (make test does)", allow_module_level=True)

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


# ------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def server():
    srv = ComfyServer(front_end=True)
    srv.start()
    try:
        yield srv
    finally:
        srv.cleanup()


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


class Front:
    """A page of the front end with the console and page errors collected."""

    def __init__(self, page, srv):
        self.page, self.srv = page, srv
        self.errors: list[str] = []
        page.on("pageerror", lambda e: self.errors.append(f"pageerror: {e}"))
        page.on("console", lambda m: m.type == "error" and self.errors.append(f"console: {m.text}"))

    def open(self):
        self.page.goto(self.srv.url, wait_until="load", timeout=120_000)
        self.wait_ready()

    def wait_ready(self):
        self.page.wait_for_function("() => window.app && window.app.graph && window.app.canvas", timeout=120_000)
        try:
            self.page.wait_for_function("() => (window.app.extensions || [])"
                                        ".some(e => e.name === 'attention_control.widgets')", timeout=20_000)
        except sync_api.TimeoutError:
            pytest.fail("the pack's front-end extension (web/js/attention_control.js) did not register:\n"
                        + "\n".join(self.errors[-20:]))

    def shot(self, name):
        os.makedirs(OUT, exist_ok=True)
        self.page.screenshot(path=os.path.join(OUT, f"{name}.png"))

    def load(self, workflow: dict):
        self.page.evaluate("async (wf) => { await window.app.loadGraphData(wf); }", workflow)
        # scale 1, the box editor (where the workflow has one) near the top left of the view
        self.page.evaluate("() => { const c = window.app.canvas; c.ds.scale = 1;"
                           " const b = window.app.graph.nodes.find(n => n.type === 'AttnCtl_Boxes');"
                           " c.ds.offset = b ? [-b.pos[0] + 40, -b.pos[1] + 60] : [0, 40];"
                           " c.setDirty(true, true); }")
        self.page.wait_for_timeout(500)

    def boxes_node(self):
        """[node id, `boxes` widget value, the editor's boxes (or None without the editor), widget names]."""
        return self.page.evaluate("""() => {
            const n = window.app.graph.nodes.find(n => n.type === 'AttnCtl_Boxes');
            if (!n) return null;
            const w = n.widgets.find(w => w.name === 'boxes');
            return [n.id, w.value, n.attnctlBoxEditor ? JSON.parse(JSON.stringify(n.attnctlBoxEditor.boxes)) : null,
                    n.widgets.map(w => w.name)];
        }""")

    def value(self) -> list:
        """The `boxes` widget's text, which the editor writes in the readable line form, as [{phrase, box}]."""
        node = self.boxes_node()
        assert node is not None, "the AttnCtl_Boxes node is gone"
        text = node[1]
        assert not text.strip().startswith("["), f"the editor wrote JSON, not one line per box: {text!r}"
        out = []
        for line in filter(None, (ln.strip() for ln in text.splitlines())):
            phrase, _, nums = line.rpartition(":")
            vals = [v.strip() for v in nums.split(",")]
            out.append({"phrase": phrase.strip(), "box": [int(v) if v.lstrip("-").isdigit() else float(v) for v in vals]})
        return out

    def canvas(self):
        loc = self.page.locator("canvas.attnctl-box-canvas")
        assert loc.count() == 1, "the box editor's canvas is not on the page (web/js/attention_control.js)"
        bb = loc.bounding_box()
        assert bb and bb["width"] > 50 and bb["height"] > 50, f"the box editor's canvas is not visible: {bb}"
        return bb

    def at(self, fx, fy):
        bb = self.canvas()
        return bb["x"] + fx * bb["width"], bb["y"] + fy * bb["height"]

    def drag(self, a, b, steps=8):
        m = self.page.mouse
        m.move(*self.at(*a))
        m.down()
        m.move(*self.at(*b), steps=steps)
        m.up()
        self.page.wait_for_timeout(100)

    def click(self, f):
        self.page.mouse.click(*self.at(*f))
        self.page.wait_for_timeout(100)


@pytest.fixture
def front(server, browser):
    # a returning user: no first-run template browser over the canvas
    server.post_json("/settings", {"Comfy.TutorialCompleted": True})
    ctx = browser.new_context(viewport={"width": 1600, "height": 1000})
    page = ctx.new_page()
    f = Front(page, server)
    try:
        yield f
    finally:
        ctx.close()


def browser_workflow(server, path: str = WORKFLOW) -> dict:
    """An example workflow (layout_guidance.json) with the demo's model (the shipped shapes-world loader, or the tiny checkpoint),
    few steps and a small latent, so that it runs on the CPU in seconds."""
    with open(path) as fh:
        wf = json.load(fh)
    model = choose_model(server)
    for node in wf["nodes"]:
        if node["type"] == "CheckpointLoaderSimple":
            if "loader" in model:
                node["type"] = model["loader"]
                node["widgets_values"] = []
                node["properties"] = {"Node name for S&R": model["loader"]}
            else:
                node["widgets_values"] = [model["ckpt_name"]]
        elif node["type"] == "KSampler":
            node["widgets_values"][2] = STEPS
        elif node["type"] == "EmptyLatentImage":
            node["widgets_values"][:2] = [SIZE, SIZE]
    return wf


def near(box, want, tol=TOL):
    return all(abs(a - b) <= tol for a, b in zip(box, want))


# ------------------------------------------------------------------------------------------ tests
def test_box_editor_draw_queue_and_reload(server, front):
    shutil.rmtree(OUT, ignore_errors=True)
    front.open()
    front.load(browser_workflow(server))
    node = front.boxes_node()
    assert node is not None, "layout_guidance.json has no AttnCtl_Boxes node"
    node_id, text, editor_boxes, names = node
    assert editor_boxes is not None, f"no box editor on AttnCtl_Boxes (widgets: {names})"
    # the editor read the workflow's line form
    assert len(editor_boxes) == 1 and editor_boxes[0]["phrase"] == "red circle", editor_boxes
    assert near(editor_boxes[0]["box"], [0.0, 0.0, 0.5, 0.5], 1e-6), editor_boxes
    front.canvas()
    front.shot("01_loaded")

    # draw a new box on the empty lower-right area
    front.drag((0.55, 0.6), (0.95, 0.95))
    boxes = front.value()
    assert len(boxes) == 2, boxes
    assert boxes[0]["phrase"] == "red circle" and near(boxes[0]["box"], [0, 0, 0.5, 0.5], 1e-6), boxes
    new = boxes[1]
    assert new["phrase"] and near(new["box"], [0.55, 0.6, 0.95, 0.95]), new
    assert all(round(v, 3) == v for v in new["box"]), f"fractions must be rounded to 3 decimals: {new}"
    # the canvas follows the workflow's Empty Latent Image (SIZE x SIZE), and boxes snap to its latent cells
    assert front.page.evaluate("() => { const n = window.app.graph.nodes.find(n => n.type === 'AttnCtl_Boxes');"
                               " return [n.widgets.find(w => w.name === 'width').value,"
                               " n.widgets.find(w => w.name === 'height').value]; }") == [SIZE, SIZE]
    cells = SIZE / 8
    assert all(abs(v * cells - round(v * cells)) < 0.02 for v in new["box"]), f"not on the latent grid: {new}"
    front.page.locator("input.attnctl-box-snap").uncheck()           # free placement for the checks below

    # name it: double-click the box, type the phrase
    front.page.mouse.dblclick(*front.at(0.75, 0.8))
    phrase = front.page.locator("input.attnctl-box-phrase")
    front.page.keyboard.press("Control+A")
    front.page.keyboard.type("red circle")
    front.page.keyboard.press("Enter")
    assert phrase.input_value() == "red circle"
    assert front.value()[1]["phrase"] == "red circle"

    # move it left and up by dragging inside it, then resize it by its bottom-right corner
    front.drag((0.75, 0.8), (0.65, 0.7))
    moved = front.value()[1]["box"]
    assert near(moved, [0.45, 0.5, 0.85, 0.85]), moved
    front.drag((moved[2], moved[3]), (0.9, 0.95))
    resized = front.value()[1]["box"]
    assert near(resized, [0.45, 0.5, 0.9, 0.95]), resized

    # select the workflow's old box (its top-left part does not overlap) and delete it with the Delete key
    front.click((0.1, 0.1))
    front.page.keyboard.press("Delete")
    boxes = front.value()
    assert len(boxes) == 1 and boxes[0]["phrase"] == "red circle" and near(boxes[0]["box"], resized), boxes
    assert front.boxes_node() is not None and front.boxes_node()[0] == node_id, "Delete removed the node itself"

    # a throw-away box, removed with the delete button
    front.drag((0.05, 0.05), (0.3, 0.3))
    assert len(front.value()) == 2
    front.page.locator("button.attnctl-box-delete").click()
    boxes = front.value()
    assert len(boxes) == 1 and near(boxes[0]["box"], resized), boxes
    value = front.boxes_node()[1]
    front.shot("02_drawn")

    # queue from the front end; the server runs exactly that value
    with front.page.expect_response(lambda r: r.url.endswith("/api/prompt") and r.request.method == "POST",
                                    timeout=60_000) as resp:
        front.page.evaluate("async () => { await window.app.queuePrompt(0, 1); }")
    assert resp.value.ok, resp.value.text()
    prompt_id = resp.value.json()["prompt_id"]
    entry = server.wait(prompt_id, timeout=RUN_TIMEOUT)
    assert (entry.get("status") or {}).get("status_str") == "success", (entry.get("status"), server.log_tail())
    sent = entry["prompt"][2]
    (boxes_in,) = [n["inputs"] for n in sent.values() if n["class_type"] == "AttnCtl_Boxes"]
    assert boxes_in["boxes"] == value, (boxes_in, value)
    assert "box_editor" not in boxes_in, "the editor widget must not be sent to the server"
    images = server.output_images(entry)
    assert images and all(os.path.getsize(p) > 0 for p in images), entry.get("outputs")
    front.page.wait_for_timeout(1000)                # the SaveImage preview
    # the sampled image is now drawn under the boxes
    assert front.page.evaluate("() => { const e = window.app.graph.nodes.find(n => n.type === 'AttnCtl_Boxes')"
                               ".attnctlBoxEditor; return !!(e.bgImg && e.bgImg.naturalWidth > 0); }"), \
        "the editor does not show the sampled image"
    front.shot("03_ran")

    # the saved workflow holds the value in the node's widgets_values (and nothing for the editor)
    saved = front.page.evaluate("() => JSON.parse(JSON.stringify(window.app.graph.serialize()))")  # as a saved file
    (saved_node,) = [n for n in saved["nodes"] if n["type"] == "AttnCtl_Boxes"]
    assert saved_node["widgets_values"][0] == value and len(saved_node["widgets_values"]) == 4, saved_node
    os.makedirs(OUT, exist_ok=True)
    with open(os.path.join(OUT, "saved_workflow.json"), "w") as fh:
        json.dump(saved, fh, indent=1)

    # reload the page: the front end restores the open workflow, and the editor shows the boxes again
    front.page.reload(wait_until="load")
    front.wait_ready()
    front.page.wait_for_function("() => window.app.graph.nodes.some(n => n.type === 'AttnCtl_Boxes')",
                                 timeout=60_000)
    restored = front.boxes_node()
    assert restored[1] == value, (restored[1], value)
    assert restored[2] is not None and len(restored[2]) == 1 and near(restored[2][0]["box"], resized), restored

    # and loading the saved JSON into a fresh graph gives the same value and boxes
    front.page.evaluate("async () => { await window.app.loadGraphData(); }")      # the default graph
    assert front.boxes_node() is None
    front.load(saved)
    again = front.boxes_node()
    assert again[1] == value and len(again[2]) == 1 and near(again[2][0]["box"], resized), again
    front.canvas()
    front.shot("04_reloaded")
    assert not [e for e in front.errors if "attention_control" in e], front.errors


def test_box_editor_undo_keys_and_prompt_check(server, front):
    """Each edit is one undo step of the front end (Ctrl+Z); Delete in the editor never deletes the
    node; arrows nudge one latent cell (8 px of the SIZE-pixel canvas), Ctrl+D duplicates, ] brings a box forward; a phrase that the linked
    Layout Guidance prompt lacks is marked before queueing, and the prompt's phrases are offered."""
    front.open()
    front.load(browser_workflow(server))
    node_id = front.boxes_node()[0]
    front.page.wait_for_timeout(300)
    front.drag((0.55, 0.55), (0.8, 0.8))                   # edit 1: a new box ('object 2')
    front.drag((0.6, 0.6), (0.7, 0.65))                    # edit 2: moved
    after_move = front.value()
    assert len(after_move) == 2
    front.page.mouse.click(*front.at(0.98, 0.02))          # focus the editor, nothing selected
    front.page.keyboard.press("Delete")
    front.page.wait_for_timeout(200)
    assert front.boxes_node() is not None and front.boxes_node()[0] == node_id, "Delete removed the node"
    # one Ctrl+Z undoes the move only (not every edit since the workflow was loaded).
    # (A second Ctrl+Z in a row is the front end's business: its graph rebuild after an undo renumbers the
    # execution order of a node brought to front, which its change tracker then counts as an edit.)
    def settle(pred, what):
        """Polls (the front end rebuilds the graph after an undo, asynchronously) until pred() holds."""
        for _ in range(50):
            if pred():
                return
            front.page.wait_for_timeout(100)
        raise AssertionError(f"{what}: {front.value()}")

    front.page.evaluate("() => window.app.graph.nodes.find(n => n.type === 'AttnCtl_Boxes').attnctlBoxEditor.root.focus()")
    front.page.keyboard.press("Control+z")
    settle(lambda: len(front.value()) == 2 and near(front.value()[1]["box"], [0.55, 0.55, 0.8, 0.8]),
           "Ctrl+Z did not undo just the move")
    undone = front.value()
    settle(lambda: (front.boxes_node()[2] or [None]) and len(front.boxes_node()[2]) == 2
           and near(front.boxes_node()[2][1]["box"], undone[1]["box"], 1e-6), "the editor did not follow the undo")
    # (Ctrl+Y is not asserted: the front end's redo queue is cleared when its own rebuild after the undo is
    # counted as an edit, see above; it redoes in most runs, not all)
    # select the new box, nudge it right by one latent cell (8 / 256 of the width), shift+down by eight
    front.click((0.7, 0.7))
    before = front.value()[1]["box"]
    front.page.keyboard.press("ArrowRight")
    front.page.keyboard.press("Shift+ArrowDown")
    nudged = front.value()[1]["box"]
    assert abs(nudged[0] - before[0] - 8 / SIZE) < 2e-3, (before, nudged)
    assert abs(nudged[1] - min(before[1] + 64 / SIZE, 1 - (before[3] - before[1]))) < 2e-3, (before, nudged)
    # duplicate it (the copy goes right after it), then send the copy back one place in the z-order
    front.page.keyboard.press("Control+d")
    three = front.value()
    assert len(three) == 3 and three[2]["phrase"] == three[1]["phrase"], three
    front.page.keyboard.press("[")
    assert front.value()[1]["box"] == three[2]["box"], front.value()
    # the phrase 'object 2' is not in 'a red circle': marked in the editor before queueing
    info = front.page.locator(".attnctl-box-info").inner_text()
    assert info == "not in prompt", info
    options = front.page.evaluate("() => [...document.querySelectorAll('.attnctl-box-editor datalist option')]"
                                  ".map(o => o.value)")
    assert "red circle" in options and "circle" in options, options
    # typed numbers move the selected box
    coords = front.page.locator("input.attnctl-box-coords")
    coords.fill("0.25,0.25,0.5,0.5")
    coords.press("Enter")
    assert front.value()[1]["box"] == [0.25, 0.25, 0.5, 0.5], front.value()
    front.shot("07_editor_keys")
    assert not [e for e in front.errors if "attention_control" in e], front.errors


def test_box_editor_draws_a_connected_image_and_takes_its_size(server, front):
    """A LoadImage connected to the Boxes' optional image: the editor draws that file under the boxes and its
    width / height become the image's (the shipped 256 x 256 example image)."""
    front.open()
    front.load(browser_workflow(server))
    front.page.evaluate("""() => {
        const g = window.app.graph;
        const b = g.nodes.find(n => n.type === 'AttnCtl_Boxes');
        const li = window.LiteGraph.createNode('LoadImage');
        li.pos = [b.pos[0] - 400, b.pos[1]];
        g.add(li);
        li.widgets.find(w => w.name === 'image').value = 'attnctl_shapes_example.png';
        li.connect(0, b, b.inputs.findIndex(i => i.name === 'image'));
        b.attnctlBoxEditor.draw();
    }""")
    front.page.wait_for_function("() => { const e = window.app.graph.nodes.find(n => n.type === 'AttnCtl_Boxes')"
                                 ".attnctlBoxEditor; return !!(e.bgImg && e.bgImg.naturalWidth > 0); }", timeout=20_000)
    info = front.page.evaluate("() => { const n = window.app.graph.nodes.find(n => n.type === 'AttnCtl_Boxes');"
                               " return [n.attnctlBoxEditor.bgUrl, n.widgets.find(w => w.name === 'width').value,"
                               " n.widgets.find(w => w.name === 'height').value]; }")
    assert "attnctl_shapes_example.png" in info[0] and "type=input" in info[0], info
    assert info[1:] == [256, 256], info
    front.canvas()
    front.shot("08_editor_background")


def test_editor_reads_line_form_and_pixel_units(server, front):
    """Typing the line form into the text widget updates the editor; in pixel units it writes pixels."""
    front.open()
    front.load(browser_workflow(server))
    textarea = front.page.evaluate_handle(
        "() => window.app.graph.nodes.find(n => n.type === 'AttnCtl_Boxes').widgets.find(w => w.name === 'boxes').element")
    textarea.as_element().fill("blue square: 0.25,0.25,0.75,0.5\nred circle: 0,0.5,0.5,1")     # typed by the user
    front.page.wait_for_timeout(100)
    boxes = front.boxes_node()[2]
    assert [b["phrase"] for b in boxes] == ["blue square", "red circle"], boxes
    assert near(boxes[0]["box"], [0.25, 0.25, 0.75, 0.5], 1e-6) and near(boxes[1]["box"], [0, 0.5, 0.5, 1], 1e-6)
    # switch to pixels (SIZE x SIZE, from the Empty Latent Image): the boxes stay where they are, the text is
    # rewritten in pixels
    front.page.evaluate("""() => {
        const n = window.app.graph.nodes.find(n => n.type === 'AttnCtl_Boxes');
        const u = n.widgets.find(w => w.name === 'units');
        u.value = 'pixels';
        u.callback && u.callback('pixels');
    }""")
    px = front.value()
    q = SIZE // 4
    assert px == [{"phrase": "blue square", "box": [q, q, 3 * q, 2 * q]},
                  {"phrase": "red circle", "box": [0, 2 * q, 2 * q, 4 * q]}], px
    # a drag in pixel units writes pixels
    front.drag((0.55, 0.55), (0.95, 0.95))
    last = front.value()[-1]["box"]
    assert all(isinstance(v, int) for v in last) and near([v / SIZE for v in last], [0.55, 0.55, 0.95, 0.95]), last


def queue(front) -> dict:
    """Queues the open workflow from the front end; returns the finished /history entry."""
    with front.page.expect_response(lambda r: r.url.endswith("/api/prompt") and r.request.method == "POST",
                                    timeout=60_000) as resp:
        front.page.evaluate("async () => { await window.app.queuePrompt(0, 1); }")
    assert resp.value.ok, resp.value.text()
    entry = front.srv.wait(resp.value.json()["prompt_id"], timeout=RUN_TIMEOUT)
    assert (entry.get("status") or {}).get("status_str") == "success", (entry.get("status"), front.srv.log_tail())
    return entry


@pytest.mark.parametrize("example", ["capture_attention", "capture_attention_dit"])
def test_heatmap_viewer_shows_a_grid_labelled_with_the_words(server, front, example):
    """The viewer needs no Save / Preview node downstream (the heat-map node's own previews), labels the maps
    with the words, enlarges a map on click, ranks the words at the hovered pixel, and labels per-step rows
    with their sampler steps; the same on UNet and DiT (joint-attention) maps."""
    front.open()
    front.load(browser_workflow(server, os.path.join(EXAMPLES, f"{example}.json")))
    # no Save Image after the heat maps
    front.page.evaluate("""() => {
        const g = window.app.graph;
        const hm = g.nodes.find(n => n.type === 'AttnCtl_AttentionHeatmap');
        for (const id of [...(hm.outputs[0].links || [])]) g.remove(g.getNodeById(g.getLink(id).target_id));
    }""")
    words = front.page.evaluate("""() => window.app.graph.nodes.find(n => n.type === 'AttnCtl_CaptureAttention')
        .widgets.find(w => w.name === 'words').value""")
    words = [w.strip() for w in words.split(",") if w.strip()]
    assert front.page.evaluate("() => !!window.app.graph.nodes.find(n => n.type === 'AttnCtl_AttentionHeatmap')"
                               ".attnctlHeatmapViewer"), "no viewer on AttnCtl_AttentionHeatmap"
    queue(front)
    front.page.wait_for_function("""(n) => document.querySelectorAll('.attnctl-heatmap-grid img').length === n""",
                                 arg=len(words), timeout=30_000)
    grid = front.page.evaluate("""() => {
        const g = document.querySelector('.attnctl-heatmap-grid');
        return [...g.children].map(e => e.tagName === 'IMG' ? ['img', e.src, e.naturalWidth] : ['label', e.textContent]);
    }""")
    assert [t for kind, t, *_ in grid if kind == "label"] == words, grid
    front.page.wait_for_function("() => [...document.querySelectorAll('.attnctl-heatmap-grid img')]"
                                 ".every(i => i.complete && i.naturalWidth > 0)", timeout=30_000)
    node = front.page.evaluate("() => window.app.graph.nodes.find(n => n.type === 'AttnCtl_AttentionHeatmap').pos")
    front.page.evaluate("(p) => { const c = window.app.canvas; c.ds.offset = [-p[0] + 80, -p[1] + 140];"
                        " c.setDirty(true, true); }", node)
    front.page.wait_for_timeout(300)
    # hover: every word ranked at that pixel, highest first
    img = front.page.locator(".attnctl-heatmap-grid img").first
    img.hover(position={"x": 10, "y": 10})
    ranked = front.page.locator(".attnctl-heatmap-rank").inner_text().splitlines()
    assert ranked[0] == "at this pixel:" and sorted(r.rsplit(" ", 1)[0] for r in ranked[1:]) == sorted(words), ranked
    vals = [float(r.rsplit(" ", 1)[1]) for r in ranked[1:]]
    assert vals == sorted(vals, reverse=True) and all(0 <= v <= 1 for v in vals), ranked
    front.shot(f"05_heatmap_viewer_{example}")
    # click: the map enlarged over the page, a click closes it
    img.click()
    zoom = front.page.locator(".attnctl-heatmap-zoom")
    assert zoom.count() == 1 and words[0] in zoom.inner_text()
    front.shot(f"05b_heatmap_zoom_{example}")
    zoom.click()
    assert front.page.locator(".attnctl-heatmap-zoom").count() == 0

    # per-step maps: a step slider labelled with sampler steps, one row of word maps per kept step
    front.page.evaluate("""() => {
        const g = window.app.graph;
        g.nodes.find(n => n.type === 'AttnCtl_CaptureAttention').widgets.find(w => w.name === 'keep_per_step').value = true;
        g.nodes.find(n => n.type === 'AttnCtl_AttentionHeatmap').widgets.find(w => w.name === 'per_step').value = true;
    }""")
    entry = queue(front)
    hm_id = front.page.evaluate("() => String(window.app.graph.nodes.find(n => n.type === 'AttnCtl_AttentionHeatmap').id)")
    saved = entry["outputs"][hm_id]["attnctl_images"]
    frames = len(saved) // len(words)
    assert frames == STEPS and len(saved) == frames * len(words), saved
    slider = front.page.locator("input.attnctl-heatmap-step")
    slider.wait_for(state="visible", timeout=30_000)
    assert int(slider.get_attribute("max")) == frames - 1
    label = lambda: front.page.locator(".attnctl-heatmap-viewer span").first.inner_text()
    assert label() == "sampler step 1", label()
    srcs = lambda: front.page.evaluate("() => [...document.querySelectorAll('.attnctl-heatmap-grid img')].map(i => i.src)")
    first = srcs()
    assert len(first) == len(words), first
    slider.fill(str(frames - 1))                      # sets the value and fires input
    last = srcs()
    assert len(last) == len(words) and not set(first) & set(last), (first, last)
    assert label() == f"sampler step {STEPS}", label()
    front.page.wait_for_timeout(300)
    front.shot(f"06_heatmap_steps_{example}")


@pytest.mark.parametrize("name", sorted(f[:-5] for f in os.listdir(EXAMPLES) if f.endswith(".json")))
def test_example_workflow_loads_in_the_front_end(server, front, name):
    """Every example workflow loads into the real front end: known node types, no validation alert."""
    front.open()
    with open(os.path.join(EXAMPLES, f"{name}.json")) as fh:
        wf = json.load(fh)
    front.load(wf)
    types = front.page.evaluate("() => window.app.graph.nodes.map(n => [n.type, !!window.LiteGraph.registered_node_types[n.type]])")
    assert len(types) == len(wf["nodes"]), types
    unknown = [t for t, known in types if not known]
    assert not unknown, f"node types unknown to the front end: {unknown}"
    alerts = [e for e in front.errors if "Invalid workflow" in e or "zod" in e]
    toast = front.page.locator(".p-toast-message").all_inner_texts()
    assert not alerts and not [t for t in toast if "Invalid workflow" in t], (alerts, toast)
    # laid out as drawn: no two nodes overlap (title bars included, at the sizes the front end gives them), no
    # wire runs right to left, every node sits inside its stage's group, a Note says what the workflow does
    rects = front.page.evaluate("""() => window.app.graph.nodes.map(n => {
        const th = window.LiteGraph.NODE_TITLE_HEIGHT;
        return [n.id, n.type, n.pos[0], n.pos[1] - th, n.size[0], n.size[1] + th]; })""")
    over = [(a[1], b[1]) for i, a in enumerate(rects) for b in rects[i + 1:]
            if a[2] < b[2] + b[4] and b[2] < a[2] + a[4] and a[3] < b[3] + b[5] and b[3] < a[3] + a[5]]
    assert not over, f"{name}: overlapping nodes {over}"
    x = {r[0]: r[2] for r in rects}
    assert all(x[l[3]] > x[l[1]] for l in wf["links"]), f"{name}: a wire runs back to the left"
    assert any(n["type"] == "Note" for n in wf["nodes"]), f"{name}: no Note"
    groups = front.page.evaluate("() => window.app.graph.groups.map(g => [g.title, ...g._bounding])")
    assert groups, f"{name}: no groups"
    for r in rects:
        if r[1] != "Note":
            assert any(g[1] <= r[2] and r[2] + r[4] <= g[1] + g[3] and g[2] <= r[3] and r[3] + r[5] <= g[2] + g[4]
                       for g in groups), f"{name}: {r[1]} is in no group"


def test_sidebar_finder_finds_every_node_by_each_alias_and_adds_it(server, front):
    """The Attention Control sidebar tab (web/js/node_finder.js): each node of the pack is listed for each of
    its search aliases (nodes/aliases.py, the words of issue 22), typed into the tab's search field; an unknown
    word lists none and says so; Enter adds the first result to the canvas, a click adds the one clicked."""
    from devtools.help_pages import _aliases
    aliases = _aliases()
    front.open()
    front.page.locator(".attnctl-find-tab-button").first.click()
    field = front.page.locator(".attnctl-find-input")
    field.wait_for(timeout=20_000)
    front.page.wait_for_function("() => document.querySelectorAll('.attnctl-find-item').length > 0", timeout=20_000)
    listed = front.page.evaluate("() => [...document.querySelectorAll('.attnctl-find-item')].map(e => e.dataset.type)")
    assert set(listed) == set(aliases), set(listed) ^ set(aliases)
    missed = []
    for node, words in aliases.items():
        for word in words:
            field.fill(word)
            found = front.page.evaluate("() => [...document.querySelectorAll('.attnctl-find-item')]"
                                        ".map(e => e.dataset.type)")
            if node not in found:
                missed.append((node, word, found[:5]))
            else:
                assert len(found) < len(aliases), f"{word!r} lists every node: it selects nothing"
    assert not missed, f"aliases that do not find their node in the sidebar tab: {missed}"
    # the words the issue names, each with the node users mean first
    for word, node in (("p2p", "AttnCtl_PromptToPrompt"), ("panorama", "AttnCtl_TiledDiffusion"),
                       ("daam", "AttnCtl_CaptureAttention"), ("masactrl", "AttnCtl_MasaCtrl"),
                       ("collage", "AttnCtl_CollageLayer")):
        field.fill(word)
        first = front.page.locator(".attnctl-find-item").first.get_attribute("data-type")
        assert first in {n for n, w in aliases.items() if word in w} and node in front.page.evaluate(
            "() => [...document.querySelectorAll('.attnctl-find-item')].map(e => e.dataset.type)"), (word, first)
    field.fill("zzqx no such technique")
    assert front.page.locator(".attnctl-find-item").count() == 0
    assert "No Attention Control node" in front.page.locator(".attnctl-find-none").inner_text()
    before = front.page.evaluate("() => window.app.graph.nodes.map(n => n.type)")
    field.fill("word swap")
    field.press("Enter")
    field.fill("heatmap")
    front.page.locator(".attnctl-find-item[data-type='AttnCtl_AttentionHeatmap']").click()
    after = front.page.evaluate("() => window.app.graph.nodes.map(n => n.type)")
    added = list(after)
    for t in before:
        added.remove(t)
    assert sorted(added) == ["AttnCtl_AttentionHeatmap", "AttnCtl_PromptToPrompt"], added
    front.shot("07_sidebar_finder")
    assert not [e for e in front.errors if "attention_control" in e or "node_finder" in e], front.errors
