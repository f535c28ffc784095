"""Item 4: static int8 quantization of the shipped model: speed against float32 and the validation mIoU change."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from benchmarks.common import CAMVID, Section, alternate, default_model, road_images
from benchmarks.speed import our_session


def quantization(scratch: Path, quick: bool, threads: int, int8_path: Path | None = None) -> Section:
    from segserve.quantize import calibration_images, quantize_int8

    fp32 = default_model()
    have_data = (CAMVID / "train").is_dir()
    shipped = fp32.with_name(f"{fp32.stem}-int8.onnx")
    if int8_path is None and shipped.exists():  # measure the shipped int8 file itself
        int8_path = shipped
    if int8_path is None or not int8_path.exists():
        int8_path = scratch / "int8.onnx"
        if have_data:
            images = calibration_images(CAMVID / "train")
        else:  # no CamVid here: calibrate on synthetic pictures (figures then say little about accuracy)
            from PIL import Image

            folder = scratch / "calibration"
            folder.mkdir(exist_ok=True)
            for index, pixels in enumerate(road_images(16)):
                Image.fromarray(pixels).save(folder / f"{index}.png")
            images = calibration_images(folder)
        quantize_int8(fp32, int8_path, images)
    sessions = {"fp32": our_session(fp32, threads), "int8": our_session(int8_path, threads)}
    section = Section(f"4. Static int8 quantization ({fp32.name}, QDQ, calibrated on CamVid train)",
                      ["input", "fp32 ms", "int8 ms", "int8 speed-up"])  # fmt: skip
    for size in ((360, 480), (512, 512), (720, 960)):
        image = np.stack(road_images(1, size))
        medians = alternate({k: (lambda s=s, x=image: s.run(["labels"], {"images": x})) for k, s in sessions.items()},
                            5 if quick else 11)  # fmt: skip
        section.rows.append([f"{size[0]}x{size[1]}", 1000 * medians["fp32"], 1000 * medians["int8"],
                             f"{medians['fp32'] / medians['int8']:.2f}x"])  # fmt: skip
    if have_data:
        from segserve.datasets import open_collection
        from segserve.training.evaluate import evaluate

        collection = open_collection(CAMVID, "val")
        scores = {}
        for name, session in sessions.items():
            metrics, _ = evaluate(lambda x, s=session: s.run(["labels"], {"images": x})[0], collection,
                                  batch_size=1, progress=False)  # fmt: skip
            scores[name] = metrics
        change = 100 * (scores["int8"].mean_iou - scores["fp32"].mean_iou)
        section.notes.append(
            f"Validation (CamVid val, {len(collection.samples)} frames, full label resolution): mIoU fp32 "
            f"{100 * scores['fp32'].mean_iou:.2f}, int8 {100 * scores['int8'].mean_iou:.2f} ({change:+.2f} points); "
            f"pixel accuracy {100 * scores['fp32'].pixel_accuracy:.2f} -> {100 * scores['int8'].pixel_accuracy:.2f}. "
            f"File size {fp32.stat().st_size / 1e6:.1f} MB -> {int8_path.stat().st_size / 1e6:.1f} MB."
        )
    else:
        section.notes.append("CamVid is not present here: no validation mIoU for the int8 model in this run.")
    section.notes.append(
        f"int8 file: `{int8_path.name if int8_path == shipped else 'quantized in this run'}`. Weights int8 per "
        "channel, activations uint8 per tensor (`segserve export --int8 --calibrate DIR`); the input resize, "
        "ArgMax and the final score resize stay float32. onnxruntime runs the convolutions as QLinearConv "
        "(VNNI), the deconvolutions included: the export writes them in sub-pixel form (a convolution and a "
        "DepthToSpace), since onnxruntime's CPU provider has no quantized ConvTranspose."
    )
    return section
