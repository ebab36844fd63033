"""tools/explorer.py (the stage explorer) and tools/analyze_imbalance.py --html.

In process: every stage the explorer shows equals the detectron2 model's own per-layer
results, the ones the per-layer AP is computed from (`DIMaskDINOArch.detectron2_results` of
every output, on the dataset mapper's input), and the views filter and match as they say.
In a real browser (headless Chromium driven by Playwright; skipped with the reason where
either is missing): the running app answers an image chosen from the dataset, slider moves
and threshold changes with what the model predicts, keeps serving after bad uploads, and
the HTML report opens without console errors. The browser test prints its response times."""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("detectron2", reason="detectron2 is not installed (install it from source, see README)")

from detectron2.data import DatasetCatalog  # noqa: E402

from di_maskdino.d2 import build_mapper, register_coco_instances_checked  # noqa: E402
from di_maskdino.images import read_image_rgb  # noqa: E402
from tests.tooling import QUICK, ROOT, load_script, run_tool  # noqa: E402


@pytest.fixture(scope="module")
def explorer():
    return load_script("explorer.py", "di_maskdino_explorer")


@pytest.fixture(scope="module")
def dataset(data_root):
    name = "explorer_synthetic_val"
    if name not in DatasetCatalog.list():
        register_coco_instances_checked(
            name, str(data_root / "synthetic" / "val.json"), str(data_root / "synthetic/val")
        )
    return name


@pytest.fixture(scope="module")
def loaded(explorer, trained):
    """The quick-start model as the explorer loads it (class names from synthetic_val)."""
    return explorer.load_model("model", QUICK, ["MODEL.WEIGHTS", str(trained / "model_final.pth")])


def test_every_stage_shown_is_the_models_per_layer_result(loaded, dataset):
    model, cfg = loaded
    network = model.network
    mapper = build_mapper(cfg, False)
    records = DatasetCatalog.get(dataset)
    for record in records:
        stages = model.predict(read_image_rgb(record["file_name"]))
        inputs = [mapper(dict(record))]
        with torch.no_grad():
            batch, sizes = network.preprocess([x["image"] for x in inputs])
            output = network.run(batch, all_layer_masks=True)
        expected = {
            name: network.detectron2_results(p, inputs, sizes, tuple(batch.shape[-2:]))[0]["instances"]
            for name, p in output.named()
        }
        assert sorted(s.name for s in stages) == sorted(expected)
        for stage in stages:
            instances, found = expected[stage.name], stage.detections
            torch.testing.assert_close(found.scores, instances.scores, rtol=0, atol=1e-5)
            assert found.labels.tolist() == instances.pred_classes.tolist()
            torch.testing.assert_close(found.boxes, instances.pred_boxes.tensor, rtol=0, atol=1e-3)
            if instances.has("pred_masks"):
                agree = (found.masks == instances.pred_masks).float().mean().item()
                assert agree >= 0.9999, f"{stage.name}: {agree}"
            else:
                assert found.masks is None


def test_views_filter_by_score_and_class_and_match_the_ground_truth(explorer, loaded, dataset):
    model, _ = loaded
    record = DatasetCatalog.get(dataset)[0]
    listed, ground_truth = explorer.dataset_images(dataset, 10)
    name = os.path.basename(record["file_name"])
    app = explorer.Explorer([model], listed, ground_truth)
    analysis = app.analyse_named(name)
    assert analysis.ground_truth is not None and analysis.ground_truth.boxes.shape[0] == len(record["annotations"])
    stages = analysis.stages[0]
    last = len(stages) - 1
    detections = stages[last].detections
    threshold = float(detections.scores.median())
    ((title, drawing, rows),) = app.view(analysis, last, threshold, [], "boxes and masks")
    assert stages[last].name in title and drawing.dtype == np.uint8 and drawing.ndim == 3
    assert [row[2] for row in rows] == [round(float(s), 3) for s in detections.scores if s >= threshold]
    assert all(row[3] != "" for row in rows)  # a decoder layer: box vs own mask IoU
    # views are kept for the latest settings only, and never answer for other settings
    ((_, _, everything),) = app.view(analysis, last, 0.0, [], "boxes and masks")
    assert (
        len(everything) == len(detections) and app.view(analysis, last, threshold, [], "boxes and masks")[0][2] == rows
    )
    app.prefetch(analysis, 0, threshold, [], "boxes and masks")
    assert {key[:3] for key in analysis.views} == {(threshold, (), "boxes and masks")}
    assert len(analysis.views) == len(stages)
    wanted = model.class_names[int(detections.labels[0])]
    ((_, _, only),) = app.view(analysis, last, 0.0, [wanted], "masks")
    assert len(only) == int((detections.labels == detections.labels[0]).sum()) and {r[1] for r in only} == {wanted}
    # token interaction: boxes only, so no own-mask IoU and no mask IoU with the ground truth
    ((_, _, boxes_only),) = app.view(analysis, 0, 0.0, [], "boxes")
    assert stages[0].name.startswith("TI") and all(r[3] == "" and r[5] == "" for r in boxes_only)
    # the ground truth drawn instead of the detections: every object's mask is colored
    ((title, truth_drawn, same_rows),) = app.view(analysis, last, threshold, [], "ground truth")
    assert "drawn: the ground truth" in title and same_rows == rows
    scale = truth_drawn.shape[0] // analysis.image.shape[0]
    for mask in analysis.ground_truth.masks:
        ys, xs = np.nonzero(mask.numpy())
        y, x = ys[len(ys) // 2], xs[len(xs) // 2]
        assert not np.array_equal(truth_drawn[y * scale, x * scale], analysis.image[y, x])
    no_truth = app.analyse(analysis.image, "no truth")
    ((title, plain, _),) = app.view(no_truth, last, threshold, [], "ground truth")
    assert "no ground truth to draw" in title and np.array_equal(plain[::scale, ::scale], analysis.image)
    # ground truth that is the last stage's best detection itself: it matches with IoU 1, and
    # no other detection matches (one to one)
    best = stages[last].detections
    truth = explorer.GroundTruth(best.boxes[:1], best.labels[:1], best.masks[:1])
    ((_, _, matched),) = app.view(app.analyse(analysis.image, name, truth), last, 0.0, [], "boxes and masks")
    assert matched[0][4] == 1.0 and matched[0][5] == 1.0
    assert all(r[4] == "" or r[4] < 1.0 for r in matched[1:]) and sum(r[4] != "" for r in matched) == 1


def test_a_checkpoint_that_does_not_fit_is_refused_at_start(trained, data_root):
    result = run_tool(
        "explorer.py",
        [
            "--config-file",
            QUICK,
            "MODEL.WEIGHTS",
            str(trained / "model_final.pth"),
            "MODEL.DI_MASKDINO.NUM_CLASSES",
            "7",
        ],
        data_root,
        check=False,
    )
    assert result.returncode != 0 and "model (" in result.stderr and "class" in result.stderr.lower()


# --- in a browser ---


def chromium():
    pytest.importorskip("playwright.sync_api", reason="Playwright is not installed (pip install playwright)")
    pytest.importorskip("gradio", reason="Gradio is not installed (pip install -r requirements-explorer.txt)")
    path = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not path:
        pytest.skip("no Chromium executable (apt-get install chromium, or set CHROMIUM to its path)")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def app(trained, data_root):
    executable = chromium()
    port = free_port()
    env = dict(os.environ, DETECTRON2_DATASETS=str(data_root))
    command = [sys.executable, os.path.join(ROOT, "tools", "explorer.py"), "--config-file", QUICK]
    command += ["--dataset", "synthetic_val", "--port", str(port), "MODEL.WEIGHTS", str(trained / "model_final.pth")]
    process = subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 180
        while True:
            try:
                urllib.request.urlopen(url, timeout=5)
                break
            except OSError:
                if process.poll() is not None or time.time() > deadline:
                    raise AssertionError(f"the explorer did not start:\n{process.stdout.read()[-3000:]}") from None
                time.sleep(0.5)
        yield url, executable
    finally:
        process.terminate()
        process.wait(timeout=30)


def shown_scores(page, expected, index=0):
    """Waits until the instance table has len(expected) rows (the grid's row count) and
    returns the scores of the rows the page has drawn (a long table draws the first ones)."""
    page.wait_for_function(
        "([i, n]) => document.querySelector(`#table-${i} [role=grid]`).getAttribute('aria-rowcount') == n",
        arg=[index, str(len(expected) + 1)],
    )
    rows = page.locator(f"#table-{index} [role=row]")
    texts = [rows.nth(i).inner_text() for i in range(1, rows.count())]
    cells = [[c.strip() for c in t.split("\n")] for t in texts if t.strip()]  # "#", class, score, ...
    assert len(cells) >= min(len(expected), 5), cells
    return [float(c[2]) for c in cells]


def shown_column(page, column, index=0):
    """A column of the rows the instance table has drawn (columns 0-3 are never empty)."""
    rows = page.locator(f"#table-{index} [role=row]")
    texts = [rows.nth(i).inner_text() for i in range(1, rows.count())]
    return [float(t.split("\n")[column]) for t in texts if t.strip()]


def wait_text(page, selector, text, timeout=120_000):
    page.wait_for_function(
        "([s, t]) => document.querySelector(s) && document.querySelector(s).innerText.includes(t)",
        arg=[selector, text],
        timeout=timeout,
    )


@pytest.mark.slow
def test_the_app_in_a_browser(app, loaded, data_root, tmp_path):
    from playwright.sync_api import sync_playwright

    url, executable = app
    model, _ = loaded
    image_path = str(data_root / "synthetic" / "val" / "000002.png")
    stages = model.predict(read_image_rgb(image_path))
    names = [s.name for s in stages]
    timings = {}
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        errors = []
        page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
        page.goto(url)
        page.wait_for_selector("#status")

        # images of the dataset: every stage computed, ground truth known (the app's first
        # image also warms it up, so the second one is the one timed as a new image)
        for name, timing in (("000001.png", "first image"), ("000002.png", "new image")):
            page.click("#listed input")
            start = time.perf_counter()
            page.locator("#listed li[role=option]", has_text=name).click()
            wait_text(page, "#status", f"{name}: 128 x 128 pixels, with ground truth")
            wait_text(page, "#stage-label", f"Stage 1 of {len(names)}: {names[0]}")
            timings[timing] = time.perf_counter() - start
        threshold = 0.3  # the app's default
        expected = [round(float(s), 3) for s in stages[0].detections.scores if s >= threshold]
        shown = shown_scores(page, expected)
        assert shown == expected[: len(shown)]

        # the slider, moved with the keyboard as a person would (who looks at the image first):
        # one stage per key press
        slider = page.locator("#stage input[type=range]")
        moves = []
        for index in range(1, len(names)):
            time.sleep(0.5)
            slider.focus()
            start = time.perf_counter()
            page.keyboard.press("ArrowRight")
            wait_text(page, "#stage-label", f"Stage {index + 1} of {len(names)}: {names[index]}")
            moves.append(time.perf_counter() - start)
            expected = [round(float(s), 3) for s in stages[index].detections.scores if s >= threshold]
            shown = shown_scores(page, expected)
            assert shown == expected[: len(shown)], names[index]
        timings["slider move (median)"] = float(np.median(moves))

        # a threshold (two decimals, as the slider takes it) that keeps some of the last stage's
        # detections and lies clear of every score (the app runs in another process)
        scores = sorted(stages[-1].detections.scores.tolist(), reverse=True)
        candidates = {float(np.floor(score * 100) / 100) for score in scores[:10]}
        threshold = max(candidates, key=lambda t: min(abs(score - t) for score in scores))
        assert min(abs(score - threshold) for score in scores) > 1e-4
        box = page.locator("#threshold input[type=number]")
        box.fill(str(threshold))
        box.press("Enter")
        expected = [round(s, 3) for s in scores if s >= threshold]
        assert expected
        shown = shown_scores(page, expected)
        assert shown == expected[: len(shown)]
        agreement = [round(float(v), 3) for v in stages[-1].box_mask_iou[: len(shown)]]
        assert shown_column(page, 3)[: len(shown)] == agreement  # box vs own mask IoU
        page.screenshot(path=str(tmp_path / "explorer.png"), full_page=True)
        print(f"\nscreenshot: {tmp_path / 'explorer.png'}")

        # bad uploads: a message in the page, and the app keeps serving
        text = tmp_path / "notes.jpg"
        text.write_text("not an image")
        page.set_input_files("#upload input[type=file]", str(text))
        wait_text(page, "#status", "Could not read notes.jpg")
        for size in (1, 8000):
            path = tmp_path / f"side_{size}.png"
            Image.new("RGB", (size, size), (90, 140, 200)).save(path)
            start = time.perf_counter()
            page.set_input_files("#upload input[type=file]", str(path))
            wait_text(page, "#status", f"side_{size}.png: {size} x {size} pixels")
            timings[f"upload {size} x {size}"] = time.perf_counter() - start
        assert not errors, errors
        browser.close()
    print("explorer response times (s): " + json.dumps({k: round(v, 3) for k, v in timings.items()}))


@pytest.mark.slow
def test_html_report_opens_without_console_errors(trained, data_root, tmp_path):
    executable = chromium()
    from playwright.sync_api import sync_playwright

    run_tool(
        "analyze_imbalance.py",
        [
            "--config-file",
            QUICK,
            "--output",
            str(tmp_path),
            "--html",
            "--examples",
            "2",
            "--example-threshold",
            "0",
            "MODEL.WEIGHTS",
            str(trained / "model_final.pth"),
        ],
        data_root,
    )
    page_text = (tmp_path / "imbalance.html").read_text()
    assert "http://" not in page_text and "https://" not in page_text  # self-contained
    values = [float(v) for v in re.findall(r"mask IoU - box IoU at layer 1 = (-?[\d.]+)", page_text)]
    assert values == sorted(values, reverse=True) and 1 <= len(values) <= 2
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        page = browser.new_page()
        errors = []
        page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.goto((tmp_path / "imbalance.html").as_uri())
        images = page.locator("img")
        stages = len(json.loads((tmp_path / "imbalance.json").read_text()))
        assert images.count() == 1 + len(values) * stages
        for i in range(images.count()):  # every embedded image decodes
            assert images.nth(i).evaluate("img => img.complete && img.naturalWidth > 0")
        assert not errors, errors
        browser.close()


def test_without_gradio_the_explorer_says_how_to_install_it(tmp_path):
    shadow = tmp_path / "gradio"  # a gradio package that cannot be imported
    shadow.mkdir()
    (shadow / "__init__.py").write_text("raise ImportError('no gradio here')\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tools", "explorer.py"), "--config-file", QUICK],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
    )
    assert result.returncode != 0 and "pip install -r requirements-explorer.txt" in result.stderr


def test_two_models_side_by_side_stage_by_stage(explorer, loaded, dataset):
    """DI-MaskDINO beside a MaskDINO (no DI module, no BATO): stages matched by name; the
    token-interaction stage exists in the first only."""
    from detectron2.modeling import build_model

    from di_maskdino.d2 import load_config
    from di_maskdino.d2.modeling import class_names
    from di_maskdino.stages import stage_predictor

    first, _ = loaded
    cfg = load_config(
        QUICK, ["MODEL.DI_MASKDINO.DE_IMBALANCE.ENABLED", "False", "MODEL.DI_MASKDINO.BATO.ENABLED", "False"]
    )
    network = build_model(cfg).eval()
    predictor = stage_predictor(network, max_detections=cfg.TEST.DETECTIONS_PER_IMAGE)
    second = explorer.ExplorerModel("MaskDINO", lambda image: predictor([image])[0], class_names(cfg), network)
    app = explorer.Explorer([first, second], {})
    record = DatasetCatalog.get(dataset)[0]
    analysis = app.analyse(read_image_rgb(record["file_name"]), "image")
    names = [s.name for s in analysis.stages[0]]
    assert names[0].startswith("TI") and [s.name for s in analysis.stages[1]] == names[1:]
    (_, drawn, rows), (missing, none, nothing) = app.view(analysis, 0, 0.0, [], "boxes")
    assert drawn is not None and rows and none is None and nothing == [] and "no stage 'TI 0.0'" in missing
    last = len(names) - 1
    views = app.view(analysis, last, 0.0, [], "boxes and masks")
    for view, stages in zip(views, analysis.stages):
        assert names[last] in view[0] and view[1] is not None
        assert [r[2] for r in view[2]] == [round(float(s), 3) for s in stages[-1].detections.scores]
