"""The demo page: draw a box, type a phrase, ask the MLLM about a region (``make app``).

    python -m cloc_demo.app                                   # runs/demo/cloc, runs/demo/clip, runs/demo-mllm/cloc-llava
    python -m cloc_demo.app --cloc DIR --clip DIR --mllm DIR --port 7861

A Gradio page over :class:`cloc_demo.app_backend.AppBackend`, which holds all the model logic; this
module only lays out the page and turns clicks into calls. A box is drawn by clicking two opposite
corners on the image (or typed as ``x1, y1, x2, y2``); in point mode one click is a point prompt.
Gradio is the ``app`` extra (``pip install -e ".[app]"``).
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import time

from .app_backend import (
    DEFAULT_CLIP,
    DEFAULT_CLOC,
    DEFAULT_DATA,
    DEFAULT_GROUND_THRESHOLD,
    DEFAULT_MLLM,
    MAX_FILE_BYTES,
    AppBackend,
    InputError,
    corners_to_box,
    default_vocabulary,
    load_scenes,
    parse_box,
    parse_vocabulary,
    render,
)

logger = logging.getLogger("cloc.app")

BOX_MODE, POINT_MODE = "box: click two corners", "point: one click"
CLIP_METHOD_NAMES = {
    "clip-maskbg": "background-masked image",
    "clip-crop": "crop-and-encode",
    "clip-roi": "RoI-Align on the patch grid",
}
COLOURS = {"box": (255, 215, 0), "scene": (160, 160, 160), "ground": (255, 40, 40), "answer": (255, 0, 255),
           "drawn": (0, 200, 255), "best": (0, 230, 0)}
DEFAULT_QUESTION = "Is the object <region> a red circle or a blue square?"
"""The MLLM tab's first question: referring classification, one of the tasks `make demo-mllm` trains."""
FONTS = ["ui-sans-serif", "system-ui", "sans-serif"]  # no web fonts: the page needs no internet


def new_state() -> dict:
    """One browser session: the image, its candidate boxes, the prompt drawn and the overlays shown."""
    return {"image": None, "scene_boxes": [], "drawn": [], "corner": None, "box": None, "point": None,
            "overlay": [], "scale": 1.0}


def canvas(backend: AppBackend, state: dict):
    """The picture shown: the image with scene boxes, drawn boxes, the prompt and result overlays."""
    if state["image"] is None:
        return None
    boxes = [(b, COLOURS["scene"], f"S{i + 1}") for i, b in enumerate(state["scene_boxes"])]
    boxes += [(b, COLOURS["drawn"], f"D{i + 1}") for i, b in enumerate(state["drawn"])]
    boxes += [tuple(o) for o in state["overlay"]]
    if state["box"] is not None:
        boxes.append((state["box"], COLOURS["box"], "box"))
    for mark in (state["point"], state["corner"]):
        if mark is not None:
            x, y = mark
            boxes.append(([x - 0.5, y - 0.5, x + 0.5, y + 0.5], COLOURS["box"], ""))
    picture, state["scale"] = render(backend.image(state["image"]), boxes)
    return picture


def label_table(title: str, rows) -> str:
    lines = [f"**{title}**", "", "| # | label | probability | cosine |", "|---|---|---|---|"]
    lines += [f"| {i + 1} | {r.label} | {r.probability:.3f} | {r.cosine:.3f} |" for i, r in enumerate(rows)]
    return "\n".join(lines)


def fmt_box(box) -> str:
    return "[" + ", ".join(f"{v:.1f}" for v in box) + "]"


class Page:
    """The event handlers; each returns ``(state, picture, status, ...)`` and never raises: errors
    become a message on the page."""

    def __init__(self, backend: AppBackend, scenes: list[dict]):
        self.backend, self.scenes = backend, scenes

    def _show(self, state, status, *extra):
        return (state, canvas(self.backend, state), status, *extra)

    def _failed(self, state, err: Exception, n_extra: int):
        import gradio as gr

        if not isinstance(err, InputError):
            logger.exception("request failed")
        message = str(err) if isinstance(err, InputError) else f"internal error ({type(err).__name__}): {err}"
        return (state, gr.skip(), f"⚠️ {message}", *([gr.skip()] * n_extra))

    # -- image --------------------------------------------------------------------------------------
    def pick_scene(self, state, choice):
        try:
            scene = self.scenes[int(choice)]
            return self._load(scene["path"], scene["name"], scene["boxes"],
                              f"test scene {scene['name']}: {scene['caption']}; objects: "
                              + ", ".join(f"S{i + 1} {label}" for i, label in enumerate(scene["labels"])))
        except Exception as err:  # noqa: BLE001 (the page shows every failure)
            return self._failed(state, err, 0)

    def upload(self, state, path):
        if path is None:  # the upload was cleared: keep what is shown
            return self._skip(3)
        try:
            return self._load(path, os.path.basename(str(path)), [], "uploaded image")
        except Exception as err:  # noqa: BLE001
            return self._failed(state, err, 0)

    def _load(self, source, name, scene_boxes, what):
        image_id, notes = self.backend.add_image(source, name=name)
        state = new_state()
        state.update(image=image_id, scene_boxes=[list(b) for b in scene_boxes])
        image = self.backend.image(image_id)
        note = "".join(f" Note: {n}." for n in notes)
        return self._show(state, f"{what} ({image.width} x {image.height} px). Click two corners to draw a box.{note}")

    # -- prompts --------------------------------------------------------------------------------------
    def click(self, state, mode, vocabulary, evt):
        try:
            if state["image"] is None:
                raise InputError("pick a test scene or upload an image first")
            image = self.backend.image(state["image"])
            x, y = (float(v) / state["scale"] for v in evt.index)
            x, y = min(max(x, 0.0), image.width - 1e-3), min(max(y, 0.0), image.height - 1e-3)
            if mode == POINT_MODE:
                state.update(point=[x, y], box=None, corner=None, overlay=[])
            elif state["corner"] is None:
                state.update(corner=[x, y], box=None, point=None, overlay=[])
                return self._show(state, f"first corner at ({x:.1f}, {y:.1f}); click the opposite corner", *self._skip(3))
            else:
                box = corners_to_box(state["corner"], [x, y], image.width, image.height)
                state.update(box=box, corner=None, point=None, overlay=[])
                state["drawn"].append(box)
            return self._labels(state, vocabulary)
        except Exception as err:  # noqa: BLE001
            return self._failed(state, err, 3)

    def typed_box(self, state, text, vocabulary):
        try:
            if state["image"] is None:
                raise InputError("pick a test scene or upload an image first")
            image = self.backend.image(state["image"])
            box = parse_box(text, image.width, image.height)
            state.update(box=box, corner=None, point=None, overlay=[])
            state["drawn"].append(box)
            return self._labels(state, vocabulary)
        except Exception as err:  # noqa: BLE001
            return self._failed(state, err, 3)

    def relabel(self, state, vocabulary):
        try:
            return self._labels(state, vocabulary)
        except Exception as err:  # noqa: BLE001
            return self._failed(state, err, 3)

    def clear(self, state):
        try:
            state.update(drawn=[], box=None, point=None, corner=None, overlay=[])
            return self._show(state, "boxes cleared", "", "", "")
        except Exception as err:  # noqa: BLE001
            return self._failed(state, err, 3)

    @staticmethod
    def _skip(n):
        import gradio as gr

        return [gr.skip()] * n

    def _labels(self, state, vocabulary):
        if state["image"] is None:
            raise InputError("pick a test scene or upload an image first")
        labels = parse_vocabulary(vocabulary)
        start = time.perf_counter()
        out = self.backend.classify(state["image"], labels, box=state["box"], point=state["point"])
        elapsed_ms = (time.perf_counter() - start) * 1000
        prompt = f"box {fmt_box(state['box'])}" if state["box"] is not None else f"point {fmt_box(state['point'])}"
        method = out["clip_method"]
        clip_title = f"Best CLIP baseline: {method} ({CLIP_METHOD_NAMES.get(method, method)})"
        if state["point"] is not None:
            clip_title += f", on the box {fmt_box(out['clip_box'])} around the point (CLIP takes no point prompts)"
        box_text = ", ".join(f"{v:.1f}" for v in state["box"]) if state["box"] is not None else ""
        return self._show(state, f"top-5 of {len(labels)} labels for the {prompt} ({elapsed_ms:.0f} ms)",
                          label_table("CLOC (Prompter on the cached ViT tokens)", out["cloc"]),
                          label_table(clip_title, out["clip"]), box_text)

    # -- phrase ---------------------------------------------------------------------------------------
    def ground(self, state, phrase, threshold):
        try:
            if state["image"] is None:
                raise InputError("pick a test scene or upload an image first")
            candidates = [(f"S{i + 1}", b) for i, b in enumerate(state["scene_boxes"])]
            candidates += [(f"D{i + 1}", b) for i, b in enumerate(state["drawn"])]
            result = self.backend.ground(state["image"], phrase, [b for _, b in candidates], threshold)
            verdict = (f"**found**: box {fmt_box(result.box)}, confidence {result.score:.3f} (threshold {result.threshold:.2f})"
                       if result.found else
                       f"**not found**: the head's best box {fmt_box(result.box)} has confidence {result.score:.3f} "
                       f"< threshold {result.threshold:.2f}")
            state["overlay"] = [(result.box, COLOURS["ground"], f"{result.score:.2f}" + ("" if result.found else " (not found)"))]
            lines = [f"Grounding of *{phrase.strip()}*: {verdict}", ""]
            if result.ranking:
                best = result.ranking[0]
                state["overlay"].append((best[1], COLOURS["best"], f"best {candidates[best[0]][0]}"))
                lines += ["Candidate boxes by region-text similarity:", "", "| rank | box | pixels | cosine |",
                          "|---|---|---|---|"]
                lines += [f"| {r + 1} | {candidates[i][0]} | {fmt_box(b)} | {s:.3f} |" for r, (i, b, s) in enumerate(result.ranking)]
            else:
                lines.append("No candidate boxes to rank: pick a test scene or draw boxes.")
            return self._show(state, "grounded (red: the box head's box; green: the most similar candidate)", "\n".join(lines))
        except Exception as err:  # noqa: BLE001
            return self._failed(state, err, 1)

    # -- MLLM -----------------------------------------------------------------------------------------
    def ask(self, state, question):
        try:
            if state["image"] is None:
                raise InputError("pick a test scene or upload an image first")
            answer = self.backend.ask(state["image"], question, box=state["box"])
            found = (f"**Box in the answer:** {fmt_box(answer.box)} (magenta)" if answer.box is not None
                     else "**no box** in the answer")
            state["overlay"] = [(answer.box, COLOURS["answer"], "answer")] if answer.box is not None else []
            text = f"**Asked:** `{answer.prompt}`\n\n**Answer:** {answer.text or '(empty)'}\n\n{found}"
            if state["box"] is not None and "<region>" not in answer.prompt:
                text += "\n\n(The drawn box was not used: the question has no `<region>`.)"
            return self._show(state, "answered", text)
        except Exception as err:  # noqa: BLE001
            return self._failed(state, err, 1)


def build_app(backend: AppBackend, scenes: list[dict], vocabulary: list[str], info: str = ""):
    """The Gradio ``Blocks`` of the page (not launched)."""
    import gradio as gr

    page = Page(backend, scenes)
    with gr.Blocks(title="CLOC demo", analytics_enabled=False) as demo:
        gr.Markdown("# CLOC: region-aware CLIP\n" + info)
        state = gr.State(new_state())
        with gr.Row():
            with gr.Column(scale=1):
                scene = gr.Dropdown([(f"{s['name']}: {s['caption']}", str(i)) for i, s in enumerate(scenes)],
                                    value="0" if scenes else None, label="Test scene", elem_id="scene")
                upload = gr.File(label="…or upload an image", type="filepath", elem_id="upload")
                status = gr.Markdown("Pick a test scene or upload an image.", elem_id="status")
                mode = gr.Radio([BOX_MODE, POINT_MODE], value=BOX_MODE, label="Click mode", elem_id="mode")
                box_text = gr.Textbox(label="Box: x1, y1, x2, y2 (image pixels)", elem_id="box-text")
                with gr.Row():
                    use_box = gr.Button("Use this box", elem_id="use-box")
                    clear = gr.Button("Clear boxes", elem_id="clear")
            with gr.Column(scale=2):
                picture = gr.Image(label="Image (click to draw)", type="pil", interactive=False, elem_id="canvas",
                                   buttons=[], format="png")
        with gr.Tabs():
            with gr.Tab("Region labels", elem_id="tab-labels"):
                with gr.Row():
                    cloc_md = gr.Markdown("Draw a box (or click a point) to see its top-5 labels.", elem_id="cloc-labels")
                    clip_md = gr.Markdown(elem_id="clip-labels")
                with gr.Accordion("Vocabulary (editable, one label per line)", open=False, elem_id="vocab-panel"):
                    vocab = gr.Textbox("\n".join(vocabulary), lines=8, show_label=False, elem_id="vocab")
                    relabel = gr.Button("Label the box again", elem_id="relabel")
            with gr.Tab("Ground a phrase", elem_id="tab-ground"):
                phrase = gr.Textbox(label="Phrase", placeholder="a red circle", elem_id="phrase")
                threshold = gr.Number(backend.ground_threshold, label="'not found' below this confidence", elem_id="threshold")
                ground_btn = gr.Button("Ground", elem_id="ground")
                ground_md = gr.Markdown(elem_id="ground-result")
            with gr.Tab("Ask the MLLM", elem_id="tab-mllm"):
                gr.Markdown(
                    f"`<region>` stands for the drawn box (its coordinates, in the `{backend.box_convention}` box "
                    f"convention, are written before it). Ask \"Where is ...?\" to get a box drawn."
                    + ("" if backend.generator is not None else "\n\n**No CLOC-LLaVA checkpoint is loaded.**"))
                question = gr.Textbox(DEFAULT_QUESTION, label="Question", elem_id="question")
                ask_btn = gr.Button("Ask", elem_id="ask")
                answer_md = gr.Markdown(elem_id="answer")

        shown = [state, picture, status]
        labels_out = [*shown, cloc_md, clip_md, box_text]
        scene.change(page.pick_scene, [state, scene], shown, api_name="pick_scene")
        if scenes:  # the page opens on the first test scene
            demo.load(page.pick_scene, [state, scene], shown)
        upload.upload(page.upload, [state, upload], shown, api_name="upload")

        def on_click(s, m, v, evt):
            return page.click(s, m, v, evt)

        on_click.__annotations__["evt"] = gr.SelectData  # a real class: Gradio finds the event argument by it

        picture.select(on_click, [state, mode, vocab], labels_out, api_name="click")
        use_box.click(page.typed_box, [state, box_text, vocab], labels_out, api_name="box")
        box_text.submit(page.typed_box, [state, box_text, vocab], labels_out)
        relabel.click(page.relabel, [state, vocab], labels_out, api_name="relabel")
        clear.click(page.clear, [state], labels_out)
        ground_btn.click(page.ground, [state, phrase, threshold], [*shown, ground_md], api_name="ground")
        phrase.submit(page.ground, [state, phrase, threshold], [*shown, ground_md])
        ask_btn.click(page.ask, [state, question], [*shown, answer_md], api_name="ask")
    return demo


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m cloc_demo.app", description="CLOC demo page (Gradio)")
    parser.add_argument("--cloc", default=DEFAULT_CLOC, help=f"CLOC checkpoint folder (default {DEFAULT_CLOC})")
    parser.add_argument("--clip", default=DEFAULT_CLIP, help=f"CLIP baseline checkpoint folder (default {DEFAULT_CLIP})")
    parser.add_argument("--mllm", default=DEFAULT_MLLM, help=f"CLOC-LLaVA checkpoint folder (default {DEFAULT_MLLM}); "
                        "the MLLM tab says so when it is missing")
    parser.add_argument("--data", default=DEFAULT_DATA, help="dataset folder whose test split gives the scenes")
    parser.add_argument("--clip-method", default="auto",
                        help="CLIP baseline region method (clip-maskbg, clip-crop, clip-roi); auto: the best one in "
                             "the report.json next to --clip")
    parser.add_argument("--ground-threshold", type=float, default=DEFAULT_GROUND_THRESHOLD,
                        help=f"grounding confidence below which the page says 'not found' (default {DEFAULT_GROUND_THRESHOLD})")
    parser.add_argument("--box-convention", help="box text convention of the MLLM (llava, shikra, ferret, qwen, "
                        "lmms_eval; default: its processor's, else the one `make demo-mllm` trains with)")
    parser.add_argument("--box-frame", choices=["original", "pad"], help="frame of the MLLM's box text (default: the "
                        "convention's own, else original)")
    parser.add_argument("--chat-format", default="llava", help="MLLM chat format (eval.mllm_generate.wrap_question; "
                        "default llava, what cloc-finetune-mllm trains with)")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--scenes", type=int, default=100, help="test scenes offered (default 100)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=7860, help="port (0: any free one)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    return parser.parse_args(argv)


def main(argv=None, block: bool = True):
    """Load the checkpoints, serve the page and print its URL; ``block=False`` returns the running
    ``Blocks`` (``.close()`` stops it), for tests."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    args = parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    backend = AppBackend.from_paths(args.cloc, args.clip, args.mllm, clip_method=args.clip_method,
                                    box_convention=args.box_convention, box_frame=args.box_frame,
                                    chat_format=args.chat_format, max_new_tokens=args.max_new_tokens,
                                    ground_threshold=args.ground_threshold)
    scenes = load_scenes(args.data, limit=args.scenes)
    mllm = args.mllm if backend.generator is not None else f"none ({args.mllm} not found)"
    info = f"CLOC `{args.cloc}` · CLIP baseline `{args.clip}` ({backend.clip_method}) · MLLM `{mllm}`"
    if backend.generator is None:
        print(f"no CLOC-LLaVA checkpoint in {args.mllm!r}: the MLLM tab will say so (`make demo-mllm` writes one)")
    demo = build_app(backend, scenes, default_vocabulary(args.data), info)
    import gradio as gr

    port = args.port or free_port(args.host)
    demo.queue(default_concurrency_limit=1)
    theme = gr.themes.Default(font=FONTS, font_mono=["ui-monospace", "monospace"])
    _, url, _ = demo.launch(server_name=args.host, server_port=port, prevent_thread_lock=True, quiet=True,
                            share=False, theme=theme, max_file_size=2 * MAX_FILE_BYTES, show_error=True)
    print(f"CLOC demo page: {url}", flush=True)
    if block:
        demo.block_thread()
    return demo


if __name__ == "__main__":
    main()
