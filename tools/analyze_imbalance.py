#!/usr/bin/env python
"""Imbalance analysis (paper Fig. 1c/1d, appendix A): box AP and mask AP of the predictions
of every decoder layer - the initial prediction as layer 0 - and box AP of the
token-interaction outputs, all in one evaluation pass.

    python tools/analyze_imbalance.py --config-file configs/coco/dimaskdino_r50_12ep.yaml \\
        --output output/imbalance MODEL.WEIGHTS model.pth

Writes OUTPUT/imbalance.json, OUTPUT/imbalance.md (a table) and OUTPUT/imbalance.png (box vs
mask AP per layer). --dataset picks a dataset other than the config's first test set.

--html also writes OUTPUT/imbalance.html, one self-contained file for papers and slides (no
server, images embedded): the per-layer AP curves, the table, and the --examples images (of
the dataset's first --example-pool) where the first decoder layer's masks beat its boxes by
the most (mean over matched objects of mask IoU - box IoU), drawn at every stage.

With panoptic or semantic inference on (MODEL.DI_MASKDINO.TEST.PANOPTIC_ON / SEMANTIC_ON, e.g.
configs/coco/panoptic/dimaskdino_r50_50ep.yaml), every layer also gets PQ (things PQ_th,
stuff PQ_st) and mIoU, and box / mask AP count things only: the paper's imbalance question
asked of panoptic segmentation.
"""

import argparse
import base64
import html
import io
import json
import os
import sys

import di_maskdino.d2  # noqa: F401 - first: detectron2 imported quietly (di_maskdino/dependencies.py)

# isort: split
from detectron2.data import DatasetCatalog, build_detection_test_loader
from detectron2.modeling import build_model

from di_maskdino.cpu_inference import CPUInference
from di_maskdino.d2 import (
    Checkpointer,
    CheckpointError,
    MissingWeightsError,
    build_mapper,
    check_weights,
    load_config,
    use_available_device,
)
from di_maskdino.d2.engine import TOOL_DEFAULTS
from di_maskdino.d2.evaluation import evaluate_every_layer, evaluate_every_layer_segmentation, largest_imbalance
from di_maskdino.d2.modeling import class_names
from di_maskdino.images import read_image_rgb
from di_maskdino.stages import draw_detections, stage_predictor


def instance_rows(table):
    """(header, rows of cell texts) of the per-layer table of an instance model."""
    rows = []
    for name, metrics in table.items():
        box, mask = metrics.get("bbox"), metrics.get("segm")
        gap = f"{box - mask:.1f}" if mask is not None else ""
        rows.append([name, f"{box:.1f}", "" if mask is None else f"{mask:.1f}", gap])
    return ["output", "box AP", "mask AP", "box - mask"], rows


def markdown(header, rows) -> str:
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def bar_plot(table, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = [n for n, m in table.items() if "segm" in m]
    x = range(len(layers))
    figure, axis = plt.subplots(figsize=(max(4, 1.1 * len(layers)), 3.2))
    axis.bar([i - 0.2 for i in x], [table[n]["bbox"] for n in layers], width=0.4, label="detection (box AP)")
    axis.bar([i + 0.2 for i in x], [table[n]["segm"] for n in layers], width=0.4, label="segmentation (mask AP)")
    axis.set_xticks(list(x))
    axis.set_xticklabels(layers)
    axis.set_ylabel("AP")
    axis.set_title("Detection vs segmentation per decoder layer")
    highest = max(max(table[n]["bbox"], table[n]["segm"]) for n in layers)
    axis.set_ylim(0, max(highest, 1.0) * 1.3)
    axis.legend(loc="upper center", ncol=2, fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


SEGMENTATION_COLUMNS = [
    ("bbox", "box AP (things)"),
    ("segm", "mask AP (things)"),
    ("PQ", "PQ"),
    ("PQ_th", "PQ things"),
    ("PQ_st", "PQ stuff"),
    ("mIoU", "mIoU"),
]


def segmentation_rows(table):
    """(header, rows of cell texts) of the per-layer table of a panoptic / semantic model: the
    metrics its tasks give."""
    columns = [(key, title) for key, title in SEGMENTATION_COLUMNS if any(key in row for row in table.values())]
    rows = [[name] + [f"{row[key]:.1f}" if key in row else "" for key, _ in columns] for name, row in table.items()]
    return ["output"] + [title for _, title in columns], rows


def bar_plot_segmentation(table, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = [n for n in table if n.startswith("layer")]
    metrics = [(k, t) for k, t in SEGMENTATION_COLUMNS if k in ("bbox", "segm", "PQ", "mIoU") and k in table[layers[0]]]
    width = 0.8 / len(metrics)
    figure, axis = plt.subplots(figsize=(max(4, 1.3 * len(layers)), 3.2))
    for index, (key, title) in enumerate(metrics):
        offsets = [i - 0.4 + width * (index + 0.5) for i in range(len(layers))]
        axis.bar(offsets, [table[n][key] for n in layers], width=width, label=title)
    axis.set_xticks(list(range(len(layers))))
    axis.set_xticklabels(layers)
    axis.set_title("Detection vs segmentation per decoder layer")
    highest = max(table[n][k] for n in layers for k, _ in metrics)
    axis.set_ylim(0, max(highest, 1.0) * 1.3)
    axis.legend(loc="upper center", ncol=len(metrics), fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def png_data(image=None, figure=None) -> str:
    """A data: URL of an RGB uint8 array or a matplotlib figure, as PNG."""
    buffer = io.BytesIO()
    if figure is not None:
        figure.savefig(buffer, format="png", dpi=110)
    else:
        from PIL import Image

        Image.fromarray(image).save(buffer, format="png")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def curve_figure(table):
    """Box and mask AP (and PQ / mIoU where present) per decoder layer, as lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = [n for n in table if n.startswith("layer")]
    figure, axis = plt.subplots(figsize=(max(4.5, 0.9 * len(layers)), 3.2))
    for key, title in SEGMENTATION_COLUMNS:
        if key in ("bbox", "segm", "PQ", "mIoU") and all(key in table[n] for n in layers):
            axis.plot(range(len(layers)), [table[n][key] for n in layers], marker="o", label=title)
    axis.set_xticks(range(len(layers)))
    axis.set_xticklabels(layers)
    axis.set_ylabel("AP / PQ / mIoU")
    axis.set_title("Detection vs segmentation per decoder layer")
    axis.legend(fontsize="small")
    figure.tight_layout()
    return figure


def html_report(table, header, rows, examples, names, title: str, threshold: float) -> str:
    """The self-contained HTML page (see the module's docstring)."""
    import matplotlib.pyplot as plt

    figure = curve_figure(table)
    curve = png_data(figure=figure)
    plt.close(figure)
    cells = "".join(f"<th>{html.escape(c)}</th>" for c in header)
    lines = [f"<tr>{cells}</tr>"]
    lines += ["<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows]
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title>",
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}"
        "figure{display:inline-block;margin:4px;text-align:center}figcaption{font-size:small}</style>",
        "</head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f'<img alt="AP per decoder layer" src="{curve}">',
        "<table>" + "".join(lines) + "</table>",
        "<h2>Images where the first decoder layer's masks beat its boxes by the most</h2>",
        f"<p>Detections scoring at least {threshold:g}; objects matched one to one by box IoU within a class.</p>",
    ]
    if not examples:
        parts.append("<p>No image with ground-truth masks and matched detections in the examined images.</p>")
    for record, stages, value in examples:
        image = read_image_rgb(record["file_name"])
        name = html.escape(os.path.basename(record["file_name"]))
        parts.append(f'<h3>{name}: mask IoU - box IoU at layer 1 = {value:.3f}</h3><div class="stages">')
        for stage in stages:
            drawing = draw_detections(image, stage.detections.filtered(threshold), class_names=names)
            parts.append(
                f'<figure><img alt="{html.escape(stage.name)}" src="{png_data(drawing)}" width="256">'
                f"<figcaption>{html.escape(stage.name)}</figcaption></figure>"
            )
        parts.append("</div>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True)
    parser.add_argument("--output", required=True)
    parser.add_argument("--dataset", help="dataset name (default: the config's first test set)")
    parser.add_argument("--html", action="store_true", help="also write imbalance.html (plots and example images)")
    parser.add_argument("--examples", type=int, default=4, help="example images in the HTML report")
    parser.add_argument("--example-pool", type=int, default=50, help="images examined for the examples")
    parser.add_argument(
        "--example-threshold", type=float, default=0.3, help="score threshold of the detections matched and drawn"
    )
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides, e.g. MODEL.WEIGHTS model.pth")
    args = parser.parse_args()

    cfg = load_config(args.config_file, list(TOOL_DEFAULTS) + args.opts)
    note = use_available_device(cfg)
    if note:
        print(note)
    cfg.freeze()
    dataset = args.dataset or (cfg.DATASETS.TEST[0] if cfg.DATASETS.TEST else None)
    if not dataset:
        raise SystemExit("no dataset: give --dataset or set DATASETS.TEST in the config")
    try:
        check_weights(cfg.MODEL.WEIGHTS, purpose="the analysis")
        model = build_model(cfg)
        Checkpointer.for_evaluation(model, cfg).load(cfg.MODEL.WEIGHTS)
    except (MissingWeightsError, CheckpointError) as error:
        raise SystemExit(str(error)) from error
    if cfg.MODEL.DEVICE == "cpu" and cfg.TEST.CPU_SPEEDUPS:
        CPUInference().apply_process_settings()
    loader = build_detection_test_loader(cfg, dataset, mapper=build_mapper(cfg, False))
    segmentation = model.segmentation is not None  # panoptic / semantic inference on
    if segmentation:
        table = evaluate_every_layer_segmentation(model, loader, dataset)
    else:
        table = evaluate_every_layer(model, loader, dataset)

    os.makedirs(args.output, exist_ok=True)
    with open(os.path.join(args.output, "imbalance.json"), "w") as handle:
        json.dump(table, handle, indent=2)
    header, rows = segmentation_rows(table) if segmentation else instance_rows(table)
    text = markdown(header, rows)
    with open(os.path.join(args.output, "imbalance.md"), "w") as handle:
        handle.write(text)
    (bar_plot_segmentation if segmentation else bar_plot)(table, os.path.join(args.output, "imbalance.png"))
    written = "imbalance.json, imbalance.md and imbalance.png"
    if args.html:
        predictor = stage_predictor(
            model,
            model_format=cfg.INPUT.FORMAT,
            min_size=cfg.INPUT.MIN_SIZE_TEST,
            max_size=cfg.INPUT.MAX_SIZE_TEST,
            max_detections=cfg.TEST.DETECTIONS_PER_IMAGE,
        )
        records = DatasetCatalog.get(dataset)[: args.example_pool]
        examples = largest_imbalance(
            lambda path: predictor([path])[0], records, args.examples, threshold=args.example_threshold
        )
        title = f"Per-layer imbalance on {dataset}"
        page = html_report(table, header, rows, examples, class_names(cfg), title, args.example_threshold)
        with open(os.path.join(args.output, "imbalance.html"), "w") as handle:
            handle.write(page)
        written = "imbalance.json, imbalance.md, imbalance.png and imbalance.html"
    print(text)
    print(f"wrote {written} to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
